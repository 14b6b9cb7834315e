//! `kdpipe export-data`: real curated rows (SmolLM2 as its own teacher, keeping each
//! token's top-5) written for TRL and axolotl. Every row gives the examples finetune
//! trains on, the teacher's token top-k come back within 1e-6 of what the curated split
//! holds, both formats carry the same chats, and TRL (the Hugging Face venv) loads the
//! files and trains one step on them. The DistillKit layout: torch reads it as
//! DistillKit's collator does, each KD position holds the next token's top-k (within 1e-6
//! of the curated split), and one step of DistillKit's loss mix trains on it.

mod common;
use common::*;
use kdpipe::records::CuratedRow;
use std::collections::BTreeMap;
use std::path::Path;

fn config(dir: &Path) {
    let text = format!(
        r#"name = "xd"
seed = 3
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
model = "{model}"
max_tokens = 40
[generate]
token_topk = 5
[curate]
split = [0.75, 0.25, 0.0]
gold = "flag"
check_arithmetic = false
require_answer_in_rationale = false
[student]
model = "{model}"
[finetune]
objective = "step_by_step"
"#,
        data = root().join("datasets/arith.jsonl").display(),
        prompts = root().join("prompts").display(),
        model = smollm2().display(),
    );
    std::fs::write(dir.join("c.toml"), text).unwrap();
}

#[test]
fn curated_rows_go_to_trl_and_axolotl_and_train_a_trl_step() {
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    let refused = kdpipe(
        &["export-data", "--config", "c.toml", "--format", "trl"],
        dir.path(),
    );
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("run kdpipe curate"),
        "{}",
        stderr(&refused)
    );
    for stage in ["generate", "curate"] {
        let out = kdpipe(&[stage, "--config", "c.toml"], dir.path());
        assert!(out.status.success(), "{stage}: {}", stderr(&out));
    }
    for format in ["trl", "axolotl"] {
        let out = kdpipe(
            &["export-data", "--config", "c.toml", "--format", format],
            dir.path(),
        );
        assert!(out.status.success(), "{format}: {}", stderr(&out));
    }

    let run = dir.path().join("runs/xd");
    let mut teacher_views = 0;
    for split in ["train", "val"] {
        let path = run.join(format!("curate/{split}.parquet"));
        let rows = CuratedRow::from_frame(&kdpipe::io::parquet::read_frame(&path).unwrap(), &path)
            .unwrap();
        assert!(!rows.is_empty());
        let trl = json_lines(&run.join(format!("export_data/trl/{split}.jsonl")));
        let axolotl = json_lines(&run.join(format!("export_data/axolotl/{split}.jsonl")));
        assert_eq!(trl.len(), axolotl.len());

        // The examples of each row, by view, as finetune builds them.
        let mut by_row: BTreeMap<(String, u64), Vec<&serde_json::Value>> = BTreeMap::new();
        for l in &trl {
            let key = (
                l["id"].as_str().unwrap().to_string(),
                l["sample"].as_u64().unwrap(),
            );
            by_row.entry(key).or_default().push(l);
        }
        assert_eq!(by_row.len(), rows.len());
        for r in &rows {
            let views = &by_row[&(r.id.clone(), r.sample as u64)];
            let view = |name: &str| views.iter().find(|l| l["view"] == name).copied();
            let label = view("label").unwrap();
            assert_eq!(label["completion"][0]["content"], r.answer.as_str());
            assert!(label["prompt"][0]["content"]
                .as_str()
                .unwrap()
                .ends_with(&format!("[label] {}", r.input)));
            if !r.rationale.trim().is_empty() {
                let rationale = view("rationale").unwrap();
                let reply = rationale["completion"][0]["content"].as_str().unwrap();
                assert!(reply.starts_with(r.rationale.trim()));
                assert!(reply.ends_with(&format!("Answer: {}", r.answer)));
            }
            // The teacher's tokens and their top-5, back within 1e-6.
            let teacher = view("teacher").unwrap();
            teacher_views += 1;
            assert_eq!(teacher["completion"][0]["content"], r.raw.as_str());
            let ids: Vec<u32> =
                serde_json::from_value(teacher["teacher_token_ids"].clone()).unwrap();
            assert_eq!(ids, r.tokens.ids);
            let top_ids: Vec<Vec<u32>> =
                serde_json::from_value(teacher["teacher_topk_ids"].clone()).unwrap();
            assert_eq!(top_ids, r.tokens.top_ids);
            let top: Vec<Vec<f64>> =
                serde_json::from_value(teacher["teacher_topk_logprobs"].clone()).unwrap();
            assert_eq!(top.len(), r.tokens.top_logprobs.len());
            for (a, b) in top
                .iter()
                .flatten()
                .zip(r.tokens.top_logprobs.iter().flatten())
            {
                assert!((a - *b as f64).abs() <= 1e-6, "{a} vs {b}");
            }
            assert_eq!(teacher["teacher_topk_temperature"].as_f64(), Some(1.0));
            assert_eq!(teacher["teacher_vocab"], r.tokens.vocab.as_str());
        }
        // axolotl: the same chat as one message list, the same other columns.
        for (t, a) in trl.iter().zip(&axolotl) {
            let messages = a["messages"].as_array().unwrap();
            assert_eq!(messages.len(), 2);
            assert_eq!(messages[0], t["prompt"][0]);
            assert_eq!(messages[1], t["completion"][0]);
            assert_eq!(a["teacher_topk_logprobs"], t["teacher_topk_logprobs"]);
        }
    }
    assert!(teacher_views > 0);

    // TRL reads the files and trains one step of a real student (SmolLM2 exported as a
    // Hugging Face folder) on the label and rationale views.
    let model =
        kdpipe::llama::load(smollm2().to_str().unwrap(), &candle_core::Device::Cpu).unwrap();
    let student = dir.path().join("student");
    let eos = model.tokenizer.id_to_token(model.eos_token_id).unwrap();
    kdpipe::llama::export::export(
        &student,
        &model.decoder(&candle_core::Device::Cpu, |_| false).unwrap(),
        &model.tokenizer_json().unwrap(),
        &model.chat,
        (&eos, "SmolLM2-135M-Instruct"),
    )
    .unwrap();
    let out = std::process::Command::new(hf_python())
        .arg(root().join("scripts/trl_step.py"))
        .arg(run.join("export_data/trl"))
        .arg(&student)
        .arg(dir.path().join("trl-out"))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "trl_step.py failed:\n{log}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    eprintln!("TRL step: {result}");
    let loss = result["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{result}");
    let train = json_lines(&run.join("export_data/trl/train.jsonl"));
    let trainable = train.iter().filter(|l| l["view"] != "teacher").count();
    assert_eq!(result["trained_rows"].as_u64().unwrap() as usize, trainable);
    assert_eq!(
        result["views"],
        serde_json::json!(["label", "rationale", "teacher"])
    );

    distillkit_layout_round_trips_and_trains(dir.path(), &run, &student);
    gold_labels_export_gold_and_only_the_reasoning_that_reached_it(dir.path(), &run);
    pandas_reads_the_teacher_and_curated_files(&run);
}

