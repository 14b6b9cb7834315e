//! A real OpenAI-compatible server for the API tests: llama-cpp-python's, serving the
//! SmolLM2 GGUF on 127.0.0.1 under the name "smollm2". `scripts/setup-llama-server.sh`
//! installs it (or KDPIPE_LLAMA_PYTHON names a python that has it). The server dies with
//! the test process: a watcher shell kills it when its parent is gone.

use super::{root, smollm2};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MODEL_NAME: &str = "smollm2";

pub struct Server {
    pub port: u16,
    child: Child,
}

impl Server {
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

impl Drop for Server {
    /// Stop the server (the watcher shell's child), then the watcher.
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-TERM", "-P", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn python() -> String {
    if let Ok(p) = std::env::var("KDPIPE_LLAMA_PYTHON") {
        return p;
    }
    let out = Command::new(root().join("scripts/setup-llama-server.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/setup-llama-server.sh runs");
    assert!(out.status.success(), "setup-llama-server.sh failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Start the server (`api_key`: require this key) and wait until it answers.
pub fn start(api_key: Option<&str>) -> Server {
    start_with(api_key, "")
}

/// `start` with more of the server's command-line options (`extra`).
pub fn start_with(api_key: Option<&str>, extra: &str) -> Server {
    let port = free_port();
    let mut cmd = format!(
        "{} -m llama_cpp.server --model {} --model_alias {MODEL_NAME} --host 127.0.0.1 --port {port} --n_ctx 2048 --n_threads 2 {extra}",
        python(),
        smollm2().display()
    );
    if let Some(k) = api_key {
        cmd.push_str(&format!(" --api_key {k}"));
    }
    // The watcher: start the server, then kill it as soon as the test process is gone.
    let script = format!(
        "{cmd} >/dev/null 2>&1 & s=$!; while kill -0 $PPID 2>/dev/null && kill -0 $s 2>/dev/null; do sleep 1; done; kill $s 2>/dev/null"
    );
    let child = Command::new("bash")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .expect("bash starts the server");
    let server = Server { port, child };
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        if http_get(port, "/v1/models").is_some() {
            return server;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("the llama-cpp-python server did not start on port {port}");
}

/// A plain GET; the whole response (any status), or None when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1").then_some(out)
}
