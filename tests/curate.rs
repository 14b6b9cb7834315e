//! curate on real teacher rows: SVAMP problems (tests/fixtures) answered by the local
//! teacher (SmolLM2 GGUF through mistralrs), two samples an input; every rule's count in
//! the report, the funnel adding up, decontamination against an evaluation file removing
//! exactly the rows of the contaminated inputs, and the Polars plan from --explain.

mod common;
use common::*;
use kdpipe::records::CuratedRow;
use std::collections::BTreeSet;
use std::path::Path;

fn config(svamp: &Path, decontaminate: &str) -> String {
    format!(
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
decontaminate = [{decontaminate}]
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
    )
}

fn curate(dir: &Path, decontaminate: &str) -> (serde_json::Value, String, Vec<CuratedRow>) {
    let svamp = root().join("tests/fixtures/svamp-dev-excerpt.jsonl");
    std::fs::write(dir.join("c.toml"), config(&svamp, decontaminate)).unwrap();
    let out = kdpipe(&["curate", "--config", "c.toml"], dir);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = dir.join("runs/svamp/curate");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    let mut kept = vec![];
    for split in ["train", "val", "test"] {
        let p = run.join(format!("{split}.parquet"));
        let df = kdpipe::io::parquet::read_frame(&p).unwrap();
        kept.extend(CuratedRow::from_frame(&df, &p).unwrap());
    }
    (report, md, kept)
}

/// The 13-word windows of a text's lower-case words of letters and digits (a reference
/// written apart from kdpipe's own, for the decontamination check).
fn thirteen_grams(text: &str) -> BTreeSet<String> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    words.windows(13).map(|w| w.join(" ")).collect()
}

fn removed_by(report: &serde_json::Value, rule: &str) -> u64 {
    report["funnel"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["rule"] == rule)
        .unwrap()["removed"]
        .as_u64()
        .unwrap()
}

#[test]
fn real_teacher_rows_go_through_every_rule_with_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let svamp = root().join("tests/fixtures/svamp-dev-excerpt.jsonl");
    std::fs::write(dir.path().join("c.toml"), config(&svamp, "")).unwrap();
    let out = kdpipe(&["generate", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));

    // Without decontamination.
    let (report, md, clean) = curate(dir.path(), "");
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
    assert_eq!(report["rows_out"].as_u64().unwrap() as usize, clean.len());
    assert!(report["agreement_histogram"].as_array().unwrap().len() == 10);
    assert!(
        std::fs::read_to_string(dir.path().join("runs/svamp/curate/funnel.svg"))
            .unwrap()
            .starts_with("<svg")
    );
    assert_eq!(removed_by(&report, "contaminated"), 0);
    for r in &clean {
        assert!(r.agreement.unwrap() >= 0.5);
    }
    let ids: BTreeSet<_> = clean.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), clean.len(), "at most one rationale an input");
    assert!(
        clean.len() >= 2,
        "the teacher's rows leave at least two inputs to contaminate: {md}"
    );

    // An evaluation file holding two of the kept problems, reworded at the start and the
    // end, so only 13-word windows from their middles match.
    let dirty: Vec<&CuratedRow> = clean.iter().take(2).collect();
    let eval_texts: Vec<String> = dirty
        .iter()
        .map(|r| {
            let words: Vec<&str> = r.input.split_whitespace().collect();
            format!("Quick one: {} Thanks!", words[1..words.len() - 1].join(" "))
        })
        .collect();
    let eval: String = eval_texts
        .iter()
        .map(|q| serde_json::json!({ "question": q }).to_string() + "\n")
        .collect();
    std::fs::write(dir.path().join("eval.jsonl"), eval).unwrap();
    let (report, _, kept) = curate(dir.path(), "\"eval.jsonl\"");
    // Exactly the rows sharing a 13-word window with the evaluation file went (the two
    // problems, and any templated variant of them), counted by the rule; the rest is as
    // it was.
    let eval_grams: BTreeSet<String> = eval_texts.iter().flat_map(|q| thirteen_grams(q)).collect();
    let key = |r: &CuratedRow| (r.id.clone(), r.sample);
    let want: BTreeSet<_> = clean
        .iter()
        .filter(|r| thirteen_grams(&r.input).is_disjoint(&eval_grams))
        .map(key)
        .collect();
    for d in &dirty {
        assert!(!want.contains(&key(d)), "{} shares no window", d.id);
    }
    assert_eq!(
        removed_by(&report, "contaminated") as usize,
        clean.len() - want.len(),
        "{report}"
    );
    let got: BTreeSet<_> = kept.iter().map(key).collect();
    assert_eq!(got, want);

    let out = kdpipe(&["curate", "--config", "c.toml", "--explain"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("JOIN") && plan.contains("_keep_label_cap"),
        "{plan}"
    );
}

