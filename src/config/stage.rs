//! The stages, by name, and what each one's hash covers: `run` skips a stage whose
//! manifest holds the same hash (and the same input digests), so a setting belongs in a
//! stage's view exactly when changing it changes that stage's output.

use super::{Config, TeacherConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Synthesize,
    Generate,
    Curate,
    Finetune,
    Eval,
    Export,
    /// `kdpipe export-data`: the curated splits for a torch trainer (not run by `run`).
    ExportData,
}

impl Stage {
    /// Its folder under the run, and its manifest's `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Synthesize => "synthesize",
            Stage::Generate => "generate",
            Stage::Curate => "curate",
            Stage::Finetune => "finetune",
            Stage::Eval => "eval",
            Stage::Export => "export",
            Stage::ExportData => "export_data",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Config {
    /// What decides the content of one teacher row: rows written under the same view can
    /// be reused by a resumed or extended run (more inputs, more samples, other limits).
    /// Operational settings (concurrency, rate limits, timeouts, URL) are left out.
    pub fn row_view(&self) -> serde_json::Value {
        let view = |t: &TeacherConfig| {
            serde_json::json!({"kind": t.kind, "model": t.model, "max_tokens": t.max_tokens,
                               "temperature": t.temperature, "label_scores": t.label_scores})
        };
        let mut v = serde_json::json!({
            "seed": self.seed, "task": self.task,
            "teacher": view(&self.teacher),
            "token_topk": self.generate.token_topk(),
        });
        // Only with an ensemble: single-teacher runs keep their earlier hash (and rows).
        if !self.ensemble.is_empty() {
            v["ensemble"] = self.ensemble.iter().map(view).collect();
            v["samples"] = self.generate.samples.into();
        }
        v
    }

    /// The sections a stage depends on, as one JSON value: its hash decides whether a
    /// finished stage can be skipped.
    pub fn stage_view(&self, stage: Stage) -> serde_json::Value {
        use serde_json::json;
        match stage {
            Stage::Generate => {
                let ensemble: Vec<_> = self.ensemble.iter().map(what_answers).collect();
                json!({"seed": self.seed, "data": self.data, "task": self.task,
                       "teacher": what_answers(&self.teacher), "ensemble": ensemble,
                       "generate": self.generate})
            }
            Stage::Synthesize => {
                json!({"seed": self.seed, "task": self.task, "teacher": what_answers(&self.teacher),
                       "synthesize": self.synthesize, "input_field": self.data.input_field})
            }
            Stage::Curate => {
                let weights: Vec<_> = self
                    .teachers()
                    .iter()
                    .map(|t| (&t.model, t.weight))
                    .collect();
                // How many rows a part holds does not change what curate writes.
                let mut curate = json!(self.curate);
                if let Some(fields) = curate.as_object_mut() {
                    fields.remove("part_rows");
                }
                json!({"seed": self.seed, "task": self.task, "curate": curate,
                       "input_field": self.data.input_field, "weights": weights})
            }
            Stage::Finetune => {
                json!({"seed": self.seed, "task": self.task, "student": self.student, "finetune": self.finetune})
            }
            Stage::Eval => {
                let fields = json!({"input": self.data.input_field, "id": self.data.id_field, "gold": self.data.gold_field});
                json!({"seed": self.seed, "task": self.task, "student": self.student, "eval": self.eval,
                       "teacher": what_answers(&self.teacher), "fields": fields})
            }
            // The student's files are inputs (digests); the base model gives the tokenizer.
            Stage::Export => {
                json!({"student": self.student, "export": self.export.clone().unwrap_or_default()})
            }
            // The curated splits are inputs; the prompt and objective decide the examples;
            // DistillKit's sequences are the student's tokens, cut to max_seq_len.
            Stage::ExportData => {
                json!({"task": self.task, "objective": self.finetune.objective, "labels": self.finetune.labels,
                       "student": self.student.model, "max_seq_len": self.finetune.max_seq_len})
            }
        }
    }
}

/// A teacher's settings that decide its answers, for stage hashes: the pacing and cost
/// knobs (sequences decoded together, concurrency, rate limits, timeouts, retries, prices) change how fast
/// rows come, not what they say, so changing them must not invalidate written rows.
fn what_answers(t: &TeacherConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(t).unwrap_or_default();
    if let Some(fields) = v.as_object_mut() {
        for pacing in [
            "parallel",
            "max_in_flight",
            "requests_per_minute",
            "tokens_per_minute",
            "timeout_s",
            "max_retries",
            "retry_base_s",
            "price_per_mtok",
        ] {
            fields.remove(pacing);
        }
    }
    v
}
