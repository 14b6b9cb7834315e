//! finetune: curated rows → a trained student in Hugging Face format.
//!
//! Read top to bottom: load the student, build the examples and the batch schedule, resume
//! from the latest checkpoint or measure the val loss, train with AdamW (linear warmup,
//! cosine decay, gradient accumulation and clipping, a checkpoint every N steps), measure
//! the val loss again, export. A live teacher (`live`) reshapes each micro-batch before its
//! forward pass; a mutual-learning peer (`mutual`) trains beside the student on the same
//! micro-batches; a hidden-state teacher (`hidden`) adds feature and relation terms from
//! the student's states of each micro-batch.

mod checkpoint;
pub mod cross_vocab;
pub mod data;
pub mod divergence;
pub mod hidden;
pub mod live;
pub mod loss;
pub mod mutual;
pub mod optim;
mod plots;

use crate::config::{Config, FinetuneConfig, Stage, TokenKd};
use crate::io::atomic::{text_sha256, write_bytes};
use crate::io::manifest::{config_hash, entry, FileEntry, Manifest};
use crate::io::parquet::read_frame;
use crate::llama::{self, Decoder, HiddenStates, LoadedModel};
use crate::progress::Progress;
use crate::prompts::Prompt;
use crate::records::CuratedRow;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use cross_vocab::{AlignmentCounts, VocabBridge};
use data::{batches, check_shared_vocabulary, row_examples, token_kd_example, Example};
use hidden::{HiddenStats, HiddenTeacher};
use live::{LiveStats, LiveTeacher};
use loss::{
    add_on_policy, add_token_kd, add_uld, make_batch, token_nll, total_loss, Batch, LossParts,
    LossWeights,
};
use mutual::Peer;
use optim::AdamW;
use std::io::Write;
use std::path::{Path, PathBuf};

pub fn input_entries(cfg: &Config) -> Result<Vec<FileEntry>> {
    let dir = cfg.stage_dir(Stage::Curate);
    Manifest::read(&dir, Stage::Curate)?;
    ["train", "val"]
        .iter()
        .map(|s| entry(&dir.join(format!("{s}.parquet")), None))
        .collect()
}

fn read_split(cfg: &Config, split: &str) -> Result<Vec<CuratedRow>> {
    let path = cfg
        .stage_dir(Stage::Curate)
        .join(format!("{split}.parquet"));
    CuratedRow::from_frame(&read_frame(&path)?, &path)
}

/// Where token-level KD examples come from: the teacher's own token ids (one
/// vocabulary), or the student's tokens of the teacher's text aligned to the teacher's
/// (`cross`, counting the alignment), or nowhere (the term is off, or a live teacher
/// scores the rationales).
enum TokenKdSource<'a> {
    Off,
    SameVocab,
    Cross(&'a VocabBridge, &'a std::cell::Cell<AlignmentCounts>),
}

/// The examples of each row (its views, and its KD answers when the KD term is on).
fn build_examples(
    model: &LoadedModel,
    prompt: &Prompt,
    rows: &[CuratedRow],
    cfg: &Config,
    token_kd: &TokenKdSource,
) -> Result<Vec<Vec<Example>>> {
    let ft = &cfg.finetune;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let kd = (ft.kd_weight > 0.0).then_some(i as u32);
            let targets = r.targets(ft.objective, ft.labels)?;
            let mut views = row_examples(model, prompt, r, &targets, ft.max_seq_len, kd)
                .with_context(|| format!("cannot build examples for row {:?}", r.id))?;
            if targets.teacher_tokens {
                match token_kd {
                    TokenKdSource::Off => {}
                    TokenKdSource::SameVocab => {
                        views.extend(token_kd_example(model, prompt, r, ft.max_seq_len)?)
                    }
                    TokenKdSource::Cross(bridge, counts) => {
                        let mut c = counts.get();
                        views.extend(bridge.example(model, prompt, r, ft.max_seq_len, &mut c)?);
                        counts.set(c);
                    }
                }
            }
            for v in &mut views {
                v.row = i as u32;
            }
            Ok(views)
        })
        .collect()
}

