#!/usr/bin/env bash
# Delta updates of digits-edge's successors (models/successors/): delta size against the full
# blob (and zstd -19 of the blob for scale), and what applying each release costs on a device
# (time inside the update, peak RSS of the `outpost update apply` process).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p outpost-runtime -p outpost-tools
BIN=target/release
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
C="$BIN/outpostctl"
O="$BIN/outpost"

$C keys gen "$W/root" >/dev/null
$C keys gen "$W/rel" >/dev/null
$C root create --fleet bench --root-key "$W/root.pub" --release-key "$W/rel.pub" -o "$W/root.json" >/dev/null
$C sign "$W/root.json" --key "$W/root.key" >/dev/null

release() { # NUMBER MODEL-PATH-WITHOUT-.onnx
  cat >"$W/r$1.toml" <<EOF
fleet = "bench"
number = $1
[[models]]
name = "digits"
version = "$1"
path = "$PWD/$2.onnx"
golden = "$PWD/$2.golden.json"
EOF
  $C release create "$W/r$1.toml" -o "$W/r$1" >/dev/null
}

release 1 models/digits-edge
$C release sign "$W/r1" --key "$W/rel.key" >/dev/null
base=models/digits-edge.onnx
n=2
for s in head requant retrain; do
  model=models/successors/digits-edge-$s
  release $n "$model"
  echo "== digits-edge-$s ($(stat -c %s $model.onnx) bytes; zstd -19 alone: $(zstd -19 -q -c $model.onnx 2>/dev/null | wc -c);" \
    "zstd -19 --patch-from: $(zstd -19 -q -c --patch-from=$base $model.onnx 2>/dev/null | wc -c))"
  $C delta "$W/r$n" --base "$W/r1"
  $C release sign "$W/r$n" --key "$W/rel.key" >/dev/null
  # A fresh device holding release 1, then the delta update.
  state="$W/state$n"
  printf '[server]\nlisten = "127.0.0.1:1"\n[updates]\nstate_dir = "%s"\nfleet = "bench"\n' "$state" >"$state.toml"
  $O update provision "$W/root.json" --config "$state.toml" >/dev/null
  $O update apply "$W/r1" --config "$state.toml" >/dev/null 2>&1
  /usr/bin/time -f "%M" -o "$W/rss" $O update apply "$W/r$n" --config "$state.toml" >"$W/out.json" 2>/dev/null
  python3 -c "import json,sys; a=json.load(open('$W/out.json'))['applied']; print(f\"applied: {a['from_delta']} blob(s) from deltas, {a['full']} full, {a['bytes_read']} bytes read, {a['millis']} ms in the update, peak RSS $(cat "$W/rss") KB\")"
  n=$((n + 1))
done
