//! `generate --dry-run`: what a run would send and cost, without asking the teacher for
//! anything. Prints the first prompt, the number of requests and tokens, and the cost when
//! `[teacher] price_per_mtok` is set. The local teacher counts prompt tokens exactly with
//! its own tokenizer and chat template; for an API they are estimated (4 characters a
//! token, 4 tokens a message), and the report says so.

use crate::chat::ChatMessage;
use crate::config::{Config, TeacherKind};
use crate::teacher::{self, openai::estimate_tokens, Job, Settings};
use anyhow::Result;
use std::collections::HashMap;

pub fn report(cfg: &Config, jobs: &[Job], settings: &Settings) -> Result<()> {
    let Some(first) = jobs.first() else {
        println!("no inputs: nothing would be sent");
        return Ok(());
    };
    println!("first prompt (input {:?}):", first.id);
    for m in &first.messages {
        println!("--- {}\n{}", m.role, m.content);
    }
    println!("---");

    // Samples of one input share its prompt: count each distinct prompt once.
    let mut per_input: HashMap<&str, &[ChatMessage]> = HashMap::new();
    for j in jobs {
        per_input.entry(j.id.as_str()).or_insert(&j.messages);
    }
    let counter: Option<Box<dyn teacher::Teacher>> = match cfg.teacher.kind {
        TeacherKind::Local => Some(teacher::open(&cfg.teacher, false, 0)?),
        TeacherKind::Openai => None,
    };
    let mut prompt_tokens = 0usize;
    let mut exact = true;
    for j in jobs {
        let messages = per_input[j.id.as_str()];
        let n = match &counter {
            Some(t) => t.count_prompt_tokens(messages)?,
            None => None,
        };
        prompt_tokens += n.unwrap_or_else(|| {
            exact = false;
            estimate_tokens(messages)
        });
    }
    let requests = jobs.len();
    let completion_max = requests * settings.max_tokens;
    println!(
        "requests: {requests} ({} inputs × {} samples × {} teacher(s))",
        per_input.len(),
        cfg.generate.samples,
        cfg.teachers().len()
    );
    println!(
        "prompt tokens: {}{prompt_tokens}{}",
        if exact { "" } else { "≈ " },
        if exact {
            " (counted with the teacher's tokenizer)"
        } else {
            " (estimated at 4 characters a token; an API gives no tokenizer)"
        }
    );
    println!(
        "completion tokens: at most {completion_max} ({requests} × max_tokens {})",
        settings.max_tokens
    );
    match cfg.teacher.price_per_mtok {
        Some(p) => {
            let input = prompt_tokens as f64 * p.input / 1e6;
            let output = completion_max as f64 * p.output / 1e6;
            println!(
                "cost: at most {:.4} ({input:.4} for prompts at {} a million tokens, {output:.4} for completions at {})",
                input + output,
                p.input,
                p.output
            );
        }
        None => {
            println!("cost: set [teacher] price_per_mtok = {{ input = …, output = … }} to see it")
        }
    }
    Ok(())
}
