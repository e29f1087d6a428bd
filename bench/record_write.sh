#!/usr/bin/env bash
# Latency of Engine::record_write (a 4 KiB guest write reported every
# 200 us) while another thread loops capture, delete and GC on the same
# 512 MiB disk, beside a control (an atomic add timed the same way in the
# same loop: what it shows is the machine, not the engine): examples/record_write_latency.rs, run in turn for this
# tree and, with BASELINE=<git revision>, for that revision (built in a
# worktree with the same example copied in), so both figures come from
# one run on the same machine. Fills docs/BENCHMARKS.md (record-write).
#
# Each is run twice: with the reporting thread at SCHED_FIFO (as a vCPU
# thread may be; the figures then show waits on the engine) and at normal
# priority (on 2 cores the capture's threads then preempt it for
# milliseconds, whatever the engine does).
#
# Usage: [BASELINE=17cb583] bench/record_write.sh [SECONDS [ROUNDS]]
#        (default 20 s, 2 rounds alternating baseline and this tree; root
#        for SCHED_FIFO)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
rounds=${2:-2}
cargo build --release --quiet --example record_write_latency
ours=target/release/examples/record_write_latency
base_bin=""
if [[ -n "${BASELINE:-}" ]]; then
    wt=/tmp/blocksnap-baseline-$BASELINE
    [[ -d $wt ]] || git worktree add -q "$wt" "$BASELINE"
    # Older trees have no Error::Internal.
    sed 's/blocksnap::Error::Internal(/blocksnap::Error::WrongState(/' \
        examples/record_write_latency.rs > "$wt/examples/record_write_latency.rs"
    (cd "$wt" && CARGO_TARGET_DIR=/tmp/blocksnap-baseline-target \
        cargo build --release --quiet --example record_write_latency)
    base_bin=/tmp/blocksnap-baseline-target/release/examples/record_write_latency
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for round in $(seq "$rounds"); do
    for sched in fifo normal; do
        rt=""; [[ $sched == fifo ]] && rt=1
        if [[ -n $base_bin ]]; then
            echo "baseline $BASELINE $sched $(BLOCKSNAP_RT=$rt $base_bin "$seconds")" | tee -a "$out"
        fi
        echo "this-tree $(git rev-parse --short HEAD) $sched $(BLOCKSNAP_RT=$rt $ours "$seconds")" | tee -a "$out"
    done
done
python3 - "$out" "$seconds" <<'EOF'
import json, sys
sys.path.insert(0, "bench")
from doc_table import write_table
rows = []
for line in open(sys.argv[1]):
    who, rev, sched, js = line.split(" ", 3)
    r = json.loads(js)
    rows.append(f"| {who} ({rev}) | {sched} | {r['writes']:,} | {r['p50_us']:.2f} | {r['p99_us']:.2f} | "
                f"{r['p999_us']:.2f} | {r['max_us']:.1f} | {r['control_p999_us']:.2f} / {r['control_max_us']:.1f} | "
                f"{r['background_loops']} |")
lines = ["| engine | reporting thread | writes | p50 µs | p99 µs | p99.9 µs | max µs | control p99.9 / max µs | capture+delete+GC loops |",
         "|---|---|---|---|---|---|---|---|---|"] + rows
write_table("docs/BENCHMARKS.md", "record-write", lines,
            heading="## record_write latency under capture, delete and GC")
EOF
