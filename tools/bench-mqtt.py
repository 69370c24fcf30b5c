#!/usr/bin/env python3
"""Time and bytes of updates over MQTT on loopback: for each (base, successor) pair, a whole
update (a device holding nothing) and a delta update (a device holding the base).

Uses the release binaries (cargo build --release --bins), Debian's mosquitto with the
repository's config and ACL, `outpostctl serve-blobs` and `publish`, and real `outpost`
daemons; figures come from each device's own report (GET /v2/update/status).

    tools/bench-mqtt.py [--chunk-size 65536] [--runs 3] [--max-bytes-per-second N] [--real]

--real: magika (3.1 MB) and its successors in models/real/successors/ (tools/fetch-real-models.sh);
otherwise digits-edge and its successors. --max-bytes-per-second caps each device's download
(`[updates.mqtt] max_bytes_per_second`), e.g. 125000 for a 1 Mbit/s link.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
# (model name, base, successor, what changed): paths under models/ without .onnx; a pair without a
# base is sent whole only.
DIGITS = [("digits", "digits-edge", f"successors/digits-edge-{s}", s) for s in ("head", "requant", "retrain")]
DIGITS.append(("digits", None, "digits-central", "the 204 KB FP32 central model: the chunk size at work"))
REAL = [
    ("magika", "real/successors/magika-v3_2", "real/magika", "retrain (v3_2 -> v3_3)"),
    ("magika", "real/magika", "real/successors/magika-head", "last layer fine-tuned"),
    ("magika", "real/magika-qdq", "real/successors/magika-qdq-recal", "re-quantized, other calibration"),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctl(cwd, *args):
    subprocess.run([os.path.join(BIN, "outpostctl"), *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def wait(what, f, limit=60):
    end = time.time() + limit
    while time.time() < end:
        try:
            v = f()
        except OSError:
            v = None
        if v:
            return v
        time.sleep(0.01)
    sys.exit(f"timed out waiting for {what}")


def status(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/update/status", timeout=2) as r:
            return json.load(r)
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk-size", type=int, default=65536)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-bytes-per-second", type=int, default=0)
    ap.add_argument("--real", action="store_true")
    a = ap.parse_args()
    pairs = REAL if a.real else DIGITS
    tmp = tempfile.mkdtemp(prefix="outpost-bench-mqtt-")
    os.chmod(tmp, 0o755)  # mosquitto started as root drops to its own user, which must read here
    procs = []
    try:
        port = free_port()
        users = ["console", "blobs"] + [f"d{i}" for i in range(2 * len(pairs) * a.runs)]
        passwd = os.path.join(tmp, "passwd")
        open(passwd, "w").close()
        for u in users:
            subprocess.run(["mosquitto_passwd", "-b", passwd, u, f"pw-{u}"], check=True)
            with open(os.path.join(tmp, f"{u}.pw"), "w") as f:
                f.write(f"pw-{u}\n")
        conf = []
        for line in open(os.path.join(ROOT, "cross/mosquitto/outpost.conf")):
            key = line.split()[0] if line.split() else ""
            conf.append({
                "password_file": f"password_file {passwd}\n",
                "acl_file": f"acl_file {ROOT}/cross/mosquitto/outpost.acl\n",
                "listener": f"listener {port} 127.0.0.1\n",
                "persistence": "persistence false\n",
            }.get(key, line))
        with open(os.path.join(tmp, "mosquitto.conf"), "w") as f:
            f.writelines(conf)
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        procs.append(subprocess.Popen([mosquitto, "-c", os.path.join(tmp, "mosquitto.conf")], stderr=subprocess.DEVNULL))
        wait("mosquitto", lambda: socket.create_connection(("127.0.0.1", port)).close() or True)
        broker = ["--broker", f"127.0.0.1:{port}"]

        pub = os.path.join(tmp, "publisher")
        os.makedirs(pub)
        ctl(pub, "keys", "gen", "root")
        ctl(pub, "keys", "gen", "release")
        ctl(pub, "root", "create", "--fleet", "demo", "--root-key", "root.pub", "--release-key", "release.pub", "-o", "root-1.json")
        ctl(pub, "sign", "root-1.json", "--key", "root.key")
        models = os.path.join(ROOT, "models")
        releases = []  # (directory name, number, model name, path)
        for i, (model, base, succ, _) in enumerate(pairs):
            if base:
                releases.append((f"base{i}", 2 * i + 1, model, os.path.join(models, base)))
            releases.append((f"succ{i}", 2 * i + 2, model, os.path.join(models, succ)))
        for name, number, model, path in releases:
            with open(os.path.join(pub, f"{name}.toml"), "w") as f:
                f.write(f'fleet = "demo"\nnumber = {number}\nchunk_size = {a.chunk_size}\n[[models]]\n'
                        f'name = "{model}"\nversion = "{number}"\npath = "{path}.onnx"\ngolden = "{path}.golden.json"\n')
            ctl(pub, "release", "create", f"{name}.toml", "-o", name)
            if name.startswith("succ") and pairs[int(name[4:])][1]:
                ctl(pub, "delta", name, "--base", f"base{name[4:]}")
            ctl(pub, "release", "sign", name, "--key", "release.key")
        procs.append(subprocess.Popen(
            [os.path.join(BIN, "outpostctl"), "serve-blobs", *[os.path.join(pub, r[0]) for r in releases], *broker, "--fleet", "demo",
             "--username", "blobs", "--password-file", os.path.join(tmp, "blobs.pw")], stderr=subprocess.DEVNULL))
        time.sleep(0.5)

        def device(n):
            dev = f"d{n}"
            http = free_port()
            cfg = os.path.join(tmp, f"{dev}.toml")
            with open(cfg, "w") as f:
                f.write(f'[server]\nlisten = "127.0.0.1:{http}"\n[updates]\nstate_dir = "{dev}-state"\nfleet = "demo"\n'
                        f'[updates.mqtt]\nbroker = "127.0.0.1:{port}"\ndevice_id = "{dev}"\npassword_file = "{dev}.pw"\n'
                        f'max_bytes_per_second = {a.max_bytes_per_second}\n')
            subprocess.run([os.path.join(BIN, "outpost"), "update", "provision", os.path.join(pub, "root-1.json"),
                            "--config", cfg], check=True, stdout=subprocess.DEVNULL)
            p = subprocess.Popen([os.path.join(BIN, "outpost"), "serve", "--config", cfg], stderr=subprocess.DEVNULL)
            procs.append(p)
            wait("the device", lambda: (status(http) or {}).get("mqtt", {}).get("connection", {}).get("connected"))
            return dev, http, p

        def update(dev, http, release, number):
            started = time.time()
            ctl(pub, "publish", release, "--devices", dev, *broker, "--username", "console",
                "--password-file", os.path.join(tmp, "console.pw"))
            s = wait(f"{dev} on release {number}", lambda: (lambda u: u if u.get("state") == "idle" and
                     (u.get("last_applied") or {}).get("number") == number else None)(
                         (status(http) or {}).get("mqtt", {}).get("update", {})))
            wall = (time.time() - started) * 1000
            la = s["last_applied"]
            return wall, la["download_ms"], la["apply_ms"], la["transfer"]["bytes_received"], la["transfer"]["requests"]

        cap = f", download capped at {a.max_bytes_per_second} B/s" if a.max_bytes_per_second else ""
        print(f"chunk size {a.chunk_size} B{cap}, {a.runs} run(s) each, median shown; times in ms "
              "(wall: from `outpostctl publish` to the device reporting the release active)")
        print(f"{'successor':52} {'kind':6} {'bytes':>9} {'chunks':>6} {'wall':>7} {'download':>9} {'apply':>6}")
        n = 0
        for i, (model, base, succ, what) in enumerate(pairs):
            for kind in ["full", "delta"] if base else ["full"]:
                rows = []
                for _ in range(a.runs):
                    dev, http, p = device(n)
                    n += 1
                    if kind == "delta":
                        update(dev, http, f"base{i}", 2 * i + 1)
                    rows.append(update(dev, http, f"succ{i}", 2 * i + 2))
                    p.terminate()
                    p.wait()
                rows.sort(key=lambda r: r[0])
                wall, dl, ap_ms, nbytes, reqs = rows[len(rows) // 2]
                label = f"{os.path.basename(succ)} ({what})"
                print(f"{label:52} {kind:6} {nbytes:9} {reqs:6} {wall:7.0f} {dl:9} {ap_ms:6}")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
