#!/usr/bin/env bash
# Runs each fuzz target for SECONDS (default 600) with its corpus in tests/fuzz/corpus/TARGET,
# one after another, and prints executions and crashes per target. Needs a nightly toolchain
# and cargo-fuzz (`cargo install cargo-fuzz`); not part of the test command.
#   tests/fuzz/run.sh [SECONDS] [TARGET...]
# A crash is left in tests/fuzz/artifacts/TARGET/; turn it into a regression test beside the
# parser (see docs/fuzzing.md) before fixing it.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-600}"
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir .)
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="artifacts/$t.log"
  set +e
  cargo +nightly fuzz run --fuzz-dir . "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  crashes=$(find "artifacts/$t" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' \) | wc -l)
  printf '%-18s %8ss  executions %12s  corpus %6s  crashes %s  (exit %s)\n' \
    "$t" "$seconds" "$execs" "$(find "corpus/$t" -type f | wc -l)" "$crashes" "$rc"
done
