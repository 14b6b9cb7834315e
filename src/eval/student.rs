//! The student's answers: greedy decoding in the label view (the answer alone) or the
//! rationale view (reasoning, then `Answer: X`), or (label tasks) the label whose tokens,
//! followed by end-of-sequence, the student finds most likely after the label-view prompt.

use super::{Answers, Prediction};
use crate::config::{StudentDecode, StudentView};
use crate::curate::arith;
use crate::finetune::data::prompt_ids;
use crate::progress::Progress;
use crate::prompts::{Prompt, LABEL_VIEW, RATIONALE_VIEW};
use crate::student::{Decoder, KvCache, LoadedModel};
use crate::task::{format_number, Task};
use anyhow::Result;
use candle_core::{Device, D};
use std::time::Instant;

/// How the student answers.
#[derive(Debug, Clone, Copy)]
pub struct Decoding {
    pub decode: StudentDecode,
    /// Label or rationale ("auto" already resolved).
    pub view: StudentView,
    pub max_new: usize,
    /// Numeric rationales: write the value of each equation the student leaves open.
    pub calculator: bool,
}

pub fn answer(
    name: &str,
    loaded: &LoadedModel,
    prompt: &Prompt,
    task: &Task,
    inputs: &[&str],
    how: Decoding,
) -> Result<Answers> {
    let Decoding {
        decode,
        view,
        max_new,
        calculator,
    } = how;
    let tag = if view == StudentView::Rationale {
        RATIONALE_VIEW
    } else {
        LABEL_VIEW
    };
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
        let ids = prompt_ids(loaded, prompt, tag, input)?;
        let (text, answer) = match decode {
            StudentDecode::Greedy => {
                let gen = if calculator {
                    greedy_with_calculator(&model, loaded, &ids, max_new)?
                } else {
                    model.greedy(&ids, max_new, &[loaded.eos_token_id])?
                };
                progress.inc(gen.len() as u64);
                let text = loaded.decode(&gen)?;
                let answer = if view == StudentView::Rationale {
                    parse_reasoned(task, &text, gen.len() >= max_new)
                } else {
                    task.parse_answer_only(&text).answer
                };
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

/// The answer of a rationale-view reply: what follows its last `Answer:`. A student that
/// answers with a bare answer instead (one short line, the label view's form) is read as
/// the label view is; anything else without the marker has no answer.
fn parse_reasoned(task: &Task, text: &str, truncated: bool) -> Option<String> {
    let parsed = task.parse_rationale_output(text, truncated);
    let bare = text.trim();
    if parsed.answer_offset.is_none() && !bare.contains('\n') && bare.chars().count() <= 24 {
        return task.parse_answer_only(bare).answer;
    }
    parsed.answer
}

/// Greedy decoding in which kdpipe, not the model, writes the result of each equation
/// the model leaves open (`3 * 4 =` → ` 12`), as the calculator of Cobbe et al. (2021,
/// "Training Verifiers to Solve Math Word Problems") does: a small student picks the
/// right operation far more often than it gets the digits right.
fn greedy_with_calculator(
    model: &Decoder,
    loaded: &LoadedModel,
    prompt: &[u32],
    max_new: usize,
) -> Result<Vec<u32>> {
    model.greedy_with(prompt, max_new, &[loaded.eos_token_id], |out| {
        // Decoding only the last tokens keeps this cheap; an equation is short.
        let tail = loaded.decode(&out[out.len().saturating_sub(24)..])?;
        match arith::open_equation_value(&tail) {
            Some(value) if tail.trim_end().ends_with('=') => {
                loaded.encode(&format!(" {}", format_number(value)))
            }
            _ => Ok(vec![]),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TaskKind;

    #[test]
    fn a_rationale_reply_is_read_after_its_marker_or_as_a_bare_answer() {
        let task = Task {
            kind: TaskKind::Numeric,
            labels: vec![],
            tolerance: 1e-6,
        };
        let read = |t: &str| parse_reasoned(&task, t, false);
        assert_eq!(read("He has 3 + 4 = 7.\nAnswer: 7").as_deref(), Some("7"));
        assert_eq!(read("184").as_deref(), Some("184"), "bare answer");
        assert_eq!(read(" 12 apples ").as_deref(), Some("12"));
        assert_eq!(read("He has 3 + 4 = 7 apples and then some more."), None);
        assert_eq!(read("3 + 4 = 7\n7"), None, "two lines, no marker");
        assert_eq!(read("Answer: none"), None);
    }
}
