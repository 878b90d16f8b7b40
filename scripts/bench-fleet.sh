#!/usr/bin/env bash
# The fleet page with DEVICES real devices (default 10,000) in Debian's
# chromium: first render, JS heap and frame times during live updates
# (web-ui/e2e/fleet.bench.mjs). Builds the release binary first; loopback
# only, free ports, loadgen bounded to 300 s.
#
#   bash scripts/bench-fleet.sh [DEVICES]
#   UPDATE_DOCS_SCREENSHOT=1 bash scripts/bench-fleet.sh   # also docs/fleet-10k.png
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-10000}
case "$devices" in '' | *[!0-9]*) echo "DEVICES must be a whole number, not '$devices'" >&2; exit 64 ;; esac
command -v chromium >/dev/null || { echo "chromium is missing: apt-get install chromium (scripts/test.sh installs it)" >&2; exit 1; }
echo "==> building the release binary"
cargo build --release --bin widgetry --locked 2>&1 | tail -1
[ -d web-ui/node_modules/playwright-core ] || (cd web-ui && npm ci --no-audit --no-fund >/dev/null)
ulimit -n 65536 2>/dev/null || true
WIDGETRY_BIN="${CARGO_TARGET_DIR:-target}/release/widgetry" DEVICES="$devices" node web-ui/e2e/fleet.bench.mjs
