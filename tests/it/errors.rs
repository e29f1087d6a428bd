//! Every wrong call gets its own error and changes nothing.

use blocksnap::{Compression, EngineOptions, Error, ServerId, SnapshotId, SnapshotStatus};

use crate::common::OpenIn;
use crate::common::{BS, Fixture, Gate, disk_bytes};

#[test]
fn invalid_names_are_refused_and_change_nothing() {
    let fx = Fixture::new();
    fx.server(1, "web", &disk_bytes(8 * BS, 1));
    let long = "x".repeat(65);
    for bad in [
        "",
        long.as_str(),
        "has space",
        "../x",
        "naïve",
        "tab\t",
        "a/b",
    ] {
        let err = fx.engine.create_snapshot(ServerId(1), bad, "").unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err}");
        assert!(err.is_user_error());
    }
    let err = fx
        .engine
        .create_snapshot(ServerId(1), "ok", &"d".repeat(1025))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidParameter(_)), "{err}");
    assert!(fx.engine.snapshots(None).unwrap().is_empty());
    // No id was spent on the refused calls.
    let s = fx.engine.create_snapshot(ServerId(1), "ok", "").unwrap();
    assert_eq!(s.id, SnapshotId(1));
}

#[test]
fn unknown_server_and_snapshot_are_not_found() {
    let fx = Fixture::new();
    assert!(matches!(
        fx.engine.create_snapshot(ServerId(9), "s", ""),
        Err(Error::ServerNotFound(ServerId(9)))
    ));
    assert!(matches!(
        fx.engine.snapshots(Some(ServerId(9))),
        Err(Error::ServerNotFound(_))
    ));
    for call in [
        fx.engine.restore_snapshot(SnapshotId(4)).map(|_| ()),
        fx.engine.delete_snapshot(SnapshotId(4)),
        fx.engine.snapshot(SnapshotId(4)).map(|_| ()),
        fx.engine.verify(Some(SnapshotId(4))).map(|_| ()),
    ] {
        assert!(matches!(call, Err(Error::SnapshotNotFound(SnapshotId(4)))));
    }
}

#[test]
fn a_server_id_is_registered_once() {
    let fx = Fixture::new();
    fx.server(1, "web", &[]);
    let err = fx
        .engine
        .add_server(ServerId(1), "other", "/tmp/x")
        .unwrap_err();
    assert!(matches!(err, Error::ServerExists(ServerId(1))));
    assert_eq!(fx.engine.server(ServerId(1)).unwrap().name, "web");
    assert!(matches!(
        fx.engine.add_server(ServerId(2), "", "/tmp/x"),
        Err(Error::InvalidName { .. })
    ));
}

#[test]
fn in_progress_snapshots_cannot_be_restored_or_deleted() {
    let gate = Gate::default();
    let fx = Fixture::with(
        EngineOptions::new()
            .block_size(BS as u32)
            .disk_opener(gate.opener()),
    );
    let _opens = gate.open_on_drop();
    fx.server(1, "web", &disk_bytes(16 * BS, 2));
    let job = fx.engine.start_snapshot(ServerId(1), "slow", "").unwrap();
    let id = job.snapshot.id;
    assert_eq!(job.snapshot.status, SnapshotStatus::InProgress);
    assert_eq!(job.snapshot.size_mb, None);
    assert_eq!(
        fx.engine.snapshot(id).unwrap().status,
        SnapshotStatus::InProgress
    );
    assert!(fx.engine.capture_progress(id).is_some());

    let err = fx.engine.restore_snapshot(id).unwrap_err();
    assert!(matches!(err, Error::WrongState(_)), "{err}");
    let err = fx.engine.delete_snapshot(id).unwrap_err();
    assert!(
        matches!(err, Error::Busy { server: ServerId(1), ref operation } if operation.contains("capturing")),
        "{err}"
    );
    let err = fx.engine.verify(Some(id)).unwrap_err();
    assert!(matches!(err, Error::WrongState(_)), "{err}");
    gate.open();
    let done = job.wait().unwrap();
    assert_eq!(done.status, SnapshotStatus::Completed);
    assert!(fx.engine.capture_progress(id).is_none());
    fx.engine.delete_snapshot(id).unwrap();
}

#[test]
fn a_capturing_server_cannot_be_restored() {
    let gate = Gate::default();
    let fx = Fixture::new();
    fx.server(1, "web", &disk_bytes(16 * BS, 3));
    let done = fx.engine.create_snapshot(ServerId(1), "done", "").unwrap();
    let engine = {
        let Fixture { dir, engine, .. } = fx;
        drop(engine);
        let engine = EngineOptions::new()
            .disk_opener(gate.opener())
            .open_in(dir.path())
            .unwrap();
        (dir, engine)
    };
    let (_dir, engine) = engine;
    let _opens = gate.open_on_drop();
    let job = engine.start_snapshot(ServerId(1), "slow", "").unwrap();
    let err = engine.restore_snapshot(done.id).unwrap_err();
    assert!(
        matches!(err, Error::Busy { ref operation, .. } if operation.contains("capturing")),
        "{err}"
    );
    gate.open();
    job.wait().unwrap();
    engine.restore_snapshot(done.id).unwrap();
}

