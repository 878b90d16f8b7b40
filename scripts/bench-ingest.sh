#!/usr/bin/env bash
# Ingest throughput and latency (issue 14): `widgetry serve` on free
# loopback ports and a fresh database, then `widgetry loadgen` on the same
# machine: DEVICES devices × RATE batches/s × SAMPLES samples per batch for
# DURATION (after WARMUP, left out of the latency figures). Prints
# loadgen's report (committed samples/s read back, lost, duplicated,
# publish→commit p50/p99, server RSS and CPU). With PROFILE=1 a CPU
# profile of the server (`perf record -g`, 15 s from a third into the run)
# is printed too, top entries by self time. With DATABASE=postgres://…
# the server stores on that PostgreSQL database instead of SQLite. With
# WIDGETRY=/path/to/widgetry that binary runs instead of a fresh build.
#
#   bash scripts/bench-ingest.sh [DEVICES] [RATE] [SAMPLES] [DURATION] [WARMUP]
#   # default: 400 10/s 250 30s 5s (1M samples/s offered)
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-400}; rate=${2:-10/s}; samples=${3:-250}; duration=${4:-30s}; warmup=${5:-5s}
case "$devices$samples" in *[!0-9]*) echo "DEVICES and SAMPLES must be whole numbers" >&2; exit 64 ;; esac

if [ -n "${WIDGETRY:-}" ]; then
  w=$WIDGETRY  # a given build (A/B runs), not rebuilt
else
  echo "==> building the release binary"
  cargo build --release --bin widgetry --locked 2>&1 | tail -1
  w=${CARGO_TARGET_DIR:-target}/release/widgetry
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
spid=""
cleanup() { [ -z "$spid" ] || kill "$spid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true

m=$(free_port); h=$(free_port)
"$w" serve --auth off --mqtt-listen 127.0.0.1:$m --mqtt5-listen 127.0.0.1:$(free_port) \
  --http-listen 127.0.0.1:$h --database "${DATABASE:-$work/w.db}" > "$work/serve.log" 2>&1 &
spid=$!
for _ in $(seq 1 300); do
  curl -fsS "http://127.0.0.1:$h/metrics" 2>/dev/null | grep -q '^widgetry_ingest_subscribed 1' && break
  kill -0 "$spid" 2>/dev/null || { cat "$work/serve.log"; exit 1; }
  sleep 0.1
done
echo "==> serve (pid $spid) ready; loadgen: $devices devices × $rate × $samples samples for $duration"
if [ "${PROFILE:-0}" = 1 ]; then
  secs=${duration%s}
  ( sleep $(( ${secs:-30} / 3 )); perf record -e cpu-clock -F 499 -g -p "$spid" -o "$work/perf.data" -- sleep 15 >/dev/null 2>&1 ) &
  ppid_=$!
fi
"$w" loadgen --broker 127.0.0.1:$m --http "http://127.0.0.1:$h" --devices "$devices" --rate "$rate" \
  --samples-per-batch "$samples" --duration "$duration" --warmup "$warmup" --server-pid "$spid"
if [ "${PROFILE:-0}" = 1 ]; then
  wait "$ppid_" || true
  echo "==> server profile (self time, top 30)"
  perf report -i "$work/perf.data" --no-children --sort comm,symbol --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' | head -30
fi
grep -E 'compacted|WARN|ERROR' "$work/serve.log" | tail -5 || true
