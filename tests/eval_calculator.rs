//! `[eval] calculator` on real models (SmolLM2-135M as a local teacher and as the student
//! before training, on arithmetic word problems): wherever a model's reply leaves an
//! equation open (`3 * 4 =`), the value right after it is the equation's, written by
//! kdpipe; and with a local teacher answering now, the report scores the teacher both
//! ways, its own row and a "teacher, calculator" row.

mod common;
use common::*;
use kdpipe::task::{arith, format_number};

/// Equations left open in `text` and what follows each: (equation, value, what follows).
fn open_equations(text: &str) -> Vec<(String, f64, String)> {
    text.char_indices()
        .filter(|(_, c)| *c == '=')
        .filter_map(|(i, _)| {
            let before = &text[..=i];
            let value = arith::open_equation_value(before)?;
            let line_start = before.rfind('\n').map_or(0, |j| j + 1);
            Some((
                before[line_start..].to_string(),
                value,
                text[i + 1..].to_string(),
            ))
        })
        .collect()
}

#[test]
fn the_calculator_writes_each_open_equations_value_for_student_and_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        r#"name = "calc"
seed = 1
[data]
inputs = ["unused.jsonl"]
id_field = "id"
input_field = "question"
gold_field = "answer"
[task]
kind = "numeric"
description = "Solve the arithmetic word problem."
prompt = "{prompts}/numeric.md"
[teacher]
model = "{model}"
max_tokens = 96
[student]
model = "{model}"
[eval]
teacher = "run"
models = ["teacher", "base"]
student_view = "rationale"
calculator = true
max_new_tokens = 96
limit = 8
"#,
        prompts = root().join("prompts").display(),
        model = smollm2().display(),
    );
    let out = eval_on_file(dir.path(), &cfg, &root().join("datasets/arith.jsonl"));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("teacher, calculator"), "{table}");

    let path = dir.path().join("runs/calc/eval/predictions.parquet");
    let df = kdpipe::io::parquet::read_frame(&path).unwrap();
    let mut checked = 0;
    for key in ["teacher_calculator", "base"] {
        let texts = df
            .column(&format!("{key}_text"))
            .unwrap()
            .str()
            .unwrap()
            .clone();
        for text in texts.iter().flatten() {
            for (equation, value, after) in open_equations(text) {
                // The reply reached its token limit right after `=`: no room for the value
                // (an insertion is written whole or not at all).
                if after.is_empty() {
                    continue;
                }
                let written = format!(" {}", format_number(value));
                assert!(
                    after.starts_with(&written),
                    "{key}: after {equation:?} comes {:?}, not{written:?}",
                    after.chars().take(12).collect::<String>()
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "no reply left an equation open");
    eprintln!("{checked} open equations, each followed by its value");
    // The teacher's own row is scored too, from its own replies.
    assert!(df.column("teacher_text").is_ok());
}
