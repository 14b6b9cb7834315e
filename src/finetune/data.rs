//! Training examples: each curated row gives a label view and (step-by-step) a rationale
//! view, rendered through the student's chat template; loss only on the reply tokens.

use crate::config::Objective;
use crate::prompts::{Prompt, LABEL_VIEW, RATIONALE_VIEW};
use crate::records::CuratedRow;
use crate::student::LoadedModel;
use anyhow::Result;
use rand::seq::SliceRandom;
use rand::SeedableRng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Label,
    Rationale,
}

#[derive(Debug, Clone)]
pub struct Example {
    pub view: View,
    pub ids: Vec<u32>,
    /// 1 where the token is a target (part of the reply), 0 for the prompt.
    pub target: Vec<u8>,
}

/// Prompt token ids for one view of an input, ending where the reply starts.
pub fn prompt_ids(
    model: &LoadedModel,
    prompt: &Prompt,
    view: &str,
    input: &str,
) -> Result<Vec<u32>> {
    let text = model.chat.render(&prompt.student_chat(view, input), true)?;
    model.encode(&text)
}

fn example(
    model: &LoadedModel,
    prompt: &Prompt,
    view: View,
    input: &str,
    reply: &str,
    max_len: usize,
) -> Result<Example> {
    let tag = if view == View::Label {
        LABEL_VIEW
    } else {
        RATIONALE_VIEW
    };
    let mut ids = prompt_ids(model, prompt, tag, input)?;
    let mut reply_ids = model.encode(reply)?;
    reply_ids.push(model.eos_token_id);
    // Keep the whole reply; cut the prompt from the left if the pair is too long.
    reply_ids.truncate(max_len.saturating_sub(8).max(1));
    let room = max_len.saturating_sub(reply_ids.len());
    if ids.len() > room {
        ids.drain(..ids.len() - room);
    }
    let mut target = vec![0u8; ids.len()];
    target.extend(std::iter::repeat_n(1u8, reply_ids.len()));
    ids.extend(reply_ids);
    Ok(Example { view, ids, target })
}

/// The examples of one row for the objective: label view always, rationale view for
/// step-by-step. `label_only` trains on gold, the others on the teacher's answer.
pub fn row_examples(
    model: &LoadedModel,
    prompt: &Prompt,
    row: &CuratedRow,
    objective: Objective,
    max_len: usize,
) -> Result<Vec<Example>> {
    let label = match objective {
        Objective::LabelOnly => row.gold.clone().unwrap_or_else(|| row.answer.clone()),
        _ => row.answer.clone(),
    };
    let mut out = vec![example(
        model,
        prompt,
        View::Label,
        &row.input,
        &label,
        max_len,
    )?];
    if objective == Objective::StepByStep && !row.rationale.trim().is_empty() {
        out.push(example(
            model,
            prompt,
            View::Rationale,
            &row.input,
            row.rationale.trim(),
            max_len,
        )?);
    }
    Ok(out)
}

/// Batches of examples of similar length (less padding), in a seeded random order.
pub fn batches(mut examples: Vec<Example>, batch_size: usize, seed: u64) -> Vec<Vec<Example>> {
    examples.sort_by_key(|e| e.ids.len());
    let mut out: Vec<Vec<Example>> = examples
        .chunks(batch_size.max(1))
        .map(|c| c.to_vec())
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    out.shuffle(&mut rng);
    out
}
