#!/usr/bin/env bash
# Widgetry's embedded broker beside Mosquitto (Debian's package), one run,
# three loads, loopback only, free ports, every load bounded in size and time:
#   (a) DEVICES simulated devices at RATE through the whole pipeline: `serve`
#       vs Mosquitto + `widgetry ingest` + `widgetry web` (CPU and RSS of both);
#   (b) fan-in: 100 publishers -> 1 subscriber, QoS 1, 100-byte payloads,
#       counted one by one (nothing may be lost): messages/s and peak RSS;
#   (c) 10,000 idle connections: RSS before, while held, and after they leave.
#
#   bash scripts/bench-brokers.sh [DEVICES] [DURATION] [SAMPLES_PER_BATCH] [RATE]
#   BEFORE=/path/to/older/widgetry bash scripts/bench-brokers.sh   # also (c) and (a) for an older build
#   ONLY="b c" bash scripts/bench-brokers.sh                        # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-2000}; duration=${2:-30s}; spb=${3:-10}; rate=${4:-1/s}
only=${ONLY:-"a b c"}
fanin_messages=${FANIN_MESSAGES:-2000}   # per publisher
idle_connections=${IDLE_CONNECTIONS:-10000}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "==> installing mosquitto (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
fi
mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
echo "==> building (release)"
cargo build --release --bin widgetry --bin widgetry-mqtt-bench --locked 2>&1 | tail -1
w=target/release/widgetry
bench=target/release/widgetry-mqtt-bench
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
# CPU seconds (user + system) of a process so far.
sub() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a - b}'; }
cpu() { awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / t}' "/proc/$1/stat"; }
wait_http() { for _ in $(seq 300); do curl -fs "$1/metrics" 2>/dev/null | grep -q 'widgetry_ingest_subscribed 1' && return 0; sleep 0.1; done; return 1; }
wait_tcp() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
load() { "$w" loadgen --broker "127.0.0.1:$1" --http "http://127.0.0.1:$2" --devices "$devices" --rate "$rate" \
  --samples-per-batch "$spb" --duration "$duration" --warmup 10s --server-pid "$3" --prefix "$4" 2>/dev/null; }

