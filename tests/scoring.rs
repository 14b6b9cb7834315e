//! Teacher scoring of sequences it did not write (`teacher::scoring`): on the real
//! Qwen2.5-Coder-0.5B GGUF through the quantized inference engine, the scores of a
//! continuation equal a fresh forward of the whole sequence, whatever the step size and
//! whichever other samples share the prompt; through a real OpenAI-compatible server
//! (llama-cpp-python serving SmolLM2), the API's scores agree with the local engine's on
//! the same GGUF, and a server that returns no prompt log-probabilities is named as such.

mod common;
use common::server::{self, MODEL_NAME};
use common::*;
use kdpipe::chat::ChatMessage;
use kdpipe::config::TeacherConfig;
use kdpipe::llama::infer::{log_softmax, PromptCache, SeqCache, StepInput};
use kdpipe::teacher::openai::ApiTeacher;
use kdpipe::teacher::scoring::{score_local, score_local_from, ScoreRequest, TokenTexts};

/// The token ids of a chat of one user turn, ready for the assistant's reply.
fn user_turn(loaded: &kdpipe::llama::LoadedModel, question: &str) -> Vec<u32> {
    let text = loaded
        .chat
        .render(&[ChatMessage::new("user", question)], true)
        .unwrap();
    loaded.encode(&text).unwrap()
}

#[test]
fn scores_equal_a_fresh_forward_of_the_whole_sequence() {
    let mut loaded = kdpipe::llama::load_for_inference(qwen().to_str().unwrap()).unwrap();
    let chat = |q: &str| user_turn(&loaded, q);
    let (first, second) = (
        chat("What is 17 + 25?"),
        chat("Name a prime number above 10."),
    );
    let sample = |t: &str| loaded.encode(t).unwrap();
    // Three samples of the first prompt (one a single token), two of the second.
    let continuations = [
        (
            first.clone(),
            sample("17 + 25 = 42. The answer is 42.<|im_end|>"),
        ),
        (first.clone(), sample("It is 43, I think.")),
        (first.clone(), sample("42")),
        (
            second.clone(),
            sample("11 is a prime number above 10.<|im_end|>"),
        ),
        (second.clone(), sample("Thirteen.")),
    ];
    let decoder = loaded.take_inference_decoder().unwrap();
    let requests: Vec<ScoreRequest> = continuations
        .iter()
        .map(|(p, c)| ScoreRequest {
            prompt: p,
            continuation: c,
        })
        .collect();
    let k = 5;
    // 7 rows a step: continuations split across steps and share steps.
    let small_steps = score_local(&decoder, &requests, k, 7).unwrap();
    let one_step = score_local(&decoder, &requests, k, 256).unwrap();
    assert_eq!(small_steps, one_step, "the step size changed a score");
    // A prompt kept from an earlier call (a training run scores under one few-shot prompt
    // step after step) changes no score.
    let mut kept = PromptCache::default();
    score_local_from(&decoder, &requests[..2], k, 256, &mut kept).unwrap();
    let after_kept = score_local_from(&decoder, &requests, k, 256, &mut kept).unwrap();
    assert_eq!(after_kept, one_step, "the kept prompt changed a score");

    let vocab = decoder.shape.vocab_size;
    for (r, scores) in requests.iter().zip(&small_steps) {
        assert_eq!(scores.len(), r.continuation.len());
        let whole: Vec<u32> = [r.prompt, r.continuation].concat();
        let mut cache = SeqCache::new(&decoder, whole.len());
        let logits = decoder
            .forward_step(&mut [StepInput {
                cache: &mut cache,
                tokens: &whole,
                all_logits: true,
            }])
            .unwrap()
            .remove(0);
        for (j, s) in scores.iter().enumerate() {
            let at = r.prompt.len() - 1 + j;
            let row = log_softmax(&logits[at * vocab..(at + 1) * vocab]);
            assert_eq!(s.logprob, row[r.continuation[j] as usize], "position {j}");
            assert_eq!(s.top.len(), k);
            let mut best: Vec<(u32, f32)> = row
                .iter()
                .enumerate()
                .map(|(id, &lp)| (id as u32, lp))
                .collect();
            best.sort_by(|a, b| b.1.total_cmp(&a.1));
            assert_eq!(s.top, best[..k], "position {j}");
            assert!(s.logprob <= s.top[0].1);
        }
    }
    // k at least the vocabulary: the whole distribution, which sums to 1.
    let full = score_local(&decoder, &requests[2..3], usize::MAX, 256).unwrap();
    let mass: f64 = full[0][0]
        .top
        .iter()
        .map(|(_, lp)| (*lp as f64).exp())
        .sum();
    assert_eq!(full[0][0].top.len(), vocab);
    assert!((mass - 1.0).abs() < 1e-4, "{mass}");

    // Ids past the vocabulary (another tokenizer's) are refused with the reason.
    let foreign = [vocab as u32 + 5];
    let err = score_local(
        &decoder,
        &[ScoreRequest {
            prompt: &first,
            continuation: &foreign,
        }],
        k,
        256,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("vocabulary") && err.contains("tokenizer"),
        "{err}"
    );
}

