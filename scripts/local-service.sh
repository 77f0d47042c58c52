# Sourced by scripts/load.sh and scripts/contract.sh: starts the petstore binary $1 with the
# shipped config (config/local.yaml's users), an embedded store in a temporary folder and
# rate limits off (each script sends far more than one user's quota), on a free loopback
# port; extra arguments are NAME=VALUE settings for it. With KAFKA_BROKERS set, it uses
# topics and a consumer group of its own (a new store must not meet an earlier run's
# topics: it would refuse to start). Sets BASE_URL, waits until the service is ready, and
# stops it (and removes its data) when the calling script exits.
start_local_service() {
  local binary="$1"
  shift
  local_service_data="$(mktemp -d)"
  local port
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  local run
  run="local_$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
  env PETSTORE_CONFIG_DIR="$repo/config" PETSTORE__LOG__FORMAT=json PETSTORE__LOG__FILTER=warn \
    PETSTORE__KAFKA__TOPIC_PREFIX="$run" PETSTORE__KAFKA__CONSUMER_GROUP="$run" \
    PETSTORE__SECURITY__RATE_LIMITS__ENABLED=false "$@" \
    "$binary" serve --listen "127.0.0.1:$port" --data-dir "$local_service_data" \
    2> "$local_service_data/service.log" &
  local_service_pid=$!
  trap 'kill "$local_service_pid" 2>/dev/null || true; wait "$local_service_pid" 2>/dev/null || true; rm -rf "$local_service_data"' EXIT
  BASE_URL="http://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    curl -fsS "$BASE_URL/health/ready" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  cat "$local_service_data/service.log" >&2
  return 1
}
