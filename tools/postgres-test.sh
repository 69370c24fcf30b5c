#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests (Debian's postgresql package): a new cluster in a
# temporary directory, listening on a free loopback port. Prints the server's URL once it takes
# connections, and stops it and removes its files when its standard input closes (the test
# process that started it exited, however it ended). As root, the server runs as `postgres`.
set -euo pipefail
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ ! -x "$bin/initdb" ]; then
  echo "postgres-test.sh: no PostgreSQL server found (apt-get install postgresql)" >&2
  exit 1
fi
as=()
[ "$(id -u)" != 0 ] || as=(runuser -u postgres --)
dir=$("${as[@]}" mktemp -d "${TMPDIR:-/tmp}/outpost-pg.XXXXXX")
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${as[@]}" "$bin/initdb" -D "$dir/data" -U outpost -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
# Durability off: a test server's data is thrown away.
"${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -s \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
  start
stop() {
  "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate -s stop || true
  "${as[@]}" rm -rf "$dir"
}
trap stop EXIT
echo "postgres://outpost@127.0.0.1:$port/postgres"
# Until the test process closes our standard input.
cat >/dev/null || true
