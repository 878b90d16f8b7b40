#!/usr/bin/env bash
# Bytes per sample in the SQLite file after compaction (issue 14,
# acceptance 1): each NAB folder (one `widgetry import` per CSV file into a
# fresh database) and the generated agent day (1 Hz cpu.usage_pct and
# mem.used_bytes, the codec table's data), then `widgetry compact`, a WAL
# checkpoint and VACUUM (free pages left by the deleted batches are reused
# by SQLite, not returned to the file system). Prints, per data set: the
# file, the file minus an empty database's (the schema: one page per table
# and index), the chunks' encoded bytes, and pcodec's standalone size from
# the codec benchmark on the same data.
#
#   bash scripts/bench-storage.sh [NAB_DIR]   # default ../shared/data/nab
set -euo pipefail
cd "$(dirname "$0")/.."
nab=${1:-../shared/data/nab}
[ -d "$nab/realKnownCause" ] || { echo "no NAB corpus at $nab (give its folder)" >&2; exit 64; }
step() { echo "==> $*"; }
# shellcheck source=apt-install.sh
. scripts/apt-install.sh
command -v sqlite3 >/dev/null || apt_install sqlite3

echo "==> building the release binaries"
cargo build --release --locked -p widgetry-server -p widgetry-codec --bins 2>&1 | tail -1
bin=${CARGO_TARGET_DIR:-target}/release
w=$bin/widgetry
work=$(mktemp -d)
mkdir -p "$work/hours"
trap 'rm -rf "$work"' EXIT

size() { stat -c %s "$1"; }
finish() { sqlite3 "$1" 'PRAGMA wal_checkpoint(TRUNCATE); VACUUM;' >/dev/null; }

"$w" compact --database "$work/empty.db" >/dev/null
finish "$work/empty.db"
empty=$(size "$work/empty.db")
echo "empty database (schema only): $empty bytes"

"$bin/widgetry-codec-bench" --write-agent-csv "$work/agent"

# pcodec's standalone bytes/sample on a folder, from the codec benchmark.
pcodec() { "$bin/widgetry-codec-bench" "$1" | awk -F'|' '$5 ~ /pcodec/ {gsub(/[ *]/, "", $6); print $6; exit}'; }

rows=()
for set in "$nab/realKnownCause" "$nab/realAWSCloudwatch" "$work/agent"; do
  name=$(basename "$set"); [ "$name" = agent ] && name="agent day (generated)"
  db="$work/$(basename "$set").db"
  started=$(date +%s.%N)
  if [ "$name" = "agent day (generated)" ]; then
    # As a live agent's data is compacted: hour by hour, each hour imported
    # (as its own file) and compacted before the next arrives.
    for f in "$set"/*.csv; do
      awk -v dir="$work/hours" -v s="$(basename "$f" .csv)" 'NR > 1 { h = int((NR - 2) / 3600); print > (dir "/" s "." sprintf("%02d", h) ".csv") }' \
        "$f"
    done
    for h in $(seq -w 0 23); do
      for s in cpu.usage_pct mem.used_bytes; do
        "$w" import --device bench --series "$s" --database "$db" "$work/hours/$s.$h.csv" >/dev/null 2>&1
      done
      "$w" compact --database "$db" > "$work/compact.out"
    done
    imported=$(date +%s.%N)
    echo "  $name: 24 hourly imports, each followed by widgetry compact; the last: $(cat "$work/compact.out")"
  else
    for f in "$set"/*.csv; do
      "$w" import --device bench --series "$(basename "$f" .csv)" --database "$db" "$f" >/dev/null 2>&1
    done
    imported=$(date +%s.%N)
    "$w" compact --everything --database "$db" | sed "s/^/  $name: /"
  fi
  compacted=$(date +%s.%N)
  finish "$db"
  read -r samples payload chunks left < <(sqlite3 -separator ' ' "$db" \
    'SELECT (SELECT COALESCE(SUM(count), 0) FROM chunks) + (SELECT COALESCE(SUM(samples), 0) FROM batches),
            (SELECT COALESCE(SUM(LENGTH(data)), 0) FROM chunks), (SELECT COUNT(*) FROM chunks),
            (SELECT COUNT(*) FROM batches)')
  file=$(size "$db")
  standalone=$(pcodec "$set")
  echo "  $name: tables by size:"
  sqlite3 "$db" 'SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC LIMIT 5' | sed 's/^/    /'
  rows+=("$(awk -v n="$name" -v s="$samples" -v f="$file" -v e="$empty" -v p="$payload" -v c="$chunks" -v l="$left" -v sa="$standalone" \
    -v t0="$started" -v t1="$imported" -v t2="$compacted" 'BEGIN {
      ti = t1 - t0; tc = t2 - t1;
      m = (f - e) / s;
      printf "| %s | %d | %d | %d | %.2f | **%.2f** | %.2f | %s | %.2f | %.1f s / %.1f s |", n, s, c, f, f / s, m, p / s, sa, m / sa, ti, tc }')")
done
echo
echo "| data | samples | chunks | SQLite file (B) | B/sample, whole file | B/sample, file − empty schema | B/sample, chunk payload | pcodec standalone | (file − schema) / pcodec | import / compact |"
echo "|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
