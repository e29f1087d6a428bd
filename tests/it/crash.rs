//! The crash harness: a child process runs a seeded random sequence of
//! every operation (full and tracked incremental captures, guest writes,
//! deletes, restores with their safety snapshots, garbage collection) on
//! several servers, and the parent kills it with SIGKILL at random moments.
//! After each kill the parent reopens the store and checks every
//! invariant. `BLOCKSNAP_CRASH_KILLS` sets the number of kills (default 8);
//! `BLOCKSNAP_CRASH_SEED` replays a run. The same harness runs against real
//! power cuts in `powercut.rs`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use blocksnap::sample::Rng;
use blocksnap::{
    Engine, EngineOptions, RestoreOptions, ServerId, SnapshotId, SnapshotKind, SnapshotStatus,
};

use crate::common::{BS, Victim, disk_bytes};

pub const SERVERS: u64 = 3;
pub const DISK_LEN: usize = 48 * BS;

pub fn options() -> EngineOptions {
    EngineOptions::new()
        .block_size(BS as u32)
        .change_tracking(true)
        .gc_max_unused(0.0)
}

/// Where the harness keeps things: the store and disks in `root` (which
/// may be a file system that loses power), the copies of every captured
/// disk in `expected` (which must not).
pub struct Layout {
    pub root: PathBuf,
    pub expected: PathBuf,
}

impl Layout {
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }
    pub fn disk(&self, server: u64) -> PathBuf {
        self.root.join(format!("disk{server}.img"))
    }
    fn copy(&self, hash: &str) -> PathBuf {
        self.expected.join(hash)
    }

    /// A new store with `SERVERS` servers.
    pub fn create(&self) {
        self.create_with(0);
    }

    /// A new store with `SERVERS` servers, of group records of up to
    /// `group` bytes (0: one frame per chunk).
    pub fn create_with(&self, group: u32) {
        std::fs::create_dir_all(&self.expected).unwrap();
        let engine = options()
            .compression(blocksnap::Compression::new(1, group))
            .open(self.store())
            .unwrap();
        for s in 1..=SERVERS {
            std::fs::write(self.disk(s), disk_bytes(DISK_LEN, s)).unwrap();
            engine
                .add_server(ServerId(s), &format!("s{s}"), self.disk(s))
                .unwrap();
        }
    }
}

fn hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex()[..32].to_string()
}

