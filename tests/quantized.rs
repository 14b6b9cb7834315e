//! The quantized inference path on the real GGUFs: every block format in them reads as
//! candle dequantizes it, products stay within the activations' 8-bit rounding of the f32
//! product, the quantized decoder predicts the f32 decoder's next tokens, and its logits
//! are bit-identical alone and in any batch; and it follows llama.cpp's greedy replies on
//! the same GGUF (scripts/llama_greedy.py through llama-cpp-python).

mod common;
use candle_core::quantized::gguf_file::Content;
use candle_core::Device;
use common::agreement::{agreement, argmax, llama_cpp_replies, logits_per_position};
use common::*;
use kdpipe::kernels::quant::{Format, QMatrix};
use kdpipe::llama as student;
use std::collections::BTreeMap;

/// One tensor per block format the kernels compute on, from both real GGUFs: name,
/// matrix and candle's dequantization of it.
fn real_blocks() -> Vec<(String, QMatrix, Vec<f32>)> {
    let mut seen = BTreeMap::new();
    for path in [smollm2(), qwen()] {
        let mut file = std::fs::File::open(&path).unwrap();
        let content = Content::read(&mut file).unwrap();
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let info = &content.tensor_infos[name];
            let Some(format) = Format::from_ggml(info.ggml_dtype) else {
                continue;
            };
            if seen.contains_key(&format) || info.shape.dims().len() != 2 {
                continue;
            }
            let q = content.tensor(&mut file, name, &Device::Cpu).unwrap();
            let dims = q.shape().dims().to_vec();
            // At most 64 rows: enough blocks, and a vocabulary matrix stays small.
            let rows = dims[0].min(64);
            let row_bytes = format.row_bytes(dims[1]);
            let data = q.data().unwrap()[..rows * row_bytes].to_vec();
            let reference = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .narrow(0, 0, rows)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let m = QMatrix::new(format, rows, dims[1], &data).unwrap();
            seen.insert(format, (format!("{}:{name}", path.display()), m, reference));
        }
    }
    seen.into_values().collect()
}

#[test]
fn real_blocks_read_as_candle_dequantizes_them() {
    let blocks = real_blocks();
    let formats: Vec<Format> = blocks.iter().map(|(_, m, _)| m.format).collect();
    // The two models hold these formats; a new download in other formats should say so.
    for f in [
        Format::Q4_1,
        Format::Q5_0,
        Format::Q8_0,
        Format::Q4K,
        Format::Q6K,
    ] {
        assert!(
            formats.contains(&f),
            "no {f:?} tensor found in the real GGUFs"
        );
    }
    for (name, m, reference) in &blocks {
        let ours = m.dequantize();
        let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
        let worst = ours
            .iter()
            .zip(reference)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        eprintln!(
            "{:?} ({name}): worst |ours − candle| = {worst:.2e} (max |w| {scale:.3})",
            m.format
        );
        assert!(worst <= 1e-6 * scale, "{name}: {worst}");
    }
}

#[test]
fn real_block_products_stay_within_activation_rounding() {
    use rand::{Rng, SeedableRng};
    for (name, m, w) in real_blocks() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let rows = 4;
        let x: Vec<f32> = (0..rows * m.cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let y = m.matmul(&x).unwrap();
        let mut worst = 0f64;
        for i in 0..rows {
            let xi = &x[i * m.cols..(i + 1) * m.cols];
            let xn = xi.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            for r in 0..m.rows {
                let wr = &w[r * m.cols..(r + 1) * m.cols];
                let exact: f64 = wr
                    .iter()
                    .zip(xi)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                let wn = wr.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
                worst = worst.max((f64::from(y[i * m.rows + r]) - exact).abs() / (wn * xn));
            }
        }
        eprintln!(
            "{:?} ({name}): worst |y − f32 product| / (‖w‖·‖x‖) = {worst:.2e}",
            m.format
        );
        assert!(worst < 2e-3, "{name}: {worst}");
    }
}

