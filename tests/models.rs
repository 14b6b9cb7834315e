//! The decoder and kdpipe's engine on the real GGUFs from scripts/fetch-models.sh: every
//! weight trains, AdamW and LoRA lower the loss and merge exactly, the engine's replies do
//! not depend on their batch, its label probabilities equal a fresh forward pass of its
//! own (quantized) decoder and stay within 0.02 of the f32 model's, and its logits are
//! bit-identical alone and in any batch. (mistralrs_engine.rs checks the
//! tokenizer and the decoder against the mistralrs engine.)

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use kdpipe::chat::ChatMessage;
use kdpipe::llama as student;

fn chat() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You are a careful assistant."),
        ChatMessage::new(
            "user",
            "Tom has 5 apples and buys 12 more: 5 + 12 = 17? Café, naïve, 😀, tabs\tand  spaces.",
        ),
    ]
}

#[test]
fn every_weight_of_the_real_student_gets_a_gradient() {
    let loaded = student::load(smollm2().to_str().unwrap(), &Device::Cpu).unwrap();
    let model = loaded.decoder(&Device::Cpu, |_| true).unwrap();
    let ids = loaded
        .encode("The quick brown fox jumps over the lazy dog.")
        .unwrap();
    let n = ids.len();
    let input = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, n), DType::F32, &Device::Cpu).unwrap();
    let logits = model.forward(&input, &mask).unwrap();
    let nll = kdpipe::finetune::loss::token_nll(&logits, &input).unwrap();
    let grads = nll.mean_all().unwrap().backward().unwrap();
    assert_eq!(model.vars.len(), loaded.weights.len());
    for (name, var) in &model.vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "gradient of {name} is {norm}"
        );
    }
}

#[test]
fn adamw_steps_lower_the_step_by_step_loss_of_the_real_student() {
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    use kdpipe::finetune::data::{Example, ExampleKind};
    use kdpipe::finetune::loss::{make_batch, step_by_step_loss, token_nll};
    let loaded = student::load(smollm2().to_str().unwrap(), &Device::Cpu).unwrap();
    let model = loaded
        .decoder(&Device::Cpu, |n| n != "model.embed_tokens.weight")
        .unwrap();
    let example = |kind, prompt: &str, reply: &str| {
        let (p, r) = (
            loaded.encode(prompt).unwrap(),
            loaded.encode(reply).unwrap(),
        );
        let target = [vec![0u8; p.len()], vec![1u8; r.len()]].concat();
        Example {
            kind,
            ids: [p, r].concat(),
            target,
            kd: None,
            truncated: false,
            token_topk: vec![],
            token_uld: vec![],
            row: 0,
        }
    };
    let batch = make_batch(
        &[
            example(
                ExampleKind::Label,
                "[label] I lost my keys and missed the bus.",
                " sadness",
            ),
            example(
                ExampleKind::Rationale,
                "[rationale] I lost my keys and missed the bus.",
                " The writer had a bad morning and feels down.",
            ),
        ],
        loaded.eos_token_id,
        &Device::Cpu,
    )
    .unwrap();
    let loss = || {
        let logits = model.forward(&batch.ids, &batch.attention).unwrap();
        step_by_step_loss(&token_nll(&logits, &batch.ids).unwrap(), &batch, 0.5).unwrap()
    };
    let before = loss().total.to_scalar::<f32>().unwrap();
    let mut opt = AdamW::new(
        model.vars.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW {
            lr: 1e-4,
            ..Default::default()
        },
    )
    .unwrap();
    for _ in 0..3 {
        opt.backward_step(&loss().total).unwrap();
    }
    let after = loss().total.to_scalar::<f32>().unwrap();
    eprintln!("loss on the batch: {before:.3} → {after:.3}");
    assert!(after < before * 0.8, "loss {before} → {after}");
}