/// Not a test on its own: the child of the crash harness. Prints each
/// snapshot it saw complete (`completed ID HASH`, its disk's bytes saved
/// under `HASH` first), each delete it starts (`deleting ID`), and each
/// operation's start and end (`begin KIND`, `end KIND`). Any unexpected
/// error panics: the parent then finds it dead before the kill and fails.
#[test]
#[ignore = "the child process of a harness: the harness runs it"]
fn child_runs_random_operations() {
    let (Ok(root), Ok(expected), Ok(seed)) = (
        std::env::var("BLOCKSNAP_TEST_CRASH_ROOT"),
        std::env::var("BLOCKSNAP_TEST_CRASH_EXPECTED"),
        std::env::var("BLOCKSNAP_TEST_CRASH_SEED"),
    ) else {
        return;
    };
    let layout = Layout {
        root: root.into(),
        expected: expected.into(),
    };
    let mut rng = Rng::new(seed.parse().unwrap());
    let engine = options().open(layout.store()).unwrap();
    println!("opened");
    let save = |bytes: &[u8]| {
        let h = hash(bytes);
        let path = layout.copy(&h);
        if !path.exists() {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, bytes).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
        h
    };
    loop {
        let server = 1 + rng.below(SERVERS);
        let disk = layout.disk(server);
        let op = rng.below(10);
        let kind = match op {
            0..=2 => "write",
            3..=5 => "create",
            6 => "delete",
            7..=8 => "restore",
            _ => "gc",
        };
        println!("begin {kind}");
        match op {
            // A guest write, reported to the engine.
            0..=2 => {
                let mut buf = vec![0u8; (1 + rng.below(3 * BS as u64)) as usize];
                rng.fill(&mut buf);
                let at = rng.below((DISK_LEN - buf.len()) as u64);
                let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
                std::os::unix::fs::FileExt::write_all_at(&f, &buf, at).unwrap();
                engine
                    .record_write(ServerId(server), at, buf.len() as u64)
                    .unwrap();
            }
            // A snapshot (incremental when tracking is trusted).
            3..=5 => {
                let bytes = std::fs::read(&disk).unwrap();
                let h = save(&bytes);
                match engine.create_snapshot(ServerId(server), "c", "") {
                    Ok(s) => println!("completed {} {h}", s.id),
                    Err(blocksnap::Error::SnapshotLimit { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            // A delete of one of the server's snapshots.
            6 => {
                let list = engine.snapshots(Some(ServerId(server))).unwrap();
                if !list.is_empty() {
                    let id = list[rng.below(list.len() as u64) as usize].id;
                    println!("deleting {id}");
                    engine.delete_snapshot(id).unwrap();
                }
            }
            // A restore, with its safety snapshot.
            7..=8 => {
                let list: Vec<SnapshotId> = engine
                    .snapshots(Some(ServerId(server)))
                    .unwrap()
                    .iter()
                    .filter(|s| s.status == SnapshotStatus::Completed)
                    .map(|s| s.id)
                    .collect();
                if !list.is_empty() {
                    let id = list[rng.below(list.len() as u64) as usize];
                    // A successful restore replaces the server's safety
                    // snapshots (the one restored too): the ledger stops
                    // expecting them.
                    for s in engine.snapshots(Some(ServerId(server))).unwrap() {
                        if s.kind == SnapshotKind::Safety {
                            println!("deleting {}", s.id);
                        }
                    }
                    let before = save(&std::fs::read(&disk).unwrap());
                    let r = engine.restore_snapshot(id).unwrap();
                    if let Some(s) = r.safety_snapshot {
                        println!("completed {s} {before}");
                    }
                }
            }
            _ => {
                engine.gc(false).unwrap();
            }
        }
        println!("end {kind}");
    }
}

/// What the parent learned from a child's output.
#[derive(Default)]
pub struct Ledger {
    /// Snapshot id -> hash of its disk's bytes, for every snapshot reported
    /// completed and not (being) deleted.
    pub completed: BTreeMap<u64, String>,
    /// Every id ever reported completed, with its hash.
    seen: HashMap<u64, String>,
    pub kills: u64,
    /// Operations that ended, by kind, and kills that landed inside one.
    pub ended: BTreeMap<String, u64>,
    pub killed_inside: BTreeMap<String, u64>,
}

impl Ledger {
    pub fn read(&mut self, lines: Vec<String>) {
        let mut running: Option<String> = None;
        for line in lines {
            if std::env::var("BLOCKSNAP_CRASH_TRACE").is_ok() {
                println!("child: {line}");
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["completed", id, h] => {
                    let id: u64 = id.parse().unwrap();
                    if let Some(old) = self.seen.insert(id, h.to_string()) {
                        assert_eq!(&old, h, "snapshot id {id} was used twice");
                    }
                    self.completed.insert(id, h.to_string());
                }
                ["deleting", id] => {
                    self.completed.remove(&id.parse().unwrap());
                }
                ["begin", kind] => running = Some(kind.to_string()),
                ["end", kind] => {
                    *self.ended.entry(kind.to_string()).or_default() += 1;
                    running = None;
                }
                _ => {}
            }
        }
        if let Some(kind) = running {
            *self.killed_inside.entry(kind).or_default() += 1;
        }
    }

    /// What the conclusion "nothing was lost" rests on: operations that
    /// completed and kills that landed inside them. Every run must have
    /// completed snapshots; a long run (`min_kinds` > 0) must have completed
    /// every kind and been killed inside `min_kinds` kinds.
    pub fn assert_coverage(&self, what: &str, min_kinds: usize) {
        println!(
            "{what}: {} kills; operations ended {:?}; kills inside {:?}",
            self.kills, self.ended, self.killed_inside
        );
        assert!(
            !self.seen.is_empty(),
            "{what}: the child never completed a snapshot"
        );
        if min_kinds > 0 {
            for kind in ["write", "create", "delete", "restore", "gc"] {
                assert!(
                    self.ended.get(kind).is_some_and(|n| *n > 0),
                    "{what}: no {kind} ever completed"
                );
            }
            assert!(
                self.killed_inside.len() >= min_kinds,
                "{what}: kills landed inside only {:?}",
                self.killed_inside
            );
        }
    }
}

/// Starts the child on `layout` with `seed`; returns it once it opened the
/// store (failing the test if it does not), its output collected.
pub fn spawn_child(layout: &Layout, seed: u64) -> Victim {
    Victim::spawn(
        "crash::child_runs_random_operations",
        &[
            (
                "BLOCKSNAP_TEST_CRASH_ROOT",
                layout.root.to_string_lossy().into(),
            ),
            (
                "BLOCKSNAP_TEST_CRASH_EXPECTED",
                layout.expected.to_string_lossy().into(),
            ),
            ("BLOCKSNAP_TEST_CRASH_SEED", seed.to_string()),
        ],
    )
}

/// Every invariant, on the store as a crash left it.
pub fn check_invariants(layout: &Layout, ledger: &Ledger, what: &str) -> Engine {
    let engine = options()
        .open(layout.store())
        .unwrap_or_else(|e| panic!("{what}: the store does not open: {e}"));
    let all = engine.snapshots(None).unwrap();
    assert!(
        all.iter().all(|s| s.status != SnapshotStatus::InProgress),
        "{what}: a snapshot left in progress"
    );
    for s in 1..=SERVERS {
        let counted = all
            .iter()
            .filter(|x| x.server.id == ServerId(s))
            .filter(|x| x.kind == SnapshotKind::Regular && x.status == SnapshotStatus::Completed)
            .count();
        assert!(counted <= 5, "{what}: server {s} has {counted} snapshots");
    }
    let verify = engine.verify(None).unwrap();
    assert!(verify.is_ok(), "{what}: {verify:?}");
    // A restore a crash interrupted is finished by running it again.
    for (server, snap) in engine.open_report().interrupted_restores.clone() {
        assert_eq!(
            engine.server(server).unwrap().state,
            blocksnap::ServerState::Restoring,
            "{what}"
        );
        engine.restore_snapshot(snap).unwrap();
    }
    let bare = RestoreOptions::default()
        .safety_snapshot(false)
        .verify(true);
    // The servers whose disk was last restored to a completed snapshot.
    let mut restored = std::collections::BTreeSet::new();
    for (id, h) in &ledger.completed {
        let snap = engine
            .snapshot(SnapshotId(*id))
            .unwrap_or_else(|e| panic!("{what}: completed snapshot {id} is gone: {e}"));
        restored.insert(snap.server.id);
        assert_eq!(
            snap.status,
            SnapshotStatus::Completed,
            "{what}: snapshot {id}"
        );
        engine.restore_snapshot_with(SnapshotId(*id), bare).unwrap();
        let disk = engine.server(snap.server.id).unwrap().disk;
        let want = std::fs::read(layout.copy(h)).unwrap();
        assert!(
            std::fs::read(&disk).unwrap() == want,
            "{what}: snapshot {id} does not restore its bytes"
        );
    }
    // Dedup still finds every chunk of a completed snapshot (the chunk
    // index lost none): a disk restored to one stores nothing new.
    for server in restored {
        match engine.create_snapshot(server, "dedup-check", "") {
            Ok(s) => {
                let new = s.stats.unwrap().new_chunks;
                assert_eq!(
                    new, 0,
                    "{what}: server {server}'s restored disk stored {new} chunks again"
                );
                engine.delete_snapshot(s.id).unwrap();
            }
            Err(blocksnap::Error::SnapshotLimit { .. }) => {}
            Err(e) => panic!("{what}: {e}"),
        }
    }
    engine
}

#[test]
fn a_process_killed_anywhere_loses_no_completed_snapshot() {
    kill_anywhere(0);
}

/// The same over a store of group records (the compact setting).
#[test]
fn a_process_killed_anywhere_in_a_grouped_store_loses_no_completed_snapshot() {
    kill_anywhere(8 * BS as u32);
}

fn kill_anywhere(group: u32) {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout {
        root: dir.path().join("root"),
        expected: dir.path().join("expected"),
    };
    std::fs::create_dir_all(&layout.root).unwrap();
    layout.create_with(group);
    let seed = crate::common::seed("BLOCKSNAP_CRASH_SEED");
    let mut rng = Rng::new(seed);
    let mut ledger = Ledger::default();
    for kill in 0..crate::common::env_count("BLOCKSNAP_CRASH_KILLS", 8) {
        let what = format!("kill {kill} (seed {seed})");
        let child = spawn_child(&layout, seed.wrapping_add(kill));
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        ledger.read(child.kill(&what)); // SIGKILL
        ledger.kills += 1;
        drop(check_invariants(&layout, &ledger, &what));
    }
    println!(
        "{} kills survived, {} snapshots checked at the end",
        ledger.kills,
        ledger.completed.len()
    );
    // Long runs (thousands of kills) must have landed kills inside at
    // least four kinds of operation.
    let min_kinds = if ledger.kills >= 200 { 4 } else { 0 };
    ledger.assert_coverage(&format!("seed {seed}"), min_kinds);
}
