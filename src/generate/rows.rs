//! From a teacher's reply to a Parquet row: parse the answer, attach the best soft label
//! the backend gave, and record where the row came from. Also the vote share over the k
//! samples of an input, computed once all of them are in.

use crate::records::{
    InputRow, TeacherRow, TokenTopk, SOFT_LABEL_SCORES, SOFT_NONE, SOFT_TOKEN_TOPK, SOFT_VOTE_SHARE,
};
use crate::task::{ParseStatus, Task};
use crate::teacher::{Job, JobResult, Settings, Token, TokenChoice};
use std::collections::HashMap;

/// What every row of a run shares.
pub struct RowContext<'a> {
    pub task: &'a Task,
    pub settings: &'a Settings,
    pub backend: String,
    pub teacher: String,
    pub prompt_name: String,
    pub prompt_hash: String,
    /// The fingerprint of the vocabulary the teacher's token ids index ("" for APIs).
    pub vocab: String,
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl RowContext<'_> {
    pub fn row(&self, job: &Job, input: &InputRow, result: JobResult) -> TeacherRow {
        let mut row = TeacherRow {
            id: job.id.clone(),
            sample: job.sample,
            input: input.input.clone(),
            gold: input
                .gold
                .as_deref()
                .map(|g| self.task.normalize_gold(g).unwrap_or_else(|| g.to_string())),
            raw: String::new(),
            rationale: None,
            answer: None,
            status: String::new(),
            soft_kind: SOFT_NONE.into(),
            soft_labels: vec![],
            soft_probs: vec![],
            soft_coverage: None,
            tokens: TokenTopk::default(),
            prompt_tokens: 0,
            completion_tokens: 0,
            finish_reason: String::new(),
            latency_ms: 0.0,
            backend: self.backend.clone(),
            teacher: self.teacher.clone(),
            prompt_name: self.prompt_name.clone(),
            prompt_hash: self.prompt_hash.clone(),
            temperature: self.settings.temperature,
            max_tokens: self.settings.max_tokens as u32,
            seed: job.seed,
            created_unix_ms: now_unix_ms(),
        };
        let reply = match result {
            Ok(reply) => reply,
            Err(message) => {
                row.raw = message;
                row.status = ParseStatus::RequestFailed.as_str().into();
                row.finish_reason = "error".into();
                return row;
            }
        };
        let mut parsed = self
            .task
            .parse_rationale_output(&reply.text, reply.finish_reason == "length");
        if let Some(probs) = reply
            .label_probs
            .filter(|p| p.len() == self.settings.labels.len())
        {
            let coverage: f64 = probs.iter().sum();
            parsed.rescue_with_label_scores(&self.settings.labels, &probs);
            row.soft_kind = SOFT_LABEL_SCORES.into();
            row.soft_labels = self.settings.labels.clone();
            row.soft_probs = probs;
            row.soft_coverage = Some(coverage);
        }
        row.tokens = token_topk(&reply.tokens, self.settings.token_topk);
        if !row.tokens.logprobs.is_empty() {
            // Every backend reports the model's own distribution, whatever it sampled at.
            row.tokens.temperature = Some(1.0);
        }
        if !row.tokens.ids.is_empty() {
            row.tokens.vocab = self.vocab.clone();
        }
        if row.soft_kind == SOFT_NONE && !row.tokens.logprobs.is_empty() {
            row.soft_kind = SOFT_TOKEN_TOPK.into();
        }
        row.raw = reply.text;
        row.rationale = parsed.rationale;
        row.answer = parsed.answer;
        row.status = parsed.status.as_str().into();
        row.prompt_tokens = reply.prompt_tokens;
        row.completion_tokens = reply.completion_tokens;
        row.finish_reason = reply.finish_reason;
        row.latency_ms = reply.latency_ms;
        row.seed = reply.seed.or(job.seed);
        row
    }
}

/// Token alternatives in the row's column layout, k kept per token.
fn token_topk(tokens: &[TokenChoice], k: usize) -> TokenTopk {
    let mut out = TokenTopk::default();
    if k == 0 {
        return out;
    }
    for t in tokens {
        out.logprobs.push(t.logprob);
        let top = &t.top[..t.top.len().min(k)];
        out.top_logprobs.push(top.iter().map(|(_, l)| *l).collect());
        match &t.token {
            Token::Id(id) => {
                out.ids.push(*id);
                out.top_ids.push(
                    top.iter()
                        .filter_map(|(t, _)| match t {
                            Token::Id(i) => Some(*i),
                            Token::Text(_) => None,
                        })
                        .collect(),
                );
            }
            Token::Text(text) => {
                out.texts.push(text.clone());
                out.top_texts.push(
                    top.iter()
                        .map(|(t, _)| match t {
                            Token::Text(s) => s.clone(),
                            Token::Id(i) => i.to_string(),
                        })
                        .collect(),
                );
            }
        }
    }
    out
}

