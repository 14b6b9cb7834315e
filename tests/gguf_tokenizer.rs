//! A Hugging Face base's tokenizer written as GGUF keys (`llama::gguf_tokenizer`, what
//! `kdpipe export` uses when `[student] model` is a Hugging Face folder). For SmolLM2 and
//! Qwen2.5-Coder-0.5B, kdpipe writes the model's tokenizer files as its Hugging Face
//! export does, converts them, and gets back the keys the model's own GGUF holds; a GGUF
//! written with the converted keys tokenizes real text as the tokenizer.json does, in
//! kdpipe's engine and in llama.cpp (llama-cpp-python).

mod common;
use candle_core::quantized::gguf_file::Value;
use common::*;
use kdpipe::config::GgufType;
use kdpipe::llama::{self, gguf_tokenizer, gguf_write};
use std::collections::BTreeMap;
use std::path::Path;

/// A metadata value as JSON, integers of any width as one number.
fn plain(v: &Value) -> serde_json::Value {
    use serde_json::json;
    match v {
        Value::U8(x) => json!(*x),
        Value::I8(x) => json!(*x),
        Value::U16(x) => json!(*x),
        Value::I16(x) => json!(*x),
        Value::U32(x) => json!(*x),
        Value::I32(x) => json!(*x),
        Value::U64(x) => json!(*x),
        Value::I64(x) => json!(*x),
        Value::F32(x) => json!(*x),
        Value::F64(x) => json!(*x),
        Value::Bool(x) => json!(*x),
        Value::String(x) => json!(x),
        Value::Array(x) => serde_json::Value::Array(x.iter().map(plain).collect()),
    }
}

fn as_map(keys: Vec<(String, Value)>) -> BTreeMap<String, serde_json::Value> {
    keys.into_iter().map(|(k, v)| (k, plain(&v))).collect()
}

/// The model's tokenizer files as kdpipe's Hugging Face export writes them, converted.
fn converted(model: &llama::LoadedModel, dir: &Path) -> Vec<(String, Value)> {
    let eos = model.tokenizer.id_to_token(model.eos_token_id).unwrap();
    llama::export::write_tokenizer_files(
        dir,
        &model.shape,
        &model.tokenizer_json().unwrap(),
        &model.chat,
        &eos,
    )
    .unwrap();
    gguf_tokenizer::from_hf_folder(dir, model.shape.vocab_size).unwrap()
}

/// Real texts: posts of the feelings data set, a rendered chat with its special tokens,
/// digits, accents and an emoji.
fn texts(model: &llama::LoadedModel) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string(root().join("datasets/feelings.jsonl"))
        .unwrap()
        .lines()
        .take(24)
        .map(|l| {
            let row: serde_json::Value = serde_json::from_str(l).unwrap();
            row["text"].as_str().unwrap().to_string()
        })
        .collect();
    let chat = [kdpipe::chat::ChatMessage::new(
        "user",
        "Tom has 12345 apples and buys 67 more. Café, naïve, 😀!\n\n  Total?",
    )];
    v.push(model.chat.render(&chat, true).unwrap());
    v
}

#[test]
fn converted_keys_equal_the_models_own_gguf() {
    for gguf in [smollm2(), qwen()] {
        let model = llama::load_for_inference(gguf.to_str().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ours = as_map(converted(&model, dir.path()));
        let theirs = as_map(gguf_write::tokenizer_metadata(&gguf).unwrap());
        for key in [
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.chat_template",
        ] {
            assert!(theirs.contains_key(key), "{}: {key}", gguf.display());
            assert!(
                ours.get(key) == theirs.get(key),
                "{}: {key} differs (ours {} chars, the GGUF's {})",
                gguf.display(),
                ours.get(key).map_or(0, |v| v.to_string().len()),
                theirs[key].to_string().len()
            );
        }
    }
}

#[test]
fn a_gguf_with_converted_keys_tokenizes_as_the_tokenizer_json_in_kdpipe_and_llama_cpp() {
    let model = llama::load(smollm2().to_str().unwrap(), &candle_core::Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = converted(&model, dir.path());
    let file = dir.path().join("student-q8_0.gguf");
    gguf_write::write(&file, &model.shape, &model.weights, GgufType::Q8_0, &keys).unwrap();

    let texts = texts(&model);
    let reference = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let expected: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            reference
                .encode(t.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec()
        })
        .collect();
    assert!(expected.iter().all(|ids| !ids.is_empty()));

    let written = llama::load_for_inference(file.to_str().unwrap()).unwrap();
    for (text, ids) in texts.iter().zip(&expected) {
        assert_eq!(&written.encode(text).unwrap(), ids, "kdpipe on {text:?}");
    }

    let request = serde_json::json!({ "texts": texts });
    let llama_cpp: Vec<Vec<u32>> = serde_json::from_value(common::agreement::llama_cpp_script(
        "llama_tokenize.py",
        &file,
        &request,
    ))
    .unwrap();
    for ((text, ours), theirs) in texts.iter().zip(&expected).zip(&llama_cpp) {
        assert_eq!(ours, theirs, "llama.cpp on {text:?}");
    }
}
