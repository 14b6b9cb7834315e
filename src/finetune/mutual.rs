//! Deep mutual learning (`[finetune.mutual]`; Zhang et al., 2018): a peer student trains
//! on the same micro-batches as the student, and each learns from the other.
//!
//! Per micro-batch, after both forward passes: at every target token of the label and
//! rationale views, each side's top-k natural-log probabilities are read off its logits
//! as values (no gradient crosses from one model to the other); each side's loss is its
//! own copy of the whole training loss plus `weight ×` the divergence between the other's
//! top-k (+ tail, as a teacher's: `finetune::divergence`) and its own distribution; each
//! backward pass feeds its own optimizer. The peer's LoRA adapters and dropout masks have
//! their own seeds, so a peer of the student's own model starts equal in output (LoRA's B
//! is zero) and drifts apart as the two train.
//!
//! The peer's weights and optimizer moments go into every checkpoint next to the
//! student's, so a resumed run continues both.

use super::data::tokenization_difference;
use super::loss::{token_kd_divergence, Batch, LossParts, LossWeights};
use super::optim::AdamW;
use crate::config::{Config, MutualConfig};
use crate::io::atomic::seed_from_text;
use crate::llama::{self, Decoder, LoadedModel};
use crate::records::CuratedRow;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};

/// The peer student and its optimizer.
pub struct Peer {
    pub model: Decoder,
    pub opt: AdamW,
    pub cfg: MutualConfig,
    /// The path it was loaded from (for messages and the manifest).
    pub path: String,
    seed: u64,
}

impl Peer {
    /// Load the peer the config names (or another copy of the student's model), built
    /// for training as the student is. None without the section.
    pub fn open(
        cfg: &Config,
        student: &LoadedModel,
        train: &[CuratedRow],
        device: &Device,
    ) -> Result<Option<Peer>> {
        let Some(m) = cfg.finetune.mutual.clone() else {
            return Ok(None);
        };
        let path = m.peer.clone().unwrap_or_else(|| cfg.student.model.clone());
        let mut loaded = llama::load(&path, device).with_context(|| {
            format!("cannot load the peer {path} ([finetune.mutual] peer, else [student] model)")
        })?;
        if let Some((id, a, b)) = tokenization_difference(&loaded, student, train)? {
            bail!(
                "the peer {path} tokenizes row {id:?} differently from the student ({a} vs {b} tokens): mutual learning compares the two token by token and needs one tokenizer\nhint: use a peer of the student's family, or leave [finetune.mutual] peer unset (another copy of the student)"
            );
        }
        let lora_seed = seed_from_text(&format!("peer-lora:{}", cfg.seed));
        let model = super::trainable_decoder(&loaded, device, &cfg.finetune, lora_seed)?;
        loaded.weights.clear();
        let opt = AdamW::new(model.vars.clone(), cfg.finetune.weight_decay)?;
        eprintln!(
            "finetune: mutual learning with the peer {path} (weight {}, {:?}, top-{} + tail)",
            m.weight, m.divergence, m.top_k
        );
        Ok(Some(Peer {
            model,
            opt,
            cfg: m,
            path,
            seed: cfg.seed,
        }))
    }

    /// The peer's LoRA dropout masks of one micro-batch: its own, from the run seed and
    /// the micro-batch's place in the run.
    pub fn dropout_key(&self, step: usize, micro: usize) -> u64 {
        seed_from_text(&format!("peer-dropout:{}:{step}:{micro}", self.seed))
    }

