# The benchmark workload, sourced by bench/peers.sh and bench/incremental.sh
# with $work (the work directory) and $size (the image size) set. Builds,
# once, and names:
#   v1  an ext4 image made with `mke2fs -t ext4 -d` from about 1.0 GB of
#       real files from /usr/share and /usr/lib;
#   v2  v1 with 1% of the image rewritten by random 4 KiB-aligned 4 KiB
#       writes (seeded): change kind (a);
#   v2b v1 with 1% of the image rewritten in random 1 MiB runs (seeded):
#       change kind (b).
v1=$work/v1-$size.img
v2=$work/v2-$size.img
if [ ! -f "$v2" ]; then
  echo "building the workload ($size ext4 image from real files)"
  staging=$work/staging
  rm -rf "$staging" && mkdir -p "$staging"
  python3 - "$staging" <<'PY'
import os, sys
staging = sys.argv[1]
budget, total, n = 1_000_000_000, 0, 0
for top in ("/usr/share", "/usr/lib"):
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for f in sorted(filenames):
            src = os.path.join(dirpath, f)
            if os.path.islink(src) or not os.path.isfile(src):
                continue
            sz = os.path.getsize(src)
            if total + sz > budget or sz > 64 << 20:
                continue
            dst = os.path.join(staging, src.lstrip("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                continue
            total += sz
            n += 1
print(f"staged {n} files, {total} bytes")
PY
  rm -f "$v1"
  mke2fs -q -t ext4 -d "$staging" -F "$v1" "$size"
  rm -rf "$staging"
  cp "$v1" "$v2"
  python3 - "$v2" <<'PY'
import os, random, sys
path = sys.argv[1]
size = os.path.getsize(path)
rng = random.Random(2026)
writes = size // 100 // 4096
with open(path, "r+b") as f:
    for _ in range(writes):
        f.seek(rng.randrange(size // 4096) * 4096)
        f.write(rng.randbytes(4096))
print(f"v2: {writes} random 4 KiB writes")
PY
fi
# v2b: v1 with 1% of the image rewritten in runs of 1 MiB (file rewrites).
v2b=$work/v2b-$size.img
if [ ! -f "$v2b" ]; then
  cp "$v1" "$v2b"
  python3 - "$v2b" <<'PY'
import os, random, sys
path = sys.argv[1]
size = os.path.getsize(path)
rng = random.Random(2027)
run = 1 << 20
writes = size // 100 // run
with open(path, "r+b") as f:
    for _ in range(writes):
        f.seek(rng.randrange((size - run) // 4096) * 4096)
        f.write(rng.randbytes(run))
print(f"v2b: {writes} random 1 MiB writes")
PY
fi
python3 - "$v1" "$v2" <<'PY'
import sys
BS = 65536
a, b = open(sys.argv[1], "rb"), open(sys.argv[2], "rb")
data = zero = changed = total = 0
while True:
    x, y = a.read(BS), b.read(BS)
    if not x:
        break
    total += 1
    if x.count(0) == len(x):
        zero += 1
    if x != y:
        changed += 1
print(f"workload: {total} blocks of 64 KiB, {100*zero/total:.1f}% zero; v2 changes {100*changed/total:.1f}% of them")
PY

