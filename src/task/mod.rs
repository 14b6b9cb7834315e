//! What an answer is: a number (compared with a tolerance) or one of a fixed label set.
//! Parsing teacher and student text into an answer, normalizing it and comparing it;
//! arith.rs checks the arithmetic a rationale writes (curate) and evaluates an equation
//! left open (eval's calculator).

pub mod arith;

use crate::config::{TaskConfig, TaskKind};

/// Why a piece of text did not yield an answer. Stored as the row's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseStatus {
    Ok,
    /// No "answer:" marker (or no final line) was found.
    NoAnswer,
    /// The answer text held no number (numeric tasks).
    NotANumber,
    /// The answer is not one of the task's labels (label tasks).
    OutsideLabelSet,
    /// Generation hit the token limit before the answer was written.
    Truncated,
    /// The written answer was outside the label set; the teacher's label-set scores chose
    /// the label instead.
    Rescued,
    /// The teacher request itself failed for this row (a prompt longer than the context);
    /// `raw` holds the error.
    RequestFailed,
}

impl ParseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ParseStatus::Ok => "ok",
            ParseStatus::NoAnswer => "no_answer",
            ParseStatus::NotANumber => "not_a_number",
            ParseStatus::OutsideLabelSet => "outside_label_set",
            ParseStatus::Truncated => "truncated",
            ParseStatus::Rescued => "rescued",
            ParseStatus::RequestFailed => "request_failed",
        }
    }

    /// Statuses whose answer is usable as a label.
    pub fn usable(status: &str) -> bool {
        status == ParseStatus::Ok.as_str() || status == ParseStatus::Rescued.as_str()
    }
}

/// The outcome of parsing generated text.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub rationale: Option<String>,
    /// Normalized answer: canonical number text or the label as spelled in the task.
    pub answer: Option<String>,
    pub status: ParseStatus,
    /// Byte offset in the text just after the answer marker ("Answer:"), where label
    /// continuations are scored.
    pub answer_offset: Option<usize>,
}

impl Parsed {
    /// An answer written outside the label set, replaced by the label the teacher's own
    /// label-set scores (`probs`, in `labels` order) put highest: what generate stores and
    /// eval scores the live teacher by. Returns whether it replaced the answer.
    pub fn rescue_with_label_scores(&mut self, labels: &[String], probs: &[f64]) -> bool {
        let scored = probs.len() == labels.len() && probs.iter().sum::<f64>() > 0.0;
        if self.status != ParseStatus::OutsideLabelSet || !scored {
            return false;
        }
        let best = probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                self.answer = Some(labels[i].clone());
                self.status = ParseStatus::Rescued;
                true
            }
            None => false,
        }
    }
}

/// The marker the step-by-step prompts ask the teacher to end with.
pub const ANSWER_MARKER: &str = "Answer:";

#[derive(Debug, Clone)]
pub struct Task {
    pub kind: TaskKind,
    pub labels: Vec<String>,
    pub tolerance: f64,
}

impl Task {
    pub fn from_config(cfg: &TaskConfig) -> Self {
        Task {
            kind: cfg.kind,
            labels: cfg.labels.clone(),
            tolerance: cfg.tolerance,
        }
    }

    /// Parse a teacher's step-by-step output: rationale, then `Answer: X` on the last lines.
    /// `truncated` says the generation stopped at the token limit.
    pub fn parse_rationale_output(&self, text: &str, truncated: bool) -> Parsed {
        let Some(pos) = find_last_marker(text) else {
            let status = if truncated {
                ParseStatus::Truncated
            } else {
                ParseStatus::NoAnswer
            };
            return Parsed {
                rationale: None,
                answer: None,
                status,
                answer_offset: None,
            };
        };
        let rationale = text[..pos].trim();
        let rationale = strip_rationale_prefix(rationale).to_string();
        let after = pos + ANSWER_MARKER.len();
        let answer_text = first_line(&text[after..]);
        let (answer, status) = self.normalize(answer_text);
        Parsed {
            rationale: Some(rationale).filter(|r| !r.is_empty()),
            answer,
            status,
            answer_offset: Some(after),
        }
    }

    /// Where a teacher's labels are scored in its reply: just after its last answer marker
    /// (generate and eval's live teacher locate it the same way).
    pub fn answer_offset(&self, text: &str) -> Option<usize> {
        self.parse_rationale_output(text, false).answer_offset
    }

