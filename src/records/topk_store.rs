//! The compact on-disk form of token top-k soft labels (teacher and curated rows).
//!
//! Each row stores its alternatives as one flat block of `tokens × k` entries, k fixed
//! per row (`topk_k`; a token with fewer alternatives is padded): the ids (`topk_ids`,
//! u32, local teachers) or token texts (`topk_texts`, APIs), and the natural-log
//! probabilities as 16-bit codes (`topk_logprob_codes`, little-endian u16 in one binary
//! value a row). A code c < `ABSENT` stands for −c·`STEP`: log-probabilities from 0 down
//! to −`FLOOR` nats (e⁻⁴⁰ ≈ 4e-18: nothing a KD loss can see) in steps of 6.1e-4, so a
//! code is within 3.1e-4 nats of the teacher's value (a relative error of 0.03 % in the
//! probability; with the tail's shift below, within 6e-4). `ABSENT` marks padding. Against the nested f32 lists of earlier
//! versions (an offset and 4 bytes a value), that is 6 bytes an alternative before
//! Parquet's compression.
//!
//! Each token's tail mass (1 − the top-k's probabilities) is stored too
//! (`topk_tail_codes`, the code of its natural log), computed from the teacher's exact
//! values: where the top-k hold nearly all the mass, the tail is the difference of two
//! numbers near 1, and 16-bit log-probabilities alone would get it wrong by orders of
//! magnitude (a KD loss off by 0.04 on a real SmolLM2 distribution, where the tail term
//! weighs the student's own tail by the log of the teacher's). On reading, each token's
//! decoded log-probabilities are shifted together (by at most a few code steps) so that
//! their mass is 1 − the stored tail: the rows carry the same top-k + tail meaning as
//! before, and the losses that derive the tail from the top-k see the teacher's tail.
//!
//! Two more columns say what the numbers mean: `topk_temperature`, the temperature of
//! the distribution the log-probabilities come from (1: the model's own, which is what
//! every backend reports and what the KD losses expect; null without alternatives), and
//! `topk_vocab`, the fingerprint of the tokenizer whose ids `topk_ids` holds
//! (`llama::vocab::fingerprint`; empty for text alternatives). Parquet stores each as a
//! dictionary of one value, a few bytes a file.

use anyhow::{bail, Result};
use polars::prelude::*;
use std::path::Path;

/// Log-probabilities below −FLOOR nats are stored as −FLOOR.
pub const FLOOR: f32 = 40.0;
/// The code of padding (no alternative there).
pub const ABSENT: u16 = u16::MAX;
/// Nats per code step.
pub const STEP: f32 = FLOOR / (ABSENT - 1) as f32;

/// The code of a natural-log probability (clamped to [−FLOOR, 0]; NaN is absent).
pub fn encode(logprob: f32) -> u16 {
    if logprob.is_nan() {
        return ABSENT;
    }
    let nats = (-logprob).clamp(0.0, FLOOR);
    ((nats / STEP).round() as u32).min(ABSENT as u32 - 1) as u16
}

/// The log-probability a code stands for (None: padding).
pub fn decode(code: u16) -> Option<f32> {
    (code != ABSENT).then(|| -(code as f32) * STEP)
}

/// One row's alternatives in the stored layout.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlatTopk {
    pub k: u32,
    /// `tokens × k` ids (padding 0), or empty when the teacher gave texts.
    pub ids: Vec<u32>,
    /// `tokens × k` texts (padding ""), or empty when the teacher gave ids.
    pub texts: Vec<String>,
    /// `tokens × k` codes, little-endian.
    pub codes: Vec<u8>,
    /// One code a token: the natural log of its tail mass, little-endian.
    pub tails: Vec<u8>,
    /// The temperature of the distribution the codes come from (None: no alternatives).
    pub temperature: Option<f32>,
    /// The fingerprint of the vocabulary `ids` index ("" without ids).
    pub vocab: String,
}

