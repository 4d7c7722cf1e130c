#!/usr/bin/env bash
# A/B load benchmark of GET /v1/domains/{id}: this tree against a baseline commit, in one run.
#
#   apps/api/bench/ab.sh <baseline-commit> [--rounds N] [--duration D] [--connections C]
#                        [--threads T] [--pgbench-clients P] [--json FILE] [--keep-logs]
#                        [--profile DIR] [--current-bin FILE]
#
# Defaults: 3 rounds, 15s, 1000 connections, 2 wrk threads, 64 pgbench clients.
#
# What it does, all in one run on this machine:
#   1. builds the api in release mode twice: this tree (into $CARGO_TARGET_DIR/release; or
#      --current-bin FILE, a release build of this tree made already) and <baseline-commit>
#      from a detached git worktree (into $CARGO_TARGET_DIR/bench/baseline);
#   2. creates two throwaway databases on $ADMIN_DATABASE_URL (one per binary, each migrated
#      and seeded by its own binary: one org, one key, one domain) and drops them at the end;
#   3. runs N rounds; each round runs four variants one after another, in an order that
#      rotates every round (interleaved): baseline and current, limiter on (Redis) and off;
#      plus the two ceilings: the current api's `/healthz` (the HTTP stack alone) and
#      `pgbench` running the key-and-domain lookup as one joined query (PostgreSQL alone);
#   4. prints every measurement, the medians and the issue's ratios (current limiter-on vs
#      baseline limiter-on, current limiter-on vs current limiter-off, p99, errors), and
#      writes them as JSON when --json is given;
#   5. with --profile DIR, records the api with `perf record` (linux-perf; DWARF call graphs)
#      during one more round of base-on, cur-on and cur-off, after the measured ones, and writes to DIR each
#      profile's top symbols (`perf report --no-children`, <variant>.top.txt) and, when
#      inferno is installed (`cargo install inferno`), a flame graph (<variant>.svg) and each
#      layer's own share of the CPU (<variant>.layers.txt, see layer_costs). The
#      profiled round is slower than the others; its figures stay out of the medians.
#
# The limiter-on runs use limits no run can exhaust (3,600,000 per 3,600 s: one unit per
# millisecond), so every request does the limiter's real Redis work and none is refused.
# Errors are wrk's socket errors plus its "Non-2xx or 3xx responses"; throughput counts the
# 2xx answers only. The key reaches wrk and curl through a file or the environment, never
# argv.
#
# Needs: git, cargo, wrk (apt-get install -y wrk), psql and pgbench (postgresql-client),
# curl; PostgreSQL at $ADMIN_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres)
# and Redis at $BENCH_REDIS_URL (default redis://127.0.0.1:6379; keys under a unique prefix).
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

baseline=
rounds=3
duration=15s
connections=1000
threads=2
pg_clients=64
json=
keep_logs=false
profile=
current_bin=
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=${2:?--rounds needs a value}; shift 2 ;;
    --duration) duration=${2:?--duration needs a value}; shift 2 ;;
    --connections) connections=${2:?--connections needs a value}; shift 2 ;;
    --threads) threads=${2:?--threads needs a value}; shift 2 ;;
    --pgbench-clients) pg_clients=${2:?--pgbench-clients needs a value}; shift 2 ;;
    --json) json=${2:?--json needs a file}; shift 2 ;;
    --keep-logs) keep_logs=true; shift ;;
    --profile) profile=${2:?--profile needs a directory}; shift 2 ;;
    --current-bin) current_bin=${2:?--current-bin needs a file}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "ab.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *)
      if [ -n "$baseline" ]; then echo "ab.sh: one baseline commit only (got $baseline and $1)" >&2; exit 2; fi
      baseline=$1; shift ;;
  esac
done
if [ -z "$baseline" ]; then echo "ab.sh: the baseline commit is required" >&2; usage >&2; exit 2; fi
case $rounds in ''|*[!0-9]*|0) echo "ab.sh: --rounds must be a positive integer, got '$rounds'" >&2; exit 2 ;; esac
case $connections in ''|*[!0-9]*|0) echo "ab.sh: --connections must be a positive integer, got '$connections'" >&2; exit 2 ;; esac
case $pg_clients in ''|*[!0-9]*|0) echo "ab.sh: --pgbench-clients must be a positive integer, got '$pg_clients'" >&2; exit 2 ;; esac
case $duration in *[0-9]s|*[0-9]m) ;; *) echo "ab.sh: --duration must look like 15s or 1m, got '$duration'" >&2; exit 2 ;; esac

