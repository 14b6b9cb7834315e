//! The API teacher: any OpenAI-compatible chat-completions server (vLLM, llama.cpp,
//! OpenAI). The only file that imports reqwest.
//!
//! Up to `max_in_flight` requests run at once, paced by the requests- and tokens-per-minute
//! limits. A failed request is retried with jittered exponential backoff that waits at least
//! what `Retry-After` asks; 400/401/403/404 and 429 `insufficient_quota` stop the run with a
//! message saying what to fix, and a prompt longer than the context fails only its row. The
//! API key is read from the environment variable the config names and is scrubbed from every
//! message that could echo it.

use super::echo::{self, EchoProblem, Prompt};
use super::labels::label_probs_at_answer;
use super::scoring::{PositionScore, ScoreRequest, TokenTexts};
use super::wire::{self, BodyProblem};
use super::{
    AnswerLocator, ChatMessage, Job, JobResult, Reply, RetryCounts, Settings, Teacher, TeacherError,
};
use crate::config::TeacherConfig;
use anyhow::{bail, Context, Result};
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

pub struct ApiTeacher {
    inner: Arc<Client>,
    runtime: tokio::runtime::Runtime,
    max_in_flight: usize,
}

/// Everything a request task needs, shared by all of them.
struct Client {
    model: String,
    url: String,
    /// `/completions`, for scoring given sequences (`ApiTeacher::score`).
    completions_url: String,
    key: Option<String>,
    http: reqwest::Client,
    pacer: Pacer,
    max_retries: u32,
    retry_base: Duration,
}

/// How one HTTP attempt failed.
enum Failure {
    /// Worth another try; `kind` counts it in the report, `after` is the server's wish.
    Retry {
        kind: &'static str,
        after: Option<Duration>,
        message: String,
    },
    /// Only this row fails (a prompt longer than the context).
    Row(String),
    /// The run cannot go on (bad key, wrong model, no quota).
    Fatal(String),
}

const BACKOFF_CAP: Duration = Duration::from_secs(60);

impl ApiTeacher {
    /// Connect to the configured server and check that it serves the model.
    pub fn open(cfg: &TeacherConfig) -> Result<Self> {
        let base = cfg
            .base_url
            .as_deref()
            .context("[teacher] kind = \"openai\" needs base_url")?
            .trim_end_matches('/')
            .to_string();
        let key = match &cfg.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.is_empty() => Some(k),
                _ => bail!(
                    "[teacher] api_key_env names {var}, but that environment variable is not set\nhint: export {var}=<your key> before running kdpipe"
                ),
            },
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(cfg.timeout_s))
            .connect_timeout(Duration::from_secs_f64(cfg.timeout_s.min(10.0)))
            .build()
            .context("cannot build the HTTP client")?;
        let client = Client {
            model: cfg.model.clone(),
            url: format!("{base}/chat/completions"),
            completions_url: format!("{base}/completions"),
            key,
            http,
            pacer: Pacer::new(cfg.requests_per_minute, cfg.tokens_per_minute),
            max_retries: cfg.max_retries,
            retry_base: Duration::from_secs_f64(cfg.retry_base_s.max(0.0)),
        };
        runtime.block_on(client.check_model(&base))?;
        Ok(ApiTeacher {
            inner: Arc::new(client),
            runtime,
            max_in_flight: cfg.max_in_flight.max(1),
        })
    }
}

impl Teacher for ApiTeacher {
    fn id(&self) -> &str {
        &self.inner.model
    }

    fn backend(&self) -> &'static str {
        "openai"
    }

    fn answer_all(
        &self,
        jobs: Vec<Job>,
        settings: &Settings,
        locate_answer: AnswerLocator,
        sink: &mut dyn FnMut(Job, JobResult) -> Result<()>,
    ) -> Result<RetryCounts> {
        let settings = Arc::new(settings.clone());
        self.runtime.block_on(async {
            let mut retries = RetryCounts::new();
            let mut pending = jobs.into_iter();
            let mut running = JoinSet::new();
            loop {
                while running.len() < self.max_in_flight {
                    let Some(job) = pending.next() else { break };
                    let (client, settings) = (self.inner.clone(), settings.clone());
                    running.spawn(async move {
                        let (outcome, counts) = client.answer(&job, &settings).await;
                        (job, outcome, counts)
                    });
                }
                let Some(done) = running.join_next().await else {
                    break;
                };
                let (job, outcome, counts) = done.context("a request task panicked")?;
                for (kind, n) in counts {
                    *retries.entry(kind).or_default() += n;
                }
                let result = match outcome {
                    Ok(Ok(mut reply)) => {
                        reply.label_probs =
                            label_probs_at_answer(&reply, locate_answer, &settings.labels);
                        Ok(reply)
                    }
                    Ok(Err(row_failure)) => Err(row_failure),
                    Err(fatal) => {
                        running.abort_all();
                        return Err(anyhow::Error::new(fatal)
                            .context(format!("teacher API failed on input id {:?}", job.id)));
                    }
                };
                sink(job, result)?;
            }
            Ok(retries)
        })
    }

    fn count_prompt_tokens(&self, _messages: &[ChatMessage]) -> Result<Option<usize>> {
        Ok(None)
    }
}

