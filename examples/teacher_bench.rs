//! The local teacher's speed on real prompts, for `scripts/bench/teacher.sh`: renders the
//! first N inputs of a dataset through a prompt template and generates greedily, as
//! `generate` does, with one engine:
//! - `mistralrs`: one request at a time; prompt and decode tokens/s from the engine's own
//!   timings;
//! - `batched`: kdpipe's decoder, BATCH sequences decoded together; prompt time is the
//!   time spent prefilling (sequences wait meanwhile), decode time the rest of the wall.
//!
//! Prints one JSON line. The mistralrs run writes the chats it sent to CHATS_OUT, so other
//! engines run the same ones.
//!
//! `cargo run --release --example teacher_bench -- ENGINE CONFIG MODEL N MAX_TOKENS CHATS [BATCH]`
use kdpipe::config::{Config, Overrides};
use kdpipe::io::inputs::read_inputs;
use kdpipe::prompts::Prompt;
use kdpipe::teacher::batched::BatchedTeacher;
use kdpipe::teacher::{Job, Settings, Teacher};
use std::io::Write;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Totals over a run.
#[derive(Default)]
struct Totals {
    requests: usize,
    prompt_tokens: usize,
    prompt_secs: f64,
    /// Generated tokens after the first (which comes out of the prompt pass).
    decode_tokens: usize,
    decode_secs: f64,
}

fn main() -> anyhow::Result<()> {
    kdpipe::alloc::tune();
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 7,
        "usage: teacher_bench mistralrs|batched CONFIG MODEL N MAX_TOKENS CHATS [BATCH]"
    );
    let engine = args[1].as_str();
    let overrides = Overrides {
        limit: Some(args[4].parse()?),
        teacher_model: Some(args[3].clone()),
        ..Overrides::default()
    };
    let cfg = Config::resolve(args[2].as_ref(), &overrides)?;
    let max_tokens: usize = args[5].parse()?;
    let prompt = Prompt::load(&cfg)?;
    let inputs = read_inputs(&cfg.data)?;
    let chats: Vec<_> = inputs
        .iter()
        .map(|i| prompt.teacher_chat(&i.input))
        .collect::<anyhow::Result<_>>()?;
    let wall = Instant::now();
    let (totals, label) = match engine {
        "mistralrs" => (
            mistralrs(&cfg.teacher.model, &chats, max_tokens, &args[6])?,
            "kdpipe, mistralrs 0.8.1 engine".to_string(),
        ),
        "batched" => {
            let batch: usize = args.get(7).map(|b| b.parse()).transpose()?.unwrap_or(32);
            let t = batched(&cfg.teacher.model, &chats, max_tokens, batch, &wall)?;
            (t, format!("kdpipe, batched engine (batch {batch})"))
        }
        other => anyhow::bail!("unknown engine {other:?}: mistralrs or batched"),
    };
    let wall_s = wall.elapsed().as_secs_f64();
    println!(
        "{{\"engine\": \"{label}\", \"requests\": {}, \"prompt_tokens\": {}, \"prompt_tok_s\": {:.1}, \"decode_tokens\": {}, \"decode_tok_s\": {:.1}, \"wall_s\": {wall_s:.1}, \"generated_tok_s_wall\": {:.1}}}",
        totals.requests,
        totals.prompt_tokens,
        totals.prompt_tokens as f64 / totals.prompt_secs.max(1e-9),
        totals.decode_tokens,
        totals.decode_tokens as f64 / totals.decode_secs.max(1e-9),
        (totals.decode_tokens + totals.requests) as f64 / wall_s,
    );
    Ok(())
}

#[cfg(feature = "local")]
fn mistralrs(
    model: &str,
    chats: &[Vec<kdpipe::teacher::ChatMessage>],
    max_tokens: usize,
    chats_out: &str,
) -> anyhow::Result<Totals> {
    let teacher = kdpipe::teacher::local::LocalTeacher::open(model, false)?;
    let mut out = std::fs::File::create(chats_out)?;
    let mut t = Totals::default();
    for messages in chats {
        let reply = teacher
            .generate(messages, max_tokens, 0.0)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let line = serde_json::json!({"messages": messages, "prompt_tokens": reply.prompt_tokens});
        writeln!(out, "{line}")?;
        t.requests += 1;
        t.prompt_tokens += reply.prompt_tokens as usize;
        t.prompt_secs += reply.prompt_seconds;
        t.decode_tokens += (reply.completion_tokens as usize).saturating_sub(1);
        t.decode_secs += reply.decode_seconds;
    }
    Ok(t)
}

#[cfg(not(feature = "local"))]
fn mistralrs(
    _: &str,
    _: &[Vec<kdpipe::teacher::ChatMessage>],
    _: usize,
    _: &str,
) -> anyhow::Result<Totals> {
    anyhow::bail!("built without the local (mistralrs) feature")
}

fn batched(
    model: &str,
    chats: &[Vec<kdpipe::teacher::ChatMessage>],
    max_tokens: usize,
    batch: usize,
    wall: &Instant,
) -> anyhow::Result<Totals> {
    let teacher = BatchedTeacher::open(model, batch)?;
    let started = wall.elapsed().as_secs_f64();
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
    let settings = Settings {
        max_tokens,
        temperature: 0.0,
        token_topk: 0,
        labels: vec![],
    };
    let mut t = Totals::default();
    teacher.answer_all(jobs, &settings, &|_| None, &mut |_, reply| {
        let reply = reply.map_err(|e| anyhow::anyhow!(e))?;
        t.requests += 1;
        t.prompt_tokens += reply.prompt_tokens as usize;
        t.prompt_secs += reply.prompt_seconds;
        t.decode_tokens += (reply.completion_tokens as usize).saturating_sub(1);
        Ok(())
    })?;
    // Prefills run one after another while the batch waits: the rest of the time decodes.
    t.decode_secs = wall.elapsed().as_secs_f64() - started - t.prompt_secs;
    Ok(t)
}
