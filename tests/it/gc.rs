//! Garbage collection: space given back, never a needed chunk lost, while
//! captures, restores and deletes go on, and across crashes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use blocksnap::sample::Rng;
use blocksnap::{Engine, EngineOptions, ServerId, SnapshotId, SnapshotStatus};

use crate::common::{BS, Fixture, Victim, disk_bytes};

fn options() -> EngineOptions {
    EngineOptions::new().block_size(BS as u32)
}

fn packs_size(store: &Path) -> u64 {
    crate::common::packs_bytes(store)
}

/// A disk image with data of its own (seed) and a share of common data.
fn server_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = disk_bytes(len, seed);
    let common = disk_bytes(len / 4, 999);
    v[..len / 4].copy_from_slice(&common);
    v
}

/// Every completed snapshot verifies and restores to `expected` bytes.
fn check_all(engine: &Engine, expected: &HashMap<SnapshotId, Vec<u8>>) {
    let report = engine.verify(None).unwrap();
    assert!(report.is_ok(), "{report:?}");
    for (id, bytes) in expected {
        let snap = engine.snapshot(*id).unwrap();
        assert_eq!(snap.status, SnapshotStatus::Completed, "{id}");
        let disk = engine.server(snap.server.id).unwrap().disk;
        std::fs::write(&disk, b"scribbled").unwrap();
        let bare = blocksnap::RestoreOptions::default()
            .safety_snapshot(false)
            .verify(true);
        engine.restore_snapshot_with(*id, bare).unwrap();
        assert!(std::fs::read(&disk).unwrap() == *bytes, "snapshot {id}");
    }
}

#[test]
fn deleting_a_servers_snapshots_and_collecting_leaves_what_the_rest_need() {
    collect_after_deleting_one_server(options);
}

/// The same in a store that compresses runs of new chunks together: the
/// groups holding both servers' chunks are compressed again with the
/// needed members only.
#[test]
fn collecting_a_grouped_store_recompresses_groups_with_garbage() {
    let report = collect_after_deleting_one_server(|| {
        options().compression(blocksnap::Compression::new(1, 16 * BS as u32))
    });
    assert!(report.groups_recompressed > 0, "{report:?}");
}

fn collect_after_deleting_one_server(options: impl Fn() -> EngineOptions) -> blocksnap::GcReport {
    let fx = Fixture::with(options());
    let len = 96 * BS;
    let mut keep = HashMap::new();
    let mut drop_ids = Vec::new();
    for round in 0..3u64 {
        for server in [1u64, 2] {
            let bytes = server_bytes(server * 10 + round, len);
            let path = fx.disk(&format!("s{server}.img"));
            std::fs::write(&path, &bytes).unwrap();
            if round == 0 {
                fx.engine
                    .add_server(ServerId(server), &format!("s{server}"), &path)
                    .unwrap();
            }
            let snap = fx
                .engine
                .create_snapshot(ServerId(server), &format!("r{round}"), "")
                .unwrap();
            if server == 1 {
                drop_ids.push(snap.id);
            } else {
                keep.insert(snap.id, bytes);
            }
        }
    }
    let before = fx.engine.stats().unwrap();
    assert_eq!(before.reclaimable_bytes, 0);
    for id in &drop_ids {
        fx.engine.delete_snapshot(*id).unwrap();
    }
    let stats = fx.engine.stats().unwrap();
    assert!(stats.reclaimable_bytes > 0);
    assert_eq!(stats.snapshots, 3);

    // A dry run changes nothing and says what the real run then does.
    let stored = packs_size(&fx.store());
    let dry = fx.engine.gc(true).unwrap();
    assert!(dry.dry_run && dry.bytes_reclaimed > 0);
    assert_eq!(packs_size(&fx.store()), stored);
    let report = fx.engine.gc(false).unwrap();
    assert_eq!(report.chunks_reclaimed, dry.chunks_reclaimed);
    assert!(report.bytes_reclaimed > 0);
    // Its estimate of each rewrite is exact for records of single chunks
    // (groups with garbage are compressed again, to a size not known
    // before).
    if report.groups_recompressed == 0 {
        assert_eq!(
            report.bytes_reclaimed, dry.bytes_reclaimed,
            "{dry:?} then {report:?}"
        );
    }
    assert_eq!(packs_size(&fx.store()), report.bytes_stored);

    // Within 5% of a fresh store holding only the remaining snapshots.
    let fresh = Fixture::with(options());
    let path = fresh.disk("s2.img");
    fresh.engine.add_server(ServerId(2), "s2", &path).unwrap();
    let mut ids: Vec<&SnapshotId> = keep.keys().collect();
    ids.sort();
    for id in ids {
        std::fs::write(&path, &keep[id]).unwrap();
        fresh.engine.create_snapshot(ServerId(2), "x", "").unwrap();
    }
    drop(fresh.engine);
    let need = packs_size(&fresh.dir.path().join("store"));
    let have = packs_size(&fx.store());
    assert!(
        have as f64 <= need as f64 * 1.05,
        "{have} bytes stored where a fresh store needs {need}"
    );
    assert_eq!(fx.engine.stats().unwrap().reclaimable_bytes, 0);
    check_all(&fx.engine, &keep);
    // Nothing left to do.
    let again = fx.engine.gc(false).unwrap();
    assert_eq!((again.packs_dropped, again.packs_rewritten), (0, 0));
    report
}

