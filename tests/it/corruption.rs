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
    assert_eq!(bad.snapshots, vec![snap.id]);
    assert!(bad.error.contains("checksum"), "{}", bad.error);
    assert_eq!(report.damaged_snapshots(), vec![snap.id]);
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
    assert_eq!(report.damaged_snapshots(), vec![snap.id]);
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

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            files_under(&e.path(), out);
        } else {
            out.push(e.path());
        }
    }
}

/// Damages `path` one of four ways; returns what it did.
fn damage(path: &Path, rng: &mut blocksnap::sample::Rng) -> String {
    let mut bytes = std::fs::read(path).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    if bytes.is_empty() {
        std::fs::remove_file(path).unwrap();
        return format!("deleted empty {name}");
    }
    let len = bytes.len() as u64;
    match rng.below(4) {
        0 => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let at = rng.below(len) as usize;
                bytes[at] ^= 1 << rng.below(8);
            }
            std::fs::write(path, bytes).unwrap();
            format!("flipped {n} bits in {name}")
        }
        1 => {
            let at = rng.below(len);
            std::fs::write(path, &bytes[..at as usize]).unwrap();
            format!("truncated {name} to {at} of {len} bytes")
        }
        2 => {
            let at = rng.below(len) as usize;
            let n = (1 + rng.below(4096) as usize).min(bytes.len() - at);
            bytes[at..at + n].fill(0);
            std::fs::write(path, bytes).unwrap();
            format!("zeroed {n} bytes of {name} at {at}")
        }
        _ => {
            std::fs::remove_file(path).unwrap();
            format!("deleted {name}")
        }
    }
}

/// For every kind of file in a store (packs, manifests, catalog, lock),
/// random damage: the store either refuses to open with an error (never a
/// panic), or opens and `verify` names every snapshot the damage touched;
/// restoring a named one fails with a corruption error, and every snapshot
/// it does not name restores byte-exact. No damage goes unreported.
#[test]
fn random_damage_to_any_store_file_is_reported_and_never_restored() {
    random_damage_trials(blocksnap::EngineOptions::new().block_size(BS as u32));
}

/// The same with the chunk index table covering every pack (written at
/// each capture's end), so that its pages are damaged too.
#[test]
fn random_damage_with_the_chunk_index_table_covering_the_packs() {
    random_damage_trials(
        blocksnap::EngineOptions::new()
            .block_size(BS as u32)
            .index_persist_min(0),
    );
}

/// The same in a store of group records (the compact setting), where one
/// damaged record holds many chunks.
#[test]
fn random_damage_to_a_grouped_store_is_reported_and_never_restored() {
    random_damage_trials(
        blocksnap::EngineOptions::new()
            .block_size(BS as u32)
            .compression(blocksnap::Compression::new(1, 8 * BS as u32)),
    );
}

fn random_damage_trials(options: blocksnap::EngineOptions) {
    use blocksnap::sample::Rng;
    use blocksnap::{EngineOptions, RestoreOptions, SnapshotId};

    let base = tempfile::tempdir().unwrap();
    let store = base.path().join("store");
    let mut expected: Vec<(SnapshotId, u64, Vec<u8>)> = Vec::new();
    {
        let engine = options.open(&store).unwrap();
        for s in 1..=2u64 {
            let disk = base.path().join(format!("disk{s}.img"));
            engine
                .add_server(ServerId(s), &format!("s{s}"), &disk)
                .unwrap();
            for v in 0..2u64 {
                let mut bytes = crate::common::disk_bytes(24 * BS, 100 + s);
                bytes[v as usize * BS..(v as usize + 4) * BS]
                    .copy_from_slice(&random_bytes(4 * BS, s * 10 + v));
                std::fs::write(&disk, &bytes).unwrap();
                let snap = engine.create_snapshot(ServerId(s), "v", "").unwrap();
                expected.push((snap.id, s, bytes));
            }
        }
    }
    let mut files = Vec::new();
    files_under(&store, &mut files);
    let seed = crate::common::seed("BLOCKSNAP_CORRUPTION_SEED");
    let mut rng = Rng::new(seed);
    let (mut refused, mut reported, mut harmless) = (0, 0, 0);
    for trial in 0..crate::common::env_count("BLOCKSNAP_CORRUPTION_TRIALS", 40) {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("store");
        crate::common::copy_tree(&store, &copy);
        let mut copies = Vec::new();
        files_under(&copy, &mut copies);
        copies.sort();
        let victim = &copies[rng.below(copies.len() as u64) as usize];
        let what = damage(victim, &mut rng);
        let ctx = format!("trial {trial} (seed {seed}): {what}");
        let name = victim.file_name().unwrap().to_string_lossy().to_string();
        let engine = match EngineOptions::new().create(false).open(&copy) {
            Ok(e) => e,
            Err(e) => {
                // Refused: only as corruption, naming the damaged file.
                assert!(e.is_corruption(), "{ctx}: refused with {e}");
                assert!(
                    e.to_string().contains(&name),
                    "{ctx}: {e} names another file"
                );
                refused += 1;
                continue;
            }
        };
        let report = engine.verify(None).unwrap();
        let damaged: Vec<u64> = report.damaged_snapshots().iter().map(|s| s.0).collect();
        if damaged.is_empty() && report.catalog_error.is_none() {
            harmless += 1;
        } else {
            reported += 1;
        }
        let bare = RestoreOptions::default()
            .safety_snapshot(false)
            .verify(true);
        for (id, s, bytes) in &expected {
            let disk = dir.path().join(format!("disk{s}.img"));
            if engine.snapshot(*id).is_err() {
                // Gone: only if verify said the catalog is damaged, or
                // named the snapshot. A silent loss fails the trial.
                assert!(
                    report.catalog_error.is_some() || damaged.contains(&id.0),
                    "{ctx}: snapshot {id} vanished and nothing reported it"
                );
                continue;
            }
            // Re-point the server at a disk in this trial's directory.
            std::fs::write(&disk, b"scratch").unwrap();
            let srv = engine.server(ServerId(*s)).unwrap();
            std::fs::write(&srv.disk, b"scratch").unwrap();
            let restored = engine.restore_snapshot_with(*id, bare);
            if report.catalog_error.is_some() {
                // A damaged catalog may affect any snapshot: each restore
                // either gives the exact bytes or fails as corruption.
                match restored {
                    Ok(_) => assert!(std::fs::read(&srv.disk).unwrap() == *bytes, "{ctx}"),
                    Err(e) => assert!(e.is_corruption(), "{ctx}: {e}"),
                }
            } else if damaged.contains(&id.0) {
                // Named damaged: the restore fails as corruption, or (damage
                // only in bytes a restore does not need, such as a zstd
                // frame's own checksum, which verify's payload CRC catches)
                // writes the snapshot's exact bytes, checked by BLAKE3.
                match restored {
                    Ok(_) => assert!(
                        std::fs::read(&srv.disk).unwrap() == *bytes,
                        "{ctx}: damaged snapshot {id} restored other bytes"
                    ),
                    Err(e) => assert!(e.is_corruption(), "{ctx}: {e}"),
                }
            } else {
                restored.unwrap_or_else(|e| panic!("{ctx}: unreported damage to {id}: {e}"));
                assert!(
                    std::fs::read(&srv.disk).unwrap() == *bytes,
                    "{ctx}: snapshot {id} restored other bytes"
                );
            }
        }
    }
    println!(
        "{} corruption trials: {refused} refused to open, {reported} reported by verify, {harmless} harmless",
        crate::common::env_count("BLOCKSNAP_CORRUPTION_TRIALS", 40)
    );
}
