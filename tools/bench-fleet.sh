#!/usr/bin/env bash
# Fleet scale through the console: N simulated devices (default 1000; the real agent and
# updater, a fake backend) on one loopback Mosquitto (the repository's config and ACL), the
# console with its database and built-in blob server. Release 1 is rolled out whole,
# then release 2 (digits-edge's retrained head, as a delta) in waves 1%,10%,50%,100%; prints
# the time from `rollout start` to every device on it, and the broker's and console's CPU
# seconds and peak RSS during that rollout; then what the console's page costs at that size.
# DATABASE=postgres runs the console on a PostgreSQL server (tools/postgres-test.sh: Debian's
# postgresql, a throwaway cluster) instead of its SQLite file, and counts the server's CPU too.
#   [DATABASE=sqlite|postgres] tools/bench-fleet.sh [DEVICES]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
cargo build --release --quiet -p outpost-tools
C=$PWD/target/release/outpostctl
W=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"' EXIT
ulimit -n 65536 2>/dev/null || true

# Keys, root, two releases (the second with a delta against the first).
( cd "$W"
  $C keys gen root >/dev/null; $C keys gen release >/dev/null
  $C root create --fleet demo --root-key root.pub --release-key release.pub -o root-1.json >/dev/null
  $C sign root-1.json --key root.key >/dev/null
  n=1
  for m in digits-edge successors/digits-edge-head; do
    printf 'fleet = "demo"\nnumber = %s\n[[models]]\nname = "digits"\nversion = "%s"\npath = "%s"\ngolden = "%s"\n' \
      $n $n "$OLDPWD/models/$m.onnx" "$OLDPWD/models/$m.golden.json" > r$n.toml
    $C release create r$n.toml -o r$n >/dev/null
    [[ $n == 2 ]] && $C delta r2 --base r1 >/dev/null
    $C release sign r$n --key release.key >/dev/null
    n=$((n + 1))
  done )

# The broker: the repository's config with a loopback port, a password per device.
PORT=$((20000 + RANDOM % 20000))
mkdir -p "$W/broker"
# The simulated devices run in processes of at most 5,000 (each holds two descriptors per
# device, and the open-file limit is often 20,000): process K's devices are simK-0001, ...
SIMS=$(( (N + 4999) / 5000 ))
sim_count() { local left=$(( N - $1 * 5000 )); echo $(( left < 5000 ? left : 5000 )); }
{ echo "console:pw-console"
  for k in $(seq 0 $((SIMS - 1))); do
    for i in $(seq -f "%04g" 1 "$(sim_count "$k")"); do echo "sim$k-$i:pw-sim$k-$i"; done
  done; } > "$W/broker/passwd"
mosquitto_passwd -U "$W/broker/passwd"
# Mosquitto started as root drops to its own user: it must be able to read its files.
chmod 755 "$W" "$W/broker"; chmod 644 "$W/broker/passwd"
sed -e "s|^password_file .*|password_file $W/broker/passwd|" -e "s|^acl_file .*|acl_file $PWD/cross/mosquitto/outpost.acl|" \
    -e "s|^listener .*|listener $PORT 127.0.0.1|" -e "s|^persistence_location .*|persistence_location $W/broker/|" \
    cross/mosquitto/outpost.conf > "$W/broker/mosquitto.conf"
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)
"$MOSQ" -c "$W/broker/mosquitto.conf" 2>"$W/broker.log" & PIDS+=($!); BROKER=$!
sleep 0.5
echo pw-console > "$W/console.pw"
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$W/token"
CPORT=$((PORT + 1))
BROKER_ARGS=(--broker 127.0.0.1:$PORT)
DATABASE=${DATABASE:-sqlite}
DB_ARGS=()
if [[ $DATABASE == postgres ]]; then
  # The server stops when this script exits (its standard input, the coprocess pipe, closes).
  coproc PGSERVER { tools/postgres-test.sh; }
  read -r PGURL <&"${PGSERVER[0]}"
  psql "$PGURL" -qc "CREATE DATABASE bench"
  DBURL="${PGURL%/*}/bench"
  DB_ARGS=(--database "$DBURL")
fi
"$C" console --data "$W/console" --listen 127.0.0.1:$CPORT --token-file "$W/token" --root "$W/root-1.json" \
  "${DB_ARGS[@]}" "${BROKER_ARGS[@]}" --username console --password-file "$W/console.pw" 2>"$W/console.log" & PIDS+=($!); CONSOLE=$!
for k in $(seq 0 $((SIMS - 1))); do
  OUTPOST_SIM_PASSWORD='pw-{id}' "$C" simulate --devices "$(sim_count "$k")" --id-prefix "sim$k" --fleet demo \
    --root "$W/root-1.json" --state-dir "$W/sim" "${BROKER_ARGS[@]}" --every 3600 2>"$W/sim$k.log" & PIDS+=($!)
