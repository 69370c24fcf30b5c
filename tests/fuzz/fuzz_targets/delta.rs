//! A delta against a fixed base: header checks, the zstd decode, the length and hash bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_updater::delta;
use outpost_updater::release::DeltaEntry;

const BASE: &[u8] = include_bytes!("../../../models/digits-edge.onnx");

fuzz_target!(|data: &[u8]| {
    let base_sha = outpost_updater::sha256_hex(BASE);
    // Whatever the header claims, the signed entry bounds the output to 64 KiB.
    let target = data.get(40..72).map(|t| t.iter().map(|b| format!("{b:02x}")).collect()).unwrap_or_default();
    let entry = DeltaEntry {
        base: base_sha,
        target,
        sha256: outpost_updater::sha256_hex(data),
        length: data.len() as u64,
        window_log: 27,
    };
    let mut out = Vec::new();
    let _ = delta::apply(data, BASE, &entry, 64 << 10, &mut out);
    assert!(out.len() <= (64 << 10) + 1, "decoded {} bytes past the signed length", out.len());
});
