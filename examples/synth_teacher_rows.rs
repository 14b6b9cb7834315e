//! Synthetic teacher rows for the curate benchmark (`scripts/bench/curate.sh`): a finished
//! generate folder with INPUTS × K rows of arithmetic word problems, rationales with written
//! equations, answers and vote-share soft labels, plus an evaluation file that overlaps the
//! inputs. Every rule has work to do: parse failures (3 %), minority answers (~20 % of
//! samples), wrong arithmetic (5 %), exact duplicates (2 %), near duplicates (2 %),
//! contaminated inputs (0.2 %, up to `EVAL_TEXTS`), gold disagreement (5 %). With TOPK > 0
//! every row also carries token top-k soft labels (one entry a completion token, TOPK
//! alternatives each), the largest part of a real local teacher's row. Rows are written as shards of at most
//! 200,000 rows, so the generator's memory stays flat.
//!
//! `cargo run --release --example synth_teacher_rows -- INPUTS K RUN_DIR EVAL_JSONL [TOPK]`
use kdpipe::io::manifest::{entry, Manifest};
use kdpipe::io::parquet::write_frame;
use kdpipe::io::shards::Shard;
use kdpipe::records::{TeacherRow, TokenTopk};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::Write;

// glibc's malloc spends most of the time (63 % in perf) consolidating among millions of
// live small strings once a run passes ~30M rows; mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The evaluation file's size cap: an evaluation set has a fixed size however many inputs
/// the teacher saw (GSM8K's test split is 1,319 problems). One that grew with the inputs
/// would grow decontamination's n-gram set, and with it the cost of each lookup, so the
/// curate benchmark's time per row would grow with its size for a reason users do not meet.
/// Reached at 2.5M inputs (10M rows at 4 samples); later contaminating picks stay inputs.
/// Writing the file takes nothing from the random stream, so the rows do not depend on it.
const EVAL_TEXTS: usize = 5_000;

const NAMES: [&str; 24] = [
    "Paco", "Hana", "Gus", "Maria", "Tom", "Aisha", "Liam", "Chen", "Olga", "Ravi", "Zoe", "Kofi",
    "Ines", "Mateo", "Yuki", "Sara", "Ben", "Nora", "Ali", "Eva", "Omar", "Lena", "Ivan", "Mia",
];
const ITEMS: [&str; 20] = [
    "apples", "marbles", "stickers", "cookies", "books", "pencils", "eggs", "cards", "shells",
    "coins", "balloons", "stamps", "toys", "cupcakes", "flowers", "buttons", "rocks", "kites",
    "bottles", "candles",
];
const PLACES: [&str; 10] = [
    "at the market",
    "from a friend",
    "at school",
    "in the park",
    "at the fair",
    "from the store",
    "at home",
    "on the bus",
    "at the beach",
    "after lunch",
];

