//! Knowledge in the teacher's hidden states (`[finetune.hidden_kd]`): feature-based KD
//! (FitNets, Romero et al. 2015) and relation-based KD (Park et al. 2019; Tung & Mori 2019).
//!
//! Per micro-batch, after the student's forward pass (which kept its states at the
//! configured layers): the teacher runs forward only, on its quantized weights in this
//! process, over the same token ids; then
//! - features: each student state, scaled to unit RMS, goes through its pair's learned map
//!   to the teacher's width and is compared with the teacher's state at every real token (`feature_mse`,
//!   `feature_cosine`); the pairs' mean, times `feature_weight`, joins the loss;
//! - relations: every example becomes one vector, its final normed state averaged over
//!   its reply tokens (`mean_pool`); the student's and the teacher's pairwise structure of
//!   those vectors are compared (`rkd_distance`, `rkd_angle`, `similarity_preserving`),
//!   times `relation_weight`.
//!
//! The teacher's states are values (no gradient reaches it). The maps are trainable
//! variables beside the student's, in its optimizer and its checkpoints; they are not
//! exported.
//!
//! Across tokenizers (a Qwen teacher for a SmolLM2 student), only the relation term
//! applies: the teacher reads each example as text, in its own tokens (`Retokenize`), and
//! its reply vectors are pooled over its own tokens of the same reply. Pooled vectors
//! are one per example on both sides, so nothing needs aligning; feature KD compares
//! states token by token and is refused there.

use super::data::{tokenization_difference, Example};
use super::loss::{Batch, LossParts};
use crate::config::{Config, FeatureLoss, HiddenKdConfig, RelationLoss};
use crate::llama::{self, Decoder, HiddenStates, LoadedModel};
use crate::records::CuratedRow;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// The teacher whose hidden states the student learns from, and the student's maps.
pub struct HiddenTeacher {
    decoder: Decoder,
    cfg: HiddenKdConfig,
    /// (student layer, teacher layer) pairs of the feature term.
    pairs: Vec<(usize, usize)>,
    /// One map `[teacher width, student width]` per pair, by checkpoint name.
    pub projections: Vec<(String, Var)>,
    /// Where the teacher was loaded from (for messages and the manifest).
    pub path: String,
    /// Set when the teacher tokenizes differently from the student (relation KD only).
    retokenize: Option<Retokenize>,
}

/// The teacher's own tokens of the student's examples: each example's prompt and reply
/// decoded by the student's tokenizer (special tokens kept) and encoded by the teacher's.
struct Retokenize {
    student: tokenizers::Tokenizer,
    teacher: tokenizers::Tokenizer,
    pad: u32,
}

impl Retokenize {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .teacher
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("the hidden-state teacher's tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.student
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("the student's tokenizer: {e}"))
    }

    /// The teacher's right-padded batch of the examples: ids, attention mask and reply
    /// mask, each `[batch, seq]`, on the CPU.
    fn batch(&self, examples: &[Example]) -> Result<(Tensor, Tensor, Tensor)> {
        let mut seqs = Vec::with_capacity(examples.len());
        for e in examples {
            let split = e.target.iter().position(|&t| t == 1).unwrap_or(e.ids.len());
            let prompt = self.encode(&self.decode(&e.ids[..split])?)?;
            let reply = self.encode(&self.decode(&e.ids[split..])?)?;
            seqs.push((prompt, reply));
        }
        let t = seqs
            .iter()
            .map(|(p, r)| p.len() + r.len())
            .max()
            .unwrap_or(1);
        let b = seqs.len();
        let (mut ids, mut attention, mut reply) =
            (vec![self.pad; b * t], vec![0f32; b * t], vec![0f32; b * t]);
        for (i, (p, r)) in seqs.iter().enumerate() {
            for (j, &id) in p.iter().chain(r).enumerate() {
                ids[i * t + j] = id;
                attention[i * t + j] = 1.0;
                reply[i * t + j] = if j >= p.len() { 1.0 } else { 0.0 };
            }
        }
        let cpu = Device::Cpu;
        Ok((
            Tensor::from_vec(ids, (b, t), &cpu)?,
            Tensor::from_vec(attention, (b, t), &cpu)?,
            Tensor::from_vec(reply, (b, t), &cpu)?,
        ))
    }
}