#[test]
fn exclusive_bytes_are_what_deleting_alone_gives_back() {
    let fx = Fixture::with(options().gc_max_unused(0.0));
    let len = 64 * BS;
    let base = disk_bytes(len, 5);
    let path = fx.server(1, "web", &base);
    let a = fx.engine.create_snapshot(ServerId(1), "a", "").unwrap();
    let mut changed = base.clone();
    changed[..16 * BS].copy_from_slice(&disk_bytes(16 * BS, 6));
    std::fs::write(&path, &changed).unwrap();
    let b = fx.engine.create_snapshot(ServerId(1), "b", "").unwrap();
    fx.engine.account_space().unwrap();
    let list = fx.engine.snapshots(None).unwrap();
    let excl = |id| {
        list.iter()
            .find(|s| s.id == id)
            .and_then(|s| s.exclusive_bytes)
            .unwrap()
    };
    assert!(excl(a.id) > 0 && excl(b.id) > 0);
    assert_eq!(fx.engine.exclusive_bytes(a.id).unwrap(), excl(a.id));
    // A third snapshot of the same disk as b takes b's exclusive bytes away.
    let c = fx.engine.create_snapshot(ServerId(1), "c", "").unwrap();
    assert_eq!(fx.engine.exclusive_bytes(b.id).unwrap(), 0);
    assert_eq!(fx.engine.exclusive_bytes(c.id).unwrap(), 0);

    let stored = fx.engine.stats().unwrap().live_bytes;
    let expect = fx.engine.exclusive_bytes(a.id).unwrap();
    fx.engine.delete_snapshot(a.id).unwrap();
    fx.engine.gc(false).unwrap();
    let after = fx.engine.stats().unwrap();
    assert_eq!(stored - after.live_bytes, expect);
    assert_eq!(after.reclaimable_bytes, 0);
    // Deleting c gives b its blocks back.
    let excl_b = fx.engine.exclusive_bytes(b.id).unwrap();
    fx.engine.delete_snapshot(c.id).unwrap();
    assert!(fx.engine.exclusive_bytes(b.id).unwrap() > excl_b);
}

