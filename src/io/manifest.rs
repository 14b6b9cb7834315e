//! manifest.json: written last in a stage folder, after every output was renamed into
//! place. A folder without one is incomplete. `run` skips a stage whose manifest has the
//! same config hash and input digests.

use super::atomic::{file_sha256, text_sha256, write_json, StagedDir};
use crate::config::Stage;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Version of every stage file's schema; a reader that finds another one stops.
pub const SCHEMA_VERSION: u32 = 4;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub path: String,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub kind: String,
    pub schema_version: u32,
    pub kdpipe_version: String,
    pub config_hash: String,
    pub seed: u64,
    pub inputs: Vec<FileEntry>,
    pub outputs: Vec<FileEntry>,
    #[serde(default)]
    pub summary: serde_json::Value,
}

pub fn config_hash(view: &serde_json::Value) -> String {
    text_sha256(&view.to_string())
}

pub fn entry(path: &Path, rows: Option<usize>) -> Result<FileEntry> {
    Ok(FileEntry {
        path: path.display().to_string(),
        sha256: file_sha256(path)?,
        rows,
    })
}

/// The entry of a file written into a staging folder, recorded under its final path.
pub fn staged_entry(staged: &StagedDir, path: &Path, rows: Option<usize>) -> Result<FileEntry> {
    let mut e = entry(path, rows)?;
    e.path = staged.final_path(path).display().to_string();
    Ok(e)
}

pub fn manifest_path(stage_dir: &Path) -> PathBuf {
    stage_dir.join("manifest.json")
}

impl Manifest {
    pub fn new(stage: Stage, config_hash: String, seed: u64) -> Self {
        Manifest {
            kind: stage.as_str().to_string(),
            schema_version: SCHEMA_VERSION,
            kdpipe_version: env!("CARGO_PKG_VERSION").to_string(),
            config_hash,
            seed,
            inputs: vec![],
            outputs: vec![],
            summary: serde_json::Value::Null,
        }
    }

    pub fn write(&self, stage_dir: &Path) -> Result<()> {
        write_json(&manifest_path(stage_dir), self)
    }

    /// Write under another name (one manifest a generate shard).
    pub fn write_as(&self, stage_dir: &Path, name: &str) -> Result<()> {
        write_json(&stage_dir.join(name), self)
    }

    /// Read a stage's manifest, failing when the stage did not finish or is from another
    /// schema version.
    pub fn read(stage_dir: &Path, stage: Stage) -> Result<Manifest> {
        Self::read_as(stage_dir, "manifest.json", stage)
    }

    /// Read a manifest with another name (a generate shard's).
    pub fn read_as(stage_dir: &Path, name: &str, stage: Stage) -> Result<Manifest> {
        let path = stage_dir.join(name);
        if !path.exists() {
            bail!(
                "{} has no {name}: the {stage} stage did not finish there\nhint: run kdpipe {stage} --config …",
                stage_dir.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let broken = || {
            format!(
                "{} is not a valid manifest (a crash mid-write, or edited by hand)\nhint: re-run kdpipe {stage} --config …",
                path.display()
            )
        };
        // The version first: a newer kdpipe's manifest may have fields this one lacks.
        let value: serde_json::Value = serde_json::from_str(&text).with_context(broken)?;
        let version = value.get("schema_version").and_then(|v| v.as_u64());
        if version.is_some_and(|v| v != u64::from(SCHEMA_VERSION)) {
            bail!(
                "{} has schema version {}, this kdpipe reads {SCHEMA_VERSION}\nhint: re-run kdpipe {stage} --config …",
                path.display(),
                version.unwrap_or_default()
            );
        }
        serde_json::from_value(value).with_context(broken)
    }

    /// Whether this finished stage was made from the same config and the same inputs, and
    /// its outputs are still there unchanged.
    pub fn is_current(&self, config_hash: &str, inputs: &[FileEntry]) -> bool {
        self.config_hash == config_hash
            && self.inputs == inputs
            && self.outputs.iter().all(|o| {
                file_sha256(Path::new(&o.path))
                    .map(|d| d == o.sha256)
                    .unwrap_or(false)
            })
    }
}
