//! A GGUF's tokenizer keys (`tokenizer.ggml.*`, `tokenizer.chat_template`) from a Hugging
//! Face folder's tokenizer.json and tokenizer_config.json, for exporting a student whose
//! base was a Hugging Face model. It writes what llama.cpp's reader expects of a byte-level
//! BPE vocabulary (model "gpt2"): one token per embedding row, "[PAD<id>]" (unused) for
//! rows without one, special added tokens as control tokens, other added tokens as
//! user-defined; and only the pre-tokenizers kdpipe's own GGUF reader (tokenizer.rs)
//! knows, so every file it writes loads back in kdpipe as it does in llama.cpp.

use super::tokenizer::{GPT2_REGEX, QWEN2_REGEX};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

const HINT: &str = "hint: train from the model's GGUF instead (scripts/fetch-models.sh fetches them), or convert the exported folder with llama.cpp's convert_hf_to_gguf.py";

/// The tokenizer keys for a model with `vocab_size` embedding rows whose tokenizer files
/// are in `dir`.
pub fn from_hf_folder(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let tokenizer = read_json(&path)?.with_context(|| format!("{} is missing", path.display()))?;
    let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
    let model_config = read_json(&dir.join("config.json"))?.unwrap_or(Json::Null);
    let model = &tokenizer["model"];
    if model["type"] != "BPE" {
        bail!(
            "{}: model type {} is not byte-level BPE, the only kind kdpipe writes as GGUF\n{HINT}",
            path.display(),
            model["type"]
        );
    }
    let pre = pre_tokenizer(&tokenizer["pre_tokenizer"])
        .with_context(|| format!("{}: pre_tokenizer", path.display()))?;

    let (tokens, types) = tokens_and_types(&tokenizer, vocab_size)
        .with_context(|| format!("{}: vocabulary", path.display()))?;
    let merges = merges(&model["merges"]).with_context(|| format!("{}: merges", path.display()))?;
    let ids: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.as_str(), id as u32))
        .collect();
    // A special token by its name in tokenizer_config.json, else by id in config.json.
    let special = |name: &str| -> Option<u32> {
        let named = match &config[name] {
            Json::String(s) => Some(s.as_str()),
            Json::Object(o) => o.get("content").and_then(Json::as_str),
            _ => None,
        };
        named.and_then(|n| ids.get(n).copied()).or_else(|| {
            model_config[format!("{name}_id")]
                .as_u64()
                .map(|v| v as u32)
        })
    };

    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let mut keys = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens.clone())),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strings(merges)),
    ];
    for (name, key) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("pad_token", "padding_token_id"),
        ("unk_token", "unknown_token_id"),
    ] {
        if let Some(id) = special(name) {
            keys.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    keys.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(adds_bos(&config, &tokenizer)),
    ));
    match chat_template(dir, &config)? {
        Some(t) => keys.push(("tokenizer.chat_template".into(), Value::String(t))),
        None => eprintln!(
            "export: {} has no chat template; the GGUF carries none",
            dir.display()
        ),
    }
    Ok(keys)
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            Ok(Some(serde_json::from_str(&text).with_context(|| {
                format!("{} is not valid JSON", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// llama.cpp's name for the pre-tokenizer (`tokenizer.ggml.pre`): Qwen2's regex, or
/// SmolLM2's digits-apart GPT-2 split (as Hugging Face writes it, or as kdpipe's own
/// tokenizer.json does).
fn pre_tokenizer(pre: &Json) -> Result<&'static str> {
    let parts: Vec<&Json> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect(),
        Some(_) => vec![pre],
        None => bail!("none (a byte-level BPE vocabulary needs one)\n{HINT}"),
    };
    let mut regexes = Vec::new();
    let (mut digits_apart, mut byte_level_regex) = (false, None);
    for p in parts {
        match p["type"].as_str().unwrap_or("") {
            "Split" => regexes.push(p["pattern"]["Regex"].as_str().unwrap_or("")),
            "Digits" => digits_apart = p["individual_digits"] == true,
            "ByteLevel" => byte_level_regex = Some(p["use_regex"] != false),
            other => bail!("a {other:?} step, which kdpipe does not write as GGUF\n{HINT}"),
        }
    }
    let Some(gpt2_split) = byte_level_regex else {
        bail!("no ByteLevel step: not a byte-level BPE vocabulary\n{HINT}");
    };
    match (regexes.as_slice(), digits_apart, gpt2_split) {
        ([QWEN2_REGEX], false, false) => Ok("qwen2"),
        ([], true, true) => Ok("smollm"),
        ([r"\p{N}", GPT2_REGEX], false, false) => Ok("smollm"),
        _ => bail!("splits {regexes:?} (digits apart: {digits_apart}) match none kdpipe knows (qwen2, smollm)\n{HINT}"),
    }
}

/// One token per embedding row and its llama.cpp type.
fn tokens_and_types(tokenizer: &Json, vocab_size: usize) -> Result<(Vec<String>, Vec<i32>)> {
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut place = |id: u64, token: &str, kind: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).with_context(|| {
            format!("token {token:?} has id {id}, past the model's {vocab_size} embedding rows")
        })?;
        *slot = Some((token.to_string(), kind));
        Ok(())
    };
    let vocab = tokenizer["model"]["vocab"]
        .as_object()
        .context("model.vocab is not a token → id map")?;
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .with_context(|| format!("token {token:?}: id {id}"))?;
        place(id, token, NORMAL)?;
    }
    // Added tokens override the vocabulary's entry for the same id.
    for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        let id = added["id"].as_u64().context("an added token has no id")?;
        let token = added["content"]
            .as_str()
            .context("an added token has no content")?;
        let kind = if token == format!("[PAD{id}]") {
            UNUSED
        } else if added["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        };
        place(id, token, kind)?;
    }
    let mut seen = HashMap::new();
    let (mut names, mut types) = (
        Vec::with_capacity(vocab_size),
        Vec::with_capacity(vocab_size),
    );
    for (id, slot) in tokens.into_iter().enumerate() {
        let (token, kind) = slot.unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED));
        if let Some(first) = seen.insert(token.clone(), id) {
            bail!("token {token:?} has two ids, {first} and {id}");
        }
        names.push(token);
        types.push(kind);
    }
    Ok((names, types))
}

