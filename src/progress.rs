//! Progress on stderr (stdout carries data): items, tokens/s and ETA.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::time::Instant;

pub struct Progress {
    bar: ProgressBar,
    start: Instant,
    tokens: u64,
}

impl Progress {
    pub fn new(stage: &str, total: u64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
        let style =
            ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(stage.to_string());
        Progress {
            bar,
            start: Instant::now(),
            tokens: 0,
        }
    }

    /// One item done, having produced `tokens` tokens.
    pub fn inc(&mut self, tokens: u64) {
        self.tokens += tokens;
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        self.bar
            .set_message(format!("{:.1} tok/s", self.tokens as f64 / secs));
        self.bar.inc(1);
    }

    pub fn set_message(&self, msg: String) {
        self.bar.set_message(msg);
    }

    pub fn finish(self) -> f64 {
        self.bar.finish_and_clear();
        self.start.elapsed().as_secs_f64()
    }
}
