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

# shellcheck source=scripts/local-service.sh
source "$repo/scripts/local-service.sh"
start_local_service "$CARGO_TARGET_DIR/$profile/petstore"

BASE_URL="$BASE_URL" SMOKE="$smoke" k6 run --quiet tests/load/basic_load_test.js
