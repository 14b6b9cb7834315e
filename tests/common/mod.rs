//! Helpers shared by the integration tests: paths of the real models and the binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A real GGUF from scripts/fetch-models.sh; panics with the fix when it is missing.
pub fn model(file: &str) -> PathBuf {
    let p = root().join("models").join(file);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-models.sh first",
        p.display()
    );
    p
}

pub fn smollm2() -> PathBuf {
    model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn qwen() -> PathBuf {
    model("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf")
}

pub fn kdpipe(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kdpipe"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("kdpipe runs")
}

/// Write `config` as `dir/c.toml` and run `kdpipe eval` with it on `file`; asserts it
/// succeeded.
pub fn eval_on_file(dir: &Path, config: &str, file: &Path) -> Output {
    std::fs::write(dir.join("c.toml"), config).unwrap();
    let file = file.to_str().unwrap();
    let out = kdpipe(&["eval", "--config", "c.toml", "--file", file], dir);
    assert!(out.status.success(), "{}", stderr(&out));
    out
}

/// Run `stages` one after another with `dir/c.toml`; asserts each succeeded.
pub fn run_stages(dir: &Path, stages: &[&str]) {
    for stage in stages {
        let out = kdpipe(&[stage, "--config", "c.toml"], dir);
        assert!(out.status.success(), "{stage}: {}", stderr(&out));
    }
}

/// The rows of a curated split file (at least one).
pub fn curated_rows(path: &Path) -> Vec<kdpipe::records::CuratedRow> {
    let rows = kdpipe::records::CuratedRow::from_frame(
        &kdpipe::io::parquet::read_frame(path).unwrap(),
        path,
    )
    .unwrap();
    assert!(!rows.is_empty(), "{} has no rows", path.display());
    rows
}

/// Every value of `key` that finetune logged in `metrics` (metrics.jsonl).
pub fn logged(metrics: &Path, key: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(metrics)
        .unwrap_or_else(|e| panic!("cannot read the metrics file {}: {e}", metrics.display()));
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let row: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!(
                    "{} line {} is not JSON ({e}): {line}",
                    metrics.display(),
                    i + 1
                )
            });
            row[key].as_f64()
        })
        .collect()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file under a folder, recursively.
pub fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

pub mod agreement;
pub mod fault_proxy;
pub mod server;
#[path = "../../src/test_skip.rs"]
pub mod skip;
pub mod training;

/// Record a suite's counts: printed on stderr and kept in the suite folder, where
/// scripts/test.sh prints them after the run (cargo hides a passing test's output).
pub fn record_suite(name: &str, line: &str) {
    eprintln!("{line}");
    let dir = skip::suite_dir().join("counts");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{name}.txt")), format!("{line}\n"));
}

/// A parsed teacher row with the given text, for tests that need a generate folder.
pub fn ok_teacher_row(
    id: &str,
    input: &str,
    rationale: &str,
    answer: &str,
) -> kdpipe::records::TeacherRow {
    kdpipe::records::TeacherRow {
        id: id.into(),
        sample: 0,
        input: input.into(),
        gold: Some(answer.into()),
        raw: format!("{rationale}\nAnswer: {answer}"),
        rationale: Some(rationale.into()),
        answer: Some(answer.into()),
        status: "ok".into(),
        soft_kind: "none".into(),
        soft_labels: vec![],
        soft_probs: vec![],
        soft_coverage: None,
        tokens: Default::default(),
        prompt_tokens: 1,
        completion_tokens: 1,
        finish_reason: "stop".into(),
        latency_ms: 1.0,
        backend: "local".into(),
        teacher: "t".into(),
        prompt_name: "numeric".into(),
        prompt_hash: "h".into(),
        temperature: 0.0,
        max_tokens: 8,
        seed: None,
        created_unix_ms: 0,
    }
}

