//! The eval scores and their human-readable table.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scores {
    pub split: String,
    pub rows: usize,
    /// The teacher's answers (from generate, after curation) against gold.
    pub teacher_accuracy: f64,
    pub student_before_accuracy: Option<f64>,
    pub student_after_accuracy: f64,
    pub student_parse_failures: usize,
    pub student_seconds_per_example: f64,
}

fn pct(x: f64) -> String {
    format!("{:.1} %", 100.0 * x)
}

impl Scores {
    /// The short table `run` prints: one row per model.
    pub fn table(&self) -> String {
        let mut t = format!(
            "{:<24} {:>9}   ({} rows of the {} split)\n",
            "model", "accuracy", self.rows, self.split
        );
        t.push_str(&format!(
            "{:<24} {:>9}\n",
            "teacher",
            pct(self.teacher_accuracy)
        ));
        if let Some(b) = self.student_before_accuracy {
            t.push_str(&format!("{:<24} {:>9}\n", "student before", pct(b)));
        }
        t.push_str(&format!(
            "{:<24} {:>9}\n",
            "student after",
            pct(self.student_after_accuracy)
        ));
        t
    }

    pub fn markdown(&self, teacher: &str, student: &str) -> String {
        let mut md = format!("# Evaluation on the {} split ({} rows with gold)\n\n| model | accuracy |\n| --- | --- |\n", self.split, self.rows);
        md.push_str(&format!(
            "| teacher `{teacher}` | {} |\n",
            pct(self.teacher_accuracy)
        ));
        if let Some(b) = self.student_before_accuracy {
            md.push_str(&format!(
                "| student before training `{student}` | {} |\n",
                pct(b)
            ));
        }
        md.push_str(&format!(
            "| student after training | {} |\n\n",
            pct(self.student_after_accuracy)
        ));
        md.push_str(&format!(
            "Student answers that did not parse: {}. Student decoding: {:.2} s per example.\nTeacher accuracy is over the curated rows (parse failures were removed by curate).\n",
            self.student_parse_failures, self.student_seconds_per_example
        ));
        md
    }
}