/// What the hidden-state terms did in one micro-batch.
#[derive(Debug, Default, Clone, Copy)]
pub struct HiddenStats {
    pub teacher_seconds: f64,
    pub teacher_tokens: usize,
}

impl HiddenTeacher {
    /// Load the teacher the section names (else the `[teacher]` model), check that it
    /// tokenizes as the student (or that only relations are asked for), settle the layer
    /// pairs and draw the maps (seeded). None without the section.
    pub fn open(
        cfg: &Config,
        student: &LoadedModel,
        train: &[CuratedRow],
        device: &Device,
    ) -> Result<Option<HiddenTeacher>> {
        let Some(h) = cfg.finetune.hidden_kd.clone() else {
            return Ok(None);
        };
        let started = Instant::now();
        let path = h.model.clone().unwrap_or_else(|| cfg.teacher.model.clone());
        let mut loaded = llama::load_for_inference(&path).with_context(|| {
            format!("cannot load the hidden-state teacher {path} ([finetune.hidden_kd] model, else [teacher] model)")
        })?;
        let retokenize = match tokenization_difference(&loaded, student, train)? {
            None => None,
            Some((id, a, b)) if h.feature_weight > 0.0 => bail!(
                "the hidden-state teacher {path} tokenizes row {id:?} differently from the student ({a} vs {b} tokens): feature KD compares the two models' states token by token and needs one tokenizer\nhint: set feature_weight = 0.0 (relation KD works across tokenizers), use a teacher of the student's family (Qwen2.5 1.5B → 0.5B share one), or remove [finetune.hidden_kd]"
            ),
            Some(_) => {
                eprintln!("finetune: the hidden-state teacher {path} tokenizes differently from the student: it reads each example as text in its own tokens (relation KD only)");
                Some(Retokenize {
                    student: student.tokenizer.clone(),
                    teacher: loaded.tokenizer.clone(),
                    pad: loaded.eos_token_id,
                })
            }
        };
        let decoder = loaded.take_inference_decoder()?;
        let (ns, nt) = (
            student.shape.num_hidden_layers,
            decoder.shape.num_hidden_layers,
        );
        let pairs = if h.feature_weight == 0.0 {
            vec![]
        } else if h.layers.is_empty() {
            default_pairs(ns, nt)
        } else {
            h.layers.iter().map(|p| (p[0], p[1])).collect()
        };
        if let Some(&(s, t)) = pairs.iter().find(|&&(s, t)| s > ns || t > nt) {
            bail!("[finetune.hidden_kd] layers pair [{s}, {t}] is outside the models: the student has {ns} layers, the teacher {nt}");
        }
        let (ws, wt) = (student.shape.hidden_size, decoder.shape.hidden_size);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::io::atomic::seed_from_text(
            &format!("hidden-kd:{}", cfg.seed),
        ));
        let bound = 1.0 / (ws as f32).sqrt();
        let projections = pairs
            .iter()
            .map(|&(s, t)| {
                let init: Vec<f32> = (0..wt * ws)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let var = Var::from_tensor(&Tensor::from_vec(init, (wt, ws), device)?)?;
                Ok((format!("hidden_kd.student_{s}_to_teacher_{t}.weight"), var))
            })
            .collect::<Result<Vec<_>>>()?;
        eprintln!(
            "finetune: hidden-state teacher {path} ({nt} layers, width {wt}) ready in {:.1} s: feature KD weight {} ({:?}, student→teacher layers {:?}), relation KD weight {} ({:?})",
            started.elapsed().as_secs_f64(),
            h.feature_weight,
            h.feature_loss,
            pairs,
            h.relation_weight,
            h.relation
        );
        Ok(Some(HiddenTeacher {
            decoder,
            cfg: h,
            pairs,
            projections,
            path,
            retokenize,
        }))
    }

    /// The student layers whose states the feature term needs.
    pub fn student_layers(&self) -> Vec<usize> {
        self.pairs.iter().map(|p| p.0).collect()
    }

    /// Run the teacher over the batch (made of `examples`) and add the feature and
    /// relation terms to `parts`, from the student's states of the same batch.
    pub fn add_terms(
        &self,
        parts: &mut LossParts,
        student: &HiddenStates,
        (batch, examples): (&Batch, &[Example]),
        stats: &mut HiddenStats,
    ) -> Result<()> {
        let started = Instant::now();
        let device = batch.ids.device();
        let cpu = Device::Cpu;
        let teacher_layers: Vec<usize> = self.pairs.iter().map(|p| p.1).collect();
        let (ids, attention, teacher_reply) = match &self.retokenize {
            Some(r) => r.batch(examples)?,
            None => (
                batch.ids.to_device(&cpu)?,
                batch.attention.to_device(&cpu)?,
                batch.reply.clone(),
            ),
        };
        let (_, teacher) = self
            .decoder
            .forward_hidden(&ids, &attention, &teacher_layers, false)?;
        stats.teacher_seconds += started.elapsed().as_secs_f64();
        stats.teacher_tokens += attention.sum_all()?.to_scalar::<f32>()? as usize;
        let h = &self.cfg;
        if h.feature_weight > 0.0 && !self.pairs.is_empty() {
            let mut sum: Option<Tensor> = None;
            for ((s, t), (_, map)) in student
                .layers
                .iter()
                .zip(&teacher.layers)
                .zip(&self.projections)
            {
                let t = t.to_device(device)?.detach();
                let mapped = project(s, map.as_tensor())?;
                let term = match h.feature_loss {
                    FeatureLoss::Mse => feature_mse(&mapped, &t, &batch.attention)?,
                    FeatureLoss::Cosine => feature_cosine(&mapped, &t, &batch.attention)?,
                };
                sum = Some(match sum {
                    Some(acc) => (acc + term)?,
                    None => term,
                });
            }
            if let Some(sum) = sum {
                let mean = (sum / self.pairs.len() as f64)?;
                parts.feature = Some(mean.to_scalar::<f32>()? as f64);
                parts.total = (&parts.total + (mean * h.feature_weight)?)?;
            }
        }
        if h.relation_weight > 0.0 {
            let s = mean_pool(&student.last, &batch.reply)?;
            let t = mean_pool(
                &teacher.last,
                &teacher_reply.to_device(teacher.last.device())?,
            )?
            .to_device(device)?
            .detach();
            if let Some(term) = relation_loss(h.relation, &s, &t)? {
                parts.relation = Some(term.to_scalar::<f32>()? as f64);
                parts.total = (&parts.total + (term * h.relation_weight)?)?;
            }
        }
        Ok(())
    }
}

