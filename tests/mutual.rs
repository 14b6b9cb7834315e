//! Deep mutual learning ([finetune.mutual]) on the real SmolLM2: a peer (another LoRA copy
//! of the student) trains beside it; each learns from the other; the peer's state is in
//! the checkpoints, so a killed run resumes to the same curve; with weight 0 the student
//! trains exactly as alone; a peer that could only ever equal the student is refused.

mod common;
use common::training::{
    assert_same_curve, config_replacing, curated, kill_after_checkpoint, losses, metrics,
};
use common::*;
use std::path::Path;
use std::time::Duration;

/// LoRA on the shared small config, `steps` steps, a learning rate that moves LoRA's B
/// off zero in one step, and `section` after it.
fn lora_config(dir: &Path, steps: usize, section: &str) {
    let extra = format!("lora = {{ rank = 4, alpha = 8 }}\n{section}");
    let steps = format!("max_steps = {steps}\n");
    config_replacing(
        dir,
        &extra,
        &[
            ("learning_rate = 1e-4\n", "learning_rate = 1e-3\n"),
            ("max_steps = 6\n", &steps),
        ],
    );
}

const MUTUAL: &str = "[finetune.mutual]\nweight = 1.0\ntop_k = 8\n";

#[test]
fn two_students_learn_from_each_other_and_resume_exactly() {
    let alone = tempfile::tempdir().unwrap();
    curated(alone.path(), 10);
    lora_config(alone.path(), 6, "");
    let out = kdpipe(&["finetune", "--config", "c.toml"], alone.path());
    assert!(out.status.success(), "{}", stderr(&out));

    let clean = tempfile::tempdir().unwrap();
    curated(clean.path(), 10);
    lora_config(clean.path(), 6, MUTUAL);
    let out = kdpipe(&["finetune", "--config", "c.toml"], clean.path());
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("mutual learning with the peer"), "{err}");
    let m = metrics(clean.path());
    assert_eq!(m.len(), 6);
    let series = |key: &str| -> Vec<f64> { m.iter().map(|s| s[key].as_f64().unwrap()).collect() };
    let (mine, theirs) = (series("mutual_loss"), series("peer_mutual_loss"));
    // Step 1: LoRA's B starts at zero, so both give the base model's distribution.
    assert!(
        mine[0].abs() < 1e-6 && theirs[0].abs() < 1e-6,
        "{mine:?} {theirs:?}"
    );
    // Their adapters started apart (own seeds): after an update the two differ.
    assert!(
        mine[1..]
            .iter()
            .chain(&theirs[1..])
            .all(|v| *v > 0.0 && v.is_finite()),
        "{mine:?} {theirs:?}"
    );
    assert!(series("peer_loss").iter().all(|v| v.is_finite()));
    // The peer pulls the student off the path it takes alone (step 1 is the same: the
    // mimicry term and its gradient are zero there).
    let (solo, with_peer) = (losses(alone.path()), losses(clean.path()));
    assert!((solo[0] - with_peer[0]).abs() <= 1e-5 * solo[0].abs());
    assert_ne!(solo, with_peer);

    // Killed after its step-2 checkpoint, the run resumes (peer included) to the same curve.
    let dir = tempfile::tempdir().unwrap();
    curated(dir.path(), 10);
    lora_config(dir.path(), 6, MUTUAL);
    kill_after_checkpoint(dir.path(), 2, Duration::from_secs(600));
    assert!(dir
        .path()
        .join("runs/t/finetune/checkpoint-000002/peer.safetensors")
        .is_file());
    let out = kdpipe(&["finetune", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resuming from"), "{}", stderr(&out));
    assert_same_curve(&losses(dir.path()), &with_peer);
}

#[test]
fn weight_zero_trains_the_student_as_alone_and_a_copy_peer_is_refused() {
    let alone = tempfile::tempdir().unwrap();
    curated(alone.path(), 6);
    lora_config(alone.path(), 3, "");
    let out = kdpipe(&["finetune", "--config", "c.toml"], alone.path());
    assert!(out.status.success(), "{}", stderr(&out));

    let idle = tempfile::tempdir().unwrap();
    curated(idle.path(), 6);
    lora_config(idle.path(), 3, "[finetune.mutual]\nweight = 0.0\n");
    let out = kdpipe(&["finetune", "--config", "c.toml"], idle.path());
    assert!(out.status.success(), "{}", stderr(&out));
    // No gradient crosses between the two: the student's curve is its curve alone.
    assert_eq!(losses(alone.path()), losses(idle.path()));
    assert!(metrics(idle.path())[0]["peer_loss"].as_f64().is_some());

    // Full fine-tuning of a peer that is the student's own model: refused before training.
    let copy = tempfile::tempdir().unwrap();
    curated(copy.path(), 6);
    config_replacing(copy.path(), MUTUAL, &[]);
    let out = kdpipe(&["finetune", "--config", "c.toml"], copy.path());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("they would start equal"),
        "{}",
        stderr(&out)
    );
}