for tool in git cargo wrk psql pgbench curl sha256sum; do
  if ! command -v "$tool" >/dev/null; then
    case $tool in
      wrk) hint="apt-get install -y wrk" ;;
      psql|pgbench) hint="apt-get install -y postgresql-client" ;;
      *) hint="install it" ;;
    esac
    echo "ab.sh: $tool not found ($hint)" >&2
    exit 2
  fi
done

if [ -n "$profile" ]; then
  command -v perf >/dev/null || { echo "ab.sh: --profile needs perf (apt-get install -y linux-perf)" >&2; exit 2; }
  mkdir -p "$profile"
  profile=$(cd "$profile" && pwd)
fi
root=$(cd "$(dirname "$0")/../../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
admin=${ADMIN_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
redis=${BENCH_REDIS_URL:-redis://127.0.0.1:6379}
base_commit=$(git -C "$root" rev-parse --verify --quiet "$baseline^{commit}") ||
  { echo "ab.sh: '$baseline' is not a commit in $root" >&2; exit 2; }
cur_commit=$(git -C "$root" rev-parse HEAD)
cur_dirty=$(git -C "$root" status --porcelain --untracked-files=no | head -c1)
secs=${duration%s}; case $duration in *m) secs=$(( ${duration%m} * 60 )) ;; esac

out=$(mktemp -d)
tree=$out/baseline-tree
pids=()
dbs=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for db in "${dbs[@]}"; do psql "$admin" -qXc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true; done
  git -C "$root" worktree remove --force "$tree" >/dev/null 2>&1 || true
  if $keep_logs; then echo "ab.sh: logs kept in $out" >&2; else rm -rf "$out"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== building current ($cur_commit${cur_dirty:+, with uncommitted changes}) and baseline ($base_commit), release"
if [ -n "$current_bin" ]; then
  # Built already (cargo xtask bench builds the whole workspace in release mode first).
  [ -x "$current_bin" ] || { echo "ab.sh: --current-bin $current_bin is not an executable" >&2; exit 2; }
  cp "$current_bin" "$out/current-api"
else
  cargo build --release --quiet -p smartbeak-api --manifest-path "$root/Cargo.toml"
  cp "$target/release/smartbeak-api" "$out/current-api"
fi
git -C "$root" worktree add --quiet --detach "$tree" "$base_commit"
CARGO_TARGET_DIR=$target/bench/baseline \
  cargo build --release --quiet -p smartbeak-api --manifest-path "$tree/Cargo.toml"
cp "$target/bench/baseline/release/smartbeak-api" "$out/baseline-api"

# setup <name> <binary>: a fresh database migrated and seeded by that binary.
# Sets url_<name>, key_<name>, hash_<name>, domain_<name> (domain created through the api).
setup() {
  local name=$1 bin=$2 db=smartbeak_ab_${1}_$$
  psql "$admin" -qXc "CREATE DATABASE $db" >/dev/null
  dbs+=("$db")
  local url=${admin%/*}/$db
  DATABASE_URL=$url "$bin" migrate >"$out/$name-migrate.log" 2>&1 ||
    { cat "$out/$name-migrate.log" >&2; echo "ab.sh: $name: migrate failed" >&2; exit 1; }
  local org key
  org=$(DATABASE_URL=$url "$bin" orgs create --name "ab-$name" 2>/dev/null | sed -nE 's/.*"id":"([^"]+)".*/\1/p')
  key=$(DATABASE_URL=$url "$bin" keys create --org "$org" 2>/dev/null | sed -nE 's/.*"key":"([^"]+)".*/\1/p')
  [ -n "$org" ] && [ -n "$key" ] || { echo "ab.sh: $name: seeding an org and a key failed" >&2; exit 1; }
  printf -v "url_$name" %s "$url"
  printf -v "key_$name" %s "$key"
  printf -v "hash_$name" %s "$(printf %s "$key" | sha256sum | cut -d' ' -f1)"
}

# start_api <name> <binary> <database url> <limiter on|off>; sets $api_pid and $api_base.
start_api() {
  local name=$1 bin=$2 url=$3 limiter=$4 log=$out/$1.log
  local -a env=(DATABASE_URL="$url" API_BIND=127.0.0.1:0 RUST_LOG=warn,smartbeak_api=info)
  if [ "$limiter" = on ]; then
    env+=(REDIS_URL="$redis" RATE_LIMIT_KEY_PREFIX="ab:$$:$name" RATE_LIMIT_WINDOW_SECS=3600
      RATE_LIMIT_PER_KEY=3600000 RATE_LIMIT_PER_IP=3600000)
  else
    env+=(RATE_LIMIT_ENABLED=false)
  fi
  env "${env[@]}" "$bin" >"$log" 2>&1 &
  api_pid=$!
  pids+=("$api_pid")
  api_base=
  for _ in $(seq 1 300); do
    api_base=$(sed -nE 's/.*listening on (http:\/\/[0-9.:]+).*/\1/p' "$log" | head -1)
    [ -n "$api_base" ] && break
    kill -0 "$api_pid" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$api_base" ] || { cat "$log" >&2; echo "ab.sh: $name did not start" >&2; exit 1; }
}

stop_api() {
  kill -TERM "$api_pid" 2>/dev/null || true
  wait "$api_pid" 2>/dev/null || true
}

# auth_file <key>: the key's header in a file for curl (-H @file; mode 600 in the private
# temp dir), so it is never in curl's argv.
auth_file() { (umask 077; printf 'authorization: Bearer %s\n' "$1" >"$out/curl-auth"); }

# domain <base> <key>: creates a domain through the api, prints its id.
domain() {
  auth_file "$2"
  curl -sf -XPOST "$1/v1/domains" -H @"$out/curl-auth" \
    -H 'content-type: application/json' -d "{\"name\":\"ab-$$-$RANDOM.example.com\"}" |
    sed -nE 's/.*"id":"([^"]+)".*/\1/p'
}

# to_ms <wrk latency like 1.23ms / 450.00us / 1.02s>
to_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.3f", v * 60000 }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
    else printf "nan" }'
}

cat >"$out/auth.lua" <<'LUA'
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
LUA
results=$out/results.tsv # round variant rps p50 p90 p99 errors
: >"$results"

# measure <round> <variant> <url> <key or empty>: wrk, appends a line to $results.
measure() {
  local round=$1 variant=$2 url=$3 key=$4 file=$out/r$1-$2.wrk
  # The key reaches wrk through its environment and a Lua script, never its argv (`ps`).
  local -a auth=()
  [ -n "$key" ] && auth=(-s "$out/auth.lua")
  export BENCH_KEY=$key
  # A short warm-up (pools filled, caches warm), not counted.
  wrk -t"$threads" -c"$connections" -d2s "${auth[@]}" "$url" >/dev/null 2>&1 || true
  local perf_pid=
  if [ "$round" = profile ]; then
    perf record -q -F 199 --call-graph dwarf,16384 -p "$api_pid" -o "$out/$variant.perf" \
      >"$out/$variant.perf.log" 2>&1 &
    perf_pid=$!
    sleep 0.5
  fi
  wrk -t"$threads" -c"$connections" -d"$duration" --latency "${auth[@]}" "$url" >"$file" 2>&1 ||
    { cat "$file" >&2; echo "ab.sh: wrk failed ($variant, round $round)" >&2; exit 1; }
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    report_profile "$variant" "$(awk '/^Requests\/sec:/ {print $2}' "$file")"
    echo "   $variant (profiled, not in the medians)"
    return
  fi
  local rps p50 p90 p99 sock non2xx
  non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $5}' "$file")
  # Throughput counts the 2xx answers only: "N requests in 15.01s" less the non-2xx.
  rps=$(awk -v bad="${non2xx:-0}" '/ requests in / { t = $4; sub(/s,?$/, "", t); if (t + 0 > 0) printf "%.2f", ($1 - bad) / t }' "$file")
  [ -n "$rps" ] || { cat "$file" >&2; echo "ab.sh: no request count in wrk's output ($variant, round $round)" >&2; exit 1; }
  p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$file")")
  p90=$(to_ms "$(awk '$1 == "90%" {print $2}' "$file")")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$file")")
  sock=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$file")
  local errors=$(( ${sock:-0} + ${non2xx:-0} ))
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$variant" "$rps" "$p50" "$p90" "$p99" "$errors" >>"$results"
  printf '   %-16s %10s req/s  p50 %8s ms  p90 %8s ms  p99 %8s ms  errors %s\n' \
    "$variant" "$rps" "$p50" "$p90" "$p99" "$errors"
}

