//! Times the local teacher on one model, for two prompts sharing a long prefix:
//! generate (the second reuses the engine's prefix cache), then label scoring after the
//! reply read from the captured decode steps, next to the anchor in the same run: the
//! same context scored by a fresh one-step request (the engine recomputes the prompt).
//! `cargo run --release --example teacher_timing -- MODEL`
use kdpipe::chat::ChatMessage;
use kdpipe::teacher::mistralrs::MistralrsTeacher;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or("models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf".into());
    let t = MistralrsTeacher::open(&model, true)?;
    let err = |e: kdpipe::teacher::TeacherError| anyhow::anyhow!("{e}");
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
        let g = t.generate(&msgs, 48, 0.0).map_err(err)?;
        let gen = s.elapsed();
        let prefix = match g.text.rfind("Answer:") {
            Some(i) => g.text[..i + 7].to_string(),
            None => g.text.clone(),
        };
        let s = Instant::now();
        let scores = t
            .score_continuations(&msgs, &prefix, &[" yes".into(), " no".into()])
            .map_err(err)?;
        let captured = s.elapsed();
        let mut ctx = t.chat_ids(&msgs).map_err(err)?;
        ctx.extend(t.text_ids(&prefix).map_err(err)?);
        let s = Instant::now();
        t.next_token_logprobs(ctx).map_err(err)?;
        let fresh = s.elapsed();
        println!(
            "{} prompt tokens: generate {:.2} s ({} tokens); label scores from captured steps {:.4} s, fresh request (anchor) {:.2} s; scores {:?}",
            g.prompt_tokens,
            gen.as_secs_f64(),
            g.completion_tokens,
            captured.as_secs_f64(),
            fresh.as_secs_f64(),
            scores
        );
    }
    Ok(())
}
