//! `blocksnap demo`: the whole cycle on a sample disk in a temporary store.
//! Exits 0 only if the restored disk is byte-identical to the original.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use blocksnap::sample::{self, Rng};
use blocksnap::{EngineOptions, Error, ServerId};

use super::ProgressBar;
use super::output::{capture_summary, human_bytes};

/// Seed of the demo's sample image.
const SEED: u64 = 2026;
/// Bytes per scattered write when the demo changes the disk.
const WRITE_LEN: u64 = 4096;
/// Share of the image the scattered writes cover, in percent.
const CHANGED_PERCENT: u64 = 1;

pub fn run(size: u64) -> blocksnap::Result<i32> {
    if size == 0 {
        return Err(Error::InvalidParameter("--size must be more than 0".into()));
    }
    let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let image = tmp.path().join("web-01.img");
    let store_dir = tmp.path().join("store");
    println!("blocksnap demo in {}", tmp.path().display());

    let t = Instant::now();
    sample::write_image(&image, size, SEED).map_err(|e| Error::io(&image, e))?;
    println!(
        "  wrote a {} sample disk (text, random runs, zero regions, repeats) in {:.2} s",
        human_bytes(size),
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let original = hash_file(&image)?;
    let hash_secs = t.elapsed().as_secs_f64();

    // The demo plays the hypervisor agent: it reports the guest's writes,
    // so the second snapshot reads only the blocks they touched and the
    // restore rewrites only those, without reading the disk.
    let engine = EngineOptions::new()
        .change_tracking(true)
        .open(&store_dir)?;
    let server = ServerId(1);
    engine.add_server(server, "web-01", &image)?;

    let first = capture(&engine, server, "base")?;
    let changed = scatter_writes(&image, size, engine.block_size(), |offset, len| {
        engine.record_write(server, offset, len)
    })?;
    println!(
        "  changed the disk: {} scattered 4 KiB writes touching {} blocks, reported to the engine",
        size * CHANGED_PERCENT / 100 / WRITE_LEN,
        changed
    );
    let second = capture(&engine, server, "after-changes")?;

    let job = engine.start_restore(first.id)?;
    let progress = job.progress_handle();
    let bar = ProgressBar::start("restoring", move || progress.get());
    let report = job.wait();
    bar.finish();
    let report = report?;
    let restored = hash_file(&image)?;
    let verify = engine.verify(None)?;
    let exact = restored == original;

    let s1 = first.stats.unwrap_or_default();
    let s2 = second.stats.unwrap_or_default();
    let store_bytes = dir_size(&store_dir.join("packs"));
    println!(
        "  restored snapshot {} in {:.2} s ({}): {} of {} blocks rewritten ({}), expected {}",
        first.id,
        report.micros as f64 / 1e6,
        match report.method {
            blocksnap::RestoreMethod::Delta => "delta: the disk was known, nothing read",
            blocksnap::RestoreMethod::Compare => "compared every block",
        },
        report.blocks_rewritten,
        report.blocks_total,
        human_bytes(report.bytes_written),
        changed
    );
    println!("report");
    println!(
        "  disk {}, {:.0}% data; store holds {} for 2 snapshots ({:.2}x smaller than the data)",
        human_bytes(size),
        100.0 * s1.data_bytes as f64 / size as f64,
        human_bytes(store_bytes),
        (s1.data_bytes + s2.data_bytes) as f64 / store_bytes.max(1) as f64
    );
    println!(
        "  first snapshot {:.2} s, second {:.2} s (+{}); BLAKE3 of the image alone {:.2} s",
        s1.micros as f64 / 1e6,
        s2.micros as f64 / 1e6,
        human_bytes(s2.new_stored_bytes),
        hash_secs
    );
    let index = engine.index_bytes();
    println!(
        "  verify: {} chunks, {}; chunk index {} ({:.1} bytes per chunk)",
        verify.chunks_checked,
        if verify.is_ok() {
            "all intact"
        } else {
            "DAMAGED"
        },
        human_bytes(index as u64),
        index as f64 / engine.chunk_count().max(1) as f64
    );
    let rewrote_exactly = report.blocks_rewritten == changed;
    if exact && verify.is_ok() && rewrote_exactly {
        println!(
            "  restore is byte-exact: BLAKE3 {}",
            &original.to_hex()[..16]
        );
        Ok(0)
    } else {
        println!(
            "  FAILED: byte-exact {exact}, verify {}, rewrote {} blocks where {changed} changed",
            verify.is_ok(),
            report.blocks_rewritten
        );
        Ok(1)
    }
}

fn capture(
    engine: &blocksnap::Engine,
    server: ServerId,
    name: &str,
) -> blocksnap::Result<blocksnap::Snapshot> {
    let job = engine.start_snapshot(server, name, "made by blocksnap demo")?;
    let progress = job.progress_handle();
    let bar = ProgressBar::start("capturing", move || progress.get());
    let snap = job.wait();
    bar.finish();
    let snap = snap?;
    println!("  {}", capture_summary(&snap));
    Ok(snap)
}

/// Overwrites 1% of the image with random 4 KiB writes, reporting each to
/// `report` once written; returns how many distinct blocks they touched.
fn scatter_writes(
    image: &Path,
    size: u64,
    block_size: u32,
    report: impl Fn(u64, u64) -> blocksnap::Result<()>,
) -> blocksnap::Result<u64> {
    let f = OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(|e| Error::io(image, e))?;
    let mut rng = Rng::new(SEED + 1);
    let mut buf = vec![0u8; WRITE_LEN as usize];
    let mut touched = BTreeSet::new();
    let slots = (size / WRITE_LEN).max(1);
    for _ in 0..(size * CHANGED_PERCENT / 100 / WRITE_LEN).max(1) {
        let offset = rng.below(slots) * WRITE_LEN;
        let len = WRITE_LEN.min(size - offset) as usize;
        rng.fill(&mut buf[..len]);
        f.write_all_at(&buf[..len], offset)
            .map_err(|e| Error::io(image, e))?;
        report(offset, len as u64)?;
        touched.insert(offset / u64::from(block_size));
    }
    f.sync_all().map_err(|e| Error::io(image, e))?;
    Ok(touched.len() as u64)
}

fn hash_file(path: &Path) -> blocksnap::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(fs::File::open(path).map_err(|e| Error::io(path, e))?)
        .map_err(|e| Error::io(path, e))?;
    Ok(h.finalize())
}

