//! The restore pipeline: plan, then apply.
//!
//! [`plan`] reads the target disk in windows and compares every block with
//! the manifest (zero check, else BLAKE3), in parallel; it writes nothing.
//! [`apply`] rewrites exactly the planned blocks, a batch at a time: every
//! chunk of a batch is read and checked (CRC32, decompression, BLAKE3) before
//! any byte of the batch is written, so a corrupt chunk is an error and never
//! reaches the disk. Runs of data blocks become one large write; runs of zero
//! blocks become holes in image files. The caller fsyncs.

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::disk::{Disk, is_zero};
use crate::error::{Error, Result};
use crate::ids::{ChunkId, SnapshotId};
use crate::job::Progress;
use crate::manifest::Manifest;
use crate::store::ChunkStore;
use crate::window::for_each_window;

/// Which blocks of the target differ from the snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestorePlan {
    pub snapshot: SnapshotId,
    /// Blocks in the snapshot.
    pub blocks_total: u64,
    /// Indexes of the blocks to rewrite, ascending.
    pub rewrite: Vec<u64>,
    /// Bytes those blocks cover.
    pub bytes_to_write: u64,
}

/// What a restore did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RestoreReport {
    pub snapshot_id: u64,
    pub server_id: u64,
    pub blocks_total: u64,
    pub blocks_rewritten: u64,
    pub bytes_written: u64,
    /// Bytes of the target read and compared while planning.
    pub bytes_compared: u64,
    pub micros: u64,
}

/// Compares the target with the manifest and lists the blocks that differ.
/// Bytes past the end of a shorter image file count as zero: setting the
/// file's length fills them with zeros.
pub fn plan(
    manifest: &Manifest,
    disk: &dyn Disk,
    window_len: usize,
    progress: &Progress,
) -> Result<RestorePlan> {
    let bs = manifest.block_size as usize;
    let window_len = window_len.max(bs) / bs * bs;
    let mut rewrite = Vec::new();
    let mut bytes_to_write = 0;
    progress.start(manifest.image_len);
    for_each_window(disk, manifest.image_len, window_len, |w| {
        let first = w.offset / bs as u64;
        let differs: Vec<bool> = w
            .bytes
            .par_chunks(bs)
            .enumerate()
            .map(|(k, bytes)| {
                let want = manifest.blocks()[first as usize + k];
                !block_matches(bytes, want.as_ref())
            })
            .collect();
        for (k, d) in differs.into_iter().enumerate() {
            if d {
                let i = first + k as u64;
                rewrite.push(i);
                bytes_to_write += manifest.block_len(i) as u64;
            }
        }
        progress.add(w.bytes.len() as u64);
        Ok(())
    })?;
    Ok(RestorePlan {
        snapshot: manifest.snapshot,
        blocks_total: manifest.block_count(),
        rewrite,
        bytes_to_write,
    })
}

fn block_matches(bytes: &[u8], want: Option<&ChunkId>) -> bool {
    match want {
        None => is_zero(bytes),
        Some(id) => !is_zero(bytes) && ChunkId::of(bytes) == *id,
    }
}

/// Rewrites the planned blocks. Returns bytes written so far even on error,
/// through `written`, so the caller knows whether the disk was touched.
pub fn apply(
    store: &ChunkStore,
    manifest: &Manifest,
    disk: &dyn Disk,
    plan: &RestorePlan,
    batch_len: usize,
    progress: &Progress,
    written: &mut u64,
) -> Result<()> {
    let bs = u64::from(manifest.block_size);
    let per_batch = (batch_len as u64 / bs).max(1) as usize;
    progress.start(plan.bytes_to_write);
    for batch in plan.rewrite.chunks(per_batch) {
        let contents: Vec<Option<Vec<u8>>> = batch
            .par_iter()
            .map(|&i| fetch_block(store, manifest, i))
            .collect::<Result<_>>()?;
        let mut k = 0;
        while k < batch.len() {
            // A run: consecutive block indexes of the same kind (data or zero).
            let is_data = contents[k].is_some();
            let mut end = k + 1;
            while end < batch.len()
                && batch[end] == batch[end - 1] + 1
                && contents[end].is_some() == is_data
            {
                end += 1;
            }
            let offset = batch[k] * bs;
            let run_len: u64 = batch[k..end]
                .iter()
                .map(|&i| manifest.block_len(i) as u64)
                .sum();
            if is_data {
                let mut buf = Vec::with_capacity(run_len as usize);
                for c in contents[k..end].iter().flatten() {
                    buf.extend_from_slice(c);
                }
                disk.write_at(&buf, offset)?;
            } else {
                disk.write_zeroes(offset, run_len)?;
            }
            *written += run_len;
            progress.add(run_len);
            k = end;
        }
    }
    Ok(())
}

/// Block `i`'s bytes, checked, or `None` for a zero block.
fn fetch_block(store: &ChunkStore, manifest: &Manifest, i: u64) -> Result<Option<Vec<u8>>> {
    let Some(id) = manifest.blocks()[i as usize] else {
        return Ok(None);
    };
    let data = store.read(&id)?;
    if data.len() != manifest.block_len(i) {
        return Err(Error::Corruption {
            path: format!("manifest of snapshot {}", manifest.snapshot).into(),
            what: format!(
                "block {i} is {} bytes but its chunk {id} holds {}",
                manifest.block_len(i),
                data.len()
            ),
        });
    }
    Ok(Some(data))
}

/// Runs plan and apply, then sets an image file's length and fsyncs.
/// `written` tells the caller, even on error, whether the disk was touched.
pub fn restore(
    store: &ChunkStore,
    manifest: &Manifest,
    disk: &dyn Disk,
    window_len: usize,
    progress: &Progress,
    written: &mut u64,
) -> Result<RestoreReport> {
    let started = Instant::now();
    if disk.is_block_device() {
        let have = disk.len()?;
        if have < manifest.image_len {
            return Err(Error::DiskTooSmall {
                path: disk.path().to_path_buf(),
                have,
                need: manifest.image_len,
            });
        }
    }
    let plan = plan(manifest, disk, window_len, progress)?;
    apply(store, manifest, disk, &plan, window_len, progress, written)?;
    if !disk.is_block_device() && disk.len()? != manifest.image_len {
        disk.set_len(manifest.image_len)?;
        *written += 1;
    }
    disk.sync()?;
    Ok(RestoreReport {
        snapshot_id: manifest.snapshot.0,
        server_id: manifest.server.0,
        blocks_total: plan.blocks_total,
        blocks_rewritten: plan.rewrite.len() as u64,
        bytes_written: plan.bytes_to_write,
        bytes_compared: manifest.image_len,
        micros: started.elapsed().as_micros() as u64,
    })
}