# report_profile <variant> <requests/s>: top symbols and, with inferno, a flame graph.
report_profile() {
  local variant=$1 rps=$2 data=$out/$1.perf
  [ -s "$data" ] || { cat "$out/$variant.perf.log" >&2; echo "ab.sh: perf recorded nothing for $variant" >&2; return; }
  {
    echo "# $variant: perf record -F 199 --call-graph dwarf over wrk -c$connections -d$duration ($rps req/s while profiled)"
    echo "# perf report --no-children --sort dso,sym --percent-limit 0.7"
    perf report -i "$data" --no-children --sort dso,sym --stdio --percent-limit 0.7 -g none 2>/dev/null |
      grep -v '^$' | grep -v '^# *$'
  } >"$profile/$variant.top.txt"
  if command -v inferno-collapse-perf >/dev/null && command -v inferno-flamegraph >/dev/null; then
    perf script -i "$data" 2>/dev/null | inferno-collapse-perf 2>/dev/null >"$out/$variant.folded" || true
    inferno-flamegraph --title "smartbeak-api $variant: GET /v1/domains/{id}, $connections connections" \
      <"$out/$variant.folded" >"$profile/$variant.svg" 2>/dev/null || true
    layer_costs "$out/$variant.folded" >"$profile/$variant.layers.txt"
    rm -f "$out/$variant.folded"
  fi
  rm -f "$data"
}

