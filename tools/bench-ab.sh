#!/usr/bin/env bash
# The request path, before and after a change: two `outpost` binaries serving the sample models,
# driven by the same `outpostctl bench` client, in A B B A order so that drift on a shared machine
# falls on both alike:
#   tools/bench-ab.sh BEFORE AFTER [MODEL] [SECONDS] [CONCURRENCY]
# MODEL defaults to digits-edge, SECONDS per level to 5, CONCURRENCY to 1,8. A sample model is
# served with the others in models/; a real model (models/real/, tools/fetch-real-models.sh) alone,
# with binary tensors.
# Prints each run's lines from `outpostctl bench` (the backend floor, measured in outpostctl's own
# process, first; then HTTP per client count).
set -euo pipefail
cd "$(dirname "$0")/.."
before="$1"
after="$2"
model="${3:-digits-edge}"
seconds="${4:-5}"
levels="${5:-1,8}"
ctl=target/release/outpostctl
for b in "$before" "$after" "$ctl"; do
  [[ -x $b ]] || { echo "tools/bench-ab.sh: no binary at $b (cargo build --release)" >&2; exit 66; }
done
serve_args=(--model-dir models)
bench_args=()
if [[ -f models/real/$model.onnx ]]; then
  serve_args=(--model "models/real/$model.onnx")
  bench_args=(--model-file "models/real/$model.onnx" --binary)
fi
log=$(mktemp)
trap 'rm -f "$log"; [[ -n ${pid:-} ]] && kill "$pid" 2>/dev/null || true' EXIT

run() { # LABEL BINARY
  local port=$((20000 + RANDOM % 20000))
  "$2" serve "${serve_args[@]}" --listen "127.0.0.1:$port" >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 1200); do
    grep -q 'all models ready' "$log" && break
    sleep 0.1
  done
  grep -q 'all models ready' "$log" || { echo "tools/bench-ab.sh: $2 did not get ready" >&2; cat "$log" >&2; exit 1; }
  echo "== $1: $2"
  "$ctl" bench --addr "127.0.0.1:$port" --model "$model" --concurrency "$levels" --duration "$seconds" "${bench_args[@]}"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  pid=
}

run "A before" "$before"
run "B after" "$after"
run "B after" "$after"
run "A before" "$before"
