//! A `tokenizers::Tokenizer` built from GGUF metadata (`tokenizer.ggml.*`), matching what
//! llama.cpp and mistralrs do: byte-level BPE from the vocab and merges, the
//! pre-tokenizer regex named by `tokenizer.ggml.pre`, every non-normal token special.
//! (candle's own GGUF tokenizer adds a prefix space for SmolLM2; docs/STACK.md.)

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::json;

/// GPT-2's pre-tokenizer regex (SmolLM2 and other `gpt2`/`smollm` vocabularies).
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer regex, as in its tokenizer.json.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub fn meta_str<'a>(c: &'a Content, key: &str) -> Result<&'a str> {
    Ok(c.metadata
        .get(key)
        .with_context(|| format!("GGUF metadata lacks {key}"))?
        .to_string()?
        .as_str())
}

pub fn meta_u64(c: &Content, key: &str) -> Option<u64> {
    match c.metadata.get(key)? {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => Some(*x as u64),
        Value::I16(x) => Some(*x as u64),
        Value::I32(x) => Some(*x as u64),
        Value::I64(x) => Some(*x as u64),
        _ => None,
    }
}

fn meta_array<'a>(c: &'a Content, key: &str) -> Result<&'a Vec<Value>> {
    Ok(c.metadata
        .get(key)
        .with_context(|| format!("GGUF metadata lacks {key}"))?
        .to_vec()?)
}

/// tokenizer.json text for the GGUF's vocabulary.
pub fn tokenizer_json_from_gguf(c: &Content) -> Result<String> {
    let model = meta_str(c, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!("GGUF tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")\nhint: use a Hugging Face folder with tokenizer.json instead");
    }
    let pre = c
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");
    let tokens: Vec<String> = meta_array(c, "tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<candle_core::Result<_>>()?;
    let merges: Vec<String> = meta_array(c, "tokenizer.ggml.merges")?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<candle_core::Result<_>>()?;
    let types: Vec<i64> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|t| match t {
                Value::I32(x) => *x as i64,
                Value::U32(x) => *x as i64,
                _ => 1,
            })
            .collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i).copied().unwrap_or(1) != 1)
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
    let (normalizer, pretokenizers) = match pre {
        "qwen2" => (json!({"type": "NFC"}), vec![split(QWEN2_REGEX), byte_level]),
        "smollm" | "gpt-2" | "gpt2" | "default" => (serde_json::Value::Null, vec![split(r"\p{N}"), split(GPT2_REGEX), byte_level]),
        other => bail!("GGUF pre-tokenizer {other:?} is not supported yet (known: smollm, gpt-2, qwen2)\nhint: use a Hugging Face folder with tokenizer.json instead"),
    };
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretokenizers},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    Ok(serde_json::to_string(&doc)?)
}
