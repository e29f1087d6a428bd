//! The facade: open a store, register servers, create, list, restore,
//! delete and verify snapshots.
//!
//! Locking (in this order, never the reverse):
//! 1. `Inner::state` — the in-memory mirror of the catalog plus what only
//!    lives in memory (running restores, progress). Every check-then-change
//!    (the cap, state rules) happens under it, together with the catalog
//!    commit that persists the change, so racing callers see one order.
//! 2. the chunk store's own locks (see `store`), taken by captures and
//!    restores without holding `state`.
//!
//! Durability order of a capture: chunk data (`ChunkStore::sync`), then the
//! manifest (temporary file, fsync, rename, directory fsync), then the
//! catalog commit that marks the snapshot completed. A crash before that
//! commit leaves the snapshot `in_progress` in the catalog; `open` turns it
//! into `failed` and removes its manifest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::Serialize;

use crate::capture::{self, CapturePlan, CaptureSettings};
use crate::catalog::{
    self, CaptureKind, Catalog, Change, FullReason, ServerRecord, SnapshotKind, SnapshotRecord,
    SnapshotStatus, check_cap,
};
use crate::dirty::DirtyBitmap;
use crate::disk::Disk;
use crate::error::{Error, IoContext, Result};
use crate::ids::{ChunkId, ServerId, SnapshotId};
use crate::job::{Job, Progress};
use crate::manifest::{Manifest, Manifests, check_block_size};
use crate::options::{DEFAULT_BLOCK_SIZE, DEFAULT_COMPRESSION_LEVEL, EngineOptions};
use crate::refs::{self, Refs};
use crate::restore::RestoreReport;
use crate::store::gc::GcReport;
use crate::store::{ChunkStore, Pins, sync_dir};
use crate::tracking::{Tracker, TrackingStatus};
use crate::verify::{self, VerifyReport};

mod restores;

pub use restores::{RestoreOptions, RestorePlanReport};

pub use crate::catalog::CaptureStats;

const LOCK_FILE: &str = "LOCK";
const CATALOG_FILE: &str = "catalog";
const MANIFEST_DIR: &str = "manifests";
const PACK_DIR: &str = "packs";

/// What a server is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    Idle,
    Capturing,
    /// A restore is running, or one was interrupted and must be run again.
    Restoring,
}

impl ServerState {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Idle => "idle",
            ServerState::Capturing => "capturing",
            ServerState::Restoring => "restoring",
        }
    }
}

/// A registered server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Server {
    pub id: ServerId,
    pub name: String,
    pub disk: PathBuf,
    #[serde(rename = "status")]
    pub state: ServerState,
    /// The snapshot an unfinished restore was writing, if any.
    pub restoring_from: Option<SnapshotId>,
}

/// A server as a snapshot names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerRef {
    pub id: ServerId,
    pub name: String,
}

/// A snapshot. Serializes to exactly the snapshot object of the Snapshots
/// API (SEED_API.md); the extra fields are for library users.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub id: SnapshotId,
    pub server: ServerRef,
    pub name: String,
    pub status: SnapshotStatus,
    pub size_mb: Option<u64>,
    pub created_at: String,
    pub description: String,
    /// What the capture found and stored (completed snapshots).
    #[serde(skip)]
    pub stats: Option<CaptureStats>,
    /// Why the capture failed (failed snapshots).
    #[serde(skip)]
    pub error: Option<String>,
    /// Stored bytes only this snapshot references: what deleting it alone
    /// would give back after garbage collection. Known once space is
    /// accounted ([`Engine::account_space`]); completed snapshots only.
    #[serde(skip)]
    pub exclusive_bytes: Option<u64>,
    /// `Safety` for the snapshot a restore took of the disk before writing
    /// it (see [`Engine::undo_restore`]); it does not count toward the cap.
    #[serde(skip)]
    pub kind: SnapshotKind,
}

/// What `open` found and repaired.
#[derive(Clone, Debug, Default)]
pub struct OpenReport {
    /// Captures a crash interrupted, now `failed`.
    pub failed_captures: Vec<SnapshotId>,
    /// Servers whose restore a crash interrupted: run it again.
    pub interrupted_restores: Vec<(ServerId, SnapshotId)>,
    /// Packs left unsealed by a crash, now sealed, and torn bytes cut.
    pub packs_recovered: u64,
    pub bytes_cut: u64,
    /// Packs that could not be read at all.
    pub unreadable_packs: Vec<String>,
}

/// A capture running in the background.
pub struct CaptureJob {
    /// The snapshot as created: `in_progress`.
    pub snapshot: Snapshot,
    job: Job<Snapshot>,
}

impl CaptureJob {
    /// `(done, total)` bytes of the disk read so far.
    pub fn progress(&self) -> (u64, u64) {
        self.job.progress()
    }

    /// The shared progress counter.
    pub fn progress_handle(&self) -> Arc<Progress> {
        self.job.progress_handle()
    }

    /// True once the capture has ended.
    pub fn is_finished(&self) -> bool {
        self.job.is_finished()
    }

    /// Waits for the capture; returns the completed snapshot, or the error
    /// that made it `failed`.
    pub fn wait(self) -> Result<Snapshot> {
        self.job.wait()
    }
}

/// A restore running in the background.
pub type RestoreJob = Job<RestoreReport>;

/// An open store. Cheap to clone; all clones share one store. Background
/// captures and restores keep the store open until they end.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    manifests: Manifests,
    block_size: u32,
    compression_level: AtomicI32,
    group_len: AtomicU32,
    options: EngineOptions,
    catalog: Catalog,
    store: ChunkStore,
    state: Mutex<State>,
    report: OpenReport,
    last_auto_gc: Mutex<Option<std::result::Result<GcReport, String>>>,
    /// Held for the life of the store; the OS releases it if we die.
    _lock: File,
}

