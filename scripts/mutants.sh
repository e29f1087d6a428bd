#!/usr/bin/env bash
# Targeted mutants: each is a deliberate bug in the engine's durability,
# verification or bookkeeping, applied one at a time to a copy of this tree;
# `cargo test` must fail for each. Prints each verdict and "caught N of M";
# exits 1 if any mutant survived. The copy (a git worktree of HEAD) and its
# build directory live under ${BLOCKSNAP_MUTANTS_DIR:-/tmp/blocksnap-mutants};
# the first build there takes a few minutes, each mutant then one to two.
#
# Usage: scripts/mutants.sh [NAME...]   (default: every mutant below)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${BLOCKSNAP_MUTANTS_DIR:-/tmp/blocksnap-mutants}
tree=$work/tree
export CARGO_TARGET_DIR=$work/target
rm -rf "$tree"
git worktree prune
git worktree add --detach --quiet "$tree" HEAD
trap 'git worktree remove --force "$tree" >/dev/null 2>&1 || true' EXIT

python3 - "$tree" "$@" <<'EOF'
import subprocess, sys, time

tree, wanted = sys.argv[1], set(sys.argv[2:])
# name: (file, the exact text, its replacement)
MUTANTS = {
    "gc-always-fails": ("src/engine/space.rs",
        "    pub fn gc(&self, dry_run: bool) -> Result<GcReport> {\n",
        "    pub fn gc(&self, dry_run: bool) -> Result<GcReport> {\n"
        "        if !dry_run { return Err(Error::Internal(\"mutant\".into())); }\n"),
    "gc-ignores-pins": ("src/store/gc.rs",
        "here && (needed(&e.id) || self.is_pinned(&e.id))",
        "here && needed(&e.id)"),
    "open-drops-snapshots-without-manifest": ("src/engine/recovery.rs",
        "    report.interrupted_restores = state\n",
        "    state.snapshots.retain(|id, s| s.status != SnapshotStatus::Completed\n"
        "        || manifests.path(*id).exists());\n"
        "    report.interrupted_restores = state\n"),
    "pack-append-without-fsync": ("src/store/mod.rs",
        "if let Err(e) = file.sync() {",
        "if let Err(e) = std::io::Result::Ok(()) {"),
    # Equivalent (listed so that it stays so): the rename is durable only
    # with the directory fsync that follows both, and the catalog commit
    # that makes the snapshot completed comes after that; a crash before it
    # fails the snapshot and removes the manifest, whatever the order.
    "manifest-renamed-before-fsync": ("src/manifest.rs",
        "            f.sync().at(&tmp)?;\n            self.fs.rename(&tmp, &path).at(&path)\n",
        "            self.fs.rename(&tmp, &path).at(&path)?;\n            f.sync().at(&path)\n"),
    "catalog-committed-before-manifest-is-durable": ("src/manifest.rs",
        "        sync_dir(self.fs.as_ref(), &self.dir)?;\n        Ok(path)\n",
        "        Ok(path)\n"),
    "delete-removes-manifest-before-catalog": ("src/engine/space.rs",
        "        self.inner.catalog.commit(&[Change::RemoveSnapshot(id)])?;\n",
        "        let _ = self.inner.manifests.remove(id);\n"
        "        self.inner.catalog.commit(&[Change::RemoveSnapshot(id)])?;\n"),
    "restore-skips-blake3": ("src/store/mod.rs",
        "        if ChunkId::of(out) != *id {",
        "        if false && ChunkId::of(out) != *id {"),
    "capture-drops-last-partial-block": ("src/manifest.rs",
        "    image_len.div_ceil(u64::from(block_size))",
        "    image_len / u64::from(block_size)"),
    "cap-off-by-one": ("src/policy.rs",
        "    if n >= MAX_SNAPSHOTS_PER_SERVER {",
        "    if n > MAX_SNAPSHOTS_PER_SERVER {"),
    "restore-skips-safety-snapshot": ("src/engine/restores.rs",
        "        let safety = if options.safety_snapshot && !resuming {",
        "        let safety = if false && options.safety_snapshot && !resuming {"),
    "record-write-ignored": ("src/engine/tracking.rs",
        "        self.inner.tracking.record(server, offset, len)",
        "        let _ = (server, offset, len);\n        Ok(())"),
    "in-doubt-capture-releases-its-chunks": ("src/engine/state.rs",
        "rec.status == SnapshotStatus::Completed || self.in_doubt.contains(&rec.id)",
        "rec.status == SnapshotStatus::Completed"),
}
EQUIVALENT = {"manifest-renamed-before-fsync"}
names = [n for n in MUTANTS if not wanted or n in wanted]
caught = 0
for name in names:
    path, old, new = MUTANTS[name]
    full = f"{tree}/{path}"
    original = open(full).read()
    if original.count(old) != 1:
        print(f"{name}: its text is not in {path} once; fix the mutant", flush=True)
        sys.exit(2)
    open(full, "w").write(original.replace(old, new))
    started = time.time()
    run = subprocess.run(["cargo", "test", "--all-features"], cwd=tree,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    open(full, "w").write(original)
    secs = time.time() - started
    if "error[E" in run.stdout and "could not compile" in run.stdout:
        print(f"{name}: does not compile; fix the mutant", flush=True)
        sys.exit(2)
    if run.returncode != 0:
        caught += 1
        failed = [l.split()[1] for l in run.stdout.splitlines()
                  if l.startswith("test ") and l.endswith("FAILED")]
        print(f"caught   {name} ({secs:.0f} s): {', '.join(failed[:4]) or 'a test binary failed'}",
              flush=True)
    elif name in EQUIVALENT:
        print(f"equiv.   {name} ({secs:.0f} s): every test passed, as expected", flush=True)
    else:
        print(f"MISSED   {name} ({secs:.0f} s): every test passed", flush=True)
equivalent = len([n for n in names if n in EQUIVALENT])
print(f"caught {caught} of {len(names) - equivalent} ({equivalent} equivalent, documented)")
sys.exit(0 if caught == len(names) - equivalent else 1)
EOF
