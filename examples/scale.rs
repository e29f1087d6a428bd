//! Stores of millions of chunks for bench/scale.sh: builds one from
//! synthetic disks (4 KiB blocks, each unique and cheaply compressible:
//! its seed and number, then zeros), then runs one measured step per
//! process, so that each step's peak RSS is its own.
//!
//! ```text
//! scale build STORE CHUNKS [PER_SNAPSHOT] [--in-memory]
//! scale open STORE            open the store, print the seconds
//! scale capture-known STORE   capture server 1's disk again (every chunk stored)
//! scale capture-new STORE     capture a disk of new chunks, then delete it
//! scale rebuild STORE         rebuild the chunk index table from the packs
//! scale restore STORE         restore server 1's newest snapshot onto its disk
//!                             (the same blocks: every one compared, none written;
//!                             with --sink, a disk of other blocks that forgets
//!                             what is written: every block rewritten)
//! scale export STORE          export server 1's newest snapshot as a raw
//!                             image onto a stream that forgets it (every
//!                             block read, checked and written out)
//! scale verify STORE          verify server 1's newest snapshot
//! scale verify-all STORE      verify the whole store
//! ```
//!
//! `--block-size=BYTES` (default 4096) sets the block size of a store
//! being built, and of the synthetic disks: the dense-disk runs of
//! bench/dense.sh use 64 KiB, as a 1 TiB disk would be captured.
//!
//! A synthetic disk is named `/synthetic/SEED/BLOCKS`. `--in-memory`
//! builds with the table never written (every chunk in the in-memory
//! index, as before the table existed), for comparison; `--mapped` reads
//! the tables through their maps whatever their size
//! (`EngineOptions::table_memory`).
//! Each step prints one line of JSON.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use blocksnap::disk::Disk;
use blocksnap::{EngineOptions, Error, Result, ServerId, SnapshotStatus};

/// The block size: 4 KiB unless `--block-size=BYTES` says otherwise.
fn block_size() -> u64 {
    static BS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BS.get_or_init(|| {
        std::env::args()
            .find_map(|a| a.strip_prefix("--block-size=")?.parse().ok())
            .unwrap_or(4096)
    })
}

/// The process's peak private memory and peak mapped file pages (MiB),
/// sampled every 10 ms from /proc/self/status: peak RSS counts both, and
/// the file pages (the tables' maps) are the page cache's, which the
/// kernel takes back under pressure.
struct RssSampler {
    peaks: Arc<std::sync::Mutex<(u64, u64)>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl RssSampler {
    fn start() -> Self {
        let peaks = Arc::new(std::sync::Mutex::new((0, 0)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (peaks.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let (anon, file) = rss_now();
                if let Ok(mut g) = p.lock() {
                    *g = (g.0.max(anon), g.1.max(file));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        });
        RssSampler { peaks, stop }
    }

    /// (peak private KiB, peak file KiB), sampled once more now.
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (anon, file) = rss_now();
        let g = self.peaks.lock().map(|g| *g).unwrap_or((0, 0));
        (g.0.max(anon), g.1.max(file))
    }
}

/// (RssAnon, RssFile) in KiB.
fn rss_now() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("RssAnon:"), field("RssFile:"))
}

/// Blocks of `seed`: block `i` is (seed, i) then zeros.
struct Synthetic {
    seed: u64,
    blocks: u64,
    path: std::path::PathBuf,
    /// Takes writes and forgets them (`--sink`).
    sink: bool,
}

/// A write to a synthetic disk: forgotten by a sink, refused otherwise.
fn written(sink: bool) -> Result<()> {
    if sink {
        Ok(())
    } else {
        Err(Error::InvalidParameter(
            "a synthetic disk is read-only".into(),
        ))
    }
}

