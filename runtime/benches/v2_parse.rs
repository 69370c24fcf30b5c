//! The parts of a JSON request's path that grow with the tensors, in-process.
//! `cargo bench -p outpost-runtime --bench v2_parse [BODY.json ...]`.
//!
//! With no arguments:
//! - it parses bodies shaped like the peer harness's (one FP32 input of 64 elements, as the digits
//!   MLP takes, and of 784, as the LeNet CNN takes; numbers written at full f64 precision, as
//!   Python's json module writes float32 values), each with `data` last (as clients write it) and
//!   first;
//! - it checks an image-sized FP32 input ([1, 3, 224, 224], as the orientation classifier takes)
//!   for NaN and infinity, as every request's float input is checked once parsed
//!   (`Tensor::first_non_finite`);
//! - it writes a large FP32 output's `data` ([1, 40, 6625], as the OCR recognizer answers) as the
//!   response writes it (`Tensor::json_data`), and, beside it, through one JSON value per element
//!   (`Tensor::to_json`, how responses were written before).
//!
//! Prints the best of five rounds, in µs per body or tensor.

use std::hint::black_box;
use std::time::Instant;

use outpost_runtime::tensor::Tensor;
use outpost_runtime::v2::request::parse;

fn body(elements: usize, data_first: bool) -> Vec<u8> {
    // A fixed sequence in [0, 1), so every run parses the same text.
    let mut x = 0.37f64;
    let data: Vec<String> = (0..elements)
        .map(|_| {
            x = 3.99 * x * (1.0 - x);
            (x as f32 as f64).to_string()
        })
        .collect();
    let data = data.join(", ");
    let text = if data_first {
        format!(
            r#"{{"inputs": [{{"data": [{data}], "name": "input", "shape": [1, {elements}], "datatype": "FP32"}}]}}"#
        )
    } else {
        format!(
            r#"{{"inputs": [{{"name": "input", "shape": [1, {elements}], "datatype": "FP32", "data": [{data}]}}]}}"#
        )
    };
    text.into_bytes()
}

fn time(label: &str, body: &[u8]) {
    parse(body, None).unwrap_or_else(|e| panic!("{label}: {e}"));
    let best = best_of_five(body.len(), || black_box(parse(black_box(body), None).ok()).is_some());
    println!("{label:<40} {:>8} bytes {best:>9.2} µs", body.len());
}

/// The fastest of five rounds of `f`, in µs per call; a round has more calls for smaller `bytes`.
fn best_of_five(bytes: usize, mut f: impl FnMut() -> bool) -> f64 {
    let per_round = (2_000_000 / bytes.max(1)).clamp(10, 100_000);
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per_round {
                black_box(f());
            }
            start.elapsed().as_secs_f64() * 1e6 / per_round as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn time_finite_check() {
    let shape = vec![1, 3, 224, 224];
    let values: Vec<f32> = (0..shape.iter().product::<usize>()).map(|i| (i % 255) as f32 / 127.5 - 1.0).collect();
    let input = Tensor::from_f32("image", shape, &values);
    assert_eq!(input.first_non_finite(), None);
    let best = best_of_five(input.data.len(), || black_box(&input).first_non_finite().is_none());
    println!("{:<40} {:>8} bytes {best:>9.2} µs", "no NaN or infinity, FP32 [1, 3, 224, 224]", input.data.len());
}

fn time_output_json() {
    let shape = vec![1, 40, 6625];
    let values: Vec<f32> =
        (0..shape.iter().product::<usize>()).map(|i| ((i * 7919) % 10007) as f32 / 1234.5 - 3.0).collect();
    let output = Tensor::from_f32("logits", shape, &values);
    let direct = serde_json::to_vec(&output.json_data()).expect("elements serialize");
    let by_value = serde_json::to_vec(&output.to_json()).expect("values serialize");
    assert_eq!(direct, by_value, "the two write the same text");
    let rounds = output.data.len() * 100;
    let best = best_of_five(rounds, || serde_json::to_vec(&black_box(&output).json_data()).is_ok());
    println!("{:<40} {:>8} bytes {best:>9.2} µs", "FP32 [1, 40, 6625] written (json_data)", direct.len());
    let best = best_of_five(rounds, || serde_json::to_vec(&black_box(&output).to_json()).is_ok());
    println!("{:<40} {:>8} bytes {best:>9.2} µs", "FP32 [1, 40, 6625] as values (to_json)", by_value.len());
}

fn main() {
    // `cargo bench` passes `--bench`; anything else is a body file.
    let files: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if files.is_empty() {
        for elements in [64, 784] {
            time(&format!("FP32 [1, {elements}], data last"), &body(elements, false));
            time(&format!("FP32 [1, {elements}], data first"), &body(elements, true));
        }
        time_finite_check();
        time_output_json();
    }
    for file in files {
        let body = std::fs::read(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
        time(&file, &body);
    }
}
