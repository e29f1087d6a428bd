//! A guest for the live-snapshot benchmark (bench/live.sh): writes blocks
//! of random bytes (4 KiB, or `BLOCK`) at random aligned offsets of an NBD
//! export, one at a time, `RATE` a second, until stdin closes or `BYTES`
//! (when given) were written; then
//! prints, as JSON, how many writes it made and the largest gap between
//! two consecutive write completions (what a guest would feel of a
//! freeze).
//!
//! `cargo run --release --example live_guest -- URI RATE [BYTES [BLOCK]]`
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blocksnap::disk::Disk;
use blocksnap::nbd::NbdDisk;

fn main() -> blocksnap::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(uri), Some(rate)) = (args.get(1), args.get(2).and_then(|r| r.parse::<u64>().ok()))
    else {
        eprintln!("usage: live_guest URI WRITES_PER_SECOND [BYTES [BLOCK]]");
        std::process::exit(2);
    };
    let limit: Option<u64> = args.get(3).and_then(|b| b.parse().ok());
    let block_len: u64 = args.get(4).and_then(|b| b.parse().ok()).unwrap_or(4096);
    let disk = NbdDisk::open(uri, true)?;
    let len = disk.len()?;
    let done = Arc::new(AtomicBool::new(false));
    if limit.is_none() {
        let flag = done.clone();
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            flag.store(true, Ordering::Relaxed);
        });
    }
    let mut rng = blocksnap::sample::Rng::new(7);
    let period = Duration::from_micros(1_000_000 / rate.max(1));
    let (mut writes, mut max_gap) = (0u64, Duration::ZERO);
    let mut last = Instant::now();
    let mut block = vec![0u8; block_len as usize];
    while !done.load(Ordering::Relaxed) && limit.is_none_or(|l| writes * block_len < l) {
        rng.fill(&mut block);
        let at = rng.next_u64() % (len / block_len) * block_len;
        disk.write_at(&block, at)?;
        writes += 1;
        let now = Instant::now();
        max_gap = max_gap.max(now - last);
        last = now;
        std::thread::sleep(period.saturating_sub(now.elapsed()));
    }
    disk.sync()?;
    println!(
        "{{\"writes\": {writes}, \"max_gap_ms\": {:.3}}}",
        max_gap.as_secs_f64() * 1e3
    );
    Ok(())
}
