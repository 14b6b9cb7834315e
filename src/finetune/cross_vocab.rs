//! Token-level KD across tokenizers (`[finetune] token_kd = "cross"`): a teacher's stored
//! top-k, over its own vocabulary, becomes targets for a student of another tokenizer.
//!
//! The teacher's reply is a byte string, and so is each token of both byte-level BPE
//! vocabularies (GPT-2's byte-to-character table undone), so the two tokenizations of the
//! reply are compared by byte offsets:
//! - a student token whose byte span equals a teacher token's ("exact") follows the same
//!   prefix, and the teacher's alternatives there map into the student's vocabulary by
//!   their bytes (an alternative the student has no token for joins the tail): ordinary
//!   token KD at that position;
//! - any other student token is paired with the teacher token covering its first byte,
//!   and the two distributions are compared by shape only, the Universal Logit
//!   Distillation loss of Boizard et al. (2024): the L1 distance between the sorted
//!   probability vectors (the teacher's top-k against the student's k largest).
//!
//! Each run reports the share of reply tokens aligned exactly.

use super::data::{rationale_with_reply, Example, ExampleKind};
use crate::llama::vocab::vocabulary_bytes;
use crate::llama::LoadedModel;
use crate::prompts::Prompt;
use crate::records::CuratedRow;
use anyhow::Result;
use std::collections::HashMap;
use tokenizers::Tokenizer;

/// Where one student reply token gets its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pairing {
    /// The teacher token `i` spans the same bytes.
    Exact(usize),
    /// The teacher token `i` covers the student token's first byte.
    Covering(usize),
    /// Past the teacher's bytes.
    None,
}

/// Pair each student token with a teacher token by byte offsets; both sequences are
/// token byte strings of (a prefix of) one byte string.
pub fn align(teacher: &[&[u8]], student: &[&[u8]]) -> Vec<Pairing> {
    let spans = |tokens: &[&[u8]]| -> Vec<(usize, usize)> {
        let mut at = 0;
        tokens
            .iter()
            .map(|t| {
                let span = (at, at + t.len());
                at += t.len();
                span
            })
            .collect()
    };
    let (t, s) = (spans(teacher), spans(student));
    let mut i = 0;
    s.iter()
        .map(|&(start, end)| {
            while i < t.len() && t[i].1 <= start {
                i += 1;
            }
            match t.get(i) {
                Some(&(ts, te)) if ts == start && te == end => Pairing::Exact(i),
                Some(&(ts, _)) if ts <= start => Pairing::Covering(i),
                _ => Pairing::None,
            }
        })
        .collect()
}

/// Counts of a run's cross-tokenizer reply tokens.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AlignmentCounts {
    pub reply_tokens: usize,
    pub exact: usize,
    pub uld: usize,
}

/// The teacher's vocabulary as bytes, and the student's tokens by their bytes.
pub struct VocabBridge {
    teacher: Vec<Vec<u8>>,
    student: Vec<Vec<u8>>,
    student_by_bytes: HashMap<Vec<u8>, u32>,
}

impl VocabBridge {
    pub fn new(teacher: &Tokenizer, student: &Tokenizer) -> Result<VocabBridge> {
        let teacher = vocabulary_bytes(teacher, "teacher")?;
        let student = vocabulary_bytes(student, "student")?;
        let mut student_by_bytes = HashMap::new();
        for (id, bytes) in student.iter().enumerate() {
            // The lowest id wins a string two tokens share.
            student_by_bytes.entry(bytes.clone()).or_insert(id as u32);
        }
        Ok(VocabBridge {
            teacher,
            student,
            student_by_bytes,
        })
    }

    /// The share of the teacher's vocabulary the student has a token for.
    pub fn shared_share(&self) -> f64 {
        let shared = self
            .teacher
            .iter()
            .filter(|b| !b.is_empty() && self.student_by_bytes.contains_key(*b))
            .count();
        shared as f64 / self.teacher.len().max(1) as f64
    }

