#!/usr/bin/env bash
# Garbage collection on a store of 10 snapshots of the 2 GiB ext4 image of
# bench/peers.sh with about 20% of its stored data no longer needed (issue
# #6): wall and CPU time and peak RSS of `blocksnap gc`, what it gave back,
# and the store's bytes against a fresh store holding only the remaining
# snapshots. Writes its table into docs/BENCHMARKS.md between the "gc"
# markers.
#
# Usage: bench/gc.sh [IMAGE_SIZE]        (default 2G; ~3 minutes)
# Work directory: $BLOCKSNAP_BENCH_DIR (default /var/tmp/blocksnap-peers).
#
# The snapshots: version 1 is v1; version k is version k-1 with 8% of the
# image rewritten in seeded 1 MiB runs of text-like data (new file
# contents). Servers 1 and 2 share the disk and take turns (five snapshots
# each, the cap). Then the five oldest are deleted, as a rotation would.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-2G}
work=${BLOCKSNAP_BENCH_DIR:-/var/tmp/blocksnap-peers}
mkdir -p "$work"
need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need mke2fs e2fsprogs
[ -x /usr/bin/time ] || apt-get install -y -qq time >/dev/null
# shellcheck source=bench/workload.sh
. bench/workload.sh
cargo build --release --quiet
bs=$PWD/target/release/blocksnap

g=$work/gc
rm -rf "$g" && mkdir -p "$g"
store=$g/store
disk=$g/disk.img
cp "$v1" "$disk"
"$bs" --store "$store" init >/dev/null
"$bs" --store "$store" server add --id 1 --name a --disk "$disk" >/dev/null
"$bs" --store "$store" server add --id 2 --name b --disk "$disk" >/dev/null
for k in $(seq 1 10); do
  if [ "$k" -gt 1 ]; then
    python3 - "$disk" "$k" <<'PY'
import os, random, sys
path, k = sys.argv[1], int(sys.argv[2])
size = os.path.getsize(path)
rng = random.Random(k)
run = 1 << 20
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(2, 10))) for _ in range(5000)]
with open(path, "r+b") as f:
    for _ in range(size * 8 // 100 // run):
        text = " ".join(rng.choices(words, k=run // 5)).encode()[:run]
        f.seek(rng.randrange((size - run) // 4096) * 4096)
        f.write(text.ljust(run, b"\n"))
PY
  fi
  cp --sparse=always "$disk" "$g/version-$k.img"
  "$bs" --store "$store" snapshot create --server $(( (k - 1) % 2 + 1 )) --name "v$k" >/dev/null
done
for k in 1 2 3 4 5; do "$bs" --store "$store" snapshot delete "$k" >/dev/null; done
"$bs" --store "$store" stats --json >"$g/stats-before.json"

# Timed: the collection, with its inputs warm.
find "$store" -type f -exec cat {} + >/dev/null
sync
/usr/bin/time -f "%e %U %S %M" -o "$g/time" "$bs" --store "$store" gc --json >"$g/gc.json"
"$bs" --store "$store" stats --json >"$g/stats-after.json"
"$bs" --store "$store" verify >/dev/null
# Raw bound in the same run: copying the store's packs once.
find "$store" -type f -exec cat {} + >/dev/null
/usr/bin/time -f "%e" -o "$g/cp-time" cp -r "$store/packs" "$g/packs-copy"
rm -rf "$g/packs-copy"

# Every remaining snapshot restores byte-exact.
for k in 6 7 8 9 10; do
  "$bs" --store "$store" snapshot restore "$k" >/dev/null
  cmp -s "$disk" "$g/version-$k.img" || { echo "FAILED: snapshot $k differs"; exit 1; }
done

# A fresh store holding only the remaining snapshots.
fresh=$g/fresh
"$bs" --store "$fresh" init >/dev/null
"$bs" --store "$fresh" server add --id 1 --name a --disk "$disk" >/dev/null
"$bs" --store "$fresh" server add --id 2 --name b --disk "$disk" >/dev/null
for k in 6 7 8 9 10; do
  cp "$g/version-$k.img" "$disk"
  "$bs" --store "$fresh" snapshot create --server $(( (k - 1) % 2 + 1 )) --name "v$k" >/dev/null
done
du -sb "$store/packs" | cut -f1 >"$g/store-bytes"
du -sb "$fresh/packs" | cut -f1 >"$g/fresh-bytes"

python3 - "$g" "$size" docs/BENCHMARKS.md <<'PY'
import datetime, json, os, platform, sys
sys.path.insert(0, "bench")
from doc_table import write_table
g, size, doc = sys.argv[1:4]
before = json.load(open(f"{g}/stats-before.json"))
after = json.load(open(f"{g}/stats-after.json"))
gc = json.load(open(f"{g}/gc.json"))
wall, user, sys_, rss = open(f"{g}/time").read().split()
cp = float(open(f"{g}/cp-time").read())
store, fresh = int(open(f"{g}/store-bytes").read()), int(open(f"{g}/fresh-bytes").read())
mib = lambda b: f"{b / 2**20:.1f} MiB"
garbage = before["reclaimable_bytes"] / before["stored_bytes"]
lines = [
    f"Run {datetime.date.today()}, Linux {platform.release()}, {size} image, page cache warm. Command: `bench/gc.sh {size}`.",
    "",
    "| | value |",
    "|---|---|",
    f"| before: stored, of it not needed | {mib(before['stored_bytes'])}, {mib(before['reclaimable_bytes'])} ({100 * garbage:.0f}%) |",
    f"| `blocksnap gc`: wall, CPU, peak RSS | {float(wall):.2f} s, {float(user) + float(sys_):.2f} s, {int(rss) / 1024:.0f} MiB |",
    f"| `cp -r` of the packs, same run | {cp:.2f} s |",
    f"| packs examined, dropped, rewritten | {gc['packs_examined']}, {gc['packs_dropped']}, {gc['packs_rewritten']} |",
    f"| given back | {mib(gc['bytes_reclaimed'])} in {gc['chunks_reclaimed']} chunks |",
    f"| after: stored, not needed | {mib(after['stored_bytes'])}, {mib(after['reclaimable_bytes'])} |",
    f"| a fresh store of the five remaining snapshots | {mib(fresh)}: this store is {store / fresh:.3f}× it |",
]
write_table(doc, "gc", lines)
PY
