//! Capture then restore gives back the exact bytes.

use blocksnap::{EngineOptions, ServerId, SnapshotStatus};

use crate::common::{BS, Fixture, disk_bytes, random_bytes};

/// Captures `bytes`, scribbles over the disk, restores, and checks.
fn round_trip(fx: &Fixture, id: u64, bytes: &[u8]) {
    let path = fx.server(id, &format!("srv{id}"), bytes);
    let snap = fx.engine.create_snapshot(ServerId(id), "rt", "").unwrap();
    assert_eq!(snap.status, SnapshotStatus::Completed);
    // Different content and a different length.
    std::fs::write(&path, random_bytes(bytes.len() / 2 + 3 * BS + 17, id)).unwrap();
    fx.engine.restore_snapshot(snap.id).unwrap();
    let back = std::fs::read(&path).unwrap();
    assert_eq!(back.len(), bytes.len());
    assert!(back == bytes, "restored bytes differ");
}

#[test]
fn image_with_zero_regions_round_trips() {
    let fx = Fixture::new();
    let mut bytes = disk_bytes(300 * BS, 1);
    bytes[10 * BS..40 * BS].fill(0);
    round_trip(&fx, 1, &bytes);
}

#[test]
fn image_not_a_multiple_of_the_block_size_round_trips() {
    let fx = Fixture::new();
    round_trip(&fx, 1, &disk_bytes(37 * BS + 1234, 2));
    // A last partial block that is all zero, and one that is one byte.
    let mut bytes = disk_bytes(5 * BS + 100, 3);
    bytes[5 * BS..].fill(0);
    round_trip(&fx, 2, &bytes);
    round_trip(&fx, 3, &disk_bytes(BS + 1, 4));
}

#[test]
fn empty_image_round_trips() {
    let fx = Fixture::new();
    let path = fx.server(1, "empty", &[]);
    let snap = fx.engine.create_snapshot(ServerId(1), "empty", "").unwrap();
    assert_eq!(snap.size_mb, Some(0));
    std::fs::write(&path, b"not empty any more").unwrap();
    let r = fx.engine.restore_snapshot(snap.id).unwrap();
    assert_eq!(r.blocks_total, 0);
    assert_eq!(std::fs::read(&path).unwrap(), Vec::<u8>::new());
}

#[test]
fn image_larger_than_the_capture_window_round_trips() {
    // Windows of 64 KiB over a 2.5 MiB image: 40 windows.
    let fx = Fixture::with(
        EngineOptions::new()
            .block_size(BS as u32)
            .window_len(64 << 10),
    );
    round_trip(&fx, 1, &disk_bytes(640 * BS + 99, 5));
}

/// The compact setting's group records: every kind of block, a short last
/// block, repeats within and across windows, each block size, and a second
/// snapshot that shares most of its chunks.
#[test]
fn grouped_frames_round_trip_and_verify() {
    for shift in [12u32, 16] {
        let bs = 1u32 << shift;
        let fx = Fixture::with(
            EngineOptions::new()
                .block_size(bs)
                .window_len(16 * bs as usize)
                .compression(blocksnap::Compression::Grouped {
                    level: 3,
                    group_len: 8 * bs,
                }),
        );
        let len = 100 * bs as usize + 555;
        let mut bytes = disk_bytes(len, u64::from(shift));
        // The same block three times, in different windows.
        let b = bs as usize;
        let first = bytes[b..2 * b].to_vec();
        bytes[40 * b..41 * b].copy_from_slice(&first);
        bytes[41 * b..42 * b].copy_from_slice(&first);
        round_trip(&fx, 1, &bytes);
        let mut changed = bytes.clone();
        changed[7 * b..30 * b].copy_from_slice(&disk_bytes(23 * b, 99));
        round_trip(&fx, 2, &changed);
        let report = fx.engine.verify(None).unwrap();
        assert!(report.is_ok() && report.chunks_checked > 0, "{report:?}");
        let stats = fx.engine.stats().unwrap();
        assert_eq!(stats.reclaimable_bytes, 0, "{stats:?}");
    }
}