fn problem(rng: &mut ChaCha8Rng) -> (String, i64, i64, i64) {
    let (name, item, place) = (
        NAMES[rng.random_range(0..NAMES.len())],
        ITEMS[rng.random_range(0..ITEMS.len())],
        PLACES[rng.random_range(0..PLACES.len())],
    );
    let (a, b) = (rng.random_range(5..500i64), rng.random_range(2..200i64));
    let c = rng.random_range(1..(a + b));
    let text = match rng.random_range(0..3) {
        0 => format!("{name} had {a} {item}. {name} got {b} more {item} {place} and then gave {c} {item} away to classmates. How many {item} does {name} have now?"),
        1 => format!("There were {a} {item} in a box {place}. {name} put in {b} more and later took out {c} of them for a project. How many {item} are in the box now?"),
        _ => format!("{name} collected {a} {item} last week and {b} {item} this week {place}. After giving {c} {item} to a neighbour, how many {item} does {name} still have?"),
    };
    (text, a, b, c)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 5 || args.len() == 6,
        "usage: synth_teacher_rows INPUTS K RUN_DIR EVAL_JSONL [TOPK]"
    );
    let (inputs, k): (usize, u32) = (args[1].parse()?, args[2].parse()?);
    let topk: usize = args.get(5).map(|a| a.parse()).transpose()?.unwrap_or(0);
    let run_dir = std::path::Path::new(&args[3]);
    let dir = run_dir.join("generate");
    std::fs::create_dir_all(&dir)?;
    let inputs_per_shard = (200_000 / k as usize).max(1);
    let shards = inputs.div_ceil(inputs_per_shard).max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut rows = Vec::with_capacity(inputs_per_shard * k as usize);
    let mut texts: Vec<String> = Vec::with_capacity(inputs);
    let mut eval = std::fs::File::create(&args[4])?;
    let (mut written, mut eval_texts) = (0, 0);
    for i in 0..inputs {
        let (mut text, a, b, c) = problem(&mut rng);
        let roll: f64 = rng.random();
        if roll < 0.02 && i > 0 {
            text = texts[rng.random_range(0..i)].to_uppercase(); // exact duplicate
        } else if roll < 0.04 && i > 0 {
            text = texts[rng.random_range(0..i)].replace(" now?", " today?"); // near duplicate
        } else if roll < 0.042 && eval_texts < EVAL_TEXTS {
            writeln!(eval, "{}", serde_json::json!({"question": text}))?; // in the eval set
            eval_texts += 1;
        }
        texts.push(text.clone());
        let answer = a + b - c;
        let gold = if rng.random_bool(0.05) {
            answer + 1
        } else {
            answer
        };
        let mut sample_answers = vec![];
        for s in 0..k {
            let wrong = rng.random_bool(0.2);
            let given = if wrong {
                answer + rng.random_range(1..5)
            } else {
                answer
            };
            let sum = if rng.random_bool(0.05) {
                a + b + 1
            } else {
                a + b
            };
            let rationale = format!(
                "First add what came in: {a} + {b} = {sum}. Then take away what was given: {sum} - {c} = {given}. So the answer is {given}."
            );
            let parsed = !rng.random_bool(0.03);
            sample_answers.push(parsed.then_some(given));
            rows.push(TeacherRow {
                id: format!("q{i:07}"),
                sample: s,
                input: text.clone(),
                gold: Some(gold.to_string()),
                raw: format!("{rationale}\nAnswer: {given}"),
                rationale: Some(rationale),
                answer: parsed.then(|| given.to_string()),
                status: if parsed { "ok" } else { "no_answer" }.into(),
                soft_kind: "none".into(),
                soft_labels: vec![],
                soft_probs: vec![],
                soft_coverage: None,
                tokens: TokenTopk::default(),
                prompt_tokens: 180,
                completion_tokens: rng.random_range(30..60u32),
                finish_reason: "stop".into(),
                latency_ms: 900.0,
                backend: "openai".into(),
                teacher: "synthetic".into(),
                prompt_name: "numeric".into(),
                prompt_hash: "h".into(),
                temperature: 0.7,
                max_tokens: 128,
                seed: Some(i as u64 * 8 + s as u64),
                created_unix_ms: 1_795_000_000_000,
            });
        }
        // Vote share over the input's parsed samples, as generate writes it.
        let start = rows.len() - k as usize;
        let parsed: Vec<i64> = sample_answers.iter().flatten().copied().collect();
        let mut distinct: Vec<i64> = parsed.clone();
        distinct.sort_unstable();
        distinct.dedup();
        distinct.sort_by_key(|d| std::cmp::Reverse(parsed.iter().filter(|p| *p == d).count()));
        for r in &mut rows[start..] {
            if parsed.is_empty() {
                continue;
            }
            r.soft_kind = "vote_share".into();
            r.soft_labels = distinct.iter().map(|d| d.to_string()).collect();
            r.soft_probs = distinct
                .iter()
                .map(|d| parsed.iter().filter(|p| *p == d).count() as f64 / parsed.len() as f64)
                .collect();
            r.soft_coverage = Some(parsed.len() as f64 / k as f64);
        }
        if topk > 0 {
            for r in &mut rows[start..] {
                r.tokens = token_topk(&mut rng, r.completion_tokens, topk);
            }
        }
        if (i + 1) % inputs_per_shard == 0 || i + 1 == inputs {
            write_shard(&dir, written, shards, &rows)?;
            written += 1;
            rows.clear();
        }
    }
    anyhow::ensure!(written == shards, "wrote {written} of {shards} shards");
    Ok(())
}

/// Token top-k soft labels for a row: one entry a completion token, `k` alternatives each
/// with log-probabilities falling from the chosen token's.
fn token_topk(rng: &mut ChaCha8Rng, tokens: u32, k: usize) -> TokenTopk {
    let mut t = TokenTopk {
        temperature: Some(1.0),
        vocab: "synthetic".into(),
        ..Default::default()
    };
    for _ in 0..tokens {
        let id = rng.random_range(0..49_152u32);
        let mut lp = -rng.random_range(0.0..0.5f32);
        let (mut ids, mut lps) = (vec![id], vec![lp]);
        for _ in 1..k {
            lp -= rng.random_range(0.2..2.0f32);
            ids.push(rng.random_range(0..49_152u32));
            lps.push(lp);
        }
        t.ids.push(id);
        t.logprobs.push(lps[0]);
        t.top_ids.push(ids);
        t.top_logprobs.push(lps);
    }
    t
}

/// Write one shard of rows (`index` of `count`) with its manifest.
fn write_shard(
    dir: &std::path::Path,
    index: usize,
    count: usize,
    rows: &[TeacherRow],
) -> anyhow::Result<()> {
    let shard = Shard { index, count };
    let path = shard.teacher_file(dir);
    let mut df = TeacherRow::to_frame(rows)?;
    write_frame(&path, &mut df)?;
    let mut m = Manifest::new(kdpipe::config::Stage::Generate, "synthetic".into(), 0);
    m.outputs = vec![entry(&path, Some(rows.len()))?];
    m.write_as(dir, &shard.manifest_name())?;
    eprintln!(
        "synth_teacher_rows: {} rows → {}",
        rows.len(),
        path.display()
    );
    Ok(())
}
