//! Incremental capture and delta restore against their physical floors, in
//! the same group so each ratio is read off one run (issue #5):
//!
//! - `incremental/{scattered,runs}`: capturing a disk whose dirty bitmap
//!   marks the changed blocks (read, hash, compress, frame and append only
//!   those; the rest taken from the parent), against hashing and
//!   compressing the dirty blocks alone (BLAKE3 + zstd at the same level,
//!   rayon over the same pool);
//! - `delta_restore/{scattered,runs}`: restoring the first version onto
//!   the second from known state (no disk read), against decompressing and
//!   writing the differing blocks alone.
//!
//! The disk: 256 MiB of the sample generator's mixed content. Its second
//! version has 1% of its bytes rewritten, either by scattered 4 KiB writes
//! (`scattered`, about 15% of 64 KiB blocks dirty) or in runs of 1 MiB
//! (`runs`, file rewrites). Throughput is the dirty bytes. Nothing is
//! fsynced on either side.

use std::cell::RefCell;
use std::fs::File;
use std::hint::black_box;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use blocksnap::DirtyBitmap;
use blocksnap::disk::{FileDisk, MemDisk};
use blocksnap::hotcore::HotCore;
use blocksnap::sample::{Rng, fill_region};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rayon::prelude::*;

const LEN: usize = 256 << 20;
const BLOCK: usize = 64 << 10;

thread_local! {
    static ZC: RefCell<zstd::bulk::Compressor<'static>> =
        RefCell::new(zstd::bulk::Compressor::new(blocksnap::Compression::default().level()).unwrap());
    static ZD: RefCell<zstd::bulk::Decompressor<'static>> =
        RefCell::new(zstd::bulk::Decompressor::new().unwrap());
}

fn core(dir: &tempfile::TempDir) -> HotCore {
    HotCore::open(
        &dir.path().join("packs"),
        BLOCK as u32,
        blocksnap::Compression::default().level(),
    )
    .unwrap()
}

/// v2 of `v1` with 1% of its bytes rewritten in writes of `write_len`,
/// and the bitmap of the blocks those writes touched.
fn second_version(v1: &[u8], write_len: usize, seed: u64) -> (Vec<u8>, DirtyBitmap) {
    let mut v2 = v1.to_vec();
    let mut rng = Rng::new(seed);
    let mut dirty = DirtyBitmap::new(LEN as u64, BLOCK as u64).unwrap();
    for _ in 0..LEN / 100 / write_len {
        let at = rng.below(((LEN - write_len) / 4096) as u64) as usize * 4096;
        rng.fill(&mut v2[at..at + write_len]);
        dirty.mark(at as u64, write_len as u64).unwrap();
    }
    (v2, dirty)
}

fn blocks_of(runs: &[Range<u64>]) -> Vec<usize> {
    runs.iter()
        .flat_map(|r| r.clone())
        .map(|b| b as usize)
        .collect()
}

fn incremental(c: &mut Criterion) {
    let mut v1 = vec![0u8; LEN];
    for (r, chunk) in v1.chunks_mut(1 << 20).enumerate() {
        fill_region(5, r as u64, chunk);
    }
    for (name, write_len) in [("scattered", 4096), ("runs", 1 << 20)] {
        let (v2, dirty) = second_version(&v1, write_len, 7);
        let runs = dirty.block_runs(BLOCK as u32).unwrap();
        let dirty_blocks = blocks_of(&runs);
        let dirty_bytes = (dirty_blocks.len() * BLOCK) as u64;
        let dir = tempfile::tempdir().unwrap();
        let store = core(&dir);
        let (m1, _) = store.capture(&MemDisk::new(v1.clone())).unwrap();
        let disk2 = MemDisk::new(v2.clone());

        let mut g = c.benchmark_group(format!("incremental/{name}"));
        g.throughput(Throughput::Bytes(dirty_bytes));
        g.sample_size(20);
        g.bench_function("blocksnap", |b| {
            b.iter_batched(
                || {
                    // A fresh store: every dirty block is new to it.
                    let d = tempfile::tempdir().unwrap();
                    let fresh = core(&d);
                    (d, fresh)
                },
                |(d, fresh)| {
                    black_box(fresh.capture_incremental(&disk2, &m1, &runs).unwrap());
                    (d, fresh)
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("hash+zstd_of_dirty_blocks", |b| {
            b.iter(|| {
                dirty_blocks.par_iter().for_each(|&k| {
                    let blk = &v2[k * BLOCK..(k + 1) * BLOCK];
                    black_box(blake3::hash(blk));
                    ZC.with(|z| black_box(z.borrow_mut().compress(blk).unwrap()));
                })
            })
        });
        g.finish();

        // Delta restore of v1 onto a disk holding v2, known as such.
        let (m2, _) = store.capture_incremental(&disk2, &m1, &runs).unwrap();
        let differing: Vec<usize> = (0..m1.len() as usize)
            .filter(|&k| m1.get(k as u64).ok() != m2.get(k as u64).ok())
            .collect();
        let out_path = dir.path().join("disk.img");
        std::fs::write(&out_path, &v2).unwrap();
        let mut g = c.benchmark_group(format!("delta_restore/{name}"));
        g.throughput(Throughput::Bytes((differing.len() * BLOCK) as u64));
        g.sample_size(20);
        g.bench_function("blocksnap", |b| {
            let disk = FileDisk::open(&out_path, true).unwrap();
            b.iter(|| {
                let n = store
                    .restore_delta(m2.clone(), &[], m1.clone(), LEN as u64, &disk)
                    .unwrap();
                assert_eq!(n as usize, differing.len());
            })
        });
        let compressed: Vec<(usize, Vec<u8>)> = differing
            .par_iter()
            .map(|&k| {
                let blk = &v1[k * BLOCK..(k + 1) * BLOCK];
                (k, ZC.with(|z| z.borrow_mut().compress(blk).unwrap()))
            })
            .collect();
        g.bench_function("zstd_d+write_of_differing_blocks", |b| {
            let out = File::options().write(true).open(&out_path).unwrap();
            b.iter(|| {
                compressed.par_iter().for_each(|(k, z)| {
                    let plain = ZD.with(|d| d.borrow_mut().decompress(z, BLOCK).unwrap());
                    out.write_all_at(&plain, (k * BLOCK) as u64).unwrap();
                })
            })
        });
        g.finish();
    }
}

criterion_group!(benches, incremental);
criterion_main!(benches);
