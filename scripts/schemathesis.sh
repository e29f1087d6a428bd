#!/usr/bin/env bash
# Runs schemathesis against a live `blocksnap serve` with docs/openapi.yaml.
# Usage: scripts/schemathesis.sh [MAX_EXAMPLES]   (default 25 per operation)
# Needs: pip install schemathesis (done by .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
max_examples=${1:-${SCHEMATHESIS_MAX_EXAMPLES:-25}}

cargo build --release --quiet
bin=target/release/blocksnap
work=$(mktemp -d)
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

store=$work/store
"$bin" --store "$store" init --block-size 4K >/dev/null
for id in 1 2 3; do
  head -c $((256 * 1024)) /dev/urandom >"$work/disk$id.img"
  "$bin" --store "$store" server add --id "$id" --name "server-$id" --disk "$work/disk$id.img" >/dev/null
done

token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
BLOCKSNAP_API_TOKEN=$token "$bin" --store "$store" serve --listen 127.0.0.1:0 >"$work/out" 2>"$work/err" &
server_pid=$!
for _ in $(seq 100); do
  grep -q "listening on" "$work/out" 2>/dev/null && break
  sleep 0.1
done
url=$(sed -n 's/^listening on //p' "$work/out")
[ -n "$url" ] || { echo "server did not start:"; cat "$work/err"; exit 1; }
echo "schemathesis against $url, $max_examples examples per operation"

schemathesis --config-file scripts/schemathesis.toml run docs/openapi.yaml \
  --url "$url" \
  --header "Authorization: Bearer $token" \
  --checks all \
  --max-examples "$max_examples" \
  --workers 1 \
  --seed "${SCHEMATHESIS_SEED:-2026}"
