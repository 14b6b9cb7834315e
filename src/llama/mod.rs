//! The llama-family decoder that kdpipe trains as the student and serves as the local
//! teacher (SmolLM2, Llama, Qwen2 shapes): loading from a GGUF file (dequantized) or a
//! Hugging Face folder, with its tokenizer and chat template; the model as per-layer
//! structs (one block for training and inference); the one inference path (key/value
//! caches, batched steps, continuous-batching generation, continuation scoring); LoRA; and
//! export back to a Hugging Face folder.
//!
//! model.rs (the decoder) ← block.rs (one layer) ← linear.rs (a linear layer and its
//! adapter); causal.rs (training attention) and infer.rs (inference steps) are the two
//! ways a block attends; generate.rs batches generation over infer.rs.

pub mod block;
pub mod causal;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod gguf_write;
pub mod hf;
pub mod infer;
pub mod linear;
pub mod model;
pub mod shape;
#[cfg(test)]
pub(crate) mod tests;
pub mod tokenizer;
pub mod vocab;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::kernels::quant::QMatrix;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use tokenizers::Tokenizer;

pub use model::{Decoder, HiddenStates};
pub use shape::ModelShape;

/// Everything loaded for a model: shape, weights by Hugging Face name, tokenizer and chat
/// template.
pub struct LoadedModel {
    pub shape: ModelShape,
    /// Dense weights by Hugging Face name.
    pub weights: BTreeMap<String, Tensor>,
    /// Weights kept in a GGUF block format (`load_for_inference` only; empty otherwise).
    pub quantized: BTreeMap<String, Arc<QMatrix>>,
    pub tokenizer: Tokenizer,
    /// The model folder's tokenizer.json text, written as is on export; `None` for a GGUF
    /// (its tokenizer is built from the metadata, and serialized on export).
    pub tokenizer_file: Option<String>,
    pub chat: ChatTemplate,
    pub eos_token_id: u32,
}

impl LoadedModel {
    /// The tokenizer as tokenizer.json text: the folder's own file, else `tokenizer`
    /// serialized.
    pub fn tokenizer_json(&self) -> Result<String> {
        match &self.tokenizer_file {
            Some(text) => Ok(text.clone()),
            None => self
                .tokenizer
                .to_string(false)
                .map_err(|e| anyhow::anyhow!("cannot write the tokenizer as JSON: {e}")),
        }
    }
}

/// End-of-turn tokens of the chat formats the decoder serves, stopped on when present.
const END_OF_TURN: [&str; 4] = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"];

/// Load a student from a GGUF file (dequantized to f32) or a Hugging Face folder.
pub fn load(model: &str, device: &Device) -> Result<LoadedModel> {
    load_with(model, |path| gguf::load(path, device), device)
}

/// Load a model to run on the CPU for inference only: a GGUF file's weights stay in their
/// block formats where the kernels compute on them (`kernels::quant`), so the model takes
/// about its file's size in memory; a Hugging Face folder loads as `load` does.
pub fn load_for_inference(model: &str) -> Result<LoadedModel> {
    load_with(model, gguf::load_quantized, &Device::Cpu)
}

/// What loading parses and drops (metadata, tokenizer temporaries) goes back to the OS
/// rather than into the engine's peak (`alloc::returning_freed_memory`).
fn load_with(
    model: &str,
    read_gguf: impl FnOnce(&Path) -> Result<LoadedModel>,
    device: &Device,
) -> Result<LoadedModel> {
    crate::alloc::returning_freed_memory(|| load_checked(model, read_gguf, device))
}

fn load_checked(
    model: &str,
    read_gguf: impl FnOnce(&Path) -> Result<LoadedModel>,
    device: &Device,
) -> Result<LoadedModel> {
    let path = Path::new(model);
    if is_gguf(model) {
        if !path.is_file() {
            bail!("student model file {model} does not exist\nhint: run scripts/fetch-models.sh, or set [student] model to a GGUF file or a Hugging Face model folder");
        }
        read_gguf(path)
    } else if path.is_dir() {
        hf::load(path, device)
    } else {
        bail!("student model {model} is neither a .gguf file nor a folder with config.json\nhint: run scripts/fetch-models.sh, or point [student] model at a local model")
    }
    .and_then(|loaded| {
        model::check_dims(&loaded.shape, |name| {
            loaded
                .quantized
                .get(name)
                .map(|q| vec![q.rows, q.cols])
                .or_else(|| loaded.weights.get(name).map(|t| t.dims().to_vec()))
        })
        .with_context(|| {
            format!("student model {model}: the weights do not match the model's config\nhint: the download may be incomplete, or config.json belongs to another model")
        })?;
        Ok(loaded)
    })
}

