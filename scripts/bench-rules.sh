#!/usr/bin/env bash
# What health rules cost the server: `widgetry serve` under loadgen's
# DEVICES devices × 1 batch/s (10 samples over 10 series) for DURATION,
# first with no rules, then with RULES threshold rules (each on every
# device, on one of the 10 series, so every sample meets RULES/10 rules),
# one after the other in one run. Prints loadgen's report of each (lost and
# duplicated must be 0) and the server's CPU with and without rules.
# Loopback only, free ports, each load bounded by DURATION plus loadgen's
# grace.
#
#   bash scripts/bench-rules.sh [DEVICES] [DURATION] [RULES]   # default 2000 60s 100
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-2000}; duration=${2:-60s}; rules=${3:-100}
case "$devices$rules" in *[!0-9]*) echo "DEVICES and RULES must be whole numbers" >&2; exit 64 ;; esac

echo "==> building the release binary"
cargo build --release --bin widgetry --locked 2>&1 | tail -1
w=${CARGO_TARGET_DIR:-target}/release/widgetry
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
spid=""
cleanup() { [ -z "$spid" ] || kill "$spid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true

# RULES rules: load.s0 … load.s9 in turn, thresholds no sample reaches (the
# cost measured is evaluating every sample, not storing alerts).
: > "$work/rules.toml"
for i in $(seq 0 $((rules - 1))); do
  printf '[[rules]]\nname = "r%d"\ndevices = "load-*"\nseries = "load.s%d"\nwhen = "> %d"\nfor = "1m"\n\n' \
    "$i" $((i % 10)) $((1000000000 + i)) >> "$work/rules.toml"
done
: > "$work/none.toml"

run() {
  local label=$1 config=$2
  local m h
  m=$(free_port); h=$(free_port)
  "$w" serve --config "$config" --auth off --mqtt-listen 127.0.0.1:$m --mqtt5-listen 127.0.0.1:$(free_port) \
    --http-listen 127.0.0.1:$h --database "$work/$label.db" 2>"$work/$label.log" &
  spid=$!
  for _ in $(seq 300); do curl -fs "http://127.0.0.1:$h/metrics" 2>/dev/null | grep -q 'widgetry_ingest_subscribed 1' && break; sleep 0.1; done
  echo "==> $label: $devices devices at 1/s for $duration"
  "$w" loadgen --broker 127.0.0.1:$m --http "http://127.0.0.1:$h" --devices "$devices" --rate 1/s \
    --duration "$duration" --warmup 10s --server-pid "$spid" 2>/dev/null | tee "$work/$label.out"
  if [ "$label" = rules ]; then
    curl -fs "http://127.0.0.1:$h/metrics" | grep -E '^widgetry_alerts_(lagged_batches_total|firing) ' || true
    curl -fs "http://127.0.0.1:$h/api/v1/rules" | python3 -c 'import json,sys; print("rules in force:", len(json.load(sys.stdin)["rules"]))'
  fi
  kill "$spid"; wait "$spid" 2>/dev/null || true; spid=""
}
# Two pairs, alternating, so a slow phase of the machine hits both sides.
cpu_of() { sed -n 's/.*server RSS [0-9]* KiB, CPU \([0-9.]*\) % of one core.*/\1/p' "$work/$1.out" | tail -1; }
a=(); b=()
for pass in 1 2; do
  run none "$work/none.toml"; a+=("$(cpu_of none)")
  run rules "$work/rules.toml"; b+=("$(cpu_of rules)")
done
python3 -c "import sys; n=len(sys.argv)//2; a=list(map(float,sys.argv[1:n+1])); b=list(map(float,sys.argv[n+1:])); ma=sum(a)/n; mb=sum(b)/n; print(f'server CPU without rules {a} (mean {ma:.1f} %), with $rules rules {b} (mean {mb:.1f} %) of one core: {(mb-ma)/ma*100:+.1f} % (target <= +10 %)')" "${a[@]}" "${b[@]}"
