//! Rationale checks for numeric tasks, on text only (no code is ever evaluated):
//! - the arithmetic a rationale writes out (`12 + 7 = 19`, `3 * (4 + 1) = 15`) is checked
//!   by a small recursive-descent evaluator over numbers, + − × ÷ and parentheses;
//! - the rationale must state the final answer (the number appears in it).

use regex::{CaptureLocations, Regex};
use std::cell::RefCell;
use std::sync::LazyLock;

/// A number: thousands separators are allowed ("1,200"), and a leading `$`.
const NUM: &str = r"\$?\d[\d,]*(?:\.\d+)?";

/// An arithmetic expression with at least one operator, as a capture group.
fn expression() -> String {
    let op = r"[-+*/×÷x−]";
    format!(r"((?:\(\s*)*{NUM}(?:\s*\)\s*)*(?:\s*{op}\s*(?:\(\s*)*{NUM}(?:\s*\))*)+)")
}

/// `left = right`, where left is an expression and right a number.
static EQUATION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(r"{}\s*=\s*(-?{NUM})", expression()))
        .expect("the equation pattern is a valid regex")
});

/// An expression and `=` at the very end of the text: an equation whose result is still
/// to be written.
static OPEN_EQUATION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(r"{}\s*=\s*$", expression()))
        .expect("the open equation pattern is a valid regex")
});

static NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"-?\d[\d,]*(?:\.\d+)?").expect("valid regex"));

fn parse_number(s: &str) -> Option<f64> {
    s.trim_start_matches('$').replace(',', "").parse().ok()
}

fn close(a: f64, b: f64, tolerance: f64) -> bool {
    (a - b).abs() <= tolerance.max(1e-9) * b.abs().max(1.0)
}

thread_local! {
    /// Each thread's capture slots for `EQUATION`, reused from match to match. A `Captures`
    /// (one a match from `captures_iter`) holds an `Arc` of the regex's group info, whose
    /// count every match on every core then writes: with curate's rows checked on all
    /// cores, that one cache line moved between them on each match (at 100M rows, one
    /// load next to it took 4,369 samples against 27 at 10M: bench-results/curate-scale.md,
    /// 2026-12-07c). Reused slots write nothing shared.
    static EQUATION_SLOTS: RefCell<CaptureLocations> = RefCell::new(EQUATION.capture_locations());
}

/// `left = right` holds, within the relative tolerance or as `left` rounded to 2 decimals;
/// an equation that cannot be read gives no verdict (true).
fn equation_holds(left: &str, right: &str, tolerance: f64) -> bool {
    let (Some(left), Some(right)) = (evaluate(left), parse_number(right)) else {
        return true;
    };
    close(left, right, tolerance) || (left * 100.0).round() / 100.0 == right
}

/// Every equation written in the text holds (within the relative tolerance; results
/// written rounded to 2 decimals are accepted). A text without equations passes.
pub fn arithmetic_holds(text: &str, tolerance: f64) -> bool {
    EQUATION_SLOTS.with_borrow_mut(|slots| {
        let mut at = 0;
        // Successive matches, each searched from the end of the one before, as
        // `captures_iter` finds them (an equation is never an empty match).
        while let Some(found) = EQUATION.captures_read_at(slots, text, at) {
            let group = |i| slots.get(i).map_or("", |(start, end)| &text[start..end]);
            if !equation_holds(group(1), group(2), tolerance) {
                return false;
            }
            if found.end() == at {
                break; // an empty match would be found again (the pattern has none)
            }
            at = found.end();
        }
        true
    })
}

/// The value of the equation the text ends in (`... 3 * 4 =`), rounded to 2 decimals;
/// None when the text does not end in one that can be evaluated.
pub fn open_equation_value(text: &str) -> Option<f64> {
    let c = OPEN_EQUATION.captures(text)?;
    let v = evaluate(&c[1])?;
    Some((v * 100.0).round() / 100.0)
}

/// The rationale writes the answer somewhere as a number.
pub fn states_answer(rationale: &str, answer: &str, tolerance: f64) -> bool {
    let Some(answer) = parse_number(answer) else {
        return false;
    };
    NUMBER
        .find_iter(rationale)
        .filter_map(|m| parse_number(m.as_str()))
        .any(|n| close(n, answer, tolerance))
}

/// Evaluate `+ - * /` with parentheses; `×`, `x`, `÷` and `−` are read as their ASCII
/// operators. None for anything else, or a division by zero.
pub fn evaluate(expr: &str) -> Option<f64> {
    let tokens = tokenize(expr)?;
    let mut p = Parser { tokens, pos: 0 };
    let v = p.sum()?;
    (p.pos == p.tokens.len() && v.is_finite()).then_some(v)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tok {
    Num(f64),
    Op(char),
    Open,
    Close,
}

fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let mut out = vec![];
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '$' => i += 1,
            '0'..='9' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_digit() || chars[i] == ',' || chars[i] == '.')
                {
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                out.push(Tok::Num(parse_number(text.trim_end_matches(['.', ',']))?));
            }
            '+' => (out.push(Tok::Op('+')), i += 1).1,
            '-' | '−' => (out.push(Tok::Op('-')), i += 1).1,
            '*' | '×' | 'x' => (out.push(Tok::Op('*')), i += 1).1,
            '/' | '÷' => (out.push(Tok::Op('/')), i += 1).1,
            '(' => (out.push(Tok::Open), i += 1).1,
            ')' => (out.push(Tok::Close), i += 1).1,
            _ => return None,
        }
    }
    Some(out)
}

