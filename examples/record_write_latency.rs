//! How long a guest write waits in `Engine::record_write` while another
//! thread loops capture, delete and GC on the same server.
//!
//! `record_write_latency [SECONDS [MIB]]` (default 20 s, a 512 MiB disk):
//! reports a 4 KiB write at a random offset every 200 µs and prints the
//! latency percentiles and the background loop's count, one line of JSON.
//! `bench/record_write.sh` runs it and fills docs/BENCHMARKS.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blocksnap::{EngineOptions, ServerId};

const WRITE_LEN: u64 = 4096;
const INTERVAL: Duration = Duration::from_micros(200);

fn main() -> blocksnap::Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let seconds = args.first().copied().unwrap_or(20);
    let disk_len = args.get(1).copied().unwrap_or(512) << 20;
    let dir = tempfile::tempdir().map_err(|e| blocksnap::Error::io("tempdir", e))?;
    let disk = dir.path().join("disk.img");
    blocksnap::sample::write_image(&disk, disk_len, 7)
        .map_err(|e| blocksnap::Error::io(&disk, e))?;
    let engine = EngineOptions::new()
        .change_tracking(true)
        .open(dir.path().join("store"))?;
    let server = ServerId(1);
    engine.add_server(server, "guest", &disk)?;
    engine.create_snapshot(server, "base", "")?;

    let stop = Arc::new(AtomicBool::new(false));
    let loops = Arc::new(AtomicU64::new(0));
    let background = {
        let (engine, stop, loops) = (engine.clone(), stop.clone(), loops.clone());
        std::thread::spawn(move || -> blocksnap::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let snaps = engine.snapshots(Some(server))?;
                if snaps.len() >= 4
                    && let Some(oldest) = snaps.last()
                {
                    engine.delete_snapshot(oldest.id)?;
                }
                engine.create_snapshot(server, "loop", "")?;
                engine.gc(false)?;
                loops.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };

    // BLOCKSNAP_RT=1: the reporting thread runs SCHED_FIFO, as a vCPU
    // thread may, so that its figures show waits on the engine rather
    // than the scheduler giving both cores to the capture.
    if std::env::var("BLOCKSNAP_RT").is_ok_and(|v| v == "1") {
        let param = libc::sched_param { sched_priority: 10 };
        // SAFETY: plain syscall on the calling thread with a valid param.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
        if rc != 0 {
            eprintln!("SCHED_FIFO refused: {}", std::io::Error::last_os_error());
        }
    }
    let mut rng = blocksnap::sample::Rng::new(42);
    let mut nanos: Vec<u64> = Vec::new();
    // The control: an atomic add timed the same way in the same loop. What
    // it shows above its own cost is the machine (interrupts, other
    // tenants), not the engine.
    let control_cell = AtomicU64::new(0);
    let mut control: Vec<u64> = Vec::new();
    let started = Instant::now();
    let mut next = started;
    while started.elapsed() < Duration::from_secs(seconds) {
        next += INTERVAL;
        let offset = rng.below(disk_len / WRITE_LEN) * WRITE_LEN;
        let t = Instant::now();
        std::hint::black_box(control_cell.fetch_add(1, Ordering::SeqCst));
        control.push(t.elapsed().as_nanos() as u64);
        let t = Instant::now();
        engine.record_write(server, offset, WRITE_LEN)?;
        nanos.push(t.elapsed().as_nanos() as u64);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    stop.store(true, Ordering::Relaxed);
    background
        .join()
        .map_err(|_| blocksnap::Error::Internal("the background loop panicked".into()))??;

    nanos.sort_unstable();
    control.sort_unstable();
    let at = |v: &[u64], q: f64| v[((v.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    println!(
        "{{\"writes\": {}, \"p50_us\": {:.2}, \"p99_us\": {:.2}, \"p999_us\": {:.2}, \"max_us\": {:.2}, \"control_p999_us\": {:.2}, \"control_max_us\": {:.2}, \"background_loops\": {}, \"disk_mib\": {}, \"seconds\": {}}}",
        nanos.len(),
        at(&nanos, 0.5),
        at(&nanos, 0.99),
        at(&nanos, 0.999),
        at(&nanos, 1.0),
        at(&control, 0.999),
        at(&control, 1.0),
        loops.load(Ordering::Relaxed),
        disk_len >> 20,
        seconds
    );
    Ok(())
}
