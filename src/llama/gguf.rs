//! Load a llama-family GGUF as a student: tensors dequantized to f32 and renamed to
//! Hugging Face names, q/k rows un-permuted for `llama` files (llama.cpp's converter
//! interleaves RoPE pairs there; qwen2 files keep the Hugging Face layout), tokenizer and
//! chat template from the metadata.

use super::tokenizer::{meta_str, meta_u64, tokenizer_from_gguf};
use super::{LoadedModel, ModelShape};
use crate::chat::ChatTemplate;
use crate::kernels::quant::{Format, KernelChoice, QMatrix};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

fn meta_f64(c: &Content, key: &str) -> Option<f64> {
    match c.metadata.get(key)? {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        _ => None,
    }
}

fn shape_from_gguf(c: &Content) -> Result<ModelShape> {
    let arch = meta_str(c, "general.architecture")?.to_string();
    if arch != "llama" && arch != "qwen2" {
        bail!("GGUF architecture {arch:?} is not supported as a student (llama, qwen2)");
    }
    let u = |k: &str| {
        meta_u64(c, &format!("{arch}.{k}"))
            .map(|x| x as usize)
            .with_context(|| format!("GGUF metadata lacks {arch}.{k}"))
    };
    let embd = c
        .tensor_infos
        .get("token_embd.weight")
        .context("GGUF lacks token_embd.weight")?;
    let heads = u("attention.head_count")?;
    Ok(ModelShape {
        vocab_size: embd.shape.dims()[0],
        hidden_size: u("embedding_length")?,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: u("attention.head_count_kv").unwrap_or(heads),
        rms_norm_eps: meta_f64(c, &format!("{arch}.attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-6),
        rope_theta: meta_f64(c, &format!("{arch}.rope.freq_base")).unwrap_or(10000.0),
        max_position_embeddings: u("context_length").unwrap_or(2048),
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        attention_bias: c.tensor_infos.contains_key("blk.0.attn_q.bias"),
        bos_token_id: meta_u64(c, "tokenizer.ggml.bos_token_id").map(|x| x as u32),
        eos_token_id: meta_u64(c, "tokenizer.ggml.eos_token_id").map(|x| x as u32),
        model_type: arch,
    })
}

/// GGUF tensor name → Hugging Face name.
pub(super) fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (part, kind) = tail.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// `unpermute` on the rows of a block-quantized matrix as the file stores them
/// (`row_bytes` each): whole rows move, their bytes unchanged.
fn unpermute_rows(data: &[u8], row_bytes: usize, n_head: usize) -> Vec<u8> {
    let hd = data.len() / row_bytes / n_head;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_head {
        for half in 0..2 {
            for pair in 0..hd / 2 {
                let src = h * hd + pair * 2 + half;
                out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

/// Undo llama.cpp's q/k permutation: GGUF rows are ordered (head, pair, 2) where Hugging
/// Face orders them (head, 2, pair).
pub(super) fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let hd = rows / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Load a GGUF with every tensor dequantized to f32 (what training reads).
pub fn load(path: &Path, device: &Device) -> Result<LoadedModel> {
    read(path, device, false)
}

/// Load a GGUF for inference on the CPU: 2-D weights in a block format the kernels compute
/// on (`kernels::quant::Format`) stay in it, in `LoadedModel::quantized`; the rest is
/// dequantized to f32, with a log line per format that is.
pub fn load_quantized(path: &Path) -> Result<LoadedModel> {
    read(path, &Device::Cpu, true)
}

/// The GGUF's tokenizer alone (its header read, no tensor data).
pub fn tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let (_, content) = read_header(path)?;
    super::tokenizer::tokenizer_from_gguf(&content)
}

/// The vocabulary's fingerprint (`vocab::fingerprint`) from the header's token list,
/// without building the tokenizer: comparing two Qwen2.5 GGUFs took 0.75 s this way
/// against 1.20 s with both tokenizers built.
pub fn vocab_fingerprint(path: &Path) -> Result<String> {
    let (_, content) = read_header(path)?;
    let tokens = super::tokenizer::meta_strings(&content, "tokenizer.ggml.tokens")?;
    Ok(super::vocab::fingerprint_of(
        tokens.iter().enumerate().map(|(id, t)| (id as u32, *t)),
    ))
}

/// The open file and its header (metadata and tensor table; no tensor data read).
fn read_header(path: &Path) -> Result<(std::fs::File, Content)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let content = Content::read(&mut file).map_err(|e| anyhow::anyhow!("{e}")).with_context(|| format!("{} is not a valid GGUF file (truncated download?)\nhint: re-run scripts/fetch-models.sh", path.display()))?;
    Ok((file, content))
}

fn read(path: &Path, device: &Device, keep_quantized: bool) -> Result<LoadedModel> {
    let (mut file, content) = read_header(path)?;
    let shape = shape_from_gguf(&content)
        .with_context(|| format!("cannot read model shape from {}", path.display()))?;
    let mut weights = BTreeMap::new();
    let mut quantized = BTreeMap::new();
    let mut dequantized_formats = std::collections::BTreeSet::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name) else { continue };
        let heads = if shape.model_type == "llama" && name.ends_with(".weight") {
            if name.contains("attn_q") {
                Some(shape.num_attention_heads)
            } else if name.contains("attn_k") {
                Some(shape.num_key_value_heads)
            } else {
                None
            }
        } else {
            None
        };
        let info = &content.tensor_infos[name];
        let dims = info.shape.dims().to_vec();
        if keep_quantized && dims.len() == 2 {
            if let Some(format) = Format::from_ggml(info.ggml_dtype) {
                // Packed as it is read from the file: loading holds the packed matrix and
                // a few hundred KB of the file, not a second copy of the tensor (the
                // largest, the vocabulary, is a sixth of a small model's file). llama's
                // q and k rows, reordered first, are read whole.
                file.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))
                    .with_context(|| format!("{}: cannot read tensor {name}", path.display()))?;
                let (rows, cols) = (dims[0], dims[1]);
                let m = match heads {
                    None => QMatrix::read(format, rows, cols, &mut file),
                    Some(n_head) => {
                        let row_bytes = format.row_bytes(cols);
                        let mut data = vec![0u8; rows * row_bytes];
                        match file.read_exact(&mut data) {
                            Ok(()) => {
                                let data = unpermute_rows(&data, row_bytes, n_head);
                                QMatrix::new(format, rows, cols, &data)
                            }
                            Err(e) => Err(e.into()),
                        }
                    }
                }
                .with_context(|| {
                    format!(
                        "{}: cannot read tensor {name} (truncated file?)",
                        path.display()
                    )
                })?;
                quantized.insert(hf, Arc::new(m));
                continue;
            }
            if !matches!(info.ggml_dtype, GgmlDType::F32) {
                dequantized_formats.insert(format!("{:?}", info.ggml_dtype));
            }
        }
        let q = content
            .tensor(&mut file, name, device)
            .with_context(|| format!("{}: cannot read tensor {name}", path.display()))?;
        let mut t = q.dequantize(device)?;
        if let Some(n_head) = heads {
            t = unpermute(&t, n_head)?;
        }
        weights.insert(hf, t);
    }
    if keep_quantized {
        let packed: usize = quantized.values().map(|m: &Arc<QMatrix>| m.bytes()).sum();
        let dense: usize = weights.values().map(|t: &Tensor| t.elem_count() * 4).sum();
        // A bad kernel override is an error here, at load, not at the first product.
        let kernel = KernelChoice::selected().map_err(anyhow::Error::msg)?;
        tracing::info!(
            "{}: weights held in {:.0} MB ({:.0} MB block-quantized, {:.0} MB f32); products on the {} kernel",
            path.display(),
            (packed + dense) as f64 / 1e6,
            packed as f64 / 1e6,
            dense as f64 / 1e6,
            kernel.name()
        );
    }
    for f in dequantized_formats {
        tracing::info!(
            "{}: {f} weights are dequantized to f32 on load (the quantized kernels do not compute on {f})",
            path.display()
        );
    }
    let tokenizer = tokenizer_from_gguf(&content)
        .with_context(|| format!("cannot build the tokenizer from {}", path.display()))?;
    let token = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    let template = meta_str(&content, "tokenizer.chat_template")
        .with_context(|| format!("{} has no chat template", path.display()))?;
    let chat = ChatTemplate::new(
        template.to_string(),
        token(shape.bos_token_id),
        token(shape.eos_token_id),
    );
    let eos_token_id = shape.eos_token_id.context("GGUF has no eos token id")?;
    Ok(LoadedModel {
        shape,
        weights,
        quantized,
        tokenizer,
        tokenizer_file: None,
        chat,
        eos_token_id,
    })
}

