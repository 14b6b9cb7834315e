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
    // Optional sections left out show their knobs, commented, so the output still parses
    // as the config it was.
    assert!(
        text.contains("# [finetune.live_teacher]\n")
            && text.contains("# on_policy = 0.0")
            && text.contains("# [finetune.mutual]\n")
            && text.contains("# divergence = \"forward_kl\""),
        "{text}"
    );
    let parsed: toml::Value = toml::from_str(&text).unwrap();
    assert!(parsed["finetune"].get("mutual").is_none());
}

/// A finished generate folder holding `df` (a manifest of this schema version, or `schema`).
fn generate_folder(dir: &Path, df: &mut polars::prelude::DataFrame, schema: Option<u32>) {
    let gen = dir.join("runs/t/generate");
    std::fs::create_dir_all(&gen).unwrap();
    let path = gen.join("teacher-00000-of-00001.parquet");
    kdpipe::io::parquet::write_frame(&path, df).unwrap();
    let mut m = kdpipe::io::manifest::Manifest::new(kdpipe::config::Stage::Generate, "x".into(), 0);
    if let Some(v) = schema {
        m.schema_version = v;
    }
    m.write(&gen).unwrap();
}

fn teacher_frame(n: usize) -> polars::prelude::DataFrame {
    let rows: Vec<kdpipe::records::TeacherRow> = (0..n)
        .map(|i| {
            let mut r = ok_teacher_row(&format!("r{i}"), &format!("question {i}"), "x = 1", "1");
            r.gold = None;
            r
        })
        .collect();
    kdpipe::records::TeacherRow::to_frame(&rows).unwrap()
}

#[test]
fn curate_names_the_file_and_column_of_bad_teacher_rows() {
    use polars::prelude::*;
    type Case = (
        &'static str,
        Box<dyn Fn() -> DataFrame>,
        Option<u32>,
        Vec<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            "missing column",
            Box::new(|| {
                let mut df = teacher_frame(3);
                let _ = df.drop_in_place("status").unwrap();
                df
            }),
            None,
            vec![
                "teacher-00000-of-00001.parquet",
                "missing column \"status\"",
            ],
        ),
        (
            "wrong type",
            Box::new(|| {
                let mut df = teacher_frame(3);
                let s = df
                    .column("sample")
                    .unwrap()
                    .cast(&DataType::String)
                    .unwrap();
                df.with_column(s).unwrap();
                df
            }),
            None,
            vec![
                "teacher-00000-of-00001.parquet",
                "\"sample\"",
                "expected u32",
            ],
        ),
        (
            "schema from the future",
            Box::new(|| teacher_frame(3)),
            Some(99),
            vec!["schema version 99", "hint: re-run kdpipe generate"],
        ),
        (
            "no rows",
            Box::new(|| teacher_frame(0)),
            None,
            vec!["hold no teacher rows"],
        ),
    ];
    for (what, frame, schema, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "c.toml", &config("m.gguf", "in.jsonl", ""));
        generate_folder(dir.path(), &mut frame(), schema);
        let out = kdpipe(&["curate", "--config", "c.toml"], dir.path());
        assert_eq!(out.status.code(), Some(2), "{what}");
        let err = stderr(&out);
        for e in expected {
            assert!(err.contains(e), "{what}: {e:?} not in {err}");
        }
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(
            !dir.path().join("runs/t/curate/manifest.json").exists(),
            "{what}: a curate folder looks complete"
        );
    }
}

#[test]
fn a_failed_curate_leaves_the_previous_complete_output_intact() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "c.toml", &config("m.gguf", "in.jsonl", ""));
    generate_folder(dir.path(), &mut teacher_frame(20), None);
    let out = kdpipe(&["curate", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let curate = dir.path().join("runs/t/curate");
    let before: Vec<(std::path::PathBuf, Vec<u8>)> = all_files(&curate)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    // The next run's input is broken: it stops before touching the finished folder.
    let mut broken = teacher_frame(20);
    let _ = broken.drop_in_place("answer").unwrap();
    generate_folder(dir.path(), &mut broken, None);
    let out = kdpipe(&["curate", "--config", "c.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    for (p, bytes) in before {
        assert_eq!(std::fs::read(&p).unwrap(), bytes, "{} changed", p.display());
    }
}
