//! The local teacher's speed, for `scripts/bench/teacher.sh` (see scripts/bench/teacher.py).
//! Modes:
//! - `chats CONFIG MODEL N OUT`: render the first N inputs of CONFIG's data through its
//!   prompt template, as `generate` does, and write them to OUT (JSON lines: `messages`,
//!   `prompt_tokens`), so every engine answers the same chats;
//! - `batched MODEL CHATS MAX_TOKENS BATCH`: kdpipe's batched engine answers every chat
//!   greedily, BATCH sequences decoded together, the jobs all queued at the start (as a
//!   `generate` run queues them);
//! - `mistralrs MODEL CHATS MAX_TOKENS`: the mistralrs engine, one request at a time;
//! - `raw MODEL NPP NTG NPL`: the batched engine's raw speed, the way llama.cpp's
//!   `llama-batched-bench` measures it: NPL distinct prompts of NPP tokens prefilled (no
//!   shared prefix), then NTG decode steps of all NPL sequences together;
//! - `raw-quantized MODEL NPP NTG NPL`: the same with the weights kept in their GGUF
//!   block formats (`kernels::quant`).
//!
//! Each run prints one JSON line on stdout.
//!
//! `cargo run --release --example teacher_bench -- MODE ARGS…`
use kdpipe::chat::ChatMessage;
use kdpipe::config::{Config, Overrides};
use kdpipe::io::inputs::read_inputs;
use kdpipe::llama::infer::{SeqCache, StepInput};
use kdpipe::prompts::Prompt;
use kdpipe::teacher::engine::EngineTeacher;
use kdpipe::teacher::{Job, Settings, Teacher};
use std::io::Write;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    kdpipe::alloc::tune();
    // The engine's load and cache lines on stderr (RUST_LOG=info).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i).map(String::as_str).ok_or_else(|| {
            anyhow::anyhow!(
                "usage: teacher_bench chats CONFIG MODEL N OUT | batched MODEL CHATS MAX_TOKENS BATCH \
                 | mistralrs MODEL CHATS MAX_TOKENS | raw[-quantized] MODEL NPP NTG NPL"
            )
        })
    };
    match arg(1)? {
        "chats" => chats(arg(2)?, arg(3)?, arg(4)?.parse()?, arg(5)?),
        "batched" => batched(arg(2)?, arg(3)?, arg(4)?.parse()?, arg(5)?.parse()?),
        "mistralrs" => mistralrs(arg(2)?, arg(3)?, arg(4)?.parse()?),
        mode @ ("raw" | "raw-quantized") => raw(
            arg(2)?,
            arg(3)?.parse()?,
            arg(4)?.parse()?,
            arg(5)?.parse()?,
            mode == "raw-quantized",
        ),
        other => anyhow::bail!("unknown mode {other:?}"),
    }
}

struct Chat {
    messages: Vec<ChatMessage>,
}

fn read_chats(path: &str) -> anyhow::Result<Vec<Chat>> {
    std::fs::read_to_string(path)?
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok(Chat {
                messages: serde_json::from_value(v["messages"].clone())?,
            })
        })
        .collect()
}

fn chats(config: &str, model: &str, n: usize, out: &str) -> anyhow::Result<()> {
    let overrides = Overrides {
        limit: Some(n),
        teacher_model: Some(model.to_string()),
        ..Overrides::default()
    };
    let cfg = Config::resolve(
        config.as_ref(),
        &overrides,
        &kdpipe::llama::vocab::same_vocabulary,
    )?;
    let prompt = Prompt::load(&cfg)?;
    let teacher = EngineTeacher::open(model, 1)?;
    let mut file = std::fs::File::create(out)?;
    let mut total = 0;
    for input in read_inputs(&cfg.data)? {
        let messages = prompt.teacher_chat(&input.input)?;
        let tokens = teacher.count_prompt_tokens(&messages)?.unwrap_or(0);
        total += tokens;
        let line = serde_json::json!({"messages": messages, "prompt_tokens": tokens});
        writeln!(file, "{line}")?;
    }
    println!("{{\"chats\": {n}, \"prompt_tokens\": {total}}}");
    Ok(())
}

fn batched(model: &str, chats_path: &str, max_tokens: usize, batch: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    let teacher = EngineTeacher::open(model, batch)?;
    let load_s = start.elapsed().as_secs_f64();
    let chats = read_chats(chats_path)?;
    let jobs = chats
        .iter()
        .enumerate()
        .map(|(i, c)| Job {
            id: i.to_string(),
            sample: 0,
            messages: c.messages.clone(),
            seed: None,
        })
        .collect();
    let settings = Settings {
        max_tokens,
        temperature: 0.0,
        token_topk: 0,
        labels: vec![],
    };
    let (mut requests, mut prompt_tokens, mut completion_tokens) = (0, 0, 0);
    let mut latency_sum = 0.0;
    let job_start = Instant::now();
    teacher.answer_all(jobs, &settings, &|_| None, &mut |_, reply| {
        let reply = reply.map_err(|e| anyhow::anyhow!(e))?;
        requests += 1;
        prompt_tokens += reply.prompt_tokens as usize;
        completion_tokens += reply.completion_tokens as usize;
        // Every job was queued at the start: its latency is the time until its reply.
        latency_sum += job_start.elapsed().as_secs_f64();
        Ok(())
    })?;
    let job_s = job_start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "engine": format!("kdpipe engine ({batch} in parallel)"),
            "requests": requests,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "load_s": load_s,
            "job_s": job_s,
            "generated_tok_s": completion_tokens as f64 / job_s,
            "mean_latency_s": latency_sum / requests.max(1) as f64,
        })
    );
    Ok(())
}

