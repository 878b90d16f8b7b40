#!/usr/bin/env bash
# The agent's memory over a long run under load: widgetry-agent (agent
# profile, defaults) publishing to a local `widgetry serve`, watching 10
# processes (copies of sleep under their own names) and receiving statsd
# traffic of METRICS distinct names a second (counters, gauges, timers and
# sets in 1,400-byte packets), for SECONDS. Prints RSS (VmRSS), its peak
# (VmHWM) and the anonymous part (heap and stacks, from smaps_rollup)
# every 5 minutes and at the end. Only loopback; ports are picked free; the
# traffic loop is bounded by SECONDS.
#
#   bash scripts/bench-agent-rss.sh [SECONDS] [METRICS]   # default 3600 1000
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3600}
metrics=${2:-1000}
for v in "$secs" "$metrics"; do
  case "$v" in '' | *[!0-9]*) echo "SECONDS and METRICS must be whole numbers, not '$v'" >&2; exit 64 ;; esac
done

echo "==> building release binaries"
cargo build --release --bin widgetry --locked 2>&1 | tail -1
cargo build --profile agent --bin widgetry-agent --locked 2>&1 | tail -1
tdir=${CARGO_TARGET_DIR:-target}
server=$tdir/release/widgetry
agent=$tdir/agent/widgetry-agent

free_port() { python3 -c 'import socket,sys; s=socket.socket(socket.AF_INET, getattr(socket, sys.argv[1])); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "$1"; }
mqtt=$(free_port SOCK_STREAM); http=$(free_port SOCK_STREAM); udp=$(free_port SOCK_DGRAM)
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

watch=()
sleep_bin=$(command -v sleep)
for i in $(seq 0 9); do
  cp "$sleep_bin" "$work/wdg-watch-$i"
  "$work/wdg-watch-$i" $((secs + 120)) &
  pids+=($!)
  watch+=(--watch "wdg-watch-$i")
done

"$server" serve --mqtt-listen 127.0.0.1:$mqtt --mqtt5-listen 127.0.0.1:$(free_port SOCK_STREAM) \
  --http-listen 127.0.0.1:$http --database "$work/w.db" 2>"$work/serve.log" &
pids+=($!)
for _ in $(seq 200); do curl -fs "http://127.0.0.1:$http/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
"$agent" --broker 127.0.0.1:$mqtt --device rss-bench --statsd 127.0.0.1:$udp "${watch[@]}" \
  --spool-dir "$work/spool" 2>"$work/agent.log" &
apid=$!
pids+=($apid)
sleep 1

python3 - "$udp" "$metrics" "$secs" <<'PY' &
import socket, sys, time
port, metrics, secs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
kinds = ["c", "g", "ms", "s"]
end = time.time() + secs
n = 0
while time.time() < end:
    start = time.time()
    packet = []
    size = 0
    for i in range(metrics):
        line = f"bench.m{i}:{(n + i) % 997}|{kinds[i % 4]}"
        if size + len(line) + 1 > 1400:
            s.sendto("\n".join(packet).encode(), ("127.0.0.1", port))
            packet, size = [], 0
        packet.append(line)
        size += len(line) + 1
    if packet:
        s.sendto("\n".join(packet).encode(), ("127.0.0.1", port))
    n += 1
    time.sleep(max(0.0, 1.0 - (time.time() - start)))
PY
pids+=($!)

mem() {
  local rss hwm anon
  rss=$(awk '/^VmRSS/ {print $2}' /proc/$apid/status)
  hwm=$(awk '/^VmHWM/ {print $2}' /proc/$apid/status)
  anon=$(awk '/^Anonymous/ {print $2}' /proc/$apid/smaps_rollup)
  echo "RSS $rss KiB, peak $hwm KiB, anonymous $anon KiB"
}
echo "==> ${secs} s with ${metrics} statsd metrics/s and 10 watched processes"
t=0
while (( t < secs )); do
  step=$(( secs - t < 300 ? secs - t : 300 ))
  sleep "$step"
  t=$((t + step))
  kill -0 $apid 2>/dev/null || { echo "the agent died:" >&2; tail -5 "$work/agent.log" >&2; exit 1; }
  echo "  ${t}s: $(mem)"
done
stored=$(curl -fs "http://127.0.0.1:$http/metrics" | awk '/^widgetry_ingest_samples_stored_total/ {print $2}')
series=$(curl -fs "http://127.0.0.1:$http/api/v1/devices" | python3 -c 'import json,sys; d=[x for x in json.load(sys.stdin) if x["device"]=="rss-bench"]; print(len(d[0]["series"]) if d else 0)')
echo
echo "agent after ${secs} s: $(mem); ${series} series, ${stored} samples stored (target: RSS <= 3 MB)"
