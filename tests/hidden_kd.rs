//! Knowledge from the teacher's hidden states ([finetune.hidden_kd]) on real models: the
//! states a forward pass keeps are the ones the logits come from, the quantized teacher's
//! states follow the f32 model's, a learned map takes one model's states to another's on
//! a real batch, a training run logs both terms and resumes to the same curve (maps
//! included), relations pass across tokenizers (Qwen → SmolLM2), and feature KD across
//! tokenizers or layers outside the models are refused.

mod common;
use common::training::{
    assert_same_curve, config_replacing, curated, kill_after_checkpoint, losses, metrics,
};
use common::*;
use kdpipe::finetune::hidden::feature_mse;
use kdpipe::finetune::optim::AdamW;
use kdpipe::llama::LoadedModel;
use std::path::Path;
use std::time::Duration;

/// Two real texts of the feelings task as a right-padded batch: ids, attention mask.
fn real_batch(loaded: &LoadedModel) -> (candle_core::Tensor, candle_core::Tensor) {
    let dev = candle_core::Device::Cpu;
    let texts = [
        "I can't believe they cancelled the show again, this is so frustrating!",
        "Finally finished my thesis. Feeling proud and a bit tired 😊",
    ];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| loaded.encode(t).unwrap()).collect();
    let t = ids.iter().map(Vec::len).max().unwrap();
    let (mut flat, mut mask) = (vec![], vec![]);
    for seq in &ids {
        for j in 0..t {
            flat.push(*seq.get(j).unwrap_or(&loaded.eos_token_id));
            mask.push(if j < seq.len() { 1f32 } else { 0.0 });
        }
    }
    (
        candle_core::Tensor::from_vec(flat, (2, t), &dev).unwrap(),
        candle_core::Tensor::from_vec(mask, (2, t), &dev).unwrap(),
    )
}

#[test]
fn kept_states_are_the_forward_pass_and_the_quantized_teacher_follows_f32() {
    let dev = candle_core::Device::Cpu;
    let path = smollm2();
    let loaded = kdpipe::llama::load(path.to_str().unwrap(), &dev).unwrap();
    let model = loaded.decoder(&dev, |_| false).unwrap();
    let (ids, mask) = real_batch(&loaded);
    let (logits, states) = model.forward_hidden(&ids, &mask, &[30, 10], true).unwrap();
    assert_eq!(states.layers.len(), 2);
    assert_eq!(states.layers[0].dims(), &[2, ids.dim(1).unwrap(), 576]);
    assert!(max_diff(&logits.unwrap(), &model.forward(&ids, &mask).unwrap()) < 1e-5);
    // Asked for no logits, the pass keeps the same states.
    let (none, again) = model.forward_hidden(&ids, &mask, &[10], false).unwrap();
    assert!(none.is_none());
    assert!(max_diff(&again.layers[0], &states.layers[1]) < 1e-5);
    assert!(model.forward_hidden(&ids, &mask, &[31], false).is_err());

    // The teacher's inference decoder (blocks as the GGUF stores them, activations
    // quantized on the fly) against the f32 decoder of the same file: the final normed
    // states agree to a cosine above 0.99 at every real token.
    let mut teacher = kdpipe::llama::load_for_inference(path.to_str().unwrap()).unwrap();
    let quantized = teacher.take_inference_decoder().unwrap();
    let (_, q) = quantized.forward_hidden(&ids, &mask, &[], false).unwrap();
    let cos = kdpipe::finetune::hidden::feature_cosine(&q.last, &states.last, &mask)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        cos < 0.01,
        "mean 1 − cos between quantized and f32 states: {cos}"
    );
}

