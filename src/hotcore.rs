//! The hot core, exposed for the criterion benches (`benches/hotcore.rs`)
//! only: not a stable API. It runs exactly the code capture and restore
//! run, on bytes in memory, without the catalog or a disk read.

pub use crate::blockmap::BlockMap;
use std::ops::Range;
use std::path::Path;

use crate::capture::{self, CapturePlan, CaptureSettings};
use crate::disk::{Disk, MemDisk};
use crate::error::Result;
use crate::ids::{ChunkId, ServerId, SnapshotId};
use crate::job::Progress;
use crate::manifest::Manifest;
use crate::restore::{RestorePlan, apply, plan_delta};
use crate::store::ChunkStore;
use crate::types::CaptureStats;

/// A chunk store in `dir` and the capture settings to use with it.
pub struct HotCore {
    store: ChunkStore,
    settings: CaptureSettings,
}

impl HotCore {
    pub fn open(dir: &Path, block_size: u32, compression_level: i32) -> Result<Self> {
        let (store, _) = ChunkStore::open(dir, std::sync::Arc::new(crate::fsio::StdFs))?;
        Ok(HotCore {
            store,
            settings: CaptureSettings {
                block_size,
                compression_level,
                window_len: crate::options::DEFAULT_WINDOW_LEN,
                group_len: 0,
            },
        })
    }

    /// The capture pipeline over a disk in memory: reader thread, zero
    /// check, BLAKE3, index look-up, and for new chunks zstd, framing and
    /// the append on the writer thread. Returns the manifest entries and
    /// the stats.
    pub fn capture(&self, disk: &MemDisk) -> Result<(BlockMap, CaptureStats)> {
        let plan = CapturePlan::full(disk.len()?, self.settings.block_size, None);
        self.run(disk, plan)
    }

    /// The incremental capture: reads only the `dirty` block runs and takes
    /// every other block from `parent`.
    pub fn capture_incremental(
        &self,
        disk: &MemDisk,
        parent: &BlockMap,
        dirty: &[Range<u64>],
    ) -> Result<(BlockMap, CaptureStats)> {
        let plan = CapturePlan::incremental(parent, dirty, self.settings.block_size, None)?;
        self.run(disk, plan)
    }

    fn run(&self, disk: &MemDisk, plan: CapturePlan) -> Result<(BlockMap, CaptureStats)> {
        let pins = self.store.pin_scope();
        let c = capture::capture(
            &self.store,
            disk,
            &self.settings,
            plan,
            &pins,
            &Progress::default(),
        )?;
        Ok((c.blocks, c.stats))
    }

    /// Only the parallel stage and the append for bytes already in memory,
    /// without the pipeline's threads.
    pub fn ingest(&self, bytes: &[u8]) -> Result<(Vec<Option<ChunkId>>, CaptureStats)> {
        let mut blocks = Vec::new();
        let mut stats = CaptureStats::default();
        for window in bytes.chunks(self.settings.window_len) {
            capture::ingest_window(&self.store, window, &self.settings, &mut blocks, &mut stats)?;
        }
        Ok((blocks, stats))
    }

    /// Restore's apply step: writes every block of `blocks` to `disk`
    /// (reading, checking and decompressing each chunk).
    pub fn restore(&self, blocks: BlockMap, image_len: u64, disk: &dyn Disk) -> Result<u64> {
        let manifest = Manifest::new(
            SnapshotId(0),
            ServerId(0),
            self.settings.block_size,
            image_len,
            blocks,
        )?;
        let plan = RestorePlan {
            snapshot: SnapshotId(0),
            blocks_total: manifest.block_count(),
            rewrite: crate::restore::BlockSet::all(manifest.block_count()),
            bytes_to_write: image_len,
            bytes_compared: 0,
        };
        let mut written = 0;
        apply(
            &self.store,
            &manifest,
            disk,
            &plan,
            self.settings.window_len,
            &Progress::default(),
            &mut written,
        )?;
        Ok(written)
    }

    /// A delta restore, without the final fsync: `disk` holds `base` but
    /// for the `dirty` block runs; writes the blocks where `target`
    /// differs from it. Returns the blocks rewritten.
    pub fn restore_delta(
        &self,
        base: BlockMap,
        dirty: &[Range<u64>],
        target: BlockMap,
        image_len: u64,
        disk: &dyn Disk,
    ) -> Result<u64> {
        let bs = self.settings.block_size;
        let base = Manifest::new(SnapshotId(0), ServerId(0), bs, image_len, base)?;
        let target = Manifest::new(SnapshotId(1), ServerId(0), bs, image_len, target)?;
        let plan = plan_delta(&base, dirty, &target)?;
        let mut written = 0;
        apply(
            &self.store,
            &target,
            disk,
            &plan,
            self.settings.window_len,
            &Progress::default(),
            &mut written,
        )?;
        Ok(plan.rewrite.len())
    }
}
