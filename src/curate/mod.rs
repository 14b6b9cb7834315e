//! curate: teacher rows (all shards) → train / val / test Parquet, report.json,
//! report.md and funnel.svg, in memory that follows `[curate] part_rows`, not the number
//! of rows:
//!
//! 1. parts.rs spreads the rule columns of all teacher rows over part files by a hash of
//!    the normalized input, so each part holds whole inputs and exact-duplicate groups;
//! 2. the head rules (rules.rs: parse, gold, votes, confidence, length, arithmetic, exact
//!    duplicates; one Polars plan) run on one part at a time, which leaves its kept rows
//!    on disk and its distinct inputs in clusters.rs's MinHash index;
//! 3. clusters.rs finds the near-duplicate clusters over all parts' inputs, a bucket
//!    file of band keys at a time;
//! 4. splits.rs reads the teacher files again in row order, merges the parts' kept rows
//!    into that order, judges them by the late rules (near duplicates, contamination, the
//!    label cap: `rules::LateRules`) and writes each with its other columns (input,
//!    rationale, raw text, token top-k: the kept rows' spill holds only what the rules
//!    computed, so the merge across parts moves few bytes) to its split.
//!
//! `rules::apply` is every rule on all rows in memory at once: the reference the
//! part-by-part path is tested against (same files, same counts) and `--explain`'s plan.

mod clusters;
mod ensemble;
pub mod parts;
mod report;
pub mod rules;
mod spill;
pub mod splits;

use crate::alloc;
use crate::config::{Config, DataConfig, Stage};
use crate::dedup::{Contamination, NearDup};
use crate::io::atomic::{with_storage_hint, write_bytes, write_json, StagedDir};
use crate::io::inputs::read_inputs;
use crate::io::manifest::{config_hash, entry, staged_entry, FileEntry, Manifest};
use crate::io::shards::{complete_teacher_files, Shard};
use crate::records::topk_store::bytes_per_token;
use crate::task::Task;
use anyhow::{Context, Result};
use clusters::ClusterIndex;
use polars::prelude::*;
use report::KeptStats;
use rules::{Counts, LateRules, PartRules, TeacherTally};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const SPLITS: [&str; 3] = ["train", "val", "test"];

/// All teacher shard files of a run's generate folder, sorted; every shard must have
/// finished (its manifest written, of this schema version).
pub fn teacher_files(generate_dir: &Path) -> Result<Vec<PathBuf>> {
    let files = complete_teacher_files(generate_dir)?;
    for f in &files {
        let shard = Shard::from_teacher_file(f).expect("listed files are teacher shard files");
        Manifest::read_as(generate_dir, &shard.manifest_name(), Stage::Generate)?;
    }
    Ok(files)
}

pub fn input_entries(cfg: &Config) -> Result<Vec<FileEntry>> {
    let mut files = teacher_files(&cfg.stage_dir(Stage::Generate))?;
    files.extend(cfg.curate.decontaminate.iter().cloned());
    files.iter().map(|p| entry(p, None)).collect()
}

/// The n-grams of the evaluation files named in `[curate] decontaminate`.
pub fn contamination(cfg: &Config) -> Result<Option<Contamination>> {
    if cfg.curate.decontaminate.is_empty() {
        return Ok(None);
    }
    let field = cfg
        .curate
        .decontaminate_field
        .clone()
        .unwrap_or_else(|| cfg.data.input_field.clone());
    let mut texts = vec![];
    for file in &cfg.curate.decontaminate {
        let data = DataConfig {
            inputs: vec![file.clone()],
            id_field: None,
            input_field: field.clone(),
            gold_field: None,
            limit: None,
            max_input_chars: usize::MAX,
        };
        let rows = read_inputs(&data).with_context(|| {
            format!(
                "cannot read the evaluation file {} named in [curate] decontaminate",
                file.display()
            )
        })?;
        texts.extend(rows.into_iter().map(|r| r.input));
    }
    Ok(Some(Contamination::new(
        texts.iter().map(String::as_str),
        cfg.curate.decontaminate_ngram,
    )))
}

