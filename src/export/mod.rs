//! export: the finetuned student as files people deploy. One GGUF per configured type
//! (`[export] gguf`), written by `llama::gguf_write` from the exported Hugging Face folder
//! (the student's weights) and the base model's GGUF header (its tokenizer and chat
//! template; for a Hugging Face base, its tokenizer.json converted), so llama.cpp, Ollama, mistralrs and kdpipe's own engine load them as they
//! are. The folder appears only once every file is complete; the manifest records each
//! file's digest, size and tensor types. Beside them, the model card (`card`), rewritten
//! whenever export runs and, in `kdpipe run`, after eval.

pub mod card;
pub mod data;
pub mod distillkit;

use crate::config::{Config, Stage};
use crate::io::atomic::{write_bytes, StagedDir};
use crate::io::manifest::{config_hash, entry, staged_entry, FileEntry, Manifest};
use crate::llama::{self, gguf_tokenizer, gguf_write};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
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

/// Where the GGUF's tokenizer and chat template come from.
enum TokenizerSource {
    /// The student's base GGUF: its `tokenizer.*` keys, copied as they are.
    BaseGguf(PathBuf),
    /// A Hugging Face base: the student folder's tokenizer.json and tokenizer_config.json
    /// (finetune wrote the base's), converted.
    StudentFolder(PathBuf),
}

impl TokenizerSource {
    fn of(cfg: &Config) -> Result<TokenizerSource> {
        let base = PathBuf::from(&cfg.student.model);
        if is_gguf(&base) && base.is_file() {
            return Ok(TokenizerSource::BaseGguf(base));
        }
        let folder = cfg.student_dir();
        if !folder.join("tokenizer.json").is_file() {
            bail!(
                "[export] gguf needs the student's tokenizer: [student] model = {:?} is not a GGUF file, and {} has no tokenizer.json\nhint: run kdpipe finetune --config … again",
                cfg.student.model,
                folder.display()
            );
        }
        Ok(TokenizerSource::StudentFolder(folder))
    }

    fn metadata(&self, vocab_size: usize) -> Result<Vec<(String, Value)>> {
        match self {
            TokenizerSource::BaseGguf(base) => gguf_write::tokenizer_metadata(base),
            TokenizerSource::StudentFolder(dir) => gguf_tokenizer::from_hf_folder(dir, vocab_size),
        }
    }

    fn path(&self) -> &Path {
        match self {
            TokenizerSource::BaseGguf(p) | TokenizerSource::StudentFolder(p) => p,
        }
    }
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
    let tokenizer = TokenizerSource::of(cfg)?;
    let student = llama::load(
        &student_dir.display().to_string(),
        &candle_core::Device::Cpu,
    )?;
    let mut extra = tokenizer.metadata(student.shape.vocab_size)?;
    extra.push((
        "general.name".into(),
        Value::String(format!("{} (kdpipe student)", cfg.name)),
    ));
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
        "tokenizer_from": tokenizer.path().display().to_string(),
        "student": student_dir.display().to_string(),
    });
    m.write(staged.path())?;
    staged.commit()?;
    write_card(cfg)?;
    eprintln!(
        "export: {} file(s) in {:.0} s → {}",
        ex.gguf.len(),
        started.elapsed().as_secs_f64(),
        out_dir.display()
    );
    Ok(out_dir)
}

/// Write the model card (`README.md`) into the export folder from the run's manifests
/// and reports as they are now. Not among the export's outputs: eval results arriving
/// later change the card, not whether the GGUFs are current.
pub fn write_card(cfg: &Config) -> Result<PathBuf> {
    let dir = cfg.stage_dir(Stage::Export);
    let m = Manifest::read(&dir, Stage::Export)?;
    let files: Vec<(String, String, u64, String)> = m.summary["gguf"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            let file = f["file"].as_str().unwrap_or_default().to_string();
            let sha = m
                .outputs
                .iter()
                .find(|o| o.path == file)
                .map(|o| o.sha256.clone())
                .unwrap_or_default();
            (
                f["type"].as_str().unwrap_or_default().to_string(),
                file,
                f["bytes"].as_u64().unwrap_or(0),
                sha,
            )
        })
        .collect();
    // The card shows the training curves and the funnel: copied in, so the folder stands
    // alone when it is uploaded.
    let mut images = vec![];
    for (stage, file) in [(Stage::Finetune, "loss.svg"), (Stage::Curate, "funnel.svg")] {
        let from = cfg.stage_dir(stage).join(file);
        if let Ok(bytes) = std::fs::read(&from) {
            write_bytes(&dir.join(file), &bytes)?;
            images.push(file);
        }
    }
    let path = dir.join("README.md");
    write_bytes(&path, card::render(cfg, &files, &images).as_bytes())?;
    Ok(path)
}

/// Whether `path` names a GGUF file.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}
