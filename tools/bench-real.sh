#!/usr/bin/env bash
# Real models side by side in one run (models/real/, from tools/fetch-real-models.sh):
#   tools/bench-real.sh [SECONDS] [MODEL ...]     default: 5 s, magika ocr-rec orientation
# For each model and each backend (tract, ort) it builds nothing but the release `outpost` and
# `outpostctl` (with ONNX Runtime), starts `outpost serve` on a loopback port and reads:
#   ready_ms       process start to the model loaded and golden-checked (the daemon's log line)
#   rss            /proc/PID VmRSS once ready, and again after the load (KB)
#   floor          `outpostctl bench`'s raw backend call on the golden input, in-process
#   c=1, c=8       the same input over HTTP, binary tensors, keep-alive clients
#   python ort     ONNX Runtime in-process from Python with its defaults, the same input: what a
#                  user measures before putting a server in front of it
# and, for the OCR detector on tract (planned per input shape), the cost of a first request at a
# new shape: the model's own `prepare_ms` over the plans it prepared.
# Absolute figures move 2-3x between runs and machines: read the ratios within one run.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-5}"
shift || true
models=("$@")
((${#models[@]})) || models=(magika ocr-rec orientation)
python=.venv/bin/python
[[ -x $python ]] || { echo "tools/bench-real.sh: run tools/test.sh first (it makes .venv)" >&2; exit 66; }
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$("$python" -c 'import glob, os, onnxruntime; print(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.*"))[0])')}"
tools/fetch-real-models.sh >/dev/null
cargo build --release --quiet -p outpost-runtime -p outpost-tools --features outpost-runtime/ort
log=$(mktemp)
trap 'rm -f "$log"; [[ -n ${pid:-} ]] && kill "$pid" 2>/dev/null || true' EXIT

serve() { # MODEL BACKEND [EXTRA ARGS] -> sets pid, port
  port=$((20000 + RANDOM % 20000))
  target/release/outpost serve --model "models/real/$1.onnx" --backend "$2" --listen "127.0.0.1:$port" >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do
    grep -q 'all models ready' "$log" && return
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.05
  done
  echo "tools/bench-real.sh: $1 on $2 not ready" >&2
  exit 1
}
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

for model in "${models[@]}"; do
  "$python" - "$model" "$seconds" <<'PY'
import json, sys, time
import numpy as np, onnxruntime as ort
name, seconds = sys.argv[1], float(sys.argv[2])
golden = json.load(open(f"models/real/{name}.golden.json"))
types = {"FP32": np.float32, "INT32": np.int32, "INT64": np.int64}
feeds = {t["name"]: np.array(t["data"], types[t["datatype"]]).reshape(t["shape"]) for t in golden["inputs"]}
sess = ort.InferenceSession(f"models/real/{name}.onnx", providers=["CPUExecutionProvider"])
sess.run(None, feeds)
times, end = [], time.perf_counter() + seconds
while time.perf_counter() < end:
    start = time.perf_counter()
    sess.run(None, feeds)
    times.append(time.perf_counter() - start)
print(f"== {name}: ONNX Runtime in-process from Python (defaults): p50 {np.median(times) * 1e6:.0f} us over {len(times)} runs")
PY
  for backend in tract ort; do
    serve "$model" "$backend"
    ready=$(grep -o 'ready_ms=[0-9]*' "$log" | cut -d= -f2)
    idle=$(rss "$pid")
    echo "== $model on $backend: ready ${ready} ms, RSS ${idle} KB once ready"
    target/release/outpostctl bench --addr "127.0.0.1:$port" --model "$model" --model-file "models/real/$model.onnx" \
      --backend "$backend" --binary --concurrency 1,8 --duration "$seconds"
    echo "   RSS after the load: $(rss "$pid") KB"
    kill "$pid"
    wait "$pid" || true
    pid=
  done
done

# The cost of a first request at a new shape: the OCR detector on tract, five new image sizes.
serve ocr-det tract
"$python" - "$port" <<'PY'
import json, sys, urllib.request
import numpy as np, tritonclient.http as httpclient
port = sys.argv[1]
client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
def stats():
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/ocr-det/stats") as r:
        return json.load(r)["model_stats"][0]["plans"]
before = stats()
for h, w in [(32, 320), (64, 320), (96, 640), (128, 640), (320, 320)]:
    x = httpclient.InferInput("x", [1, 3, h, w], "FP32")
    x.set_data_from_numpy(np.zeros((1, 3, h, w), np.float32))
    client.infer("ocr-det", [x])
after = stats()
n = after["prepared"] - before["prepared"]
print(f"== ocr-det on tract: {n} new shapes prepared in {(after['prepare_ms'] - before['prepare_ms']) / n:.0f} ms each "
      f"on average; {after['plans']} plans held, {after['bytes'] / 1e6:.1f} MB of constants")
PY
