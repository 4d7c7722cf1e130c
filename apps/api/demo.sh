#!/usr/bin/env bash
# The api part of `cargo xtask demo`: on a migrated $DATABASE_URL (and $REDIS_URL if set),
# creates an org and a key with the CLI, starts the api on a free port, makes a few real
# calls printing their results, and stops it with SIGTERM (exit code from the shutdown
# report). Needs curl.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cargo build --quiet -p smartbeak-api --manifest-path "$root/Cargo.toml"
bin=${SMARTBEAK_API_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/smartbeak-api}
: "${DATABASE_URL:?DATABASE_URL must point at a migrated database}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT

json_field() { sed -E "s/.*\"$1\":\"([^\"]+)\".*/\\1/"; }
show() { echo; echo "\$ $*"; }

org=$("$bin" orgs create --name "Demo Org" | json_field id)
key=$("$bin" keys create --org "$org" --name demo | json_field key)
echo "org $org, key ${key:0:12}… (stored as SHA-256 only)"

API_BIND=127.0.0.1:0 RATE_LIMIT_PER_KEY=20 RATE_LIMIT_KEY_PREFIX="smartbeak-demo:$$" "$bin" >"$log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do grep -q 'listening on http://' "$log" && break; sleep 0.1; done
base=$(sed -nE 's/.*listening on (http:\/\/[0-9.:]+).*/\1/p' "$log" | head -1)
auth="Authorization: Bearer $key"

show GET /readyz
curl -s "$base/readyz"; echo
show POST /v1/domains
domain=$(curl -s -XPOST "$base/v1/domains" -H "$auth" -H 'content-type: application/json' \
  -d '{"name":"demo.example.com"}' | tee /dev/stderr | json_field id)
show POST "/v1/domains/$domain/content"
content=$(curl -s -XPOST "$base/v1/domains/$domain/content" -H "$auth" -H 'content-type: application/json' \
  -d '{"title":"Hello, SmartBeak","slug":"hello","status":"published"}' | tee /dev/stderr | json_field id)
show POST "/v1/domains/$domain/metrics"
today=$(date -u +%Y-%m-%dT00:00:00Z)
curl -s -XPOST "$base/v1/domains/$domain/metrics" -H "$auth" -H 'content-type: application/json' -d "{
  \"keywords\": [
    {\"keyword\":\"rust api\",\"search_volume\":1200,\"position\":3.2,\"clicks\":40,\"impressions\":900,\"ctr\":0.044,\"recorded_at\":\"$today\"},
    {\"keyword\":\"rust api\",\"search_volume\":1400,\"position\":2.8,\"clicks\":55,\"impressions\":1000,\"ctr\":0.055,\"recorded_at\":\"$today\"}],
  \"content\": [
    {\"content_id\":\"$content\",\"page_views\":300,\"unique_visitors\":220,\"bounce_rate\":0.41,\"conversions\":7,\"revenue_cents\":12900,\"recorded_at\":\"$today\"}]}"
echo
show GET "/v1/domains/$domain/analytics"
curl -s "$base/v1/domains/$domain/analytics" -H "$auth"; echo
show POST "/v1/domains/$domain/exports"
curl -s -XPOST "$base/v1/domains/$domain/exports" -H "$auth" -H 'content-type: application/json' \
  -d '{"format":"csv"}'; echo
show GET /v1/domains "(rate limit headers)"
curl -s -D - -o /dev/null "$base/v1/domains" -H "$auth" | grep -iE '^(ratelimit|x-request-id)'
show GET "/v1/domains/not-a-uuid"
curl -s "$base/v1/domains/not-a-uuid" -H "$auth"; echo

kill -TERM "$pid"
status=0
wait "$pid" || status=$?
echo
echo "smartbeak-api exited with $status after SIGTERM"
grep -E 'shutdown complete' "$log" || true
exit "$status"
