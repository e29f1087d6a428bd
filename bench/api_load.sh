#!/usr/bin/env bash
# Load check of `blocksnap serve`: GET /api/v1/snapshots/ with 1,000
# snapshots in the store (200 servers x 5), from concurrent clients on
# loopback, bounded in time. Prints wrk's requests/s and latency
# distribution; fails if any request errors or answers non-2xx.
#
# Usage: bench/api_load.sh [SECONDS] [CONNECTIONS]   (default 10 s, 16)
# Needs: wrk (apt-get install wrk), curl.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
connections=${2:-16}
servers=200

command -v wrk >/dev/null || { echo "wrk is not installed: apt-get install wrk"; exit 1; }
token=load-test-token
# shellcheck source=../scripts/serve-lib.sh
. scripts/serve-lib.sh
serve_store "$servers" 16384 "$token"

auth="Authorization: Bearer $token"
for id in $(seq $servers); do
  for k in 1 2 3 4 5; do
    curl -sf -o /dev/null -H "$auth" -H 'Content-Type: application/json' \
      -d "{\"server_id\": $id, \"name\": \"snap-$k\"}" "$url/api/v1/snapshots/"
  done
done
for _ in $(seq 600); do
  pending=$(curl -sf -H "$auth" "$url/api/v1/snapshots/" | { grep -o '"in_progress"' || true; } | wc -l)
  [ "$pending" -eq 0 ] && break
  sleep 0.1
done
count=$(curl -sf -H "$auth" "$url/api/v1/snapshots/" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')
bytes=$(curl -sf -H "$auth" "$url/api/v1/snapshots/" | wc -c)
echo "store holds $count snapshots; one listing is $bytes bytes"

wrk -t2 -c"$connections" -d"${seconds}s" --latency -H "$auth" "$url/api/v1/snapshots/" | tee "$work/wrk"
if grep -qE "Non-2xx|Socket errors" "$work/wrk"; then
  echo "FAILED: errors during the load check"
  exit 1
fi
