//! The compact top-k store on a real teacher distribution: SmolLM2's top-20 at every
//! position of a real text, written as a teacher row to Parquet and read back, gives the
//! token-level KD loss of the exact values within 1e-3 for every divergence and
//! temperature, and takes fewer bytes a token than the nested f32 lists it replaced.

mod common;
use candle_core::{DType, Device, Tensor, D};
use common::*;
use kdpipe::config::Divergence;
use kdpipe::finetune::divergence::per_position;
use kdpipe::io::parquet::{read_frame, write_frame};
use kdpipe::records::topk_store;
use kdpipe::records::{TeacherRow, TokenTopk};
use polars::prelude::*;

const K: usize = 20;

/// A text's top-K ids and log-probabilities at every position.
type Alternatives = (Vec<Vec<u32>>, Vec<Vec<f32>>);

const TEXTS: [&str; 4] = [
    "Mary had 3 apples and bought 5 more at the market; then she gave 2 to Tom. \
     How many apples does she have now? First, 3 + 5 = 8. Then 8 - 2 = 6. Answer: 6",
    "A train leaves the station at 9:15 and travels 120 km at 80 km/h. It arrives \
     1.5 hours later, so at 10:45. Answer: 10:45",
    "Finally finished my thesis after four long years. Feeling proud, relieved and a \
     little bit tired today. The feeling is joy. Answer: joy",
    "The recipe needs 250 g of flour for 12 cookies. For 30 cookies: 250 / 12 * 30 = \
     625 g of flour. Answer: 625",
];

/// SmolLM2's logits over a real text `[1, t, vocab]`, and its top-K ids and natural-log
/// probabilities at each position.
fn teacher_topk(text: &str) -> (Tensor, Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let dev = Device::Cpu;
    let loaded = kdpipe::llama::load(smollm2().to_str().unwrap(), &dev).unwrap();
    let model = loaded.decoder(&dev, |_| false).unwrap();
    let ids = loaded.encode(text).unwrap();
    let t = ids.len();
    let input = Tensor::from_vec(ids, (1, t), &dev).unwrap();
    let mask = Tensor::ones((1, t), DType::F32, &dev).unwrap();
    let logits = model.forward(&input, &mask).unwrap();
    let log_p = logits
        .broadcast_sub(&logits.log_sum_exp(D::Minus1).unwrap().unsqueeze(2).unwrap())
        .unwrap();
    let rows: Vec<Vec<f32>> = log_p.squeeze(0).unwrap().to_vec2().unwrap();
    let (mut top_ids, mut top_lps) = (vec![], vec![]);
    for row in rows {
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        order.truncate(K);
        top_lps.push(order.iter().map(|&i| row[i as usize]).collect());
        top_ids.push(order);
    }
    (logits, top_ids, top_lps)
}

/// A teacher row carrying these alternatives, through a Parquet file and back.
fn round_trip(dir: &std::path::Path, ids: &[Vec<u32>], lps: &[Vec<f32>]) -> TokenTopk {
    let mut row = kdpipe_row();
    row.tokens = TokenTopk {
        ids: ids.iter().map(|v| v[0]).collect(),
        logprobs: lps.iter().map(|v| v[0]).collect(),
        top_ids: ids.to_vec(),
        top_logprobs: lps.to_vec(),
        ..Default::default()
    };
    let path = dir.join("teacher.parquet");
    write_frame(&path, &mut TeacherRow::to_frame(&[row]).unwrap()).unwrap();
    TeacherRow::from_frame(&read_frame(&path).unwrap(), &path)
        .unwrap()
        .remove(0)
        .tokens
}

fn kdpipe_row() -> TeacherRow {
    ok_teacher_row("r1", "Mary had 3 apples.", "3 + 5 - 2 = 6", "6")
}

