//! How to open a store: [`EngineOptions`], its defaults, and the stop hook.

use std::sync::Arc;

use crate::compression::Compression;
use crate::disk::{DiskOpener, default_opener};
use crate::error::{Error, Result};
use crate::fsio::{StdFs, StoreFs};
use crate::manifest::check_block_size;
use crate::types::Server;

/// Block size of a new store unless chosen otherwise: 64 KiB, the
/// granularity of QEMU dirty bitmaps.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;
/// Share of the blocks a dirty bitmap calls clean that an incremental
/// capture rehashes as a check of the bitmap, unless chosen otherwise.
pub const DEFAULT_CLEAN_SAMPLE_RATE: f64 = 0.01;
/// Garbage bytes, as a share of the needed bytes, that garbage collection
/// leaves in packs rather than rewrite them, unless chosen otherwise.
pub const DEFAULT_GC_MAX_UNUSED: f64 = 0.05;
/// Bytes read from a disk per window unless chosen otherwise.
pub const DEFAULT_WINDOW_LEN: usize = 16 << 20;
/// See [`EngineOptions::table_memory`].
pub const DEFAULT_TABLE_MEMORY: u64 = 64 << 20;
/// See [`EngineOptions::block_list_memory`].
pub const DEFAULT_BLOCK_LIST_MEMORY: u64 = 16 << 20;
/// The largest window: memory use is a few windows.
const MAX_WINDOW_LEN: usize = 1 << 30;

/// Called before a restore rewrites a server's disk; must stop the server.
/// An `Err` cancels the restore before anything is written.
pub type StopHook = Arc<dyn Fn(&Server) -> std::result::Result<(), String> + Send + Sync>;

/// Options for [`EngineOptions::open`]; each setter names its default.
#[derive(Clone)]
pub struct EngineOptions {
    pub(crate) create: bool,
    pub(crate) block_size: Option<u32>,
    pub(crate) compression: Option<Compression>,
    pub(crate) window_len: usize,
    pub(crate) stop_hook: Option<StopHook>,
    pub(crate) disk_opener: DiskOpener,
    pub(crate) change_tracking: bool,
    pub(crate) clean_sample_rate: f64,
    pub(crate) gc_max_unused: f64,
    pub(crate) auto_gc: bool,
    pub(crate) store_fs: Arc<dyn StoreFs>,
    pub(crate) read_only: bool,
    pub(crate) index_persist_min: usize,
    pub(crate) table_memory: u64,
    pub(crate) block_list_memory: u64,
    /// The fleet this store's host belongs to, when its store is a bucket.
    pub(crate) coordinator: Option<Arc<dyn crate::coordinator::Coordinator>>,
    /// Packs are sealed past this many bytes (`None`: the store's default).
    pub(crate) pack_target: Option<u64>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            create: true,
            block_size: None,
            compression: None,
            window_len: DEFAULT_WINDOW_LEN,
            stop_hook: None,
            disk_opener: default_opener(),
            change_tracking: false,
            clean_sample_rate: DEFAULT_CLEAN_SAMPLE_RATE,
            gc_max_unused: DEFAULT_GC_MAX_UNUSED,
            auto_gc: false,
            store_fs: Arc::new(StdFs),
            read_only: false,
            index_persist_min: crate::store::PERSIST_MIN,
            table_memory: DEFAULT_TABLE_MEMORY,
            block_list_memory: DEFAULT_BLOCK_LIST_MEMORY,
            coordinator: None,
            pack_target: None,
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

