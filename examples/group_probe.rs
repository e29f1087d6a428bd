//! Measures what compressing runs of consecutive data blocks together (one
//! zstd frame per group) would store, against one frame per block: the
//! evidence for the `compact` setting (docs/BENCHMARKS.md). One reused
//! compression context per thread, as the capture pipeline has.
//! `cargo run --release --example group_probe -- IMAGE [LEVEL...]`
use std::time::Instant;

use rayon::prelude::*;

const BLOCK: usize = 64 << 10;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let image = std::fs::read(&args[1]).expect("an image file");
    let levels: Vec<i32> = args[2..].iter().filter_map(|l| l.parse().ok()).collect();
    let data: Vec<&[u8]> = image
        .chunks(BLOCK)
        .filter(|b| b.iter().any(|&x| x != 0))
        .collect();
    let raw: usize = data.iter().map(|b| b.len()).sum();
    println!("{:.1} MiB of data blocks", raw as f64 / f64::from(1 << 20));
    for &level in if levels.is_empty() {
        &[3][..]
    } else {
        &levels[..]
    } {
        for group in [16usize, 32, 64] {
            let t = Instant::now();
            let stored: usize = data
                .par_chunks(group)
                .map_init(
                    || {
                        let c = zstd::bulk::Compressor::new(level).expect("zstd");
                        (
                            c,
                            Vec::with_capacity(group * BLOCK),
                            vec![0u8; group * BLOCK + 4096],
                        )
                    },
                    |(c, joined, out), g| {
                        joined.clear();
                        for b in g {
                            joined.extend_from_slice(b);
                        }
                        c.compress_to_buffer(joined, out)
                            .unwrap_or(joined.len())
                            .min(joined.len())
                    },
                )
                .sum();
            println!(
                "level {level:>3}, {group:>2} blocks per frame: {:.1} MiB in {:.2} s",
                stored as f64 / f64::from(1 << 20),
                t.elapsed().as_secs_f64()
            );
        }
    }
}