/// FitNets' regressor on a real batch: a map from SmolLM2's layer-10 states to its
/// layer-20 states, trained alone with AdamW, brings the feature loss well down.
#[test]
fn a_learned_map_takes_one_layer_to_another_on_a_real_batch() {
    let dev = candle_core::Device::Cpu;
    let loaded = kdpipe::llama::load(smollm2().to_str().unwrap(), &dev).unwrap();
    let model = loaded.decoder(&dev, |_| false).unwrap();
    let (ids, mask) = real_batch(&loaded);
    let (_, states) = model.forward_hidden(&ids, &mask, &[10, 20], false).unwrap();
    let (from, to) = (&states.layers[0], &states.layers[1]);
    let (b, t, w) = from.dims3().unwrap();
    let map =
        candle_core::Var::from_tensor(&seeded_tensor(&[w, w], 1.0 / (w as f32).sqrt(), 5)).unwrap();
    let mut opt = AdamW::new(vec![("map".into(), map.clone())], 0.0).unwrap();
    let loss = || {
        let mapped = from
            .reshape((b * t, w))
            .unwrap()
            .matmul(&map.as_tensor().t().unwrap())
            .unwrap()
            .reshape((b, t, w))
            .unwrap();
        feature_mse(&mapped, to, &mask).unwrap()
    };
    let first = loss().to_scalar::<f32>().unwrap();
    for _ in 0..30 {
        let mut acc = opt.accumulator();
        opt.accumulate(&mut acc, &loss().backward().unwrap())
            .unwrap();
        opt.step(acc, 1e-2, None).unwrap();
    }
    let last = loss().to_scalar::<f32>().unwrap();
    assert!(first.is_finite() && last < 0.5 * first, "{first} → {last}");
}

/// The hidden-state section after the shared small config (LoRA, a learning rate that
/// moves the adapters in one step), with the student's own model as teacher.
fn hidden_config(dir: &Path, section: &str) {
    let extra = format!("lora = {{ rank = 4, alpha = 8 }}\n{section}");
    config_replacing(
        dir,
        &extra,
        &[
            ("learning_rate = 1e-4\n", "learning_rate = 1e-3\n"),
            ("batch_size = 2\n", "batch_size = 4\n"),
        ],
    );
}

fn section(teacher: &Path, body: &str) -> String {
    format!(
        "[finetune.hidden_kd]\nmodel = \"{}\"\n{body}",
        teacher.display()
    )
}