# layer_costs <folded stacks>: each CPU sample charged to the innermost layer of the request
# path on its stack (the handler, sqlx, the limiter, each middleware, hyper...), so a layer's
# share is its own cost (its code, and the allocations and system calls it makes), not that of
# the layers inside it. Samples with no such frame (the tokio scheduler, idle parking, the
# kernel's task switches) are charged to "runtime". Output: "share<TAB>layer" lines, largest
# first, after a "# samples N" line.
layer_costs() {
  awk '
    function layer(f) {
      sub(/^</, "", f); sub(/^core::ptr::drop_in_place</, "", f); sub(/^</, "", f)
      if (f ~ /^smartbeak_api::routes::/) return "handler (routes)"
      if (f ~ /^smartbeak_api::auth/) return "auth (key cache, lookup)"
      if (f ~ /^smartbeak_api::ratelimit/) return "rate limiter (ours)"
      if (f ~ /^redis::/) return "redis client"
      if (f ~ /^(sqlx|sqlx_core|sqlx_postgres)::/) return "sqlx (queries, pool)"
      if (f ~ /^smartbeak_database::/) return "database crate (bounds, deadline)"
      if (f ~ /^(metrics|metrics_util|metrics_exporter_prometheus)::/) return "metrics"
      if (f ~ /^smartbeak_api::http::/) return "api middleware (metrics, errors, ip quota)"
      if (f ~ /^(tower_http::trace|tracing|tracing_core|tracing_subscriber)::/) return "tracing spans (TraceLayer)"
      if (f ~ /^tower_http::request_id/) return "request id"
      if (f ~ /^tower_http::catch_panic/) return "catch panic"
      if (f ~ /^tower_http::timeout/) return "request timeout"
      if (f ~ /^tower_http::limit/) return "body limit"
      if (f ~ /^tower::(load_shed|limit)/) return "load shed, concurrency limit"
      if (f ~ /^(serde|serde_json|serde_core)::/) return "serde_json"
      if (f ~ /^(axum|axum_core|matchit)::/) return "axum (routing, extractors)"
      if (f ~ /^(hyper|hyper_util|http_body_util|h2)::/) return "hyper (HTTP/1, socket I/O)"
      return ""
    }
    {
      n = $NF; stack = $0; sub(/ [0-9]+$/, "", stack)
      k = split(stack, fr, ";"); got = "runtime (scheduler, parking, task switches)"
      for (i = k; i >= 1; i--) { l = layer(fr[i]); if (l != "") { got = l; break } }
      cost[got] += n; total += n
    }
    END {
      printf "# samples %d\n", total
      if (total > 0) for (l in cost) printf "%.2f%%\t%s\n", 100 * cost[l] / total, l
    }' "$1" | sort -t$'\t' -k1,1 -rn
}