    /// Parse a bare answer (the label view of a student): the text itself, or what follows
    /// an answer marker if the model wrote one.
    pub fn parse_answer_only(&self, text: &str) -> Parsed {
        let (body, offset) = match find_last_marker(text) {
            Some(pos) => (
                &text[pos + ANSWER_MARKER.len()..],
                Some(pos + ANSWER_MARKER.len()),
            ),
            None => (text, None),
        };
        let (answer, status) = self.normalize(first_line(body));
        Parsed {
            rationale: None,
            answer,
            status,
            answer_offset: offset,
        }
    }

    /// Normalize answer text into the canonical answer, or say why it is not one.
    pub fn normalize(&self, text: &str) -> (Option<String>, ParseStatus) {
        match self.kind {
            TaskKind::Numeric => match parse_number(text) {
                Some(x) => (Some(format_number(x)), ParseStatus::Ok),
                None => (None, ParseStatus::NotANumber),
            },
            TaskKind::Labels => match self.match_label(text) {
                Some(label) => (Some(label), ParseStatus::Ok),
                None => (None, ParseStatus::OutsideLabelSet),
            },
        }
    }

    /// Normalize a gold value from the input file; `None` when it is not a valid answer.
    pub fn normalize_gold(&self, text: &str) -> Option<String> {
        self.normalize(text).0
    }

    /// What a valid answer is, for error messages.
    pub fn answer_kind(&self) -> String {
        match self.kind {
            TaskKind::Numeric => "a number".into(),
            TaskKind::Labels => format!("one of the labels {:?}", self.labels),
        }
    }

    /// Whether two normalized answers agree (numeric tolerance, or label equality).
    pub fn agrees(&self, a: &str, b: &str) -> bool {
        match self.kind {
            TaskKind::Numeric => match (parse_number(a), parse_number(b)) {
                (Some(x), Some(y)) => (x - y).abs() <= self.tolerance * 1f64.max(y.abs()),
                _ => false,
            },
            TaskKind::Labels => a.eq_ignore_ascii_case(b),
        }
    }

    fn match_label(&self, text: &str) -> Option<String> {
        let cleaned: String = text
            .trim()
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase();
        if cleaned.is_empty() {
            return None;
        }
        let label_named = |candidate: &str| {
            self.labels
                .iter()
                .find(|l| l.to_lowercase() == candidate)
                .cloned()
        };
        // The whole answer as a label, else the label named first as a whole word: the
        // teacher may write "joy, because ..." or "The emotion is joy.".
        label_named(&cleaned).or_else(|| {
            cleaned
                .split(|c: char| !c.is_alphanumeric() && c != '-' && c != '_')
                .find_map(label_named)
        })
    }
}

fn find_last_marker(text: &str) -> Option<usize> {
    let lower = text.to_ascii_lowercase();
    lower.rfind(&ANSWER_MARKER.to_ascii_lowercase())
}

fn strip_rationale_prefix(text: &str) -> &str {
    let lower = text.to_ascii_lowercase();
    for prefix in ["rationale:", "reasoning:"] {
        if lower.starts_with(prefix) {
            return text[prefix.len()..].trim_start();
        }
    }
    text
}

fn first_line(text: &str) -> &str {
    text.trim_start().lines().next().unwrap_or("").trim()
}

/// The first number in the text: handles `$1,234.50`, `-3`, `12.`, `7 apples`.
pub fn parse_number(text: &str) -> Option<f64> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        let starts_number = c.is_ascii_digit()
            || (c == '-' && bytes.get(i + 1).is_some_and(|b| b.is_ascii_digit()))
            || (c == '.' && bytes.get(i + 1).is_some_and(|b| b.is_ascii_digit()));
        if starts_number {
            let mut j = i + 1;
            while j < bytes.len() {
                let d = bytes[j] as char;
                let comma_group = d == ','
                    && bytes.get(j + 1).is_some_and(|b| b.is_ascii_digit())
                    && bytes.get(j + 2).is_some_and(|b| b.is_ascii_digit())
                    && bytes.get(j + 3).is_some_and(|b| b.is_ascii_digit());
                let decimal = d == '.' && bytes.get(j + 1).is_some_and(|b| b.is_ascii_digit());
                if d.is_ascii_digit() || comma_group || decimal {
                    j += 1;
                } else {
                    break;
                }
            }
            let digits: String = text[i..j].chars().filter(|&c| c != ',').collect();
            return digits.parse::<f64>().ok();
        }
        i += 1;
    }
    None
}

