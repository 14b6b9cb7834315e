//! `kdpipe generate` through the OpenAI-compatible API against a real server
//! (llama-cpp-python serving SmolLM2 on 127.0.0.1), with a fault-injecting proxy in front
//! of it where failures are needed. The tests take turns: they share one server, and the
//! fault test's timeouts must not depend on another test's load.

mod common;
use common::fault_proxy::{FaultProxy, KINDS};
use common::server::{self, Server, MODEL_NAME};
use common::*;
use kdpipe::records::TeacherRow;
use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

fn shared_server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| server::start(None))
}

/// A config for the API teacher; `task` is "labels" (feelings) or "numeric" (arith).
fn config(base_url: &str, task: &str, limit: usize, extra_teacher: &str, generate: &str) -> String {
    let root = root();
    let (data, input, task_section) = match task {
        "labels" => (
            "feelings.jsonl",
            "text",
            r#"kind = "labels"
labels = ["anger", "joy", "optimism", "sadness"]
description = "What emotion does the post express?""#,
        ),
        _ => (
            "arith.jsonl",
            "question",
            r#"kind = "numeric"
description = "Solve the arithmetic word problem.""#,
        ),
    };
    let gold = if task == "labels" { "label" } else { "answer" };
    format!(
        r#"name = "t"
seed = 1
[data]
inputs = ["{data}"]
id_field = "id"
input_field = "{input}"
gold_field = "{gold}"
limit = {limit}
[task]
{task_section}
prompt = "{prompts}/{kind}.md"
[teacher]
kind = "openai"
base_url = "{base_url}"
model = "{MODEL_NAME}"
max_tokens = 48
{extra_teacher}
[generate]
{generate}
[student]
model = "unused.gguf"
"#,
        data = root.join("datasets").join(data).display(),
        prompts = root.join("prompts").display(),
        kind = if task == "labels" {
            "labels"
        } else {
            "numeric"
        },
    )
}

fn write_config(dir: &Path, text: &str) {
    std::fs::write(dir.join("c.toml"), text).unwrap();
}

fn teacher_rows(dir: &Path, file: &str) -> Vec<TeacherRow> {
    let path = dir.join("runs/t/generate").join(file);
    let df = kdpipe::io::parquet::read_frame(&path).unwrap();
    TeacherRow::from_frame(&df, &path).unwrap()
}

fn keys(rows: &[TeacherRow]) -> Vec<(String, u32)> {
    rows.iter().map(|r| (r.id.clone(), r.sample)).collect()
}

fn assert_unique(rows: &[TeacherRow]) {
    let set: HashSet<_> = keys(rows).into_iter().collect();
    assert_eq!(set.len(), rows.len(), "duplicate (id, sample) keys");
}

