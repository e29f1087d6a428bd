//! Restores that can be planned, undone, resumed and verified.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use blocksnap::sample::Rng;
use blocksnap::{
    EngineOptions, Error, RestoreMethod, RestoreOptions, ServerId, ServerState, SnapshotId,
    SnapshotKind, SnapshotStatus,
};

use crate::common::OpenIn;
use crate::common::{BS, Faults, Fixture, disk_bytes, faulty_opener};

fn safety_snapshots(fx: &Fixture, server: u64) -> Vec<SnapshotId> {
    fx.engine
        .snapshots(Some(ServerId(server)))
        .unwrap()
        .iter()
        .filter(|s| s.kind == SnapshotKind::Safety)
        .map(|s| s.id)
        .collect()
}

#[test]
fn a_dry_run_plans_exactly_what_the_restore_then_rewrites() {
    let fx = Fixture::new();
    let v1 = disk_bytes(128 * BS, 1);
    let path = fx.server(1, "web", &v1);
    let snap = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    let mut v2 = v1.clone();
    for k in [3usize, 4, 50, 127] {
        v2[k * BS + 9] ^= 0xFF;
    }
    std::fs::write(&path, &v2).unwrap();
    for options in [
        RestoreOptions::default(),
        RestoreOptions::default()
            .safety_snapshot(false)
            .verify(false),
    ] {
        let safety_before = safety_snapshots(&fx, 1);
        let plan = fx.engine.plan_restore(snap.id, options).unwrap();
        assert_eq!(plan.blocks_to_rewrite, 4);
        assert_eq!(plan.runs, vec![(3, 5), (50, 51), (127, 128)]);
        assert_eq!(plan.bytes_to_write, 4 * BS as u64);
        assert_eq!(plan.safety_snapshot, options.safety_snapshot);
        assert!(plan.estimated_seconds > 0.0);
        // Nothing was written or taken.
        assert!(std::fs::read(&path).unwrap() == v2);
        assert_eq!(safety_snapshots(&fx, 1), safety_before);
        let report = fx.engine.restore_snapshot_with(snap.id, options).unwrap();
        // With a safety snapshot just taken, the disk's state is known: the
        // plan comes from comparing the two manifests.
        let method = if options.safety_snapshot {
            RestoreMethod::Delta
        } else {
            RestoreMethod::Compare
        };
        assert_eq!(report.method, method);
        assert_eq!(report.blocks_rewritten, plan.blocks_to_rewrite);
        assert_eq!(report.bytes_written, plan.bytes_to_write);
        assert_eq!(report.blocks_verified, if options.verify { 4 } else { 0 });
        assert!(std::fs::read(&path).unwrap() == v1);
        std::fs::write(&path, &v2).unwrap();
    }
}

#[test]
fn undo_brings_back_the_disk_as_it_was_before_the_restore() {
    let fx = Fixture::new();
    let v1 = disk_bytes(64 * BS, 2);
    let path = fx.server(1, "web", &v1);
    let snap = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    // Work done since the snapshot, which the restore would throw away.
    let work = disk_bytes(70 * BS, 3);
    std::fs::write(&path, &work).unwrap();

    let report = fx.engine.restore_snapshot(snap.id).unwrap();
    let safety = report.safety_snapshot.unwrap();
    assert!(std::fs::read(&path).unwrap() == v1);
    let s = fx.engine.snapshot(safety).unwrap();
    assert_eq!(
        (s.kind, s.status),
        (SnapshotKind::Safety, SnapshotStatus::Completed)
    );

    let undo = fx.engine.undo_restore(ServerId(1)).unwrap();
    assert_eq!(undo.snapshot_id, safety);
    assert!(
        std::fs::read(&path).unwrap() == work,
        "back to the work, length and all"
    );
    // The undo took its own safety snapshot (of v1), replacing the first:
    // undoing again redoes the restore.
    assert_eq!(
        safety_snapshots(&fx, 1),
        vec![undo.safety_snapshot.unwrap()]
    );
    fx.engine.undo_restore(ServerId(1)).unwrap();
    assert!(std::fs::read(&path).unwrap() == v1);
    assert!(fx.engine.verify(None).unwrap().is_ok());
}