# pg_ceiling <round>: pgbench on the key-and-domain lookup, one joined query a transaction.
pg_ceiling() {
  local round=$1 file=$out/r$1-pgbench.txt
  cat >"$out/lookup.sql" <<'SQL'
SELECT d.id, d.name, d.status, d.created_at, d.updated_at
  FROM api_keys k JOIN domains d ON d.org_id = k.org_id
 WHERE k.key_hash = decode(:hash, 'hex') AND k.revoked_at IS NULL AND d.id = :id::uuid;
SQL
  pgbench -n -M prepared -c "$pg_clients" -j "$threads" -T "$secs" -f "$out/lookup.sql" \
    -D hash="$hash_cur" -D id="$domain_cur" "$url_cur" >"$file" 2>&1 ||
    { cat "$file" >&2; echo "ab.sh: pgbench failed (round $round)" >&2; exit 1; }
  local tps lat
  tps=$(awk '/^tps = / {print $3}' "$file" | tail -1)
  lat=$(awk '/^latency average = / {print $4}' "$file")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" pgbench "$tps" "$lat" nan nan 0 >>"$results"
  printf '   %-16s %10s tps    (latency average %s ms, %s clients)\n' pgbench "$tps" "$lat" "$pg_clients"
}

echo "== seeding"
setup base "$out/baseline-api"
setup cur "$out/current-api"
start_api seed-base "$out/baseline-api" "$url_base" off
domain_base=$(domain "$api_base" "$key_base"); stop_api
start_api seed-cur "$out/current-api" "$url_cur" off
domain_cur=$(domain "$api_base" "$key_cur"); stop_api
[ -n "$domain_base" ] && [ -n "$domain_cur" ] || { echo "ab.sh: creating the domains failed" >&2; exit 1; }

variants=(base-on cur-on base-off cur-off)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date -u +%FT%TZ)
echo "== $rounds rounds of wrk -t$threads -c$connections -d$duration --latency GET /v1/domains/{id} (load average $load_start)"
for round in $(seq 1 "$rounds"); do
  echo "-- round $round"
  for i in 0 1 2 3; do
    v=${variants[$(( (i + round - 1) % 4 ))]}
    case $v in
      base-*) bin=$out/baseline-api; url=$url_base; key=$key_base; id=$domain_base ;;
      cur-*) bin=$out/current-api; url=$url_cur; key=$key_cur; id=$domain_cur ;;
    esac
    start_api "$v-$round" "$bin" "$url" "${v#*-}"
    auth_file "$key"
    curl -sf "$api_base/v1/domains/$id" -H @"$out/curl-auth" >/dev/null ||
      { echo "ab.sh: $v: GET /v1/domains/$id failed before the run" >&2; exit 1; }
    measure "$round" "$v" "$api_base/v1/domains/$id" "$key"
    if [ "$v" = cur-on ]; then
      measure "$round" healthz "$api_base/healthz" ""
    fi
    stop_api
  done
  pg_ceiling "$round"
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
if [ -n "$profile" ]; then
  echo "-- profiled round (perf record; not in the medians)"
  for v in base-on cur-on cur-off; do
    case $v in
      base-*) bin=$out/baseline-api; url=$url_base; key=$key_base; id=$domain_base ;;
      cur-*) bin=$out/current-api; url=$url_cur; key=$key_cur; id=$domain_cur ;;
    esac
    start_api "$v-profile" "$bin" "$url" "${v#*-}"
    measure profile "$v" "$api_base/v1/domains/$id" "$key"
    stop_api
  done
  echo "== profiles in $profile"
