//! Export a student as a Hugging Face folder that transformers and mistralrs load:
//! config.json, model.safetensors (f32), tokenizer.json, tokenizer_config.json,
//! generation_config.json. Each file is written to a temp name and renamed.

use super::Decoder;
use crate::chat::ChatTemplate;
use crate::io::atomic::{temp_path, write_bytes, write_json};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::Path;

pub fn export(
    dir: &Path,
    model: &Decoder,
    tokenizer_json: &str,
    chat: &ChatTemplate,
    eos_token: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let shape = &model.shape;
    let tensors: HashMap<String, candle_core::Tensor> = model
        .weights()?
        .iter()
        .filter(|(name, _)| !(shape.tie_word_embeddings && name.as_str() == "lm_head.weight"))
        .map(|(n, t)| (n.clone(), t.detach()))
        .collect();
    let target = dir.join("model.safetensors");
    let tmp = temp_path(&target);
    candle_core::safetensors::save(&tensors, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &target).with_context(|| format!("cannot rename {}", tmp.display()))?;
    write_json(&dir.join("config.json"), &shape.to_hf_config())?;
    write_bytes(&dir.join("tokenizer.json"), tokenizer_json.as_bytes())?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({
            "chat_template": chat.source(),
            "eos_token": eos_token,
            "pad_token": eos_token,
            "model_max_length": shape.max_position_embeddings,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": false,
        }),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &serde_json::json!({"bos_token_id": shape.bos_token_id, "eos_token_id": shape.eos_token_id, "do_sample": false}),
    )?;
    Ok(())
}
