//! The step-by-step loss:
//!
//! `total = α·CE(label view) + (1−α)·CE(rationale view)`
//!
//! where each CE is the mean next-token cross-entropy over that view's target tokens
//! (the reply and its end-of-turn token; the prompt is masked out). A view absent from
//! the batch contributes nothing, and the other view then carries the whole weight.

use super::data::{Example, View};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

/// A right-padded batch: ids, attention mask and target mask, all `[batch, seq]`.
pub struct Batch {
    pub ids: Tensor,
    pub attention: Tensor,
    /// Target masks per view, shifted to align with next-token predictions `[batch, seq-1]`.
    pub label_targets: Tensor,
    pub rationale_targets: Tensor,
    pub n_label: f64,
    pub n_rationale: f64,
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
    let (mut lab, mut rat) = (vec![0f32; b * (t - 1)], vec![0f32; b * (t - 1)]);
    for (i, e) in examples.iter().enumerate() {
        for (j, &id) in e.ids.iter().enumerate() {
            ids[i * t + j] = id;
            att[i * t + j] = 1.0;
            // Position j-1 predicts token j.
            if j > 0 && e.target[j] == 1 {
                let m = if e.view == View::Label {
                    &mut lab
                } else {
                    &mut rat
                };
                m[i * (t - 1) + j - 1] = 1.0;
            }
        }
    }
    let n_label = lab.iter().sum::<f32>() as f64;
    let n_rationale = rat.iter().sum::<f32>() as f64;
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        attention: Tensor::from_vec(att, (b, t), device)?,
        label_targets: Tensor::from_vec(lab, (b, t - 1), device)?,
        rationale_targets: Tensor::from_vec(rat, (b, t - 1), device)?,
        n_label,
        n_rationale,
        tokens: examples.iter().map(|e| e.ids.len()).sum(),
    })
}

/// Per-position negative log-likelihood of the next token, `[batch, seq-1]`.
pub fn token_nll(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (_, t, _) = logits.dims3()?;
    let pred = logits.narrow(1, 0, t - 1)?;
    let next = ids.narrow(1, 1, t - 1)?.contiguous()?;
    let logp = candle_nn::ops::log_softmax(&pred, D::Minus1)?;
    let picked = logp
        .gather(&next.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    Ok(picked.neg()?)
}

pub struct LossParts {
    pub total: Tensor,
    pub label: Option<f64>,
    pub rationale: Option<f64>,
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
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_weighs_views_by_alpha_over_target_tokens_only() {
        // Hand-computed: uniform logits over a vocabulary of 4 give every token
        // NLL = ln 4, so each view's masked mean is ln 4 and the total is ln 4 for any α.
        // Then doubling one position's loss shows the masks and weights at work.
        let dev = Device::Cpu;
        let ex = vec![
            Example {
                view: View::Label,
                ids: vec![0, 1, 2],
                target: vec![0, 1, 1],
            },
            Example {
                view: View::Rationale,
                ids: vec![0, 3],
                target: vec![0, 1],
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

/// Which divergence the KD term measures between the teacher's distribution p and the
/// student's q (both over the same answers, both at temperature T).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Divergence {
    /// KL(p ‖ q): the student covers every answer the teacher gives weight to (Hinton et al.).
    ForwardKl,
    /// KL(q ‖ p): the student concentrates on the teacher's main answers.
    ReverseKl,
    /// β·KL(p ‖ m) + (1−β)·KL(q ‖ m) with m = β·p + (1−β)·q (generalized JSD, GKD).
    Jsd,
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
