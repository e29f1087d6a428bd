#!/usr/bin/env bash
# Stores of millions of chunks (issue #16): built from synthetic disks of
# 4 KiB blocks, each unique and cheaply compressible (examples/scale.rs),
# one snapshot of 2^20 blocks (4 GiB) a server. For each size:
#   - open time (the example, in-process) and the commands' time and peak
#     RSS: `server list`, `snapshot list`, `stats`;
#   - a capture of a disk whose chunks are all stored (dedup look-ups
#     only) and of one whose chunks are all new, in chunks per second,
#     with their peak RSS;
#   - the chunk index table's bytes per chunk and the time to rebuild it
#     from the packs.
# The smallest size is built a second time with the table never written
# (every chunk in the in-memory index, as before it existed): the ratio of
# the two known-chunk captures is the look-up cost of the mapped table.
#
# Each capture of known blocks runs twice: with the default table memory
# (tables larger than 64 MiB read by pread, nothing of them resident) and
# with the tables read through their maps (`--mapped`).
#
# Usage: bench/scale.sh [SIZES]   (default "1048576 10485760"; the disk
# needs ~150 bytes a chunk; 104857600 takes an hour and ~16 GB)
# BLOCKSNAP_BENCH_KEEP=1 keeps the stores (and reuses those already
# built: a store's build takes most of the time).
# Figures go into docs/BENCHMARKS.md between its scale markers.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
sizes=${1:-"1048576 10485760"}
work=${BLOCKSNAP_BENCH_DIR:-/var/tmp/blocksnap-scale}
cargo build --release --quiet --bin blocksnap --example scale
target=${CARGO_TARGET_DIR:-$root/target}
bs=$target/release/blocksnap
scale=$target/release/examples/scale
keep=${BLOCKSNAP_BENCH_KEEP:-}
if [ -z "$keep" ]; then
  rm -rf "$work"
  trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work"
per=1048576
out=$work/results.txt
: > "$out"

# One measured run: "NAME SECONDS KIB JSON" (JSON: the step's line, if any).
measure() { # NAME CMD...
  local name=$1; shift
  local json
  json=$(/usr/bin/time -f "%e %M" -o "$work/time" "$@" 2>/dev/null | tail -1)
  case $json in "{"*) ;; *) json="{}" ;; esac
  echo "$name $(cat "$work/time") $json" >> "$out"
}

for n in $sizes; do
  store=$work/s$n
  if [ ! -s "$work/build-$n.json" ]; then
    rm -rf "$store"
    "$scale" build "$store" "$n" "$per" > "$work/build-$n.json.tmp"
    mv "$work/build-$n.json.tmp" "$work/build-$n.json"
  fi
  echo "build-$n 0 0 $(cat "$work/build-$n.json")" >> "$out"
  du -sb "$store/packs" | awk -v n="$n" '{print "packs-" n " 0 0 {\"bytes\": " $1 "}"}' >> "$out"
  # Each run reads the store warm, as a host that uses it does.
  cat "$store"/packs/* "$store"/manifests/*.tbl "$store"/catalog >/dev/null
  measure "open-$n" "$scale" open "$store"
  measure "serverlist-$n" "$bs" --store "$store" server list
  measure "snapshotlist-$n" "$bs" --store "$store" snapshot list
  measure "stats-$n" "$bs" --store "$store" stats
  cat "$store"/packs/* >/dev/null
  measure "known-$n" "$scale" capture-known "$store"
  cat "$store"/packs/* >/dev/null
  measure "knownmapped-$n" "$scale" capture-known "$store" --mapped
  cat "$store"/packs/* >/dev/null
  measure "new-$n" "$scale" capture-new "$store"
  measure "rebuild-$n" "$scale" rebuild "$store"
  if [ "$n" = "${sizes%% *}" ]; then
    mem=$work/m$n
    "$scale" build "$mem" "$n" "$per" --in-memory > /dev/null
    cat "$mem"/packs/* >/dev/null
    measure "memknown-$n" "$scale" capture-known "$mem" --in-memory
    cat "$store"/packs/* >/dev/null
    measure "known2-$n" "$scale" capture-known "$store"
    rm -rf "$mem"
  fi
  [ -n "$keep" ] || rm -rf "$store"
done

python3 - "$out" "$sizes" <<'PY'
import json, sys
sys.path.insert(0, "bench")
from doc_table import write_table
rows = {}
for line in open(sys.argv[1]):
    name, secs, kib, rest = line.split(" ", 3)
    rows[name] = (float(secs), int(kib), json.loads(rest))
sizes = sys.argv[2].split()
mib = lambda kib: f"{kib / 1024:.0f} MiB"
lines = [
    "| chunks | open | `server list` | `snapshot list` | `stats` | capture, all stored | the same, tables mapped | capture, all new | index on disk | rebuild |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for n in sizes:
    o = rows[f"open-{n}"][2]
    k, nw, rb = rows[f"known-{n}"], rows[f"new-{n}"], rows[f"rebuild-{n}"]
    km = rows[f"knownmapped-{n}"]
    cell = lambda r: f"{rows[r][0]:.2f} s, {mib(rows[r][1])}"
    # Peak RSS, and of it the private part (the rest: mapped file pages).
    rss = lambda r: f"{mib(r[1])} ({mib(r[2]['peak_private_kib'])} private)"
    lines.append(
        f"| {int(n):,} | {o['seconds'] * 1000:.1f} ms (fastest {o['fastest'] * 1000:.1f}) "
        f"| {cell(f'serverlist-{n}')} | {cell(f'snapshotlist-{n}')} | {cell(f'stats-{n}')} "
        f"| {k[2]['chunks_per_second'] / 1e3:.0f}k chunks/s, {rss(k)} "
        f"| {km[2]['chunks_per_second'] / 1e3:.0f}k chunks/s, {rss(km)} "
        f"| {nw[2]['chunks_per_second'] / 1e3:.0f}k chunks/s, {rss(nw)} "
        f"| {rb[2]['table_bytes'] / rb[2]['chunks']:.1f} B/chunk "
        f"| {rb[2]['seconds']:.2f} s |"
    )
first = sizes[0]
if f"memknown-{first}" in rows:
    mem = rows[f"memknown-{first}"][2]["chunks_per_second"]
    mapped = [rows[f"known-{first}"][2]["chunks_per_second"], rows[f"known2-{first}"][2]["chunks_per_second"]]
    lines.append("")
    lines.append(
        f"Capture of {int(first):,} chunks all stored, table mapped / all in memory (same data, one run): "
        f"{max(mapped) / 1e3:.0f}k / {mem / 1e3:.0f}k chunks/s = {max(mapped) / mem:.2f}x "
        f"(the two mapped runs: {mapped[0] / 1e3:.0f}k, {mapped[1] / 1e3:.0f}k)."
    )
write_table("docs/BENCHMARKS.md", "scale", lines,
            heading="## Stores of millions of chunks: `bench/scale.sh`")
PY