/// The questions of the SVAMP fixture, in file order.
fn svamp_questions() -> Vec<String> {
    std::fs::read_to_string(root().join("tests/fixtures/svamp-dev-excerpt.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let row: serde_json::Value = serde_json::from_str(l).unwrap();
            row["question"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn the_quantized_decoder_predicts_the_f32_decoders_next_tokens() {
    // Real text: the SVAMP problems of the fixture, one after another.
    let text: String = svamp_questions().iter().map(|q| format!("{q}\n")).collect();
    for path in [smollm2(), qwen()] {
        let path = path.to_str().unwrap();
        let dense = student::load(path, &Device::Cpu)
            .unwrap()
            .take_inference_decoder()
            .unwrap();
        let mut loaded = student::load_for_inference(path).unwrap();
        assert!(
            !loaded.quantized.is_empty(),
            "{path}: nothing stayed quantized"
        );
        let quantized = loaded.take_inference_decoder().unwrap();
        let ids: Vec<u32> = loaded
            .encode(&text)
            .unwrap()
            .into_iter()
            .take(300)
            .collect();
        let a = logits_per_position(&dense, &ids);
        let b = logits_per_position(&quantized, &ids);
        let same = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| argmax(x) == argmax(y))
            .count();
        let share = same as f64 / a.len() as f64;
        eprintln!(
            "{path}: next-token argmax agrees at {same} of {} positions ({:.1} %)",
            a.len(),
            100.0 * share
        );
        // The weights are the same numbers; only the activations' 8-bit rounding differs.
        assert!(share >= 0.95, "{path}: argmax agreement {share}");
    }
}

#[test]
fn quantized_logits_are_bit_identical_alone_and_in_any_batch() {
    let model = student::load_for_inference(qwen().to_str().unwrap())
        .unwrap()
        .take_inference_decoder()
        .unwrap();
    assert_logits_independent_of_the_batch(&model, &[1, 5]);
}

/// The quantized decoder against llama.cpp on the same GGUF: teacher-forced on llama.cpp's
/// own greedy replies to 12 real chats (so one early divergence does not cascade), its
/// next-token argmax is llama.cpp's at 762 of 768 positions (99.2 %) on the Qwen teacher
/// on the machine this was written on. Where they differ it is a near-tie: llama.cpp's
/// token is within 0.1 logit of the top of kdpipe's logits there. The test asks for
/// 98.5 % and gaps under 1 logit (a llama.cpp built for another CPU runs other kernels,
/// and one near-tie more must not fail it; a wrong kernel moves logits by whole units).
/// SmolLM2-135M has more near-ties: the exact f32 product of the same weights agrees with
/// llama.cpp at about 97.5 % of positions (llama.cpp rounds activations to 8 bits), and
/// the quantized decoder must agree at least as often, less one point.
#[test]
fn the_quantized_decoder_follows_llama_cpps_greedy_replies() {
    let questions = &svamp_questions()[..12];
    // (model, agreement required, whether it is also checked against the f32 decoder's)
    for (path, required, against_f32) in [(qwen(), 0.985, false), (smollm2(), 0.96, true)] {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let mut loaded = student::load_for_inference(path.to_str().unwrap()).unwrap();
        let prompts: Vec<Vec<u32>> = questions
            .iter()
            .map(|q| {
                let chat = [kdpipe::chat::ChatMessage::new(
                    "user",
                    format!("{q}\nReason step by step, then give the number."),
                )];
                loaded.chat_ids(&chat).unwrap()
            })
            .collect();
        let replies = llama_cpp_replies(&path, &prompts, &loaded.stop_tokens());
        let model = loaded.take_inference_decoder().unwrap();
        let (same, total, worst_gap) = agreement(&model, &prompts, &replies);
        let share = same as f64 / total as f64;
        eprintln!(
            "{name}: the quantized decoder's argmax is llama.cpp's next token at {same} of {total} positions ({:.2} %); largest logit gap where not: {worst_gap:.3}",
            100.0 * share
        );
        assert!(total >= 300, "{name}: too few positions compared: {total}");
        assert!(
            share >= required,
            "{name}: agreement {share}, want {required}"
        );
        assert!(
            worst_gap < 1.0,
            "{name}: llama.cpp's token {worst_gap} logits below our top one"
        );
        if against_f32 {
            let dense = student::load(path.to_str().unwrap(), &Device::Cpu)
                .unwrap()
                .take_inference_decoder()
                .unwrap();
            let (dense_same, _, _) = agreement(&dense, &prompts, &replies);
            eprintln!("{name}: the f32 decoder's at {dense_same} of {total}");
            assert!(
                same + total / 100 >= dense_same,
                "{name}: quantized {same}, f32 {dense_same} of {total}"
            );
        }
    }
}
