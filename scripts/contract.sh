#!/usr/bin/env bash
# The API contract check: schemathesis (all checks, every phase, stateful included) against
# the real binary, which it logs in to as the local config's admin. The OpenAPI document must
# state every constraint and every answer: any failure fails the run.
#
#   scripts/contract.sh                   # bounded: 30 examples per operation, a fixed seed
#   ST_MAX_EXAMPLES=200 ST_SEED=random scripts/contract.sh
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/petstore/target}"
bash "$repo/scripts/services.sh" schemathesis
cargo build --locked --bin petstore

# A short consistency wait: generated X-Consistency-Tokens name positions the log never reaches.
# shellcheck source=scripts/local-service.sh
source "$repo/scripts/local-service.sh"
start_local_service "$CARGO_TARGET_DIR/debug/petstore" PETSTORE__HTTP__CONSISTENCY_WAIT_MS=50

seed=(--seed "${ST_SEED:-20261201}")
# PUT /petstore-domain/admin/config (the only PUT) is left out: generated documents that the
# schema cannot tell from valid ones (a log filter's grammar, a rollout's range inside a
# free-form object) are refused with 422 as they must be, and an accepted one would change
# the live settings (rate limits, flags) under every other check. tests/tests/live_settings.rs
# covers it, unhappy paths included.
[[ "${ST_SEED:-}" == random ]] && seed=()
PETSTORE_CONTRACT_USERNAME=admin PETSTORE_CONTRACT_PASSWORD=admin \
  PYTHONPATH="$repo/tests/contract" SCHEMATHESIS_HOOKS=petstore_hooks \
  st --config-file "$repo/tests/contract/schemathesis.toml" run \
  "$BASE_URL/petstore-domain/openapi.json" --url "$BASE_URL" \
  --exclude-method PUT \
  --checks all --max-examples "${ST_MAX_EXAMPLES:-30}" "${seed[@]}" --no-color
