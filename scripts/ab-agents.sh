#!/usr/bin/env bash
# A/B of two agent binaries in one window: both publish to one release
# `widgetry serve` at the defaults; prints each one's CPU (all threads'
# schedstat) over SECONDS after a 10 s warm-up, the ratio, and their RSS.
# Loopback only, free ports, bounded by SECONDS.
#
#   bash scripts/ab-agents.sh AGENT_A AGENT_B [SECONDS]   # default 90
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: bash scripts/ab-agents.sh AGENT_A AGENT_B [SECONDS]" >&2; exit 64; }
A=$(realpath "$1"); B=$(realpath "$2"); secs=${3:-90}
case "$secs" in '' | *[!0-9]*) echo "SECONDS must be a whole number, not '$secs'" >&2; exit 64 ;; esac
cargo build --release --bin widgetry --locked 2>&1 | tail -1
server=$(realpath "${CARGO_TARGET_DIR:-target}/release/widgetry")
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mqtt=$(free_port); http=$(free_port); work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
"$server" serve --auth off --mqtt-listen 127.0.0.1:$mqtt --mqtt5-listen 127.0.0.1:0 --http-listen 127.0.0.1:$http --database "$work/db.sqlite" 2>serve.log &
pids+=($!)
for _ in $(seq 300); do curl -fs "http://127.0.0.1:$http/metrics" 2>/dev/null | grep -q 'widgetry_ingest_subscribed 1' && break; sleep 0.1; done
(mkdir a && cd a && exec "$A" --broker 127.0.0.1:$mqtt --device ab-a 2>../a.log) & apid=$!; pids+=($apid)
(mkdir b && cd b && exec "$B" --broker 127.0.0.1:$mqtt --device ab-b 2>../b.log) & bpid=$!; pids+=($bpid)
sleep 10 # warm-up, not synchronisation: baselines after both connected
cpu() { cat /proc/$1/task/*/schedstat | awk '{s+=$1} END {print s}'; }
a0=$(cpu $apid); b0=$(cpu $bpid); t0=$(date +%s.%N)
sleep "$secs" # the measuring window
a1=$(cpu $apid); b1=$(cpu $bpid); t1=$(date +%s.%N)
python3 -c "import sys; a0,a1,b0,b1,t0,t1=map(float,sys.argv[1:]); d=t1-t0; print(f'A {(a1-a0)/1e9/d*100:.3f} % of one core, B {(b1-b0)/1e9/d*100:.3f} %, ratio B/A {(b1-b0)/(a1-a0):.2f}')" $a0 $a1 $b0 $b1 $t0 $t1
echo "RSS A $(awk '/^VmRSS/ {print $2}' /proc/$apid/status) KiB, B $(awk '/^VmRSS/ {print $2}' /proc/$bpid/status) KiB"
