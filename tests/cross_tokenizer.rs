//! Token-level KD across tokenizers ([finetune] token_kd = "cross"): the real Qwen2.5 and
//! SmolLM2 vocabularies read as bytes tokenize real text (accents, digits, emoji, code)
//! into byte spans that pair as expected, and a Qwen teacher's stored top-k trains a
//! SmolLM2 student end to end, reporting how many reply tokens aligned exactly.

mod common;
use common::*;
use kdpipe::finetune::cross_vocab::{align, Pairing};
use kdpipe::io::parquet::read_frame;
use kdpipe::llama::load_tokenizer;
use kdpipe::llama::vocab::{fingerprint, vocabulary_bytes};
use kdpipe::records::CuratedRow;
use std::path::Path;

/// The byte strings of `text`'s tokens under a model's tokenizer.
fn token_bytes(model: &Path, text: &str) -> Vec<Vec<u8>> {
    let tokenizer = kdpipe::llama::load_tokenizer(model.to_str().unwrap()).unwrap();
    let vocab = vocabulary_bytes(&tokenizer, "test").unwrap();
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    ids.iter().map(|&id| vocab[id as usize].clone()).collect()
}

#[test]
fn real_tokenizations_pair_by_byte_spans() {
    let text = "Naïve façade: 3.14159 × 2 = 6.28318 👍🏽\n    def área(r):\n        return r**2";
    let qwen = token_bytes(&qwen(), text);
    let smol = token_bytes(&smollm2(), text);
    // Both vocabularies read as bytes give back the text exactly.
    assert_eq!(qwen.concat(), text.as_bytes());
    assert_eq!(smol.concat(), text.as_bytes());
    let show = |t: &[Vec<u8>]| -> Vec<String> {
        t.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    };
    let q: Vec<&[u8]> = qwen.iter().map(Vec::as_slice).collect();
    let s: Vec<&[u8]> = smol.iter().map(Vec::as_slice).collect();
    let pairs = align(&q, &s);
    assert_eq!(pairs.len(), s.len());
    // Every pairing is what the byte spans say.
    let spans = |t: &[&[u8]]| {
        let mut at = 0;
        t.iter()
            .map(|x| {
                at += x.len();
                (at - x.len(), at)
            })
            .collect::<Vec<_>>()
    };
    let (qs, ss) = (spans(&q), spans(&s));
    for (j, p) in pairs.iter().enumerate() {
        match *p {
            Pairing::Exact(i) => assert_eq!(qs[i], ss[j]),
            Pairing::Covering(i) => {
                assert!(qs[i].0 <= ss[j].0 && ss[j].0 < qs[i].1 && qs[i] != ss[j])
            }
            Pairing::None => panic!("token {j} lies inside the text"),
        }
    }
    // The pairing itself, as measured on these two vocabularies: E = exact, C = covered
    // by the teacher token i. Where the tokenizers agree (digits, ASCII words) spans
    // match; accents ("ï", "façade"), the emoji's bytes and the indentation do not.
    use Pairing::{Covering as C, Exact as E};
    let want = vec![
        E(0),
        C(1),
        C(3),
        E(5),
        E(6),
        E(7),
        E(8),
        E(9),
        E(10),
        E(11),
        E(12),
        E(13),
        E(14),
        E(15),
        E(16),
        E(17),
        E(18),
        E(19),
        E(20),
        E(21),
        E(22),
        E(23),
        E(24),
        E(25),
        C(26),
        C(26),
        E(27),
        C(28),
        C(28),
        C(28),
        C(29),
        E(31),
        C(32),
        C(32),
        C(32),
        C(33),
        C(33),
        C(34),
        C(34),
        E(36),
        E(37),
        E(38),
        E(39),
    ];
    assert_eq!(pairs, want);
    // Qwen's " faç" + "ade" against SmolLM2's " façade"; Qwen's "   " + " def" (the
    // indentation) against SmolLM2's "\n   " + " def".
    assert_eq!(show(&qwen)[3..5], [" faç", "ade"]);
    assert_eq!(show(&smol)[2], " façade");
    assert_eq!(show(&smol)[30..32], ["\n   ", " def"]);
}

