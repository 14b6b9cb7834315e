//! Crash suite: generate, curate and finetune are killed with SIGKILL at seeded random
//! moments, then rerun with the same command. Every final output must equal an
//! uninterrupted run's (rows by key, model weights to float tolerance), nothing may be
//! doubled, and at every kill the folder must hold no file a reader would accept that is
//! not complete: a manifest only when its outputs match their recorded digests, and every
//! Parquet file in place readable.

mod common;
use common::training;
use common::*;
use kdpipe::io::manifest::Manifest;
use kdpipe::records::TeacherRow;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Kill points per stage: 8 × 3 = 24.
const KILLS: usize = 8;

/// When `kill_when` kills a run.
#[derive(Clone, Copy)]
enum KillAt {
    /// This long after it started.
    After(Duration),
    /// Once generate has flushed at least this many rows to its parts folder.
    Flushed(usize),
}

/// Run `args` in `dir` and SIGKILL it at `at`. None when it was killed; the time it took
/// when it finished first.
fn kill_when(args: &[&str], dir: &Path, at: KillAt) -> Option<Duration> {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kdpipe"))
        .args(args)
        .current_dir(dir)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            return Some(started.elapsed());
        }
        let due = match at {
            KillAt::After(delay) => started.elapsed() >= delay,
            KillAt::Flushed(rows) => flushed_rows(dir) >= rows,
        };
        if due {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    None
}

/// Run `args` in `dir` and SIGKILL it after `delay` (`kill_when`).
fn kill_after(args: &[&str], dir: &Path, delay: Duration) -> Option<Duration> {
    kill_when(args, dir, KillAt::After(delay))
}

/// Kill a run at seeded moments over `span` (an uninterrupted run's length) until `KILLS`
/// runs were killed mid-run. `attempt(point, delay)` prepares, runs with `kill_after`,
/// reruns and checks; a run that finished before its moment shortens the span (the
/// machine got faster) and draws again.
fn kill_points(
    seed: u64,
    mut span: Duration,
    mut attempt: impl FnMut(usize, Duration) -> Option<Duration>,
) -> usize {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut killed, mut tries) = (0, 0);
    while killed < KILLS && tries < 4 * KILLS {
        let delay = span.mul_f64(rng.random_range(0.05..0.85));
        match attempt(killed, delay) {
            None => killed += 1,
            Some(took) => span = span.min(took),
        }
        tries += 1;
    }
    assert_eq!(
        killed, KILLS,
        "only {killed} runs of {tries} were killed mid-run"
    );
    tries
}

fn timed(args: &[&str], dir: &Path) -> Duration {
    let t = Instant::now();
    let out = kdpipe(args, dir);
    assert!(out.status.success(), "{}", stderr(&out));
    t.elapsed()
}

/// What a reader may see after a kill: a manifest only over complete outputs, and only
/// readable Parquet files under their final names (temp files are `.tmp-*`).
/// Manifest paths are relative to the folder the command ran in, `cwd`.
fn assert_no_half_written_file(cwd: &Path, stage: &str, point: usize) {
    let stage_dir = cwd.join("runs/t").join(stage);
    if !stage_dir.exists() {
        return;
    }
    for f in all_files(&stage_dir) {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".parquet") && !name.contains(".tmp-") {
            assert!(
                kdpipe::io::parquet::read_frame(&f).is_ok(),
                "kill {point}: {} is half-written",
                f.display()
            );
        }
        if name == "manifest.json" {
            let m: Manifest = serde_json::from_str(&std::fs::read_to_string(&f).unwrap())
                .unwrap_or_else(|e| panic!("kill {point}: {} unreadable: {e}", f.display()));
            for o in &m.outputs {
                let now = kdpipe::io::manifest::entry(&cwd.join(&o.path), None)
                    .unwrap_or_else(|_| panic!("kill {point}: {} listed, missing", o.path));
                assert_eq!(now.sha256, o.sha256, "kill {point}: {} changed", o.path);
            }
        }
    }
}

/// Rows a killed generate left flushed in its parts folder.
fn flushed_rows(dir: &Path) -> usize {
    let generate = dir.join("runs/t/generate");
    if !generate.exists() {
        return 0;
    }
    all_files(&generate)
        .iter()
        .filter(|f| {
            let name = f.file_name().unwrap().to_string_lossy();
            let in_parts = f.parent().unwrap().to_string_lossy().contains("parts-");
            in_parts && name.starts_with("part-") && name.ends_with(".parquet")
        })
        .map(|f| kdpipe::io::parquet::read_frame(f).unwrap().height())
        .sum()
}