/// `pairs` evenly spaced pairs of layers: the i-th of four pairs is at i/4 of each model's
/// depth (rounded), so the last pairs the final blocks.
fn default_pairs(student_layers: usize, teacher_layers: usize) -> Vec<(usize, usize)> {
    let n = 4.min(student_layers).min(teacher_layers);
    let at = |i: usize, layers: usize| ((i * layers) as f64 / n as f64).round() as usize;
    (1..=n)
        .map(|i| (at(i, student_layers), at(i, teacher_layers)))
        .collect()
}

/// Each position's state `[b, t, w]` divided by its RMS over the width.
fn unit_rms(x: &Tensor) -> Result<Tensor> {
    let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?;
    Ok(x.broadcast_div(&rms)?)
}

/// `unit_rms(x) · mapᵀ` for states `[b, t, in]` and a map `[out, in]`. The states are
/// scaled first because a layer's raw states can have an RMS in the tens (SmolLM2-135M's
/// middle layers): through a fresh map the feature term would start in the thousands and
/// swamp the CE terms; scaled, it starts near 1.3 (uniform ±1/√in entries give outputs
/// of variance 1/3 against a unit-RMS target).
fn project(x: &Tensor, map: &Tensor) -> Result<Tensor> {
    let (b, t, w) = x.dims3()?;
    let y = unit_rms(x)?.reshape((b * t, w))?.matmul(&map.t()?)?;
    Ok(y.reshape((b, t, map.dim(0)?))?)
}

