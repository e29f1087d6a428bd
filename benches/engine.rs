//! Whole-engine benchmarks with their raw baselines in the same group, so a
//! ratio is read off one run.
//!
//! - `capture_unchanged/*`: a snapshot of a disk whose every chunk is already
//!   stored (zero check + BLAKE3 + index look-up + manifest), against plain
//!   BLAKE3 of the same bytes, single-threaded per 64 KiB block, and with
//!   rayon over blocks (the same threads the capture uses).
//! - `restore_unchanged/*`: a restore onto a disk that already matches (read,
//!   compare, fsync), against the same BLAKE3 baseline.
//!
//! Data is seeded: `zero`, `text` (sample text regions) and `random`.
//!
//! Baseline workflow: `cargo bench --bench engine -- --save-baseline before`,
//! change the code, then `cargo bench --bench engine -- --baseline before`.

use std::hint::black_box;

use blocksnap::sample::synthetic;
use blocksnap::{EngineOptions, ServerId};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rayon::prelude::*;

const DISK_LEN: usize = 32 << 20;
const BLOCK: usize = 64 << 10;

fn engine_benches(c: &mut Criterion) {
    for kind in ["zero", "text", "random"] {
        let bytes = synthetic(kind, DISK_LEN);
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, &bytes).unwrap();
        let engine = EngineOptions::new().open(dir.path().join("store")).unwrap();
        engine.add_server(ServerId(1), "bench", &disk).unwrap();
        let base = engine.create_snapshot(ServerId(1), "base", "").unwrap();

        let mut g = c.benchmark_group(format!("capture_unchanged/{kind}"));
        g.throughput(Throughput::Bytes(DISK_LEN as u64));
        g.sample_size(20);
        g.bench_function("blocksnap", |b| {
            b.iter(|| {
                let s = engine.create_snapshot(ServerId(1), "again", "").unwrap();
                engine.delete_snapshot(s.id).unwrap();
            })
        });
        g.bench_function("blake3_per_block_1_thread", |b| {
            b.iter(|| {
                for blk in bytes.chunks(BLOCK) {
                    black_box(blake3::hash(blk));
                }
            })
        });
        g.bench_function("blake3_per_block_rayon", |b| {
            b.iter(|| {
                bytes.par_chunks(BLOCK).for_each(|blk| {
                    black_box(blake3::hash(blk));
                })
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("restore_unchanged/{kind}"));
        g.throughput(Throughput::Bytes(DISK_LEN as u64));
        g.sample_size(20);
        g.bench_function("blocksnap", |b| {
            b.iter(|| black_box(engine.restore_snapshot(base.id).unwrap()))
        });
        g.bench_function("blake3_per_block_rayon", |b| {
            b.iter(|| {
                bytes.par_chunks(BLOCK).for_each(|blk| {
                    black_box(blake3::hash(blk));
                })
            })
        });
        g.finish();
    }
}

criterion_group!(benches, engine_benches);
criterion_main!(benches);
