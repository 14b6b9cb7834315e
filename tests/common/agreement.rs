//! The quantized decoder's logits and llama.cpp's greedy replies side by side (tests of the
//! engine and of exported GGUFs).

use super::{root, server};
use kdpipe::llama::infer::{SeqCache, StepInput};
use kdpipe::llama::Decoder;

/// Next-token logits after every position of `ids`, from one step over a fresh cache.
pub fn logits_per_position(model: &Decoder, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = SeqCache::new(model, ids.len());
    let mut step = [StepInput {
        cache: &mut cache,
        tokens: ids,
        all_logits: true,
    }];
    let flat = model.forward_step(&mut step).unwrap().swap_remove(0);
    flat.chunks(model.shape.vocab_size)
        .map(|c| c.to_vec())
        .collect()
}

pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// llama.cpp's greedy replies (llama-cpp-python, f32 KV cache: see the script) to `prompts`
/// on the GGUF at `path`, at most 64 tokens each.
pub fn llama_cpp_replies(
    path: &std::path::Path,
    prompts: &[Vec<u32>],
    stop: &[u32],
) -> Vec<Vec<u32>> {
    let request = serde_json::json!({"prompts": prompts, "max_new": 64, "stop": stop});
    serde_json::from_value(llama_cpp_script("llama_greedy.py", path, &request)).unwrap()
}

/// Run `scripts/<script>` (a llama-cpp-python script) on the GGUF at `path` with `request`
/// on its stdin; its JSON answer.
pub fn llama_cpp_script(
    script: &str,
    path: &std::path::Path,
    request: &serde_json::Value,
) -> serde_json::Value {
    let mut child = std::process::Command::new(server::python())
        .arg(root().join("scripts").join(script))
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    serde_json::to_writer(child.stdin.take().unwrap(), request).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{script} failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Teacher forcing on `replies`: how many positions there are, at how many the model's
/// argmax after the prompt and the reply so far is the reply's next token, and, where it
/// is not, the largest gap between the model's top logit and its logit for that token.
pub fn agreement(
    model: &Decoder,
    prompts: &[Vec<u32>],
    replies: &[Vec<u32>],
) -> (usize, usize, f32) {
    let (mut same, mut total, mut worst_gap) = (0, 0, 0f32);
    for (prompt, reply) in prompts.iter().zip(replies) {
        let ids: Vec<u32> = prompt.iter().chain(reply).copied().collect();
        let logits = logits_per_position(model, &ids);
        for (i, &next) in reply.iter().enumerate() {
            let l = &logits[prompt.len() - 1 + i];
            let ours = argmax(l);
            same += usize::from(ours == next as usize);
            worst_gap = worst_gap.max(l[ours] - l[next as usize]);
            total += 1;
        }
    }
    (same, total, worst_gap)
}
