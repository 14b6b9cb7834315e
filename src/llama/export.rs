//! Export a student as a Hugging Face folder that transformers and mistralrs load:
//! config.json, model.safetensors (f32), tokenizer.json, tokenizer_config.json,
//! generation_config.json. The files are written into a staging folder that replaces the
//! earlier export only once all of them are complete.

use super::Decoder;
use crate::chat::ChatTemplate;
use crate::io::atomic::{write_bytes, write_json, StagedDir};
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
    let staged = StagedDir::begin(dir)?;
    let out = staged.path();
    let shape = &model.shape;
    let tensors: HashMap<String, candle_core::Tensor> = model
        .weights()?
        .iter()
        .filter(|(name, _)| !(shape.tie_word_embeddings && name.as_str() == "lm_head.weight"))
        .map(|(n, t)| (n.clone(), t.detach()))
        .collect();
    let weights = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights)
        .with_context(|| format!("cannot write {}", weights.display()))
        .map_err(|e| crate::io::atomic::with_storage_hint(e, dir))?;
    write_json(&out.join("config.json"), &shape.to_hf_config())?;
    write_bytes(&out.join("tokenizer.json"), tokenizer_json.as_bytes())?;
    write_json(
        &out.join("tokenizer_config.json"),
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
        &out.join("generation_config.json"),
        &serde_json::json!({"bos_token_id": shape.bos_token_id, "eos_token_id": shape.eos_token_id, "do_sample": false}),
    )?;
    staged.commit()
}
