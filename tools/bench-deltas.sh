#!/usr/bin/env bash
# Signed delta updates: for each (base, successor) pair, the delta's size against the full blob
# (and zstd -19 of the blob, alone and with --patch-from, for scale), and what applying the
# release costs on a device holding the base (time inside the update, peak RSS of the
# `outpost update apply` process).
#
#   tools/bench-deltas.sh          digits-edge and its successors (models/successors/, 5 KB)
#   tools/bench-deltas.sh --real   magika (3.1 MB) and its successors (models/real/successors/:
#                                  a retrain, a last-layer fine-tune, a re-quantization)
set -euo pipefail
cd "$(dirname "$0")/.."
# (name in the release, base, successor, what changed): paths without .onnx.
if [[ ${1:-} == --real ]]; then
  tools/fetch-real-models.sh >/dev/null
  PAIRS=(
    "magika models/real/successors/magika-v3_2 models/real/magika retrain(v3_2->v3_3)"
    "magika models/real/magika models/real/successors/magika-head last-layer-fine-tune"
    "magika models/real/magika-qdq models/real/successors/magika-qdq-recal requantized(other-calibration)"
  )
else
  PAIRS=(
    "digits models/digits-edge models/successors/digits-edge-head head-retrained"
    "digits models/digits-edge models/successors/digits-edge-requant first-layer-requantized"
    "digits models/digits-edge models/successors/digits-edge-retrain retrained"
  )
fi
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

release() { # NUMBER NAME MODEL-PATH-WITHOUT-.onnx
  cat >"$W/r$1.toml" <<EOF
fleet = "bench"
number = $1
[[models]]
name = "$2"
version = "$1"
path = "$PWD/$3.onnx"
golden = "$PWD/$3.golden.json"
EOF
  $C release create "$W/r$1.toml" -o "$W/r$1" >/dev/null
}

n=1
for pair in "${PAIRS[@]}"; do
  read -r name base model what <<<"$pair"
  release $n "$name" "$base"
  $C release sign "$W/r$n" --key "$W/rel.key" >/dev/null
  release $((n + 1)) "$name" "$model"
  cp -r "$W/r$((n + 1))" "$W/full$n" # the same release without its delta
  $C release sign "$W/full$n" --key "$W/rel.key" >/dev/null
  size=$(stat -c %s "$model.onnx")
  echo "== $(basename "$base") -> $(basename "$model"), $what ($size bytes; zstd -19 alone:" \
    "$(zstd -19 -q -c "$model.onnx" 2>/dev/null | wc -c); zstd -19 --patch-from:" \
    "$(zstd -19 -q -c --patch-from="$base.onnx" "$model.onnx" 2>/dev/null | wc -c))"
  /usr/bin/time -f "%e" -o "$W/delta-time" $C delta "$W/r$((n + 1))" --base "$W/r$n"
  echo "making the delta: $(cat "$W/delta-time") s"
  $C release sign "$W/r$((n + 1))" --key "$W/rel.key" >/dev/null
  # A fresh device holding the base release, then the update: as a delta, and as a full blob.
  for kind in delta full; do
    rel="$W/r$((n + 1))"
    [[ $kind == full ]] && rel="$W/full$n"
    state="$W/state-$kind$n"
    printf '[server]\nlisten = "127.0.0.1:1"\n[updates]\nstate_dir = "%s"\nfleet = "bench"\n' "$state" >"$state.toml"
    $O update provision "$W/root.json" --config "$state.toml" >/dev/null
    $O update apply "$W/r$n" --config "$state.toml" >/dev/null 2>&1
    /usr/bin/time -f "%M" -o "$W/rss" $O update apply "$rel" --config "$state.toml" >"$W/out.json" 2>/dev/null
    python3 -c "import json,sys; a=json.load(open('$W/out.json'))['applied']; print(f\"applied ($kind): {a['from_delta']} blob(s) from deltas, {a['full']} full, {a['bytes_read']} bytes read, {a['millis']} ms in the update, peak RSS $(cat "$W/rss") KB\")"
  done
  n=$((n + 2))
done
