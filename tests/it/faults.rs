//! Injected I/O faults: every store I/O call (open, read, write, fsync,
//! rename, remove, listing of packs and manifests) that a create, a
//! delete, a restore and a garbage collection make is failed once each,
//! with EIO, ENOSPC or a torn write in turn. The operation must fail with
//! an error (or succeed, when the failed call was best effort) and leave
//! the store as if it had not happened, or as if it had completed; the
//! store reopens, and every completed snapshot verifies and restores
//! byte-exact. The catalog (redb) is not behind this seam; the corruption
//! trials and the power-cut test cover it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use blocksnap::fsio::{Fault, FaultFs, FaultFsHandle};
use blocksnap::{
    Engine, EngineOptions, RestoreOptions, ServerId, SnapshotId, SnapshotKind, SnapshotStatus,
};

use crate::common::{BS, disk_bytes};

const LEN: usize = 40 * BS;

/// Group records of up to this many bytes in the grouped variants.
const GROUP: u32 = 8 * BS as u32;

/// A store with two servers and three snapshots, and the bytes of each;
/// `group` > 0: a store of group records (the compact setting).
fn template(dir: &Path, group: u32) -> BTreeMap<SnapshotId, (u64, Vec<u8>)> {
    let engine = EngineOptions::new()
        .block_size(BS as u32)
        .group_frames(group)
        .open(dir.join("store"))
        .unwrap();
    let mut expected = BTreeMap::new();
    for (s, seeds) in [(1u64, vec![1u64, 2]), (2, vec![3])] {
        let disk = dir.join(format!("disk{s}.img"));
        engine
            .add_server(ServerId(s), &format!("s{s}"), &disk)
            .unwrap();
        for seed in seeds {
            let bytes = disk_bytes(LEN, seed);
            std::fs::write(&disk, &bytes).unwrap();
            let snap = engine.create_snapshot(ServerId(s), "t", "").unwrap();
            expected.insert(snap.id, (s, bytes));
        }
    }
    expected
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Create,
    Delete,
    Restore,
    Gc,
}

/// Runs `op` on an engine over `root`; returns its outcome and, for a
/// create, the new snapshot's expected bytes.
/// (The servers' disks are the template's: the catalog holds absolute
/// paths, and the trials run one after another.)
fn run_op(
    engine: &Engine,
    op: Op,
    first: SnapshotId,
) -> (blocksnap::Result<()>, Option<(u64, Vec<u8>)>) {
    let disk1 = engine.server(ServerId(1)).unwrap().disk;
    match op {
        Op::Create => {
            let bytes = disk_bytes(LEN, 9);
            std::fs::write(&disk1, &bytes).unwrap();
            let r = engine.create_snapshot(ServerId(1), "new", "").map(|_| ());
            (r, Some((1, bytes)))
        }
        Op::Delete => (engine.delete_snapshot(first), None),
        Op::Restore => {
            std::fs::write(&disk1, disk_bytes(LEN, 8)).unwrap();
            (engine.restore_snapshot(first).map(|_| ()), None)
        }
        Op::Gc => (engine.gc(false).map(|_| ()), None),
    }
}

/// The invariants after an operation hit by a fault.
fn check(root: &Path, expected: &BTreeMap<SnapshotId, (u64, Vec<u8>)>, ctx: &str) {
    let engine = EngineOptions::new()
        .open(root.join("store"))
        .unwrap_or_else(|e| panic!("{ctx}: the store does not open: {e}"));
    let all = engine.snapshots(None).unwrap();
    assert!(
        all.iter().all(|s| s.status != SnapshotStatus::InProgress),
        "{ctx}"
    );
    let verify = engine.verify(None).unwrap();
    assert!(verify.is_ok(), "{ctx}: {verify:?}");
    for (_, snap) in engine.open_report().interrupted_restores.clone() {
        engine.restore_snapshot(snap).unwrap();
    }
    let bare = RestoreOptions {
        safety_snapshot: false,
        verify: true,
    };
    for s in all.iter().filter(|s| s.status == SnapshotStatus::Completed) {
        if s.kind == SnapshotKind::Safety {
            continue;
        }
        let (server, bytes) = expected
            .get(&s.id)
            .unwrap_or_else(|| panic!("{ctx}: snapshot {} appeared from nowhere", s.id));
        engine.restore_snapshot_with(s.id, bare).unwrap();
        let disk = engine.server(ServerId(*server)).unwrap().disk;
        assert!(
            std::fs::read(&disk).unwrap() == *bytes,
            "{ctx}: snapshot {}",
            s.id
        );
    }
    // Every snapshot expected is there, unless the operation deleted it
    // or was a create that failed.
    let newest = expected.keys().max().copied();
    for id in expected.keys() {
        if engine.snapshot(*id).is_err() {
            let may_be_gone = ctx.contains("Delete")
                || (ctx.contains("Create") && Some(*id) == newest && !ctx.contains("succeeded"));
            assert!(may_be_gone, "{ctx}: snapshot {id} was lost");
        }
    }
}

