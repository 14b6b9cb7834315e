//! run: all stages from one config, in order. A stage whose manifest matches (same config
//! hash, same input digests, outputs unchanged) is skipped, so a killed job resumes at the
//! first unfinished stage.

use crate::config::{Config, Stage};
use crate::eval::Scores;
use crate::io::manifest::{config_hash, FileEntry, Manifest};
use crate::{curate, eval, export, finetune, generate, synthesize};
use anyhow::Result;

fn is_current(cfg: &Config, stage: Stage, inputs: Result<Vec<FileEntry>>) -> bool {
    let Ok(inputs) = inputs else { return false };
    match Manifest::read(&cfg.stage_dir(stage), stage) {
        Ok(m) => m.is_current(&config_hash(&cfg.stage_view(stage)), &inputs),
        Err(_) => false,
    }
}

/// `scoring`: where eval scores each model (see `eval::Scoring`).
pub fn run(cfg: &Config, force: bool, fresh: bool, scoring: &eval::Scoring) -> Result<Scores> {
    let started = std::time::Instant::now();
    if cfg.synthesize.is_some() {
        if force || !is_current(cfg, Stage::Synthesize, synthesize::input_entries(cfg)) {
            synthesize::run(cfg)?;
        } else {
            eprintln!("synthesize: up to date, skipped");
        }
    }
    if force || !is_current(cfg, Stage::Generate, generate::input_entries(cfg)) {
        let opts = generate::Options {
            fresh,
            ..Default::default()
        };
        generate::run(cfg, &opts)?;
    } else {
        eprintln!("generate: up to date, skipped");
    }
    if force || !is_current(cfg, Stage::Curate, curate::input_entries(cfg)) {
        curate::run(cfg)?;
    } else {
        eprintln!("curate: up to date, skipped");
    }
    if force || !is_current(cfg, Stage::Finetune, finetune::input_entries(cfg)) {
        finetune::run(cfg)?;
    } else {
        eprintln!("finetune: up to date, skipped");
    }
    if cfg.export.is_some() {
        if force || !is_current(cfg, Stage::Export, export::input_entries(cfg)) {
            export::run(cfg)?;
        } else {
            eprintln!("export: up to date, skipped");
        }
    }
    let scores = if !force && is_current(cfg, Stage::Eval, eval::input_entries(cfg)) {
        eprintln!("eval: up to date, skipped");
        let m = Manifest::read(&cfg.stage_dir(Stage::Eval), Stage::Eval)?;
        serde_json::from_value(m.summary)?
    } else {
        eval::run(cfg, scoring)?
    };
    if cfg.export.is_some() {
        // The card carries the eval table that was just written.
        let card = export::write_card(cfg)?;
        eprintln!("run: model card → {}", card.display());
    }
    eprintln!("run: finished in {:.0} s", started.elapsed().as_secs_f64());
    Ok(scores)
}
