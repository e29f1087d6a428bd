//! The restore pipeline: plan, then apply.
//!
//! [`plan`] reads the target disk in windows and compares every block with
//! the manifest (zero check, else BLAKE3), in parallel; it writes nothing.
//! [`apply`] rewrites exactly the planned blocks, a batch at a time: rayon
//! reads every chunk of a batch straight into the batch buffer and checks
//! it (record header, decompression, BLAKE3) before any byte of the batch
//! is written, so a corrupt chunk is an error and never reaches the disk.
//! A writer thread writes the previous batch meanwhile: runs of data blocks
//! as one large write, runs of zero blocks as holes in image files. The
//! caller fsyncs once at the end.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::disk::{Disk, is_zero};
use crate::error::{Error, Result};
use crate::ids::{ChunkId, ServerId, SnapshotId};
use crate::job::Progress;
use crate::manifest::Manifest;
use crate::store::ChunkStore;
use crate::window::{read_and_process, task_len};

/// Batch buffers in use at once: one being filled, one queued, one being
/// written.
const BATCHES_IN_FLIGHT: usize = 3;

/// Which blocks of the target differ from the snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestorePlan {
    pub snapshot: SnapshotId,
    /// Blocks in the snapshot.
    pub blocks_total: u64,
    /// The blocks to rewrite.
    pub rewrite: BlockSet,
    /// Bytes those blocks cover.
    pub bytes_to_write: u64,
    /// Bytes of the target read and compared (none past its end).
    pub bytes_compared: u64,
}

/// A set of a disk's blocks, one bit each whatever they are (the blocks
/// of a dense 1 TiB disk: 2 MiB), read in ascending order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockSet {
    words: Vec<u64>,
    len: u64,
}

impl BlockSet {
    /// No block of a disk of `blocks` blocks.
    pub fn new(blocks: u64) -> Self {
        BlockSet {
            words: vec![0; blocks.div_ceil(64) as usize],
            len: 0,
        }
    }

    /// Every block of a disk of `blocks` blocks.
    #[cfg(any(test, feature = "testing"))]
    pub fn all(blocks: u64) -> Self {
        let mut set = BlockSet::new(blocks);
        for i in 0..blocks {
            set.insert(i);
        }
        set
    }

    /// Adds block `i` (of the disk the set was made for).
    pub fn insert(&mut self, i: u64) {
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            let bit = 1u64 << (i % 64);
            if *w & bit == 0 {
                *w |= bit;
                self.len += 1;
            }
        }
    }

    /// Number of blocks in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The blocks, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(k, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let bit = w.trailing_zeros();
                    w &= w - 1;
                    k as u64 * 64 + u64::from(bit)
                })
            })
        })
    }

    /// The blocks as `[first, end)` runs, ascending.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in self.iter() {
            match runs.last_mut() {
                Some((_, end)) if *end == b => *end += 1,
                _ => runs.push((b, b + 1)),
            }
        }
        runs
    }
}

/// How a restore found the blocks to rewrite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreMethod {
    /// Read every block of the disk and compared it with the snapshot.
    #[default]
    Compare,
    /// Knew the disk's state (a snapshot plus the blocks written since,
    /// from the engine's change tracking or a QEMU checkpoint bitmap) and
    /// compared manifests, reading nothing.
    Delta,
}

