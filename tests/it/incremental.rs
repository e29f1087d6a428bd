//! Incremental capture from dirty bitmaps, tracked writes, delta restore,
//! sparse disks and resized disks, through the engine.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use blocksnap::{
    CaptureKind, DirtyBitmap, EngineOptions, Error, FullReason, RestoreMethod, RestoreOptions,
    ServerId, SnapshotId,
};

use crate::common::{BS, Fixture, disk_bytes};

const LEN: usize = 256 * BS;

fn write_at(path: &Path, offset: usize, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset as u64).unwrap();
}

fn tracking() -> EngineOptions {
    EngineOptions::new()
        .block_size(BS as u32)
        .change_tracking(true)
}

/// Writes `bytes` at each offset to the disk and reports them.
fn guest_writes(fx: &Fixture, server: u64, path: &Path, writes: &[(usize, &[u8])]) {
    for (at, bytes) in writes {
        write_at(path, *at, bytes);
        fx.engine
            .record_write(ServerId(server), *at as u64, bytes.len() as u64)
            .unwrap();
    }
}

#[test]
fn an_incremental_snapshot_reads_only_dirty_blocks_and_restores_exactly() {
    let fx = Fixture::new();
    let v1 = disk_bytes(LEN, 1);
    let path = fx.server(1, "web", &v1);
    let first = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    write_at(&path, 10 * BS + 7, b"changed");
    write_at(&path, 200 * BS, &[0xAB; 3 * BS]);
    let v2 = std::fs::read(&path).unwrap();
    let dirty = DirtyBitmap::from_ranges(
        LEN as u64,
        BS as u64,
        [(10 * BS as u64 + 7, 7), (200 * BS as u64, 3 * BS as u64)],
    )
    .unwrap();
    let inc = fx
        .engine
        .create_incremental(ServerId(1), "v2", "", first.id, dirty)
        .unwrap();
    let stats = inc.stats.unwrap();
    assert_eq!(stats.kind, CaptureKind::Incremental);
    assert_eq!(stats.parent, Some(first.id));
    assert_eq!(stats.blocks_read, 4);
    assert_eq!(stats.bytes_read, 4 * BS as u64);
    assert!(stats.sample_checked >= 1);
    assert_eq!(stats.sample_mismatches, 0);
    // The same disk captured in full gives the same snapshot.
    let full = fx
        .engine
        .create_snapshot(ServerId(1), "v2-full", "")
        .unwrap();
    assert_eq!(full.stats.unwrap().new_chunks, 0);
    assert_eq!(full.size_mb, inc.size_mb);
    assert_eq!(full.stats.unwrap().data_bytes, stats.data_bytes);

    std::fs::write(&path, vec![0x55; LEN]).unwrap();
    fx.engine.restore_snapshot(inc.id).unwrap();
    assert!(std::fs::read(&path).unwrap() == v2);
    fx.engine.restore_snapshot(first.id).unwrap();
    assert!(std::fs::read(&path).unwrap() == v1);
    assert!(fx.engine.verify(None).unwrap().is_ok());
}

#[test]
fn a_coarse_bitmap_works_at_any_multiple_of_the_block_size() {
    let fx = Fixture::new();
    let path = fx.server(1, "web", &disk_bytes(LEN, 2));
    let first = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    write_at(&path, 65 * BS, b"x");
    let v2 = std::fs::read(&path).unwrap();
    // 64 KiB per bit: block 65 lies in region 4 (blocks 64..80).
    let dirty =
        DirtyBitmap::from_ranges(LEN as u64, 16 * BS as u64, [(65 * BS as u64, 1)]).unwrap();
    let inc = fx
        .engine
        .create_incremental(ServerId(1), "v2", "", first.id, dirty)
        .unwrap();
    assert_eq!(inc.stats.unwrap().blocks_read, 16);
    std::fs::write(&path, vec![0u8; LEN]).unwrap();
    fx.engine.restore_snapshot(inc.id).unwrap();
    assert!(std::fs::read(&path).unwrap() == v2);
}

