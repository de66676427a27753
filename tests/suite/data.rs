//! Datasets from files: the format detected, the splits as documented, bad files refused with
//! the file named.

use std::path::Path;

use candle_lisa::data::tokenizer::{ByteTokenizer, TextTokenizer};
use candle_lisa::data::{DataFormat, Dataset, Task};
use candle_lisa::{LisaError, IGNORE_INDEX};

const EOS: u32 = ByteTokenizer::EOS;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn files_split_their_last_tenth_off() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let tok = ByteTokenizer;
    // 25 prompt/response lines: the last 2 (a tenth, rounded down) are held out.
    let lines: String = (0..25)
        .map(|i| format!("{{\"prompt\": \"{i}?\", \"response\": \"{i}\"}}\n"))
        .collect();
    let jsonl = write(dir.path(), "pairs.jsonl", &lines);
    assert_eq!(DataFormat::of(&jsonl)?, DataFormat::PromptResponse);
    let d = Dataset::from_file(&jsonl, &tok, EOS, 16, || unreachable!("not chat"))?;
    assert_eq!((d.train.len(), d.eval.len(), d.pairs.len()), (23, 2, 2));
    let held: Vec<String> = d
        .pairs
        .iter()
        .map(|(p, _)| tok.decode(p).unwrap())
        .collect();
    assert_eq!(held, ["23?", "24?"]);
    // Training examples are the first 23 in order; prompts are out of the loss.
    assert_eq!(
        d.train[0].ids,
        [tok.encode("0?")?, tok.encode("0")?, vec![EOS]].concat()
    );
    assert_eq!(&d.train[0].labels[..2], &[IGNORE_INDEX, IGNORE_INDEX]);
    assert_eq!(*d.train[0].ids.last().unwrap(), EOS);

    // Text: 250 bytes in windows of 10 tokens, the last tenth (3 of 25 windows, rounded up).
    let text = write(dir.path(), "corpus.txt", &"abcdefghij".repeat(25));
    assert_eq!(DataFormat::of(&text)?, DataFormat::Text);
    let d = Dataset::from_file(&text, &tok, EOS, 10, || unreachable!("not chat"))?;
    assert_eq!((d.train.len(), d.eval.len(), d.pairs.len()), (22, 3, 0));
    assert!(d
        .train
        .iter()
        .all(|e| e.ids.len() == 10 && e.trained_tokens() == 9));
    Ok(())
}

#[test]
fn bad_files_name_themselves() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let tok = ByteTokenizer;
    let short = write(dir.path(), "short.txt", "abc");
    match Dataset::from_file(&short, &tok, EOS, 10, || unreachable!()) {
        Err(LisaError::InvalidData { path, reason }) => {
            assert_eq!(path, short);
            assert!(reason.contains("fewer than 2 windows"), "{reason}");
        }
        other => panic!("expected InvalidData, got {other:?}"),
    }
    let one = write(
        dir.path(),
        "one.jsonl",
        "{\"prompt\": \"a\", \"response\": \"b\"}\n",
    );
    assert!(matches!(
        Dataset::from_file(&one, &tok, EOS, 10, || unreachable!()),
        Err(LisaError::InvalidData { .. })
    ));
    let bad = write(
        dir.path(),
        "bad.jsonl",
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": 3}\n",
    );
    match Dataset::from_file(&bad, &tok, EOS, 10, || unreachable!()) {
        Err(LisaError::InvalidData { path, reason }) => {
            assert!(path.to_string_lossy().ends_with("bad.jsonl:2"), "{path:?}");
            assert!(reason.contains("\"prompt\""), "{reason}");
        }
        other => panic!("expected InvalidData naming line 2, got {other:?}"),
    }
    let chat = write(dir.path(), "chat.jsonl", "{\"messages\": []}\n");
    assert_eq!(DataFormat::of(&chat)?, DataFormat::Chat);
    assert!("reverse".parse::<Task>().is_err());
    Ok(())
}

/// The bundled tasks hold out their first problems and keep them as token pairs.
#[test]
fn bundled_tasks_hold_out_their_first_problems() -> Result<(), Box<dyn std::error::Error>> {
    let tok = ByteTokenizer;
    let d = Dataset::from_task(Task::Add, 3, &tok, EOS)?;
    assert_eq!(
        (d.train.len(), d.eval.len(), d.pairs.len()),
        (2300, 200, 200)
    );
    let problems = Task::Add.problems(3);
    assert_eq!(tok.decode(&d.pairs[0].0)?, problems[0].0);
    assert_eq!(tok.decode(&d.pairs[0].1)?, problems[0].1);
    assert_ne!(Task::Sort.problems(3), Task::Sort.problems(4));
    Ok(())
}
