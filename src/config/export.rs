//! `[export]`: the finetuned student as files people deploy.

use serde::{Deserialize, Serialize};

/// A GGUF file type kdpipe writes (llama.cpp's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GgufType {
    /// Every matrix in f16: the trained weights, rounded once.
    #[serde(rename = "f16")]
    F16,
    /// 8-bit blocks of 32: near-lossless, half of f16.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// llama.cpp's usual 4-bit mix (Q4_K, Q6_K where it matters most).
    #[serde(rename = "q4_k_m")]
    Q4KM,
}

impl GgufType {
    pub fn as_str(self) -> &'static str {
        match self {
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4KM => "q4_k_m",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// The GGUF files to write, one per type, into `<run>/export/`.
    #[serde(default = "d_gguf")]
    pub gguf: Vec<GgufType>,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig { gguf: d_gguf() }
    }
}

fn d_gguf() -> Vec<GgufType> {
    vec![GgufType::F16, GgufType::Q8_0, GgufType::Q4KM]
}
