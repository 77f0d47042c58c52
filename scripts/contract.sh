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

data="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# Rate limits off (the run sends thousands of requests as one admin); a short consistency
# wait, since generated X-Consistency-Tokens name positions the log never reaches.
PETSTORE_CONFIG_DIR="$repo/config" PETSTORE__LOG__FORMAT=json PETSTORE__LOG__FILTER=warn \
  PETSTORE__SECURITY__RATE_LIMITS__ENABLED=false PETSTORE__HTTP__CONSISTENCY_WAIT_MS=50 \
  "$CARGO_TARGET_DIR/debug/petstore" serve --listen "127.0.0.1:$port" --data-dir "$data" \
  2> "$data/service.log" &
service=$!
trap 'kill "$service" 2>/dev/null || true; wait "$service" 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null || { cat "$data/service.log" >&2; exit 1; }

seed=(--seed "${ST_SEED:-20261201}")
[[ "${ST_SEED:-}" == random ]] && seed=()
PETSTORE_CONTRACT_USERNAME=admin PETSTORE_CONTRACT_PASSWORD=admin \
  PYTHONPATH="$repo/tests/contract" SCHEMATHESIS_HOOKS=petstore_hooks \
  st --config-file "$repo/tests/contract/schemathesis.toml" run \
  "http://127.0.0.1:$port/petstore-domain/openapi.json" --url "http://127.0.0.1:$port" \
  --checks all --max-examples "${ST_MAX_EXAMPLES:-30}" "${seed[@]}" --no-color
