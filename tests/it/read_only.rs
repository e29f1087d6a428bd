//! Read-only opens: a look at a store changes nothing on disk, refuses
//! every call that would write, shares the store with other readers only,
//! and leaves an agent's change tracking as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use blocksnap::{EngineOptions, Error, RestoreOptions, ServerId, SnapshotStatus};

use crate::common::{BS, Fixture, disk_bytes};

const LEN: usize = 32 * BS;

fn tracking() -> EngineOptions {
    EngineOptions::new()
        .block_size(BS as u32)
        .change_tracking(true)
}

fn read_only() -> EngineOptions {
    EngineOptions::new().read_only(true)
}

/// Every file under `dir` and its bytes.
fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

#[test]
fn a_read_only_open_changes_nothing_and_refuses_every_write() {
    let fx = Fixture::with(tracking());
    let disk = fx.server(1, "web", &disk_bytes(LEN, 1));
    let first = fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    fx.engine.create_snapshot(ServerId(1), "v2", "").unwrap();
    let before_status = fx.engine.tracking_status(ServerId(1)).unwrap().unwrap();
    let Fixture { dir, engine, .. } = fx;
    engine.close().unwrap();
    let store = dir.path().join("store");
    let before = contents(&store);

    let engine = read_only().open(&store).unwrap();
    assert!(engine.is_read_only());
    assert_eq!(engine.servers().len(), 1);
    assert_eq!(engine.snapshots(None).unwrap().len(), 2);
    assert!(engine.stats().unwrap().snapshots == 2);
    assert!(engine.exclusive_bytes(first.id).is_ok());
    assert!(engine.verify(None).unwrap().is_ok());
    engine.gc(true).unwrap();
    engine
        .plan_restore(first.id, RestoreOptions::default())
        .unwrap();
    let writes: Vec<(&str, blocksnap::Result<()>)> = vec![
        (
            "add",
            engine.add_server(ServerId(2), "db", &disk).map(|_| ()),
        ),
        (
            "create",
            engine.create_snapshot(ServerId(1), "x", "").map(|_| ()),
        ),
        ("delete", engine.delete_snapshot(first.id)),
        ("restore", engine.restore_snapshot(first.id).map(|_| ())),
        ("gc", engine.gc(false).map(|_| ())),
        (
            "compression",
            engine.set_compression(blocksnap::Compression::Balanced),
        ),
    ];
    for (what, r) in writes {
        assert!(matches!(r, Err(Error::ReadOnly { .. })), "{what}: {r:?}");
    }
    engine.close().unwrap();
    assert!(
        contents(&store) == before,
        "a read-only open changed the store"
    );

    // The agent's trackers are as it left them: its next capture is
    // incremental.
    let engine = tracking().open(&store).unwrap();
    let after = engine.tracking_status(ServerId(1)).unwrap().unwrap();
    assert!(after.trusted && after.base == before_status.base);
}

#[test]
fn readers_share_a_store_but_never_with_a_writer() {
    let fx = Fixture::new();
    fx.server(1, "web", &disk_bytes(LEN, 2));
    let store = fx.store();
    assert!(matches!(
        read_only().open(&store),
        Err(Error::StoreLocked { .. })
    ));
    let Fixture {
        dir: _dir, engine, ..
    } = fx;
    engine.close().unwrap();
    let a = read_only().open(&store).unwrap();
    let b = read_only().open(&store).unwrap();
    assert!(matches!(
        EngineOptions::new().open(&store),
        Err(Error::StoreLocked { .. })
    ));
    drop((a, b));
    EngineOptions::new().open(&store).unwrap();
}

#[test]
fn a_read_only_open_needs_an_existing_store_and_no_tracking() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    assert!(matches!(
        read_only().open(&store),
        Err(Error::NoStore { .. })
    ));
    assert!(!store.exists(), "a read-only open created the store");
    EngineOptions::new().open(&store).unwrap().close().unwrap();
    assert!(matches!(
        read_only().change_tracking(true).open(&store),
        Err(Error::InvalidParameter(_))
    ));
}

/// A store copied while open (as a crash leaves it: an unsealed pack, a
/// capture in progress, a catalog not closed cleanly) is not repaired by a
/// read-only open: it is refused, untouched, with what to do.
#[test]
fn a_store_left_by_a_crash_is_refused_untouched() {
    let fx = Fixture::new();
    fx.server(1, "web", &disk_bytes(LEN, 3));
    fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    let crashed = tempfile::tempdir().unwrap();
    crate::common::copy_tree(fx.dir.path(), crashed.path());
    let store = crashed.path().join("store");
    let before = contents(&store);
    match read_only().open(&store) {
        Err(Error::WrongState(why)) => assert!(why.contains("not closed cleanly"), "{why}"),
        Ok(engine) => {
            // redb found it clean: then nothing may have been left half-done.
            assert!(
                engine
                    .snapshots(None)
                    .unwrap()
                    .iter()
                    .all(|s| s.status == SnapshotStatus::Completed)
            );
        }
        Err(e) => panic!("{e}"),
    }
    assert!(
        contents(&store) == before,
        "a read-only open changed the store"
    );
}

/// A read-only open where there is no store says so (the command's
/// `snapshot list` on a wrong --store), for a missing directory and for
/// an empty one alike.
#[test]
fn a_read_only_open_of_no_store_says_there_is_none() {
    let dir = tempfile::tempdir().unwrap();
    for path in [dir.path().join("absent"), dir.path().to_path_buf()] {
        let err = blocksnap::EngineOptions::new()
            .read_only(true)
            .open(&path)
            .err()
            .unwrap();
        assert!(
            matches!(err, blocksnap::Error::NoStore { .. }),
            "{path:?}: {err}"
        );
    }
}