fn manifest(dir: &Path, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("runs/t/generate").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

const TEACHER_FILE: &str = "teacher-00000-of-00001.parquet";

#[test]
fn labels_with_logprobs_and_samples_from_a_real_server() {
    let _turn = turn();
    let server = shared_server();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &config(
            &server.base_url(),
            "labels",
            3,
            "temperature = 0.8\nmax_in_flight = 2",
            "samples = 2\ntoken_topk = 3",
        ),
    );
    let out = kdpipe(&["generate", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = teacher_rows(dir.path(), TEACHER_FILE);
    assert_eq!(rows.len(), 6, "3 inputs × 2 samples");
    assert_unique(&rows);
    let seeds: HashSet<_> = rows
        .iter()
        .map(|r| r.seed.expect("API rows carry a seed"))
        .collect();
    assert_eq!(seeds.len(), 6, "every sample its own seed");
    for r in &rows {
        assert_eq!(
            (r.backend.as_str(), r.teacher.as_str()),
            ("openai", MODEL_NAME)
        );
        assert!(r.completion_tokens > 0 && r.prompt_tokens > 0 && r.latency_ms > 0.0);
        assert!(!r.tokens.texts.is_empty(), "token logprobs parsed");
        assert_eq!(r.tokens.texts.len(), r.tokens.top_texts.len());
        assert!(r
            .tokens
            .top_texts
            .iter()
            .all(|t| !t.is_empty() && t.len() <= 3));
        assert!(r.tokens.logprobs.iter().all(|l| *l <= 0.0));
        if r.soft_kind == "label_scores" {
            let sum: f64 = r.soft_probs.iter().sum();
            assert!(sum <= 1.0 + 1e-6, "label probabilities sum to {sum}");
            assert!((r.soft_coverage.unwrap() - sum).abs() < 1e-9);
            assert_eq!(r.soft_labels.len(), 4);
        }
    }
    assert!(
        rows.iter().any(|r| r.soft_kind == "label_scores"),
        "some answer position was found: {:?}",
        rows.iter().map(|r| &r.raw).collect::<Vec<_>>()
    );
    let m = manifest(dir.path(), "manifest.json");
    assert_eq!(m["summary"]["rows"], 6);
    assert_eq!(m["summary"]["config"]["generate"]["samples"], 2);
    // pandas reads the label names, tokens and top-k texts as kdpipe does.
    let texts = assert_pandas_reads(
        &[dir.path().join("runs/t/generate").join(TEACHER_FILE)],
        &["soft_labels", "token_texts", "topk_texts"],
    );
    assert!(texts > 0);
}

#[test]
fn every_row_completes_exactly_once_through_faults() {
    let _turn = turn();
    let server = shared_server();
    // A slow reply outlasts the client's 20 s timeout; a real reply on a loaded 2-core
    // machine must not (an 8 s timeout once turned 18 real replies into timeouts).
    let proxy = FaultProxy::start(server.port, 0.35, 7, Duration::from_secs(24));
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &config(
            &proxy.base_url(),
            "numeric",
            8,
            "temperature = 0.7\nmax_in_flight = 2\ntimeout_s = 20\nretry_base_s = 0.1\nmax_retries = 12",
            "samples = 2",
        ),
    );
    let out = kdpipe(&["generate", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = teacher_rows(dir.path(), TEACHER_FILE);
    assert_eq!(rows.len(), 16);
    assert_unique(&rows);
    assert!(rows.iter().all(|r| r.status != "request_failed"));

    let counts = proxy.counts.lock().unwrap();
    let faults: usize = counts.faults.values().sum();
    record_suite(
        "faults",
        &format!(
            "fault suite: {} chat requests, {faults} faults injected ({:.0} %) {:?}, {} rows each written once",
            counts.chat_requests,
            100.0 * faults as f64 / counts.chat_requests.max(1) as f64,
            counts.faults,
            rows.len()
        ),
    );
    assert!(
        faults as f64 >= 0.3 * counts.chat_requests as f64,
        "{faults} faults in {} requests",
        counts.chat_requests
    );
    for k in KINDS {
        assert!(
            counts.faults.get(k).copied().unwrap_or(0) >= 1,
            "no {k} fault"
        );
    }
    // Each fault cost exactly one retry, counted by cause in the manifest.
    let m = manifest(dir.path(), "manifest.json");
    let retries = m["summary"]["retries"].as_object().unwrap().clone();
    let total: u64 = retries.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total as usize, faults, "retries {retries:?}");
    let get = |k: &str| retries.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    assert_eq!(get("rate_limited"), counts.faults["rate_limited"]);
    assert_eq!(get("server_error"), counts.faults["server_error"]);
    assert_eq!(get("timeout"), counts.faults["slow"]);
    assert_eq!(get("empty_choices"), counts.faults["empty_choices"]);
    assert_eq!(get("invalid_body"), counts.faults["invalid_json"]);
    // With 2 samples an input, numeric rows get the vote share as their soft label.
    assert!(rows.iter().any(|r| r.soft_kind == "vote_share"));
}

#[test]
fn killed_run_resumes_without_redoing_or_losing_rows() {
    let _turn = turn();
    let server = shared_server();
    let cfg = config(
        &server.base_url(),
        "numeric",
        10,
        "max_in_flight = 1",
        "flush_rows = 2",
    );

    // The run that is killed.
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &cfg);
    let mut child = Command::new(env!("CARGO_BIN_EXE_kdpipe"))
        .args(["generate", "--config", "c.toml"])
        .current_dir(dir.path())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let parts = dir.path().join("runs/t/generate/parts-00000-of-00001");
    let deadline = Instant::now() + Duration::from_secs(120);
    while part_files(&parts) < 2 {
        assert!(Instant::now() < deadline, "no part files appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut before: Vec<TeacherRow> = vec![];
    for e in std::fs::read_dir(&parts).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "parquet") {
            let df = kdpipe::io::parquet::read_frame(&p).unwrap();
            before.extend(TeacherRow::from_frame(&df, &p).unwrap());
        }
    }
    assert!(
        before.len() >= 4 && before.len() < 10,
        "{} rows before the kill",
        before.len()
    );

    let out = kdpipe(&["generate", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("{} already written", before.len())),
        "{}",
        stderr(&out)
    );
    let resumed = teacher_rows(dir.path(), TEACHER_FILE);
    assert_eq!(resumed.len(), 10);
    assert_unique(&resumed);
    for b in &before {
        let r = resumed.iter().find(|r| r.id == b.id).unwrap();
        assert_eq!(r, b, "a row written before the kill was redone or changed");
    }

    // The same config, uninterrupted: the same keys in the same order.
    let clean = tempfile::tempdir().unwrap();
    write_config(clean.path(), &cfg);
    let out = kdpipe(&["generate", "--config", "c.toml"], clean.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let uninterrupted = teacher_rows(clean.path(), TEACHER_FILE);
    assert_eq!(keys(&resumed), keys(&uninterrupted));
}

#[test]
fn shards_split_the_inputs_and_curate_reads_them_all() {
    let _turn = turn();
    let server = shared_server();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &config(&server.base_url(), "numeric", 6, "", ""),
    );
    for shard in ["0/2", "1/2"] {
        let out = kdpipe(
            &["generate", "--config", "c.toml", "--shard", shard],
            dir.path(),
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let a = teacher_rows(dir.path(), "teacher-00000-of-00002.parquet");
    let b = teacher_rows(dir.path(), "teacher-00001-of-00002.parquet");
    let ids: HashSet<String> = a.iter().chain(&b).map(|r| r.id.clone()).collect();
    assert_eq!(a.len() + b.len(), 6);
    assert_eq!(ids.len(), 6, "shards overlap");
    assert!(!a.is_empty() && !b.is_empty());
    let m = manifest(dir.path(), "manifest-00001-of-00002.json");
    assert_eq!(m["summary"]["shard"], "1/2");

    let out = kdpipe(&["curate", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("runs/t/curate/report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["rows_in"], 6);
}

/// The parquet part files a generate run's shard has flushed so far.
fn part_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_job_array_of_shards_at_once_equals_one_run_with_a_killed_shard_resumed() {
    let _turn = turn();
    let server = shared_server();
    let cfg = config(
        &server.base_url(),
        "numeric",
        12,
        "max_in_flight = 1",
        "flush_rows = 1",
    );
    let whole = tempfile::tempdir().unwrap();
    write_config(whole.path(), &cfg);
    let out = kdpipe(&["generate", "--config", "c.toml"], whole.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let unsharded = teacher_rows(whole.path(), TEACHER_FILE);
    assert_eq!(unsharded.len(), 12);

    // The array, as `sbatch --array=0-2` or an Indexed Job starts it: three shard
    // processes at once against the one server. Shard 1 is killed once it has flushed a
    // row, then started again.
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &cfg);
    let start = |shard: &str| {
        Command::new(env!("CARGO_BIN_EXE_kdpipe"))
            .args(["generate", "--config", "c.toml", "--shard", shard])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut shards: Vec<_> = ["0/3", "1/3", "2/3"].iter().map(|s| start(s)).collect();
    let parts = dir.path().join("runs/t/generate/parts-00001-of-00003");
    let deadline = Instant::now() + Duration::from_secs(300);
    while part_files(&parts) < 1 {
        assert!(Instant::now() < deadline, "shard 1 flushed no rows");
        assert!(
            shards[1].try_wait().unwrap().is_none(),
            "shard 1 finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    shards[1].kill().unwrap(); // SIGKILL, as a preempted job
    shards[1].wait().unwrap();
    for (i, child) in shards.into_iter().enumerate().filter(|(i, _)| *i != 1) {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "shard {i}: {}", stderr(&out));
    }
    let again = kdpipe(
        &["generate", "--config", "c.toml", "--shard", "1/3"],
        dir.path(),
    );
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("already written"),
        "{}",
        stderr(&again)
    );

    let mut union = Vec::new();
    for i in 0..3 {
        let shard = teacher_rows(dir.path(), &format!("teacher-0000{i}-of-00003.parquet"));
        assert!(!shard.is_empty(), "shard {i} is empty");
        union.extend(shard);
    }
    assert_unique(&union);
    let mut got: Vec<(String, u32, String)> = union
        .iter()
        .map(|r| (r.id.clone(), r.sample, r.raw.clone()))
        .collect();
    let mut want: Vec<(String, u32, String)> = unsharded
        .iter()
        .map(|r| (r.id.clone(), r.sample, r.raw.clone()))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "the shards' union differs from the unsharded run"
    );

    let out = kdpipe(&["curate", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("runs/t/curate/report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["rows_in"], 12);
}

#[test]
fn batch_files_round_trip_through_the_real_server() {
    let _turn = turn();
    let server = shared_server();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &config(&server.base_url(), "numeric", 5, "", ""),
    );
    let out = kdpipe(
        &["generate", "--config", "c.toml", "--batch-write", "batch"],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let requests = dir.path().join("batch/requests-00000.jsonl");
    assert_eq!(
        std::fs::read_to_string(&requests).unwrap().lines().count(),
        5
    );

    let replay = |files: &[&Path], output: &Path, errors: &Path| {
        let mut cmd = Command::new("python3");
        cmd.arg(root().join("scripts/batch-replay.py"))
            .args(["--base-url", &server.base_url()])
            .arg("--output")
            .arg(output)
            .arg("--errors")
            .arg(errors)
            .args(files);
        assert!(cmd.status().unwrap().success());
    };
    let (output, errors) = (dir.path().join("out.jsonl"), dir.path().join("err.jsonl"));
    replay(&[&requests], &output, &errors);
    // Lose one result, and turn another into a server error, as a real batch may.
    let text = std::fs::read_to_string(&output).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5);
    let mut failed: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    failed["response"]["status_code"] = 500.into();
    std::fs::write(
        &output,
        format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3]),
    )
    .unwrap();
    std::fs::write(&errors, format!("{failed}\n")).unwrap();

    let ingest = |files: &[&str]| {
        let mut args = vec!["generate", "--config", "c.toml", "--batch-ingest"];
        args.extend_from_slice(files);
        kdpipe(&args, dir.path())
    };
    let out = ingest(&["out.jsonl", "err.jsonl"]);
    assert_eq!(out.status.code(), Some(2), "two rows are still missing");
    assert!(
        stderr(&out).contains("2 rows have no answer"),
        "{}",
        stderr(&out)
    );
    let retry = dir
        .path()
        .join("runs/t/generate/batch-retry/requests-00000.jsonl");
    assert_eq!(std::fs::read_to_string(&retry).unwrap().lines().count(), 2);

    let (output2, errors2) = (dir.path().join("out2.jsonl"), dir.path().join("err2.jsonl"));
    replay(&[&retry], &output2, &errors2);
    let out = ingest(&["out2.jsonl"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = teacher_rows(dir.path(), TEACHER_FILE);
    assert_eq!(rows.len(), 5);
    assert_unique(&rows);
    assert!(rows
        .iter()
        .all(|r| r.backend == "batch" && r.completion_tokens > 0));
}

#[test]
fn api_failures_give_clear_errors_or_failed_rows() {
    let _turn = turn();
    let server = shared_server();

    // Nothing listens on the port.
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!("http://127.0.0.1:{}/v1", server::free_port());
    write_config(dir.path(), &config(&nowhere, "numeric", 2, "", ""));
    let out = kdpipe(&["generate", "--config", "c.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot reach the teacher API"),
        "{}",
        stderr(&out)
    );

    // A model the server does not serve.
    let text = config(&server.base_url(), "numeric", 2, "", "")
        .replace(&format!("model = \"{MODEL_NAME}\""), "model = \"gpt-9\"");
    write_config(dir.path(), &text);
    let out = kdpipe(&["generate", "--config", "c.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("does not serve model \"gpt-9\"")
            && stderr(&out).contains(MODEL_NAME),
        "{}",
        stderr(&out)
    );

    // A prompt longer than the server's context fails its row only.
    let data = dir.path().join("long.jsonl");
    let long = "seven ".repeat(2500);
    std::fs::write(
        &data,
        format!(
            "{{\"id\": \"long\", \"question\": \"{long}\", \"answer\": 1}}\n{{\"id\": \"short\", \"question\": \"What is 2 plus 3?\", \"answer\": 5}}\n"
        ),
    )
    .unwrap();
    let text = config(&server.base_url(), "numeric", 2, "", "").replace(
        &root().join("datasets/arith.jsonl").display().to_string(),
        &data.display().to_string(),
    );
    write_config(dir.path(), &text);
    let out = kdpipe(&["generate", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = teacher_rows(dir.path(), TEACHER_FILE);
    let long_row = rows.iter().find(|r| r.id == "long").unwrap();
    assert_eq!(long_row.status, "request_failed");
    assert!(long_row.raw.contains("context"), "{}", long_row.raw);
    assert_ne!(
        rows.iter().find(|r| r.id == "short").unwrap().status,
        "request_failed"
    );
}

#[test]
fn the_api_key_never_reaches_logs_errors_or_files() {
    let _turn = turn();
    let key = "sk-kdpipe-test-4242-secret";
    let keyed = server::start(Some(key));
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        &keyed.base_url(),
        "labels",
        2,
        "api_key_env = \"KDPIPE_TEST_KEY\"",
        "",
    );
    write_config(dir.path(), &text);
    let run = |key_value: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kdpipe"));
        cmd.args(["-vv", "generate", "--config", "c.toml"])
            .current_dir(dir.path());
        match key_value {
            Some(k) => cmd.env("KDPIPE_TEST_KEY", k),
            None => cmd.env_remove("KDPIPE_TEST_KEY"),
        };
        cmd.output().unwrap()
    };

    let out = run(None);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("KDPIPE_TEST_KEY"), "{}", stderr(&out));

    let wrong = "sk-wrong-key-0000";
    let out = run(Some(wrong));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("refused the API key"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(wrong));

    // Every stage that touches the teacher or its rows, at debug log level: generate,
    // curate (reports) and eval with the teacher asked again (predictions, reports).
    let mut seen = String::new();
    let feelings = root().join("datasets/feelings.jsonl");
    let stages: [&[&str]; 3] = [
        &["generate"],
        &["curate"],
        &[
            "eval",
            "--models",
            "teacher",
            "--teacher",
            "run",
            "--file",
            feelings.to_str().unwrap(),
        ],
    ];
    let mut commands = 0;
    for args in stages {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kdpipe"));
        cmd.arg("-vv")
            .arg(args[0])
            .args(["--config", "c.toml"])
            .args(&args[1..]);
        let out = cmd
            .current_dir(dir.path())
            .env("KDPIPE_TEST_KEY", key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        seen.push_str(&String::from_utf8_lossy(&out.stdout));
        seen.push_str(&stderr(&out));
        commands += 1;
    }
    let mut files = 0;
    for f in all_files(dir.path()) {
        seen.push_str(&String::from_utf8_lossy(&std::fs::read(&f).unwrap()));
        // Parquet is compressed: read its values, not its bytes.
        if f.extension().is_some_and(|e| e == "parquet") {
            let df = kdpipe::io::parquet::read_frame(&f).unwrap();
            for row in kdpipe::io::parquet::rows_as_json(&df, usize::MAX).unwrap() {
                seen.push_str(&row.to_string());
            }
        }
        files += 1;
    }
    assert!(!seen.contains(key), "the key was written somewhere");
    assert_eq!(teacher_rows(dir.path(), TEACHER_FILE).len(), 2);
    record_suite(
        "secrets",
        &format!("secrets: {commands} commands at debug log level and {files} files they wrote (Parquet values decoded) hold no trace of the key"),
    );
}

#[test]
fn dry_run_counts_requests_tokens_and_cost_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!("http://127.0.0.1:{}/v1", server::free_port());
    write_config(
        dir.path(),
        &config(
            &nowhere,
            "numeric",
            10,
            "temperature = 0.7\nprice_per_mtok = { input = 0.5, output = 1.5 }",
            "samples = 3",
        ),
    );
    let out = kdpipe(&["generate", "--config", "c.toml", "--dry-run"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("requests: 30 (10 inputs × 3 samples × 1 teacher(s))"),
        "{stdout}"
    );
    assert!(stdout.contains("prompt tokens: ≈ "), "{stdout}");
    assert!(
        stdout.contains("completion tokens: at most 1440"),
        "{stdout}"
    );
    assert!(stdout.contains("cost: at most "), "{stdout}");
    assert!(
        stdout.contains("--- user"),
        "the first prompt is shown: {stdout}"
    );
    assert!(
        !dir.path().join("runs/t/generate").exists(),
        "a dry run writes nothing"
    );
}
