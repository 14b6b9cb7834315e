//! `[student]`: the model that learns.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentConfig {
    /// A GGUF file (dequantized for training) or a Hugging Face model directory.
    pub model: String,
}
