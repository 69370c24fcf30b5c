#!/usr/bin/env bash
# The soak test at length on a release build: 64 clients of mixed traffic (good, bad and
# oversized requests on three models), a hot swap every 3 s and a signed update half-way, for
# SECONDS (default 600). Prints the request counts, the wrong answers (must be 0) and the
# daemon's RSS each second. The test command runs the same test for 40 s on a debug build.
#   tools/soak.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
export OUTPOST_SOAK_SECS="${1:-600}"
cargo build --release --workspace --bins
cargo test --release -p outpost-tests --test soak -- --nocapture
