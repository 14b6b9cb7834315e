//! kdpipe: distill a large language model into a small one.
//!
//! Data flows one way through files on disk, one folder a stage:
//! generate → curate → finetune → eval, chained by `run`. No stage module imports
//! another; each is a function of (resolved config, input files) → output files.

pub mod alloc;
pub mod chat;
pub mod cli;
pub mod config;
pub mod curate;
pub mod eval;
pub mod finetune;
pub mod generate;
pub mod io;
pub mod progress;
pub mod prompts;
pub mod records;
pub mod run;
pub mod student;
pub mod synthesize;
pub mod task;
pub mod teacher;
#[cfg(test)]
pub mod test_skip;