/// A row's per-token alternatives (ids or texts, and log-probabilities) in the stored
/// layout; temperature and vocabulary are the caller's to set.
pub fn flatten(ids: &[Vec<u32>], texts: &[Vec<String>], logprobs: &[Vec<f32>]) -> FlatTopk {
    let k = logprobs.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = FlatTopk {
        k: k as u32,
        ..Default::default()
    };
    for (t, lps) in logprobs.iter().enumerate() {
        let mass: f64 = lps.iter().map(|&lp| (lp as f64).exp()).sum();
        let tail = (1.0 - mass).max(0.0);
        out.tails.extend(encode(tail.ln() as f32).to_le_bytes());
        for slot in 0..k {
            let code = lps.get(slot).map_or(ABSENT, |&lp| encode(lp));
            out.codes.extend(code.to_le_bytes());
            if !ids.is_empty() {
                out.ids
                    .push(ids.get(t).and_then(|v| v.get(slot)).copied().unwrap_or(0));
            }
            if !texts.is_empty() {
                let text = texts.get(t).and_then(|v| v.get(slot)).cloned();
                out.texts.push(text.unwrap_or_default());
            }
        }
    }
    out
}

/// Per-token alternatives of one stored row: (ids, texts, log-probabilities), padding
/// dropped. `what` names the row in errors.
#[allow(clippy::type_complexity)]
pub fn unflatten(
    flat: &FlatTopk,
    what: &dyn Fn() -> String,
) -> Result<(Vec<Vec<u32>>, Vec<Vec<String>>, Vec<Vec<f32>>)> {
    let k = flat.k as usize;
    if !flat.codes.len().is_multiple_of(2) || (k == 0 && !flat.codes.is_empty()) {
        bail!("{}: topk_logprob_codes holds {} bytes, not whole codes for k = {k}\nhint: the file is damaged or was not written by kdpipe; re-run the stage that wrote it", what(), flat.codes.len());
    }
    let codes: Vec<u16> = flat
        .codes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    if k > 0 && !codes.len().is_multiple_of(k) {
        bail!(
            "{}: {} top-k codes do not split into tokens of k = {k}\nhint: the file is damaged or was not written by kdpipe; re-run the stage that wrote it",
            what(),
            codes.len()
        );
    }
    for (name, len) in [
        ("topk_ids", flat.ids.len()),
        ("topk_texts", flat.texts.len()),
    ] {
        if len != 0 && len != codes.len() {
            bail!("{}: {name} holds {len} entries, topk_logprob_codes {}\nhint: the file is damaged or was not written by kdpipe; re-run the stage that wrote it", what(), codes.len());
        }
    }
    let tokens = codes.len().checked_div(k).unwrap_or(0);
    let tails: Vec<u16> = flat
        .tails
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    if tails.len() != tokens {
        bail!("{}: topk_tail_codes holds {} tails for {tokens} tokens\nhint: the file is damaged or was not written by kdpipe; re-run the stage that wrote it", what(), tails.len());
    }
    let (mut ids, mut texts, mut logprobs) = (vec![], vec![], vec![]);
    for (t, &tail) in tails.iter().enumerate() {
        let (mut i, mut x, mut l) = (vec![], vec![], vec![]);
        for (slot, &code) in codes.iter().enumerate().skip(t * k).take(k) {
            let Some(lp) = decode(code) else {
                continue;
            };
            l.push(lp);
            if let Some(&id) = flat.ids.get(slot) {
                i.push(id);
            }
            if let Some(text) = flat.texts.get(slot) {
                x.push(text.clone());
            }
        }
        rescale_to_tail(&mut l, decode(tail).unwrap_or(-FLOOR));
        if !flat.ids.is_empty() {
            ids.push(i);
        }
        if !flat.texts.is_empty() {
            texts.push(x);
        }
        logprobs.push(l);
    }
    Ok((ids, texts, logprobs))
}

/// Shift a token's decoded log-probabilities together so that their mass is
/// 1 − e^`log_tail` (the stored tail).
fn rescale_to_tail(logprobs: &mut [f32], log_tail: f32) {
    let mass: f64 = logprobs.iter().map(|&lp| (lp as f64).exp()).sum();
    let target = 1.0 - (log_tail as f64).exp();
    if mass > 0.0 && target > 0.0 {
        let shift = (target / mass).ln() as f32;
        for lp in logprobs {
            *lp += shift;
        }
    }
}