    /// How a new store compresses new chunks. Default:
    /// [`Compression::Fast`]. Like the block size, it is set when the store
    /// is created: opening an existing store with another setting is an
    /// error that says which it has; [`crate::Engine::set_compression`]
    /// changes it.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = Some(compression);
        self
    }

    /// Bytes read per window during capture and restore: at least one
    /// block, at most 1 GiB. Default: 16 MiB. Memory use is a few windows,
    /// whatever the disk size.
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
    /// every server's disk with [`crate::Engine::record_write`] while the store is
    /// open, and snapshots and restores then read and write only what
    /// changed (see [`crate::Engine::record_write`]). Default: off. A store
    /// opened without it keeps the trackers a tracking process saved, as
    /// they were (a restore there removes its server's, since it rewrites
    /// the disk behind the tracker's back).
    pub fn change_tracking(mut self, on: bool) -> Self {
        self.change_tracking = on;
        self
    }

    /// How many chunks the index holds in memory, beyond its table on
    /// disk, before it writes a new table (at a capture's end or on
    /// close; also never before a sixteenth of the table, or 2M chunks,
    /// whichever is fewer). Lower makes
    /// opening cheaper (it reads the packs the table does not cover) for
    /// more writing. Default: 4,096 (a quarter GiB of 64 KiB chunks).
    pub fn index_persist_min(mut self, chunks: usize) -> Self {
        self.index_persist_min = chunks;
        self
    }

    /// What the process may hold of each sorted table's pages (the chunk
    /// index, the reference counts) for look-ups at random. A table up to
    /// this size is read through its memory map, where the pages look-ups
    /// touch stay resident (shared with the page cache); a larger one is
    /// read a few entries at a time with `pread` (through the page cache,
    /// nothing resident), so that a capture's memory does not grow with
    /// the store: at 10M chunks that costs a capture of stored blocks
    /// about a quarter of its speed (docs/BENCHMARKS.md, "Stores of
    /// millions of chunks"). Scans and runs in key order read the map and
    /// give back what they passed. Default: 64 MiB (2.3M chunks' index).
    pub fn table_memory(mut self, bytes: u64) -> Self {
        self.table_memory = bytes;
        self
    }

    /// What one disk's list of blocks (a capture's, a manifest's read for
    /// a restore or a check) may hold in memory, at 33 bytes a data block.
    /// A capture writes what is beyond it to an unnamed scratch file in
    /// the store's directory; a larger manifest keeps its chunk ids in its
    /// file, read again page by page (4,096 blocks) as needed. A dense
    /// 1 TiB disk of 64 KiB blocks has 16M blocks: 530 MiB of ids.
    /// Default: 16 MiB (half a million data blocks: 32 GiB of data at
    /// 64 KiB blocks).
    pub fn block_list_memory(mut self, bytes: u64) -> Self {
        self.block_list_memory = bytes;
        self
    }

    /// Share (0 to 1) of the blocks a dirty bitmap calls clean that an
    /// incremental capture rehashes to check the bitmap; any changed block
    /// among them switches the capture to a full rehash. Default: 0.01,
    /// and below 1 at most a quarter of the blocks the capture reads (at
    /// least 64), so that the check's cost follows what changed rather
    /// than the disk's size.
    /// Outside 0 to 1, opening fails.
    pub fn clean_sample_rate(mut self, rate: f64) -> Self {
        self.clean_sample_rate = rate;
        self
    }

    /// Garbage collection rewrites the packs with the most garbage until
    /// the garbage left is at most this share of the needed bytes (0 to
    /// 1; 0 rewrites every pack holding any). Packs with nothing needed
    /// are always deleted. Default: 0.05, so a collection after a few
    /// deletes rewrites little, and the store stays within 5% of what its
    /// snapshots need. Outside 0 to 1, opening fails.
    pub fn gc_max_unused(mut self, share: f64) -> Self {
        self.gc_max_unused = share;
        self
    }

    /// Collect garbage in the background after every delete. Default: off
    /// (run [`crate::Engine::gc`] when it suits you).
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

    /// Makes the engine one host of a fleet: see [`crate::coordinator`].
    #[cfg_attr(not(feature = "s3"), allow(dead_code))]
    pub(crate) fn coordinator(
        mut self,
        coordinator: Arc<dyn crate::coordinator::Coordinator>,
        pack_target: u64,
    ) -> Self {
        self.coordinator = Some(coordinator);
        self.pack_target = Some(pack_target);
        self
    }

    /// Checks every setting's range (those that depend on the store's
    /// block size once it is known: `block_size`).
    pub(crate) fn validate(&self, block_size: u32) -> Result<()> {
        check_block_size(block_size)?;
        if let Some(c) = self.compression {
            c.check(block_size)?;
        }
        let share = |what: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::InvalidParameter(format!(
                    "{what} {v} is not from 0 to 1"
                )))
            }
        };
        share("the clean sample rate", self.clean_sample_rate)?;
        share("the GC's unused share", self.gc_max_unused)?;
        if !(block_size as usize..=MAX_WINDOW_LEN).contains(&self.window_len) {
            return Err(Error::InvalidParameter(format!(
                "a window of {} bytes: use one from a block ({block_size}) to {MAX_WINDOW_LEN}",
                self.window_len
            )));
        }
        Ok(())
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
}
