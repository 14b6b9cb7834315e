//! The eval scores, the short table `eval` and `run` print, and report.md with the models
//! side by side.

use super::metrics::Metrics;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scores {
    /// What was scored: "split test" or the eval file names.
    pub source: String,
    pub rows: usize,
    /// CPU threads the scoring ran with (costs below are wall-clock on them).
    pub threads: usize,
    pub models: Vec<ModelScores>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelScores {
    /// "teacher", "base" or "student".
    pub key: String,
    /// What the table calls it: "teacher", "student before", "student after".
    pub name: String,
    /// Model file, folder or API model id.
    pub model: String,
    /// How the answers were obtained: "greedy", "label_scores", "generated", "run".
    pub decode: String,
    #[serde(flatten)]
    pub metrics: Metrics,
    /// Mean wall-clock seconds per example, and its inverse.
    pub seconds_per_example: f64,
    pub examples_per_second: f64,
    /// Wall-clock seconds to answer 1,000 examples at that rate: the compute cost.
    pub seconds_per_1k: f64,
    /// Parameter count, where the weights are at hand.
    pub params: Option<u64>,
    /// Size of the model's weight files on disk.
    pub size_bytes: Option<u64>,
    /// Tokens it generated over all rows, and their rate over the wall time (None when
    /// it generated none: label scores, the teacher's stored rows).
    #[serde(default)]
    pub generated_tokens: u64,
    #[serde(default)]
    pub tokens_per_second: Option<f64>,
    /// Peak resident memory of the process that scored it alone (`kdpipe eval` scores each
    /// model that loads weights in a process of its own); None when not measured.
    #[serde(default)]
    pub peak_rss_bytes: Option<u64>,
    /// Answers written outside the label set that its own label scores replaced (the
    /// teacher run live, as generate does; counted as answered, not as "no answer").
    #[serde(default)]
    pub rescued: usize,
}

impl Scores {
    pub fn model(&self, key: &str) -> Option<&ModelScores> {
        self.models.iter().find(|m| m.key == key)
    }

    /// The quality gate (`[eval] min_accuracy`): why the trained student fails it, or None
    /// when it passes (or was not scored, or there is no gate).
    pub fn gate_failure(&self, min_accuracy: Option<f64>) -> Option<String> {
        let min = min_accuracy?;
        let student = self.model("student")?;
        (student.metrics.accuracy < min).then(|| {
            format!(
                "quality gate failed: the trained student's accuracy {} is below [eval] min_accuracy {}",
                pct(student.metrics.accuracy),
                pct(min)
            )
        })
    }

    /// One row per model: accuracy first, then what it cost.
    pub fn table(&self) -> String {
        let w = self
            .models
            .iter()
            .map(|m| m.name.chars().count())
            .max()
            .unwrap_or(0)
            .max(16);
        let mut t = format!(
            "{:<w$} {:>9} {:>9} {:>11} {:>10} {:>8} {:>9}   ({} rows, {})\n",
            "model",
            "accuracy",
            "macro-F1",
            "no answer",
            "s/example",
            "tok/s",
            "peak RSS",
            self.rows,
            self.source
        );
        for m in &self.models {
            t.push_str(&format!(
                "{:<w$} {:>9} {:>9} {:>11} {:>10.2} {:>8} {:>9}\n",
                m.name,
                pct(m.metrics.accuracy),
                macro_f1(m),
                pct(m.metrics.parse_failure_rate),
                m.seconds_per_example,
                tokens_per_second(m),
                peak_rss(m)
            ));
        }
        t
    }

    pub fn markdown(&self) -> String {
        let mut md = format!(
            "# Evaluation: {} ({} rows with gold)\n\nCosts are wall-clock on this machine ({} CPU threads).\n\n",
            self.source, self.rows, self.threads
        );
        md.push_str("| | ");
        md.push_str(
            &self
                .models
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(" | "),
        );
        md.push_str(" |\n|---|");
        md.push_str(&"---:|".repeat(self.models.len()));
        md.push('\n');
        let line = |label: &str, f: &dyn Fn(&ModelScores) -> String| {
            let cells: Vec<String> = self.models.iter().map(f).collect();
            format!("| {label} | {} |\n", cells.join(" | "))
        };
        md.push_str(&line("model", &|m| format!("`{}`", m.model)));
        md.push_str(&line("answers from", &|m| m.decode.clone()));
        md.push_str(&line("accuracy", &|m| pct(m.metrics.accuracy)));
        md.push_str(&line("correct", &|m| {
            format!("{} / {}", m.metrics.correct, m.metrics.rows)
        }));
        md.push_str(&line("95 % interval", &|m| {
            let (lo, hi) = crate::stats::wilson_95(m.metrics.correct, m.metrics.rows);
            format!("{:.0}–{:.0} %", 100.0 * lo, 100.0 * hi)
        }));
        if self.models.iter().any(|m| m.metrics.labels.is_some()) {
            md.push_str(&line("macro-F1", &|m| macro_f1(m)));
        }
        md.push_str(&line("no answer parsed", &|m| {
            format!(
                "{} ({})",
                m.metrics.parse_failures,
                pct(m.metrics.parse_failure_rate)
            )
        }));
        if self.models.iter().any(|m| m.rescued > 0) {
            md.push_str(&line(
                "outside the label set, rescued by its label scores",
                &|m| m.rescued.to_string(),
            ));
        }
        md.push_str(&line("seconds / example", &|m| {
            format!("{:.2}", m.seconds_per_example)
        }));
        md.push_str(&line("examples / second", &|m| {
            format!("{:.2}", m.examples_per_second)
        }));
        md.push_str(&line("generated tokens / second", &|m| {
            tokens_per_second(m)
        }));
        md.push_str(&line("compute s / 1,000 examples", &|m| {
            format!("{:.0}", m.seconds_per_1k)
        }));
        md.push_str(&line("parameters", &|m| {
            m.params
                .map(|p| format!("{:.0} M", p as f64 / 1e6))
                .unwrap_or_else(|| "—".into())
        }));
        md.push_str(&line("size on disk", &|m| {
            m.size_bytes
                .map(|b| format!("{:.0} MB", b as f64 / 1e6))
                .unwrap_or_else(|| "—".into())
        }));
        md.push_str(&line("peak RSS (own process)", &|m| peak_rss(m)));
        for m in &self.models {
            let Some(l) = &m.metrics.labels else { continue };
            md.push_str(&format!(
                "\n## {}: per label\n\n| gold \\ answer | {} | no answer | precision | recall | F1 |\n|---|{}---:|---:|---:|---:|\n",
                m.name,
                l.per_label.iter().map(|s| s.label.as_str()).collect::<Vec<_>>().join(" | "),
                "---:|".repeat(l.per_label.len())
            ));
            for (s, row) in l.per_label.iter().zip(&l.confusion) {
                let counts: Vec<String> = row.iter().map(|c| c.to_string()).collect();
                md.push_str(&format!(
                    "| {} | {} | {:.2} | {:.2} | {:.2} |\n",
                    s.label,
                    counts.join(" | "),
                    s.precision,
                    s.recall,
                    s.f1
                ));
            }
        }
        md
    }
}

fn pct(x: f64) -> String {
    format!("{:.1} %", 100.0 * x)
}

fn macro_f1(m: &ModelScores) -> String {
    m.metrics
        .labels
        .as_ref()
        .map(|l| format!("{:.3}", l.macro_f1))
        .unwrap_or_else(|| "—".into())
}

/// A model's generated tokens per second for the tables ("—" without generation).
fn tokens_per_second(m: &ModelScores) -> String {
    m.tokens_per_second
        .map(|t| format!("{t:.1}"))
        .unwrap_or_else(|| "—".into())
}

/// A model's peak RSS for the tables ("—" where not measured).
fn peak_rss(m: &ModelScores) -> String {
    m.peak_rss_bytes
        .map(|b| format!("{:.0} MB", b as f64 / 1e6))
        .unwrap_or_else(|| "—".into())
}
