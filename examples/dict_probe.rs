//! Measures per-block compression with a zstd dictionary trained on a sample
//! of the image's own data blocks, against per-block frames without one.
//! `cargo run --release --example dict_probe -- IMAGE LEVEL [DICT_KIB] [EVERY]`
use std::time::Instant;

use rayon::prelude::*;

const BLOCK: usize = 64 << 10;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let image = std::fs::read(&args[1]).expect("an image file");
    let level: i32 = args.get(2).and_then(|l| l.parse().ok()).unwrap_or(3);
    let dict_kib: usize = args.get(3).and_then(|l| l.parse().ok()).unwrap_or(112);
    let every: usize = args.get(4).and_then(|l| l.parse().ok()).unwrap_or(64);
    let data: Vec<&[u8]> = image
        .chunks(BLOCK)
        .filter(|b| b.iter().any(|&x| x != 0))
        .collect();
    let t = Instant::now();
    let samples: Vec<&[u8]> = data
        .iter()
        .step_by(every)
        .flat_map(|b| b.chunks(4096))
        .collect();
    let sample_bytes: usize = samples.iter().map(|s| s.len()).sum();
    let dict = zstd::dict::from_samples(&samples, dict_kib << 10).expect("train");
    println!(
        "trained {} KiB from {:.1} MiB in {:.2} s",
        dict.len() >> 10,
        sample_bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    for with in [false, true] {
        let t = Instant::now();
        let stored: usize = data
            .par_iter()
            .map_init(
                || {
                    let c = if with {
                        zstd::bulk::Compressor::with_dictionary(level, &dict).expect("zstd")
                    } else {
                        zstd::bulk::Compressor::new(level).expect("zstd")
                    };
                    (c, vec![0u8; BLOCK + 4096])
                },
                |(c, out), b| c.compress_to_buffer(b, out).unwrap_or(b.len()).min(b.len()),
            )
            .sum();
        println!(
            "level {level}, dictionary {with}: {:.1} MiB in {:.2} s",
            stored as f64 / 1048576.0,
            t.elapsed().as_secs_f64()
        );
    }
}