#[test]
fn lora_trains_only_its_adapters_and_merges_exactly() {
    use kdpipe::config::LoraConfig;
    use kdpipe::finetune::optim::AdamW;
    let dev = Device::Cpu;
    let loaded = student::load(smollm2().to_str().unwrap(), &dev).unwrap();
    let mut model = loaded.decoder(&dev, |_| false).unwrap();
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        dropout: 0.0,
    };
    model.add_lora(&cfg, 1).unwrap();
    // Three targets in each of SmolLM2's 30 layers, an A and a B each.
    assert_eq!(model.vars.len(), 30 * 3 * 2);
    let ids = loaded
        .encode("The quick brown fox jumps over the lazy dog.")
        .unwrap();
    let n = ids.len();
    let input = Tensor::from_vec(ids, (1, n), &dev).unwrap();
    let mask = Tensor::ones((1, n), DType::F32, &dev).unwrap();
    let loss = |m: &student::Decoder| {
        let logits = m.forward(&input, &mask).unwrap();
        kdpipe::finetune::loss::token_nll(&logits, &input)
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let norm = |g: &Tensor| {
        g.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let before = loss(&model);
    let grads = before.backward().unwrap();
    // B starts at zero: A's gradient is zero until B moves; B's is not.
    for (name, var) in &model.vars {
        let g = norm(grads.get(var.as_tensor()).unwrap());
        if name.ends_with("lora_B.weight") {
            assert!(g > 0.0, "{name}");
        }
    }
    // The frozen base weights get no gradient at all.
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
    ] {
        let w = &loaded.weights[name];
        assert!(grads.get(w).is_none(), "{name} got a gradient");
    }
    let mut opt = AdamW::new(model.vars.clone(), 0.0).unwrap();
    let mut acc = opt.accumulator();
    opt.accumulate(&mut acc, &grads).unwrap();
    opt.step(acc, 1e-3, None).unwrap();
    let grads = loss(&model).backward().unwrap();
    for (name, var) in &model.vars {
        let g = norm(grads.get(var.as_tensor()).unwrap());
        assert!(
            g > 0.0 && g.is_finite(),
            "after one step, {name} has gradient {g}"
        );
    }
    // Merged weights in a plain decoder give the adapter model's logits.
    let merged = student::Decoder::new(model.shape.clone(), model.weights().unwrap(), &dev, |_| {
        false
    })
    .unwrap();
    let a = model.forward(&input, &mask).unwrap();
    let b = merged.forward(&input, &mask).unwrap();
    let diff = max_diff(&a, &b);
    assert!(diff < 1e-3, "merged logits differ by {diff}");
}

/// Replies of the batched teacher for `chats`, in job order.
fn batched_replies(
    teacher: &kdpipe::teacher::engine::EngineTeacher,
    chats: &[Vec<ChatMessage>],
    settings: &kdpipe::teacher::Settings,
    locate: kdpipe::teacher::AnswerLocator,
) -> Vec<kdpipe::teacher::Reply> {
    use kdpipe::teacher::{Job, Teacher};
    let jobs = chats
        .iter()
        .enumerate()
        .map(|(i, messages)| Job {
            id: i.to_string(),
            sample: 0,
            messages: messages.clone(),
            seed: None,
        })
        .collect();
    let mut replies = vec![None; chats.len()];
    teacher
        .answer_all(jobs, settings, locate, &mut |job, r| {
            replies[job.id.parse::<usize>().unwrap()] = Some(r.unwrap());
            Ok(())
        })
        .unwrap();
    replies.into_iter().map(Option::unwrap).collect()
}

#[test]
fn engine_replies_do_not_depend_on_the_batch() {
    use kdpipe::teacher::engine::EngineTeacher;
    use kdpipe::teacher::Settings;
    let path = smollm2();
    let questions = [
        "What is the capital of France? Answer in one sentence.",
        "Name three colors.",
        "What is 12 plus 30?",
        "Write a haiku about rain.",
        "Who wrote Hamlet?",
    ];
    let chats: Vec<Vec<ChatMessage>> = questions
        .iter()
        .map(|q| vec![ChatMessage::new("user", *q)])
        .collect();
    let settings = Settings {
        max_tokens: 24,
        temperature: 0.0,
        token_topk: 0,
        labels: vec![],
    };
    let one = EngineTeacher::open(path.to_str().unwrap(), 1).unwrap();
    let four = EngineTeacher::open(path.to_str().unwrap(), 4).unwrap();
    let alone = batched_replies(&one, &chats, &settings, &|_| None);
    let together = batched_replies(&four, &chats, &settings, &|_| None);
    for (a, b) in alone.iter().zip(&together) {
        assert_eq!(a.text, b.text, "a reply changed with its batch");
        assert_eq!(a.completion_tokens, b.completion_tokens);
        assert!(a.finish_reason == "stop" || a.finish_reason == "length");
    }
}

