#!/usr/bin/env bash
# Runs every Widgetry test on a fresh Debian machine with Rust installed.
# Installs what the tests need (mosquitto clients and broker, paho, chromium,
# PostgreSQL; npm packages are installed by build.rs with `npm install` from
# the lockfile) first, then checks
# formatting and lints, builds the workspace and runs all tests: Rust unit
# and integration tests (the storage and API tests twice: on SQLite and on a
# throwaway PostgreSQL server; the broker's MQTT conformance suite with paho
# and mosquitto clients), the vendored rumqttd's own unit tests, the
# dashboard's vitest tests and its browser test.
# Exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

need_apt=()
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
# The external-broker test runs its own Mosquitto on a free loopback port.
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
# The plain-clients test publishes with Debian's paho (python3-paho-mqtt).
/usr/bin/python3 -c 'import paho.mqtt.client' >/dev/null 2>&1 || need_apt+=(python3 python3-paho-mqtt)
# The dashboard's end-to-end test drives Debian's chromium with playwright-core.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# The PostgreSQL storage tests start their own server from Debian's package.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
# build.rs builds the dashboard with npm (the machine's Node 20 normally).
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  step "installing ${need_apt[*]} (apt-get)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

start=$(date +%s)
step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build --workspace (binaries used by the process-level tests)"
cargo build --workspace --locked

step "cargo test --workspace"
cargo test --workspace --locked

step "the vendored rumqttd's own unit tests (vendor/rumqttd/PATCHES.md)"
CARGO_TARGET_DIR="$PWD/target/rumqttd" cargo test --manifest-path vendor/rumqttd/Cargo.toml --lib --locked

step "storage, API and scale-out tests again on PostgreSQL (scripts/pg-test-server.sh)"
pg=$(bash scripts/pg-test-server.sh)
pg_stop=$(sed -n 's/^STOP //p' <<<"$pg")
trap 'eval "$pg_stop"' EXIT
WIDGETRY_TEST_POSTGRES=$(sed -n 's/^URL //p' <<<"$pg") \
  cargo test --locked -p widgetry-server --test stack --test live --test external_broker
eval "$pg_stop"
trap - EXIT

step "dashboard unit tests (vitest)"
(cd web-ui && npm run --silent test)

step "dashboard end-to-end test (chromium + playwright-core against serve and two agents)"
node web-ui/e2e/dashboard.e2e.mjs

printf '\nall tests passed in %ss\n' "$(( $(date +%s) - start ))"
