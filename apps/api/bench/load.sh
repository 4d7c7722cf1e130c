#!/usr/bin/env bash
# Load benchmark of GET /v1/domains/{id}: limiter off, then limiter on (Redis), same run.
# A run must see no 429: wrk's "Non-2xx or 3xx responses" line would count them.
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

# Limits a run cannot exhaust: one unit per millisecond over an hour (3,600,000 per 3,600 s,
# the most the api accepts for that window). Every request moves the stored TAT (integer
# microseconds) 1 ms ahead, so the script does its real work (GET, compare, SET with PX);
# a 15 s run of some 100,000 requests ends with the TAT about 100 s - 15 s ahead of now,
# far from the 3,600 s that would refuse. (Limits of 1e9, used before, made the increment
# vanish in floating point: the stored TAT never moved.)
start_api on REDIS_URL="$redis" RATE_LIMIT_KEY_PREFIX="bench:$$" \
  RATE_LIMIT_WINDOW_SECS=3600 RATE_LIMIT_PER_KEY=3600000 RATE_LIMIT_PER_IP=3600000
run limiter-on "$base"
curl -s "$base/metrics" | grep -E '^(rate_limit_decisions_total|redis_connection_error_total)' || true
if command -v redis-cli >/dev/null; then
  now_us=$(redis-cli -u "$redis" TIME | head -1)000000
  for k in $(redis-cli -u "$redis" --scan --pattern "{bench:$$}:*"); do
    tat=$(redis-cli -u "$redis" GET "$k")
    echo "$k: stored TAT $(( (tat - now_us) / 1000000 )) s ahead of now"
    redis-cli -u "$redis" DEL "$k" >/dev/null
  done
fi