impl LoadedModel {
    /// The training decoder over these weights; names for which `trainable` is true
    /// become variables.
    pub fn decoder(&self, device: &Device, trainable: impl Fn(&str) -> bool) -> Result<Decoder> {
        Decoder::new(self.shape.clone(), self.weights.clone(), device, trainable)
    }

    /// Token ids of text, without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of a chat rendered by the model's own template, ready for the reply.
    pub fn chat_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.chat.render(messages, true)?;
        self.encode(&text)
    }

    /// Tokens that end a reply: end-of-sequence and the chat format's end-of-turn tokens.
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut stop = vec![self.eos_token_id];
        stop.extend(
            END_OF_TURN
                .iter()
                .filter_map(|t| self.tokenizer.token_to_id(t)),
        );
        stop
    }

    /// The inference-only decoder over these weights, which move into it (the tokenizer
    /// and template stay): layers the load kept quantized (`load_for_inference`) stay so,
    /// dense ones are stored `[in, out]`, each `[out, in]` original freed as soon as its
    /// transposed copy exists (peak: the weights plus one layer's copy).
    pub fn take_inference_decoder(&mut self) -> Result<Decoder> {
        let weights = std::mem::take(&mut self.weights);
        let quantized = std::mem::take(&mut self.quantized);
        if quantized.is_empty() {
            Decoder::new(self.shape.clone(), weights, &Device::Cpu, |_| false)?.into_inference()
        } else {
            Decoder::quantized(self.shape.clone(), weights, quantized)
        }
    }

    /// Parameters of the model.
    pub fn params(&self) -> u64 {
        let dense: u64 = self.weights.values().map(|t| t.elem_count() as u64).sum();
        let quantized: u64 = self
            .quantized
            .values()
            .map(|q| (q.rows * q.cols) as u64)
            .sum();
        dense + quantized
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }
}

/// Whether `model` names a GGUF file (by its extension, any case); anything else is a
/// Hugging Face folder.
pub fn is_gguf(model: &str) -> bool {
    model.to_ascii_lowercase().ends_with(".gguf")
}

/// A model's tokenizer without its weights: from a GGUF's header, or a Hugging Face
/// folder's tokenizer.json.
pub fn load_tokenizer(model: &str) -> Result<tokenizers::Tokenizer> {
    let path = Path::new(model);
    if is_gguf(model) {
        if !path.is_file() {
            bail!("model file {model} does not exist\nhint: run scripts/fetch-models.sh");
        }
        gguf::tokenizer(path)
    } else {
        let file = path.join("tokenizer.json");
        tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))
    }
}

/// Bytes of memory the weights of a model this decoder can run take once loaded for
/// inference (`load_for_inference`): a GGUF's block formats at their size and its other
/// tensors as f32; a Hugging Face folder's parameters as f32. None for other models.
pub fn inference_bytes(model: &str) -> Option<u64> {
    if is_gguf(model) {
        let (arch, bytes) = gguf::architecture_and_inference_bytes(Path::new(model)).ok()?;
        (arch == "llama" || arch == "qwen2").then_some(bytes)
    } else {
        supported_params(model).map(|p| p.saturating_mul(4))
    }
}

/// Parameters of a model this decoder can run (llama or qwen2, GGUF or Hugging Face
/// folder), from its header or its files' sizes (no weights read); None for others.
pub fn supported_params(model: &str) -> Option<u64> {
    let path = Path::new(model);
    if is_gguf(model) {
        let (arch, params) = gguf::architecture_and_params(path).ok()?;
        (arch == "llama" || arch == "qwen2").then_some(params)
    } else if path.join("config.json").is_file() {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).ok()?).ok()?;
        let kind = config.get("model_type")?.as_str()?;
        let weights: u64 = std::fs::read_dir(path)
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|e| e.metadata().ok().map(|m| m.len()))
            .sum();
        // Safetensors hold 2 (bf16/f16) or 4 (f32) bytes a parameter: count 2, the worse case.
        (kind == "llama" || kind == "qwen2").then_some(weights / 2)
    } else {
        None
    }
}
