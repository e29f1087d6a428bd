#!/usr/bin/env bash
# What a restore's safety snapshot and its read-back verification cost
# (issue #7), on the 2 GiB ext4 workload of bench/peers.sh: restoring v1
# onto v2 (1% of the image rewritten, 14.8% of the blocks), with change
# tracking (the disk is known to hold snapshot 2: `--current 2`) and
# without (every block compared), each with and without the safety
# snapshot, and with and without verification. Every variant runs three
# times (the disk reset to v2 and all inputs re-read before each); the
# median is reported. Writes its table into docs/BENCHMARKS.md between the
# "restore-safety" markers.
#
# Usage: bench/restore_safety.sh [IMAGE_SIZE]        (default 2G; ~3 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-2G}
work=${BLOCKSNAP_BENCH_DIR:-/var/tmp/blocksnap-peers}
mkdir -p "$work"
need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need mke2fs e2fsprogs
# shellcheck source=bench/workload.sh
. bench/workload.sh
cargo build --release --quiet
bs=$PWD/target/release/blocksnap

r=$work/restore-safety
rm -rf "$r" && mkdir -p "$r"
store=$r/store
disk=$r/disk.img
cp "$v1" "$disk"
"$bs" --store "$store" init >/dev/null
"$bs" --store "$store" server add --id 1 --name web --disk "$disk" >/dev/null
"$bs" --store "$store" snapshot create --server 1 --name v1 >/dev/null
cp "$v2" "$disk"
"$bs" --store "$store" snapshot create --server 1 --name v2 >/dev/null

: >"$r/results.tsv"
variant() { # NAME ARGS...: three runs of `snapshot restore 1 ARGS`
  local name=$1
  shift
  for i in 1 2 3; do
    cp "$v2" "$disk"; sync
    cat "$disk" >/dev/null
    find "$store" -type f -exec cat {} + >/dev/null
    "$bs" --store "$store" snapshot restore 1 "$@" --json >"$r/out.json"
    cmp -s "$disk" "$v1" || { echo "FAILED: $name left a disk that is not v1"; exit 1; }
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['seconds'], d['method'], d['safety_snapshot'] is not None, d['blocks_rewritten'], sep='\t')" \
      "$r/out.json" "$name" | tee -a "$r/results.tsv"
  done
}
variant tracked-bare --current 2 --no-safety-snapshot --no-verify
variant tracked-verify --current 2 --no-safety-snapshot
variant tracked-safety --current 2 --no-verify
variant tracked-both --current 2
variant compare-bare --no-safety-snapshot --no-verify
variant compare-verify --no-safety-snapshot
variant compare-safety --no-verify
variant compare-both

python3 bench/restore_safety_report.py "$r/results.tsv" "$size" docs/BENCHMARKS.md