/// Sizes and ratios of a whole store ([`Engine::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StoreStats {
    /// Completed snapshots.
    pub snapshots: u64,
    /// Sum of their disks' lengths, and of their non-zero data.
    pub logical_bytes: u64,
    pub data_bytes: u64,
    /// Pack bytes on disk.
    pub stored_bytes: u64,
    /// Bytes of the chunks the snapshots need, and how many.
    pub live_bytes: u64,
    pub live_chunks: u64,
    /// Bytes of chunks no snapshot needs: what `gc` can give back.
    pub reclaimable_bytes: u64,
    /// Snapshots' data over the distinct data stored.
    pub dedup_ratio: f64,
    /// Distinct data over the bytes it takes in packs.
    pub compression_ratio: f64,
    /// The store's setting for new chunks: zstd level, and bytes of new
    /// chunks compressed together (0: one frame per chunk).
    pub compression_level: i32,
    pub group_len: u32,
}

/// Pack bytes a chunk accounts for (its record, or its share of its
/// group's); 0 if missing.
fn stored_size(store: &ChunkStore, id: &ChunkId) -> u32 {
    store
        .locate(id)
        .map_or(0, |l| u32::try_from(l.accounted_len()).unwrap_or(u32::MAX))
}

struct State {
    servers: BTreeMap<ServerId, ServerRecord>,
    snapshots: BTreeMap<SnapshotId, SnapshotRecord>,
    next_snapshot_id: u64,
    /// Restores running in this process: server -> snapshot.
    live_restores: HashMap<ServerId, SnapshotId>,
    progress: HashMap<SnapshotId, Arc<Progress>>,
    /// Change tracking per server (only with `EngineOptions::change_tracking`).
    tracking: HashMap<ServerId, Tracker>,
    /// Reference counts and exclusive bytes, built on first need.
    refs: Option<Refs>,
    /// Running incremental captures and their parents, which cannot be
    /// deleted until they end.
    capture_parents: HashMap<SnapshotId, SnapshotId>,
    /// Captures whose completing catalog commit reported an error: it may
    /// have reached the disk all the same, so until the store is opened
    /// again (which reads the truth) their manifests stay and their chunks
    /// count as needed. This process shows them failed.
    in_doubt: HashSet<SnapshotId>,
    /// Servers whose "restoring" mark was being committed when the commit
    /// reported an error: the mark may be on disk, so this process keeps
    /// it too, and the next restore commits it again before writing.
    restoring_in_doubt: HashSet<ServerId>,
}

/// How a capture finds the disk's blocks.
enum CaptureMode {
    Full(Option<FullReason>),
    Incremental {
        parent: SnapshotId,
        dirty: DirtyBitmap,
        /// The tracking generation the bitmap came from; `None` when the
        /// caller passed it (then a missing parent is an error, not a
        /// reason to read everything).
        generation: Option<u64>,
    },
}

impl State {
    fn server(&self, id: ServerId) -> Result<&ServerRecord> {
        self.servers.get(&id).ok_or(Error::ServerNotFound(id))
    }

    fn snapshot(&self, id: SnapshotId) -> Result<&SnapshotRecord> {
        self.snapshots.get(&id).ok_or(Error::SnapshotNotFound(id))
    }

    fn snapshots_of(&self, server: ServerId) -> impl Iterator<Item = &SnapshotRecord> {
        self.snapshots
            .values()
            .filter(move |s| s.server_id == server)
    }

    /// True when the snapshot's chunks must be kept: it is completed, or
    /// it may be (its completing commit's outcome is unknown).
    fn holds_data(&self, rec: &SnapshotRecord) -> bool {
        rec.status == SnapshotStatus::Completed || self.in_doubt.contains(&rec.id)
    }

    fn capturing(&self, server: ServerId) -> Option<SnapshotId> {
        self.snapshots_of(server)
            .find(|s| s.status == SnapshotStatus::InProgress)
            .map(|s| s.id)
    }

    fn server_view(&self, rec: &ServerRecord) -> Server {
        let state = if self.live_restores.contains_key(&rec.id) || rec.restoring_from.is_some() {
            ServerState::Restoring
        } else if self.capturing(rec.id).is_some() {
            ServerState::Capturing
        } else {
            ServerState::Idle
        };
        Server {
            id: rec.id,
            name: rec.name.clone(),
            disk: rec.disk.clone(),
            state,
            restoring_from: rec.restoring_from,
        }
    }

    fn snapshot_view(&self, rec: &SnapshotRecord) -> Snapshot {
        let server_name = self
            .servers
            .get(&rec.server_id)
            .map(|s| s.name.clone())
            .unwrap_or_default();
        Snapshot {
            id: rec.id,
            server: ServerRef {
                id: rec.server_id,
                name: server_name,
            },
            name: rec.name.clone(),
            status: rec.status,
            size_mb: rec.size_mb(),
            created_at: rec.created_at.clone(),
            description: rec.description.clone(),
            stats: rec.stats,
            error: rec.error.clone(),
            exclusive_bytes: self.refs.as_ref().and_then(|r| r.exclusive(rec.id)),
            kind: rec.kind,
        }
    }

