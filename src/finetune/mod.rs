//! finetune: curated rows → a trained student in Hugging Face format.
//!
//! Read top to bottom: load the student, build the examples, measure the val loss, train
//! with AdamW (linear warmup, cosine decay), measure the val loss again, export.

pub mod data;
pub mod loss;
pub mod optim;
mod svg;

use crate::config::Config;
use crate::io::atomic::write_bytes;
use crate::io::manifest::{config_hash, entry, FileEntry, Manifest};
use crate::io::parquet::read_frame;
use crate::progress::Progress;
use crate::prompts::Prompt;
use crate::records::CuratedRow;
use crate::student::{self, Decoder, LoadedModel};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use data::{batches, row_examples, Example};
use loss::{make_batch, step_by_step_loss, token_nll};
use std::io::Write;
use std::path::{Path, PathBuf};

pub fn input_entries(cfg: &Config) -> Result<Vec<FileEntry>> {
    let dir = cfg.stage_dir("curate");
    Manifest::read(&dir, "curate")?;
    ["train", "val"]
        .iter()
        .map(|s| entry(&dir.join(format!("{s}.parquet")), None))
        .collect()
}

fn read_split(cfg: &Config, split: &str) -> Result<Vec<CuratedRow>> {
    let path = cfg.stage_dir("curate").join(format!("{split}.parquet"));
    CuratedRow::from_frame(&read_frame(&path)?, &path)
}

/// The examples of each row (its views), row by row.
fn build_examples(
    model: &LoadedModel,
    prompt: &Prompt,
    rows: &[CuratedRow],
    cfg: &Config,
) -> Result<Vec<Vec<Example>>> {
    let ft = &cfg.finetune;
    rows.iter()
        .map(|r| {
            row_examples(model, prompt, r, ft.objective, ft.max_seq_len)
                .with_context(|| format!("cannot build examples for row {:?}", r.id))
        })
        .collect()
}

