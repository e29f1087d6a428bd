//! The hot core against its raw baselines, in the same group so each ratio
//! is read off one run (STYLE.md, issue #4):
//!
//! 1. `known/*`: zero check + BLAKE3 + index look-up of blocks the store
//!    already holds, against plain BLAKE3 of the same blocks, both with
//!    rayon over 64 KiB blocks on the same pool.
//! 2. `new/*`: storing new data (hash + zstd + framing + append to a pack),
//!    against plain per-block zstd at the same level plus BLAKE3.
//! 3. `restore/*`: reading, checking and decompressing chunks and writing
//!    them to a file, against plain per-block decompression plus the same
//!    writes.
//!
//! Seeded data of three kinds, 64 MiB each: `zero`, `text` (the sample
//! generator's text regions) and `random`. Nothing is fsynced on either
//! side. Baseline workflow: `cargo bench --bench hotcore -- --save-baseline
//! main`, change, then `cargo bench --bench hotcore -- --baseline main`.

use std::cell::RefCell;
use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;

use blocksnap::disk::{FileDisk, MemDisk};
use blocksnap::hotcore::HotCore;
use blocksnap::sample::synthetic;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rayon::prelude::*;

const LEN: usize = 64 << 20;
const BLOCK: usize = 64 << 10;

thread_local! {
    static ZC: RefCell<zstd::bulk::Compressor<'static>> =
        RefCell::new(zstd::bulk::Compressor::new(blocksnap::Compression::default().level()).unwrap());
    static ZD: RefCell<zstd::bulk::Decompressor<'static>> =
        RefCell::new(zstd::bulk::Decompressor::new().unwrap());
}

fn blake3_rayon(bytes: &[u8]) {
    bytes.par_chunks(BLOCK).for_each(|b| {
        black_box(blake3::hash(b));
    });
}

fn hotcore(c: &mut Criterion) {
    for kind in ["zero", "text", "random"] {
        let bytes = synthetic(kind, LEN);
        let dir = tempfile::tempdir().unwrap();
        let core = HotCore::open(
            &dir.path().join("packs"),
            BLOCK as u32,
            blocksnap::Compression::default().level(),
        )
        .unwrap();
        let disk = MemDisk::new(bytes.clone());
        let (blocks, _) = core.capture(&disk).unwrap();

        let mut g = c.benchmark_group(format!("known/{kind}"));
        g.throughput(Throughput::Bytes(LEN as u64));
        g.sample_size(20);
        g.bench_function("blocksnap", |b| {
            b.iter(|| black_box(core.ingest(&bytes).unwrap()))
        });
        g.bench_function("blocksnap_pipeline", |b| {
            b.iter(|| black_box(core.capture(&disk).unwrap()))
        });
        g.bench_function("blake3", |b| b.iter(|| blake3_rayon(&bytes)));
        g.finish();

        let mut g = c.benchmark_group(format!("new/{kind}"));
        g.throughput(Throughput::Bytes(LEN as u64));
        g.sample_size(10);
        g.bench_function("blocksnap", |b| {
            b.iter_batched(
                || {
                    let d = tempfile::tempdir().unwrap();
                    let core = HotCore::open(
                        &d.path().join("packs"),
                        BLOCK as u32,
                        blocksnap::Compression::default().level(),
                    )
                    .unwrap();
                    (d, core)
                },
                |(d, core)| {
                    black_box(core.capture(&disk).unwrap());
                    (d, core)
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("zstd+blake3", |b| {
            b.iter(|| {
                bytes.par_chunks(BLOCK).for_each(|blk| {
                    black_box(blake3::hash(blk));
                    ZC.with(|z| black_box(z.borrow_mut().compress(blk).unwrap()));
                })
            })
        });
        g.finish();

        let compressed: Vec<Vec<u8>> = bytes
            .par_chunks(BLOCK)
            .map(|blk| ZC.with(|z| z.borrow_mut().compress(blk).unwrap()))
            .collect();
        let out_path = dir.path().join("out.img");
        let mut g = c.benchmark_group(format!("restore/{kind}"));
        g.throughput(Throughput::Bytes(LEN as u64));
        g.sample_size(20);
        g.bench_function("blocksnap", |b| {
            let disk = FileDisk::open(&out_path, true).unwrap();
            b.iter(|| black_box(core.restore(blocks.clone(), LEN as u64, &disk).unwrap()))
        });
        g.bench_function("zstd_d+write", |b| {
            let out = File::options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&out_path)
                .unwrap();
            b.iter(|| {
                for (k, batch) in compressed.chunks(256).enumerate() {
                    let plain: Vec<Vec<u8>> = batch
                        .par_iter()
                        .map(|z| ZD.with(|d| d.borrow_mut().decompress(z, BLOCK).unwrap()))
                        .collect();
                    let mut buf = Vec::with_capacity(plain.len() * BLOCK);
                    plain.iter().for_each(|p| buf.extend_from_slice(p));
                    out.write_all_at(&buf, (k * 256 * BLOCK) as u64).unwrap();
                }
            })
        });
        g.finish();
    }
}

criterion_group!(benches, hotcore);
criterion_main!(benches);
