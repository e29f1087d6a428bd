//! A store on a file system that fills up: a capture that runs out of
//! space fails cleanly, and the store recovers by itself. Deleting the
//! failed snapshot and collecting garbage give back every byte of its data,
//! with no free space to start from, and captures and restores with safety
//! snapshots work again, in the same process and after a reopen. On a
//! small loop-mounted ext4 (root and loop devices, as `powercut.rs`). The
//! same when another process fills the disk in the middle of a garbage
//! collection and of a restore's safety snapshot.

use std::path::Path;

use blocksnap::{Engine, EngineOptions, ServerId, SnapshotStatus};

use crate::common::{Ext4, random_bytes};

/// The file system holds about two of these disks' data, not three.
const FS_LEN: u64 = 96 << 20;
const DISK_LEN: usize = 36 << 20;

/// Bytes the packs take on disk.
fn packs_len(store: &Path) -> u64 {
    crate::common::packs_bytes(store)
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

/// Free bytes of the file system at `mnt`.
fn free_bytes(mnt: &Path) -> u64 {
    let path = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs writes into a zeroed local struct it is handed; the
    // path is a valid NUL-terminated string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs {}", mnt.display());
    st.f_bavail * st.f_frsize
}

/// Another process filling the file system: first until only `leave`
/// bytes are free, then, while `op` runs, to the last byte. Returns `op`'s
/// outcome; the filler is removed after.
fn while_filling<T>(mnt: &Path, leave: u64, op: impl FnOnce() -> T) -> T {
    use std::io::Write;
    let filler = mnt.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0x55u8; 1 << 20];
    while free_bytes(mnt) > leave + (1 << 20) && f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    let writer = std::thread::spawn(move || {
        while f.write_all(&chunk[..64 << 10]).is_ok() {}
        let _ = f.sync_all();
    });
    let outcome = op();
    writer.join().unwrap();
    std::fs::remove_file(&filler).unwrap();
    outcome
}

/// The disk fills up, because of another process, in the middle of a
/// garbage collection and of a restore's safety snapshot: each either
/// completes or fails cleanly, nothing is lost, and once the space is back
/// everything works.
#[test]
fn a_disk_filled_by_another_process_mid_gc_or_mid_restore_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Ext4::for_test(dir.path(), FS_LEN, "a disk filled by another process") else {
        return;
    };
    let store = fs.mnt.join("store");
    let disk = dir.path().join("disk.img");
    let engine = EngineOptions::new()
        .gc_max_unused(0.0)
        .open(&store)
        .unwrap();
    engine.add_server(ServerId(1), "web", &disk).unwrap();
    let v1 = random_bytes(DISK_LEN / 2, 11);
    std::fs::write(&disk, &v1).unwrap();
    let first = engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    // Garbage in the middle of a pack, so that GC must rewrite it.
    std::fs::write(&disk, random_bytes(DISK_LEN / 2, 12)).unwrap();
    let garbage = engine.create_snapshot(ServerId(1), "v2", "").unwrap();
    let mut v3 = v1.clone();
    v3[..1 << 20].copy_from_slice(&random_bytes(1 << 20, 13));
    std::fs::write(&disk, &v3).unwrap();
    let third = engine.create_snapshot(ServerId(1), "v3", "").unwrap();
    engine.delete_snapshot(garbage.id).unwrap();

    // Its rewrite needs about 18 MiB of room; it gets a few.
    let gc = while_filling(&fs.mnt, 6 << 20, || engine.gc(false));
    println!("GC while the disk filled: {gc:?}");
    let gc = gc.expect("a GC never fails for want of room: it says what it needs");
    assert!(gc.packs_rewritten + gc.packs_short_of_space == 1, "{gc:?}");
    assert!(engine.verify(None).unwrap().is_ok());

    let work = random_bytes(DISK_LEN / 2, 14);
    std::fs::write(&disk, &work).unwrap();
    // Its safety snapshot needs about 18 MiB of room; it gets a few.
    let restore = while_filling(&fs.mnt, 6 << 20, || engine.restore_snapshot(first.id));
    println!("restore while the disk filled: {restore:?}");
    match restore {
        Ok(_) => {}
        // Its safety snapshot failed: nothing was written.
        Err(blocksnap::Error::SafetySnapshot { .. }) => {
            assert!(std::fs::read(&disk).unwrap() == work, "nothing written");
            engine.restore_snapshot(first.id).unwrap();
        }
        Err(e) => panic!("a restore failed otherwise than by its safety snapshot: {e}"),
    }
    assert!(std::fs::read(&disk).unwrap() == v1);
    engine.gc(false).unwrap();
    assert!(engine.verify(None).unwrap().is_ok());
    let bare = blocksnap::RestoreOptions::default().safety_snapshot(false);
    engine.restore_snapshot_with(third.id, bare).unwrap();
    assert!(std::fs::read(&disk).unwrap() == v3);
    drop(engine);
    let engine = EngineOptions::new().open(&store).unwrap();
    assert!(engine.verify(None).unwrap().is_ok());
    engine.restore_snapshot_with(first.id, bare).unwrap();
    assert!(std::fs::read(&disk).unwrap() == v1);
}
