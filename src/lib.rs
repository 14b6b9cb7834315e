//! kdpipe: distill a large language model into a small one.
//!
//! Data flows one way through files on disk, one folder a stage:
//! (synthesize →) generate → curate → finetune → eval, chained by `run`. Each stage is a
//! function of (resolved config, input files) → output files.
//!
//! Modules sit in layers and import only from layers below their own (tests/layers.rs
//! keeps this true; docs/ARCHITECTURE.md draws it):
//!
//! 1. alloc, progress: process plumbing
//! 2. config: the TOML job config, its defaults and validation, the stages and their hashes
//! 3. records (every stage file's schema), kernels (CPU ops with backward passes)
//! 4. io (atomic writes, Parquet, manifests, input files), chat, task, dedup
//! 5. prompts
//! 6. llama: the llama-family decoder, its loading, export and one inference path
//! 7. teacher: the Teacher trait and its backends
//! 8. the stages: synthesize, generate, curate, finetune, eval; never each other
//! 9. run, then cli

pub mod alloc;
pub mod chat;
pub mod cli;
pub mod config;
pub mod curate;
pub mod dedup;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod generate;
pub mod io;
pub mod kernels;
pub mod llama;
pub mod progress;
pub mod prompts;
pub mod records;
pub mod run;
pub mod stats;
pub mod synthesize;
pub mod task;
pub mod teacher;
#[cfg(test)]
pub mod test_skip;