fi

# The summary: medians per variant, then the ratios of the medians.
summary=$(awk -F'\t' -v want_rounds="$rounds" '
  function median(list, n,   a, i, j, t) {
    n = split(list, a, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  { rps[$2] = rps[$2] " " $3; p50[$2] = p50[$2] " " $4; p90[$2] = p90[$2] " " $5;
    p99[$2] = p99[$2] " " $6; err[$2] += $7; seen[$2] = 1 }
  END {
    for (v in seen) printf "median\t%s\t%.0f\t%s\t%s\t%s\t%d\n", v, median(rps[v]), median(p50[v]), median(p90[v]), median(p99[v]), err[v]
  }' "$results" | sort -k2)
echo "== medians over $rounds rounds (errors summed)"
echo "$summary" | awk -F'\t' '{ printf "   %-16s %10s /s  p50 %8s ms  p90 %8s ms  p99 %8s ms  errors %s\n", $2, $3, $4, $5, $6, $7 }'
med() { echo "$summary" | awk -F'\t' -v v="$1" -v c="$2" '$2 == v { print $c }'; }
# A ratio, or null (JSON) when either side is missing.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b > 0) printf "%.2f", a / b; else print "null" }'; }
r_base=$(ratio "$(med cur-on 3)" "$(med base-on 3)")
r_off=$(ratio "$(med cur-on 3)" "$(med cur-off 3)")
r_hz=$(ratio "$(med cur-on 3)" "$(med healthz 3)")
r_pg=$(ratio "$(med cur-on 3)" "$(med pgbench 3)")
p99_on=$(med cur-on 6)
errors_on=$(( $(med cur-on 7) + $(med cur-off 7) ))
verdict() { if awk -v a="$1" -v op="$2" -v b="$3" 'BEGIN { exit !(op == ">=" ? a >= b : a <= b) }'; then echo met; else echo "NOT met"; fi; }
echo "== targets (ratios of the medians)"
echo "   current limiter-on / baseline limiter-on: ${r_base}x (target >= 2: $(verdict "$r_base" '>=' 2))"
echo "   current limiter-on / current limiter-off: ${r_off}x (target >= 0.9: $(verdict "$r_off" '>=' 0.9))"
echo "   current limiter-on p99: ${p99_on} ms (target <= 50: $(verdict "$p99_on" '<=' 50))"
echo "   current errors (on + off, all rounds): $errors_on (target 0: $(verdict "$errors_on" '<=' 0))"
echo "   current limiter-on / /healthz ceiling: ${r_hz}; / pgbench ceiling: ${r_pg}"
echo "   load average: $load_start at the start, $load_end at the end"

if [ -n "$json" ]; then
  {
    printf '{"baseline":"%s","current":"%s","current_dirty":%s,"started":"%s","rounds":%s,' \
      "$base_commit" "$cur_commit" "$([ -n "$cur_dirty" ] && echo true || echo false)" "$started" "$rounds"
    printf '"duration":"%s","connections":%s,"threads":%s,"pgbench_clients":%s,' "$duration" "$connections" "$threads" "$pg_clients"
    printf '"load_start":"%s","load_end":"%s","runs":[' "$load_start" "$load_end"
    awk -F'\t' 'BEGIN { s = "" } { printf "%s{\"round\":%s,\"variant\":\"%s\",\"per_sec\":%s,\"p50_ms\":%s,\"p90_ms\":%s,\"p99_ms\":%s,\"errors\":%s}", s, $1, $2, $3, ($4 == "nan" ? "null" : $4), ($5 == "nan" ? "null" : $5), ($6 == "nan" ? "null" : $6), $7; s = "," }' "$results"
    printf '],"ratios":{"on_vs_baseline_on":%s,"on_vs_off":%s,"on_vs_healthz":%s,"on_vs_pgbench":%s}}\n' \
      "$r_base" "$r_off" "$r_hz" "$r_pg"
  } >"$json"
  echo "== wrote $json"
fi
