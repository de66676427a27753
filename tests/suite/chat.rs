//! Chat templates and special tokens against transformers: fixtures written by
//! `scripts/chat_fixtures.py` (transformers 5.24.0, tokenizers 0.23.3; the versions are in each
//! `expected.json`).

use std::path::{Path, PathBuf};

use candle_lisa::data::chat::{chat_example, ChatMessage, ChatTemplate, SpecialTokens};
use candle_lisa::data::tokenizer::{HfTokenizer, TextTokenizer};
use candle_lisa::{LisaError, IGNORE_INDEX};
use serde_json::Value;

type Error = Box<dyn std::error::Error>;

fn fixture(name: &str) -> Result<(PathBuf, Value), Error> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat")
        .join(name);
    let expected = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    Ok((dir, expected))
}

/// The rendering and the token ids are transformers' own; the labels cover exactly the
/// assistant replies with their end-of-turn token.
fn check(name: &str, end_of_turn: &str) -> Result<(), Error> {
    let (dir, expected) = fixture(name)?;
    let tok = HfTokenizer::from_file(dir.join("tokenizer.json"))?;
    let template = ChatTemplate::from_dir(&dir)?.ok_or("no chat template")?;
    for chat in expected["chats"].as_array().ok_or("chats")? {
        let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone())?;
        let text = template.render(&messages, false)?;
        assert_eq!(
            text,
            chat["text"].as_str().ok_or("text")?,
            "{name}: rendering"
        );
        let prompt = template.render(&messages[..messages.len() - 1], true)?;
        assert_eq!(
            prompt,
            chat["prompt_text"].as_str().ok_or("prompt")?,
            "{name}: generation prompt"
        );

        let example = chat_example(&template, &tok, &messages)?;
        let want: Vec<u32> = serde_json::from_value(chat["ids"].clone())?;
        assert_eq!(example.ids, want, "{name}: token ids");
        let trained: Vec<u32> = example
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .map(|&l| l as u32)
            .collect();
        let mut replies = Vec::new();
        for m in messages.iter().filter(|m| m.role == "assistant") {
            replies.extend(tok.encode(&format!("{}{end_of_turn}", m.content.trim()))?);
        }
        assert_eq!(
            trained, replies,
            "{name}: only the assistant replies are trained on"
        );
        assert_eq!(example.labels[0], IGNORE_INDEX);
    }
    Ok(())
}

#[test]
fn llama3_template_matches_transformers() -> Result<(), Error> {
    check("llama3", "<|eot_id|>")
}

#[test]
fn chatml_template_matches_transformers() -> Result<(), Error> {
    check("chatml", "<|im_end|>\n")
}

/// End-of-sequence ids: the tokenizer's end of turn first, then generation_config.json's list
/// (which takes precedence over config.json's), as transformers resolves them.
#[test]
fn special_tokens_follow_transformers_precedence() -> Result<(), Error> {
    for name in ["llama3", "chatml"] {
        let (dir, expected) = fixture(name)?;
        let tok = HfTokenizer::from_file(dir.join("tokenizer.json"))?;
        let special = SpecialTokens::from_dir(&dir, &tok)?;
        let mut want = vec![expected["tokenizer_eos"].as_u64().ok_or("eos")? as u32];
        for id in expected["generation_eos"]
            .as_array()
            .ok_or("generation_eos")?
        {
            let id = id.as_u64().ok_or("id")? as u32;
            if !want.contains(&id) {
                want.push(id);
            }
        }
        assert_eq!(special.eos, want, "{name}");
        assert_eq!(
            special.bos,
            expected["tokenizer_bos"].as_u64().map(|b| b as u32),
            "{name}"
        );
    }
    Ok(())
}

#[test]
fn chat_errors_are_clear() -> Result<(), Error> {
    let (dir, _) = fixture("llama3")?;
    let tok = HfTokenizer::from_file(dir.join("tokenizer.json"))?;
    let template = ChatTemplate::from_dir(&dir)?.ok_or("no chat template")?;
    let bad_role = [
        ChatMessage::new("tool", "x"),
        ChatMessage::new("assistant", "y"),
    ];
    let err = template.render(&bad_role, false).unwrap_err().to_string();
    assert!(
        err.contains("Only user and assistant roles are supported"),
        "{err}"
    );
    let no_reply = [ChatMessage::new("user", "hi")];
    assert!(chat_example(&template, &tok, &no_reply).is_err());
    assert!(ChatTemplate::new("{% if %}", None, None).is_err());
    Ok(())
}

/// A template whose loops multiply runs out of fuel with a typed error instead of rendering
/// for hours; the budget can be raised or lowered.
#[test]
fn runaway_templates_run_out_of_fuel() -> Result<(), Error> {
    let nested = "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x{% endfor %}{% endfor %}{% endfor %}";
    let chat = [ChatMessage::new("user", "hi")];
    let t = ChatTemplate::new(nested, None, None)?;
    match t.render(&chat, false) {
        Err(LisaError::TemplateFuelExhausted { fuel }) => {
            assert_eq!(fuel, candle_lisa::data::chat::DEFAULT_TEMPLATE_FUEL)
        }
        other => panic!("{other:?}"),
    }
    let mut small = ChatTemplate::new(
        "{% for m in messages %}{{ m.content }}{% endfor %}",
        None,
        None,
    )?;
    assert_eq!(small.render(&chat, false)?, "hi");
    small.set_fuel(2);
    assert!(matches!(
        small.render(&chat, false),
        Err(LisaError::TemplateFuelExhausted { fuel: 2 })
    ));
    Ok(())
}
