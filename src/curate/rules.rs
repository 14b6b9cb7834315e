//! The curation rules, in order: parse status, exact-duplicate inputs, agreement with
//! gold; then the deterministic split by a hash of the id.

use crate::config::{CurateConfig, TaskKind};
use crate::task::{ParseStatus, Task};
use anyhow::Result;
use polars::prelude::*;
use sha2::{Digest, Sha256};

pub struct Outcome {
    pub rows_in: usize,
    /// Rows removed by each rule, in the order the rules ran.
    pub removed: serde_json::Map<String, serde_json::Value>,
    pub parse_reasons: serde_json::Map<String, serde_json::Value>,
    /// Kept rows, with a `split` column.
    pub kept: DataFrame,
}

pub fn apply(df: DataFrame, task: &Task, cfg: &CurateConfig, seed: u64) -> Result<Outcome> {
    let rows_in = df.height();
    let mut removed = serde_json::Map::new();
    let mut parse_reasons = serde_json::Map::new();
    let mut df = df;

    if cfg.drop_parse_failures {
        let usable = col("status")
            .eq(lit(ParseStatus::Ok.as_str()))
            .or(col("status").eq(lit(ParseStatus::Rescued.as_str())));
        let reasons = df
            .clone()
            .lazy()
            .filter(usable.clone().not())
            .group_by([col("status")])
            .agg([len().alias("n")])
            .sort(["status"], Default::default())
            .collect()?;
        for (s, n) in reasons
            .column("status")?
            .str()?
            .iter()
            .zip(reasons.column("n")?.u32()?.iter())
        {
            parse_reasons.insert(s.unwrap_or("").to_string(), n.unwrap_or(0).into());
        }
        df = count_step(df, &mut removed, "parse_failure", |lf| lf.filter(usable))?;
    }
    if cfg.dedup_inputs {
        df = count_step(df, &mut removed, "duplicate_input", |lf| {
            let norm = col("input")
                .str()
                .to_lowercase()
                .str()
                .replace_all(lit(r"\s+"), lit(" "), false)
                .str()
                .strip_chars(lit(NULL))
                .alias("_norm");
            lf.with_column(norm)
                .unique_stable_generic(Some(vec![col("_norm")]), UniqueKeepStrategy::First)
                .drop(cols(["_norm"]))
        })?;
    }
    if cfg.require_gold_agreement {
        let agrees = gold_agreement(task);
        df = count_step(df, &mut removed, "disagrees_with_gold", |lf| {
            lf.filter(col("gold").is_null().or(agrees))
        })?;
    }
    let splits: Vec<&str> = df
        .column("id")?
        .str()?
        .iter()
        .map(|id| split_of(id.unwrap_or(""), seed, cfg.split))
        .collect();
    df.with_column(Column::new("split".into(), splits))?;
    let kept = df
        .lazy()
        .with_column(col("rationale").fill_null(lit("")))
        .collect()?;
    Ok(Outcome {
        rows_in,
        removed,
        parse_reasons,
        kept,
    })
}

/// Apply one rule and record how many rows it removed.
fn count_step(
    df: DataFrame,
    removed: &mut serde_json::Map<String, serde_json::Value>,
    rule: &str,
    f: impl FnOnce(LazyFrame) -> LazyFrame,
) -> Result<DataFrame> {
    let before = df.height();
    let after = f(df.lazy()).collect()?;
    removed.insert(rule.to_string(), (before - after.height()).into());
    Ok(after)
}

/// Whether the teacher's answer matches gold: numeric within tolerance, labels equal.
fn gold_agreement(task: &Task) -> Expr {
    match task.kind {
        TaskKind::Numeric => {
            let a = col("answer").cast(DataType::Float64);
            let g = col("gold").cast(DataType::Float64);
            let tol = lit(task.tolerance) * g.clone().abs().clip_min(lit(1.0));
            (a - g).abs().lt_eq(tol).fill_null(lit(false))
        }
        TaskKind::Labels => col("answer")
            .str()
            .to_lowercase()
            .eq(col("gold").str().to_lowercase())
            .fill_null(lit(false)),
    }
}

/// The split of an id: a seeded hash of the id mapped onto the train/val/test shares.
/// Stable across runs, machines and row order.
pub fn split_of(id: &str, seed: u64, shares: [f64; 3]) -> &'static str {
    let digest = Sha256::digest(format!("{seed}:{id}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    let u = u64::from_be_bytes(b) as f64 / u64::MAX as f64;
    if u < shares[0] {
        "train"
    } else if u < shares[0] + shares[1] {
        "val"
    } else {
        "test"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> DataFrame {
        df!(
            "id" => ["a", "b", "c", "d", "e"],
            "input" => ["Hi there", "hi   there", "other", "third", "fourth"],
            "gold" => [Some("1"), Some("1"), Some("2"), None, Some("5")],
            "answer" => [Some("1"), Some("1"), Some("3"), Some("4"), None],
            "rationale" => [Some("r"), Some("r"), Some("r"), None, None],
            "status" => ["ok", "ok", "ok", "rescued", "no_answer"],
        )
        .unwrap()
    }

    fn numeric() -> Task {
        Task {
            kind: TaskKind::Numeric,
            labels: vec![],
            tolerance: 1e-6,
        }
    }

    #[test]
    fn each_rule_counts_what_it_removed() {
        // Hand-checked: e fails parsing; b duplicates a after lowercasing and collapsing
        // spaces; c answers 3 against gold 2; d has no gold and is kept.
        let cfg = CurateConfig {
            require_gold_agreement: true,
            ..Default::default()
        };
        let out = apply(frame(), &numeric(), &cfg, 0).unwrap();
        assert_eq!(out.removed["parse_failure"], 1);
        assert_eq!(out.parse_reasons["no_answer"], 1);
        assert_eq!(out.removed["duplicate_input"], 1);
        assert_eq!(out.removed["disagrees_with_gold"], 1);
        let ids: Vec<_> = out
            .kept
            .column("id")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .map(|s| s.unwrap().to_string())
            .collect();
        assert_eq!(ids, ["a", "d"]);
    }

    #[test]
    fn gold_rule_is_off_by_default() {
        let out = apply(frame(), &numeric(), &CurateConfig::default(), 0).unwrap();
        assert_eq!(out.kept.height(), 3);
        assert!(!out.removed.contains_key("disagrees_with_gold"));
    }

    #[test]
    fn split_is_deterministic_and_follows_shares() {
        let shares = [0.8, 0.1, 0.1];
        let n = 10_000;
        let train = (0..n)
            .filter(|i| split_of(&i.to_string(), 7, shares) == "train")
            .count();
        assert!((7_700..8_300).contains(&train), "{train}");
        assert_eq!(split_of("x", 7, shares), split_of("x", 7, shares));
    }
}
