//! A store on a file system that fills up: a capture that runs out of
//! space fails cleanly, and the store recovers by itself. Deleting the
//! failed snapshot and collecting garbage give back every byte of its data,
//! with no free space to start from, and captures and restores with safety
//! snapshots work again, in the same process and after a reopen. On a
//! small loop-mounted ext4 (root and loop devices, as `powercut.rs`).

use std::path::Path;

use blocksnap::{Engine, EngineOptions, ServerId, SnapshotStatus};

use crate::common::{Ext4, random_bytes};

/// The file system holds about two of these disks' data, not three.
const FS_LEN: u64 = 96 << 20;
const DISK_LEN: usize = 36 << 20;

/// Bytes the packs take on disk.
fn packs_len(store: &Path) -> u64 {
    std::fs::read_dir(store.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Fills the file system: v1 fits, v2 (other random data) runs out of space.
fn fill(engine: &Engine, disk: &Path) -> (blocksnap::SnapshotId, Vec<u8>) {
    let v1 = random_bytes(DISK_LEN, 1);
    std::fs::write(disk, &v1).unwrap();
    let first = engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    std::fs::write(disk, random_bytes(DISK_LEN, 2)).unwrap();
    engine.create_snapshot(ServerId(1), "v2", "").unwrap();
    std::fs::write(disk, random_bytes(DISK_LEN, 3)).unwrap();
    let err = engine
        .create_snapshot(ServerId(1), "v3", "")
        .expect_err("a third disk's data does not fit");
    assert!(
        err.to_string().contains("No space left"),
        "the capture fails for want of space: {err}"
    );
    (first.id, v1)
}

/// Deletes every snapshot but `keep`, failed ones included, and collects.
fn free_all_but(engine: &Engine, keep: blocksnap::SnapshotId) -> blocksnap::GcReport {
    for s in engine.snapshots(None).unwrap() {
        if s.id != keep {
            engine
                .delete_snapshot(s.id)
                .unwrap_or_else(|e| panic!("deleting {} with the disk full: {e}", s.id));
        }
    }
    engine
        .gc(false)
        .unwrap_or_else(|e| panic!("GC with the disk full: {e}"))
}

#[test]
fn a_store_recovers_from_a_full_disk_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Ext4::for_test(dir.path(), FS_LEN, "a full disk") else {
        return;
    };
    let store = fs.mnt.join("store");
    let disk = dir.path().join("disk.img");
    let options = || EngineOptions::new().gc_max_unused(0.0);

    // In the same process.
    let engine = options().open(&store).unwrap();
    engine.add_server(ServerId(1), "web", &disk).unwrap();
    let (first, v1) = fill(&engine, &disk);
    assert!(engine.verify(None).unwrap().is_ok());
    let report = free_all_but(&engine, first);
    let left = packs_len(&store);
    assert!(
        left < (DISK_LEN as u64) * 11 / 10,
        "GC left {left} bytes of packs for one {DISK_LEN}-byte snapshot: {report:?}"
    );
    std::fs::write(&disk, random_bytes(DISK_LEN, 4)).unwrap();
    engine.create_snapshot(ServerId(1), "again", "").unwrap();
    engine.restore_snapshot(first).unwrap(); // with its safety snapshot
    assert!(std::fs::read(&disk).unwrap() == v1);
    engine.close().unwrap();

    // Filled again, then reopened by another process (the command line).
    let engine = options().open(&store).unwrap();
    for s in engine.snapshots(None).unwrap() {
        if s.id != first {
            engine.delete_snapshot(s.id).unwrap();
        }
    }
    engine.gc(false).unwrap();
    let (first, v1) = fill(&engine, &disk);
    drop(engine);
    let engine = options().open(&store).unwrap();
    assert!(
        engine
            .snapshots(None)
            .unwrap()
            .iter()
            .all(|s| s.status != SnapshotStatus::InProgress)
    );
    let report = free_all_but(&engine, first);
    let left = packs_len(&store);
    assert!(
        left < (DISK_LEN as u64) * 11 / 10,
        "GC after a reopen left {left} bytes of packs: {report:?}"
    );
    engine.restore_snapshot(first).unwrap();
    assert!(std::fs::read(&disk).unwrap() == v1);
    assert!(engine.verify(None).unwrap().is_ok());
}
