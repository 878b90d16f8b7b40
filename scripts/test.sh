#!/usr/bin/env bash
# Runs every Widgetry test on a fresh Debian machine with Rust installed.
# Installs what the tests need (mosquitto clients and broker, paho, graphite-carbon, chromium,
# PostgreSQL, systemd's systemd-analyze, docker.io, docker-compose and
# debootstrap; npm packages are installed by build.rs with `npm ci` from the
# lockfile) first, then checks formatting and lints, builds the workspace
# and runs all tests: Rust unit and integration tests (the storage and API
# tests twice: on SQLite and on a throwaway PostgreSQL server; the broker's
# MQTT conformance suite with paho and mosquitto clients), the vendored
# rumqttd's own unit tests, the dashboard's vitest tests and its browser
# test, `systemd-analyze verify` of deploy/widgetry-agent.service, and
# docker-compose.yml run for real on a private Docker daemon
# (scripts/compose-test.sh). Last, it checks that the run changed no file
# of the checkout (`git status --porcelain`).
# Exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
# shellcheck source=scripts/apt-install.sh
. scripts/apt-install.sh

need_apt=()
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
# The MQTT-over-TLS test makes its CA and certificates with openssl.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# The external-broker test runs its own Mosquitto on a free loopback port.
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
# The plain-clients test publishes with Debian's paho (python3-paho-mqtt).
/usr/bin/python3 -c 'import paho.mqtt.client' >/dev/null 2>&1 || need_apt+=(python3 python3-paho-mqtt)
# The Graphite export test runs Debian's carbon-cache and reads its whisper
# files with whisper-fetch (python3-whisper, a dependency).
[ -x /usr/bin/carbon-cache ] && command -v whisper-fetch >/dev/null 2>&1 || need_apt+=(graphite-carbon)
# The dashboard's end-to-end test drives Debian's chromium with playwright-core.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# The PostgreSQL storage tests start their own server from Debian's package.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
# build.rs builds the dashboard with npm (the machine's Node 20 normally).
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
# The systemd unit is checked with systemd-analyze verify.
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# scripts/compose-test.sh runs its own dockerd and makes its base image
# with debootstrap.
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
apt_install "${need_apt[@]}"

# What the checkout looks like before the run; the run must not change it.
checkout_state() { git status --porcelain --untracked-files=all && git diff HEAD | sha256sum; }
in_git=false
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  in_git=true
  checkout_before=$(checkout_state)
fi

start=$(date +%s)
step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings (default features, then the agent with tls)"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p widgetry-agent --all-targets --locked --features tls -- -D warnings

step "cargo build --workspace (binaries used by the process-level tests; the first build also runs npm ci and the dashboard's vite build in web-ui/, a minute or two)"
cargo build --workspace --locked --features widgetry-agent/tls

step "systemd-analyze verify deploy/widgetry-agent.service (with the agent binary at its ExecStart path)"
unit_root=$(mktemp -d)
mkdir -p "$unit_root/usr/local/bin" "$unit_root/etc/systemd/system" "$unit_root/usr/lib/systemd"
cp -r /usr/lib/systemd/system "$unit_root/usr/lib/systemd/"
cp target/debug/widgetry-agent "$unit_root/usr/local/bin/widgetry-agent"
cp deploy/widgetry-agent.service "$unit_root/etc/systemd/system/"
# verify prints problems it does not count as errors (an unknown key, a bad
# value it ignores): any output fails the check.
unit_out=$(systemd-analyze verify --root="$unit_root" widgetry-agent.service 2>&1) || unit_rc=$?
rm -rf "$unit_root"
if [ "${unit_rc:-0}" -ne 0 ] || [ -n "$unit_out" ]; then
  printf 'deploy/widgetry-agent.service does not verify:\n%s\n' "$unit_out" >&2
  exit 1
fi

step "cargo test --workspace (includes the fault suite, crates/server/tests/faults.rs)"
# The fault suite appends one row per fault and workload here.
rm -f target/tmp/fault-suite.txt
cargo test --workspace --locked --features widgetry-agent/tls

step "fault suite summary (taken / acknowledged / stored / duplicated / reported gaps per fault)"
printf '| %-34s | %-8s | %7s | %12s | %7s | %10s | %13s | %5s |\n' fault source taken acknowledged stored duplicated reported_gaps lost
cat target/tmp/fault-suite.txt

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

step "fleet end-to-end test (chromium: 200 plain clients and 2 agents, presence, a rule firing to the page, MQTT and a webhook)"
node web-ui/e2e/fleet.e2e.mjs

step "docker-compose.yml for real: default and scale profiles on a private dockerd (scripts/compose-test.sh)"
bash scripts/compose-test.sh

if $in_git; then
  step "the run changed nothing in the checkout (git status --porcelain)"
  if [ "$(checkout_state)" != "$checkout_before" ]; then
    echo "the test run changed the checkout; git status --porcelain before:" >&2
    sed -n '$!p' <<<"$checkout_before" | sed 's/^/    /' >&2
    echo "after:" >&2
    git status --porcelain --untracked-files=all | sed 's/^/    /' >&2
    exit 1
  fi
fi

printf '\nall tests passed in %ss\n' "$(( $(date +%s) - start ))"
