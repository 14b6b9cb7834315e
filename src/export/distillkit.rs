//! `kdpipe export-data --format distillkit`: the teacher's token top-k as DistillKit
//! (arcee-ai/DistillKit) reads an offline teacher, for a student trained by torch.
//!
//! One Parquet file a split, one row per curated row that kept the teacher's token ids
//! and their top-k, all numeric (DistillKit's `prepacked` collator makes a tensor of every
//! column), every sequence padded to the split's longest (`prepacked` keeps only rows as
//! long as the first):
//!
//! - `input_ids`: the student's rationale-view prompt (its chat template), then the
//!   teacher's own reply tokens: the sequence finetune's token-level KD trains on;
//! - `attention_mask`: 1 on the sequence, 0 on padding;
//! - `token_ids`, `top_values` (`[length, k]`): DistillKit's raw sparse layout, which its
//!   `LogprobCompressor.decompress_to_sparse` passes through as they are. Position i holds
//!   the teacher's top-k for token i + 1, the token the student's logits at i predict, as
//!   natural-log probabilities at temperature 1;
//! - `labels`: DistillKit counts its KD loss at position i where `labels[i] ≥ 0` (not
//!   shifted), so `labels[i] = input_ids[i]` exactly at the positions that carry the
//!   teacher's top-k (the last prompt token up to the reply's next-to-last), −100
//!   elsewhere. Its cross-entropy is the model's own, which shifts labels by one: with
//!   this mask it trains the reply's tokens but the last (the end of turn, which the KD
//!   term covers) and the prompt's last token.
//!
//! Positions without the teacher's top-k (prompt, padding, the last token) hold a filler
//! the mask zeroes: ids 0..k, each log(1/k). A token with fewer than k alternatives is
//! padded with ids it does not have at −100 nats (e⁻¹⁰⁰: no mass, finite, so no
//! 0 · ∞ in a loss).

use crate::chat::fit_reply;
use crate::config::Config;
use crate::llama::LoadedModel;
use crate::prompts::{Prompt, View};
use crate::records::CuratedRow;
use anyhow::{bail, Result};
use polars::prelude::*;

/// The log-probability of an alternative added to fill a token's k.
const PAD_LOGPROB: f32 = -100.0;
/// The label of a position the loss skips (torch's ignore index).
const IGNORE: i64 = -100;

/// One curated row as DistillKit's sequence, before padding.
#[derive(Debug, Clone, PartialEq)]
pub struct KdSequence {
    pub input_ids: Vec<u32>,
    /// Position of the first reply token.
    pub reply_start: usize,
    /// The teacher's top-k of each kept reply token (ids, natural-log probabilities).
    pub topk: Vec<(Vec<u32>, Vec<f32>)>,
}

/// What a split's rows gave.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SplitCounts {
    pub rows: usize,
    /// Rows without the teacher's token ids and top-k (not exportable).
    pub without_topk: usize,
    /// Rows whose prompt or reply was cut to `[finetune] max_seq_len`.
    pub truncated: usize,
    pub length: usize,
    pub k: usize,
}

