//! Times the local teacher's calls on one model: generate, then label scoring after the
//! reply, for two prompts sharing a long prefix (prefix-cache reuse).
//! `cargo run --release --example teacher_timing -- MODEL`
use kdpipe::teacher::local::LocalTeacher;
use kdpipe::teacher::{ChatMessage, Teacher};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or("models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf".into());
    let t = LocalTeacher::open(&model, true)?;
    let long =
        "Background: ".to_string() + &"the quick brown fox jumps over the lazy dog. ".repeat(20);
    for q in [
        "Is 2+2 equal to 4? Say why, then end with 'Answer: yes' or 'Answer: no'.",
        "Is 3+5 equal to 9? Say why, then end with 'Answer: yes' or 'Answer: no'.",
    ] {
        let msgs = vec![
            ChatMessage::new("system", long.clone()),
            ChatMessage::new("user", q),
        ];
        let s = Instant::now();
        let g = t
            .generate(&msgs, 48, 0.0)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let gen = s.elapsed();
        let prefix = match g.text.rfind("Answer:") {
            Some(i) => g.text[..i + 7].to_string(),
            None => g.text.clone(),
        };
        let s = Instant::now();
        let sc = t
            .score_continuations(&msgs, &prefix, &[" yes".into(), " no".into()])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        eprintln!(
            "{} prompt tokens; generate {:?} ({} tokens); score {:?} {:?}",
            g.prompt_tokens,
            gen,
            g.completion_tokens,
            s.elapsed(),
            sc
        );
    }
    Ok(())
}
