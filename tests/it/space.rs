//! Space accounting kept on disk: each snapshot's exclusive bytes in the
//! catalog (listed without reading a manifest), the reference counts in a
//! table (`manifests/refs.tbl`) with what changed since replayed from
//! manifests, a deleted snapshot's manifest kept while a table counts it.
//! Every figure is checked against a count from scratch, on a copy of the
//! store without the table.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use blocksnap::sample::Rng;
use blocksnap::{Engine, EngineOptions, ServerId, SnapshotId, SnapshotStatus};

use crate::common::{BS, copy_tree, seed};

const BLOCKS: usize = 32;

fn options(persist_min: usize) -> EngineOptions {
    EngineOptions::new()
        .block_size(BS as u32)
        .index_persist_min(persist_min)
}

fn table(store: &Path) -> PathBuf {
    store.join("manifests/refs.tbl")
}

/// A block from a small pool, so that snapshots and servers share many.
fn block(n: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    Rng::new(n + 1).fill(&mut b[..BS / 2]);
    b
}

/// Each completed snapshot's exclusive bytes as listed (without asking
/// for them to be counted).
fn listed(engine: &Engine) -> BTreeMap<SnapshotId, Option<u64>> {
    engine
        .snapshots(None)
        .unwrap()
        .into_iter()
        .filter(|s| s.status == SnapshotStatus::Completed)
        .map(|s| (s.id, s.exclusive_bytes))
        .collect()
}

/// The exclusive bytes counted from scratch: on a copy of the store with
/// no table (and figures the catalog has ignored), from every manifest.
fn counted_from_scratch(store: &Path) -> BTreeMap<SnapshotId, Option<u64>> {
    let scratch = tempfile::tempdir().unwrap();
    let copy = scratch.path().join("store");
    copy_tree(store, &copy);
    let _ = std::fs::remove_file(table(&copy));
    let _ = std::fs::remove_file(copy.join("store.lock"));
    let engine = options(1 << 40).open(&copy).unwrap();
    let ids: Vec<SnapshotId> = listed(&engine).into_keys().collect();
    ids.into_iter()
        .map(|id| (id, Some(engine.exclusive_bytes(id).unwrap())))
        .collect()
}

fn manifest_files(store: &Path) -> BTreeSet<u64> {
    std::fs::read_dir(store.join("manifests"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".manifest")?
                .parse()
                .ok()
        })
        .collect()
}

/// Three servers whose disks share blocks; each step captures one with a
/// few blocks changed, or deletes a snapshot (the oldest when a server has
/// five).
struct Workload {
    rng: Rng,
    disks: Vec<(PathBuf, Vec<u64>)>,
}

impl Workload {
    fn new(dir: &Path, engine: &Engine, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let disks = (1..=3u64)
            .map(|s| {
                let path = dir.join(format!("disk{s}.img"));
                let blocks: Vec<u64> = (0..BLOCKS).map(|_| rng.below(48)).collect();
                engine
                    .add_server(ServerId(s), &format!("s{s}"), &path)
                    .unwrap();
                (path, blocks)
            })
            .collect();
        Workload { rng, disks }
    }

    fn step(&mut self, engine: &Engine) {
        let s = self.rng.below(3) as usize;
        let server = ServerId(s as u64 + 1);
        let held: Vec<SnapshotId> = engine
            .snapshots(Some(server))
            .unwrap()
            .iter()
            .map(|x| x.id)
            .collect();
        if held.len() == 5 || (!held.is_empty() && self.rng.below(4) == 0) {
            let victim = held[self.rng.below(held.len() as u64) as usize];
            engine.delete_snapshot(victim).unwrap();
            return;
        }
        let (path, blocks) = &mut self.disks[s];
        for _ in 0..4 {
            let at = self.rng.below(BLOCKS as u64) as usize;
            blocks[at] = self.rng.below(48);
        }
        let bytes: Vec<u8> = blocks.iter().flat_map(|&b| block(b)).collect();
        std::fs::write(path, bytes).unwrap();
        engine.create_snapshot(server, "s", "").unwrap();
    }
}

fn check(engine: &Engine, store: &Path, ctx: &str) {
    let report = engine.verify(None).unwrap();
    assert!(report.is_ok(), "{ctx}: {report:?}");
    let want = counted_from_scratch(store);
    assert_eq!(listed(engine), want, "{ctx}");
}

