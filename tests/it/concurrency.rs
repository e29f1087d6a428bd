//! The five-snapshot cap under races, and captures running side by side.

use std::collections::HashSet;
use std::sync::Barrier;

use blocksnap::{EngineOptions, Error, MAX_SNAPSHOTS_PER_SERVER, ServerId, SnapshotStatus};

use crate::common::{BS, Fixture, Gate, disk_bytes};

#[test]
fn the_sixth_snapshot_is_refused_until_one_is_deleted() {
    let fx = Fixture::new();
    fx.server(1, "web", &disk_bytes(8 * BS, 1));
    let ids: Vec<_> = (0..5)
        .map(|i| {
            fx.engine
                .create_snapshot(ServerId(1), &format!("s{i}"), "")
                .unwrap()
                .id
        })
        .collect();
    let err = fx
        .engine
        .create_snapshot(ServerId(1), "s5", "")
        .unwrap_err();
    assert!(
        matches!(err, Error::SnapshotLimit { limit: 5, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("5"));
    fx.engine.delete_snapshot(ids[2]).unwrap();
    let s = fx.engine.create_snapshot(ServerId(1), "s5", "").unwrap();
    assert!(s.id > ids[4], "ids are never reused");
    // Another server is not affected by the first one's cap.
    fx.server(2, "db", &disk_bytes(8 * BS, 2));
    fx.engine.create_snapshot(ServerId(2), "d0", "").unwrap();
}

#[test]
fn eight_racing_creators_make_exactly_five_snapshots() {
    let fx = Fixture::new();
    fx.server(1, "web", &disk_bytes(32 * BS, 3));
    let barrier = Barrier::new(8);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let engine = fx.engine.clone();
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    engine.create_snapshot(ServerId(1), &format!("race{i}"), "")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let limited = results
        .iter()
        .filter(|r| matches!(r, Err(Error::SnapshotLimit { .. })))
        .count();
    assert_eq!(ok.len(), MAX_SNAPSHOTS_PER_SERVER);
    assert_eq!(limited, 3);
    let ids: HashSet<_> = ok.iter().map(|s| s.id).collect();
    assert_eq!(ids.len(), 5);
    let listed = fx.engine.snapshots(Some(ServerId(1))).unwrap();
    assert_eq!(listed.len(), 5);
    assert!(listed.iter().all(|s| s.status == SnapshotStatus::Completed));
}

#[test]
fn in_progress_captures_count_toward_the_cap() {
    let gate = Gate::default();
    let fx = Fixture::with(
        EngineOptions::new()
            .block_size(BS as u32)
            .disk_opener(gate.opener()),
    );
    let _opens = gate.open_on_drop();
    let bytes = disk_bytes(64 * BS, 4);
    let path = fx.server(1, "web", &bytes);
    // Back to back: each gets its own slot and id at once.
    let jobs: Vec<_> = (0..5)
        .map(|i| {
            fx.engine
                .start_snapshot(ServerId(1), &format!("q{i}"), "")
                .unwrap()
        })
        .collect();
    let ids: Vec<_> = jobs.iter().map(|j| j.snapshot.id.0).collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    assert!(matches!(
        fx.engine.start_snapshot(ServerId(1), "sixth", ""),
        Err(Error::SnapshotLimit { .. })
    ));
    gate.open();
    for job in jobs {
        let s = job.wait().unwrap();
        assert_eq!(s.status, SnapshotStatus::Completed);
    }
    // All five capture the same disk and restore it exactly.
    std::fs::write(&path, b"scribble").unwrap();
    fx.engine
        .restore_snapshot(blocksnap::SnapshotId(3))
        .unwrap();
    assert!(std::fs::read(&path).unwrap() == bytes);
}

#[test]
fn captures_of_several_servers_run_side_by_side() {
    let fx = Fixture::new();
    let disks: Vec<_> = (1..=4)
        .map(|i| {
            let bytes = disk_bytes(200 * BS, 100 + i);
            (fx.server(i, &format!("srv{i}"), &bytes), bytes)
        })
        .collect();
    let jobs: Vec<_> = (1..=4)
        .map(|i| fx.engine.start_snapshot(ServerId(i), "par", "").unwrap())
        .collect();
    let snaps: Vec<_> = jobs.into_iter().map(|j| j.wait().unwrap()).collect();
    assert!(fx.engine.verify(None).unwrap().is_ok());
    for ((path, bytes), snap) in disks.iter().zip(&snaps) {
        std::fs::write(path, b"x").unwrap();
        fx.engine.restore_snapshot(snap.id).unwrap();
        assert!(std::fs::read(path).unwrap() == *bytes);
    }
}