impl Disk for Synthetic {
    fn len(&self) -> Result<u64> {
        Ok(self.blocks * block_size())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let bs = block_size();
        let len = self.blocks * bs;
        let n = buf.len().min(len.saturating_sub(offset) as usize);
        buf[..n].fill(0);
        let mut at = offset;
        while at < offset + n as u64 {
            let block = at / bs;
            let start = block * bs;
            // The block's 16-byte stamp, where it falls in this read.
            let mut stamp = [0u8; 16];
            stamp[..8].copy_from_slice(&self.seed.to_le_bytes());
            stamp[8..].copy_from_slice(&block.to_le_bytes());
            for (i, b) in stamp.iter().enumerate() {
                let pos = start + i as u64;
                if pos >= offset && pos < offset + n as u64 {
                    buf[(pos - offset) as usize] = *b;
                }
            }
            at = start + bs;
        }
        Ok(n)
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
        written(self.sink)
    }
    fn write_zeroes(&self, _: u64, _: u64) -> Result<()> {
        written(self.sink)
    }
    fn set_len(&self, _: u64) -> Result<()> {
        written(false)
    }
    fn is_block_device(&self) -> bool {
        true
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn path(&self) -> &Path {
        &self.path
    }
}

fn options(in_memory: bool) -> EngineOptions {
    let mapped = std::env::args().any(|a| a == "--mapped");
    // A sink reads as another seed's disk, so that a restore onto it
    // rewrites every block, and forgets what is written.
    let sink = std::env::args().any(|a| a == "--sink");
    let opener: blocksnap::disk::DiskOpener = Arc::new(move |path: &Path, _| {
        let parts: Vec<&str> = path.to_str().unwrap_or("").split('/').collect();
        match parts.as_slice() {
            ["", "synthetic", seed, blocks] => Ok(Box::new(Synthetic {
                seed: seed.parse::<u64>().unwrap_or(0) + if sink { 1 << 50 } else { 0 },
                blocks: blocks.parse().unwrap_or(0),
                path: path.to_path_buf(),
                sink,
            }) as Box<dyn Disk>),
            _ => Err(Error::InvalidParameter(format!(
                "{}: not a synthetic disk",
                path.display()
            ))),
        }
    });
    let o = EngineOptions::new()
        .block_size(block_size() as u32)
        .disk_opener(opener);
    let o = if mapped { o.table_memory(u64::MAX) } else { o };
    if in_memory {
        o.index_persist_min(usize::MAX)
    } else {
        o
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let in_memory = args.iter().any(|a| a == "--in-memory");
    let args: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    let Some((&step, rest)) = args.split_first() else {
        eprintln!("usage: scale build|open|capture-known|capture-new|rebuild STORE ...");
        std::process::exit(2);
    };
    let store = Path::new(rest.first().copied().unwrap_or("scale-store"));
    let started = Instant::now();
    match step {
        "build" => {
            let chunks: u64 = rest.get(1).and_then(|s| s.parse().ok()).unwrap_or(1 << 20);
            let per: u64 = rest.get(2).and_then(|s| s.parse().ok()).unwrap_or(1 << 20);
            let engine = options(in_memory).open(store)?;
            let snapshots = chunks.div_ceil(per);
            for n in 0..snapshots {
                // A server a snapshot, each disk of its own seed.
                let server = ServerId(n + 1);
                if engine.server(server).is_err() {
                    let disk = format!("/synthetic/{}/{per}", 1000 + n);
                    engine.add_server(server, &format!("s{}", server.0), &disk)?;
                }
                // (A build stopped mid-capture resumes: that one failed.)
                let done = engine.snapshots(Some(server))?;
                if !done.iter().any(|s| s.status == SnapshotStatus::Completed) {
                    engine.create_snapshot(server, &format!("n{n}"), "")?;
                }
                eprint!("\rbuilt {} of {snapshots} snapshots", n + 1);
            }
            eprintln!();
            engine.close()?;
            let engine = options(in_memory).open(store)?;
            println!(
                "{{\"step\": \"build\", \"chunks\": {}, \"seconds\": {:.3}}}",
                engine.chunk_count(),
                started.elapsed().as_secs_f64()
            );
        }
        "open" => {
            // The median of five: an open's catalog commit waits on an
            // fsync, whose time varies with the disk, not the store.
            let mut times = Vec::new();
            let mut report = None;
            for _ in 0..5 {
                let t = Instant::now();
                let engine = options(in_memory).open(store)?;
                times.push(t.elapsed().as_secs_f64());
                report = Some(engine.open_report().clone());
            }
            times.sort_by(f64::total_cmp);
            let report = report.unwrap_or_default();
            println!(
                "{{\"step\": \"open\", \"seconds\": {:.4}, \"fastest\": {:.4}, \"packs_read\": {}, \"rebuilt\": {}}}",
                times[2],
                times[0],
                report.packs_indexed,
                report.index_rebuilt.is_some()
            );
        }
        "capture-known" | "capture-new" => {
            let sampler = RssSampler::start();
            let engine = options(in_memory).open(store)?;
            let opened = started.elapsed().as_secs_f64();
            // Server 1's disk again, or a new server's disk of new data.
            let blocks: u64 = engine
                .server(ServerId(1))?
                .disk
                .to_str()
                .and_then(|s| s.rsplit('/').next())
                .and_then(|b| b.parse().ok())
                .unwrap_or(1 << 20);
            let server = if step == "capture-known" {
                ServerId(1)
            } else {
                // A seed of its own each run: an earlier run's chunks stay
                // until a collection, and would be found stored.
                let seed = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64 & ((1 << 40) - 1));
                let s = ServerId((1 << 40) + seed);
                engine.add_server(
                    s,
                    "new",
                    format!("/synthetic/{}/{blocks}", (1 << 41) + seed),
                )?;
                s
            };
            // Sealed packs the table does not cover are read at the first
            // look-up: timed apart, so that the capture times look-ups.
            let t = Instant::now();
            let _ = engine.chunk_count();
            let loaded = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let snap = engine.create_snapshot(server, "scale", "")?;
            let secs = t.elapsed().as_secs_f64();
            let st = snap.stats.expect("completed");
            engine.delete_snapshot(snap.id)?;
            drop(engine);
            let (anon, file) = sampler.finish();
            println!(
                "{{\"step\": \"{step}\", \"open_seconds\": {opened:.4}, \"first_lookup_seconds\": {loaded:.4}, \"seconds\": {secs:.4}, \"blocks\": {blocks}, \"new_chunks\": {}, \"chunks_per_second\": {:.0}, \"peak_private_kib\": {anon}, \"peak_file_kib\": {file}}}",
                st.new_chunks,
                blocks as f64 / secs
            );
        }
        "rebuild" => {
            let engine = options(in_memory).open(store)?;
            let t = Instant::now();
            let info = engine.rebuild_index()?;
            println!(
                "{{\"step\": \"rebuild\", \"seconds\": {:.3}, \"chunks\": {}, \"table_bytes\": {}}}",
                t.elapsed().as_secs_f64(),
                info.chunks,
                info.table_bytes
            );
        }
        "restore" | "export" | "verify" | "verify-all" => {
            let sampler = RssSampler::start();
            let engine = options(in_memory).open(store)?;
            let snap = engine
                .snapshots(Some(ServerId(1)))?
                .into_iter()
                .filter(|s| s.status == SnapshotStatus::Completed)
                .max_by_key(|s| s.id)
                .ok_or_else(|| Error::InvalidParameter("server 1 has no snapshot".into()))?;
            let t = Instant::now();
            let what = if step == "restore" {
                // Onto a sink nothing reads back what was written.
                let sink = std::env::args().any(|a| a == "--sink");
                let options = blocksnap::RestoreOptions::default()
                    .safety_snapshot(false)
                    .verify(!sink);
                let r = engine.restore_snapshot_with(snap.id, options)?;
                format!("\"blocks_rewritten\": {}", r.blocks_rewritten)
            } else if step == "export" {
                let target = blocksnap::ExportTarget::Stream(Box::new(std::io::sink()));
                let r = engine.export_snapshot(snap.id, target)?;
                format!("\"data_bytes\": {}", r.data_bytes)
            } else {
                // `verify-all`: the whole store, as `blocksnap verify` does
                // (the catalog, the index, the counts against a count from
                // every manifest).
                let r = engine.verify((step == "verify").then_some(snap.id))?;
                if !r.is_ok() {
                    return Err(Error::Internal(format!("verify found damage: {r:?}")));
                }
                format!("\"chunks_checked\": {}", r.chunks_checked)
            };
            let secs = t.elapsed().as_secs_f64();
            drop(engine);
            let (anon, file) = sampler.finish();
            println!(
                "{{\"step\": \"{step}\", \"seconds\": {secs:.4}, {what}, \"peak_private_kib\": {anon}, \"peak_file_kib\": {file}}}"
            );
        }
        other => {
            eprintln!("unknown step {other}");
            std::process::exit(2);
        }
    }
    Ok(())
}