/// Merges as GGUF stores them, "left right", from either of tokenizer.json's forms.
fn merges(merges: &Json) -> Result<Vec<String>> {
    let list = merges.as_array().context("not a list")?;
    list.iter()
        .enumerate()
        .map(|(i, m)| match m {
            Json::String(s) if s.split(' ').count() == 2 => Ok(s.clone()),
            Json::Array(pair) if pair.len() == 2 => match (pair[0].as_str(), pair[1].as_str()) {
                (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                _ => bail!("merge {i} ({m}) is not two strings"),
            },
            _ => bail!("merge {i} ({m}) is not two tokens"),
        })
        .collect()
}

/// Whether encoding adds a BOS token: tokenizer_config.json says so, else the
/// post-processor's single-sequence template starts with a special token.
fn adds_bos(config: &Json, tokenizer: &Json) -> bool {
    if let Some(b) = config["add_bos_token"].as_bool() {
        return b;
    }
    let post = &tokenizer["post_processor"];
    post["type"] == "TemplateProcessing" && post["single"][0].get("SpecialToken").is_some()
}

/// The chat template: tokenizer_config.json's (a string, or the one named "default" in a
/// list), else chat_template.jinja beside it.
fn chat_template(dir: &Path, config: &Json) -> Result<Option<String>> {
    match &config["chat_template"] {
        Json::String(s) => return Ok(Some(s.clone())),
        Json::Array(list) => {
            let default = list.iter().find(|t| t["name"] == "default");
            if let Some(t) = default.and_then(|t| t["template"].as_str()) {
                return Ok(Some(t.to_string()));
            }
        }
        _ => {}
    }
    let file = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&file) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", file.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pre_tokenizers_are_named_as_llama_cpp_names_them() {
        let qwen = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]});
        assert_eq!(pre_tokenizer(&qwen).unwrap(), "qwen2");
        let smollm = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}]});
        assert_eq!(pre_tokenizer(&smollm).unwrap(), "smollm");
        // Plain GPT-2 keeps digit runs together: not SmolLM2's split, refused.
        let gpt2 = json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true});
        let err = pre_tokenizer(&gpt2).unwrap_err().to_string();
        assert!(err.contains("convert_hf_to_gguf.py"), "{err}");
    }

    #[test]
    fn rows_without_a_token_are_unused_pads_and_added_tokens_keep_their_kind() {
        let tokenizer = json!({
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}},
            "added_tokens": [
                {"id": 3, "content": "<|end|>", "special": true},
                {"id": 4, "content": "<tool>", "special": false},
                {"id": 5, "content": "[PAD5]", "special": true}]});
        let (tokens, types) = tokens_and_types(&tokenizer, 7).unwrap();
        assert_eq!(
            tokens,
            ["a", "b", "ab", "<|end|>", "<tool>", "[PAD5]", "[PAD6]"]
        );
        assert_eq!(types, [1, 1, 1, 3, 4, 5, 5]);
        let err = tokens_and_types(&tokenizer, 4).unwrap_err().to_string();
        assert!(err.contains("past the model's 4 embedding rows"), "{err}");
    }

    #[test]
    fn merges_read_in_both_forms() {
        let m = merges(&json!(["a b", ["ab", "c"]])).unwrap();
        assert_eq!(m, ["a b", "ab c"]);
        assert!(merges(&json!(["abc"])).is_err());
    }
}
