//! Times one training step of the student (forward, backward, AdamW) on SmolLM2:
//! `cargo run --release --example train_step -- [BATCH] [SEQ]`
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use kdpipe::student;
use std::time::Instant;

// The allocator the kdpipe binary uses (src/main.rs): training allocates large temporaries.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    kdpipe::alloc::tune();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (b, t) = (
        args.first().copied().unwrap_or(4),
        args.get(1).copied().unwrap_or(128),
    );
    let loaded = student::load("models/SmolLM2-135M-Instruct.Q4_1.gguf", &Device::Cpu)?;
    let all = std::env::var("TRAIN_ALL").is_ok();
    let model = loaded.decoder(&Device::Cpu, |n| all || n != "model.embed_tokens.weight")?;
    let mut opt = AdamW::new(
        model.vars.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW {
            lr: 1e-5,
            ..Default::default()
        },
    )?;
    let ids = Tensor::from_vec(
        (0..(b * t) as u32)
            .map(|i| (i * 7919) % 49152)
            .collect::<Vec<_>>(),
        (b, t),
        &Device::Cpu,
    )?;
    let mask = Tensor::ones((b, t), DType::F32, &Device::Cpu)?;
    for step in 0..3 {
        let s = Instant::now();
        let logits = model.forward(&ids, &mask)?;
        let loss = kdpipe::finetune::loss::token_nll(&logits, &ids)?.mean_all()?;
        let fwd = s.elapsed();
        let s = Instant::now();
        let grads = loss.backward()?;
        let bwd = s.elapsed();
        let s = Instant::now();
        opt.step(&grads)?;
        let upd = s.elapsed();
        let total = (fwd + bwd + upd).as_secs_f64();
        eprintln!(
            "step {step}: forward {fwd:?} backward {bwd:?} adamw {upd:?} → {:.0} tokens/s",
            (b * t) as f64 / total
        );
    }
    Ok(())
}
