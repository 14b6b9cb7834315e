//! Token-level divergences between a teacher known by its top-k log-probabilities and
//! a student known by its logits over the whole vocabulary: the distributions compared
//! are the k ids plus one category for the rest of the vocabulary (the "tail": the mass
//! the teacher puts outside its k ids is 1 − Σ of theirs, the student's is what its
//! softmax gives the other ids). With k = the vocabulary (a live teacher's full
//! distribution) the tail is empty and the divergence is the exact one.
//!
//! Temperature T softens both sides before comparing: the student's logits are divided
//! by T over the whole vocabulary; the teacher's k + 1 log-probabilities are divided by
//! T and renormalized (its tail is one category: how the tail mass spreads is unknown,
//! so it is tempered as a whole). The result is multiplied by T², so gradients keep their
//! size as T changes (Hinton et al., 2015).
//!
//! The divergences (`Divergence`, the same three as the answer-level KD): forward KL(p ‖ q)
//! (supervised KD), reverse KL(q ‖ p) (MiniLLM, Gu et al. 2024), and the generalized JSD
//! of GKD (Agarwal et al. 2024), β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = β·p + (1 − β)·q.
//!
//! Only candle's composed ops are used (each has a backward pass): its fused softmax and
//! norm ops drop gradients silently (docs/STACK.md).

use crate::config::Divergence;
use candle_core::{DType, Result, Tensor, D};

/// A teacher log-probability at or below this marks a padding entry (no id there).
pub const PADDING_LOGPROB: f64 = -1e8;

/// The least tail mass, so that the log of a tail the top-k fill (up to rounding) stays
/// finite.
const TAIL_FLOOR: f64 = 1e-7;

/// The student's and teacher's top-k-plus-tail distributions compared at every position,
/// `[b, t]`: `student_logits` `[b, t, v]`; `ids` `[b, t, k]` (u32) and `teacher_logprobs`
/// `[b, t, k]` (natural log, at temperature 1; padding entries ≤ `PADDING_LOGPROB`, any id).
pub fn per_position(
    student_logits: &Tensor,
    ids: &Tensor,
    teacher_logprobs: &Tensor,
    temperature: f64,
    kind: Divergence,
    beta: f64,
) -> Result<Tensor> {
    let t = temperature.max(1e-3);
    let dtype = student_logits.dtype();
    let teacher_logprobs = teacher_logprobs.to_dtype(dtype)?;
    // 1 where the teacher has an id, 0 on padding.
    let valid = teacher_logprobs.ge(PADDING_LOGPROB)?.to_dtype(dtype)?;
    let padding = (1.0 - &valid)?;

    // Student: log-softmax over the vocabulary at T, read at the k ids; padding entries
    // get the teacher's padding value (no mass, no gradient); the tail is the rest.
    let z = (student_logits / t)?;
    let log_z = z.log_sum_exp(D::Minus1)?.unsqueeze(D::Minus1)?;
    let log_q_top = z
        .contiguous()?
        .gather(&ids.contiguous()?, D::Minus1)?
        .broadcast_sub(&log_z)?;
    let log_q_top = ((log_q_top * &valid)? + (&padding * PADDING_LOGPROB)?)?;
    let q_tail = (1.0 - log_q_top.exp()?.sum_keepdim(D::Minus1)?)?;
    let log_q_tail = q_tail.maximum(TAIL_FLOOR)?.log()?;
    let log_q = Tensor::cat(&[&log_q_top, &log_q_tail], D::Minus1)?;

    // Teacher: its k log-probabilities and the log of its tail mass, tempered as k + 1
    // categories. No gradient flows here.
    let p_tail = (1.0 - (teacher_logprobs.exp()? * &valid)?.sum_keepdim(D::Minus1)?)?;
    let log_p_tail = p_tail.maximum(TAIL_FLOOR)?.log()?;
    let a = (Tensor::cat(&[&teacher_logprobs, &log_p_tail], D::Minus1)? / t)?;
    let log_p = a
        .broadcast_sub(&a.log_sum_exp(D::Minus1)?.unsqueeze(D::Minus1)?)?
        .detach();

    let (p, q) = (log_p.exp()?, log_q.exp()?);
    let kl = |a: &Tensor, log_a: &Tensor, log_b: &Tensor| (a * (log_a - log_b)?)?.sum(D::Minus1);
    let d = match kind {
        Divergence::ForwardKl => kl(&p, &log_p, &log_q)?,
        Divergence::ReverseKl => kl(&q, &log_q, &log_p)?,
        Divergence::Jsd => {
            let m = ((&p * beta)? + (&q * (1.0 - beta))?)?;
            // Padding categories have m = 0: the floor keeps their log finite (their
            // terms are 0 · finite).
            let log_m = (m + 1e-30)?.log()?;
            ((kl(&p, &log_p, &log_m)? * beta)? + (kl(&q, &log_q, &log_m)? * (1.0 - beta))?)?
        }
    };
    d * (t * t)
}

