//! The command line (clap derive). Every override is an `Option`: `None` keeps the config.

use crate::config::Overrides;
use crate::io::shards::Shard;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "kdpipe",
    version,
    about = "Distill a large language model into a small one: generate → curate → finetune → eval"
)]
pub struct Cli {
    /// More logs on stderr (-v info, -vv debug); RUST_LOG works too.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The teacher writes new task inputs from a few seed examples ([synthesize]).
    Synthesize(StageArgs),
    /// The teacher writes a rationale, an answer and soft labels for every input.
    Generate(GenerateArgs),
    /// Teacher rows → train / val / test, with a report of what each rule removed.
    Curate(CurateArgs),
    /// Train the student on the curated rows and export it in Hugging Face format.
    Finetune(StageArgs),
    /// Score the student (before and after) and the teacher on a held-out split or file.
    Eval(EvalArgs),
    /// Write the finetuned student as GGUF files (F16, Q8_0, Q4_K_M; [export]).
    Export(StageArgs),
    /// All stages from one config, skipping those already done with the same inputs.
    Run(RunArgs),
    /// Write the curated splits as data sets for a torch trainer (TRL, axolotl).
    ExportData(ExportDataArgs),
    /// Print rows of a Parquet file as JSON lines.
    Show(ShowArgs),
    /// Internal: score one model for `kdpipe eval`, in a process of its own.
    #[command(hide = true)]
    EvalWorker(EvalWorkerArgs),
}

#[derive(Debug, Args)]
pub struct ExportDataArgs {
    #[command(flatten)]
    pub stage: StageArgs,
    /// The trainer's layout: trl (prompt / completion chats), axolotl (messages) or
    /// distillkit (the teacher's token top-k as DistillKit's offline teacher reads them).
    #[arg(long, value_parser = ["trl", "axolotl", "distillkit"])]
    pub format: String,
}

#[derive(Debug, Args)]
pub struct EvalWorkerArgs {
    /// The resolved config the parent eval wrote.
    #[arg(long)]
    pub config: PathBuf,
    /// teacher, base, student or exported:<type>.
    #[arg(long)]
    pub model: String,
    /// Where to write the scores (JSON).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct StageArgs {
    /// The job's TOML config.
    #[arg(short, long)]
    pub config: PathBuf,
    /// Print the resolved config (defaults filled in) and exit.
    #[arg(long)]
    pub print_config: bool,
    #[command(flatten)]
    pub overrides: OverrideArgs,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub stage: StageArgs,
    /// Score this file (JSONL, Parquet or CSV, [data] field names, with gold) instead of
    /// the curated split; repeat for several. Sets [eval] files.
    #[arg(long = "file", value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Where the teacher's answers come from: generated (from generate's rows) or run
    /// (ask the teacher now). Sets [eval] teacher.
    #[arg(long, value_parser = ["generated", "run"])]
    pub teacher: Option<String>,
    /// Which models to score, comma-separated: student, base, teacher, exported (the GGUF
    /// files of kdpipe export). Sets [eval] models.
    #[arg(long, value_delimiter = ',', value_parser = ["student", "base", "teacher", "exported"])]
    pub models: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CurateArgs {
    #[command(flatten)]
    pub stage: StageArgs,
    /// Print the optimized Polars plan of the rules and exit.
    #[arg(long)]
    pub explain: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub stage: StageArgs,
    /// Process one deterministic slice of the inputs, i/n (0 ≤ i < n), for job arrays;
    /// writes teacher-0000i-of-0000n.parquet. Curate reads all shards.
    #[arg(long)]
    pub shard: Option<Shard>,
    /// Print the first prompt, the number of requests and tokens and the cost; call nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Discard rows an earlier unfinished run left, instead of resuming from them.
    #[arg(long)]
    pub fresh: bool,
    /// Write OpenAI Batch API request files for the missing rows into DIR instead of
    /// calling the teacher.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["batch_ingest", "dry_run"])]
    pub batch_write: Option<PathBuf>,
    /// Read Batch API output and error files into rows; requests for rows still missing are
    /// written to generate/batch-retry/.
    #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with = "dry_run")]
    pub batch_ingest: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub stage: StageArgs,
    /// Re-run every stage even when its outputs are current.
    #[arg(long)]
    pub force: bool,
    /// With --force: also discard teacher rows an earlier generate left (otherwise reused).
    #[arg(long)]
    pub fresh: bool,
}

#[derive(Debug, Args, Default)]
pub struct OverrideArgs {
    /// Run name (outputs in <runs-dir>/<name>/).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub runs_dir: Option<PathBuf>,
    /// Use only the first N input rows.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long)]
    pub teacher_model: Option<String>,
    #[arg(long)]
    pub student_model: Option<String>,
    #[arg(long)]
    pub max_steps: Option<usize>,
}

impl From<&OverrideArgs> for Overrides {
    fn from(a: &OverrideArgs) -> Self {
        Overrides {
            name: a.name.clone(),
            runs_dir: a.runs_dir.clone(),
            limit: a.limit,
            teacher_model: a.teacher_model.clone(),
            student_model: a.student_model.clone(),
            max_steps: a.max_steps,
            ..Default::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub file: PathBuf,
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
}
