//! The curation rules as one Polars plan. Each rule is a boolean "passes" column; a row
//! is kept by rule k when it was kept by rule k − 1 and passes rule k, so the rows each
//! rule removed are the difference of two sums, all counted from one collect. Rules that
//! pick a representative (self-consistency, dedup, label cap) choose among the rows still
//! kept at that point.
//!
//! Work Polars has no expression for is done in Rust first, on the distinct inputs where
//! it can be (text.rs: normalization, near-duplicate clusters, contamination; arith.rs:
//! rationale checks), and joined in as plain columns.

use crate::config::{CurateConfig, GoldRule, KeepRationales, TaskKind};
use crate::dedup::{normalize, Contamination, NearDup};
use crate::task::arith;
use crate::task::{ParseStatus, Task};
use anyhow::Result;
use polars::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

pub struct Outcome {
    pub rows_in: usize,
    /// (rule, rows removed), in the order the rules ran.
    pub funnel: Vec<(&'static str, usize)>,
    pub parse_reasons: BTreeMap<String, usize>,
    /// Inputs by majority share in tenths (0–10 %, …, 90–100 %), when inputs have k > 1
    /// samples; counted before the agreement rule, over inputs with a usable sample (with
    /// gold = filter, a sample that missed gold is not usable: the share is then of the
    /// samples that reached gold).
    pub agreement_histogram: Option<Vec<usize>>,
    /// Kept rows with a `split` column.
    pub kept: DataFrame,
    /// With several teachers (an ensemble): each one's agreement with the vote and gold.
    pub teachers: Vec<serde_json::Value>,
}

/// The rules, in the order they run (each one's keep column is `_keep_<rule>`).
pub const RULES: [&str; 13] = [
    "parse_failure",
    "disagrees_with_gold",
    "low_agreement",
    "minority_answer",
    "extra_rationale",
    "low_confidence",
    "rationale_length",
    "answer_not_in_rationale",
    "wrong_arithmetic",
    "duplicate_input",
    "near_duplicate_input",
    "contaminated",
    "label_cap",
];

fn keep_col(rule: &str) -> String {
    format!("_keep_{rule}")
}

/// Columns computed in Rust, one value a row.
fn add_rust_columns(
    df: &mut DataFrame,
    task: &Task,
    cfg: &CurateConfig,
    seed: u64,
    contamination: Option<&Contamination>,
) -> Result<()> {
    let inputs = df.column("input")?.str()?.clone();
    // Distinct inputs in order of first appearance, and each row's index among them.
    let mut index: HashMap<&str, u32> = HashMap::new();
    let mut distinct: Vec<&str> = vec![];
    let row_input: Vec<u32> = inputs
        .iter()
        .map(|t| {
            let t = t.unwrap_or("");
            *index.entry(t).or_insert_with(|| {
                distinct.push(t);
                distinct.len() as u32 - 1
            })
        })
        .collect();
    // Normalized text; identical normalized texts are one exact-duplicate group.
    let norms: Vec<String> = distinct.iter().map(|t| normalize(t)).collect();
    let mut norm_index: HashMap<&str, u32> = HashMap::new();
    let mut distinct_norms: Vec<&str> = vec![];
    let input_norm: Vec<u32> = norms
        .iter()
        .map(|n| {
            *norm_index.entry(n).or_insert_with(|| {
                distinct_norms.push(n);
                distinct_norms.len() as u32 - 1
            })
        })
        .collect();
    // Near-duplicate clusters over distinct normalized texts; without the rule each text is
    // its own cluster.
    let cluster_of_norm: Vec<usize> = if cfg.near_dup_threshold > 0.0 {
        NearDup::new(cfg.near_dup_threshold, cfg.shingle_words).clusters(&distinct_norms)
    } else {
        (0..distinct_norms.len()).collect()
    };
    let split_of_cluster: HashMap<usize, &'static str> = cluster_of_norm
        .iter()
        .map(|&c| (c, split_of(distinct_norms[c], seed, cfg.split)))
        .collect();
    let contaminated_norm: Vec<bool> = distinct_norms
        .iter()
        .map(|n| contamination.is_some_and(|c| c.contaminated(n)))
        .collect();

    let norm_of_row = |r: usize| input_norm[row_input[r] as usize] as usize;
    let n = df.height();
    let col_u32 = |name: &str, f: &dyn Fn(usize) -> u32| {
        Column::new(name.into(), (0..n).map(f).collect::<Vec<u32>>())
    };
    df.with_column(col_u32("_norm", &|r| norm_of_row(r) as u32))?;
    df.with_column(col_u32("_cluster", &|r| {
        cluster_of_norm[norm_of_row(r)] as u32
    }))?;
    df.with_column(Column::new(
        "_contaminated".into(),
        (0..n)
            .map(|r| contaminated_norm[norm_of_row(r)])
            .collect::<Vec<bool>>(),
    ))?;
    df.with_column(Column::new(
        "split".into(),
        (0..n)
            .map(|r| split_of_cluster[&cluster_of_norm[norm_of_row(r)]])
            .collect::<Vec<&str>>(),
    ))?;

    // Rationale checks (numeric tasks).
    let (rationale, answer) = (df.column("rationale")?.str()?, df.column("answer")?.str()?);
    let numeric = task.kind == TaskKind::Numeric;
    let pairs = || rationale.iter().zip(answer.iter());
    let states: Vec<bool> = pairs()
        .map(|(r, a)| {
            !numeric
                || !cfg.require_answer_in_rationale
                || arith::states_answer(r.unwrap_or(""), a.unwrap_or(""), task.tolerance)
        })
        .collect();
    let arith_ok: Vec<bool> = pairs()
        .map(|(r, _)| {
            !numeric
                || !cfg.check_arithmetic
                || arith::arithmetic_holds(r.unwrap_or(""), task.tolerance)
        })
        .collect();
    df.with_column(Column::new("_states_answer".into(), states))?;
    df.with_column(Column::new("_arith_ok".into(), arith_ok))?;
    df.with_column(confidence(df)?)?;
    Ok(())
}

/// The soft-label probability of each row's own answer, renormalized over its soft labels;
/// null without a soft label or when the answer is not among them.
fn confidence(df: &DataFrame) -> Result<Column> {
    let answer = df.column("answer")?.str()?;
    let labels = df.column("soft_labels")?.list()?;
    let probs = df.column("soft_probs")?.list()?;
    let mut out: Vec<Option<f64>> = Vec::with_capacity(df.height());
    for ((a, l), p) in answer
        .iter()
        .zip(labels.amortized_iter())
        .zip(probs.amortized_iter())
    {
        let value = (|| {
            let (a, l, p) = (a?, l?, p?);
            let (l, p) = (l.as_ref().str().ok()?, p.as_ref().f64().ok()?);
            let total: f64 = p.into_no_null_iter().sum();
            let i = l.iter().position(|x| x == Some(a))?;
            (total > 0.0).then(|| p.get(i).unwrap_or(0.0) / total)
        })();
        out.push(value);
    }
    Ok(Column::new("_confidence".into(), out))
}

/// Whether the teacher's answer matches gold: numeric within tolerance, labels equal.
fn gold_agreement(task: &Task) -> Expr {
    match task.kind {
        TaskKind::Numeric => {
            let a = col("answer").cast(DataType::Float64);
            let g = col("gold").cast(DataType::Float64);
            let tol = lit(task.tolerance) * g.clone().abs().clip_min(lit(1.0));
            (a - g).abs().lt_eq(tol)
        }
        TaskKind::Labels => col("answer")
            .str()
            .to_lowercase()
            .eq(col("gold").str().to_lowercase()),
    }
}

/// First kept row of each group: its key equals the group's first key among kept rows.
fn first_kept_in_group(prev: &str, group: &str, key: Expr) -> Result<Expr> {
    let first = key.clone().filter(col(prev)).first().over([col(group)])?;
    Ok(key.eq(first).fill_null(lit(false)))
}

/// The lazy plan: every rule's keep column, the agreement and gold columns.
pub fn plan(df: DataFrame, task: &Task, cfg: &CurateConfig) -> Result<LazyFrame> {
    let usable = col("status")
        .eq(lit(ParseStatus::Ok.as_str()))
        .or(col("status").eq(lit(ParseStatus::Rescued.as_str())));
    // A row's vote weighs its teacher's weight (1 unless an ensemble says otherwise).
    let weighted = df
        .get_column_names()
        .iter()
        .any(|c| c.as_str() == "_weight");
    let mut lf = df.lazy();
    if !weighted {
        lf = lf.with_column(lit(1.0).alias("_weight"));
    }
    let on = |enabled: bool, pass: Expr| if enabled { pass } else { lit(true) };
    let mut prev = keep_col("parse_failure");
    lf = lf.with_column(on(cfg.drop_parse_failures, usable).alias(&prev));

    let rule = |lf: LazyFrame, prev: &mut String, name: &str, pass: Expr| {
        let next = keep_col(name);
        let lf = lf.with_column(
            col(prev.as_str())
                .and(pass.fill_null(lit(false)))
                .alias(&next),
        );
        *prev = next;
        lf
    };
    // Gold before the vote: with gold = filter, the samples that reached the gold answer
    // are kept even where most samples missed it, as in rejection sampling (STaR,
    // Zelikman et al. 2022), and the vote below runs among them.
    let gold = cfg.gold.resolve(task.kind);
    lf = lf.with_column(
        match gold {
            GoldRule::Off => lit(NULL).cast(DataType::Boolean),
            _ => gold_agreement(task),
        }
        .alias("agrees_with_gold"),
    );
    let gold_pass = col("gold").is_null().or(col("agrees_with_gold"));
    lf = rule(
        lf,
        &mut prev,
        "disagrees_with_gold",
        on(gold == GoldRule::Filter, gold_pass),
    );
    // Self-consistency: the majority answer among an input's kept samples (ties go to the
    // answer that sorts first), its share of all the input's samples; every sample votes
    // with its teacher's weight.
    let votes = lf
        .clone()
        .filter(col(&prev))
        .group_by([col("id"), col("answer")])
        .agg([col("_weight").sum().alias("_votes")])
        .sort_by_exprs(
            [col("id"), col("_votes"), col("answer")],
            SortMultipleOptions::default().with_order_descending_multi([false, true, false]),
        )
        .group_by([col("id")])
        .agg([
            col("answer").first().alias("_majority"),
            col("_votes").first().alias("_majority_votes"),
        ]);
    lf = lf
        .with_column(len().over([col("id")])?.alias("_samples"))
        .with_column(
            col("_weight")
                .sum()
                .over([col("id")])?
                .alias("_weight_total"),
        )
        .join(
            votes,
            [col("id")],
            [col("id")],
            // The rules below keep "the first kept row" of a group: the frame's row order
            // must survive the join, which Polars does not promise by default.
            JoinArgs {
                maintain_order: MaintainOrderJoin::Left,
                ..JoinArgs::new(JoinType::Left)
            },
        )
        .with_column(
            (col("_majority_votes").cast(DataType::Float64)
                / col("_weight_total").cast(DataType::Float64))
            .alias("_agreement"),
        );
    let multi = col("_samples").gt(lit(1));
    lf = rule(
        lf,
        &mut prev,
        "low_agreement",
        multi
            .clone()
            .not()
            .or(col("_agreement").gt_eq(lit(cfg.min_agreement))),
    );
    lf = rule(
        lf,
        &mut prev,
        "minority_answer",
        multi.clone().not().or(col("answer").eq(col("_majority"))),
    );
    let one = cfg.keep_rationales == KeepRationales::One;
    let first_sample = first_kept_in_group(&prev, "id", col("sample"))?;
    lf = rule(lf, &mut prev, "extra_rationale", on(one, first_sample));

    lf = rule(
        lf,
        &mut prev,
        "low_confidence",
        col("_confidence")
            .is_null()
            .or(col("_confidence").gt_eq(lit(cfg.min_confidence))),
    );
    let chars = col("rationale").fill_null(lit("")).str().len_chars();
    let mut length_ok = chars
        .clone()
        .gt_eq(lit(cfg.min_rationale_chars as u32))
        .and(chars.lt_eq(lit(cfg.max_rationale_chars as u32)));
    if let Some(max) = cfg.max_completion_tokens {
        length_ok = length_ok.and(col("completion_tokens").lt_eq(lit(max)));
    }
    lf = rule(lf, &mut prev, "rationale_length", length_ok);
    lf = rule(
        lf,
        &mut prev,
        "answer_not_in_rationale",
        col("_states_answer"),
    );
    lf = rule(lf, &mut prev, "wrong_arithmetic", col("_arith_ok"));
    // Exact and near duplicates: keep the inputs (all their kept samples) of the first id
    // in each group.
    let exact = first_kept_in_group(&prev, "_norm", col("id"))?;
    lf = rule(
        lf,
        &mut prev,
        "duplicate_input",
        on(cfg.dedup_inputs, exact),
    );
    let near = first_kept_in_group(&prev, "_cluster", col("id"))?;
    lf = rule(
        lf,
        &mut prev,
        "near_duplicate_input",
        on(cfg.near_dup_threshold > 0.0, near),
    );
    lf = rule(lf, &mut prev, "contaminated", col("_contaminated").not());
    let cap = match (cfg.max_per_label, task.kind) {
        (Some(cap), TaskKind::Labels) => col(prev.as_str())
            .cast(DataType::UInt32)
            .cum_sum(false)
            .over([col("answer")])?
            .lt_eq(lit(cap as u32)),
        _ => lit(true),
    };
    Ok(rule(lf, &mut prev, "label_cap", cap))
}

/// The teacher rows with the Rust-computed columns, ready for `plan`.
pub fn prepare(
    mut df: DataFrame,
    task: &Task,
    cfg: &CurateConfig,
    seed: u64,
    contamination: Option<&Contamination>,
) -> Result<DataFrame> {
    add_rust_columns(&mut df, task, cfg, seed, contamination)?;
    Ok(df)
}

pub fn apply(
    df: DataFrame,
    task: &Task,
    cfg: &CurateConfig,
    seed: u64,
    contamination: Option<&Contamination>,
) -> Result<Outcome> {
    let rows_in = df.height();
    let parse_reasons = parse_reasons(&df)?;
    let df = prepare(df, task, cfg, seed, contamination)?;
    let all = plan(df, task, cfg)?.collect()?;

    let mut funnel = vec![];
    let mut before = rows_in;
    for name in RULES {
        let after = all.column(&keep_col(name))?.bool()?.sum().unwrap_or(0) as usize;
        funnel.push((name, before - after));
        before = after;
    }
    let agreement_histogram = agreement_histogram(&all)?;
    let teachers = teacher_agreement(&all, task)?;
    let last = keep_col(RULES[RULES.len() - 1]);
    let kept = all
        .lazy()
        .filter(col(&last))
        .with_column(col("rationale").fill_null(lit("")))
        .with_column(
            when(col("_samples").gt(lit(1)))
                .then(col("_agreement"))
                .otherwise(lit(NULL).cast(DataType::Float64))
                .alias("agreement"),
        )
        .collect()?;
    Ok(Outcome {
        rows_in,
        funnel,
        parse_reasons,
        agreement_histogram,
        kept,
        teachers,
    })
}

/// Per teacher, when rows come from more than one: rows, usable answers, and how often a
/// usable answer matches the input's (weighted) vote and, where there is gold, the gold.
fn teacher_agreement(all: &DataFrame, task: &Task) -> Result<Vec<serde_json::Value>> {
    let distinct = all.column("teacher")?.n_unique()?;
    if distinct < 2 {
        return Ok(vec![]);
    }
    let usable = col("status")
        .eq(lit(ParseStatus::Ok.as_str()))
        .or(col("status").eq(lit(ParseStatus::Rescued.as_str())));
    let share = |hit: Expr, of: Expr| {
        hit.and(of.clone()).cast(DataType::Float64).sum() / of.cast(DataType::Float64).sum()
    };
    let with_gold = usable.clone().and(col("gold").is_not_null());
    let per = all
        .clone()
        .lazy()
        .group_by([col("teacher")])
        .agg([
            len().alias("rows"),
            usable.clone().cast(DataType::UInt32).sum().alias("usable"),
            share(
                col("answer").eq(col("_majority")).fill_null(lit(false)),
                usable.clone(),
            )
            .alias("agrees_with_vote"),
            share(
                gold_agreement(task).fill_null(lit(false)),
                with_gold.clone(),
            )
            .alias("agrees_with_gold"),
        ])
        .sort(["teacher"], Default::default())
        .collect()?;
    crate::io::parquet::rows_as_json(&per, usize::MAX)
}

fn parse_reasons(df: &DataFrame) -> Result<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for s in df.column("status")?.str()?.iter().flatten() {
        if !ParseStatus::usable(s) {
            *out.entry(s.to_string()).or_default() += 1;
        }
    }
    Ok(out)
}

