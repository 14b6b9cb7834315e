//! OpenAI Batch API files, for jobs bigger than one machine: the same request lines run
//! on the OpenAI Batch API and on `vllm run-batch`.
//!
//! Requests: `requests-NNNNN.jsonl`, one line a job,
//! `{"custom_id": "<id>::<sample>", "method": "POST", "url": "/v1/chat/completions", "body": {…}}`,
//! a new file every 50,000 lines or 200 MB (the Batch API's limits).
//! Results: output and error files, one line a request,
//! `{"custom_id": …, "response": {"status_code": 200, "body": {…}}, "error": null}`.

use super::labels::label_probs_at_answer;
use super::wire::{self, BodyProblem};
use super::{AnswerLocator, Job, JobResult, RetryCounts, Settings};
use crate::io::atomic::write_bytes;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const MAX_LINES: usize = 50_000;
pub const MAX_BYTES: usize = 200 * 1000 * 1000;

/// The id of a row in batch files: the input id, then the sample after the last `::`.
pub fn custom_id(id: &str, sample: u32) -> String {
    format!("{id}::{sample}")
}

fn parse_custom_id(s: &str) -> Option<(String, u32)> {
    let (id, sample) = s.rsplit_once("::")?;
    Some((id.to_string(), sample.parse().ok()?))
}

/// Write request files for `jobs` into `dir`; returns their paths.
pub fn write_requests(
    dir: &Path,
    model: &str,
    jobs: &[Job],
    settings: &Settings,
) -> Result<Vec<PathBuf>> {
    write_requests_limited(dir, model, jobs, settings, MAX_LINES, MAX_BYTES)
}

fn write_requests_limited(
    dir: &Path,
    model: &str,
    jobs: &[Job],
    settings: &Settings,
    max_lines: usize,
    max_bytes: usize,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut files = vec![];
    let (mut buf, mut lines) = (Vec::<u8>::new(), 0usize);
    let mut flush = |buf: &mut Vec<u8>, lines: &mut usize| -> Result<()> {
        if *lines == 0 {
            return Ok(());
        }
        let path = dir.join(format!("requests-{:05}.jsonl", files.len()));
        write_bytes(&path, buf)?;
        files.push(path);
        buf.clear();
        *lines = 0;
        Ok(())
    };
    for job in jobs {
        let line = json!({
            "custom_id": custom_id(&job.id, job.sample),
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": wire::request_body(model, &job.messages, job.seed, settings),
        })
        .to_string();
        if lines > 0 && (lines + 1 > max_lines || buf.len() + line.len() + 1 > max_bytes) {
            flush(&mut buf, &mut lines)?;
        }
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        lines += 1;
    }
    flush(&mut buf, &mut lines)?;
    Ok(files)
}

/// What reading the result files left over.
#[derive(Debug, Default)]
pub struct IngestOutcome {
    /// Lines that did not give a row, by cause (the status code, "error", "invalid_body").
    pub failures: RetryCounts,
    /// Jobs still without a row: request them again.
    pub unanswered: Vec<Job>,
}

/// Read Batch output and error files: every successful line for a job in `jobs` becomes a
/// row through `sink` (the first one, if a job appears twice); a prompt too long for the
/// context becomes a failed row; every other failure leaves its job in `unanswered`.
pub fn ingest(
    files: &[PathBuf],
    jobs: &[Job],
    settings: &Settings,
    locate_answer: AnswerLocator,
    sink: &mut dyn FnMut(Job, JobResult) -> Result<()>,
) -> Result<IngestOutcome> {
    let mut waiting: HashMap<(String, u32), &Job> =
        jobs.iter().map(|j| ((j.id.clone(), j.sample), j)).collect();
    let mut outcome = IngestOutcome::default();
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read batch result file {}", file.display()))?;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let where_ = || format!("{}:{}", file.display(), n + 1);
            let v: Value = serde_json::from_str(line).with_context(|| {
                format!("{} is not a JSON line\nhint: pass the Batch API's output and error files unchanged", where_())
            })?;
            let key = v
                .get("custom_id")
                .and_then(Value::as_str)
                .and_then(parse_custom_id)
                .with_context(|| {
                    format!("{}: no custom_id of the form <id>::<sample>", where_())
                })?;
            let Some(job) = waiting.get(&key).copied() else {
                continue; // done already, or not part of this run
            };
            match read_result(&v, settings, locate_answer) {
                Ok(result) => {
                    waiting.remove(&key);
                    let mut result = result;
                    if let Ok(reply) = &mut result {
                        reply.seed = job.seed;
                    }
                    sink(job.clone(), result)?;
                }
                Err(cause) => *outcome.failures.entry(cause).or_default() += 1,
            }
        }
    }
    // Unanswered jobs, in the order they were asked.
    outcome.unanswered = jobs
        .iter()
        .filter(|j| waiting.contains_key(&(j.id.clone(), j.sample)))
        .cloned()
        .collect();
    Ok(outcome)
}