fn dir_size(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// `blocksnap demo --live`: a qemu-storage-daemon serves a qcow2 disk that
/// a guest keeps writing (stamped 4 KiB blocks, a write every 2 ms) while
/// two live snapshots are taken; each is restored and must be the disk at
/// one point in time (the first disk plus exactly the guest's writes
/// 1..K). Prints the freeze times, the guest's largest gap between writes
/// and what the incremental snapshot read.
pub fn run_live(size: u64) -> blocksnap::Result<i32> {
    use blocksnap::live::testbed::{
        Daemon, Guest, point_in_time, qcow2_image, qemu_available, read_export,
    };

    if let Err(why) = qemu_available() {
        eprintln!("demo --live needs QEMU's qemu-storage-daemon and qemu-img: {why}");
        return Ok(2);
    }
    let size = size.max(16 << 20) / (1 << 20) * (1 << 20);
    let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    println!("blocksnap demo --live in {}", tmp.path().display());
    let mut first = vec![0u8; size as usize];
    sample::fill_region(SEED, 0, &mut first);
    let image = tmp.path().join("vm-01.qcow2");
    qcow2_image(&first, &image)?;
    let vm = Daemon::start(tmp.path(), &image)?;
    println!(
        "  qemu-storage-daemon runs a {} qcow2 disk (node disk0); a guest writes a stamped 4 KiB block every 2 ms",
        human_bytes(size)
    );
    let engine = EngineOptions::new().open(tmp.path().join("store"))?;
    let server = ServerId(1);
    engine.add_server(server, "vm-01", vm.qemu_uri())?;
    let guest = Guest::start(
        &vm.guest_uri(),
        size as usize,
        std::time::Duration::from_millis(2),
    )?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let one = engine.create_snapshot(server, "live-1", "")?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let two = engine.create_snapshot(server, "live-2", "")?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = guest.stop()?;
    for snap in [&one, &two] {
        println!("  {}", capture_summary(snap));
    }
    let (s1, s2) = (one.stats.unwrap_or_default(), two.stats.unwrap_or_default());
    println!(
        "  freeze {:.1} ms and {:.1} ms; the guest made {} writes, its largest gap between two {:.1} ms",
        s1.freeze_micros.unwrap_or(0) as f64 / 1e3,
        s2.freeze_micros.unwrap_or(0) as f64 / 1e3,
        log.writes.len(),
        log.max_gap.as_secs_f64() * 1e3
    );
    println!(
        "  the incremental snapshot read {} of the disk's {}",
        human_bytes(s2.bytes_read),
        human_bytes(size)
    );
    let bare = blocksnap::RestoreOptions::default().safety_snapshot(false);
    let mut ks = Vec::new();
    for snap in [&one, &two] {
        engine.restore_snapshot_with(snap.id, bare)?;
        match point_in_time(&first, &log.writes, &read_export(&vm.guest_uri())?) {
            Ok(k) => {
                println!(
                    "  restored snapshot {}: the disk after exactly the guest's writes 1..{k}",
                    snap.id
                );
                ks.push(k);
            }
            Err(e) => {
                eprintln!("FAILED: snapshot {} restored is {e}", snap.id);
                return Ok(1);
            }
        }
    }
    let (things, _) = vm.leftovers()?;
    vm.stop()?;
    if !things.is_empty() || ks[0] >= ks[1] {
        eprintln!("FAILED: left in QEMU {things:?}; points in time {ks:?}");
        return Ok(1);
    }
    println!(
        "OK: each live snapshot is one point in time, and nothing of blocksnap's stayed in QEMU"
    );
    Ok(0)
}
