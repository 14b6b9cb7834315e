//! Teacher scoring of sequences it did not write (`teacher::scoring`), on the real
//! Qwen2.5-Coder-0.5B GGUF through the quantized inference engine: the scores of a
//! continuation equal a fresh forward of the whole sequence, whatever the step size and
//! whichever other samples share the prompt.

mod common;
use common::*;
use kdpipe::chat::ChatMessage;
use kdpipe::llama::infer::{log_softmax, SeqCache, StepInput};
use kdpipe::teacher::scoring::{score_local, ScoreRequest};

#[test]
fn scores_equal_a_fresh_forward_of_the_whole_sequence() {
    let mut loaded = kdpipe::llama::load_for_inference(qwen().to_str().unwrap()).unwrap();
    let chat = |q: &str| {
        let text = loaded
            .chat
            .render(&[ChatMessage::new("user", q)], true)
            .unwrap();
        loaded.encode(&text).unwrap()
    };
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