# Starts `serve` of binary $1 in the background (broker.toml $2 if given);
# sets spid, m (MQTT port), h (HTTP port).
start_serve() {
  m=$(free_port); h=$(free_port)
  local extra=()
  [ -n "${2:-}" ] && extra+=(--broker-config "$2")
  "$1" serve --help | grep -q -- --mqtt5-listen && extra+=(--mqtt5-listen "127.0.0.1:$(free_port)")
  "$1" serve --mqtt-listen 127.0.0.1:$m "${extra[@]}" --http-listen 127.0.0.1:$h --database "$work/s$RANDOM.db" 2>/dev/null &
  spid=$!; pids+=($spid)
  wait_http "http://127.0.0.1:$h"
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
# Starts Mosquitto that never drops queued messages; sets mpid, m.
start_mosquitto() {
  m=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 100\nmax_connections -1\n' "$m" > "$work/mosquitto.conf"
  "$mosq" -c "$work/mosquitto.conf" 2>/dev/null & mpid=$!; pids+=($mpid)
  wait_tcp "$m"
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); mosquitto $("$mosq" -h 2>/dev/null | head -1 | awk '{print $3}')"

if [[ " $only " == *" a "* ]]; then
  for bin in "$w" ${BEFORE:+"$BEFORE"}; do
    echo "==> (a) $devices devices at $rate, $spb samples/batch, $duration: embedded broker ($bin serve)"
    start_serve "$bin"
    c0=$(cpu $spid)
    load "$m" "$h" "$spid" emb- > "$work/a-embedded.txt" || true
    echo "serve CPU during the load: $(sub $(cpu $spid) $c0) s; RSS $(rss $spid) KiB, peak $(hwm $spid) KiB"
    sed 's/^/  /' "$work/a-embedded.txt"
    stop $spid
  done
  echo "==> (a) the same load: Mosquitto + widgetry ingest + widgetry web"
  start_mosquitto
  h=$(free_port)
  "$w" ingest --broker 127.0.0.1:$m --database "$work/b.db" 2>/dev/null & ipid=$!; pids+=($ipid)
  "$w" web --http-listen 127.0.0.1:$h --database "$work/b.db" --broker 127.0.0.1:$m 2>"$work/web.log" & wpid=$!; pids+=($wpid)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$h/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
  kill -0 "$wpid" 2>/dev/null && kill -0 "$ipid" 2>/dev/null || { echo "widgetry ingest/web did not start:"; cat "$work/web.log"; exit 1; }
  mc0=$(cpu $mpid); ic0=$(cpu $ipid); wc0=$(cpu $wpid)
  load "$m" "$h" "$ipid" mos- > "$work/a-mosquitto.txt" || true
  echo "mosquitto CPU during the load: $(sub $(cpu $mpid) $mc0) s, RSS $(rss $mpid) KiB, peak $(hwm $mpid) KiB"
  echo "ingest CPU $(sub $(cpu $ipid) $ic0) s, RSS $(rss $ipid) KiB; web CPU $(sub $(cpu $wpid) $wc0) s, RSS $(rss $wpid) KiB"
  sed 's/^/  /' "$work/a-mosquitto.txt"
  stop $ipid; stop $wpid; stop $mpid
fi

if [[ " $only " == *" b "* ]]; then
  # rumqttd keeps one log per subscription filter and skips a subscriber
  # that falls further behind than the log holds (with the shipped 1 MiB x 3
  # an unthrottled fan-in overruns it); size it for the whole run, as
  # broker.toml says to for the largest backlog expected.
  cp broker.toml "$work/fanin-broker.toml"
  printf '\n[router.custom_segment."bench/+/+"]\nmax_segment_size = 33554432\nmax_segment_count = 2\n' >> "$work/fanin-broker.toml"
  for broker in embedded mosquitto; do
    echo "==> (b) fan-in: 100 publishers x $fanin_messages QoS 1 messages of 100 bytes -> 1 subscriber: $broker"
    if [ $broker = embedded ]; then start_serve "$w" "$work/fanin-broker.toml"; pid=$spid; else start_mosquitto; pid=$mpid; fi
    c0=$(cpu $pid); r0=$(rss $pid)
    "$bench" --broker 127.0.0.1:$m fanin --publishers 100 --messages "$fanin_messages" --payload 100 --timeout 120 2>"$work/fanin.log" \
      || echo "  (messages were lost; see the line below)"
    echo "  $broker: RSS before $r0 KiB, after $(rss $pid) KiB, peak $(hwm $pid) KiB; broker CPU $(sub $(cpu $pid) $c0) s"
    stop $pid
  done
fi

if [[ " $only " == *" c "* ]]; then
  for broker in embedded ${BEFORE:+before} mosquitto; do
    echo "==> (c) $idle_connections idle connections: $broker"
    case $broker in
      embedded) start_serve "$w"; pid=$spid ;;
      before) start_serve "$BEFORE"; pid=$spid ;;
      mosquitto) start_mosquitto; pid=$mpid ;;
    esac
    r0=$(rss $pid)
    "$bench" --broker 127.0.0.1:$m idle --connections "$idle_connections" --hold 600 2>"$work/idle.log" >"$work/idle.out" & bpid=$!; pids+=($bpid)
    for _ in $(seq 1200); do grep -q 'holding' "$work/idle.log" && break; sleep 0.1; done
    held=$(grep -o '^[0-9]* connected; holding' "$work/idle.log" | awk '{print $1}')
    sleep 2
    r1=$(rss $pid)
    stop $bpid
    # Let the broker notice the closed sockets.
    sleep 3
    r2=$(rss $pid)
    echo "  $broker: $held connected; RSS before $r0 KiB, with them $r1 KiB ($(( (r1 - r0) * 1024 / (held > 0 ? held : 1) )) B each), after they left $r2 KiB"
    stop $pid
  done
fi
