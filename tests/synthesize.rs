//! synthesize with the real local teacher (Qwen2.5-Coder-0.5B GGUF) from 8 seeds of the
//! numeric example task: the filters' counts account for every request, accepted inputs
//! pass the filters and say where they came from, a larger target extends the earlier
//! run, and generate reads the synthesized inputs.

mod common;
use common::*;
use std::path::Path;

fn config(dir: &Path, target: usize, max_requests: u64) {
    let text = format!(
        r#"name = "syn"
seed = 3
[data]
id_field = "id"
input_field = "question"
[task]
kind = "numeric"
description = "Solve the arithmetic word problem."
prompt = "{prompts}/numeric.md"
[teacher]
model = "{model}"
max_tokens = 64
[student]
model = "unused.gguf"
[synthesize]
seeds = ["seeds.jsonl"]
target = {target}
max_requests = {max_requests}
requests_per_round = 4
max_tokens = 96
decontaminate = ["eval.jsonl"]
"#,
        prompts = root().join("prompts").display(),
        model = qwen().display()
    );
    std::fs::write(dir.join("c.toml"), text).unwrap();
}

#[test]
fn inputs_from_eight_seeds_pass_the_filters_and_feed_generate() {
    let dir = tempfile::tempdir().unwrap();
    let all = std::fs::read_to_string(root().join("datasets/arith.jsonl")).unwrap();
    let seeds: Vec<&str> = all.lines().take(8).collect();
    std::fs::write(dir.path().join("seeds.jsonl"), seeds.join("\n")).unwrap();
    std::fs::write(
        dir.path().join("eval.jsonl"),
        all.lines().skip(8).take(40).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    config(dir.path(), 3, 16);
    let out = kdpipe(&["synthesize", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));

    let synth = dir.path().join("runs/syn/synthesize");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(synth.join("manifest.json")).unwrap())
            .unwrap();
    let s = &m["summary"];
    let count = |k: &str| s[k].as_u64().unwrap();
    let rejected: u64 = s["rejected"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    // Every reply is accounted for: accepted, rejected for a reason, failed or surplus.
    assert_eq!(
        count("accepted") + rejected + count("failed_requests") + count("surplus"),
        count("requests"),
        "{s}"
    );
    record_suite(
        "synthesize",
        &format!(
            "synthesize from 8 seeds: {} requests, {} accepted, rejected {}",
            count("requests"),
            count("accepted"),
            s["rejected"]
        ),
    );
    assert!(count("accepted") >= 1, "nothing accepted: {s}");

    let rows = json_lines(&synth.join("inputs.jsonl"));
    assert_eq!(rows.len() as u64, count("accepted"));
    let seed_ids: Vec<String> = seeds
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let seed_texts: Vec<String> = seeds
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            kdpipe::dedup::normalize(v["question"].as_str().unwrap())
        })
        .collect();
    for r in &rows {
        let q = r["question"].as_str().unwrap();
        assert!(
            q.chars().any(|c| c.is_ascii_digit()) && q.contains('?'),
            "{q}"
        );
        assert!((20..=1000).contains(&q.chars().count()), "{q}");
        assert!(!seed_texts.contains(&kdpipe::dedup::normalize(q)), "{q}");
        assert_eq!(r["synthesized"], true);
        let shown = r["seed_ids"].as_array().unwrap();
        assert_eq!(shown.len(), 3);
        assert!(shown
            .iter()
            .all(|id| seed_ids.contains(&id.as_str().unwrap().to_string())));
    }

    // Same config: nothing to do. A larger target keeps the inputs already accepted.
    let out = kdpipe(&["synthesize", "--config", "c.toml"], dir.path());
    assert!(stderr(&out).contains("up to date"), "{}", stderr(&out));
    config(dir.path(), rows.len() + 1, count("requests") + 16);
    let out = kdpipe(&["synthesize", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let more = json_lines(&synth.join("inputs.jsonl"));
    assert_eq!(more.len(), rows.len() + 1, "the larger target was reached");
    assert_eq!(&more[..rows.len()], &rows[..]);

    // generate reads the synthesized inputs when [data] names none.
    let out = kdpipe(&["generate", "--config", "c.toml", "--dry-run"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &stderr(&out);
    assert!(
        said.contains(&format!("requests: {}", more.len())),
        "{said}"
    );
}
