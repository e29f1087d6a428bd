#!/usr/bin/env bash
# A store in a bucket (issue #17), measured on this machine against a local
# Ceph radosgw (scripts/ceph-rgw.sh, memory-backed OSD, loopback):
#   - capture and restore of the realistic image (bench/workload.sh: v1, and
#     v2 = v1 with 1% rewritten) through the bucket, against a directory
#     store, in the same run; a restore on a second host whose cache is cold
#     (every chunk fetched by ranges) and again warm;
#   - the open of a host whose cache is warm against one whose cache is
#     cold (it learns every pack's index from the bucket);
#   - ten hosts capturing servers cloned from one template disk (v1 with
#     4 MiB of its own each): what the bucket holds, against ten stores.
# Every restore is checked byte-exact. Writes the tables into
# docs/BENCHMARKS.md between the "fleet" markers.
#
# Usage: bench/fleet.sh [IMAGE_SIZE]     (default 2G)
# Work directory: $BLOCKSNAP_BENCH_DIR (default /var/tmp/blocksnap-peers,
# shared with bench/peers.sh for the workload images). The gateway is
# restarted with an 8 GiB memstore for the run, and with its default after.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
size=${1:-2G}
work=${BLOCKSNAP_BENCH_DIR:-/var/tmp/blocksnap-peers}
mkdir -p "$work"
[ -x /usr/bin/time ] || apt-get install -y -qq time >/dev/null

cargo build --release --quiet
bs=$root/target/release/blocksnap

# shellcheck source=bench/workload.sh
. bench/workload.sh