fn teacher_rows(dir: &Path) -> Vec<TeacherRow> {
    let p = dir.join("runs/t/generate/teacher-00000-of-00001.parquet");
    TeacherRow::from_frame(&kdpipe::io::parquet::read_frame(&p).unwrap(), &p).unwrap()
}

#[test]
fn generate_killed_anywhere_resumes_to_the_same_rows() {
    let config = format!(
        r#"name = "t"
[data]
inputs = ["{data}"]
id_field = "id"
input_field = "question"
gold_field = "answer"
limit = 6
[task]
kind = "numeric"
prompt = "{prompts}/numeric.md"
[teacher]
model = "{model}"
max_tokens = 20
# One sequence at a time: rows arrive (and are flushed) one after another, so kills land
# between flushes, not only before the first or after the last.
batch = 1
[student]
model = "unused.gguf"
[generate]
flush_rows = 1
"#,
        data = root().join("datasets/arith.jsonl").display(),
        prompts = root().join("prompts").display(),
        model = smollm2().display()
    );
    let clean = tempfile::tempdir().unwrap();
    std::fs::write(clean.path().join("c.toml"), &config).unwrap();
    let args = ["generate", "--config", "c.toml"];
    let span = timed(&args, clean.path());
    let want = teacher_rows(clean.path());

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.toml"), &config).unwrap();
    // Each kill interrupts a fresh attempt at the same job, resumed from what the earlier
    // attempts left; the rerun must give the uninterrupted rows. Returns the rows the
    // killed run had flushed, and whether it finished before the kill.
    let attempt = |i: usize, at: KillAt| -> (usize, Option<Duration>) {
        let _ = std::fs::remove_file(dir.path().join("runs/t/generate/manifest.json"));
        let _ = std::fs::remove_file(
            dir.path()
                .join("runs/t/generate/teacher-00000-of-00001.parquet"),
        );
        let finished = kill_when(&args, dir.path(), at);
        assert_no_half_written_file(dir.path(), "generate", i);
        let flushed = flushed_rows(dir.path());
        let complete = dir.path().join("runs/t/generate/manifest.json").exists();
        let out = kdpipe(&args, dir.path());
        assert!(out.status.success(), "kill {i}: {}", stderr(&out));
        // Unless the killed run had finished, the rerun reused exactly the rows it flushed.
        assert!(
            complete || stderr(&out).contains(&format!("{flushed} already written")),
            "kill {i}: {flushed} rows were flushed: {}",
            stderr(&out)
        );
        let got = teacher_rows(dir.path());
        assert_eq!(got.len(), want.len(), "kill {i}: rows doubled or lost");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((&g.id, g.sample), (&w.id, w.sample), "kill {i}: row order");
            assert_eq!(g.raw, w.raw, "kill {i}: row {} differs", g.id);
            assert_eq!(g.answer, w.answer, "kill {i}");
        }
        (flushed, finished)
    };
    let mid_run = |(flushed, finished): (usize, Option<Duration>)| {
        finished.is_none() && (1..want.len()).contains(&flushed)
    };
    // Kills at random moments land anywhere, mostly while the model loads on a fast
    // machine; kills once 1 and then 3 of the 6 rows are flushed make sure resuming from
    // flushed parts is exercised every run.
    let mut after_a_flush = 0;
    let tries = kill_points(11, span, |i, delay| {
        let result = attempt(i, KillAt::After(delay));
        after_a_flush += usize::from(mid_run(result));
        result.1
    });
    for (i, rows) in [(KILLS, 1), (KILLS + 1, 3)] {
        let result = attempt(i, KillAt::Flushed(rows));
        assert!(
            mid_run(result),
            "kill {i}, once {rows} rows were flushed: the run had flushed {} of {} and {}",
            result.0,
            want.len(),
            if result.1.is_some() {
                "finished"
            } else {
                "was killed"
            }
        );
    }
    record_suite(
        "crash-generate",
        &format!("crash suite, generate: {KILLS} runs killed at random moments ({tries} tries; {after_a_flush} after some rows were flushed and before the last) and 2 once 1 and 3 rows were flushed, each resumed to the uninterrupted rows"),
    );
}

