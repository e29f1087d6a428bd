#!/usr/bin/env bash
# Whole-program comparison of blocksnap with restic, borg and casync on a
# real ext4 disk image (issue #4). Installs the peers with apt-get if they
# are missing, builds the workload, times every step with /usr/bin/time
# (wall, CPU, peak RSS), checks every restore byte-exact, measures the raw
# bounds (b3sum, cat, cp, zstd) in the same run, and writes the tables into
# docs/BENCHMARKS.md between the "peers" markers.
#
# Usage: bench/peers.sh [IMAGE_SIZE]        (default 2G)
# Work directory: $BLOCKSNAP_BENCH_DIR (default /var/tmp/blocksnap-peers);
# the workload images are kept there and reused by later runs.
#
# Workload (as the team's reference measurements): v1 is an ext4 image made with
# `mke2fs -t ext4 -d` from about 1.0 GB of real files from /usr/share and
# /usr/lib; v2 is v1 with 1% of the image rewritten by random 4 KiB-aligned
# 4 KiB writes (seeded).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
size=${1:-2G}
work=${BLOCKSNAP_BENCH_DIR:-/var/tmp/blocksnap-peers}
mkdir -p "$work"

need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need restic restic
need borg borgbackup
need casync casync
need b3sum b3sum
need mke2fs e2fsprogs
need zstd zstd
[ -x /usr/bin/time ] || apt-get install -y -qq time >/dev/null

cargo build --release --quiet
bs=$root/target/release/blocksnap

# ---------------------------------------------------------------- workload
# shellcheck source=bench/workload.sh
. bench/workload.sh

# ---------------------------------------------------------------- harness
results=$work/results.tsv
: >"$results"
warm() { cat "$@" >/dev/null 2>&1 || true; }
warm_tree() { find "$@" -type f -exec cat {} + >/dev/null 2>&1 || true; }
# run TOOL STEP STORE_DIR CMD...: times CMD, records wall, cpu, rss, bytes stored
run() {
  local tool=$1 step=$2 store=$3
  shift 3
  local tf
  tf=$(mktemp)
  sync # no writeback left over from the previous step
  /usr/bin/time -f "%e %U %S %M" -o "$tf" "$@" >/dev/null 2>"$work/last.err" || {
    echo "FAILED: $tool $step"; cat "$work/last.err"; exit 1; }
  read -r wall user sys rss <"$tf"
  rm -f "$tf"
  local stored=0
  [ -n "$store" ] && stored=$(du -sb "$store" | cut -f1)
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$step" "$wall" \
    "$(python3 -c "print(round($user + $sys, 2))")" "$rss" "$stored" | tee -a "$results"
}
check() { # check FILE: byte-exact against v1
  cmp -s "$1" "$v1" || { echo "FAILED: $1 differs from v1"; exit 1; }
}

run_dir=$work/run
out=$work/out
setup_disk() { rm -rf "$run_dir" "$out"; mkdir -p "$run_dir" "$out"; cp "$1" "$run_dir/disk.img"; }

# ---------------------------------------------------------------- raw bounds
warm "$v1"; run raw b3sum "" b3sum --num-threads 2 "$v1"
warm "$v1"; run raw cat "" cat "$v1"
warm "$v1"; rm -f "$work/copy.img"; run raw cp "" cp "$v1" "$work/copy.img"
warm "$v1"; rm -f "$work/copy.img"; run raw cp+sync "" sh -c "cp '$v1' '$work/copy.img' && sync '$work/copy.img'"
rm -f "$work/copy.img"
warm "$v1"; rm -f "$work/v1.zst"; run raw zstd-3-T2 "" zstd -q -3 -T2 "$v1" -o "$work/v1.zst"
printf 'raw\tzstd-3-T2-bytes\t0\t0\t0\t%s\n' "$(stat -c %s "$work/v1.zst")" | tee -a "$results"
warm "$work/v1.zst"; rm -f "$work/v1.unz"; run raw zstd-d "" zstd -q -d "$work/v1.zst" -o "$work/v1.unz"
rm -f "$work/v1.zst" "$work/v1.unz"

