//! Self-distillation as a plain config: teacher and student are the same SmolLM2 GGUF;
//! generate keeps every token's top-5 by id, curate carries them into the splits, and
//! finetune trains with token-level KD on the shared tokenizer. A student with another
//! tokenizer (Qwen2.5) is refused with a clear error instead of being silently aligned.

mod common;
use common::*;
use std::path::Path;

fn config(dir: &Path, student: &Path) {
    let text = format!(
        r#"name = "self"
seed = 2
[data]
inputs = ["{data}"]
id_field = "id"
input_field = "question"
gold_field = "answer"
limit = 12
[task]
kind = "numeric"
description = "Solve the arithmetic word problem."
prompt = "{prompts}/numeric.md"
[teacher]
model = "{teacher}"
max_tokens = 40
[generate]
token_topk = 5
[curate]
split = [0.75, 0.25, 0.0]
# The 135M teacher rarely reaches gold; this test is about the token-KD plumbing.
gold = "flag"
check_arithmetic = false
require_answer_in_rationale = false
[student]
model = "{student}"
[finetune]
objective = "step_by_step"
kd_token_weight = 1.0
max_steps = 4
batch_size = 2
max_seq_len = 192
checkpoint_every = 0
"#,
        data = root().join("datasets/arith.jsonl").display(),
        prompts = root().join("prompts").display(),
        teacher = smollm2().display(),
        student = student.display()
    );
    std::fs::write(dir.join("c.toml"), text).unwrap();
}

#[test]
fn self_distillation_trains_with_token_level_kd_and_other_vocabularies_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), &smollm2());
    run_stages(dir.path(), &["generate", "curate", "finetune"]);
    for r in &curated_rows(&dir.path().join("runs/self/curate/train.parquet")) {
        assert!(!r.tokens.ids.is_empty(), "row {} lost its tokens", r.id);
        assert_eq!(r.tokens.top_ids.len(), r.tokens.ids.len());
        assert!(r.tokens.top_ids.iter().all(|k| k.len() == 5));
    }
    // What the compact top-k store costs is on the record, in both stages: for k = 5,
    // 5 ids (4 bytes) and 5 codes (2 bytes) a token before compression, less after.
    let json = |p: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(p)).unwrap()).unwrap()
    };
    let generated = json("runs/self/generate/manifest.json")["summary"].clone();
    let curated = json("runs/self/curate/report.json");
    for summary in [&generated, &curated] {
        let bytes = summary["topk_bytes_per_token"].as_f64().unwrap();
        assert!(bytes > 0.0 && bytes < 30.0, "{summary}");
        assert!(summary["topk_tokens"].as_u64().unwrap() > 0);
    }
    let md = std::fs::read_to_string(dir.path().join("runs/self/curate/report.md")).unwrap();
    assert!(md.contains("bytes a token on disk"), "{md}");
    let kd = logged(
        &dir.path().join("runs/self/finetune/metrics.jsonl"),
        "kd_token_loss",
    );
    assert!(!kd.is_empty(), "no step logged a token KD term");
    assert!(kd.iter().all(|v| v.is_finite() && *v >= 0.0), "{kd:?}");

    // Another tokenizer: a clear error naming a row, nothing trained.
    config(dir.path(), &qwen());
    let text = std::fs::read_to_string(dir.path().join("c.toml"))
        .unwrap()
        .replace("name = \"self\"", "name = \"other\"");
    std::fs::write(dir.path().join("c.toml"), text).unwrap();
    std::fs::create_dir_all(dir.path().join("runs/other")).unwrap();
    copy_dir(
        &dir.path().join("runs/self/curate"),
        &dir.path().join("runs/other/curate"),
    );
    let out = kdpipe(&["finetune", "--config", "c.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("ids index another vocabulary") && err.contains("hint:"),
        "{err}"
    );
    assert!(!dir
        .path()
        .join("runs/other/finetune/manifest.json")
        .exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
