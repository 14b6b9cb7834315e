//! The step-by-step loss:
//!
//! `total = α·CE(label view) + (1−α)·CE(rationale view)`
//!
//! where each CE is the mean next-token cross-entropy over that view's target tokens
//! (the reply and its end-of-turn token; the prompt is masked out). A view absent from
//! the batch contributes nothing, and the other view then carries the whole weight.

use super::data::{Example, ExampleKind};
use super::divergence;
pub use crate::config::Divergence;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

/// A right-padded batch: ids, attention mask and target mask, all `[batch, seq]`.
pub struct Batch {
    pub ids: Tensor,
    pub attention: Tensor,
    /// 1 at every reply token (any kind) `[batch, seq]`, unshifted: where an example's
    /// answer is, for pooling.
    pub reply: Tensor,
    /// Target masks per view, shifted to align with next-token predictions `[batch, seq-1]`.
    pub label_targets: Tensor,
    pub rationale_targets: Tensor,
    pub kd_targets: Tensor,
    pub n_label: f64,
    pub n_rationale: f64,
    /// KD groups: the batch rows of one curated row's answers and the teacher's
    /// probabilities of them.
    pub kd_groups: Vec<(usize, Vec<f64>)>,
    /// Token KD: positions `[batch, seq-1]` of off-policy examples where the teacher's
    /// distribution is known, and at every such position (on-policy ones too) the
    /// teacher's top-k ids and log-probabilities `[batch, seq-1, k]` (padding: id 0,
    /// log-probability −1e9).
    pub token_kd_mask: Tensor,
    pub token_kd_ids: Tensor,
    pub token_kd_logprobs: Tensor,
    pub n_token_kd: f64,
    /// On-policy: the positions of the student's own samples `[batch, seq-1]`.
    pub on_policy_mask: Tensor,
    pub n_on_policy: f64,
    /// Cross-tokenizer ULD: the positions (flat indices into `[batch, seq-1]`) where the
    /// student is compared with the teacher by sorted probabilities, and the teacher's
    /// sorted top-k there `[n_uld, k]` (padding 0). None without such positions.
    pub uld: Option<(Tensor, Tensor)>,
    pub tokens: usize,
}

