//! A finished curate folder of the feelings task and a small finetune config on the real
//! SmolLM2 student, shared by the finetune and crash suites.

use super::{root, smollm2};
use polars::prelude::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const LABELS: [&str; 4] = ["anger", "joy", "optimism", "sadness"];

/// A finished curate folder with `n` train rows and 2 val rows of the feelings task, each
/// with a label-set soft label.
pub fn curated(dir: &Path, n: usize) {
    let text = std::fs::read_to_string(root().join("datasets/feelings.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .take(n + 2)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let cur = dir.join("runs/t/curate");
    std::fs::create_dir_all(&cur).unwrap();
    let mut m = kdpipe::io::manifest::Manifest::new(kdpipe::config::Stage::Curate, "x".into(), 0);
    for (split, part) in [("train", &rows[..n]), ("val", &rows[n..])] {
        let s = |k: &str| {
            part.iter()
                .map(|r| r[k].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        let labels: Vec<Series> = part
            .iter()
            .map(|_| Series::new("".into(), LABELS))
            .collect();
        let probs: Vec<Series> = part
            .iter()
            .map(|r| {
                let gold = r["label"].as_str().unwrap();
                let p: Vec<f64> = LABELS
                    .iter()
                    .map(|l| if *l == gold { 0.7 } else { 0.1 })
                    .collect();
                Series::new("".into(), p)
            })
            .collect();
        let k = part.len();
        let mut df = DataFrame::new_infer_height(vec![
            Column::new("id".into(), s("id")),
            Column::new("sample".into(), vec![0u32; k]),
            Column::new("input".into(), s("text")),
            Column::new("gold".into(), s("label")),
            Column::new("rationale".into(), vec!["The words show the feeling."; k]),
            Column::new("answer".into(), s("label")),
            Column::new("soft_kind".into(), vec!["label_scores"; k]),
            Column::new("soft_labels".into(), labels),
            Column::new("soft_probs".into(), probs),
            Column::new("agreement".into(), vec![None::<f64>; k]),
            Column::new("agrees_with_gold".into(), vec![Some(true); k]),
        ])
        .unwrap();
        let path = cur.join(format!("{split}.parquet"));
        kdpipe::io::parquet::write_frame(&path, &mut df).unwrap();
        m.outputs
            .push(kdpipe::io::manifest::entry(&path, Some(k)).unwrap());
    }
    m.write(&cur).unwrap();
}

pub fn config(dir: &Path, extra: &str) {
    let text = format!(
        r#"name = "t"
seed = 4
[data]
inputs = ["unused.jsonl"]
input_field = "text"
[task]
kind = "labels"
labels = ["anger", "joy", "optimism", "sadness"]
description = "What emotion does the post express?"
prompt = "{prompts}/labels.md"
[teacher]
model = "unused.gguf"
[student]
model = "{model}"
[finetune]
max_steps = 6
batch_size = 2
max_seq_len = 96
learning_rate = 1e-4
checkpoint_every = 2
{extra}
"#,
        prompts = root().join("prompts").display(),
        model = smollm2().display()
    );
    std::fs::write(dir.join("c.toml"), text).unwrap();
}

/// The shared config with `extra` appended and each `(from, to)` of `replace` applied to
/// its text: a key it sets (`max_steps = 6`) set otherwise, or removed with `""`.
pub fn config_replacing(dir: &Path, extra: &str, replace: &[(&str, &str)]) {
    config(dir, extra);
    let path = dir.join("c.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    for (from, to) in replace {
        assert!(text.contains(from), "the shared config has no {from:?}");
        text = text.replace(from, to);
    }
    std::fs::write(path, text).unwrap();
}

/// Every step's line of the finetune run's metrics.jsonl in `dir`.
pub fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("runs/t/finetune/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every step's loss of the finetune run in `dir`.
pub fn losses(dir: &Path) -> Vec<f64> {
    metrics(dir)
        .iter()
        .map(|m| m["loss"].as_f64().unwrap())
        .collect()
}

/// Start `kdpipe finetune` in `dir` and SIGKILL it once its checkpoint of `step` is on
/// disk (it must not finish first), within `timeout`.
pub fn kill_after_checkpoint(dir: &Path, step: usize, timeout: Duration) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kdpipe"))
        .args(["finetune", "--config", "c.toml"])
        .current_dir(dir)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ckpt = dir.join(format!("runs/t/finetune/checkpoint-{step:06}/state.json"));
    let deadline = Instant::now() + timeout;
    while !ckpt.exists() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A resumed run's losses equal the uninterrupted run's, step by step (within 1e-4).
pub fn assert_same_curve(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
            "step {}: {a} vs {b}",
            i + 1
        );
    }
}
