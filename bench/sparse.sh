#!/usr/bin/env bash
# Memory that follows a disk's data, not its size (issue #16): a 1 TiB
# sparse image (16,777,216 blocks of 64 KiB) holding 2.5 MiB, captured,
# listed, verified, and restored after 16 of its blocks were overwritten;
# each step a process of its own, timed with /usr/bin/time (wall time,
# peak RSS).
#
# Usage: bench/sparse.sh [SIZE]   (default 1T; needs a file system with
# sparse files, ~10 MB of real space)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1T}
work=${BLOCKSNAP_BENCH_DIR:-/var/tmp/blocksnap-sparse}
target=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --quiet --bin blocksnap
bs=$target/release/blocksnap
rm -rf "$work" && mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
disk=$work/disk.img
truncate -s "$size" "$disk"
len=$(stat -c %s "$disk")
# 2 MiB at the start, then 8 blocks of 64 KiB spread over the disk.
head -c $((2 << 20)) /dev/urandom | dd of="$disk" conv=notrunc status=none
for k in 1 2 3 4 5 6 7 8; do
  head -c 65536 /dev/urandom |
    dd of="$disk" bs=65536 seek=$((len / 65536 * k / 9)) conv=notrunc status=none
done

step() { # NAME CMD...
  local name=$1; shift
  /usr/bin/time -f "$name %e %M" -o "$work/time" "$@" >/dev/null
  cat "$work/time"
}
store=(--store "$work/store")
"$bs" "${store[@]}" init >/dev/null
"$bs" "${store[@]}" server add --id 1 --name sparse --disk "$disk" >/dev/null
echo "step seconds peak_rss_kib"
step capture "$bs" "${store[@]}" snapshot create --server 1 --name one
step list "$bs" "${store[@]}" snapshot list
step verify "$bs" "${store[@]}" verify
# 16 blocks overwritten, then restored.
for k in $(seq 1 16); do
  head -c 65536 /dev/urandom |
    dd of="$disk" bs=65536 seek=$((len / 65536 * k / 17)) conv=notrunc status=none
done
step restore "$bs" "${store[@]}" snapshot restore 1 --no-safety-snapshot
step capture2 "$bs" "${store[@]}" snapshot create --server 1 --name two
ls -l "$work/store/manifests" | awk '/manifest$/ {print "manifest_bytes", $5}'