#[test]
fn the_api_scores_as_the_local_engine_and_a_server_without_prompt_logprobs_is_named() {
    let mut loaded = kdpipe::llama::load_for_inference(smollm2().to_str().unwrap()).unwrap();
    let chat = |q: &str| user_turn(&loaded, q);
    let prompts = [
        chat("What is 17 + 25?"),
        chat("Name the capital of France."),
    ];
    let sample = |t: &str| loaded.encode(t).unwrap();
    let sequences = [
        (0, sample("17 + 25 = 42. The answer is 42.<|im_end|>")),
        (0, sample("It is 43, I think.")),
        (1, sample("The capital of France is Paris.<|im_end|>")),
    ];
    let requests: Vec<ScoreRequest> = sequences
        .iter()
        .map(|(p, c)| ScoreRequest {
            prompt: &prompts[*p],
            continuation: c,
        })
        .collect();
    let texts = TokenTexts::new(&loaded.tokenizer).unwrap();
    let teacher_at = |url: &str| {
        let cfg: TeacherConfig = toml::from_str(&format!(
            "kind = \"openai\"\nmodel = \"{MODEL_NAME}\"\nbase_url = \"{url}\"\nmax_retries = 1\nretry_base_s = 0.1"
        ))
        .unwrap();
        ApiTeacher::open(&cfg).unwrap()
    };
    let k = 5;
    let served = server::start(None);
    let api = teacher_at(&served.base_url())
        .score(&requests, k, &loaded.tokenizer, &texts)
        .unwrap();
    drop(served);
    let decoder = loaded.take_inference_decoder().unwrap();
    let local = score_local(&decoder, &requests, k, 256).unwrap();

    // llama.cpp and kdpipe compute the same model with different kernels: close, not
    // equal (measured: mean |Δ| 0.058 nats, max 0.24, 33 of 36 top ids the same). A
    // continuation read one position off would differ by nats.
    let (mut diffs, mut same_best, mut positions) = (Vec::new(), 0, 0);
    for (r, (api, local)) in requests.iter().zip(api.iter().zip(&local)) {
        assert_eq!(api.len(), r.continuation.len());
        for (a, l) in api.iter().zip(local) {
            diffs.push((a.logprob - l.logprob).abs());
            assert!(!a.top.is_empty() && a.top.len() <= k);
            assert!(a.top.windows(2).all(|w| w[0].1 >= w[1].1));
            same_best += usize::from(a.top[0].0 == l.top[0].0);
            positions += 1;
        }
    }
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    let max = diffs.iter().cloned().fold(0f32, f32::max);
    eprintln!(
        "API vs local: {positions} positions, mean |Δ logprob| {mean:.4}, max {max:.4}, same top id {same_best}"
    );
    assert!(mean < 0.15 && max < 1.0, "mean {mean}, max {max}");
    assert!(
        same_best * 100 >= positions * 85,
        "{same_best} of {positions}"
    );

    // A server that keeps no logits for the prompt cannot score: the error says so.
    let bare = server::start_with(None, "--logits_all false");
    let err = teacher_at(&bare.base_url())
        .score(&requests, k, &loaded.tokenizer, &texts)
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("no log-probabilities for prompt tokens") && err.contains("hint:"),
        "{err}"
    );
}
