#!/usr/bin/env bash
# The escalation cascade on a real edge/central pair, from shipped models: magika-qdq (static
# INT8, 0.9 MB) on the edge, magika (FP32, 3.2 MB) as the central model, over
# models/real/magika-files.csv (labelled files that the models environment's pinned packages
# install, none of them used to make the models; see models/real_models.py).
#   tools/eval-real.sh [PLOT]      default plot: docs/escalation-magika.svg
# Prints `outpostctl eval`'s table: every policy at every threshold, through real daemons.
set -euo pipefail
cd "$(dirname "$0")/.."
plot="${1:-docs/escalation-magika.svg}"
tools/fetch-real-models.sh >/dev/null
cargo build --release --quiet -p outpost-runtime -p outpost-tools
logs=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$logs"' EXIT

serve() { # NAME PORT ARGS...: starts `outpost serve` and waits until its models are ready
  local name=$1 port=$2
  shift 2
  target/release/outpost serve --listen "127.0.0.1:$port" "$@" >"$logs/$name" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do
    grep -q 'all models ready' "$logs/$name" && return
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$logs/$name" >&2; exit 1; }
    sleep 0.05
  done
  echo "tools/eval-real.sh: the $name server did not get ready" >&2
  exit 1
}

central=$((20000 + RANDOM % 10000))
edge=$((central + 1))
serve central "$central" --model models/real/magika.onnx:magika
serve edge "$edge" --model models/real/magika-qdq.onnx:magika \
  --central "http://127.0.0.1:$central" --central-model magika
target/release/outpostctl eval --edge "127.0.0.1:$edge" --model magika --central "127.0.0.1:$central" \
  --central-model magika --data models/real/magika-files.csv --input bytes --datatype INT32 --plot "$plot"
