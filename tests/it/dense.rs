//! Disks whose list of blocks does not fit the memory allowed for it
//! (`EngineOptions::block_list_memory`): the capture writes its list to a
//! scratch file as it grows, and manifests keep their chunk ids in their
//! files. Everything must work exactly as when the list is in memory.

use blocksnap::{DirtyBitmap, EngineOptions, RestoreOptions, ServerId, SnapshotId};

use crate::common::{BS, Fixture, disk_bytes};

/// Blocks of a list page: the unit spilled and read back.
const PAGE: usize = 4096;

/// A disk of three and a half list pages and a short block (a count of
/// blocks no multiple of 8), data in most blocks.
fn dense_disk(seed: u64) -> Vec<u8> {
    let len = (3 * PAGE + PAGE / 2) * BS + 1000;
    let mut bytes = disk_bytes(len, seed);
    // Distinct stamps in every third block, so that each page holds data.
    for b in (0..len.div_ceil(BS)).step_by(3) {
        bytes[b * BS..b * BS + 8].copy_from_slice(&(b as u64 ^ seed << 32).to_le_bytes());
    }
    bytes
}

fn tight() -> EngineOptions {
    EngineOptions::new()
        .block_size(BS as u32)
        .block_list_memory(0)
}

/// The same disks captured with the list in memory and out of it give the
/// same manifest, byte for byte; restores, an increment, verify and
/// deletes then work from manifests whose ids stay in their files.
#[test]
fn a_disk_list_out_of_memory_gives_the_same_snapshots() {
    let roomy = Fixture::new();
    let fx = Fixture::with(tight());
    let v1 = dense_disk(1);
    for f in [&roomy, &fx] {
        f.server(1, "dense", &v1);
        f.engine.create_snapshot(ServerId(1), "one", "").unwrap();
    }
    let manifest = |f: &Fixture, id: u64| {
        std::fs::read(f.store().join(format!("manifests/{id:020}.manifest"))).unwrap()
    };
    assert_eq!(manifest(&roomy, 1), manifest(&fx, 1));

    // An increment: a few blocks of the second and fourth pages changed.
    let path = fx.disk("dense.img");
    let mut v2 = v1.clone();
    let mut dirty = DirtyBitmap::new(v2.len() as u64, BS as u64).unwrap();
    for b in [PAGE + 5, PAGE + 6, 3 * PAGE + 1] {
        v2[b * BS..(b + 1) * BS].fill(0x5a);
        v2[b * BS] = b as u8;
        dirty.mark((b * BS) as u64, BS as u64).unwrap();
    }
    // And one stamped block made zero.
    let z = 2 * PAGE + 1;
    v2[z * BS..(z + 1) * BS].fill(0);
    dirty.mark((z * BS) as u64, BS as u64).unwrap();
    std::fs::write(&path, &v2).unwrap();
    let inc = fx
        .engine
        .create_incremental(ServerId(1), "two", "", SnapshotId(1), dirty)
        .unwrap();
    let st = inc.stats.unwrap();
    assert_eq!(st.blocks_read, 4);
    std::fs::write(roomy.disk("dense.img"), &v2).unwrap();
    let full = roomy
        .engine
        .create_snapshot(ServerId(1), "two", "")
        .unwrap();
    assert_eq!(manifest(&roomy, full.id.0), manifest(&fx, inc.id.0));

    // Restores from manifests read out of memory, both ways.
    let careful = RestoreOptions::default().safety_snapshot(false);
    let r = fx
        .engine
        .restore_snapshot_with(SnapshotId(1), careful)
        .unwrap();
    assert_eq!(r.blocks_rewritten, 4);
    assert_eq!(std::fs::read(&path).unwrap(), v1);
    std::fs::write(&path, vec![0u8; v1.len()]).unwrap();
    fx.engine.restore_snapshot_with(inc.id, careful).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), v2);

    let report = fx.engine.verify(None).unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert!(report.chunks_checked > 3 * PAGE as u64 / 3);

    // A delete counts from the manifest out of memory: the first
    // snapshot's own chunks become garbage, the second's stay.
    fx.engine.delete_snapshot(SnapshotId(1)).unwrap();
    let gc = fx.engine.gc(false).unwrap();
    assert!(gc.bytes_reclaimed + gc.bytes_unused > 0, "{gc:?}");
    std::fs::write(&path, vec![0u8; v1.len()]).unwrap();
    fx.engine.restore_snapshot_with(inc.id, careful).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), v2);
    assert!(fx.engine.verify(None).unwrap().is_ok());
}

/// A damaged manifest whose ids stay in its file is found when read, and
/// nothing is written to the disk from it.
#[test]
fn a_damaged_manifest_out_of_memory_is_refused_before_any_write() {
    let fx = Fixture::with(tight());
    let v1 = dense_disk(2);
    let path = fx.server(1, "dense", &v1);
    fx.engine.create_snapshot(ServerId(1), "one", "").unwrap();
    let file = fx.store().join(format!("manifests/{:020}.manifest", 1));
    let mut bytes = std::fs::read(&file).unwrap();
    // A bit of an id in the third page.
    let at = bytes.len() - 4 - 32 * 900;
    bytes[at] ^= 0x10;
    std::fs::write(&file, &bytes).unwrap();
    let changed = vec![7u8; v1.len()];
    std::fs::write(&path, &changed).unwrap();
    let options = RestoreOptions::default().safety_snapshot(false);
    let err = fx
        .engine
        .restore_snapshot_with(SnapshotId(1), options)
        .unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), changed);
    let report = fx.engine.verify(None).unwrap();
    assert_eq!(report.bad_manifests.len(), 1, "{report:?}");
}

/// A scratch directory left by a process that died (verify's count of
/// every manifest) goes at the next open, and verify leaves none behind.
#[test]
fn scratch_left_by_a_crash_goes_at_the_next_open() {
    let fx = Fixture::with(tight());
    fx.server(1, "dense", &dense_disk(3));
    fx.engine.create_snapshot(ServerId(1), "one", "").unwrap();
    assert!(fx.engine.verify(None).unwrap().is_ok());
    let scratch = |store: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(store)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with(".scratch-"))
            .collect()
    };
    assert!(scratch(&fx.store()).is_empty());
    let left = fx.store().join(".scratch-left");
    std::fs::create_dir(&left).unwrap();
    std::fs::write(left.join("refs.tbl"), b"half").unwrap();
    let fx = fx.reopen(tight());
    assert!(scratch(&fx.store()).is_empty());
    assert!(fx.engine.verify(None).unwrap().is_ok());
}
