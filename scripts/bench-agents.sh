#!/usr/bin/env bash
# The agent against collectd, side by side in one window on this machine:
# widgetry-agent (agent profile, default settings) publishing to a local
# `widgetry serve`, and collectd 5 (Debian's collectd-core, installed here
# if missing) with its cpu, memory and interface plugins sending its binary
# protocol over UDP to a counting listener. Both sample every second.
#
#   bash scripts/bench-agents.sh [WINDOW_SECONDS]   # default 120
#
# CPU is the sum over all threads of /proc/PID/task/*/schedstat (ns on CPU)
# across the window; RSS and threads at its end; bytes on the wire are the
# agent's TCP bytes_sent (ss -ti: MQTT payloads, headers, keep-alives and
# acks of the server's messages) and collectd's UDP payload bytes, each over
# the values delivered in the window (for the agent: samples the server
# stored; for collectd: values in the packets received). Only loopback is
# used; ports are picked free. Extra agent flags in AGENT_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
window=${1:-120}
case "$window" in '' | *[!0-9]*) echo "WINDOW_SECONDS must be a whole number, not '$window'" >&2; exit 64 ;; esac

if ! command -v collectd >/dev/null && [ ! -x /usr/sbin/collectd ]; then
  echo "==> installing collectd-core (apt-get)"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq collectd-core >/dev/null
fi
collectd=$(command -v collectd || echo /usr/sbin/collectd)

echo "==> building release binaries"
cargo build --release --bin widgetry --locked 2>&1 | tail -1
tdir=${CARGO_TARGET_DIR:-target}
# The TLS build (opt-in, --features tls) only for its size, in its own
# target dir so the measured plain build is not overwritten.
cargo build --profile agent --bin widgetry-agent --locked --features tls --target-dir "$tdir/agent-tls" 2>&1 | tail -1
tls_size=$(stat -c %s "$tdir/agent-tls/agent/widgetry-agent")
cargo build --profile agent --bin widgetry-agent --locked 2>&1 | tail -1
server=$tdir/release/widgetry
agent=$tdir/agent/widgetry-agent

