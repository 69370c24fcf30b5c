#!/usr/bin/env bash
# The glibc `outpost` with both backends, tract and ONNX Runtime (the `ort` feature), for boxes
# that have ONNX Runtime's libonnxruntime.so (it is loaded at run time, never linked):
#   cross/build-ort.sh x86_64    ->  target/x86_64-unknown-linux-gnu/small/outpost
#   cross/build-ort.sh aarch64   ->  target/aarch64-unknown-linux-gnu/small/outpost
# Linked against glibc 2.28's symbols (cargo-zigbuild's TARGET.2.28), the floor ONNX Runtime's
# own manylinux_2_28 builds have, so one binary runs on every distribution those run on (Debian
# 10+, Ubuntu 20.04+, RHEL 8+, JetPack 5+). zig compiles the C (zstd, ring); cross/zig-env.sh
# installs it and cargo-zigbuild when missing. OUTPOST_STATIC_PROFILE picks another cargo profile
# than the shipped `small`, as for cross/build-static.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${OUTPOST_STATIC_PROFILE:-small}"
case "${1:-x86_64}" in
  x86_64) target=x86_64-unknown-linux-gnu ;;
  aarch64) target=aarch64-unknown-linux-gnu ;;
  *)
    echo "cross/build-ort.sh: x86_64 or aarch64" >&2
    exit 64
    ;;
esac
rustup target list --installed | grep -qx "$target" || rustup target add "$target" >&2
source cross/zig-env.sh
cargo zigbuild --profile "$profile" --quiet -p outpost-runtime --features ort --target "$target.2.28"
echo "target/$target/$profile/outpost"