#[test]
fn wrong_parents_and_bitmaps_are_errors_that_change_nothing() {
    let fx = Fixture::new();
    let path = fx.server(1, "web", &disk_bytes(LEN, 3));
    fx.server(2, "db", &disk_bytes(LEN, 4));
    let first = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    let other = fx.engine.create_snapshot(ServerId(2), "db1", "").unwrap();
    let ok = || DirtyBitmap::new(LEN as u64, BS as u64).unwrap();
    let before = fx.engine.snapshots(None).unwrap();
    let inc = |parent: SnapshotId, dirty: DirtyBitmap| {
        fx.engine
            .create_incremental(ServerId(1), "inc", "", parent, dirty)
            .unwrap_err()
    };

    let e = inc(other.id, ok());
    assert!(matches!(e, Error::InvalidParameter(_)), "{e}");
    assert!(e.to_string().contains("belongs to server 2"), "{e}");
    assert!(matches!(
        inc(SnapshotId(99), ok()),
        Error::SnapshotNotFound(_)
    ));
    let e = inc(
        first.id,
        DirtyBitmap::new(LEN as u64 + 1, BS as u64).unwrap(),
    );
    assert!(e.to_string().contains("dirty bitmap describes"), "{e}");
    let e = inc(first.id, DirtyBitmap::new(LEN as u64, 2048).unwrap());
    assert!(e.to_string().contains("not a multiple"), "{e}");
    // Wrong byte length of a raw bitmap.
    let e = DirtyBitmap::from_bytes(LEN as u64, BS as u64, &[0; 31]).unwrap_err();
    assert!(e.to_string().contains("needs 32"), "{e}");
    // A grown disk needs a full snapshot.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(LEN as u64 + BS as u64)
        .unwrap();
    let e = inc(first.id, ok());
    assert!(e.to_string().contains("take a full snapshot"), "{e}");
    assert_eq!(fx.engine.snapshots(None).unwrap(), before);
}

#[test]
fn a_parent_that_is_not_completed_is_refused() {
    let gate = crate::common::Gate::default();
    let fx = Fixture::with(
        EngineOptions::new()
            .block_size(BS as u32)
            .disk_opener(gate.opener()),
    );
    let _opens = gate.open_on_drop();
    fx.server(1, "web", &disk_bytes(LEN, 5));
    let running = fx.engine.start_snapshot(ServerId(1), "v1", "").unwrap();
    let e = fx
        .engine
        .create_incremental(
            ServerId(1),
            "inc",
            "",
            running.snapshot.id,
            DirtyBitmap::new(LEN as u64, BS as u64).unwrap(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::WrongState(_)), "{e}");
    assert!(e.to_string().contains("in_progress"), "{e}");
    gate.open();
    running.wait().unwrap();
}

#[test]
fn a_bitmap_that_missed_writes_is_caught_by_the_sample_and_the_capture_goes_full() {
    let fx = Fixture::with(
        EngineOptions::new()
            .block_size(BS as u32)
            .clean_sample_rate(1.0),
    );
    let path = fx.server(1, "web", &disk_bytes(LEN, 6));
    let first = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    write_at(&path, 30 * BS, b"missed by the tracker");
    let v2 = std::fs::read(&path).unwrap();
    let snap = fx
        .engine
        .create_incremental(
            ServerId(1),
            "v2",
            "",
            first.id,
            DirtyBitmap::new(LEN as u64, BS as u64).unwrap(),
        )
        .unwrap();
    let stats = snap.stats.unwrap();
    assert_eq!(stats.kind, CaptureKind::Full);
    assert_eq!(stats.full_reason, Some(FullReason::SampleMismatch));
    assert_eq!(stats.sample_mismatches, 1);
    assert_eq!(stats.blocks_read, 256);
    std::fs::write(&path, vec![0u8; LEN]).unwrap();
    fx.engine.restore_snapshot(snap.id).unwrap();
    assert!(std::fs::read(&path).unwrap() == v2);
}

