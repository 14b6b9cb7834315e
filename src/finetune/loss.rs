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
