#!/usr/bin/env bash
# Incremental capture and delta restore on the realistic ext4 workload
# (issue #5), against their physical floors and against restic, borg and
# casync on the same second capture. Writes its table into
# docs/BENCHMARKS.md between the "incremental" markers.
#
# Usage: bench/incremental.sh [IMAGE_SIZE]        (default 2G; ~3 minutes)
# Work directory: $BLOCKSNAP_BENCH_DIR (default /var/tmp/blocksnap-peers),
# shared with bench/peers.sh, whose workload it reuses (bench/workload.sh).
#
# Steps, each timed with /usr/bin/time and every input re-read right
# before it (these machines evict pages idle for a minute):
# - blocksnap: a full snapshot of v1, then `snapshot create --parent 1
#   --dirty-bitmap` of v2 (a: scattered 4 KiB writes) and of v2b (b: 1 MiB
#   runs), each bitmap marking the 64 KiB blocks the writes touched; then
#   `snapshot restore 1 --current N` of v1 onto each (a delta restore:
#   the disk is known to hold snapshot N, nothing is read), without the
#   safety snapshot and the read-back, which the floor does not do either
#   (bench/restore_safety.sh measures those);
# - the floors (examples/dirty_floor.rs): BLAKE3 + zstd of the dirty blocks
#   alone; zstd -d + write (+ fsync) of the differing blocks alone;
# - the peers: first capture of v1 (untimed), second capture of v2b; and
#   casync's seeded extract of v1 onto a copy of v2b.
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
need mke2fs e2fsprogs
[ -x /usr/bin/time ] || apt-get install -y -qq time >/dev/null

# shellcheck source=bench/workload.sh
. bench/workload.sh

cargo build --release --quiet --example dirty_floor
bs=$root/target/release/blocksnap
floor=$root/target/release/examples/dirty_floor

inc=$work/inc
rm -rf "$inc" && mkdir -p "$inc"
results=$inc/results.tsv
: >"$results"
warm() { cat "$@" >/dev/null 2>&1 || true; }
warm_tree() { find "$@" -type f -exec cat {} + >/dev/null 2>&1 || true; }
# run NAME CMD...: wall and CPU seconds of CMD; its stdout kept in $inc/NAME.out
run() {
  local name=$1
  shift
  local tf
  tf=$(mktemp)
  sync
  /usr/bin/time -f "%e %U %S" -o "$tf" "$@" >"$inc/$name.out" 2>"$inc/last.err" || {
    echo "FAILED: $name"; cat "$inc/last.err"; exit 1; }
  read -r wall user sys <"$tf"
  rm -f "$tf"
  printf '%s\t%s\t%s\n' "$name" "$wall" "$(python3 -c "print(round($user + $sys, 3))")" | tee -a "$results"
}
check() { cmp -s "$1" "$2" || { echo "FAILED: $1 differs from $2"; exit 1; }; }

# The dirty bitmaps: the 64 KiB blocks each version's writes touched.
bitmap() { # OLD NEW OUT
  python3 - "$1" "$2" "$3" <<'PY'
import sys
BS = 65536
a, b = open(sys.argv[1], "rb"), open(sys.argv[2], "rb")
bits, i = bytearray(), 0
while True:
    x, y = a.read(BS), b.read(BS)
    if not x:
        break
    if i % 8 == 0:
        bits.append(0)
    if x != y:
        bits[-1] |= 1 << (i % 8)
    i += 1
open(sys.argv[3], "wb").write(bits)
print(f"{sys.argv[3]}: {sum(bin(c).count('1') for c in bits)} of {i} blocks dirty")
PY
}
bitmap "$v1" "$v2" "$inc/a.bits"
bitmap "$v1" "$v2b" "$inc/b.bits"

# ---------------------------------------------------------------- blocksnap
store=$inc/store
disk=$inc/disk.img
"$bs" --store "$store" init >/dev/null
cp "$v1" "$disk"
"$bs" --store "$store" server add --id 1 --name bench --disk "$disk" >/dev/null
warm "$disk"; "$bs" --store "$store" snapshot create --server 1 --name v1 >/dev/null
for kind in a b; do
  src=$v2; [ $kind = b ] && src=$v2b
  cp "$src" "$disk"
  warm "$disk" "$inc/$kind.bits"; warm_tree "$store"
  run "blocksnap-incremental-$kind" "$bs" --store "$store" snapshot create --server 1 \
    --name "v2$kind" --parent 1 --dirty-bitmap "$inc/$kind.bits"
