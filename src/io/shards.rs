//! Shards of a generate run: which inputs a shard owns and what its files are called.
//! A shard owns the ids whose seeded hash falls in its slot, so a scheduler's job array can
//! split one run (`--shard 3/16`) and every shard's output is the same whatever the order
//! of the input file.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;

    /// "i/n" with 0 ≤ i < n.
    fn from_str(s: &str) -> Result<Self> {
        let (i, n) = s
            .split_once('/')
            .with_context(|| format!("--shard takes i/n (e.g. 3/16), got {s:?}"))?;
        let index: usize = i
            .trim()
            .parse()
            .with_context(|| format!("bad shard index in {s:?}"))?;
        let count: usize = n
            .trim()
            .parse()
            .with_context(|| format!("bad shard count in {s:?}"))?;
        if count == 0 || index >= count || count > 99_999 {
            bail!("--shard {s}: need 0 ≤ i < n ≤ 99999 (shards are numbered from 0)");
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// Whether this shard owns the input with this id.
    pub fn owns(&self, id: &str) -> bool {
        if self.count == 1 {
            return true;
        }
        let digest = Sha256::digest(format!("shard:{id}").as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        (u64::from_be_bytes(first) % self.count as u64) as usize == self.index
    }

    fn suffix(&self) -> String {
        format!("{:05}-of-{:05}", self.index, self.count)
    }

    pub fn teacher_file(&self, dir: &Path) -> PathBuf {
        dir.join(format!("teacher-{}.parquet", self.suffix()))
    }

    /// `manifest.json` for an unsharded run; one manifest a shard otherwise.
    pub fn manifest_name(&self) -> String {
        if self.count == 1 {
            "manifest.json".into()
        } else {
            format!("manifest-{}.json", self.suffix())
        }
    }

    /// Where rows are written while the shard runs, before they are merged.
    pub fn parts_dir(&self, dir: &Path) -> PathBuf {
        dir.join(format!("parts-{}", self.suffix()))
    }

    /// Read "teacher-IIIII-of-NNNNN.parquet".
    pub fn from_teacher_file(path: &Path) -> Option<Shard> {
        let name = path.file_name()?.to_str()?;
        let rest = name.strip_prefix("teacher-")?.strip_suffix(".parquet")?;
        let (i, n) = rest.split_once("-of-")?;
        Some(Shard {
            index: i.parse().ok()?,
            count: n.parse().ok()?,
        })
    }
}

/// The complete set of teacher files in a generate folder: every shard of one count, each
/// with its manifest. Names the missing shards otherwise.
pub fn complete_teacher_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!(
            "{} does not exist: the generate stage has not run\nhint: run kdpipe generate --config …",
            dir.display()
        );
    }
    let mut found: Vec<(Shard, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| Shard::from_teacher_file(&p).map(|s| (s, p)))
        .collect();
    if found.is_empty() {
        bail!(
            "{} has no teacher-*.parquet files\nhint: run kdpipe generate --config …",
            dir.display()
        );
    }
    found.sort_by_key(|(s, _)| (s.count, s.index));
    let count = found[0].0.count;
    if found.iter().any(|(s, _)| s.count != count) {
        bail!(
            "{} mixes teacher files from different shard counts\nhint: remove the files of the old sharding, or re-run generate",
            dir.display()
        );
    }
    let missing: Vec<String> = (0..count)
        .map(|index| Shard { index, count })
        .filter(|s| !found.iter().any(|(f, _)| f == s) || !dir.join(s.manifest_name()).exists())
        .map(|s| format!("{}/{}", s.index, s.count))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{}: shards {} have not finished\nhint: run kdpipe generate --shard I/N for each of them",
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_ids() {
        let ids: Vec<String> = (0..500).map(|i| format!("row-{i}")).collect();
        let shards: Vec<Shard> = (0..4).map(|index| Shard { index, count: 4 }).collect();
        for id in &ids {
            assert_eq!(shards.iter().filter(|s| s.owns(id)).count(), 1, "{id}");
        }
        // Roughly even: each of 4 shards gets 125 ± 40 of 500 ids.
        for s in &shards {
            let n = ids.iter().filter(|id| s.owns(id)).count();
            assert!((85..=165).contains(&n), "shard {} has {n}", s.index);
        }
    }

    #[test]
    fn shard_spec_and_file_names() {
        let s: Shard = "3/16".parse().unwrap();
        assert_eq!(
            s,
            Shard {
                index: 3,
                count: 16
            }
        );
        assert!("16/16".parse::<Shard>().is_err());
        assert!("3".parse::<Shard>().is_err());
        let f = s.teacher_file(Path::new("g"));
        assert_eq!(f, Path::new("g/teacher-00003-of-00016.parquet"));
        assert_eq!(Shard::from_teacher_file(&f), Some(s));
        assert_eq!(s.manifest_name(), "manifest-00003-of-00016.json");
        assert_eq!(Shard::default().manifest_name(), "manifest.json");
    }

    #[test]
    fn missing_shards_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for i in [0, 2] {
            let s = Shard { index: i, count: 3 };
            std::fs::write(s.teacher_file(dir.path()), b"x").unwrap();
            std::fs::write(dir.path().join(s.manifest_name()), b"{}").unwrap();
        }
        let err = complete_teacher_files(dir.path()).unwrap_err().to_string();
        assert!(err.contains("shards 1/3 have not finished"), "{err}");
    }
}