pub fn make_batch(examples: &[Example], pad: u32, device: &Device) -> Result<Batch> {
    let t = examples
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let b = examples.len();
    let (mut ids, mut att) = (vec![pad; b * t], vec![0f32; b * t]);
    let mut reply = vec![0f32; b * t];
    let (mut lab, mut rat) = (vec![0f32; b * (t - 1)], vec![0f32; b * (t - 1)]);
    let mut kd = vec![0f32; b * (t - 1)];
    let k = examples
        .iter()
        .flat_map(|e| e.token_topk.iter().map(|(ids, _)| ids.len()))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut tk_mask = vec![0f32; b * (t - 1)];
    let mut op_mask = vec![0f32; b * (t - 1)];
    let mut tk_ids = vec![0u32; b * (t - 1) * k];
    let mut tk_logp = vec![-1e9f32; b * (t - 1) * k];
    let mut kd_groups: Vec<(usize, Vec<f64>)> = vec![];
    let mut kd_rows: Vec<Vec<usize>> = vec![];
    let uld_k = examples
        .iter()
        .flat_map(|e| e.token_uld.iter().map(|(_, p)| p.len()))
        .max()
        .unwrap_or(0);
    let (mut uld_at, mut uld_probs) = (vec![], vec![]);
    for (i, e) in examples.iter().enumerate() {
        let mut reply_pos = 0;
        let mut uld = e.token_uld.iter().peekable();
        for (j, &id) in e.ids.iter().enumerate() {
            ids[i * t + j] = id;
            att[i * t + j] = 1.0;
            reply[i * t + j] = e.target[j] as f32;
            // Position j-1 predicts token j.
            if j > 0 && e.target[j] == 1 {
                let at = i * (t - 1) + j - 1;
                match e.kind {
                    ExampleKind::Label => lab[at] = 1.0,
                    ExampleKind::Rationale => rat[at] = 1.0,
                    ExampleKind::Kd => kd[at] = 1.0,
                    ExampleKind::TokenKd | ExampleKind::OnPolicy => {}
                }
                if let Some((_, probs)) = uld.next_if(|(p, _)| *p == reply_pos) {
                    uld_at.push(at as u32);
                    uld_probs.extend(probs.iter().copied());
                    uld_probs.extend(std::iter::repeat_n(0f32, uld_k - probs.len()));
                }
                // The teacher's alternatives (stored, or from a live teacher; none at a
                // cross-tokenizer position none of whose alternatives the student has).
                let alternatives = e.token_topk.get(reply_pos);
                if let Some((top_ids, top_logp)) = alternatives.filter(|(ids, _)| !ids.is_empty()) {
                    match e.kind {
                        ExampleKind::OnPolicy => op_mask[at] = 1.0,
                        _ => tk_mask[at] = 1.0,
                    }
                    for (slot, (&tid, &lp)) in top_ids.iter().zip(top_logp).enumerate() {
                        tk_ids[at * k + slot] = tid;
                        tk_logp[at * k + slot] = lp;
                    }
                }
                reply_pos += 1;
            }
        }
        if let Some(slot) = e.kd {
            // A row's answers are consecutive examples (batches keep a row together).
            match kd_groups.last_mut() {
                Some((row, probs)) if *row == slot.row as usize => {
                    probs.push(slot.teacher_prob);
                    if let Some(r) = kd_rows.last_mut() {
                        r.push(i);
                    }
                }
                _ => {
                    kd_groups.push((slot.row as usize, vec![slot.teacher_prob]));
                    kd_rows.push(vec![i]);
                }
            }
        }
    }
    // Groups carry their first batch row (members are consecutive).
    let kd_groups = kd_groups
        .into_iter()
        .zip(&kd_rows)
        .map(|((_, probs), rows)| (rows[0], probs))
        .collect();
    let n_label = lab.iter().sum::<f32>() as f64;
    let n_rationale = rat.iter().sum::<f32>() as f64;
    let n_token_kd = tk_mask.iter().sum::<f32>() as f64;
    let n_on_policy = op_mask.iter().sum::<f32>() as f64;
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        attention: Tensor::from_vec(att, (b, t), device)?,
        reply: Tensor::from_vec(reply, (b, t), device)?,
        label_targets: Tensor::from_vec(lab, (b, t - 1), device)?,
        rationale_targets: Tensor::from_vec(rat, (b, t - 1), device)?,
        kd_targets: Tensor::from_vec(kd, (b, t - 1), device)?,
        n_label,
        n_rationale,
        kd_groups,
        token_kd_mask: Tensor::from_vec(tk_mask, (b, t - 1), device)?,
        token_kd_ids: Tensor::from_vec(tk_ids, (b, t - 1, k), device)?,
        token_kd_logprobs: Tensor::from_vec(tk_logp, (b, t - 1, k), device)?,
        n_token_kd,
        on_policy_mask: Tensor::from_vec(op_mask, (b, t - 1), device)?,
        n_on_policy,
        uld: match uld_at.len() {
            0 => None,
            n => Some((
                Tensor::from_vec(uld_at, n, device)?,
                Tensor::from_vec(uld_probs, (n, uld_k), device)?,
            )),
        },
        tokens: examples.iter().map(|e| e.ids.len()).sum(),
    })
}

/// Per-position negative log-likelihood of the next token, `[batch, seq-1]`. Computed over
/// all `seq` positions in one fused pass (the last position against a dummy target, then
/// dropped: its gradient is zero), so the logits are never copied.
pub fn token_nll(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let next = Tensor::cat(
        &[
            ids.narrow(1, 1, t - 1)?,
            Tensor::zeros((b, 1), DType::U32, ids.device())?,
        ],
        1,
    )?;
    let nll =
        crate::kernels::cross_entropy_rows(&logits.reshape((b * t, v))?, &next.flatten_all()?)?;
    Ok(nll.reshape((b, t))?.narrow(1, 0, t - 1)?)
}

pub struct LossParts {
    pub total: Tensor,
    pub label: Option<f64>,
    pub rationale: Option<f64>,
    pub kd: Option<f64>,
    pub kd_token: Option<f64>,
    pub on_policy: Option<f64>,
    /// Mutual learning's mimicry of the peer (or of the student, in the peer's parts).
    pub mutual: Option<f64>,
    /// Feature- and relation-based KD from the teacher's hidden states.
    pub feature: Option<f64>,
    pub relation: Option<f64>,
    /// Cross-tokenizer token KD at positions without an aligned teacher token.
    pub uld: Option<f64>,
}

impl LossParts {
    /// A loss of `total` with no term recorded yet (each `add_*` records its own).
    pub fn new(total: Tensor) -> LossParts {
        LossParts {
            total,
            label: None,
            rationale: None,
            kd: None,
            kd_token: None,
            on_policy: None,
            mutual: None,
            feature: None,
            relation: None,
            uld: None,
        }
    }
}

