//! [`super::scan`] against serde: every body the scan takes must read exactly as serde reads it
//! (the same tensors, or the same error), and what it does not take goes to serde.

use super::raw::read;
use super::request::{InferRequest, build};
use super::scan::request;

/// Both paths from the same JSON: this one where it takes the body, else serde; and serde alone.
fn both(json: &str) -> (Option<Result<InferRequest, String>>, Result<InferRequest, String>) {
    let fast = request(json.as_bytes()).map(|raw| build(raw, &[]).map_err(|e| e.0));
    let serde = read(json.as_bytes()).and_then(|raw| build(raw, &[])).map_err(|e| e.0);
    (fast, serde)
}

/// The same answer whichever path reads `json`; whether this path took it.
fn same(json: &str) -> bool {
    let (fast, serde) = both(json);
    if let Some(fast) = &fast {
        assert_eq!(fast, &serde, "{json}");
    }
    fast.is_some()
}

fn body(data: &str) -> String {
    format!(r#"{{"inputs": [{{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": {data}}}]}}"#)
}

/// A small xorshift generator: the same cases every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn common_bodies_are_taken_and_read_as_serde_reads_them() {
    // As the peer harness and tritonclient write them.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let numbers: Vec<String> =
        (0..784).map(|_| format!("{}", (rng.below(1 << 53) as f64) / (1u64 << 53) as f64)).collect();
    let harness = format!(
        r#"{{"inputs": [{{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [{}]}}]}}"#,
        numbers.join(", ")
    );
    assert!(same(&harness));
    let triton = r#"{"id":"7","inputs":[{"name":"x","shape":[2,2],"datatype":"FP64","data":[1.5,-2,0.25,3]}],"outputs":[{"name":"y","parameters":{"binary_data":false}}],"parameters":{"binary_data_output":false}}"#;
    assert!(same(triton));
    assert!(same(&body("[[1, 2], [3.0, -4.5]]")), "nested");
    assert!(same(&body("[ -0 , -0.0 ,0.0, 0 ]")), "zeros and spaces");
    assert!(same(&body("[0.1234567890123456789, 999999999999999999, 0.0000000000000000000001, 12345678.87654321]")));
    assert!(same("\n{ \"inputs\" : [ ] }\t"), "no inputs");
    let binary = r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","parameters":{"binary_data_size":1}}]}"#;
    assert!(request(binary.as_bytes()).is_some(), "binary tensors' headers");
    let unicode = r#"{"inputs": [{"name": "vstup é", "shape": [1], "datatype": "FP32", "data": [1]}]}"#;
    assert!(same(unicode));
}

#[test]
fn everything_else_goes_to_serde() {
    for json in [
        body("[1e5, 2, 3, 4]"),                       // an exponent
        body("[1, 2, 3, 12345678901234567890]"),      // more digits than fit
        body("[1, 2, 3, 0.00000000000000000000001]"), // 23 digits after the point
        body("[1, 2, 3]"),                            // too few
        body("[1, 2, 3, 4, 5]"),                      // too many
        body("[1, 2, 3, null]"),
        body("[1, 2, 3, 01]"),
        body("[1, 2, 3, 1.]"),
        body("[1, 2, 3, 400000000000000000000000000000000000000.0]"), // past FP32, by digits
        body("[1, 2, 3, 4],"),
        body("5"),
        r#"{"inputs": [{"name": "in\u0070ut", "shape": [1], "datatype": "FP32", "data": [1]}]}"#.into(),
        r#"{"inputs": [{"data": [1], "name": "x", "shape": [1], "datatype": "FP32"}]}"#.into(),
        r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [1]}]}"#.into(),
        r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "data": [2]}]}"#.into(),
        r#"{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}"#.into(),
        r#"{"inputs": [], "extra": 1}"#.into(),
        r#"{"inputs": [], "inputs": []}"#.into(),
        r#"{"inputs": []} x"#.into(),
        r#"{"id": 5, "inputs": []}"#.into(),
        r#"{"parameters": null, "inputs": []}"#.into(),
        "[]".into(),
        String::new(),
    ] {
        assert!(!same(&json), "taken here: {json}");
    }
    let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
    assert!(!same(&body(&deep)));
}

#[test]
fn random_bodies_and_their_mutations_agree_with_serde() {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let pieces = [
        "0",
        "-0",
        "1",
        "-1",
        "0.5",
        "-0.5",
        "123.456",
        "0.000001",
        "3.4028234663852886e38",
        "1E3",
        "1e-7",
        "340282356779733661637539395458142568448",
        "0.14552277326583862",
        "99999999.99999999",
        "00",
        "1.",
        "-",
        "true",
        "null",
        "\"a\"",
        "[1]",
        "[]",
        "{}",
    ];
    let (mut taken, mut cases) = (0, 0);
    for _ in 0..3000 {
        let n = rng.below(6) as usize;
        let data: Vec<&str> = (0..n).map(|_| pieces[rng.below(pieces.len() as u64) as usize]).collect();
        let datatype = ["FP32", "FP64", "INT32", "FP16"][rng.below(4) as usize];
        let json = format!(
            r#"{{"id": "r", "inputs": [{{"name": "x", "shape": [{n}], "datatype": "{datatype}", "data": [{}]}}]}}"#,
            data.join(",")
        );
        taken += usize::from(same(&json));
        cases += 1;
        // Cut and changed bodies: whatever either path says of them, they say the same.
        let bytes = json.as_bytes();
        let cut = rng.below(bytes.len() as u64) as usize;
        same(&String::from_utf8_lossy(&bytes[..cut]));
        let mut changed = bytes.to_vec();
        let at = rng.below(changed.len() as u64) as usize;
        let alphabet = b"[]{},:\" -.0159eE\\x";
        changed[at] = alphabet[rng.below(alphabet.len() as u64) as usize];
        same(&String::from_utf8_lossy(&changed));
    }
    // Both paths are exercised: a fair share of the generated bodies is taken here.
    assert!(taken > cases / 10 && taken < cases, "{taken} of {cases} taken");
}