/// Mean loss over rows' examples without gradients (val loss), in fixed batches.
fn mean_loss(
    model: &Decoder,
    rows: &[Vec<Example>],
    pad: u32,
    alpha: f64,
    batch: usize,
) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0);
    for chunk in batches(rows.to_vec(), batch, 0) {
        let b = make_batch(&chunk, pad, model.device())?;
        let logits = model.forward(&b.ids, &b.attention)?;
        let parts = step_by_step_loss(&token_nll(&logits, &b.ids)?, &b, alpha)?;
        sum += parts.total.to_scalar::<f32>()? as f64;
        n += 1;
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

fn learning_rate(base: f64, step: usize, total: usize) -> f64 {
    let warmup = (total / 10).max(1);
    if step < warmup {
        base * (step + 1) as f64 / warmup as f64
    } else {
        let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        base * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
    }
}

pub fn run(cfg: &Config) -> Result<PathBuf> {
    let ft = &cfg.finetune;
    let out_dir = cfg.stage_dir("finetune");
    let student_dir = cfg.stage_dir("student");
    let inputs = input_entries(cfg)?;
    let train_rows = read_split(cfg, "train")?;
    let val_rows = read_split(cfg, "val")?;
    if train_rows.is_empty() {
        bail!("the train split is empty: nothing to learn from\nhint: generate more rows or loosen [curate] rules");
    }
    let device = Device::Cpu;
    let prompt = Prompt::load(cfg)?;
    let loaded = student::load(&cfg.student.model, &device)?;
    let freeze = ft.freeze_embeddings;
    let tied = loaded.shape.tie_word_embeddings;
    let model = loaded.decoder(&device, |name| {
        !(freeze && (name == "model.embed_tokens.weight" || (tied && name == "lm_head.weight")))
    })?;
    let pad = loaded.eos_token_id;
    let train = build_examples(&loaded, &prompt, &train_rows, cfg)?;
    // Without val rows, the val loss is measured on (at most 8) train rows.
    let val = if val_rows.is_empty() {
        train.iter().take(8).cloned().collect()
    } else {
        build_examples(&loaded, &prompt, &val_rows, cfg)?
    };
    let n_train_examples: usize = train.iter().map(Vec::len).sum();

    let per_epoch = batches(train.clone(), ft.batch_size, cfg.seed).len();
    let total_steps = ft
        .max_steps
        .unwrap_or(usize::MAX)
        .min(per_epoch * ft.epochs)
        .max(1);
    eprintln!("finetune: {} train rows → {n_train_examples} examples, {} val rows, {total_steps} steps of about {} sequences", train_rows.len(), val.len(), ft.batch_size);

    let val_before = mean_loss(&model, &val, pad, ft.alpha, ft.batch_size)?;
    let params = ParamsAdamW {
        lr: ft.learning_rate,
        weight_decay: ft.weight_decay,
        ..Default::default()
    };
    let mut opt = AdamW::new(model.vars.iter().map(|(_, v)| v.clone()).collect(), params)?;

    std::fs::create_dir_all(&out_dir)?;
    let metrics_path = out_dir.join("metrics.jsonl");
    let mut metrics_lines = Vec::new();
    let mut losses = Vec::new();
    let mut progress = Progress::new("finetune", total_steps as u64);
    let mut step = 0;
    'epochs: for epoch in 0..ft.epochs {
        for batch_examples in batches(
            train.clone(),
            ft.batch_size,
            cfg.seed.wrapping_add(epoch as u64),
        ) {
            if step >= total_steps {
                break 'epochs;
            }
            let lr = learning_rate(ft.learning_rate, step, total_steps);
            opt.set_learning_rate(lr);
            let t0 = std::time::Instant::now();
            let batch = make_batch(&batch_examples, pad, &device)?;
            let logits = model.forward(&batch.ids, &batch.attention)?;
            let parts = step_by_step_loss(&token_nll(&logits, &batch.ids)?, &batch, ft.alpha)?;
            opt.backward_step(&parts.total)?;
            let loss = parts.total.to_scalar::<f32>()? as f64;
            if !loss.is_finite() {
                bail!(
                    "the loss became {loss} at step {step}\nhint: lower [finetune] learning_rate"
                );
            }
            let secs = t0.elapsed().as_secs_f64();
            losses.push(loss);
            metrics_lines.push(
                serde_json::json!({
                    "step": step + 1, "epoch": epoch, "loss": loss, "label_loss": parts.label,
                    "rationale_loss": parts.rationale, "lr": lr, "tokens": batch.tokens,
                    "tokens_per_second": batch.tokens as f64 / secs.max(1e-9),
                })
                .to_string(),
            );
            progress.set_message(format!("loss {loss:.3}"));
            progress.inc(batch.tokens as u64);
            step += 1;
        }
    }
    let train_secs = progress.finish();
    let val_after = mean_loss(&model, &val, pad, ft.alpha, ft.batch_size)?;

    let mut text = metrics_lines.join("\n");
    text.push('\n');
    write_bytes(&metrics_path, text.as_bytes())?;
    let svg_path = out_dir.join("loss.svg");
    write_bytes(&svg_path, svg::loss_curve(&losses).as_bytes())?;
    let eos_text = loaded
        .tokenizer
        .id_to_token(loaded.eos_token_id)
        .unwrap_or_default();
    student::export::export(
        &student_dir,
        &model,
        &loaded.tokenizer_json,
        &loaded.chat,
        &eos_text,
    )?;

    let summary = serde_json::json!({
        "steps": step, "train_rows": train_rows.len(), "train_examples": n_train_examples,
        "val_loss_before": val_before, "val_loss_after": val_after,
        "first_loss": losses.first(), "last_loss": losses.last(), "seconds": train_secs,
        "objective": ft.objective, "student": cfg.student.model,
    });
    let mut m = Manifest::new(
        "finetune",
        config_hash(&cfg.stage_view("finetune")),
        cfg.seed,
    );
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

/// Whether a folder holds an exported student.
pub fn is_student_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file() && dir.join("model.safetensors").is_file()
}