#[test]
fn a_second_open_of_a_store_is_refused_as_locked() {
    let fx = Fixture::new();
    let err = EngineOptions::new().open(fx.store()).err().unwrap();
    assert!(matches!(err, Error::StoreLocked { .. }), "{err}");
    assert!(err.to_string().contains("locked"));
}

/// A lock let go of within the patience window (as when a process forked
/// while the store was open lets its inherited descriptor go) is taken:
/// the open waits for it rather than report the store locked.
#[test]
fn a_lock_released_within_the_patience_window_is_taken() {
    let Fixture { dir, engine, .. } = Fixture::new();
    let store = dir.path().join("store");
    let holder = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(150));
        drop(engine);
    });
    let second = EngineOptions::new().open(&store);
    holder.join().unwrap();
    assert!(second.is_ok(), "{:?}", second.err());
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for bs in [0, 1000, 2048, 8 << 20] {
        let err = EngineOptions::new()
            .block_size(bs)
            .open(dir.path())
            .err()
            .unwrap();
        assert!(matches!(err, Error::InvalidParameter(_)), "{bs}: {err}");
    }
    let err = EngineOptions::new()
        .create(false)
        .open(dir.path().join("none"))
        .err()
        .unwrap();
    assert!(matches!(err, Error::NoStore { .. }));
    // The block size is fixed at creation.
    drop(
        EngineOptions::new()
            .block_size(8192)
            .open(dir.path())
            .unwrap(),
    );
    let err = EngineOptions::new()
        .block_size(4096)
        .open(dir.path())
        .err()
        .unwrap();
    assert!(matches!(err, Error::InvalidParameter(_)), "{err}");
    assert_eq!(
        blocksnap::Engine::open(dir.path()).unwrap().block_size(),
        8192
    );
}

#[test]
fn a_missing_disk_refuses_the_capture_with_its_path() {
    let fx = Fixture::new();
    fx.engine
        .add_server(ServerId(1), "web", fx.disk("nope.img"))
        .unwrap();
    let err = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap_err();
    assert!(err.to_string().contains("nope.img"), "{err}");
    // The disk is opened before a slot is reserved: nothing is left behind.
    assert!(fx.engine.snapshots(Some(ServerId(1))).unwrap().is_empty());
}

#[test]
fn compression_is_a_store_setting() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let engine = EngineOptions::new()
        .compression(Compression::Level(9))
        .open(&store)
        .unwrap();
    assert_eq!(engine.compression(), Compression::Level(9));
    for bad in [Compression::Level(0), Compression::Level(20)] {
        assert!(matches!(
            engine.set_compression(bad),
            Err(Error::InvalidParameter(_))
        ));
    }
    engine.set_compression(Compression::Balanced).unwrap();
    drop(engine);
    let engine = blocksnap::Engine::open(&store).unwrap();
    assert_eq!(engine.compression(), Compression::Balanced);
    assert_eq!(engine.stats().unwrap().compression.name(), "balanced");
    // Chunks stored at different levels restore alike.
    let disk = dir.path().join("d.img");
    let bytes = disk_bytes(64 * BS, 5);
    std::fs::write(&disk, &bytes).unwrap();
    engine.add_server(ServerId(1), "web", &disk).unwrap();
    let a = engine.create_snapshot(ServerId(1), "a", "").unwrap();
    // A level reads back in its named form.
    engine.set_compression(Compression::Level(1)).unwrap();
    assert_eq!(engine.compression(), Compression::Fast);
    std::fs::write(&disk, disk_bytes(64 * BS, 6)).unwrap();
    engine.create_snapshot(ServerId(1), "b", "").unwrap();
    engine.restore_snapshot(a.id).unwrap();
    assert!(std::fs::read(&disk).unwrap() == bytes);
    assert!(engine.verify(None).unwrap().is_ok());
    assert!(
        EngineOptions::new()
            .compression(Compression::Level(0))
            .open(dir.path().join("other"))
            .is_err()
    );
    for (text, want) in [
        ("fast", Compression::Fast),
        ("compact", Compression::Compact),
        ("9", Compression::Level(9)),
        ("level-9", Compression::Level(9)),
    ] {
        assert_eq!(text.parse::<Compression>().unwrap(), want, "{text}");
    }
    assert!("0".parse::<Compression>().is_err() && "zip".parse::<Compression>().is_err());
}