/// Add `w.kd_token_weight ×` token-level KD to the loss: at every position that predicts
/// a teacher token, `w.token_divergence` between the teacher's top-k distribution plus
/// its tail mass and the student's (`divergence`), temperature-scaled; mean over positions.
pub fn add_token_kd(
    parts: &mut LossParts,
    logits: &Tensor,
    batch: &Batch,
    w: &LossWeights,
) -> Result<()> {
    if w.kd_token_weight == 0.0 {
        return Ok(());
    }
    let mask = (&batch.token_kd_mask, batch.n_token_kd);
    parts.kd_token = add_divergence(
        parts,
        logits,
        batch,
        mask,
        w.token_divergence,
        w.kd_token_weight,
        w,
    )?;
    Ok(())
}

/// Add `w.kd_token_weight ×` the Universal Logit Distillation term (Boizard et al.,
/// 2024) at the batch's cross-tokenizer positions no teacher token aligns with: the L1
/// distance between the teacher's sorted top-k probabilities and the student's k largest
/// (its softmax over the whole vocabulary, sorted), mean over positions. The sort's order
/// is a value; the gradient flows through the gathered probabilities.
pub fn add_uld(
    parts: &mut LossParts,
    logits: &Tensor,
    batch: &Batch,
    w: &LossWeights,
) -> Result<()> {
    let Some((at, teacher)) = &batch.uld else {
        return Ok(());
    };
    if w.kd_token_weight == 0.0 {
        return Ok(());
    }
    let (b, t, v) = logits.dims3()?;
    let k = teacher.dim(1)?;
    let rows = logits
        .narrow(1, 0, t - 1)?
        .reshape((b * (t - 1), v))?
        .index_select(at, 0)?;
    let log_z = rows.log_sum_exp(D::Minus1)?.unsqueeze(1)?;
    let probs = rows.broadcast_sub(&log_z)?.exp()?;
    let order = probs
        .detach()
        .arg_sort_last_dim(false)?
        .narrow(1, 0, k)?
        .contiguous()?;
    let largest = probs.contiguous()?.gather(&order, D::Minus1)?;
    let term = (largest - teacher)?.abs()?.sum(D::Minus1)?.mean_all()?;
    parts.uld = Some(term.to_scalar::<f32>()? as f64);
    parts.total = (&parts.total + (term * w.kd_token_weight)?)?;
    Ok(())
}

/// Add `w.on_policy_weight ×` the on-policy term: at every position of the student's own
/// samples, `w.on_policy_divergence` between the live teacher's top-k (+ tail) and the
/// student, temperature-scaled; mean over positions.
pub fn add_on_policy(
    parts: &mut LossParts,
    logits: &Tensor,
    batch: &Batch,
    w: &LossWeights,
) -> Result<()> {
    let mask = (&batch.on_policy_mask, batch.n_on_policy);
    parts.on_policy = add_divergence(
        parts,
        logits,
        batch,
        mask,
        w.on_policy_divergence,
        w.on_policy_weight,
        w,
    )?;
    Ok(())
}

/// Add `weight ×` the mean `kind` divergence over the `(mask, n)` positions (the batch's
/// teacher alternatives there) to the total; its value, None without positions.
fn add_divergence(
    parts: &mut LossParts,
    logits: &Tensor,
    batch: &Batch,
    (mask, n): (&Tensor, f64),
    kind: Divergence,
    weight: f64,
    w: &LossWeights,
) -> Result<Option<f64>> {
    if n == 0.0 {
        return Ok(None);
    }
    let term = token_kd_divergence(
        logits,
        &batch.token_kd_ids,
        &batch.token_kd_logprobs,
        mask,
        n,
        (w.temperature, kind, w.jsd_beta),
    )?;
    let value = term.to_scalar::<f32>()? as f64;
    parts.total = (&parts.total + (term * weight)?)?;
    Ok(Some(value))
}

/// Mean over the `n` masked positions of the divergence (`(temperature, kind, β)`)
/// between the teacher's top-k (+ tail) and the student at the positions that predict
/// the next token. `logits` `[b, t, v]`; ids / logprobs `[b, t-1, k]`; mask `[b, t-1]`.
pub fn token_kd_divergence(
    logits: &Tensor,
    ids: &Tensor,
    teacher_logprobs: &Tensor,
    mask: &Tensor,
    n: f64,
    (temperature, kind, beta): (f64, Divergence, f64),
) -> Result<Tensor> {
    let (_, t, _) = logits.dims3()?;
    let student = logits.narrow(1, 0, t - 1)?;
    let d = divergence::per_position(&student, ids, teacher_logprobs, temperature, kind, beta)?;
    Ok(((d * mask)?.sum_all()? / n.max(1.0))?)
}

