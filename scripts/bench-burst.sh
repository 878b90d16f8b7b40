#!/usr/bin/env bash
# Broker sizing: `widgetry serve` with the shipped broker.toml, or with its
# log segments changed. DEVICES devices publish 1 batch/s for STEADY; 20 s
# in, a second fleet of DEVICES devices publishes 9 batches/s each for
# BURST, so the offered load is 10x for that long. Reports what each loadgen
# measured (lost and duplicated must be 0: whatever the broker drops is
# resent by the devices) and the server's peak RSS (VmHWM: embedded broker
# + ingestor + web in one process). Loopback only, free ports, every phase
# bounded by its duration (plus up to 300 s for the backlog to drain).
#
#   bash scripts/bench-burst.sh [SEGMENT_BYTES SEGMENT_COUNT] [DEVICES] [STEADY] [BURST]
#   e.g. bash scripts/bench-burst.sh                      # shipped broker.toml
#        bash scripts/bench-burst.sh 1048576 3 2000 60s 5s
set -euo pipefail
cd "$(dirname "$0")/.."
seg=${1:-}; count=${2:-}; devices=${3:-2000}; steady=${4:-60s}; burst=${5:-5s}

cargo build --release --bin widgetry --locked 2>&1 | tail -1
w=target/release/widgetry
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
spid=""
cleanup() { [ -z "$spid" ] || kill "$spid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true

cp broker.toml "$work/broker.toml"
if [ -n "$seg" ]; then
  sed -i "s/^max_segment_size = .*/max_segment_size = $seg/; s/^max_segment_count = .*/max_segment_count = $count/" "$work/broker.toml"
fi
label="max_segment_size $(awk '/^max_segment_size/ {print $3}' "$work/broker.toml"), max_segment_count $(awk '/^max_segment_count/ {print $3}' "$work/broker.toml")"

m=$(free_port); h=$(free_port)
"$w" serve --broker-config "$work/broker.toml" --mqtt-listen 127.0.0.1:$m --http-listen 127.0.0.1:$h \
  --database "$work/w.db" 2>/dev/null &
spid=$!
for _ in $(seq 200); do curl -fs "http://127.0.0.1:$h/metrics" 2>/dev/null | grep -q 'widgetry_ingest_subscribed 1' && break; sleep 0.1; done
hwm() { awk '/^VmHWM/ {print $2}' /proc/$spid/status; }
rss() { awk '/^VmRSS/ {print $2}' /proc/$spid/status; }
load() { # name rate duration extra-args...
  local name=$1 rate=$2 dur=$3; shift 3
  "$w" loadgen --broker 127.0.0.1:$m --http "http://127.0.0.1:$h" --devices "$devices" --rate "$rate" \
    --duration "$dur" --server-pid "$spid" --grace 300 --prefix "$name-" "$@" 2>"$work/$name.progress" >"$work/$name.txt" || true
}
report() {
  echo "==> $1"
  grep -E '^(batches|lost|duplicated|missing|samples committed|publish->commit|server RSS)' "$work/$1.txt" | sed 's/^/    /'
}
echo "broker.toml: $label; $devices devices at 1/s for $steady, plus $devices at 9/s for $burst from 20 s"
load steady 1/s "$steady" --warmup 10s &
steady_pid=$!
# Scheduling the burst 20 s into the steady run (a load phase, not a wait
# for a condition).
sleep 20
peak_before=$(hwm)
load burst 9/s "$burst" --ack-timeout 30
wait $steady_pid
report steady
report burst
echo "server peak RSS (VmHWM): $peak_before KiB before the burst, $(hwm) KiB after; now $(rss) KiB; $label"
