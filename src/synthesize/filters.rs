//! What a synthesized input must pass, in order: well formed, within the length bounds,
//! not a copy or near copy of a seed or of an input accepted before, not sharing a
//! 13-word sequence with an evaluation file. Each rejection is counted by reason.

use crate::config::{SynthesizeConfig, TaskKind};
use crate::dedup::{normalize, shingle_set, Contamination};
use crate::task::ANSWER_MARKER;
use std::collections::{BTreeMap, HashSet};

/// Word shingles for the near-duplicate check (as curate's default).
const SHINGLE_WORDS: usize = 3;

/// Why a candidate was turned away, for the report.
pub const REASONS: [&str; 7] = [
    "malformed",
    "truncated",
    "too_short",
    "too_long",
    "duplicate",
    "near_duplicate",
    "contaminated",
];

pub struct Filters {
    kind: TaskKind,
    min_chars: usize,
    max_chars: usize,
    near: f64,
    seen: HashSet<String>,
    shingles: Vec<HashSet<u64>>,
    contamination: Option<Contamination>,
    pub rejected: BTreeMap<String, u64>,
}

impl Filters {
    /// Filters that know the seeds (and the inputs accepted by an earlier, resumed run).
    pub fn new<'a>(
        cfg: &SynthesizeConfig,
        kind: TaskKind,
        known: impl Iterator<Item = &'a str>,
        contamination: Option<Contamination>,
    ) -> Self {
        let mut f = Filters {
            kind,
            min_chars: cfg.min_chars,
            max_chars: cfg.max_chars,
            near: cfg.near_dup_threshold,
            seen: HashSet::new(),
            shingles: vec![],
            contamination,
            rejected: REASONS.iter().map(|r| (r.to_string(), 0)).collect(),
        };
        for text in known {
            f.remember(text);
        }
        f
    }

    fn remember(&mut self, text: &str) {
        self.seen.insert(normalize(text));
        self.shingles.push(shingle_set(text, SHINGLE_WORDS));
    }

    /// Check one cleaned candidate; accepted ones are remembered for the next checks.
    pub fn admit(&mut self, text: Option<&str>, truncated: bool) -> bool {
        match self.reason(text, truncated) {
            None => {
                if let Some(t) = text {
                    self.remember(t);
                }
                true
            }
            Some(r) => {
                *self.rejected.entry(r.to_string()).or_default() += 1;
                false
            }
        }
    }

    fn reason(&self, text: Option<&str>, truncated: bool) -> Option<&'static str> {
        if truncated {
            return Some("truncated");
        }
        let Some(text) = text else {
            return Some("malformed");
        };
        // The teacher solved an input instead of writing one, talked about the examples,
        // or wrote a numeric task's input with no number or no question.
        let not_a_problem = self.kind == TaskKind::Numeric
            && !(text.chars().any(|c| c.is_ascii_digit()) && text.contains('?'));
        if text.contains(ANSWER_MARKER) || text.contains("Example") || not_a_problem {
            return Some("malformed");
        }
        let chars = text.chars().count();
        if chars < self.min_chars {
            return Some("too_short");
        }
        if chars > self.max_chars {
            return Some("too_long");
        }
        if self.seen.contains(&normalize(text)) {
            return Some("duplicate");
        }
        let mine = shingle_set(text, SHINGLE_WORDS);
        if self
            .shingles
            .iter()
            .any(|other| jaccard(&mine, other) >= self.near)
        {
            return Some("near_duplicate");
        }
        if self
            .contamination
            .as_ref()
            .is_some_and(|c| c.contaminated(text))
        {
            return Some("contaminated");
        }
        None
    }
}

fn jaccard(a: &HashSet<u64>, b: &HashSet<u64>) -> f64 {
    let inter = a.intersection(b).count();
    let union = a.len() + b.len() - inter;
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SynthesizeConfig {
        toml::from_str("seeds = [\"s.jsonl\"]").unwrap()
    }

    #[test]
    fn each_rejection_has_its_reason() {
        let seeds = ["Tom has 3 apples and buys 4 more. How many apples does he have?"];
        let mut f = Filters::new(&cfg(), TaskKind::Numeric, seeds.into_iter(), None);
        let new = "A baker makes 12 cakes a day for 5 days. How many cakes does he make?";
        assert!(f.admit(Some(new), false));
        assert!(!f.admit(Some(new), false), "the same text twice");
        assert!(!f.admit(
            Some("Tom has 3 apples and buys 5 more. How many apples does he have?"),
            false
        ));
        assert!(!f.admit(Some("What is the capital of France and why?"), false));
        assert!(!f.admit(Some("1 + 1?"), false));
        assert!(!f.admit(Some("For Example 4, the topic is 7 rabbits?"), false));
        assert!(!f.admit(
            Some("Tom has 7 rabbits in 3 hutches and feeds them."),
            false
        ));
        assert!(!f.admit(Some("3 + 4 = 7\nAnswer: 7 and that is all"), false));
        assert!(!f.admit(None, false));
        assert!(!f.admit(Some("anything long enough 123"), true));
        let r = &f.rejected;
        assert_eq!(
            (
                r["duplicate"],
                r["near_duplicate"],
                r["malformed"],
                r["too_short"],
                r["truncated"]
            ),
            (1, 1, 5, 1, 1)
        );
    }

    #[test]
    fn contaminated_candidates_are_rejected() {
        let eval = ["the farmer counted 17 sheep in the north field and 9 more in the south field"];
        let c = Contamination::new(eval.into_iter(), 13);
        let mut f = Filters::new(&cfg(), TaskKind::Numeric, std::iter::empty(), Some(c));
        assert!(!f.admit(
            Some("Today the farmer counted 17 sheep in the north field and 9 more in the south field. How many?"),
            false
        ));
        assert_eq!(f.rejected["contaminated"], 1);
    }
}