/// Mean of `per_position` over the positions `mask` (`[b, t]`, 1 or 0) marks; 0 when it
/// marks none.
pub fn masked_mean(per_position: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(per_position.dtype())?;
    let n = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    (per_position * &mask)?.sum_all()? / n.max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    const DEV: Device = Device::Cpu;

    /// One position: student logits over a vocabulary of 5, teacher top-2 on ids 3 and 1.
    fn case() -> (Vec<f64>, Vec<u32>, Vec<f64>) {
        let logits = vec![0.3, -1.2, 0.8, 2.0, -0.4];
        let ids = vec![3, 1];
        let teacher = vec![0.6f64.ln(), 0.25f64.ln()];
        (logits, ids, teacher)
    }

    fn run(
        logits: &[f64],
        ids: &[u32],
        teacher: &[f64],
        t: f64,
        kind: Divergence,
        beta: f64,
    ) -> f64 {
        let (v, k) = (logits.len(), ids.len());
        let l = Tensor::from_slice(logits, (1, 1, v), &DEV).unwrap();
        let i = Tensor::from_slice(ids, (1, 1, k), &DEV).unwrap();
        let p = Tensor::from_slice(teacher, (1, 1, k), &DEV).unwrap();
        per_position(&l, &i, &p, t, kind, beta)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0]
    }

    /// The same divergence computed by hand, in f64, on the k + 1 categories.
    fn by_hand(
        logits: &[f64],
        ids: &[u32],
        teacher: &[f64],
        t: f64,
        kind: Divergence,
        beta: f64,
    ) -> f64 {
        let z: Vec<f64> = logits.iter().map(|x| x / t).collect();
        let lse = z.iter().map(|x| x.exp()).sum::<f64>().ln();
        let mut q: Vec<f64> = ids.iter().map(|&i| (z[i as usize] - lse).exp()).collect();
        q.push(1.0 - q.iter().sum::<f64>());
        let mut a: Vec<f64> = teacher.to_vec();
        a.push((1.0 - teacher.iter().map(|x| x.exp()).sum::<f64>()).ln());
        let a: Vec<f64> = a.iter().map(|x| x / t).collect();
        let lse_a = a.iter().map(|x| x.exp()).sum::<f64>().ln();
        let p: Vec<f64> = a.iter().map(|x| (x - lse_a).exp()).collect();
        let kl =
            |x: &[f64], y: &[f64]| -> f64 { x.iter().zip(y).map(|(x, y)| x * (x / y).ln()).sum() };
        let d = match kind {
            Divergence::ForwardKl => kl(&p, &q),
            Divergence::ReverseKl => kl(&q, &p),
            Divergence::Jsd => {
                let m: Vec<f64> = p
                    .iter()
                    .zip(&q)
                    .map(|(p, q)| beta * p + (1.0 - beta) * q)
                    .collect();
                beta * kl(&p, &m) + (1.0 - beta) * kl(&q, &m)
            }
        };
        d * t * t
    }

    const KINDS: [(Divergence, f64); 4] = [
        (Divergence::ForwardKl, 0.0),
        (Divergence::ReverseKl, 0.0),
        (Divergence::Jsd, 0.5),
        (Divergence::Jsd, 0.1),
    ];

    #[test]
    fn divergences_over_the_top_k_and_the_tail_match_hand_computed_values() {
        let (logits, ids, teacher) = case();
        for t in [1.0, 2.0] {
            for (kind, beta) in KINDS {
                let got = run(&logits, &ids, &teacher, t, kind, beta);
                let want = by_hand(&logits, &ids, &teacher, t, kind, beta);
                assert!(
                    (got - want).abs() < 1e-6 * want.abs().max(1e-3),
                    "{kind:?} β={beta} T={t}: {got} vs {want}"
                );
                assert!(
                    got > 0.0,
                    "{kind:?}: a divergence between different distributions"
                );
            }
        }
        // Forward KL by hand for T = 1, written out: p = (0.6, 0.25, 0.15);
        // q = softmax(logits) at ids 3, 1 and the rest.
        let e: Vec<f64> = logits.iter().map(|x: &f64| x.exp()).collect();
        let s: f64 = e.iter().sum();
        let q = [e[3] / s, e[1] / s, 1.0 - (e[3] + e[1]) / s];
        let want = 0.6 * (0.6 / q[0]).ln() + 0.25 * (0.25 / q[1]).ln() + 0.15 * (0.15 / q[2]).ln();
        let got = run(&logits, &ids, &teacher, 1.0, Divergence::ForwardKl, 0.0);
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }

    #[test]
    fn equal_distributions_have_no_divergence_and_padding_counts_for_nothing() {
        // The teacher's top-2 are exactly the student's probabilities of ids 3 and 1.
        let (logits, ids, _) = case();
        let s: f64 = logits.iter().map(|x| x.exp()).sum();
        let teacher: Vec<f64> = ids.iter().map(|&i| logits[i as usize] - s.ln()).collect();
        for (kind, beta) in KINDS {
            let d = run(&logits, &ids, &teacher, 1.0, kind, beta);
            assert!(d.abs() < 1e-9, "{kind:?}: {d}");
        }
        // A padding entry (id 0, log-probability −1e9) changes nothing.
        let (logits, ids, teacher) = case();
        let (padded_ids, padded) = (
            [ids.clone(), vec![0]].concat(),
            [teacher.clone(), vec![-1e9]].concat(),
        );
        for t in [1.0, 2.0] {
            for (kind, beta) in KINDS {
                let a = run(&logits, &ids, &teacher, t, kind, beta);
                let b = run(&logits, &padded_ids, &padded, t, kind, beta);
                assert!((a - b).abs() < 1e-9, "{kind:?} T={t}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn the_full_distribution_gives_the_exact_divergence() {
        // k = the vocabulary: no tail, the plain divergence of the two softmaxes.
        let (logits, _, _) = case();
        let teacher_logits = [1.0, 0.2, -0.5, 0.7, 0.0];
        let s: f64 = teacher_logits.iter().map(|x: &f64| x.exp()).sum();
        let teacher: Vec<f64> = teacher_logits.iter().map(|x| x - s.ln()).collect();
        let ids: Vec<u32> = (0..5).collect();
        let sq: f64 = logits.iter().map(|x| x.exp()).sum();
        let q: Vec<f64> = logits.iter().map(|x| x.exp() / sq).collect();
        let p: Vec<f64> = teacher.iter().map(|x| x.exp()).collect();
        let reverse: f64 = q.iter().zip(&p).map(|(q, p)| q * (q / p).ln()).sum();
        let got = run(&logits, &ids, &teacher, 1.0, Divergence::ReverseKl, 0.0);
        // The tail floor (1e-7) is the only difference.
        assert!((got - reverse).abs() < 1e-5, "{got} vs {reverse}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        // Two positions, a vocabulary of 5, top-3 with one padding entry at the second.
        let logits = vec![0.3, -1.2, 0.8, 2.0, -0.4, -0.1, 0.9, 0.4, -2.0, 1.1];
        let ids: Vec<u32> = vec![3, 1, 2, 1, 4, 0];
        let teacher = vec![
            0.5f64.ln(),
            0.2f64.ln(),
            0.1f64.ln(),
            0.45f64.ln(),
            0.35f64.ln(),
            -1e9,
        ];
        let mask = Tensor::new(&[[1.0f64, 1.0]], &DEV).unwrap();
        let i = Tensor::from_slice(&ids, (1, 2, 3), &DEV).unwrap();
        let p = Tensor::from_slice(&teacher, (1, 2, 3), &DEV).unwrap();
        let loss = |l: &Tensor, t: f64, kind: Divergence, beta: f64| {
            masked_mean(&per_position(l, &i, &p, t, kind, beta).unwrap(), &mask).unwrap()
        };
        for t in [1.0, 2.0] {
            for (kind, beta) in KINDS {
                let var = Var::from_tensor(&Tensor::from_slice(&logits, (1, 2, 5), &DEV).unwrap())
                    .unwrap();
                let grads = loss(var.as_tensor(), t, kind, beta).backward().unwrap();
                let g = grads
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                let h = 1e-6;
                for j in 0..logits.len() {
                    let at = |d: f64| {
                        let mut l = logits.clone();
                        l[j] += d;
                        let l = Tensor::from_slice(&l, (1, 2, 5), &DEV).unwrap();
                        loss(&l, t, kind, beta).to_scalar::<f64>().unwrap()
                    };
                    let numeric = (at(h) - at(-h)) / (2.0 * h);
                    assert!(
                        (g[j] - numeric).abs() < 1e-6,
                        "{kind:?} β={beta} T={t}, logit {j}: {} vs {numeric}",
                        g[j]
                    );
                }
            }
        }
    }
}
