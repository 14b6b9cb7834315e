//! The curation rules as a Polars plan. Each rule is a boolean "passes" column; a row
//! is kept by rule k when it was kept by rule k − 1 and passes rule k, so the rows each
//! rule removed are the difference of two sums, all counted from one collect. Rules that
//! pick a representative (self-consistency, dedup, label cap) choose among the rows still
//! kept at that point. `plan` is every rule on all rows at once; curate itself runs
//! `plan_head` on one part of the rows at a time (`part_rules`) and the rules that look
//! across parts in `LateRules`.
//!
//! Work Polars has no expression for is done in Rust first, on the distinct inputs where
//! it can be (text.rs: normalization, near-duplicate clusters, contamination; arith.rs:
//! rationale checks), and joined in as plain columns.

use super::splits;
use crate::config::{CurateConfig, GoldRule, KeepRationales, TaskKind};
use crate::dedup::{normalize, Contamination, NearDup};
use crate::task::arith;
use crate::task::{ParseStatus, Task};
use anyhow::Result;
use foldhash::fast::RandomState as FoldState;
use polars::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

/// What the rules did, counted: the same whether the rows were judged all at once
/// (`apply`) or part by part (`part_rules`, then `LateRules`).
#[derive(Debug, Clone, PartialEq)]
pub struct Counts {
    pub rows_in: usize,
    /// (rule, rows removed), in the order the rules ran.
    pub funnel: Vec<(&'static str, usize)>,
    pub parse_reasons: BTreeMap<String, usize>,
    /// Inputs by majority share in tenths (0–10 %, …, 90–100 %), when inputs have k > 1
    /// samples; counted before the agreement rule, over inputs with a usable sample (with
    /// gold = filter, a sample that missed gold is not usable: the share is then of the
    /// samples that reached gold).
    pub agreement_histogram: Option<Vec<usize>>,
    /// With several teachers (an ensemble): each one's agreement with the vote and gold.
    pub teachers: Vec<serde_json::Value>,
}

/// The rules on all rows in memory.
pub struct Outcome {
    pub counts: Counts,
    /// Kept rows with a `split` column.
    pub kept: DataFrame,
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

/// How many of `RULES` judge a row only among rows of its own normalized input (up to
/// duplicate_input): `plan_head`'s rules.
pub const HEAD_RULES: usize = 10;

fn keep_col(rule: &str) -> String {
    format!("_keep_{rule}")
}

/// Distinct inputs by their normalized text (rows with the same text are exact
/// duplicates): the texts in order of first appearance, and each row's index among them.
pub struct NormGroups {
    pub texts: Vec<String>,
    pub of_row: Vec<u32>,
}

pub fn norm_groups(df: &DataFrame) -> Result<NormGroups> {
    let inputs = df.column("input")?.str()?;
    // An input's samples repeat its text: normalize each distinct raw text once. The maps
    // are only looked up, never iterated, so their hasher decides nothing: foldhash, cheaper
    // on short keys than std's SipHash.
    let mut by_input: HashMap<&str, u32, FoldState> = HashMap::default();
    let mut by_norm: HashMap<String, u32, FoldState> = HashMap::default();
    let mut texts: Vec<String> = vec![];
    let of_row = inputs
        .iter()
        .map(|t| {
            let t = t.unwrap_or("");
            if let Some(&i) = by_input.get(t) {
                return i;
            }
            let norm = normalize(t);
            let i = *by_norm.entry(norm.clone()).or_insert_with(|| {
                texts.push(norm);
                texts.len() as u32 - 1
            });
            by_input.insert(t, i);
            i
        })
        .collect();
    Ok(NormGroups { texts, of_row })
}

/// Columns computed in Rust, one value a row, for the rules on all rows in memory
/// (`apply`): exact- and near-duplicate groups, contamination, the split, and the row
/// checks.
fn add_rust_columns(
    df: &mut DataFrame,
    task: &Task,
    cfg: &CurateConfig,
    seed: u64,
    contamination: Option<&Contamination>,
) -> Result<()> {
    let groups = norm_groups(df)?;
    let texts: Vec<&str> = groups.texts.iter().map(String::as_str).collect();
    // Near-duplicate clusters over distinct normalized texts; without the rule each text
    // is its own cluster.
    let cluster: Vec<usize> = if cfg.near_dup_threshold > 0.0 {
        NearDup::new(cfg.near_dup_threshold, cfg.shingle_words).clusters(&texts)
    } else {
        (0..texts.len()).collect()
    };
    let split_of_text: Vec<&'static str> =
        texts.iter().map(|t| split_of(t, seed, cfg.split)).collect();
    let contaminated: Vec<bool> = texts
        .iter()
        .map(|t| contamination.is_some_and(|c| c.contaminated(t)))
        .collect();
    let norm = |r: usize| groups.of_row[r] as usize;
    let n = df.height();
    df.with_column(Column::new("_norm".into(), groups.of_row.clone()))?;
    df.with_column(Column::new(
        "_cluster".into(),
        (0..n)
            .map(|r| cluster[norm(r)] as u32)
            .collect::<Vec<u32>>(),
    ))?;
    df.with_column(Column::new(
        "_contaminated".into(),
        (0..n).map(|r| contaminated[norm(r)]).collect::<Vec<bool>>(),
    ))?;
    df.with_column(Column::new(
        "split".into(),
        (0..n)
            .map(|r| split_of_text[cluster[norm(r)]])
            .collect::<Vec<&str>>(),
    ))?;
    add_row_checks(df, task, cfg)
}

/// The checks of one row on its own, computed in Rust: the rationale states the answer
/// and its arithmetic holds (numeric tasks), and the confidence of the answer.
fn add_row_checks(df: &mut DataFrame, task: &Task, cfg: &CurateConfig) -> Result<()> {
    use rayon::prelude::*;
    let rationale: Vec<&str> = df
        .column("rationale")?
        .str()?
        .iter()
        .map(|r| r.unwrap_or(""))
        .collect();
    let answer: Vec<&str> = df
        .column("answer")?
        .str()?
        .iter()
        .map(|a| a.unwrap_or(""))
        .collect();
    let numeric = task.kind == TaskKind::Numeric;
    // Each row on its own (a few regex searches and an evaluator): across the cores.
    let (states, arith_ok): (Vec<bool>, Vec<bool>) = rationale
        .par_iter()
        .zip(answer.par_iter())
        .map(|(r, a)| {
            let states = !numeric
                || !cfg.require_answer_in_rationale
                || arith::states_answer(r, a, task.tolerance);
            let holds =
                !numeric || !cfg.check_arithmetic || arith::arithmetic_holds(r, task.tolerance);
            (states, holds)
        })
        .unzip();
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

/// Add rule `name`: a row is kept by it when the previous rule kept it and it passes.
fn add_rule(lf: LazyFrame, prev: &mut String, name: &str, pass: Expr) -> LazyFrame {
    let next = keep_col(name);
    let lf = lf.with_column(
        col(prev.as_str())
            .and(pass.fill_null(lit(false)))
            .alias(&next),
    );
    *prev = next;
    lf
}

/// The rules that judge a row among the rows of its own input or normalized input
/// (`HEAD_RULES`: up to duplicate_input), so they can run on one part of the rows at a
/// time when parts hold whole normalized inputs; also the agreement and gold columns.
/// Returns the plan and the keep column of its last rule.
pub fn plan_head(df: DataFrame, task: &Task, cfg: &CurateConfig) -> Result<(LazyFrame, String)> {
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
    lf = add_rule(
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
    lf = add_rule(
        lf,
        &mut prev,
        "low_agreement",
        multi
            .clone()
            .not()
            .or(col("_agreement").gt_eq(lit(cfg.min_agreement))),
    );
    lf = add_rule(
        lf,
        &mut prev,
        "minority_answer",
        multi.clone().not().or(col("answer").eq(col("_majority"))),
    );
    let one = cfg.keep_rationales == KeepRationales::One;
    let first_sample = first_kept_in_group(&prev, "id", col("sample"))?;
    lf = add_rule(lf, &mut prev, "extra_rationale", on(one, first_sample));

    lf = add_rule(
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
    lf = add_rule(lf, &mut prev, "rationale_length", length_ok);
    lf = add_rule(
        lf,
        &mut prev,
        "answer_not_in_rationale",
        col("_states_answer"),
    );
    lf = add_rule(lf, &mut prev, "wrong_arithmetic", col("_arith_ok"));
    // Exact and near duplicates: keep the inputs (all their kept samples) of the first id
    // in each group.
    let exact = first_kept_in_group(&prev, "_norm", col("id"))?;
    lf = add_rule(
        lf,
        &mut prev,
        "duplicate_input",
        on(cfg.dedup_inputs, exact),
    );
    Ok((lf, prev))
}

/// The lazy plan of every rule on all rows in memory: the head rules, then the rules
/// that judge across normalized inputs (near-duplicate clusters, contamination, the label
/// cap over all rows in order). `LateRules` is the same tail for rows that come part by
/// part.
pub fn plan(df: DataFrame, task: &Task, cfg: &CurateConfig) -> Result<LazyFrame> {
    let (mut lf, mut prev) = plan_head(df, task, cfg)?;
    let on = |enabled: bool, pass: Expr| if enabled { pass } else { lit(true) };
    let near = first_kept_in_group(&prev, "_cluster", col("id"))?;
    lf = add_rule(
        lf,
        &mut prev,
        "near_duplicate_input",
        on(cfg.near_dup_threshold > 0.0, near),
    );
    lf = add_rule(lf, &mut prev, "contaminated", col("_contaminated").not());
    let cap = match (cfg.max_per_label, task.kind) {
        (Some(cap), TaskKind::Labels) => col(prev.as_str())
            .cast(DataType::UInt32)
            .cum_sum(false)
            .over([col("answer")])?
            .lt_eq(lit(cap as u32)),
        _ => lit(true),
    };
    Ok(add_rule(lf, &mut prev, "label_cap", cap))
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

/// The curated columns the split files take from the rules' output: those the rules
/// compute (the agreement, filled in where an input has several samples) and the answer
/// the label cap reads. The others are read again from the teacher files, in row order
/// (`teacher_column`) with the raw text and top-k: the kept rows' text (input,
/// rationale) would otherwise be compressed into the parts' spill, read back and merged
/// from every part (about a tenth of curate's time at 10M rows, docs/SCALE.md).
pub const KEPT_COLUMNS: [&str; 3] = ["answer", "agreement", "agrees_with_gold"];

/// The curated columns an ensemble rewrites (`ensemble::prepare`): taken from the rules'
/// output too when the rows come from an ensemble, else from the teacher files.
pub const ENSEMBLE_COLUMNS: [&str; 3] = ["soft_kind", "soft_labels", "soft_probs"];

/// A curated column as a kept row has it, from its teacher row: as written, but a missing
/// rationale reads as "".
pub fn teacher_column(name: &str) -> Expr {
    match name {
        "rationale" => col(name).fill_null(lit("")),
        _ => col(name),
    }
}

fn with_kept_columns(lf: LazyFrame) -> LazyFrame {
    lf.with_column(teacher_column("rationale")).with_column(
        when(col("_samples").gt(lit(1)))
            .then(col("_agreement"))
            .otherwise(lit(NULL).cast(DataType::Float64))
            .alias("agreement"),
    )
}

/// Rows each rule of `names` removed, from their keep columns.
fn removed_by(all: &DataFrame, names: &[&'static str], rows: usize) -> Result<Vec<usize>> {
    let mut before = rows;
    let mut removed = vec![];
    for name in names {
        let after = all.column(&keep_col(name))?.bool()?.sum().unwrap_or(0) as usize;
        removed.push(before - after);
        before = after;
    }
    Ok(removed)
}

/// Every rule on all rows at once: the reference the part-by-part curate is tested
/// against, and `--explain`'s plan.
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
    let funnel = RULES
        .iter()
        .copied()
        .zip(removed_by(&all, &RULES, rows_in)?)
        .collect();
    let agreement_histogram = agreement_histogram(&all)?;
    let teachers = teachers_json(&teacher_tallies(&all, task)?);
    let last = keep_col(RULES[RULES.len() - 1]);
    let kept = with_kept_columns(all.lazy().filter(col(&last))).collect()?;
    Ok(Outcome {
        counts: Counts {
            rows_in,
            funnel,
            parse_reasons,
            agreement_histogram,
            teachers,
        },
        kept,
    })
}

/// A distinct normalized input of one part.
pub struct PartNorm {
    pub text: String,
    /// Its first row (the order of inputs: the earlier input leads a cluster).
    pub first_row: u32,
    /// Its first row the head rules kept.
    pub kept_row: Option<u32>,
    pub contaminated: bool,
    /// Its own split (index into `SPLITS`); a cluster's rows go to its first input's.
    pub split: u8,
}

/// One part's rows through the head rules.
pub struct PartRules {
    pub rows: usize,
    /// Rows each of the head rules removed.
    pub removed: Vec<usize>,
    pub parse_reasons: BTreeMap<String, usize>,
    pub agreement_histogram: Option<Vec<usize>>,
    pub teachers: BTreeMap<String, TeacherTally>,
    pub norms: Vec<PartNorm>,
    /// The rows the head rules kept, in row order: `KEPT_COLUMNS`, `ENSEMBLE_COLUMNS`,
    /// `ROW`, `completion_tokens`, `_norm` (index into `norms`) and `_first_id` (the row's
    /// id is the first kept id of its normalized input, which the near-duplicate rule
    /// keeps).
    pub kept: DataFrame,
}

/// The head rules on one part of the rows, which must hold every row of each of its
/// normalized inputs (and so of each of its inputs' ids), in row order with `ROW`.
pub fn part_rules(
    mut df: DataFrame,
    task: &Task,
    cfg: &CurateConfig,
    seed: u64,
    contamination: Option<&Contamination>,
) -> Result<PartRules> {
    let rows = df.height();
    let parse_reasons = parse_reasons(&df)?;
    let groups = norm_groups(&df)?;
    df.with_column(Column::new("_norm".into(), groups.of_row.clone()))?;
    add_row_checks(&mut df, task, cfg)?;
    let (lf, last) = plan_head(df, task, cfg)?;
    let all = lf.collect()?;
    let removed = removed_by(&all, &RULES[..HEAD_RULES], rows)?;
    let agreement_histogram = agreement_histogram(&all)?;
    let teachers = teacher_tallies(&all, task)?;
    let mut columns: Vec<Expr> = KEPT_COLUMNS
        .iter()
        .chain(&ENSEMBLE_COLUMNS)
        .map(|c| col(*c))
        .collect();
    columns.extend([
        col(splits::ROW),
        col("completion_tokens"),
        col("_norm"),
        col("_first_id"),
    ]);
    let kept = with_kept_columns(all.clone().lazy().filter(col(&last)))
        .with_column(
            col("id")
                .eq(col("id").first().over([col("_norm")])?)
                .alias("_first_id"),
        )
        .select(columns)
        .collect()?;

    let first = |df: &DataFrame| -> Result<Vec<Option<u32>>> {
        let mut first = vec![None; groups.texts.len()];
        let rows = df.column(splits::ROW)?.cast(&DataType::UInt32)?;
        let norms = df.column("_norm")?.u32()?.clone();
        for (row, norm) in rows.u32()?.iter().zip(norms.iter()) {
            let (Some(row), Some(norm)) = (row, norm) else {
                continue;
            };
            first[norm as usize].get_or_insert(row);
        }
        Ok(first)
    };
    let (first_row, kept_row) = (first(&all)?, first(&kept)?);
    let split_index = |text: &str| {
        let split = split_of(text, seed, cfg.split);
        super::SPLITS.iter().position(|s| *s == split).unwrap_or(0) as u8
    };
    use rayon::prelude::*;
    let norms = groups
        .texts
        .into_par_iter()
        .enumerate()
        .map(|(i, text)| PartNorm {
            first_row: first_row[i].unwrap_or(u32::MAX),
            kept_row: kept_row[i],
            contaminated: contamination.is_some_and(|c| c.contaminated(&text)),
            split: split_index(&text),
            text,
        })
        .collect();
    Ok(PartRules {
        rows,
        removed,
        parse_reasons,
        agreement_histogram,
        teachers,
        norms,
        kept,
    })
}

/// The rules after the head (near_duplicate_input, contaminated, label_cap) for rows
/// that come part by part: what they need of each normalized input (by its index among
/// all parts' inputs), applied to the head-kept rows in row order, as `plan` applies them
/// to all rows at once.
pub struct LateRules {
    near_on: bool,
    /// Whether the input is its near-duplicate cluster's first input with a kept row.
    cluster_leader: Vec<bool>,
    contaminated: Vec<bool>,
    /// The split of the input's cluster (index into `SPLITS`).
    split: Vec<u8>,
    cap: Option<usize>,
    per_label: HashMap<Option<String>, usize>,
    /// Rows each late rule removed, in `RULES` order.
    pub removed: [usize; 3],
}

impl LateRules {
    pub fn new(
        cluster_leader: Vec<bool>,
        contaminated: Vec<bool>,
        split: Vec<u8>,
        task: &Task,
        cfg: &CurateConfig,
    ) -> Self {
        LateRules {
            near_on: cfg.near_dup_threshold > 0.0,
            cluster_leader,
            contaminated,
            split,
            cap: cfg.max_per_label.filter(|_| task.kind == TaskKind::Labels),
            per_label: HashMap::new(),
            removed: [0; 3],
        }
    }

    /// Judge head-kept rows, given in row order (`_gid`: the input's index among all
    /// inputs, `_first_id`, `answer`): whether each is kept, and its split.
    pub fn judge(&mut self, rows: &DataFrame) -> Result<(Vec<bool>, Vec<&'static str>)> {
        let gids = rows.column("_gid")?.u32()?;
        let first_id = rows.column("_first_id")?.bool()?;
        let answers = rows.column("answer")?.str()?;
        let mut keep = Vec::with_capacity(rows.height());
        let mut split = Vec::with_capacity(rows.height());
        for ((gid, first_id), answer) in gids.iter().zip(first_id.iter()).zip(answers.iter()) {
            let g = gid.ok_or_else(|| anyhow::anyhow!("a kept row has no input index"))? as usize;
            split.push(super::SPLITS[self.split[g] as usize]);
            let leader = !self.near_on || (self.cluster_leader[g] && first_id == Some(true));
            let kept = if !leader {
                self.removed[0] += 1;
                false
            } else if self.contaminated[g] {
                self.removed[1] += 1;
                false
            } else if let Some(cap) = self.cap {
                let n = self
                    .per_label
                    .entry(answer.map(str::to_string))
                    .or_default();
                *n += 1;
                let under = *n <= cap;
                if !under {
                    self.removed[2] += 1;
                }
                under
            } else {
                true
            };
            keep.push(kept);
        }
        Ok((keep, split))
    }
}

/// One teacher's rows, for the ensemble's agreement figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TeacherTally {
    pub rows: u64,
    pub usable: u64,
    pub agrees_with_vote: u64,
    pub with_gold: u64,
    pub agrees_with_gold: u64,
}

impl TeacherTally {
    pub fn add(&mut self, other: &TeacherTally) {
        self.rows += other.rows;
        self.usable += other.usable;
        self.agrees_with_vote += other.agrees_with_vote;
        self.with_gold += other.with_gold;
        self.agrees_with_gold += other.agrees_with_gold;
    }
}

/// Per teacher: rows, usable answers, usable answers that match the input's (weighted)
/// vote, usable answers with gold and those that match it.
fn teacher_tallies(all: &DataFrame, task: &Task) -> Result<BTreeMap<String, TeacherTally>> {
    let usable = col("status")
        .eq(lit(ParseStatus::Ok.as_str()))
        .or(col("status").eq(lit(ParseStatus::Rescued.as_str())));
    let count = |e: Expr| e.cast(DataType::UInt64).sum();
    let with_gold = usable.clone().and(col("gold").is_not_null());
    let per = all
        .clone()
        .lazy()
        .group_by([col("teacher")])
        .agg([
            len().cast(DataType::UInt64).alias("rows"),
            count(usable.clone()).alias("usable"),
            count(
                usable
                    .clone()
                    .and(col("answer").eq(col("_majority")).fill_null(lit(false))),
            )
            .alias("agrees_with_vote"),
            count(with_gold.clone()).alias("with_gold"),
            count(with_gold.and(gold_agreement(task).fill_null(lit(false))))
                .alias("agrees_with_gold"),
        ])
        .collect()?;
    let get =
        |name: &str, i: usize| -> Result<u64> { Ok(per.column(name)?.u64()?.get(i).unwrap_or(0)) };
    let teachers = per.column("teacher")?.str()?;
    let mut out = BTreeMap::new();
    for i in 0..per.height() {
        out.insert(
            teachers.get(i).unwrap_or("").to_string(),
            TeacherTally {
                rows: get("rows", i)?,
                usable: get("usable", i)?,
                agrees_with_vote: get("agrees_with_vote", i)?,
                with_gold: get("with_gold", i)?,
                agrees_with_gold: get("agrees_with_gold", i)?,
            },
        );
    }
    Ok(out)
}

/// The teachers' figures for the report, when rows come from more than one.
pub fn teachers_json(tallies: &BTreeMap<String, TeacherTally>) -> Vec<serde_json::Value> {
    if tallies.len() < 2 {
        return vec![];
    }
    let share = |hit: u64, of: u64| (of > 0).then(|| hit as f64 / of as f64);
    tallies
        .iter()
        .map(|(teacher, t)| {
            serde_json::json!({
                "teacher": teacher,
                "rows": t.rows,
                "usable": t.usable,
                "agrees_with_vote": share(t.agrees_with_vote, t.usable),
                "agrees_with_gold": share(t.agrees_with_gold, t.with_gold),
            })
        })
        .collect()
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
pub(super) mod tests {
    use super::*;
    use crate::records::{TeacherRow, TokenTopk};

    /// A teacher row; `answer` None means a parse failure.
    pub(in crate::curate) fn row(
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
        o.counts.funnel.iter().find(|(r, _)| *r == rule).unwrap().1
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
        assert_eq!(o.counts.parse_reasons["no_answer"], 1);
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
        assert_eq!(o.counts.agreement_histogram.as_ref().unwrap()[5], 1);
        assert_eq!(o.counts.agreement_histogram.as_ref().unwrap()[9], 1);

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
