#!/usr/bin/env bash
# Side-by-side run of the same load against Widgetry's embedded broker and
# against Mosquitto (from Debian's packages) with `widgetry ingest` + `widgetry web`
# subscribed to it. Loopback only, free ports, bounded by --duration.
#
#   bash scripts/bench-brokers.sh [DEVICES] [DURATION] [SAMPLES_PER_BATCH] [RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-2000}; duration=${2:-30s}; spb=${3:-10}; rate=${4:-1/s}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "==> installing mosquitto (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
fi
mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
cargo build --release --bin widgetry --locked 2>&1 | tail -1
w=target/release/widgetry
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
wait_http() { for _ in $(seq 200); do curl -fs "$1/metrics" 2>/dev/null | grep -q 'widgetry_ingest_subscribed 1' && return 0; sleep 0.1; done; return 1; }
load() { "$w" loadgen --broker "127.0.0.1:$1" --http "http://127.0.0.1:$2" --devices "$devices" --rate "$rate" \
  --samples-per-batch "$spb" --duration "$duration" --warmup 10s --server-pid "$3" --prefix "$4" 2>/dev/null; }

echo "==> embedded broker: widgetry serve"
m=$(free_port); h=$(free_port)
"$w" serve --mqtt-listen 127.0.0.1:$m --http-listen 127.0.0.1:$h --database "$work/a.db" 2>/dev/null &
spid=$!; pids+=($spid)
wait_http "http://127.0.0.1:$h"
load "$m" "$h" "$spid" emb- > "$work/embedded.txt" || true
kill $spid; wait $spid 2>/dev/null || true

echo "==> Mosquitto $("$mosq" -h 2>/dev/null | head -1 | awk '{print $3}') + widgetry ingest + widgetry web"
m=$(free_port); h=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_connections -1\n' "$m" > "$work/mosquitto.conf"
"$mosq" -c "$work/mosquitto.conf" 2>/dev/null & mpid=$!; pids+=($mpid)
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$m) 2>/dev/null && break; sleep 0.1; done
"$w" ingest --broker 127.0.0.1:$m --database "$work/b.db" 2>/dev/null & ipid=$!; pids+=($ipid)
"$w" web --http-listen 127.0.0.1:$h --database "$work/b.db" --broker 127.0.0.1:$m 2>"$work/web.log" & wpid=$!; pids+=($wpid)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$h/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
kill -0 "$wpid" 2>/dev/null || { echo "widgetry web did not start:"; cat "$work/web.log"; exit 1; }
sleep 1
load "$m" "$h" "$ipid" mos- > "$work/mosquitto.txt" || true
mrss=$(awk '/^VmRSS/ {print $2}' /proc/$mpid/status)

echo
echo "devices $devices, rate $rate, $spb samples/batch, $duration (latency after a 10 s warm-up)"
paste -d'|' <(sed 's/^/embedded: /' "$work/embedded.txt") <(sed 's/^/mosquitto+ingest: /' "$work/mosquitto.txt") | column -t -s'|'
echo "mosquitto broker RSS: ${mrss} KiB (the server figure on the right is the ingest process)"
