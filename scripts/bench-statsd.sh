#!/usr/bin/env bash
# statsd listener throughput beside a fleet: `widgetry serve --statsd`
# with a [graphite] export to a counting stand-in Carbon
# (scripts/carbon-sink.py), while `widgetry loadgen` runs DEVICES devices
# at 1 batch/s and scripts/statsd-flood.py sends LINES_PER_S statsd lines
# (50 per packet, 1000 distinct names) for DURATION seconds. Prints the
# lines sent and received (the rest were dropped by the kernel's socket
# buffer), Graphite lines/s out (confirmed by the sink), the server's CPU
# and RSS, and loadgen's report (lost, duplicated, publish->commit
# latency). Loopback only, free ports, bounded by DURATION + 60 s.
#
#   bash scripts/bench-statsd.sh [DURATION_S] [DEVICES] [LINES_PER_S]   # e.g. 30 2000 100000
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-30}; devices=${2:-2000}; rate=${3:-100000}

cargo build --release --locked --bin widgetry 2>&1 | tail -1
w=${CARGO_TARGET_DIR:-target}/release/widgetry
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
spid=""; cpid=""
cleanup() {
  [ -z "$spid" ] || kill "$spid" 2>/dev/null || true
  [ -z "$cpid" ] || kill "$cpid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

python3 scripts/carbon-sink.py >"$work/carbon.out" &
cpid=$!
for _ in $(seq 100); do [ -s "$work/carbon.out" ] && break; sleep 0.05; done
carbon=$(head -1 "$work/carbon.out")
cat >"$work/widgetry.toml" <<TOML
database = "$work/w.db"

[graphite]
address = "127.0.0.1:$carbon"
flush_interval = "1s"
TOML
m=$(free_port); h=$(free_port); u=$(free_port)
"$w" serve --config "$work/widgetry.toml" --mqtt-listen 127.0.0.1:$m --mqtt5-listen 127.0.0.1:0 \
  --http-listen 127.0.0.1:$h --statsd 127.0.0.1:$u --statsd-flush 1s 2>"$work/serve.err" &
spid=$!
for _ in $(seq 200); do curl -fs "http://127.0.0.1:$h/metrics" 2>/dev/null | grep -q 'widgetry_ingest_subscribed 1' && break; sleep 0.1; done

metric() { curl -fs "http://127.0.0.1:$h/metrics" | awk -v n="$1" '$1 == n {print $2}'; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
clk=$(getconf CLK_TCK)
"$w" loadgen --broker 127.0.0.1:$m --http http://127.0.0.1:$h --devices "$devices" --rate 1/s \
  --duration "$((duration + 10))s" --warmup 10s --server-pid "$spid" >"$work/loadgen.out" 2>/dev/null &
lpid=$!
# The fleet's connections settle during loadgen's warm-up; then the
# statsd flood and the measurement window start together.
sleep 10
l0=$(metric widgetry_statsd_lines_total); g0=$(metric widgetry_graphite_lines_sent_total); s0=$(ticks $spid); t0=$(date +%s.%N)
sent=$(python3 scripts/statsd-flood.py 127.0.0.1:$u "$rate" "$duration")
sleep 2  # the last statsd flush and Graphite flush after the flood
l1=$(metric widgetry_statsd_lines_total); g1=$(metric widgetry_graphite_lines_sent_total); s1=$(ticks $spid); t1=$(date +%s.%N)
rss=$(awk '/^VmRSS/ {print $2}' /proc/$spid/status); hwm=$(awk '/^VmHWM/ {print $2}' /proc/$spid/status)
wait "$lpid" || true
awk -v l0="$l0" -v l1="$l1" -v g0="$g0" -v g1="$g1" -v sent="$sent" -v t0="$t0" -v t1="$t1" -v s0="$s0" -v s1="$s1" \
  -v clk="$clk" -v rss="$rss" -v hwm="$hwm" -v d="$duration" -v dev="$devices" 'BEGIN {
  secs = t1 - t0
  printf "statsd: %d lines sent in %d s (%.0f/s); %d received (%.0f/s, %.1f %% of those sent)\n", sent, d, sent / d, l1 - l0, (l1 - l0) / d, 100 * (l1 - l0) / sent
  printf "graphite: %.0f lines/s confirmed by the sink over %.1f s\n", (g1 - g0) / secs, secs
  printf "server (with %d devices at 1 batch/s): %.1f %% of a core, RSS %d KiB (peak %d KiB)\n", dev, 100 * (s1 - s0) / clk / secs, rss, hwm
}'
echo "loadgen:"; cat "$work/loadgen.out"
