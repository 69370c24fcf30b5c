#!/usr/bin/env python3
"""Drift score over time as the inputs shift: a real run, plotted.

Serves `digits-edge` with a reference profile built from the first 210 held-out digits
(`outpostctl profile --limit 210`) and a drift window of 150 rows, then sends window after window
of the other 150 held-out digits (the same rows each window) with Gaussian noise that grows each window (pixels are 0..16; the
noise's standard deviation goes 0, 0.5, 1, ... and values are clipped to 0..16). After each window
it reads the model's statistics and records every signal's population stability index. Writes
the table to stdout and the plot as SVG (default docs/drift-trace.svg).

    tools/drift-trace.py [--bin-dir target/release] [--out docs/drift-trace.svg]

The random noise is seeded, so a rerun sends the same rows.
"""
import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = 150
REFERENCE = 210
STEPS = 12
THRESHOLD = 0.25


def call(addr, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{addr}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows():
    with open(os.path.join(ROOT, "models/digits-test.csv")) as f:
        next(f)
        return [[float(v) for v in line.strip().split(",")[1:]] for line in f if line.strip()]


def svg(trace, out):
    w, h, left, right, top, bottom = 720, 420, 64, 150, 24, 48
    pw, ph = w - left - right, h - top - bottom
    signals = [s for s, _ in trace[0][1]]
    y_max = max(max(v for _, v in scores) for _, scores in trace)
    y_max = max(1.0, y_max * 1.1)
    xs = [sigma for sigma, _ in trace]
    x_of = lambda x: left + pw * (x - xs[0]) / (xs[-1] - xs[0])
    y_of = lambda y: top + ph * (1 - y / y_max)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{left}" y="16" font-size="13">Drift score (PSI) per {WINDOW}-row window as noise grows (digits-edge, held-out digits)</text>']
    for i in range(6):
        y = y_max * i / 5
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y_of(y):.1f}" y2="{y_of(y):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y_of(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for x in xs:
        parts.append(f'<text x="{x_of(x):.1f}" y="{top + ph + 16}" text-anchor="middle">{x:g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{h - 8}" text-anchor="middle">noise standard deviation (pixel values 0..16), one window per step</text>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y_of(THRESHOLD):.1f}" y2="{y_of(THRESHOLD):.1f}" stroke="#888" stroke-dasharray="6,4"/>')
    parts.append(f'<text x="{left + pw + 8}" y="{y_of(THRESHOLD) + 4:.1f}">threshold {THRESHOLD}</text>')
    for i, signal in enumerate(signals):
        pts = " ".join(f"{x_of(sigma):.1f},{y_of(dict(scores)[signal]):.1f}" for sigma, scores in trace)
        c = colours[i % len(colours)]
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{pts}"/>')
        parts.append(f'<text x="{left + pw + 8}" y="{top + 14 + 18 * i}" fill="{c}">{signal}</text>')
    parts.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(parts) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target/release"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/drift-trace.svg"))
    args = ap.parse_args()
    work = tempfile.mkdtemp()
    try:
        model = os.path.join(work, "digits.onnx")
        shutil.copy(os.path.join(ROOT, "models/digits-edge.onnx"), model)
        shutil.copy(os.path.join(ROOT, "models/digits-edge.golden.json"), os.path.join(work, "digits.golden.json"))
        subprocess.run([os.path.join(args.bin_dir, "outpostctl"), "profile", model, "--limit", str(REFERENCE)],
                       cwd=ROOT, check=True, stdout=sys.stderr)
        config = os.path.join(work, "outpost.toml")
        with open(config, "w") as f:
            f.write(f'[[models]]\nname = "digits"\npath = "{model}"\n[models.drift]\nwindow = {WINDOW}\nthreshold = {THRESHOLD}\n')
        addr = f"127.0.0.1:{free_port()}"
        server = subprocess.Popen([os.path.join(args.bin_dir, "outpost"), "serve", "--config", config, "--listen", addr],
                                  stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"http://{addr}/v2/health/ready", timeout=2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            live = rows()[REFERENCE:]
            rng = random.Random(7)
            trace = []
            print(f"{'sigma':>6} " + "  ".join(f"{s:>12}" for s in ("confidence", "class", "input:input")) + "  alert")
            for step in range(STEPS):
                sigma = step * 0.5
                for i in range(WINDOW):
                    row = live[(step * WINDOW + i) % len(live)]
                    noisy = [min(16.0, max(0.0, v + rng.gauss(0, sigma))) for v in row]
                    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": noisy}]}
                    call(addr, "/v2/models/digits/infer", body)
                drift = call(addr, "/v2/models/digits/stats")["model_stats"][0]["drift"]
                scores = [(name, value) for name, value in drift["last"]["psi"]]
                trace.append((sigma, scores))
                alert = "yes" if max(v for _, v in scores) > THRESHOLD else ""
                print(f"{sigma:6.1f} " + "  ".join(f"{v:12.3f}" for _, v in scores) + f"  {alert}")
        finally:
            server.terminate()
            server.wait()
        svg(trace, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
