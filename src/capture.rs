//! The capture pipeline, blocksnap's hot core.
//!
//! A reader thread reads the disk in large windows (see [`crate::window`]);
//! for each window, rayon classifies every block in parallel: zero check,
//! BLAKE3, dedup look-up, and zstd for chunks the store lacks. New chunks are
//! then appended to the open pack in block order under the store's one
//! writer lock. The caller makes them durable (`ChunkStore::sync`) before
//! writing the manifest.

use rayon::prelude::*;

use crate::catalog::CaptureStats;
use crate::disk::{Disk, is_zero};
use crate::error::{Error, Result};
use crate::ids::ChunkId;
use crate::job::Progress;
use crate::store::ChunkStore;
use crate::store::pack::EncodedChunk;
use crate::window::for_each_window;

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

enum Block {
    Zero,
    Known(ChunkId),
    New(EncodedChunk),
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
    EncodedChunk::compress(id, bytes, level).map(Block::New)
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
    for_each_window(disk, len, window_len, |w| {
        if w.read < w.bytes.len() {
            return Err(Error::WrongState(format!(
                "the disk shrank during capture (expected {len} bytes, ended at {})",
                w.offset + w.read as u64
            )));
        }
        let classified: Vec<Block> = w
            .bytes
            .par_chunks(bs)
            .map(|b| classify(store, b, settings.compression_level))
            .collect::<Result<_>>()?;
        let mut new = Vec::new();
        for (b, bytes) in classified.into_iter().zip(w.bytes.chunks(bs)) {
            match b {
                Block::Zero => {
                    stats.zero_blocks += 1;
                    blocks.push(None);
                }
                Block::Known(id) => {
                    stats.data_blocks += 1;
                    stats.data_bytes += bytes.len() as u64;
                    blocks.push(Some(id));
                }
                Block::New(chunk) => {
                    stats.data_blocks += 1;
                    stats.data_bytes += bytes.len() as u64;
                    blocks.push(Some(chunk.id));
                    new.push(chunk);
                }
            }
        }
        let appended = store.insert(new)?;
        stats.new_chunks += appended.chunks;
        stats.new_raw_bytes += appended.raw_bytes;
        stats.new_stored_bytes += appended.stored_bytes;
        progress.add(w.bytes.len() as u64);
        Ok(())
    })?;
    Ok(Captured { blocks, stats })
}