/// A decoder of `loaded` built for training as `[finetune]` says: every weight trainable
/// but frozen embeddings, or frozen weights and LoRA adapters drawn from `lora_seed`; in
/// the configured precision.
fn trainable_decoder(
    loaded: &LoadedModel,
    device: &Device,
    ft: &FinetuneConfig,
    lora_seed: u64,
) -> Result<Decoder> {
    let freeze = ft.freeze_embeddings;
    let tied = loaded.shape.tie_word_embeddings;
    let lora = ft.lora.as_ref();
    let mut model = loaded.decoder(device, |name| {
        lora.is_none()
            && !(freeze
                && (name == "model.embed_tokens.weight" || (tied && name == "lm_head.weight")))
    })?;
    if let Some(l) = lora {
        model.add_lora(l, lora_seed)?;
    }
    model.set_precision(ft.precision)?;
    Ok(model)
}

/// A batch's logits; `dropout_key` draws this pass's LoRA dropout masks (None: none).
fn forward(model: &Decoder, batch: &Batch, dropout_key: Option<u64>) -> Result<Tensor> {
    model.set_dropout_key(dropout_key);
    let logits = model.forward(&batch.ids, &batch.attention);
    model.set_dropout_key(None);
    logits
}

/// A training pass's logits, and the states at `layers` when a hidden-state teacher needs
/// them (None: logits only).
fn forward_with_states(
    model: &Decoder,
    batch: &Batch,
    dropout_key: Option<u64>,
    layers: Option<&[usize]>,
) -> Result<(Tensor, Option<HiddenStates>)> {
    let Some(layers) = layers else {
        return Ok((forward(model, batch, dropout_key)?, None));
    };
    model.set_dropout_key(dropout_key);
    let out = model.forward_hidden(&batch.ids, &batch.attention, layers, true);
    model.set_dropout_key(None);
    let (logits, states) = out?;
    let logits = logits.context("forward_hidden was asked for logits")?;
    Ok((logits, Some(states)))
}

/// The loss of one batch from its logits: the CE views, the label-set KD term, the
/// token-level KD term and the on-policy term, each part kept for the metrics.
fn batch_loss(logits: &Tensor, batch: &Batch, weights: &LossWeights) -> Result<LossParts> {
    let mut parts = total_loss(&token_nll(logits, &batch.ids)?, batch, weights)?;
    add_token_kd(&mut parts, logits, batch, weights)?;
    add_uld(&mut parts, logits, batch, weights)?;
    add_on_policy(&mut parts, logits, batch, weights)?;
    Ok(parts)
}

/// Stop on a loss that is not a number, keeping the last good checkpoint.
fn check_finite(
    value: f64,
    whose: &str,
    (step, micro, micro_batches, sequences): (usize, usize, usize, usize),
    out_dir: &Path,
) -> Result<()> {
    if !value.is_finite() {
        bail!(
            "{whose} loss became {value} at step {} (micro-batch {micro} of {micro_batches}, {sequences} sequences); the last good checkpoint is kept in {}\nhint: lower [finetune] learning_rate, or check the rows of this batch",
            step + 1,
            out_dir.display()
        );
    }
    Ok(())
}

