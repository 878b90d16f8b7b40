#!/usr/bin/env bash
# Websocket source bridge throughput: `widgetry-wsfault --tail flood`
# (valid messages only, as fast as the socket takes them) feeding
# `widgetry serve` with one [[bridge.ws]] section, for DURATION after a
# WARMUP. Prints the bridge's accepted messages/s (committed to SQLite
# with synchronous = FULL), the server's CPU (utime + stime from
# /proc/PID/stat over the window) and RSS, and the upstream's CPU (it runs
# on the same cores). Loopback only, free ports; bounded by WARMUP +
# DURATION + 30 s.
#
#   bash scripts/bench-bridge.sh [DURATION_S] [WARMUP_S]   # e.g. 20 5
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-20}; warmup=${2:-5}

cargo build --release --locked --bin widgetry --bin widgetry-wsfault 2>&1 | tail -1
w=target/release/widgetry
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
spid=""; upid=""
cleanup() {
  [ -z "$spid" ] || kill "$spid" 2>/dev/null || true
  [ -z "$upid" ] || kill "$upid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

target/release/widgetry-wsfault --cycles 0 --tail flood --duration "$((warmup + duration + 30))s" >"$work/upstream.out" 2>"$work/upstream.err" &
upid=$!
for _ in $(seq 100); do [ -s "$work/upstream.out" ] && break; sleep 0.05; done
url=$(head -1 "$work/upstream.out")
cat >"$work/widgetry.toml" <<TOML
database = "$work/w.db"

[[bridge.ws]]
url = "$url"
device = "bench-1"
TOML
h=$(free_port)
"$w" serve --config "$work/widgetry.toml" --mqtt-listen 127.0.0.1:$(free_port) --mqtt5-listen 127.0.0.1:0 \
  --http-listen 127.0.0.1:$h 2>"$work/serve.err" &
spid=$!
for _ in $(seq 200); do curl -fs "http://127.0.0.1:$h/metrics" 2>/dev/null | grep -q 'widgetry_ingest_subscribed 1' && break; sleep 0.1; done

metric() { curl -fs "http://127.0.0.1:$h/metrics" | awk -v n="$1" '$1 == n {print $2}'; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
clk=$(getconf CLK_TCK)
# Measurement points (not waits for a condition): after the warm-up and
# at the end of the window.
sleep "$warmup"
a0=$(metric widgetry_bridge_accepted_total); s0=$(ticks $spid); u0=$(ticks $upid); t0=$(date +%s.%N)
sleep "$duration"
a1=$(metric widgetry_bridge_accepted_total); s1=$(ticks $spid); u1=$(ticks $upid); t1=$(date +%s.%N)
rss=$(awk '/^VmRSS/ {print $2}' /proc/$spid/status); hwm=$(awk '/^VmHWM/ {print $2}' /proc/$spid/status)
rejects=$(curl -fs "http://127.0.0.1:$h/metrics" | awk '$1 ~ /^widgetry_bridge_rejects_total/ {s += $2} END {print s + 0}')
reconnects=$(metric widgetry_bridge_reconnects_total)
awk -v a0="$a0" -v a1="$a1" -v t0="$t0" -v t1="$t1" -v s0="$s0" -v s1="$s1" -v u0="$u0" -v u1="$u1" -v clk="$clk" \
  -v rss="$rss" -v hwm="$hwm" -v rej="$rejects" -v rec="$reconnects" -v d="$duration" -v wu="$warmup" 'BEGIN {
  secs = t1 - t0
  printf "bridge: %.0f messages/s accepted (committed) over %.1f s after a %d s warm-up (%d messages)\n", (a1 - a0) / secs, secs, wu, a1 - a0
  printf "server: %.1f %% of a core, RSS %d KiB (peak %d KiB); upstream: %.1f %% of a core\n", 100 * (s1 - s0) / clk / secs, rss, hwm, 100 * (u1 - u0) / clk / secs
  printf "rejects %d, reconnects %d (both should be 0)\n", rej, rec
}'
