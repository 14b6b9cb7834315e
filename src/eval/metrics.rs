//! Scores of one model's predictions against gold: accuracy, parse failures and, for label
//! tasks, the confusion matrix, per-label precision / recall / F1 and macro-F1.

use serde::{Deserialize, Serialize};

/// One scored row: the gold answer, the model's parsed answer (None: no answer parsed) and
/// whether they agree under the task's comparison (numeric tolerance or label match).
#[derive(Debug, Clone)]
pub struct Outcome {
    pub gold: String,
    pub answer: Option<String>,
    pub correct: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    pub rows: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub parse_failures: usize,
    pub parse_failure_rate: f64,
    /// Label tasks only.
    pub labels: Option<LabelMetrics>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabelMetrics {
    /// Unweighted mean of the labels' F1, every label of the set counted (a label never
    /// predicted and never gold scores 0, as scikit-learn's `zero_division=0` does).
    pub macro_f1: f64,
    pub per_label: Vec<LabelScore>,
    /// `confusion[g][p]`: rows with gold label `g` answered `p`, in the order of
    /// `per_label`; the last column counts rows with no parsable answer.
    pub confusion: Vec<Vec<u64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabelScore {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Rows whose gold is this label.
    pub support: u64,
}

fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

/// Score outcomes; `labels` is the task's label set (empty for numeric tasks).
pub fn score(outcomes: &[Outcome], labels: &[String]) -> Metrics {
    let rows = outcomes.len();
    let correct = outcomes.iter().filter(|o| o.correct).count();
    let parse_failures = outcomes.iter().filter(|o| o.answer.is_none()).count();
    Metrics {
        rows,
        correct,
        accuracy: ratio(correct as f64, rows as f64),
        parse_failures,
        parse_failure_rate: ratio(parse_failures as f64, rows as f64),
        labels: (!labels.is_empty()).then(|| label_metrics(outcomes, labels)),
    }
}

fn label_metrics(outcomes: &[Outcome], labels: &[String]) -> LabelMetrics {
    let index = |s: &str| labels.iter().position(|l| l == s);
    let none = labels.len();
    let mut confusion = vec![vec![0u64; labels.len() + 1]; labels.len()];
    for o in outcomes {
        // Gold outside the label set cannot be placed in the matrix; accuracy still counts it.
        let Some(g) = index(&o.gold) else { continue };
        let p = o.answer.as_deref().and_then(index).unwrap_or(none);
        confusion[g][p] += 1;
    }
    let per_label: Vec<LabelScore> = labels
        .iter()
        .enumerate()
        .map(|(i, label)| {
            let tp = confusion[i][i] as f64;
            let support: u64 = confusion[i].iter().sum();
            let predicted: u64 = confusion.iter().map(|row| row[i]).sum();
            let precision = ratio(tp, predicted as f64);
            let recall = ratio(tp, support as f64);
            LabelScore {
                label: label.clone(),
                precision,
                recall,
                f1: ratio(2.0 * precision * recall, precision + recall),
                support,
            }
        })
        .collect();
    let macro_f1 = per_label.iter().map(|s| s.f1).sum::<f64>() / labels.len() as f64;
    LabelMetrics {
        macro_f1,
        per_label,
        confusion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(gold: &str, answer: Option<&str>) -> Outcome {
        Outcome {
            gold: gold.into(),
            answer: answer.map(String::from),
            correct: answer == Some(gold),
        }
    }

    fn labels(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn label_metrics_match_hand_computed_values() {
        // gold a a b b c, predicted a b b - c.
        // a: tp 1, predicted 1, support 2 → P 1, R 0.5, F1 2/3
        // b: tp 1, predicted 2, support 2 → P 0.5, R 0.5, F1 0.5
        // c: tp 1, predicted 1, support 1 → F1 1
        // macro-F1 = (2/3 + 0.5 + 1) / 3 = 0.7222…; sklearn.metrics.f1_score(
        //   ["a","a","b","b","c"], ["a","b","b","none","c"], labels=["a","b","c"],
        //   average="macro") gives the same 0.72222.
        let o = vec![
            outcome("a", Some("a")),
            outcome("a", Some("b")),
            outcome("b", Some("b")),
            outcome("b", None),
            outcome("c", Some("c")),
        ];
        let m = score(&o, &labels(&["a", "b", "c"]));
        assert_eq!((m.rows, m.correct, m.parse_failures), (5, 3, 1));
        assert!((m.accuracy - 0.6).abs() < 1e-12);
        assert!((m.parse_failure_rate - 0.2).abs() < 1e-12);
        let l = m.labels.unwrap();
        assert!((l.macro_f1 - (2.0 / 3.0 + 0.5 + 1.0) / 3.0).abs() < 1e-12);
        assert!((l.per_label[0].f1 - 2.0 / 3.0).abs() < 1e-12);
        assert!((l.per_label[1].precision - 0.5).abs() < 1e-12);
        assert_eq!(l.per_label[1].support, 2);
        assert_eq!(
            l.confusion,
            vec![vec![1, 1, 0, 0], vec![0, 1, 0, 1], vec![0, 0, 1, 0]]
        );
    }

    #[test]
    fn a_label_never_seen_scores_zero_and_counts_in_the_mean() {
        // Everything is "a" and right: F1(a) = 1, F1(b) = 0 (no support, never predicted).
        let o = vec![outcome("a", Some("a")), outcome("a", Some("a"))];
        let l = score(&o, &labels(&["a", "b"])).labels.unwrap();
        assert_eq!(l.per_label[1].f1, 0.0);
        assert!((l.macro_f1 - 0.5).abs() < 1e-12);
    }

    #[test]
    fn numeric_tasks_have_no_label_metrics_and_empty_input_scores_zero() {
        let o = vec![Outcome {
            gold: "3".into(),
            answer: Some("3.0".into()),
            correct: true,
        }];
        let m = score(&o, &[]);
        assert_eq!(m.accuracy, 1.0);
        assert!(m.labels.is_none());
        let empty = score(&[], &labels(&["a", "b"]));
        assert_eq!((empty.accuracy, empty.rows), (0.0, 0));
    }
}