    /// One micro-batch beside the student, whose `logits` and loss `parts` it was given:
    /// the peer's forward pass (dropout masks from `dropout_key`) and its own copy of the
    /// loss, then each side's mimicry of the other (the student's added to `parts`). The
    /// peer's loss parts, for its backward pass.
    pub fn learn_with(
        &self,
        batch: &Batch,
        (logits, parts): (&Tensor, &mut LossParts),
        weights: &LossWeights,
        dropout_key: u64,
    ) -> Result<LossParts> {
        let theirs = super::forward(&self.model, batch, Some(dropout_key))?;
        let mut their_parts = super::batch_loss(&theirs, batch, weights)?;
        let (mask, n) = mimicry_positions(batch)?;
        let vocab = logits.dim(2)?.min(theirs.dim(2)?);
        let mine = top_k_at(logits, &mask, self.cfg.top_k, vocab)?;
        let other = top_k_at(&theirs, &mask, self.cfg.top_k, vocab)?;
        let beta = weights.jsd_beta;
        add_mimicry(parts, logits, &other, (&mask, n), &self.cfg, beta)?;
        add_mimicry(
            &mut their_parts,
            &theirs,
            &mine,
            (&mask, n),
            &self.cfg,
            beta,
        )?;
        Ok(their_parts)
    }
}

/// One side's top-k at the batch's target positions, as a teacher's alternatives are
/// given to the divergence: ids and natural-log probabilities `[b, t-1, k]`.
pub struct TopK {
    pub ids: Tensor,
    pub logprobs: Tensor,
}

/// The positions both sides learn from each other at: every target token of the label
/// and rationale views `[b, t-1]`, and their number.
pub fn mimicry_positions(batch: &Batch) -> Result<(Tensor, f64)> {
    Ok((
        (&batch.label_targets + &batch.rationale_targets)?,
        batch.n_label + batch.n_rationale,
    ))
}

/// Positions read per host copy in `top_k_at` (each copy is positions × vocabulary floats).
const CHUNK: usize = 64;

/// The k most likely next tokens and their natural-log probabilities (temperature 1)
/// under `logits` `[b, t, v]` at the positions `mask` `[b, t-1]` marks (position j
/// predicts token j + 1), among the first `vocab` ids (the smaller of two vocabularies);
/// padding (id 0, log-probability −1e9) elsewhere. Values only: no gradient.
pub fn top_k_at(logits: &Tensor, mask: &Tensor, k: usize, vocab: usize) -> Result<TopK> {
    let (b, t, v) = logits.dims3()?;
    let k = k.min(vocab).min(v);
    let positions: Vec<u32> = mask
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .enumerate()
        .filter(|(_, m)| **m > 0.0)
        .map(|(at, _)| at as u32)
        .collect();
    let mut ids = vec![0u32; b * (t - 1) * k];
    let mut logprobs = vec![-1e9f32; b * (t - 1) * k];
    // Row i*(t-1)+j of the mask is row i*t+j of the flattened logits.
    let flat = logits.detach().reshape((b * t, v))?;
    for chunk in positions.chunks(CHUNK) {
        let rows: Vec<u32> = chunk
            .iter()
            .map(|&at| (at as usize / (t - 1) * t + at as usize % (t - 1)) as u32)
            .collect();
        let index = Tensor::from_vec(rows, chunk.len(), logits.device())?;
        let picked = flat.index_select(&index, 0)?;
        let log_z = picked.log_sum_exp(D::Minus1)?.to_vec1::<f32>()?;
        let values = picked.to_vec2::<f32>()?;
        for ((&at, row), lz) in chunk.iter().zip(&values).zip(log_z) {
            let at = at as usize;
            for (slot, (id, x)) in crate::teacher::top_k(&row[..vocab.min(v)], k)
                .into_iter()
                .enumerate()
            {
                ids[at * k + slot] = id;
                logprobs[at * k + slot] = x - lz;
            }
        }
    }
    let device = logits.device();
    Ok(TopK {
        ids: Tensor::from_vec(ids, (b, t - 1, k), device)?,
        logprobs: Tensor::from_vec(logprobs, (b, t - 1, k), device)?,
    })
}

