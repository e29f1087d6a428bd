#!/usr/bin/env bash
# cargo-mutants over the storage core (the files in .cargo/mutants.toml),
# on a round-robin sample that fits these machines: shard 1/20 (about 80
# mutants) takes some 45 minutes on 2 cores. Each mutant is built and
# tested in a worktree of HEAD with the library's unit tests and the
# integration tests, the fault tests taking every 5th trial
# (BLOCKSNAP_FAULTS_STRIDE). Prints the caught/missed/timeout/unviable
# counts and the missed mutants; docs/RELIABILITY.md says what each missed
# one got (a test that kills it, or why it is equivalent).
#
# Usage: scripts/cargo-mutants.sh [SHARD]      (default 1/20; 0/1 is all)
set -euo pipefail
cd "$(dirname "$0")/.."
shard=${1:-1/20}
command -v cargo-mutants >/dev/null || cargo install cargo-mutants --locked
work=${BLOCKSNAP_MUTANTS_DIR:-/var/tmp/blocksnap-cargo-mutants}
rm -rf "$work/tree" "$work/mutants.out"
mkdir -p "$work"
git worktree prune
git worktree add --detach -f "$work/tree" HEAD >/dev/null
trap 'git worktree remove --force "$work/tree"' EXIT
start=$(date +%s)
(
  cd "$work/tree"
  BLOCKSNAP_FAULTS_STRIDE=5 CARGO_TARGET_DIR="$work/target" \
    cargo mutants --in-place --shard "$shard" --sharding round-robin \
    --timeout 90 --build-timeout 600 -o "$work" >"$work/run.log" 2>&1 || true
)
out=$work/mutants.out
count() { [ -f "$out/$1.txt" ] && wc -l <"$out/$1.txt" || echo 0; }
echo "cargo-mutants shard $shard of the storage core: $(count caught) caught, $(count missed) missed, $(count timeout) timeout, $(count unviable) unviable ($(( ($(date +%s) - start) / 60 )) minutes)"
[ -s "$out/missed.txt" ] && { echo "missed:"; sed 's/^/  /' "$out/missed.txt"; }
exit 0
