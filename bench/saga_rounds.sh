#!/usr/bin/env bash
# Rounds of the saga benchmarks of bench/README sections 20 to 22, for two or more release
# builds of pipeline-bench run back to back, their order alternating from round to round:
# the single-row commit floor (pgbench), the single process at 1 and 50 clients, the CPU per
# saga at 50 clients (bench/cpu_share.py), and the distributed saga (Kafka).
#
#   ROUNDS=3 bench/saga_rounds.sh OUT_DIR DIR_A/pipeline-bench DIR_B/pipeline-bench ...
#
# Each build is a pipeline-bench binary in a directory of its own, named after the build (the
# commit): bench/cpu_share.py finds the process by its name, `pipeline-bench`. Two checkouts
# built into one target directory: touch the second one's sources first (`find . -name '*.rs'
# -exec touch {} +`), or cargo may keep the first one's artifacts of the same crates.
#
# Needs Postgres, Redis and the broker running (scripts/services.sh postgres redis kafka).
# Writes OUT_DIR/<round>-<build name>-<what>.txt; prints nothing else of note.
set -euo pipefail
out="$1"
shift
builds=("$@")
rounds="${ROUNDS:-3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$out"

# The commit floor's database: one table, one row per commit.
psql -h 127.0.0.1 -U postgres -qtc "SELECT 1 FROM pg_database WHERE datname = 'floor'" | grep -q 1 ||
  psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE floor"
psql -h 127.0.0.1 -U postgres -q floor -c "CREATE TABLE IF NOT EXISTS floor (id bigint GENERATED ALWAYS AS IDENTITY, payload text)"
echo "INSERT INTO floor (payload) VALUES ('an order placed, one row');" > "$out/insert.sql"

run_build() {
  local round="$1" build="$2" name
  name="$(basename "$(dirname "$build")")"
  pgbench -h 127.0.0.1 -U postgres -n -M prepared -f "$out/insert.sql" -c 1 -T 5 floor \
    > "$out/$round-$name-floor.txt" 2>&1
  "$build" --kafka-brokers none saga --provider-latency-ms 0 --clients 1,50 --orders 1500 \
    --layers all > "$out/$round-$name-single.txt" 2>&1
  python3 "$here/cpu_share.py" > "$out/$round-$name-cpu.txt" &
  local sampler=$!
  "$build" --kafka-brokers none saga --provider-latency-ms 0 --clients 50 --orders 3000 \
    --layers all > "$out/$round-$name-cpu-run.txt" 2>&1
  kill "$sampler"
  wait "$sampler" || true
  "$build" saga --distributed --provider-latency-ms 0 --clients 1,50 --orders 1000 \
    --layers all > "$out/$round-$name-distributed.txt" 2>&1
}

for round in $(seq 1 "$rounds"); do
  if (( round % 2 == 1 )); then order=("${builds[@]}"); else
    order=()
    for (( i=${#builds[@]}-1; i>=0; i-- )); do order+=("${builds[$i]}"); done
  fi
  for build in "${order[@]}"; do
    echo "round $round: $(basename "$(dirname "$build")") $(date -u +%H:%M:%S)"
    run_build "$round" "$build"
  done
done
pgbench -h 127.0.0.1 -U postgres -n -M prepared -f "$out/insert.sql" -c 32 -j 2 -T 5 floor \
  > "$out/limit.txt" 2>&1
echo "done $(date -u +%H:%M:%S)"
