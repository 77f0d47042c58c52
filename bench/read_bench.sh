#!/usr/bin/env bash
# Starts the petstore binary BINARY on a fresh Postgres database (petstore_bench_<hex>,
# dropped at the end) with the config folder CONFIG_DIR (its local users log in), on a free
# loopback port, runs read-bench against it with the remaining arguments, and stops it.
#
#   bench/read_bench.sh BINARY CONFIG_DIR [--clients N --rounds N --seconds N]
#
# Two builds of the service compare by running this once with each, back to back.
set -euo pipefail
binary="$1" config_dir="$2"
shift 2
target="${CARGO_TARGET_DIR:-$HOME/.cache/petstore/target}"
admin_url="${PETSTORE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
name="petstore_bench_$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
data="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
psql "$admin_url" -qc "CREATE DATABASE $name"
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  psql "$admin_url" -qc "DROP DATABASE IF EXISTS $name WITH (FORCE)" || true
  rm -rf "$data"
}
env -u KAFKA_BROKERS -u REDIS_URL DATABASE_URL="${admin_url%/*}/$name" \
  PETSTORE_CONFIG_DIR="$config_dir" PETSTORE__LOG__FILTER=warn \
  PETSTORE__SECURITY__RATE_LIMITS__ENABLED=false \
  "$binary" serve --listen "127.0.0.1:$port" --data-dir "$data" 2> "$data/service.log" &
pid=$!
trap cleanup EXIT
for _ in $(seq 1 150); do
  curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null 2>&1 && break
  sleep 0.2
done
"$target/release/read-bench" --url "http://127.0.0.1:$port" "$@"