/// Mean over the masked positions (`mask` `[b, t]` of 0/1) of per-position values `[b, t]`.
fn masked_mean(values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(values.dtype())?;
    let n = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(((values * &mask)?.sum_all()? / n.max(1.0))?)
}

/// MSE between the student's mapped states and the teacher's scaled to unit RMS per
/// token (hidden states of one model differ in scale by orders of magnitude between
/// layers; scaled, the term is of the same size at every pair): mean over the masked
/// positions of the mean squared difference over the width.
pub fn feature_mse(student: &Tensor, teacher: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let per_position = (student - unit_rms(teacher)?)?.sqr()?.mean(D::Minus1)?;
    masked_mean(&per_position, mask)
}

/// 1 − cosine similarity between the student's mapped states and the teacher's, mean over
/// the masked positions.
pub fn feature_cosine(student: &Tensor, teacher: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let dot = (student * teacher)?.sum(D::Minus1)?;
    let norm = |x: &Tensor| -> Result<Tensor> { Ok((x.sqr()?.sum(D::Minus1)? + 1e-12)?.sqrt()?) };
    let cos = (dot / (norm(student)? * norm(teacher)?)?)?;
    masked_mean(&cos.affine(-1.0, 1.0)?, mask)
}

/// Each example's states `[b, t, w]` averaged over its positions where `mask` `[b, t]`
/// is 1: `[b, w]`.
pub fn mean_pool(states: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(states.dtype())?;
    let sum = states.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
    let count = mask.sum_keepdim(1)?.clamp(1.0, f64::INFINITY)?;
    Ok(sum.broadcast_div(&count)?)
}

/// The relation term between pooled vectors `[b, w]` of the student and the teacher
/// (widths may differ). None when the batch has too few examples to relate (distances
/// need 2, angles 3).
pub fn relation_loss(
    kind: RelationLoss,
    student: &Tensor,
    teacher: &Tensor,
) -> Result<Option<Tensor>> {
    let b = student.dim(0)?;
    Ok(match kind {
        RelationLoss::Distance if b >= 2 => Some(rkd_distance(student, teacher)?),
        RelationLoss::Angle if b >= 3 => Some(rkd_angle(student, teacher)?),
        RelationLoss::Rkd if b >= 3 => {
            Some((rkd_distance(student, teacher)? + (rkd_angle(student, teacher)? * 2.0)?)?)
        }
        RelationLoss::Rkd if b == 2 => Some(rkd_distance(student, teacher)?),
        RelationLoss::Similarity if b >= 2 => Some(similarity_preserving(student, teacher)?),
        _ => None,
    })
}

/// Huber loss (δ = 1, PyTorch's smooth L1) of each element of `x`: ½x² where |x| < 1,
/// |x| − ½ elsewhere.
fn huber(x: &Tensor) -> Result<Tensor> {
    let a = x.abs()?;
    let m = a.clamp(0.0, 1.0)?;
    Ok(((m.sqr()? * 0.5)? + (a - m)?)?)
}

/// A `[n, n]` (or `[n, n, n]`) mask of 1 where every index differs, in `dtype`.
fn distinct_mask(n: usize, triples: bool, dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = if triples {
        (0..n * n * n)
            .map(|x| {
                let (j, i, k) = (x / (n * n), (x / n) % n, x % n);
                (i != j && k != j && i != k) as u8 as f32
            })
            .collect()
    } else {
        (0..n * n).map(|x| (x / n != x % n) as u8 as f32).collect()
    };
    let shape: Vec<usize> = if triples { vec![n, n, n] } else { vec![n, n] };
    Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
}

