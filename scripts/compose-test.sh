#!/usr/bin/env bash
# Runs docker-compose.yml for real, as a user would, on a throwaway Docker
# daemon: the default profile (serve + two agents + a simulated fleet) and
# the `scale` profile (Mosquitto, PostgreSQL, two shared ingestors, web,
# an agent). Called by scripts/test.sh after `cargo build --workspace`.
#
# No image registry is needed: the debian:bookworm-slim base is made with
# debootstrap from Debian's packages (cached under target/compose-cache/),
# the widgetry image holds the binaries cargo built on the host
# (deploy/docker/prebuilt.Dockerfile, the same runtime layout as the
# Dockerfile), and the scale profile's eclipse-mosquitto:2 and postgres:16
# are stand-ins built on the same base from Debian's mosquitto and
# PostgreSQL 15 packages, with the same interface (command, POSTGRES_* env,
# pg_isready).
#
# The daemon is the test's own: --bridge=none and --iptables=false, its
# data, exec root and socket in a temp dir; every container uses host
# networking (deploy/docker/compose.hostnet.yml) on free loopback ports.
# At the end, also when a check fails, it stops the daemon and removes
# everything it made, and asserts that `ip link` lists the same interfaces
# as before. Prints the image size and the time from `docker-compose up` to
# healthy (recorded in docs/BENCHMARKS.md). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

step() { printf '\n==> compose: %s\n' "$*"; }
# shellcheck source=scripts/apt-install.sh
. scripts/apt-install.sh
fail() {
  printf '\ncompose test FAILED: %s\n' "$*" >&2
  exit 1
}
now_ms() { date +%s%3N; }

# wait_for DESCRIPTION SECONDS COMMAND...: runs COMMAND until it succeeds,
# failing the test with DESCRIPTION once SECONDS have passed.
wait_for() {
  local what=$1 limit=$2
  shift 2
  local deadline=$(($(date +%s) + limit))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "$what: not true after ${limit}s"
    sleep 0.5
  done
}

bin_dir=${WIDGETRY_BIN_DIR:-$repo/target/debug}
for b in widgetry widgetry-agent; do
  [ -x "$bin_dir/$b" ] || fail "$bin_dir/$b missing: run \`cargo build --workspace\` first"
done

need_apt=()
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
apt_install "${need_apt[@]}"
[ "$(id -u)" -eq 0 ] || fail "the test's dockerd must run as root"

links() { ip -o link show | awk -F': ' '{print $2}' | sort; }
links_before=$(links)

tmp=$(mktemp -d /tmp/widgetry-compose.XXXXXX)
export DOCKER_HOST="unix://$tmp/docker.sock"
# The classic builder: it resolves FROM against the daemon's local images.
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
dockerd_pid=""
compose_files=(-f docker-compose.yml -f deploy/docker/compose.hostnet.yml)
project=widgetry-compose-test