/// `kdpipe curate --explain`: the Polars plan of the rules, optimized.
pub fn explain(cfg: &Config) -> Result<String> {
    let task = Task::from_config(&cfg.task);
    let all = parts::all_rows(&teacher_files(&cfg.stage_dir(Stage::Generate))?)?;
    let df = rules::prepare(
        all,
        &task,
        &cfg.curate,
        cfg.seed,
        contamination(cfg)?.as_ref(),
    )?;
    Ok(rules::plan(df, &task, &cfg.curate)?.explain(true)?)
}

/// What the head rules of all parts counted.
#[derive(Default)]
struct HeadCounts {
    removed: Vec<usize>,
    parse_reasons: BTreeMap<String, usize>,
    agreement_histogram: Option<Vec<usize>>,
    teachers: BTreeMap<String, TeacherTally>,
}

impl HeadCounts {
    fn add(&mut self, part: &PartRules) {
        self.removed.resize(part.removed.len(), 0);
        for (total, n) in self.removed.iter_mut().zip(&part.removed) {
            *total += n;
        }
        for (reason, n) in &part.parse_reasons {
            *self.parse_reasons.entry(reason.clone()).or_default() += n;
        }
        if let Some(hist) = &part.agreement_histogram {
            let total = self
                .agreement_histogram
                .get_or_insert_with(|| vec![0; hist.len()]);
            for (t, n) in total.iter_mut().zip(hist) {
                *t += n;
            }
        }
        for (teacher, tally) in &part.teachers {
            self.teachers.entry(teacher.clone()).or_default().add(tally);
        }
    }
}

/// What curate keeps of each distinct normalized input, over all parts (by gid).
#[derive(Default)]
struct Inputs {
    kept_row: Vec<u32>,
    contaminated: Vec<bool>,
    split: Vec<u8>,
}

/// The rules, part by part: the head rules on each part (kept rows to `work`), the
/// near-duplicate clusters over all parts' inputs, then the late rules as the kept rows
/// are merged in row order into the split files in `dir`.
fn curate_in_parts(
    cfg: &Config,
    files: &[PathBuf],
    contamination: Option<&Contamination>,
    work: &Path,
    dir: &Path,
) -> Result<(Counts, Vec<splits::SplitFile>, KeptStats)> {
    let task = Task::from_config(&cfg.task);
    let started = std::time::Instant::now();
    std::fs::create_dir_all(work)?;
    // Each pass gives back what it freed when it ends (`alloc::giving_back_after`): the
    // spread's buffer and the last part's frames stay out of the next pass's heap and peak.
    let partition =
        alloc::giving_back_after(|| parts::partition(files, work, cfg.curate.part_rows))?;
    let partition_s = started.elapsed().as_secs_f64();
    let n_parts = partition.parts.len();
    if n_parts > 1 {
        eprintln!(
            "curate: {} rows in {n_parts} parts ({:.0} s)",
            partition.rows_in,
            started.elapsed().as_secs_f64()
        );
    }
    let mut index = if cfg.curate.near_dup_threshold > 0.0 {
        let near = NearDup::new(cfg.curate.near_dup_threshold, cfg.curate.shingle_words);
        let buckets = partition.rows_in.div_ceil(1_000_000);
        Some(ClusterIndex::new(near, &work.join("clusters"), buckets)?)
    } else {
        None
    };
    let rules_started = std::time::Instant::now();
    let (head, inputs, kept_files) = alloc::giving_back_after(|| {
        head_rules_by_part(
            cfg,
            &task,
            contamination,
            partition.parts,
            index.as_mut(),
            work,
        )
    })?;
    let rules_s = rules_started.elapsed().as_secs_f64();
    let clusters_started = std::time::Instant::now();
    let roots: Vec<u32> = match index {
        Some(index) => alloc::giving_back_after(|| index.roots())?,
        None => (0..inputs.kept_row.len() as u32).collect(),
    };
    let clusters_s = clusters_started.elapsed().as_secs_f64();
    // Per-input arrays are the memory that grows with the rows: each goes once used.
    let Inputs {
        kept_row,
        contaminated,
        split: own_split,
    } = inputs;
    let leaders = clusters::leaders(&roots, &kept_row);
    drop(kept_row);
    let split = roots.iter().map(|&r| own_split[r as usize]).collect();
    drop((roots, own_split));
    let late = LateRules::new(leaders, contaminated, split, &task, &cfg.curate);
    let source = parts::PartsKept::new(kept_files, late)?;
    let splits_started = std::time::Instant::now();
    // This pass marks its frees too, and gives them back as it goes (wide rows with token
    // top-k churn gigabytes; `splits::GIVE_BACK_BYTES`).
    let (written, stats, source) =
        alloc::giving_back_after(|| splits::write(files, partition.rows_in, source, dir, SPLITS))?;
    // Which pass a run spends its time in, for scaling benchmarks and users sizing a job.
    eprintln!(
        "curate: seconds a pass: partition {partition_s:.1}, head rules {rules_s:.1}, \
         near-duplicate clusters {clusters_s:.1}, split files {:.1}",
        splits_started.elapsed().as_secs_f64()
    );
    let funnel = rules::RULES
        .iter()
        .copied()
        .zip(head.removed.iter().chain(&source.late.removed).copied())
        .collect();
    let counts = Counts {
        rows_in: partition.rows_in,
        funnel,
        parse_reasons: head.parse_reasons,
        agreement_histogram: head.agreement_histogram,
        teachers: rules::teachers_json(&head.teachers),
    };
    Ok((counts, written, stats))
}

