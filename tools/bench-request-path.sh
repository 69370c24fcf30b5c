#!/usr/bin/env bash
# The request path against its floors, side by side in one run: for each server, the raw backend
# call (in-process), `GET /v2/health/live` (the HTTP floor: same server, same client, no body, no
# model) and inference, at each client count, in rounds that alternate the servers.
#   tools/bench-request-path.sh [SECONDS] [ROUNDS]      default: 3 s per level, 3 rounds
# MODEL (default digits-edge, the sample MLP whose tract call is under 10 us; a real model as
# e.g. real/magika) picks the model under models/;
# CONCURRENCY (default 1,8) the client counts; BINARY=1 sends binary tensors instead of JSON.
# BEFORE=path/to/an/older/outpost serves the same
# model beside this build's, so a change to the path is an A/B in one run. Prints each level's
# median p50 and req/s over the rounds, and the gap between inference and the live floor. Builds
# the release binaries; read the gaps and ratios within one run, not the absolutes.
# DRIFT=1 instead serves the model twice from this build, `plain` and `drift` (the same model
# with a reference profile beside it, from `outpostctl profile`): what drift's counting costs.
# The profile's reference rows are the digits' held-out split, or DATA (a CSV in the form
# `outpostctl profile --data` reads, e.g. models/real/magika-files.csv for real/magika).
# SHADOW=SHARE (e.g. 0.1 or 1) serves it as `plain` and as `shadow`, the same model with itself
# as its shadow candidate at that share (no rate bound): what sampling and the candidate's runs
# cost the requests it answers.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-3}"
rounds="${2:-3}"
model="${MODEL:-digits-edge}"
model_name="${model##*/}"
concurrency="${CONCURRENCY:-1,8}"
body=()
[[ -n ${BINARY:-} ]] && body=(--binary)
cargo build --release --quiet -p outpost-runtime -p outpost-tools
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
# name:binary:serve options (split on spaces)
servers=("after:target/release/outpost:--model models/$model.onnx")
[[ -n ${BEFORE:-} ]] && servers=("before:$BEFORE:--model models/$model.onnx" "${servers[@]}")
if [[ -n ${DRIFT:-} ]]; then
  for d in plain drift; do
    mkdir -p "$work/$d"
    cp "models/$model.onnx" "$work/$d/"
    [[ -f models/$model.golden.json ]] && cp "models/$model.golden.json" "$work/$d/"
  done
  target/release/outpostctl profile ${DATA:+--data "$DATA"} "$work/drift/$model_name.onnx" >&2
  servers=("plain:target/release/outpost:--model $work/plain/$model_name.onnx"
    "drift:target/release/outpost:--model $work/drift/$model_name.onnx")
fi
if [[ -n ${SHADOW:-} ]]; then
  m="$PWD/models/$model.onnx"
  printf '[[models]]\nname = "%s"\npath = "%s"\n' "$model_name" "$m" >"$work/plain.toml"
  cp "$work/plain.toml" "$work/shadow.toml"
  printf '[models.shadow]\npath = "%s"\nshare = %s\nmax_per_second = 1000000\n' "$m" "$SHADOW" >>"$work/shadow.toml"
  servers=("plain:target/release/outpost:--config $work/plain.toml"
    "shadow:target/release/outpost:--config $work/shadow.toml")
fi
port=18100
for s in "${servers[@]}"; do
  IFS=: read -r name bin options <<<"$s"
  port=$((port + 1))
  # shellcheck disable=SC2086 # the options are words
  "$bin" serve $options --listen "127.0.0.1:$port" 2>"$work/$name.log" &
  pids+=($!)
  echo "$name 127.0.0.1:$port" >>"$work/servers"
done
for _ in $(seq 100); do
  ready=0
  while read -r name addr; do
    curl -sf "http://$addr/v2/health/ready" >/dev/null && ready=$((ready + 1))
  done <"$work/servers"
  ((ready == ${#servers[@]})) && break
  sleep 0.2
done
for r in $(seq "$rounds"); do
  while read -r name addr; do
    target/release/outpostctl bench --addr "$addr" --model "$model_name" --model-file "models/$model.onnx" "${body[@]}" --concurrency "$concurrency" \
      --duration "$seconds" --backend tract |
      awk -v n="$name" '/^(backend|live|http)/ { print n, $0 }' >>"$work/rows"
  done <"$work/servers"
  echo "round $r of $rounds done" >&2
done
# Columns of a bench row: what, [c=N], requests, errors, req/s, p50, p95, p99.
python3 - "$work/rows" <<'PY'
import collections, statistics, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    server, what = f[0], " ".join(f[1:-6])
    rows[(server, what)].append((float(f[-4]), float(f[-3])))
print(f"{'server':8} {'what':18} {'req/s':>9} {'p50 us':>8} {'p50 - live p50':>15}")
for (server, what), v in rows.items():
    rps = statistics.median(x[0] for x in v)
    p50 = statistics.median(x[1] for x in v)
    gap = ""
    if what.startswith("http"):
        live = rows.get((server, what.replace("http", "live")))
        if live:
            gap = f"{p50 - statistics.median(x[1] for x in live):.1f}"
    print(f"{server:8} {what:18} {rps:9.0f} {p50:8.1f} {gap:>15}")
PY