/// curate judges rows by a few columns and streams the others (raw text, token top-k)
/// from the teacher files into the splits: the split files must equal the rules' output
/// computed the plain way, every column of every teacher row in memory at once.
#[test]
fn streamed_split_files_equal_the_rules_on_whole_rows_in_memory() {
    use polars::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let svamp = root().join("tests/fixtures/svamp-dev-excerpt.jsonl");
    let text = config(&svamp, "")
        .replace(
            "[generate]\nsamples = 2",
            "[generate]\nsamples = 2\ntoken_topk = 3",
        )
        // Parts of 5 rows: the rows are judged part by part, the reference all at once.
        .replace("[curate]\n", "[curate]\npart_rows = 5\n");
    assert!(text.contains("part_rows = 5"));
    assert!(text.contains("token_topk = 3"));
    let (config_path, runs) = (dir.path().join("c.toml"), dir.path().join("runs"));
    std::fs::write(&config_path, text).unwrap();
    for stage in ["generate", "curate"] {
        let out = kdpipe(&[stage, "--config", "c.toml"], dir.path());
        assert!(out.status.success(), "{stage}: {}", stderr(&out));
    }

    let overrides = kdpipe::config::Overrides {
        runs_dir: Some(runs.clone()),
        ..Default::default()
    };
    let cfg = kdpipe::config::Config::resolve(
        &config_path,
        &overrides,
        &kdpipe::llama::vocab::same_vocabulary,
    )
    .unwrap();
    let files = kdpipe::curate::teacher_files(&runs.join("svamp/generate")).unwrap();
    let whole: Vec<LazyFrame> = files
        .iter()
        .map(|f| kdpipe::io::parquet::read_frame(f).unwrap().lazy())
        .collect();
    let all = concat(whole, UnionArgs::default())
        .unwrap()
        .collect()
        .unwrap();
    let task = kdpipe::task::Task::from_config(&cfg.task);
    let outcome = kdpipe::curate::rules::apply(all, &task, &cfg.curate, cfg.seed, None).unwrap();
    let mut rows = 0;
    for split in ["train", "val", "test"] {
        let expected = outcome
            .kept
            .clone()
            .lazy()
            .filter(col("split").eq(lit(split)))
            .select(
                kdpipe::records::CURATED_COLUMNS
                    .iter()
                    .map(|c| col(*c))
                    .collect::<Vec<_>>(),
            )
            .collect()
            .unwrap();
        let written =
            kdpipe::io::parquet::read_frame(&runs.join(format!("svamp/curate/{split}.parquet")))
                .unwrap();
        assert!(
            written.equals_missing(&expected),
            "{split}: written\n{written}\nexpected\n{expected}"
        );
        rows += written.height();
    }
    assert!(rows >= 2, "{rows} rows kept");
    let train = runs.join("svamp/curate/train.parquet");
    let kept =
        CuratedRow::from_frame(&kdpipe::io::parquet::read_frame(&train).unwrap(), &train).unwrap();
    assert!(
        kept.iter()
            .all(|r| !r.raw.is_empty() && r.tokens.top_ids.len() == r.tokens.ids.len()),
        "the streamed columns hold each row's raw text and token top-k"
    );
    assert!(kept.iter().any(|r| !r.tokens.ids.is_empty()));
}
