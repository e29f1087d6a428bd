#!/usr/bin/env bash
# Peak memory of a capture and a restore of a large disk (issue #4: under
# 300 MiB plus the chunk index, whatever the disk size).
#
# Usage: bench/rss.sh [GiB [COMPRESSION]]   (default 16 and fast; needs that
#        much free disk twice; COMPRESSION as for `blocksnap init`)
# The disk is the sample generator's mix (text, random, zero, repeats),
# written by `blocksnap demo`'s generator through a tiny example program.
set -euo pipefail
cd "$(dirname "$0")/.."
gib=${1:-16}
compression=${2:-fast}
work=${BLOCKSNAP_BENCH_DIR:-/var/tmp/blocksnap-peers}/rss
rm -rf "$work" && mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
cargo build --release --quiet --example sample_image
cargo build --release --quiet
bs=target/release/blocksnap
target/release/examples/sample_image "$work/disk.img" "$gib"
"$bs" --store "$work/store" init --compression "$compression" >/dev/null
"$bs" --store "$work/store" server add --id 1 --name big --disk "$work/disk.img" >/dev/null
sync
/usr/bin/time -f "capture: %e s wall, %M KiB peak RSS" "$bs" --store "$work/store" snapshot create --server 1 --name big
rm -f "$work/disk.img"
sync
/usr/bin/time -f "restore: %e s wall, %M KiB peak RSS" "$bs" --store "$work/store" snapshot restore 1
du -sh "$work/store"