#[cfg(feature = "mistralrs")]
fn mistralrs(model: &str, chats_path: &str, max_tokens: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    let teacher = kdpipe::teacher::mistralrs::MistralrsTeacher::open(model, false)?;
    let load_s = start.elapsed().as_secs_f64();
    let (mut prompt_tokens, mut prompt_s, mut decode_tokens, mut decode_s) = (0, 0.0, 0, 0.0);
    let (mut completion_tokens, mut latency_sum) = (0, 0.0);
    let chats = read_chats(chats_path)?;
    let job_start = Instant::now();
    for chat in &chats {
        let asked = Instant::now();
        let reply = teacher
            .generate(&chat.messages, max_tokens, 0.0)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        latency_sum += asked.elapsed().as_secs_f64();
        prompt_tokens += reply.prompt_tokens as usize;
        prompt_s += reply.prompt_seconds;
        completion_tokens += reply.completion_tokens as usize;
        // The first generated token comes out of the prompt pass.
        decode_tokens += (reply.completion_tokens as usize).saturating_sub(1);
        decode_s += reply.decode_seconds;
    }
    let job_s = job_start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "engine": "kdpipe mistralrs 0.8.1 engine (one request at a time)",
            "requests": chats.len(),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "load_s": load_s,
            "job_s": job_s,
            "generated_tok_s": completion_tokens as f64 / job_s,
            "mean_latency_s": latency_sum / chats.len().max(1) as f64,
            "prompt_tok_s": prompt_tokens as f64 / prompt_s.max(1e-9),
            "decode_tok_s": decode_tokens as f64 / decode_s.max(1e-9),
        })
    );
    Ok(())
}

#[cfg(not(feature = "mistralrs"))]
fn mistralrs(_: &str, _: &str, _: usize) -> anyhow::Result<()> {
    anyhow::bail!("built without the local (mistralrs) feature")
}

fn raw(model: &str, npp: usize, ntg: usize, npl: usize, quantized: bool) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut loaded = if quantized {
        kdpipe::llama::load_for_inference(model)?
    } else {
        kdpipe::llama::load(model, &candle_core::Device::Cpu)?
    };
    let decoder = loaded.take_inference_decoder()?;
    let load_s = start.elapsed().as_secs_f64();
    let vocab = decoder.shape.vocab_size as u32;
    // Distinct prompts: sequence s's token i is a fixed function of (s, i) below the vocab.
    let prompts: Vec<Vec<u32>> = (0..npl as u32)
        .map(|s| {
            (0..npp as u32)
                .map(|i| (1000 + s * 7919 + i * 104_729) % vocab)
                .collect()
        })
        .collect();
    let mut caches: Vec<SeqCache> = (0..npl)
        .map(|_| SeqCache::new(&decoder, npp + ntg))
        .collect();
    // Prompt processing: one prompt at a time, as the engine prefills.
    let pp = Instant::now();
    let mut next: Vec<u32> = Vec::with_capacity(npl);
    for (cache, prompt) in caches.iter_mut().zip(&prompts) {
        let logits = decoder.forward_step(&mut [StepInput {
            cache,
            tokens: prompt,
            all_logits: false,
        }])?;
        next.push(argmax(&logits[0]));
    }
    let t_pp = pp.elapsed().as_secs_f64();
    // Decoding: every sequence one token a step, NTG steps, whatever the tokens are.
    let tg = Instant::now();
    for _ in 0..ntg {
        let mut inputs: Vec<StepInput> = caches
            .iter_mut()
            .zip(&next)
            .map(|(cache, t)| StepInput {
                cache,
                tokens: std::slice::from_ref(t),
                all_logits: false,
            })
            .collect();
        let logits = decoder.forward_step(&mut inputs)?;
        next = logits.iter().map(|l| argmax(l)).collect();
    }
    let t_tg = tg.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "engine": "kdpipe engine (raw)",
            "pp": npp, "tg": ntg, "pl": npl, "load_s": load_s,
            "t_pp": t_pp, "speed_pp": (npl * npp) as f64 / t_pp,
            "t_tg": t_tg, "speed_tg": (npl * ntg) as f64 / t_tg,
        })
    );
    Ok(())
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}