/// Add `weight ×` one side's mimicry term to its loss: the divergence between the
/// other's top-k (+ tail) and `logits` at the `(mask, n)` positions; its value is kept in
/// `parts.mutual`.
pub fn add_mimicry(
    parts: &mut LossParts,
    logits: &Tensor,
    other: &TopK,
    (mask, n): (&Tensor, f64),
    cfg: &MutualConfig,
    jsd_beta: f64,
) -> Result<()> {
    if n == 0.0 {
        return Ok(());
    }
    let term = token_kd_divergence(
        logits,
        &other.ids,
        &other.logprobs,
        mask,
        n,
        (cfg.temperature, cfg.divergence, jsd_beta),
    )?;
    parts.mutual = Some(term.to_scalar::<f32>()? as f64);
    parts.total = (&parts.total + (term * cfg.weight)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn top_k_reads_log_probabilities_at_the_marked_positions_only() {
        let dev = Device::Cpu;
        // b = 1, t = 3, v = 4: positions 0 and 1 predict; only position 1 is marked.
        let logits = Tensor::new(
            &[[[0f32, 1., 2., 3.], [3., 0., 1., 0.5], [9., 9., 9., 9.]]],
            &dev,
        )
        .unwrap();
        let mask = Tensor::new(&[[0f32, 1.]], &dev).unwrap();
        let top = top_k_at(&logits, &mask, 2, 4).unwrap();
        let ids = top.ids.to_vec3::<u32>().unwrap();
        let lp = top.logprobs.to_vec3::<f32>().unwrap();
        assert_eq!(ids[0][0], vec![0, 0]);
        assert_eq!(lp[0][0], vec![-1e9, -1e9]);
        assert_eq!(ids[0][1], vec![0, 2]);
        let z = [3f32, 0., 1., 0.5]
            .iter()
            .map(|x| x.exp())
            .sum::<f32>()
            .ln();
        assert!((lp[0][1][0] - (3.0 - z)).abs() < 1e-5);
        assert!((lp[0][1][1] - (1.0 - z)).abs() < 1e-5);

        // Limited to the first 2 ids, id 2 is out.
        let top = top_k_at(&logits, &mask, 2, 2).unwrap();
        assert_eq!(top.ids.to_vec3::<u32>().unwrap()[0][1], vec![0, 1]);
        assert_eq!(top.logprobs.dtype(), DType::F32);
    }

    #[test]
    fn mimicry_of_an_equal_distribution_is_zero_and_of_another_is_not() {
        let dev = Device::Cpu;
        let cfg: MutualConfig = toml::from_str("top_k = 4").unwrap();
        let logits = Tensor::new(&[[[0f32, 1., 2., 3.], [0., 0., 0., 0.]]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32]], &dev).unwrap();
        let same = top_k_at(&logits, &mask, 4, 4).unwrap();
        let zero = || LossParts::new(Tensor::zeros((), DType::F32, &dev).unwrap());
        let mut parts = zero();
        add_mimicry(&mut parts, &logits, &same, (&mask, 1.0), &cfg, 0.5).unwrap();
        assert!(parts.mutual.unwrap().abs() < 1e-5, "{:?}", parts.mutual);

        let other = Tensor::new(&[[[3f32, 2., 1., 0.], [0., 0., 0., 0.]]], &dev).unwrap();
        let theirs = top_k_at(&other, &mask, 4, 4).unwrap();
        let mut parts = zero();
        add_mimicry(&mut parts, &logits, &theirs, (&mask, 1.0), &cfg, 0.5).unwrap();
        // KL(p ‖ q) over the whole (4-token) vocabulary, by hand.
        let soft = |x: [f32; 4]| {
            let z: f32 = x.iter().map(|v| v.exp()).sum();
            x.map(|v| v.exp() / z)
        };
        let (p, q) = (soft([3., 2., 1., 0.]), soft([0., 1., 2., 3.]));
        let kl: f32 = p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum();
        assert!(
            (parts.mutual.unwrap() as f32 - kl).abs() < 1e-3,
            "{:?} vs {kl}",
            parts.mutual
        );
    }
}