/// The columns of the stored layout for `rows` (in `COLUMNS`' order).
pub fn columns(rows: &[FlatTopk]) -> Vec<Column> {
    let list = |name: &str, series: Vec<Series>| Column::new(name.into(), series);
    vec![
        Column::new(
            "topk_k".into(),
            rows.iter().map(|r| r.k).collect::<Vec<_>>(),
        ),
        list(
            "topk_ids",
            rows.iter()
                .map(|r| Series::new("".into(), &r.ids))
                .collect(),
        ),
        list(
            "topk_texts",
            rows.iter()
                .map(|r| Series::new("".into(), &r.texts))
                .collect(),
        ),
        Column::new(
            "topk_logprob_codes".into(),
            rows.iter().map(|r| r.codes.as_slice()).collect::<Vec<_>>(),
        ),
        Column::new(
            "topk_tail_codes".into(),
            rows.iter().map(|r| r.tails.as_slice()).collect::<Vec<_>>(),
        ),
        Column::new(
            "topk_temperature".into(),
            rows.iter().map(|r| r.temperature).collect::<Vec<_>>(),
        ),
        Column::new(
            "topk_vocab".into(),
            rows.iter().map(|r| r.vocab.as_str()).collect::<Vec<_>>(),
        ),
    ]
}

/// The stored layout's column names, for readers that select columns.
pub const COLUMNS: [&str; 7] = [
    "topk_k",
    "topk_ids",
    "topk_texts",
    "topk_logprob_codes",
    "topk_tail_codes",
    "topk_temperature",
    "topk_vocab",
];

/// Reads rows' stored alternatives from a frame (None when it lacks the columns).
pub struct TopkColumns<'a> {
    k: &'a UInt32Chunked,
    ids: &'a ListChunked,
    texts: &'a ListChunked,
    codes: &'a BinaryChunked,
    tails: &'a BinaryChunked,
    temperature: &'a Float32Chunked,
    vocab: &'a StringChunked,
}

impl<'a> TopkColumns<'a> {
    pub fn of(df: &'a DataFrame, path: &Path) -> Result<Option<Self>> {
        if COLUMNS.iter().any(|c| df.column(c).is_err()) {
            return Ok(None);
        }
        let list = |t: DataType| DataType::List(Box::new(t));
        let req = |name: &str, t: DataType| super::require(df, path, name, &t);
        Ok(Some(TopkColumns {
            k: req("topk_k", DataType::UInt32)?.u32()?,
            ids: req("topk_ids", list(DataType::UInt32))?.list()?,
            texts: req("topk_texts", list(DataType::String))?.list()?,
            codes: req("topk_logprob_codes", DataType::Binary)?.binary()?,
            tails: req("topk_tail_codes", DataType::Binary)?.binary()?,
            temperature: req("topk_temperature", DataType::Float32)?.f32()?,
            vocab: req("topk_vocab", DataType::String)?.str()?,
        }))
    }

    /// Row `i`'s alternatives in the stored layout.
    pub fn row(&self, i: usize) -> FlatTopk {
        let ids = self
            .ids
            .get_as_series(i)
            .and_then(|s| s.u32().ok().map(|c| c.into_no_null_iter().collect()))
            .unwrap_or_default();
        let texts = self
            .texts
            .get_as_series(i)
            .and_then(|s| {
                s.str()
                    .ok()
                    .map(|c| c.iter().map(|v| v.unwrap_or("").to_string()).collect())
            })
            .unwrap_or_default();
        FlatTopk {
            k: self.k.get(i).unwrap_or(0),
            ids,
            texts,
            codes: self.codes.get(i).map(<[u8]>::to_vec).unwrap_or_default(),
            tails: self.tails.get(i).map(<[u8]>::to_vec).unwrap_or_default(),
            temperature: self.temperature.get(i),
            vocab: self.vocab.get(i).unwrap_or("").to_string(),
        }
    }
}

/// Tokens with stored alternatives in a frame of the stored layout (0 without it).
pub fn stored_tokens(df: &DataFrame) -> usize {
    let (Ok(k), Ok(codes)) = (df.column("topk_k"), df.column("topk_logprob_codes")) else {
        return 0;
    };
    let (Ok(k), Ok(codes)) = (k.u32(), codes.binary()) else {
        return 0;
    };
    k.iter()
        .zip(codes.iter())
        .map(|(k, c)| match (k, c) {
            (Some(k), Some(c)) if k > 0 => c.len() / 2 / k as usize,
            _ => 0,
        })
        .sum()
}

