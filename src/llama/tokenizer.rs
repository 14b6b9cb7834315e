//! A `tokenizers::Tokenizer` built from GGUF metadata (`tokenizer.ggml.*`), matching what
//! llama.cpp and mistralrs do: byte-level BPE from the vocab and merges, the
//! pre-tokenizer regex named by `tokenizer.ggml.pre`, every non-normal token special.
//! (candle's own GGUF tokenizer adds a prefix space for SmolLM2; docs/STACK.md.)

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

/// GPT-2's pre-tokenizer regex (SmolLM2 and other `gpt2`/`smollm` vocabularies).
pub(super) const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer regex, as in its tokenizer.json.
/// llama.cpp's token types that matter here (`llama_token_type`).
const NORMAL: i64 = 1;
const USER_DEFINED: i64 = 4;

pub(super) const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub fn meta_str<'a>(c: &'a Content, key: &str) -> Result<&'a str> {
    Ok(c.metadata
        .get(key)
        .with_context(|| format!("GGUF metadata lacks {key}"))?
        .to_string()?
        .as_str())
}

pub fn meta_u64(c: &Content, key: &str) -> Option<u64> {
    match c.metadata.get(key)? {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => Some(*x as u64),
        Value::I16(x) => Some(*x as u64),
        Value::I32(x) => Some(*x as u64),
        Value::I64(x) => Some(*x as u64),
        _ => None,
    }
}

/// A `tokenizer.ggml.token_type` entry (normal where it is not an integer).
fn meta_type(v: &Value) -> i64 {
    match v {
        Value::I32(x) => *x as i64,
        Value::U32(x) => *x as i64,
        _ => NORMAL,
    }
}

fn meta_array<'a>(c: &'a Content, key: &str) -> Result<&'a Vec<Value>> {
    Ok(c.metadata
        .get(key)
        .with_context(|| format!("GGUF metadata lacks {key}"))?
        .to_vec()?)
}

/// A GGUF metadata array of strings (the token list, the merges), borrowed.
pub fn meta_strings<'a>(c: &'a Content, key: &str) -> Result<Vec<&'a str>> {
    Ok(meta_array(c, key)?
        .iter()
        .map(|v| v.to_string().map(String::as_str))
        .collect::<candle_core::Result<_>>()?)
}

/// The GGUF's tokenizer, built from its vocabulary and merges directly (through
/// tokenizer.json text, Qwen2's 150k merges took ~100 MB at load, which the allocator then
/// keeps for the life of the process).
pub fn tokenizer_from_gguf(c: &Content) -> Result<Tokenizer> {
    let model = meta_str(c, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!("GGUF tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")\nhint: use a Hugging Face folder with tokenizer.json instead");
    }
    let pre = c
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");
    let (normalizer, regexes): (Option<NormalizerWrapper>, &[&str]) = match pre {
        "qwen2" => (Some(NFC.into()), &[QWEN2_REGEX]),
        "smollm" | "gpt-2" | "gpt2" | "default" => (None, &[r"\p{N}", GPT2_REGEX]),
        other => bail!("GGUF pre-tokenizer {other:?} is not supported yet (known: smollm, gpt-2, qwen2)\nhint: use a Hugging Face folder with tokenizer.json instead"),
    };
    let tokens = meta_strings(c, "tokenizer.ggml.tokens")?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.to_string(), id as u32))
        .collect();
    let merges: Merges = meta_strings(c, "tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => bail!("GGUF merge {i} ({m:?}) is not two tokens separated by a space"),
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the BPE model: {e}"))?;
    let mut pretokenizers = Vec::new();
    for re in regexes {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow::anyhow!("pre-tokenizer regex: {e}"))?;
        pretokenizers.push(PreTokenizerWrapper::Split(split));
    }
    pretokenizers.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, true, false,
    )));
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(normalizer)
        .with_pre_tokenizer(Some(Sequence::new(pretokenizers)))
        .with_decoder(Some(ByteLevel::new(true, true, true)));
    // Every token that is not a normal one is an added token, matched whole in text;
    // control and unused ones are special (left out of decoded text), user-defined ones
    // (Qwen's <tool_call>) are not, as in the model's own tokenizer.json.
    let (mut special, mut user_defined) = (Vec::new(), Vec::new());
    if let Some(types) = c.metadata.get("tokenizer.ggml.token_type") {
        for (token, t) in tokens.iter().zip(types.to_vec()?) {
            match meta_type(t) {
                NORMAL => {}
                USER_DEFINED => user_defined.push(AddedToken::from(token.to_string(), false)),
                _ => special.push(AddedToken::from(token.to_string(), true)),
            }
        }
    }
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&user_defined);
    Ok(tokenizer)
}
