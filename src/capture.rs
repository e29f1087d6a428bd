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
//! With grouped frames (the compact setting) the first stage leaves new
//! chunks uncompressed; a packer thread between the two stages cuts them
//! into runs (in window order, up to `group_len` bytes) and compresses each
//! run as one group record, one rayon task per run, while the next window
//! is classified and the previous one appended.
//!
//! Memory is bounded by `WINDOWS_IN_FLIGHT` window buffers, reused, whatever
//! the disk size.
//!
//! The caller makes the chunks durable (`ChunkStore::sync`) before writing
//! the manifest.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::mpsc::{channel, sync_channel};

use rayon::prelude::*;

use crate::blockmap::BlockMap;
use crate::disk::{Disk, is_zero};
use crate::error::{Error, Result};
use crate::ids::ChunkId;
use crate::job::Progress;
use crate::manifest::block_count;
use crate::store::pack::{self, ChunkRecord, GroupRecord, MAX_GROUP_MEMBERS};
use crate::store::{Appended, ChunkStore, NewRecord, Pins};
use crate::types::CaptureStats;
use crate::window::task_len;

/// Window buffers in use at once: one being filled and classified, one
/// queued for the writer, one being appended, and one spare, so that the
/// reader never waits for the writer to hand a buffer back (3 -> 4: first
/// capture of the benchmark image 1.68-1.80 s -> 1.63-1.69 s, seven
/// alternating A/B pairs, docs/BENCHMARKS.md).
pub const WINDOWS_IN_FLIGHT: usize = 4;

/// Settings of one capture.
#[derive(Clone, Copy, Debug)]
pub struct CaptureSettings {
    pub block_size: u32,
    pub compression_level: i32,
    pub window_len: usize,
    /// Bytes of new chunks compressed together as one group record; 0 (or
    /// less than two blocks) stores one frame per chunk.
    pub group_len: usize,
}

impl CaptureSettings {
    /// Members per group record, when groups are on.
    fn group_members(&self) -> Option<usize> {
        let n = (self.group_len / self.block_size as usize).min(MAX_GROUP_MEMBERS);
        (n >= 2).then_some(n)
    }
}

/// A captured disk: one entry per block, and what it took.
pub struct Captured {
    pub blocks: BlockMap,
    pub stats: CaptureStats,
}

/// What the parallel stage found for one block.
enum Block {
    Zero,
    Known(ChunkId),
    /// Not in the store: to append, compressed when that paid.
    New(ChunkId, Option<Vec<u8>>),
    /// Not in the store, and to be compressed with the new chunks around
    /// it (grouped frames).
    Fresh(ChunkId),
    /// Not in the store, and a member of the window's group record number
    /// `.1`; the group is appended at its first member (`.2`).
    Grouped(ChunkId, usize, bool),
}

impl Block {
    fn id(&self) -> Option<&ChunkId> {
        match self {
            Block::Zero => None,
            Block::Known(id) | Block::New(id, _) | Block::Fresh(id) | Block::Grouped(id, ..) => {
                Some(id)
            }
        }
    }
}

/// Zero check, hash, dedup look-up and, for a new chunk, compression
/// (unless it is to be grouped).
fn classify(store: &ChunkStore, bytes: &[u8], settings: &CaptureSettings) -> Result<Block> {
    if is_zero(bytes) {
        return Ok(Block::Zero);
    }
    let id = ChunkId::of(bytes);
    if store.contains(&id) {
        return Ok(Block::Known(id));
    }
    if settings.group_members().is_some() {
        return Ok(Block::Fresh(id));
    }
    let level = settings.compression_level;
    Ok(Block::New(id, pack::compress(bytes, level)?))
}

/// The new chunks of the windows grouped lately: enough to cover every
/// window handed to the writer but perhaps not yet appended.
#[derive(Default)]
struct EarlierWindows(std::collections::VecDeque<HashSet<ChunkId>>);

impl EarlierWindows {
    fn contains(&self, id: &ChunkId) -> bool {
        self.0.iter().any(|w| w.contains(id))
    }

    fn push(&mut self, window: HashSet<ChunkId>) {
        self.0.push_back(window);
        if self.0.len() > WINDOWS_IN_FLIGHT + 1 {
            self.0.pop_front();
        }
    }
}

/// A window's group records, numbered as its `Block::Grouped` entries say.
type Grouped = Vec<GroupRecord>;

