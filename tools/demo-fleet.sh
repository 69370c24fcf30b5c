#!/usr/bin/env bash
# A local fleet to look at, in one command: Mosquitto (the repository's config and ACL), the
# console, a few hundred simulated devices and three real `outpost` daemons serving the sample
# digits model under live traffic. It publishes three signed releases and runs:
#   1. release 1 to every device, in waves;
#   2. release 2 (the retrained head, with its reference profile) to the real devices behind a
#      shadow gate and a soak gate: each stages it as a candidate, compares it on its live
#      requests, and activates it once 90% of 30 rows agree; then real-3's inputs shift (its
#      digits inverted), its drift score passes the soak gate's bound, the rollout pauses and
#      real-3 is rolled back to release 1;
#   3. release 3 (a different model, the float central MLP) behind a stricter gate (99% of 100
#      rows) while the traffic turns noisy: the candidate disagrees and the rollout pauses at
#      the gate, naming the device and its figures.
# Then it prints the console's address with its token and keeps everything running until
# Ctrl-C, so a person can look at the page (rollouts, waves, the fleet by release and drift with
# each release's drift over time, devices, their candidates and shadow figures).
#   tools/demo-fleet.sh [SIMULATED_DEVICES]      default 300
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-300}
cargo build --release --quiet -p outpost-runtime -p outpost-tools
C=$PWD/target/release/outpostctl
O=$PWD/target/release/outpost
W=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"' EXIT
ulimit -n 65536 2>/dev/null || true
REAL=(real-1 real-2 real-3)

echo "== keys, root and three signed releases in $W"
( cd "$W"
  $C keys gen root >/dev/null; $C keys gen release >/dev/null
  $C root create --fleet demo --root-key root.pub --release-key release.pub -o root-1.json >/dev/null
  $C sign root-1.json --key root.key >/dev/null
  # Release 2's reference profile: the first 200 held-out digits (the traffic is all of them).
  $C profile "$OLDPWD/models/successors/digits-edge-head.onnx" --data "$OLDPWD/models/digits-test.csv" \
    --limit 200 --out head.profile.json >/dev/null
  n=1
  for m in digits-edge successors/digits-edge-head digits-central; do
    printf 'fleet = "demo"\nnumber = %s\n[[models]]\nname = "digits"\nversion = "%s"\npath = "%s"\ngolden = "%s"\n' \
      $n $n "$OLDPWD/models/$m.onnx" "$OLDPWD/models/$m.golden.json" > r$n.toml
    [[ $n == 2 ]] && printf 'profile = "head.profile.json"\n[models.config.drift]\nwindow = 100\n' >> r$n.toml
    $C release create r$n.toml -o r$n >/dev/null
    $C release sign r$n --key release.key >/dev/null
    n=$((n + 1))
  done )

echo "== Mosquitto, the console, $N simulated devices and ${#REAL[@]} real ones"
PORT=$((20000 + RANDOM % 20000))
mkdir -p "$W/broker"
{ echo "console:pw-console"
  for i in $(seq -f "%04g" 1 "$N"); do echo "sim-$i:pw-sim-$i"; done
  for d in "${REAL[@]}"; do echo "$d:pw-$d"; done; } > "$W/broker/passwd"
mosquitto_passwd -U "$W/broker/passwd"
chmod 755 "$W" "$W/broker"; chmod 644 "$W/broker/passwd"
sed -e "s|^password_file .*|password_file $W/broker/passwd|" -e "s|^acl_file .*|acl_file $PWD/cross/mosquitto/outpost.acl|" \
    -e "s|^listener .*|listener $PORT 127.0.0.1|" -e "s|^persistence_location .*|persistence_location $W/broker/|" \
    cross/mosquitto/outpost.conf > "$W/broker/mosquitto.conf"
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)
"$MOSQ" -c "$W/broker/mosquitto.conf" 2>"$W/broker.log" & PIDS+=($!)
sleep 0.5
echo pw-console > "$W/console.pw"
TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$TOKEN" > "$W/token"
CPORT=$((PORT + 1))
"$C" console --data "$W/console" --listen 127.0.0.1:$CPORT --token-file "$W/token" --root "$W/root-1.json" \
  --drift-sample-secs 5 --broker 127.0.0.1:$PORT --username console --password-file "$W/console.pw" 2>"$W/console.log" & PIDS+=($!)
