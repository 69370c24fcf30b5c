#!/usr/bin/env bash
# A static `outpost` (tract backend, no ONNX Runtime) for one target:
#   cross/build-static.sh x86_64    ->  target/x86_64-unknown-linux-musl/small/outpost
# Needs: rustup target add x86_64-unknown-linux-musl; Debian's musl-tools (musl-gcc, for the C
# in zstd, ring and mimalloc).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-x86_64}" in
  x86_64) target=x86_64-unknown-linux-musl ;;
  *)
    echo "cross/build-static.sh: only x86_64 so far (aarch64 and armv7 are next)" >&2
    exit 64
    ;;
esac
cargo build --profile small --quiet -p outpost-runtime --target "$target"
echo "target/$target/small/outpost"
