//! A tokenizer's vocabulary as bytes: the token strings of byte-level BPE (Qwen2, Llama 3,
//! SmolLM2, GPT-2) with GPT-2's byte-to-character table undone, and llama.cpp's padding
//! rows (`[PADn]`) left empty. Two vocabularies compare as bytes (one tokenizer, or one
//! family padded to two matrix sizes), and two tokenizations of one text align by byte
//! offsets (`finetune::cross_vocab`).

use anyhow::{bail, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use tokenizers::Tokenizer;

/// A short digest of what a tokenizer's ids mean: every real token's string under its
/// id (padding rows left out, so one family padded to two matrix sizes has one
/// fingerprint). Stored beside token ids (`topk_vocab`), so a reader can tell whether
/// its own tokenizer reads them the same way without loading the writer's.
pub fn fingerprint(tokenizer: &Tokenizer) -> String {
    let tokens = (0..tokenizer.get_vocab_size(true) as u32)
        .filter_map(|id| Some((id, tokenizer.id_to_token(id)?)));
    fingerprint_of(tokens)
}

/// The fingerprint of `(id, token string)` pairs: `fingerprint` without building a
/// tokenizer (`gguf::vocab_fingerprint` reads them from a GGUF header).
pub fn fingerprint_of<S: AsRef<str>>(tokens: impl Iterator<Item = (u32, S)>) -> String {
    let mut hash = Sha256::new();
    for (id, token) in tokens {
        let token = token.as_ref();
        if !is_padding(token) {
            hash.update(id.to_le_bytes());
            hash.update((token.len() as u32).to_le_bytes());
            hash.update(token.as_bytes());
        }
    }
    format!("sha256:{}", &hex::encode(hash.finalize())[..16])
}

/// GPT-2's byte-level alphabet: the character standing for each byte.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        *slot = if printable {
            char::from(b as u8)
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    table
}

/// Whether a token is a padding row of the embedding matrix, no real token: llama.cpp's
/// converter names them `[PAD<id>]` (Qwen2.5's 151,936 and 152,064 rows both hold its
/// 151,665 tokens).
fn is_padding(token: &str) -> bool {
    token
        .strip_prefix("[PAD")
        .and_then(|t| t.strip_suffix(']'))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// Every token's bytes, by id (empty for padding rows): the token string with the byte-level alphabet undone.
/// Fails for a vocabulary that is not byte-level BPE (a character outside the alphabet
/// in a normal token).
pub fn vocabulary_bytes(tokenizer: &Tokenizer, whose: &str) -> Result<Vec<Vec<u8>>> {
    let inverse: HashMap<char, u8> = byte_chars()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect();
    let size = tokenizer.get_vocab_size(true);
    let mut out = vec![vec![]; size];
    for (id, slot) in out.iter_mut().enumerate() {
        let Some(token) = tokenizer.id_to_token(id as u32) else {
            continue;
        };
        if is_padding(&token) {
            continue;
        }
        let bytes: Option<Vec<u8>> = token.chars().map(|c| inverse.get(&c).copied()).collect();
        *slot = match bytes {
            Some(b) => b,
            None => {
                // Added (special) tokens are written as themselves.
                let special = tokenizer
                    .get_added_vocabulary()
                    .get_vocab()
                    .contains_key(&token);
                if !special {
                    bail!("the {whose}'s tokenizer is not byte-level BPE (token {id} is {token:?}): cross-tokenizer KD compares byte-level vocabularies (Qwen2, Llama 3, SmolLM2, GPT-2)");
                }
                token.into_bytes()
            }
        };
    }
    Ok(out)
}

/// Whether two models' token ids mean the same tokens (`a`, `b`: GGUF files or Hugging
/// Face folders). Two GGUF files compare their headers' token lists, padding rows aside,
/// which reads no weights and builds no tokenizer; otherwise the tokenizers compare as
/// bytes (`vocabulary_difference`).
pub fn same_vocabulary(a: &str, b: &str) -> Result<bool> {
    if super::is_gguf(a) && super::is_gguf(b) {
        let fingerprint = |m: &str| super::gguf::vocab_fingerprint(std::path::Path::new(m));
        return Ok(fingerprint(a)? == fingerprint(b)?);
    }
    let (x, y) = (super::load_tokenizer(a)?, super::load_tokenizer(b)?);
    Ok(vocabulary_difference(&x, &y)?.is_none())
}

/// How two tokenizers' vocabularies differ (None: the same tokens, as bytes, under the
/// same ids; a longer embedding matrix is padding and not compared).
pub fn vocabulary_difference(a: &Tokenizer, b: &Tokenizer) -> Result<Option<String>> {
    let (x, y) = (
        vocabulary_bytes(a, "teacher")?,
        vocabulary_bytes(b, "student")?,
    );
    Ok(difference_of(&x, &y))
}

/// `vocabulary_difference` over the two vocabularies as bytes by id (padding empty).
fn difference_of(x: &[Vec<u8>], y: &[Vec<u8>]) -> Option<String> {
    let real = |v: &[Vec<u8>]| v.iter().rposition(|t| !t.is_empty()).map_or(0, |i| i + 1);
    let (nx, ny) = (real(x), real(y));
    if nx != ny {
        return Some(format!("the teacher has {nx} tokens, the student {ny}"));
    }
    x.iter().zip(y).position(|(s, t)| s != t).map(|id| {
        format!(
            "token {id} is {:?} for the teacher, {:?} for the student",
            String::from_utf8_lossy(&x[id]),
            String::from_utf8_lossy(&y[id])
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_alphabet_is_gpt2s() {
        let t = byte_chars();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    /// A word-level tokenizer over `tokens` (ids in order).
    fn word_level(tokens: &[&str]) -> Tokenizer {
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), serde_json::json!(i)))
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": tokens[0]}
        });
        json.to_string().parse().unwrap()
    }

    #[test]
    fn the_fingerprint_ignores_padding_rows_and_sees_any_other_change() {
        let base = fingerprint(&word_level(&["a", "b", "c"]));
        assert!(
            base.starts_with("sha256:") && base.len() == 7 + 16,
            "{base}"
        );
        let padded = fingerprint(&word_level(&["a", "b", "c", "[PAD3]", "[PAD4]"]));
        assert_eq!(padded, base);
        assert_ne!(fingerprint(&word_level(&["a", "c", "b"])), base);
        assert_ne!(fingerprint(&word_level(&["a", "b", "c", "d"])), base);
    }

    #[test]
    fn padding_rows_are_not_tokens() {
        assert!(is_padding("[PAD151935]"));
        assert!(!is_padding("[PAD]") && !is_padding("[PADx1]") && !is_padding("PAD1"));
        let t = |v: &[&str]| -> Vec<Vec<u8>> { v.iter().map(|s| s.as_bytes().to_vec()).collect() };
        // One family padded to two matrix sizes: the same vocabulary.
        let small = [t(&["a", "b", "c"]), vec![vec![]; 2]].concat();
        let large = [t(&["a", "b", "c"]), vec![vec![]; 5]].concat();
        assert_eq!(difference_of(&small, &large), None);
        assert_eq!(
            difference_of(&t(&["a", "b"]), &t(&["a", "c"])).as_deref(),
            Some("token 1 is \"b\" for the teacher, \"c\" for the student")
        );
        assert!(difference_of(&t(&["a", "b", "c"]), &t(&["a", "b"])).is_some());
    }
}
