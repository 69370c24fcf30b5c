use super::*;
use crate::onnx::TensorSpec;
use crate::tensor::DataType;

fn signature() -> Signature {
    let spec = |name: &str, shape: Vec<i64>| TensorSpec { name: name.into(), datatype: DataType::Fp32, shape };
    Signature { inputs: vec![spec("x", vec![-1, 2])], outputs: vec![spec("p", vec![-1, 2])] }
}

/// A reference where the input's mean is uniform over 0..100 and class 0 wins 80% at 0.95.
fn reference() -> Profile {
    let rows: Vec<(Vec<Tensor>, Vec<Tensor>)> = (0..100)
        .map(|i| {
            let p = if i % 5 == 0 { [0.3, 0.7] } else { [0.95, 0.05] };
            (vec![Tensor::from_f32("x", vec![1, 2], &[i as f32; 2])], vec![Tensor::from_f32("p", vec![1, 2], &p)])
        })
        .collect();
    Profile::build(&signature(), &rows).unwrap()
}

/// Sends `n` rows in batches of 4: input means from `x(i)`, answers from `p(i)`.
fn feed(d: &Drift, n: usize, x: impl Fn(usize) -> f32, p: impl Fn(usize) -> [f32; 2]) {
    for b in (0..n).step_by(4) {
        let xs: Vec<f32> = (b..b + 4).flat_map(|i| [x(i); 2]).collect();
        let ps: Vec<f32> = (b..b + 4).flat_map(&p).collect();
        d.observe_inputs(&[Tensor::from_f32("x", vec![4, 2], &xs)]);
        d.observe_outputs(&[Tensor::from_f32("p", vec![4, 2], &ps)], "m", "1");
    }
}

#[test]
fn the_index_is_zero_for_the_reference_and_grows_with_the_shift() {
    assert_eq!(psi(&[0.5, 0.5], &[0, 0]), None);
    assert!(psi(&[0.5, 0.5], &[50, 50]).unwrap().abs() < 1e-12);
    let moderate = psi(&[0.5, 0.5], &[60, 40]).unwrap();
    let large = psi(&[0.5, 0.5], &[90, 10]).unwrap();
    assert!(0.0 < moderate && moderate < large, "{moderate} {large}");
    // (0.6-0.5)ln(1.2) + (0.4-0.5)ln(0.8)
    assert!((moderate - (0.1 * 1.2f64.ln() - 0.1 * 0.8f64.ln())).abs() < 1e-12);
    // An empty bin scores finitely.
    assert!(psi(&[0.5, 0.5], &[100, 0]).unwrap().is_finite());
}

#[test]
fn traffic_like_the_reference_scores_low_and_shifted_traffic_passes_the_threshold() {
    let settings = DriftSettings { window: 200, threshold: 0.25 };
    let d = Drift::new(reference(), &signature(), settings);
    let like = |i: usize| if i.is_multiple_of(5) { [0.3, 0.7] } else { [0.95, 0.05] };
    feed(&d, 196, |i| (i % 100) as f32, like);
    assert_eq!(d.report().windows, 0, "the window is not full yet");
    feed(&d, 8, |i| (i % 100) as f32, like);
    let r = d.report();
    assert_eq!((r.rows, r.windows, r.alerts), (204, 1, 0), "{r:?}");
    let last = r.last.unwrap();
    assert_eq!(last.psi.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(), ["confidence", "class", "input:x"]);
    assert!(last.max() < 0.1, "{last:?}");
    assert!((200..=204).contains(&last.rows), "{last:?}");

    // Inputs pushed high, and the model unsure: every signal moves.
    feed(&d, 200, |i| 90.0 + (i % 10) as f32, |_| [0.45, 0.55]);
    let r = d.report();
    assert_eq!((r.windows, r.alerts), (2, 1), "{r:?}");
    let last = r.last.unwrap();
    assert!(last.psi.iter().all(|s| s.1 > 0.25), "{last:?}");
}

#[test]
fn metrics_name_each_signal_once_a_window_closed() {
    let d = Drift::new(reference(), &signature(), DriftSettings { window: 8, threshold: 0.25 });
    let mut out = String::new();
    d.render(&mut out, "m", "1");
    assert!(out.contains("outpost_drift_windows_total{model=\"m\",version=\"1\"} 0"), "{out}");
    assert!(!out.contains("outpost_drift_psi"), "no score before a window closes: {out}");
    feed(&d, 8, |i| i as f32, |_| [0.95, 0.05]);
    let mut out = String::new();
    d.render(&mut out, "m", "1");
    for signal in ["confidence", "class", "input:x"] {
        assert!(out.contains(&format!("outpost_drift_psi{{model=\"m\",version=\"1\",signal=\"{signal}\"}} ")), "{out}");
    }
}
