//! The shape of a llama-family decoder: what Hugging Face calls config.json.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// "llama" (SmolLM2, Llama) or "qwen2".
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v projections (Qwen2).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl ModelShape {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The Hugging Face config.json for this shape.
    pub fn to_hf_config(&self) -> serde_json::Value {
        let arch = if self.model_type == "qwen2" {
            "Qwen2ForCausalLM"
        } else {
            "LlamaForCausalLM"
        };
        serde_json::json!({
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": false,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
            "use_cache": true,
        })
    }

    /// Read a Hugging Face config.json (llama or qwen2).
    pub fn from_hf_config(v: &serde_json::Value) -> Result<Self> {
        let u = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .with_context(|| format!("config.json: missing integer {k:?}"))
        };
        let model_type = v
            .get("model_type")
            .and_then(|x| x.as_str())
            .unwrap_or("llama")
            .to_string();
        if model_type != "llama" && model_type != "qwen2" {
            anyhow::bail!("config.json: model_type {model_type:?} is not supported; kdpipe trains llama and qwen2 students");
        }
        let heads = u("num_attention_heads")?;
        Ok(ModelShape {
            attention_bias: v
                .get("attention_bias")
                .and_then(|x| x.as_bool())
                .unwrap_or(model_type == "qwen2"),
            model_type,
            vocab_size: u("vocab_size")?,
            hidden_size: u("hidden_size")?,
            intermediate_size: u("intermediate_size")?,
            num_hidden_layers: u("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: u("num_key_value_heads").unwrap_or(heads),
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-6),
            rope_theta: v
                .get("rope_theta")
                .and_then(|x| x.as_f64())
                .unwrap_or(10000.0),
            max_position_embeddings: u("max_position_embeddings").unwrap_or(2048),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            bos_token_id: v
                .get("bos_token_id")
                .and_then(|x| x.as_u64())
                .map(|x| x as u32),
            eos_token_id: v
                .get("eos_token_id")
                .and_then(|x| x.as_u64())
                .map(|x| x as u32),
        })
    }
}
