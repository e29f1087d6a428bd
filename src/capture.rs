//! The capture pipeline, blocksnap's hot core.
//!
//! Two stages overlap, so both cores stay busy:
//! 1. for each window of the disk, rayon tasks each read a slice of it
//!    (see [`crate::window`]) and classify its blocks while they are in
//!    cache: zero check, BLAKE3, dedup look-up, and zstd for chunks the
//!    store lacks;
//! 2. a writer thread appends the window's new chunks to the open pack in
//!    block order (raw chunks straight from the window buffer), then hands
//!    the buffer back for the next window.
//!
//! Memory is bounded by `WINDOWS_IN_FLIGHT` window buffers, reused, whatever
//! the disk size.
//!
//! The caller makes the chunks durable (`ChunkStore::sync`) before writing
//! the manifest.

use std::sync::mpsc::{channel, sync_channel};

use rayon::prelude::*;

use crate::catalog::CaptureStats;
use crate::disk::{Disk, is_zero};
use crate::error::{Error, Result};
use crate::ids::ChunkId;
use crate::job::Progress;
use crate::store::pack::{self, ChunkRecord};
use crate::store::{Appended, ChunkStore};
use crate::window::{read_and_process, task_len};

/// Window buffers in use at once: one being filled and classified, one
/// queued for the writer, one being appended.
pub const WINDOWS_IN_FLIGHT: usize = 3;

/// Settings of one capture.
#[derive(Clone, Copy, Debug)]
pub struct CaptureSettings {
    pub block_size: u32,
    pub compression_level: i32,
    pub window_len: usize,
}

/// A captured disk: one entry per block, and what it took.
pub struct Captured {
    pub blocks: Vec<Option<ChunkId>>,
    pub stats: CaptureStats,
}

/// What the parallel stage found for one block.
enum Block {
    Zero,
    Known(ChunkId),
    /// Not in the store: to append, compressed when that paid.
    New(ChunkId, Option<Vec<u8>>),
}

/// Zero check, hash, dedup look-up and, for a new chunk, compression.
fn classify(store: &ChunkStore, bytes: &[u8], level: i32) -> Result<Block> {
    if is_zero(bytes) {
        return Ok(Block::Zero);
    }
    let id = ChunkId::of(bytes);
    if store.contains(&id) {
        return Ok(Block::Known(id));
    }
    Ok(Block::New(id, pack::compress(bytes, level)?))
}

/// Stage 2 for one window: classifies its blocks and records them in
/// `blocks` and `stats` (all but the append counts).
fn classify_window(
    store: &ChunkStore,
    window: &[u8],
    settings: &CaptureSettings,
    blocks: &mut Vec<Option<ChunkId>>,
    stats: &mut CaptureStats,
) -> Result<Vec<Block>> {
    let bs = settings.block_size as usize;
    let classified: Vec<Block> = window
        .par_chunks(bs)
        .map(|b| classify(store, b, settings.compression_level))
        .collect::<Result<_>>()?;
    record(&classified, window, bs, blocks, stats);
    Ok(classified)
}

/// Adds classified blocks to the manifest entries and the stats.
fn record(
    classified: &[Block],
    window: &[u8],
    bs: usize,
    blocks: &mut Vec<Option<ChunkId>>,
    stats: &mut CaptureStats,
) {
    for (b, bytes) in classified.iter().zip(window.chunks(bs)) {
        match b {
            Block::Zero => {
                stats.zero_blocks += 1;
                blocks.push(None);
            }
            Block::Known(id) | Block::New(id, _) => {
                stats.data_blocks += 1;
                stats.data_bytes += bytes.len() as u64;
                blocks.push(Some(*id));
            }
        }
    }
}

/// Stage 3 for one window: appends its new chunks in block order.
fn append_window(
    store: &ChunkStore,
    window: &[u8],
    block_size: usize,
    classified: &[Block],
) -> Result<Appended> {
    let records: Vec<ChunkRecord<'_>> = classified
        .iter()
        .zip(window.chunks(block_size))
        .filter_map(|(b, raw)| match b {
            Block::New(id, compressed) => Some(ChunkRecord {
                id: *id,
                raw,
                compressed: compressed.as_deref(),
            }),
            _ => None,
        })
        .collect();
    store.insert(&records)
}

fn add(stats: &mut CaptureStats, a: Appended) {
    stats.new_chunks += a.chunks;
    stats.new_raw_bytes += a.raw_bytes;
    stats.new_stored_bytes += a.stored_bytes;
}

/// The hot core for one window held in memory, without the reader and
/// writer threads (benches): classify, then append.
pub fn ingest_window(
    store: &ChunkStore,
    window: &[u8],
    settings: &CaptureSettings,
    blocks: &mut Vec<Option<ChunkId>>,
    stats: &mut CaptureStats,
) -> Result<()> {
    let classified = classify_window(store, window, settings, blocks, stats)?;
    let appended = append_window(store, window, settings.block_size as usize, &classified)?;
    add(stats, appended);
    Ok(())
}

/// Reads all of `disk` and stores the chunks the store lacks.
pub fn capture(
    store: &ChunkStore,
    disk: &dyn Disk,
    settings: &CaptureSettings,
    progress: &Progress,
) -> Result<Captured> {
    let len = disk.len()?;
    progress.start(len);
    let bs = settings.block_size as usize;
    let window_len = settings.window_len.max(bs) / bs * bs;
    let mut blocks =
        Vec::with_capacity(crate::manifest::block_count(len, settings.block_size) as usize);
    let mut stats = CaptureStats {
        image_len: len,
        ..CaptureStats::default()
    };
    let task = task_len(settings.block_size);
    let (to_writer, for_writer) = sync_channel::<(Vec<u8>, Vec<Block>)>(1);
    let (recycle, recycled) = channel::<Vec<u8>>();
    for _ in 0..WINDOWS_IN_FLIGHT {
        let _ = recycle.send(Vec::new());
    }
    let (read, written) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<Appended> {
            let mut total = Appended::default();
            for (window, classified) in for_writer {
                let a = append_window(store, &window, bs, &classified)?;
                total.chunks += a.chunks;
                total.raw_bytes += a.raw_bytes;
                total.stored_bytes += a.stored_bytes;
                progress.add(window.len() as u64);
                let _ = recycle.send(window);
            }
            Ok(total)
        });
        let read = (|| -> Result<()> {
            let mut offset = 0u64;
            while offset < len {
                // Fails only when the writer stopped; its error is returned below.
                let Ok(mut window) = recycled.recv() else {
                    break;
                };
                let n = (len - offset).min(window_len as u64) as usize;
                window.resize(n, 0);
                let per_task = read_and_process(
                    disk,
                    &mut window,
                    offset,
                    task,
                    |at, bytes, read| {
                        if read < bytes.len() {
                            return Err(Error::WrongState(format!(
                                "the disk shrank during capture (expected {len} bytes, ended at {})",
                                at + read as u64
                            )));
                        }
                        bytes
                            .chunks(bs)
                            .map(|b| classify(store, b, settings.compression_level))
                            .collect::<Result<Vec<Block>>>()
                    },
                )?;
                let classified: Vec<Block> = per_task.into_iter().flatten().collect();
                record(&classified, &window, bs, &mut blocks, &mut stats);
                if to_writer.send((window, classified)).is_err() {
                    break;
                }
                offset += n as u64;
            }
            Ok(())
        })();
        drop(to_writer);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::WrongState("capture writer panicked".into())));
        (read, written)
    });
    // The writer's error first: it is the cause when both failed.
    add(&mut stats, written?);
    read?;
    Ok(Captured { blocks, stats })
}