#[test]
fn every_store_io_call_of_each_operation_failed_once() {
    fail_every_store_io_call_once(0);
}

/// The same over a store of group records: GC then compresses groups
/// again with their needed members.
#[test]
fn every_store_io_call_failed_once_in_a_grouped_store() {
    fail_every_store_io_call_once(GROUP);
}

fn fail_every_store_io_call_once(group: u32) {
    let base = tempfile::tempdir().unwrap();
    let expected = template(base.path(), group);
    let first = *expected.keys().next().unwrap();
    let faults = [Fault::Eio, Fault::NoSpace, Fault::Torn];
    let mut injected = 0;
    for op in [Op::Create, Op::Delete, Op::Restore, Op::Gc] {
        // Count the calls the operation makes.
        let count = {
            let dir = tempfile::tempdir().unwrap();
            crate::common::copy_tree(base.path(), dir.path());
            if matches!(op, Op::Gc) {
                // Garbage to collect: a deleted snapshot.
                EngineOptions::new()
                    .open(dir.path().join("store"))
                    .unwrap()
                    .delete_snapshot(first)
                    .unwrap();
            }
            let fs = FaultFs::new();
            let engine = EngineOptions::new()
                .gc_max_unused(0.0)
                .store_fs(Arc::new(FaultFsHandle(fs.clone())))
                .open(dir.path().join("store"))
                .unwrap();
            fs.heal();
            let (r, _) = run_op(&engine, op, first);
            r.unwrap();
            fs.calls()
        };
        assert!(count > 0, "{op:?} made no store I/O call");
        for n in 0..count {
            let fault = faults[(n % 3) as usize];
            let ctx = format!("{op:?}, call {n} of {count} failed with {fault:?}");
            let dir = tempfile::tempdir().unwrap();
            crate::common::copy_tree(base.path(), dir.path());
            let mut expected = expected.clone();
            if matches!(op, Op::Gc) {
                EngineOptions::new()
                    .open(dir.path().join("store"))
                    .unwrap()
                    .delete_snapshot(first)
                    .unwrap();
                expected.remove(&first);
            }
            let fs = FaultFs::new();
            let outcome = {
                let engine = EngineOptions::new()
                    .gc_max_unused(0.0)
                    .store_fs(Arc::new(FaultFsHandle(fs.clone())))
                    .open(dir.path().join("store"))
                    .unwrap_or_else(|e| panic!("{ctx}: the copy does not open: {e}"));
                fs.fail(n, fault);
                let (r, created) = run_op(&engine, op, first);
                fs.heal();
                // A create that failed may still have completed (its
                // catalog commit reached the disk before the error): then
                // it must hold the bytes it was given.
                if let Some(c) = created {
                    let id = SnapshotId(expected.keys().map(|k| k.0).max().unwrap_or(0) + 1);
                    if r.is_ok() {
                        assert!(engine.snapshot(id).is_ok(), "{ctx}");
                    }
                    expected.insert(id, c);
                }
                r
            };
            injected += 1;
            // A failed delete may still have happened (the catalog commit
            // came first); a failed create may have completed or not.
            let ctx = if outcome.is_ok() {
                format!("{ctx} (the operation succeeded)")
            } else {
                ctx
            };
            check(dir.path(), &expected, &ctx);
        }
        println!("{op:?}: each of its {count} store I/O calls failed once");
    }
    println!("{injected} faults injected");
}

/// Packs and manifests on a file system that keeps only what was fsynced
/// (and directory entries only once their directory was fsynced): random
/// operations, a crash at a random I/O call, a restart, and the
/// invariants: every operation that returned before the crash is durable.
#[test]
fn a_crash_at_any_store_io_call_keeps_every_completed_snapshot() {
    crash_at_random_store_io_calls(0);
}

/// The same over a store of group records.
#[test]
fn a_crash_at_any_store_io_call_in_a_grouped_store_keeps_every_snapshot() {
    crash_at_random_store_io_calls(GROUP);
}

