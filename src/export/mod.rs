//! export: the finetuned student as files people deploy. One GGUF per configured type
//! (`[export] gguf`), written by `llama::gguf_write` from the exported Hugging Face folder
//! (the student's weights) and the base model's GGUF header (its tokenizer and chat
//! template), so llama.cpp, Ollama, mistralrs and kdpipe's own engine load them as they
//! are. The folder appears only once every file is complete; the manifest records each
//! file's digest, size and tensor types.

use crate::config::{Config, Stage};
use crate::io::atomic::StagedDir;
use crate::io::manifest::{config_hash, entry, staged_entry, FileEntry, Manifest};
use crate::llama::{self, gguf_write};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The student files export reads (finetune's output), for `run`'s up-to-date check.
pub fn input_entries(cfg: &Config) -> Result<Vec<FileEntry>> {
    Manifest::read(&cfg.stage_dir(Stage::Finetune), Stage::Finetune)?;
    let dir = cfg.student_dir();
    ["config.json", "model.safetensors"]
        .iter()
        .map(|f| entry(&dir.join(f), None))
        .collect()
}

/// The base model whose GGUF header holds the tokenizer and chat template.
fn tokenizer_source(cfg: &Config) -> Result<PathBuf> {
    let base = PathBuf::from(&cfg.student.model);
    if !is_gguf(&base) || !base.is_file() {
        bail!(
            "[export] gguf copies the tokenizer and chat template from the student's base GGUF, and [student] model = {:?} is not a GGUF file\nhint: train from the model's GGUF (scripts/fetch-models.sh fetches them), or convert the exported folder {} with llama.cpp's convert_hf_to_gguf.py",
            cfg.student.model,
            cfg.student_dir().display()
        );
    }
    Ok(base)
}

pub fn run(cfg: &Config) -> Result<PathBuf> {
    let started = Instant::now();
    let ex = cfg.export.clone().unwrap_or_default();
    if ex.gguf.is_empty() {
        bail!("[export] gguf is empty: nothing to export\nhint: list types, e.g. gguf = [\"q8_0\", \"q4_k_m\"]");
    }
    let student_dir = cfg.student_dir();
    let inputs = input_entries(cfg).with_context(|| {
        format!(
            "export reads the finetuned student in {}\nhint: run kdpipe finetune --config … first",
            student_dir.display()
        )
    })?;
    let base = tokenizer_source(cfg)?;
    let mut extra = gguf_write::tokenizer_metadata(&base)?;
    extra.push((
        "general.name".into(),
        candle_core::quantized::gguf_file::Value::String(format!("{} (kdpipe student)", cfg.name)),
    ));
    let student = llama::load(
        &student_dir.display().to_string(),
        &candle_core::Device::Cpu,
    )?;
    let out_dir = cfg.stage_dir(Stage::Export);
    let staged = StagedDir::begin(&out_dir)?;
    let mut outputs = vec![];
    let mut files = vec![];
    for &ftype in &ex.gguf {
        let t0 = Instant::now();
        let path = staged
            .path()
            .join(format!("{}-{}.gguf", cfg.name, ftype.as_str()));
        let counts = gguf_write::write(&path, &student.shape, &student.weights, ftype, &extra)?;
        let bytes = std::fs::metadata(&path)?.len();
        let shown = staged.final_path(&path);
        eprintln!(
            "export: {} → {} ({:.1} MB, {:.1} s; tensors {:?})",
            ftype.as_str(),
            shown.display(),
            bytes as f64 / 1e6,
            t0.elapsed().as_secs_f64(),
            counts
        );
        outputs.push(staged_entry(&staged, &path, None)?);
        files.push(serde_json::json!({
            "type": ftype.as_str(), "file": shown.display().to_string(), "bytes": bytes,
            "tensor_types": counts, "seconds": t0.elapsed().as_secs_f64(),
        }));
    }
    let mut m = Manifest::new(
        Stage::Export,
        config_hash(&cfg.stage_view(Stage::Export)),
        cfg.seed,
    );
    m.inputs = inputs;
    m.outputs = outputs;
    m.summary = serde_json::json!({
        "gguf": files,
        "tokenizer_from": base.display().to_string(),
        "student": student_dir.display().to_string(),
    });
    m.write(staged.path())?;
    staged.commit()?;
    eprintln!(
        "export: {} file(s) in {:.0} s → {}",
        ex.gguf.len(),
        started.elapsed().as_secs_f64(),
        out_dir.display()
    );
    Ok(out_dir)
}

/// Whether `path` names a GGUF file.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}
