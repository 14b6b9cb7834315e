//! The OpenAI completions JSON for scoring given sequences: a request that echoes the
//! prompt with its log-probabilities and generates one token, and reading the prompt's
//! part back. No I/O here.
//!
//! Servers differ: vLLM takes token ids as the prompt and names tokens by id with
//! `return_tokens_as_token_ids`; llama-cpp-python's server takes text only, names tokens
//! by their text (special tokens as ""), leaves a leading BOS out of the echo and adds the
//! chosen token to its alternatives; llama.cpp's own server and OpenAI's chat models
//! return no log-probabilities for the prompt. The continuation is the end of the echoed
//! prompt, so it is read from the end, and each of its tokens is checked against the
//! server's (a server that tokenized the text differently is an error, never a silent
//! shift).

use super::scoring::{PositionScore, TokenTexts};
use serde_json::{json, Value};

/// The sequence as the request carries it.
pub enum Prompt<'a> {
    Ids(&'a [u32]),
    Text(String),
}

/// The completions request for one sequence: echo the prompt with `top` alternatives a
/// token (at least 1: the tokens' own log-probabilities come with them), greedy, one
/// generated token (some servers refuse 0).
pub fn request_body(model: &str, prompt: &Prompt, top: usize) -> Value {
    let prompt = match prompt {
        Prompt::Ids(ids) => json!(ids),
        Prompt::Text(t) => json!(t),
    };
    json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": 1,
        "temperature": 0.0,
        "echo": true,
        "logprobs": top.max(1),
        "return_tokens_as_token_ids": true,
    })
}

/// Why a response could not be read as scores.
#[derive(Debug, Clone, PartialEq)]
pub enum EchoProblem {
    /// The server returned no log-probabilities for the prompt's tokens.
    NoPromptLogprobs(String),
    /// The server's tokens are not the sequence's (it tokenized the text differently).
    Mismatch(String),
    /// Not the completions JSON.
    Invalid(String),
}