#[test]
fn safety_snapshots_do_not_count_and_are_replaced_by_the_next_restore() {
    let fx = Fixture::new();
    let path = fx.server(1, "web", &disk_bytes(16 * BS, 4));
    let mut ids = Vec::new();
    for i in 0..5 {
        std::fs::write(&path, disk_bytes(16 * BS, 10 + i)).unwrap();
        ids.push(
            fx.engine
                .create_snapshot(ServerId(1), &format!("s{i}"), "")
                .unwrap()
                .id,
        );
    }
    let first = fx.engine.restore_snapshot(ids[0]).unwrap();
    // Five of the user's and a safety snapshot: the cap still holds at five.
    assert_eq!(fx.engine.snapshots(Some(ServerId(1))).unwrap().len(), 6);
    assert!(matches!(
        fx.engine.create_snapshot(ServerId(1), "sixth", ""),
        Err(Error::SnapshotLimit { .. })
    ));
    let second = fx.engine.restore_snapshot(ids[3]).unwrap();
    let safety = safety_snapshots(&fx, 1);
    assert_eq!(safety, vec![second.safety_snapshot.unwrap()]);
    assert!(matches!(
        fx.engine.snapshot(first.safety_snapshot.unwrap()),
        Err(Error::SnapshotNotFound(_))
    ));
    // A restore without one keeps the last, and cannot be undone further.
    let third = fx
        .engine
        .restore_snapshot_with(
            ids[1],
            RestoreOptions::default()
                .safety_snapshot(false)
                .verify(true),
        )
        .unwrap();
    assert_eq!(third.safety_snapshot, None);
    assert_eq!(safety_snapshots(&fx, 1), safety);
    // The user can delete it; then there is nothing to undo.
    fx.engine.delete_snapshot(safety[0]).unwrap();
    assert!(matches!(
        fx.engine.undo_restore(ServerId(1)),
        Err(Error::WrongState(_))
    ));
}

#[test]
fn a_failed_safety_snapshot_stops_the_restore_before_any_write() {
    let fx = Fixture::new();
    let v1 = disk_bytes(32 * BS, 5);
    let path = fx.server(1, "web", &v1);
    let snap = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    let fx = fx.reopen(EngineOptions::new().disk_opener(faulty_opener(Faults {
        fail_reads: true,
        ..Faults::default()
    })));
    let work = disk_bytes(32 * BS, 6);
    std::fs::write(&path, &work).unwrap();
    let err = fx.engine.restore_snapshot(snap.id).unwrap_err();
    assert!(matches!(err, Error::SafetySnapshot { .. }), "{err}");
    assert!(err.to_string().contains("injected read error"), "{err}");
    assert!(std::fs::read(&path).unwrap() == work, "nothing written");
    assert_eq!(
        fx.engine.server(ServerId(1)).unwrap().state,
        ServerState::Idle
    );
}

/// A write that failed may have landed in part: the server stays marked
/// restoring (never idle with a disk that may be half-written), and running
/// the restore again finishes it.
#[test]
fn a_restore_whose_first_write_tears_leaves_the_server_restoring() {
    let fx = Fixture::new();
    let v1 = disk_bytes(16 * BS, 9);
    let path = fx.server(1, "web", &v1);
    let snap = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    let fx = fx.reopen(EngineOptions::new().disk_opener(faulty_opener(Faults {
        tear_writes: true,
        ..Faults::default()
    })));
    std::fs::write(&path, disk_bytes(16 * BS, 10)).unwrap();
    let bare = RestoreOptions::default().safety_snapshot(false);
    let err = fx.engine.restore_snapshot_with(snap.id, bare).unwrap_err();
    assert!(err.to_string().contains("torn"), "{err}");
    let server = fx.engine.server(ServerId(1)).unwrap();
    assert_eq!(server.state, ServerState::Restoring);
    assert_eq!(server.restoring_from, Some(snap.id));
    let fx = fx.reopen(EngineOptions::new());
    assert_eq!(
        fx.engine.open_report().interrupted_restores,
        vec![(ServerId(1), snap.id)]
    );
    fx.engine.restore_snapshot(snap.id).unwrap();
    assert!(std::fs::read(&path).unwrap() == v1);
    assert_eq!(
        fx.engine.server(ServerId(1)).unwrap().state,
        ServerState::Idle
    );
}

#[test]
fn a_disk_that_loses_a_write_fails_the_restore_loudly() {
    let fx = Fixture::with(
        EngineOptions::new()
            .block_size(BS as u32)
            .disk_opener(faulty_opener(Faults {
                drop_write_at: Some(5 * BS as u64),
                ..Faults::default()
            })),
    );
    let v1 = disk_bytes(16 * BS, 7);
    let path = fx.server(1, "web", &v1);
    let snap = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    std::fs::write(&path, disk_bytes(16 * BS, 8)).unwrap();
    let err = fx.engine.restore_snapshot(snap.id).unwrap_err();
    // The dropped write held block 5 (and its neighbours in the same run).
    match &err {
        Error::VerifyFailed { block, .. } => assert!(*block <= 5, "{err}"),
        other => panic!("{other}"),
    }
    // Never reported idle with a disk that does not hold the snapshot.
    let server = fx.engine.server(ServerId(1)).unwrap();
    assert_eq!(server.state, ServerState::Restoring);
    assert_eq!(server.restoring_from, Some(snap.id));
}

