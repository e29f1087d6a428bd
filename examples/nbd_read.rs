//! Reads a whole NBD export with blocksnap's client, as a capture does
//! (16 MiB windows, each pipelined in 256 KiB requests), and prints the
//! bytes and seconds as JSON: the NBD side of bench/live.sh, beside
//! `nbdcopy` of the same export.
//!
//! `cargo run --release --example nbd_read -- URI`
use std::time::Instant;

use blocksnap::disk::Disk;
use blocksnap::nbd::NbdDisk;

fn main() -> blocksnap::Result<()> {
    let Some(uri) = std::env::args().nth(1) else {
        eprintln!("usage: nbd_read URI");
        std::process::exit(2);
    };
    let disk = NbdDisk::open(&uri, false)?;
    let len = disk.len()?;
    let mut buf = vec![0u8; 16 << 20];
    let started = Instant::now();
    let mut at = 0;
    let mut sum = 0u64;
    while at < len {
        let n = disk.read_at(&mut buf, at)?;
        sum = sum.wrapping_add(u64::from(buf[n / 2]));
        at += n as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{{\"bytes\": {len}, \"seconds\": {secs:.4}, \"check\": {sum}}}");
    Ok(())
}
