//! The student as GGUF files (`kdpipe export`) on a real finetuned SmolLM2-135M: the
//! three types are written with their tensor types in the manifest, kdpipe reads every
//! weight back within the type's rounding (which also proves the q/k rows went back into
//! llama.cpp's order), the F16 file's logits follow the exported f32 model's, and
//! llama.cpp (llama-cpp-python) loads each file and greedily writes what kdpipe's engine
//! predicts on the same file (and mistralrs, built with `--features mistralrs`, loads
//! the Q4_K_M file and picks kdpipe's next tokens).

mod common;
use candle_core::Device;
use common::agreement::{agreement, argmax, llama_cpp_replies, logits_per_position};
use common::training::{config_replacing, curated};
use common::*;
use kdpipe::llama;
use std::path::{Path, PathBuf};

/// Worst |a − b| over the largest |a| of each weight the two models share, and the name
/// where it is worst.
fn worst_weight_error(a: &llama::LoadedModel, b: &llama::LoadedModel) -> (f32, String) {
    let mut worst = (0f32, String::new());
    for (name, x) in &a.weights {
        let y = b
            .weights
            .get(name)
            .unwrap_or_else(|| panic!("{name} is missing from the export"));
        assert_eq!(x.dims(), y.dims(), "{name}");
        let scale = x
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let rel = max_diff(x, y) / scale.max(1e-12);
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    worst
}

/// Chats of the feelings task as the student's template renders them.
fn prompts(model: &llama::LoadedModel) -> Vec<Vec<u32>> {
    std::fs::read_to_string(root().join("datasets/feelings.jsonl"))
        .unwrap()
        .lines()
        .skip(20)
        .take(32)
        .map(|l| {
            let row: serde_json::Value = serde_json::from_str(l).unwrap();
            let chat = [kdpipe::chat::ChatMessage::new(
                "user",
                format!(
                    "What emotion does this post express, and why?\n{}",
                    row["text"].as_str().unwrap()
                ),
            )];
            model.chat_ids(&chat).unwrap()
        })
        .collect()
}

fn export_dir(dir: &Path) -> PathBuf {
    dir.join("runs/t/export")
}

#[test]
fn the_student_exports_to_gguf_files_that_llama_cpp_and_kdpipe_read() {
    let dir = tempfile::tempdir().unwrap();
    curated(dir.path(), 6);
    // Full fine-tuning, two steps: every weight moves away from the base model's.
    config_replacing(
        dir.path(),
        "[export]\n",
        &[
            ("max_steps = 6\n", "max_steps = 2\n"),
            ("learning_rate = 1e-4\n", "learning_rate = 1e-3\n"),
        ],
    );
    let out = kdpipe(&["finetune", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let out = kdpipe(&["export", "--config", "c.toml"], dir.path());
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");

    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(export_dir(dir.path()).join("manifest.json")).unwrap(),
    )
    .unwrap();
    let files = manifest["summary"]["gguf"].as_array().unwrap();
    let types: Vec<&str> = files.iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["f16", "q8_0", "q4_k_m"]);
    let bytes: Vec<u64> = files.iter().map(|f| f["bytes"].as_u64().unwrap()).collect();
    assert!(bytes[0] > bytes[1] && bytes[1] > bytes[2], "{bytes:?}");
    // SmolLM2's 576-wide rows are no whole Q4_K super-blocks: llama.cpp's fallbacks.
    let mix = &files[2]["tensor_types"];
    for t in ["Q5_0", "Q6K", "Q4K", "F32"] {
        assert!(mix[t].as_u64().unwrap_or(0) > 0, "{t} missing from {mix}");
    }
    eprintln!("export: sizes {bytes:?}, Q4_K_M mix {mix}");

    // eval scores each file like any model, on its own row.
    let eval_file = dir.path().join("eval.jsonl");
    let lines: Vec<&str> = include_str!("../datasets/feelings.jsonl")
        .lines()
        .skip(100)
        .take(6)
        .collect();
    std::fs::write(&eval_file, lines.join("\n")).unwrap();
    std::fs::write(
        dir.path().join("c.toml"),
        std::fs::read_to_string(dir.path().join("c.toml"))
            .unwrap()
            .replace(
                "input_field = \"text\"",
                "input_field = \"text\"\ngold_field = \"label\"",
            ),
    )
    .unwrap();
    let out = kdpipe(
        &[
            "eval",
            "--config",
            "c.toml",
            "--file",
            "eval.jsonl",
            "--models",
            "student,exported",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    for name in [
        "student after",
        "student f16 GGUF",
        "student q8_0 GGUF",
        "student q4_k_m GGUF",
    ] {
        assert!(table.contains(name), "{name} missing:\n{table}");
    }
    eprintln!("{table}");

    let student_dir = dir.path().join("runs/t/student");
    let student = llama::load(student_dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let base = llama::load(smollm2().to_str().unwrap(), &Device::Cpu).unwrap();
    // The student is not its base: a comparison that passed for the base would prove nothing.
    assert!(worst_weight_error(&student, &base).0 > 1e-3);

    let prompts = prompts(&student);
    let stop = student.stop_tokens();
    let mut f32_model = llama::load_for_inference(student_dir.to_str().unwrap()).unwrap();
    let f32_decoder = f32_model.take_inference_decoder().unwrap();
    // (type, worst relative weight error allowed, llama.cpp agreement required)
    for (i, (kind, weight_tolerance, required)) in [
        ("f16", 1e-3, 0.96),
        ("q8_0", 1e-2, 0.96),
        ("q4_k_m", 0.15, 0.94),
    ]
    .into_iter()
    .enumerate()
    {
        let path = export_dir(dir.path()).join(format!("t-{kind}.gguf"));
        assert_eq!(dir.path().join(files[i]["file"].as_str().unwrap()), path);
        let read = llama::load(path.to_str().unwrap(), &Device::Cpu).unwrap();
        assert_eq!(read.weights.len(), student.weights.len());
        let (worst, at) = worst_weight_error(&student, &read);
        eprintln!("{kind}: worst weight error {worst:.2e} (relative to the tensor's largest value, at {at})");
        assert!(worst < weight_tolerance, "{kind}: {worst} at {at}");
        assert_eq!(
            read.chat_ids(&[kdpipe::chat::ChatMessage::new("user", "hi")])
                .unwrap(),
            student
                .chat_ids(&[kdpipe::chat::ChatMessage::new("user", "hi")])
                .unwrap(),
            "{kind}: the tokenizer or chat template changed"
        );

        let mut engine = llama::load_for_inference(path.to_str().unwrap()).unwrap();
        let decoder = engine.take_inference_decoder().unwrap();
        if kind == "f16" {
            // The f16 file's logits against the exported f32 model's, on a real chat.
            let ids = &prompts[0];
            let (a, b) = (
                logits_per_position(&f32_decoder, ids),
                logits_per_position(&decoder, ids),
            );
            let worst = a
                .iter()
                .zip(&b)
                .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
                .fold(0f32, f32::max);
            let same = a
                .iter()
                .zip(&b)
                .filter(|(x, y)| argmax(x) == argmax(y))
                .count();
            eprintln!(
                "f16: largest logit difference from the f32 export {worst:.4} over {} positions; argmax equal at {same}",
                a.len()
            );
            assert!(worst < 0.25, "{worst}");
            assert!(same * 100 >= a.len() * 97, "{same} of {}", a.len());
        }
        #[cfg(feature = "mistralrs")]
        if kind == "q4_k_m" {
            // mistralrs loads the same file: its next token after each of 8 chats.
            let engine =
                kdpipe::teacher::mistralrs::MistralrsTeacher::open(path.to_str().unwrap(), false)
                    .unwrap();
            let same = prompts[..8]
                .iter()
                .filter(|ids| {
                    let theirs = engine.next_token_logprobs(ids.to_vec()).unwrap();
                    let ours = logits_per_position(&decoder, ids);
                    argmax(&theirs) == argmax(ours.last().unwrap())
                })
                .count();
            eprintln!("q4_k_m: mistralrs's next token is kdpipe's after {same} of 8 chats");
            assert!(same >= 7, "{same} of 8");
        }
        let replies = llama_cpp_replies(&path, &prompts, &stop);
        let (same, total, gap) = agreement(&decoder, &prompts, &replies);
        let share = same as f64 / total as f64;
        eprintln!(
            "{kind}: kdpipe's argmax is llama.cpp's greedy token at {same} of {total} positions ({:.1} %); largest gap where not {gap:.3}",
            100.0 * share
        );
        assert!(total >= 200, "{kind}: {total} positions");
        assert!(share >= required, "{kind}: {share}");
        assert!(gap < 1.0, "{kind}: gap {gap}");
    }
}

#[test]
fn export_without_a_student_or_from_a_non_gguf_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    curated(dir.path(), 4);
    config_replacing(dir.path(), "[export]\ngguf = [\"q8_0\"]\n", &[]);
    let out = kdpipe(&["export", "--config", "c.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("run kdpipe finetune"),
        "{}",
        stderr(&out)
    );
    assert!(!export_dir(dir.path()).exists());

    config_replacing(dir.path(), "[export]\ngguf = [\"q5_x\"]\n", &[]);
    let out = kdpipe(&["export", "--config", "c.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("q5_x"), "{}", stderr(&out));
}