/// The head rules on each part in turn, its kept rows written to `work`, its inputs added
/// to the near-duplicate index (if any).
fn head_rules_by_part(
    cfg: &Config,
    task: &Task,
    contamination: Option<&Contamination>,
    parts: Vec<parts::Part>,
    mut index: Option<&mut ClusterIndex>,
    work: &Path,
) -> Result<(HeadCounts, Inputs, Vec<spill::SpillFile>)> {
    let n_parts = parts.len();
    // Each part's kept rows are read back this many at a time.
    let slice_rows = (parts::HELD_ROWS / n_parts).clamp(256, crate::io::parquet::ROW_GROUP_ROWS);
    let rules_started = std::time::Instant::now();
    let mut head = HeadCounts::default();
    let mut inputs = Inputs::default();
    let mut kept_files = vec![];
    let mut rows_done = 0;
    for (p, part) in parts.into_iter().enumerate() {
        let mut rows = part.take()?;
        if !cfg.ensemble.is_empty() {
            rows = ensemble::prepare(cfg, rows)?;
        }
        let part = rules::part_rules(rows, task, &cfg.curate, cfg.seed, contamination)?;
        rows_done += part.rows;
        head.add(&part);
        let offset = inputs.kept_row.len() as u32;
        if let Some(index) = index.as_mut() {
            index.add_all(part.norms.iter().map(|n| (n.text.as_str(), n.first_row)))?;
        }
        for norm in &part.norms {
            inputs.kept_row.push(norm.kept_row.unwrap_or(u32::MAX));
            inputs.contaminated.push(norm.contaminated);
            inputs.split.push(norm.split);
        }
        // Without an ensemble the soft labels are the teacher rows', read again with the
        // other columns the rules did not change.
        let unchanged: &[&str] = if cfg.ensemble.is_empty() {
            &rules::ENSEMBLE_COLUMNS
        } else {
            &[]
        };
        let kept = part
            .kept
            .lazy()
            .with_column((col("_norm") + lit(offset)).alias("_gid"))
            .drop(by_name(
                unchanged.iter().copied().chain(["_norm"]),
                true,
                false,
            ))
            .collect()?;
        let path = work.join(format!("kept-{p:05}.segments"));
        kept_files.push(parts::write_kept(&path, &kept, slice_rows)?);
        if n_parts > 1 {
            let done = p + 1;
            let secs = rules_started.elapsed().as_secs_f64();
            eprintln!(
                "curate: rules on part {done}/{n_parts}, {:.0} rows/s, eta {:.0} s",
                rows_done as f64 / secs.max(1e-9),
                secs / done as f64 * (n_parts - done) as f64
            );
        }
    }
    Ok((head, inputs, kept_files))
}