#[test]
fn automatic_gc_after_deletes_gives_space_back() {
    let fx = Fixture::with(options().auto_gc(true));
    let path = fx.server(1, "web", &disk_bytes(64 * BS, 7));
    let a = fx.engine.create_snapshot(ServerId(1), "a", "").unwrap();
    std::fs::write(&path, disk_bytes(64 * BS, 8)).unwrap();
    let b = fx.engine.create_snapshot(ServerId(1), "b", "").unwrap();
    fx.engine.delete_snapshot(a.id).unwrap();
    let started = std::time::Instant::now();
    while fx.engine.last_auto_gc().is_none() {
        assert!(started.elapsed().as_secs() < 30, "no automatic gc");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let report = fx.engine.last_auto_gc().unwrap().unwrap();
    assert!(report.bytes_reclaimed > 0, "{report:?}");
    check_all(&fx.engine, &HashMap::from([(b.id, disk_bytes(64 * BS, 8))]));
}

#[test]
fn gc_in_a_loop_while_servers_capture_delete_and_restore() {
    crate::common::with_deadline(300, "the stress test", stress);
}

/// Threads capture, delete and restore on three servers while one collects
/// garbage in a loop and one drives the HTTP API (list, create, delete) on
/// the same engine.
fn stress() {
    let fx = Fixture::with(options().gc_max_unused(0.0));
    let engine = fx.engine.clone();
    let len = 48 * BS;
    let servers = 3u64;
    for s in 1..=servers {
        fx.server(s, &format!("s{s}"), &server_bytes(s, len));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let gc = {
        let engine = engine.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(Ordering::Relaxed) {
                engine.gc(false).unwrap();
                runs += 1;
            }
            runs
        })
    };
    let workers: Vec<_> = (1..=servers)
        .map(|s| {
            let engine = engine.clone();
            let disk = fx.disk(&format!("s{s}.img"));
            std::thread::spawn(move || {
                let mut rng = Rng::new(s);
                let mut mine: Vec<(SnapshotId, Vec<u8>)> = Vec::new();
                for round in 0..crate::common::env_count("BLOCKSNAP_STRESS_ROUNDS", 6) {
                    // The guest rewrites part of its disk (some blocks
                    // shared with other servers and earlier rounds).
                    let mut bytes = std::fs::read(&disk).unwrap();
                    let at = rng.below(32) as usize * BS;
                    let seed = rng.below(6);
                    bytes[at..at + 16 * BS].copy_from_slice(&disk_bytes(16 * BS, seed));
                    std::fs::write(&disk, &bytes).unwrap();
                    let snap = engine
                        .create_snapshot(ServerId(s), &format!("r{round}"), "")
                        .unwrap();
                    mine.push((snap.id, bytes));
                    if mine.len() > 3 {
                        let k = rng.below(mine.len() as u64) as usize;
                        let (id, _) = mine.remove(k);
                        engine.delete_snapshot(id).unwrap();
                    }
                    let k = rng.below(mine.len() as u64) as usize;
                    let (id, want) = &mine[k];
                    engine.restore_snapshot(*id).unwrap();
                    assert!(std::fs::read(&disk).unwrap() == *want, "snapshot {id}");
                }
                mine
            })
        })
        .collect();
    // HTTP clients on a fourth server, on the same engine.
    let api_disk = fx.disk("s4.img");
    std::fs::write(&api_disk, server_bytes(4, len)).unwrap();
    engine.add_server(ServerId(4), "s4", &api_disk).unwrap();
    let api = blocksnap::http::start(
        engine.clone(),
        "127.0.0.1:0".parse().unwrap(),
        blocksnap::http::Tokens::new(["stress-token"]).unwrap(),
    )
    .unwrap();
    let base = format!("http://{}/api/v1/snapshots/", api.addr());
    let clients: Vec<_> = (0..2)
        .map(|c| {
            let base = base.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                let mut calls = 0;
                while !stop.load(Ordering::Relaxed) {
                    let list = agent
                        .get(&base)
                        .header("Authorization", "Bearer stress-token")
                        .call()
                        .unwrap();
                    assert_eq!(list.status(), 200);
                    let created = agent
                        .post(&base)
                        .header("Authorization", "Bearer stress-token")
                        .send_json(serde_json::json!({"server_id": 4, "name": format!("api{c}")}))
                        .unwrap();
                    // 201, or 400 when the server has five already.
                    assert!([201, 400].contains(&created.status().as_u16()));
                    calls += 2;
                }
                calls
            })
        })
        .collect();
    let mut expected = HashMap::new();
    for w in workers {
        expected.extend(w.join().unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    assert!(gc.join().unwrap() > 0);
    for c in clients {
        assert!(c.join().unwrap() > 0);
    }
    drop(api);
    engine.gc(false).unwrap();
    check_all(&engine, &expected);
    let stats = engine.stats().unwrap();
    assert_eq!(stats.reclaimable_bytes, 0);
}

/// Not a test on its own: the child process of the GC crash test. Runs a
/// seeded loop of captures, deletes and collections on a store, printing
/// what completed, until the parent kills it.
#[test]
#[ignore = "the child process of a harness: the harness runs it"]
fn child_collects_garbage_until_killed() {
    let Ok(store) = std::env::var("BLOCKSNAP_TEST_GC_CHILD_STORE") else {
        return;
    };
    let seed: u64 = std::env::var("BLOCKSNAP_TEST_GC_CHILD_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let engine = options().gc_max_unused(0.0).open(store).unwrap();
    println!("opened");
    let disk = engine.server(ServerId(1)).unwrap().disk;
    let mut rng = Rng::new(seed);
    loop {
        let mut live: Vec<SnapshotId> = engine
            .snapshots(Some(ServerId(1)))
            .unwrap()
            .iter()
            .filter(|s| s.status == SnapshotStatus::Completed)
            .filter(|s| s.kind == blocksnap::SnapshotKind::Regular)
            .map(|s| s.id)
            .collect();
        if live.len() >= 4 {
            let id = live.remove(rng.below(live.len() as u64) as usize);
            println!("deleting {id}");
            engine.delete_snapshot(id).unwrap();
        }
        let content = rng.below(1 << 20);
        std::fs::write(&disk, disk_bytes(64 * BS, content)).unwrap();
        let snap = engine.create_snapshot(ServerId(1), "c", "").unwrap();
        println!("completed {} {content}", snap.id);
        engine.gc(false).unwrap();
        println!("collected");
    }
}

#[test]
fn a_crash_anywhere_in_gc_loses_no_completed_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, disk_bytes(64 * BS, 0)).unwrap();
    {
        let engine = options().open(&store).unwrap();
        engine.add_server(ServerId(1), "web", &disk).unwrap();
    }
    let seed = crate::common::seed("BLOCKSNAP_GC_CRASH_SEED");
    let mut rng = Rng::new(seed);
    // id -> content seed of every snapshot reported completed and not
    // (being) deleted.
    let mut completed: HashMap<u64, u64> = HashMap::new();
    let mut collections = 0;
    for kill in 0..crate::common::env_count("BLOCKSNAP_GC_CRASH_KILLS", 6) {
        let what = format!("GC kill {kill} (seed {seed})");
        let child = Victim::spawn(
            "gc::child_collects_garbage_until_killed",
            &[
                (
                    "BLOCKSNAP_TEST_GC_CHILD_STORE",
                    store.to_string_lossy().into(),
                ),
                ("BLOCKSNAP_TEST_GC_CHILD_SEED", (seed + kill).to_string()),
            ],
        );
        std::thread::sleep(std::time::Duration::from_millis(150 + rng.below(600)));
        let lines = child.kill(&what); // SIGKILL: nothing is flushed or closed
        collections += lines.iter().filter(|l| *l == "collected").count();
        for line in lines {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["completed", id, content] => {
                    completed.insert(id.parse().unwrap(), content.parse().unwrap());
                }
                ["deleting", id] => {
                    completed.remove(&id.parse().unwrap());
                }
                _ => {}
            }
        }
        let engine = options().open(&store).unwrap();
        let expected: HashMap<SnapshotId, Vec<u8>> = completed
            .iter()
            .map(|(id, content)| (SnapshotId(*id), disk_bytes(64 * BS, *content)))
            .collect();
        check_all(&engine, &expected);
        assert!(
            engine
                .snapshots(Some(ServerId(1)))
                .unwrap()
                .iter()
                .all(|s| s.status != SnapshotStatus::InProgress),
            "kill {kill}"
        );
    }
    assert!(
        !completed.is_empty(),
        "the child never completed a snapshot"
    );
    assert!(collections > 0, "the child never completed a collection");
    println!("{collections} collections completed between the kills");
}