fn kd_loss(student: &Tensor, ids: &[Vec<u32>], lps: &[Vec<f32>], t: f64, kind: Divergence) -> f64 {
    let n = ids.len();
    let dev = Device::Cpu;
    let ids = Tensor::from_vec(ids.concat(), (1, n, K), &dev).unwrap();
    let lps = Tensor::from_vec(lps.concat(), (1, n, K), &dev).unwrap();
    per_position(student, &ids, &lps, t, kind, 0.5)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

#[test]
fn kd_loss_from_the_compact_store_matches_the_exact_values() {
    let dir = tempfile::tempdir().unwrap();
    let (logits, ids, lps) = teacher_topk(TEXTS[0]);
    let back = round_trip(dir.path(), &ids, &lps);
    assert_eq!(back.top_ids, ids);
    let worst = lps
        .iter()
        .flatten()
        .zip(back.top_logprobs.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // Rounding to a code, then the shift that restores the stored tail: a few steps.
    eprintln!("largest log-probability difference: {worst:.2e}");
    assert!(worst <= 2.0 * topk_store::STEP, "{worst}");

    // A student that is not the teacher: its logits shifted by seeded noise.
    let noise = seeded_tensor(logits.dims(), 1.0, 7);
    let student = (&logits + noise).unwrap();
    let mut largest: f64 = 0.0;
    for kind in [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd,
    ] {
        for t in [1.0, 2.0] {
            let exact = kd_loss(&student, &ids, &lps, t, kind);
            let stored = kd_loss(&student, &back.top_ids, &back.top_logprobs, t, kind);
            assert!(exact > 0.01, "{kind:?} at T {t}: {exact}");
            largest = largest.max((exact - stored).abs());
        }
    }
    eprintln!("largest KD loss difference, compact store vs exact: {largest:.2e}");
    assert!(largest < 1e-3, "{largest}");
}

#[test]
fn the_compact_store_takes_fewer_bytes_than_nested_f32_lists() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<Alternatives> = TEXTS
        .iter()
        .map(|t| {
            let (_, ids, lps) = teacher_topk(t);
            (ids, lps)
        })
        .collect();
    let tokens: usize = rows.iter().map(|(ids, _)| ids.len()).sum();
    // One teacher row a text, written as kdpipe writes them.
    let teacher_rows: Vec<TeacherRow> = rows
        .iter()
        .map(|(ids, lps)| {
            let mut row = kdpipe_row();
            row.tokens = TokenTopk {
                top_ids: ids.clone(),
                top_logprobs: lps.clone(),
                ..Default::default()
            };
            row
        })
        .collect();
    let path = dir.path().join("compact.parquet");
    write_frame(&path, &mut TeacherRow::to_frame(&teacher_rows).unwrap()).unwrap();
    let compact = topk_store::bytes_per_token(&[&path], tokens)
        .unwrap()
        .unwrap();

    // The layout of earlier versions: list<list<u32>> ids and list<list<f32>> values,
    // alone in a file (so the whole file is an upper bound on those columns).
    let nested = |name: &str, lists: Vec<Series>| Column::new(name.into(), lists);
    let as_lists = |v: &[Vec<u32>]| {
        Series::new(
            "".into(),
            v.iter()
                .map(|x| Series::new("".into(), x))
                .collect::<Vec<_>>(),
        )
    };
    let as_f32_lists = |v: &[Vec<f32>]| {
        Series::new(
            "".into(),
            v.iter()
                .map(|x| Series::new("".into(), x))
                .collect::<Vec<_>>(),
        )
    };
    let mut old = DataFrame::new_infer_height(vec![
        nested(
            "topk_ids",
            rows.iter().map(|(ids, _)| as_lists(ids)).collect(),
        ),
        nested(
            "topk_logprobs",
            rows.iter().map(|(_, lps)| as_f32_lists(lps)).collect(),
        ),
    ])
    .unwrap();
    let old_path = dir.path().join("nested.parquet");
    write_frame(&old_path, &mut old).unwrap();
    let old_bytes = std::fs::metadata(&old_path).unwrap().len() as f64 / tokens as f64;
    eprintln!("bytes a token (top-{K}): compact {compact:.1}, nested f32 lists ≤ {old_bytes:.1}");
    assert!(compact < old_bytes, "{compact} vs {old_bytes}");
}
