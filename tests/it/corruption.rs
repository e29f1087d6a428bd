//! Corruption is detected, reported with its chunk and snapshots, and never
//! written back to a disk.

use std::path::{Path, PathBuf};

use blocksnap::{ChunkId, Error, ServerId, ServerState};

use crate::common::{BS, Fixture, random_bytes};

/// Finds `needle` in the store's packs; returns the file and offset.
fn find_in_packs(store: &Path, needle: &[u8]) -> (PathBuf, usize) {
    for e in std::fs::read_dir(store.join("packs")).unwrap().flatten() {
        let bytes = std::fs::read(e.path()).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            return (e.path(), at);
        }
    }
    panic!("bytes not found in any pack");
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_flipped_pack_byte_is_reported_and_never_restored() {
    let fx = Fixture::new();
    // Random blocks are stored raw, so their bytes can be found in the pack.
    let bytes = random_bytes(32 * BS, 1);
    let path = fx.server(1, "web", &bytes);
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    let other = fx.server(2, "db", &random_bytes(8 * BS, 2));
    let healthy = fx.engine.create_snapshot(ServerId(2), "t", "").unwrap();

    let victim = 7;
    let block = &bytes[victim * BS..(victim + 1) * BS];
    let (pack, at) = find_in_packs(&fx.store(), block);
    flip_byte(&pack, at + 1000);

    let report = fx.engine.verify(None).unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.bad_chunks.len(), 1);
    let bad = &report.bad_chunks[0];
    assert_eq!(bad.chunk, ChunkId::of(block).to_hex());
    assert_eq!(bad.snapshots, vec![snap.id.0]);
    assert!(bad.error.contains("checksum"), "{}", bad.error);
    assert_eq!(report.damaged_snapshots(), vec![snap.id.0]);
    assert!(fx.engine.verify(Some(healthy.id)).unwrap().is_ok());

    // The disk's block 7 now differs; the restore must fail on it and
    // must not write the corrupt bytes.
    let mut disk = bytes.clone();
    disk[victim * BS..(victim + 1) * BS].fill(0xAB);
    std::fs::write(&path, &disk).unwrap();
    let err = fx.engine.restore_snapshot(snap.id).unwrap_err();
    assert!(err.is_corruption(), "{err}");
    assert!(matches!(err, Error::Corruption { .. }));
    assert!(
        std::fs::read(&path).unwrap() == disk,
        "the disk was written"
    );
    // Nothing was written, so the server is not left restoring.
    assert_eq!(
        fx.engine.server(ServerId(1)).unwrap().state,
        ServerState::Idle
    );
    // The other server's snapshot is untouched.
    std::fs::write(&other, b"x").unwrap();
    fx.engine.restore_snapshot(healthy.id).unwrap();
}

#[test]
fn a_corrupt_manifest_is_reported_by_verify_and_refused_by_restore() {
    let fx = Fixture::new();
    fx.server(1, "web", &random_bytes(8 * BS, 3));
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    let manifest = fx
        .store()
        .join("manifests")
        .join(format!("{:020}.manifest", snap.id.0));
    flip_byte(&manifest, 70);
    let report = fx.engine.verify(None).unwrap();
    assert_eq!(report.bad_manifests.len(), 1);
    assert_eq!(report.damaged_snapshots(), vec![snap.id.0]);
    let err = fx.engine.restore_snapshot(snap.id).unwrap_err();
    assert!(err.is_corruption(), "{err}");
}

#[test]
fn a_truncated_pack_is_corruption_not_a_panic() {
    let fx = Fixture::new();
    let bytes = random_bytes(16 * BS, 4);
    let path = fx.server(1, "web", &bytes);
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    let fx = fx.reopen(blocksnap::EngineOptions::new());
    let (pack, _) = find_in_packs(&fx.store(), &bytes[..BS]);
    let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    drop(f);
    // The sealed pack lost its index: reopening scans what is left.
    let fx = fx.reopen(blocksnap::EngineOptions::new());
    let report = fx.engine.verify(None).unwrap();
    assert!(!report.is_ok());
    std::fs::write(&path, vec![1u8; 16 * BS]).unwrap();
    let err = fx.engine.restore_snapshot(snap.id).unwrap_err();
    assert!(err.is_corruption(), "{err}");
}
