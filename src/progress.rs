//! Progress on stderr (stdout carries data): items, tokens/s and ETA. A bar on a
//! terminal; a plain line every few seconds when stderr is a log file (batch jobs).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often a log line is printed when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(15);

pub struct Progress {
    stage: String,
    bar: Option<ProgressBar>,
    start: Instant,
    last_log: Instant,
    done: u64,
    total: u64,
    tokens: u64,
    message: String,
}

impl Progress {
    pub fn new(stage: &str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
            let style =
                ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(stage.to_string());
            bar
        });
        let now = Instant::now();
        Progress {
            stage: stage.to_string(),
            bar,
            start: now,
            last_log: now,
            done: 0,
            total,
            tokens: 0,
            message: String::new(),
        }
    }

    fn rate(&self) -> f64 {
        self.tokens as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    /// One item done, having produced `tokens` tokens.
    pub fn inc(&mut self, tokens: u64) {
        self.tokens += tokens;
        self.done += 1;
        let rate = format!("{:.1} tok/s", self.rate());
        match &self.bar {
            Some(bar) => {
                bar.set_message(format!("{} {rate}", self.message));
                bar.inc(1);
            }
            None if self.last_log.elapsed() >= LOG_EVERY || self.done == self.total => {
                self.last_log = Instant::now();
                let elapsed = self.start.elapsed().as_secs_f64();
                let eta =
                    elapsed / self.done as f64 * (self.total - self.done.min(self.total)) as f64;
                let msg = if self.message.is_empty() {
                    String::new()
                } else {
                    format!(" {}", self.message)
                };
                eprintln!(
                    "{}: {}/{}{msg}, {rate}, eta {:.0} s",
                    self.stage, self.done, self.total, eta
                );
            }
            None => {}
        }
    }

    /// A short status shown next to the counts (e.g. the current loss).
    pub fn set_message(&mut self, msg: String) {
        self.message = msg;
    }

    /// Clear the bar; the elapsed seconds.
    pub fn finish(self) -> f64 {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.start.elapsed().as_secs_f64()
    }
}
