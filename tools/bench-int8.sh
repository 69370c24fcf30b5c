#!/usr/bin/env bash
# Quantized models on each backend, side by side in one run: the raw backend call (in-process, on
# the model's golden input, called from one thread, each call on the backend's pool of every CPU)
# of every sample and real model that has an INT8 form, with its float original beside it.
# THREADS=N runs each call of both backends on N threads instead (THREADS=1: no pool).
#   tools/bench-int8.sh [SECONDS] [MODEL ...]     default: 3 s per backend, every INT8 model
# BEFORE=path/to/an/older/outpostctl adds that build's tract figure on the same files (an A/B of
# a tract change in one run). Builds the release `outpostctl` with ONNX Runtime (the PyPI
# wheel's libonnxruntime, as the tests use). Read the ratios within one run, not the absolutes.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-3}"
shift || true
models=("$@")
((${#models[@]})) || models=(
  digits-edge digits-edge-dynamic digits-cnn digits-cnn-dynamic
  real/magika real/magika-dynamic real/magika-qdq
  real/ocr-cls real/ocr-cls-dynamic real/ocr-cls-qdq
  real/orientation real/orientation-dynamic
)
python=.venv/bin/python
[[ -x $python ]] || { echo "tools/bench-int8.sh: run tools/test.sh first (it makes .venv)" >&2; exit 66; }
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$("$python" -c 'import glob, os, onnxruntime; print(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.*"))[0])')}"
tools/fetch-real-models.sh >/dev/null
cargo build --release --quiet -p outpost-tools --features outpost-runtime/ort
floor() { # OUTPOSTCTL BACKEND MODEL -> p50 in microseconds
  # Builds without --floor-only (an older BEFORE) go on to an HTTP level that fails at once.
  local only=(--floor-only ${THREADS:+--intra-op-threads "$THREADS"})
  "$1" bench --help | grep -q -- --floor-only || only=(--addr 127.0.0.1:9 --concurrency 1)
  { "$1" bench --model x --model-file "models/$3.onnx" --backend "$2" "${only[@]}" --duration "$seconds" 2>/dev/null || true; } |
    awk '/^backend/ { print $(NF-2) }'
}
printf '%-24s %12s %12s %12s %10s\n' model "tract p50" "ort p50" "tract/ort" "${BEFORE:+before p50}"
for m in "${models[@]}"; do
  tract=$(floor target/release/outpostctl tract "$m")
  ort=$(floor target/release/outpostctl ort "$m")
  before=""
  [[ -n ${BEFORE:-} ]] && before=$(floor "$BEFORE" tract "$m")
  printf '%-24s %12s %12s %12s %10s\n' "$m" "$tract" "$ort" "$(awk -v a="$tract" -v b="$ort" 'BEGIN { printf "%.2f", a / b }')" "$before"
done