#[test]
fn tracked_writes_make_the_next_snapshot_incremental_and_the_restore_a_delta() {
    let fx = Fixture::with(tracking());
    let v1 = disk_bytes(LEN, 7);
    let path = fx.server(1, "web", &v1);
    // Writes before any snapshot are not tracked: nothing to track against.
    fx.engine.record_write(ServerId(1), 0, 1).unwrap();
    assert_eq!(fx.engine.tracking_status(ServerId(1)).unwrap(), None);
    let first = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    assert_eq!(
        first.stats.unwrap().full_reason,
        Some(FullReason::NoTracking)
    );

    guest_writes(
        &fx,
        1,
        &path,
        &[(5 * BS, b"hello"), (100 * BS - 2, b"span")],
    );
    let status = fx.engine.tracking_status(ServerId(1)).unwrap().unwrap();
    assert_eq!(
        (status.base, status.dirty_blocks, status.trusted),
        (first.id, 3, true)
    );
    let v2 = std::fs::read(&path).unwrap();
    let second = fx.engine.create_snapshot(ServerId(1), "v2", "").unwrap();
    let stats = second.stats.unwrap();
    assert_eq!(stats.kind, CaptureKind::Incremental);
    assert_eq!((stats.parent, stats.blocks_read), (Some(first.id), 3));
    assert_eq!(stats.tracking_generation, Some(status.generation));

    // Back to v1 by delta: the 3 blocks that differ between the manifests.
    let r = fx.engine.restore_snapshot(first.id).unwrap();
    assert_eq!(r.method, RestoreMethod::Delta);
    assert_eq!((r.blocks_rewritten, r.bytes_compared), (3, 0));
    assert!(std::fs::read(&path).unwrap() == v1);

    // Tracking restarts from the restored snapshot: writes since then, plus
    // the manifests' difference, are all a restore of v2 needs.
    guest_writes(&fx, 1, &path, &[(50 * BS, b"after the restore")]);
    let status = fx.engine.tracking_status(ServerId(1)).unwrap().unwrap();
    assert_eq!((status.base, status.dirty_blocks), (first.id, 1));
    let r = fx.engine.restore_snapshot(second.id).unwrap();
    assert_eq!((r.method, r.blocks_rewritten), (RestoreMethod::Delta, 4));
    assert!(std::fs::read(&path).unwrap() == v2);
    let third = fx.engine.create_snapshot(ServerId(1), "v3", "").unwrap();
    let stats = third.stats.unwrap();
    assert_eq!(
        (stats.kind, stats.parent),
        (CaptureKind::Incremental, Some(second.id))
    );
    assert_eq!((stats.blocks_read, stats.new_chunks), (0, 0));
    assert!(fx.engine.verify(None).unwrap().is_ok());
}

#[test]
fn a_clean_close_hands_tracking_over_and_a_crash_does_not() {
    let fx = Fixture::with(tracking());
    let path = fx.server(1, "web", &disk_bytes(LEN, 8));
    fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    guest_writes(&fx, 1, &path, &[(9 * BS, b"before close")]);
    let gen1 = fx
        .engine
        .tracking_status(ServerId(1))
        .unwrap()
        .unwrap()
        .generation;

    // Clean close and reopen: trusted, the write still known.
    let fx = fx.reopen(tracking());
    let status = fx.engine.tracking_status(ServerId(1)).unwrap().unwrap();
    assert!(status.trusted);
    assert_eq!((status.generation, status.dirty_blocks), (gen1, 1));

    // A crash: the store as it is on disk while open (every tracker marked
    // unclean at open) is what a killed process leaves.
    let crashed = fx.dir.path().join("crashed");
    crate::common::copy_tree(&fx.store(), &crashed);
    let v = fx.engine.create_snapshot(ServerId(1), "v2", "").unwrap();
    assert_eq!(v.stats.unwrap().kind, CaptureKind::Incremental);
    drop(fx.engine);
    let engine = tracking().open(&crashed).unwrap();
    let status = engine.tracking_status(ServerId(1)).unwrap().unwrap();
    assert!(!status.trusted);
    let snap = engine
        .create_snapshot(ServerId(1), "after-crash", "")
        .unwrap();
    let stats = snap.stats.unwrap();
    assert_eq!(
        (stats.kind, stats.full_reason),
        (CaptureKind::Full, Some(FullReason::Untrusted))
    );
    // The full capture starts a new, trusted generation.
    let status = engine.tracking_status(ServerId(1)).unwrap().unwrap();
    assert!(status.trusted && status.generation > gen1);
}