#[test]
fn every_block_size_round_trips() {
    for shift in [12, 16, 20, 22] {
        let bs = 1u32 << shift;
        let fx = Fixture::with(EngineOptions::new().block_size(bs));
        let len = (bs as usize) * 3 + 777;
        round_trip(&fx, 1, &disk_bytes(len, shift));
    }
}

#[test]
fn a_deleted_image_file_is_brought_back() {
    let fx = Fixture::new();
    let bytes = disk_bytes(20 * BS, 6);
    let path = fx.server(1, "gone", &bytes);
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    std::fs::remove_file(&path).unwrap();
    fx.engine.restore_snapshot(snap.id).unwrap();
    assert!(std::fs::read(&path).unwrap() == bytes);
}

#[test]
fn identical_disks_are_stored_once() {
    let fx = Fixture::new();
    let bytes = random_bytes(256 * BS, 7);
    fx.server(1, "a", &bytes);
    fx.server(2, "b", &bytes);
    let first = fx.engine.create_snapshot(ServerId(1), "a1", "").unwrap();
    let after_one = crate::common::packs_bytes(&fx.store());
    let second = fx.engine.create_snapshot(ServerId(2), "b1", "").unwrap();
    let after_two = crate::common::packs_bytes(&fx.store());
    assert!(
        after_one >= bytes.len() as u64,
        "random data does not compress"
    );
    assert_eq!(second.stats.unwrap().new_chunks, 0);
    // Growth by the second server: about nothing, certainly not a disk.
    assert!(
        after_two - after_one < (bytes.len() / 100) as u64,
        "store grew by {} for an identical disk",
        after_two - after_one
    );
    assert_eq!(first.size_mb, second.size_mb);
}

#[test]
fn a_second_snapshot_of_an_unchanged_disk_stores_no_new_chunks() {
    let fx = Fixture::new();
    fx.server(1, "web", &disk_bytes(200 * BS, 8));
    let a = fx.engine.create_snapshot(ServerId(1), "a", "").unwrap();
    let chunks = fx.engine.chunk_count();
    let b = fx.engine.create_snapshot(ServerId(1), "b", "").unwrap();
    assert!(a.stats.unwrap().new_chunks > 0);
    assert_eq!(b.stats.unwrap().new_chunks, 0);
    assert_eq!(b.stats.unwrap().new_stored_bytes, 0);
    assert_eq!(fx.engine.chunk_count(), chunks);
}

#[test]
fn size_mb_counts_non_zero_data() {
    let fx = Fixture::with(EngineOptions::new().block_size(64 << 10));
    let mut bytes = vec![0u8; 8 << 20];
    bytes[..(3 << 20) + 1].fill(1);
    fx.server(1, "web", &bytes);
    let s = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    // 3 MiB + one more 64 KiB block, rounded up to whole MiB.
    assert_eq!(s.size_mb, Some(4));
    let st = s.stats.unwrap();
    assert_eq!(st.data_bytes, (3 << 20) + (64 << 10));
    assert_eq!(st.data_blocks, 49);
    assert_eq!(st.zero_blocks, 128 - 49);
}

/// Each group record is appended once: the packs hold the new chunks'
/// compressed bytes once, with their framing, and no more.
#[test]
fn a_grouped_capture_stores_each_group_once() {
    let bs = 4096u32;
    let fx = Fixture::with(EngineOptions::new().block_size(bs).compression(
        blocksnap::Compression::Grouped {
            level: 3,
            group_len: 32 * bs,
        },
    ));
    // Half random, half zeros: all distinct, compressing about 2:1.
    let mut bytes = Vec::new();
    for i in 0..256u64 {
        let mut block = random_bytes(bs as usize / 2, i);
        block.resize(bs as usize, 0);
        bytes.extend_from_slice(&block);
    }
    fx.server(1, "web", &bytes);
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    let st = snap.stats.unwrap();
    assert_eq!(st.new_chunks, 256);
    let packs = crate::common::packs_bytes(&fx.store());
    assert!(
        st.new_stored_bytes < st.new_raw_bytes * 6 / 10 && packs < st.new_stored_bytes + 64 * 1024,
        "{} raw bytes stored as {}, packs {packs} bytes",
        st.new_raw_bytes,
        st.new_stored_bytes
    );
}
