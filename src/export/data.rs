//! `kdpipe export-data`: the curated splits as the data sets torch trainers read, for a
//! student that outgrows kdpipe's own trainer. Each curated row gives the examples kdpipe
//! trains on (finetune's `[finetune] objective`), one JSON line each:
//!
//! - the **label** view: the student's prompt, the label as the reply (gold for
//!   `label_only` or `[finetune] labels = "gold"`, else the teacher's answer);
//! - the **rationale** view (`step_by_step`): the teacher's rationale, then the answer line
//!   (with gold labels, only on rows whose answer agrees with gold);
//! - the **teacher** view, where generate kept the teacher's token top-k: the teacher's
//!   own reply, its token ids, and at each of them the teacher's alternatives (ids or
//!   texts) with their natural-log probabilities (temperature 1), for a token-level KD loss.
//!
//! Formats: `trl` (TRL's conversational prompt / completion columns: SFTTrainer trains on
//! the completion only) and `axolotl` (a `messages` list, axolotl's `chat_template` type),
//! both JSON lines with the same id, view and teacher columns; and `distillkit`
//! (`distillkit.rs`: the teacher view alone, tokenized by the student, as DistillKit's
//! offline-teacher Parquet). Output: `<run>/export_data/<format>/` with one file a split,
//! a README.md on loading them, and a manifest.

use super::distillkit;
use crate::config::{Config, LabelSource, Objective, Stage};
use crate::io::atomic::{write_bytes, write_with, StagedDir};
use crate::io::manifest::{config_hash, entry, staged_entry, FileEntry, Manifest};
use crate::io::parquet::{read_frame, write_frame};
use crate::prompts::{Prompt, View};
use crate::records::CuratedRow;
use crate::task::ANSWER_MARKER;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The curated splits, in order.
const SPLITS: [&str; 3] = ["train", "val", "test"];

/// Which trainer's layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    Trl,
    Axolotl,
    DistillKit,
}

impl DataFormat {
    pub fn parse(name: &str) -> Result<DataFormat> {
        match name {
            "trl" => Ok(DataFormat::Trl),
            "axolotl" => Ok(DataFormat::Axolotl),
            "distillkit" => Ok(DataFormat::DistillKit),
            other => {
                bail!("unknown data format {other:?}\nhint: --format trl, axolotl or distillkit")
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataFormat::Trl => "trl",
            DataFormat::Axolotl => "axolotl",
            DataFormat::DistillKit => "distillkit",
        }
    }

    /// The chat of one example in this layout.
    fn chat(self, prompt: &str, reply: &str) -> serde_json::Map<String, Value> {
        let user = json!({"role": "user", "content": prompt});
        let assistant = json!({"role": "assistant", "content": reply});
        let mut chat = serde_json::Map::new();
        match self {
            // TRL's conversational prompt-completion type: loss on the completion only.
            DataFormat::Trl => {
                chat.insert("prompt".into(), json!([user]));
                chat.insert("completion".into(), json!([assistant]));
            }
            DataFormat::Axolotl | DataFormat::DistillKit => {
                chat.insert("messages".into(), json!([user, assistant]));
            }
        }
        chat
    }
}

/// The folder `export-data` writes a format to.
pub fn out_dir(cfg: &Config, format: DataFormat) -> PathBuf {
    cfg.stage_dir(Stage::ExportData).join(format.as_str())
}

/// One example of a row: its view, prompt and reply, and the teacher's tokens where the
/// view is the teacher's own reply.
struct ViewExample<'a> {
    view: &'static str,
    prompt: String,
    reply: String,
    teacher: Option<&'a crate::records::TokenTopk>,
}

/// The examples of one curated row, as finetune builds them (`CuratedRow::targets`).
fn examples<'a>(
    prompt: &Prompt,
    (objective, labels): (Objective, LabelSource),
    row: &'a CuratedRow,
) -> Result<Vec<ViewExample<'a>>> {
    let user = |view: View| prompt.student_chat(view, &row.input)[0].content.clone();
    let targets = row.targets(objective, labels)?;
    let label = targets.label;
    let mut out = vec![ViewExample {
        view: "label",
        prompt: user(View::Label),
        reply: label.clone(),
        teacher: None,
    }];
    if targets.rationale {
        out.push(ViewExample {
            view: "rationale",
            prompt: user(View::Rationale),
            reply: format!("{}\n{ANSWER_MARKER} {label}", row.rationale.trim()),
            teacher: None,
        });
    }
    let t = &row.tokens;
    let aligned = !t.ids.is_empty() || !t.texts.is_empty();
    let n = t.ids.len().max(t.texts.len());
    if targets.teacher_tokens && aligned && t.top_logprobs.len() == n {
        out.push(ViewExample {
            view: "teacher",
            prompt: user(View::Rationale),
            reply: row.raw.clone(),
            teacher: Some(t),
        });
    }
    Ok(out)
}