/// Pairwise Euclidean distances of the rows of `x` `[b, w]`, `[b, b]` (0 on the diagonal).
fn distances(x: &Tensor) -> Result<Tensor> {
    let diff = x.unsqueeze(0)?.broadcast_sub(&x.unsqueeze(1)?)?;
    // The floor keeps the square root's gradient finite on the diagonal (masked later).
    Ok(diff
        .sqr()?
        .sum(D::Minus1)?
        .clamp(1e-12, f64::INFINITY)?
        .sqrt()?)
}

/// Distance-wise RKD: every pairwise distance divided by the mean distance of its side,
/// Huber between the two sides' normalized distances, mean over the pairs i ≠ j.
pub fn rkd_distance(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let b = student.dim(0)?;
    let mask = distinct_mask(b, false, student.dtype(), student.device())?;
    let normalized = |x: &Tensor| -> Result<Tensor> {
        let d = (distances(x)? * &mask)?;
        let mean = (d.sum_all()? / (b * (b - 1)) as f64)?;
        Ok(d.broadcast_div(&(mean + 1e-12)?)?)
    };
    let diff = (normalized(student)? - normalized(teacher)?)?;
    let pairs = (b * (b - 1)) as f64;
    Ok(((huber(&diff)? * &mask)?.sum_all()? / pairs)?)
}

/// The cosines of the angles at every example j between the directions to examples i
/// and k: `[b (j), b (i), b (k)]`.
fn angles(x: &Tensor) -> Result<Tensor> {
    // diff[j, i] = x_i − x_j, scaled to unit length (the zero vector stays zero).
    let diff = x.unsqueeze(0)?.broadcast_sub(&x.unsqueeze(1)?)?;
    let norm = diff
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .clamp(1e-12, f64::INFINITY)?
        .sqrt()?;
    let unit = diff.broadcast_div(&norm)?;
    Ok(unit.matmul(&unit.transpose(1, 2)?.contiguous()?)?)
}

/// Angle-wise RKD: Huber between the two sides' angle cosines, mean over the triples of
/// distinct examples.
pub fn rkd_angle(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let b = student.dim(0)?;
    let mask = distinct_mask(b, true, student.dtype(), student.device())?;
    let diff = (angles(student)? - angles(teacher)?)?;
    let triples = (b * (b - 1) * (b - 2)) as f64;
    Ok(((huber(&diff)? * &mask)?.sum_all()? / triples)?)
}

