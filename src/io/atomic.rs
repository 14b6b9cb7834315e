//! Writes that never leave a half-written file under the final name: write to a temp
//! file beside the target, flush, then rename.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The temp name a write goes to before it is renamed into place.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Write through `fill` into a temp file, then rename it to `path`.
pub fn write_with<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut std::fs::File) -> Result<()>,
{
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create folder {}", parent.display()))?;
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        fill(&mut file)?;
        file.flush()?;
        file.sync_all()
            .with_context(|| format!("cannot sync {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| with_storage_hint(e, path))
}

/// A disk that is full or mounted read-only is the user's to fix: say so, and where.
pub fn with_storage_hint(err: anyhow::Error, path: &Path) -> anyhow::Error {
    use std::io::ErrorKind;
    // Libraries (Polars, safetensors) pass the I/O error on as text: read both.
    let text = format!("{err:#}");
    let kind = err
        .chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .map(|e| e.kind())
        .or_else(|| {
            if text.contains("(os error 28)") || text.contains("(os error 122)") {
                Some(ErrorKind::StorageFull)
            } else if text.contains("(os error 30)") {
                Some(ErrorKind::ReadOnlyFilesystem)
            } else {
                None
            }
        });
    let folder = path.parent().unwrap_or(path).display();
    match kind {
        Some(ErrorKind::StorageFull) | Some(ErrorKind::QuotaExceeded) => err.context(format!(
            "the disk holding {folder} is full; nothing earlier was changed\nhint: free space there, or set runs_dir to a disk with room, then run the same command again"
        )),
        Some(ErrorKind::ReadOnlyFilesystem) | Some(ErrorKind::PermissionDenied) => {
            err.context(format!(
                "{folder} cannot be written (read-only or no permission); nothing earlier was changed\nhint: make it writable, or set runs_dir to a writable folder"
            ))
        }
        _ => err,
    }
}

/// A folder of outputs replaced as a whole. Files are written into a staging folder beside
/// the target; `commit` moves the finished folder into place. Until then the earlier
/// folder is untouched, so a failure anywhere (a full disk, a crash) leaves the earlier
/// complete output as it was. A staging folder left by a crash is removed by the next run.
pub struct StagedDir {
    target: PathBuf,
    staging: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Stage a folder for `target`; an error, before anything is written, where `target`
    /// is an existing file (a model given as an output folder by mistake would be moved
    /// aside under a hidden name).
    pub fn begin(target: &Path) -> Result<StagedDir> {
        if target.is_file() {
            anyhow::bail!(
                "{} is a file, and kdpipe writes a folder there; nothing was changed\nhint: give an output folder that does not exist yet (or one kdpipe wrote)",
                target.display()
            );
        }
        let parent = target.parent().unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        std::fs::create_dir_all(parent)
            .map_err(anyhow::Error::from)
            .and_then(|()| remove_stale(parent, &name))
            .map_err(|e| with_storage_hint(e, target))
            .with_context(|| format!("cannot prepare {}", parent.display()))?;
        let staging = parent.join(format!(".{name}.staging-{}", std::process::id()));
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("cannot create {}", staging.display()))
            .map_err(|e| with_storage_hint(e, target))?;
        Ok(StagedDir {
            target: target.to_path_buf(),
            staging,
            committed: false,
        })
    }

    /// Where the outputs are written.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// A staged file's path as it will be once committed (for manifests).
    pub fn final_path(&self, staged: &Path) -> PathBuf {
        match staged.strip_prefix(&self.staging) {
            Ok(rel) => self.target.join(rel),
            Err(_) => staged.to_path_buf(),
        }
    }

    /// Move the staged folder into place. The earlier folder is renamed aside first and
    /// removed after; a crash between the two renames leaves no folder under the target
    /// name (the stage reads as not run) and never a mix of old and new files.
    pub fn commit(mut self) -> Result<()> {
        let parent = self.target.parent().unwrap_or(Path::new("."));
        let name = self
            .target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        if self.target.exists() {
            std::fs::rename(&self.target, &old)
                .with_context(|| format!("cannot move {} aside", self.target.display()))?;
        }
        std::fs::rename(&self.staging, &self.target).with_context(|| {
            format!(
                "cannot move {} to {}",
                self.staging.display(),
                self.target.display()
            )
        })?;
        self.committed = true;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// Staging and set-aside folders of `name` left by killed runs. A run killed between the
/// two renames of `commit` left the earlier complete folder aside: it goes back in place.
fn remove_stale(parent: &Path, name: &str) -> Result<()> {
    let (staging, old) = (format!(".{name}.staging-"), format!(".{name}.old-"));
    let target = parent.join(name);
    for e in std::fs::read_dir(parent)? {
        let e = e?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&old) && !target.exists() {
            std::fs::rename(e.path(), &target)?;
        } else if n.starts_with(&staging) || n.starts_with(&old) {
            std::fs::remove_dir_all(e.path())?;
        }
    }
    Ok(())
}

pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |f| {
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", path.display()))
    })
}

pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_bytes(path, text.as_bytes())
}

/// Hex sha256 of a file's bytes.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

pub fn text_sha256(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A 60-bit seed derived from a text (its sha256's first 15 hex digits): the same text
/// gives the same seed on every machine and run (sampling seeds, dropout keys).
pub fn seed_from_text(text: &str) -> u64 {
    u64::from_str_radix(&text_sha256(text)[..15], 16).expect("15 hex digits fit a u64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_folder_replaces_the_old_one_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("curate");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(target.join("a.txt"), "old").unwrap();
        // Dropped without commit: the old folder is untouched, no staging folder stays.
        {
            let staged = StagedDir::begin(&target).unwrap();
            std::fs::write(staged.path().join("a.txt"), "half").unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(target.join("a.txt")).unwrap(),
            "old"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let staged = StagedDir::begin(&target).unwrap();
        let file = staged.path().join("b.txt");
        std::fs::write(&file, "new").unwrap();
        assert_eq!(staged.final_path(&file), target.join("b.txt"));
        staged.commit().unwrap();
        assert!(!target.join("a.txt").exists());
        assert_eq!(
            std::fs::read_to_string(target.join("b.txt")).unwrap(),
            "new"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A run killed between the renames left the old folder aside: it comes back.
        std::fs::rename(&target, dir.path().join(".curate.old-1")).unwrap();
        drop(StagedDir::begin(&target).unwrap());
        assert_eq!(
            std::fs::read_to_string(target.join("b.txt")).unwrap(),
            "new"
        );
    }

    #[test]
    fn a_folder_is_never_staged_over_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model.gguf");
        std::fs::write(&model, "weights").unwrap();
        let err = StagedDir::begin(&model).err().unwrap().to_string();
        assert!(err.contains("is a file"), "{err}");
        assert_eq!(std::fs::read_to_string(&model).unwrap(), "weights");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_write_leaves_old_file_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        write_bytes(&path, b"old").unwrap();
        let err = write_with(&path, |_| anyhow::bail!("boom"));
        assert!(err.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temp file left behind");
    }
}