#[test]
fn an_adopted_bitmap_is_trusted_and_opening_without_tracking_keeps_the_trackers() {
    let fx = Fixture::with(tracking());
    let path = fx.server(1, "web", &disk_bytes(LEN, 9));
    let first = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    let before = fx.engine.tracking_status(ServerId(1)).unwrap().unwrap();
    // A look at the store without tracking (an operator's `snapshot list`)
    // reports no writes and changes no tracker.
    let fx = fx.reopen(EngineOptions::new());
    assert!(matches!(
        fx.engine.record_write(ServerId(1), 0, 1),
        Err(Error::WrongState(_))
    ));
    fx.engine.snapshots(None).unwrap();
    fx.engine.create_snapshot(ServerId(1), "look", "").unwrap();
    let fx = fx.reopen(tracking());
    let after = fx.engine.tracking_status(ServerId(1)).unwrap().unwrap();
    assert!(after.trusted && after.base == before.base && after.dirty_blocks == 0);
    // The guest wrote while the agent's store was closed: the agent hands
    // the hypervisor's own bitmap over.
    write_at(&path, 3 * BS, b"written while untracked");
    let dirty = DirtyBitmap::from_ranges(LEN as u64, BS as u64, [(3 * BS as u64, 1)]).unwrap();
    let status = fx
        .engine
        .adopt_dirty_bitmap(ServerId(1), first.id, &dirty)
        .unwrap();
    assert!(status.trusted);
    let v2 = std::fs::read(&path).unwrap();
    let snap = fx.engine.create_snapshot(ServerId(1), "v2", "").unwrap();
    let stats = snap.stats.unwrap();
    assert_eq!(
        (stats.kind, stats.blocks_read),
        (CaptureKind::Incremental, 1)
    );
    guest_writes(&fx, 1, &path, &[(0, &vec![0u8; LEN])]);
    let r = fx.engine.restore_snapshot(snap.id).unwrap();
    assert_eq!(r.method, RestoreMethod::Delta);
    assert!(std::fs::read(&path).unwrap() == v2);
}

#[test]
fn a_restore_without_tracking_removes_the_saved_tracker() {
    let fx = Fixture::with(tracking());
    let path = fx.server(1, "web", &disk_bytes(LEN, 13));
    let v1 = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    write_at(&path, 0, b"changed");
    fx.engine.record_write(ServerId(1), 0, 7).unwrap();
    fx.engine.create_snapshot(ServerId(1), "v2", "").unwrap();
    // The disk changes behind the saved tracker's back: it must go.
    let fx = fx.reopen(EngineOptions::new());
    fx.engine.restore_snapshot(v1.id).unwrap();
    let fx = fx.reopen(tracking());
    assert_eq!(fx.engine.tracking_status(ServerId(1)).unwrap(), None);
    let v3 = fx.engine.create_snapshot(ServerId(1), "v3", "").unwrap();
    assert_eq!(v3.stats.unwrap().kind, CaptureKind::Full);
    let bare = RestoreOptions::default()
        .safety_snapshot(false)
        .verify(true);
    write_at(&path, 0, b"garbage");
    fx.engine.record_write(ServerId(1), 0, 7).unwrap();
    fx.engine.restore_snapshot_with(v3.id, bare).unwrap();
    assert!(std::fs::read(&path).unwrap() == disk_bytes(LEN, 13));
}

#[test]
fn deleting_the_tracked_base_or_growing_the_disk_falls_back_to_full() {
    let fx = Fixture::with(tracking());
    let path = fx.server(1, "web", &disk_bytes(LEN, 10));
    let first = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    fx.engine.delete_snapshot(first.id).unwrap();
    let second = fx.engine.create_snapshot(ServerId(1), "v2", "").unwrap();
    assert_eq!(
        second.stats.unwrap().full_reason,
        Some(FullReason::BaseGone)
    );

    // The guest grows its disk: a write past the old end untrusts the
    // tracker and the next capture reads the whole, longer disk.
    let grown = LEN + 64 * BS;
    write_at(&path, grown - 5, b"tail!");
    fx.engine
        .record_write(ServerId(1), grown as u64 - 5, 5)
        .unwrap();
    let third = fx.engine.create_snapshot(ServerId(1), "v3", "").unwrap();
    let stats = third.stats.unwrap();
    assert_eq!(stats.kind, CaptureKind::Full);
    assert_eq!(stats.image_len, grown as u64);
    // Restoring the shorter snapshot sets the length back.
    let v2 = disk_bytes(LEN, 10);
    let r = fx.engine.restore_snapshot(second.id).unwrap();
    assert_eq!(r.method, RestoreMethod::Compare);
    assert!(std::fs::read(&path).unwrap() == v2);
    // And forward again to the grown one.
    let grown_bytes = {
        let mut v = v2.clone();
        v.resize(grown, 0);
        v[grown - 5..].copy_from_slice(b"tail!");
        v
    };
    fx.engine.restore_snapshot(third.id).unwrap();
    assert!(std::fs::read(&path).unwrap() == grown_bytes);
}

