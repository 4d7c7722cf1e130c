#!/usr/bin/env bash
# Load benchmark of GET /v1/domains/{id}: limiter off, then limiter on (Redis), same run.
#
#   apps/api/bench/load.sh [duration=15s] [connections=1000] [threads=2]
#
# Needs wrk (apt-get install -y wrk), PostgreSQL at $ADMIN_DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432/postgres) and Redis at $BENCH_REDIS_URL (default
# redis://127.0.0.1:6379; keys under a unique prefix). Builds the api in release mode,
# creates a throwaway database, seeds one org, key and domain, and drops it at the end.
set -euo pipefail

duration=${1:-15s}
connections=${2:-1000}
threads=${3:-2}
admin=${ADMIN_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
redis=${BENCH_REDIS_URL:-redis://127.0.0.1:6379}
root=$(cd "$(dirname "$0")/../../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
bin=$target/release/smartbeak-api
db=smartbeak_bench_$$
out=$(mktemp -d)

cargo build --release --quiet -p smartbeak-api --manifest-path "$root/Cargo.toml"
psql "$admin" -qc "CREATE DATABASE $db"
url=${admin%/*}/$db
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  rm -rf "$out"
}
trap cleanup EXIT

export DATABASE_URL=$url
"$bin" migrate >/dev/null 2>&1
org=$("$bin" orgs create --name bench 2>/dev/null | sed -E 's/.*"id":"([^"]+)".*/\1/')
key=$("$bin" keys create --org "$org" 2>/dev/null | sed -E 's/.*"key":"([^"]+)".*/\1/')

start_api() { # $1 = name, rest = env assignments; sets $base
  local name=$1; shift
  env "$@" API_BIND=127.0.0.1:0 RUST_LOG=warn,smartbeak_api=info "$bin" >"$out/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    if grep -q 'listening on http://' "$out/$name.log"; then break; fi
    sleep 0.1
  done
  base=$(sed -nE 's/.*listening on (http:\/\/[0-9.:]+).*/\1/p' "$out/$name.log" | head -1)
}

run() { # $1 = label, $2 = base url
  local base=$2
  local id
  id=$(curl -sf -XPOST "$base/v1/domains" -H "authorization: Bearer $key" \
    -H 'content-type: application/json' -d "{\"name\":\"$1-$$.example.com\"}" |
    sed -E 's/.*"id":"([^"]+)".*/\1/')
  curl -sf "$base/v1/domains/$id" -H "authorization: Bearer $key" >/dev/null
  echo "== $1: wrk -t$threads -c$connections -d$duration --latency $base/v1/domains/$id"
  wrk -t"$threads" -c"$connections" -d"$duration" --latency \
    -H "Authorization: Bearer $key" "$base/v1/domains/$id" | tee "$out/$1.wrk"
}

start_api off RATE_LIMIT_ENABLED=false
run limiter-off "$base"
kill -TERM "${pids[-1]}"; wait "${pids[-1]}" || true

start_api on REDIS_URL="$redis" RATE_LIMIT_KEY_PREFIX="bench:$$" \
  RATE_LIMIT_PER_KEY=1000000000 RATE_LIMIT_PER_IP=1000000000
run limiter-on "$base"
curl -s "$base/metrics" | grep -E '^(rate_limit_decisions_total|redis_connection_error_total)' || true