#[test]
fn curate_killed_anywhere_leaves_no_false_output_and_reruns_identically() {
    let config = r#"name = "t"
[data]
inputs = ["unused.jsonl"]
input_field = "q"
[task]
kind = "numeric"
[teacher]
model = "t.gguf"
[student]
model = "s.gguf"
"#;
    let make = |dir: &Path| {
        std::fs::write(dir.join("c.toml"), config).unwrap();
        let gen = dir.join("runs/t/generate");
        std::fs::create_dir_all(&gen).unwrap();
        // Distinct inputs, so every rule (MinHash near-duplicates included) has work to do
        // and the run lasts long enough to be killed while it writes.
        let rows: Vec<TeacherRow> = (0..100_000)
            .map(|i| {
                let (a, b) = (i % 97, i % 13);
                ok_teacher_row(
                    &format!("r{i}"),
                    &format!("Tom has {a} apples in box {i} and buys {b} more."),
                    &format!("{a} + {b} = {}", a + b),
                    &format!("{}", a + b),
                )
            })
            .collect();
        let mut df = TeacherRow::to_frame(&rows).unwrap();
        kdpipe::io::parquet::write_frame(&gen.join("teacher-00000-of-00001.parquet"), &mut df)
            .unwrap();
        Manifest::new(kdpipe::config::Stage::Generate, "x".into(), 0)
            .write(&gen)
            .unwrap();
    };
    let splits = |dir: &Path| -> Vec<polars::prelude::DataFrame> {
        ["train", "val", "test"]
            .iter()
            .map(|s| {
                kdpipe::io::parquet::read_frame(&dir.join(format!("runs/t/curate/{s}.parquet")))
                    .unwrap()
            })
            .collect()
    };
    let clean = tempfile::tempdir().unwrap();
    make(clean.path());
    let args = ["curate", "--config", "c.toml"];
    let span = timed(&args, clean.path());
    eprintln!("curate of 100,000 rows: {span:?}");
    let want = splits(clean.path());

    let dir = tempfile::tempdir().unwrap();
    make(dir.path());
    let tries = kill_points(12, span, |i, delay| {
        let _ = std::fs::remove_dir_all(dir.path().join("runs/t/curate"));
        let finished = kill_after(&args, dir.path(), delay);
        assert_no_half_written_file(dir.path(), "curate", i);
        let out = kdpipe(&args, dir.path());
        assert!(out.status.success(), "kill {i}: {}", stderr(&out));
        for (g, w) in splits(dir.path()).iter().zip(&want) {
            assert!(g.equals_missing(w), "kill {i}: a split differs");
        }
        finished
    });
    record_suite(
        "crash-curate",
        &format!("crash suite, curate: {KILLS} runs killed mid-run ({tries} tries), each rerun gave the uninterrupted splits"),
    );
}

fn weights(dir: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(
        dir.join("runs/t/student/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

#[test]
fn finetune_killed_anywhere_resumes_to_the_same_weights() {
    let clean = tempfile::tempdir().unwrap();
    training::curated(clean.path(), 8);
    training::config(clean.path(), "");
    let args = ["finetune", "--config", "c.toml"];
    let span = timed(&args, clean.path());
    let want = weights(clean.path());

    let tries = kill_points(13, span, |i, delay| {
        // A fresh folder per kill: each resume starts from whatever checkpoint that one
        // kill left (none, or any step).
        let dir = tempfile::tempdir().unwrap();
        training::curated(dir.path(), 8);
        training::config(dir.path(), "");
        let finished = kill_after(&args, dir.path(), delay);
        assert_no_half_written_file(dir.path(), "finetune", i);
        assert_no_half_written_file(dir.path(), "student", i);
        let out = kdpipe(&args, dir.path());
        assert!(out.status.success(), "kill {i}: {}", stderr(&out));
        let got = weights(dir.path());
        assert_eq!(got.len(), want.len());
        for (name, w) in &want {
            let diff = max_diff(&got[name], w);
            assert!(diff < 1e-4, "kill {i}: {name} differs by {diff}");
        }
        finished
    });
    record_suite(
        "crash-finetune",
        &format!("crash suite, finetune: {KILLS} runs killed mid-run ({tries} tries), each resumed to the uninterrupted weights"),
    );
}