#[test]
fn a_damaged_needed_record_keeps_its_pack_and_gc_goes_on() {
    let fx = Fixture::with(options().gc_max_unused(0.0));
    let keep = disk_bytes(32 * BS, 41);
    let path = fx.server(1, "web", &keep);
    let b = fx.engine.create_snapshot(ServerId(1), "b", "").unwrap();
    std::fs::write(&path, disk_bytes(32 * BS, 42)).unwrap();
    let a = fx.engine.create_snapshot(ServerId(1), "a", "").unwrap();
    // A live snapshot after the garbage, so that the pack must be rewritten
    // (garbage at a pack's end is cut off in place instead).
    std::fs::write(&path, disk_bytes(32 * BS, 43)).unwrap();
    fx.engine.create_snapshot(ServerId(1), "c", "").unwrap();
    fx.engine.delete_snapshot(a.id).unwrap();
    // Flip a byte inside b's first record (right after the pack header
    // and the record header).
    let pack = fx.store().join("packs").join("00000001.pack");
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[16 + 52 + 100] ^= 0x20;
    std::fs::write(&pack, &bytes).unwrap();

    let report = fx.engine.gc(false).unwrap();
    assert_eq!(report.packs_damaged, 1, "{report:?}");
    assert!(pack.exists(), "the damaged pack is kept");
    let verify = fx.engine.verify(None).unwrap();
    assert_eq!(verify.damaged_snapshots(), vec![b.id]);
    let leftovers: Vec<_> = std::fs::read_dir(fx.store().join("packs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

/// A capture that found a chunk stored (and pinned it) while nothing else
/// needs it: a GC meanwhile must keep it, or the capture completes with a
/// chunk the store no longer has.
#[test]
fn gc_keeps_the_chunks_a_running_capture_found_stored() {
    let gate = crate::common::Gate::default();
    let half = 32 * BS as u64;
    let fx = Fixture::with(
        options()
            .gc_max_unused(0.0)
            .window_len(4 * BS)
            .disk_opener(gate.opener_from(half)),
    );
    let _opens = gate.open_on_drop();
    let bytes = disk_bytes(64 * BS, 61);
    let path = fx.server(1, "web", &bytes);
    std::fs::write(&path, &bytes[..half as usize]).unwrap();
    // Stored, then garbage: the first half's chunks, needed by nothing.
    let old = fx.engine.create_snapshot(ServerId(1), "old", "").unwrap();
    fx.engine.delete_snapshot(old.id).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    // The capture finds the first half's chunks stored, pins them, and
    // waits at the second half.
    let job = fx.engine.start_snapshot(ServerId(1), "new", "").unwrap();
    gate.wait_for_a_reader();
    // The GC may wait for the capture's look-ups to end (it takes their
    // guard exclusively to drop anything): give it a while, then let the
    // capture go on either way.
    let gc = {
        let engine = fx.engine.clone();
        std::thread::spawn(move || engine.gc(false))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !gc.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    gate.open();
    gc.join().unwrap().unwrap();
    let snap = job.wait().unwrap();
    assert!(
        fx.engine.verify(None).unwrap().is_ok(),
        "a pinned chunk was collected"
    );
    std::fs::write(&path, b"broken").unwrap();
    let bare = blocksnap::RestoreOptions::default().safety_snapshot(false);
    fx.engine.restore_snapshot_with(snap.id, bare).unwrap();
    assert!(std::fs::read(&path).unwrap() == bytes);
}

/// The figures count the open (unsealed) pack as it will be once sealed:
/// everything in it dead after a delete is reclaimable, and no more than
/// the packs hold; a GC then gives back just that.
#[test]
fn reclaimable_bytes_of_the_open_pack_are_its_own() {
    let fx = Fixture::new();
    fx.server(1, "web", &crate::common::random_bytes(64 * BS, 4));
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    fx.engine.delete_snapshot(snap.id).unwrap();
    let stats = fx.engine.stats().unwrap();
    let packs = packs_size(&fx.store());
    assert!(
        stats.reclaimable_bytes > packs * 9 / 10 && stats.reclaimable_bytes <= packs + 4096,
        "reclaimable {} of packs {packs}",
        stats.reclaimable_bytes
    );
    // The open pack counts as it will be once sealed: its records, its
    // index (48 bytes a chunk) and trailer.
    assert!(
        stats.stored_bytes >= packs && stats.stored_bytes <= packs + 64 * 48 + 4096,
        "stored {} of packs {packs}",
        stats.stored_bytes
    );
    let report = fx.engine.gc(false).unwrap();
    assert!(
        report.bytes_reclaimed >= stats.reclaimable_bytes * 9 / 10,
        "{report:?}"
    );
}

/// A GC that cuts a pack's dead tail in place forgets every chunk it cut:
/// the same bytes captured again are stored anew, and restore exactly.
#[test]
fn chunks_cut_off_a_dead_tail_are_stored_again_when_seen_again() {
    let fx = Fixture::with(
        EngineOptions::new()
            .block_size(BS as u32)
            .gc_max_unused(0.0),
    );
    let x = crate::common::random_bytes(32 * BS, 21);
    let y = crate::common::random_bytes(32 * BS, 22);
    let disk = fx.server(1, "web", &x);
    fx.engine.create_snapshot(ServerId(1), "x", "").unwrap();
    std::fs::write(&disk, &y).unwrap();
    let sy = fx.engine.create_snapshot(ServerId(1), "y", "").unwrap();
    fx.engine.delete_snapshot(sy.id).unwrap();
    let report = fx.engine.gc(false).unwrap();
    // Cutting the tail leaves nothing dead: no rewrite follows.
    assert!(
        report.chunks_reclaimed == 32 && report.packs_cut == 1 && report.packs_rewritten == 0,
        "{report:?}"
    );
    // y again, on another server, in this process and after a reopen (the
    // cut pack's own index then says what it holds): every chunk is new.
    let disk2 = fx.server(2, "db", &y);
    let probe = fx.engine.create_snapshot(ServerId(2), "probe", "").unwrap();
    assert_eq!(probe.stats.unwrap().new_chunks, 32);
    fx.engine.delete_snapshot(probe.id).unwrap();
    fx.engine.gc(false).unwrap();
    let fx = fx.reopen(EngineOptions::new().block_size(BS as u32));
    let again = fx
        .engine
        .create_snapshot(ServerId(2), "y-again", "")
        .unwrap();
    assert_eq!(again.stats.unwrap().new_chunks, 32);
    assert!(fx.engine.verify(None).unwrap().is_ok());
    std::fs::write(&disk2, vec![0u8; y.len()]).unwrap();
    fx.engine
        .restore_snapshot_with(
            again.id,
            blocksnap::RestoreOptions::default().safety_snapshot(false),
        )
        .unwrap();
    assert!(std::fs::read(&disk2).unwrap() == y);
}
