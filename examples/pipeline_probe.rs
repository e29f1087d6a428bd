//! Times the capture pipeline over a disk held in memory, for profiling.
//!
//! `cargo run --release --example pipeline_probe -- SOURCE [LEVEL]` where
//! SOURCE is `MiB:text`, `MiB:random`, `MiB:zero` (synthetic data) or the
//! path of an image file; LEVEL is the zstd level (default: the store's).
//! Prints three rounds: the first stores every chunk, the next find them all.
use std::time::Instant;

use blocksnap::disk::MemDisk;
use blocksnap::hotcore::HotCore;
use blocksnap::sample::synthetic;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let source = args.get(1).map(String::as_str).unwrap_or("512:text");
    let level: i32 = args
        .get(2)
        .and_then(|l| l.parse().ok())
        .unwrap_or(blocksnap::Compression::default().level());
    let bytes = match source.split_once(':') {
        Some((mib, kind)) => synthetic(kind, mib.parse::<usize>().unwrap_or(512) << 20),
        None => std::fs::read(source).unwrap_or_else(|e| panic!("{source}: {e}")),
    };
    let len = bytes.len() as f64;
    let dir = tempfile::tempdir().unwrap();
    let core = HotCore::open(&dir.path().join("packs"), 64 << 10, level).unwrap();
    let disk = MemDisk::new(bytes);
    for round in 0..3 {
        let t = Instant::now();
        let (_, stats) = core.capture(&disk).unwrap();
        let s = t.elapsed().as_secs_f64();
        println!(
            "round {round}: {s:.3} s, {:.2} GiB/s, new chunks {}, stored {:.1} MiB",
            len / s / f64::from(1 << 30),
            stats.new_chunks,
            stats.new_stored_bytes as f64 / f64::from(1 << 20)
        );
    }
}