cleanup() {
  local rc=$?
  set +e
  if [ -n "$dockerd_pid" ]; then
    if [ "$rc" -ne 0 ]; then
      echo "--- container logs (last 30 lines each) ---" >&2
      for c in $(docker ps -aq 2>/dev/null); do
        echo "--- $(docker inspect -f '{{.Name}} {{.State.Status}} exit={{.State.ExitCode}}' "$c")" >&2
        docker logs --tail 30 "$c" 2>&1 | sed 's/^/    /' >&2
      done
    fi
    docker-compose -p "$project" "${compose_files[@]}" --profile scale down -v --remove-orphans >/dev/null 2>&1
    ids=$(docker ps -aq 2>/dev/null)
    [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1
    docker system prune -af --volumes >/dev/null 2>&1
    kill -TERM "$dockerd_pid" 2>/dev/null
    local deadline=$(($(date +%s) + 30))
    while kill -0 "$dockerd_pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
    if kill -0 "$dockerd_pid" 2>/dev/null; then
      echo "dockerd (pid $dockerd_pid) did not stop within 30s: SIGKILL" >&2
      kill -KILL "$dockerd_pid"
      rc=1
    fi
    # dockerd stops the containerd it started; nothing may still run from
    # the temp dir (containerd, shims).
    local left
    left=$(pgrep -af -- "$tmp" | grep -v "^$$ ")
    if [ -n "$left" ]; then
      echo "compose test FAILED: processes of the test's daemon still run:" >&2
      echo "$left" >&2
      rc=1
    fi
  fi
  # Mounts the daemon left (overlay layers, shm) before removing the dir.
  grep -o " $tmp[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$tmp"
  if [ -e "$tmp" ]; then
    echo "compose test: could not remove $tmp" >&2
    rc=1
  fi
  local links_after
  links_after=$(links)
  if [ "$links_after" != "$links_before" ]; then
    echo "compose test FAILED: network interfaces differ (before/after):" >&2
    diff <(echo "$links_before") <(echo "$links_after") >&2
    rc=1
  fi
  exit "$rc"
}
trap cleanup EXIT

step "starting a private dockerd (--bridge=none --iptables=false, state in $tmp)"
mkdir -p "$tmp/data" "$tmp/exec"
dockerd --bridge=none --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false \
  --userland-proxy=false --data-root "$tmp/data" --exec-root "$tmp/exec" \
  --pidfile "$tmp/dockerd.pid" -H "$DOCKER_HOST" >"$tmp/dockerd.log" 2>&1 &
dockerd_pid=$!
wait_for "dockerd answering on $DOCKER_HOST (log: $tmp/dockerd.log)" 60 docker info

# rootfs tarballs: debootstrap once, cached under target/ between runs.
cache=$repo/target/compose-cache
mkdir -p "$cache"
rootfs() { # rootfs NAME [--include=...]
  local name=$1
  shift
  if [ ! -s "$cache/$name.tar" ]; then
    step "debootstrap --variant=minbase bookworm $* (once; cached as target/compose-cache/$name.tar)"
    local dir="$tmp/rootfs-$name"
    debootstrap --variant=minbase "$@" bookworm "$dir" http://deb.debian.org/debian >"$tmp/debootstrap-$name.log" 2>&1 ||
      fail "debootstrap: see $tmp/debootstrap-$name.log: $(tail -n 3 "$tmp/debootstrap-$name.log")"
    # debootstrap leaves the downloaded .debs and package lists behind.
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*_Packages "$dir"/var/lib/apt/lists/*_InRelease
    tar -C "$dir" -c . >"$cache/$name.tar.part"
    mv "$cache/$name.tar.part" "$cache/$name.tar"
    rm -rf "$dir"
  fi
}
rootfs bookworm-minbase
rootfs bookworm-minbase-infra --include=mosquitto,postgresql-15

step "importing the base images (debian:bookworm-slim, and the scale profile's stand-ins)"
docker import - debian:bookworm-slim <"$cache/bookworm-minbase.tar" >/dev/null
docker import - widgetry-test/infra:local <"$cache/bookworm-minbase-infra.tar" >/dev/null
docker tag widgetry-test/infra:local eclipse-mosquitto:2
pgctx=$tmp/postgres-ctx
mkdir -p "$pgctx"
cat >"$pgctx/entrypoint.sh" <<'EOF'
#!/bin/bash
# Stand-in for the postgres image's entrypoint: creates POSTGRES_USER with
# POSTGRES_PASSWORD and POSTGRES_DB on first start, data in
# /var/lib/postgresql/data, listens on PGHOST:PGPORT.
set -euo pipefail
bin=/usr/lib/postgresql/15/bin
data=/var/lib/postgresql/data
mkdir -p "$data"
chown postgres:postgres "$data"
chmod 700 "$data"
if [ ! -s "$data/PG_VERSION" ]; then
  printf '%s\n' "$POSTGRES_PASSWORD" >/tmp/pw
  chown postgres /tmp/pw
  runuser -u postgres -- "$bin/initdb" -D "$data" -U "$POSTGRES_USER" --pwfile=/tmp/pw \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm /tmp/pw
  runuser -u postgres -- "$bin/pg_ctl" -D "$data" -w -o "-c listen_addresses='' -c unix_socket_directories=/tmp" start >/dev/null
  runuser -u postgres -- psql -h /tmp -U "$POSTGRES_USER" -d postgres -qc "CREATE DATABASE \"$POSTGRES_DB\""
  runuser -u postgres -- "$bin/pg_ctl" -D "$data" -w -m fast stop >/dev/null
fi
# setpriv execs (runuser would stay PID 1 and turn SIGTERM into status 143).
exec setpriv --reuid=postgres --regid=postgres --init-groups "$bin/postgres" -D "$data" -c listen_addresses="${PGHOST:-*}" \
  -c port="${PGPORT:-5432}" -c unix_socket_directories=/tmp
EOF
cat >"$pgctx/Dockerfile" <<'EOF'
FROM widgetry-test/infra:local
COPY entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["bash", "/usr/local/bin/postgres-entrypoint"]
EOF
docker build -q -t postgres:16 "$pgctx" >/dev/null

step "building widgetry:latest from the host's binaries (deploy/docker/prebuilt.Dockerfile)"
runtime_block() { sed -n '/^# ---- runtime layout/,/^# ---- end of runtime layout/p' "$1"; }
[ -n "$(runtime_block Dockerfile)" ] || fail "Dockerfile has no runtime layout block"
diff <(runtime_block Dockerfile) <(runtime_block deploy/docker/prebuilt.Dockerfile) >&2 ||
  fail "the runtime layout of Dockerfile and deploy/docker/prebuilt.Dockerfile differ (above)"
ctx=$tmp/image-ctx
mkdir -p "$ctx/bin" "$ctx/deploy/docker"
# Debug builds carry ~150 MB of debug info the image does not need.
strip -o "$ctx/bin/widgetry" "$bin_dir/widgetry"
strip -o "$ctx/bin/widgetry-agent" "$bin_dir/widgetry-agent"
cp broker.toml "$ctx/"
cp deploy/docker/healthcheck.sh "$ctx/deploy/docker/"
docker build -q -t widgetry:latest -f deploy/docker/prebuilt.Dockerfile "$ctx" >/dev/null
image_bytes=$(docker image inspect -f '{{.Size}}' widgetry:latest)
base_bytes=$(docker image inspect -f '{{.Size}}' debian:bookworm-slim)
printf 'image widgetry:latest: %s bytes (%s MB; base debian:bookworm-slim from debootstrap %s MB)\n' \
  "$image_bytes" "$((image_bytes / 1000000))" "$((base_bytes / 1000000))"
[ "$(docker run --rm widgetry:latest id -un)" = widgetry ] || fail "the image does not run as user widgetry"

# Free loopback ports, held together while chosen so they differ.
read -r WIDGETRY_T_MQTT WIDGETRY_T_MQTT5 WIDGETRY_T_HTTP WIDGETRY_T_SCALE_MQTT WIDGETRY_T_SCALE_HTTP WIDGETRY_T_PG < <(
  python3 -c '
import socket
s = [socket.socket() for _ in range(6)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])'
)
export WIDGETRY_T_MQTT WIDGETRY_T_MQTT5 WIDGETRY_T_HTTP WIDGETRY_T_SCALE_MQTT WIDGETRY_T_SCALE_HTTP WIDGETRY_T_PG
compose() { docker-compose -p "$project" "${compose_files[@]}" "$@"; }
cid() { compose "${@:2}" ps -q "$1"; }
healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$1")" = healthy ]; }

# devices_check URL PYTHON-CONDITION: true when /api/v1/devices satisfies it
# (`d` maps device id -> its entry).
devices_check() {
  curl -fsS --max-time 5 "$1/api/v1/devices" | python3 -c "
import json, sys, time
d = {x['device']: x for x in json.load(sys.stdin)}
sys.exit(0 if ($2) else 1)"
}
# points URL DEVICE FROM TO: number of cpu.usage_pct points in [FROM, TO].
points() {
  curl -fsS --max-time 5 "$1/api/v1/series?device=$2&series=cpu.usage_pct&from=$3&to=$4&max_points=100000" |
    python3 -c 'import json, sys; print(len(json.load(sys.stdin).get("points", [])))'
}
points_at_least() { [ "$(points "$1" "$2" "$3" "$4")" -ge "$5" ]; }
all_exited_0() { # all_exited_0 [compose args]: every container of the project stopped with status 0
  local bad=0
  for c in $(compose "$@" ps -q); do
    read -r name status code < <(docker inspect -f '{{.Name}} {{.State.Status}} {{.State.ExitCode}}' "$c")
    if [ "$status" != exited ] || [ "$code" != 0 ]; then
      echo "container $name: $status, exit code $code (expected exited, 0)" >&2
      bad=1
    fi
  done
  return $bad
}

# ---- default profile ----
api=http://127.0.0.1:$WIDGETRY_T_HTTP
step "docker-compose up -d (default profile: server, agent-1, agent-2, fleet; HTTP on 127.0.0.1:$WIDGETRY_T_HTTP)"
t0=$(now_ms)
compose up -d --no-build
server=$(cid server)
wait_for "server container healthy" 120 healthy "$server"
t_healthy=$(now_ms)
printf 'time from docker-compose up to a healthy server: %s ms\n' "$((t_healthy - t0))"

# loadgen's simulated devices publish no status (state "unknown"): they
# count as live when they sent data in the last 10 s.
wait_for "both agents online and the 50 simulated devices sending, in /api/v1/devices" 90 devices_check "$api" \
  "all(d.get(k, {}).get('state') == 'online' for k in ['container-1', 'container-2']) and sum(1 for k, v in d.items() if k.startswith('sim-') and v['last_seen'] > time.time() * 1000 - 10000) == 50"
curl -fsS --max-time 5 "$api/" | grep -qi '<html' || fail "GET / does not serve the dashboard"
wait_for "container-1's samples stored (GET /api/v1/series)" 30 points_at_least "$api" container-1 0 "$(now_ms)" 1
# A batch of agent-1 on the broker, received by a plain MQTT client.
timeout 20 mosquitto_sub -h 127.0.0.1 -p "$WIDGETRY_T_MQTT" -t widgetry/v1/container-1/samples -C 1 -W 15 >/dev/null ||
  fail "mosquitto_sub received no batch of container-1 on widgetry/v1/container-1/samples within 15s"
echo "checked: container-1 and container-2 online, sim-0..49 sending; dashboard served; container-1's batches on MQTT and in the API"

step "docker-compose stop server, keep it down 4 s, start it: data kept, the agents' spools deliver the gap"
before=$(points "$api" container-1 0 "$(now_ms)")
compose stop server >/dev/null
t_down=$(now_ms)
# Not synchronisation: the outage the agents must bridge with their spools.
sleep 4
t_up=$(now_ms)
compose start server >/dev/null
wait_for "server healthy after the restart" 60 healthy "$server"
wait_for "container-1's samples from the outage delivered from its spool" 60 points_at_least "$api" container-1 "$((t_down + 1000))" "$((t_up - 1000))" 2
after_old=$(points "$api" container-1 0 "$t_down")
[ "$after_old" -ge "$before" ] || fail "samples stored before the restart were lost: $before before, $after_old after"
echo "checked: $before samples of container-1 before the restart still stored; the outage's samples arrived from the spool"

step "docker-compose stop: every container exits 0 (graceful SIGTERM), then down -v"
compose stop >/dev/null
all_exited_0 || fail "a container did not shut down cleanly"
compose down -v >/dev/null

# ---- scale profile ----
sapi=http://127.0.0.1:$WIDGETRY_T_SCALE_HTTP
step "docker-compose --profile scale up -d mosquitto postgres ingest-1 ingest-2 web scale-agent (HTTP on 127.0.0.1:$WIDGETRY_T_SCALE_HTTP)"
t0=$(now_ms)
compose --profile scale up -d --no-build mosquitto postgres ingest-1 ingest-2 web scale-agent
web=$(cid web --profile scale)
wait_for "web container healthy" 120 healthy "$web"
printf 'scale profile: time from docker-compose up to a healthy web: %s ms\n' "$(($(now_ms) - t0))"
wait_for "scale-1 online in /api/v1/devices (via Mosquitto, the shared ingestors and PostgreSQL)" 90 devices_check "$sapi" \
  "d.get('scale-1', {}).get('state') == 'online'"
wait_for "scale-1's samples stored in PostgreSQL" 30 points_at_least "$sapi" scale-1 0 "$(now_ms)" 3
timeout 20 mosquitto_sub -h 127.0.0.1 -p "$WIDGETRY_T_SCALE_MQTT" -t 'widgetry/v1/scale-1/ack' -C 1 -W 15 >/dev/null ||
  fail "no ack for scale-1 from the ingestors on Mosquitto within 15s"
echo "checked: scale-1 online and its samples stored through Mosquitto, two ingestors and PostgreSQL; acks on Mosquitto"
compose --profile scale stop >/dev/null
all_exited_0 --profile scale || fail "a scale container did not shut down cleanly"
compose --profile scale down -v >/dev/null

printf '\ncompose test passed\n'
