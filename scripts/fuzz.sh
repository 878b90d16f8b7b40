#!/usr/bin/env bash
# Runs Widgetry's fuzz targets (fuzz/, cargo-fuzz + libFuzzer) on the
# stable toolchain, each for a bounded time, and prints per target the
# executions, execs/s, new inputs and corpus size. Exits non-zero if any
# target crashed (the input is kept in fuzz/artifacts/TARGET/).
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TARGETS=(proto_batch json_samples statsd broker_toml agent_toml ws_subscribe)

usage() {
  cat <<EOF
usage: scripts/fuzz.sh [--cmin] [--seeds] [SECONDS] [TARGET...]

Runs each fuzz target for SECONDS (default 60) of wall time, one after the
other, and prints per target: executions, execs/s, new inputs found,
corpus size (files and bytes). Fails if a target crashes; the crashing
input is in fuzz/artifacts/TARGET/, libFuzzer's output in fuzz/logs/, and
  RUSTC_BOOTSTRAP=1 cargo fuzz run -s none -a TARGET fuzz/artifacts/TARGET/crash-…
replays it.

Targets (default: all): ${ALL_TARGETS[*]}

Each run reads the committed corpus fuzz/corpus/TARGET/ and writes the
inputs it finds to fuzz/corpus-work/TARGET/ (not committed).
  --cmin    afterwards, merge corpus-work into fuzz/corpus/TARGET/ and
            minimise it to the inputs that reach every edge reached
            (cargo fuzz cmin -- -use_counters=0): what to commit
  --seeds   first write the seed inputs (fuzz/seeds.py: the README's and
            the tests' examples) into fuzz/corpus/

Needs cargo-fuzz (installed with 'cargo install --locked cargo-fuzz' if
missing) and a C++ compiler for libFuzzer. The -Z flags cargo-fuzz passes
are allowed on stable with RUSTC_BOOTSTRAP=1, set here; no sanitizer
(-s none: the code under test has no unsafe code), with debug assertions
and overflow checks (-a). The dashboard is not built (WIDGETRY_SKIP_UI=1).
EOF
}

cmin=0
seeds=0
secs=60
targets=()
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --cmin) cmin=1 ;;
    --seeds) seeds=1 ;;
    ''|*[!0-9]*)
      if [[ " ${ALL_TARGETS[*]} " == *" $arg "* ]]; then
        targets+=("$arg")
      else
        echo "fuzz.sh: unknown target or option '$arg' (see --help)" >&2
        exit 64
      fi ;;
    *) secs=$arg ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")
[ "$secs" -gt 0 ] || { echo "fuzz.sh: SECONDS must be above 0" >&2; exit 64; }

export RUSTC_BOOTSTRAP=1 WIDGETRY_SKIP_UI=1
FLAGS=(-s none -a)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz (cargo install --locked cargo-fuzz)"
  cargo install --locked cargo-fuzz
fi

[ "$seeds" -eq 0 ] || python3 fuzz/seeds.py

echo "==> building the fuzz targets (cargo fuzz build ${FLAGS[*]})"
mkdir -p fuzz/logs
if ! cargo fuzz build "${FLAGS[@]}" >fuzz/logs/build.log 2>&1; then
  tail -40 fuzz/logs/build.log >&2
  exit 1
fi

size_of() { # files and bytes under the given directories
  find "$@" -type f 2>/dev/null | wc -l | tr -d ' '
  find "$@" -type f -printf '%s\n' 2>/dev/null | awk '{s+=$1} END {print s+0}'
}

rows=()
failed=()
# Logs of the last run (not committed): fuzz/logs/TARGET.log.
logdir=fuzz/logs
mkdir -p "$logdir"
for t in "${targets[@]}"; do
  work=fuzz/corpus-work/$t
  mkdir -p "$work" "fuzz/corpus/$t" "fuzz/artifacts/$t"
  echo "==> $t: ${secs}s"
  log=$logdir/$t.log
  start=$(date +%s)
  rc=0
  cargo fuzz run "${FLAGS[@]}" "$t" "$work" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1 || rc=$?
  took=$(( $(date +%s) - start ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  new=$(sed -n 's/^stat::new_units_added: *//p' "$log" | tail -1)
  read -r files bytes < <(size_of "$work" "fuzz/corpus/$t" | paste -sd' ')
  status=ok
  if [ "$rc" -ne 0 ]; then
    status="CRASH (exit $rc)"
    failed+=("$t")
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -20 >&2 || true
  fi
  rows+=("$(printf '%-14s %6ss %12s %10s %6s %7s %9s  %s' "$t" "$took" "${execs:-?}" "${rate:-?}" "${new:-?}" "$files" "$bytes" "$status")")
done

if [ "$cmin" -eq 1 ]; then
  for t in "${targets[@]}"; do
    [[ " ${failed[*]-} " == *" $t "* ]] && continue
    echo "==> $t: minimising fuzz/corpus/$t"
    cp -n fuzz/corpus-work/"$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
    # Edges only (-use_counters=0): every branch the corpus reaches, in a
    # few hundred small files rather than one per hit count.
    cargo fuzz cmin "${FLAGS[@]}" "$t" "fuzz/corpus/$t" -- -use_counters=0 >"$logdir/$t.cmin.log" 2>&1
    read -r files bytes < <(size_of "fuzz/corpus/$t" | paste -sd' ')
    echo "    $files files, $bytes bytes"
  done
fi

echo
printf '%-14s %7s %12s %10s %6s %7s %9s  %s\n' target time execs execs/s new files bytes status
printf '%s\n' "${rows[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: crash in ${failed[*]}: see fuzz/artifacts/ and fuzz/logs/" >&2
  exit 1
fi