#[test]
fn a_sparse_image_is_captured_without_reading_its_holes_and_restored_sparse() {
    let fx = Fixture::new();
    let path = fx.disk("sparse.img");
    let len = 64u64 << 20;
    {
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(len).unwrap();
        f.write_all_at(&disk_bytes(8 * BS, 11), 1 << 20).unwrap();
        f.write_all_at(b"end", len - 3).unwrap();
    }
    fx.engine.add_server(ServerId(1), "sparse", &path).unwrap();
    let want = std::fs::read(&path).unwrap();
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    let stats = snap.stats.unwrap();
    // Only the blocks with data are read (a file system may allocate a
    // little around them), not 64 MiB.
    assert!(
        stats.bytes_read <= 1 << 20,
        "read {} bytes",
        stats.bytes_read
    );
    assert_eq!(stats.image_len, len);

    std::fs::remove_file(&path).unwrap();
    fx.engine.restore_snapshot(snap.id).unwrap();
    assert!(std::fs::read(&path).unwrap() == want);
    let meta = std::fs::metadata(&path).unwrap();
    assert!(
        meta.blocks() * 512 < 4 << 20,
        "the restored image allocates {} bytes",
        meta.blocks() * 512
    );
}

/// A tracked capture that fails (the disk cannot be read) hands its writes
/// back to the tracking it took over from: the next capture is still
/// incremental from the last good snapshot, and exact.
#[test]
fn a_failed_tracked_capture_leaves_the_next_one_incremental_and_exact() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Flaky(blocksnap::disk::FileDisk, Arc<AtomicBool>);
    impl blocksnap::disk::Disk for Flaky {
        fn len(&self) -> blocksnap::Result<u64> {
            self.0.len()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> blocksnap::Result<usize> {
            if self.1.load(Ordering::Relaxed) {
                return Err(Error::io(self.0.path(), std::io::Error::other("injected")));
            }
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> blocksnap::Result<()> {
            self.0.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> blocksnap::Result<()> {
            self.0.write_zeroes(offset, len)
        }
        fn set_len(&self, len: u64) -> blocksnap::Result<()> {
            self.0.set_len(len)
        }
        fn is_block_device(&self) -> bool {
            false
        }
        fn sync(&self) -> blocksnap::Result<()> {
            self.0.sync()
        }
        fn path(&self) -> &Path {
            self.0.path()
        }
    }
    let failing = Arc::new(AtomicBool::new(false));
    let flag = failing.clone();
    let opener: blocksnap::disk::DiskOpener = Arc::new(move |path: &Path, writable: bool| {
        Ok(Box::new(Flaky(
            blocksnap::disk::FileDisk::open(path, writable)?,
            flag.clone(),
        )) as Box<dyn blocksnap::disk::Disk>)
    });
    let fx = Fixture::with(tracking().disk_opener(opener).clean_sample_rate(0.0));
    let v1 = disk_bytes(LEN, 1);
    let disk = fx.server(1, "web", &v1);
    let s1 = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    guest_writes(&fx, 1, &disk, &[(3 * BS, &[7u8; 100][..])]);
    failing.store(true, Ordering::Relaxed);
    assert!(fx.engine.create_snapshot(ServerId(1), "lost", "").is_err());
    failing.store(false, Ordering::Relaxed);
    guest_writes(&fx, 1, &disk, &[(9 * BS, &[8u8; 100][..])]);
    let s3 = fx.engine.create_snapshot(ServerId(1), "v3", "").unwrap();
    let st = s3.stats.unwrap();
    assert_eq!(st.kind, CaptureKind::Incremental, "{st:?}");
    assert_eq!(st.parent, Some(s1.id));
    assert_eq!(st.blocks_read, 2, "the writes before and after the failure");
    let expected = std::fs::read(&disk).unwrap();
    guest_writes(
        &fx,
        1,
        &disk,
        &[(0, &[1u8; 3 * BS][..]), (9 * BS, &[2u8; 50][..])],
    );
    fx.engine
        .restore_snapshot_with(s3.id, RestoreOptions::default().safety_snapshot(false))
        .unwrap();
    assert!(std::fs::read(&disk).unwrap() == expected);
}
