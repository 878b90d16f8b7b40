#!/usr/bin/env bash
# Broker sizing: `widgetry serve` with the shipped broker.toml, or with its
# log segments changed. DEVICES devices publish 1 batch/s (10 samples) for
# STEADY; 20 s in, every device publishes 10 batches/s for BURST. Reports
# what loadgen measured (lost and duplicated must be 0: whatever the broker
# drops is resent by the devices) and the server's peak RSS (VmHWM:
# embedded broker + ingestor + web in one process) before and after the
# burst. Loopback only, free ports, bounded by STEADY plus up to 300 s for
# the backlog to drain.
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
label="max_segment_size $(awk '/^max_segment_size/ {print $3; exit}' "$work/broker.toml"), max_segment_count $(awk '/^max_segment_count/ {print $3; exit}' "$work/broker.toml")"

m=$(free_port); h=$(free_port)
"$w" serve --broker-config "$work/broker.toml" --mqtt-listen 127.0.0.1:$m --mqtt5-listen 127.0.0.1:$(free_port) --http-listen 127.0.0.1:$h \
  --database "$work/w.db" 2>/dev/null &
spid=$!
for _ in $(seq 200); do curl -fs "http://127.0.0.1:$h/metrics" 2>/dev/null | grep -q 'widgetry_ingest_subscribed 1' && break; sleep 0.1; done
hwm() { awk '/^VmHWM/ {print $2}' /proc/$spid/status; }
rss() { awk '/^VmRSS/ {print $2}' /proc/$spid/status; }
echo "broker.toml: $label; $devices devices at 1/s for $steady, 10x for $burst from 20 s"
"$w" loadgen --broker 127.0.0.1:$m --http "http://127.0.0.1:$h" --devices "$devices" --rate 1/s \
  --duration "$steady" --warmup 10s --burst-at 20s --burst-for "$burst" --burst-factor 10 \
  --grace 300 --server-pid "$spid" 2>"$work/progress" >"$work/report" &
lpid=$!
# Reading the peak just before the burst (a measurement point, not a wait
# for a condition).
sleep 19
peak_before=$(hwm)
wait $lpid || true
grep -E '^(batches|lost|duplicated|missing|samples committed|publish->commit|server RSS)' "$work/report" | sed 's/^/    /'
echo "server peak RSS (VmHWM): $peak_before KiB before the burst, $(hwm) KiB after; now $(rss) KiB; $label"