/// What a restore did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RestoreReport {
    pub snapshot_id: SnapshotId,
    pub server_id: ServerId,
    pub method: RestoreMethod,
    pub blocks_total: u64,
    pub blocks_rewritten: u64,
    pub bytes_written: u64,
    /// Bytes of the target read and compared while planning.
    pub bytes_compared: u64,
    /// Blocks read back and checked after writing (all rewritten blocks,
    /// unless verification was turned off).
    pub blocks_verified: u64,
    /// The safety snapshot taken before writing, which
    /// [`crate::Engine::undo_restore`] restores.
    pub safety_snapshot: Option<SnapshotId>,
    /// A running QEMU VM was paused (QMP `stop`) before the restore and is
    /// left paused: the agent resumes it (`cont`) when it is ready.
    pub vm_paused: bool,
    /// Wall time in all, and of planning, writing (with the fsync) and
    /// verifying; a safety snapshot's time is in `micros` only.
    pub micros: u64,
    pub plan_micros: u64,
    pub write_micros: u64,
    pub verify_micros: u64,
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
    let mut rewrite = BlockSet::new(manifest.block_count());
    let mut bytes_to_write = 0;
    progress.start(manifest.image_len);
    // A disk that is all holes past its end needs no reading.
    let current = disk.len()?;
    let compare_len = manifest.image_len.min(current.next_multiple_of(bs as u64));
    let task = task_len(manifest.block_size);
    let compare_blocks = compare_len.div_ceil(bs as u64);
    // Only the disk's data is read: its holes read as zero (a sparse
    // image of a terabyte costs what it holds).
    let runs: Vec<Range<u64>> = match disk.data_ranges()? {
        Some(data) => crate::capture::data_block_runs(&data, manifest.block_size)
            .into_iter()
            .map(|r| r.start..r.end.min(compare_blocks))
            .filter(|r| r.start < r.end)
            .collect(),
        None => std::iter::once(0..compare_blocks).collect(),
    };
    let mut window = Vec::new();
    for run in &runs {
        let mut offset = run.start * bs as u64;
        let end = (run.end * bs as u64).min(compare_len);
        while offset < end {
            let n = (end - offset).min(window_len as u64) as usize;
            crate::window::fit(&mut window, n);
            let per_task = read_and_process(disk, &mut window, offset, task, |at, bytes, _| {
                let first = at / bs as u64;
                bytes
                    .chunks(bs)
                    .enumerate()
                    .map(|(k, b)| {
                        Ok(!block_matches(
                            b,
                            manifest.block(first + k as u64)?.as_ref(),
                        ))
                    })
                    .collect::<Result<Vec<bool>>>()
            })?;
            let first = offset / bs as u64;
            for (k, differs) in per_task.into_iter().flatten().enumerate() {
                if differs {
                    let i = first + k as u64;
                    rewrite.insert(i);
                    bytes_to_write += manifest.block_len(i) as u64;
                }
            }
            progress.add(n as u64);
            offset += n as u64;
        }
    }
    // In the holes and past the current end every byte reads as zero: only
    // the snapshot's data blocks there differ.
    let read = |i: u64| {
        let k = runs.partition_point(|r| r.end <= i);
        i < compare_blocks && k < runs.len() && runs[k].start <= i
    };
    for d in manifest.blocks().data() {
        let (i, _) = d?;
        if read(i) {
            continue;
        }
        rewrite.insert(i);
        bytes_to_write += manifest.block_len(i) as u64;
    }
    let read_bytes: u64 = runs
        .iter()
        .map(|r| (r.end * bs as u64).min(compare_len) - r.start * bs as u64)
        .sum();
    progress.add(manifest.image_len - read_bytes);
    Ok(RestorePlan {
        snapshot: manifest.snapshot,
        blocks_total: manifest.block_count(),
        rewrite,
        bytes_to_write,
        bytes_compared: compare_len,
    })
}

/// The blocks to rewrite when the disk is known to hold `base` but for the
/// `dirty` block runs (ascending): those that differ between the two
/// manifests, and the dirty ones. Reads nothing. Both manifests must be of
/// one disk length.
pub fn plan_delta(base: &Manifest, dirty: &[Range<u64>], target: &Manifest) -> Result<RestorePlan> {
    let mut rewrite = BlockSet::new(target.block_count());
    let mut bytes_to_write = 0;
    let mut runs = dirty.iter().peekable();
    for (i, (have, want)) in base.blocks().iter().zip(target.blocks().iter()).enumerate() {
        let i = i as u64;
        let (have, want) = (have?, want?);
        while runs.next_if(|r| r.end <= i).is_some() {}
        let is_dirty = runs.peek().is_some_and(|r| r.start <= i);
        if is_dirty || have != want {
            rewrite.insert(i);
            bytes_to_write += target.block_len(i) as u64;
        }
    }
    Ok(RestorePlan {
        snapshot: target.snapshot,
        blocks_total: target.block_count(),
        rewrite,
        bytes_to_write,
        bytes_compared: 0,
    })
}