done
export OUTPOST_CONSOLE=127.0.0.1:$CPORT OUTPOST_CONSOLE_TOKEN_FILE=$W/token

online() { "$C" fleet ls --json | python3 -c 'import json,sys; print(sum(d["online"] for d in json.load(sys.stdin)))'; }
echo "waiting for $N devices to come online..."
until [[ $(online 2>/dev/null || echo 0) == "$N" ]]; do sleep 1; done
"$C" release upload "$W/r1" >/dev/null
"$C" release upload "$W/r2" >/dev/null

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # user + system, in clock ticks
# The database server's processes, in clock ticks (0 on SQLite: it runs inside the console).
dbcpu() { { ps -C postgres -o cputimes= 2>/dev/null || true; } | awk -v t="$(getconf CLK_TCK)" '{s += $1} END {print s * t + 0}'; }
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; } # peak RSS, KiB
rollout() { # NUMBER: starts it, waits for completion, prints seconds
  local id t0 b0 c0 d0
  b0=$(cpu $BROKER); c0=$(cpu $CONSOLE); d0=$(dbcpu); t0=$(date +%s.%N)
  id=$("$C" rollout start --number "$1" --fleet demo --waves 1%,10%,50%,100% --errors 1% --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  until "$C" rollout status "$id" --json | grep -q '"state": "completed"'; do sleep 0.2; done
  local t1; t1=$(date +%s.%N)
  local tick; tick=$(getconf CLK_TCK)
  printf 'release %s to %s devices: %.1f s; broker CPU %.1f s, console CPU %.1f s, database server CPU %.1f s\n' "$1" "$N" \
    "$(echo "$t1 - $t0" | bc)" "$(echo "($(cpu $BROKER) - $b0) / $tick" | bc -l)" "$(echo "($(cpu $CONSOLE) - $c0) / $tick" | bc -l)" \
    "$(echo "($(dbcpu) - $d0) / $tick" | bc -l)"
}
rollout 1
rollout 2
echo "peak RSS: broker $(( $(hwm $BROKER) / 1024 )) MB, console $(( $(hwm $CONSOLE) / 1024 )) MB"
if [[ $DATABASE == postgres ]]; then
  size=$(psql "$DBURL" -tAc "SELECT pg_database_size(current_database())")
else
  size=$(cat "$W/console/console.db"* | wc -c)
fi
echo "database ($DATABASE): $(( size / 1024 / 1024 )) MB"

# The web page at this size: what each of its polls returns and takes (median of 20), and the
# console's CPU seconds and RSS after each path's 20 requests.
python3 - "$CPORT" "$W/token" "$CONSOLE" <<'PY'
import json, os, statistics, sys, time, urllib.request
port, token, pid = sys.argv[1], open(sys.argv[2]).read().strip(), sys.argv[3]
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
def rss():
    return next(int(l.split()[1]) // 1024 for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS"))
# /api/devices is every device, what the overview carried before the page paged: last, so its
# memory does not count against the others.
for path in ["/api/overview", "/api/fleet?limit=50", "/api/fleet?release=2&q=9&limit=50&offset=50", "/api/devices"]:
    times, body, c0 = [], b"", cpu()
    for _ in range(20):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": "Bearer " + token})
        t = time.perf_counter()
        body = urllib.request.urlopen(req).read()
        times.append(time.perf_counter() - t)
    v = json.loads(body)
    total = f", total {v['total']}" if isinstance(v, dict) and "total" in v else ""
    print(f"page poll {path}: {len(body):,} bytes{total}, {statistics.median(times) * 1000:.1f} ms median; "
          f"console {(cpu() - c0) / 20 * 1000:.0f} ms CPU per request, RSS {rss()} MB after")
PY
if command -v chromium >/dev/null; then
  # The whole page in headless Chromium, browser start included, until its data is drawn.
  t0=$(date +%s.%N)
  chromium --headless --no-sandbox --disable-gpu --disable-background-networking --no-first-run \
    --virtual-time-budget=10000 --user-data-dir="$W/chromium" --dump-dom "http://127.0.0.1:$CPORT/#token=$(cat "$W/token")" 2>/dev/null \
    | grep -q 'data-loaded="yes"' && printf 'page in headless Chromium (browser start included): %.2f s\n' "$(echo "$(date +%s.%N) - $t0" | bc)"
fi
"$C" rollout status --json | python3 -c 'import json,sys; r=json.load(sys.stdin)[0]; print("last rollout:", r["counts"])'
