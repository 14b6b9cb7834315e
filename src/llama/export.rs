//! Export a student as a Hugging Face folder that transformers and mistralrs load:
//! config.json, model.safetensors (f32, LoRA adapters merged), tokenizer.json,
//! tokenizer_config.json, generation_config.json; and, for a student trained with LoRA,
//! the adapters alone as a PEFT folder (`adapter/`: adapter_config.json and
//! adapter_model.safetensors), for servers that keep one base model and many adapters
//! (vLLM, transformers + PEFT). The files are written into a staging folder that replaces
//! the earlier export only once all of them are complete.

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
    (eos_token, base_model): (&str, &str),
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
    write_tokenizer_files(out, shape, tokenizer_json, chat, eos_token)?;
    write_json(
        &out.join("generation_config.json"),
        &serde_json::json!({"bos_token_id": shape.bos_token_id, "eos_token_id": shape.eos_token_id, "do_sample": false}),
    )?;
    write_adapter(&out.join("adapter"), model, base_model)?;
    staged.commit()
}

/// config.json, tokenizer.json and tokenizer_config.json (the chat template, EOS and
/// padding tokens) of a model of `shape`.
pub fn write_tokenizer_files(
    out: &Path,
    shape: &super::ModelShape,
    tokenizer_json: &str,
    chat: &ChatTemplate,
    eos_token: &str,
) -> Result<()> {
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
    )
}

/// The LoRA adapters as PEFT writes them: tensors named
/// `base_model.model.<layer>.lora_{A,B}.weight`, and a config with the rank, alpha
/// (scale × rank) and target modules. Nothing without adapters.
fn write_adapter(dir: &Path, model: &Decoder, base_model: &str) -> Result<()> {
    let adapters = model.adapters();
    let Some((_, a0, _, scale)) = adapters.first() else {
        return Ok(());
    };
    let rank = a0.dim(0)?;
    let mut tensors = HashMap::new();
    let mut targets: Vec<String> = vec![];
    for (name, a, b, s) in &adapters {
        anyhow::ensure!(
            a.dim(0)? == rank && (s - scale).abs() < 1e-12,
            "the adapters differ in rank or scale: PEFT's config holds one of each"
        );
        tensors.insert(format!("base_model.model.{name}.lora_A.weight"), a.clone());
        tensors.insert(format!("base_model.model.{name}.lora_B.weight"), b.clone());
        let module = name.rsplit('.').next().unwrap_or(name).to_string();
        if !targets.contains(&module) {
            targets.push(module);
        }
    }
    std::fs::create_dir_all(dir)?;
    let weights = dir.join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &weights)
        .with_context(|| format!("cannot write {}", weights.display()))?;
    write_json(
        &dir.join("adapter_config.json"),
        &serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": rank,
            "lora_alpha": scale * rank as f64,
            "lora_dropout": 0.0,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "use_rslora": false,
            "use_dora": false,
        }),
    )
}