fn block_matches(bytes: &[u8], want: Option<&ChunkId>) -> bool {
    match want {
        None => is_zero(bytes),
        Some(id) => !is_zero(bytes) && ChunkId::of(bytes) == *id,
    }
}

/// A batch of planned blocks with their checked bytes, laid out in batch
/// order (block k of the batch at `k * block_size`).
struct Batch {
    blocks: Vec<u64>,
    bytes: Vec<u8>,
}

/// Rewrites the planned blocks. `written` counts bytes written so far, even
/// on error, so the caller knows whether the disk was touched (at least 1
/// once a write was tried: a failed write may have landed in part).
pub fn apply(
    store: &ChunkStore,
    manifest: &Manifest,
    disk: &dyn Disk,
    plan: &RestorePlan,
    batch_len: usize,
    progress: &Progress,
    written: &mut u64,
) -> Result<()> {
    let bs = manifest.block_size as usize;
    progress.start(plan.bytes_to_write);
    if plan.rewrite.is_empty() {
        return Ok(());
    }
    let per_batch = crate::capture::blocks_per_window(plan.rewrite.len(), batch_len, bs) as usize;
    let done = AtomicU64::new(0);
    let tried = std::sync::atomic::AtomicBool::new(false);
    let (to_writer, for_writer) = sync_channel::<Batch>(1);
    // Batch buffers are reused: no page faults or zeroing per batch.
    let (recycle, recycled) = channel::<Vec<u8>>();
    for _ in 0..BATCHES_IN_FLIGHT {
        let _ = recycle.send(Vec::new());
    }
    let (fetched, wrote) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| -> Result<()> {
            for batch in for_writer {
                tried.store(true, Ordering::Relaxed);
                write_batch(manifest, disk, &batch, &done, progress)?;
                let _ = recycle.send(batch.bytes);
            }
            Ok(())
        });
        let fetched = (|| -> Result<()> {
            let mut planned = plan.rewrite.iter();
            loop {
                let blocks: Vec<u64> = planned.by_ref().take(per_batch).collect();
                if blocks.is_empty() {
                    break;
                }
                // Fails only when the writer stopped; its error is returned below.
                let Ok(mut bytes) = recycled.recv() else {
                    break;
                };
                let len: usize = blocks.iter().map(|&i| manifest.block_len(i)).sum();
                // Zero blocks' bytes are never written from the buffer (they
                // become holes), so stale bytes there are harmless.
                crate::window::fit(&mut bytes, len);
                bytes
                    .par_chunks_mut(bs)
                    .zip(blocks.par_iter())
                    .try_for_each(|(out, &i)| match manifest.block(i)? {
                        None => Ok(()),
                        Some(id) => store.read_into(&id, out),
                    })?;
                if to_writer.send(Batch { blocks, bytes }).is_err() {
                    break;
                }
            }
            Ok(())
        })();
        drop(to_writer);
        let wrote = writer
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("the restore writer panicked".into())));
        (fetched, wrote)
    });
    *written += done.into_inner().max(u64::from(tried.into_inner()));
    wrote?;
    fetched
}

