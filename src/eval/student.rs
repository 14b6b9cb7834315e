//! A local model's answers to chats: the student's in the label view (the answer alone) or
//! the rationale view (reasoning, then `Answer: X`), or a local teacher's to its few-shot
//! chats (eval's "teacher, calculator" row); greedy decoding many rows at a time through
//! the same batched inference path as the teacher engine, or (label tasks) the label whose
//! tokens, followed by end-of-sequence, the model finds most likely after the prompt.

use super::{Answers, Prediction};
use crate::chat::ChatMessage;
use crate::config::StudentDecode;
use crate::llama::generate::{Finish, Generator, Hooks, Request, Sampling, Sequence};
use crate::llama::infer::{SeqCache, StepInput};
use crate::llama::{Decoder, LoadedModel};
use crate::progress::Progress;
use crate::prompts::View;
use crate::task::{arith, format_number, Task};
use anyhow::{Context, Result};

/// How the model answers.
#[derive(Debug, Clone, Copy)]
pub struct Decoding {
    pub decode: StudentDecode,
    /// How its replies are read: the answer alone (label) or reasoning, then the answer.
    pub view: View,
    pub max_new: usize,
    /// Numeric rationales: write the value of each equation the student leaves open.
    pub calculator: bool,
    /// Rows decoded together.
    pub parallel: usize,
}

/// The model's answers to `chats`: `model` is the inference decoder over `loaded`'s
/// weights (`LoadedModel::take_inference_decoder`), `loaded` its tokenizer and template.
pub fn answer(
    name: &str,
    (model, loaded): (&Decoder, &LoadedModel),
    chats: &[Vec<ChatMessage>],
    task: &Task,
    how: Decoding,
) -> Result<Answers> {
    let prompts: Vec<Vec<u32>> = chats
        .iter()
        .map(|chat| loaded.chat_ids(chat))
        .collect::<Result<_>>()?;
    let mut progress = Progress::new(name, chats.len() as u64);
    let predictions = match how.decode {
        StudentDecode::Greedy => generate(model, loaded, task, &prompts, how, &mut progress)?,
        StudentDecode::LabelScores => best_labels(model, loaded, task, &prompts, &mut progress)?,
    };
    let wall_seconds = progress.finish();
    Ok(Answers {
        predictions,
        wall_seconds,
        rescued: 0,
    })
}

/// What eval does as the student writes: the calculator's insertions, and each finished
/// row's text parsed into its answer.
struct EvalHooks<'a> {
    loaded: &'a LoadedModel,
    task: &'a Task,
    how: Decoding,
    predictions: Vec<Option<Prediction>>,
    progress: &'a mut Progress,
}

impl Hooks<usize> for EvalHooks<'_> {
    fn after_token(&mut self, seq: &Sequence<usize>, _: &[f32]) -> Result<Vec<u32>> {
        if !self.how.calculator {
            return Ok(vec![]);
        }
        calculator(self.loaded, &seq.generated)
    }

    fn finished(&mut self, seq: Sequence<usize>, finish: Finish) -> Result<()> {
        self.progress.inc(seq.generated.len() as u64);
        let text = self.loaded.decode(&seq.generated)?;
        let answer = match self.how.view {
            View::Rationale => parse_reasoned(self.task, &text, finish == Finish::Length),
            View::Label => self.task.parse_answer_only(&text).answer,
        };
        self.predictions[seq.tag] = Some(Prediction {
            text,
            answer,
            seconds: seq.started.elapsed().as_secs_f64(),
            tokens: seq.generated.len() as u32,
        });
        Ok(())
    }

    fn rejected(&mut self, row: usize, message: String) -> Result<()> {
        anyhow::bail!("eval row {row}: {message}")
    }
}

/// Greedy replies to every prompt, `how.parallel` rows decoded together.
fn generate(
    model: &Decoder,
    loaded: &LoadedModel,
    task: &Task,
    prompts: &[Vec<u32>],
    how: Decoding,
    progress: &mut Progress,
) -> Result<Vec<Prediction>> {
    let generator = Generator {
        model,
        parallel: how.parallel,
        stop: vec![loaded.eos_token_id],
        sampling: Sampling::Greedy,
    };
    let mut hooks = EvalHooks {
        loaded,
        task,
        how,
        predictions: vec![None; prompts.len()],
        progress,
    };
    let requests = prompts.iter().enumerate().map(|(i, p)| {
        Ok(Request {
            tag: i,
            prompt: p.clone(),
            max_new: how.max_new,
            seed: 0,
        })
    });
    generator.run(requests, &mut hooks)?;
    hooks
        .predictions
        .into_iter()
        .enumerate()
        .map(|(i, p)| p.with_context(|| format!("eval row {i} got no reply")))
        .collect()
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

/// After each token, the calculator of Cobbe et al. (2021, "Training Verifiers to Solve
/// Math Word Problems"): when the text so far ends in an equation left open (`3 * 4 =`),
/// kdpipe, not the model, writes its result (` 12`); a small student picks the right
/// operation far more often than it gets the digits right.
fn calculator(loaded: &LoadedModel, generated: &[u32]) -> Result<Vec<u32>> {
    // Decoding only the last tokens keeps this cheap; an equation is short.
    let tail = loaded.decode(&generated[generated.len().saturating_sub(24)..])?;
    match arith::open_equation_value(&tail) {
        Some(value) if tail.trim_end().ends_with('=') => {
            loaded.encode(&format!(" {}", format_number(value)))
        }
        _ => Ok(vec![]),
    }
}

/// For each prompt, the label (its tokens, then end-of-sequence, as the training label
/// view writes it) with the highest log-probability after the prompt. Each prompt is run
/// once (sharing the prefix of the one before); its labels are scored together.
fn best_labels(
    model: &Decoder,
    loaded: &LoadedModel,
    task: &Task,
    prompts: &[Vec<u32>],
    progress: &mut Progress,
) -> Result<Vec<Prediction>> {
    let label_ids: Vec<Vec<u32>> = task
        .labels
        .iter()
        .map(|l| {
            let mut ids = loaded.encode(l)?;
            ids.push(loaded.eos_token_id);
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    let mut previous: Option<(&[u32], SeqCache)> = None;
    let mut out = Vec::with_capacity(prompts.len());
    for p in prompts {
        let started = std::time::Instant::now();
        anyhow::ensure!(!p.is_empty(), "a student prompt rendered to no tokens");
        let shared = previous.as_ref().map_or(0, |(ids, _)| {
            ids.iter().zip(p).take_while(|(a, b)| a == b).count()
        });
        let reused = shared.min(p.len() - 1);
        let mut cache = match &previous {
            Some((_, c)) => c.prefix(reused, p.len() - reused),
            None => SeqCache::new(model, p.len()),
        };
        let next = model
            .forward_step(&mut [StepInput {
                cache: &mut cache,
                tokens: &p[reused..],
                all_logits: false,
            }])?
            .pop()
            .context("no logits for the prompt")?;
        let scores = model.continuation_logprobs(&cache, &next, &label_ids)?;
        // The first label with the highest log-probability.
        let best = (0..scores.len()).fold(0, |b, i| if scores[i] > scores[b] { i } else { b });
        let label = task.labels[best].clone();
        progress.inc(1);
        out.push(Prediction {
            text: label.clone(),
            answer: Some(label),
            seconds: started.elapsed().as_secs_f64(),
            tokens: 0,
        });
        previous = Some((p.as_slice(), cache));
    }
    Ok(out)
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