/// What the stored top-k costs in `files`: the compressed bytes of its columns (from the
/// Parquet footers) per generated token that has alternatives (`tokens`). None without
/// such tokens.
pub fn bytes_per_token(files: &[&Path], tokens: usize) -> Result<Option<f64>> {
    if tokens == 0 {
        return Ok(None);
    }
    let mut bytes = 0i64;
    for path in files {
        let file = std::fs::File::open(path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        let mut reader = ParquetReader::new(file);
        let meta = reader.get_metadata()?;
        for group in &meta.row_groups {
            for chunk in group.parquet_columns() {
                let root = chunk.descriptor().path_in_schema.first();
                if root.is_some_and(|r| COLUMNS.contains(&r.as_str())) {
                    bytes += chunk.compressed_size();
                }
            }
        }
    }
    Ok(Some(bytes as f64 / tokens as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_within_half_a_step() {
        for lp in [0.0f32, -1e-5, -0.7, -2.5, -13.8, -39.99] {
            let back = decode(encode(lp)).unwrap();
            assert!((back - lp).abs() <= STEP / 2.0 + 1e-6, "{lp} → {back}");
        }
        assert_eq!(decode(encode(-1e9)), Some(-FLOOR));
        assert_eq!(decode(encode(f32::NEG_INFINITY)), Some(-FLOOR));
        assert_eq!(decode(encode(0.01)), Some(0.0), "rounding above 0 is 0");
        assert_eq!(encode(f32::NAN), ABSENT);
        assert_eq!(decode(ABSENT), None);
        const { assert!(STEP < 6.2e-4) };
    }

    #[test]
    fn ragged_rows_flatten_and_come_back_without_padding() {
        let ids = vec![vec![5, 9, 2], vec![7], vec![]];
        let lps = vec![vec![-0.2, -2.5, -3.5], vec![-0.01], vec![]];
        let flat = flatten(&ids, &[], &lps);
        assert_eq!(flat.k, 3);
        assert_eq!(flat.ids, vec![5, 9, 2, 7, 0, 0, 0, 0, 0]);
        assert_eq!(flat.codes.len(), 18);
        let (i, x, l) = unflatten(&flat, &|| "row".into()).unwrap();
        assert_eq!(i, ids);
        assert!(x.is_empty());
        // Within a few code steps (rounding, then the shift to the stored tail).
        for (a, b) in l.iter().flatten().zip(lps.iter().flatten()) {
            assert!((a - b).abs() <= 2.0 * STEP, "{a} vs {b}");
        }
        assert_eq!(l.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 1, 0]);

        let texts = vec![vec!["a".to_string(), "b".into()], vec!["c".into()]];
        let flat = flatten(&[], &texts, &[vec![-0.5, -1.0], vec![-0.2]]);
        let (i, x, _) = unflatten(&flat, &|| "row".into()).unwrap();
        assert!(i.is_empty());
        assert_eq!(x, texts);
        assert_eq!(
            unflatten(&FlatTopk::default(), &|| "row".into())
                .unwrap()
                .2
                .len(),
            0
        );
    }

    #[test]
    fn the_tail_survives_where_the_top_k_hold_nearly_everything() {
        // Top-2 of 0.99999 and 9e-6: the tail is 1e-6. Rounded to 16-bit codes alone,
        // the two would sum to anything within ±6e-4 of 1.
        let lps = vec![vec![0.99999f64.ln() as f32, 9e-6f64.ln() as f32]];
        let flat = flatten(&[vec![1, 2]], &[], &lps);
        let (_, _, back) = unflatten(&flat, &|| "row".into()).unwrap();
        let tail = 1.0 - back[0].iter().map(|&l| (l as f64).exp()).sum::<f64>();
        assert!((tail - 1e-6).abs() < 2e-7, "{tail}");
    }

    #[test]
    fn a_damaged_row_is_an_error_naming_it() {
        let mut flat = flatten(&[vec![1, 2]], &[], &[vec![-0.1, -0.2]]);
        flat.codes.pop();
        let err = unflatten(&flat, &|| "f.parquet row \"q7\"".into()).unwrap_err();
        assert!(err.to_string().contains("f.parquet row \"q7\""), "{err}");
        let mut flat = flatten(&[vec![1, 2]], &[], &[vec![-0.1, -0.2]]);
        flat.ids.push(3);
        assert!(unflatten(&flat, &|| "r".into()).is_err());
    }
}
