//! `kdpipe run` end to end on a few rows with the real SmolLM2 GGUF as teacher and
//! student: every stage's files and manifest, the exported GGUF scored beside the
//! student, the model card naming every input's digest, the table on stdout, and a second
//! run that skips every stage.

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
[export]
gguf = ["q8_0"]
[eval]
max_new_tokens = 6
models = ["teacher", "base", "student", "exported"]
"#,
        data = root.join("datasets/feelings.jsonl").display(),
        prompts = root.join("prompts").display(),
        model = model.display()
    );
    std::fs::write(dir.path().join("c.toml"), cfg).unwrap();

    let out = kdpipe(&["run", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "run failed: {}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for line in [
        "teacher",
        "student before",
        "student after",
        "student q8_0 GGUF",
    ] {
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
        "export/e2e-q8_0.gguf",
        "export/README.md",
        "export/loss.svg",
        "export/funnel.svg",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    // The model card: every input's digest, the eval table with intervals, the pictures.
    let card = std::fs::read_to_string(run.join("export/README.md")).unwrap();
    let generated: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("generate/manifest.json")).unwrap())
            .unwrap();
    let inputs = generated["inputs"].as_array().unwrap();
    assert!(!inputs.is_empty());
    for input in inputs {
        let digest = input["sha256"].as_str().unwrap();
        assert!(card.contains(digest), "the card lacks {digest}:\n{card}");
    }
    for text in [
        "base_model: SmolLM2-135M-Instruct.Q4_1.gguf",
        "| student q8_0 GGUF |",
        "95 % interval",
        "![curation funnel](funnel.svg)",
        "](loss.svg)",
        "e2e-q8_0.gguf",
    ] {
        assert!(card.contains(text), "the card lacks {text:?}:\n{card}");
    }
    // Each model that loads weights was scored in a process of its own, so its peak RSS
    // is its own: the Q8_0 file's is below the f32 student's (in one process it would
    // carry the student's freed pages). The teacher's stored answers load no weights and
    // have none.
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval/report.json")).unwrap())
            .unwrap();
    let model = |key: &str| {
        eval["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["key"] == key)
            .unwrap_or_else(|| panic!("no {key} in {eval}"))
            .clone()
    };
    assert!(model("teacher")["peak_rss_bytes"].is_null());
    for key in ["base", "student", "student_q8_0"] {
        let m = model(key);
        let (rss, size) = (
            m["peak_rss_bytes"].as_u64().unwrap(),
            m["size_bytes"].as_u64().unwrap(),
        );
        assert!(
            rss > size / 2,
            "{key}: peak RSS {rss} for {size} bytes of weights"
        );
    }
    let rss = |key: &str| model(key)["peak_rss_bytes"].as_u64().unwrap();
    assert!(rss("student_q8_0") < rss("student"));
    assert!(card.contains("| peak RSS |"), "{card}");
    assert!(!run.read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".eval-worker")));
    for stage in ["generate", "curate", "finetune", "eval", "export"] {
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

    // The exported student (a safetensors folder) loads in kdpipe's engine, and in
    // mistralrs where the build has it.
    let student = run.join("student");
    let greedy = kdpipe::llama::load(student.to_str().unwrap(), &candle_core::Device::Cpu)
        .unwrap()
        .decoder(&candle_core::Device::Cpu, |_| false)
        .unwrap()
        .greedy(&[1, 2, 3], 4, &[])
        .unwrap();
    assert_eq!(greedy.len(), 4);
    #[cfg(feature = "mistralrs")]
    {
        let served =
            kdpipe::teacher::mistralrs::MistralrsTeacher::open(student.to_str().unwrap(), false)
                .unwrap();
        let reply = served
            .generate(&[kdpipe::chat::ChatMessage::new("user", "Say hi.")], 4, 0.0)
            .unwrap();
        assert!(reply.completion_tokens > 0);
    }

    // A second run finds every stage current and redoes nothing.
    let again = kdpipe(&["run", "--config", "c.toml"], dir.path());
    assert!(again.status.success(), "{}", stderr(&again));
    let err = stderr(&again);
    for stage in ["generate", "curate", "finetune", "export", "eval"] {
        assert!(
            err.contains(&format!("{stage}: up to date, skipped")),
            "{stage} not skipped: {err}"
        );
    }
}

/// `kdpipe generate` with k sampled rationales per input through the local batched engine:
/// rows keyed (id, sample) with their seeds, the same text in a second run, other samples
/// with another run seed; the mistralrs engine's rows claim no seed (it takes none).
#[test]
fn local_sampled_rows_are_seeded_and_reproducible() {
    let root = root();
    let config = |seed: u64, engine: &str| {
        format!(
            r#"name = "s"
seed = {seed}
[data]
inputs = ["{data}"]
id_field = "id"
input_field = "question"
gold_field = "answer"
limit = 3
[task]
kind = "numeric"
prompt = "{prompts}/numeric.md"
[teacher]
model = "{model}"
engine = "{engine}"
max_tokens = 24
temperature = 0.9
[student]
model = "unused.gguf"
[generate]
samples = 3
"#,
            data = root.join("datasets/arith.jsonl").display(),
            prompts = root.join("prompts").display(),
            model = smollm2().display()
        )
    };
    let rows = |seed: u64, engine: &str| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.toml"), config(seed, engine)).unwrap();
        let out = kdpipe(&["generate", "--config", "c.toml"], dir.path());
        assert!(out.status.success(), "{}", stderr(&out));
        let p = dir
            .path()
            .join("runs/s/generate/teacher-00000-of-00001.parquet");
        let mut rows = kdpipe::records::TeacherRow::from_frame(
            &kdpipe::io::parquet::read_frame(&p).unwrap(),
            &p,
        )
        .unwrap();
        rows.sort_by(|a, b| (&a.id, a.sample).cmp(&(&b.id, b.sample)));
        rows
    };
    let first = rows(1, "kdpipe");
    assert_eq!(first.len(), 9, "3 inputs × 3 samples");
    assert!(
        first.iter().all(|r| r.seed.is_some()),
        "every sampled row has its seed"
    );
    let again = rows(1, "kdpipe");
    let text = |rs: &[kdpipe::records::TeacherRow]| -> Vec<String> {
        rs.iter().map(|r| r.raw.clone()).collect()
    };
    assert_eq!(text(&first), text(&again), "same seed, same samples");
    let distinct: std::collections::BTreeSet<&String> = first.iter().map(|r| &r.raw).collect();
    assert!(
        distinct.len() > 3,
        "samples of one input differ: {distinct:?}"
    );
    let other = rows(2, "kdpipe");
    assert_ne!(
        text(&first),
        text(&other),
        "another run seed draws other samples"
    );
    #[cfg(feature = "mistralrs")]
    {
        let mistralrs = rows(1, "mistralrs");
        assert!(
            mistralrs.iter().all(|r| r.seed.is_none()),
            "mistralrs takes no seed"
        );
    }
}
