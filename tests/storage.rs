//! A full disk and a read-only output folder: the command stops with a clear error that
//! says what to do, and the earlier complete outputs are left byte for byte as they were.
//! The runs folder is a small tmpfs. Mounting one needs root; without it the test runs
//! itself again inside a user and mount namespace (`unshare --user --map-root-user
//! --mount`), where an ordinary user may mount a tmpfs. Where neither works the skip is
//! recorded and fails the suite (see src/test_skip.rs).

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }

    fn remount(&self, mode: &str) {
        // The type and source spelled out: inside a user namespace, mount(8) cannot
        // remount by mount point alone.
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("remount,{mode}"), "tmpfs"])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    all_files(dir)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

/// Fill the file system holding `dir` to the last byte.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![7u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&chunk[..1]).is_ok() {}
    let _ = f.sync_all();
    path
}

fn config(dir: &Path, limit: usize) {
    let text = format!(
        r#"name = "t"
[data]
inputs = ["{data}"]
id_field = "id"
input_field = "question"
gold_field = "answer"
limit = {limit}
[task]
kind = "numeric"
prompt = "{prompts}/numeric.md"
[teacher]
model = "{model}"
max_tokens = 16
[student]
model = "unused.gguf"
[generate]
flush_rows = 1
[curate]
split = [0.5, 0.25, 0.25]
"#,
        data = root().join("datasets/arith.jsonl").display(),
        prompts = root().join("prompts").display(),
        model = smollm2().display()
    );
    std::fs::write(dir.join("c.toml"), text).unwrap();
}

fn assert_clear_failure(out: &std::process::Output, words: &[&str], what: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{what}: {err}");
    assert!(!err.contains("panicked"), "{what}: {err}");
    for w in words {
        assert!(err.contains(w), "{what}: {w:?} not in {err}");
    }
}

const TEST: &str = "full_disk_and_read_only_folder_fail_clearly_and_keep_earlier_outputs";
/// Set when the test runs itself inside a user and mount namespace.
const IN_NAMESPACE: &str = "KDPIPE_STORAGE_IN_NAMESPACE";

fn unshare(args: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--user", "--map-root-user", "--mount", "--"])
        .args(args);
    c
}

#[test]
fn full_disk_and_read_only_folder_fail_clearly_and_keep_earlier_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    if let Some(fs) = Tmpfs::mount(&tmp.path().join("runs"), "4m") {
        return scenario(tmp.path(), fs);
    }
    assert!(
        std::env::var_os(IN_NAMESPACE).is_none(),
        "no tmpfs could be mounted even inside a user namespace"
    );
    let namespaces = unshare(&["true"]).status().is_ok_and(|s| s.success());
    if !skip::can_run(
        &format!("storage::{TEST}"),
        "tmpfs-mount",
        namespaces,
        "mounting a tmpfs needs root or unprivileged user namespaces (unshare -Urm)",
    ) {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = unshare(&[exe.to_str().unwrap(), "--exact", TEST, "--nocapture"])
        .env(IN_NAMESPACE, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the test inside a user namespace failed:\n{stdout}\n{}",
        stderr(&out)
    );
}

fn scenario(dir: &Path, fs: Tmpfs) {
    config(dir, 3);
    let out = kdpipe(&["generate", "--config", "c.toml"], dir);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = kdpipe(&["curate", "--config", "c.toml"], dir);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = snapshot(&dir.join("runs/t"));

    // A full disk: generate with two more inputs cannot write its rows, curate cannot
    // write its splits.
    let filler = fill(&dir.join("runs"));
    config(dir, 5);
    let out = kdpipe(&["generate", "--config", "c.toml"], dir);
    assert_clear_failure(
        &out,
        &["is full", "hint: free space"],
        "generate, disk full",
    );
    std::fs::write(dir.join("c.toml"), {
        let t = std::fs::read_to_string(dir.join("c.toml")).unwrap();
        t.replace("split = [0.5, 0.25, 0.25]", "split = [0.4, 0.3, 0.3]")
    })
    .unwrap();
    let out = kdpipe(&["curate", "--config", "c.toml"], dir);
    assert_clear_failure(&out, &["is full", "hint: free space"], "curate, disk full");
    let mut after = snapshot(&dir.join("runs/t"));
    // generate's resume state may hold rows it managed to save; the finished outputs not.
    after.retain(|p, _| !p.to_string_lossy().contains("/parts-"));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (p, b) in &before {
        assert_eq!(&after[p], b, "{} changed on a full disk", p.display());
    }

    // A read-only folder.
    std::fs::remove_file(filler).unwrap();
    fs.remount("ro");
    let out = kdpipe(&["curate", "--config", "c.toml"], dir);
    assert_clear_failure(
        &out,
        &["cannot be written", "hint: make it writable"],
        "curate, read-only",
    );
    for (p, b) in &before {
        assert_eq!(&std::fs::read(p).unwrap(), b, "{} changed", p.display());
    }

    // With room again, the same commands finish.
    fs.remount("rw");
    let out = kdpipe(&["generate", "--config", "c.toml"], dir);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = kdpipe(&["curate", "--config", "c.toml"], dir);
    assert!(out.status.success(), "{}", stderr(&out));
    record_suite(
        "storage",
        "storage suite: full disk (generate, curate) and read-only folder (curate): 3 clear errors, earlier outputs intact, then both finished",
    );
}
