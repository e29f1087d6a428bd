//! What survives closing, reopening and crashing.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use blocksnap::{EngineOptions, ServerId, ServerState, SnapshotId, SnapshotStatus};

use crate::common::OpenIn;
use crate::common::{BS, Fixture, Gate, disk_bytes};

#[test]
fn servers_snapshots_and_the_id_counter_survive_reopening() {
    let fx = Fixture::new();
    let bytes = disk_bytes(40 * BS, 1);
    let path = fx.server(1, "web", &bytes);
    fx.server(2, "db", &disk_bytes(10 * BS, 2));
    let a = fx
        .engine
        .create_snapshot(ServerId(1), "a", "first one")
        .unwrap();
    let b = fx.engine.create_snapshot(ServerId(2), "b", "").unwrap();
    fx.engine.delete_snapshot(b.id).unwrap();
    let before = fx.engine.snapshots(None).unwrap();

    let fx = fx.reopen(EngineOptions::new());
    assert_eq!(fx.engine.block_size(), BS as u32);
    let servers = fx.engine.servers();
    assert_eq!(servers.len(), 2);
    assert_eq!(servers[0].name, "web");
    assert_eq!(servers[0].disk, path);
    assert_eq!(fx.engine.snapshots(None).unwrap(), before);
    assert_eq!(fx.engine.snapshot(a.id).unwrap().description, "first one");
    // The deleted snapshot's id is not reused.
    let c = fx.engine.create_snapshot(ServerId(2), "c", "").unwrap();
    assert_eq!(c.id, SnapshotId(3));
    // And what was captured before the reopen restores.
    std::fs::write(&path, b"gone").unwrap();
    fx.engine.restore_snapshot(a.id).unwrap();
    assert!(std::fs::read(&path).unwrap() == bytes);
    assert!(fx.engine.verify(None).unwrap().is_ok());
}

/// Not a test on its own: the child process of the crash test. It starts a
/// capture that cannot finish, says so, and waits to be killed.
#[test]
#[ignore = "the child process of a harness: the harness runs it"]
fn child_holds_a_capture_in_progress() {
    let Ok(dir) = std::env::var("BLOCKSNAP_TEST_CHILD_STORE") else {
        return;
    };
    let gate = Gate::default();
    let engine = EngineOptions::new()
        .disk_opener(gate.opener())
        .open_in(std::path::Path::new(&dir))
        .unwrap();
    let job = engine
        .start_snapshot(ServerId(1), "interrupted", "")
        .unwrap();
    println!("in-progress {}", job.snapshot.id);
    std::thread::sleep(std::time::Duration::from_secs(60));
    unreachable!("the parent kills this process");
}

#[test]
fn a_capture_interrupted_by_a_crash_is_failed_on_open() {
    let fx = Fixture::new();
    let bytes = disk_bytes(40 * BS, 3);
    let path = fx.server(1, "web", &bytes);
    let done = fx.engine.create_snapshot(ServerId(1), "done", "").unwrap();
    let fx = fx.reopen(EngineOptions::new().create(false));
    let Fixture { dir, engine, .. } = fx;
    drop(engine);

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "--ignored",
            "persistence::child_holds_a_capture_in_progress",
            "--nocapture",
        ])
        .env("BLOCKSNAP_TEST_CHILD_STORE", dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let id: u64 = loop {
        let line = lines.next().expect("child ended early").unwrap();
        if let Some(id) = line.strip_prefix("in-progress ") {
            break id.trim().parse().unwrap();
        }
    };
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();

    let engine = EngineOptions::new().open_in(dir.path()).unwrap();
    assert_eq!(engine.open_report().failed_captures, vec![SnapshotId(id)]);
    let s = engine.snapshot(SnapshotId(id)).unwrap();
    assert_eq!(s.status, SnapshotStatus::Failed);
    assert_eq!(s.size_mb, None);
    assert_eq!(engine.server(ServerId(1)).unwrap().state, ServerState::Idle);
    // Nothing else changed: the completed snapshot still restores.
    assert_eq!(
        engine.snapshot(done.id).unwrap().status,
        SnapshotStatus::Completed
    );
    std::fs::write(&path, b"x").unwrap();
    engine.restore_snapshot(done.id).unwrap();
    assert!(std::fs::read(&path).unwrap() == bytes);
    // The failed one does not count: five more fit.
    for i in 0..4 {
        engine
            .create_snapshot(ServerId(1), &format!("n{i}"), "")
            .unwrap();
    }
}

/// `Engine::close` reports what dropping the engine swallows (here the
/// open pack's seal failing), refuses while another handle holds the
/// store, and the store opens after either.
#[test]
fn close_reports_what_drop_swallows_and_waits_for_other_handles() {
    use blocksnap::fsio::{Fault, FaultFs, FaultFsHandle};
    use std::sync::Arc;

    if crate::common::on_bucket() {
        // A fleet seals its packs at every capture (they go to the bucket
        // whole): close has no open pack to seal.
        return;
    }
    let fx = Fixture::new();
    let disk = fx.server(1, "web", &disk_bytes(16 * BS, 4));
    let snap = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    let Fixture { dir, engine, .. } = fx;
    let clone = engine.clone();
    assert!(matches!(
        engine.close(),
        Err(blocksnap::Error::WrongState(_))
    ));
    // The clone still works, and closes the store.
    assert_eq!(clone.snapshots(None).unwrap().len(), 1);
    clone.close().unwrap();

    let fs = FaultFs::new();
    let engine = EngineOptions::new()
        .store_fs(Arc::new(FaultFsHandle(fs.clone())))
        .open_in(dir.path())
        .unwrap();
    std::fs::write(&disk, disk_bytes(16 * BS, 5)).unwrap();
    engine.create_snapshot(ServerId(1), "v2", "").unwrap();
    fs.fail(0, Fault::Eio); // the seal of the open pack
    assert!(engine.close().is_err(), "a failed seal is reported");
    let engine = EngineOptions::new().open_in(dir.path()).unwrap();
    assert!(engine.verify(None).unwrap().is_ok());
    engine.restore_snapshot(snap.id).unwrap();
    assert!(std::fs::read(&disk).unwrap() == disk_bytes(16 * BS, 4));
}

/// The store as a crash leaves it (copied while open: its pack unsealed)
/// with a torn record at the pack's end: the next open seals the pack,
/// cuts exactly the torn bytes, says so, and keeps the snapshot.
#[test]
fn open_reports_the_packs_it_recovered_and_the_torn_bytes_it_cut() {
    if crate::common::on_bucket() {
        // A fleet's captures leave no unsealed pack to recover.
        return;
    }
    let fx = Fixture::new();
    let bytes = disk_bytes(32 * BS, 5);
    fx.server(1, "web", &bytes);
    let snap = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    let copy = tempfile::tempdir().unwrap();
    crate::common::copy_tree(fx.dir.path(), copy.path());
    let newest = crate::common::pack_files(&copy.path().join("store"));
    let pack = newest.last().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(pack).unwrap();
    std::io::Write::write_all(&mut f, &[0x5a; 77]).unwrap();
    drop(f);
    let engine = EngineOptions::new()
        .open(copy.path().join("store"))
        .unwrap();
    let report = engine.open_report();
    assert_eq!(report.packs_recovered, 1, "{report:?}");
    assert_eq!(report.bytes_cut, 77, "{report:?}");
    assert!(report.unreadable_packs.is_empty());
    assert_eq!(
        engine.snapshot(snap.id).unwrap().status,
        SnapshotStatus::Completed
    );
    assert!(engine.verify(None).unwrap().is_ok());
}
