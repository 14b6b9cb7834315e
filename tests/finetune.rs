//! finetune on the real SmolLM2 student: a run killed with SIGKILL after a checkpoint
//! resumes and gives the same loss curve as an uninterrupted run; the KD term over the
//! label set trains alongside the CE terms; bf16 mixed precision trains.

mod common;
use common::training::{assert_same_curve, config, curated, kill_after_checkpoint, losses};
use common::*;
use std::path::Path;
use std::time::Duration;

/// The val loss before and after training, from the finetune manifest's summary.
fn val_loss_before_after(dir: &Path) -> (f64, f64) {
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("runs/t/finetune/manifest.json")).unwrap(),
    )
    .unwrap();
    let summary = &m["summary"];
    (
        summary["val_loss_before"].as_f64().unwrap(),
        summary["val_loss_after"].as_f64().unwrap(),
    )
}

#[test]
fn killed_training_resumes_with_the_same_loss_curve() {
    let clean = tempfile::tempdir().unwrap();
    curated(clean.path(), 10);
    config(clean.path(), "");
    let out = kdpipe(&["finetune", "--config", "c.toml"], clean.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let want = losses(clean.path());
    assert_eq!(want.len(), 6);

    let dir = tempfile::tempdir().unwrap();
    curated(dir.path(), 10);
    config(dir.path(), "");
    kill_after_checkpoint(dir.path(), 2, Duration::from_secs(300)); // somewhere after step 2
    assert!(!dir.path().join("runs/t/finetune/manifest.json").exists());

    let out = kdpipe(&["finetune", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resuming from"), "{}", stderr(&out));
    assert_same_curve(&losses(dir.path()), &want);
    // The exported weights agree too, tensor by tensor.
    let w = |d: &Path| {
        candle_core::safetensors::load(
            d.join("runs/t/student/model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (w(dir.path()), w(clean.path()));
    let mut names: Vec<&String> = a.keys().collect();
    names.sort();
    assert_eq!(names, {
        let mut n: Vec<&String> = b.keys().collect();
        n.sort();
        n
    });
    for name in names {
        let diff = max_diff(&a[name], &b[name]);
        assert!(
            diff <= RESUMED_WEIGHT_TOLERANCE,
            "{name}: max difference {diff}"
        );
    }
}

/// How far a resumed run's exported weights may be from an uninterrupted run's: none, as
/// every reduction in training sums in a fixed order (measured: bit-identical).
const RESUMED_WEIGHT_TOLERANCE: f32 = 0.0;

#[test]
fn kd_term_over_the_label_set_trains_with_the_ce_terms() {
    let dir = tempfile::tempdir().unwrap();
    curated(dir.path(), 6);
    config(
        dir.path(),
        "kd_weight = 0.5\nkd_temperature = 2.0\ngrad_accum = 2",
    );
    let out = kdpipe(
        &["finetune", "--config", "c.toml", "--max-steps", "3"],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.path().join("runs/t/finetune/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let kd: Vec<f64> = lines
        .iter()
        .map(|l| l["kd_loss"].as_f64().expect("a kd_loss every step"))
        .collect();
    assert!(kd.iter().all(|k| k.is_finite() && *k >= 0.0), "{kd:?}");
    assert!(lines.iter().all(|l| l["grad_norm"].as_f64().unwrap() > 0.0));
    // Three steps of two micro-batches each went through.
    assert_eq!(lines.len(), 3);
    let (before, after) = val_loss_before_after(dir.path());
    assert!(
        after < before,
        "the val loss (CE + λ·KD) fell: {before} → {after}"
    );
}

#[test]
fn bf16_mixed_precision_trains_where_the_cpu_has_avx512_bf16() {
    if !skip::can_run(
        "finetune::bf16_mixed_precision_trains_where_the_cpu_has_avx512_bf16",
        "avx512-bf16",
        kdpipe::kernels::bf16_gemm::available(),
        "this CPU lacks AVX512-BF16 (Intel Cooper Lake or later, AMD Zen 4 or later)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    curated(dir.path(), 6);
    config(dir.path(), "precision = \"bf16\"");
    let out = kdpipe(
        &["finetune", "--config", "c.toml", "--max-steps", "3"],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("bf16 mixed precision"),
        "{}",
        stderr(&out)
    );
    assert_eq!(losses(dir.path()).len(), 3);
    let (before, after) = val_loss_before_after(dir.path());
    assert!(after < before, "the val loss fell: {before} → {after}");
    // The exported student is f32 safetensors like any other.
    assert!(dir.path().join("runs/t/student/model.safetensors").exists());
}

#[test]
fn the_best_evaluated_weights_are_exported_and_patience_stops_training() {
    // A learning rate far too high makes the val loss climb above the untrained student's:
    // with patience 1 training stops at the first evaluation after the start, and the
    // weights exported are the best evaluated ones (here the starting weights, step 0).
    let dir = tempfile::tempdir().unwrap();
    curated(dir.path(), 6);
    config(
        dir.path(),
        "eval_every = 2\nearly_stopping_patience = 1\ncheckpoint_every = 0",
    );
    let text = std::fs::read_to_string(dir.path().join("c.toml"))
        .unwrap()
        .replace("learning_rate = 1e-4", "learning_rate = 3e-2")
        .replace("checkpoint_every = 2\n", "");
    std::fs::write(dir.path().join("c.toml"), text).unwrap();
    let out = kdpipe(&["finetune", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("runs/t/finetune/manifest.json")).unwrap(),
    )
    .unwrap();
    let s = &m["summary"];
    let evals: Vec<(usize, f64)> = serde_json::from_value(s["evals"].clone()).unwrap();
    eprintln!("{}", stderr(&out));
    assert!(!evals.is_empty());
    let best = evals
        .iter()
        .cloned()
        .fold((0, f64::INFINITY), |a, e| if e.1 < a.1 { e } else { a });
    let after = s["val_loss_after"].as_f64().unwrap();
    assert!(
        after <= best.1 + 1e-9,
        "exported val loss {after} is worse than the best evaluation {best:?}"
    );
    assert_eq!(evals[0], (0, s["val_loss_before"].as_f64().unwrap()));
    assert_eq!(
        s["steps"].as_u64().unwrap(),
        2,
        "patience 1 stops the diverging run: {s}"
    );
    assert_eq!(s["exported_step"].as_u64().unwrap() as usize, best.0);
}

#[test]
fn sequences_longer_than_the_context_are_cut_with_a_warning_and_a_count() {
    let dir = tempfile::tempdir().unwrap();
    curated(dir.path(), 4);
    config(dir.path(), "");
    let text = std::fs::read_to_string(dir.path().join("c.toml"))
        .unwrap()
        .replace("max_steps = 6", "max_steps = 1")
        .replace("max_seq_len = 96", "max_seq_len = 24");
    std::fs::write(dir.path().join("c.toml"), text).unwrap();
    let out = kdpipe(&["finetune", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("longer than max_seq_len = 24 and were cut"),
        "{err}"
    );
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("runs/t/finetune/manifest.json")).unwrap(),
    )
    .unwrap();
    // 4 train and 2 val rows, a label and a rationale view each (step_by_step); every
    // prompt alone is longer than 24 tokens.
    assert_eq!(m["summary"]["truncated_examples"], 12, "{}", m["summary"]);
}
