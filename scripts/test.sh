#!/usr/bin/env bash
# Runs every check and test of the petstore: installs and starts what the tests need
# (idempotently: fast when it is already there), then lint, then the whole test suite.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -E 'test(browse)'   # extra arguments go to cargo nextest run
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/petstore/target}"
export PETSTORE_TEST_DATABASE_URL="${PETSTORE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

log() { printf '==> %s\n' "$*" >&2; }

# Stop at exit what this run started (a broker or Redis already running is left alone).
PETSTORE_STARTED_FILE="$(mktemp)"
export PETSTORE_STARTED_FILE
kafka_log="$(mktemp)"
kafka_pid=""
cleanup() {
  if [[ -n "$kafka_pid" ]]; then kill -- "-$kafka_pid" 2>/dev/null || true; fi
  bash "$repo/scripts/services.sh" stop-started
  rm -f "$PETSTORE_STARTED_FILE" "$kafka_log"
}
trap cleanup EXIT
# The broker's first install (cargo install tansu) is the longest step of a new machine's run:
# it builds in the background, in a process group of its own, while the lints and the test
# build run, and the tests wait for it.
set -m
bash "$repo/scripts/services.sh" kafka > "$kafka_log" 2>&1 &
kafka_pid=$!
set +m
bash "$repo/scripts/services.sh" postgres redis prometheus k6 schemathesis oidc-provider browser
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
export PETSTORE_TEST_REDIS_URL="${PETSTORE_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"

if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

if [[ "${CI:-}" == "true" ]]; then
  # Databases left behind by interrupted earlier runs.
  psql "$PETSTORE_TEST_DATABASE_URL" -Atc \
    "SELECT datname FROM pg_database WHERE datname LIKE 'petstore_test_%'" |
    while read -r name; do
      psql "$PETSTORE_TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE)" || true
    done
fi

log "compose files"
if ! command -v docker-compose >/dev/null 2>&1; then
  log "installing docker-compose (to validate compose files offline)"
  if [[ $(id -u) -eq 0 ]]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; fi
fi
for file in compose/*.yml; do docker-compose -f "$file" config -q; done

log "prometheus config and alert rules"
promtool check config observability/prometheus/prometheus.yml >/dev/null
promtool check rules observability/prometheus/alerts.yml >/dev/null
promtool test rules observability/prometheus/tests/alerts_test.yml

log "formatting"
cargo fmt --all --check
log "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "test build"
profile=default
[[ "${CI:-}" == "true" ]] && profile=ci
cargo nextest run --workspace --locked --profile "$profile" --no-run
log "waiting for the Kafka-protocol broker"
if ! wait "$kafka_pid"; then
  cat "$kafka_log" >&2
  log "the broker could not be installed or started"; exit 1
fi
kafka_pid=""
cat "$kafka_log" >&2
# The smoke run and the contract check start the service with KAFKA_BROKERS: after the broker.
if [[ $# -eq 0 ]]; then
  log "load script smoke run (k6, 5 s against the real binary)"
  bash "$repo/scripts/load.sh" --smoke
  log "API contract (schemathesis against the real binary)"
  bash "$repo/scripts/contract.sh"
fi
log "tests"
cargo nextest run --workspace --locked --profile "$profile" "$@"

if [[ $# -eq 0 ]]; then
  log "chaos: sagas under step failures, runner kills and owner processes killed or paused (embedded, then Postgres + Kafka + Redis)"
  cargo build --locked -q -p petstore-cli --bin petstore
  petstore_bin="$CARGO_TARGET_DIR/debug/petstore"
  env -u KAFKA_BROKERS -u DATABASE_URL -u REDIS_URL PETSTORE__LOG__FILTER=error "$petstore_bin" chaos saga
  chaos="chaos_$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
  psql "$PETSTORE_TEST_DATABASE_URL" -qc "CREATE DATABASE petstore_test_$chaos"
  DATABASE_URL="${PETSTORE_TEST_DATABASE_URL%/*}/petstore_test_$chaos" \
    REDIS_URL="$PETSTORE_TEST_REDIS_URL" PETSTORE__REDIS__KEY_PREFIX="$chaos" \
    PETSTORE__KAFKA__TOPIC_PREFIX="$chaos" PETSTORE__KAFKA__CONSUMER_GROUP="$chaos" \
    PETSTORE__LOG__FILTER=error "$petstore_bin" chaos saga
  psql "$PETSTORE_TEST_DATABASE_URL" -qc "DROP DATABASE petstore_test_$chaos WITH (FORCE)"
  redis-cli -u "$PETSTORE_TEST_REDIS_URL" --scan --pattern "$chaos:*" | xargs -r redis-cli -u "$PETSTORE_TEST_REDIS_URL" del >/dev/null
fi