pub fn run(cfg: &Config) -> Result<PathBuf> {
    let started = std::time::Instant::now();
    let out_dir = cfg.stage_dir(Stage::Curate);
    let files = teacher_files(&cfg.stage_dir(Stage::Generate))?;
    let contamination = contamination(cfg)?;

    // Written beside the earlier output, which stays complete until the swap.
    let staged = StagedDir::begin(&out_dir)?;
    let dir = staged.path();
    let work = dir.join("parts");
    // The part files, the cluster index and the split files all go to the staging folder:
    // a full disk anywhere in them is the same clear error, the earlier output untouched.
    let (counts, written, kept) = curate_in_parts(cfg, &files, contamination.as_ref(), &work, dir)
        .map_err(|e| with_storage_hint(e, &dir.join("train.parquet")))?;
    std::fs::remove_dir_all(&work)?;
    let mut outputs = Vec::new();
    let mut split_rows = serde_json::Map::new();
    let topk_tokens: usize = written.iter().map(|w| w.topk_tokens).sum();
    for w in &written {
        split_rows.insert(w.split.to_string(), w.rows.into());
        outputs.push(staged_entry(&staged, &w.path, Some(w.rows))?);
    }
    let split_files: Vec<PathBuf> = written.into_iter().map(|w| w.path).collect();
    let mut summary = report::summary(&counts, &kept, &split_rows)?;
    let split_paths: Vec<&Path> = split_files.iter().map(PathBuf::as_path).collect();
    if let Some(bytes) = bytes_per_token(&split_paths, topk_tokens)? {
        summary["topk_tokens"] = topk_tokens.into();
        summary["topk_bytes_per_token"] = bytes.into();
    }
    let report_path = dir.join("report.json");
    write_json(&report_path, &summary)?;
    let md_path = dir.join("report.md");
    write_bytes(&md_path, report::markdown(&summary).as_bytes())?;
    let svg_path = dir.join("funnel.svg");
    write_bytes(&svg_path, report::funnel_svg(&summary)?.as_bytes())?;
    for p in [&report_path, &md_path, &svg_path] {
        outputs.push(staged_entry(&staged, p, None)?);
    }

    let mut m = Manifest::new(
        Stage::Curate,
        config_hash(&cfg.stage_view(Stage::Curate)),
        cfg.seed,
    );
    m.inputs = files
        .iter()
        .chain(&cfg.curate.decontaminate)
        .map(|p| entry(p, None))
        .collect::<Result<_>>()?;
    m.outputs = outputs;
    m.summary = summary;
    m.write(dir)?;
    staged.commit()?;
    eprintln!(
        "curate: {} rows in, {} out {} in {:.1} s → {}",
        counts.rows_in,
        kept.rows(),
        serde_json::Value::Object(split_rows),
        started.elapsed().as_secs_f64(),
        out_dir.display()
    );
    Ok(out_dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{TeacherRow, CURATED_COLUMNS};

    /// Teacher rows where every rule has work: 4 samples an input, minority answers,
    /// parse failures, wrong arithmetic, gold disagreement, exact duplicates (other ids,
    /// other case and punctuation), near duplicates (a word added) far apart in row
    /// order, soft labels; label answers for a labels task.
    fn rows(labels: bool) -> Vec<TeacherRow> {
        const NAMES: [&str; 7] = ["Paco", "Hana", "Gus", "Maria", "Tom", "Aisha", "Liam"];
        const ITEMS: [&str; 5] = ["apples", "marbles", "stickers", "cookies", "books"];
        const LABELS: [&str; 3] = ["joy", "anger", "sadness"];
        let mut out = vec![];
        for i in 0..240u64 {
            let (a, b) = (i * 7 % 53 + 2, i * 11 % 47 + 3);
            let (name, item) = (NAMES[(i % 7) as usize], ITEMS[(i / 7 % 5) as usize]);
            let mut input = format!(
                "{name} had {a} {item} in box {i} and then found {b} more {item} near the old mill by the river today. How many {item} does {name} have now?"
            );
            if i % 17 == 16 {
                // The previous input again, shouted.
                let prev = &out[out.len() - 1];
                input = format!("{}!!", TeacherRow::clone(prev).input.to_uppercase());
            } else if i % 13 == 12 && i > 100 {
                // An input from much earlier with one word added: a near duplicate.
                input = format!("{} please", out[((i - 100) * 4) as usize].input);
            }
            for s in 0..4u32 {
                let right = a + b;
                let answer = if labels {
                    LABELS[((i + s as u64 * (i % 3)) % 3) as usize].to_string()
                } else if i % 5 == 0 && s == 3 {
                    (right + 1).to_string()
                } else {
                    right.to_string()
                };
                let shown = if i % 11 == 0 { right + 2 } else { right };
                let failed = (i + s as u64).is_multiple_of(23);
                let rationale = format!("{a} + {b} = {shown}. The answer is {answer}.");
                let mut r = rules::tests::row(
                    &format!("q{i}"),
                    s,
                    &input,
                    (!failed).then_some(answer.as_str()),
                    &rationale,
                );
                r.gold = Some(if i % 19 == 0 {
                    "1".into()
                } else {
                    right.to_string()
                });
                r.raw = format!("raw {i}/{s}");
                r.completion_tokens = 20 + (i % 9) as u32 + s;
                r.teacher = if s % 2 == 0 { "t0" } else { "t1" }.into();
                if labels {
                    r.gold = Some(LABELS[(i % 3) as usize].into());
                    r.soft_kind = "label_scores".into();
                    r.soft_labels = LABELS.iter().map(|l| l.to_string()).collect();
                    let p = (i % 10) as f64 / 10.0;
                    r.soft_probs = vec![p, 1.0 - p, 0.0];
                    if i % 4 == 1 {
                        // A label answered without a rationale.
                        r.rationale = None;
                    }
                }
                out.push(r);
            }
        }
        out
    }

    /// Curate part by part (`part_rows` rows a part) against every rule on all rows in
    /// memory: the same split files, frame-equal, and the same counts (returned).
    fn parts_equal_memory(
        labels: bool,
        tweak: impl Fn(&mut Config),
    ) -> BTreeMap<&'static str, usize> {
        let dir = tempfile::tempdir().unwrap();
        let teacher_rows = rows(labels);
        let file = dir.path().join("teacher-00000-of-00001.parquet");
        let mut frame = TeacherRow::to_frame(&teacher_rows).unwrap();
        crate::io::parquet::write_frame(&file, &mut frame).unwrap();
        let kind = if labels {
            "kind = \"labels\"\nlabels = [\"joy\", \"anger\", \"sadness\"]"
        } else {
            "kind = \"numeric\""
        };
        let mut cfg: Config = toml::from_str(&format!(
            "name = \"t\"\n[data]\ninputs = [\"x\"]\ninput_field = \"q\"\n[task]\n{kind}\n[teacher]\nmodel = \"m\"\n[student]\nmodel = \"m\"\n"
        ))
        .unwrap();
        cfg.curate.near_dup_threshold = 0.8;
        cfg.curate.min_agreement = 0.5;
        cfg.curate.part_rows = 97;
        tweak(&mut cfg);
        let eval = [
            teacher_rows[20].input.as_str(),
            teacher_rows[400].input.as_str(),
        ];
        let contamination = Contamination::new(eval.into_iter(), 13);
        let task = Task::from_config(&cfg.task);

        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let (counts, written, kept) = curate_in_parts(
            &cfg,
            std::slice::from_ref(&file),
            Some(&contamination),
            &dir.path().join("work"),
            &out,
        )
        .unwrap();
        let reference =
            rules::apply(frame, &task, &cfg.curate, cfg.seed, Some(&contamination)).unwrap();
        assert_eq!(counts, reference.counts);
        assert_eq!(kept.rows(), reference.kept.height());
        let mut no_rationale = 0;
        for w in written {
            let expected = reference
                .kept
                .clone()
                .lazy()
                .filter(col("split").eq(lit(w.split)))
                .select(CURATED_COLUMNS.iter().map(|c| col(*c)).collect::<Vec<_>>())
                .collect()
                .unwrap();
            let got = crate::io::parquet::read_frame(&w.path).unwrap();
            assert!(
                got.equals_missing(&expected),
                "{}: part by part\n{got}\nall at once\n{expected}",
                w.split
            );
            let rationales = got.column("rationale").unwrap().str().unwrap().clone();
            assert_eq!(rationales.null_count(), 0, "{}", w.split);
            no_rationale += rationales.iter().filter(|r| r == &Some("")).count();
        }
        // The rows answered without a rationale come out with an empty one.
        assert_eq!(
            no_rationale > 0,
            labels,
            "{no_rationale} rows without a rationale"
        );
        counts.funnel.into_iter().collect()
    }

    #[test]
    fn part_by_part_equals_all_rows_in_memory_on_a_numeric_task() {
        let removed = parts_equal_memory(false, |_| {});
        for rule in [
            "parse_failure",
            "disagrees_with_gold",
            "wrong_arithmetic",
            "duplicate_input",
            "near_duplicate_input",
            "contaminated",
        ] {
            assert!(removed[rule] > 0, "{rule} had nothing to do: {removed:?}");
        }
    }

    #[test]
    fn the_spread_appends_every_flush_to_one_file_a_part() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("teacher-00000-of-00001.parquet");
        let mut frame = TeacherRow::to_frame(&rows(false)).unwrap();
        crate::io::parquet::write_frame(&file, &mut frame).unwrap();
        let work = dir.path().join("work");
        // 7 rows a part: a flush every 7 rows read, so each part gets many flushes.
        let partition = parts::partition(std::slice::from_ref(&file), &work, 7).unwrap();
        let files = std::fs::read_dir(&work).unwrap().count();
        assert_eq!(
            files,
            partition.parts.len(),
            "one file a part, not one a flush"
        );
        let mut segments = 0;
        let mut taken = vec![];
        for part in partition.parts {
            let parts::Part::Spilled(spilled) = &part else {
                panic!("more than one part, so each is a file");
            };
            segments += spilled.segments();
            let rows = part.take().unwrap();
            let order: Vec<u32> = rows
                .column(splits::ROW)
                .unwrap()
                .cast(&DataType::UInt32)
                .unwrap()
                .u32()
                .unwrap()
                .into_no_null_iter()
                .collect();
            assert!(order.is_sorted(), "a part's rows are in row order");
            taken.push(rows);
        }
        assert!(segments > files, "{segments} segments in {files} files");
        assert_eq!(
            std::fs::read_dir(&work).unwrap().count(),
            0,
            "taken parts leave no file"
        );
        let all = spill::stack(&taken)
            .unwrap()
            .sort([splits::ROW], Default::default())
            .unwrap();
        let expected = parts::rule_scan(std::slice::from_ref(&file))
            .unwrap()
            .collect()
            .unwrap();
        assert!(
            all.equals_missing(&expected),
            "every row once:\n{all}\n{expected}"
        );
    }

    #[test]
    fn part_by_part_equals_all_rows_in_memory_with_more_parts_than_inputs() {
        // 320 parts for 240 inputs: many parts get no input at all.
        let removed = parts_equal_memory(false, |cfg| cfg.curate.part_rows = 3);
        assert!(removed["near_duplicate_input"] > 0, "{removed:?}");
    }

    #[test]
    fn part_by_part_equals_all_rows_in_memory_with_gold_flagged_and_one_rationale() {
        let removed = parts_equal_memory(false, |cfg| {
            cfg.curate.gold = crate::config::GoldRule::Flag;
            cfg.curate.keep_rationales = crate::config::KeepRationales::One;
        });
        assert!(removed["extra_rationale"] > 0, "{removed:?}");
    }

    #[test]
    fn part_by_part_equals_all_rows_in_memory_with_a_label_cap_and_without_dedup() {
        let removed = parts_equal_memory(true, |cfg| {
            cfg.curate.max_per_label = Some(60);
            cfg.curate.min_confidence = 0.3;
            cfg.curate.dedup_inputs = false;
            // Labels answered without a rationale are kept.
            cfg.curate.min_rationale_chars = 0;
        });
        for rule in [
            "minority_answer",
            "low_confidence",
            "near_duplicate_input",
            "label_cap",
        ] {
            assert!(removed[rule] > 0, "{rule} had nothing to do: {removed:?}");
        }
    }
}