/// Compresses the window's fresh chunks in runs of up to
/// `settings.group_members()`, one rayon task per run, and marks each
/// block with the record it goes into. A run of one, or one that does not
/// save 1/32 as a group, is compressed chunk by chunk. The runs of a window
/// are of equal length, so that its tasks keep both cores busy to the end.
///
/// A chunk already stored (since its classification, by another capture),
/// new in one of the `earlier` windows (perhaps not appended yet), or met
/// twice in the window is stored once: in a group it could not be skipped
/// at the append like a lone record. Adds this window's new chunks to
/// `earlier`.
fn group_window(
    store: &ChunkStore,
    classified: &mut [Block],
    window: &[u8],
    settings: &CaptureSettings,
    earlier: &mut EarlierWindows,
) -> Result<Grouped> {
    let Some(per_group) = settings.group_members() else {
        return Ok(Vec::new());
    };
    let bs = settings.block_size as usize;
    let bytes_of = |k: usize| &window[k * bs..((k + 1) * bs).min(window.len())];
    let mut seen = HashSet::new();
    let mut fresh: Vec<(usize, ChunkId)> = Vec::new();
    for (k, b) in classified.iter_mut().enumerate() {
        if let Block::Fresh(id) = *b {
            // Pinned since its look-up, so once stored it stays stored.
            if !earlier.contains(&id) && seen.insert(id) && !store.contains(&id) {
                fresh.push((k, id));
            } else {
                *b = Block::Known(id);
            }
        }
    }
    let per_group = fresh
        .len()
        .div_ceil(fresh.len().div_ceil(per_group).max(1))
        .max(1);
    enum Packed {
        Group(GroupRecord),
        Each(Vec<Option<Vec<u8>>>),
    }
    let level = settings.compression_level;
    let packed: Vec<Packed> = fresh
        .par_chunks(per_group)
        .map(|run| -> Result<Packed> {
            let members: Vec<(ChunkId, &[u8])> =
                run.iter().map(|&(k, id)| (id, bytes_of(k))).collect();
            if members.len() >= 2
                && let Some(g) = GroupRecord::compress(&members, level)?
            {
                return Ok(Packed::Group(g));
            }
            let each = members
                .iter()
                .map(|(_, b)| pack::compress(b, level))
                .collect::<Result<_>>()?;
            Ok(Packed::Each(each))
        })
        .collect::<Result<_>>()?;
    earlier.push(seen);
    let mut groups = Vec::new();
    for (run, packed) in fresh.chunks(per_group).zip(packed) {
        match packed {
            Packed::Group(g) => {
                for (j, &(k, id)) in run.iter().enumerate() {
                    classified[k] = Block::Grouped(id, groups.len(), j == 0);
                }
                groups.push(g);
            }
            Packed::Each(each) => {
                for (&(k, id), z) in run.iter().zip(each) {
                    classified[k] = Block::New(id, z);
                }
            }
        }
    }
    Ok(groups)
}

/// Stage 2 for one window: classifies its blocks and records them in
/// `blocks` and `stats` (all but the append counts).
#[cfg(feature = "testing")]
fn classify_window(
    store: &ChunkStore,
    window: &[u8],
    settings: &CaptureSettings,
    blocks: &mut Vec<Option<ChunkId>>,
    stats: &mut CaptureStats,
) -> Result<(Vec<Block>, Grouped)> {
    let bs = settings.block_size as usize;
    let mut classified: Vec<Block> = window
        .par_chunks(bs)
        .map(|b| classify(store, b, settings))
        .collect::<Result<_>>()?;
    let groups = group_window(
        store,
        &mut classified,
        window,
        settings,
        &mut EarlierWindows::default(),
    )?;
    record(&classified, window, bs, blocks, stats);
    Ok((classified, groups))
}

/// Adds classified blocks to the manifest entries and the stats.
#[cfg(feature = "testing")]
fn record(
    classified: &[Block],
    window: &[u8],
    bs: usize,
    blocks: &mut Vec<Option<ChunkId>>,
    stats: &mut CaptureStats,
) {
    for (b, bytes) in classified.iter().zip(window.chunks(bs)) {
        match b.id() {
            None => {
                stats.zero_blocks += 1;
                blocks.push(None);
            }
            Some(id) => {
                stats.data_blocks += 1;
                stats.data_bytes += bytes.len() as u64;
                blocks.push(Some(*id));
            }
        }
    }
}