#[test]
fn a_restore_of_a_disk_that_does_not_exist_needs_no_safety_snapshot() {
    let fx = Fixture::new();
    let v1 = disk_bytes(16 * BS, 9);
    let path = fx.server(1, "web", &v1);
    let snap = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    std::fs::remove_file(&path).unwrap();
    let plan = fx
        .engine
        .plan_restore(snap.id, RestoreOptions::default())
        .unwrap();
    assert_eq!(plan.blocks_to_rewrite, 16);
    let report = fx.engine.restore_snapshot(snap.id).unwrap();
    assert_eq!(report.safety_snapshot, None);
    assert!(std::fs::read(&path).unwrap() == v1);
}

/// Not a test on its own: the child process of the restore crash test.
/// Restores slowly (each write waits) until the parent kills it.
#[test]
#[ignore = "the child process of a harness: the harness runs it"]
fn child_restores_slowly_until_killed() {
    let Ok(store) = std::env::var("BLOCKSNAP_TEST_RESTORE_CHILD_STORE") else {
        return;
    };
    let id: u64 = std::env::var("BLOCKSNAP_TEST_RESTORE_CHILD_SNAPSHOT")
        .unwrap()
        .parse()
        .unwrap();
    let engine = EngineOptions::new()
        .window_len(8 * BS)
        .disk_opener(faulty_opener(Faults {
            write_delay: Duration::from_millis(4),
            ..Faults::default()
        }))
        .open_in(std::path::Path::new(&store))
        .unwrap();
    println!("restoring");
    engine.restore_snapshot(SnapshotId(id)).unwrap();
    println!("done");
}

#[test]
fn a_restore_killed_anywhere_is_finished_by_running_it_again() {
    let len = 256 * BS;
    let target = disk_bytes(len, 20);
    let seed = crate::common::seed("BLOCKSNAP_RESTORE_CRASH_SEED");
    let mut rng = Rng::new(seed);
    for kill in 0..crate::common::env_count("BLOCKSNAP_RESTORE_CRASH_KILLS", 5) {
        let fx = Fixture::new();
        let path = fx.server(1, "web", &target);
        let snap = fx
            .engine
            .create_snapshot(ServerId(1), "target", "")
            .unwrap();
        // The disk moves on: most blocks differ from the snapshot.
        let work = disk_bytes(len, 21 + kill);
        std::fs::write(&path, &work).unwrap();
        let fx = fx.reopen(EngineOptions::new());
        let crate::common::Fixture { dir, engine, .. } = fx;
        drop(engine);

        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "--ignored",
                "undo::child_restores_slowly_until_killed",
                "--nocapture",
            ])
            .env("BLOCKSNAP_TEST_RESTORE_CHILD_STORE", dir.path())
            .env(
                "BLOCKSNAP_TEST_RESTORE_CHILD_SNAPSHOT",
                snap.id.0.to_string(),
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        while let Some(Ok(line)) = lines.next() {
            if line.contains("restoring") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(250)));
        child.kill().unwrap();
        child.wait().unwrap();

        let engine = EngineOptions::new().open_in(dir.path()).unwrap();
        let interrupted = engine.open_report().interrupted_restores.clone();
        let server = engine.server(ServerId(1)).unwrap();
        if interrupted.is_empty() {
            // Killed before writing (stop hook, safety snapshot) or after
            // finishing: the disk is the work or the target, whole.
            let now = std::fs::read(&path).unwrap();
            assert!(
                now == work || now == target,
                "kill {kill}: a disk in between"
            );
            assert_eq!(server.state, ServerState::Idle);
        } else {
            println!("kill {kill}: interrupted while writing");
            assert_eq!(interrupted, vec![(ServerId(1), snap.id)]);
            assert_eq!(
                server.state,
                ServerState::Restoring,
                "never idle half-restored"
            );
        }
        let now = std::fs::read(&path).unwrap();
        let differing = (0..len / BS)
            .filter(|&k| now[k * BS..(k + 1) * BS] != target[k * BS..(k + 1) * BS])
            .count() as u64;
        let report = engine.restore_snapshot(snap.id).unwrap();
        assert!(std::fs::read(&path).unwrap() == target, "kill {kill}");
        assert!(
            report.blocks_rewritten <= differing,
            "kill {kill}: rewrote {} where {differing} still differed",
            report.blocks_rewritten
        );
        if !interrupted.is_empty() {
            assert_eq!(
                report.safety_snapshot, None,
                "a resumed restore keeps the first safety snapshot"
            );
        }
        assert_eq!(engine.server(ServerId(1)).unwrap().state, ServerState::Idle);
        assert!(engine.verify(None).unwrap().is_ok());
    }
}