scripts/ceph-rgw.sh down >/dev/null 2>&1 || true
OSD_BYTES=$((8 << 30)) scripts/ceph-rgw.sh up
trap 'scripts/ceph-rgw.sh down >/dev/null 2>&1 || true; scripts/ceph-rgw.sh up >/dev/null 2>&1 || true' EXIT
eval "$(scripts/ceph-rgw.sh env)"
bucket=${BLOCKSNAP_TEST_BUCKET#s3://}
prefix=bench-$(date +%s)
url=s3://$bucket/$prefix

# Bytes of the objects under PREFIX in the bucket (ListObjectsV2, paged).
bucket_bytes() {
  python3 - "$AWS_ENDPOINT_URL" "$bucket" "$1" "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" <<'PY'
import subprocess, sys, urllib.parse, xml.etree.ElementTree as ET
endpoint, bucket, prefix, key, secret = sys.argv[1:]
ns = {"s": "http://s3.amazonaws.com/doc/2006-03-01/"}
total, token = 0, None
while True:
    q = {"list-type": "2", "prefix": prefix}
    if token:
        q["continuation-token"] = token
    out = subprocess.run(
        ["curl", "-sS", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", f"{key}:{secret}",
         "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD",
         f"{endpoint}/{bucket}?{urllib.parse.urlencode(q)}"],
        check=True, capture_output=True).stdout
    doc = ET.fromstring(out)
    total += sum(int(e.text) for e in doc.findall("s:Contents/s:Size", ns))
    if doc.findtext("s:IsTruncated", "false", ns) != "true":
        break
    token = doc.findtext("s:NextContinuationToken", None, ns)
print(total)
PY
}

results=$work/fleet.tsv
: >"$results"
warm() { cat "$@" >/dev/null 2>&1 || true; }
warm_tree() { find "$@" -type f -exec cat {} + >/dev/null 2>&1 || true; }
# CPU seconds the gateway's daemons (radosgw, the OSD, the monitor) used
# so far: they share the machine's two cores with blocksnap.
gateway_cpu() {
  local p t=0
  for p in $(pgrep -f 'radosgw|ceph-osd|ceph-mon'); do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}
# run STORE STEP CMD...: wall, cpu, peak RSS of CMD, and the gateway's cpu
run() {
  local store=$1 step=$2
  shift 2
  local tf g0 g1
  tf=$(mktemp)
  sync
  g0=$(gateway_cpu)
  /usr/bin/time -f "%e %U %S %M" -o "$tf" "$@" >/dev/null 2>"$work/last.err" || {
    echo "FAILED: $store $step"; cat "$work/last.err"; exit 1; }
  g1=$(gateway_cpu)
  read -r wall user sys rss <"$tf"
  rm -f "$tf"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$store" "$step" "$wall" \
    "$(python3 -c "print(round($user + $sys, 2))")" "$rss" \
    "$(python3 -c "print(round(($g1 - $g0) / $(getconf CLK_TCK), 2))")" | tee -a "$results"
}
check() { cmp -s "$1" "$v1" || { echo "FAILED: $1 differs from v1"; exit 1; }; }

d=$work/fleet
rm -rf "$d" && mkdir -p "$d"
warm "$v1"; run raw cp cp "$v1" "$d/copy.img"
rm -f "$d/copy.img"

# ---------------------------------------------------------- directory store
local_store=$d/store
"$bs" --store "$local_store" init >/dev/null
cp "$v1" "$d/disk.img"
"$bs" --store "$local_store" server add --id 1 --name bench --disk "$d/disk.img" >/dev/null
warm "$d/disk.img"; run directory capture-v1 "$bs" --store "$local_store" snapshot create --server 1 --name v1
local_v1_bytes=$(du -sb "$local_store/packs" | cut -f1)
cp "$v2" "$d/disk.img"
warm "$d/disk.img"; run directory capture-v2 "$bs" --store "$local_store" snapshot create --server 1 --name v2
rm -f "$d/disk.img"
warm_tree "$local_store"; run directory restore-v1 "$bs" --store "$local_store" snapshot restore 1 --no-safety-snapshot
check "$d/disk.img"
local_bytes=$(du -sb "$local_store/packs" | cut -f1)

# ---------------------------------------------------------- bucket, host A
export BLOCKSNAP_STORE=$url
A=(--cache "$d/cache-a" --host host-a)
"$bs" "${A[@]}" init >/dev/null
cp "$v1" "$d/disk.img"
"$bs" "${A[@]}" server add --id 1 --name bench --disk "$d/disk.img" >/dev/null
warm "$d/disk.img"; run bucket capture-v1 "$bs" "${A[@]}" snapshot create --server 1 --name v1
cp "$v2" "$d/disk.img"
warm "$d/disk.img"; run bucket capture-v2 "$bs" "${A[@]}" snapshot create --server 1 --name v2
rm -f "$d/disk.img"
warm_tree "$d/cache-a"; run bucket restore-v1 "$bs" "${A[@]}" snapshot restore 1 --no-safety-snapshot
check "$d/disk.img"
fleet_bytes=$(bucket_bytes "$prefix/packs")

# ---------------------------------------------------------- bucket, host B
B=(--cache "$d/cache-b" --host host-b)
rm -f "$d/disk-b.img"; touch "$d/disk-b.img"
run bucket attach-cold "$bs" "${B[@]}" server add --id 1 --name bench --disk "$d/disk-b.img"
run bucket restore-v1-cold "$bs" "${B[@]}" snapshot restore 1 --no-safety-snapshot
cmp -s "$d/disk-b.img" "$v1" || { echo "FAILED: host B's restore differs"; exit 1; }
cp "$v2" "$d/disk-b.img"
warm "$d/disk-b.img"; warm_tree "$d/cache-b"
run bucket restore-v1-onto-v2-warm "$bs" "${B[@]}" snapshot restore 1 --no-safety-snapshot
cmp -s "$d/disk-b.img" "$v1" || { echo "FAILED: host B's second restore differs"; exit 1; }
cache_b=$(du -sb "$d/cache-b" | cut -f1)

# ---------------------------------------------------------- open
C=(--cache "$d/cache-c" --host host-c)
run bucket open-cold "$bs" "${C[@]}" snapshot list
warm_tree "$d/cache-c"; run bucket open-warm "$bs" "${C[@]}" snapshot list
warm_tree "$d/cache-a"; run bucket open-warm-host-a "$bs" "${A[@]}" snapshot list
warm_tree "$local_store"; run directory open "$bs" --store "$local_store" snapshot list

# ---------------------------------------------------------- ten clones
turl=s3://$bucket/$prefix-template
for h in 0 1 2 3 4 5 6 7 8 9; do
  H=(--store "$turl" --cache "$d/tcache-$h" --host "clone-$h")
  [ "$h" = 0 ] && "$bs" "${H[@]}" init >/dev/null
  cp "$v1" "$d/clone.img"
  # The clone's own 4 MiB: what booting and configuring it wrote.
  python3 - "$d/clone.img" "$h" <<'PY'
import os, random, sys
path, h = sys.argv[1], int(sys.argv[2])
rng = random.Random(1000 + h)
size = os.path.getsize(path)
with open(path, "r+b") as f:
    for _ in range(64):
        f.seek(rng.randrange(size // 65536) * 65536)
        f.write(rng.randbytes(65536))
PY
  "$bs" "${H[@]}" server add --id "$((h + 1))" --name "clone-$h" --disk "$d/clone.img" >/dev/null
  warm "$d/clone.img"; run clones "capture-clone-$h" "$bs" "${H[@]}" snapshot create --server "$((h + 1))" --name first
  rm -f "$d/clone.img"
done
template_bytes=$(bucket_bytes "$prefix-template/packs")

python3 - "$results" "$local_bytes" "$fleet_bytes" "$cache_b" "$template_bytes" "$local_v1_bytes" "$size" docs/BENCHMARKS.md <<'PY'
import sys
results, local_b, fleet_b, cache_b, tmpl_b, v1_b, size, doc = sys.argv[1:]
local_b, fleet_b, cache_b, tmpl_b, v1_b = map(int, (local_b, fleet_b, cache_b, tmpl_b, v1_b))
rows = {}
for line in open(results):
    store, step, wall, cpu, rss, gw = line.rstrip("\n").split("\t")
    rows[(store, step)] = (float(wall), float(cpu), int(rss), float(gw))
mib = lambda b: f"{b / 2**20:.0f} MiB"
def row(label, store, step, ref=None):
    w, c, r, g = rows[(store, step)]
    ratio = f"{w / rows[ref][0]:.2f}x" if ref and rows[ref][0] >= 0.01 else ""
    gw = f"{g:.2f} s" if store in ("bucket", "clones") else ""
    return f"| {label} | {w:.2f} s | {c:.2f} s | {gw} | {r // 1024} MiB | {ratio} |"
out = [
    f"Image: {size} ext4 of real files (v1), v2 = v1 with 1% rewritten; radosgw on "
    "127.0.0.1 with a memory-backed OSD; one run, on this 2-core machine.",
    "",
    "| step | wall | CPU | the gateway's CPU | peak RSS | wall against the directory store |",
    "|---|---|---|---|---|---|",
    row("`cp` of v1 (bound)", "raw", "cp"),
    row("directory store: capture v1", "directory", "capture-v1"),
    row("bucket: capture v1 (packs uploaded as they seal)", "bucket", "capture-v1", ("directory", "capture-v1")),
    row("directory store: capture v2", "directory", "capture-v2"),
    row("bucket: capture v2", "bucket", "capture-v2", ("directory", "capture-v2")),
    row("directory store: restore v1 onto an empty disk", "directory", "restore-v1"),
    row("bucket, same host (its packs in its cache): restore v1", "bucket", "restore-v1", ("directory", "restore-v1")),
    row("bucket, another host: attach the server (cold cache: pack tails, manifests)", "bucket", "attach-cold"),
    row("bucket, another host, cold cache: restore v1 (ranges fetched)", "bucket", "restore-v1-cold", ("directory", "restore-v1")),
    row("bucket, another host, warm cache: restore v1 onto v2", "bucket", "restore-v1-onto-v2-warm"),
    row("directory store: open (`snapshot list`)", "directory", "open"),
    row("bucket: open, cold cache (a new host learns every pack)", "bucket", "open-cold", ("directory", "open")),
    row("bucket: open, warm cache", "bucket", "open-warm", ("directory", "open")),
    row("bucket: open, warm cache, host A (2 snapshots)", "bucket", "open-warm-host-a", ("directory", "open")),
    "",
    f"Stored: the directory store's packs {mib(local_b)}, the bucket's {mib(fleet_b)}; "
    f"the second host's cache after its restores {mib(cache_b)}.",
    "",
    "Ten hosts, each capturing a server cloned from the template (v1 with 4 MiB of its own):",
    "",
    "| what | bytes |",
    "|---|---|",
    f"| the bucket's packs after ten captures | {mib(tmpl_b)} |",
    f"| one capture of v1 in a directory store (above) | {mib(v1_b)} |",
    f"| ten separate stores of one clone each (10 x that) | {mib(10 * v1_b)} |",
    f"| saving against ten stores | {10 * v1_b / tmpl_b:.1f}x |",
    f"| the bucket's packs against one capture of the template | {tmpl_b / v1_b:.3f}x |",
    "",
    "Captures of the ten clones: " + ", ".join(
        f"{rows[('clones', f'capture-clone-{h}')][0]:.1f} s" for h in range(10)) + ".",
]
text = open(doc).read()
begin, end = "<!-- fleet:begin -->", "<!-- fleet:end -->"
if begin in text:
    a, b = text.index(begin) + len(begin), text.index(end)
    text = text[:a] + "\n" + "\n".join(out) + "\n" + text[b:]
else:
    text += "\n" + begin + "\n" + "\n".join(out) + "\n" + end + "\n"
open(doc, "w").write(text)
print("\n".join(out))
PY
