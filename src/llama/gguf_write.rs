//! Write a student as a GGUF file that llama.cpp, Ollama, mistralrs and kdpipe's own engine
//! load: llama.cpp's tensor names, q/k rows permuted back for `llama` files (the inverse
//! of what `gguf::read` undoes), the architecture's metadata, and the tokenizer and chat
//! template copied from the base model's GGUF header.
//!
//! Quantization types, per tensor, follow llama.cpp's own choices (`llama-quant.cpp`):
//! - `F16`: every matrix in f16;
//! - `Q8_0`: every matrix in Q8_0;
//! - `Q4_K_M`: matrices in Q4_K, except the output head (or, with tied embeddings, the
//!   token embeddings that serve as it) in Q6_K, and `attn_v` / `ffn_down` in Q6_K on the
//!   first and last eighth of the layers and every third layer between ("more bits");
//!   a matrix whose rows are not whole 256-value super-blocks falls back to Q5_0 (for
//!   Q4_K) or Q8_0 (for Q6_K), as llama.cpp does (SmolLM2's and Qwen2.5-0.5B's widths,
//!   576 and 896, are such).
//!
//! Norms and biases stay f32 in every type. The blocks are computed by candle's
//! quantizers (the reference ggml routines, no importance matrix).

use super::ModelShape;
pub use crate::config::GgufType;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// llama.cpp's `general.file_type` (enum llama_ftype) of a type.
fn file_type(ftype: GgufType) -> u32 {
    match ftype {
        GgufType::F16 => 1,
        GgufType::Q8_0 => 7,
        GgufType::Q4KM => 15,
    }
}

/// Hugging Face tensor name → llama.cpp's (None: a name a llama/qwen2 student lacks).
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (part, kind) = tail.rsplit_once('.')?;
    let name = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.{kind}"))
}

/// llama.cpp's q/k row order for `llama` files: Hugging Face orders each head's rows
/// (2, pair), llama.cpp (pair, 2) (its RoPE rotates adjacent values).
fn permute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rest: usize = dims[1..].iter().product();
    let hd = dims[0] / n_head;
    Ok(w.reshape((n_head, 2, hd / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// llama.cpp's "more bits" layers of Q4_K_M: the first and last eighth, and every third
/// layer between.
fn more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer as i64 - (layers / 8) as i64) % 3 == 2
}

/// The block type of one tensor (`name` in llama.cpp's naming) for a file type.
fn tensor_type(name: &str, dims: &[usize], ftype: GgufType, shape: &ModelShape) -> GgmlDType {
    if dims.len() < 2 {
        return GgmlDType::F32;
    }
    let cols = dims[dims.len() - 1];
    let wanted = match ftype {
        GgufType::F16 => return GgmlDType::F16,
        GgufType::Q8_0 => GgmlDType::Q8_0,
        GgufType::Q4KM => {
            let head = name == "output.weight"
                || (shape.tie_word_embeddings && name == "token_embd.weight");
            let layer = name
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<usize>().ok());
            let sensitive = name.contains(".attn_v.") || name.contains(".ffn_down.");
            match layer {
                _ if head => GgmlDType::Q6K,
                Some(l) if sensitive && more_bits(l, shape.num_hidden_layers) => GgmlDType::Q6K,
                _ => GgmlDType::Q4K,
            }
        }
    };
    match wanted {
        GgmlDType::Q4K if !cols.is_multiple_of(256) => GgmlDType::Q5_0,
        GgmlDType::Q6K if !cols.is_multiple_of(256) => GgmlDType::Q8_0,
        other => other,
    }
}

/// The architecture's metadata llama.cpp reads (`<arch>.*`).
fn architecture_metadata(shape: &ModelShape) -> Vec<(String, Value)> {
    let arch = &shape.model_type;
    let key = |k: &str| format!("{arch}.{k}");
    vec![
        ("general.architecture".into(), Value::String(arch.clone())),
        (
            key("context_length"),
            Value::U32(shape.max_position_embeddings as u32),
        ),
        (
            key("embedding_length"),
            Value::U32(shape.hidden_size as u32),
        ),
        (
            key("block_count"),
            Value::U32(shape.num_hidden_layers as u32),
        ),
        (
            key("feed_forward_length"),
            Value::U32(shape.intermediate_size as u32),
        ),
        (
            key("attention.head_count"),
            Value::U32(shape.num_attention_heads as u32),
        ),
        (
            key("attention.head_count_kv"),
            Value::U32(shape.num_key_value_heads as u32),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(shape.rms_norm_eps as f32),
        ),
        (key("rope.freq_base"), Value::F32(shape.rope_theta as f32)),
        (
            key("rope.dimension_count"),
            Value::U32(shape.head_dim() as u32),
        ),
        (key("vocab_size"), Value::U32(shape.vocab_size as u32)),
    ]
}

/// The tokenizer and chat template of a GGUF (every `tokenizer.*` key), to copy into an
/// export of a model trained from it.
pub fn tokenizer_metadata(base: &Path) -> Result<Vec<(String, Value)>> {
    let mut file = std::fs::File::open(base)
        .with_context(|| format!("cannot open the student's base model {}", base.display()))?;
    let content = gguf_file::Content::read(&mut file)
        .with_context(|| format!("cannot read the GGUF header of {}", base.display()))?;
    let meta: BTreeMap<String, Value> = content
        .metadata
        .into_iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .collect();
    if !meta.contains_key("tokenizer.ggml.tokens") {
        bail!(
            "{} has no tokenizer in its GGUF header (tokenizer.ggml.tokens)",
            base.display()
        );
    }
    Ok(meta.into_iter().collect())
}