/// Writes one batch: each run of consecutive blocks of one kind (data or
/// zero) as one write or one hole.
fn write_batch(
    manifest: &Manifest,
    disk: &dyn Disk,
    batch: &Batch,
    done: &AtomicU64,
    progress: &Progress,
) -> Result<()> {
    let bs = u64::from(manifest.block_size);
    let blocks = &batch.blocks;
    let data: Vec<bool> = blocks
        .iter()
        .map(|&i| Ok(manifest.block(i)?.is_some()))
        .collect::<Result<_>>()?;
    let is_data = |k: usize| data[k];
    let mut k = 0;
    while k < blocks.len() {
        let data = is_data(k);
        let mut end = k + 1;
        while end < blocks.len() && blocks[end] == blocks[end - 1] + 1 && is_data(end) == data {
            end += 1;
        }
        let offset = blocks[k] * bs;
        let run_len: u64 = blocks[k..end]
            .iter()
            .map(|&i| manifest.block_len(i) as u64)
            .sum();
        if data {
            let at = k * bs as usize;
            disk.write_at(&batch.bytes[at..at + run_len as usize], offset)?;
        } else {
            disk.write_zeroes(offset, run_len)?;
        }
        done.fetch_add(run_len, Ordering::Relaxed);
        progress.add(run_len);
        k = end;
    }
    // Overlap the device writes with decompressing the next batch: one
    // hint over the batch's span (pages not written are not dirty).
    if let (Some(&first), Some(&last)) = (blocks.first(), blocks.last()) {
        let end = last * bs + manifest.block_len(last) as u64;
        disk.start_writeback(first * bs, end - first * bs);
    }
    Ok(())
}

/// Runs plan and apply, then sets an image file's length and fsyncs.
/// With `known` (the disk holds this base manifest but for these dirty
/// block runs) the plan compares manifests instead of reading the disk.
/// `written` tells the caller, even on error, whether the disk was touched.
#[allow(clippy::too_many_arguments)]
pub fn restore(
    store: &ChunkStore,
    manifest: &Manifest,
    disk: &dyn Disk,
    known: Option<(&Manifest, &[Range<u64>])>,
    window_len: usize,
    verify: bool,
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
    let (plan, method) = match known {
        Some((base, dirty)) if base.image_len == manifest.image_len => {
            (plan_delta(base, dirty, manifest)?, RestoreMethod::Delta)
        }
        _ => (
            plan(manifest, disk, window_len, progress)?,
            RestoreMethod::Compare,
        ),
    };
    let planned = started.elapsed();
    apply(store, manifest, disk, &plan, window_len, progress, written)?;
    if !disk.is_block_device() && disk.len()? != manifest.image_len {
        *written += 1;
        disk.set_len(manifest.image_len)?;
    }
    disk.sync()?;
    let wrote = started.elapsed();
    if verify {
        verify_written(manifest, disk, &plan.rewrite)?;
    }
    let micros = |d: std::time::Duration| d.as_micros() as u64;
    Ok(RestoreReport {
        snapshot_id: manifest.snapshot,
        server_id: manifest.server,
        method,
        blocks_total: plan.blocks_total,
        blocks_rewritten: plan.rewrite.len(),
        bytes_written: plan.bytes_to_write,
        bytes_compared: plan.bytes_compared,
        blocks_verified: if verify { plan.rewrite.len() } else { 0 },
        safety_snapshot: None,
        micros: micros(started.elapsed()),
        plan_micros: micros(planned),
        write_micros: micros(wrote - planned),
        verify_micros: micros(started.elapsed() - wrote),
        vm_paused: false,
    })
}

/// Bytes read back per rayon task when verifying.
const VERIFY_PIECE: u64 = 1 << 20;

/// Pieces verified together, in parallel.
const VERIFY_BATCH: usize = 1024;

/// Reads back every block in `blocks` and checks it against the manifest:
/// zero, or the chunk's BLAKE3. Runs of consecutive blocks are read in
/// pieces of up to 1 MiB, a batch of pieces at a time in parallel.
pub fn verify_written(manifest: &Manifest, disk: &dyn Disk, blocks: &BlockSet) -> Result<()> {
    let bs = u64::from(manifest.block_size);
    let per_piece = (VERIFY_PIECE / bs).max(1);
    let mut pieces: Vec<(u64, u64)> = Vec::new();
    for i in blocks.iter() {
        if let Some((first, n)) = pieces.last_mut()
            && *first + *n == i
            && *n < per_piece
        {
            *n += 1;
            continue;
        }
        if pieces.len() == VERIFY_BATCH {
            verify_pieces(manifest, disk, &pieces)?;
            pieces.clear();
        }
        pieces.push((i, 1));
    }
    verify_pieces(manifest, disk, &pieces)
}

