#!/usr/bin/env python3
"""Peak memory of `outpost serve` under large concurrent JSON bodies: the daemon's RSS when
idle, and its peak (VmHWM) after N clients each send one body of about SIZE MiB at once to a
small model (digits-edge, [rows, 64] FP32 as JSON numbers). Prints what each client got.

    tools/probe-memory.py [--binary target/release/outpost] [--clients 8] [--mib 14] [-- EXTRA SERVE ARGS]
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status_kb(pid, key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "outpost"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--mib", type=float, default=14)
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile()
    p = subprocess.Popen([a.binary, "serve", "--model", os.path.join(ROOT, "models", "digits-edge.onnx"),
                          "--listen", f"127.0.0.1:{port}", *a.extra], stderr=log, stdout=log)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/v2/health/ready", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        time.sleep(0.5)
        idle = status_kb(p.pid, "VmRSS")
        rows = int(a.mib * 2**20 / (64 * 4))  # "1.0," is four bytes a number
        body = ('{"inputs":[{"name":"input","shape":[%d,64],"datatype":"FP32","data":[' % rows
                + ",".join(["1.0"] * (rows * 64)) + "]}]}").encode()
        results = []

        def client():
            req = urllib.request.Request(url + "/v2/models/digits-edge/infer", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    r.read()
                    results.append(r.status)
            except urllib.error.HTTPError as e:
                results.append(e.code)
            except (urllib.error.URLError, ConnectionError) as e:
                results.append(f"connection error ({e})")

        threads = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.5)
        peak, after = status_kb(p.pid, "VmHWM"), status_kb(p.pid, "VmRSS")
        alive = p.poll() is None
        print(f"{os.path.basename(a.binary)}: {a.clients} clients x {len(body) / 2**20:.1f} MiB JSON ({rows} rows); "
              f"statuses {sorted(map(str, results))}; RSS idle {idle / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB "
              f"(+{(peak - idle) / 1024:.0f}), after {after / 1024:.0f} MiB; daemon {'alive' if alive else 'DEAD'}")
    finally:
        p.terminate()
        p.wait()


if __name__ == "__main__":
    sys.exit(main())