/// One JSON line: the chat in `format`'s layout and the columns every format shares.
fn line(format: DataFormat, row: &CuratedRow, ex: &ViewExample) -> Value {
    let mut v = format.chat(&ex.prompt, &ex.reply);
    let empty = crate::records::TokenTopk::default();
    let t = ex.teacher.unwrap_or(&empty);
    let fields = json!({
        "id": row.id,
        "sample": row.sample,
        "view": ex.view,
        "gold": row.gold,
        "teacher_answer": row.answer,
        "teacher_token_ids": t.ids,
        "teacher_token_texts": t.texts,
        "teacher_topk_ids": t.top_ids,
        "teacher_topk_texts": t.top_texts,
        "teacher_topk_logprobs": t.top_logprobs,
        "teacher_topk_temperature": t.temperature,
        "teacher_vocab": t.vocab,
    });
    if let Value::Object(more) = fields {
        v.extend(more);
    }
    Value::Object(v)
}

/// The curated split files export-data reads (those curate wrote).
pub fn input_entries(cfg: &Config) -> Result<Vec<FileEntry>> {
    let dir = cfg.stage_dir(Stage::Curate);
    Manifest::read(&dir, Stage::Curate).with_context(|| {
        format!(
            "export-data reads the curated splits in {}\nhint: run kdpipe curate --config … first",
            dir.display()
        )
    })?;
    SPLITS
        .iter()
        .map(|s| dir.join(format!("{s}.parquet")))
        .filter(|p| p.is_file())
        .map(|p| entry(&p, None))
        .collect()
}

pub fn run(cfg: &Config, format: DataFormat) -> Result<PathBuf> {
    let inputs = input_entries(cfg)?;
    let prompt = Prompt::load(cfg)?;
    let out = out_dir(cfg, format);
    // DistillKit's rows are the student's token ids: its tokenizer and chat template.
    let student = match format {
        DataFormat::DistillKit => Some(crate::llama::load_for_inference(&cfg.student.model)?),
        _ => None,
    };
    let staged = StagedDir::begin(&out)?;
    let mut outputs = Vec::new();
    let mut counts = serde_json::Map::new();
    let mut shape = (0, 0);
    for split in SPLITS {
        let path = cfg
            .stage_dir(Stage::Curate)
            .join(format!("{split}.parquet"));
        if !path.is_file() {
            continue;
        }
        let rows = CuratedRow::from_frame(&read_frame(&path)?, &path)?;
        let (file, summary) = match &student {
            Some(model) => {
                let file = staged.path().join(format!("{split}.parquet"));
                let max_len = cfg.finetune.max_seq_len;
                let (seqs, c) = distillkit::sequences(model, &prompt, &rows, max_len)?;
                if seqs.is_empty() && split == "train" {
                    bail!("no train row of {} kept the teacher's token ids and top-k, which DistillKit trains on\nhint: generate with a local teacher and [generate] token_topk = 20, then curate again", path.display());
                }
                if seqs.is_empty() {
                    // `datasets` refuses a split file without rows: leave it out.
                    eprintln!("export-data: {split}: 0 sequences of {} rows, no file (datasets refuses an empty split)", c.rows);
                    counts.insert(split.into(), json!({"rows": c.rows, "sequences": 0}));
                    continue;
                }
                let mut df = distillkit::frame(&seqs, c.length, c.k, model.eos_token_id)?;
                write_frame(&file, &mut df)?;
                eprintln!(
                    "export-data: {split}: {} rows → {} sequences of {} tokens, top-{} ({} without the teacher's top-k, {} cut to max_seq_len {max_len})",
                    c.rows, seqs.len(), c.length, c.k, c.without_topk, c.truncated
                );
                shape = (shape.0.max(c.length), shape.1.max(c.k));
                let summary = json!({"rows": c.rows, "sequences": seqs.len(), "length": c.length,
                    "k": c.k, "without_topk": c.without_topk, "truncated": c.truncated});
                (file, (seqs.len(), summary))
            }
            None => {
                let file = staged.path().join(format!("{split}.jsonl"));
                let (lines, views) = write_chats(
                    &file,
                    &prompt,
                    (cfg.finetune.objective, cfg.finetune.labels),
                    format,
                    &rows,
                )?;
                let shown: Vec<String> = views.iter().map(|(v, n)| format!("{n} {v}")).collect();
                eprintln!(
                    "export-data: {split}: {} rows → {lines} examples ({})",
                    rows.len(),
                    shown.join(", ")
                );
                (
                    file,
                    (
                        lines,
                        json!({"rows": rows.len(), "examples": lines, "views": views}),
                    ),
                )
            }
        };
        outputs.push(staged_entry(&staged, &file, Some(summary.0))?);
        counts.insert(split.into(), summary.1);
    }
    let readme = staged.path().join("README.md");
    let text = match &student {
        Some(model) => distillkit::readme(
            cfg,
            &out.display().to_string(),
            shape.0,
            shape.1,
            model.shape.vocab_size,
        ),
        None => readme_text(cfg, format, &out),
    };
    write_bytes(&readme, text.as_bytes())?;
    outputs.push(staged_entry(&staged, &readme, None)?);
    let mut m = Manifest::new(
        Stage::ExportData,
        config_hash(&cfg.stage_view(Stage::ExportData)),
        cfg.seed,
    );
    m.inputs = inputs;
    m.outputs = outputs;
    m.summary = json!({"format": format.as_str(), "prompt": prompt.hash, "splits": counts});
    m.write(staged.path())?;
    staged.commit()?;
    eprintln!("export-data: {} → {}", format.as_str(), out.display());
    Ok(out)
}