fn config(dir: &Path, token_kd: &str) {
    let text = format!(
        r#"name = "cross"
seed = 2
[data]
inputs = ["{data}"]
id_field = "id"
input_field = "question"
gold_field = "answer"
limit = 8
[task]
kind = "numeric"
description = "Solve the arithmetic word problem."
prompt = "{prompts}/numeric.md"
[teacher]
model = "{teacher}"
max_tokens = 48
[generate]
token_topk = 5
[curate]
split = [0.75, 0.25, 0.0]
gold = "flag"
check_arithmetic = false
require_answer_in_rationale = false
[student]
model = "{student}"
[finetune]
objective = "step_by_step"
kd_token_weight = 1.0
token_kd = "{token_kd}"
max_steps = 3
batch_size = 3
max_seq_len = 192
checkpoint_every = 0
"#,
        data = root().join("datasets/arith.jsonl").display(),
        prompts = root().join("prompts").display(),
        teacher = qwen().display(),
        student = smollm2().display(),
    );
    std::fs::write(dir.join("c.toml"), text).unwrap();
}

#[test]
fn a_qwen_teacher_trains_a_smollm2_student_through_aligned_tokens() {
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), "cross");
    std::fs::write(
        dir.path().join("same.toml"),
        std::fs::read_to_string(dir.path().join("c.toml"))
            .unwrap()
            .replace("token_kd = \"cross\"", "token_kd = \"same_vocab\""),
    )
    .unwrap();
    // Token ids the student cannot read: refused before any teacher time is spent.
    let out = kdpipe(&["generate", "--config", "same.toml"], dir.path());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("the two differ") && err.contains("token_kd = \"cross\""),
        "{err}"
    );
    assert!(!dir.path().join("runs/cross/generate").exists());

    for stage in ["generate", "curate"] {
        let out = kdpipe(&[stage, "--config", "c.toml"], dir.path());
        assert!(out.status.success(), "{stage}: {}", stderr(&out));
    }
    // The rows say what their numbers mean: the teacher's own distribution, over the
    // vocabulary of the Qwen tokenizer.
    let qwen_vocab = fingerprint(&load_tokenizer(&qwen().display().to_string()).unwrap());
    let smol_vocab = fingerprint(&load_tokenizer(&smollm2().display().to_string()).unwrap());
    assert_ne!(qwen_vocab, smol_vocab);
    let curated = dir.path().join("runs/cross/curate/train.parquet");
    let rows = CuratedRow::from_frame(&read_frame(&curated).unwrap(), &curated).unwrap();
    assert!(!rows.is_empty());
    for r in &rows {
        assert_eq!(r.tokens.vocab, qwen_vocab, "{}", r.id);
        assert_eq!(r.tokens.temperature, Some(1.0), "{}", r.id);
    }
    // Finetune assuming one vocabulary: refused by the rows' fingerprint, and the hint
    // names the cross mode.
    let out = kdpipe(&["finetune", "--config", "same.toml"], dir.path());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("index another vocabulary")
            && err.contains(&qwen_vocab)
            && err.contains(&smol_vocab)
            && err.contains("token_kd = \"cross\""),
        "{err}"
    );
    // Cross mode reading the ids with a tokenizer that did not write them: refused.
    std::fs::write(
        dir.path().join("wrong.toml"),
        std::fs::read_to_string(dir.path().join("c.toml"))
            .unwrap()
            .replacen(
                &format!("model = \"{}\"\nmax_tokens", qwen().display()),
                &format!("model = \"{}\"\nmax_tokens", smollm2().display()),
                1,
            ),
    )
    .unwrap();
    let out = kdpipe(&["finetune", "--config", "wrong.toml"], dir.path());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("set [teacher] model to the model that generated the rows"),
        "{}",
        stderr(&out)
    );

    let out = kdpipe(&["finetune", "--config", "c.toml"], dir.path());
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("align exactly with a teacher token"), "{err}");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("runs/cross/finetune/manifest.json")).unwrap(),
    )
    .unwrap();
    let counts = &manifest["summary"]["cross_tokenizer_alignment"];
    let (tokens, exact, uld) = (
        counts["reply_tokens"].as_u64().unwrap(),
        counts["exact"].as_u64().unwrap(),
        counts["uld"].as_u64().unwrap(),
    );
    eprintln!("alignment: {counts}");
    assert!(
        exact > 0 && exact + uld <= tokens && exact * 2 > tokens,
        "{counts}"
    );
    let metrics =
        std::fs::read_to_string(dir.path().join("runs/cross/finetune/metrics.jsonl")).unwrap();
    let values = |key: &str| -> Vec<f64> {
        metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64())
            .collect()
    };
    let kd = values("kd_token_loss");
    assert!(
        !kd.is_empty() && kd.iter().all(|v| v.is_finite() && *v >= 0.0),
        "{metrics}"
    );
    if uld > 0 {
        let u = values("uld_loss");
        assert!(
            !u.is_empty() && u.iter().all(|v| v.is_finite() && *v >= 0.0),
            "{metrics}"
        );
    }
}