/// Canonical text of a number: integers without a decimal point, others with up to 6
/// decimals and no trailing zeros.
pub fn format_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        let s = format!("{x:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric() -> Task {
        Task {
            kind: TaskKind::Numeric,
            labels: vec![],
            tolerance: 1e-6,
        }
    }
    fn labels() -> Task {
        Task {
            kind: TaskKind::Labels,
            labels: ["anger", "joy", "optimism", "sadness"]
                .map(String::from)
                .to_vec(),
            tolerance: 0.0,
        }
    }

    #[test]
    fn numbers_parse_from_messy_text() {
        assert_eq!(parse_number("$1,234.50 total"), Some(1234.5));
        assert_eq!(parse_number("about -3 degrees"), Some(-3.0));
        assert_eq!(parse_number("12."), Some(12.0));
        assert_eq!(parse_number("none"), None);
        assert_eq!(format_number(19.0), "19");
        assert_eq!(format_number(2.5), "2.5");
        assert_eq!(format_number(1.0 / 3.0), "0.333333");
    }

    #[test]
    fn rationale_and_answer_split_at_the_last_marker() {
        let p =
            numeric().parse_rationale_output("Rationale: 12 + 7 = 19.\nAnswer: 19 apples", false);
        assert_eq!(p.status, ParseStatus::Ok);
        assert_eq!(p.answer.as_deref(), Some("19"));
        assert_eq!(p.rationale.as_deref(), Some("12 + 7 = 19."));
    }

    #[test]
    fn missing_marker_is_a_status_not_a_blank_label() {
        let p = numeric().parse_rationale_output("I think it is 19", false);
        assert_eq!(p.status, ParseStatus::NoAnswer);
        let p = numeric().parse_rationale_output("12 + 7 is", true);
        assert_eq!(p.status, ParseStatus::Truncated);
        let p = numeric().parse_rationale_output("so\nAnswer: unknown", false);
        assert_eq!(p.status, ParseStatus::NotANumber);
    }

    #[test]
    fn only_an_answer_outside_the_label_set_is_rescued_and_only_by_whole_scores() {
        let t = labels();
        let set = t.labels.clone();
        let probs: Vec<f64> = (0..set.len())
            .map(|i| if i == 1 { 0.6 } else { 0.1 })
            .collect();
        let mut off = t.parse_rationale_output("so\nAnswer: nostalgia", false);
        assert_eq!(off.status, ParseStatus::OutsideLabelSet);
        // Scores of another label set, or none at all, choose nothing.
        assert!(!off.clone().rescue_with_label_scores(&set, &probs[..1]));
        assert!(!off
            .clone()
            .rescue_with_label_scores(&set, &vec![0.0; set.len()]));
        assert!(off.rescue_with_label_scores(&set, &probs));
        assert_eq!(off.status, ParseStatus::Rescued);
        assert_eq!(off.answer.as_deref(), Some(set[1].as_str()));
        // A label the teacher wrote stands, whatever the scores say.
        let mut written = t.parse_rationale_output(&format!("so\nAnswer: {}", set[0]), false);
        assert!(!written.rescue_with_label_scores(&set, &probs));
        assert_eq!(written.answer.as_deref(), Some(set[0].as_str()));
    }

    #[test]
    fn labels_match_case_and_punctuation_insensitively() {
        let t = labels();
        assert_eq!(t.normalize("Joy.").0.as_deref(), Some("joy"));
        assert_eq!(
            t.normalize("sadness because ...").0.as_deref(),
            Some("sadness")
        );
        assert_eq!(t.normalize("happiness").1, ParseStatus::OutsideLabelSet);
        assert_eq!(
            t.normalize("The emotion here is sadness, not joy.")
                .0
                .as_deref(),
            Some("sadness")
        );
        assert_eq!(t.normalize("joyful").1, ParseStatus::OutsideLabelSet);
        assert_eq!(
            t.parse_answer_only("Answer: anger").answer.as_deref(),
            Some("anger")
        );
    }

    #[test]
    fn numeric_agreement_uses_tolerance() {
        let t = numeric();
        assert!(t.agrees("19", "19.0000000001"));
        assert!(!t.agrees("19", "20"));
        assert!(!t.agrees("x", "20"));
    }
}
