#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server for the tests: a new cluster in a
# temporary directory, listening on 127.0.0.1 on a free port, trust auth
# for user `postgres`. Prints two lines on stdout:
#   URL   postgres://postgres@127.0.0.1:PORT/postgres
#   STOP  the command that stops the server and removes the cluster
# Progress and errors go to stderr. Needs Debian's `postgresql` package
# (scripts/test.sh installs it). Runs the server as user `postgres` when
# started as root (PostgreSQL refuses to run as root).
set -euo pipefail

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  echo "pg-test-server: initdb not found under /usr/lib/postgresql/*/bin; install Debian's postgresql package" >&2
  exit 1
fi

as_pg=()
if [ "$(id -u)" -eq 0 ]; then
  as_pg=(runuser -u postgres --)
fi

dir=$(mktemp -d /tmp/widgetry-pg.XXXXXX)
chmod 755 "$dir"
[ ${#as_pg[@]} -eq 0 ] || chown postgres: "$dir"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

"${as_pg[@]}" "$bindir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 || {
  echo "pg-test-server: initdb failed:" >&2; cat "$dir/initdb.log" >&2; exit 1; }
"${as_pg[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null || {
  echo "pg-test-server: server did not start:" >&2; cat "$dir/server.log" >&2; exit 1; }

echo "URL postgres://postgres@127.0.0.1:$port/postgres"
echo "STOP ${as_pg[*]} $bindir/pg_ctl -D $dir/data -m fast stop >/dev/null; rm -rf $dir"
