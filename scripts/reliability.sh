#!/usr/bin/env bash
# The long runs behind docs/RELIABILITY.md: the crash, power-cut, GC-crash,
# restore-crash and corruption tests at length, then every fuzz target.
# Each test prints its seed; a failure replays with the seed's variable.
#
# Usage: scripts/reliability.sh [SCALE]     (SCALE 1: ~50 minutes on 2 cores)
#        scripts/reliability.sh --summarize [SCALE]   (the summary again from the logs)
#   BLOCKSNAP_CRASH_KILLS       2000 x SCALE   SIGKILLs during random operations
#   BLOCKSNAP_POWERCUT_CYCLES    200 x SCALE   ext4 power cuts (root, loop devices)
#   BLOCKSNAP_GC_CRASH_KILLS     200 x SCALE   SIGKILLs during GC loops
#   BLOCKSNAP_RESTORE_CRASH_KILLS 100 x SCALE  SIGKILLs during restores
#   BLOCKSNAP_CORRUPTION_TRIALS 1000 x SCALE   damaged store files
#   BLOCKSNAP_CRASHFS_TRIALS    1000 x SCALE   in-process crashes at a store I/O call
#   (and every store I/O call of a create, delete, restore and GC failed,
#   the torn-subset CrashFs mode, the full disk, and scripts/mutants.sh)
# The summary is written into docs/RELIABILITY.md between its
# reliability-run markers.
#   fuzz: 10,000,000 runs per decoder target, engine_ops for 300 s x SCALE
# Logs go to $BLOCKSNAP_RELIABILITY_DIR (default /var/tmp/blocksnap-reliability).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${BLOCKSNAP_RELIABILITY_DIR:-/var/tmp/blocksnap-reliability}
mkdir -p "$out"
summary=$out/summary.txt
tests="crash powercut gc-crash restore-crash corruption crashfs faults crashfs-torn full-disk"
figures() { # NAME: the figures its log holds
  local log=$out/$1.log mid secs
  mid=$(grep -c 'interrupted while writing' "$log" || true)
  [ "$mid" -gt 0 ] && mid=" $mid kills landed mid-write" || mid=
  secs=$(grep -oE 'finished in [0-9.]+s' "$log" | tail -1 | grep -oE '[0-9.]+' || true)
  echo "$1: $(grep -E 'survived|trials:|seed |collections completed|faults injected|crashes|failed once' "$log" | tr '\n' ' ')$mid (${secs:-?} s)"
}
write_doc() { # SCALE: the summary between RELIABILITY.md's run markers
  python3 - "$summary" "$1" <<'EOF2'
import sys, datetime
sys.path.insert(0, "bench")
from doc_table import write_table
lines = [f"Last `scripts/reliability.sh {sys.argv[2]}`, {datetime.date.today()}:", ""]
lines += [f"- {l.strip()}" for l in open(sys.argv[1]) if l.strip()]
write_table("docs/RELIABILITY.md", "reliability-run", lines, heading="## The last long run")
EOF2
}
# --summarize: the summary again from the logs of the last run (after the
# figures a test prints changed), mutants' and fuzzing's lines kept.
if [ "${1:-}" = --summarize ]; then
  kept=$(grep -E '^(mutants|fuzz|cargo-fuzz)' "$summary" || true)
  { for n in $tests; do [ -f "$out/$n.log" ] && figures "$n"; done; echo "$kept"; } >"$summary.new"
  mv "$summary.new" "$summary"
  write_doc "${2:-1}"
  exit 0
fi
scale=${1:-1}
: >"$summary"
t() { # NAME VAR=VALUE TEST: runs one integration test at length
  local name=$1 setting=$2 test=$3
  env "$setting" cargo test --release --test it -- --exact --nocapture "$test" >"$out/$name.log" 2>&1 || {
    echo "$name FAILED (see $out/$name.log)" | tee -a "$summary"; return 1; }
  figures "$name" | tee -a "$summary"
}
cargo build --release --tests --quiet
t crash BLOCKSNAP_CRASH_KILLS=$((2000 * scale)) crash::a_process_killed_anywhere_loses_no_completed_snapshot
t powercut BLOCKSNAP_POWERCUT_CYCLES=$((200 * scale)) powercut::a_power_cut_anywhere_loses_no_completed_snapshot
t gc-crash BLOCKSNAP_GC_CRASH_KILLS=$((200 * scale)) gc::a_crash_anywhere_in_gc_loses_no_completed_snapshot
t restore-crash BLOCKSNAP_RESTORE_CRASH_KILLS=$((100 * scale)) undo::a_restore_killed_anywhere_is_finished_by_running_it_again
t corruption BLOCKSNAP_CORRUPTION_TRIALS=$((1000 * scale)) corruption::random_damage_to_any_store_file_is_reported_and_never_restored
t crashfs BLOCKSNAP_CRASHFS_TRIALS=$((1000 * scale)) faults::a_crash_at_any_store_io_call_keeps_every_completed_snapshot
t faults BLOCKSNAP_FAULTS=1 faults::every_store_io_call_of_each_operation_failed_once
t crashfs-torn BLOCKSNAP_CRASHFS_TRIALS=$((1000 * scale)) faults::a_crash_keeping_any_torn_subset_of_unsynced_writes_keeps_every_snapshot
t full-disk BLOCKSNAP_FULL_DISK=1 full_disk::a_store_recovers_from_a_full_disk_by_itself

# Targeted mutants: cargo test must fail for each (docs/RELIABILITY.md).
scripts/mutants.sh 2>&1 | tee "$out/mutants.log" | tail -1 | sed 's/^/mutants: /' | tee -a "$summary"

if command -v cargo-fuzz >/dev/null; then
  cd fuzz
  for target in manifest pack_record group_payload pack_tail pack_header dirty_bitmap tracker create_body nbd_client qmp_client; do
    mkdir -p "$out/corpus/$target"
    cp corpus/$target/* "$out/corpus/$target/"
    cargo fuzz run -s none "$target" "$out/corpus/$target" -- -runs=$((10000000 * scale)) -max_len=4096 \
      >"$out/fuzz-$target.log" 2>&1 || { echo "fuzz $target FAILED" | tee -a "$summary"; exit 1; }
    echo "fuzz $target: $(grep -E '^Done' "$out/fuzz-$target.log")" | tee -a "$summary"
  done
  mkdir -p "$out/corpus/engine_ops"
  cp corpus/engine_ops/* "$out/corpus/engine_ops/"
  cargo fuzz run -s none engine_ops "$out/corpus/engine_ops" -- -max_total_time=$((300 * scale)) -max_len=192 \
    >"$out/fuzz-engine_ops.log" 2>&1 || { echo "fuzz engine_ops FAILED" | tee -a "$summary"; exit 1; }
  echo "fuzz engine_ops: $(grep -E 'DONE|^Done' "$out/fuzz-engine_ops.log" | tail -1)" | tee -a "$summary"
else
  echo "cargo-fuzz is not installed: cargo install cargo-fuzz (fuzzing skipped)" | tee -a "$summary"
fi

cd "$root"
# The figures, written between RELIABILITY.md's run markers.
write_doc "$scale"
