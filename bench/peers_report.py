#!/usr/bin/env python3
"""Turns bench/peers.sh's results.tsv into the tables of docs/BENCHMARKS.md
(between the <!-- peers:begin --> and <!-- peers:end --> markers)."""
import datetime
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from doc_table import write_table  # noqa: E402

results, size, doc = sys.argv[1], sys.argv[2], sys.argv[3]
rows = {}
for line in open(results):
    tool, step, wall, cpu, rss, stored = line.rstrip("\n").split("\t")
    rows[(tool, step)] = dict(wall=float(wall), cpu=float(cpu), rss=int(rss), stored=int(stored))

MiB = 1 << 20
tools = [t for t in ["blocksnap", "blocksnap-balanced", "blocksnap-compact",
                     "restic", "borg", "borg-fixed-64k", "casync"]
         if (t, "first") in rows]
peers = [t for t in tools if not t.startswith("blocksnap")]


def cell(tool, step, stored_delta=None):
    r = rows[(tool, step)]
    s = f"{r['wall']:.2f} s (cpu {r['cpu']:.1f} s, {r['rss'] // 1024} MiB RSS)"
    if stored_delta is not None:
        s += f", {stored_delta}"
    return s


out = []
cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
out.append(f"Run {datetime.date.today().isoformat()} on {os.cpu_count()} × {cpu_model}, "
           f"Linux {platform.release()}, {size} image, page cache warm "
           f"(every input re-read right before each timed step). Command: `bench/peers.sh {size}`.")
out.append("")
out.append("| tool | first capture | second capture | full restore | restore of v1 onto v2 |")
out.append("|---|---|---|---|---|")
for t in tools:
    first = rows[(t, "first")]["stored"]
    second = rows[(t, "second")]["stored"]
    out.append(f"| {t} | {cell(t, 'first', f'{first / MiB:.0f} MiB')} | "
               f"{cell(t, 'second', f'+{(second - first) / MiB:.0f} MiB')} | "
               f"{cell(t, 'restore')} | {cell(t, 'restore-onto-v2')} |")
out.append("")
raw = {k[1]: v for k, v in rows.items() if k[0] == "raw"}
out.append("Raw bounds in the same run: " + "; ".join(
    f"`{name}` {raw[name]['wall']:.2f} s" for name in ["b3sum", "cat", "cp", "cp+sync", "zstd-3-T2", "zstd-d"]
    if name in raw) + (f" (zstd -3 stores {raw['zstd-3-T2-bytes']['stored'] / MiB:.0f} MiB)"
                       if "zstd-3-T2-bytes" in raw else "") + ".")
out.append("")

if peers and "blocksnap" in tools:
    def best(step, key="wall"):
        return min(rows[(p, step)][key] for p in peers)

    smallest = min(rows[(p, "first")]["stored"] for p in peers)
    b = lambda t, s: rows[(t, s)]
    out.append("| target | measured | met |")
    out.append("|---|---|---|")

    def target(text, value, goal, higher=True):
        ok = value >= goal if higher else value <= goal
        out.append(f"| {text} | {value:.2f} | {'yes' if ok else 'NO'} |")

    target("first capture: fastest peer's time / blocksnap's (≥ 5)", best("first") / b("blocksnap", "first")["wall"], 5)
    target("first capture: blocksnap's bytes / smallest peer's (≤ 1.25)", b("blocksnap", "first")["stored"] / smallest, 1.25, False)
    if "blocksnap-compact" in tools:
        target("compact: fastest peer's time / blocksnap's (≥ 2)", best("first") / b("blocksnap-compact", "first")["wall"], 2)
        target("compact: bytes / smallest peer's (≤ 1.0)", b("blocksnap-compact", "first")["stored"] / smallest, 1.0, False)
    target("second capture, full rehash: fastest peer's time / blocksnap's (≥ 5)", best("second") / b("blocksnap", "second")["wall"], 5)
    target("full restore: fastest peer's time / blocksnap's (≥ 4)", best("restore") / b("blocksnap", "restore")["wall"], 4)
    if "cp" in raw:
        target("full restore: cp's time / blocksnap's (≥ 0.7; blocksnap fsyncs, cp does not)", raw["cp"]["wall"] / b("blocksnap", "restore")["wall"], 0.7)
    if "cp+sync" in raw:
        target("full restore: (cp + sync)'s time / blocksnap's (≥ 0.7)", raw["cp+sync"]["wall"] / b("blocksnap", "restore")["wall"], 0.7)
    target("restore of v1 onto v2: fastest peer's time / blocksnap's", best("restore-onto-v2") / b("blocksnap", "restore-onto-v2")["wall"], 4)

write_table(doc, "peers", out, heading='## Against restic, borg and casync: `bench/peers.sh`')