#[test]
fn engine_label_probs_equal_a_fresh_forward_pass() {
    use kdpipe::teacher::engine::EngineTeacher;
    use kdpipe::teacher::Settings;
    let path = smollm2();
    let teacher = EngineTeacher::open(path.to_str().unwrap(), 2).unwrap();
    let labels: Vec<String> = ["joy", "anger", "optimism", "sadness"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let chats = vec![
        chat(),
        vec![ChatMessage::new("user", "I lost my keys again.")],
    ];
    let settings = Settings {
        max_tokens: 20,
        temperature: 0.0,
        token_topk: 3,
        labels: labels.clone(),
    };
    // Score the labels halfway through each reply.
    let locate = |text: &str| {
        text.char_indices()
            .nth(text.chars().count() / 2)
            .map(|(i, _)| i)
    };
    // And right at the start of the reply (labels scored just after the prompt).
    let at_start = |_: &str| Some(0);
    let mut replies = batched_replies(&teacher, &chats, &settings, &locate);
    replies.extend(batched_replies(&teacher, &chats, &settings, &at_start));
    let loaded = student::load(path.to_str().unwrap(), &Device::Cpu).unwrap();
    let model = loaded.decoder(&Device::Cpu, |_| false).unwrap();
    // The engine's own decoder (weights in their GGUF block formats), run fresh.
    let served = student::load_for_inference(path.to_str().unwrap())
        .unwrap()
        .take_inference_decoder()
        .unwrap();
    let vocab = served.shape.vocab_size;
    let halfway = chats.len();
    for (i, (messages, reply)) in chats.iter().cycle().zip(&replies).enumerate() {
        let probs = reply.label_probs.as_ref().expect("label probs");
        let total: f64 = probs.iter().sum();
        assert!(total > 0.0 && total <= 1.0 + 1e-6, "{probs:?}");
        assert_eq!(reply.tokens.len(), reply.completion_tokens as usize);
        let offset = if i < halfway {
            locate(&reply.text).unwrap()
        } else {
            0
        };
        let mut context = loaded.chat_ids(messages).unwrap();
        context.extend(loaded.encode(&reply.text[..offset]).unwrap());
        for (label, p) in labels.iter().zip(probs) {
            let ids = loaded.encode(&format!(" {label}")).unwrap();
            let mut all = context.clone();
            all.extend(&ids);
            let n = all.len();
            let logits = model
                .forward(
                    &Tensor::from_vec(all.clone(), (1, n), &Device::Cpu).unwrap(),
                    &Tensor::ones((1, n), DType::F32, &Device::Cpu).unwrap(),
                )
                .unwrap()
                .squeeze(0)
                .unwrap();
            let lp = candle_nn::ops::log_softmax(&logits, 1)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let f32_forward: f64 = ids
                .iter()
                .enumerate()
                .map(|(j, &id)| lp[context.len() - 1 + j][id as usize] as f64)
                .sum::<f64>()
                .exp();
            let mut cache = kdpipe::llama::infer::SeqCache::new(&served, n);
            let rows = served
                .forward_step(&mut [kdpipe::llama::infer::StepInput {
                    cache: &mut cache,
                    tokens: &all,
                    all_logits: true,
                }])
                .unwrap()
                .swap_remove(0);
            let want: f64 = ids
                .iter()
                .enumerate()
                .map(|(j, &id)| {
                    let at = context.len() - 1 + j;
                    kdpipe::llama::infer::log_softmax(&rows[at * vocab..(at + 1) * vocab])
                        [id as usize] as f64
                })
                .sum::<f64>()
                .exp();
            assert!(
                (p - want).abs() <= 1e-3 * want.max(1e-6) + 1e-7,
                "{label}: batched {p} vs fresh {want}"
            );
            // The quantized activations move a probability by little (issue: ≤ 0.02).
            assert!(
                (p - f32_forward).abs() <= 0.02,
                "{label}: quantized engine {p} vs f32 forward {f32_forward}"
            );
        }
    }
}

#[test]
fn served_logits_are_bit_identical_alone_and_in_any_batch() {
    let loaded = student::load(smollm2().to_str().unwrap(), &Device::Cpu).unwrap();
    let model = loaded
        .decoder(&Device::Cpu, |_| false)
        .unwrap()
        .into_inference()
        .unwrap();
    assert_logits_independent_of_the_batch(&model, &[1, 3, 20]);
}
