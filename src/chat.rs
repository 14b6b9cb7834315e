//! Chat templates (Jinja, as shipped in GGUF metadata or tokenizer_config.json) rendered
//! with minijinja, so the student sees its prompts exactly as its own chat format says.

use anyhow::{Context, Result};
use minijinja::{context, Environment};

/// One chat message (system, user or assistant turn).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: String, bos_token: String, eos_token: String) -> Self {
        ChatTemplate {
            source,
            bos_token,
            eos_token,
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render messages; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .context("the chat template does not parse")?;
        let tmpl = env
            .get_template("chat")
            .context("the chat template is missing")?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .context("cannot render the chat template")
    }
}

/// A prompt's token ids followed by a reply's, fitted into `max_len` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct FittedReply {
    pub ids: Vec<u32>,
    /// 1 on the kept reply tokens, 0 on the prompt's.
    pub target: Vec<u8>,
    /// How many reply tokens were kept (from the first).
    pub kept: usize,
    /// Something was cut.
    pub truncated: bool,
}

/// Fit `prompt` then `reply` into `max_len` tokens: the reply is kept up to all but 8
/// tokens of the length, the prompt is cut from the left (its end, where the reply
/// begins, matters most).
pub fn fit_reply(mut prompt: Vec<u32>, reply: &[u32], max_len: usize) -> FittedReply {
    let kept = reply.len().min(max_len.saturating_sub(8).max(1));
    let truncated = prompt.len() + reply.len() > max_len;
    let room = max_len.saturating_sub(kept);
    if prompt.len() > room {
        prompt.drain(..prompt.len() - room);
    }
    let mut target = vec![0u8; prompt.len()];
    target.extend(std::iter::repeat_n(1u8, kept));
    prompt.extend(&reply[..kept]);
    FittedReply {
        ids: prompt,
        target,
        kept,
        truncated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_with_generation_prompt() {
        let src = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(src.into(), "".into(), "<|im_end|>".into());
        let out = t.render(&[ChatMessage::new("user", "hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_reply_keeps_its_start_and_the_prompt_loses_its_start() {
        let f = fit_reply(vec![1, 2, 3, 4], &[10, 11], 16);
        assert_eq!(f.ids, [1, 2, 3, 4, 10, 11]);
        assert_eq!(f.target, [0, 0, 0, 0, 1, 1]);
        assert!(!f.truncated && f.kept == 2);
        // 12 tokens: the reply keeps up to 12 - 8 = 4 tokens, the prompt its last 8.
        let reply: Vec<u32> = (100..110).collect();
        let f = fit_reply((0..10).collect(), &reply, 12);
        assert_eq!(f.ids, [2, 3, 4, 5, 6, 7, 8, 9, 100, 101, 102, 103]);
        assert!(f.truncated && f.kept == 4);
    }
}
