"""Writes bench/incremental.sh's results into docs/BENCHMARKS.md between
the "incremental" markers. Usage: incremental_report.py WORKDIR SIZE DOC"""
import datetime
import json
import os
import platform
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from doc_table import write_table  # noqa: E402

work, size, doc = sys.argv[1:4]
rows = {}
for line in open(os.path.join(work, "results.tsv")):
    name, wall, cpu = line.rstrip("\n").split("\t")
    rows[name] = (float(wall), float(cpu))


def out(name):
    return open(os.path.join(work, name + ".out")).read()


def engine_capture_secs(kind):
    # The summary says "...; 0.034 s (0.010 s of it to make it durable), ..."
    m = re.search(r"; ([0-9.]+) s \(([0-9.]+) s of it", out(f"blocksnap-incremental-{kind}"))
    return float(m.group(1)), float(m.group(2))


def floor(kind, what):
    text = out(f"floor-{what}-{kind}")
    if what == "capture":
        hz = float(re.search(r"hash\+zstd ([0-9.]+) s", text).group(1))
        rhz = float(re.search(r"read\+hash\+zstd ([0-9.]+) s", text).group(1))
        blocks = int(re.match(r"(\d+) blocks", text).group(1))
        return blocks, hz, rhz
    w = float(re.search(r"write ([0-9.]+) s", text).group(1))
    ws = float(re.search(r"with fsync ([0-9.]+) s", text).group(1))
    return w, ws


cpu_model = "unknown"
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
except OSError:
    pass
lines = [
    f"Run {datetime.date.today()} on {os.cpu_count()} × {cpu_model}, Linux {platform.release()}, "
    f"{size} image, page cache warm. Command: `bench/incremental.sh {size}`.",
    "",
    "Incremental capture with a dirty bitmap (`snapshot create --parent 1 --dirty-bitmap`):",
    "",
    "| change | dirty blocks | blocksnap: wall (in engine; of it fsyncs) | floor: hash+zstd of dirty blocks (with reads) | in engine / floor (≤ 1.3), without the fsyncs, against the floor with reads | fastest peer's second capture | peer / blocksnap wall (≥ 50 on b) |",
    "|---|---|---|---|---|---|---|",
]
peers = {p: rows[f"{p}-second-b"][0] for p in ("restic", "borg", "borg-fixed-64k", "casync")}
fastest = min(peers, key=peers.get)
for kind in ("a", "b"):
    wall = rows[f"blocksnap-incremental-{kind}"][0]
    eng, sync = engine_capture_secs(kind)
    blocks, hz, rhz = floor(kind, "capture")
    peer = f"{fastest} {peers[fastest]:.2f} s" if kind == "b" else "-"
    ratio = f"{peers[fastest] / wall:.0f}" if kind == "b" else "-"
    lines.append(
        f"| ({kind}) | {blocks} | {wall:.3f} s ({eng:.3f} s; {sync:.3f} s) | {hz:.3f} s ({rhz:.3f} s) | "
        f"{eng / hz:.2f}, {(eng - sync) / hz:.2f}, {eng / rhz:.2f} | {peer} | {ratio} |"
    )
lines += [
    "",
    "Peers' second capture of (b): "
    + ", ".join(f"{p} {t:.2f} s" for p, t in peers.items())
    + ".",
    "",
    "Restore of v1 onto the second version:",
    "",
    "| change | blocks rewritten | delta restore (`--current`): wall (in engine) | compare restore: wall | floor: zstd -d + write (+ fsync) | delta in engine / floor with fsync (≤ 1.3) | casync seeded extract | casync / delta wall (≥ 50 on b) |",
    "|---|---|---|---|---|---|---|---|",
]
for kind in ("a", "b"):
    wall = rows[f"blocksnap-delta-restore-{kind}"][0]
    rep = json.loads(out(f"blocksnap-delta-restore-{kind}"))
    assert rep["method"] == "delta", rep
    cmp_wall = rows[f"blocksnap-compare-restore-{kind}"][0]
    w, ws = floor(kind, "restore")
    cas = rows.get("casync-seeded-restore-b", (0, 0))[0] if kind == "b" else None
    cas_s = f"{cas:.2f} s" if cas else "-"
    ratio = f"{cas / wall:.0f}" if cas else "-"
    lines.append(
        f"| ({kind}) | {rep['blocks_rewritten']} | {wall:.3f} s ({rep['seconds']:.3f} s) | {cmp_wall:.3f} s | "
        f"{w:.3f} s ({ws:.3f} s) | {rep['seconds'] / ws:.2f} | {cas_s} | {ratio} |"
    )

lines += [
    "",
    "Sparse images holding the same 64 MiB of data (32 MiB at each end):",
    "",
    "| image | capture: wall | bytes read | restore to a new file: wall | restored file allocates |",
    "|---|---|---|---|---|",
]
for length in ("1G", "16G"):
    summary = out(f"blocksnap-sparse-{length}")
    read = re.search(r"read ([0-9.]+ [KMG]?i?B) of", summary).group(1)
    lines.append(
        f"| {length} | {rows[f'blocksnap-sparse-{length}'][0]:.2f} s | {read} | "
        f"{rows[f'blocksnap-sparse-restore-{length}'][0]:.2f} s | "
        f"{int(rows[f'sparse-{length}-allocated'][0]) / 2**20:.0f} MiB |"
    )

write_table(doc, "incremental", lines)
