//! An exported student loads in Hugging Face transformers (PyTorch, from pip) and gives the
//! logits kdpipe's decoder gives: trained with LoRA for one step first, so the adapters'
//! merge is part of what is checked. The tokenizer and chat template travel too, and the
//! adapters alone (the PEFT folder) on the exported base give the same logits in PEFT.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use kdpipe::config::LoraConfig;
use kdpipe::finetune::optim::AdamW;
use kdpipe::llama as student;
use std::io::Write;
use std::process::{Command, Stdio};

/// Largest |a − b| between kdpipe's logits and transformers' (JSON rows of numbers).
fn largest_difference(ours: &[Vec<f32>], theirs: &[serde_json::Value]) -> f32 {
    let mut worst = 0f32;
    for (row_ours, row_theirs) in ours.iter().zip(theirs) {
        for (a, b) in row_ours.iter().zip(row_theirs.as_array().unwrap()) {
            worst = worst.max((a - b.as_f64().unwrap() as f32).abs());
        }
    }
    worst
}

#[test]
fn exported_student_gives_the_same_logits_in_transformers() {
    let dev = Device::Cpu;
    let loaded = student::load(smollm2().to_str().unwrap(), &dev).unwrap();
    let mut model = loaded.decoder(&dev, |_| false).unwrap();
    let lora = LoraConfig {
        rank: 4,
        alpha: 16.0,
        targets: vec!["q_proj".into(), "up_proj".into()],
        dropout: 0.0,
    };
    model.add_lora(&lora, 3).unwrap();
    let train = loaded
        .encode("Tom has 5 apples and buys 12 more: 5 + 12 = 17.")
        .unwrap();
    let n = train.len();
    let ids = Tensor::from_vec(train, (1, n), &dev).unwrap();
    let mask = Tensor::ones((1, n), DType::F32, &dev).unwrap();
    let loss = kdpipe::finetune::loss::token_nll(&model.forward(&ids, &mask).unwrap(), &ids)
        .unwrap()
        .mean_all()
        .unwrap();
    let mut opt = AdamW::new(model.vars.clone(), 0.0).unwrap();
    let mut acc = opt.accumulator();
    opt.accumulate(&mut acc, &loss.backward().unwrap()).unwrap();
    opt.step(acc, 1e-2, None).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let eos = loaded.tokenizer.id_to_token(loaded.eos_token_id).unwrap();
    let base_model = smollm2().display().to_string();
    student::export::export(
        dir.path(),
        &model,
        &loaded.tokenizer_json().unwrap(),
        &loaded.chat,
        (&eos, &base_model),
    )
    .unwrap();
    // The base as kdpipe read it (the GGUF dequantized), for the adapters to sit on.
    let base_dir = tempfile::tempdir().unwrap();
    student::export::export(
        base_dir.path(),
        &loaded.decoder(&dev, |_| false).unwrap(),
        &loaded.tokenizer_json().unwrap(),
        &loaded.chat,
        (&eos, &base_model),
    )
    .unwrap();
    assert!(!base_dir.path().join("adapter").exists());
    let adapter_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(adapter_config["r"], 4);
    assert_eq!(adapter_config["lora_alpha"].as_f64(), Some(16.0));

    let probe = "How many apples does Tom have? Café, 😀.";
    let chat = loaded
        .chat
        .render(&[kdpipe::chat::ChatMessage::new("user", probe)], true)
        .unwrap();
    let ids: Vec<u32> = loaded.encode(&chat).unwrap();
    let n = ids.len();
    let input = Tensor::from_vec(ids.clone(), (1, n), &dev).unwrap();
    let ours = model
        .forward(&input, &Tensor::ones((1, n), DType::F32, &dev).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();

    let mut child = Command::new(hf_python())
        .arg(root().join("scripts/hf_logits.py"))
        .arg(dir.path())
        .arg(base_dir.path())
        .arg(dir.path().join("adapter"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let request = serde_json::json!({"ids": ids, "probe": probe}).to_string();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "transformers could not load the student"
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let theirs = got["logits"].as_array().unwrap();
    assert_eq!(theirs.len(), n);
    let max_diff = largest_difference(&ours, theirs);
    eprintln!(
        "max |logit difference| over {n} positions × {} vocab: {max_diff}",
        ours[0].len()
    );
    assert!(max_diff < 1e-3, "logits differ by {max_diff}");
    let adapted = got["adapter_logits"].as_array().unwrap();
    assert_eq!(adapted.len(), n);
    let adapter_diff = largest_difference(&ours, adapted);
    eprintln!("PEFT adapter on the exported base: max |logit difference| {adapter_diff}");
    assert!(
        adapter_diff < 1e-3,
        "adapter logits differ by {adapter_diff}"
    );
    let probe_ids: Vec<u32> = serde_json::from_value(got["probe_ids"].clone()).unwrap();
    assert_eq!(
        probe_ids,
        loaded.encode(probe).unwrap(),
        "tokenizer.json round trip"
    );
    assert_eq!(
        got["chat"].as_str().unwrap(),
        chat,
        "chat template round trip"
    );
}
