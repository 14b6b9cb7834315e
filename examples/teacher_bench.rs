//! The local teacher's speed on real prompts, for `scripts/bench/teacher.sh`: renders the
//! first N inputs of a dataset through a prompt template, generates greedily one request at
//! a time (as `generate` does), and prints prompt and decode tokens/s from the engine's own
//! timings. Writes the chats it sent to CHATS_OUT so another engine can run the same ones.
//!
//! `cargo run --release --example teacher_bench -- CONFIG MODEL N MAX_TOKENS CHATS_OUT`
use kdpipe::config::{Config, Overrides};
use kdpipe::io::inputs::read_inputs;
use kdpipe::prompts::Prompt;
use kdpipe::teacher::local::LocalTeacher;
use std::io::Write;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 6,
        "usage: teacher_bench CONFIG MODEL N MAX_TOKENS CHATS_OUT"
    );
    let overrides = Overrides {
        limit: Some(args[3].parse()?),
        teacher_model: Some(args[2].clone()),
        ..Overrides::default()
    };
    let cfg = Config::resolve(args[1].as_ref(), &overrides)?;
    let max_tokens: usize = args[4].parse()?;
    let prompt = Prompt::load(&cfg)?;
    let inputs = read_inputs(&cfg.data)?;
    let teacher = LocalTeacher::open(&cfg.teacher.model, false)?;
    let mut chats = std::fs::File::create(&args[5])?;
    let (mut prompt_tokens, mut prompt_secs, mut decode_tokens, mut decode_secs) = (0, 0.0, 0, 0.0);
    let wall = std::time::Instant::now();
    for input in &inputs {
        let messages = prompt.teacher_chat(&input.input)?;
        let reply = teacher
            .generate(&messages, max_tokens, 0.0)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let line = serde_json::json!({
            "id": input.id, "messages": messages, "prompt_tokens": reply.prompt_tokens,
        });
        writeln!(chats, "{line}")?;
        prompt_tokens += reply.prompt_tokens as usize;
        prompt_secs += reply.prompt_seconds;
        // The first generated token comes out of the prompt pass.
        decode_tokens += (reply.completion_tokens as usize).saturating_sub(1);
        decode_secs += reply.decode_seconds;
    }
    println!(
        "{{\"engine\": \"kdpipe (mistralrs 0.8.1)\", \"requests\": {}, \"prompt_tokens\": {prompt_tokens}, \"prompt_tok_s\": {:.1}, \"decode_tokens\": {decode_tokens}, \"decode_tok_s\": {:.1}, \"wall_s\": {:.1}}}",
        inputs.len(),
        prompt_tokens as f64 / prompt_secs.max(1e-9),
        decode_tokens as f64 / decode_secs.max(1e-9),
        wall.elapsed().as_secs_f64()
    );
    Ok(())
}
