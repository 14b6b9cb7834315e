//! Student training speed for `scripts/bench/train.sh`: SmolLM2-135M from its GGUF,
//! batch × seq token ids, AdamW; `full` trains every weight, `lora` rank-16 adapters
//! on every linear layer of the blocks; `f32`, or `bf16` mixed precision (`[finetune]
//! precision`). Prints one JSON line (tokens/s over the STEPS timed steps after WARMUP
//! untimed ones, and the median step). `EXPORT_DIR` writes the base model as a Hugging
//! Face folder first, for the PyTorch side to load the same weights.
//!
//! `cargo run --release --example train_bench -- MODE PRECISION BATCH SEQ WARMUP STEPS [EXPORT_DIR]`
use candle_core::{DType, Device, Tensor};
use kdpipe::config::{LoraConfig, Precision};
use kdpipe::finetune::optim::AdamW;
use kdpipe::llama as student;
use std::time::Instant;

// The allocator the kdpipe binary uses (src/main.rs): training allocates large temporaries.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    kdpipe::alloc::tune();
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 7,
        "usage: train_bench full|lora f32|bf16 BATCH SEQ WARMUP STEPS [EXPORT_DIR]"
    );
    let (mode, b, t, warmup, steps): (&str, usize, usize, usize, usize) = (
        &args[1],
        args[3].parse()?,
        args[4].parse()?,
        args[5].parse()?,
        args[6].parse()?,
    );
    let precision = match args[2].as_str() {
        "f32" => Precision::F32,
        "bf16" => Precision::Bf16,
        other => anyhow::bail!("precision must be f32 or bf16, got {other:?}"),
    };
    // KDPIPE_DEVICE=cuda (a build with --features cuda) trains on the GPU.
    let dev = match kdpipe::config::parse_device(
        &std::env::var("KDPIPE_DEVICE").unwrap_or_else(|_| "cpu".into()),
    )? {
        None => Device::Cpu,
        Some(n) => Device::new_cuda(n)?,
    };
    let mut loaded = student::load("models/SmolLM2-135M-Instruct.Q4_1.gguf", &dev)?;
    if let Some(dir) = args.get(7) {
        let base = loaded.decoder(&dev, |_| false)?;
        let eos = loaded
            .tokenizer
            .id_to_token(loaded.eos_token_id)
            .unwrap_or_default();
        student::export::export(
            dir.as_ref(),
            &base,
            &loaded.tokenizer_json()?,
            &loaded.chat,
            (&eos, "models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        )?;
    }
    let mut model = loaded.decoder(&dev, |_| mode == "full")?;
    loaded.weights.clear(); // as finetune does: the decoder holds its own copies
    if mode == "lora" {
        let cfg = LoraConfig {
            rank: 16,
            alpha: 32.0,
            targets: kdpipe::config::default_targets(),
            dropout: 0.0,
        };
        model.add_lora(&cfg, 0)?;
    }
    model.set_precision(precision)?;
    let mut opt = AdamW::new(model.vars.clone(), 0.0)?;
    let ids = Tensor::from_vec(
        (0..(b * t) as u32)
            .map(|i| (i * 7919) % 49152)
            .collect::<Vec<_>>(),
        (b, t),
        &dev,
    )?;
    let mask = Tensor::ones((b, t), DType::F32, &dev)?;
    let mut timed = Vec::with_capacity(steps);
    for step in 0..warmup + steps {
        let s = Instant::now();
        let logits = model.forward(&ids, &mask)?;
        let loss = kdpipe::finetune::loss::token_nll(&logits, &ids)?.mean_all()?;
        let f = s.elapsed();
        let rss_forward = rss_mb();
        let mut acc = opt.accumulator();
        let grads = loss.backward()?;
        let b = s.elapsed();
        let rss_backward = rss_mb();
        drop((logits, loss));
        opt.accumulate(&mut acc, &grads)?;
        drop(grads);
        opt.step(acc, 1e-5, Some(1.0))?;
        dev.synchronize()?; // a GPU's queued work finishes before the clock stops
        eprintln!(
            "step {step}: forward {f:?}, backward {:?}, optimizer {:?}; RSS MB after forward {rss_forward:?}, after backward {rss_backward:?}, after the step {:?}",
            b - f,
            s.elapsed() - b,
            rss_mb()
        );
        if step >= warmup {
            timed.push(s.elapsed().as_secs_f64());
        }
    }
    let total: f64 = timed.iter().sum();
    timed.sort_by(f64::total_cmp);
    println!(
        "{{\"engine\": \"kdpipe (candle 0.10.2)\", \"mode\": \"{mode}\", \"precision\": \"{}\", \"tokens_per_s\": {:.1}, \"step_s\": {:.3}}}",
        args[2],
        (b * t * timed.len()) as f64 / total,
        timed.get(timed.len() / 2).copied().unwrap_or(f64::NAN)
    );
    Ok(())
}

/// (current, peak) resident set in MB, from /proc (Linux); (0, 0) elsewhere.
fn rss_mb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}