/// pandas' plain `read_parquet` reads generate's teacher files and curate's split files
/// (written by two different writers) as kdpipe does: the local engine keeps no top-k
/// texts, so `topk_texts` holds empty lists here, which pandas refused all the same while
/// the files declared string views (tests/api.rs compares lists with texts in them).
fn pandas_reads_the_teacher_and_curated_files(run: &Path) {
    let mut files: Vec<std::path::PathBuf> = all_files(&run.join("generate"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    assert!(!files.is_empty(), "generate wrote no Parquet files");
    files.extend(["train", "val", "test"].map(|s| run.join(format!("curate/{s}.parquet"))));
    assert_pandas_reads(&files, &["topk_texts"]);
}

/// `[finetune] labels = "gold"`: every label view carries gold; the rationale and teacher
/// views only on rows whose answer agrees with gold (SmolLM2 misses most sums, so the
/// curated rows hold both kinds).
fn gold_labels_export_gold_and_only_the_reasoning_that_reached_it(dir: &Path, run: &Path) {
    let text = std::fs::read_to_string(dir.join("c.toml")).unwrap();
    std::fs::write(
        dir.join("c.toml"),
        text.replace("[finetune]\n", "[finetune]\nlabels = \"gold\"\n"),
    )
    .unwrap();
    let out = kdpipe(
        &["export-data", "--config", "c.toml", "--format", "trl"],
        dir,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut disagreeing = 0;
    for split in ["train", "val"] {
        let path = run.join(format!("curate/{split}.parquet"));
        let rows = CuratedRow::from_frame(&kdpipe::io::parquet::read_frame(&path).unwrap(), &path)
            .unwrap();
        let trl = json_lines(&run.join(format!("export_data/trl/{split}.jsonl")));
        for r in &rows {
            let views: Vec<&serde_json::Value> = trl
                .iter()
                .filter(|l| l["id"] == r.id.as_str() && l["sample"] == r.sample)
                .collect();
            let view = |name: &str| views.iter().find(|l| l["view"] == name).copied();
            let gold = r.gold.as_deref().unwrap();
            assert_eq!(view("label").unwrap()["completion"][0]["content"], gold);
            let agrees = r.agrees_with_gold.unwrap();
            disagreeing += usize::from(!agrees);
            assert_eq!(view("teacher").is_some(), agrees, "row {}", r.id);
            if let Some(rationale) = view("rationale") {
                assert!(agrees, "row {}", r.id);
                let reply = rationale["completion"][0]["content"].as_str().unwrap();
                assert!(reply.ends_with(&format!("Answer: {gold}")));
            }
        }
    }
    assert!(disagreeing > 0, "no curated row disagrees with gold");
}

fn distillkit_layout_round_trips_and_trains(dir: &Path, run: &Path, student: &Path) {
    let out = kdpipe(
        &[
            "export-data",
            "--config",
            "c.toml",
            "--format",
            "distillkit",
        ],
        dir,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let data = run.join("export_data/distillkit");
    let check = std::process::Command::new(hf_python())
        .arg(root().join("scripts/distillkit_check.py"))
        .arg(&data)
        .arg(student)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "distillkit_check.py failed:\n{log}\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    // The split files load under the names a DistillKit config asks for.
    assert_eq!(result["splits"], serde_json::json!(["train", "validation"]));
    for (split, name) in [("train", "train"), ("val", "validation")] {
        let path = run.join(format!("curate/{split}.parquet"));
        let rows = CuratedRow::from_frame(&kdpipe::io::parquet::read_frame(&path).unwrap(), &path)
            .unwrap();
        let with_topk: Vec<&CuratedRow> =
            rows.iter().filter(|r| !r.tokens.ids.is_empty()).collect();
        let shapes = &result["shapes"][name];
        let n = with_topk.len() as u64;
        let length = shapes["input_ids"][1].as_u64().unwrap();
        assert_eq!(shapes["input_ids"], serde_json::json!([n, length]));
        assert_eq!(shapes["labels"], shapes["input_ids"]);
        assert_eq!(shapes["token_ids"], serde_json::json!([n, length, 5]));
        assert_eq!(shapes["top_values"], shapes["token_ids"]);
        // Each row's KD positions, in order: the teacher's j-th token follows position j,
        // with its top-5 as the curated split holds them.
        let positions = result["positions"][name].as_array().unwrap();
        let mut at = 0;
        for (i, r) in with_topk.iter().enumerate() {
            let mine: Vec<&serde_json::Value> = positions[at..]
                .iter()
                .take_while(|p| p["row"].as_u64() == Some(i as u64))
                .collect();
            at += mine.len();
            assert_eq!(mine.len(), r.tokens.ids.len(), "row {}", r.id);
            for (j, p) in mine.iter().enumerate() {
                assert_eq!(p["next"].as_u64(), Some(r.tokens.ids[j] as u64));
                let ids: Vec<u32> = serde_json::from_value(p["ids"].clone()).unwrap();
                assert_eq!(ids, r.tokens.top_ids[j]);
                let lps: Vec<f64> = serde_json::from_value(p["logprobs"].clone()).unwrap();
                for (a, b) in lps.iter().zip(&r.tokens.top_logprobs[j]) {
                    assert!((a - *b as f64).abs() <= 1e-6, "{a} vs {b}");
                }
            }
        }
        assert_eq!(
            at,
            positions.len(),
            "KD positions outside the teacher's reply"
        );
    }
    eprintln!(
        "DistillKit layout, one step: loss {} → {}",
        result["loss_before"], result["loss_after"]
    );
    let (before, after) = (
        result["loss_before"].as_f64().unwrap(),
        result["loss_after"].as_f64().unwrap(),
    );
    assert!(
        before.is_finite() && after.is_finite() && after < before,
        "{result}"
    );
}
