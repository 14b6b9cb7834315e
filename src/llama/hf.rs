//! Load a student from a Hugging Face folder: config.json, *.safetensors, tokenizer.json
//! and the chat template from tokenizer_config.json.

use super::{LoadedModel, ModelShape};
use crate::chat::ChatTemplate;
use anyhow::{Context, Result};
use candle_core::Device;
use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

pub fn load(dir: &Path, device: &Device) -> Result<LoadedModel> {
    let read = |name: &str| -> Result<String> {
        let p = dir.join(name);
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {} (a Hugging Face model folder needs config.json, *.safetensors and tokenizer.json)", p.display()))
    };
    let config: serde_json::Value = serde_json::from_str(&read("config.json")?)
        .with_context(|| format!("{}/config.json is not valid JSON", dir.display()))?;
    let shape =
        ModelShape::from_hf_config(&config).with_context(|| format!("in {}", dir.display()))?;
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    anyhow::ensure!(
        !files.is_empty(),
        "{} has no .safetensors file",
        dir.display()
    );
    let mut weights = BTreeMap::new();
    for f in &files {
        let tensors = candle_core::safetensors::load(f, device)
            .with_context(|| format!("{} is not a readable safetensors file", f.display()))?;
        weights.extend(tensors);
    }
    let tokenizer_json = read("tokenizer.json")?;
    let tokenizer = tokenizers::Tokenizer::from_str(&tokenizer_json)
        .map_err(|e| anyhow::anyhow!("{}/tokenizer.json: {e}", dir.display()))?;
    let tok_cfg: serde_json::Value = read("tokenizer_config.json")
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let token_text = |key: &str| -> String {
        match tok_cfg.get(key) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v
                .get("content")
                .and_then(|c| c.as_str())
                .unwrap_or("")
                .to_string(),
            None => String::new(),
        }
    };
    let template = tok_cfg
        .get("chat_template")
        .and_then(|t| t.as_str())
        .with_context(|| {
            format!(
                "{}/tokenizer_config.json has no chat_template",
                dir.display()
            )
        })?;
    let chat = ChatTemplate::new(
        template.to_string(),
        token_text("bos_token"),
        token_text("eos_token"),
    );
    let eos_token_id = shape
        .eos_token_id
        .or_else(|| tokenizer.token_to_id(&token_text("eos_token")))
        .with_context(|| format!("{}: no eos_token_id in config.json", dir.display()))?;
    Ok(LoadedModel {
        shape,
        weights,
        quantized: Default::default(),
        tokenizer,
        tokenizer_file: Some(tokenizer_json),
        chat,
        eos_token_id,
    })
}