/// Checks pieces of `(first block, blocks)` of the disk, in parallel.
fn verify_pieces(manifest: &Manifest, disk: &dyn Disk, pieces: &[(u64, u64)]) -> Result<()> {
    let bs = u64::from(manifest.block_size);
    pieces
        .par_iter()
        .try_for_each_init(Vec::new, |buf, &(first, n)| {
            let len: usize = (first..first + n).map(|i| manifest.block_len(i)).sum();
            buf.resize(len, 0);
            let read = disk.read_at(buf, first * bs)?;
            buf[read..].fill(0);
            let mut at = 0;
            for i in first..first + n {
                let end = at + manifest.block_len(i);
                if !block_matches(&buf[at..end], manifest.block(i)?.as_ref()) {
                    return Err(Error::VerifyFailed {
                        snapshot: manifest.snapshot,
                        path: disk.path().to_path_buf(),
                        block: i,
                        offset: i * bs,
                    });
                }
                at = end;
            }
            Ok(())
        })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_block_set_reads_back_its_blocks_in_order_and_runs() {
        let mut set = BlockSet::new(200);
        for i in [130, 5, 6, 7, 63, 64, 199, 6, 300] {
            set.insert(i);
        }
        assert_eq!(set.len(), 7);
        assert_eq!(
            set.iter().collect::<Vec<u64>>(),
            [5, 6, 7, 63, 64, 130, 199]
        );
        assert_eq!(set.runs(), [(5, 8), (63, 65), (130, 131), (199, 200)]);
        assert_eq!(BlockSet::all(70).runs(), [(0, 70)]);
        assert!(BlockSet::new(10).is_empty());
    }
    use crate::blockmap::BlockMap;
    use crate::capture::{CapturePlan, CaptureSettings, capture};
    use crate::dirty::DirtyBitmap;
    use crate::disk::MemDisk;
    use crate::ids::ServerId;

    const BS: usize = 4096;

    /// Block `kind` 0 is zero; others are patterns that repeat across blocks.
    fn image(kinds: &[u8], tail: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for (i, k) in kinds.iter().enumerate() {
            let len = if i + 1 == kinds.len() && tail > 0 {
                tail
            } else {
                BS
            };
            v.extend((0..len).map(|j| {
                if *k == 0 {
                    0
                } else {
                    (j as u8).wrapping_mul(*k) ^ k
                }
            }));
        }
        v
    }

    /// The oracle: block i differs when the target's bytes over its range,
    /// read as zero past the target's end, are not the snapshot's.
    fn naive_plan(snapshot: &[u8], target: &[u8]) -> Vec<u64> {
        (0..snapshot.len().div_ceil(BS))
            .filter(|&i| {
                let range = i * BS..((i + 1) * BS).min(snapshot.len());
                let have: Vec<u8> = range
                    .clone()
                    .map(|j| target.get(j).copied().unwrap_or(0))
                    .collect();
                have != snapshot[range]
            })
            .map(|i| i as u64)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn plan_matches_the_naive_oracle_and_apply_restores_exactly(
            kinds in proptest::collection::vec(0u8..4, 0..40),
            tail in 0usize..BS,
            target_kinds in proptest::collection::vec(0u8..4, 0..40),
            target_tail in 0usize..BS,
            grouped in proptest::bool::ANY,
        ) {
            let snapshot = image(&kinds, tail);
            let target = image(&target_kinds, target_tail);
            let dir = tempfile::tempdir().unwrap();
            let (store, _) = ChunkStore::open(dir.path(), std::sync::Arc::new(crate::fsio::StdFs)).unwrap();
            let settings = CaptureSettings { block_size: BS as u32, compression_level: 1, window_len: 5 * BS, group_len: if grouped { 3 * BS } else { 0 } };
            let plan_all = CapturePlan::full(snapshot.len() as u64, BS as u32, None);
            let captured = capture(&store, &MemDisk::new(snapshot.clone()), &settings, plan_all, &store.pin_scope(), &Progress::default()).unwrap();
            let manifest = Manifest::new(SnapshotId(1), ServerId(1), BS as u32, snapshot.len() as u64, captured.blocks).unwrap();

            let disk = MemDisk::new(target.clone());
            let p = plan(&manifest, &disk, 3 * BS, &Progress::default()).unwrap();
            prop_assert_eq!(&p.rewrite.iter().collect::<Vec<u64>>(), &naive_plan(&snapshot, &target));
            // The same target as a sparse file, its zero blocks holes: the
            // holes are not read, and the plan is the same.
            let sparse = dir.path().join("sparse.img");
            {
                use std::os::unix::fs::FileExt;
                let f = std::fs::File::create(&sparse).unwrap();
                f.set_len(target.len() as u64).unwrap();
                for (i, b) in target.chunks(BS).enumerate() {
                    if b.iter().any(|&x| x != 0) {
                        f.write_all_at(b, (i * BS) as u64).unwrap();
                    }
                }
            }
            let file = crate::disk::FileDisk::open(&sparse, false).unwrap();
            let p = plan(&manifest, &file, 3 * BS, &Progress::default()).unwrap();
            prop_assert_eq!(&p.rewrite.iter().collect::<Vec<u64>>(), &naive_plan(&snapshot, &target));
            let mut written = 0;
            restore(&store, &manifest, &disk, None, 3 * BS, true, &Progress::default(), &mut written).unwrap();
            prop_assert!(disk.contents() == snapshot);
            // Restoring again finds nothing to do.
            let again = plan(&manifest, &disk, 3 * BS, &Progress::default()).unwrap();
            prop_assert!(again.rewrite.is_empty());
        }
    }

    fn settings() -> CaptureSettings {
        CaptureSettings {
            block_size: BS as u32,
            compression_level: 1,
            window_len: 5 * BS,
            group_len: 0,
        }
    }

    fn manifest_of(id: u64, len: usize, blocks: BlockMap) -> Manifest {
        Manifest::new(SnapshotId(id), ServerId(1), BS as u32, len as u64, blocks).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// For random disks, random writes and random bitmaps that cover at
        /// least the written blocks: the incremental capture's manifest is
        /// the full capture's, and restoring either version from known
        /// state (delta) or by comparing gives the exact bytes.
        #[test]
        fn incremental_capture_equals_full_and_delta_restores_exactly(
            kinds in proptest::collection::vec(0u8..4, 1..40),
            tail in 0usize..BS,
            writes in proptest::collection::vec((0usize..40 * BS, 1usize..3 * BS, 0u8..3), 0..8),
            extra in proptest::collection::vec(0usize..40, 0..6),
            sparse_v2 in any::<bool>(),
        ) {
            let v1 = image(&kinds, tail);
            let len = v1.len();
            let mut v2 = v1.clone();
            let mut ranges = Vec::new();
            for (at, n, byte) in writes {
                let at = at % len;
                let n = n.min(len - at);
                v2[at..at + n].fill(byte);
                ranges.push((at as u64, n as u64));
            }
            let mut dirty = DirtyBitmap::from_ranges(len as u64, BS as u64, ranges).unwrap();
            for b in extra {
                if (b as u64) < dirty.len() {
                    dirty.set(b as u64);
                }
            }
            let runs = dirty.block_runs(BS as u32).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let (store, _) = ChunkStore::open(dir.path(), std::sync::Arc::new(crate::fsio::StdFs)).unwrap();
            let full = |bytes: &[u8]| {
                let plan = CapturePlan::full(len as u64, BS as u32, None);
                capture(&store, &MemDisk::new(bytes.to_vec()), &settings(), plan, &store.pin_scope(), &Progress::default()).unwrap()
            };
            let m1 = manifest_of(1, len, full(&v1).blocks);
            let m2_full = full(&v2);
            // A sparse image's data ranges: every non-zero block (a file
            // system would report at least those).
            let data: Vec<std::ops::Range<u64>> = (0..len.div_ceil(BS))
                .filter(|&i| v2[i * BS..((i + 1) * BS).min(len)].iter().any(|&b| b != 0))
                .map(|i| (i * BS) as u64..(((i + 1) * BS).min(len)) as u64)
                .collect();
            let plan = CapturePlan::incremental(m1.blocks(), &runs, BS as u32, sparse_v2.then_some(data.as_slice())).unwrap();
            let inc = capture(&store, &MemDisk::new(v2.clone()), &settings(), plan, &store.pin_scope(), &Progress::default()).unwrap();
            prop_assert_eq!(&inc.blocks, &m2_full.blocks);
            prop_assert_eq!(inc.stats.data_bytes, m2_full.stats.data_bytes);
            prop_assert!(inc.stats.blocks_read <= dirty.count());
            let m2 = manifest_of(2, len, inc.blocks);

            // The disk holds v2, known as m1 plus the dirty blocks: back to v1.
            let disk = MemDisk::new(v2.clone());
            let mut w = 0;
            let r = restore(&store, &m1, &disk, Some((&m1, &runs)), BS, true, &Progress::default(), &mut w).unwrap();
            prop_assert_eq!(r.method, RestoreMethod::Delta);
            prop_assert!(disk.contents() == v1);
            // The delta plan never rewrites less than a full compare would.
            let compared = naive_plan(&v1, &v2);
            let delta: Vec<u64> = plan_delta(&m1, &runs, &m1).unwrap().rewrite.iter().collect();
            prop_assert!(compared.iter().all(|i| delta.binary_search(i).is_ok()));
            // Now it holds v1, known as m1 with nothing dirty: on to v2.
            let r = restore(&store, &m2, &disk, Some((&m1, &[])), BS, true, &Progress::default(), &mut w).unwrap();
            prop_assert!(disk.contents() == v2);
            prop_assert_eq!(r.bytes_compared, 0);
            // Without knowledge, comparing gets the same bytes.
            let r = restore(&store, &m1, &disk, None, BS, true, &Progress::default(), &mut w).unwrap();
            prop_assert_eq!(r.method, RestoreMethod::Compare);
            prop_assert!(disk.contents() == v1);
        }
    }

    /// A bitmap that misses a written block is the embedder's bug; what
    /// happens is documented here: the snapshot keeps the parent's block.
    #[test]
    fn a_block_the_bitmap_misses_keeps_the_parents_bytes() {
        let v1 = image(&[1, 2, 3, 1], 0);
        let mut v2 = v1.clone();
        v2[BS..2 * BS].fill(9); // block 1 written
        v2[2 * BS..3 * BS].fill(8); // block 2 written, but not in the bitmap
        let dirty = DirtyBitmap::from_ranges(v1.len() as u64, BS as u64, [(BS as u64, 1)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (store, _) =
            ChunkStore::open(dir.path(), std::sync::Arc::new(crate::fsio::StdFs)).unwrap();
        let plan = CapturePlan::full(v1.len() as u64, BS as u32, None);
        let c1 = capture(
            &store,
            &MemDisk::new(v1.clone()),
            &settings(),
            plan,
            &store.pin_scope(),
            &Progress::default(),
        )
        .unwrap();
        let runs = dirty.block_runs(BS as u32).unwrap();
        let plan = CapturePlan::incremental(&c1.blocks, &runs, BS as u32, None).unwrap();
        let c2 = capture(
            &store,
            &MemDisk::new(v2.clone()),
            &settings(),
            plan,
            &store.pin_scope(),
            &Progress::default(),
        )
        .unwrap();
        assert_eq!(c2.stats.blocks_read, 1);
        assert_eq!(
            c2.blocks.get(1).unwrap(),
            Some(ChunkId::of(&v2[BS..2 * BS]))
        );
        assert_eq!(
            c2.blocks.get(2).unwrap(),
            c1.blocks.get(2).unwrap(),
            "the missed block keeps the parent's chunk"
        );
    }
}
