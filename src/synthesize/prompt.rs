//! The request that asks the teacher for one new input, and the cleaning of its reply.

use crate::chat::ChatMessage;

/// A chat showing `examples` (seeds and accepted inputs, numbered) and asking for one more.
pub fn request(description: &str, labels: &[String], examples: &[&str]) -> Vec<ChatMessage> {
    let mut system = String::from(
        "You write new example inputs for a task, in the style of the examples you are shown.",
    );
    if !description.trim().is_empty() {
        system.push_str(&format!(" The task: {}", description.trim()));
    }
    if !labels.is_empty() {
        system.push_str(&format!(" Its answers are one of: {}.", labels.join(", ")));
    }
    let mut user = String::from("Examples of inputs:\n");
    for (i, e) in examples.iter().enumerate() {
        user.push_str(&format!("\nExample {}:\n{}\n", i + 1, e.trim()));
    }
    user.push_str(&format!(
        "\nWrite Example {}: one new input for the same task, on a different topic with different details. Do not answer it. Reply with the new input only.",
        examples.len() + 1
    ));
    vec![
        ChatMessage::new("system", system),
        ChatMessage::new("user", user),
    ]
}

/// The new input in a reply: leading labels ("Example 5:", "Input:") and quotes removed,
/// cut at the first blank line or at a further "Example" heading. None when nothing is left.
pub fn clean(reply: &str) -> Option<String> {
    let mut text = reply.trim();
    loop {
        let before = text;
        for prefix in ["Example", "New input", "Input", "Question"] {
            if let Some(rest) = text.strip_prefix(prefix) {
                // "Example 5:" / "Input:" — a number, then a colon, on the first line.
                let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ');
                if let Some(rest) = rest.strip_prefix(':') {
                    text = rest.trim_start();
                }
            }
        }
        if text == before {
            break;
        }
    }
    let end = [text.find("\n\n"), text.find("\nExample")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(text.len());
    let text = text[..end]
        .trim()
        .trim_matches(|c| c == '"' || c == '“' || c == '”')
        .trim();
    (!text.is_empty()).then(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_cleaned_to_the_input_alone() {
        assert_eq!(
            clean("Example 4:\n\"Sam has 4 pens. How many?\"\n\nAnswer: 4").as_deref(),
            Some("Sam has 4 pens. How many?")
        );
        assert_eq!(
            clean("Input: Ann reads 5 books.\nExample 5: more").as_deref(),
            Some("Ann reads 5 books.")
        );
        assert_eq!(clean("Question: Why 3?").as_deref(), Some("Why 3?"));
        assert_eq!(clean("Example 3:"), None);
        assert_eq!(
            clean("Examples are fun to write: 3 of them").as_deref(),
            Some("Examples are fun to write: 3 of them")
        );
    }

    #[test]
    fn the_request_numbers_the_examples_and_asks_for_the_next() {
        let msgs = request("Solve it.", &[], &["a 1", "b 2"]);
        assert_eq!(msgs.len(), 2);
        assert!(msgs[0].content.contains("The task: Solve it."));
        assert!(msgs[1].content.contains("Example 2:\nb 2"));
        assert!(msgs[1].content.contains("Write Example 3"));
    }
}
