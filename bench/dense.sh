#!/usr/bin/env bash
# Dense disks (issue #16): memory that does not grow with the number of a
# disk's blocks. A store holds one snapshot of a synthetic disk of BLOCKS
# blocks of 64 KiB (every block unique and cheaply compressible: see
# examples/scale.rs); then, each in its own process under /usr/bin/time,
# with its peak RSS:
#   - capture-known: the same disk again (every block found stored);
#   - capture-new:   a disk of the same size, every block new;
#   - restore:       the snapshot onto its disk (every block compared,
#                    none written: they are the same);
#   - restore-all:   the snapshot onto a disk whose every block differs
#                    (a sink that forgets what is written): every block
#                    compared and rewritten;
#   - export:        the snapshot as a raw image onto a stream that
#                    forgets it (every block read, checked, written out);
#   - verify:        the snapshot (every chunk read and hashed);
#   - verify-all:    the whole store, as `blocksnap verify` does (also the
#                    reference counts against a count from every manifest).
# Usage: bench/dense.sh [BLOCKS...]   (default "262144 1048576"; 16777216
# is a 1 TiB disk: its captures each read 1 TiB of synthetic data).
# BLOCKSNAP_DENSE_STEPS picks the steps (default: all of them).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
sizes=${*:-"262144 1048576"}
work=${BLOCKSNAP_BENCH_DIR:-/var/tmp/blocksnap-dense}
cargo build --release --quiet --example scale
target=${CARGO_TARGET_DIR:-$root/target}
scale=$target/release/examples/scale
bsopt=--block-size=65536
rm -rf "$work"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"
printf '%-10s %-14s %9s %10s %s\n' blocks step seconds peak_MiB json
for n in $sizes; do
  store=$work/d$n
  "$scale" build "$store" "$n" "$n" $bsopt > /dev/null
  for step in ${BLOCKSNAP_DENSE_STEPS:-capture-known capture-new restore restore-all export verify verify-all}; do
    cat "$store"/packs/* > /dev/null
    case $step in
      restore-all) run=(restore "$store" $bsopt --sink) ;;
      *) run=("$step" "$store" $bsopt) ;;
    esac
    json=$(/usr/bin/time -f "%e %M" -o "$work/time" "$scale" "${run[@]}" | tail -1)
    read -r secs kib < "$work/time"
    printf '%-10s %-14s %9s %10s %s\n' "$n" "$step" "$secs" "$((kib / 1024))" "$json"
  done
  rm -rf "$store"
done