/// Settings fixed when a store is made behave alike on an existing store:
/// another value is an error that says what the store has.
#[test]
fn an_existing_store_refuses_other_fixed_settings_and_says_which_it_has() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    drop(
        EngineOptions::new()
            .block_size(BS as u32)
            .compression(Compression::Compact)
            .open(&store)
            .unwrap(),
    );
    let err = EngineOptions::new()
        .block_size(2 * BS as u32)
        .open(&store)
        .err()
        .unwrap();
    assert!(err.to_string().contains("4096-byte blocks"), "{err}");
    let err = EngineOptions::new()
        .compression(Compression::Fast)
        .open(&store)
        .err()
        .unwrap();
    assert!(matches!(err, Error::InvalidParameter(_)), "{err}");
    assert!(err.to_string().contains("compact"), "{err}");
    // The same settings, or none, open it.
    EngineOptions::new()
        .block_size(BS as u32)
        .compression(Compression::Compact)
        .open(&store)
        .unwrap();
}

/// Out-of-range settings are errors at open, never clamped.
#[test]
fn out_of_range_settings_are_refused_not_clamped() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let bad: Vec<(&str, EngineOptions)> = vec![
        (
            "sample rate 1.5",
            EngineOptions::new().clean_sample_rate(1.5),
        ),
        (
            "sample rate NaN",
            EngineOptions::new().clean_sample_rate(f64::NAN),
        ),
        (
            "unused share -0.1",
            EngineOptions::new().gc_max_unused(-0.1),
        ),
        ("window 0", EngineOptions::new().window_len(0)),
        (
            "window below a block",
            EngineOptions::new()
                .block_size(BS as u32)
                .window_len(BS - 1),
        ),
        ("block size 3000", EngineOptions::new().block_size(3000)),
    ];
    for (what, options) in bad {
        let err = options
            .open(&store)
            .err()
            .unwrap_or_else(|| panic!("{what} accepted"));
        assert!(matches!(err, Error::InvalidParameter(_)), "{what}: {err}");
        assert!(!store.exists(), "{what}: a refused store was made");
    }
}

#[test]
fn a_group_length_outside_its_range_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other");
    let grouped = |group_len| Compression::Grouped {
        level: 3,
        group_len,
    };
    // Less than two blocks, or more than 4 MiB: no store is made.
    for bad in [BS as u32, 2 * BS as u32 - 1, (4 << 20) + 1] {
        let err = EngineOptions::new()
            .block_size(BS as u32)
            .compression(grouped(bad))
            .open(&other)
            .err()
            .unwrap_or_else(|| panic!("{bad} was accepted"));
        assert!(matches!(err, Error::InvalidParameter(_)), "{err}");
        assert!(err.to_string().contains("two blocks"), "{err}");
        assert!(!other.exists(), "a refused store left {}", other.display());
    }
    let store = dir.path().join("store");
    let engine = EngineOptions::new()
        .block_size(BS as u32)
        .compression(grouped(8 * BS as u32))
        .open(&store)
        .unwrap();
    assert_eq!(engine.compression().group_len(), 8 * BS as u32);
    assert!(matches!(
        engine.set_compression(grouped(BS as u32)),
        Err(Error::InvalidParameter(_))
    ));
    assert_eq!(engine.compression().group_len(), 8 * BS as u32);
    engine.set_compression(Compression::Balanced).unwrap();
    drop(engine);
    assert_eq!(
        blocksnap::Engine::open(&store).unwrap().compression(),
        Compression::Balanced
    );
}

#[test]
fn the_chunk_index_stays_under_32_bytes_per_chunk() {
    if crate::common::on_bucket() {
        // A fleet seals its packs at every capture, and the index is a
        // table by then: what is measured here is the overlay's memory.
        return;
    }
    let fx = Fixture::new();
    fx.server(1, "web", &crate::common::random_bytes(20_000 * BS, 9));
    fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    assert_eq!(fx.engine.chunk_count(), 20_000);
    let per_chunk = fx.engine.index_bytes() as f64 / 20_000.0;
    assert!(
        (8.0..=32.0).contains(&per_chunk),
        "{per_chunk:.1} bytes per chunk"
    );
}

/// A store that lost its catalog is not an empty directory: opening it (or
/// making a new store there) is refused as corruption naming the catalog,
/// so its packs and manifests are never hidden under a fresh catalog.
#[test]
fn a_store_without_its_catalog_is_corruption_not_a_new_store() {
    if crate::common::on_bucket() {
        // In a bucket the catalog is the fleet's; a cache without one is
        // made again from it (fleet::tests).
        return;
    }
    let fx = Fixture::new();
    fx.server(1, "web", &disk_bytes(8 * BS, 3));
    fx.engine.create_snapshot(ServerId(1), "v1", "").unwrap();
    let Fixture { dir, engine, .. } = fx;
    engine.close().unwrap();
    let store = dir.path().join("store");
    std::fs::remove_file(store.join("catalog")).unwrap();
    for create in [false, true] {
        let err = EngineOptions::new()
            .create(create)
            .open(&store)
            .err()
            .expect("refused");
        assert!(err.is_corruption(), "{err}");
        assert!(err.to_string().contains("catalog"), "{err}");
    }
    assert!(!store.join("catalog").exists(), "no new catalog was made");
}