#[test]
fn exclusive_bytes_are_listed_after_a_reopen_without_reading_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let engine = options(4096).open(&store).unwrap();
    let mut work = Workload::new(dir.path(), &engine, 1);
    for _ in 0..12 {
        work.step(&engine);
    }
    let before = listed(&engine);
    assert!(before.values().all(Option::is_some), "{before:?}");
    assert!(before.values().any(|e| *e > Some(0)), "{before:?}");
    drop(engine);

    // Without a single manifest, the listing still has every figure.
    let away = dir.path().join("away");
    std::fs::create_dir(&away).unwrap();
    for id in manifest_files(&store) {
        let name = format!("{id:020}.manifest");
        std::fs::rename(store.join("manifests").join(&name), away.join(&name)).unwrap();
    }
    let engine = options(4096).read_only(true).open(&store).unwrap();
    assert_eq!(listed(&engine), before);
    drop(engine);
    for e in std::fs::read_dir(&away).unwrap().flatten() {
        std::fs::rename(e.path(), store.join("manifests").join(e.file_name())).unwrap();
    }
    let engine = options(4096).open(&store).unwrap();
    assert_eq!(listed(&engine), before);
    check(&engine, &store, "after the manifests came back");
}

#[test]
fn counts_stay_exact_through_tables_replays_deletes_and_reopens() {
    let seed = seed("BLOCKSNAP_SPACE_SEED");
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut engine = options(0).open(&store).unwrap();
    let mut work = Workload::new(dir.path(), &engine, seed);
    // A table at every change, then none for a while (what changed is
    // replayed from manifests at each open, a deleted snapshot's manifest
    // kept for it), then tables again; every other round reads the tables
    // a page at a time, as one larger than `table_memory` is. The last
    // rounds write each snapshot's counts straight into a table, as for a
    // disk whose chunk list does not fit `block_list_memory`.
    let rounds = [0usize, 1 << 40, 1 << 40, 0, 1 << 40, 0];
    for (round, min) in rounds.into_iter().enumerate() {
        drop(engine);
        let memory = if round % 2 == 1 { 0 } else { u64::MAX };
        let list = if round >= 3 { 0 } else { 32 << 20 };
        engine = options(min)
            .table_memory(memory)
            .block_list_memory(list)
            .open(&store)
            .unwrap();
        let ctx = format!("seed {seed}, reopened for round {round}");
        assert!(listed(&engine).values().all(Option::is_some), "{ctx}");
        check(&engine, &store, &ctx);
        for i in 0..8 {
            work.step(&engine);
            let ctx = format!("seed {seed}, round {round}, step {i}");
            let files = manifest_files(&store);
            let completed: BTreeSet<u64> = listed(&engine).keys().map(|s| s.0).collect();
            assert!(files.is_superset(&completed), "{ctx}");
            if min == 0 {
                assert_eq!(files, completed, "{ctx}: a manifest outlived its table");
            }
            if i % 3 == 0 {
                engine.gc(false).unwrap();
            }
        }
    }
    drop(engine);
    let engine = options(0).open(&store).unwrap();
    check(&engine, &store, &format!("seed {seed}, at the end"));
}

#[test]
fn a_damaged_counts_table_is_found_counted_again_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let engine = options(0).open(&store).unwrap();
    let mut work = Workload::new(dir.path(), &engine, 7);
    for _ in 0..10 {
        work.step(&engine);
    }
    let before = listed(&engine);
    drop(engine);

    let path = table(&store);
    let damage = |path: &Path| {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[4096 + 40] ^= 1;
        std::fs::write(path, &bytes).unwrap();
        bytes
    };
    // A page damaged: the catalog's figures still list; the next change
    // finds the damage, counts from the manifests and writes a new table.
    let damaged = damage(&path);
    let engine = options(0).open(&store).unwrap();
    assert_eq!(listed(&engine), before);
    work.step(&engine);
    assert!(
        std::fs::read(&path).unwrap() != damaged,
        "the damaged table stayed"
    );
    check(&engine, &store, "after a change over a damaged table");
    drop(engine);

    // Verify finds it too (and replaces it).
    let damaged = damage(&path);
    let engine = options(0).open(&store).unwrap();
    let report = engine.verify(None).unwrap();
    assert!(
        report
            .space_error
            .as_deref()
            .is_some_and(|e| e.contains("checksum")),
        "{report:?}"
    );
    assert!(
        std::fs::read(&path).unwrap() != damaged,
        "the damaged table stayed"
    );
    check(&engine, &store, "after verify");
    drop(engine);

    // One cut short or gone: the same.
    for damage in ["cut", "gone"] {
        let now = std::fs::read(&path).unwrap();
        match damage {
            "cut" => std::fs::write(&path, &now[..now.len() - 3]).unwrap(),
            _ => std::fs::remove_file(&path).unwrap(),
        }
        let engine = options(0).open(&store).unwrap();
        work.step(&engine);
        check(&engine, &store, damage);
        assert!(path.exists(), "{damage}");
    }
    // And an operator can count them again.
    let engine = options(0).open(&store).unwrap();
    std::fs::write(&path, b"not a table").unwrap();
    engine.rebuild_index().unwrap();
    check(&engine, &store, "after index rebuild");
}