free_port() { python3 -c 'import socket,sys; s=socket.socket(socket.AF_INET, getattr(socket, sys.argv[1])); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "$1"; }
mqtt=$(free_port SOCK_STREAM); http=$(free_port SOCK_STREAM); udp=$(free_port SOCK_DGRAM)
work=$(mktemp -d)
cleanup() { kill ${spid:-} ${apid:-} ${cpid:-} ${lpid:-} 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# collectd's network packets: count payload bytes and values (part type
# 0x0006 carries N values), writing the running totals once a second.
cat >"$work/listen.py" <<'PY'
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.settimeout(0.2)
nbytes = values = packets = 0
last = 0.0
while True:
    try:
        data = s.recv(65536)
        packets += 1
        nbytes += len(data)
        off = 0
        while off + 4 <= len(data):
            ptype, plen = struct.unpack_from("!HH", data, off)
            if plen < 4:
                break
            if ptype == 0x0006 and off + 6 <= len(data):
                values += struct.unpack_from("!H", data, off + 4)[0]
            off += plen
    except socket.timeout:
        pass
    now = time.time()
    if now - last >= 0.5:
        with open(sys.argv[2] + ".tmp", "w") as f:
            f.write(f"{nbytes} {values} {packets}\n")
        import os; os.replace(sys.argv[2] + ".tmp", sys.argv[2])
        last = now
PY
python3 "$work/listen.py" "$udp" "$work/udp.count" &
lpid=$!

cat >"$work/collectd.conf" <<EOF
Interval 1
BaseDir "$work"
PIDFile "$work/collectd.pid"
TypesDB "/usr/share/collectd/types.db"
LoadPlugin logfile
<Plugin logfile>
  File "$work/collectd.log"
</Plugin>
LoadPlugin cpu
LoadPlugin memory
LoadPlugin interface
LoadPlugin network
<Plugin network>
  Server "127.0.0.1" "$udp"
</Plugin>
EOF

"$server" serve --mqtt-listen 127.0.0.1:$mqtt --mqtt5-listen 127.0.0.1:$(free_port SOCK_STREAM) \
  --http-listen 127.0.0.1:$http --database "$work/w.db" 2>"$work/serve.log" &
spid=$!
for _ in $(seq 200); do curl -fs "http://127.0.0.1:$http/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
"$agent" --broker 127.0.0.1:$mqtt --device bench ${AGENT_ARGS:-} --spool-dir "$work/spool" 2>"$work/agent.log" &
apid=$!
"$collectd" -f -C "$work/collectd.conf" &
cpid=$!

cpu_ns() { cat /proc/$1/task/*/schedstat 2>/dev/null | awk '{s+=$1} END {print s+0}'; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
threads() { ls /proc/$1/task | wc -l; }
stored() { curl -fs "http://127.0.0.1:$http/metrics" | awk '/^widgetry_ingest_samples_stored_total/ {print $2}'; }
# The agent's connection: a record's first line names the process, the
# next (indented) one holds bytes_sent.
sent() {
  ss -tinpH state established "( dport = :$mqtt )" 2>/dev/null | awk -v pid="pid=$1," '
    /^[^ \t]/ { hit = index($0, pid) > 0; next }
    hit { for (i = 1; i <= NF; i++) if ($i ~ /^bytes_sent:/) { split($i, a, ":"); b = a[2] } }
    END { print b + 0 }'
}
udp_count() { cat "$work/udp.count" 2>/dev/null || echo "0 0 0"; }

echo "==> warming up 10 s (both agents connected, baselines taken)"
sleep 10
for p in $apid $cpid $spid; do kill -0 $p 2>/dev/null || { echo "a process died; logs:" >&2; tail -5 "$work"/*.log >&2; exit 1; }; done
t0=$(date +%s.%N); a0=$(cpu_ns $apid); k0=$(cpu_ns $cpid); s0=$(stored); b0=$(sent $apid); read -r u0 v0 _ < <(udp_count)
echo "==> measuring ${window} s"
for i in $(seq "$window"); do
  sleep 1
  if (( i % 30 == 0 )); then echo "  ${i}s: agent RSS $(rss_kb $apid) KiB, collectd RSS $(rss_kb $cpid) KiB"; fi
done
t1=$(date +%s.%N); a1=$(cpu_ns $apid); k1=$(cpu_ns $cpid); s1=$(stored); b1=$(sent $apid); read -r u1 v1 _ < <(udp_count)

python3 - "$t0" "$t1" "$a0" "$a1" "$k0" "$k1" "$s0" "$s1" "$b0" "$b1" "$u0" "$u1" "$v0" "$v1" \
  "$(rss_kb $apid)" "$(rss_kb $cpid)" "$(threads $apid)" "$(threads $cpid)" "$(stat -c %s $agent)" "$tls_size" <<'PY'
import sys
(t0, t1, a0, a1, k0, k1, s0, s1, b0, b1, u0, u1, v0, v1,
 arss, crss, athr, cthr, size, tls_size) = map(float, sys.argv[1:])
secs = t1 - t0
acpu = (a1 - a0) / 1e9 / secs * 100
ccpu = (k1 - k0) / 1e9 / secs * 100
avals = s1 - s0
cvals = v1 - v0
abpv = (b1 - b0) / avals if avals else float("nan")
cbpv = (u1 - u0) / cvals if cvals else float("nan")
aper = acpu / (avals / secs) if avals else float("nan")
cper = ccpu / (cvals / secs) if cvals else float("nan")
print()
print(f"window {secs:.1f} s                     widgetry-agent      collectd")
print(f"CPU (% of one core)               {acpu:10.3f}      {ccpu:10.3f}")
print(f"values/s                          {avals/secs:10.1f}      {cvals/secs:10.1f}")
print(f"CPU per value/s (% core)          {aper:10.5f}      {cper:10.5f}")
print(f"RSS (KiB)                         {arss:10.0f}      {crss:10.0f}")
print(f"threads                           {athr:10.0f}      {cthr:10.0f}")
print(f"bytes on the wire per value       {abpv:10.2f}      {cbpv:10.2f}")
print(f"agent binary (stripped)           {size:10.0f} bytes (with --features tls: {tls_size:.0f})")
print()
print(f"ratios agent/collectd: CPU {acpu/ccpu:.2f} (target <= 0.5), CPU per value {aper/cper:.2f} (target <= 0.25), "
      f"RSS {arss/crss:.2f}, bytes per value {abpv/cbpv:.2f}; agent bytes per value {abpv:.2f} (target <= 8), "
      f"binary {size:.0f} bytes = {size/1e6:.3f} MB (target <= 1)")
PY