impl ApiTeacher {
    /// The teacher's log-probability and top-`top` alternatives at every token of each
    /// continuation (`scoring`), through the server's `/completions` with `echo` and
    /// `logprobs` (`echo`): one request a sequence, up to `max_in_flight` at once, retried
    /// as answers are. The prompt goes as token ids; a server that takes text only
    /// (llama-cpp-python's) gets each sequence decoded by `tokenizer`, and every
    /// continuation token is checked against the server's tokens. Alternatives are mapped
    /// to ids through `texts` (the student's tokenizer: teacher and student share one).
    pub fn score(
        &self,
        requests: &[ScoreRequest],
        top: usize,
        tokenizer: &tokenizers::Tokenizer,
        texts: &TokenTexts,
    ) -> Result<Vec<Vec<PositionScore>>> {
        let client = &self.inner;
        let url = &client.completions_url;
        let sequences: Vec<Vec<u32>> = requests
            .iter()
            .map(|r| [r.prompt, r.continuation].concat())
            .collect();
        let Some(first) = sequences.first() else {
            return Ok(Vec::new());
        };
        let no_prompt_logprobs = |why: &str| {
            anyhow::anyhow!(
                "the teacher API at {url} returns no log-probabilities for prompt tokens ({why}), which scoring given sequences needs\nhint: serve the teacher with vLLM, or with llama-cpp-python's server and --logits_all true; llama.cpp's own server and chat-only APIs cannot score"
            )
        };
        let body_of = |ids: &[u32], text_only: bool| -> Result<serde_json::Value> {
            let prompt = if text_only {
                let text = tokenizer
                    .decode(ids, false)
                    .map_err(|e| anyhow::anyhow!("cannot decode a sequence to score: {e}"))?;
                Prompt::Text(text)
            } else {
                Prompt::Ids(ids)
            };
            Ok(echo::request_body(&client.model, &prompt, top))
        };
        // One request first: whether the server takes token ids (llama-cpp-python answers
        // ids with a 500 listing "Input should be a valid string" at ('body', 'prompt')),
        // and whether it returns prompt log-probabilities at all (it refuses them with a
        // 500 when started without logits_all), so neither costs a round of retries. Its
        // answer, when it is one, is the first sequence's.
        let (text_only, first_response) = self.runtime.block_on(async {
            let refuses_ids = |m: &str| m.contains("prompt") && m.contains("string");
            let mut text_only = false;
            let mut probe = client.post(url, &body_of(first, false)?).await;
            if let Err(Failure::Fatal(m) | Failure::Retry { message: m, .. }) = &probe {
                if refuses_ids(m) {
                    text_only = true;
                    probe = client.post(url, &body_of(first, true)?).await;
                }
            }
            match probe {
                // vLLM: "Requested sample logprobs of 50, which is greater than max
                // allowed: 20".
                Err(Failure::Fatal(m) | Failure::Retry { message: m, .. })
                    if m.contains("logprobs") && m.contains("max") =>
                {
                    Err(anyhow::anyhow!(
                        "the teacher API at {url} returns fewer alternatives a token than the {top} asked: {}\nhint: ask for fewer, or raise the server's limit (vLLM: --max-logprobs {top})",
                        client.scrub(&m)
                    ))
                }
                Err(Failure::Fatal(m) | Failure::Retry { message: m, .. })
                    if m.contains("logprobs") =>
                {
                    Err(no_prompt_logprobs(&client.scrub(&m)))
                }
                probe => Ok((text_only, probe.ok())),
            }
        })?;
        if text_only {
            tracing::info!(
                "{url} takes text prompts only: sequences go as text and are checked token by token"
            );
        }
        let responses = self.runtime.block_on(async {
            let mut responses: Vec<Option<serde_json::Value>> = vec![None; sequences.len()];
            responses[0] = first_response;
            let mut pending = sequences
                .iter()
                .enumerate()
                .filter(|(i, _)| responses[*i].is_none())
                .collect::<Vec<_>>()
                .into_iter();
            let mut running = JoinSet::new();
            loop {
                while running.len() < self.max_in_flight {
                    let Some((i, ids)) = pending.next() else {
                        break;
                    };
                    let body = body_of(ids, text_only)?;
                    let (client, estimate) = (self.inner.clone(), ids.len());
                    running.spawn(async move {
                        let label = format!("scored sequence {i}");
                        let url = client.completions_url.clone();
                        let (outcome, _) = client
                            .with_retries(&label, estimate, || client.post(&url, &body))
                            .await;
                        (i, outcome)
                    });
                }
                let Some(done) = running.join_next().await else {
                    break;
                };
                let (i, outcome) = done.context("a scoring task panicked")?;
                match outcome {
                    Ok(Ok(json)) => responses[i] = Some(json),
                    Ok(Err(row)) => {
                        running.abort_all();
                        bail!("the teacher API could not score sequence {i}: {row}");
                    }
                    Err(fatal) => {
                        running.abort_all();
                        return Err(anyhow::Error::new(fatal)
                            .context(format!("the teacher API failed on scored sequence {i}")));
                    }
                }
            }
            Ok(responses)
        })?;
        responses
            .iter()
            .zip(requests)
            .enumerate()
            .map(|(i, (json, r))| {
                let json = json.as_ref().context("a scored sequence got no response")?;
                echo::parse_scores(json, r.continuation, texts, top).map_err(|p| match p {
                    EchoProblem::NoPromptLogprobs(why) => no_prompt_logprobs(&why),
                    EchoProblem::Mismatch(m) => anyhow::anyhow!(
                        "scored sequence {i}: {m}\nhint: a server that takes token ids (vLLM) scores exactly the student's tokens"
                    ),
                    EchoProblem::Invalid(m) => {
                        anyhow::anyhow!("scored sequence {i}: unreadable response: {m}")
                    }
                })
            })
            .collect()
    }
}