OUTPOST_SIM_PASSWORD='pw-{id}' "$C" simulate --devices "$N" --fleet demo --root "$W/root-1.json" --state-dir "$W/sim" \
  --broker 127.0.0.1:$PORT --label ring=sim --every 3600 2>"$W/sim.log" & PIDS+=($!)
HTTP=()
for i in "${!REAL[@]}"; do
  d=${REAL[$i]}; hp=$((CPORT + 1 + i)); HTTP+=("127.0.0.1:$hp")
  echo "pw-$d" > "$W/$d.pw"
  cat > "$W/$d.toml" <<TOML
[server]
listen = "127.0.0.1:$hp"
[[models]]
name = "digits"
path = "$PWD/models/digits-edge.onnx"
version = "0"
[updates]
state_dir = "$W/$d-state"
fleet = "demo"
[updates.mqtt]
broker = "127.0.0.1:$PORT"
device_id = "$d"
password_file = "$W/$d.pw"
report_interval_secs = 2
labels = { ring = "real" }
TOML
  "$O" update provision "$W/root-1.json" --config "$W/$d.toml" >/dev/null
  "$O" serve --config "$W/$d.toml" 2>"$W/$d.log" & PIDS+=($!)
done
# Live traffic to the real devices: held-out digits, with noise once $W/noisy exists, and
# inverted for the last device once $W/inverted exists.
python3 - "$W/noisy" "$W/inverted" "$PWD/models/digits-test.csv" "${HTTP[@]}" <<'PY' & PIDS+=($!)
import json, os, random, sys, time, urllib.request
flag, inverted, csv, addrs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
rows = [[float(v) for v in l.split(",")[1:]] for l in open(csv).read().splitlines()[1:]]
rng = random.Random(1)
i = 0
while True:
    noisy = os.path.exists(flag)
    for a in addrs:
        row = rows[i % len(rows)]
        if noisy:
            row = [min(16.0, max(0.0, v + rng.gauss(0, 4))) for v in row]
        if a == addrs[-1] and os.path.exists(inverted):
            row = [16.0 - v for v in row]
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]}).encode()
        try:
            urllib.request.urlopen(urllib.request.Request(f"http://{a}/v2/models/digits/infer", body,
                                   {"Content-Type": "application/json"}), timeout=5).read()
        except OSError:
            time.sleep(0.5)
    i += 1
    time.sleep(0.01)
PY
export OUTPOST_CONSOLE=127.0.0.1:$CPORT OUTPOST_CONSOLE_TOKEN_FILE=$W/token
total=$((N + ${#REAL[@]}))
online() { "$C" fleet ls --json | python3 -c 'import json,sys; print(sum(d["online"] for d in json.load(sys.stdin)))'; }
until [[ $(online 2>/dev/null || echo 0) == "$total" ]]; do sleep 1; done
echo "   $total devices online"
for r in r1 r2 r3; do "$C" release upload "$W/$r" >/dev/null; done

state() { "$C" rollout status "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])'; }
wait_state() { # ID STATE...
  local id=$1; shift
  while true; do
    s=$(state "$id")
    for want in "$@"; do [[ $s == "$want" ]] && return 0; done
    sleep 1
  done
}
rollout() { "$C" rollout start --fleet demo "$@" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }

echo "== rollout 1: release 1 to every device, waves 1%,10%,50%,100%"
id=$(rollout --number 1 --waves 1%,10%,50%,100% --errors 1%)
wait_state "$id" completed
echo "== rollout 2: release 2 to the real devices, gated on shadow agreement (90% of 30 rows) and,"
echo "   once active, on drift (at most 1.5, with rollback); real-3's digits are inverted once it runs it"
id=$(rollout --number 2 --label ring=real --waves 1,100% --soak 60 --shadow-agreement 0.9 --shadow-rows 30 \
  --drift-max 1.5 --rollback)
release_of() { "$C" fleet show "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["release"])'; }
until [[ $(release_of real-3) == 2 || $(state "$id") == paused ]]; do sleep 1; done
touch "$W/inverted"
wait_state "$id" completed paused
"$C" rollout status "$id"
echo "== rollout 3: release 3 (another model) under noisy traffic, gated at 99% of 100 rows"
touch "$W/noisy"
id=$(rollout --number 3 --label ring=real --waves 1,100% --shadow-agreement 0.99 --shadow-rows 100)
wait_state "$id" paused completed
"$C" rollout status "$id"
echo
echo "The console: http://127.0.0.1:$CPORT/#token=$TOKEN"
echo "(logs and data in $W; Ctrl-C stops everything and removes them)"
wait
