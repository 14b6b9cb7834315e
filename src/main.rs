//! The kdpipe binary: parse the command line, run one command, print errors as
//! `error:` / `caused by:` / `hint:`. Exit 0 ok, 1 finished but the quality gate
//! (`[eval] min_accuracy`) failed, 2 error.

use clap::Parser;
use kdpipe::cli::{Cli, Command, StageArgs};
use kdpipe::config::{Config, Overrides};
use kdpipe::generate::BatchFiles;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logs(verbose: u8) {
    let default = match verbose {
        0 => "warn,mistralrs_core=error,mistralrs=error",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn load(args: &StageArgs) -> anyhow::Result<Option<Config>> {
    load_with(args, Overrides::from(&args.overrides))
}

fn load_with(args: &StageArgs, overrides: Overrides) -> anyhow::Result<Option<Config>> {
    let cfg = Config::resolve(
        &args.config,
        &overrides,
        &kdpipe::llama::vocab::same_vocabulary,
    )?;
    if args.print_config {
        print!("{}{}", toml::to_string_pretty(&cfg)?, cfg.unset_sections()?);
        return Ok(None);
    }
    Ok(Some(cfg))
}

/// How a command that finished went: `Err(message)` when the quality gate failed.
type Outcome = Result<(), String>;

fn run(cli: Cli) -> anyhow::Result<Outcome> {
    match cli.command {
        Command::Generate(a) => {
            if let Some(cfg) = load(&a.stage)? {
                let batch_files = match (a.batch_write, a.batch_ingest.is_empty()) {
                    (Some(dir), _) => Some(BatchFiles::Write(dir)),
                    (None, false) => Some(BatchFiles::Ingest(a.batch_ingest)),
                    (None, true) => None,
                };
                let opts = kdpipe::generate::Options {
                    shard: a.shard.unwrap_or_default(),
                    dry_run: a.dry_run,
                    fresh: a.fresh,
                    batch_files,
                };
                kdpipe::generate::run(&cfg, &opts)?;
            }
        }
        Command::Synthesize(a) => {
            if let Some(cfg) = load(&a)? {
                kdpipe::synthesize::run(&cfg)?;
            }
        }
        Command::Curate(a) => {
            if let Some(cfg) = load(&a.stage)? {
                if a.explain {
                    println!("{}", kdpipe::curate::explain(&cfg)?);
                } else {
                    kdpipe::curate::run(&cfg)?;
                }
            }
        }
        Command::Finetune(a) => {
            if let Some(cfg) = load(&a)? {
                kdpipe::finetune::run(&cfg)?;
            }
        }
        Command::Export(a) => {
            if let Some(cfg) = load(&a)? {
                kdpipe::export::run(&cfg)?;
            }
        }
        Command::Eval(a) => {
            let mut overrides = Overrides::from(&a.stage.overrides);
            overrides.eval_files = a.files;
            // clap checked the values against the same names serde reads.
            let named = |v: &str| serde_json::Value::from(v);
            if let Some(t) = &a.teacher {
                overrides.eval_teacher = Some(serde_json::from_value(named(t))?);
            }
            if !a.models.is_empty() {
                let list = a.models.iter().map(|m| named(m)).collect();
                overrides.eval_models = Some(serde_json::from_value(list)?);
            }
            if let Some(cfg) = load_with(&a.stage, overrides)? {
                let scoring = kdpipe::eval::Scoring::workers_from_this_binary()?;
                let scores = kdpipe::eval::run(&cfg, &scoring)?;
                print!("{}", scores.table());
                if let Some(why) = scores.gate_failure(cfg.eval.min_accuracy) {
                    return Ok(Err(why));
                }
            }
        }
        Command::Run(a) => {
            if let Some(cfg) = load(&a.stage)? {
                let scoring = kdpipe::eval::Scoring::workers_from_this_binary()?;
                let scores = kdpipe::run::run(&cfg, a.force, a.fresh, &scoring)?;
                print!("{}", scores.table());
                if let Some(why) = scores.gate_failure(cfg.eval.min_accuracy) {
                    return Ok(Err(why));
                }
            }
        }
        Command::ExportData(a) => {
            if let Some(cfg) = load(&a.stage)? {
                let format = kdpipe::export::data::DataFormat::parse(&a.format)?;
                kdpipe::export::data::run(&cfg, format)?;
            }
        }
        Command::EvalWorker(a) => kdpipe::eval::work(&a.config, &a.model, &a.out)?,
        Command::Show(a) => {
            let df = kdpipe::io::parquet::read_frame(&a.file)?;
            for row in kdpipe::io::parquet::rows_as_json(&df, a.limit)? {
                println!("{row}");
            }
        }
    }
    Ok(Ok(()))
}

/// Print the error chain; a line starting with `hint:` inside any message is printed
/// last, as the thing to do.
fn report(err: &anyhow::Error) {
    let mut hints = Vec::new();
    for (i, cause) in err.chain().enumerate() {
        let text = cause.to_string();
        let mut lines = text.lines();
        let first = lines.next().unwrap_or("");
        eprintln!("{}{first}", if i == 0 { "error: " } else { "caused by: " });
        for line in lines {
            match line.strip_prefix("hint:") {
                Some(h) => hints.push(h.trim().to_string()),
                None => eprintln!("  {line}"),
            }
        }
    }
    for h in hints {
        eprintln!("hint: {h}");
    }
}

fn main() -> ExitCode {
    kdpipe::alloc::tune();
    let cli = Cli::parse();
    init_logs(cli.verbose);
    match run(cli) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(gate)) => {
            eprintln!("{gate}");
            ExitCode::from(1)
        }
        Err(e) => {
            report(&e);
            ExitCode::from(2)
        }
    }
}
