//! Training examples: each curated row gives a label view and (step-by-step) a rationale
//! view, rendered through the student's chat template; loss only on the reply tokens.

use crate::llama::LoadedModel;
use crate::prompts::{Prompt, View};
use crate::records::{CuratedRow, RowTargets};
use crate::task::ANSWER_MARKER;
use anyhow::Result;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// What an example trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExampleKind {
    /// The label view: the answer alone.
    Label,
    /// The rationale view: the reasoning, then the answer line.
    Rationale,
    /// One answer of the row's soft label, in the label view: scored for the KD term.
    Kd,
    /// The teacher's own generated tokens in the rationale view, each with the teacher's
    /// top-k alternatives: token-level KD.
    TokenKd,
    /// A reply the student sampled itself in the rationale view, each token with the live
    /// teacher's top-k alternatives: on-policy distillation (no cross-entropy).
    OnPolicy,
}

#[derive(Debug, Clone)]
pub struct Example {
    pub kind: ExampleKind,
    pub ids: Vec<u32>,
    /// 1 where the token is a target (part of the reply), 0 for the prompt.
    pub target: Vec<u8>,
    /// KD examples: the row they belong to and the teacher's probability of this answer.
    pub kd: Option<KdSlot>,
    /// Prompt and reply did not fit in `max_seq_len` and were cut.
    pub truncated: bool,
    /// For each target token (in order), the teacher's top-k ids and natural-log
    /// probabilities at that position: token-KD and on-policy examples, and rationale
    /// examples a live teacher scored (online distillation).
    pub token_topk: Vec<(Vec<u32>, Vec<f32>)>,
    /// Cross-tokenizer token KD: (reply position, the teacher's probabilities sorted from
    /// the largest) where no teacher token spans the student token's bytes, for the ULD
    /// term (`cross_vocab`); those positions' `token_topk` entries are empty.
    pub token_uld: Vec<(usize, Vec<f32>)>,
    /// The train row it comes from (its index in the split).
    pub row: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdSlot {
    pub row: u32,
    pub teacher_prob: f64,
}

fn example(
    model: &LoadedModel,
    prompt: &Prompt,
    kind: ExampleKind,
    input: &str,
    reply: &str,
    max_len: usize,
) -> Result<Example> {
    let view = match kind {
        ExampleKind::Rationale | ExampleKind::TokenKd | ExampleKind::OnPolicy => View::Rationale,
        ExampleKind::Label | ExampleKind::Kd => View::Label,
    };
    let ids = model.chat_ids(&prompt.student_chat(view, input))?;
    let mut reply_ids = model.encode(reply)?;
    reply_ids.push(model.eos_token_id);
    let fitted = crate::chat::fit_reply(ids, &reply_ids, max_len);
    Ok(Example {
        kind,
        ids: fitted.ids,
        target: fitted.target,
        kd: None,
        truncated: fitted.truncated,
        token_topk: vec![],
        token_uld: vec![],
        row: 0,
    })
}

/// The token-KD example of a row whose teacher kept its tokens' top-k: the rationale-view
/// prompt, then the teacher's generated token ids as the reply, each position carrying
/// the teacher's alternatives. None when the row has no tokens.
pub fn token_kd_example(
    model: &LoadedModel,
    prompt: &Prompt,
    row: &CuratedRow,
    max_len: usize,
) -> Result<Option<Example>> {
    let t = &row.tokens;
    if t.ids.is_empty() || t.top_ids.len() != t.ids.len() || t.top_logprobs.len() != t.ids.len() {
        return Ok(None);
    }
    let fitted = rationale_with_reply(model, prompt, &row.input, &t.ids, max_len)?;
    let (ids, target, keep, truncated) = fitted;
    let token_topk = t.top_ids[..keep]
        .iter()
        .cloned()
        .zip(t.top_logprobs[..keep].iter().cloned())
        .collect();
    Ok(Some(Example {
        kind: ExampleKind::TokenKd,
        ids,
        target,
        kd: None,
        truncated,
        token_topk,
        token_uld: vec![],
        row: 0,
    }))
}

/// The rationale-view prompt of `input` followed by `reply` (token ids), fitted into
/// `max_len`: the reply kept up to all but 8 tokens, the prompt cut from the left. The
/// ids, the target mask (1 on the kept reply), how many reply tokens were kept, and
/// whether anything was cut.
pub(super) fn rationale_with_reply(
    model: &LoadedModel,
    prompt: &Prompt,
    input: &str,
    reply: &[u32],
    max_len: usize,
) -> Result<(Vec<u32>, Vec<u8>, usize, bool)> {
    let ids = model.chat_ids(&prompt.student_chat(View::Rationale, input))?;
    let f = crate::chat::fit_reply(ids, reply, max_len);
    Ok((f.ids, f.target, f.kept, f.truncated))
}

/// Token-level KD needs the teacher's vocabulary: the student's tokenizer must turn the
/// teacher's token ids back into the teacher's text. Checked on up to 20 rows.
pub fn check_shared_vocabulary(model: &LoadedModel, rows: &[CuratedRow]) -> Result<()> {
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let with_tokens: Vec<&CuratedRow> = rows.iter().filter(|r| !r.tokens.ids.is_empty()).collect();
    if with_tokens.is_empty() {
        anyhow::bail!("[finetune] kd_token_weight > 0, but no train row has the teacher's tokens\nhint: generate with [generate] token_topk = 5 (a local teacher), or set kd_token_weight = 0");
    }
    check_distribution_temperature(&with_tokens)?;
    let student = crate::llama::vocab::fingerprint(&model.tokenizer);
    if let Some(r) = with_tokens
        .iter()
        .find(|r| !r.tokens.vocab.is_empty() && r.tokens.vocab != student)
    {
        anyhow::bail!(
            "token-level KD reads the teacher's token ids with the student's tokenizer, and row {:?}'s ids index another vocabulary (fingerprint {}, the student's {student})\nhint: set [finetune] token_kd = \"cross\" (the teacher's text aligned to the student's tokens by byte offsets), use a student of the teacher's family, or set kd_token_weight = 0 and use kd_weight (label-level KD works across tokenizers)",
            r.id,
            r.tokens.vocab
        );
    }
    // Rows without a fingerprint (written by hand) are checked by decoding a few.
    for r in with_tokens
        .iter()
        .filter(|r| r.tokens.vocab.is_empty())
        .take(20)
    {
        let vocab = model.shape.vocab_size as u32;
        let out_of_range = r.tokens.ids.iter().any(|&id| id >= vocab);
        let decoded = if out_of_range {
            String::new()
        } else {
            model.decode(&r.tokens.ids)?
        };
        if out_of_range || squash(&decoded) != squash(&r.raw) {
            anyhow::bail!(
                "token-level KD needs the teacher's tokenizer, and the student's is another: row {:?}'s teacher tokens decode to {:?} with it, not to the teacher's {:?}\nhint: set [finetune] token_kd = \"cross\" (the teacher's text aligned to the student's tokens by byte offsets), use a student of the teacher's family, or set kd_token_weight = 0 and use kd_weight (label-level KD works across tokenizers)",
                r.id,
                decoded.chars().take(60).collect::<String>(),
                r.raw.chars().take(60).collect::<String>()
            );
        }
    }
    Ok(())
}

/// The KD losses read the teacher's log-probabilities as its own distribution
/// (temperature 1) and apply `[finetune] temperature` themselves: rows whose alternatives
/// were taken at another temperature would be softened twice.
pub fn check_distribution_temperature(rows: &[&CuratedRow]) -> Result<()> {
    if let Some(r) = rows
        .iter()
        .find(|r| r.tokens.temperature.is_some_and(|t| (t - 1.0).abs() > 1e-6))
    {
        anyhow::bail!(
            "row {:?}'s token top-k log-probabilities were taken at temperature {}; token-level KD reads the teacher's own distribution (temperature 1) and applies [finetune] temperature itself\nhint: regenerate the rows with a backend that reports unscaled log-probabilities",
            r.id,
            r.tokens.temperature.unwrap_or(1.0)
        );
    }
    Ok(())
}

/// The first of a few rows (input, rationale and answer) that two models tokenize
/// differently: its id and the two token counts. Models compared token by token (a live
/// teacher, a mutual-learning peer) need one tokenizer.
pub fn tokenization_difference(
    a: &LoadedModel,
    b: &LoadedModel,
    rows: &[CuratedRow],
) -> Result<Option<(String, usize, usize)>> {
    for r in rows.iter().take(5) {
        let text = format!("{}\n{}\n{}", r.input, r.rationale, r.answer);
        let (x, y) = (a.encode(&text)?, b.encode(&text)?);
        if x != y {
            return Ok(Some((r.id.clone(), x.len(), y.len())));
        }
    }
    Ok(None)
}

/// The examples of one row as its `targets` say (`CuratedRow::targets`): label view
/// always, rationale view where the teacher's reasoning is kept. With `kd`, a row whose
/// soft label has two or more answers also gets one label-view example per answer, for
/// the KD term (`row` tells rows apart in a batch).
pub fn row_examples(
    model: &LoadedModel,
    prompt: &Prompt,
    row: &CuratedRow,
    targets: &RowTargets,
    max_len: usize,
    kd: Option<u32>,
) -> Result<Vec<Example>> {
    let label = &targets.label;
    let mut out = vec![example(
        model,
        prompt,
        ExampleKind::Label,
        &row.input,
        label,
        max_len,
    )?];
    if targets.rationale {
        // The rationale view ends with the answer line, as the teacher wrote it, so a
        // student can also answer by reasoning first ([eval] student_view = "rationale").
        let reply = format!("{}\n{ANSWER_MARKER} {label}", row.rationale.trim());
        out.push(example(
            model,
            prompt,
            ExampleKind::Rationale,
            &row.input,
            &reply,
            max_len,
        )?);
    }
    let soft = row.soft_labels.len() >= 2 && row.soft_labels.len() == row.soft_probs.len();
    if let (Some(index), true, true) = (kd, soft, targets.soft_label) {
        for (answer, p) in row.soft_labels.iter().zip(&row.soft_probs) {
            let mut e = example(model, prompt, ExampleKind::Kd, &row.input, answer, max_len)?;
            e.kd = Some(KdSlot {
                row: index,
                teacher_prob: *p,
            });
            out.push(e);
        }
    }
    Ok(out)
}

/// Batches of about `batch_size` sequences, in a seeded random order. A row's views stay
/// in one batch (so every step-by-step batch weighs both views by α), and rows of similar
/// length go together (less padding).
pub fn batches(mut rows: Vec<Vec<Example>>, batch_size: usize, seed: u64) -> Vec<Vec<Example>> {
    rows.sort_by_key(|views| views.iter().map(|e| e.ids.len()).max().unwrap_or(0));
    let mut out: Vec<Vec<Example>> = Vec::new();
    let mut current: Vec<Example> = Vec::new();
    for views in rows {
        if !current.is_empty() && current.len() + views.len() > batch_size.max(1) {
            out.push(std::mem::take(&mut current));
        }
        current.extend(views);
    }
    if !current.is_empty() {
        out.push(current);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    out.shuffle(&mut rng);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(kind: ExampleKind, len: usize) -> Example {
        Example {
            kind,
            ids: vec![1; len],
            target: vec![1; len],
            kd: None,
            truncated: false,
            token_topk: vec![],
            token_uld: vec![],
            row: 0,
        }
    }

    #[test]
    fn batches_keep_a_rows_views_together() {
        let rows: Vec<Vec<Example>> = (0..5)
            .map(|i| {
                vec![
                    ex(ExampleKind::Label, 3 + i),
                    ex(ExampleKind::Rationale, 10 + i),
                ]
            })
            .collect();
        let out = batches(rows, 4, 1);
        assert_eq!(out.len(), 3);
        for b in &out {
            let labels = b.iter().filter(|e| e.kind == ExampleKind::Label).count();
            assert_eq!(labels * 2, b.len(), "a batch split a row's views");
        }
        assert_eq!(out.iter().map(Vec::len).sum::<usize>(), 10);
    }
}
