//! Bad input gets a clear error and exit code 2, naming the file, line or field and what
//! to do, and leaves no output that looks complete.

mod common;
use common::*;
use std::path::Path;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn config(teacher: &str, input: &str, extra: &str) -> String {
    format!(
        r#"name = "t"
runs_dir = "runs"
[data]
inputs = ["{input}"]
id_field = "id"
input_field = "q"
gold_field = "a"
[task]
kind = "numeric"
prompt = "{prompts}/numeric.md"
[teacher]
model = "{teacher}"
[student]
model = "s.gguf"
{extra}
"#,
        prompts = root().join("prompts").display()
    )
}

#[test]
fn missing_model_file_names_the_path_and_the_fetch_script() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "in.jsonl",
        "{\"id\": \"1\", \"q\": \"1+1?\", \"a\": 2}\n",
    );
    write(
        dir.path(),
        "c.toml",
        &config("models/nope.gguf", "in.jsonl", ""),
    );
    let out = kdpipe(&["generate", "--config", "c.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("models/nope.gguf") && err.contains("scripts/fetch-models.sh"),
        "{err}"
    );
    assert!(!dir.path().join("runs/t/generate/manifest.json").exists());
}

#[test]
fn malformed_input_line_is_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "in.jsonl",
        "{\"id\": \"1\", \"q\": \"1+1?\", \"a\": 2}\n{\"id\": \"2\", \"q\": oops}\n",
    );
    write(
        dir.path(),
        "c.toml",
        &config("models/nope.gguf", "in.jsonl", ""),
    );
    let out = kdpipe(&["generate", "--config", "c.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("in.jsonl:2") && err.contains("malformed JSON"),
        "{err}"
    );
}

#[test]
fn missing_mapped_field_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "in.jsonl",
        "{\"id\": \"1\", \"question\": \"1+1?\", \"a\": 2}\n",
    );
    write(
        dir.path(),
        "c.toml",
        &config("models/nope.gguf", "in.jsonl", ""),
    );
    let out = kdpipe(&["generate", "--config", "c.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("in.jsonl:1")
            && err.contains("missing field \"q\"")
            && err.contains("input_field"),
        "{err}"
    );
}

#[test]
fn unknown_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "c.toml",
        &config("m.gguf", "in.jsonl", "[finetune]\nlearning_rat = 0.1\n"),
    );
    let out = kdpipe(&["finetune", "--config", "c.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("learning_rat") && err.contains("c.toml"),
        "{err}"
    );
}

#[test]
fn curate_without_generate_says_which_stage_to_run() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "c.toml", &config("m.gguf", "in.jsonl", ""));
    let out = kdpipe(&["curate", "--config", "c.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("generate") && err.contains("hint:"), "{err}");
    assert!(!dir.path().join("runs/t/curate").exists());
}

#[test]
fn print_config_shows_defaults() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "c.toml", &config("m.gguf", "in.jsonl", ""));
    let out = kdpipe(&["run", "--config", "c.toml", "--print-config"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("alpha = 0.5") && text.contains("learning_rate"),
        "{text}"
    );
}
