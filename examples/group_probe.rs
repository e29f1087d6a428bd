//! Measures what compressing runs of consecutive data blocks together (one
//! zstd frame per group) would store, against one frame per block: the
//! evidence for the `compact` setting's next step (docs/BENCHMARKS.md).
//! `cargo run --release --example group_probe -- IMAGE [LEVEL]`
use std::time::Instant;

use rayon::prelude::*;

const BLOCK: usize = 64 << 10;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let image = std::fs::read(&args[1]).expect("an image file");
    let level: i32 = args.get(2).and_then(|l| l.parse().ok()).unwrap_or(3);
    let data: Vec<&[u8]> = image
        .chunks(BLOCK)
        .filter(|b| b.iter().any(|&x| x != 0))
        .collect();
    for group in [1usize, 4, 16, 32] {
        let t = Instant::now();
        let stored: usize = data
            .par_chunks(group)
            .map(|g| {
                let joined = g.concat();
                zstd::bulk::compress(&joined, level)
                    .expect("zstd")
                    .len()
                    .min(joined.len())
            })
            .sum();
        println!(
            "level {level}, {group:>2} blocks per frame: {:.1} MiB in {:.2} s",
            stored as f64 / f64::from(1 << 20),
            t.elapsed().as_secs_f64()
        );
    }
}