/// One result line: a row (or a failed row), or the cause it gave nothing.
fn read_result(
    v: &Value,
    settings: &Settings,
    locate_answer: AnswerLocator,
) -> std::result::Result<JobResult, String> {
    let status = v
        .pointer("/response/status_code")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let body = v.pointer("/response/body").cloned().unwrap_or(Value::Null);
    if status == 200 {
        return match wire::parse_response(&body) {
            Ok(mut reply) => {
                reply.label_probs = label_probs_at_answer(&reply, locate_answer, &settings.labels);
                Ok(Ok(reply))
            }
            Err(BodyProblem::EmptyChoices) => Err("empty_choices".into()),
            Err(BodyProblem::Invalid(_)) => Err("invalid_body".into()),
        };
    }
    let body_text = body.to_string();
    let message = if body.is_null() {
        v.pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    } else {
        wire::error_message(&body_text)
    };
    let lower = message.to_lowercase();
    if lower.contains("context") && (lower.contains("exceed") || lower.contains("maximum")) {
        return Ok(Err(format!("prompt too long ({status}): {message}")));
    }
    Err(if status == 0 {
        "error".into()
    } else {
        status.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(n: usize) -> Vec<Job> {
        (0..n)
            .map(|i| Job {
                id: format!("q::{i}"),
                sample: (i % 2) as u32,
                messages: vec![super::super::ChatMessage::new("user", "x".repeat(100))],
                seed: Some(i as u64),
            })
            .collect()
    }

    fn settings() -> Settings {
        Settings {
            max_tokens: 32,
            temperature: 0.0,
            token_topk: 0,
            labels: vec![],
        }
    }

    #[test]
    fn custom_ids_survive_colons_in_ids() {
        assert_eq!(
            parse_custom_id(&custom_id("a::b", 3)),
            Some(("a::b".into(), 3))
        );
        assert_eq!(parse_custom_id("nosample"), None);
    }

    #[test]
    fn request_files_split_by_lines_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let files =
            write_requests_limited(dir.path(), "m", &jobs(7), &settings(), 3, usize::MAX).unwrap();
        assert_eq!(files.len(), 3, "7 lines at 3 a file");
        let first = std::fs::read_to_string(&files[0]).unwrap();
        let line: Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
        assert_eq!(line["custom_id"], "q::0::0");
        assert_eq!(line["url"], "/v1/chat/completions");
        assert_eq!(line["body"]["model"], "m");

        let dir = tempfile::tempdir().unwrap();
        let files =
            write_requests_limited(dir.path(), "m", &jobs(4), &settings(), 100, 500).unwrap();
        assert_eq!(
            files.len(),
            4,
            "each ~250-byte line alone under a 500-byte cap"
        );
    }

    #[test]
    fn results_become_rows_and_failures_are_left_over() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        let ok = |cid: &str| {
            json!({"custom_id": cid, "response": {"status_code": 200, "body": {
                "choices": [{"message": {"content": "Answer: 4"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3}}}, "error": null})
            .to_string()
        };
        let failed = json!({"custom_id": "q::1::1", "response": {"status_code": 500, "body": {}}, "error": null});
        let long = json!({"custom_id": "q::2::0", "response": {"status_code": 400, "body":
            {"error": {"message": "This model's maximum context length is 2048 tokens"}}}, "error": null});
        std::fs::write(
            &out,
            format!("{}\n{failed}\n{long}\n{}\n", ok("q::0::0"), ok("q::0::0")),
        )
        .unwrap();
        let mut got = vec![];
        let outcome = ingest(
            &[out],
            &jobs(3),
            &settings(),
            &|_: &str| None,
            &mut |j, r| {
                got.push((j.id, r.is_ok()));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            got,
            vec![("q::0".to_string(), true), ("q::2".to_string(), false)]
        );
        assert_eq!(outcome.failures.get("500"), Some(&1));
        assert_eq!(outcome.unanswered.len(), 1);
        assert_eq!(outcome.unanswered[0].id, "q::1");
    }
}
