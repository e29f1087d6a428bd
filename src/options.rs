//! How to open a store: [`EngineOptions`], its defaults, and the stop hook.

use std::path::Path;
use std::sync::Arc;

use crate::disk::{DiskOpener, default_opener};
use crate::engine::{Engine, Server};
use crate::error::Result;
use crate::fsio::{StdFs, StoreFs};

/// Block size of a new store unless chosen otherwise: 64 KiB, the
/// granularity of QEMU dirty bitmaps.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;
/// zstd level for new chunks unless chosen otherwise: level 1 (`fast`).
/// On the benchmark disk it captures 14-17% faster than level 3 and
/// stores 3% more (docs/BENCHMARKS.md).
pub const DEFAULT_COMPRESSION_LEVEL: i32 = COMPRESSION_FAST;
/// The `fast` setting: zstd level 1.
pub const COMPRESSION_FAST: i32 = 1;
/// The `balanced` setting: zstd level 3.
pub const COMPRESSION_BALANCED: i32 = 3;
/// The `compact` setting's zstd level: level 3, with runs of new chunks
/// compressed together in groups of up to [`COMPACT_GROUP_LEN`] bytes
/// ([`EngineOptions::group_frames`]). On the benchmark disk it stored
/// 0.99 of borg's bytes in 2.6 s; level 9 with one frame per chunk stored
/// 1.08 of them in 7.6 s (docs/BENCHMARKS.md).
pub const COMPRESSION_COMPACT: i32 = 3;
/// Bytes of new chunks the `compact` setting compresses as one frame.
pub const COMPACT_GROUP_LEN: u32 = 4 << 20;
/// Share of the blocks a dirty bitmap calls clean that an incremental
/// capture rehashes as a check of the bitmap, unless chosen otherwise.
pub const DEFAULT_CLEAN_SAMPLE_RATE: f64 = 0.01;
/// Garbage bytes, as a share of the needed bytes, that garbage collection
/// leaves in packs rather than rewrite them, unless chosen otherwise.
pub const DEFAULT_GC_MAX_UNUSED: f64 = 0.05;
/// Bytes read from a disk per window unless chosen otherwise.
pub const DEFAULT_WINDOW_LEN: usize = 16 << 20;

/// Called before a restore rewrites a server's disk; must stop the server.
/// An `Err` cancels the restore before anything is written.
pub type StopHook = Arc<dyn Fn(&Server) -> std::result::Result<(), String> + Send + Sync>;

/// Options for [`EngineOptions::open`]; each setter names its default.
#[derive(Clone)]
pub struct EngineOptions {
    pub(crate) create: bool,
    pub(crate) block_size: Option<u32>,
    pub(crate) compression_level: Option<i32>,
    pub(crate) group_len: Option<u32>,
    pub(crate) window_len: usize,
    pub(crate) stop_hook: Option<StopHook>,
    pub(crate) disk_opener: DiskOpener,
    pub(crate) change_tracking: bool,
    pub(crate) clean_sample_rate: f64,
    pub(crate) gc_max_unused: f64,
    pub(crate) auto_gc: bool,
    pub(crate) store_fs: Arc<dyn StoreFs>,
    pub(crate) read_only: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            create: true,
            block_size: None,
            compression_level: None,
            group_len: None,
            window_len: DEFAULT_WINDOW_LEN,
            stop_hook: None,
            disk_opener: default_opener(),
            change_tracking: false,
            clean_sample_rate: DEFAULT_CLEAN_SAMPLE_RATE,
            gc_max_unused: DEFAULT_GC_MAX_UNUSED,
            auto_gc: false,
            store_fs: Arc::new(StdFs),
            read_only: false,
        }
    }
}