/// The student tokenizer's view of the rows with the teacher's token top-k, in the
/// curated order; rows without them are counted, not written.
pub fn sequences(
    model: &LoadedModel,
    prompt: &Prompt,
    rows: &[CuratedRow],
    max_len: usize,
) -> Result<(Vec<KdSequence>, SplitCounts)> {
    let student_vocab = crate::llama::vocab::fingerprint(&model.tokenizer);
    let mut counts = SplitCounts {
        rows: rows.len(),
        ..Default::default()
    };
    let mut out = Vec::new();
    for row in rows {
        let t = &row.tokens;
        if t.ids.is_empty() || t.top_logprobs.len() != t.ids.len() {
            if !t.texts.is_empty() && t.ids.is_empty() {
                bail!("row {:?} holds the teacher's top-k as token texts (an API teacher), and DistillKit reads token ids of the student's vocabulary\nhint: generate with a local teacher of the student's family ([teacher] model a GGUF, [generate] token_topk = 20)", row.id);
            }
            counts.without_topk += 1;
            continue;
        }
        if t.top_ids.len() != t.ids.len() {
            bail!("row {:?}: {} teacher tokens but {} top-k id lists\nhint: the curated split is damaged; re-run kdpipe curate", row.id, t.ids.len(), t.top_ids.len());
        }
        if !t.vocab.is_empty() && t.vocab != student_vocab {
            bail!(
                "row {:?}: the teacher's token ids index another vocabulary (fingerprint {}) than the student's tokenizer ({student_vocab}), and DistillKit reads them as the student's ids\nhint: set [student] model to a model of the teacher's family (Qwen2.5 0.5B for a Qwen2.5 teacher), or export --format trl and use label-level KD",
                row.id,
                t.vocab
            );
        }
        if let Some(temp) = t.temperature.filter(|x| (x - 1.0).abs() > 1e-6) {
            bail!("row {:?}: the teacher's top-k were taken at temperature {temp}; DistillKit's offline teacher reads the model's own distribution (temperature 1)\nhint: regenerate with a backend that reports unscaled log-probabilities", row.id);
        }
        let vocab = model.shape.vocab_size as u32;
        if let Some(bad) = t
            .ids
            .iter()
            .chain(t.top_ids.iter().flatten())
            .find(|&&id| id >= vocab)
        {
            bail!("row {:?}: teacher token id {bad} is past the student's vocabulary ({vocab} tokens)\nhint: set [student] model to a model of the teacher's family", row.id);
        }
        let prompt_ids = model.chat_ids(&prompt.student_chat(View::Rationale, &row.input))?;
        let fitted = fit_reply(prompt_ids, &t.ids, max_len);
        counts.truncated += usize::from(fitted.truncated);
        let reply_start = fitted.ids.len() - fitted.kept;
        let topk = t.top_ids[..fitted.kept]
            .iter()
            .cloned()
            .zip(t.top_logprobs[..fitted.kept].iter().cloned())
            .collect();
        out.push(KdSequence {
            input_ids: fitted.ids,
            reply_start,
            topk,
        });
    }
    counts.length = out.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    counts.k = out
        .iter()
        .flat_map(|s| s.topk.iter().map(|(ids, _)| ids.len()))
        .max()
        .unwrap_or(0);
    Ok((out, counts))
}

/// One token's alternatives filled to `k` with ids it does not have, at `PAD_LOGPROB`.
fn padded(ids: &[u32], logprobs: &[f32], k: usize) -> (Vec<i64>, Vec<f32>) {
    let mut out_ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let mut out_lp = logprobs.to_vec();
    let mut candidate = 0i64;
    while out_ids.len() < k {
        if !out_ids.contains(&candidate) {
            out_ids.push(candidate);
            out_lp.push(PAD_LOGPROB);
        }
        candidate += 1;
    }
    (out_ids, out_lp)
}

/// The split as DistillKit's columns: every sequence padded to `length` with `pad_id`.
pub fn frame(seqs: &[KdSequence], length: usize, k: usize, pad_id: u32) -> Result<DataFrame> {
    let filler_ids: Vec<i64> = (0..k as i64).collect();
    let filler = vec![-(k as f32).ln(); k];
    let (mut input_ids, mut mask, mut labels, mut token_ids, mut top_values) =
        (vec![], vec![], vec![], vec![], vec![]);
    for s in seqs {
        let n = s.input_ids.len();
        let ids: Vec<i64> = s
            .input_ids
            .iter()
            .map(|&i| i as i64)
            .chain(std::iter::repeat_n(pad_id as i64, length - n))
            .collect();
        // Position p carries the top-k of token p + 1: the reply's j-th at reply_start + j − 1.
        let first = s.reply_start - 1;
        let teacher_at = |p: usize| (p >= first).then(|| s.topk.get(p - first)).flatten();
        let mut row_ids = Vec::with_capacity(length);
        let mut row_values = Vec::with_capacity(length);
        let mut row_labels = Vec::with_capacity(length);
        for (p, &id) in ids.iter().enumerate() {
            match teacher_at(p) {
                Some((tids, lps)) => {
                    let (i, v) = padded(tids, lps, k);
                    row_ids.push(Series::new("".into(), i));
                    row_values.push(Series::new("".into(), v));
                    row_labels.push(id);
                }
                None => {
                    row_ids.push(Series::new("".into(), filler_ids.clone()));
                    row_values.push(Series::new("".into(), filler.clone()));
                    row_labels.push(IGNORE);
                }
            }
        }
        let attention: Vec<i64> = (0..length).map(|p| i64::from(p < n)).collect();
        input_ids.push(Series::new("".into(), ids));
        mask.push(Series::new("".into(), attention));
        labels.push(Series::new("".into(), row_labels));
        token_ids.push(Series::new("".into(), row_ids));
        top_values.push(Series::new("".into(), row_values));
    }
    let list = |name: &str, items: Vec<Series>, inner: DataType| -> Result<Column> {
        let dtype = DataType::List(Box::new(inner));
        if items.is_empty() {
            return Ok(Column::new_empty(name.into(), &dtype));
        }
        Ok(Column::new(name.into(), items).cast(&dtype)?)
    };
    let nested = |t: DataType| DataType::List(Box::new(t));
    Ok(DataFrame::new_infer_height(vec![
        list("input_ids", input_ids, DataType::Int64)?,
        list("attention_mask", mask, DataType::Int64)?,
        list("labels", labels, DataType::Int64)?,
        list("token_ids", token_ids, nested(DataType::Int64))?,
        list("top_values", top_values, nested(DataType::Float32))?,
    ])?)
}