/// Similarity-preserving KD: the Gram matrices `x xᵀ` of both sides, each row scaled to
/// unit length; squared Frobenius distance / b².
pub fn similarity_preserving(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let b = student.dim(0)?;
    let gram = |x: &Tensor| -> Result<Tensor> {
        let g = x.matmul(&x.t()?)?;
        let norm = (g.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
        Ok(g.broadcast_div(&norm)?)
    };
    let diff = (gram(student)? - gram(teacher)?)?;
    Ok((diff.sqr()?.sum_all()? / (b * b) as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn scalar(x: &Tensor) -> f64 {
        x.to_scalar::<f64>().unwrap()
    }

    /// Central finite differences of `f` at `x` against candle's gradient, every element.
    fn check_gradient(x: &[f64], shape: &[usize], f: impl Fn(&Tensor) -> Tensor) {
        let var = Var::from_tensor(&t(x, shape)).unwrap();
        let grads = f(var.as_tensor()).backward().unwrap();
        let analytic: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let h = 1e-6;
        for i in 0..x.len() {
            let (mut up, mut down) = (x.to_vec(), x.to_vec());
            up[i] += h;
            down[i] -= h;
            let numeric = (scalar(&f(&t(&up, shape))) - scalar(&f(&t(&down, shape)))) / (2.0 * h);
            assert!(
                (numeric - analytic[i]).abs() < 1e-5 * (1.0 + numeric.abs()),
                "element {i}: finite differences {numeric}, backward {}",
                analytic[i]
            );
        }
    }

    #[test]
    fn default_pairs_spread_evenly_and_end_at_the_last_blocks() {
        assert_eq!(
            default_pairs(24, 28),
            vec![(6, 7), (12, 14), (18, 21), (24, 28)]
        );
        assert_eq!(
            default_pairs(30, 28),
            vec![(8, 7), (15, 14), (23, 21), (30, 28)]
        );
        assert_eq!(default_pairs(2, 28), vec![(1, 14), (2, 28)]);
    }

    #[test]
    fn feature_mse_by_hand() {
        // One sequence of two tokens, width 2; the second token is padding.
        // Teacher [3, 4]: RMS √12.5, scaled [0.8485, 1.1314]; student [1, 1]:
        // ((1 − 0.8485)² + (1 − 1.1314)²) / 2 = (0.02295 + 0.01727) / 2 = 0.02011.
        let s = t(&[1., 1., 9., 9.], &[1, 2, 2]);
        let te = t(&[3., 4., 0., 0.], &[1, 2, 2]);
        let mask = t(&[1., 0.], &[1, 2]);
        let got = scalar(&feature_mse(&s, &te, &mask).unwrap());
        let r = (12.5f64 + 1e-6).sqrt();
        let want = ((1.0 - 3.0 / r).powi(2) + (1.0 - 4.0 / r).powi(2)) / 2.0;
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert!((want - 0.02011).abs() < 1e-4);
    }

    #[test]
    fn feature_cosine_by_hand() {
        // [1, 0] vs [1, 1]: 1 − 1/√2; [0, 2] vs [0, 5]: 0. Mean 0.14645.
        let s = t(&[1., 0., 0., 2.], &[1, 2, 2]);
        let te = t(&[1., 1., 0., 5.], &[1, 2, 2]);
        let mask = t(&[1., 1.], &[1, 2]);
        let got = scalar(&feature_cosine(&s, &te, &mask).unwrap());
        assert!((got - (1.0 - 0.5f64.sqrt()) / 2.0).abs() < 1e-9, "{got}");
    }

    #[test]
    fn mean_pool_averages_the_reply_tokens_only() {
        let states = t(&[1., 10., 3., 30., 5., 50.], &[1, 3, 2]);
        let reply = t(&[0., 1., 1.], &[1, 3]);
        let pooled: Vec<Vec<f64>> = mean_pool(&states, &reply).unwrap().to_vec2().unwrap();
        assert_eq!(pooled, vec![vec![4.0, 40.0]]);
    }

    #[test]
    fn rkd_distance_by_hand() {
        // Student points 0, 1, 3 on a line: distances 1, 3, 2 (mean 2) → 0.5, 1.5, 1.
        // Teacher 0, 2, 4: distances 2, 4, 2 (mean 8/3) → 0.75, 1.5, 0.75.
        // Differences −0.25, 0, 0.25 → Huber 0.03125, 0, 0.03125; each pair twice over 6.
        let s = t(&[0., 1., 3.], &[3, 1]);
        let te = t(&[0., 2., 4.], &[3, 1]);
        let got = scalar(&rkd_distance(&s, &te).unwrap());
        assert!((got - 0.0625 / 3.0).abs() < 1e-9, "{got}");
        // Scale-free: the teacher times 10 changes nothing.
        let scaled = scalar(&rkd_distance(&s, &(te * 10.0).unwrap()).unwrap());
        assert!((scaled - got).abs() < 1e-9);
    }

    #[test]
    fn rkd_angle_by_hand() {
        // Student: a right angle at the origin ((0,0), (1,0), (0,1)); the angles of this
        // triangle are 90°, 45°, 45°. Teacher: an equilateral triangle, 60° everywhere.
        // Each ordered triple (6) gives one cosine: the vertex at 0 twice (cos 90° = 0),
        // the others twice each (cos 45°); the teacher cos 60° = 0.5 everywhere.
        let s = t(&[0., 0., 1., 0., 0., 1.], &[3, 2]);
        let h = 3f64.sqrt() / 2.0;
        let te = t(&[0., 0., 1., 0., 0.5, h], &[3, 2]);
        let got = scalar(&rkd_angle(&s, &te).unwrap());
        let c45 = 0.5f64.sqrt();
        let want = (2.0 * 0.5 * 0.25 + 4.0 * 0.5 * (c45 - 0.5).powi(2)) / 6.0;
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }

    #[test]
    fn similarity_preserving_by_hand() {
        // Student rows e1, e2: Gram = I, rows unit. Teacher rows (1,0), (1,1): Gram
        // [[1, 1], [1, 2]] → rows /√2 and /√5: [[.7071, .7071], [.4472, .8944]].
        // Squared differences: .0858 + .5 + .2 + .0111 = .7969; / 4.
        let s = t(&[1., 0., 0., 1.], &[2, 2]);
        let te = t(&[1., 0., 1., 1.], &[2, 2]);
        let got = scalar(&similarity_preserving(&s, &te).unwrap());
        let (a, b, c) = (0.5f64.sqrt(), 1.0 / 5f64.sqrt(), 2.0 / 5f64.sqrt());
        let want = ((1.0 - a).powi(2) + a * a + b * b + (1.0 - c).powi(2)) / 4.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn equal_structure_costs_nothing_and_widths_may_differ() {
        // The teacher is the student scaled into a wider space: distances keep their
        // ratios, angles and normalized Gram rows stay, so every relation term is zero.
        let s = t(&[0., 0., 1., 0., 0., 2., 3., 1.], &[4, 2]);
        let te = t(&[0., 0., 0., 0., 3., 0., 0., 0., 6., 0., 9., 3.], &[4, 3]);
        for kind in [
            RelationLoss::Rkd,
            RelationLoss::Distance,
            RelationLoss::Angle,
            RelationLoss::Similarity,
        ] {
            let v = scalar(&relation_loss(kind, &s, &te).unwrap().unwrap());
            assert!(v.abs() < 1e-9, "{kind:?}: {v}");
        }
        // One example has nothing to relate to.
        let one = t(&[1., 2.], &[1, 2]);
        assert!(relation_loss(RelationLoss::Rkd, &one, &one)
            .unwrap()
            .is_none());
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = [
            0.3, -1.2, 0.7, 2.0, -0.4, 1.1, 0.9, -0.6, 0.2, 1.5, -2.1, 0.8,
        ];
        let teacher = t(
            &[
                1.0, 0.5, -0.3, 0.2, 1.4, -0.7, 0.6, 0.1, -1.1, 0.9, 0.4, -0.2,
            ],
            &[4, 3],
        );
        check_gradient(&x, &[4, 3], |s| rkd_distance(s, &teacher).unwrap());
        check_gradient(&x, &[4, 3], |s| rkd_angle(s, &teacher).unwrap());
        check_gradient(&x, &[4, 3], |s| similarity_preserving(s, &teacher).unwrap());
        let seq = teacher.reshape((2, 2, 3)).unwrap();
        let mask = t(&[1., 1., 1., 0.], &[2, 2]);
        check_gradient(&x, &[2, 2, 3], |s| feature_mse(s, &seq, &mask).unwrap());
        check_gradient(&x, &[2, 2, 3], |s| feature_cosine(s, &seq, &mask).unwrap());
        let reply = t(&[0., 1., 1., 1.], &[2, 2]);
        check_gradient(&x, &[2, 2, 3], |s| {
            let pooled = mean_pool(s, &reply).unwrap();
            let other = mean_pool(&seq, &reply).unwrap();
            rkd_distance(&pooled, &other).unwrap()
        });
    }
}
