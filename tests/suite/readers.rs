//! Inputs that the fuzz driver of the file readers (`benches/fuzz.rs`) found to panic, abort
//! or allocate without bound; each is a typed error now.

use candle_lisa::{LisaError, LlamaConfig};

fn config_error(json: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, json).unwrap();
    match LlamaConfig::from_file(&path) {
        Err(e @ LisaError::InvalidConfig(_)) => e.to_string(),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

const TINY: &str = r#""vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
    "num_attention_heads": 4, "num_key_value_heads": 2"#;

/// 2^31 layers: the reader allocated a RoPE for each (tens of GiB) before any check.
#[test]
fn a_config_with_billions_of_layers_is_refused_before_allocating() {
    let e = config_error(&format!(r#"{{{TINY}, "num_hidden_layers": 2147483648}}"#));
    assert!(e.contains("num_hidden_layers 2147483648"), "{e}");
    assert!(e.contains("too large to exist"), "{e}");
}

/// Sizes whose products overflow usize are refused, not wrapped or panicking.
#[test]
fn a_config_whose_sizes_overflow_is_refused() {
    let e = config_error(
        r#"{"vocab_size": 18446744073709551615, "hidden_size": 64, "intermediate_size": 96,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}"#,
    );
    assert!(e.contains("too large to exist"), "{e}");
    let e = config_error(&format!(
        r#"{{{TINY}, "num_hidden_layers": 2, "head_dim": 4611686018427387904}}"#
    ));
    assert!(e.contains("too large to exist"), "{e}");
    let e = config_error(&format!(r#"{{{TINY}, "num_hidden_layers": 0}}"#));
    assert!(e.contains("num_hidden_layers must be at least 1"), "{e}");
}