#[test]
fn feature_and_relation_kd_train_log_and_resume_exactly() {
    let body = "feature_weight = 1.0\nrelation_weight = 1.0\nlayers = [[15, 15], [30, 30]]\n";
    let hidden = section(&smollm2(), body);
    let clean = tempfile::tempdir().unwrap();
    curated(clean.path(), 10);
    hidden_config(clean.path(), &hidden);
    let out = kdpipe(&["finetune", "--config", "c.toml"], clean.path());
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("hidden-state teacher"), "{err}");
    let m = metrics(clean.path());
    assert_eq!(m.len(), 6);
    let series = |key: &str| -> Vec<f64> { m.iter().map(|s| s[key].as_f64().unwrap()).collect() };
    let (feature, relation) = (series("feature_loss"), series("relation_loss"));
    assert!(
        feature
            .iter()
            .chain(&relation)
            .all(|v| v.is_finite() && *v >= 0.0),
        "{feature:?} {relation:?}"
    );
    // The maps start random: the feature term falls as they learn.
    assert!(feature[5] < feature[0], "{feature:?}");
    assert!(series("hidden_teacher_seconds").iter().all(|s| *s > 0.0));

    // Without the section the run takes another path: the terms are in the loss.
    let plain = tempfile::tempdir().unwrap();
    curated(plain.path(), 10);
    hidden_config(plain.path(), "");
    let out = kdpipe(&["finetune", "--config", "c.toml"], plain.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(losses(plain.path()), losses(clean.path()));

    // Killed after its step-2 checkpoint (which holds the maps), the run resumes to the
    // same curve.
    let dir = tempfile::tempdir().unwrap();
    curated(dir.path(), 10);
    hidden_config(dir.path(), &hidden);
    kill_after_checkpoint(dir.path(), 2, Duration::from_secs(600));
    assert!(dir
        .path()
        .join("runs/t/finetune/checkpoint-000002/hidden-kd-projections.safetensors")
        .is_file());
    let out = kdpipe(&["finetune", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resuming from"), "{}", stderr(&out));
    assert_same_curve(&losses(dir.path()), &losses(clean.path()));
}

#[test]
fn another_tokenizer_layers_outside_the_models_and_an_empty_section_are_refused() {
    // Qwen's tokenizer is not SmolLM2's: refused before any step, naming the row.
    let dir = tempfile::tempdir().unwrap();
    curated(dir.path(), 4);
    hidden_config(dir.path(), &section(&qwen(), ""));
    let out = kdpipe(&["finetune", "--config", "c.toml"], dir.path());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("tokenizes row")
            && err.contains("one tokenizer")
            && err.contains("feature_weight = 0.0"),
        "{err}"
    );
    assert!(!dir.path().join("runs/t/finetune/metrics.jsonl").exists());

    // SmolLM2 has 30 layers.
    let dir = tempfile::tempdir().unwrap();
    curated(dir.path(), 4);
    hidden_config(dir.path(), &section(&smollm2(), "layers = [[31, 10]]\n"));
    let out = kdpipe(&["finetune", "--config", "c.toml"], dir.path());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the student has 30 layers"),
        "{}",
        stderr(&out)
    );

    // A section asking for nothing is a config error (exit 2).
    let dir = tempfile::tempdir().unwrap();
    curated(dir.path(), 4);
    hidden_config(dir.path(), &section(&smollm2(), "feature_weight = 0.0\n"));
    let out = kdpipe(&["finetune", "--config", "c.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("asks for nothing"),
        "{}",
        stderr(&out)
    );
}

/// The pair at a small scale: a Qwen2.5-Coder-0.5B teacher on its quantized
/// weights and the same model as a LoRA student, two steps with both terms at the default
/// layer map.
#[test]
fn a_qwen_teacher_passes_features_and_relations_to_a_qwen_student() {
    let dir = tempfile::tempdir().unwrap();
    curated(dir.path(), 4);
    let smol = smollm2().display().to_string();
    let qwen_path = qwen().display().to_string();
    let extra = format!(
        "lora = {{ rank = 4, alpha = 8 }}\n{}",
        section(&qwen(), "relation_weight = 1.0\n")
    );
    config_replacing(
        dir.path(),
        &extra,
        &[
            ("batch_size = 2\n", "batch_size = 4\n"),
            ("max_steps = 6\n", "max_steps = 2\n"),
            (&smol, &qwen_path),
        ],
    );
    let out = kdpipe(&["finetune", "--config", "c.toml"], dir.path());
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("(24 layers, width 896)")
            && err.contains("[(6, 6), (12, 12), (18, 18), (24, 24)]"),
        "{err}"
    );
    let m = metrics(dir.path());
    assert_eq!(m.len(), 2);
    for s in &m {
        for key in ["feature_loss", "relation_loss", "label_loss"] {
            let v = s[key].as_f64().unwrap();
            assert!(v.is_finite() && v >= 0.0, "{key}: {s}");
        }
    }
}

/// Relation KD across tokenizers: a Qwen2.5-Coder-0.5B teacher reads the SmolLM2
/// student's examples as text in its own tokens; the relation term is logged at every
/// step, and it differs from a run whose teacher is the student itself (so the Qwen
/// teacher's states are what it compares with).
#[test]
fn relations_pass_from_a_qwen_teacher_to_a_smollm2_student() {
    let body = "feature_weight = 0.0\nrelation_weight = 1.0\nrelation = \"distance\"\n";
    let run = |teacher: &Path| -> Vec<f64> {
        let dir = tempfile::tempdir().unwrap();
        curated(dir.path(), 8);
        config_replacing(
            dir.path(),
            &format!(
                "lora = {{ rank = 4, alpha = 8 }}\n{}",
                section(teacher, body)
            ),
            &[
                ("batch_size = 2\n", "batch_size = 4\n"),
                ("max_steps = 6\n", "max_steps = 3\n"),
            ],
        );
        let out = kdpipe(&["finetune", "--config", "c.toml"], dir.path());
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        assert_eq!(
            err.contains("reads each example as text in its own tokens"),
            teacher == qwen(),
            "{err}"
        );
        let m = metrics(dir.path());
        assert_eq!(m.len(), 3);
        m.iter()
            .map(|s| {
                assert!(s.get("feature_loss").is_none_or(|v| v.is_null()), "{s}");
                s["relation_loss"].as_f64().unwrap()
            })
            .collect()
    };
    let from_qwen = run(&qwen());
    let from_itself = run(&smollm2());
    assert!(
        from_qwen.iter().all(|v| v.is_finite() && *v >= 0.0),
        "{from_qwen:?}"
    );
    assert_ne!(from_qwen, from_itself);
}
