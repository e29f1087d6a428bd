//! The chunk index on disk (`packs/chunks.idx`): a store reopens from it
//! without reading its packs; a table that is stale (its packs changed
//! after it was written, as a crash in a collection leaves it), damaged in
//! its header or in a page, or missing is detected and rebuilt from the
//! packs, never trusted; dedup and restores stay exact through all of it.

use std::path::Path;

use blocksnap::{Engine, EngineOptions, RestoreOptions, ServerId};

use crate::common::OpenIn;
use crate::common::{BS, disk_bytes};

/// A store whose chunk index table is written at every capture's end.
fn options() -> EngineOptions {
    EngineOptions::new()
        .block_size(BS as u32)
        .index_persist_min(0)
}

fn table(store: &Path) -> std::path::PathBuf {
    store.join("packs/chunks.idx")
}

/// A store with two servers and two snapshots each; their disks' bytes.
fn store_with_snapshots(dir: &Path) -> Vec<(ServerId, Vec<u8>)> {
    let engine = options().open(dir.join("store")).unwrap();
    let mut disks = Vec::new();
    for s in 1..=2u64 {
        let disk = dir.join(format!("disk{s}.img"));
        engine
            .add_server(ServerId(s), &format!("s{s}"), &disk)
            .unwrap();
        for v in 0..2u64 {
            let bytes = disk_bytes(64 * BS, s * 10 + v);
            std::fs::write(&disk, &bytes).unwrap();
            engine.create_snapshot(ServerId(s), "v", "").unwrap();
            if v == 1 {
                disks.push((ServerId(s), bytes));
            }
        }
    }
    disks
}

/// A directory with [`store_with_snapshots`]' store; its path; the disks.
fn fixture() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Vec<(ServerId, Vec<u8>)>,
) {
    let dir = tempfile::tempdir().unwrap();
    let disks = store_with_snapshots(dir.path());
    let store = dir.path().join("store");
    (dir, store, disks)
}

/// The server's snapshots, oldest first.
fn ids_of(engine: &Engine, server: ServerId) -> Vec<blocksnap::SnapshotId> {
    let mut ids: Vec<_> = engine
        .snapshots(Some(server))
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    ids.sort();
    ids
}

/// Every snapshot restores exactly, and each server's newest disk
/// captured again stores nothing new (dedup found every chunk).
fn assert_exact_and_deduplicated(engine: &Engine, disks: &[(ServerId, Vec<u8>)], what: &str) {
    // (A damaged table is reported, and rebuilt by the first look-up.)
    let report = engine.verify(None).unwrap();
    assert!(
        report.damaged_snapshots().is_empty() && report.catalog_error.is_none(),
        "{what}: {report:?}"
    );
    let bare = RestoreOptions::default().safety_snapshot(false);
    for (server, bytes) in disks {
        let newest = *ids_of(engine, *server).last().unwrap();
        let disk = engine.server(*server).unwrap().disk;
        std::fs::write(&disk, b"scribbled over").unwrap();
        engine.restore_snapshot_with(newest, bare).unwrap();
        let got = std::fs::read(&disk).unwrap();
        assert!(
            got == *bytes,
            "{what}: server {server} snapshot {newest}: {} bytes, {} wanted, first difference at {:?}",
            got.len(),
            bytes.len(),
            got.iter().zip(bytes.iter()).position(|(a, b)| a != b)
        );
        let again = engine.create_snapshot(*server, "again", "").unwrap();
        assert_eq!(
            again.stats.unwrap().new_chunks,
            0,
            "{what}: dedup lost chunks"
        );
    }
}

#[test]
fn a_store_reopens_from_its_table_without_reading_its_packs() {
    let dir = tempfile::tempdir().unwrap();
    let disks = store_with_snapshots(dir.path());
    let engine = options().open_in(dir.path()).unwrap();
    let report = engine.open_report();
    assert_eq!(report.packs_indexed, 0, "{report:?}");
    assert!(report.index_rebuilt.is_none(), "{report:?}");
    let index = engine.stats().unwrap().index;
    assert_eq!(index.table_entries, index.chunks, "{index:?}");
    assert_eq!(index.overlay_entries, 0, "{index:?}");
    assert!(index.table_bytes <= 32 * index.chunks + 8192, "{index:?}");
    assert_exact_and_deduplicated(&engine, &disks, "reopened");
}

/// A collection changes the packs the table covers and writes a new
/// table; a crash between the two leaves the old one, which must be seen
/// as stale (trusting it would point at records that are gone).
#[test]
fn a_table_older_than_its_packs_is_rebuilt() {
    let (_dir, store, disks) = fixture();
    let old = std::fs::read(table(&store)).unwrap();
    {
        let engine = options().gc_max_unused(0.0).open(&store).unwrap();
        for server in [ServerId(1), ServerId(2)] {
            engine.delete_snapshot(ids_of(&engine, server)[0]).unwrap();
        }
        let gc = engine.gc(false).unwrap();
        assert!(
            gc.packs_rewritten + gc.packs_cut + gc.packs_dropped > 0,
            "{gc:?}"
        );
    }
    std::fs::write(table(&store), &old).unwrap();
    let engine = options().open(&store).unwrap();
    // Found at open when a pack it covers is gone, else at the first
    // look-up, which compares the packs' lengths and trailers.
    let _ = engine.chunk_count();
    let why = engine
        .open_report()
        .index_rebuilt
        .clone()
        .or(engine.index_found_stale());
    assert!(
        why.as_deref().is_some_and(|w| w.contains("covers")),
        "{why:?}"
    );
    assert_exact_and_deduplicated(&engine, &disks, "after a stale table");
    drop(engine);
    // A new table replaced it.
    let engine = options().open(&store).unwrap();
    let _ = engine.chunk_count();
    assert_eq!(engine.open_report().index_rebuilt, None);
    assert_eq!(engine.index_found_stale(), None);
    assert_eq!(engine.open_report().packs_indexed, 0);
}