/// Stage 3 for one window: appends its new chunks and groups in block
/// order.
fn append_window(
    store: &ChunkStore,
    window: &[u8],
    block_size: usize,
    classified: &[Block],
    groups: &[GroupRecord],
) -> Result<Appended> {
    let records = classified
        .iter()
        .zip(window.chunks(block_size))
        .filter_map(|(b, raw)| match b {
            Block::New(id, compressed) => Some(NewRecord::Chunk(ChunkRecord {
                id: *id,
                raw,
                compressed: compressed.as_deref(),
            })),
            Block::Grouped(_, g, true) => groups.get(*g).map(NewRecord::Group),
            _ => None,
        });
    store.append(records)
}

fn add(stats: &mut CaptureStats, a: Appended) {
    stats.new_chunks += a.chunks;
    stats.new_raw_bytes += a.raw_bytes;
    stats.new_stored_bytes += a.stored_bytes;
}

/// The hot core for one window held in memory, without the reader and
/// writer threads (benches): classify, then append.
#[cfg(feature = "testing")]
pub fn ingest_window(
    store: &ChunkStore,
    window: &[u8],
    settings: &CaptureSettings,
    blocks: &mut Vec<Option<ChunkId>>,
    stats: &mut CaptureStats,
) -> Result<()> {
    let (classified, groups) = classify_window(store, window, settings, blocks, stats)?;
    let bs = settings.block_size as usize;
    let appended = append_window(store, window, bs, &classified, &groups)?;
    add(stats, appended);
    Ok(())
}

/// What a capture reads, and what it takes for every block it does not.
#[derive(Clone, Debug)]
pub struct CapturePlan {
    /// One entry per block of the disk: the entry of a block not read
    /// (a parent's chunk, or zero for a hole).
    pub base: BlockMap,
    /// Runs of block indexes to read, ascending and disjoint.
    pub read: Vec<Range<u64>>,
}

impl CapturePlan {
    /// Every block of a `len`-byte disk, but the holes `data` leaves out
    /// (ranges from [`Disk::data_ranges`]), which are zero without reading.
    pub fn full(len: u64, block_size: u32, data: Option<&[Range<u64>]>) -> Self {
        let blocks = block_count(len, block_size);
        let read = match data {
            Some(data) => data_block_runs(data, block_size),
            None => std::iter::once(0..blocks).collect(),
        };
        CapturePlan {
            base: BlockMap::zeros(blocks),
            read,
        }
    }

    /// The `dirty` blocks of a disk that otherwise equals `parent`, but the
    /// dirty blocks in holes, which are zero without reading.
    pub fn incremental(
        parent: &BlockMap,
        dirty: &[Range<u64>],
        block_size: u32,
        data: Option<&[Range<u64>]>,
    ) -> Result<Self> {
        let mut base = parent.clone();
        let read = match data {
            None => dirty.to_vec(),
            Some(data) => {
                let read = intersect(dirty, &data_block_runs(data, block_size));
                // Dirty blocks outside the data are holes now.
                for hole in subtract(dirty, &read) {
                    base.clear(hole)?;
                }
                read
            }
        };
        Ok(CapturePlan { base, read })
    }
}

/// The blocks that byte ranges touch, as merged runs.
pub(crate) fn data_block_runs(data: &[Range<u64>], block_size: u32) -> Vec<Range<u64>> {
    let bs = u64::from(block_size);
    let mut runs: Vec<Range<u64>> = Vec::new();
    for r in data.iter().filter(|r| r.start < r.end) {
        let (first, end) = (r.start / bs, r.end.div_ceil(bs));
        match runs.last_mut() {
            Some(last) if last.end >= first => last.end = last.end.max(end),
            _ => runs.push(first..end),
        }
    }
    runs
}

