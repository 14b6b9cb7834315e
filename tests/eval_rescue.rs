//! The live teacher in `eval` answers label tasks as generate writes its rows: a reply whose
//! "Answer:" is outside the label set takes the label the teacher's own label scores put
//! highest (SmolLM2-135M as a local teacher, a label set it often answers outside of).

mod common;
use common::*;
use kdpipe::config::{TaskConfig, TaskKind};
use kdpipe::task::{ParseStatus, Task};

const LABELS: [&str; 4] = ["anger", "joy", "optimism", "sadness"];

#[test]
fn the_live_teacher_rescues_answers_outside_the_label_set_as_generate_does() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        r#"name = "rescue"
seed = 1
[data]
inputs = ["unused.jsonl"]
id_field = "id"
input_field = "text"
gold_field = "label"
[task]
kind = "labels"
labels = ["anger", "joy", "optimism", "sadness"]
description = "What emotion does the text express?"
prompt = "{prompts}/labels.md"
[teacher]
model = "{model}"
max_tokens = 64
[student]
model = "{model}"
[eval]
teacher = "run"
models = ["teacher"]
limit = 60
"#,
        prompts = root().join("prompts").display(),
        model = smollm2().display(),
    );
    eval_on_file(dir.path(), &cfg, &root().join("datasets/feelings.jsonl"));

    let task = Task::from_config(&TaskConfig {
        kind: TaskKind::Labels,
        labels: LABELS.iter().map(|l| l.to_string()).collect(),
        tolerance: 1e-6,
        description: String::new(),
        prompt: None,
    });
    let path = dir.path().join("runs/rescue/eval/predictions.parquet");
    let df = kdpipe::io::parquet::read_frame(&path).unwrap();
    let texts = df.column("teacher_text").unwrap().str().unwrap().clone();
    let answers = df.column("teacher_answer").unwrap().str().unwrap().clone();
    let mut outside = 0;
    for (text, answer) in texts.iter().zip(answers.iter()) {
        let text = text.unwrap_or_default();
        let parsed = task.parse_rationale_output(text, false);
        match parsed.status {
            ParseStatus::OutsideLabelSet => {
                outside += 1;
                let answer = answer.unwrap_or_default();
                assert!(
                    LABELS.contains(&answer),
                    "a reply answering outside the label set was not rescued: {answer:?} from {text:?}"
                );
            }
            ParseStatus::Ok => assert_eq!(answer, parsed.answer.as_deref(), "{text:?}"),
            _ => {}
        }
    }
    assert!(outside > 0, "no reply answered outside the label set");

    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("runs/rescue/eval/report.json")).unwrap(),
    )
    .unwrap();
    let teacher = &report["models"][0];
    assert_eq!(teacher["rescued"], outside, "{teacher}");
    let md = std::fs::read_to_string(dir.path().join("runs/rescue/eval/report.md")).unwrap();
    assert!(md.contains("rescued by its label scores"), "{md}");
    eprintln!("{outside} of 60 replies answered outside the label set, each rescued");
}