/// The scores of the sequence's last `continuation.len()` tokens from a response to
/// `request_body`, alternatives mapped to ids through `texts` (those that map to none are
/// left out: they fall into the tail), largest first, at most `top`.
pub fn parse_scores(
    body: &Value,
    continuation: &[u32],
    texts: &TokenTexts,
    top: usize,
) -> Result<Vec<PositionScore>, EchoProblem> {
    let invalid = |m: &str| EchoProblem::Invalid(m.to_string());
    let choice = body
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or_else(|| invalid("no choices in the response"))?;
    let logprobs = match choice.get("logprobs") {
        Some(l) if !l.is_null() => l,
        _ => {
            return Err(EchoProblem::NoPromptLogprobs(
                "the response has no logprobs".into(),
            ))
        }
    };
    let tokens: Vec<&str> = logprobs
        .get("tokens")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("logprobs without tokens"))?
        .iter()
        .map(|t| t.as_str().unwrap_or_default())
        .collect();
    let token_logprobs = logprobs
        .get("token_logprobs")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("logprobs without token_logprobs"))?;
    let top_logprobs = logprobs.get("top_logprobs").and_then(Value::as_array);
    if token_logprobs.len() != tokens.len() {
        return Err(invalid("tokens and token_logprobs differ in length"));
    }
    // The generated tokens come last.
    let generated = body
        .pointer("/usage/completion_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(1) as usize;
    let echoed = tokens.len().saturating_sub(generated);
    if echoed < continuation.len() + 1 {
        return Err(EchoProblem::NoPromptLogprobs(format!(
            "{echoed} prompt tokens echoed for a sequence whose continuation alone has {}",
            continuation.len()
        )));
    }
    let first = echoed - continuation.len();
    continuation
        .iter()
        .enumerate()
        .map(|(j, &id)| {
            let at = first + j;
            if !texts.matches(tokens[at], id) {
                return Err(EchoProblem::Mismatch(format!(
                    "continuation token {j} is {:?} here but {:?} on the server (it tokenized the text differently)",
                    texts.text(id),
                    tokens[at]
                )));
            }
            let logprob = token_logprobs[at].as_f64().ok_or_else(|| {
                EchoProblem::NoPromptLogprobs(format!("no log-probability for prompt token {at}"))
            })? as f32;
            let mut alternatives: Vec<(u32, f32)> = top_logprobs
                .and_then(|t| t.get(at))
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(t, lp)| Some((texts.id_of(t)?, lp.as_f64()? as f32)))
                        .collect()
                })
                .unwrap_or_default();
            alternatives.sort_by_key(|a| a.0);
            alternatives.dedup_by_key(|a| a.0);
            alternatives.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            alternatives.truncate(top);
            Ok(PositionScore {
                logprob,
                top: alternatives,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of 6: "<s>" (special), "Hello", " world", "!", " there", "<|end|>"
    /// (special).
    fn texts() -> TokenTexts {
        TokenTexts::from_texts(&[
            ("<s>", true),
            ("Hello", false),
            (" world", false),
            ("!", false),
            (" there", false),
            ("<|end|>", true),
        ])
    }

    #[test]
    fn vllm_style_echo_is_read_by_id_from_the_end() {
        // Sequence <s> Hello | world ! <|end|>, echoed whole (the first token has no
        // log-probability), then one generated token; tokens named by id.
        let body = json!({
            "choices": [{"logprobs": {
                "tokens": ["token_id:0", "token_id:1", "token_id:2", "token_id:3", "token_id:5", "token_id:1"],
                "token_logprobs": [null, -3.0, -0.5, -1.25, -0.75, -2.0],
                "top_logprobs": [null,
                    {"token_id:2": -1.0, "token_id:1": -2.0},
                    {"token_id:2": -0.5, "token_id:4": -1.5, "token_id:3": -3.0},
                    {"token_id:3": -1.25, "token_id:5": -0.5},
                    {"token_id:5": -0.75},
                    {"token_id:1": -2.0}]
            }}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1}
        });
        let scores = parse_scores(&body, &[2, 3, 5], &texts(), 2).unwrap();
        assert_eq!(
            scores,
            vec![
                PositionScore {
                    logprob: -0.5,
                    top: vec![(2, -0.5), (4, -1.5)]
                },
                PositionScore {
                    logprob: -1.25,
                    top: vec![(5, -0.5), (3, -1.25)]
                },
                PositionScore {
                    logprob: -0.75,
                    top: vec![(5, -0.75)]
                },
            ]
        );
    }

    #[test]
    fn llama_cpp_python_style_echo_maps_texts_and_checks_the_tokens() {
        // The leading <s> left out of the echo, specials printed as "", no generated
        // token, the chosen token added to the alternatives; an unknown text is left out.
        let body = json!({
            "choices": [{"logprobs": {
                "tokens": ["Hello", " world", "!", ""],
                "token_logprobs": [null, -0.5, -1.25, -0.75],
                "top_logprobs": [null,
                    {" world": -0.5, " there": -1.5},
                    {"?": -0.25, "!": -1.25},
                    {"": -0.75, "!": -2.5}]
            }}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 0}
        });
        let scores = parse_scores(&body, &[2, 3, 5], &texts(), 5).unwrap();
        assert_eq!(scores[0].top, vec![(2, -0.5), (4, -1.5)]);
        assert_eq!(scores[1].logprob, -1.25);
        assert_eq!(scores[1].top, vec![(3, -1.25)]);
        assert_eq!(scores[2].top, vec![(3, -2.5)]);
        // The server tokenized differently: " there" where the sequence has " world".
        let mut shifted = body.clone();
        shifted["choices"][0]["logprobs"]["tokens"][1] = json!(" there");
        assert!(matches!(
            parse_scores(&shifted, &[2, 3, 5], &texts(), 5),
            Err(EchoProblem::Mismatch(m)) if m.contains("\" world\"")
        ));
    }

    #[test]
    fn a_response_without_the_prompt_is_named() {
        // logprobs for the generated token only (a server that ignores echo).
        let body = json!({
            "choices": [{"logprobs": {
                "tokens": ["!"], "token_logprobs": [-0.1], "top_logprobs": [{"!": -0.1}]
            }}],
            "usage": {"completion_tokens": 1}
        });
        assert!(matches!(
            parse_scores(&body, &[2, 3], &texts(), 5),
            Err(EchoProblem::NoPromptLogprobs(_))
        ));
        let none = json!({"choices": [{"logprobs": null}]});
        assert!(matches!(
            parse_scores(&none, &[2], &texts(), 5),
            Err(EchoProblem::NoPromptLogprobs(_))
        ));
    }
}