fn crash_at_random_store_io_calls(group: u32) {
    use blocksnap::fsio::{CrashFs, CrashFsHandle};
    use blocksnap::sample::Rng;

    let dir = tempfile::tempdir().unwrap();
    let fs = CrashFs::new();
    let options = || {
        EngineOptions::new()
            .block_size(BS as u32)
            .group_frames(group)
            .gc_max_unused(0.0)
            .store_fs(Arc::new(CrashFsHandle(fs.clone())))
    };
    {
        let engine = options().open(dir.path().join("store")).unwrap();
        for s in 1..=2u64 {
            let disk = dir.path().join(format!("disk{s}.img"));
            std::fs::write(&disk, disk_bytes(LEN, s)).unwrap();
            engine
                .add_server(ServerId(s), &format!("s{s}"), &disk)
                .unwrap();
        }
    }
    let seed = crate::common::seed("BLOCKSNAP_CRASHFS_SEED");
    let mut rng = Rng::new(seed);
    // Snapshot -> (server, bytes) of every operation that returned Ok.
    let mut ledger: BTreeMap<SnapshotId, (u64, Vec<u8>)> = BTreeMap::new();
    let mut crashes = 0;
    for trial in 0..crate::common::env_count("BLOCKSNAP_CRASHFS_TRIALS", 30) {
        let engine = options().open(dir.path().join("store")).unwrap();
        fs.arm(rng.below(400));
        for _ in 0..30 {
            if fs.crashed() {
                break;
            }
            let server = 1 + rng.below(2);
            let disk = engine.server(ServerId(server)).unwrap().disk;
            match rng.below(5) {
                0 | 1 => {
                    let bytes = disk_bytes(LEN, rng.below(1 << 20));
                    std::fs::write(&disk, &bytes).unwrap();
                    if let Ok(s) = engine.create_snapshot(ServerId(server), "c", "") {
                        ledger.insert(s.id, (server, bytes));
                    }
                }
                2 => {
                    let mine: Vec<SnapshotId> = ledger
                        .iter()
                        .filter(|(_, (s, _))| *s == server)
                        .map(|(id, _)| *id)
                        .collect();
                    if mine.len() > 2 {
                        let id = mine[rng.below(mine.len() as u64) as usize];
                        ledger.remove(&id);
                        let _ = engine.delete_snapshot(id);
                    }
                }
                3 => {
                    let mine: Vec<SnapshotId> = ledger
                        .iter()
                        .filter(|(_, (s, _))| *s == server)
                        .map(|(id, _)| *id)
                        .collect();
                    if let Some(&id) = mine.first() {
                        let want = ledger[&id].1.clone();
                        // A successful restore replaces the safety snapshots.
                        for s in engine.snapshots(Some(ServerId(server))).unwrap() {
                            if s.kind == SnapshotKind::Safety {
                                ledger.remove(&s.id);
                            }
                        }
                        let before = std::fs::read(&disk).unwrap();
                        if let Ok(r) = engine.restore_snapshot(id) {
                            assert!(std::fs::read(&disk).unwrap() == want);
                            if let Some(s) = r.safety_snapshot {
                                ledger.insert(SnapshotId(s), (server, before));
                            }
                        }
                    }
                }
                _ => {
                    let _ = engine.gc(false);
                }
            }
        }
        if !fs.crashed() {
            fs.crash();
        }
        crashes += 1;
        drop(engine);
        fs.restart();
        let ctx = format!("crash {trial} (seed {seed})");
        let engine = options()
            .open(dir.path().join("store"))
            .unwrap_or_else(|e| panic!("{ctx}: the store does not open: {e}"));
        let verify = engine.verify(None).unwrap();
        assert!(verify.is_ok(), "{ctx}: {verify:?}");
        for (_, snap) in engine.open_report().interrupted_restores.clone() {
            engine.restore_snapshot(snap).unwrap();
        }
        let bare = RestoreOptions {
            safety_snapshot: false,
            verify: true,
        };
        for (id, (server, bytes)) in &ledger {
            let snap = engine
                .snapshot(*id)
                .unwrap_or_else(|e| panic!("{ctx}: snapshot {id} was lost: {e}"));
            assert_eq!(snap.status, SnapshotStatus::Completed, "{ctx}");
            engine.restore_snapshot_with(*id, bare).unwrap();
            let disk = engine.server(ServerId(*server)).unwrap().disk;
            assert!(
                std::fs::read(&disk).unwrap() == *bytes,
                "{ctx}: snapshot {id}"
            );
        }
        assert!(
            engine
                .snapshots(None)
                .unwrap()
                .iter()
                .all(|s| s.status != SnapshotStatus::InProgress),
            "{ctx}"
        );
    }
    println!(
        "{crashes} crashes at random store I/O calls survived, {} snapshots checked",
        ledger.len()
    );
}