impl Client {
    /// Fail early and clearly when the server is unreachable, refuses the key or does not
    /// serve the model. A server without `/models` is given the benefit of the doubt.
    async fn check_model(&self, base: &str) -> Result<()> {
        let url = format!("{base}/models");
        let mut req = self.http.get(&url);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the teacher API at {base}: {}\nhint: is the server running? check [teacher] base_url",
                self.scrub(&error_chain(&e))
            )
        })?;
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        match status {
            200 => {
                let served: Vec<String> = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| {
                        v.get("data")?.as_array().map(|a| {
                            a.iter()
                                .filter_map(|m| m.get("id")?.as_str().map(str::to_string))
                                .collect()
                        })
                    })
                    .unwrap_or_default();
                if !served.is_empty() && !served.contains(&self.model) {
                    bail!(
                        "the teacher API at {base} does not serve model {:?}; it serves: {}\nhint: set [teacher] model to one of them",
                        self.model,
                        served.join(", ")
                    );
                }
                Ok(())
            }
            401 | 403 => bail!(
                "the teacher API at {base} refused the API key ({status}): {}\nhint: check the key in the environment variable named by [teacher] api_key_env",
                self.scrub(&wire::error_message(&body))
            ),
            _ => {
                tracing::warn!("GET {url} answered {status}; not checking the model name");
                Ok(())
            }
        }
    }

    /// One job with retries: the reply or a row failure, or a fatal error; plus the
    /// retries it took, by cause.
    async fn answer(
        &self,
        job: &Job,
        settings: &Settings,
    ) -> (Result<JobResult, TeacherError>, RetryCounts) {
        let body = wire::request_body(&self.model, &job.messages, job.seed, settings);
        let estimate = estimate_tokens(&job.messages) + settings.max_tokens;
        let label = format!("{}#{}", job.id, job.sample);
        let (outcome, counts) = self
            .with_retries(&label, estimate, || self.send(&body))
            .await;
        let outcome = outcome.map(|r| {
            r.map(|mut reply| {
                reply.seed = job.seed;
                reply
            })
        });
        (outcome, counts)
    }

    /// `attempt` until it succeeds, fails only its row, fails for good, or has failed
    /// `max_retries` times more, with jittered exponential backoff (at least what the
    /// server asked) between tries; plus the retries it took, by cause.
    async fn with_retries<T, Attempt>(
        &self,
        label: &str,
        estimated_tokens: usize,
        mut attempt: impl FnMut() -> Attempt,
    ) -> (Result<Result<T, String>, TeacherError>, RetryCounts)
    where
        Attempt: std::future::Future<Output = Result<T, Failure>>,
    {
        let mut counts = RetryCounts::new();
        let mut tries = 0u32;
        loop {
            self.pacer.wait(estimated_tokens).await;
            let (kind, after, message) = match attempt().await {
                Ok(value) => return (Ok(Ok(value)), counts),
                Err(Failure::Row(m)) => return (Ok(Err(m)), counts),
                Err(Failure::Fatal(m)) => return (Err(TeacherError::Fatal(m)), counts),
                Err(Failure::Retry {
                    kind,
                    after,
                    message,
                }) => (kind, after, message),
            };
            *counts.entry(kind.to_string()).or_default() += 1;
            if tries >= self.max_retries {
                let m = format!(
                    "gave up after {} retries; last failure ({kind}): {message}\nhint: rows written so far are kept; rerun the same command to resume",
                    self.max_retries
                );
                return (Err(TeacherError::Fatal(m)), counts);
            }
            tracing::debug!("retrying {label} after {kind}: {message}");
            let wait = backoff(self.retry_base, tries).max(after.unwrap_or_default());
            tokio::time::sleep(wait).await;
            tries += 1;
        }
    }

    /// One chat-completions attempt.
    async fn send(&self, body: &serde_json::Value) -> Result<Reply, Failure> {
        let started = Instant::now();
        let json = self.post(&self.url, body).await?;
        let mut reply = wire::parse_response(&json).map_err(|p| match p {
            BodyProblem::EmptyChoices => Failure::Retry {
                kind: "empty_choices",
                after: None,
                message: "no choices in the response".into(),
            },
            BodyProblem::Invalid(m) => Failure::Retry {
                kind: "invalid_body",
                after: None,
                message: m,
            },
        })?;
        reply.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(reply)
    }

    /// One HTTP attempt: the response's JSON, or how it failed.
    async fn post(
        &self,
        url: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, Failure> {
        let mut req = self.http.post(url).json(body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        let retry = |kind, message: String| Failure::Retry {
            kind,
            after: None,
            message,
        };
        let resp = req.send().await.map_err(|e| {
            let kind = if e.is_timeout() {
                "timeout"
            } else {
                "connection"
            };
            retry(kind, self.scrub(&error_chain(&e)))
        })?;
        let status = resp.status().as_u16();
        let after = retry_after(resp.headers());
        let bytes = resp.bytes().await.map_err(|e| {
            let kind = if e.is_timeout() {
                "timeout"
            } else {
                "truncated_body"
            };
            retry(kind, self.scrub(&error_chain(&e)))
        })?;
        let text = String::from_utf8_lossy(&bytes);
        if !(200..300).contains(&status) {
            return Err(self.classify(status, &text, after));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| retry("invalid_body", format!("response is not JSON: {e}")))
    }

    fn classify(&self, status: u16, body: &str, after: Option<Duration>) -> Failure {
        let message = self.scrub(&wire::error_message(body));
        let code = wire::error_code(body).unwrap_or_default();
        let lower = message.to_lowercase();
        let too_long = code == "context_length_exceeded"
            || (lower.contains("context")
                && ["exceed", "maximum", "too long", "longer than"]
                    .iter()
                    .any(|w| lower.contains(w)));
        match status {
            429 if code == "insufficient_quota" => Failure::Fatal(format!(
                "the API account has no quota left (429 insufficient_quota): {message}\nhint: add credit or raise the limit, then rerun: rows written so far are kept"
            )),
            429 => Failure::Retry {
                kind: "rate_limited",
                after,
                message,
            },
            400 | 413 | 422 if too_long => Failure::Row(format!("prompt too long ({status}): {message}")),
            401 | 403 => Failure::Fatal(format!(
                "the API refused the key ({status}): {message}\nhint: check the key in the environment variable named by [teacher] api_key_env"
            )),
            404 => Failure::Fatal(format!(
                "not found (404): {message}\nhint: check [teacher] base_url (it ends in /v1) and model"
            )),
            400 | 405 | 413 | 422 => Failure::Fatal(format!(
                "the API rejected the request ({status}): {message}\nhint: check the [teacher] settings (model, max_tokens, temperature)"
            )),
            408 => Failure::Retry {
                kind: "timeout",
                after,
                message,
            },
            409 | 500..=599 => Failure::Retry {
                kind: "server_error",
                after,
                message: format!("{status}: {message}"),
            },
            _ => Failure::Fatal(format!("unexpected status {status}: {message}")),
        }
    }

    /// Remove the key from text that may echo it (server error bodies, URLs).
    fn scrub(&self, text: &str) -> String {
        match &self.key {
            Some(k) if k.len() >= 4 => text.replace(k.as_str(), "[redacted]"),
            _ => text.to_string(),
        }
    }
}

/// The error with its sources: reqwest's top-level message alone hides the cause.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `Retry-After` in seconds, or OpenAI's `retry-after-ms`.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    if let Some(ms) = get("retry-after-ms") {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    get("retry-after").map(|s| Duration::from_secs_f64(s.clamp(0.0, 3600.0)))
}

