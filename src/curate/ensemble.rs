//! Rows from several teachers (`[[ensemble]]`): each row gets its teacher's vote weight
//! (`_weight`, read by the self-consistency rules), and an input's label-set soft labels
//! are averaged over the teachers that scored it, weighted the same way.

use crate::config::Config;
use crate::records::{SOFT_ENSEMBLE_LABEL_SCORES, SOFT_LABEL_SCORES};
use anyhow::Result;
use polars::prelude::*;
use std::collections::{BTreeMap, HashMap, HashSet};

/// The parts of a teacher row the ensemble reads and rewrites.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub id: String,
    pub teacher: String,
    pub soft_kind: String,
    pub soft_labels: Vec<String>,
    pub soft_probs: Vec<f64>,
    pub soft_coverage: Option<f64>,
}

fn strings(df: &DataFrame, name: &str) -> Result<Vec<String>> {
    Ok(df
        .column(name)?
        .str()?
        .iter()
        .map(|s| s.unwrap_or("").to_string())
        .collect())
}

fn read_scores(df: &DataFrame) -> Result<Vec<Scores>> {
    let (ids, teachers, kinds) = (
        strings(df, "id")?,
        strings(df, "teacher")?,
        strings(df, "soft_kind")?,
    );
    let labels = df.column("soft_labels")?.list()?;
    let probs = df.column("soft_probs")?.list()?;
    let coverage = df.column("soft_coverage")?.f64()?;
    let mut out = Vec::with_capacity(df.height());
    for (i, ((id, teacher), soft_kind)) in ids.into_iter().zip(teachers).zip(kinds).enumerate() {
        let soft_labels = match labels.get_as_series(i) {
            Some(s) => s
                .str()?
                .iter()
                .map(|x| x.unwrap_or("").to_string())
                .collect(),
            None => vec![],
        };
        let soft_probs = match probs.get_as_series(i) {
            Some(s) => s.f64()?.iter().map(|x| x.unwrap_or(0.0)).collect(),
            None => vec![],
        };
        out.push(Scores {
            id,
            teacher,
            soft_kind,
            soft_labels,
            soft_probs,
            soft_coverage: coverage.get(i),
        });
    }
    Ok(out)
}

pub fn prepare(cfg: &Config, mut df: DataFrame) -> Result<DataFrame> {
    let weights: HashMap<&str, f64> = cfg
        .teachers()
        .iter()
        .map(|t| (t.model.as_str(), t.weight))
        .collect();
    let mut rows = read_scores(&df)?;
    average_label_scores(&mut rows, &weights, &cfg.task.labels);
    let w: Vec<f64> = rows
        .iter()
        .map(|r| weights.get(r.teacher.as_str()).copied().unwrap_or(1.0))
        .collect();
    let probs: Vec<Series> = rows
        .iter()
        .map(|r| Series::new("".into(), &r.soft_probs))
        .collect();
    let probs = Column::new("soft_probs".into(), probs)
        .cast(&DataType::List(Box::new(DataType::Float64)))?;
    df.with_column(probs)?;
    df.with_column(Column::new(
        "soft_kind".into(),
        rows.iter()
            .map(|r| r.soft_kind.as_str())
            .collect::<Vec<_>>(),
    ))?;
    df.with_column(Column::new(
        "soft_coverage".into(),
        rows.iter().map(|r| r.soft_coverage).collect::<Vec<_>>(),
    ))?;
    df.with_column(Column::new("_weight".into(), w))?;
    Ok(df)
}

/// Replace each input's label-set scores by their weighted mean over its rows, when at
/// least two teachers scored it (the kind then says `ensemble_label_scores`).
pub fn average_label_scores(rows: &mut [Scores], weights: &HashMap<&str, f64>, labels: &[String]) {
    let mut by_id: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        if r.soft_kind == SOFT_LABEL_SCORES && r.soft_labels == labels {
            by_id.entry(r.id.clone()).or_default().push(i);
        }
    }
    for members in by_id.values() {
        let teachers: HashSet<&str> = members.iter().map(|&i| rows[i].teacher.as_str()).collect();
        if teachers.len() < 2 {
            continue;
        }
        let mut mean = vec![0.0; labels.len()];
        let mut total = 0.0;
        for &i in members {
            let w = weights
                .get(rows[i].teacher.as_str())
                .copied()
                .unwrap_or(1.0);
            for (m, p) in mean.iter_mut().zip(&rows[i].soft_probs) {
                *m += w * p;
            }
            total += w;
        }
        for m in &mut mean {
            *m /= total;
        }
        for &i in members {
            let r = &mut rows[i];
            r.soft_probs = mean.clone();
            r.soft_coverage = Some(mean.iter().sum());
            r.soft_kind = SOFT_ENSEMBLE_LABEL_SCORES.into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, teacher: &str, probs: &[f64]) -> Scores {
        Scores {
            id: id.into(),
            teacher: teacher.into(),
            soft_kind: SOFT_LABEL_SCORES.into(),
            soft_labels: vec!["a".into(), "b".into()],
            soft_probs: probs.to_vec(),
            soft_coverage: None,
        }
    }

    #[test]
    fn label_scores_are_averaged_with_the_teachers_weights() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let mut rows = vec![
            row("x", "big", &[0.8, 0.1]),
            row("x", "small", &[0.2, 0.6]),
            row("y", "big", &[0.5, 0.5]),
        ];
        let weights: HashMap<&str, f64> = [("big", 3.0), ("small", 1.0)].into_iter().collect();
        average_label_scores(&mut rows, &weights, &labels);
        // x: (3·0.8 + 0.2) / 4 = 0.65, (3·0.1 + 0.6) / 4 = 0.225; y has one teacher.
        for r in &rows[..2] {
            assert!((r.soft_probs[0] - 0.65).abs() < 1e-12);
            assert!((r.soft_probs[1] - 0.225).abs() < 1e-12);
            assert_eq!(r.soft_kind, SOFT_ENSEMBLE_LABEL_SCORES);
        }
        assert_eq!(rows[2].soft_probs, vec![0.5, 0.5]);
        assert_eq!(rows[2].soft_kind, SOFT_LABEL_SCORES);
    }
}