/// The architecture (`general.architecture`) and parameter count of a GGUF file, from its
/// header alone.
pub fn architecture_and_params(path: &Path) -> Result<(String, u64)> {
    let (_, content) = read_header(path)?;
    let arch = meta_str(&content, "general.architecture")?.to_string();
    let params = content
        .tensor_infos
        .values()
        .map(|t| t.shape.elem_count() as u64)
        .sum();
    Ok((arch, params))
}

/// The architecture of a GGUF file and the bytes its weights take once loaded by
/// `load_quantized` (2-D tensors in a format the kernels compute on at their size, every
/// other tensor as f32), from its header alone.
pub fn architecture_and_inference_bytes(path: &Path) -> Result<(String, u64)> {
    let (_, content) = read_header(path)?;
    let arch = meta_str(&content, "general.architecture")?.to_string();
    let bytes = content
        .tensor_infos
        .values()
        .map(|t| {
            let elems = t.shape.elem_count() as u64;
            match Format::from_ggml(t.ggml_dtype) {
                Some(f) if t.shape.dims().len() == 2 => {
                    elems / f.block_len() as u64 * f.block_bytes() as u64
                }
                _ => elems * 4,
            }
        })
        .sum();
    Ok((arch, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias").unwrap(),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(hf_name("output_norm.weight").unwrap(), "model.norm.weight");
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // Forward permutation (llama.cpp's converter): rows (head, 2, pair) → (head, pair, 2).
        let (n_head, hd, cols) = (2, 4, 3);
        let hf = Tensor::arange(0f32, (n_head * hd * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((n_head * hd, cols))
            .unwrap();
        let gguf = hf
            .reshape((n_head, 2, hd / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((n_head * hd, cols))
            .unwrap();
        let back = unpermute(&gguf, n_head).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn quantized_rows_unpermute_like_the_dequantized_tensor() {
        use candle_core::quantized::QTensor;
        let (n_head, hd, cols) = (3, 8, 64);
        let w = Tensor::randn(0f32, 1.0, (n_head * hd, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let data = q.data().unwrap().into_owned();
        let m = QMatrix::new(Format::Q8_0, n_head * hd, cols, &data).unwrap();
        let dense = Tensor::from_vec(m.dequantize(), (n_head * hd, cols), &Device::Cpu).unwrap();
        let want = unpermute(&dense, n_head).unwrap().flatten_all().unwrap();
        let moved = unpermute_rows(&data, Format::Q8_0.row_bytes(cols), n_head);
        assert_eq!(
            QMatrix::new(Format::Q8_0, n_head * hd, cols, &moved)
                .unwrap()
                .dequantize(),
            want.to_vec1::<f32>().unwrap()
        );
    }
}