/// Exponential backoff with "equal jitter": between half and all of base·2^attempt, capped.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let full = base
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_CAP);
    full.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// A rough token count for rate limiting: 4 characters a token, 4 tokens a message.
pub fn estimate_tokens(messages: &[ChatMessage]) -> usize {
    messages
        .iter()
        .map(|m| m.content.chars().count().div_ceil(4) + 4)
        .sum()
}

/// Spaces requests so that neither the requests- nor the tokens-per-minute limit is
/// passed: each request takes its share of a minute from each limit, one after another.
struct Pacer {
    request_interval: Option<Duration>,
    tokens_per_minute: Option<u32>,
    next_free: Mutex<Instant>,
}

impl Pacer {
    fn new(requests_per_minute: Option<u32>, tokens_per_minute: Option<u32>) -> Self {
        Pacer {
            request_interval: requests_per_minute
                .filter(|r| *r > 0)
                .map(|r| Duration::from_secs_f64(60.0 / r as f64)),
            tokens_per_minute: tokens_per_minute.filter(|t| *t > 0),
            next_free: Mutex::new(Instant::now()),
        }
    }

    async fn wait(&self, tokens: usize) {
        let token_interval = self
            .tokens_per_minute
            .map(|tpm| Duration::from_secs_f64(60.0 * tokens as f64 / tpm as f64));
        let interval = match (self.request_interval, token_interval) {
            (None, None) => return,
            (a, b) => a.unwrap_or_default().max(b.unwrap_or_default()),
        };
        let start = {
            let mut next = self.next_free.lock().await;
            let start = (*next).max(Instant::now());
            *next = start + interval;
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let base = Duration::from_secs(1);
        for attempt in 0..4 {
            let d = backoff(base, attempt).as_secs_f64();
            let full = 2f64.powi(attempt as i32);
            assert!(d >= full / 2.0 && d <= full, "attempt {attempt}: {d}");
        }
        assert!(backoff(base, 30) <= BACKOFF_CAP);
    }

    #[test]
    fn retry_after_reads_seconds_and_ms() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
    }