impl EngineOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Create the store when the directory holds none. Default: true.
    pub fn create(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// Block size of a new store: a power of two from 4 KiB to 4 MiB.
    /// Default: 64 KiB. Fixed at creation; opening an existing store with
    /// another size is an error.
    pub fn block_size(mut self, bytes: u32) -> Self {
        self.block_size = Some(bytes);
        self
    }

    /// zstd level for new chunks of a new store, 1 to 19 (see
    /// [`COMPRESSION_FAST`] (the default), [`COMPRESSION_BALANCED`],
    /// [`COMPRESSION_COMPACT`]). A store-level setting, fixed at creation;
    /// [`Engine::set_compression_level`] changes it later.
    pub fn compression_level(mut self, level: i32) -> Self {
        self.compression_level = Some(level);
        self
    }

    /// Compresses runs of new chunks together, up to `bytes` per frame
    /// (at least two blocks, at most 4 MiB), for a new store: more context
    /// for zstd, so fewer bytes, at the cost of decompressing a whole group
    /// to read one chunk of it. 0 (the default) stores one frame per chunk.
    /// A store-level setting like the level; [`Engine::set_group_len`]
    /// changes it later.
    pub fn group_frames(mut self, bytes: u32) -> Self {
        self.group_len = Some(bytes);
        self
    }

    /// Bytes read per window during capture and restore. Default: 16 MiB.
    /// Memory use is a few windows, whatever the disk size.
    pub fn window_len(mut self, bytes: usize) -> Self {
        self.window_len = bytes;
        self
    }

    /// Called to stop a server before a restore writes its disk.
    /// Default: none (the embedder stops servers itself).
    pub fn stop_hook(
        mut self,
        hook: impl Fn(&Server) -> std::result::Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.stop_hook = Some(Arc::new(hook));
        self
    }

    /// How disks are opened. Default: image files and block devices.
    pub fn disk_opener(mut self, opener: DiskOpener) -> Self {
        self.disk_opener = opener;
        self
    }

    /// Track guest writes: the embedder promises to report every write to
    /// every server's disk with [`Engine::record_write`] while the store is
    /// open, and snapshots and restores then read and write only what
    /// changed (see [`Engine::record_write`]). Default: off, and a store
    /// opened without it forgets any tracking, since nobody reports the
    /// writes made meanwhile.
    pub fn change_tracking(mut self, on: bool) -> Self {
        self.change_tracking = on;
        self
    }

    /// Share (0 to 1) of the blocks a dirty bitmap calls clean that an
    /// incremental capture rehashes to check the bitmap; any changed block
    /// among them switches the capture to a full rehash. Default: 0.01.
    pub fn clean_sample_rate(mut self, rate: f64) -> Self {
        self.clean_sample_rate = if rate.is_finite() {
            rate.clamp(0.0, 1.0)
        } else {
            DEFAULT_CLEAN_SAMPLE_RATE
        };
        self
    }

    /// Garbage collection rewrites the packs with the most garbage until
    /// the garbage left is at most this share of the needed bytes (0 to
    /// 1; 0 rewrites every pack holding any). Packs with nothing needed
    /// are always deleted. Default: 0.05, so a collection after a few
    /// deletes rewrites little, and the store stays within 5% of what its
    /// snapshots need.
    pub fn gc_max_unused(mut self, share: f64) -> Self {
        self.gc_max_unused = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            DEFAULT_GC_MAX_UNUSED
        };
        self
    }

    /// Collect garbage in the background after every delete. Default: off
    /// (run [`Engine::gc`] when it suits you).
    pub fn auto_gc(mut self, on: bool) -> Self {
        self.auto_gc = on;
        self
    }

    /// The file system the store's packs and manifests are written
    /// through. Default: the real one ([`StdFs`]). Tests pass a
    /// [`crate::fsio::FaultFs`] to fail chosen calls.
    pub fn store_fs(mut self, fs: Arc<dyn StoreFs>) -> Self {
        self.store_fs = fs;
        self
    }

    /// Opens an existing store only to read it: nothing on disk changes
    /// (no crash recovery is applied, no tracker, pack, manifest or catalog
    /// is written; captures left in progress by a crash are shown failed,
    /// as the next writable open will make them), and calls that would
    /// write fail with [`crate::Error::ReadOnly`]. Read-only opens of one
    /// store may run side by side; beside a process that has it open for
    /// writing, opening fails with [`crate::Error::StoreLocked`]. Cannot
    /// be combined with change tracking. Default: off.
    pub fn read_only(mut self, on: bool) -> Self {
        self.read_only = on;
        self
    }

    /// Opens (or creates) the store in `dir`.
    pub fn open(self, dir: impl AsRef<Path>) -> Result<Engine> {
        Engine::open_with(dir.as_ref(), self)
    }
}
