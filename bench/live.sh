#!/usr/bin/env bash
# Live snapshots of a running QEMU disk (qemu-storage-daemon standing in
# for a VM), with a guest writing 4 KiB blocks at 200 writes/s meanwhile:
#   - freeze time (the QMP transaction) and the guest's largest gap
#     between two writes during the capture;
#   - a live full capture versus capturing the same disk, stopped, as a
#     raw file;
#   - an incremental live capture after 1% of the disk changed (64 KiB
#     writes; the guest goes on writing too), versus the full one;
#   - blocksnap's NBD client reading the whole export versus `nbdcopy`;
#   - the scratch space the fleecing wrote (it reserves the disk's size
#     while a capture runs, so that the guest's writes never fail).
# The disk: a 2 GiB ext4 image holding /usr/share (real files), as qcow2.
# Figures go into docs/BENCHMARKS.md between its live markers.
#
# Needs qemu-storage-daemon, qemu-img, mkfs.ext4 and nbdcopy
# (apt-get install libnbd-bin). Usage: bench/live.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${BLOCKSNAP_BENCH_DIR:-/var/tmp/blocksnap-live}
size=${LIVE_DISK_SIZE:-2G}
command -v nbdcopy >/dev/null || { echo "nbdcopy missing: apt-get install libnbd-bin" >&2; exit 1; }
cargo build --release --quiet --bin blocksnap --example live_guest --example nbd_read
bs=$root/target/release/blocksnap
guest=$root/target/release/examples/live_guest
nbdread=$root/target/release/examples/nbd_read
rm -rf "$work"; mkdir -p "$work"; cd "$work"

mkfs.ext4 -q -F -d /usr/share stopped.raw "$size"
qemu-img convert -f raw -O qcow2 stopped.raw disk.qcow2
sync # the images' own writeback is not the capture's

qsd_pid=
start_qsd() {
  rm -f guest.sock qmp-bs.sock
  qemu-storage-daemon \
    --blockdev driver=file,node-name=disk0-file,filename=disk.qcow2 \
    --blockdev driver=qcow2,node-name=disk0,file=disk0-file \
    --nbd-server addr.type=unix,addr.path=guest.sock \
    --export type=nbd,id=guest,node-name=disk0,name=guest,writable=on \
    --chardev socket,path=qmp-bs.sock,server=on,wait=off,id=bs --monitor chardev=bs &
  qsd_pid=$!
  for _ in $(seq 200); do [ -S guest.sock ] && [ -S qmp-bs.sock ] && return; sleep 0.05; done
  echo "qemu-storage-daemon did not start" >&2; exit 1
}
stop_qsd() { kill -TERM "$qsd_pid"; wait "$qsd_pid" || true; }
trap 'kill $qsd_pid 2>/dev/null || true' EXIT
uri="nbd+unix:///guest?socket=$work/guest.sock"

# A capture while the guest writes: prints the capture's JSON, then the
# guest's.
live_capture() { # NAME
  # Warm first: a cold read of the image would stall the guest's writes
  # behind it, which is the page cache's doing, not the capture's.
  cat disk.qcow2 >/dev/null
  mkfifo gate
  "$guest" "$uri" 200 <gate >guest.json &
  local gpid=$!
  exec 3>gate
  sleep 0.5
  "$bs" --store store snapshot create --server 1 --name "$1" --json >capture.json 2>/dev/null
  sleep 0.5
  exec 3>&-; wait "$gpid"; rm -f gate
  echo "$(cat capture.json | tr -d '\n') $(cat guest.json)"
}

start_qsd
"$bs" --store store init >/dev/null
"$bs" --store store server add --id 1 --name vm --qemu qmp-bs.sock --node disk0 --nbd-socket guest.sock >/dev/null
full=$(live_capture full)
# A quiet incremental, so that the next one's changes are only the 1%
# below (and what the guest writes in the half second before its freeze).
"$bs" --store store snapshot create --server 1 --name settle >/dev/null 2>&1
# 1% of the disk changes, in 64 KiB writes.
"$guest" "$uri" 100000 $(( $(stat -c %s stopped.raw) / 100 )) 65536 </dev/null >/dev/null
incr=$(live_capture incremental)

# NBD reads: blocksnap's client and nbdcopy on the same export, alternating.
reads=()
for i in 1 2 3; do
  cat disk.qcow2 >/dev/null
  t0=$(date +%s.%N); nbdcopy "$uri" null: ; t1=$(date +%s.%N)
  reads+=("nbdcopy $(echo "$t1 - $t0" | bc)")
  cat disk.qcow2 >/dev/null
  reads+=("ours $("$nbdread" "$uri" | python3 -c 'import json,sys; print(json.load(sys.stdin)["seconds"])')")
done
stop_qsd

# The same disk, stopped, as a raw file.
qemu-img convert -f qcow2 -O raw disk.qcow2 stopped.raw
"$bs" --store raw-store init >/dev/null
"$bs" --store raw-store server add --id 1 --name vm --disk stopped.raw >/dev/null
cat stopped.raw >/dev/null
"$bs" --store raw-store snapshot create --server 1 --name raw --json >raw.json 2>/dev/null

cd "$root"
python3 - "$work" "$full" "$incr" "$(printf '%s\n' "${reads[@]}")" <<'PY'
import json, sys, re
sys.path.insert(0, "bench")
from doc_table import write_table
work, full, incr, reads = sys.argv[1:5]
def parse(line):
    # capture JSON, then guest JSON
    cap_end = line.index('} {"writes"') + 1
    cap = json.loads(line[:cap_end])
    guest = json.loads(line[cap_end:].strip())
    return cap, guest, cap["capture"]["scratch_bytes"] or 0
(fc, fg, fs), (ic, ig, iscr) = parse(full), parse(incr)
raw = json.load(open(f"{work}/raw.json"))
ours = min(float(l.split()[1]) for l in reads.splitlines() if l.startswith("ours"))
theirs = min(float(l.split()[1]) for l in reads.splitlines() if l.startswith("nbdcopy"))
size = fc["capture"]["bytes_read"]
mib = lambda b: f"{b / 2**20:.0f} MiB"
lines = [
    "| what | figure |",
    "|---|---|",
    f"| freeze (QMP transaction), full / incremental | {fc['capture']['freeze_ms']:.1f} ms / {ic['capture']['freeze_ms']:.1f} ms |",
    f"| guest's largest gap between writes during the capture (200 writes/s) | {fg['max_gap_ms']:.1f} ms / {ig['max_gap_ms']:.1f} ms |",
    f"| live full capture / the same disk stopped as a raw file | {fc['capture']['seconds']:.2f} s / {raw['capture']['seconds']:.2f} s = {fc['capture']['seconds'] / raw['capture']['seconds']:.2f}x |",
    f"| incremental after 1% changed / full (live) | {ic['capture']['seconds']:.3f} s / {fc['capture']['seconds']:.2f} s: {fc['capture']['seconds'] / ic['capture']['seconds']:.0f}x faster, read {mib(ic['capture']['bytes_read'])} of {mib(fc['capture']['bytes_read'])} |",
    f"| NBD read of the whole export: blocksnap's client / nbdcopy (best of 3) | {ours:.2f} s / {theirs:.2f} s = {theirs / ours:.2f}x nbdcopy's speed |",
    f"| scratch the fleecing wrote, full / incremental (the disk's size is reserved meanwhile) | {mib(fs)} / {mib(iscr)} |",
]
write_table("docs/BENCHMARKS.md", "live", lines, heading="## Live snapshots of a running QEMU disk: `bench/live.sh`")
PY
