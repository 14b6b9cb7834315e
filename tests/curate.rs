//! curate on real teacher rows: SVAMP problems from ../shared/data answered by the local
//! teacher (SmolLM2 GGUF through mistralrs), two samples an input; every rule's count in
//! the report, the funnel adding up, decontamination against an evaluation file, and the
//! Polars plan from --explain.

mod common;
use common::*;

#[test]
fn real_teacher_rows_go_through_every_rule_with_a_report() {
    let svamp = root().join("../shared/data/svamp/dev.jsonl");
    assert!(svamp.is_file(), "{} is missing", svamp.display());
    let dir = tempfile::tempdir().unwrap();
    // The evaluation file holds two of the twelve problems, reworded at the start.
    let lines: Vec<String> = std::fs::read_to_string(&svamp)
        .unwrap()
        .lines()
        .take(12)
        .map(str::to_string)
        .collect();
    let question = |i: usize| -> String {
        let v: serde_json::Value = serde_json::from_str(&lines[i]).unwrap();
        v["question"].as_str().unwrap().to_string()
    };
    let eval: String = [3, 7]
        .iter()
        .map(|&i| {
            serde_json::json!({"question": format!("Quick one: {}", question(i))}).to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.path().join("eval.jsonl"), eval).unwrap();
    let cfg = format!(
        r#"name = "svamp"
seed = 5
[data]
inputs = ["{svamp}"]
id_field = "id"
input_field = "question"
gold_field = "answer"
limit = 12
[task]
kind = "numeric"
prompt = "{prompts}/numeric.md"
[teacher]
model = "{model}"
max_tokens = 64
temperature = 0.7
[generate]
samples = 2
[curate]
min_agreement = 0.5
decontaminate = ["eval.jsonl"]
# The 135M teacher rarely reaches gold: flag it, so the later rules see rows; one
# rationale an input, so the vote's rule is what keeps ids unique.
gold = "flag"
keep_rationales = "one"
[student]
model = "{model}"
"#,
        svamp = svamp.display(),
        prompts = root().join("prompts").display(),
        model = smollm2().display()
    );
    std::fs::write(dir.path().join("c.toml"), cfg).unwrap();
    let out = kdpipe(&["generate", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let out = kdpipe(&["curate", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));

    let run = dir.path().join("runs/svamp/curate");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    eprintln!("{md}");
    assert_eq!(report["rows_in"], 24, "12 inputs × 2 samples");
    let funnel = report["funnel"].as_array().unwrap();
    let rules: Vec<&str> = funnel.iter().map(|s| s["rule"].as_str().unwrap()).collect();
    for rule in kdpipe::curate::rules::RULES {
        assert!(rules.contains(&rule), "{rule} missing from the funnel");
        assert!(
            md.contains(&format!("| {rule} |")),
            "{rule} missing from report.md"
        );
    }
    let removed: u64 = funnel.iter().map(|s| s["removed"].as_u64().unwrap()).sum();
    assert_eq!(
        removed + report["rows_out"].as_u64().unwrap(),
        24,
        "the funnel adds up"
    );
    let splits: u64 = ["train", "val", "test"]
        .iter()
        .map(|s| report["splits"][s].as_u64().unwrap())
        .sum();
    assert_eq!(splits, report["rows_out"].as_u64().unwrap());
    assert!(report["agreement_histogram"].as_array().unwrap().len() == 10);
    assert!(std::fs::read_to_string(run.join("funnel.svg"))
        .unwrap()
        .starts_with("<svg"));

    // No kept row is one of the evaluation problems; at most one rationale an input.
    let mut kept = vec![];
    for split in ["train", "val", "test"] {
        let p = run.join(format!("{split}.parquet"));
        let df = kdpipe::io::parquet::read_frame(&p).unwrap();
        kept.extend(kdpipe::records::CuratedRow::from_frame(&df, &p).unwrap());
    }
    for r in &kept {
        assert!(
            r.input != question(3) && r.input != question(7),
            "contaminated row kept"
        );
        assert!(r.agreement.unwrap() >= 0.5);
    }
    let ids: std::collections::HashSet<_> = kept.iter().map(|r| &r.id).collect();
    assert_eq!(ids.len(), kept.len());

    let out = kdpipe(&["curate", "--config", "c.toml", "--explain"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("JOIN") && plan.contains("_keep_label_cap"),
        "{plan}"
    );
}