struct Parser {
    tokens: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<Tok> {
        self.tokens.get(self.pos).copied()
    }

    fn sum(&mut self) -> Option<f64> {
        let mut v = self.product()?;
        while let Some(Tok::Op(op @ ('+' | '-'))) = self.peek() {
            self.pos += 1;
            let r = self.product()?;
            v = if op == '+' { v + r } else { v - r };
        }
        Some(v)
    }

    fn product(&mut self) -> Option<f64> {
        let mut v = self.atom()?;
        while let Some(Tok::Op(op @ ('*' | '/'))) = self.peek() {
            self.pos += 1;
            let r = self.atom()?;
            if op == '/' && r == 0.0 {
                return None;
            }
            v = if op == '*' { v * r } else { v / r };
        }
        Some(v)
    }

    fn atom(&mut self) -> Option<f64> {
        match self.peek()? {
            Tok::Num(n) => {
                self.pos += 1;
                Some(n)
            }
            Tok::Op('-') => {
                self.pos += 1;
                Some(-self.atom()?)
            }
            Tok::Open => {
                self.pos += 1;
                let v = self.sum()?;
                (self.peek()? == Tok::Close).then(|| self.pos += 1)?;
                Some(v)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluates_with_precedence_and_parentheses() {
        assert_eq!(evaluate("2 + 3 * 4"), Some(14.0));
        assert_eq!(evaluate("(2 + 3) * 4"), Some(20.0));
        assert_eq!(evaluate("48 − 30 ÷ 3"), Some(38.0));
        assert_eq!(evaluate("1,200 x 2"), Some(2400.0));
        assert_eq!(evaluate("-3 + 5"), Some(2.0));
        assert_eq!(evaluate("4 / 0"), None);
        assert_eq!(evaluate("2 + import os"), None);
    }

    #[test]
    fn written_arithmetic_is_checked() {
        assert!(arithmetic_holds(
            "The bags hold 3 * 4 = 12 apples. Tom has 5 + 12 = 17.",
            1e-6
        ));
        assert!(!arithmetic_holds("He has 12 + 7 = 18 marbles.", 1e-6));
        assert!(
            arithmetic_holds("Each gets 10 / 3 = 3.33 cookies.", 1e-6),
            "rounded to 2 places"
        );
        assert!(!arithmetic_holds("So (2 + 3) * 4 = 14.", 1e-6));
        assert!(arithmetic_holds(
            "No equations here, the answer is 7.",
            1e-6
        ));
        assert!(arithmetic_holds("It costs $1,200 - $200 = $1,000.", 1e-6));
    }

    #[test]
    fn every_equation_is_checked_as_captures_iter_finds_them() {
        // The verdict of each equation `captures_iter` finds, the way the check walked them
        // before it reused its capture slots.
        let by_captures_iter = |text: &str| {
            EQUATION
                .captures_iter(text)
                .all(|c| equation_holds(&c[1], &c[2], 1e-6))
        };
        let texts = [
            "2 + 2 = 4, then 4 * 3 = 12, then 12 - 5 = 7.",
            "2 + 2 = 4, then 4 * 3 = 13, then 12 - 5 = 7.",
            "2 + 2 = 4, then 4 * 3 = 12, then 12 - 5 = 8.",
            "1 + 1 = 2 = 3 - 1 = 2",
            "× 3 = 9 then 3 × 3 = 9 and 10 ÷ 4 = 2.5 — 7 − 2 = 6",
            "(1 + 2)) * 3 = 9; 2 * (3 = 6",
            "prices: $1,200 - $200 = $1,000 and 5 x 5 = 25",
            "",
        ];
        for text in texts {
            assert_eq!(
                arithmetic_holds(text, 1e-6),
                by_captures_iter(text),
                "{text}"
            );
        }
        // The same from threads that each keep their own slots.
        let verdicts: Vec<Vec<bool>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| texts.iter().map(|t| arithmetic_holds(t, 1e-6)).collect()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let expected: Vec<bool> = texts.iter().map(|t| by_captures_iter(t)).collect();
        assert!(verdicts.iter().all(|v| *v == expected));
        assert_eq!(
            expected,
            [true, false, false, true, false, true, true, true],
            "the texts cover both verdicts"
        );
    }

    #[test]
    fn an_equation_left_open_at_the_end_is_evaluated() {
        assert_eq!(open_equation_value("The bags hold 3 * 4 ="), Some(12.0));
        assert_eq!(
            open_equation_value("Then 5 + 12 = 17, and 17 - 2 = "),
            Some(15.0)
        );
        assert_eq!(open_equation_value("Each gets 10 / 3 ="), Some(3.33));
        assert_eq!(open_equation_value("(2 + 3) * 4 ="), Some(20.0));
        assert_eq!(open_equation_value("3 * 4 = 12"), None, "already written");
        assert_eq!(open_equation_value("So x ="), None, "no arithmetic");
        assert_eq!(open_equation_value("It is 7 ="), None, "no operator");
        assert_eq!(open_equation_value("4 / 0 ="), None);
    }

    #[test]
    fn rationale_must_state_the_answer() {
        assert!(states_answer("5 + 12 = 17 apples.", "17", 1e-6));
        assert!(states_answer("That is 1,200 dollars.", "1200", 1e-6));
        assert!(!states_answer("5 + 12 = 17 apples.", "18", 1e-6));
        assert!(!states_answer("no numbers", "3", 1e-6));
    }
}