/// The blocks in both run lists (each ascending and disjoint).
fn intersect(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (start, end) = (a[i].start.max(b[j].start), a[i].end.min(b[j].end));
        if start < end {
            out.push(start..end);
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The blocks of `a` not in `b`, where `b` is a subset of `a`'s runs' span.
fn subtract(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut j = 0;
    for r in a {
        let mut at = r.start;
        while j < b.len() && b[j].end <= at {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].start < r.end {
            if b[k].start > at {
                out.push(at..b[k].start);
            }
            at = at.max(b[k].end);
            k += 1;
        }
        if at < r.end {
            out.push(at..r.end);
        }
    }
    out
}

/// Blocks per window (or restore batch) for `blocks` blocks in all: a
/// window's worth, but at least `WINDOWS_MIN` windows when there is little
/// to do, so that appending (or writing) one overlaps working on the next
/// instead of waiting for one large last window.
pub fn blocks_per_window(blocks: u64, window_len: usize, block_size: usize) -> u64 {
    let full = (window_len.max(block_size) / block_size) as u64;
    let task = (task_len(block_size as u32) / block_size) as u64;
    full.min(blocks.div_ceil(WINDOWS_MIN).max(task))
}

/// See [`blocks_per_window`].
const WINDOWS_MIN: u64 = 8;

fn stats_blocks(runs: &[Range<u64>]) -> u64 {
    runs.iter().map(|r| r.end - r.start).sum()
}

/// Splits the runs into windows of at most `per_window` blocks each.
fn windows(runs: &[Range<u64>], per_window: u64) -> Vec<Vec<Range<u64>>> {
    let mut out = Vec::new();
    let mut current: Vec<Range<u64>> = Vec::new();
    let mut room = per_window;
    for r in runs {
        let mut at = r.start;
        while at < r.end {
            let n = (r.end - at).min(room);
            current.push(at..at + n);
            at += n;
            room -= n;
            if room == 0 {
                out.push(std::mem::take(&mut current));
                room = per_window;
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Reads the planned blocks of `disk` and stores the chunks the store
/// lacks. Blocks are read window by window, each window a list of runs
/// laid end to end in one buffer; the disk's last block, the only short
/// one, can only end a window.
///
/// Every chunk the capture references is added to `pins` under the
/// store's look-up guard, in the same step as its look-up, so garbage
/// collection never removes it while the capture runs.
pub fn capture(
    store: &ChunkStore,
    disk: &dyn Disk,
    settings: &CaptureSettings,
    plan: CapturePlan,
    pins: &Pins,
    progress: &Progress,
) -> Result<Captured> {
    let len = disk.len()?;
    let bs = settings.block_size as usize;
    let bs64 = bs as u64;
    if plan.base.len() != block_count(len, settings.block_size) {
        return Err(Error::DiskChanged(format!(
            "it is {len} bytes now, not the length this capture was planned for"
        )));
    }
    let block_len = |i: u64| (len - i * bs64).min(bs64) as usize;
    let to_read: u64 = plan
        .read
        .iter()
        .flat_map(|r| r.clone())
        .map(|i| block_len(i) as u64)
        .sum();
    progress.start(to_read);
    let per_window = blocks_per_window(stats_blocks(&plan.read), settings.window_len, bs);
    let task_blocks = (task_len(settings.block_size) / bs) as u64;
    let mut blocks = plan.base;
    let mut stats = CaptureStats {
        image_len: len,
        blocks_read: stats_blocks(&plan.read),
        bytes_read: to_read,
        ..CaptureStats::default()
    };
    let (to_packer, for_packer) = sync_channel::<(Vec<u8>, Vec<Block>)>(1);
    let (to_writer, for_writer) = sync_channel::<(Vec<u8>, Vec<Block>, Grouped)>(1);
    let (recycle, recycled) = channel::<Vec<u8>>();
    // Grouped captures have one more stage, and one more window in it.
    let grouped = settings.group_members().is_some();
    for _ in 0..WINDOWS_IN_FLIGHT + usize::from(grouped) {
        let _ = recycle.send(Vec::new());
    }
    let (read, written) = std::thread::scope(|scope| {
        // Groups a window's new chunks (compressing them on the rayon pool)
        // while the next window is classified and the previous appended;
        // passes windows through when groups are off.
        let packer = scope.spawn(move || -> Result<()> {
            let mut earlier = EarlierWindows::default();
            for (window, mut classified) in for_packer {
                let groups = group_window(store, &mut classified, &window, settings, &mut earlier)?;
                if to_writer.send((window, classified, groups)).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let writer = scope.spawn(move || -> Result<Appended> {
            let mut total = Appended::default();
            for (window, classified, groups) in for_writer {
                let a = append_window(store, &window, bs, &classified, &groups)?;
                // A dense disk of new chunks would grow the index's
                // overlay without end: a new table when due (best effort:
                // the chunks are found in memory until one is written).
                if a.chunks > 0 {
                    let _ = store.persist_index_if_due();
                }
                total.chunks += a.chunks;
                total.raw_bytes += a.raw_bytes;
                total.stored_bytes += a.stored_bytes;
                progress.add(window.len() as u64);
                let _ = recycle.send(window);
            }
            Ok(total)
        });
        let read = (|| -> Result<()> {
            for segments in windows(&plan.read, per_window) {
                // Fails only when the writer stopped; its error is returned below.
                let Ok(mut window) = recycled.recv() else {
                    break;
                };
                let n: usize = segments.iter().flat_map(|r| r.clone()).map(block_len).sum();
                crate::window::fit(&mut window, n);
                let classified = {
                    let _guard = store.lookup_guard();
                    let classified = read_and_classify(
                        store,
                        disk,
                        settings,
                        &segments,
                        task_blocks,
                        &mut window,
                        len,
                    )?;
                    pins.add(classified.iter().filter_map(Block::id));
                    classified
                };
                let mut k = 0;
                for r in &segments {
                    for i in r.clone() {
                        blocks.set(i, classified[k].id().copied())?;
                        k += 1;
                    }
                }
                if to_packer.send((window, classified)).is_err() {
                    break;
                }
            }
            Ok(())
        })();
        drop(to_packer);
        let packed = packer
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("the capture packer panicked".into())));
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("the capture writer panicked".into())));
        (read.and(packed), written)
    });
    // The writer's error first: it is the cause when both failed.
    add(&mut stats, written?);
    read?;
    for d in blocks.data() {
        let (i, _) = d?;
        stats.data_blocks += 1;
        stats.data_bytes += block_len(i) as u64;
    }
    stats.zero_blocks = blocks.len() - stats.data_blocks;
    Ok(Captured { blocks, stats })
}

/// Reads one window's runs into `window` (laid end to end), one rayon task
/// per `task_blocks` blocks, and classifies each block right after its
/// task read it. Returns the blocks in window order.
fn read_and_classify(
    store: &ChunkStore,
    disk: &dyn Disk,
    settings: &CaptureSettings,
    segments: &[Range<u64>],
    task_blocks: u64,
    window: &mut [u8],
    len: u64,
) -> Result<Vec<Block>> {
    let bs = u64::from(settings.block_size);
    let mut pieces: Vec<(u64, &mut [u8])> = Vec::new();
    let mut rest = window;
    for r in segments {
        let mut at = r.start;
        while at < r.end {
            let end = (at + task_blocks).min(r.end);
            let bytes = (end * bs).min(len) - at * bs;
            let (piece, tail) = rest.split_at_mut(bytes as usize);
            pieces.push((at * bs, piece));
            rest = tail;
            at = end;
        }
    }
    if disk.reads_best_in_bulk() {
        return read_in_bulk_and_classify(store, disk, settings, pieces);
    }
    let per_piece = pieces
        .into_par_iter()
        .map(|(offset, piece)| {
            let read = disk.read_at(piece, offset)?;
            if read < piece.len() {
                return Err(Error::DiskChanged(format!(
                    "it shrank during the capture (expected {len} bytes, ended at {})",
                    offset + read as u64
                )));
            }
            piece
                .chunks(bs as usize)
                .map(|b| classify(store, b, settings))
                .collect::<Result<Vec<Block>>>()
        })
        .collect::<Result<Vec<Vec<Block>>>>()?;
    Ok(per_piece.into_iter().flatten().collect())
}

/// [`read_and_classify`] for a disk that reads best in bulk (NBD): the
/// pieces are read in batches of about [`crate::window::BULK_PIECE`]
/// bytes, each batch one pipelined call, and each batch's read overlaps the
/// classification of the batch before it.
fn read_in_bulk_and_classify(
    store: &ChunkStore,
    disk: &dyn Disk,
    settings: &CaptureSettings,
    pieces: Vec<(u64, &mut [u8])>,
) -> Result<Vec<Block>> {
    let mut batches: Vec<Vec<(u64, &mut [u8])>> = Vec::new();
    let mut bytes = usize::MAX;
    for piece in pieces {
        if bytes >= crate::window::BULK_PIECE {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += piece.1.len();
        if let Some(batch) = batches.last_mut() {
            batch.push(piece);
        }
    }
    let classify_batch = |batch: &[(u64, &mut [u8])]| -> Result<Vec<Block>> {
        let per_piece = batch
            .par_iter()
            .map(|(_, piece)| {
                piece
                    .chunks(settings.block_size as usize)
                    .map(|b| classify(store, b, settings))
                    .collect::<Result<Vec<Block>>>()
            })
            .collect::<Result<Vec<Vec<Block>>>>()?;
        Ok(per_piece.into_iter().flatten().collect())
    };
    crate::window::read_ahead(
        &mut batches,
        |batch| disk.read_many_at(batch),
        |batch, ()| classify_batch(batch),
    )
}

/// Clean blocks an incremental capture always samples (when the disk has
/// that many), however little changed.
pub const SAMPLE_FLOOR: u64 = 64;

/// What rehashing a sample of the blocks a dirty bitmap calls clean found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleOutcome {
    pub checked: u64,
    pub mismatches: u64,
}

/// Rehashes about `rate` of the blocks outside `dirty` (at least one when
/// any is clean and `rate` > 0), chosen at random from `seed`, and counts
/// those that no longer hold what `parent` says: the check that catches a
/// change tracker that missed writes.
pub fn sample_check(
    disk: &dyn Disk,
    parent: &BlockMap,
    dirty: &[Range<u64>],
    block_size: u32,
    rate: f64,
    seed: u64,
) -> Result<SampleOutcome> {
    let blocks = parent.len();
    let dirty_count: u64 = dirty.iter().map(|r| r.end - r.start).sum();
    let clean = blocks - dirty_count.min(blocks);
    if clean == 0 || rate <= 0.0 {
        return Ok(SampleOutcome::default());
    }
    let want = ((clean as f64 * rate).ceil() as u64).clamp(1, clean);
    // Its cost follows what changed, not the disk's size: at most a
    // quarter of the blocks the capture reads anyway (at least
    // SAMPLE_FLOOR), unless every clean block is asked for.
    let want = if rate >= 1.0 {
        want
    } else {
        want.min(SAMPLE_FLOOR.max(dirty_count / 4))
    };
    let is_dirty = |i: u64| {
        let k = dirty.partition_point(|r| r.end <= i);
        k < dirty.len() && dirty[k].start <= i
    };
    let mut rng = crate::rng::Rng::new(seed);
    let mut picked = std::collections::BTreeSet::new();
    // Random probes; a mostly dirty disk may need a few per clean block.
    for _ in 0..want.saturating_mul(8) {
        if picked.len() as u64 == want {
            break;
        }
        let i = rng.below(blocks);
        if !is_dirty(i) {
            picked.insert(i);
        }
    }
    let len = disk.len()?;
    let bs = u64::from(block_size);
    let picked: Vec<u64> = picked.into_iter().collect();
    let differs = |i: u64, bytes: &[u8], read: usize, n: usize| -> Result<u64> {
        let same = match &parent.get(i)? {
            None => is_zero(bytes),
            Some(id) => read == n && !is_zero(bytes) && ChunkId::of(bytes) == *id,
        };
        Ok(u64::from(!same))
    };
    if disk.reads_best_in_bulk() {
        // One pipelined call for the whole sample (NBD), not a round trip
        // a block.
        let lens: Vec<usize> = picked
            .iter()
            .map(|&i| (len.saturating_sub(i * bs)).min(bs) as usize)
            .collect();
        let mut buf = vec![0u8; lens.iter().sum()];
        let mut parts: Vec<(u64, &mut [u8])> = Vec::with_capacity(picked.len());
        let mut rest = buf.as_mut_slice();
        for (&i, &n) in picked.iter().zip(&lens) {
            let (part, tail) = rest.split_at_mut(n);
            parts.push((i * bs, part));
            rest = tail;
        }
        disk.read_many_at(&mut parts)?;
        let mismatches = parts
            .par_iter()
            .zip(&picked)
            .map(|((_, bytes), &i)| differs(i, bytes, bytes.len(), bytes.len()))
            .sum::<Result<u64>>()?;
        return Ok(SampleOutcome {
            checked: picked.len() as u64,
            mismatches,
        });
    }
    let mismatches = picked
        .par_iter()
        .map_init(
            || vec![0u8; bs as usize],
            |buf, &i| -> Result<u64> {
                let n = (len.saturating_sub(i * bs)).min(bs) as usize;
                let read = disk.read_at(&mut buf[..n], i * bs)?;
                differs(i, &buf[..read], read, n)
            },
        )
        .sum::<Result<u64>>()?;
    Ok(SampleOutcome {
        checked: picked.len() as u64,
        mismatches,
    })
}
