//! Prompt files (`prompts/*.md`): TOML front matter between `+++` lines (system text and
//! few-shot examples), then a minijinja template for one user turn. Rendering gives the
//! teacher's step-by-step chat and the student's two views (label, rationale).

use crate::chat::ChatMessage;
use crate::config::{Config, TaskKind};
use crate::io::atomic::text_sha256;
use crate::task::ANSWER_MARKER;
use anyhow::{bail, Context, Result};
use minijinja::{context, Environment};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FrontMatter {
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    examples: Vec<Example>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    pub input: String,
    pub rationale: String,
    pub answer: String,
}

/// A loaded prompt with the task facts it renders with.
#[derive(Debug, Clone)]
pub struct Prompt {
    system: Option<String>,
    examples: Vec<Example>,
    template: String,
    description: String,
    labels: Vec<String>,
    /// Hash of the file and the task facts: rows record it so a changed prompt is visible.
    pub hash: String,
}

/// The student's two views of a task, as in Distilling step-by-step: one model answers
/// alone (label) or reasons first (rationale), told apart by a prefix on the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Label,
    Rationale,
}

impl View {
    /// The prefix the student's prompt puts before the input.
    pub fn prefix(self) -> &'static str {
        match self {
            View::Label => "[label]",
            View::Rationale => "[rationale]",
        }
    }

    /// The view the student answers in at eval (`Config::student_reasons_at_eval`).
    pub fn for_eval(cfg: &Config) -> View {
        if cfg.student_reasons_at_eval() {
            View::Rationale
        } else {
            View::Label
        }
    }
}

impl Prompt {
    pub fn load(cfg: &Config) -> Result<Prompt> {
        let path = cfg.prompt_path();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("cannot read prompt file {}\nhint: run kdpipe from the project folder or set [task] prompt", path.display())
        })?;
        Self::parse(
            &text,
            &path,
            &cfg.task.description,
            &cfg.task.labels,
            cfg.task.kind,
        )
    }

    pub fn parse(
        text: &str,
        path: &Path,
        description: &str,
        labels: &[String],
        kind: TaskKind,
    ) -> Result<Prompt> {
        let rest = text.strip_prefix("+++\n").with_context(|| {
            format!(
                "{}: must start with a +++ front matter line",
                path.display()
            )
        })?;
        let end = rest
            .find("\n+++\n")
            .with_context(|| format!("{}: front matter has no closing +++ line", path.display()))?;
        let front: FrontMatter = toml::from_str(&rest[..end])
            .with_context(|| format!("{}: invalid front matter", path.display()))?;
        let template = rest[end + 5..].trim().to_string();
        let hash = text_sha256(&format!(
            "{text}\u{0}{description}\u{0}{}",
            labels.join("\u{1}")
        ));
        let prompt = Prompt {
            system: front.system,
            examples: front.examples,
            template,
            description: description.to_string(),
            labels: labels.to_vec(),
            hash,
        };
        let probe = "\u{1}input\u{1}";
        let rendered = prompt
            .user_turn(probe)
            .with_context(|| format!("{}: the template does not render", path.display()))?;
        if !rendered.contains(probe) {
            bail!(
                "{}: the template below the front matter never shows the input\nhint: put {{{{ input }}}} where the input text goes",
                path.display()
            );
        }
        if kind == TaskKind::Labels {
            for ex in &prompt.examples {
                if !labels.iter().any(|l| l == &ex.answer) {
                    bail!(
                        "{}: example answer {:?} is not in [task] labels {:?}",
                        path.display(),
                        ex.answer,
                        labels
                    );
                }
            }
        }
        Ok(prompt)
    }

    fn user_turn(&self, input: &str) -> Result<String> {
        let env = Environment::new();
        let out = env.render_str(
            &self.template,
            context! {
                input => input,
                description => self.description,
                labels => self.labels.join(", "),
            },
        )?;
        Ok(out.trim().to_string())
    }

    /// The teacher's few-shot step-by-step chat for one input.
    pub fn teacher_chat(&self, input: &str) -> Result<Vec<ChatMessage>> {
        let mut msgs = Vec::new();
        if let Some(system) = &self.system {
            msgs.push(ChatMessage::new("system", system.trim()));
        }
        for ex in &self.examples {
            msgs.push(ChatMessage::new("user", self.user_turn(&ex.input)?));
            msgs.push(ChatMessage::new(
                "assistant",
                format!("{}\n{ANSWER_MARKER} {}", ex.rationale.trim(), ex.answer),
            ));
        }
        msgs.push(ChatMessage::new("user", self.user_turn(input)?));
        Ok(msgs)
    }

    /// The student's prompt for one view: the task line, then the view prefix and input.
    pub fn student_chat(&self, view: View, input: &str) -> Vec<ChatMessage> {
        let mut head = self.description.trim().to_string();
        if !self.labels.is_empty() {
            head.push_str(&format!(" Answer with one of: {}.", self.labels.join(", ")));
        }
        let prefix = view.prefix();
        vec![ChatMessage::new(
            "user",
            format!("{head}\n{prefix} {input}"),
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "+++\nsystem = \"Be brief.\"\n[[examples]]\ninput = \"1+1?\"\nrationale = \"1 plus 1 is 2.\"\nanswer = \"2\"\n+++\n{{ description }}\nQuestion: {{ input }}\n";

    #[test]
    fn teacher_chat_has_system_examples_and_input() {
        let p =
            Prompt::parse(FILE, Path::new("p.md"), "Solve it.", &[], TaskKind::Numeric).unwrap();
        let chat = p.teacher_chat("2+2?").unwrap();
        assert_eq!(chat.len(), 4);
        assert_eq!(chat[0].content, "Be brief.");
        assert_eq!(chat[1].content, "Solve it.\nQuestion: 1+1?");
        assert_eq!(chat[2].content, "1 plus 1 is 2.\nAnswer: 2");
        assert_eq!(chat[3].content, "Solve it.\nQuestion: 2+2?");
    }

    #[test]
    fn label_examples_must_be_in_the_label_set() {
        let labels = vec!["joy".to_string(), "anger".to_string()];
        let err =
            Prompt::parse(FILE, Path::new("p.md"), "", &labels, TaskKind::Labels).unwrap_err();
        assert!(format!("{err:#}").contains("not in [task] labels"));
    }
}