/// How the terms are weighed: `total = α·CE(label) + (1−α)·CE(rationale) + λ·KD`.
#[derive(Debug, Clone, Copy)]
pub struct LossWeights {
    pub alpha: f64,
    pub kd_weight: f64,
    /// Token-level KD (added by `add_token_kd`, which needs the logits).
    pub kd_token_weight: f64,
    pub temperature: f64,
    /// The answer-level KD divergence.
    pub divergence: Divergence,
    /// The token-level KD divergence.
    pub token_divergence: Divergence,
    pub jsd_beta: f64,
    /// The on-policy term (`[finetune.live_teacher]`): its weight and divergence.
    pub on_policy_weight: f64,
    pub on_policy_divergence: Divergence,
}

/// The whole training loss (DESIGN.md): the step-by-step CE terms plus λ times the mean
/// KD divergence over the batch's rows that carry a soft label. The student's probability
/// of an answer is its sequence log-probability (reply tokens and end-of-turn) in the
/// label view, renormalized over the row's answers, so teacher and student may use
/// different tokenizers.
pub fn total_loss(nll: &Tensor, batch: &Batch, w: &LossWeights) -> Result<LossParts> {
    let mut parts = step_by_step_loss(nll, batch, w.alpha)?;
    if w.kd_weight == 0.0 || batch.kd_groups.is_empty() {
        return Ok(parts);
    }
    let seq_logp = (nll * &batch.kd_targets)?.sum(D::Minus1)?.neg()?;
    let mut terms = vec![];
    for (start, probs) in &batch.kd_groups {
        let student = seq_logp.narrow(0, *start, probs.len())?;
        terms.push(kd_divergence(
            probs,
            &student,
            w.temperature,
            w.divergence,
            w.jsd_beta,
        )?);
    }
    let kd = (Tensor::stack(&terms, 0)?.sum_all()? / terms.len() as f64)?;
    parts.kd = Some(kd.to_scalar::<f32>()? as f64);
    parts.total = (&parts.total + (kd * w.kd_weight)?)?;
    Ok(parts)
}

