//! Times the capture pipeline over an in-memory disk, for profiling.
//! `cargo run --release --example pipeline_probe -- [MiB] [text|random|zero]`
use std::time::Instant;

use blocksnap::disk::MemDisk;
use blocksnap::hotcore::HotCore;
use blocksnap::sample::synthetic;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(512);
    let kind = args.get(2).map(String::as_str).unwrap_or("text");
    let v = synthetic(kind, mib << 20);
    let dir = tempfile::tempdir().unwrap();
    let core = HotCore::open(
        &dir.path().join("packs"),
        64 << 10,
        blocksnap::DEFAULT_COMPRESSION_LEVEL,
    )
    .unwrap();
    let disk = MemDisk::new(v);
    for round in 0..3 {
        let t = Instant::now();
        let (_, stats) = core.capture(&disk).unwrap();
        let s = t.elapsed().as_secs_f64();
        println!(
            "round {round}: {:.3} s, {:.2} GiB/s, new chunks {}",
            s,
            (mib as f64 / 1024.0) / s,
            stats.new_chunks
        );
    }
}
