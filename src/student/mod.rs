//! The student: a llama-family training decoder of our own (SmolLM2, Llama, Qwen2 shapes),
//! its tokenizer, loading from GGUF or a Hugging Face folder, and export back to one.

pub mod attention;
pub mod bf16_gemm;
pub mod export;
pub mod fastmath;
pub mod gguf;
pub mod hf;
pub mod mixed;
pub mod model;
pub mod ops;
pub mod serve;
pub mod shape;
pub mod tokenizer;

use crate::chat::ChatTemplate;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;
use tokenizers::Tokenizer;

pub use model::{Decoder, KvCache};
pub use shape::ModelShape;

/// Everything loaded for a student: shape, weights by Hugging Face name, tokenizer and chat
/// template.
pub struct LoadedModel {
    pub shape: ModelShape,
    pub weights: BTreeMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    /// The tokenizer as tokenizer.json text, written as is on export.
    pub tokenizer_json: String,
    pub chat: ChatTemplate,
    pub eos_token_id: u32,
}

/// Load a student from a GGUF file (dequantized to f32) or a Hugging Face folder.
pub fn load(model: &str, device: &Device) -> Result<LoadedModel> {
    let path = Path::new(model);
    if model.to_ascii_lowercase().ends_with(".gguf") {
        if !path.is_file() {
            bail!("student model file {model} does not exist\nhint: run scripts/fetch-models.sh, or set [student] model to a GGUF file or a Hugging Face model folder");
        }
        gguf::load(path, device)
    } else if path.is_dir() {
        hf::load(path, device)
    } else {
        bail!("student model {model} is neither a .gguf file nor a folder with config.json\nhint: run scripts/fetch-models.sh, or point [student] model at a local model")
    }
    .and_then(|loaded| {
        model::check_weights(&loaded.shape, &loaded.weights).with_context(|| {
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

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }
}

/// Largest absolute difference between two tensors of one shape (unit tests).
#[cfg(test)]
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The gradients of Σ y ⊙ w, a fixed random weighting of an op's output (unit tests that
/// compare an op's backward pass with a reference's).
#[cfg(test)]
pub(crate) fn weighted_grads(y: &Tensor, w: &Tensor) -> candle_core::backprop::GradStore {
    (y * w).unwrap().sum_all().unwrap().backward().unwrap()
}