/// One split's chats as JSON lines: how many, and how many of each view.
fn write_chats(
    file: &Path,
    prompt: &Prompt,
    targets: (Objective, LabelSource),
    format: DataFormat,
    rows: &[CuratedRow],
) -> Result<(usize, std::collections::BTreeMap<&'static str, usize>)> {
    let mut views: std::collections::BTreeMap<&'static str, usize> = Default::default();
    let mut lines = 0usize;
    write_with(file, |f| {
        let mut w = std::io::BufWriter::new(f);
        for row in rows {
            for ex in examples(prompt, targets, row)? {
                serde_json::to_writer(&mut w, &line(format, row, &ex))?;
                w.write_all(b"\n")?;
                *views.entry(ex.view).or_default() += 1;
                lines += 1;
            }
        }
        w.flush()?;
        Ok(())
    })?;
    Ok((lines, views))
}

/// How to load the files in the trainer they are for.
fn readme_text(cfg: &Config, format: DataFormat, out: &Path) -> String {
    let dir = out.display();
    let how = match format {
        DataFormat::Trl => format!(
            "```python\nfrom datasets import load_dataset\nfrom trl import SFTConfig, SFTTrainer\n\ndata = load_dataset(\"json\", data_files={{\"train\": \"{dir}/train.jsonl\", \"validation\": \"{dir}/val.jsonl\"}})\n# Views to train on: label and rationale are step-by-step's two tasks; teacher is the\n# teacher's own reply, for a token-level KD loss on teacher_topk_*.\ntrain = data[\"train\"].filter(lambda r: r[\"view\"] != \"teacher\")\ntrainer = SFTTrainer(model=\"<student>\", train_dataset=train, args=SFTConfig(output_dir=\"out\"))\ntrainer.train()\n```\n"
        ),
        DataFormat::Axolotl | DataFormat::DistillKit => format!(
            "```yaml\ndatasets:\n  - path: {dir}/train.jsonl\n    ds_type: json\n    type: chat_template\n    field_messages: messages\n    roles_to_train: [\"assistant\"]\ntest_datasets:\n  - path: {dir}/val.jsonl\n    ds_type: json\n    type: chat_template\n    field_messages: messages\n    split: train\n```\n"
        ),
    };
    format!(
        "# {} data for a torch trainer ({})\n\nWritten by `kdpipe export-data --format {}` from the curated splits of run `{}`. One JSON line per example: `view` is `label`, `rationale` (the teacher's reasoning, then `{ANSWER_MARKER} <label>`) or `teacher` (the teacher's own reply, with `teacher_token_ids` and, at each of those tokens, `teacher_topk_ids` or `teacher_topk_texts` and `teacher_topk_logprobs`: natural-log probabilities at temperature `teacher_topk_temperature`, over the tokenizer `teacher_vocab` fingerprints). `id` and `sample` name the curated row.\n\n{how}",
        cfg.name,
        format.as_str(),
        format.as_str(),
        cfg.name
    )
}
