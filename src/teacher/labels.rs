//! Label-set soft labels from an API reply: the teacher's probability of each label read
//! from the `top_logprobs` at the answer position (the first token of the written answer).
//!
//! An alternative token counts for a label when, after the part of the token that precedes
//! the answer and surrounding spaces, it is a non-empty prefix of exactly one label
//! (case-insensitive): " joy" and " Jo" count for "joy"; a token that begins two labels
//! counts for none. The probabilities are not renormalized: their sum is the mass the
//! teacher put on the label set among the alternatives it returned (the coverage).

use super::{AnswerLocator, Reply, Token};

pub fn label_probs_at_answer(
    reply: &Reply,
    locate_answer: AnswerLocator,
    labels: &[String],
) -> Option<Vec<f64>> {
    if labels.is_empty() || reply.tokens.is_empty() {
        return None;
    }
    let offset = locate_answer(&reply.text)?;
    let (index, before) = answer_token(reply, offset)?;
    let lower: Vec<String> = labels.iter().map(|l| l.to_lowercase()).collect();
    let mut probs = vec![0.0; labels.len()];
    for (alt, logprob) in &reply.tokens[index].top {
        let Token::Text(alt) = alt else { continue };
        let Some(rest) = alt.strip_prefix(before.as_str()) else {
            continue;
        };
        let piece = rest.trim().to_lowercase();
        if piece.is_empty() {
            continue;
        }
        let mut matching = lower
            .iter()
            .enumerate()
            .filter(|(_, l)| l.starts_with(&piece));
        if let (Some((i, _)), None) = (matching.next(), matching.next()) {
            probs[i] += (*logprob as f64).exp();
        }
    }
    Some(probs)
}

/// The index of the token where the answer's first word begins, and the part of that token
/// that comes before the answer offset. Whitespace-only tokens are skipped. `None` when the
/// tokens do not spell the reply text (then positions cannot be trusted).
fn answer_token(reply: &Reply, offset: usize) -> Option<(usize, String)> {
    let mut start = 0usize;
    let mut spelled = String::with_capacity(reply.text.len());
    for (i, t) in reply.tokens.iter().enumerate() {
        let Token::Text(piece) = &t.token else {
            return None;
        };
        spelled.push_str(piece);
        let end = start + piece.len();
        if end > offset && !reply.text.get(offset.max(start)..end)?.trim().is_empty() {
            if !reply.text.starts_with(&spelled) {
                return None;
            }
            let before = if start < offset {
                reply.text.get(start..offset)?.to_string()
            } else {
                String::new()
            };
            return Some((i, before));
        }
        start = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::teacher::TokenChoice;

    fn tok(text: &str, top: &[(&str, f64)]) -> TokenChoice {
        TokenChoice {
            token: Token::Text(text.into()),
            logprob: 0.0,
            top: top
                .iter()
                .map(|(t, p)| (Token::Text(t.to_string()), p.ln() as f32))
                .collect(),
        }
    }

    fn labels() -> Vec<String> {
        ["joy", "anger", "sadness", "optimism"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn alternatives_at_the_answer_token_become_label_probabilities() {
        // "Answer: joy": the answer offset is 7 (just after the colon).
        let reply = Reply {
            text: "Answer: joy".into(),
            tokens: vec![
                tok("Answer", &[("Answer", 0.9)]),
                tok(":", &[(":", 1.0)]),
                tok(
                    " joy",
                    &[(" joy", 0.5), (" Anger", 0.2), (" sad", 0.1), (" the", 0.1)],
                ),
            ],
            ..Reply::default()
        };
        let locate = |_: &str| Some(7usize);
        let p = label_probs_at_answer(&reply, &locate, &labels()).unwrap();
        let want = [0.5, 0.2, 0.1, 0.0];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{p:?}");
        }
        // Coverage 0.8: " the" (0.1) is no label and the remaining 0.1 was not returned.
        assert!((p.iter().sum::<f64>() - 0.8).abs() < 1e-6);
    }

    #[test]
    fn whitespace_token_is_skipped_and_straddling_token_is_cut() {
        let reply = Reply {
            text: "Answer: joy".into(),
            tokens: vec![
                tok("Answer", &[]),
                tok(":", &[]),
                tok(" ", &[(" ", 1.0)]),
                tok("joy", &[("joy", 0.6), ("o", 0.3)]),
            ],
            ..Reply::default()
        };
        let locate = |_: &str| Some(7usize);
        let p = label_probs_at_answer(&reply, &locate, &labels()).unwrap();
        // "o" begins "optimism" only; it counts there.
        assert!(
            (p[0] - 0.6).abs() < 1e-6 && (p[3] - 0.3).abs() < 1e-6,
            "{p:?}"
        );

        let straddle = Reply {
            text: "Answer: joy".into(),
            tokens: vec![
                tok("Answer", &[]),
                tok(": joy", &[(": joy", 0.7), (": anger", 0.2), (" joy", 0.1)]),
            ],
            ..Reply::default()
        };
        let p = label_probs_at_answer(&straddle, &locate, &labels()).unwrap();
        assert!(
            (p[0] - 0.7).abs() < 1e-6 && (p[1] - 0.2).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn tokens_that_do_not_spell_the_text_give_nothing() {
        let reply = Reply {
            text: "Answer: joy".into(),
            tokens: vec![tok("Reply", &[]), tok(": joy", &[(": joy", 1.0)])],
            ..Reply::default()
        };
        assert_eq!(
            label_probs_at_answer(&reply, &|_: &str| Some(7usize), &labels()),
            None
        );
    }
}