/// How to train on the files with DistillKit.
pub fn readme(cfg: &Config, dir: &str, length: usize, k: usize, vocab: usize) -> String {
    format!(
        "```yaml\n# distillkit config.yaml (arcee-ai/DistillKit, offline teacher)\nmodel: <the student as a Hugging Face folder: {student}>\noutput_path: ./distillkit-out\nsequence_length: {length}\nuse_flash_attention: false\ndataset:\n  train_dataset:\n    repo_id: {dir}\n    split: train\n  eval_dataset:\n    repo_id: {dir}\n    split: validation\n  prepacked: true\nteacher:\n  kind: dataset\n  logprob_compressor: {{d: {vocab}, k: {k}, exact_k: {k}, residual_bins: []}}\nloss_functions:\n  - {{function: cross_entropy, weight: 0.5}}\n  - {{function: kl, weight: 0.5, temperature: 1.0, missing_probability_handling: zero}}\ntraining_args:\n  num_train_epochs: 1\n  per_device_train_batch_size: 4\n  learning_rate: 1.0e-5\n  remove_unused_columns: false  # keep token_ids / top_values for the KD loss\n```\n\nThe columns: `input_ids` (the student's rationale-view prompt, then the teacher's reply tokens, padded to {length}), `attention_mask`, `labels` (≥ 0 exactly where a position holds the teacher's top-k: DistillKit's KD mask), `token_ids` and `top_values` (`[{length}, {k}]`: at position i, the teacher's top-{k} for token i + 1, natural-log probabilities at temperature 1; elsewhere a filler the mask zeroes). `logprob_compressor` is required by DistillKit's config but unused: the rows hold raw top-k, which its decompressor passes through. Rows are the curated rows that kept the teacher's token top-k, in the curated order.\n",
        student = cfg.student.model
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_hold_the_next_tokens_top_k_and_the_mask_matches() {
        // Prompt of 3 tokens, reply of 2 with top-2 (the second token with one).
        let s = KdSequence {
            input_ids: vec![7, 8, 9, 20, 21],
            reply_start: 3,
            topk: vec![(vec![20, 5], vec![-0.1, -2.5]), (vec![21], vec![-0.01])],
        };
        let df = frame(&[s], 7, 2, 0).unwrap();
        let row = |c: &str| {
            df.column(c)
                .unwrap()
                .list()
                .unwrap()
                .get_as_series(0)
                .unwrap()
        };
        let ints = |s: Series| s.i64().unwrap().into_no_null_iter().collect::<Vec<_>>();
        assert_eq!(ints(row("input_ids")), [7, 8, 9, 20, 21, 0, 0]);
        assert_eq!(ints(row("attention_mask")), [1, 1, 1, 1, 1, 0, 0]);
        assert_eq!(ints(row("labels")), [-100, -100, 9, 20, -100, -100, -100]);
        let ids = row("token_ids");
        let values = row("top_values");
        let at = |p: usize| {
            let i = ints(ids.list().unwrap().get_as_series(p).unwrap());
            let v: Vec<f32> = values
                .list()
                .unwrap()
                .get_as_series(p)
                .unwrap()
                .f32()
                .unwrap()
                .into_no_null_iter()
                .collect();
            (i, v)
        };
        assert_eq!(at(2), (vec![20, 5], vec![-0.1, -2.5]));
        // A missing alternative: an id the token lacks, with no mass.
        assert_eq!(at(3), (vec![21, 0], vec![-0.01, PAD_LOGPROB]));
        let (filler_ids, filler) = at(0);
        assert_eq!(filler_ids, [0, 1]);
        assert!((filler[0] - 0.5f32.ln()).abs() < 1e-7);
    }

    #[test]
    fn padding_skips_ids_the_token_already_has() {
        assert_eq!(padded(&[0, 2], &[-0.5, -1.0], 4).0, [0, 2, 1, 3]);
    }
}
