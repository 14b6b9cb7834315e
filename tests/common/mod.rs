//! Helpers shared by the integration tests: paths of the real models and the binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A real GGUF from scripts/fetch-models.sh; panics with the fix when it is missing.
pub fn model(file: &str) -> PathBuf {
    let p = root().join("models").join(file);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-models.sh first",
        p.display()
    );
    p
}

pub fn smollm2() -> PathBuf {
    model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn qwen() -> PathBuf {
    model("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf")
}

pub fn kdpipe(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kdpipe"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("kdpipe runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file under a folder, recursively.
pub fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

pub mod fault_proxy;
pub mod server;
