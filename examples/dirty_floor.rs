//! The physical floors that incremental capture and delta restore are
//! measured against (bench/incremental.sh, docs/BENCHMARKS.md), on the
//! blocks a dirty bitmap marks (64 KiB blocks, bit k of byte b = block
//! 8b+k), with rayon over both cores:
//!
//! `dirty_floor capture IMAGE BITMAP LEVEL`: BLAKE3 and zstd of the marked
//! blocks alone (read into memory first, untimed), then the same with the
//! positioned reads from the page cache included.
//!
//! `dirty_floor restore SOURCE BITMAP TARGET LEVEL`: the marked blocks of
//! SOURCE compressed in memory (untimed), then decompressed and written
//! into TARGET at their offsets, then fsynced.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use rayon::prelude::*;

const BLOCK: usize = 64 << 10;

fn marked(bitmap: &[u8]) -> Vec<usize> {
    (0..bitmap.len() * 8)
        .filter(|&i| bitmap[i / 8] & (1 << (i % 8)) != 0)
        .collect()
}

fn read_block(f: &File, i: usize) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK];
    let n = f.read_at(&mut buf, (i * BLOCK) as u64).expect("read");
    buf.truncate(n);
    buf
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage =
        "usage: dirty_floor capture IMAGE BITMAP LEVEL | restore SOURCE BITMAP TARGET LEVEL";
    let mode = args.get(1).expect(usage);
    let image = File::open(args.get(2).expect(usage)).expect("an image");
    let blocks = marked(&std::fs::read(args.get(3).expect(usage)).expect("a bitmap"));
    let level: i32 = args.last().and_then(|l| l.parse().ok()).unwrap_or(1);
    match mode.as_str() {
        "capture" => {
            let data: Vec<Vec<u8>> = blocks.iter().map(|&i| read_block(&image, i)).collect();
            let t = Instant::now();
            let stored: usize = data
                .par_iter()
                .map(|b| {
                    std::hint::black_box(blake3::hash(b));
                    zstd::bulk::compress(b, level).expect("zstd").len()
                })
                .sum();
            let hash_zstd = t.elapsed().as_secs_f64();
            let t = Instant::now();
            blocks.par_iter().for_each(|&i| {
                let b = read_block(&image, i);
                std::hint::black_box(blake3::hash(&b));
                std::hint::black_box(zstd::bulk::compress(&b, level).expect("zstd"));
            });
            let read_hash_zstd = t.elapsed().as_secs_f64();
            println!(
                "{} blocks: hash+zstd {hash_zstd:.4} s, read+hash+zstd {read_hash_zstd:.4} s, {stored} bytes compressed",
                blocks.len()
            );
        }
        "restore" => {
            let target = File::options()
                .write(true)
                .open(args.get(4).expect(usage))
                .expect("a target");
            let compressed: Vec<(usize, Vec<u8>)> = blocks
                .par_iter()
                .map(|&i| {
                    let b = read_block(&image, i);
                    (i, zstd::bulk::compress(&b, level).expect("zstd"))
                })
                .collect();
            let t = Instant::now();
            compressed.par_iter().for_each(|(i, z)| {
                let plain = zstd::bulk::decompress(z, BLOCK).expect("zstd");
                target
                    .write_all_at(&plain, (i * BLOCK) as u64)
                    .expect("write");
            });
            let write = t.elapsed().as_secs_f64();
            target.sync_all().expect("fsync");
            let with_sync = t.elapsed().as_secs_f64();
            println!(
                "{} blocks: zstd -d + write {write:.4} s, with fsync {with_sync:.4} s",
                blocks.len()
            );
        }
        _ => panic!("{usage}"),
    }
}