    fn teacher_bytes(&self, id: u32) -> &[u8] {
        self.teacher.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The token-KD example of a row whose teacher kept its tokens' top-k, in the
    /// student's tokens: the rationale-view prompt, the student's tokenization of the
    /// teacher's reply, and at each reply token the teacher's alternatives mapped into the
    /// student's vocabulary (exact spans) or the teacher's sorted probabilities (ULD).
    /// None when the row has no tokens.
    pub fn example(
        &self,
        model: &LoadedModel,
        prompt: &Prompt,
        row: &CuratedRow,
        max_len: usize,
        counts: &mut AlignmentCounts,
    ) -> Result<Option<Example>> {
        let t = &row.tokens;
        if t.ids.is_empty() || t.top_ids.len() != t.ids.len() || t.top_logprobs.len() != t.ids.len()
        {
            return Ok(None);
        }
        // The reply's bytes, cut to whole UTF-8 (a reply stopped inside a character).
        let mut bytes: Vec<u8> = t
            .ids
            .iter()
            .flat_map(|&id| self.teacher_bytes(id).to_vec())
            .collect();
        let valid = match std::str::from_utf8(&bytes) {
            Ok(_) => bytes.len(),
            Err(e) => e.valid_up_to(),
        };
        bytes.truncate(valid);
        let text = String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut teacher_tokens: Vec<&[u8]> = vec![];
        let mut used = 0;
        for &id in &t.ids {
            let b = self.teacher_bytes(id);
            if used + b.len() > valid {
                break;
            }
            used += b.len();
            teacher_tokens.push(b);
        }
        let reply = model.encode(&text)?;
        let student_tokens: Vec<&[u8]> = reply
            .iter()
            .map(|&id| self.student.get(id as usize).map_or(&[][..], Vec::as_slice))
            .collect();
        let pairing = align(&teacher_tokens, &student_tokens);

        let (ids, target, keep, truncated) =
            rationale_with_reply(model, prompt, &row.input, &reply, max_len)?;
        let (mut token_topk, mut token_uld) = (vec![], vec![]);
        for (pos, p) in pairing[..keep].iter().enumerate() {
            counts.reply_tokens += 1;
            match *p {
                Pairing::Exact(i) => {
                    counts.exact += 1;
                    let (mut mapped, mut logprobs) = (vec![], vec![]);
                    for (&tid, &lp) in t.top_ids[i].iter().zip(&t.top_logprobs[i]) {
                        if let Some(&sid) = self.student_by_bytes.get(self.teacher_bytes(tid)) {
                            if !mapped.contains(&sid) {
                                mapped.push(sid);
                                logprobs.push(lp);
                            }
                        }
                    }
                    token_topk.push((mapped, logprobs));
                }
                Pairing::Covering(i) => {
                    counts.uld += 1;
                    let mut probs: Vec<f32> = t.top_logprobs[i].iter().map(|lp| lp.exp()).collect();
                    probs.sort_by(|a, b| b.total_cmp(a));
                    token_topk.push((vec![], vec![]));
                    token_uld.push((pos, probs));
                }
                Pairing::None => token_topk.push((vec![], vec![])),
            }
        }
        Ok(Some(Example {
            kind: ExampleKind::TokenKd,
            ids,
            target,
            kd: None,
            truncated,
            token_topk,
            token_uld,
            row: 0,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_pair_exactly_or_by_the_covering_token() {
        // Teacher "The| cat|s" vs student "The| ca|ts|!" (the "!" is past the teacher).
        let teacher: Vec<&[u8]> = vec![b"The", b" cat", b"s"];
        let student: Vec<&[u8]> = vec![b"The", b" ca", b"ts", b"!"];
        assert_eq!(
            align(&teacher, &student),
            vec![
                Pairing::Exact(0),
                Pairing::Covering(1),
                Pairing::Covering(1),
                Pairing::None
            ]
        );
        // A student token spanning two teacher tokens starts where the first does, but
        // ends elsewhere: covered, not exact.
        let student: Vec<&[u8]> = vec![b"The cat", b"s"];
        assert_eq!(
            align(&teacher, &student),
            vec![Pairing::Covering(0), Pairing::Exact(2)]
        );
    }
}
