//! A fault-injecting HTTP proxy in front of the real server: the failures a real server
//! will not produce on demand. Chat requests fail in seven ways (429 with Retry-After, 5xx,
//! a response slower than the client's timeout, a truncated body, a reset connection,
//! invalid JSON, empty choices); the rest are forwarded unchanged. The first seven chat
//! requests get one fault of each kind, later ones a fault with probability `rate`, from a
//! seeded generator. Every connection carries one request and is then closed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const KINDS: [&str; 7] = [
    "rate_limited",
    "server_error",
    "slow",
    "truncated",
    "reset",
    "invalid_json",
    "empty_choices",
];

#[derive(Default)]
pub struct Counts {
    pub chat_requests: usize,
    pub faults: BTreeMap<&'static str, usize>,
}

pub struct FaultProxy {
    pub port: u16,
    pub counts: Arc<Mutex<Counts>>,
}

struct Plan {
    rng: ChaCha8Rng,
    rate: f64,
    slow: Duration,
}

impl FaultProxy {
    /// Listen on a free port and forward to `upstream_port`; `slow` is how long a slow
    /// response stalls (longer than the client's timeout).
    pub fn start(upstream_port: u16, rate: f64, seed: u64, slow: Duration) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let counts = Arc::new(Mutex::new(Counts::default()));
        let plan = Arc::new(Mutex::new(Plan {
            rng: ChaCha8Rng::seed_from_u64(seed),
            rate,
            slow,
        }));
        let c = counts.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (c, plan) = (c.clone(), plan.clone());
                std::thread::spawn(move || handle(conn, upstream_port, &c, &plan));
            }
        });
        FaultProxy { port, counts }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn total_faults(&self) -> usize {
        self.counts.lock().unwrap().faults.values().sum()
    }
}

/// Read one HTTP request: head lines and body.
fn read_request(stream: &TcpStream) -> Option<(Vec<String>, Vec<u8>)> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut head = vec![];
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        head.push(line);
    }
    let len = head
        .iter()
        .find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some((head, body))
}

fn respond(stream: &mut TcpStream, status: &str, extra: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Forward the request upstream and return the whole response.
fn forward(upstream_port: u16, head: &[String], body: &[u8]) -> Option<Vec<u8>> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream_port)).ok()?;
    let mut req = format!("{}\r\n", head[0]);
    for h in &head[1..] {
        if !h.to_ascii_lowercase().starts_with("connection:") {
            req.push_str(h);
            req.push_str("\r\n");
        }
    }
    req.push_str("Connection: close\r\n\r\n");
    up.write_all(req.as_bytes()).ok()?;
    up.write_all(body).ok()?;
    let mut out = vec![];
    up.read_to_end(&mut out).ok()?;
    Some(out)
}

fn handle(mut stream: TcpStream, upstream_port: u16, counts: &Mutex<Counts>, plan: &Mutex<Plan>) {
    let Some((head, body)) = read_request(&stream) else {
        return;
    };
    let is_chat = head[0].contains("/chat/completions");
    let fault = if is_chat {
        let mut c = counts.lock().unwrap();
        let n = c.chat_requests;
        c.chat_requests += 1;
        let mut p = plan.lock().unwrap();
        let rate = p.rate;
        let kind = if n < KINDS.len() {
            Some(KINDS[n])
        } else if p.rng.random_bool(rate) {
            Some(KINDS[p.rng.random_range(0..KINDS.len())])
        } else {
            None
        };
        if let Some(k) = kind {
            *c.faults.entry(k).or_default() += 1;
        }
        kind.map(|k| (k, p.slow))
    } else {
        None
    };
    match fault {
        None => {
            if let Some(resp) = forward(upstream_port, &head, &body) {
                let _ = stream.write_all(&resp);
            }
        }
        Some(("rate_limited", _)) => respond(
            &mut stream,
            "429 Too Many Requests",
            "Retry-After: 1\r\n",
            r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
        ),
        Some(("server_error", _)) => respond(
            &mut stream,
            "503 Service Unavailable",
            "",
            r#"{"error":{"message":"overloaded"}}"#,
        ),
        Some(("slow", slow)) => {
            std::thread::sleep(slow);
            if let Some(resp) = forward(upstream_port, &head, &body) {
                let _ = stream.write_all(&resp);
            }
        }
        Some(("truncated", _)) => {
            // The real response, cut in the middle of its body.
            if let Some(resp) = forward(upstream_port, &head, &body) {
                let split = resp
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|i| i + 4)
                    .unwrap_or(0);
                let cut = split + (resp.len() - split) / 2;
                let _ = stream.write_all(&resp[..cut]);
            }
        }
        Some(("reset", _)) => drop(stream),
        Some(("invalid_json", _)) => {
            respond(&mut stream, "200 OK", "", r#"{"choices": [{"message": "#)
        }
        Some(("empty_choices", _)) => respond(
            &mut stream,
            "200 OK",
            "",
            r#"{"id":"x","object":"chat.completion","choices":[]}"#,
        ),
        Some(_) => unreachable!("every kind is handled"),
    }
}
