#!/usr/bin/env bash
# A static `outpost` (tract backend, no ONNX Runtime) for one target:
#   cross/build-static.sh x86_64    ->  target/x86_64-unknown-linux-musl/small/outpost
#   cross/build-static.sh aarch64   ->  target/aarch64-unknown-linux-musl/small/outpost
#   cross/build-static.sh armv7     ->  target/armv7-unknown-linux-musleabihf/small/outpost
# x86_64 needs Debian's musl-tools (musl-gcc, for the C in zstd, ring and mimalloc). The others
# compile that C with zig (cross/zig-env.sh installs zig and cargo-zigbuild when missing). Every target needs `rustup target add TARGET`,
# which the script also runs. OUTPOST_STATIC_PROFILE picks another cargo profile than the shipped
# `small` (the test command builds `static-test`: the same code, linked much faster); the binary is
# then target/TARGET/PROFILE/outpost. OUTPOST_FEATURES replaces the runtime's default features:
# OUTPOST_FEATURES=tract builds without tract's thread pool, 4.8 MB smaller and one thread per
# call (docs/benchmarks.md, "The size-tuned profile").
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${OUTPOST_STATIC_PROFILE:-small}"
features=()
[[ -z ${OUTPOST_FEATURES:-} ]] || features=(--no-default-features --features "$OUTPOST_FEATURES")
case "${1:-x86_64}" in
  x86_64) target=x86_64-unknown-linux-musl ;;
  aarch64) target=aarch64-unknown-linux-musl ;;
  armv7) target=armv7-unknown-linux-musleabihf ;;
  *)
    echo "cross/build-static.sh: x86_64, aarch64 or armv7" >&2
    exit 64
    ;;
esac
# Where the toolchain's distribution server has no prebuilt standard library for the target
# (armv7-unknown-linux-musleabihf, for one), std is compiled from the `rust-src` component with
# the rest of the build: cargo's build-std, which a stable toolchain allows with RUSTC_BOOTSTRAP.
build_std=()
if ! rustup target list --installed | grep -qx "$target" && ! rustup target add "$target" >&2; then
  echo "cross/build-static.sh: no prebuilt standard library for $target; building it from rust-src" >&2
  rustup component add rust-src >&2
  export RUSTC_BOOTSTRAP=1
  build_std=(-Zbuild-std=std,panic_unwind)
  # No prebuilt std also means no bundled crt objects, libc or libunwind: zig's are linked.
  rustflags_var="CARGO_TARGET_$(tr 'a-z-' 'A-Z_' <<<"$target")_RUSTFLAGS"
  export "$rustflags_var"="-C link-self-contained=no"
fi
if [[ $target == x86_64-* ]]; then
  # rustc links this target static-pie: its 47,000 relative relocations take 1.1 MB as RELA
  # entries, read (so resident) at every start; packed as RELR (musl >= 1.2.4, as Rust bundles)
  # they take a few KB.
  export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C link-arg=-Wl,-z,pack-relative-relocs"
  cargo build --profile "$profile" --quiet -p outpost-runtime "${features[@]}" --target "$target"
else
  source cross/zig-env.sh
  cargo zigbuild "${build_std[@]}" --profile "$profile" --quiet -p outpost-runtime "${features[@]}" --target "$target"
fi
echo "target/$target/$profile/outpost"