/// A pack the table covers changed in place, keeping its name (a
/// collection cut its tail, or rewrote it, and a crash lost the table
/// written after): open trusts the names alone and reads nothing per
/// pack; the first look-up finds the change, and reads every pack instead.
#[test]
fn a_covered_pack_changed_in_place_is_found_at_the_first_look_up() {
    let (_dir, store, disks) = fixture();
    let packs: Vec<_> = std::fs::read_dir(store.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    assert!(!packs.is_empty());
    // Its length changes, its records stay (64 bytes of garbage past its
    // trailer, which a scan of the pack reads past).
    let victim = &packs[0];
    let bytes = std::fs::read(victim).unwrap();
    let mut longer = bytes.clone();
    longer.extend_from_slice(&bytes[bytes.len() - 64..]);
    std::fs::write(victim, &longer).unwrap();
    let engine = options().open(&store).unwrap();
    assert_eq!(engine.open_report().index_rebuilt, None);
    assert_eq!(engine.index_found_stale(), None, "nothing looked up yet");
    let _ = engine.chunk_count();
    let why = engine.index_found_stale();
    assert!(
        why.as_deref().is_some_and(|w| w.contains("changed")),
        "{why:?}"
    );
    assert_exact_and_deduplicated(&engine, &disks, "after a changed pack");
}

/// Damage anywhere in the table: in its header or pack list, open sees it
/// and rebuilds; in a page of entries, the first look-up that reads the
/// page does. Either way nothing wrong is ever found through it.
#[test]
fn a_damaged_table_is_rebuilt_never_trusted() {
    damaged_table_is_rebuilt(options);
}

/// The same, the table read a page at a time (`pread`) rather than
/// through its map, as a table larger than `table_memory` is.
#[test]
fn a_damaged_table_read_a_page_at_a_time_is_rebuilt_never_trusted() {
    damaged_table_is_rebuilt(|| options().table_memory(0));
}

fn damaged_table_is_rebuilt(options: fn() -> EngineOptions) {
    let (_dir, store, disks) = fixture();
    let clean = std::fs::read(table(&store)).unwrap();
    let pages = (clean.len() - 4096) / 4096;
    assert!(pages >= 1);
    // The header, an entry page, the list of packs.
    for at in [20, 4096 + 100, clean.len() - 3] {
        let mut bytes = clean.clone();
        bytes[at] ^= 0x01;
        std::fs::write(table(&store), &bytes).unwrap();
        let engine = options().open(&store).unwrap();
        let what = format!("byte {at} of {} flipped", clean.len());
        assert_exact_and_deduplicated(&engine, &disks, &what);
        let index = engine.stats().unwrap().index;
        assert!(index.table_generation > 0, "{what}: {index:?}");
        drop(engine);
        // The table was made again, clean.
        let engine = options().open(&store).unwrap();
        assert!(engine.verify(None).unwrap().index_error.is_none(), "{what}");
        for (server, _) in &disks {
            for id in ids_of(&engine, *server).into_iter().skip(2) {
                engine.delete_snapshot(id).unwrap();
            }
        }
    }
    // Gone altogether: rebuilt at open.
    std::fs::remove_file(table(&store)).unwrap();
    let engine = options().open(&store).unwrap();
    assert!(engine.open_report().index_rebuilt.is_some());
    assert!(table(&store).exists());
    assert_exact_and_deduplicated(&engine, &disks, "after the table was removed");
}

/// `verify` checks every page of the table before anything reads it.
#[test]
fn verify_reports_a_damaged_table_and_rebuild_mends_it() {
    let (_dir, store, disks) = fixture();
    let mut bytes = std::fs::read(table(&store)).unwrap();
    bytes[4096 + 7] ^= 0x80;
    std::fs::write(table(&store), &bytes).unwrap();
    let engine = options().open(&store).unwrap();
    let report = engine.verify(None).unwrap();
    assert!(
        report
            .index_error
            .as_deref()
            .is_some_and(|e| e.contains("page 0") && e.contains("index rebuild")),
        "{report:?}"
    );
    assert!(report.damaged_snapshots().is_empty(), "{report:?}");
    let before = engine.stats().unwrap().index.table_generation;
    let info = engine.rebuild_index().unwrap();
    assert!(info.table_generation > before, "{info:?}");
    assert_eq!(info.table_entries, info.chunks);
    assert!(engine.verify(None).unwrap().is_ok());
    assert_exact_and_deduplicated(&engine, &disks, "after index rebuild");
}

/// A read-only open reads the packs the table does not cover when asked
/// for figures, and writes no table, however many it read.
#[test]
fn a_read_only_open_writes_no_table() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    {
        // Only the first open's empty table: every pack is left uncovered.
        let engine = options()
            .index_persist_min(usize::MAX)
            .open(&store)
            .unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, disk_bytes(64 * BS, 3)).unwrap();
        engine.add_server(ServerId(1), "s1", &disk).unwrap();
        engine.create_snapshot(ServerId(1), "v", "").unwrap();
        engine.close().unwrap();
    }
    let before = std::fs::read(table(&store)).unwrap();
    let engine = options().read_only(true).open(&store).unwrap();
    let index = engine.stats().unwrap().index;
    assert!(index.chunks > 0 && index.table_entries == 0, "{index:?}");
    engine.close().unwrap();
    assert!(std::fs::read(table(&store)).unwrap() == before);
}
