//! The student's answers in the label view: greedy decoding, or (label tasks) the label
//! whose tokens, followed by end-of-sequence, the student finds most likely.

use super::{Answers, Prediction};
use crate::config::StudentDecode;
use crate::finetune::data::prompt_ids;
use crate::progress::Progress;
use crate::prompts::{Prompt, LABEL_VIEW};
use crate::student::{Decoder, KvCache, LoadedModel};
use crate::task::Task;
use anyhow::Result;
use candle_core::{Device, D};
use std::time::Instant;

pub fn answer(
    name: &str,
    loaded: &LoadedModel,
    prompt: &Prompt,
    task: &Task,
    inputs: &[&str],
    decode: StudentDecode,
    max_new: usize,
) -> Result<Answers> {
    let model = loaded.decoder(&Device::Cpu, |_| false)?;
    // Each label as the training label view writes it: its tokens, then end-of-sequence.
    let label_ids: Vec<Vec<u32>> = task
        .labels
        .iter()
        .map(|l| {
            let mut ids = loaded.encode(l)?;
            ids.push(loaded.eos_token_id);
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    let mut progress = Progress::new(name, inputs.len() as u64);
    let mut predictions = Vec::with_capacity(inputs.len());
    for input in inputs {
        let started = Instant::now();
        let ids = prompt_ids(loaded, prompt, LABEL_VIEW, input)?;
        let (text, answer) = match decode {
            StudentDecode::Greedy => {
                let gen = model.greedy(&ids, max_new, &[loaded.eos_token_id])?;
                progress.inc(gen.len() as u64);
                let text = loaded.decode(&gen)?;
                let answer = task.parse_answer_only(&text).answer;
                (text, answer)
            }
            StudentDecode::LabelScores => {
                let best = best_label(&model, &ids, &label_ids)?;
                progress.inc(1);
                let label = task.labels[best].clone();
                (label.clone(), Some(label))
            }
        };
        predictions.push(Prediction {
            text,
            answer,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let wall_seconds = progress.finish();
    Ok(Answers {
        predictions,
        wall_seconds,
    })
}

/// Index of the continuation with the highest log-probability after `prompt`. The prompt
/// is run once; each continuation reuses its keys and values.
fn best_label(model: &Decoder, prompt: &[u32], continuations: &[Vec<u32>]) -> Result<usize> {
    let mut cache = KvCache::default();
    let logits = model.forward_cached(prompt, &mut cache)?;
    let first =
        candle_nn::ops::log_softmax(&logits.get(prompt.len() - 1)?, D::Minus1)?.to_vec1::<f32>()?;
    let mut best = (0, f64::NEG_INFINITY);
    for (i, seq) in continuations.iter().enumerate() {
        let mut logprob = first[seq[0] as usize] as f64;
        if seq.len() > 1 {
            let rest = model.forward_cached(&seq[..seq.len() - 1], &mut cache.clone())?;
            let rest = candle_nn::ops::log_softmax(&rest, D::Minus1)?.to_vec2::<f32>()?;
            for (row, next) in rest.iter().zip(&seq[1..]) {
                logprob += row[*next as usize] as f64;
            }
        }
        if logprob > best.1 {
            best = (i, logprob);
        }
    }
    Ok(best.0)
}