/// With k > 1 samples an input, each row whose best soft label so far is none (or an
/// earlier vote share) gets the share of each answer among the input's usable samples,
/// most voted first; coverage is the share of samples that were usable.
pub fn add_vote_shares(rows: &mut [TeacherRow], samples: usize) {
    if samples < 2 {
        return;
    }
    let mut by_id: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        by_id.entry(r.id.clone()).or_default().push(i);
    }
    for members in by_id.values() {
        let mut counts: Vec<(String, usize)> = vec![];
        for &i in members {
            let r = &rows[i];
            if let (true, Some(a)) = (ParseStatus::usable(&r.status), &r.answer) {
                match counts.iter_mut().find(|(x, _)| x == a) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((a.clone(), 1)),
                }
            }
        }
        let usable: usize = counts.iter().map(|(_, n)| n).sum();
        if usable == 0 {
            continue;
        }
        // Most votes first; ties in order of first appearance (stable sort).
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        for &i in members {
            let r = &mut rows[i];
            if r.soft_kind == SOFT_NONE || r.soft_kind == SOFT_VOTE_SHARE {
                r.soft_kind = SOFT_VOTE_SHARE.into();
                r.soft_labels = counts.iter().map(|(a, _)| a.clone()).collect();
                r.soft_probs = counts
                    .iter()
                    .map(|(_, n)| *n as f64 / usable as f64)
                    .collect();
                r.soft_coverage = Some(usable as f64 / members.len() as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TaskConfig, TaskKind};
    use crate::teacher::Reply;

    fn task() -> Task {
        Task::from_config(&TaskConfig {
            kind: TaskKind::Labels,
            labels: vec!["joy".into(), "anger".into()],
            tolerance: 1e-6,
            description: String::new(),
            prompt: None,
        })
    }

    fn settings() -> Settings {
        Settings {
            max_tokens: 64,
            temperature: 0.7,
            token_topk: 0,
            labels: vec!["joy".into(), "anger".into()],
        }
    }

    fn job(sample: u32) -> Job {
        Job {
            id: "a".into(),
            sample,
            messages: vec![],
            seed: Some(7),
        }
    }

    fn ctx<'a>(task: &'a Task, settings: &'a Settings) -> RowContext<'a> {
        RowContext {
            task,
            settings,
            backend: "openai".into(),
            teacher: "m".into(),
            prompt_name: "labels".into(),
            prompt_hash: "h".into(),
            vocab: String::new(),
        }
    }

    fn input() -> InputRow {
        InputRow {
            id: "a".into(),
            input: "I won!".into(),
            gold: Some("joy".into()),
        }
    }

    #[test]
    fn answer_outside_the_set_is_rescued_by_label_scores() {
        let (t, s) = (task(), settings());
        let reply = Reply {
            text: "Winning feels good.\nAnswer: happiness".into(),
            finish_reason: "stop".into(),
            label_probs: Some(vec![0.6, 0.1]),
            ..Reply::default()
        };
        let row = ctx(&t, &s).row(&job(0), &input(), Ok(reply));
        assert_eq!(row.status, "rescued");
        assert_eq!(row.answer.as_deref(), Some("joy"));
        assert_eq!(row.soft_kind, SOFT_LABEL_SCORES);
        assert!((row.soft_coverage.unwrap() - 0.7).abs() < 1e-12);
        assert_eq!(row.seed, Some(7));
    }

    #[test]
    fn failed_request_is_a_row_with_the_error() {
        let (t, s) = (task(), settings());
        let row = ctx(&t, &s).row(&job(0), &input(), Err("prompt too long".into()));
        assert_eq!(row.status, "request_failed");
        assert_eq!(row.raw, "prompt too long");
        assert!(!ParseStatus::usable(&row.status));
    }

    #[test]
    fn vote_share_counts_usable_samples() {
        let (t, s) = (task(), settings());
        let c = ctx(&t, &s);
        let reply = |ans: &str| Reply {
            text: format!("Because.\nAnswer: {ans}"),
            finish_reason: "stop".into(),
            ..Reply::default()
        };
        let mut rows = vec![
            c.row(&job(0), &input(), Ok(reply("joy"))),
            c.row(&job(1), &input(), Ok(reply("anger"))),
            c.row(&job(2), &input(), Ok(reply("joy"))),
            c.row(&job(3), &input(), Err("boom".into())),
        ];
        add_vote_shares(&mut rows, 4);
        // 3 usable samples: joy 2/3, anger 1/3; 3 of 4 samples usable.
        for r in &rows {
            assert_eq!(r.soft_kind, SOFT_VOTE_SHARE);
            assert_eq!(r.soft_labels, vec!["joy", "anger"]);
            assert!((r.soft_probs[0] - 2.0 / 3.0).abs() < 1e-12);
            assert!((r.soft_coverage.unwrap() - 0.75).abs() < 1e-12);
        }
    }
}