/// How many tensors of each block type a written file holds.
pub type TypeCounts = BTreeMap<String, usize>;

/// Write `weights` (Hugging Face names, f32, the layout of `Decoder::weights`) to `path`
/// as a GGUF of `ftype`, with `extra` metadata (the tokenizer, the name) after the
/// architecture's. The file appears under its name only once complete.
pub fn write(
    path: &Path,
    shape: &ModelShape,
    weights: &BTreeMap<String, Tensor>,
    ftype: GgufType,
    extra: &[(String, Value)],
) -> Result<TypeCounts> {
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(weights.len());
    let mut counts = TypeCounts::new();
    for hf in weights.keys() {
        if shape.tie_word_embeddings && hf == "lm_head.weight" {
            continue;
        }
        let name = gguf_name(hf)
            .with_context(|| format!("tensor {hf} has no place in a {} GGUF", shape.model_type))?;
        let mut t = weights[hf].to_dtype(candle_core::DType::F32)?;
        if shape.model_type == "llama" {
            if name.ends_with("attn_q.weight") {
                t = permute(&t, shape.num_attention_heads)?;
            } else if name.ends_with("attn_k.weight") {
                t = permute(&t, shape.num_key_value_heads)?;
            }
        }
        let dtype = tensor_type(&name, t.dims(), ftype, shape);
        let q = QTensor::quantize(&t, dtype)
            .with_context(|| format!("cannot quantize {name} {:?} to {dtype:?}", t.dims()))?;
        *counts.entry(format!("{dtype:?}")).or_default() += 1;
        tensors.push((name, q));
    }
    let mut meta = architecture_metadata(shape);
    meta.push(("general.file_type".into(), Value::U32(file_type(ftype))));
    if ftype != GgufType::F16 {
        meta.push(("general.quantization_version".into(), Value::U32(2)));
    }
    meta.extend(extra.iter().cloned());
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    crate::io::atomic::write_with(path, |file| {
        let mut w = std::io::BufWriter::new(file);
        gguf_file::write(&mut w, &meta_refs, &tensor_refs)
            .with_context(|| format!("cannot write {}", path.display()))?;
        w.flush()?;
        Ok(())
    })?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_invert_the_readers() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.3.input_layernorm.weight",
            "model.layers.3.post_attention_layernorm.weight",
            "model.layers.11.self_attn.q_proj.weight",
            "model.layers.11.self_attn.q_proj.bias",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.bias",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.29.mlp.down_proj.weight",
        ] {
            let g = gguf_name(hf).unwrap();
            assert_eq!(super::super::gguf::hf_name(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(gguf_name("model.layers.0.mlp.other.weight"), None);
    }

    #[test]
    fn permute_is_the_inverse_of_the_readers_unpermute() {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::arange(0f32, 8.0 * 3.0, &dev)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let back = super::super::gguf::unpermute(&permute(&w, 2).unwrap(), 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        // Head 0 of 4 rows: HF (2, pair) = rows 0,1 | 2,3 → llama.cpp (pair, 2) = 0,2,1,3.
        let p = permute(&w, 2).unwrap().to_vec2::<f32>().unwrap();
        let first: Vec<f32> = p.iter().take(4).map(|r| r[0]).collect();
        assert_eq!(first, vec![0.0, 6.0, 3.0, 9.0]);
    }

    #[test]
    fn q4_k_m_follows_llama_cpps_choices() {
        let shape = ModelShape {
            model_type: "llama".into(),
            vocab_size: 100,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            rms_norm_eps: 1e-5,
            rope_theta: 1e5,
            max_position_embeddings: 2048,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: None,
            eos_token_id: None,
        };
        let t = |name: &str, dims: &[usize]| tensor_type(name, dims, GgufType::Q4KM, &shape);
        // Rows of 576 values are not whole super-blocks: Q4_K → Q5_0, Q6_K → Q8_0.
        assert_eq!(t("blk.5.attn_q.weight", &[576, 576]), GgmlDType::Q5_0);
        assert_eq!(t("token_embd.weight", &[100, 576]), GgmlDType::Q8_0);
        // ffn_down reads 1536 = 6 × 256 values a row.
        assert_eq!(t("blk.0.ffn_down.weight", &[576, 1536]), GgmlDType::Q6K);
        assert_eq!(t("blk.4.ffn_down.weight", &[576, 1536]), GgmlDType::Q4K);
        assert_eq!(t("blk.5.ffn_down.weight", &[576, 1536]), GgmlDType::Q6K);
        assert_eq!(t("blk.29.ffn_down.weight", &[576, 1536]), GgmlDType::Q6K);
        assert_eq!(t("blk.3.attn_norm.weight", &[576]), GgmlDType::F32);
        assert_eq!(
            tensor_type("blk.3.ffn_up.weight", &[1536, 576], GgufType::F16, &shape),
            GgmlDType::F16
        );
    }
}
