//! Restore rewrites exactly the blocks that differ, and follows the rules.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use blocksnap::{EngineOptions, Error, ServerId, ServerState, Snapshot, SnapshotId, SnapshotKind};

use crate::common::{BS, Fixture, disk_bytes, random_bytes};

#[test]
fn restore_rewrites_exactly_the_changed_blocks() {
    let fx = Fixture::new();
    let bytes = disk_bytes(500 * BS, 11);
    let path = fx.server(1, "web", &bytes);
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();

    let changed = [0u64, 3, 4, 77, 250, 499];
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for (k, b) in changed.iter().enumerate() {
        // Small writes inside a block, some into zero blocks.
        f.write_all_at(&random_bytes(100, k as u64), b * BS as u64 + 50)
            .unwrap();
    }
    drop(f);

    let r = fx.engine.restore_snapshot(snap.id).unwrap();
    assert_eq!(r.blocks_total, 500);
    assert_eq!(r.blocks_rewritten, changed.len() as u64);
    assert_eq!(r.bytes_written, changed.len() as u64 * BS as u64);
    assert!(std::fs::read(&path).unwrap() == bytes);

    // Restoring again finds nothing to do.
    let again = fx.engine.restore_snapshot(snap.id).unwrap();
    assert_eq!(again.blocks_rewritten, 0);
    assert_eq!(
        fx.engine.server(ServerId(1)).unwrap().state,
        ServerState::Idle
    );
}

#[test]
fn zero_blocks_become_holes_in_image_files() {
    use std::os::unix::fs::MetadataExt;
    let fx = Fixture::with(EngineOptions::new().block_size(64 << 10));
    let mut bytes = vec![0u8; 16 << 20];
    bytes[..64 << 10].fill(9);
    let path = fx.server(1, "sparse", &bytes);
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    std::fs::write(&path, vec![5u8; 16 << 20]).unwrap();
    let r = fx.engine.restore_snapshot(snap.id).unwrap();
    assert_eq!(r.blocks_rewritten, 256);
    assert!(std::fs::read(&path).unwrap() == bytes);
    let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(
        allocated < 4 << 20,
        "{allocated} bytes allocated for 64 KiB of data"
    );
}

#[test]
fn stop_hook_runs_before_the_disk_is_written_and_can_refuse() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refuse_hook = refuse.clone();
    let fx = Fixture::with(
        EngineOptions::new()
            .block_size(BS as u32)
            .stop_hook(move |server| {
                assert_eq!(server.id, ServerId(1));
                seen.fetch_add(1, Ordering::SeqCst);
                if refuse_hook.load(Ordering::SeqCst) {
                    Err("guest did not shut down".into())
                } else {
                    Ok(())
                }
            }),
    );
    let bytes = disk_bytes(50 * BS, 12);
    let path = fx.server(1, "web", &bytes);
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    std::fs::write(&path, random_bytes(50 * BS, 1)).unwrap();

    refuse.store(true, Ordering::SeqCst);
    let err = fx.engine.restore_snapshot(snap.id).unwrap_err();
    assert!(matches!(err, Error::StopHook { .. }), "{err}");
    assert!(
        std::fs::read(&path).unwrap() != bytes,
        "a refused restore wrote the disk"
    );
    assert_eq!(
        fx.engine.server(ServerId(1)).unwrap().state,
        ServerState::Idle
    );

    refuse.store(false, Ordering::SeqCst);
    fx.engine.restore_snapshot(snap.id).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(std::fs::read(&path).unwrap() == bytes);
}

#[test]
fn restoring_an_older_snapshot_leaves_newer_ones_intact() {
    let fx = Fixture::new();
    let v1 = disk_bytes(64 * BS, 13);
    let path = fx.server(1, "web", &v1);
    let s1 = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    let v2 = disk_bytes(64 * BS, 14);
    std::fs::write(&path, &v2).unwrap();
    let s2 = fx.engine.create_snapshot(ServerId(1), "v2", "").unwrap();
    let s1_before = fx.engine.snapshot(s1.id).unwrap();
    let s2_before = fx.engine.snapshot(s2.id).unwrap();

    fx.engine.restore_snapshot(s1.id).unwrap();
    assert!(std::fs::read(&path).unwrap() == v1);
    assert!(fx.engine.verify(Some(s2.id)).unwrap().is_ok());
    fx.engine.restore_snapshot(s2.id).unwrap();
    assert!(std::fs::read(&path).unwrap() == v2);
    // Both snapshots are there, untouched, plus the one safety snapshot of
    // the last restore (the first restore's was replaced).
    let list = fx.engine.snapshots(Some(ServerId(1))).unwrap();
    let regular: Vec<SnapshotId> = list
        .iter()
        .filter(|s| s.kind == SnapshotKind::Regular)
        .map(|s| s.id)
        .collect();
    assert_eq!(regular, vec![s2.id, s1.id]);
    assert_eq!(list.len(), 3);
    // Untouched but for their exclusive bytes, which the safety snapshots
    // (sharing their chunks) changed.
    let untouched = |mut s: Snapshot| {
        s.exclusive_bytes = None;
        s
    };
    assert_eq!(
        untouched(fx.engine.snapshot(s1.id).unwrap()),
        untouched(s1_before)
    );
    assert_eq!(
        untouched(fx.engine.snapshot(s2.id).unwrap()),
        untouched(s2_before)
    );
}
