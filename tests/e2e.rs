//! `kdpipe run` end to end on a few rows with the real SmolLM2 GGUF as teacher and
//! student: every stage's files and manifest, the table on stdout, and a second run that
//! skips every stage.

mod common;
use common::*;

#[test]
fn run_chains_all_stages_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let root = root();
    let model = smollm2();
    let cfg = format!(
        r#"name = "e2e"
seed = 3
[data]
inputs = ["{data}"]
id_field = "id"
input_field = "text"
gold_field = "label"
limit = 14
[task]
kind = "labels"
labels = ["anger", "joy", "optimism", "sadness"]
description = "What emotion does the post express?"
prompt = "{prompts}/labels.md"
[teacher]
model = "{model}"
max_tokens = 40
[curate]
split = [0.5, 0.2, 0.3]
[student]
model = "{model}"
[finetune]
max_steps = 3
batch_size = 2
max_seq_len = 128
[eval]
max_new_tokens = 6
"#,
        data = root.join("datasets/feelings.jsonl").display(),
        prompts = root.join("prompts").display(),
        model = model.display()
    );
    std::fs::write(dir.path().join("c.toml"), cfg).unwrap();

    let out = kdpipe(&["run", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "run failed: {}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for line in ["teacher", "student before", "student after"] {
        assert!(table.contains(line), "table lacks {line:?}: {table}");
    }

    let run = dir.path().join("runs/e2e");
    for f in [
        "generate/teacher-00000-of-00001.parquet",
        "curate/train.parquet",
        "curate/val.parquet",
        "curate/test.parquet",
        "curate/report.json",
        "finetune/metrics.jsonl",
        "finetune/loss.svg",
        "student/config.json",
        "student/model.safetensors",
        "student/tokenizer.json",
        "eval/predictions.parquet",
        "eval/report.json",
        "eval/report.md",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    for stage in ["generate", "curate", "finetune", "eval"] {
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join(stage).join("manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(m["kind"], stage);
        assert_eq!(m["schema_version"], kdpipe::io::manifest::SCHEMA_VERSION);
        assert!(!m["outputs"].as_array().unwrap().is_empty());
        for o in m["outputs"].as_array().unwrap() {
            let path = std::path::Path::new(o["path"].as_str().unwrap());
            let path = if path.is_absolute() {
                path.to_path_buf()
            } else {
                dir.path().join(path)
            };
            assert_eq!(
                kdpipe::io::atomic::file_sha256(&path).unwrap(),
                o["sha256"].as_str().unwrap()
            );
        }
    }

    // Teacher rows: one per input; label-set soft labels are the teacher's probabilities
    // (sum ≤ 1), their sum recorded as the coverage; provenance filled in.
    let teacher_file = run.join("generate/teacher-00000-of-00001.parquet");
    let df = kdpipe::io::parquet::read_frame(&teacher_file).unwrap();
    let rows = kdpipe::records::TeacherRow::from_frame(&df, &teacher_file).unwrap();
    assert_eq!(rows.len(), 14);
    for r in rows.iter().filter(|r| r.soft_kind == "label_scores") {
        let sum: f64 = r.soft_probs.iter().sum();
        assert!(sum > 0.0 && sum <= 1.0 + 1e-6, "soft label sums to {sum}");
        assert!((r.soft_coverage.unwrap() - sum).abs() < 1e-9);
        assert_eq!(r.soft_labels.len(), 4);
    }
    assert!(rows.iter().any(|r| r.soft_kind == "label_scores"));
    for r in &rows {
        assert_eq!(r.backend, "local");
        assert_eq!(r.prompt_name, "labels");
        assert!(!r.finish_reason.is_empty() && r.created_unix_ms > 0);
    }
    // The parts folder of the finished shard is gone; its rows are in the teacher file.
    assert!(!run.join("generate/parts-00000-of-00001").exists());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("curate/report.json")).unwrap())
            .unwrap();
    assert_eq!(report["rows_in"], 14);
    assert!(
        report["removed"]["parse_failure"].is_number()
            && report["removed"]["duplicate_input"].is_number()
    );
    let metrics = std::fs::read_to_string(run.join("finetune/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);

    // No temp file anywhere.
    for f in all_files(&run) {
        assert!(
            !f.to_string_lossy().contains(".tmp-"),
            "temp file left: {}",
            f.display()
        );
    }

    // The exported student loads in the teacher engine (mistralrs, safetensors folder).
    let served =
        kdpipe::teacher::local::LocalTeacher::open(run.join("student").to_str().unwrap(), false)
            .unwrap();
    let reply = served
        .generate(
            &[kdpipe::teacher::ChatMessage::new("user", "Say hi.")],
            4,
            0.0,
        )
        .unwrap();
    assert!(reply.completion_tokens > 0);

    // A second run finds every stage current and redoes nothing.
    let again = kdpipe(&["run", "--config", "c.toml"], dir.path());
    assert!(again.status.success(), "{}", stderr(&again));
    let err = stderr(&again);
    for stage in ["generate", "curate", "finetune", "eval"] {
        assert!(
            err.contains(&format!("{stage}: up to date, skipped")),
            "{stage} not skipped: {err}"
        );
    }
}
