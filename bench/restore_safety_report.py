"""Writes bench/restore_safety.sh's results into docs/BENCHMARKS.md.
Usage: restore_safety_report.py RESULTS SIZE DOC"""
import datetime, os, platform, statistics, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from doc_table import write_table  # noqa: E402
path, size, doc = sys.argv[1:4]
runs = {}
for line in open(path):
    name, secs, method, safety, blocks = line.split("\t")
    runs.setdefault(name, []).append(float(secs))
med = {k: statistics.median(v) for k, v in runs.items()}
def pct(a, b):
    return f"{100 * (med[a] - med[b]) / med[b]:+.0f}%"
lines = [
    f"Run {datetime.date.today()}, Linux {platform.release()}, {size} image, page cache warm, median of 3. Command: `bench/restore_safety.sh {size}`.",
    "",
    "| disk state | bare restore | + verify | + safety snapshot | + both | safety snapshot's overhead (target < 20% with tracking) | verify's overhead |",
    "|---|---|---|---|---|---|---|",
]
for mode, label in (("tracked", "known (`--current 2`): delta"), ("compare", "unknown: compare every block")):
    lines.append(
        f"| {label} | {med[mode + '-bare']:.3f} s | {med[mode + '-verify']:.3f} s | {med[mode + '-safety']:.3f} s | "
        f"{med[mode + '-both']:.3f} s | {pct(mode + '-safety', mode + '-bare')} | {pct(mode + '-verify', mode + '-bare')} |"
    )
write_table(doc, "restore-safety", lines)