# ---------------------------------------------------------------- blocksnap
blocksnap_suite() { # NAME INIT_ARGS...
  local name=$1
  shift
  local store=$work/store-$name
  rm -rf "$store"
  "$bs" --store "$store" init "$@" >/dev/null
  setup_disk "$v1"
  "$bs" --store "$store" server add --id 1 --name bench --disk "$run_dir/disk.img" >/dev/null
  warm "$run_dir/disk.img"; run "$name" first "$store" "$bs" --store "$store" snapshot create --server 1 --name v1
  cp "$v2" "$run_dir/disk.img"
  warm "$run_dir/disk.img"; run "$name" second "$store" "$bs" --store "$store" snapshot create --server 1 --name v2
  rm -f "$run_dir/disk.img"
  warm_tree "$store"; run "$name" restore "$store" "$bs" --store "$store" snapshot restore 1
  check "$run_dir/disk.img"
  cp "$v2" "$run_dir/disk.img"
  warm "$run_dir/disk.img"; warm_tree "$store"; run "$name" restore-onto-v2 "$store" "$bs" --store "$store" snapshot restore 1
  check "$run_dir/disk.img"
}
blocksnap_suite blocksnap
blocksnap_suite blocksnap-balanced --compression balanced
blocksnap_suite blocksnap-compact --compression compact

# ---------------------------------------------------------------- restic
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$work/restic-cache
repo=$work/restic
rm -rf "$repo" "$RESTIC_CACHE_DIR"
restic -r "$repo" init --repository-version 2 -q >/dev/null
setup_disk "$v1"
cd "$run_dir"
warm disk.img; run restic first "$repo" restic -r "$repo" backup -q --tag v1 disk.img
cp "$v2" disk.img
warm disk.img; run restic second "$repo" restic -r "$repo" backup -q --tag v2 disk.img
warm_tree "$repo"; run restic restore "$repo" restic -r "$repo" restore latest --tag v1 --target "$out"
check "$out/disk.img"
rm -rf "$out" && mkdir -p "$out" && cp "$v2" "$out/disk.img"
warm "$out/disk.img"; warm_tree "$repo"; run restic restore-onto-v2 "$repo" restic -r "$repo" restore latest --tag v1 --target "$out"
check "$out/disk.img"
cd "$root"

# ---------------------------------------------------------------- borg
export BORG_PASSPHRASE= BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_BASE_DIR=$work/borg-base
borg_suite() { # NAME CREATE_ARGS...
  local name=$1
  shift
  local repo=$work/$name
  rm -rf "$repo" "$BORG_BASE_DIR"
  borg init -e none "$repo" >/dev/null 2>&1
  setup_disk "$v1"
  cd "$run_dir"
  warm disk.img; run "$name" first "$repo" borg create "$@" "$repo::v1" disk.img
  cp "$v2" disk.img
  warm disk.img; run "$name" second "$repo" borg create "$@" "$repo::v2" disk.img
  cd "$out"
  warm_tree "$repo"; run "$name" restore "$repo" borg extract "$repo::v1"
  check "$out/disk.img"
  cp "$v2" "$out/disk.img"
  warm "$out/disk.img"; warm_tree "$repo"; run "$name" restore-onto-v2 "$repo" borg extract "$repo::v1"
  check "$out/disk.img"
  cd "$root"
}
borg_suite borg --compression zstd,3
borg_suite borg-fixed-64k --compression zstd,3 --chunker-params fixed,65536

# ---------------------------------------------------------------- casync
store=$work/casync
rm -rf "$store" "$work"/*.caibx
setup_disk "$v1"
warm "$run_dir/disk.img"; run casync first "$store" casync make --store="$store" "$work/v1.caibx" "$run_dir/disk.img"
cp "$v2" "$run_dir/disk.img"
warm "$run_dir/disk.img"; run casync second "$store" casync make --store="$store" "$work/v2.caibx" "$run_dir/disk.img"
warm_tree "$store"; run casync restore "$store" casync extract --store="$store" "$work/v1.caibx" "$out/disk.img"
check "$out/disk.img"
cp "$v2" "$out/disk.img"
warm "$out/disk.img"; warm_tree "$store"; run casync restore-onto-v2 "$store" casync extract --reflink=no --store="$store" "$work/v1.caibx" "$out/disk.img"
check "$out/disk.img"

# ---------------------------------------------------------------- report
python3 bench/peers_report.py "$results" "$size" docs/BENCHMARKS.md
