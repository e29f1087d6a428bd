#!/usr/bin/env bash
# Runs schemathesis against a live `blocksnap serve` with docs/openapi.yaml.
# Usage: scripts/schemathesis.sh [MAX_EXAMPLES]   (default 25 per operation)
# Needs: pip install schemathesis (done by .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
max_examples=${1:-${SCHEMATHESIS_MAX_EXAMPLES:-25}}

token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
# shellcheck source=serve-lib.sh
. scripts/serve-lib.sh
serve_store 3 262144 "$token"
echo "schemathesis against $url, $max_examples examples per operation"

# The command pip installed, found without relying on PATH (pyenv shims
# appear only after a rehash).
st=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/schemathesis
[ -x "$st" ] || st=schemathesis
"$st" --config-file scripts/schemathesis.toml run docs/openapi.yaml \
  --url "$url" \
  --header "Authorization: Bearer $token" \
  --checks all \
  --max-examples "$max_examples" \
  --workers 1 \
  --seed "${SCHEMATHESIS_SEED:-2026}"
