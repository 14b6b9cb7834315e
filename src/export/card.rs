//! The model card (`README.md` in the export folder, Hugging Face's convention): what the
//! student is, where it came from and how well it does, from the manifests and reports
//! the stages wrote. Every fact is read from a file of the run; a stage that has not run
//! is said to be missing, never guessed.

use crate::config::{Config, Stage};
use crate::io::manifest::Manifest;
use serde_json::Value;
use std::fmt::Write;
use std::path::Path;

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn manifest(cfg: &Config, stage: Stage) -> Option<Manifest> {
    Manifest::read(&cfg.stage_dir(stage), stage).ok()
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// A file's name, for a table cell.
fn base_name(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(path)
}

/// The card's text. `files` are the export's GGUFs as its manifest records them
/// (type, file, bytes, sha256); `images` the pictures beside the card (loss.svg,
/// funnel.svg).
pub fn render(cfg: &Config, files: &[(String, String, u64, String)], images: &[&str]) -> String {
    let mut md = String::new();
    let student = base_name(&cfg.student.model);
    let _ = writeln!(
        md,
        "---\nbase_model: {student}\ntags:\n- kdpipe\n- distillation\n- gguf\n---\n"
    );
    let _ = writeln!(md, "# {}: a student distilled by kdpipe\n", cfg.name);
    let task = &cfg.task;
    let _ = writeln!(
        md,
        "**Task** ({:?}): {}{}\n",
        task.kind,
        task.description,
        if task.labels.is_empty() {
            String::new()
        } else {
            format!(" Labels: {}.", task.labels.join(", "))
        }
    );
    let _ = writeln!(
        md,
        "**Student**: `{}`, trained from `{}`. **Teacher(s)**: {}.\n",
        cfg.name,
        cfg.student.model,
        cfg.teachers()
            .iter()
            .map(|t| format!("`{}`", t.model))
            .collect::<Vec<_>>()
            .join(", ")
    );

    md.push_str("## Files\n\n| file | type | size | sha256 |\n|---|---|---:|---|\n");
    for (kind, file, bytes, sha) in files {
        let _ = writeln!(
            md,
            "| `{}` | {kind} | {} | `{sha}` |",
            base_name(file),
            mb(*bytes)
        );
    }
    if let Some((_, file, _, _)) = files.last() {
        let _ = writeln!(
            md,
            "\nRun it with llama.cpp: `llama-cli -m {0} -cnv`, or Ollama: a `Modelfile` with `FROM ./{0}`.\n",
            base_name(file)
        );
    }

    md.push_str("## Data lineage\n\n");
    match manifest(cfg, Stage::Generate) {
        Some(g) => {
            md.push_str("| input file | sha256 |\n|---|---|\n");
            for e in &g.inputs {
                let _ = writeln!(md, "| `{}` | `{}` |", e.path, e.sha256);
            }
            let s = &g.summary;
            let _ = writeln!(
                md,
                "\nThe teacher wrote {} rows ({} parsed; {} prompt and {} completion tokens).\n",
                s["rows"], s["parsed"], s["prompt_tokens"], s["completion_tokens"]
            );
        }
        None => md.push_str("No generate manifest in this run.\n\n"),
    }
    match read_json(&cfg.stage_dir(Stage::Curate).join("report.json")) {
        Some(c) => {
            let _ = writeln!(
                md,
                "Curation kept {} of {} rows; splits {}.\n\n| rule | removed | rows after |\n|---|---:|---:|",
                c["rows_out"], c["rows_in"], c["splits"]
            );
            for f in c["funnel"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} |",
                    f["rule"].as_str().unwrap_or(""),
                    f["removed"],
                    f["rows_after"]
                );
            }
            md.push('\n');
            if images.contains(&"funnel.svg") {
                md.push_str("![curation funnel](funnel.svg)\n\n");
            }
        }
        None => md.push_str("No curate report in this run.\n\n"),
    }

    md.push_str("## Training\n\n");
    match manifest(cfg, Stage::Finetune) {
        Some(f) => {
            let s = &f.summary;
            let _ = writeln!(
                md,
                "Objective `{}`, {} steps on {} train rows ({} examples) in {:.0} s; val loss {:.3} → {:.3}.\n",
                s["objective"].as_str().unwrap_or(""),
                s["steps"],
                s["train_rows"],
                s["train_examples"],
                s["seconds"].as_f64().unwrap_or(0.0),
                s["val_loss_before"].as_f64().unwrap_or(f64::NAN),
                s["val_loss_after"].as_f64().unwrap_or(f64::NAN)
            );
            if images.contains(&"loss.svg") {
                md.push_str("![training and validation loss, learning rate](loss.svg)\n\n");
            }
            if let Ok(text) = toml::to_string_pretty(&cfg.finetune) {
                let _ = writeln!(md, "```toml\n[finetune]\n{}```\n", text);
            }
        }
        None => md.push_str("No finetune manifest in this run.\n\n"),
    }

    md.push_str("## Evaluation\n\n");
    match read_json(&cfg.stage_dir(Stage::Eval).join("report.json")) {
        Some(e) => {
            let _ = writeln!(
                md,
                "On {} ({} rows with gold); 95 % Wilson intervals; costs are wall-clock on {} CPU threads.\n\n| model | accuracy | 95 % interval | no answer | s / example | tokens / s | peak RSS | size |\n|---|---:|---:|---:|---:|---:|---:|---:|",
                e["source"].as_str().unwrap_or(""),
                e["rows"],
                e["threads"]
            );
            for m in e["models"].as_array().into_iter().flatten() {
                let (correct, rows) = (
                    m["correct"].as_u64().unwrap_or(0) as usize,
                    m["rows"].as_u64().unwrap_or(0) as usize,
                );
                let (lo, hi) = crate::stats::wilson_95(correct, rows);
                let _ = writeln!(
                    md,
                    "| {} | {:.1} % | {:.0}–{:.0} % | {:.1} % | {:.2} | {} | {} | {} |",
                    m["name"].as_str().unwrap_or(""),
                    100.0 * m["accuracy"].as_f64().unwrap_or(0.0),
                    100.0 * lo,
                    100.0 * hi,
                    100.0 * m["parse_failure_rate"].as_f64().unwrap_or(0.0),
                    m["seconds_per_example"].as_f64().unwrap_or(0.0),
                    m["tokens_per_second"]
                        .as_f64()
                        .map(|t| format!("{t:.1}"))
                        .unwrap_or_else(|| "—".into()),
                    m["peak_rss_bytes"].as_u64().map(mb).unwrap_or_else(|| "—".into()),
                    m["size_bytes"].as_u64().map(mb).unwrap_or_else(|| "—".into())
                );
            }
            md.push('\n');
        }
        None => md.push_str(
            "Not evaluated yet: `kdpipe eval` (with `models = [..., \"exported\"]` to score these files) rewrites this card when it runs in `kdpipe run`.\n\n",
        ),
    }
    let _ = writeln!(
        md,
        "Written by kdpipe {} from the run's manifests.",
        env!("CARGO_PKG_VERSION")
    );
    md
}
