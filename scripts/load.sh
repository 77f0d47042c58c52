#!/usr/bin/env bash
# Runs the seed's load script (tests/load/basic_load_test.js) with k6 against a petstore of
# its own: the binary on a free port, embedded store in a temporary folder, stopped at exit.
#
#   scripts/load.sh --smoke          # 1 virtual user, a few seconds (scripts/test.sh runs this)
#   scripts/load.sh                  # the default load (see the script); K6_VUS, K6_DURATION
#   scripts/load.sh --release        # against a release build (for measurements)
#
# Against a service that already runs: BASE_URL=http://localhost:8080 k6 run tests/load/basic_load_test.js
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/petstore/target}"
profile=debug
smoke=""
for argument in "$@"; do
  case "$argument" in
    --smoke) smoke=1 ;;
    --release) profile=release ;;
    *) echo "unknown argument $argument" >&2; exit 2 ;;
  esac
done
bash "$repo/scripts/services.sh" k6
if [[ "$profile" == release ]]; then cargo build --release --locked --bin petstore; else cargo build --locked --bin petstore; fi

data="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# The local config's users (the script logs in as demo); rate limits off, since one
# customer's load would meet the 30 orders a minute quota at once.
PETSTORE_CONFIG_DIR="$repo/config" PETSTORE__LOG__FORMAT=json PETSTORE__LOG__FILTER=warn \
  PETSTORE__SECURITY__RATE_LIMITS__ENABLED=false \
  "$CARGO_TARGET_DIR/$profile/petstore" serve --listen "127.0.0.1:$port" --data-dir "$data" \
  2> "$data/service.log" &
service=$!
trap 'kill "$service" 2>/dev/null || true; wait "$service" 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null || { cat "$data/service.log" >&2; exit 1; }

BASE_URL="http://127.0.0.1:$port" SMOKE="$smoke" k6 run --quiet tests/load/basic_load_test.js