    /// Refuses to start anything on a server that is being restored.
    fn check_not_restoring(&self, rec: &ServerRecord) -> Result<()> {
        if let Some(snap) = self.live_restores.get(&rec.id) {
            return Err(Error::WrongState(format!(
                "server {} is being restored from snapshot {snap}; wait for the restore to finish",
                rec.id
            )));
        }
        if let Some(snap) = rec.restoring_from {
            return Err(Error::WrongState(format!(
                "server {} was left half-restored from snapshot {snap}; run that restore again to finish it",
                rec.id
            )));
        }
        Ok(())
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Checks that `parent` can be the parent of an incremental snapshot of
/// `server` whose disk is `disk_len` bytes, with `dirty` as its bitmap.
fn check_parent(
    state: &State,
    server: ServerId,
    parent: SnapshotId,
    dirty: &DirtyBitmap,
    disk_len: u64,
    block_size: u32,
) -> Result<()> {
    let rec = state.snapshot(parent)?;
    if rec.server_id != server {
        return Err(Error::InvalidParameter(format!(
            "parent snapshot {parent} belongs to server {}, not {server}",
            rec.server_id
        )));
    }
    let Some(stats) = rec
        .stats
        .filter(|_| rec.status == SnapshotStatus::Completed)
    else {
        return Err(Error::WrongState(format!(
            "parent snapshot {parent} is {}; only a completed snapshot can be a parent",
            rec.status.as_str()
        )));
    };
    if !dirty.granularity().is_multiple_of(u64::from(block_size)) {
        return Err(Error::InvalidParameter(format!(
            "the dirty bitmap has {} bytes per bit, not a multiple of the store's {block_size}-byte blocks",
            dirty.granularity()
        )));
    }
    if dirty.disk_len() != stats.image_len {
        return Err(Error::InvalidParameter(format!(
            "the dirty bitmap describes a {}-byte disk; parent snapshot {parent} is of a {}-byte disk",
            dirty.disk_len(),
            stats.image_len
        )));
    }
    if disk_len != stats.image_len {
        return Err(Error::InvalidParameter(format!(
            "the disk is {disk_len} bytes now and parent snapshot {parent} was {} bytes: after a resize take a full snapshot",
            stats.image_len
        )));
    }
    Ok(())
}

/// How a snapshot without an explicit parent captures, from the server's
/// tracker as it was when the capture was reserved.
fn tracked_mode(state: &State, tracker: Option<&Tracker>, disk_len: u64) -> CaptureMode {
    let Some(t) = tracker else {
        return CaptureMode::Full(Some(FullReason::NoTracking));
    };
    let base_completed = state
        .snapshots
        .get(&t.base)
        .is_some_and(|s| s.status == SnapshotStatus::Completed);
    if t.pending || !base_completed {
        CaptureMode::Full(Some(FullReason::BaseGone))
    } else if !t.trusted {
        CaptureMode::Full(Some(FullReason::Untrusted))
    } else if t.dirty.disk_len() != disk_len {
        CaptureMode::Full(Some(FullReason::DiskResized))
    } else {
        CaptureMode::Incremental {
            parent: t.base,
            dirty: t.dirty.clone(),
            generation: Some(t.generation),
        }
    }
}

/// A tracker for a capture or restore of `base` just starting: no writes
/// yet, the next generation.
fn new_tracker(
    base: SnapshotId,
    disk_len: u64,
    block_size: u32,
    previous: Option<&Tracker>,
) -> Result<Tracker> {
    Ok(Tracker {
        base,
        pending: true,
        dirty: DirtyBitmap::new(disk_len, u64::from(block_size))?,
        trusted: true,
        generation: previous.map_or(1, |p| p.generation + 1),
    })
}

/// Loads the persisted trackers and marks them unclean on disk before any
/// write can be reported (with tracking on), or forgets them (off).
fn load_tracking(catalog: &Catalog, state: &mut State, on: bool) -> Result<()> {
    let rows = catalog.load_tracking()?;
    if rows.is_empty() {
        return Ok(());
    }
    if !on {
        let changes: Vec<Change<'_>> = rows
            .iter()
            .map(|(server, _)| Change::RemoveTracking(*server))
            .collect();
        return catalog.commit(&changes);
    }
    let mut changes = Vec::new();
    for (server, bytes) in rows {
        match Tracker::decode(&bytes).filter(|_| state.servers.contains_key(&server)) {
            Some(t) => {
                changes.push(Change::PutTracking(server, t.encode(false)));
                state.tracking.insert(server, t);
            }
            None => changes.push(Change::RemoveTracking(server)),
        }
    }
    catalog.commit(&changes)
}

impl Engine {
    /// Opens the store in `dir`, creating it with the default options when
    /// it does not exist.
    pub fn open(dir: impl AsRef<Path>) -> Result<Engine> {
        EngineOptions::default().open(dir)
    }

    pub(crate) fn open_with(root: &Path, options: EngineOptions) -> Result<Engine> {
        if let Some(bs) = options.block_size {
            check_block_size(bs)?;
        }
        if let Some(level) = options.compression_level {
            check_level(level)?;
        }
        let catalog_path = root.join(CATALOG_FILE);
        if !catalog_path.exists() && !options.create {
            return Err(Error::NoStore {
                path: root.to_path_buf(),
            });
        }
        let create_with = options.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        // The group length applies only to a store created now.
        if let (false, Some(group)) = (catalog_path.exists(), options.group_len) {
            check_group_len(group, create_with)?;
        }
        fs::create_dir_all(root).at(root)?;
        let lock = lock_store(root)?;
        let new_store = !catalog_path.exists();
        let level = options
            .compression_level
            .unwrap_or(DEFAULT_COMPRESSION_LEVEL);
        let (catalog, loaded) = Catalog::open(
            &catalog_path,
            Some((create_with, level, options.group_len.unwrap_or(0))),
            options.store_fs.clone(),
        )?;
        if let Some(bs) = options.block_size
            && bs != loaded.block_size
        {
            return Err(Error::InvalidParameter(format!(
                "the store uses {}-byte blocks, fixed at creation; {bs} was asked for",
                loaded.block_size
            )));
        }
        let store_fs = options.store_fs.clone();
        let manifests = Manifests::open(root.join(MANIFEST_DIR), store_fs.clone())?;
        let (store, recovery) = ChunkStore::open(&root.join(PACK_DIR), store_fs.clone())?;
        if new_store {
            sync_dir(store_fs.as_ref(), root)?;
        }
        let mut report = OpenReport {
            packs_recovered: recovery.packs_sealed,
            bytes_cut: recovery.bytes_cut,
            unreadable_packs: recovery.unreadable,
            ..OpenReport::default()
        };
        let mut state = State {
            servers: loaded.servers,
            snapshots: loaded.snapshots,
            next_snapshot_id: loaded.next_snapshot_id,
            live_restores: HashMap::new(),
            progress: HashMap::new(),
            tracking: HashMap::new(),
            refs: None,
            capture_parents: HashMap::new(),
            in_doubt: HashSet::new(),
            restoring_in_doubt: HashSet::new(),
        };
        recover(&catalog, &manifests, &mut state, &mut report)?;
        load_tracking(&catalog, &mut state, options.change_tracking)?;
        Ok(Engine {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                manifests,
                block_size: loaded.block_size,
                compression_level: AtomicI32::new(loaded.compression_level),
                group_len: AtomicU32::new(loaded.group_len),
                options,
                catalog,
                store,
                state: Mutex::new(state),
                report,
                last_auto_gc: Mutex::new(None),
                _lock: lock,
            }),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The store's block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.inner.block_size
    }

    /// The zstd level new chunks are stored with.
    pub fn compression_level(&self) -> i32 {
        self.inner.compression_level.load(Ordering::Relaxed)
    }

    /// Changes the zstd level for chunks stored from now on (durably).
    /// Stored chunks keep theirs: every record says how it is compressed.
    pub fn set_compression_level(&self, level: i32) -> Result<()> {
        check_level(level)?;
        let _state = self.inner.state.lock();
        self.inner.catalog.set_compression_level(level)?;
        self.inner.compression_level.store(level, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes of new chunks compressed together as one group record (the
    /// compact setting); 0 when each chunk is its own frame.
    pub fn group_len(&self) -> u32 {
        self.inner.group_len.load(Ordering::Relaxed)
    }

    /// Changes the group length for chunks stored from now on (durably):
    /// 0, or two blocks to 4 MiB. Stored records keep theirs.
    pub fn set_group_len(&self, bytes: u32) -> Result<()> {
        check_group_len(bytes, self.inner.block_size)?;
        let _state = self.inner.state.lock();
        self.inner.catalog.set_group_len(bytes)?;
        self.inner.group_len.store(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// What opening the store found and repaired.
    pub fn open_report(&self) -> &OpenReport {
        &self.inner.report
    }

    /// Number of distinct chunks stored.
    pub fn chunk_count(&self) -> usize {
        self.inner.store.chunk_count()
    }

    /// Heap bytes of the in-memory chunk index (about 30 per chunk).
    pub fn index_bytes(&self) -> usize {
        self.inner.store.index_bytes()
    }

    /// Registers a server and its disk (an image file or a block device; it
    /// need not exist yet). The path is stored absolute.
    pub fn add_server(&self, id: ServerId, name: &str, disk: impl AsRef<Path>) -> Result<Server> {
        catalog::check_server_name(name)?;
        let disk = disk.as_ref();
        if disk.as_os_str().is_empty() {
            return Err(Error::InvalidParameter("the disk path is empty".into()));
        }
        let disk = std::path::absolute(disk).at(disk)?;
        let mut state = self.inner.state.lock();
        if state.servers.contains_key(&id) {
            return Err(Error::ServerExists(id));
        }
        let rec = ServerRecord {
            id,
            name: name.to_string(),
            disk,
            restoring_from: None,
        };
        self.inner.catalog.commit(&[Change::PutServer(&rec)])?;
        let view = state.server_view(&rec);
        state.servers.insert(id, rec);
        Ok(view)
    }

    /// All servers, by id.
    pub fn servers(&self) -> Vec<Server> {
        let state = self.inner.state.lock();
        state
            .servers
            .values()
            .map(|s| state.server_view(s))
            .collect()
    }

    /// One server.
    pub fn server(&self, id: ServerId) -> Result<Server> {
        let state = self.inner.state.lock();
        Ok(state.server_view(state.server(id)?))
    }

    /// Snapshots, newest first: all of them, or one server's.
    pub fn snapshots(&self, server: Option<ServerId>) -> Result<Vec<Snapshot>> {
        let state = self.inner.state.lock();
        if let Some(id) = server {
            state.server(id)?;
        }
        Ok(state
            .snapshots
            .values()
            .rev()
            .filter(|s| server.is_none_or(|id| s.server_id == id))
            .map(|s| state.snapshot_view(s))
            .collect())
    }

    /// One snapshot.
    pub fn snapshot(&self, id: SnapshotId) -> Result<Snapshot> {
        let state = self.inner.state.lock();
        Ok(state.snapshot_view(state.snapshot(id)?))
    }

    /// `(done, total)` bytes of a running capture, `None` when not running.
    pub fn capture_progress(&self, id: SnapshotId) -> Option<(u64, u64)> {
        self.inner.state.lock().progress.get(&id).map(|p| p.get())
    }

    /// Reports a guest write of `len` bytes at `offset` to `server`'s disk
    /// (with [`EngineOptions::change_tracking`] on). Call it once the write
    /// has reached the disk (calling it earlier as well is harmless); the
    /// next snapshot of the server then reads only the blocks written since
    /// the last snapshot or restore, and the next restore rewrites only
    /// those plus the blocks that differ between the two snapshots.
    ///
    /// Writes before the server's first snapshot or restore in this store
    /// need no tracking (that capture reads everything) and are ignored. A
    /// write past the disk's length at the last snapshot makes the next
    /// capture a full one.
    pub fn record_write(&self, server: ServerId, offset: u64, len: u64) -> Result<()> {
        if !self.inner.options.change_tracking {
            return Err(Error::WrongState(
                "change tracking is off; open the store with EngineOptions::change_tracking(true)"
                    .into(),
            ));
        }
        let mut state = self.inner.state.lock();
        state.server(server)?;
        if let Some(t) = state.tracking.get_mut(&server) {
            t.record(offset, len);
        }
        Ok(())
    }

    /// Hands over a change tracker's bitmap the embedder vouches for (for
    /// example a hypervisor's persistent dirty bitmap after a clean
    /// shutdown, or after this store was not closed cleanly): `dirty`
    /// marks every block written since the disk equalled `base`, a
    /// completed snapshot of `server`. Tracking continues from it, trusted,
    /// in a new generation (with [`EngineOptions::change_tracking`] on).
    pub fn adopt_dirty_bitmap(
        &self,
        server: ServerId,
        base: SnapshotId,
        dirty: &DirtyBitmap,
    ) -> Result<TrackingStatus> {
        if !self.inner.options.change_tracking {
            return Err(Error::WrongState(
                "change tracking is off; open the store with EngineOptions::change_tracking(true)"
                    .into(),
            ));
        }
        let inner = &self.inner;
        let bs = inner.block_size;
        let mut state = inner.state.lock();
        let srv = state.server(server)?;
        state.check_not_restoring(srv)?;
        if let Some(capturing) = state.capturing(server) {
            return Err(Error::WrongState(format!(
                "server {server} is capturing snapshot {capturing}; wait for it to finish"
            )));
        }
        check_parent(&state, server, base, dirty, dirty.disk_len(), bs)?;
        let mut blocks = DirtyBitmap::new(dirty.disk_len(), u64::from(bs))?;
        for run in dirty.block_runs(bs)? {
            for b in run {
                blocks.set(b);
            }
        }
        let tracker = Tracker {
            base,
            pending: false,
            dirty: blocks,
            trusted: true,
            generation: state.tracking.get(&server).map_or(1, |t| t.generation + 1),
        };
        let status = tracker.status();
        state.tracking.insert(server, tracker);
        Ok(status)
    }

    /// The change tracking of `server`: `None` when off or not started (no
    /// snapshot or restore since it was turned on).
    pub fn tracking_status(&self, server: ServerId) -> Result<Option<TrackingStatus>> {
        let state = self.inner.state.lock();
        state.server(server)?;
        Ok(state.tracking.get(&server).map(Tracker::status))
    }

    /// Captures a snapshot of `server` and returns it once completed.
    pub fn create_snapshot(
        &self,
        server: ServerId,
        name: &str,
        description: &str,
    ) -> Result<Snapshot> {
        self.start_snapshot(server, name, description)?.wait()
    }

    /// Reserves a snapshot slot and id at once and captures in the
    /// background. The returned job holds the `in_progress` snapshot.
    ///
    /// The checks (name, server, restoring, the five-snapshot cap) and the
    /// reservation are one step under the state lock, committed to the
    /// catalog before this returns: racing callers never make a sixth.
    ///
    /// With change tracking on and a trusted tracker for the server, the
    /// capture is incremental from the tracked snapshot; otherwise every
    /// block is read (the snapshot's stats say why).
    pub fn start_snapshot(
        &self,
        server: ServerId,
        name: &str,
        description: &str,
    ) -> Result<CaptureJob> {
        self.start_capture(server, name, description, None, SnapshotKind::Regular)
    }

    /// Captures a snapshot that reads only the blocks `dirty` marks and
    /// takes every other block from `parent`, a completed snapshot of the
    /// same server and disk length; returns it once completed. A sample of
    /// the clean blocks is rehashed first (see
    /// [`EngineOptions::clean_sample_rate`]); if any changed, the capture
    /// reads everything and its stats say so.
    ///
    /// A bitmap that misses a written block is the caller's bug: the
    /// snapshot keeps the parent's bytes for that block, unless the sample
    /// happens to catch it.
    pub fn create_incremental(
        &self,
        server: ServerId,
        name: &str,
        description: &str,
        parent: SnapshotId,
        dirty: DirtyBitmap,
    ) -> Result<Snapshot> {
        self.start_incremental(server, name, description, parent, dirty)?
            .wait()
    }

    /// [`Engine::create_incremental`] in the background.
    pub fn start_incremental(
        &self,
        server: ServerId,
        name: &str,
        description: &str,
        parent: SnapshotId,
        dirty: DirtyBitmap,
    ) -> Result<CaptureJob> {
        self.start_capture(
            server,
            name,
            description,
            Some((parent, dirty)),
            SnapshotKind::Regular,
        )
    }

    fn start_capture(
        &self,
        server: ServerId,
        name: &str,
        description: &str,
        explicit: Option<(SnapshotId, DirtyBitmap)>,
        kind: SnapshotKind,
    ) -> Result<CaptureJob> {
        catalog::check_snapshot_name(name)?;
        catalog::check_description(description)?;
        let inner = &self.inner;
        let disk_path = inner.state.lock().server(server)?.disk.clone();
        let disk = (inner.options.disk_opener)(&disk_path, false)?;
        let disk_len = disk.len()?;
        let progress = Arc::new(Progress::default());
        let (record, mode, previous, snapshot) = {
            let mut state = inner.state.lock();
            let srv = state.server(server)?;
            // A safety snapshot is the first step of a restore, and the
            // engine's own: neither the restore nor the cap stops it.
            if kind == SnapshotKind::Regular {
                state.check_not_restoring(srv)?;
                check_cap(server, state.snapshots_of(server))?;
            }
            if let Some((parent, dirty)) = &explicit {
                check_parent(&state, server, *parent, dirty, disk_len, inner.block_size)?;
            }
            let id = SnapshotId(state.next_snapshot_id);
            let record = SnapshotRecord {
                id,
                server_id: server,
                name: name.to_string(),
                description: description.to_string(),
                status: SnapshotStatus::InProgress,
                created_at: now_rfc3339(),
                stats: None,
                error: None,
                kind,
            };
            // The id is spent whatever the commit says: one that reported
            // an error may have landed, and ids are never reused.
            state.next_snapshot_id = id.0 + 1;
            inner.catalog.commit(&[
                Change::PutSnapshot(&record),
                Change::NextSnapshotId(id.0 + 1),
            ])?;
            state.snapshots.insert(id, record.clone());
            state.progress.insert(id, progress.clone());
            let previous = if inner.options.change_tracking {
                state.tracking.remove(&server)
            } else {
                None
            };
            let mode = match explicit {
                Some((parent, dirty)) => CaptureMode::Incremental {
                    parent,
                    dirty,
                    generation: None,
                },
                None => tracked_mode(&state, previous.as_ref(), disk_len),
            };
            if let CaptureMode::Incremental { parent, .. } = &mode {
                state.capture_parents.insert(id, *parent);
            }
            if inner.options.change_tracking {
                // Writes from now on are relative to this capture.
                let tracker = new_tracker(id, disk_len, inner.block_size, previous.as_ref())?;
                state.tracking.insert(server, tracker);
            }
            let view = state.snapshot_view(&record);
            (record, mode, previous, view)
        };
        let engine = self.clone();
        let job_progress = progress.clone();
        let id = record.id;
        let finisher = self.clone();
        // Pinned until the snapshot is completed and counted (or failed).
        let pins = inner.store.pin_scope();
        let job_pins = pins.clone();
        let job = Job::spawn(
            format!("capture-{id}"),
            progress,
            move || engine.run_capture(&record, disk.as_ref(), mode, &job_pins, &job_progress),
            move |outcome| {
                let done = finisher.finish_capture(id, outcome, previous);
                drop(pins);
                done
            },
        )
        .inspect_err(|e| {
            let _ = self.finish_capture(id, Err(Error::WrongState(e.to_string())), None);
        })?;
        Ok(CaptureJob { snapshot, job })
    }

    /// Reads the disk and writes chunks and the manifest (steps 1 and 2 of
    /// the durability order).
    fn run_capture(
        &self,
        rec: &SnapshotRecord,
        disk: &dyn Disk,
        mode: CaptureMode,
        pins: &Pins,
        progress: &Progress,
    ) -> Result<(CaptureStats, Vec<ChunkId>)> {
        let started = std::time::Instant::now();
        let inner = &self.inner;
        let bs = inner.block_size;
        let settings = CaptureSettings {
            block_size: bs,
            compression_level: inner.compression_level.load(Ordering::Relaxed),
            window_len: inner.options.window_len,
            group_len: inner.group_len.load(Ordering::Relaxed) as usize,
        };
        let len = disk.len()?;
        // Holes of a sparse image are zero without reading.
        let data = disk.data_ranges()?;
        let mut how = CaptureStats::default();
        let full = |how: &mut CaptureStats, reason| {
            how.full_reason = reason;
            CapturePlan::full(len, bs, data.as_deref())
        };
        let plan = match mode {
            CaptureMode::Full(reason) => full(&mut how, reason),
            CaptureMode::Incremental {
                parent,
                dirty,
                generation,
            } => match inner.manifests.read(parent) {
                Err(e) if generation.is_none() => return Err(e),
                Err(_) => full(&mut how, Some(FullReason::BaseGone)),
                Ok(p) if p.image_len != len || p.block_size != bs => {
                    full(&mut how, Some(FullReason::DiskResized))
                }
                Ok(p) => {
                    let runs = dirty.block_runs(bs)?;
                    let seed = rec.id.0 ^ started.elapsed().as_nanos() as u64 ^ now_nanos();
                    let rate = inner.options.clean_sample_rate;
                    let sample = capture::sample_check(disk, p.blocks(), &runs, bs, rate, seed)?;
                    how.sample_checked = sample.checked;
                    how.sample_mismatches = sample.mismatches;
                    if sample.mismatches > 0 {
                        full(&mut how, Some(FullReason::SampleMismatch))
                    } else {
                        how.kind = CaptureKind::Incremental;
                        how.parent = Some(parent);
                        how.tracking_generation = generation;
                        CapturePlan::incremental(p.blocks(), &runs, bs, data.as_deref())
                    }
                }
            },
        };
        let captured = capture::capture(&inner.store, disk, &settings, plan, pins, progress)?;
        let synced = std::time::Instant::now();
        inner.store.sync_pinned(pins)?;
        let manifest = Manifest::new(
            rec.id,
            rec.server_id,
            bs,
            captured.stats.image_len,
            captured.blocks,
        )?;
        inner.manifests.write(&manifest)?;
        let chunks = refs::distinct(manifest.blocks());
        let stats = CaptureStats {
            micros: started.elapsed().as_micros() as u64,
            sync_micros: synced.elapsed().as_micros() as u64,
            kind: how.kind,
            parent: how.parent,
            full_reason: how.full_reason,
            sample_checked: how.sample_checked,
            sample_mismatches: how.sample_mismatches,
            tracking_generation: how.tracking_generation,
            ..captured.stats
        };
        Ok((stats, chunks))
    }

    /// Step 3: the catalog commit that marks the snapshot completed (or
    /// failed, with the reason).
    fn finish_capture(
        &self,
        id: SnapshotId,
        outcome: Result<(CaptureStats, Vec<ChunkId>)>,
        previous: Option<Tracker>,
    ) -> Result<Snapshot> {
        let mut state = self.inner.state.lock();
        state.progress.remove(&id);
        state.capture_parents.remove(&id);
        let (outcome, chunks) = match outcome {
            Ok((stats, chunks)) => (Ok(stats), chunks),
            Err(e) => (Err(e), Vec::new()),
        };
        let mut rec = state.snapshot(id)?.clone();
        let server = rec.server_id;
        let ours = state.tracking.get(&server).is_some_and(|t| t.base == id);
        if ours && outcome.is_ok() {
            if let Some(t) = state.tracking.get_mut(&server) {
                t.pending = false;
            }
        } else if let (true, Some(current)) = (ours, state.tracking.remove(&server)) {
            // Not captured: the writes since count from the previous base.
            if let Some(mut p) = previous.filter(|p| !p.pending)
                && p.dirty.union_with(&current.dirty).is_ok()
            {
                p.trusted &= current.trusted;
                state.tracking.insert(server, p);
            }
        }
        match &outcome {
            Ok(stats) => {
                rec.status = SnapshotStatus::Completed;
                rec.stats = Some(*stats);
            }
            Err(e) => {
                rec.status = SnapshotStatus::Failed;
                rec.error = Some(e.to_string());
            }
        }
        let committed = self.inner.catalog.commit(&[Change::PutSnapshot(&rec)]);
        if outcome.is_err() {
            // Not completed: its manifest, if written, must not outlive it.
            rec.status = SnapshotStatus::Failed;
            let _ = self.inner.manifests.remove(id);
        } else if let Err(e) = &committed {
            // A commit that reported an error may still have reached the
            // disk. Until the next open reads the truth (completed: kept;
            // in progress: failed, manifest removed), the snapshot is in
            // doubt: this process offers it as failed, but its manifest
            // stays and its chunks count as needed, so no collection or
            // delete in between can take what a completed snapshot needs.
            rec.status = SnapshotStatus::Failed;
            rec.error = Some(format!(
                "the catalog commit completing it failed ({e}); whether it completed is known when the store is opened again"
            ));
            state.in_doubt.insert(id);
        }
        state.snapshots.insert(id, rec.clone());
        if outcome.is_ok() {
            let store = &self.inner.store;
            if let Some(refs) = state.refs.as_mut() {
                refs.add(id, &chunks, |c| stored_size(store, c));
            }
        }
        committed?;
        outcome?;
        Ok(state.snapshot_view(&rec))
    }

    /// Deletes a snapshot: catalog entry first, then its manifest. Its
    /// chunks stay until garbage collection.
    pub fn delete_snapshot(&self, id: SnapshotId) -> Result<()> {
        let mut state = self.inner.state.lock();
        let rec = state.snapshot(id)?;
        if rec.status == SnapshotStatus::InProgress {
            return Err(Error::WrongState(format!(
                "snapshot {id} is still being created; wait for it to finish"
            )));
        }
        let restoring = state.live_restores.values().any(|s| *s == id)
            || state.servers.values().any(|s| s.restoring_from == Some(id));
        if restoring {
            return Err(Error::WrongState(format!(
                "snapshot {id} is being restored from; wait for the restore to finish"
            )));
        }
        if let Some((child, _)) = state.capture_parents.iter().find(|(_, p)| **p == id) {
            return Err(Error::WrongState(format!(
                "snapshot {id} is the parent of snapshot {child}, still being created; wait for it to finish"
            )));
        }
        let completed = state.holds_data(rec);
        // The counts need the chunk list, which goes with the manifest.
        let chunks = match (&state.refs, completed) {
            (Some(_), true) => self
                .inner
                .manifests
                .read(id)
                .map(|m| refs::distinct(m.blocks()))
                .ok(),
            _ => None,
        };
        // Should this commit report an error, the snapshot stays as it was
        // in this process (listed, its chunks needed) until a delete
        // commits or the next open reads the truth.
        self.inner.catalog.commit(&[Change::RemoveSnapshot(id)])?;
        state.snapshots.remove(&id);
        state.in_doubt.remove(&id);
        match (chunks, completed) {
            (Some(chunks), _) => {
                if let Some(refs) = state.refs.as_mut() {
                    refs.remove(id, &chunks);
                }
            }
            // A damaged manifest: count again from the others when needed.
            (None, true) => state.refs = None,
            (None, false) => {}
        }
        drop(state);
        // The delete is done once the catalog says so. A manifest that cannot
        // be removed now is an orphan, which the next open removes.
        let _ = self.inner.manifests.remove(id);
        if self.inner.options.auto_gc {
            self.start_auto_gc();
        }
        Ok(())
    }

    /// Counts which snapshots reference each chunk (reading every completed
    /// manifest once), so that snapshots carry their exclusive bytes and
    /// garbage collection knows what is needed. Later captures and deletes
    /// keep the counts exact without reading manifests again.
    pub fn account_space(&self) -> Result<()> {
        let mut state = self.inner.state.lock();
        self.ensure_refs(&mut state)
    }

    fn ensure_refs(&self, state: &mut State) -> Result<()> {
        if state.refs.is_some() {
            return Ok(());
        }
        let store = &self.inner.store;
        let mut refs = Refs::default();
        for rec in state.snapshots.values() {
            if state.holds_data(rec) {
                let m = self.inner.manifests.read(rec.id)?;
                refs.add(rec.id, &refs::distinct(m.blocks()), |c| {
                    stored_size(store, c)
                });
            }
        }
        state.refs = Some(refs);
        Ok(())
    }

    /// Stored bytes only this completed snapshot references: what deleting
    /// it alone would give back after garbage collection.
    pub fn exclusive_bytes(&self, id: SnapshotId) -> Result<u64> {
        let mut state = self.inner.state.lock();
        self.ensure_refs(&mut state)?;
        let rec = state.snapshot(id)?;
        if rec.status != SnapshotStatus::Completed {
            return Err(Error::WrongState(format!(
                "snapshot {id} is {}; only a completed snapshot holds data",
                rec.status.as_str()
            )));
        }
        Ok(state
            .refs
            .as_ref()
            .and_then(|r| r.exclusive(id))
            .unwrap_or(0))
    }

    /// True when a completed snapshot references the chunk.
    fn needed(&self, id: &ChunkId) -> bool {
        self.inner
            .state
            .lock()
            .refs
            .as_ref()
            .is_none_or(|r| r.is_needed(id))
    }

    /// Gives back the space of chunks no snapshot needs (see
    /// `store::gc`): deletes packs that hold none, and rewrites the packs
    /// with the most garbage until what is left is within
    /// [`EngineOptions::gc_max_unused`]. Safe while captures, restores and
    /// deletes run. With `dry_run`, changes nothing and reports what it
    /// would do.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport> {
        self.account_space()?;
        let needed = |id: &ChunkId| self.needed(id);
        self.inner.store.gc(
            &needed,
            self.inner.options.gc_max_unused,
            dry_run,
            self.compression_level(),
        )
    }

    /// Runs a collection in the background after a delete (with
    /// [`EngineOptions::auto_gc`]); its outcome is kept for
    /// [`Engine::last_auto_gc`].
    fn start_auto_gc(&self) {
        let engine = self.clone();
        let spawned = std::thread::Builder::new()
            .name("auto-gc".into())
            .spawn(move || {
                let outcome = engine.gc(false).map_err(|e| e.to_string());
                *engine.inner.last_auto_gc.lock() = Some(outcome);
            });
        if let Err(e) = spawned {
            *self.inner.last_auto_gc.lock() = Some(Err(e.to_string()));
        }
    }

    /// The outcome of the last automatic collection, if one ran.
    pub fn last_auto_gc(&self) -> Option<std::result::Result<GcReport, String>> {
        self.inner.last_auto_gc.lock().clone()
    }

    /// Sizes and ratios of the whole store.
    pub fn stats(&self) -> Result<StoreStats> {
        self.account_space()?;
        let (snapshots, logical_bytes, data_bytes) = {
            let state = self.inner.state.lock();
            state
                .snapshots
                .values()
                .filter(|s| s.status == SnapshotStatus::Completed)
                .filter_map(|s| s.stats)
                .fold((0, 0, 0), |(n, l, d), s| {
                    (n + 1, l + s.image_len, d + s.data_bytes)
                })
        };
        let needed = |id: &ChunkId| self.needed(id);
        let space = self.inner.store.space(&needed)?;
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        Ok(StoreStats {
            snapshots,
            logical_bytes,
            data_bytes,
            stored_bytes: space.stored_bytes,
            live_bytes: space.live_bytes,
            live_chunks: space.live_chunks,
            reclaimable_bytes: space.dead_bytes,
            dedup_ratio: ratio(data_bytes, space.live_raw_bytes),
            compression_ratio: ratio(space.live_raw_bytes, space.live_bytes),
            compression_level: self.compression_level(),
            group_len: self.group_len(),
        })
    }

    fn set_restoring_from(&self, server: ServerId, snapshot: Option<SnapshotId>) -> Result<()> {
        let mut state = self.inner.state.lock();
        let mut rec = state.server(server)?.clone();
        if rec.restoring_from == snapshot && !state.restoring_in_doubt.contains(&server) {
            return Ok(());
        }
        rec.restoring_from = snapshot;
        let committed = self.inner.catalog.commit(&[Change::PutServer(&rec)]);
        match (&committed, snapshot) {
            (Ok(()), _) => {
                state.restoring_in_doubt.remove(&server);
                state.servers.insert(server, rec);
            }
            // The mark may be on disk: keep it here too (the server stays
            // restoring, as the next open would say), and commit it again
            // before any restore writes.
            (Err(_), Some(_)) => {
                state.restoring_in_doubt.insert(server);
                state.servers.insert(server, rec);
            }
            // Clearing it failed: it stays set, here as on disk.
            (Err(_), None) => {}
        }
        committed
    }

    /// Reads every chunk of one completed snapshot, or of all of them, and
    /// checks its CRC32 and BLAKE3. Corruption is reported, not returned as
    /// an error: the report names each bad chunk and the snapshots using it.
    pub fn verify(&self, snapshot: Option<SnapshotId>) -> Result<VerifyReport> {
        let ids: Vec<SnapshotId> = {
            let state = self.inner.state.lock();
            match snapshot {
                Some(id) => {
                    let rec = state.snapshot(id)?;
                    if rec.status != SnapshotStatus::Completed {
                        return Err(Error::WrongState(format!(
                            "snapshot {id} is {}; only a completed snapshot can be verified",
                            rec.status.as_str()
                        )));
                    }
                    vec![id]
                }
                None => state
                    .snapshots
                    .values()
                    .filter(|s| s.status == SnapshotStatus::Completed)
                    .map(|s| s.id)
                    .collect(),
            }
        };
        let manifests = ids
            .into_iter()
            .map(|id| (id, self.inner.manifests.read(id)))
            .collect();
        let mut report = verify::verify(&self.inner.store, manifests);
        report.catalog_error = self.inner.catalog.check().err().map(|e| e.to_string());
        Ok(report)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Seal the open pack so the next open need not scan it.
        let _ = self.store.close();
        // The clean hand-over: no write can be missed until the next open.
        // If this commit fails, the trackers stay unclean and the next
        // captures read everything.
        let state = self.state.get_mut();
        if self.options.change_tracking && !state.tracking.is_empty() {
            let changes: Vec<Change<'_>> = state
                .tracking
                .iter()
                .map(|(server, t)| {
                    if t.pending {
                        Change::RemoveTracking(*server)
                    } else {
                        Change::PutTracking(*server, t.encode(true))
                    }
                })
                .collect();
            let _ = self.catalog.commit(&changes);
        }
    }
}

fn check_level(level: i32) -> Result<()> {
    if !(1..=19).contains(&level) {
        return Err(Error::InvalidParameter(format!(
            "compression level {level} is not from 1 to 19"
        )));
    }
    Ok(())
}

fn check_group_len(bytes: u32, block_size: u32) -> Result<()> {
    let max = crate::store::pack::MAX_CHUNK_LEN as u32;
    if bytes != 0 && !(block_size.saturating_mul(2)..=max).contains(&bytes) {
        return Err(Error::InvalidParameter(format!(
            "a compression group of {bytes} bytes: use 0 (none) or from two blocks \
             ({}) to {max} bytes",
            block_size.saturating_mul(2)
        )));
    }
    Ok(())
}

fn lock_store(root: &Path) -> Result<File> {
    let path = root.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .at(&path)?;
    // A lock just released can stay held for a moment: a process forked
    // (by anyone in this process) while the store was open keeps a copy of
    // the descriptor, and with it the flock, until it execs. So a held lock
    // is tried again for a short while before it means another owner.
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::StoreLocked {
                    path: root.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(path, e)),
        }
    }
}

/// How long a held store lock is tried again before it means the store is
/// in use (see `lock_store`).
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Applies the crash rules: captures left in progress become failed (and
/// lose any manifest), manifests of no completed snapshot are removed,
/// interrupted restores are reported.
fn recover(
    catalog: &Catalog,
    manifests: &Manifests,
    state: &mut State,
    report: &mut OpenReport,
) -> Result<()> {
    manifests.clean_temporaries()?;
    let mut failed = Vec::new();
    for rec in state.snapshots.values_mut() {
        if rec.status == SnapshotStatus::InProgress {
            rec.status = SnapshotStatus::Failed;
            rec.error =
                Some("interrupted: the process stopped before the capture completed".into());
            failed.push(rec.clone());
        }
    }
    if !failed.is_empty() {
        let changes: Vec<Change<'_>> = failed.iter().map(Change::PutSnapshot).collect();
        catalog.commit(&changes)?;
        report.failed_captures = failed.iter().map(|r| r.id).collect();
    }
    for id in manifests.ids()? {
        let completed = state
            .snapshots
            .get(&id)
            .is_some_and(|s| s.status == SnapshotStatus::Completed);
        if !completed {
            manifests.remove(id)?;
        }
    }
    report.interrupted_restores = state
        .servers
        .values()
        .filter_map(|s| s.restoring_from.map(|snap| (s.id, snap)))
        .collect();
    Ok(())
}