/// Inputs (with k > 1 samples) by the majority's share, in tenths.
fn agreement_histogram(all: &DataFrame) -> Result<Option<Vec<usize>>> {
    let per_input = all
        .clone()
        .lazy()
        .filter(
            col("_samples")
                .gt(lit(1))
                .and(col("_agreement").is_not_null()),
        )
        .group_by([col("id")])
        .agg([col("_agreement").first()])
        .collect()?;
    if per_input.height() == 0 {
        return Ok(None);
    }
    let mut hist = vec![0usize; 10];
    for a in per_input.column("_agreement")?.f64()?.iter() {
        let bucket = ((a.unwrap_or(0.0) * 10.0).floor() as usize).min(9);
        hist[bucket] += 1;
    }
    Ok(Some(hist))
}

/// The split of a key: a seeded hash mapped onto the train/val/test shares. Stable across
/// runs, machines and row order.
pub fn split_of(key: &str, seed: u64, shares: [f64; 3]) -> &'static str {
    let digest = Sha256::digest(format!("{seed}:{key}").as_bytes());
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
    use crate::records::{TeacherRow, TokenTopk};

    /// A teacher row; `answer` None means a parse failure.
    fn row(
        id: &str,
        sample: u32,
        input: &str,
        answer: Option<&str>,
        rationale: &str,
    ) -> TeacherRow {
        TeacherRow {
            id: id.into(),
            sample,
            input: input.into(),
            gold: None,
            raw: String::new(),
            rationale: Some(rationale.into()),
            answer: answer.map(str::to_string),
            status: if answer.is_some() { "ok" } else { "no_answer" }.into(),
            soft_kind: "none".into(),
            soft_labels: vec![],
            soft_probs: vec![],
            soft_coverage: None,
            tokens: TokenTopk::default(),
            prompt_tokens: 10,
            completion_tokens: 20,
            finish_reason: "stop".into(),
            latency_ms: 1.0,
            backend: "local".into(),
            teacher: "t".into(),
            prompt_name: "p".into(),
            prompt_hash: "h".into(),
            temperature: 0.0,
            max_tokens: 64,
            seed: None,
            created_unix_ms: 0,
        }
    }

    fn task(kind: TaskKind) -> Task {
        Task {
            kind,
            labels: vec!["joy".into(), "anger".into()],
            tolerance: 1e-6,
        }
    }

    fn run(rows: &[TeacherRow], task: &Task, cfg: &CurateConfig) -> Outcome {
        apply(TeacherRow::to_frame(rows).unwrap(), task, cfg, 0, None).unwrap()
    }

    fn removed(o: &Outcome, rule: &str) -> usize {
        o.funnel.iter().find(|(r, _)| *r == rule).unwrap().1
    }

    fn kept_keys(o: &Outcome) -> Vec<(String, u32)> {
        let ids = o.kept.column("id").unwrap().str().unwrap().clone();
        let samples = o.kept.column("sample").unwrap().u32().unwrap().clone();
        ids.iter()
            .zip(samples.iter())
            .map(|(i, s)| (i.unwrap().to_string(), s.unwrap()))
            .collect()
    }

    fn lenient() -> CurateConfig {
        CurateConfig {
            gold: GoldRule::Flag,
            keep_rationales: KeepRationales::One,
            require_answer_in_rationale: false,
            check_arithmetic: false,
            near_dup_threshold: 0.0,
            ..CurateConfig::default()
        }
    }

    #[test]
    fn parse_failures_gold_and_exact_duplicates_are_counted() {
        // Hand-checked: e fails parsing; b repeats a's input after normalizing case and
        // punctuation (a different id: a duplicate); c answers 3 against gold 2; d has no
        // gold and is kept.
        let mut rows = vec![
            row("a", 0, "Hi there", Some("1"), "r"),
            row("b", 0, "hi,   THERE!", Some("1"), "r"),
            row("c", 0, "other", Some("3"), "r"),
            row("d", 0, "third", Some("4"), "r"),
            row("e", 0, "fourth", None, "r"),
        ];
        for (r, g) in rows
            .iter_mut()
            .zip([Some("1"), Some("1"), Some("2"), None, Some("5")])
        {
            r.gold = g.map(str::to_string);
        }
        let cfg = CurateConfig {
            gold: GoldRule::Filter,
            ..lenient()
        };
        let o = run(&rows, &task(TaskKind::Numeric), &cfg);
        assert_eq!(removed(&o, "parse_failure"), 1);
        assert_eq!(o.parse_reasons["no_answer"], 1);
        assert_eq!(removed(&o, "disagrees_with_gold"), 1);
        assert_eq!(removed(&o, "duplicate_input"), 1);
        assert_eq!(kept_keys(&o), [("a".into(), 0), ("d".into(), 0)]);
        // Flag mode keeps c and records its disagreement.
        let o = run(&rows, &task(TaskKind::Numeric), &lenient());
        assert_eq!(o.kept.height(), 3);
        let flags: Vec<Option<bool>> = o
            .kept
            .column("agrees_with_gold")
            .unwrap()
            .bool()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(flags, [Some(true), Some(false), None]);
    }

    #[test]
    fn with_gold_as_filter_gold_not_the_vote_picks_the_samples() {
        // a (gold 5): samples 4, 4, 5: the vote says 4, gold says 5: sample 2 is kept.
        // b (no gold): samples 7, 7, 8: the vote decides: sample 0 is kept.
        // c (gold 9): samples 1, 2: no sample reached gold: nothing is kept.
        let mut rows = vec![
            row("a", 0, "qa", Some("4"), "r0"),
            row("a", 1, "qa", Some("4"), "r1"),
            row("a", 2, "qa", Some("5"), "r2"),
            row("b", 0, "qb", Some("7"), "r0"),
            row("b", 1, "qb", Some("7"), "r1"),
            row("b", 2, "qb", Some("8"), "r2"),
            row("c", 0, "qc", Some("1"), "r0"),
            row("c", 1, "qc", Some("2"), "r1"),
        ];
        for r in rows.iter_mut() {
            r.gold = match r.id.as_str() {
                "a" => Some("5".into()),
                "c" => Some("9".into()),
                _ => None,
            };
        }
        let cfg = CurateConfig {
            gold: GoldRule::Filter,
            ..lenient()
        };
        let o = run(&rows, &task(TaskKind::Numeric), &cfg);
        assert_eq!(kept_keys(&o), [("a".into(), 2), ("b".into(), 0)]);
        // Flag mode: the vote decides everywhere.
        let o = run(&rows, &task(TaskKind::Numeric), &lenient());
        assert_eq!(
            kept_keys(&o),
            [("a".into(), 0), ("b".into(), 0), ("c".into(), 0)]
        );
    }

    #[test]
    fn self_consistency_keeps_the_majority_of_agreeing_inputs() {
        // a: answers 4, 4, 5 and one failure: majority 4 with 2 of 4 samples (0.5).
        // b: 7, 7, 7: agreement 1.
        let rows = vec![
            row("a", 0, "qa", Some("4"), "r0"),
            row("a", 1, "qa", Some("5"), "r1"),
            row("a", 2, "qa", Some("4"), "r2"),
            row("a", 3, "qa", None, "r3"),
            row("b", 0, "qb", Some("7"), "r0"),
            row("b", 1, "qb", Some("7"), "r1"),
            row("b", 2, "qb", Some("7"), "r2"),
        ];
        let t = task(TaskKind::Numeric);
        let o = run(&rows, &t, &lenient());
        // Samples of one input are not duplicates of each other.
        assert_eq!(removed(&o, "duplicate_input"), 0);
        assert_eq!(removed(&o, "minority_answer"), 1);
        assert_eq!(removed(&o, "extra_rationale"), 3);
        assert_eq!(kept_keys(&o), [("a".into(), 0), ("b".into(), 0)]);
        let agreement: Vec<Option<f64>> = o
            .kept
            .column("agreement")
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(agreement, [Some(0.5), Some(1.0)]);
        assert_eq!(o.agreement_histogram.as_ref().unwrap()[5], 1);
        assert_eq!(o.agreement_histogram.as_ref().unwrap()[9], 1);

        let strict = CurateConfig {
            min_agreement: 0.6,
            keep_rationales: KeepRationales::All,
            ..lenient()
        };
        let o = run(&rows, &t, &strict);
        assert_eq!(removed(&o, "low_agreement"), 3);
        assert_eq!(o.kept.height(), 3, "all three agreeing rationales of b");
    }

    #[test]
    fn low_confidence_uses_the_renormalized_probability_of_the_answer() {
        let mut a = row("a", 0, "qa", Some("joy"), "r");
        a.soft_labels = vec!["joy".into(), "anger".into()];
        a.soft_probs = vec![0.2, 0.6]; // p(joy) = 0.2 / 0.8 = 0.25
        let mut b = row("b", 0, "qb", Some("anger"), "r");
        b.soft_labels = a.soft_labels.clone();
        b.soft_probs = a.soft_probs.clone(); // p(anger) = 0.75
        let c = row("c", 0, "qc", Some("joy"), "r"); // no soft label: kept
        let cfg = CurateConfig {
            min_confidence: 0.5,
            ..lenient()
        };
        let o = run(&[a, b, c], &task(TaskKind::Labels), &cfg);
        assert_eq!(removed(&o, "low_confidence"), 1);
        assert_eq!(kept_keys(&o), [("b".into(), 0), ("c".into(), 0)]);
    }

    #[test]
    fn numeric_rationales_must_state_the_answer_and_compute_right() {
        let rows = vec![
            row("a", 0, "q1", Some("17"), "3 * 4 = 12 and 5 + 12 = 17."),
            row("b", 0, "q2", Some("18"), "3 * 4 = 12 and 5 + 12 = 17."),
            row("c", 0, "q3", Some("18"), "5 + 12 = 18."),
            row("d", 0, "q4", Some("9"), ""),
        ];
        let cfg = CurateConfig {
            near_dup_threshold: 0.0,
            ..CurateConfig::default()
        };
        let o = run(&rows, &task(TaskKind::Numeric), &cfg);
        assert_eq!(removed(&o, "rationale_length"), 1, "d: empty rationale");
        assert_eq!(
            removed(&o, "answer_not_in_rationale"),
            1,
            "b: says 17, answers 18"
        );
        assert_eq!(removed(&o, "wrong_arithmetic"), 1, "c: 5 + 12 is not 18");
        assert_eq!(kept_keys(&o), [("a".into(), 0)]);
    }

    #[test]
    fn near_duplicates_are_kept_once_and_never_split_apart() {
        // 40 pairs of unrelated 25-word texts; in each pair the second differs from the
        // first in its last word only (Jaccard 22/24 of 3-word shingles).
        let mut rows = vec![];
        for i in 0..40 {
            let words: Vec<String> = (0..25)
                .map(|j| format!("w{}", (i * 31 + j) * 7919 % 100_003))
                .collect();
            let a = words.join(" ");
            let b = format!("{} changed", words[..24].join(" "));
            rows.push(row(&format!("a{i}"), 0, &a, Some("1"), "r"));
            rows.push(row(&format!("b{i}"), 0, &b, Some("1"), "r"));
        }
        let cfg = CurateConfig {
            near_dup_threshold: 0.7,
            split: [0.5, 0.25, 0.25],
            ..lenient()
        };
        let t = task(TaskKind::Numeric);
        let prepared = prepare(TeacherRow::to_frame(&rows).unwrap(), &t, &cfg, 0, None).unwrap();
        let split: Vec<&str> = prepared
            .column("split")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .map(|s| s.unwrap())
            .collect();
        for pair in split.chunks(2) {
            assert_eq!(pair[0], pair[1], "near-duplicates in different splits");
        }
        assert!(split.contains(&"train") && split.contains(&"test"));
        let o = run(&rows, &t, &cfg);
        assert_eq!(removed(&o, "near_duplicate_input"), 40);
        assert!(kept_keys(&o).iter().all(|(id, _)| id.starts_with('a')));
    }

    #[test]
    fn contaminated_rows_and_label_overflow_are_dropped() {
        let eval = ["Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack How much do you have to pay to buy each pack?"];
        let c = Contamination::new(eval.iter().copied(), 13);
        let rows = vec![
            row(
                "a",
                0,
                "If there is a discount of 25 dollars on each pack how much do you have to pay?",
                Some("joy"),
                "r",
            ),
            row("b", 0, "I am happy", Some("joy"), "r"),
            row("c", 0, "So glad", Some("joy"), "r"),
            row("d", 0, "Furious", Some("anger"), "r"),
        ];
        let cfg = CurateConfig {
            max_per_label: Some(1),
            ..lenient()
        };
        let o = apply(
            TeacherRow::to_frame(&rows).unwrap(),
            &task(TaskKind::Labels),
            &cfg,
            0,
            Some(&c),
        )
        .unwrap();
        assert_eq!(removed(&o, "contaminated"), 1);
        assert_eq!(removed(&o, "label_cap"), 1, "c: a second joy");
        assert_eq!(kept_keys(&o), [("b".into(), 0), ("d".into(), 0)]);
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