/// α·CE(label) + (1−α)·CE(rationale), masked means over target tokens.
pub fn step_by_step_loss(nll: &Tensor, batch: &Batch, alpha: f64) -> Result<LossParts> {
    let masked_mean = |mask: &Tensor, n: f64| -> Result<Option<Tensor>> {
        if n == 0.0 {
            return Ok(None);
        }
        Ok(Some(((nll * mask)?.sum_all()? / n)?))
    };
    let label = masked_mean(&batch.label_targets, batch.n_label)?;
    let rationale = masked_mean(&batch.rationale_targets, batch.n_rationale)?;
    let total = match (&label, &rationale) {
        (Some(l), Some(r)) => ((l * alpha)? + (r * (1.0 - alpha))?)?,
        (Some(l), None) => l.clone(),
        (None, Some(r)) => r.clone(),
        (None, None) => Tensor::zeros((), DType::F32, nll.device())?,
    };
    let scalar = |t: &Option<Tensor>| -> Result<Option<f64>> {
        Ok(match t {
            Some(t) => Some(t.to_scalar::<f32>()? as f64),
            None => None,
        })
    };
    Ok(LossParts {
        label: scalar(&label)?,
        rationale: scalar(&rationale)?,
        ..LossParts::new(total)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORWARD: (f64, Divergence, f64) = (1.0, Divergence::ForwardKl, 0.5);

    #[test]
    fn token_kd_matches_a_hand_computed_kl() {
        // Uniform student logits over 4 tokens: q = 1/4 everywhere. Teacher top-2 at one
        // position: ids 0 and 1 with p = 0.75, 0.25 (given as log-probabilities; a padded
        // third slot must not count), so no tail. KL = 0.75 ln(0.75/0.25) +
        // 0.25 ln(0.25/0.25) = 0.75 ln 3 = 0.823959. The second position is masked out.
        let dev = Device::Cpu;
        let logits = Tensor::zeros((1, 3, 4), DType::F32, &dev).unwrap();
        let ids = Tensor::new(&[[[0u32, 1, 0], [2, 3, 0]]], &dev).unwrap();
        let lp = Tensor::new(
            &[[
                [0.75f32.ln(), 0.25f32.ln(), -1e9],
                [0.5f32.ln(), 0.5f32.ln(), -1e9],
            ]],
            &dev,
        )
        .unwrap();
        let mask = Tensor::new(&[[1f32, 0.]], &dev).unwrap();
        let kl = token_kd_divergence(&logits, &ids, &lp, &mask, 1.0, FORWARD)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((kl - 0.75 * 3f32.ln()).abs() < 1e-5, "{kl}");
        // A teacher with mass 0.6 on its two ids leaves a tail of 0.4, compared with the
        // student's 0.5 on the other ids: p = (0.45, 0.15, 0.4), q = (0.25, 0.25, 0.5).
        let lp = Tensor::new(
            &[[
                [0.45f32.ln(), 0.15f32.ln(), -1e9],
                [0.5f32.ln(), 0.5f32.ln(), -1e9],
            ]],
            &dev,
        )
        .unwrap();
        let kl2 = token_kd_divergence(&logits, &ids, &lp, &mask, 1.0, FORWARD)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = 0.45 * 1.8f32.ln() + 0.15 * 0.6f32.ln() + 0.4 * 0.8f32.ln();
        assert!((kl2 - want).abs() < 1e-5, "{kl2} vs {want}");
        // A student that matches the teacher on the top-k, with ~0 mass elsewhere (logits
        // ln 3, 0, −30, −30), has no divergence.
        let logits = Tensor::new(
            &[[
                [3f32.ln(), 0., -30., -30.],
                [0., 0., 0., 0.],
                [0., 0., 0., 0.],
            ]],
            &dev,
        )
        .unwrap();
        let ids = Tensor::new(&[[[0u32, 1, 0], [2, 3, 0]]], &dev).unwrap();
        let lp = Tensor::new(
            &[[
                [0.75f32.ln(), 0.25f32.ln(), -1e9],
                [0.5f32.ln(), 0.5f32.ln(), -1e9],
            ]],
            &dev,
        )
        .unwrap();
        let kl3 = token_kd_divergence(&logits, &ids, &lp, &mask, 1.0, FORWARD)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(kl3.abs() < 1e-5, "{kl3}");
        // Gradients reach the student's logits (gather and log-sum-exp have a backward).
        let var = candle_core::Var::zeros((1, 3, 4), DType::F32, &dev).unwrap();
        let kl = token_kd_divergence(
            var.as_tensor(),
            &ids,
            &lp,
            &mask,
            1.0,
            (2.0, Divergence::ForwardKl, 0.5),
        )
        .unwrap();
        let g = kl.backward().unwrap();
        let grad = g
            .get(var.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(grad.to_scalar::<f32>().unwrap() > 1e-3);
    }

    #[test]
    fn loss_weighs_views_by_alpha_over_target_tokens_only() {
        // Hand-computed: uniform logits over a vocabulary of 4 give every token
        // NLL = ln 4, so each view's masked mean is ln 4 and the total is ln 4 for any α.
        // Then doubling one position's loss shows the masks and weights at work.
        let dev = Device::Cpu;
        let ex = vec![
            Example {
                kind: ExampleKind::Label,
                ids: vec![0, 1, 2],
                target: vec![0, 1, 1],
                kd: None,
                truncated: false,
                token_topk: vec![],
                token_uld: vec![],
                row: 0,
            },
            Example {
                kind: ExampleKind::Rationale,
                ids: vec![0, 3],
                target: vec![0, 1],
                kd: None,
                truncated: false,
                token_topk: vec![],
                token_uld: vec![],
                row: 0,
            },
        ];
        let batch = make_batch(&ex, 0, &dev).unwrap();
        let logits = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
        let nll = token_nll(&logits, &batch.ids).unwrap();
        let parts = step_by_step_loss(&nll, &batch, 0.3).unwrap();
        let ln4 = 4f64.ln();
        assert!((parts.total.to_scalar::<f32>().unwrap() as f64 - ln4).abs() < 1e-5);
        // Now give the rationale target (row 1, position 0) an NLL of 2·ln 4 by hand.
        let nll2 =
            Tensor::new(&[[ln4 as f32, ln4 as f32], [2.0 * ln4 as f32, 99.0]], &dev).unwrap();
        let parts = step_by_step_loss(&nll2, &batch, 0.3).unwrap();
        // label: mean(ln4, ln4) = ln4; rationale: 2 ln4 (the padded 99 is masked out).
        let want = 0.3 * ln4 + 0.7 * 2.0 * ln4;
        assert!((parts.total.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5);
        assert_eq!(batch.n_label, 2.0);
        assert_eq!(batch.n_rationale, 1.0);
    }
}

/// KD loss for one row over its answers: `teacher` holds the teacher's probabilities (any
/// scale; renormalized here), `student_logp` the student's log-probability of each answer
/// sequence `[n]`. Both are tempered (p ∝ p^(1/T), q = softmax(logp / T)) and the
/// divergence is multiplied by T², so its gradients keep their size as T changes (Hinton
/// et al., 2015). Answers the teacher gives probability 0 get 1e-8 before renormalizing.
pub fn kd_divergence(
    teacher: &[f64],
    student_logp: &Tensor,
    temperature: f64,
    kind: Divergence,
    beta: f64,
) -> Result<Tensor> {
    let device = student_logp.device();
    let t = temperature.max(1e-3);
    let tempered: Vec<f64> = teacher.iter().map(|p| (p.max(1e-8)).ln() / t).collect();
    let max = tempered.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = tempered.iter().map(|x| (x - max).exp()).sum();
    let log_p: Vec<f32> = tempered.iter().map(|x| (x - max - z.ln()) as f32).collect();
    let log_p = Tensor::new(log_p.as_slice(), device)?;
    let p = log_p.exp()?;
    let log_q = candle_nn::ops::log_softmax(&(student_logp / t)?, D::Minus1)?;
    let q = log_q.exp()?;
    let kl = |a: &Tensor, log_a: &Tensor, log_b: &Tensor| -> Result<Tensor> {
        Ok((a * (log_a - log_b)?)?.sum_all()?)
    };
    let d = match kind {
        Divergence::ForwardKl => kl(&p, &log_p, &log_q)?,
        Divergence::ReverseKl => kl(&q, &log_q, &log_p)?,
        Divergence::Jsd => {
            let m = ((&p * beta)? + (&q * (1.0 - beta))?)?;
            let log_m = m.log()?;
            ((kl(&p, &log_p, &log_m)? * beta)? + (kl(&q, &log_q, &log_m)? * (1.0 - beta))?)?
        }
    };
    Ok((d * (t * t))?)
}

#[cfg(test)]
mod kd_tests {
    use super::*;

    fn student(q: &[f64]) -> Tensor {
        // log-probabilities of the student's answers (softmax of these gives q back)
        let v: Vec<f32> = q.iter().map(|x| x.ln() as f32).collect();
        Tensor::new(v.as_slice(), &Device::Cpu).unwrap()
    }

    fn value(t: Tensor) -> f64 {
        t.to_scalar::<f32>().unwrap() as f64
    }

    // Hand-computed with p = (0.5, 0.5), q = (0.25, 0.75):
    // KL(p‖q) = 0.5·ln(0.5/0.25) + 0.5·ln(0.5/0.75) = 0.5·(0.693147 − 0.405465) = 0.143841
    // KL(q‖p) = 0.25·ln(0.25/0.5) + 0.75·ln(0.75/0.5) = −0.173287 + 0.304099 = 0.130812
    // m = (0.375, 0.625): KL(p‖m) = 0.5·ln(0.5/0.375) + 0.5·ln(0.5/0.625) = 0.032269,
    // KL(q‖m) = 0.25·ln(0.25/0.375) + 0.75·ln(0.75/0.625) = 0.035372, JSD(0.5) = 0.033820
    #[test]
    fn divergences_match_hand_computed_values() {
        let q = student(&[0.25, 0.75]);
        let p = [0.5, 0.5];
        let f = value(kd_divergence(&p, &q, 1.0, Divergence::ForwardKl, 0.5).unwrap());
        let r = value(kd_divergence(&p, &q, 1.0, Divergence::ReverseKl, 0.5).unwrap());
        let j = value(kd_divergence(&p, &q, 1.0, Divergence::Jsd, 0.5).unwrap());
        assert!((f - 0.143841).abs() < 1e-5, "{f}");
        assert!((r - 0.130812).abs() < 1e-5, "{r}");
        assert!((j - 0.033820).abs() < 1e-5, "{j}");
        // The teacher's probabilities may come unnormalized (label scores sum to ≤ 1).
        let f2 = value(kd_divergence(&[0.2, 0.2], &q, 1.0, Divergence::ForwardKl, 0.5).unwrap());
        assert!((f2 - f).abs() < 1e-5);
    }

    #[test]
    fn temperature_softens_both_sides_and_scales_by_t_squared() {
        // T = 2: p ∝ (0.8, 0.2)^(1/2) = (2/3, 1/3); q ∝ (0.5, 0.5)^(1/2) = (0.5, 0.5).
        // KL(p‖q) = (2/3)·ln(4/3) + (1/3)·ln(2/3) = 0.191788 − 0.135155 = 0.056633; × 4.
        let q = student(&[0.5, 0.5]);
        let f = value(kd_divergence(&[0.8, 0.2], &q, 2.0, Divergence::ForwardKl, 0.5).unwrap());
        assert!((f - 4.0 * 0.056633).abs() < 1e-4, "{f}");
        // Equal distributions: no loss.
        let zero = value(kd_divergence(&[0.5, 0.5], &q, 1.0, Divergence::ForwardKl, 0.5).unwrap());
        assert!(zero.abs() < 1e-6);
    }
}

#[cfg(test)]
mod total_tests {
    use super::*;
    use crate::finetune::data::KdSlot;

    #[test]
    fn kd_term_joins_the_ce_terms_with_weight_lambda() {
        // One label example and the row's two answers as KD examples. Uniform logits over 4
        // tokens: every answer sequence (one target token) has log-probability ln ¼, so the
        // student's q = (½, ½). Teacher p = (0.75, 0.25):
        // KL(p‖q) = 0.75·ln 1.5 + 0.25·ln 0.5 = 0.304099 − 0.173287 = 0.130812.
        // total = CE(label) + λ·KL = ln 4 + 0.5 · 0.130812 (α = 1: no rationale).
        let dev = Device::Cpu;
        let kd = |id: u32, p: f64| Example {
            kind: ExampleKind::Kd,
            ids: vec![0, id],
            target: vec![0, 1],
            kd: Some(KdSlot {
                row: 7,
                teacher_prob: p,
            }),
            truncated: false,
            token_topk: vec![],
            token_uld: vec![],
            row: 0,
        };
        let ex = vec![
            Example {
                kind: ExampleKind::Label,
                ids: vec![0, 1],
                target: vec![0, 1],
                kd: None,
                truncated: false,
                token_topk: vec![],
                token_uld: vec![],
                row: 0,
            },
            kd(1, 0.75),
            kd(2, 0.25),
        ];
        let batch = make_batch(&ex, 0, &dev).unwrap();
        assert_eq!(batch.kd_groups, vec![(1, vec![0.75, 0.25])]);
        let logits = Tensor::zeros((3, 2, 4), DType::F32, &dev).unwrap();
        let nll = token_nll(&logits, &batch.ids).unwrap();
        let w = LossWeights {
            alpha: 1.0,
            kd_weight: 0.5,
            kd_token_weight: 0.0,
            temperature: 1.0,
            divergence: Divergence::ForwardKl,
            token_divergence: Divergence::ForwardKl,
            jsd_beta: 0.5,
            on_policy_weight: 0.0,
            on_policy_divergence: Divergence::ReverseKl,
        };
        let parts = total_loss(&nll, &batch, &w).unwrap();
        assert!((parts.kd.unwrap() - 0.130812).abs() < 1e-5);
        let want = 4f64.ln() + 0.5 * 0.130812;
        assert!((parts.total.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5);
        assert!(
            (parts.label.unwrap() - 4f64.ln()).abs() < 1e-5,
            "KD rows are not in the CE"
        );
    }

    #[test]
    fn uld_compares_sorted_probabilities_at_its_positions_only() {
        // One token-KD example, two reply positions: the first has mapped alternatives
        // (ordinary token KD), the second only the teacher's sorted probabilities (0.7,
        // 0.2). Student logits at that position: ln(1, 2, 5, 2) → p = (.1, .2, .5, .2);
        // its two largest are .5 and .2: |.5 − .7| + |.2 − .2| = 0.2.
        let dev = Device::Cpu;
        let ex = vec![Example {
            kind: ExampleKind::TokenKd,
            ids: vec![3, 1, 2],
            target: vec![0, 1, 1],
            kd: None,
            truncated: false,
            token_topk: vec![(vec![1], vec![0.5f32.ln()]), (vec![], vec![])],
            token_uld: vec![(1, vec![0.7, 0.2])],
            row: 0,
        }];
        let batch = make_batch(&ex, 0, &dev).unwrap();
        assert_eq!(
            batch.n_token_kd, 1.0,
            "the ULD position is not a token-KD position"
        );
        let logits = Tensor::new(
            &[[
                [0f32, 0., 0., 0.],
                [1f32.ln(), 2f32.ln(), 5f32.ln(), 2f32.ln()],
                [0., 0., 0., 0.],
            ]],
            &dev,
        )
        .unwrap();
        let w = LossWeights {
            alpha: 1.0,
            kd_weight: 0.0,
            kd_token_weight: 2.0,
            temperature: 1.0,
            divergence: Divergence::ForwardKl,
            token_divergence: Divergence::ForwardKl,
            jsd_beta: 0.5,
            on_policy_weight: 0.0,
            on_policy_divergence: Divergence::ReverseKl,
        };
        let mut parts = total_loss(&token_nll(&logits, &batch.ids).unwrap(), &batch, &w).unwrap();
        let before = parts.total.to_scalar::<f32>().unwrap();
        add_uld(&mut parts, &logits, &batch, &w).unwrap();
        assert!((parts.uld.unwrap() - 0.2).abs() < 1e-6, "{:?}", parts.uld);
        let after = parts.total.to_scalar::<f32>().unwrap();
        assert!(
            (after - before - 0.4).abs() < 1e-5,
            "weighted by kd_token_weight"
        );
    }

    #[test]
    fn on_policy_tokens_get_their_own_term_and_scored_rationales_keep_their_ce() {
        // Row 0: a rationale the live teacher scored (online): CE and token KD at its two
        // reply positions. Row 1: an on-policy sample: only the on-policy term.
        let dev = Device::Cpu;
        let top = |id: u32| (vec![id, (id + 1) % 4], vec![0.9f32.ln(), 0.05f32.ln()]);
        let ex = vec![
            Example {
                kind: ExampleKind::Rationale,
                ids: vec![1, 2, 0],
                target: vec![0, 1, 1],
                kd: None,
                truncated: false,
                token_topk: vec![top(2), top(0)],
                token_uld: vec![],
                row: 0,
            },
            Example {
                kind: ExampleKind::OnPolicy,
                ids: vec![1, 3, 2],
                target: vec![0, 1, 1],
                kd: None,
                truncated: false,
                token_topk: vec![top(3), top(2)],
                token_uld: vec![],
                row: 1,
            },
        ];
        let batch = make_batch(&ex, 0, &dev).unwrap();
        let rows = |t: &Tensor| t.to_vec2::<f32>().unwrap();
        assert_eq!(rows(&batch.rationale_targets), [[1., 1.], [0., 0.]]);
        assert_eq!(rows(&batch.token_kd_mask), [[1., 1.], [0., 0.]]);
        assert_eq!(rows(&batch.on_policy_mask), [[0., 0.], [1., 1.]]);
        assert_eq!((batch.n_token_kd, batch.n_on_policy), (2.0, 2.0));
        assert_eq!(
            batch.token_kd_ids.to_vec3::<u32>().unwrap()[1],
            [[3, 0], [2, 3]]
        );

        // Uniform logits over 4 ids, teacher (0.9, 0.05, tail 0.05) at each on-policy
        // position: reverse KL = Σ q ln(q/p) = 0.25 ln(0.25/0.9) + 0.25 ln(0.25/0.05)
        // + 0.5 ln(0.5/0.05).
        let logits = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
        let nll = token_nll(&logits, &batch.ids).unwrap();
        let w = LossWeights {
            alpha: 0.0,
            kd_weight: 0.0,
            kd_token_weight: 0.0,
            temperature: 1.0,
            divergence: Divergence::ForwardKl,
            token_divergence: Divergence::ForwardKl,
            jsd_beta: 0.5,
            on_policy_weight: 2.0,
            on_policy_divergence: Divergence::ReverseKl,
        };
        let mut parts = total_loss(&nll, &batch, &w).unwrap();
        add_on_policy(&mut parts, &logits, &batch, &w).unwrap();
        let want = 0.25 * (0.25f64 / 0.9).ln() + 0.25 * 5f64.ln() + 0.5 * 10f64.ln();
        assert!(
            (parts.on_policy.unwrap() - want).abs() < 1e-5,
            "{:?}",
            parts.on_policy
        );
        let total = parts.total.to_scalar::<f32>().unwrap() as f64;
        assert!((total - (4f64.ln() + 2.0 * want)).abs() < 1e-5, "{total}");
    }
}
