//! A teacher ensemble: two different local teachers (SmolLM2 and Qwen2.5 GGUFs) answer the
//! same label-task rows. Every row says which teacher wrote it; curate votes across them
//! with their weights, averages their label-set soft labels, and reports each teacher's
//! agreement with the vote and with gold.

mod common;
use common::*;
use kdpipe::records::{CuratedRow, TeacherRow};

#[test]
fn two_local_teachers_vote_and_average_their_soft_labels() {
    let dir = tempfile::tempdir().unwrap();
    let (smol, qwen) = (smollm2(), qwen());
    let text = format!(
        r#"name = "ens"
[data]
inputs = ["{data}"]
id_field = "id"
input_field = "text"
gold_field = "label"
limit = 4
[task]
kind = "labels"
labels = ["anger", "joy", "optimism", "sadness"]
description = "What emotion does the post express?"
prompt = "{prompts}/labels.md"
[teacher]
model = "{qwen}"
max_tokens = 40
weight = 2.0
[[ensemble]]
model = "{smol}"
max_tokens = 40
weight = 1.0
[curate]
split = [1.0, 0.0, 0.0]
[student]
model = "unused.gguf"
"#,
        data = root().join("datasets/feelings.jsonl").display(),
        prompts = root().join("prompts").display(),
        qwen = qwen.display(),
        smol = smol.display(),
    );
    std::fs::write(dir.path().join("c.toml"), text).unwrap();
    let out = kdpipe(&["generate", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));

    let path = dir
        .path()
        .join("runs/ens/generate/teacher-00000-of-00001.parquet");
    let rows =
        TeacherRow::from_frame(&kdpipe::io::parquet::read_frame(&path).unwrap(), &path).unwrap();
    assert_eq!(rows.len(), 8, "4 inputs × 2 teachers");
    for r in &rows {
        // Teacher i writes sample i (one sample each).
        let want = if r.sample == 0 { &qwen } else { &smol };
        assert_eq!(
            r.teacher,
            want.display().to_string(),
            "row {} {}",
            r.id,
            r.sample
        );
        assert_eq!(r.backend, "local");
    }
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("runs/ens/generate/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["summary"]["teachers"].as_array().unwrap().len(), 2);

    let out = kdpipe(&["curate", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("runs/ens/curate/report.json")).unwrap(),
    )
    .unwrap();
    let teachers = report["teachers"].as_array().unwrap();
    assert_eq!(teachers.len(), 2, "{report}");
    for t in teachers {
        assert_eq!(t["rows"], 4);
        assert!(t.get("agrees_with_vote").is_some() && t.get("agrees_with_gold").is_some());
    }
    let md = std::fs::read_to_string(dir.path().join("runs/ens/curate/report.md")).unwrap();
    assert!(md.contains("## Teachers"), "{md}");

    // Inputs both teachers scored carry the weighted mean of their label scores:
    // (2·p_qwen + 1·p_smol) / 3.
    let train = dir.path().join("runs/ens/curate/train.parquet");
    let kept =
        CuratedRow::from_frame(&kdpipe::io::parquet::read_frame(&train).unwrap(), &train).unwrap();
    let mut checked = 0;
    for k in kept
        .iter()
        .filter(|k| k.soft_kind == "ensemble_label_scores")
    {
        let of = |sample: u32| {
            rows.iter()
                .find(|r| r.id == k.id && r.sample == sample)
                .unwrap()
                .soft_probs
                .clone()
        };
        let (q, s) = (of(0), of(1));
        for (j, p) in k.soft_probs.iter().enumerate() {
            assert!(
                (p - (2.0 * q[j] + s[j]) / 3.0).abs() < 1e-9,
                "{p} vs {q:?} {s:?}"
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 1,
        "no input was scored by both teachers: {kept:?}"
    );
    record_suite(
        "ensemble",
        &format!("ensemble of 2 local teachers: 8 rows, {checked} inputs with averaged label scores, per-teacher agreement {}", report["teachers"]),
    );
}
