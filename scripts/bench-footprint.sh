#!/usr/bin/env bash
# Measures the footprint of Widgetry's binaries: stripped sizes, and the
# agent's RSS and CPU after running against a local `widgetry serve` for
# DURATION seconds (default 60). Only loopback is used; ports are picked free.
#
#   bash scripts/bench-footprint.sh [DURATION_SECONDS]
# Extra agent flags can be given in AGENT_ARGS, e.g. AGENT_ARGS="--batch-max-wait 60s".
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-60}

echo "==> building release binaries"
cargo build --release --bin widgetry --locked 2>&1 | tail -1
cargo build --profile agent --bin widgetry-agent --locked 2>&1 | tail -1
server=target/release/widgetry
agent=target/agent/widgetry-agent

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mqtt=$(free_port); http=$(free_port)
work=$(mktemp -d)
cleanup() { kill "${spid:-}" "${apid:-}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$server" serve --mqtt-listen 127.0.0.1:$mqtt --mqtt5-listen 127.0.0.1:$(free_port) --http-listen 127.0.0.1:$http --database "$work/w.db" 2>"$work/serve.log" &
spid=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$http/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
"$agent" --broker 127.0.0.1:$mqtt --device bench --interval 1s ${AGENT_ARGS:-} --spool-dir "$work/spool" 2>"$work/agent.log" &
apid=$!

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
t0=$(date +%s.%N); c0=$(cpu_ticks $apid)
for i in $(seq "$duration"); do
  sleep 1
  if (( i % 10 == 0 )); then echo "  ${i}s: agent RSS $(rss_kb $apid) KiB"; fi
done
t1=$(date +%s.%N); c1=$(cpu_ticks $apid)
stored=$(curl -fs "http://127.0.0.1:$http/metrics" | awk '/^widgetry_ingest_samples_stored_total/ {print $2}')
# Bytes on the wire per sample: MQTT PUBLISH payloads as stored in the batch
# log (the agent's payload less its series definitions) plus the topic and
# fixed header of each PUBLISH.
wire=$(python3 - "$work/w.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
n, payload, samples = db.execute(
    "SELECT COUNT(*), SUM(LENGTH(payload)), SUM(samples) FROM batches WHERE device = 'bench'").fetchone()
topic = len("widgetry/v1/bench/samples")
per_publish = 2 + 2 + topic + 2  # fixed header, topic length, topic, packet id
print(f"{(payload + n * per_publish) / samples:.2f} bytes/sample ({samples} samples in {n} batches)")
PY
)

echo
echo "widgetry (release, not stripped) size:   $(stat -c %s $server) bytes"
echo "widgetry-agent (agent profile, stripped): $(stat -c %s $agent) bytes"
echo "agent RSS after ${duration}s:              $(rss_kb $apid) KiB"
echo "agent CPU over ${duration}s:               $(python3 -c "print(f'{($c1-$c0)/$ticks/($t1-$t0)*100:.3f} % of one core')")"
echo "server RSS:                               $(rss_kb $spid) KiB"
echo "samples stored:                           $stored"
echo "on the wire (payload + PUBLISH header):   $wire"
