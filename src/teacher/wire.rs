//! The OpenAI chat-completions JSON: the request body kdpipe sends (over HTTP or in batch
//! files) and the parts of a response it reads. No I/O here.

use super::{Reply, Settings, Token, TokenChoice};
use crate::chat::ChatMessage;
use serde_json::{json, Value};

/// Alternatives asked for at every token: the API's maximum when labels are scored at the
/// answer position (more alternatives, more of the label set covered).
pub fn top_logprobs_wanted(settings: &Settings) -> usize {
    if settings.labels.is_empty() {
        settings.token_topk
    } else {
        20
    }
}

/// The chat-completions request body for one job.
pub fn request_body(
    model: &str,
    messages: &[ChatMessage],
    seed: Option<u64>,
    settings: &Settings,
) -> Value {
    let mut body = json!({
        "model": model,
        "messages": messages,
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
    });
    if let Some(seed) = seed {
        // Servers read the seed as a signed 64-bit or smaller integer.
        body["seed"] = json!(seed & 0x7fff_ffff);
    }
    let k = top_logprobs_wanted(settings);
    if k > 0 {
        body["logprobs"] = json!(true);
        body["top_logprobs"] = json!(k);
    }
    body
}

/// Why a response body could not be used; both are worth a retry.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyProblem {
    /// Not JSON, or JSON without the expected fields.
    Invalid(String),
    /// Valid JSON with no choices.
    EmptyChoices,
}

/// Read a chat-completions response: text, finish reason, usage and token logprobs.
/// Latency and label probabilities are filled in by the caller.
pub fn parse_response(body: &Value) -> Result<Reply, BodyProblem> {
    let choices = body
        .get("choices")
        .and_then(Value::as_array)
        .ok_or_else(|| BodyProblem::Invalid("no `choices` array in the response".into()))?;
    let choice = choices.first().ok_or(BodyProblem::EmptyChoices)?;
    let text = choice
        .pointer("/message/content")
        .and_then(Value::as_str)
        .ok_or_else(|| BodyProblem::Invalid("no `message.content` in the first choice".into()))?
        .to_string();
    let finish_reason = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let usage = |k: &str| {
        body.pointer(&format!("/usage/{k}"))
            .and_then(Value::as_u64)
            .unwrap_or(0) as u32
    };
    let tokens = choice
        .pointer("/logprobs/content")
        .and_then(Value::as_array)
        .map(|items| items.iter().filter_map(token_choice).collect())
        .unwrap_or_default();
    Ok(Reply {
        text,
        finish_reason,
        prompt_tokens: usage("prompt_tokens"),
        completion_tokens: usage("completion_tokens"),
        tokens,
        ..Reply::default()
    })
}

/// One entry of `logprobs.content`: API logprobs are natural logs already.
fn token_choice(item: &Value) -> Option<TokenChoice> {
    let text = |v: &Value| v.get("token").and_then(Value::as_str).map(str::to_string);
    let logprob = |v: &Value| v.get("logprob").and_then(Value::as_f64).map(|l| l as f32);
    let top = item
        .get("top_logprobs")
        .and_then(Value::as_array)
        .map(|alts| {
            alts.iter()
                .filter_map(|a| Some((Token::Text(text(a)?), logprob(a)?)))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    Some(TokenChoice {
        token: Token::Text(text(item)?),
        logprob: logprob(item).unwrap_or(f32::NEG_INFINITY),
        top,
    })
}

/// The error message inside an API error body (`{"error": {"message": ...}}`), or the body.
pub fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            let e = v.get("error")?;
            e.get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| e.as_str().map(str::to_string))
        })
        .or_else(|| {
            serde_json::from_str::<Value>(body)
                .ok()?
                .get("detail")
                .map(|d| d.to_string())
        })
        .unwrap_or_else(|| body.chars().take(300).collect())
}

/// The error code of an API error body (`insufficient_quota`, `context_length_exceeded`).
pub fn error_code(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    let e = v.get("error")?;
    e.get("code")
        .and_then(Value::as_str)
        .or_else(|| e.get("type").and_then(Value::as_str))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(labels: &[&str], topk: usize) -> Settings {
        Settings {
            max_tokens: 64,
            temperature: 0.7,
            token_topk: topk,
            labels: labels.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn body_asks_for_logprobs_only_when_needed() {
        let m = [ChatMessage::new("user", "hi")];
        let plain = request_body("m", &m, Some(5), &settings(&[], 0));
        assert!(plain.get("logprobs").is_none());
        assert_eq!(plain["seed"], 5);
        let labels = request_body("m", &m, None, &settings(&["a", "b"], 0));
        assert_eq!(labels["top_logprobs"], 20);
        assert!(labels.get("seed").is_none());
        let topk = request_body("m", &m, None, &settings(&[], 5));
        assert_eq!(topk["top_logprobs"], 5);
    }

    #[test]
    fn response_parts_are_read() {
        let body: Value = serde_json::from_str(
            r#"{"choices":[{"message":{"role":"assistant","content":"Answer: joy"},
               "finish_reason":"stop","logprobs":{"content":[
               {"token":"Answer","logprob":-0.5,"top_logprobs":[{"token":"Answer","logprob":-0.5},{"token":"The","logprob":-1.5}]}]}}],
               "usage":{"prompt_tokens":12,"completion_tokens":3}}"#,
        )
        .unwrap();
        let r = parse_response(&body).unwrap();
        assert_eq!(r.text, "Answer: joy");
        assert_eq!((r.prompt_tokens, r.completion_tokens), (12, 3));
        assert_eq!(r.tokens.len(), 1);
        assert_eq!(r.tokens[0].top[1], (Token::Text("The".into()), -1.5));
        let empty: Value = serde_json::from_str(r#"{"choices":[]}"#).unwrap();
        assert_eq!(
            parse_response(&empty).unwrap_err(),
            BodyProblem::EmptyChoices
        );
    }

    #[test]
    fn error_bodies_give_message_and_code() {
        let b = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert_eq!(error_message(b), "You exceeded your current quota");
        assert_eq!(error_code(b).as_deref(), Some("insufficient_quota"));
        assert_eq!(error_message("not json"), "not json");
    }
}
