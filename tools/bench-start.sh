#!/usr/bin/env bash
# Start-up time and idle memory of an `outpost` binary serving the sample models:
#   tools/bench-start.sh [BINARY] [RUNS]
# BINARY defaults to the static x86_64 build (cross/build-static.sh x86_64), RUNS to 5. Each run
# starts `outpost serve --model-dir models` on a loopback port and reads:
#   ready_ms  process start to every model loaded and golden-checked (the daemon's own log line)
#   rss@3s    /proc/PID/smaps_rollup 3 s after start: Rss, of it Anonymous, the rest file-backed
#   rss@15s   the same once idle (the thread that loaded the models has left the blocking pool,
#             which keeps idle threads 10 s, and its allocator heap went with it)
# The environment is passed through: compare `RUST_BACKTRACE=1 tools/bench-start.sh` with a plain run.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/x86_64-unknown-linux-musl/small/outpost}"
runs="${2:-5}"
[[ -x $bin ]] || { echo "tools/bench-start.sh: no binary at $bin" >&2; exit 66; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT

rollup() { # PID -> "rss anon file" in KB
  awk '/^Rss:/ { r = $2 } /^Anonymous:/ { a = $2 } END { printf "%d %d %d", r, a, r - a }' "/proc/$1/smaps_rollup"
}

echo "binary: $bin ($(stat -c %s "$bin") bytes)"
printf '%-4s %9s %26s %26s\n' run ready_ms 'rss@3s (anon+file) KB' 'rss@15s (anon+file) KB'
for run in $(seq "$runs"); do
  port=$((20000 + RANDOM % 20000))
  "$bin" serve --model-dir models --listen "127.0.0.1:$port" >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 200); do
    grep -q 'all models ready' "$log" && break
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.05
  done
  ready=$(grep -o 'ready_ms=[0-9]*' "$log" | cut -d= -f2)
  sleep 3
  read -r r3 a3 f3 <<<"$(rollup "$pid")"
  sleep 12
  read -r r15 a15 f15 <<<"$(rollup "$pid")"
  kill "$pid"
  wait "$pid" || true
  printf '%-4s %9s %26s %26s\n' "$run" "$ready" "$r3 ($a3+$f3)" "$r15 ($a15+$f15)"
done
