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
cargo build --release --quiet
bin=$PWD/target/release/blocksnap
work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

store=$work/store
"$bin" --store "$store" init --block-size 4K >/dev/null
for id in $(seq $servers); do
  head -c 16384 /dev/urandom >"$work/d$id.img"
  "$bin" --store "$store" server add --id "$id" --name "server-$id" --disk "$work/d$id.img" >/dev/null
done

token=load-test-token
BLOCKSNAP_API_TOKEN=$token "$bin" --store "$store" serve --listen 127.0.0.1:0 >"$work/out" 2>/dev/null &
pid=$!
for _ in $(seq 100); do grep -q listening "$work/out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^listening on //p' "$work/out")

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
