//! The bad-input corpus (tests/bad-inputs/, written by make.py): every malformed input must
//! end the command with exit code 2 and an error that names the file, row or field and
//! what to do, never a panic, and must leave every file that was there before unchanged.

mod common;
use common::*;
use kdpipe::io::manifest::Manifest;
use kdpipe::records::TeacherRow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(serde::Deserialize)]
struct Corpus {
    case: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    command: String,
    expect: Vec<String>,
    /// Replaces the valid input file.
    input: Option<String>,
    /// "generate": a valid teacher folder first; "curate": valid curated splits first.
    setup: Option<String>,
    /// [corpus file, place in the run folder] pairs, copied after the setup.
    #[serde(default)]
    place: Vec<[String; 2]>,
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    args: Vec<String>,
    /// The whole command line instead of `<command> --config c.toml <args>`.
    args_only: Option<Vec<String>>,
    /// "numeric" (default), "labels", or "labels_one" (a label set of one).
    kind: Option<String>,
    config_extra: Option<String>,
    config_file: Option<String>,
    teacher_kind: Option<String>,
    prompt: Option<String>,
    student: Option<String>,
    student_path: Option<String>,
    teacher: Option<String>,
}

fn corpus_dir() -> PathBuf {
    root().join("tests/bad-inputs")
}

fn corpus_path(rel: &str) -> String {
    corpus_dir().join(rel).display().to_string()
}

fn config(case: &Case) -> String {
    let kind = case.kind.as_deref().unwrap_or("numeric");
    let task = match kind {
        "numeric" => "kind = \"numeric\"".to_string(),
        "labels" => {
            "kind = \"labels\"\nlabels = [\"anger\", \"joy\", \"optimism\", \"sadness\"]".into()
        }
        _ => "kind = \"labels\"\nlabels = [\"joy\"]".into(),
    };
    let prompt = match &case.prompt {
        Some(p) => corpus_path(p),
        None => root()
            .join(format!(
                "prompts/{}.md",
                if kind == "numeric" {
                    "numeric"
                } else {
                    "labels"
                }
            ))
            .display()
            .to_string(),
    };
    let input = case
        .input
        .as_deref()
        .map(corpus_path)
        .unwrap_or_else(|| "in.jsonl".into());
    let teacher = match (&case.teacher_kind, &case.teacher) {
        (Some(k), _) => format!("kind = \"{k}\"\nmodel = \"gpt-x\""),
        (None, Some(t)) => format!("model = \"{}\"", corpus_path(t)),
        (None, None) => "model = \"t.gguf\"".into(),
    };
    let student = match (&case.student, &case.student_path) {
        (Some(s), _) => corpus_path(s),
        (None, Some(p)) => p.clone(),
        (None, None) => smollm2().display().to_string(),
    };
    let extra = case
        .config_extra
        .as_deref()
        .map(|f| std::fs::read_to_string(corpus_dir().join(f)).unwrap())
        .unwrap_or_default();
    format!(
        "name = \"t\"\nruns_dir = \"runs\"\n[data]\ninputs = [{input:?}]\nid_field = \"id\"\ninput_field = \"q\"\ngold_field = \"a\"\n[task]\n{task}\nprompt = {prompt:?}\n[teacher]\n{teacher}\n[student]\nmodel = {student:?}\n{extra}"
    )
}

/// A finished generate folder with `n` valid teacher rows.
fn valid_generate(dir: &Path, n: usize) {
    let gen = dir.join("runs/t/generate");
    std::fs::create_dir_all(&gen).unwrap();
    let rows: Vec<TeacherRow> = (0..n)
        .map(|i| {
            ok_teacher_row(
                &format!("r{i}"),
                &format!("Tom has {i} apples and buys 2 more. How many?"),
                &format!("{i} + 2 = {}", i + 2),
                &format!("{}", i + 2),
            )
        })
        .collect();
    let mut df = TeacherRow::to_frame(&rows).unwrap();
    kdpipe::io::parquet::write_frame(&gen.join("teacher-00000-of-00001.parquet"), &mut df).unwrap();
    Manifest::new(kdpipe::config::Stage::Generate, "x".into(), 0)
        .write(&gen)
        .unwrap();
}

fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    all_files(dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// Run one case; `Err` says what was wrong.
fn run_case(case: &Case) -> Result<(), String> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("in.jsonl"),
        "{\"id\": \"1\", \"q\": \"Tom has 2 apples and buys 3. How many?\", \"a\": 5}\n",
    )
    .unwrap();
    // A config file of the corpus is copied byte for byte: some are not valid UTF-8.
    match &case.config_file {
        Some(f) => std::fs::copy(corpus_dir().join(f), dir.join("c.toml")).map(|_| ()),
        None => std::fs::write(dir.join("c.toml"), config(case)),
    }
    .unwrap();
    match case.setup.as_deref() {
        Some("generate") => valid_generate(dir, 3),
        Some("curate") => {
            valid_generate(dir, 30);
            let out = kdpipe(&["curate", "--config", "c.toml"], dir);
            if !out.status.success() {
                return Err(format!("setup curate failed: {}", stderr(&out)));
            }
        }
        _ => {}
    }
    for [from, to] in &case.place {
        let to = dir.join(to);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(corpus_dir().join(from), &to).unwrap();
    }
    for f in &case.remove {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    // Output of an earlier run of the same stage, which a failure must not touch.
    let stage_dir = dir.join("runs/t").join(&case.command);
    std::fs::create_dir_all(&stage_dir).unwrap();
    std::fs::write(stage_dir.join("previous-output.txt"), "kept").unwrap();
    let manifest_before = stage_dir.join("manifest.json").exists();
    let before = snapshot(dir);

    let args: Vec<String> = match &case.args_only {
        Some(a) => a.clone(),
        None => {
            let mut a = vec![case.command.clone(), "--config".into(), "c.toml".into()];
            a.extend(case.args.iter().map(|s| {
                if s.starts_with("files/") {
                    corpus_path(s)
                } else {
                    s.clone()
                }
            }));
            a
        }
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = kdpipe(&args, dir);
    let err = stderr(&out);
    let mut problems = Vec::new();
    if out.status.code() != Some(2) {
        problems.push(format!("exit code {:?}, expected 2", out.status.code()));
    }
    if err.contains("panicked") || !err.contains("error:") {
        problems.push("no clean `error:` report (a panic?)".into());
    }
    for e in &case.expect {
        if !err.contains(e.as_str()) {
            problems.push(format!("stderr lacks {e:?}"));
        }
    }
    for (path, bytes) in &before {
        match std::fs::read(path) {
            Ok(now) if &now == bytes => {}
            _ => problems.push(format!("{} changed or vanished", path.display())),
        }
    }
    if !manifest_before && stage_dir.join("manifest.json").exists() {
        problems.push("a manifest was written: the failed output looks complete".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{}\n--- stderr ---\n{err}", problems.join("; ")))
    }
}

#[test]
fn every_malformed_input_gets_a_clear_error_and_corrupts_nothing() {
    let text = std::fs::read_to_string(corpus_dir().join("cases.toml")).unwrap();
    let corpus: Corpus = toml::from_str(&text).unwrap();
    assert!(
        corpus.case.len() >= 50,
        "the corpus holds {} cases",
        corpus.case.len()
    );
    let mut failed = Vec::new();
    for case in &corpus.case {
        if let Err(why) = run_case(case) {
            failed.push(format!("[{}] {why}", case.name));
        }
    }
    record_suite(
        "bad-inputs",
        &format!(
            "bad-input corpus: {} inputs tried, {} gave a clear error and changed nothing, {} did not",
            corpus.case.len(),
            corpus.case.len() - failed.len(),
            failed.len()
        ),
    );
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}