    fn client(key: Option<&str>) -> Client {
        Client {
            model: "m".into(),
            url: "http://x/v1/chat/completions".into(),
            completions_url: "http://x/v1/completions".into(),
            key: key.map(str::to_string),
            http: reqwest::Client::new(),
            pacer: Pacer::new(None, None),
            max_retries: 1,
            retry_base: Duration::from_millis(1),
        }
    }

    #[test]
    fn statuses_are_classified() {
        let c = client(Some("sk-secret-123"));
        let quota = r#"{"error":{"message":"quota","code":"insufficient_quota"}}"#;
        assert!(matches!(c.classify(429, quota, None), Failure::Fatal(_)));
        assert!(matches!(
            c.classify(429, "{}", Some(Duration::from_secs(1))),
            Failure::Retry {
                kind: "rate_limited",
                after: Some(_),
                ..
            }
        ));
        let long =
            r#"{"error":{"message":"Requested tokens (3000) exceed context window of 2048"}}"#;
        assert!(matches!(c.classify(400, long, None), Failure::Row(_)));
        assert!(matches!(c.classify(400, "{}", None), Failure::Fatal(_)));
        assert!(matches!(
            c.classify(503, "", None),
            Failure::Retry {
                kind: "server_error",
                ..
            }
        ));
        let echo = r#"{"error":{"message":"Incorrect API key provided: sk-secret-123"}}"#;
        match c.classify(401, echo, None) {
            Failure::Fatal(m) => assert!(
                !m.contains("sk-secret-123") && m.contains("[redacted]"),
                "{m}"
            ),
            _ => panic!("401 must stop the run"),
        }
    }

    #[tokio::test]
    async fn pacer_spaces_requests() {
        // 600 requests a minute: one every 100 ms, so the third starts ≥ 200 ms after the first.
        let p = Pacer::new(Some(600), None);
        let t0 = Instant::now();
        for _ in 0..3 {
            p.wait(1).await;
        }
        assert!(t0.elapsed() >= Duration::from_millis(200));
    }
}