/// Largest absolute difference between two tensors of one shape.
pub fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts that pandas' plain `read_parquet` (NumPy columns, no `dtype_backend`, in the
/// Hugging Face venv) reads each file as kdpipe does: the same rows, the same `input`
/// texts and the same lists in each of `text_lists` (list-of-text columns). Returns how
/// many texts of those lists were compared. pyarrow 26 cannot give pandas a list of Arrow
/// string views ("Not implemented type for Arrow list to pandas: string_view").
pub fn assert_pandas_reads(files: &[PathBuf], text_lists: &[&str]) -> usize {
    let script = "import json, sys, pandas as pd\n\
                  cols = sys.argv[1].split(',')\n\
                  for p in sys.argv[2:]:\n\
                  \x20   df = pd.read_parquet(p)\n\
                  \x20   lists = {c: [None if v is None else [str(t) for t in v] for v in df[c]] for c in cols}\n\
                  \x20   print(json.dumps({'rows': len(df), 'input': [str(t) for t in df['input']], 'lists': lists}))\n";
    let out = Command::new(hf_python())
        .args(["-c", script, &text_lists.join(",")])
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pandas could not read kdpipe's files:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let read: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(read.len(), files.len());
    let mut texts = 0;
    for (by_pandas, path) in read.iter().zip(files) {
        let df = kdpipe::io::parquet::read_frame(path).unwrap();
        let at = path.display();
        assert_eq!(by_pandas["rows"], df.height(), "{at}");
        let inputs: Vec<&str> = df
            .column("input")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .map(|t| t.unwrap())
            .collect();
        assert_eq!(by_pandas["input"], serde_json::json!(inputs), "{at}");
        for c in text_lists {
            let lists: Vec<Option<Vec<String>>> = df
                .column(c)
                .unwrap()
                .list()
                .unwrap()
                .amortized_iter()
                .map(|row| {
                    row.map(|l| {
                        let l = l.as_ref().str().unwrap();
                        l.iter().map(|t| t.unwrap().to_string()).collect()
                    })
                })
                .collect();
            texts += lists.iter().flatten().map(Vec::len).sum::<usize>();
            assert_eq!(by_pandas["lists"][c], serde_json::json!(lists), "{at}: {c}");
        }
    }
    texts
}

/// A CPU tensor of values drawn uniformly with standard deviation `std` and mean 0 by a
/// seeded generator: the same values every run (candle's `randn` on the CPU takes no seed).
pub fn seeded_tensor(shape: &[usize], std: f32, seed: u64) -> candle_core::Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let half_width = std * 3f32.sqrt();
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-half_width..half_width))
        .collect();
    candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

/// Asserts that a sequence's logits (after a 40-token prompt, then after one more token)
/// are bit-identical when it is stepped alone and when each count in `others` of other
/// sequences shares its steps.
pub fn assert_logits_independent_of_the_batch(model: &kdpipe::llama::Decoder, others: &[usize]) {
    use kdpipe::llama::infer::{SeqCache, StepInput};
    let prompt: Vec<u32> = (0..40u32).map(|i| 100 + i * 7).collect();
    let other: Vec<u32> = (0..25u32).map(|i| 300 + i * 11).collect();
    let run = |others: usize| -> Vec<Vec<f32>> {
        let mut mine = SeqCache::new(model, 64);
        let mut rest: Vec<SeqCache> = (0..others).map(|_| SeqCache::new(model, 64)).collect();
        let mut out = vec![];
        for (tokens, extra) in [(&prompt[..], &other[..]), (&[5u32][..], &[9u32][..])] {
            let mut inputs = vec![StepInput {
                cache: &mut mine,
                tokens,
                all_logits: false,
            }];
            inputs.extend(rest.iter_mut().map(|c| StepInput {
                cache: c,
                tokens: extra,
                all_logits: false,
            }));
            out.push(model.forward_step(&mut inputs).unwrap().swap_remove(0));
        }
        out
    };
    let alone = run(0);
    for &others in others {
        let got = run(others);
        for (step, (a, b)) in alone.iter().zip(&got).enumerate() {
            let differ = a
                .iter()
                .zip(b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            assert_eq!(
                differ, 0,
                "step {step}: {differ} logits changed with {others} others"
            );
        }
    }
}

/// The Python of the Hugging Face venv (torch, transformers, PEFT, TRL): KDPIPE_HF_PYTHON,
/// else scripts/setup-hf.sh's (installed once).
pub fn hf_python() -> String {
    if let Ok(p) = std::env::var("KDPIPE_HF_PYTHON") {
        return p;
    }
    let out = Command::new(root().join("scripts/setup-hf.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "scripts/setup-hf.sh failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Every line of a JSONL file, parsed.
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