done
# Snapshot 2 is v2 (a), 3 is v2b (b). Delta restores of v1 onto each.
for kind in a b; do
  src=$v2; snap=2; [ $kind = b ] && { src=$v2b; snap=3; }
  cp "$src" "$disk"; sync
  warm_tree "$store"
  run "blocksnap-delta-restore-$kind" "$bs" --store "$store" snapshot restore 1 --current $snap \
    --no-safety-snapshot --no-verify --json
  check "$disk" "$v1"
  # The same restore comparing every block instead (no knowledge).
  cp "$src" "$disk"; sync
  warm "$disk"; warm_tree "$store"
  run "blocksnap-compare-restore-$kind" "$bs" --store "$store" snapshot restore 1 \
    --no-safety-snapshot --no-verify --json
  check "$disk" "$v1"
done

# ---------------------------------------------------------------- sparse
# The same 64 MiB of data (v1's first 64 MiB) in a sparse 1 GiB and a
# sparse 16 GiB image: the capture time follows the data, not the length.
for len in 1G 16G; do
  img=$inc/sparse-$len.img
  rm -f "$img"; truncate -s "$len" "$img"
  dd if="$v1" of="$img" bs=1M count=32 conv=notrunc status=none
  dd if="$v1" of="$img" bs=1M count=32 skip=32 seek=$(( $(stat -c %s "$img") / 1048576 - 32 )) conv=notrunc status=none
  s=$inc/store-sparse-$len
  "$bs" --store "$s" init >/dev/null
  "$bs" --store "$s" server add --id 1 --name sparse --disk "$img" >/dev/null
  warm "$img"
  run "blocksnap-sparse-$len" "$bs" --store "$s" snapshot create --server 1 --name s
  rm -f "$img"
  warm_tree "$s"
  run "blocksnap-sparse-restore-$len" "$bs" --store "$s" snapshot restore 1
  printf 'sparse-%s-allocated	%s	0
' "$len" "$(du -B1 "$img" | cut -f1)" | tee -a "$results"
  rm -rf "$img" "$s"
done

# ---------------------------------------------------------------- floors
for kind in a b; do
  src=$v2; [ $kind = b ] && src=$v2b
  warm "$src"
  "$floor" capture "$src" "$inc/$kind.bits" 1 | tee "$inc/floor-capture-$kind.out"
  cp "$src" "$inc/target.img"; sync
  warm "$v1"
  "$floor" restore "$v1" "$inc/$kind.bits" "$inc/target.img" 1 | tee "$inc/floor-restore-$kind.out"
  check "$inc/target.img" "$v1"
  rm -f "$inc/target.img"
done

# ---------------------------------------------------------------- peers, (b)
peer_dir=$inc/peer
mkdir -p "$peer_dir"
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$inc/restic-cache
restic -r "$inc/restic" init --repository-version 2 -q >/dev/null
cp "$v1" "$peer_dir/disk.img"
cd "$peer_dir"
restic -r "$inc/restic" backup -q disk.img >/dev/null
cp "$v2b" disk.img; warm disk.img
run restic-second-b restic -r "$inc/restic" backup -q disk.img
cd "$root"
export BORG_PASSPHRASE= BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_BASE_DIR=$inc/borg-base
for variant in borg borg-fixed-64k; do
  args=(--compression zstd,3)
  [ $variant = borg-fixed-64k ] && args+=(--chunker-params fixed,65536)
  borg init -e none "$inc/$variant" >/dev/null 2>&1
  cp "$v1" "$peer_dir/disk.img"
  cd "$peer_dir"
  borg create "${args[@]}" "$inc/$variant::v1" disk.img
  cp "$v2b" disk.img; warm disk.img
  run "$variant-second-b" borg create "${args[@]}" "$inc/$variant::v2" disk.img
  cd "$root"
done
cp "$v1" "$peer_dir/disk.img"
casync make --store="$inc/casync" "$inc/v1.caibx" "$peer_dir/disk.img" >/dev/null
cp "$v2b" "$peer_dir/disk.img"; warm "$peer_dir/disk.img"
run casync-second-b casync make --store="$inc/casync" "$inc/v2b.caibx" "$peer_dir/disk.img"
rm -f "$inc/out.img"; warm "$peer_dir/disk.img"; warm_tree "$inc/casync"
run casync-seeded-restore-b casync extract --store="$inc/casync" --seed="$peer_dir/disk.img" "$inc/v1.caibx" "$inc/out.img"
check "$inc/out.img" "$v1"

# ---------------------------------------------------------------- report
python3 bench/incremental_report.py "$inc" "$size" docs/BENCHMARKS.md