/// Mean loss over rows' examples without gradients (val loss), in fixed batches.
fn mean_loss(
    model: &Decoder,
    rows: &[Vec<Example>],
    pad: u32,
    weights: &LossWeights,
    batch: usize,
) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0);
    for chunk in batches(rows.to_vec(), batch, 0) {
        let batch = make_batch(&chunk, pad, model.device())?;
        let parts = batch_loss(&forward(model, &batch, None)?, &batch, weights)?;
        sum += parts.total.to_scalar::<f32>()? as f64;
        n += 1;
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

/// The LoRA dropout masks of one micro-batch follow from the seed and its place in the run.
fn dropout_key(seed: u64, step: usize, micro: usize) -> u64 {
    crate::io::atomic::seed_from_text(&format!("dropout:{seed}:{step}:{micro}"))
}

/// The learning rate of `step` (0-based) of `total`: linear warmup over the first
/// `warmup_ratio` of the steps (at least one), then cosine decay from `learning_rate` to
/// `min_lr_ratio` of it at the last step.
fn learning_rate(ft: &crate::config::FinetuneConfig, step: usize, total: usize) -> f64 {
    let base = ft.learning_rate;
    let warmup = ((total as f64 * ft.warmup_ratio) as usize).max(1);
    if step < warmup {
        base * (step + 1) as f64 / warmup as f64
    } else {
        let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        let floor = ft.min_lr_ratio;
        base * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
    }
}

/// Every micro-batch of the run in order: epoch e's batches are shuffled with seed + e, so
/// the schedule (and a resumed run's place in it) follows from the seed alone.
fn schedule(train: &[Vec<Example>], cfg: &Config) -> Vec<Vec<Example>> {
    let ft = &cfg.finetune;
    (0..ft.epochs)
        .flat_map(|epoch| {
            batches(
                train.to_vec(),
                ft.batch_size,
                cfg.seed.wrapping_add(epoch as u64),
            )
        })
        .collect()
}

pub fn run(cfg: &Config) -> Result<PathBuf> {
    let ft = &cfg.finetune;
    let out_dir = cfg.stage_dir(Stage::Finetune);
    let student_dir = cfg.student_dir();
    let inputs = input_entries(cfg)?;
    let train_rows = read_split(cfg, "train")?;
    let val_rows = read_split(cfg, "val")?;
    if train_rows.is_empty() {
        bail!("the train split is empty: nothing to learn from\nhint: generate more rows or loosen [curate] rules");
    }
    let device = open_device(&ft.device)?;
    let prompt = Prompt::load(cfg)?;
    let mut loaded = llama::load(&cfg.student.model, &device)?;
    // A live teacher scoring the rationales (online distillation) replaces the stored top-k.
    let online = ft.live_teacher.as_ref().is_some_and(|l| l.online);
    let stored_token_kd = ft.kd_token_weight() > 0.0 && !online;
    let bridge = match ft.token_kd {
        TokenKd::Cross if stored_token_kd => Some(open_bridge(cfg, &loaded, &train_rows)?),
        _ => None,
    };
    let alignment = std::cell::Cell::new(AlignmentCounts::default());
    let token_kd = match (&bridge, stored_token_kd) {
        (_, false) => TokenKdSource::Off,
        (Some(b), true) => TokenKdSource::Cross(b, &alignment),
        (None, true) => {
            check_shared_vocabulary(&loaded, &train_rows)?;
            TokenKdSource::SameVocab
        }
    };
    let model = trainable_decoder(&loaded, &device, ft, cfg.seed)?;
    // The decoder holds what it needs; trainable weights are copies (variables), so the
    // loaded originals would be a second copy of the model for the whole run.
    loaded.weights.clear();
    let mut peer = Peer::open(cfg, &loaded, &train_rows, &device)?;
    let hidden = HiddenTeacher::open(cfg, &loaded, &train_rows, &device)?;
    let student_layers = hidden.as_ref().map(|h| h.student_layers());
    let extra: &[(String, candle_core::Var)] = hidden.as_ref().map_or(&[], |h| &h.projections);
    let pad = loaded.eos_token_id;
    let weights = LossWeights {
        alpha: ft.alpha,
        kd_weight: ft.kd_weight,
        kd_token_weight: ft.kd_token_weight(),
        temperature: ft.kd_temperature,
        divergence: ft.kd_divergence,
        token_divergence: ft.kd_token_divergence,
        jsd_beta: ft.jsd_beta,
        on_policy_weight: ft.live_teacher.as_ref().map_or(0.0, |l| l.weight),
        on_policy_divergence: ft
            .live_teacher
            .as_ref()
            .map_or(crate::config::Divergence::ReverseKl, |l| l.divergence),
    };
    let mut live = LiveTeacher::open(cfg, &loaded, &prompt, &train_rows)?;
    let train = build_examples(&loaded, &prompt, &train_rows, cfg, &token_kd)?;
    let train_alignment = alignment.get();
    if bridge.is_some() {
        let c = train_alignment;
        eprintln!(
            "finetune: cross-tokenizer token KD: {} of {} reply tokens ({:.1} %) align exactly with a teacher token (its alternatives mapped by bytes), {} compared by sorted probabilities (ULD)",
            c.exact,
            c.reply_tokens,
            100.0 * c.exact as f64 / c.reply_tokens.max(1) as f64,
            c.uld
        );
    }
    // Without val rows, the val loss is measured on (at most 8) train rows.
    let val = if val_rows.is_empty() {
        train.iter().take(8).cloned().collect()
    } else {
        build_examples(&loaded, &prompt, &val_rows, cfg, &token_kd)?
    };
    let n_train_examples: usize = train.iter().map(Vec::len).sum();
    // (Without val rows, `val` repeats train examples: count them once.)
    let val_own = if val_rows.is_empty() {
        &[][..]
    } else {
        &val[..]
    };
    let truncated = train
        .iter()
        .chain(val_own)
        .flatten()
        .filter(|e| e.truncated)
        .count();
    if truncated > 0 {
        eprintln!(
            "finetune: warning: {truncated} of {} examples are longer than max_seq_len = {} and were cut (the prompt from the left, then the reply); raise [finetune] max_seq_len to keep them whole",
            n_train_examples + val_own.iter().map(Vec::len).sum::<usize>(),
            ft.max_seq_len
        );
    }
    let micro = schedule(&train, cfg);
    let accum = ft.grad_accum.max(1);
    let total_steps = ft
        .max_steps
        .unwrap_or(usize::MAX)
        .min(micro.len().div_ceil(accum))
        .max(1);
    let arithmetic = match ft.precision {
        crate::config::Precision::F32 => "f32",
        crate::config::Precision::Bf16 => "bf16 mixed precision (bf16 products, f32 weights)",
    };
    eprintln!("finetune: {} train rows → {n_train_examples} examples, {} val rows, {total_steps} steps of {accum} × about {} sequences, {arithmetic}", train_rows.len(), val.len(), ft.batch_size);

    std::fs::create_dir_all(&out_dir)?;
    let hash = config_hash(&cfg.stage_view(Stage::Finetune));
    let inputs_hash = text_sha256(&serde_json::to_string(&inputs)?);
    // Hidden-state KD's maps train with the student, in its optimizer.
    let mut opt = AdamW::new(
        model.vars.iter().chain(extra).cloned().collect(),
        ft.weight_decay,
    )?;
    let mut state = match checkpoint::latest(&out_dir, &hash, &inputs_hash)? {
        Some((path, state)) => {
            let peer = peer.as_mut().map(|p| (&p.model, &mut p.opt));
            checkpoint::restore(&path, &state, &model, &mut opt, peer, extra)?;
            eprintln!(
                "finetune: resuming from {} (step {})",
                path.display(),
                state.step
            );
            state
        }
        None => {
            let val_before = mean_loss(&model, &val, pad, &weights, ft.batch_size)?;
            // The starting weights are the first candidate for "best": if training only
            // hurts the val loss, the student is exported unchanged.
            let best = (ft.eval_every > 0).then_some((0, val_before));
            if best.is_some() {
                checkpoint::save_best(&out_dir, &model)?;
            }
            checkpoint::State {
                step: 0,
                config_hash: hash.clone(),
                inputs_hash,
                val_before,
                losses: vec![],
                metrics: vec![],
                evals: best.into_iter().collect(),
                best,
            }
        }
    };
    let clip = (ft.max_grad_norm > 0.0).then_some(ft.max_grad_norm);
    let mut progress = Progress::new(
        "finetune",
        (total_steps - state.step.min(total_steps)) as u64,
    );
    while state.step < total_steps {
        let step = state.step;
        let lr = learning_rate(ft, step, total_steps);
        let t0 = std::time::Instant::now();
        let mut acc = opt.accumulator();
        let (mut loss, mut tokens) = (0.0, 0);
        let mut terms: [Vec<f64>; 9] = Default::default();
        let mut hidden_stats = HiddenStats::default();
        let mut peer_acc = peer.as_ref().map(|p| p.opt.accumulator());
        let (mut peer_loss, mut peer_mimicry) = (0.0, vec![]);
        let mut live_stats = LiveStats::default();
        if let Some(l) = live.as_mut() {
            l.before_step(&model, step, (&micro, accum), &mut live_stats)?;
        }
        let chunk = &micro[step * accum..((step + 1) * accum).min(micro.len())];
        for (k, examples) in chunk.iter().enumerate() {
            let prepared;
            let examples = match &live {
                Some(l) => {
                    prepared = l.prepare(examples.clone(), step, k, &mut live_stats)?;
                    &prepared
                }
                None => examples,
            };
            let batch = make_batch(examples, pad, model.device())?;
            let key = Some(dropout_key(cfg.seed, step, k));
            let (logits, states) =
                forward_with_states(&model, &batch, key, student_layers.as_deref())?;
            let mut parts = batch_loss(&logits, &batch, &weights)?;
            if let (Some(h), Some(states)) = (&hidden, &states) {
                h.add_terms(&mut parts, states, (&batch, examples), &mut hidden_stats)?;
            }
            let place = (step, k, chunk.len(), examples.len());
            if let (Some(p), Some(p_acc)) = (&peer, peer_acc.as_mut()) {
                let key = p.dropout_key(step, k);
                let theirs = p.learn_with(&batch, (&logits, &mut parts), &weights, key)?;
                let value = theirs.total.to_scalar::<f32>()? as f64;
                check_finite(value, "the peer's", place, &out_dir)?;
                p.opt.accumulate(p_acc, &theirs.total.backward()?)?;
                peer_loss += value / chunk.len() as f64;
                peer_mimicry.extend(theirs.mutual);
            }
            let value = parts.total.to_scalar::<f32>()? as f64;
            check_finite(value, "the", place, &out_dir)?;
            opt.accumulate(&mut acc, &parts.total.backward()?)?;
            loss += value / chunk.len() as f64;
            tokens += batch.tokens;
            for (slot, v) in terms.iter_mut().zip([
                parts.label,
                parts.rationale,
                parts.kd,
                parts.kd_token,
                parts.on_policy,
                parts.mutual,
                parts.feature,
                parts.relation,
                parts.uld,
            ]) {
                slot.extend(v);
            }
        }
        let grad_norm = opt.step(acc, lr, clip)?;
        if let (Some(p), Some(p_acc)) = (peer.as_mut(), peer_acc) {
            p.opt.step(p_acc, lr, clip)?;
        }
        let mean = |v: &Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        let secs = t0.elapsed().as_secs_f64();
        let live_secs =
            live_stats.sample_seconds + live_stats.score_seconds + live_stats.refresh_seconds;
        let train_secs = (secs - live_secs).max(1e-9);
        state.losses.push(loss);
        let mut metrics = serde_json::json!({
            "step": step + 1, "loss": loss, "label_loss": mean(&terms[0]),
            "rationale_loss": mean(&terms[1]), "kd_loss": mean(&terms[2]),
            "kd_token_loss": mean(&terms[3]), "uld_loss": mean(&terms[8]), "lr": lr,
            "grad_norm": grad_norm, "tokens": tokens,
            "tokens_per_second": tokens as f64 / secs.max(1e-9),
        });
        if live.is_some() {
            let extra = serde_json::json!({
                "on_policy_loss": mean(&terms[4]),
                "on_policy_rows": live_stats.on_policy_rows,
                "sample_tokens": live_stats.sampled_tokens,
                "sample_tokens_per_second": live_stats.sample_rate(),
                "score_tokens": live_stats.scored_tokens,
                "score_tokens_per_second": live_stats.score_rate(),
                "refresh_seconds": live_stats.refresh_seconds,
                "train_tokens_per_second": tokens as f64 / train_secs,
            });
            if let (Some(m), Some(e)) = (metrics.as_object_mut(), extra.as_object()) {
                m.extend(e.clone());
            }
        }
        if peer.is_some() {
            let extra = serde_json::json!({
                "mutual_loss": mean(&terms[5]), "peer_loss": peer_loss,
                "peer_mutual_loss": mean(&peer_mimicry),
            });
            if let (Some(m), Some(e)) = (metrics.as_object_mut(), extra.as_object()) {
                m.extend(e.clone());
            }
        }
        if hidden.is_some() {
            let extra = serde_json::json!({
                "feature_loss": mean(&terms[6]), "relation_loss": mean(&terms[7]),
                "hidden_teacher_seconds": hidden_stats.teacher_seconds,
                "hidden_teacher_tokens_per_second":
                    hidden_stats.teacher_tokens as f64 / hidden_stats.teacher_seconds.max(1e-9),
            });
            if let (Some(m), Some(e)) = (metrics.as_object_mut(), extra.as_object()) {
                m.extend(e.clone());
            }
        }
        state.metrics.push(metrics.to_string());
        let rate = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.0}"));
        if live.is_some() {
            progress.set_message(format!(
                "loss {loss:.3} · tok/s sample {} score {} train {:.0}",
                rate(live_stats.sample_rate()),
                rate(live_stats.score_rate()),
                tokens as f64 / train_secs
            ));
        } else if peer.is_some() {
            progress.set_message(format!("loss {loss:.3} · peer {peer_loss:.3}"));
        } else if hidden.is_some() {
            let term = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
            progress.set_message(format!(
                "loss {loss:.3} · feature {} relation {} · teacher {:.0} tok/s",
                term(mean(&terms[6])),
                term(mean(&terms[7])),
                hidden_stats.teacher_tokens as f64 / hidden_stats.teacher_seconds.max(1e-9)
            ));
        } else {
            progress.set_message(format!("loss {loss:.3}"));
        }
        progress.inc(tokens as u64);
        state.step += 1;
        if ft.eval_every > 0 && state.step % ft.eval_every == 0 && state.step < total_steps {
            let v = mean_loss(&model, &val, pad, &weights, ft.batch_size)?;
            state.evals.push((state.step, v));
            if state.best.is_none_or(|(_, b)| v < b) {
                state.best = Some((state.step, v));
                checkpoint::save_best(&out_dir, &model)?;
            }
            let since_best = state.step - state.best.map(|(s, _)| s).unwrap_or(0);
            let stale = since_best / ft.eval_every;
            if ft.early_stopping_patience.is_some_and(|p| stale >= p) {
                eprintln!(
                    "finetune: val loss has not improved for {stale} evaluations, stopping at step {}",
                    state.step
                );
                break;
            }
        }
        if ft.checkpoint_every > 0
            && state.step % ft.checkpoint_every == 0
            && state.step < total_steps
        {
            let peer = peer.as_ref().map(|p| (&p.model, &p.opt));
            checkpoint::save(&out_dir, &model, &opt, peer, extra, &state)?;
        }
    }
    let train_secs = progress.finish();
    let mut val_after = mean_loss(&model, &val, pad, &weights, ft.batch_size)?;
    let final_val = (state.step, val_after);
    // Export the weights with the lowest val loss seen.
    let mut exported_step = state.step;
    if let Some((best_step, best_val)) = state.best.filter(|(_, b)| *b < val_after) {
        checkpoint::load_best(&out_dir, &model)?;
        eprintln!("finetune: exporting the weights of step {best_step} (val loss {best_val:.3} < {val_after:.3} at the end)");
        (val_after, exported_step) = (best_val, best_step);
    }
    let step = state.step;
    let (losses, val_before) = (&state.losses, state.val_before);

    let metrics_path = out_dir.join("metrics.jsonl");
    let mut text = state.metrics.join("\n");
    text.push('\n');
    write_bytes(&metrics_path, text.as_bytes())?;
    let svg_path = out_dir.join("loss.svg");
    let rates: Vec<f64> = (0..losses.len())
        .map(|i| learning_rate(ft, i, total_steps))
        .collect();
    let mut vals = vec![(0, val_before)];
    vals.extend(state.evals.iter().copied().filter(|e| e.0 != final_val.0));
    vals.push(final_val);
    let curves = plots::Curves {
        train: losses,
        learning_rate: &rates,
        val: &vals,
    };
    write_bytes(&svg_path, plots::training_curves(&curves)?.as_bytes())?;
    let eos_text = loaded
        .tokenizer
        .id_to_token(loaded.eos_token_id)
        .unwrap_or_default();
    llama::export::export(
        &student_dir,
        &model,
        &loaded.tokenizer_json()?,
        &loaded.chat,
        (&eos_text, &cfg.student.model),
    )?;

    let summary = serde_json::json!({
        "steps": step, "train_rows": train_rows.len(), "train_examples": n_train_examples,
        "truncated_examples": truncated,
        "val_loss_before": val_before, "val_loss_after": val_after,
        "first_loss": losses.first(), "last_loss": losses.last(), "seconds": train_secs,
        "objective": ft.objective, "student": cfg.student.model,
        "evals": state.evals, "exported_step": exported_step,
        "mutual_peer": peer.as_ref().map(|p| &p.path),
        "hidden_kd_teacher": hidden.as_ref().map(|h| &h.path),
        "cross_tokenizer_alignment": bridge.is_some().then_some(train_alignment),
    });
    let mut m = Manifest::new(Stage::Finetune, hash, cfg.seed);
    m.inputs = inputs;
    m.outputs = vec![entry(&metrics_path, Some(step))?, entry(&svg_path, None)?];
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        m.outputs.push(entry(&student_dir.join(f), None)?);
    }
    m.summary = summary;
    m.write(&out_dir)?;
    let _ = std::io::stderr().flush();
    eprintln!("finetune: {step} steps in {train_secs:.0} s, val loss {val_before:.3} → {val_after:.3}; student → {}", student_dir.display());
    Ok(student_dir)
}

