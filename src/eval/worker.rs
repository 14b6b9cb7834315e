//! Each model scored in a process of its own (`kdpipe eval-worker`), so the peak RSS the
//! report gives a model is that model's: kdpipe's allocator keeps freed memory for the life
//! of a process (src/alloc.rs), so in one process a small student scored after the teacher
//! would be charged the teacher's pages.
//!
//! parent: config → TOML file → `kdpipe eval-worker --model <unit>` per model → JSON back.
//! worker: the same rows, prompt and task from that config → one model scored → its peak RSS.

use super::{eval_rows, score_unit, Scored, Unit};
use crate::config::{Config, Overrides, Stage};
use crate::io::atomic::{write_bytes, write_json};
use crate::prompts::Prompt;
use crate::task::Task;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where eval scores a model.
pub enum Scoring {
    /// In this process; no peak RSS per model (library callers and tests).
    InProcess,
    /// Each model that loads weights in a worker process run from this executable (the
    /// kdpipe binary), which reports its own peak RSS.
    Workers(PathBuf),
}

impl Scoring {
    /// The kdpipe binary that is running, as the worker to start.
    pub fn workers_from_this_binary() -> Result<Scoring> {
        let exe = std::env::current_exe().context("cannot find the running kdpipe binary")?;
        Ok(Scoring::Workers(exe))
    }

    pub(super) fn score(
        &self,
        cfg: &Config,
        unit: &Unit,
        at_hand: (&Prompt, &Task, &[super::EvalRow]),
    ) -> Result<Option<Scored>> {
        match self {
            Scoring::Workers(exe) if unit.loads_weights(cfg) => in_worker(exe, cfg, unit),
            _ => score_unit(cfg, unit, at_hand),
        }
    }
}

/// Files a worker reads and writes, in a folder beside the eval stage's, removed after.
struct WorkFolder(PathBuf);

impl WorkFolder {
    fn new(cfg: &Config) -> Result<WorkFolder> {
        let eval_dir = cfg.stage_dir(Stage::Eval);
        let parent = eval_dir.parent().unwrap_or(Path::new("."));
        let dir = parent.join(format!(".eval-worker-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(WorkFolder(dir))
    }
}

impl Drop for WorkFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn in_worker(exe: &Path, cfg: &Config, unit: &Unit) -> Result<Option<Scored>> {
    let work = WorkFolder::new(cfg)?;
    let config = work.0.join("config.toml");
    let out = work.0.join("scored.json");
    // The resolved config (command-line overrides applied), as `--print-config` writes it.
    write_bytes(&config, toml::to_string_pretty(cfg)?.as_bytes())?;
    let status = Command::new(exe)
        .arg("eval-worker")
        .arg("--config")
        .arg(&config)
        .arg("--model")
        .arg(unit.arg())
        .arg("--out")
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("cannot start {} eval-worker", exe.display()))?;
    if !status.success() {
        bail!(
            "eval: scoring {} in its own process failed ({status}); its messages are above",
            unit.arg()
        );
    }
    let text = std::fs::read(&out)
        .with_context(|| format!("the eval worker for {} wrote no scores", unit.arg()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("the eval worker's scores for {} do not parse", unit.arg()))
}

/// `kdpipe eval-worker`: score one model for a parent `kdpipe eval` and write its scores,
/// with this process's peak RSS, as JSON to `out`.
pub fn work(config: &Path, unit: &str, out: &Path) -> Result<()> {
    let cfg = Config::resolve(
        config,
        &Overrides::default(),
        &crate::llama::vocab::same_vocabulary,
    )?;
    let unit = Unit::parse(unit)?;
    let task = Task::from_config(&cfg.task);
    let prompt = Prompt::load(&cfg)?;
    let (_, rows) = eval_rows(&cfg, &task)?;
    let mut scored = score_unit(&cfg, &unit, (&prompt, &task, &rows))?;
    if let Some(s) = scored.as_mut() {
        s.scores.peak_rss_bytes = peak_rss_bytes();
    }
    write_json(out, &scored)
}

/// This process's peak resident set size (Linux: VmHWM in /proc/self/status).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_round_trip_through_their_argument() {
        for unit in [
            Unit::Teacher,
            Unit::TeacherCalculator,
            Unit::Base,
            Unit::Student,
            Unit::Exported("q4_k_m".into()),
        ] {
            assert_eq!(Unit::parse(&unit.arg()).unwrap(), unit);
        }
        assert!(Unit::parse("exported").is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn peak_rss_grows_with_what_this_process_touched() {
        let before = peak_rss_bytes().unwrap();
        let block = vec![1u8; 64 << 20];
        std::hint::black_box(&block);
        assert!(peak_rss_bytes().unwrap() >= before.max(64 << 20));
    }
}