/// The bridge between the teacher's vocabulary (its tokenizer read from `[teacher]
/// model`) and the student's, for cross-tokenizer token KD. The rows' ids must index
/// that vocabulary (their fingerprint says so) and hold its own distribution.
fn open_bridge(cfg: &Config, student: &LoadedModel, rows: &[CuratedRow]) -> Result<VocabBridge> {
    let path = &cfg.teacher.model;
    let teacher = llama::load_tokenizer(path).with_context(|| {
        format!("[finetune] token_kd = \"cross\" reads the teacher's tokenizer from [teacher] model = {path:?}")
    })?;
    let with_ids: Vec<&CuratedRow> = rows.iter().filter(|r| !r.tokens.ids.is_empty()).collect();
    data::check_distribution_temperature(&with_ids)?;
    let expected = llama::vocab::fingerprint(&teacher);
    if let Some(r) = with_ids
        .iter()
        .find(|r| !r.tokens.vocab.is_empty() && r.tokens.vocab != expected)
    {
        bail!(
            "[finetune] token_kd = \"cross\" reads the rows' token ids with the tokenizer of [teacher] model = {path:?}, and row {:?}'s ids index another vocabulary (fingerprint {}, the model's {expected})\nhint: set [teacher] model to the model that generated the rows",
            r.id,
            r.tokens.vocab
        );
    }
    let bridge = VocabBridge::new(&teacher, &student.tokenizer)?;
    eprintln!(
        "finetune: cross-tokenizer token KD: {:.1} % of the teacher's {} tokens are a student token (same bytes)",
        100.0 * bridge.shared_share(),
        teacher.get_vocab_size(true)
    );
    Ok(bridge)
}

/// Whether a folder holds an exported student.
pub fn is_student_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file() && dir.join("model.safetensors").is_file()
}

fn open_device(name: &str) -> Result<Device> {
    match crate::config::parse_device(name)? {
        None => Ok(Device::Cpu),
        Some(n) => Device::new_cuda(n).map_err(|e| {
            anyhow::anyhow!(
                "cannot open CUDA device {n} for [finetune] device = {name:?}: {e}\nhint: build kdpipe with --features cuda on a machine with an NVIDIA GPU and the CUDA toolkit, or set device = \"cpu\""
            )
        }),
    }
}
