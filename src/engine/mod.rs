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

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use parking_lot::Mutex;

use crate::catalog::{Catalog, Change, Loaded, ServerRecord};
use crate::compression::Compression;
use crate::error::{Error, IoContext, Result};
use crate::fsio::{ReadOnlyFs, StoreFs};
use crate::ids::{ServerId, SnapshotId};
use crate::manifest::Manifests;
use crate::options::{DEFAULT_BLOCK_SIZE, EngineOptions};
use crate::policy;
use crate::refs;
use crate::sorted::SortedIds;
use crate::store::gc::GcReport;
use crate::store::{ChunkStore, sync_dir};
use crate::types::{OpenReport, Server, Snapshot, SnapshotStatus};
use crate::verify::{self, VerifyReport};

mod captures;
mod exports;
#[cfg(feature = "s3")]
mod fleet;
mod live;
mod recovery;
mod restores;
mod space;
mod state;
mod tracking;

pub use exports::{ExportJob, ExportReport, ExportTarget};
pub use restores::{RestoreJob, RestoreOptions, RestorePlanReport};

use live::Tracking;
#[cfg(feature = "s3")]
pub(crate) use recovery::lock_store;
#[cfg(not(feature = "s3"))]
use recovery::lock_store;
use recovery::recover;
use state::State;
use tracking::load_tracking;

/// A snapshot and the blocks of a disk written since it was taken: the
/// disk's state, known without reading it.
pub(super) type Changed = (SnapshotId, crate::dirty::DirtyBitmap);

const LOCK_FILE: &str = "LOCK";
pub(crate) const CATALOG_FILE: &str = "catalog";
const MANIFEST_DIR: &str = "manifests";
const PACK_DIR: &str = "packs";

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
    tracking: Tracking,
    report: OpenReport,
    last_auto_gc: Mutex<Option<std::result::Result<GcReport, String>>>,
    /// Set once the store was closed ([`Engine::close`] or drop).
    closed: bool,
    /// Held for the life of the store; the OS releases it if we die.
    _lock: File,
}

impl EngineOptions {
    /// Opens (or creates) the store in `dir`. (Here rather than in
    /// `options`, so that the options know nothing of the engine.)
    pub fn open(self, dir: impl AsRef<Path>) -> Result<Engine> {
        Engine::open_with(dir.as_ref(), self)
    }
}

impl Engine {
    /// Opens the store in `dir`, creating it with the default options when
    /// it does not exist.
    pub fn open(dir: impl AsRef<Path>) -> Result<Engine> {
        EngineOptions::default().open(dir)
    }

    pub(crate) fn open_with(root: &Path, options: EngineOptions) -> Result<Engine> {
        let read_only = options.read_only;
        let exists = check_request(root, &options)?;
        if !read_only {
            fs::create_dir_all(root).at(root)?;
        }
        let lock = lock_store(root, read_only)?;
        // Read-only, nothing can write, whatever path the code takes.
        let store_fs: Arc<dyn StoreFs> = if read_only {
            Arc::new(ReadOnlyFs(options.store_fs.clone()))
        } else {
            options.store_fs.clone()
        };
        let (catalog, loaded) = open_catalog(root, &options, store_fs.clone())?;
        check_fixed_settings(&options, &loaded)?;
        options.validate(loaded.block_size)?;
        let manifests = Manifests::open(
            root.join(MANIFEST_DIR),
            store_fs.clone(),
            options.block_list_memory,
        )?;
        let packs = root.join(PACK_DIR);
        let (store, recovery) = if read_only {
            ChunkStore::open_read_only(&packs, store_fs.clone())?
        } else {
            ChunkStore::open(&packs, store_fs.clone())?
        };
        store.set_index_persist_min(options.index_persist_min);
        store.set_table_memory(options.table_memory);
        if let Some(bytes) = options.pack_target {
            store.set_pack_target(bytes);
        }
        if let Some(c) = options.coordinator.clone() {
            store.set_seal_hook(Arc::new(move |seq, path| c.pack_sealed(seq, path)));
        }
        if !exists {
            sync_dir(store_fs.as_ref(), root)?;
        }
        let mut report = OpenReport {
            packs_recovered: recovery.packs_sealed,
            bytes_cut: recovery.bytes_cut,
            unreadable_packs: recovery.unreadable,
            packs_indexed: recovery.packs_indexed,
            index_rebuilt: recovery.index_rebuilt,
            index_unsaved: recovery.index_unsaved,
            ..OpenReport::default()
        };
        let mut state = State::new(loaded.servers, loaded.snapshots, loaded.next_snapshot_id);
        // Only the header: a table that is damaged or stale is found out
        // when the counts are needed, and counted again from the manifests.
        match refs::Tables::open(store_fs.as_ref(), manifests.dir()) {
            Ok(mut tables) => {
                tables.set_memory(options.table_memory);
                state.refs_covered = tables.covered().iter().map(|(s, _)| *s).collect();
                state.refs_tables = tables;
            }
            Err(_) => state.refs_table_unusable = true,
        }
        recover(&catalog, &manifests, &mut state, &mut report, !read_only)?;
        if !read_only {
            remove_scratch_dirs(root);
        }
        let held = state.held();
        state.figures = loaded
            .exclusive
            .filter(|(digest, figures)| {
                *digest == refs::digest(held.iter().copied()) && figures.keys().eq(held.iter())
            })
            .map(|(_, figures)| figures);
        let servers = state.servers.keys().copied();
        let tracking = load_tracking(&catalog, servers, options.change_tracking)?;
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
                tracking,
                report,
                last_auto_gc: Mutex::new(None),
                closed: false,
                _lock: lock,
            }),
        })
    }

    /// Closes the store and reports what dropping it would swallow: sealing
    /// the open pack and the change trackers' clean hand-over. Fails with
    /// [`Error::WrongState`] while another handle (a clone, or a running
    /// capture's or restore's job) still holds the store: then this handle
    /// is gone, and the last one to go closes the store (best effort).
    pub fn close(self) -> Result<()> {
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => inner.shutdown(),
            Err(inner) => Err(Error::WrongState(format!(
                "the store cannot close yet: {} other handles (clones or running jobs) hold it; \
                 wait for the jobs and drop the clones",
                Arc::strong_count(&inner) - 1
            ))),
        }
    }

    /// Refuses `operation` on a read-only engine.
    fn writable(&self, operation: &str) -> Result<()> {
        if self.inner.options.read_only {
            return Err(Error::ReadOnly {
                path: self.inner.root.clone(),
                operation: operation.into(),
            });
        }
        Ok(())
    }

    /// True when opened with [`EngineOptions::read_only`].
    pub fn is_read_only(&self) -> bool {
        self.inner.options.read_only
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The store's block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.inner.block_size
    }

    /// How new chunks are compressed, in its named form when it has one.
    pub fn compression(&self) -> Compression {
        Compression::new(self.level(), self.group_len())
    }

    /// Changes how chunks stored from now on are compressed (durably).
    /// Stored chunks keep theirs: every record says how it is compressed.
    pub fn set_compression(&self, compression: Compression) -> Result<()> {
        compression.check(self.inner.block_size)?;
        self.writable("changing the compression")?;
        let _state = self.inner.state.lock();
        let (level, group) = (compression.level(), compression.group_len());
        self.inner.catalog.set_compression(level, group)?;
        self.inner.compression_level.store(level, Ordering::Relaxed);
        self.inner.group_len.store(group, Ordering::Relaxed);
        Ok(())
    }

    /// The zstd level of new chunks.
    fn level(&self) -> i32 {
        self.inner.compression_level.load(Ordering::Relaxed)
    }

    /// Bytes of new chunks compressed as one group record (0: none).
    fn group_len(&self) -> u32 {
        self.inner.group_len.load(Ordering::Relaxed)
    }

    /// What opening the store found and repaired.
    pub fn open_report(&self) -> &OpenReport {
        &self.inner.report
    }

    /// Why the chunk index table was found stale and replaced after open,
    /// if it was: open checks only that the packs it covers are there;
    /// their lengths and trailers are checked at the first look-up, so
    /// that opening reads nothing per pack. (One found unusable at open
    /// is in [`Engine::open_report`].)
    pub fn index_found_stale(&self) -> Option<String> {
        self.inner.store.stale_table()
    }

    /// Number of distinct chunks stored.
    pub fn chunk_count(&self) -> usize {
        self.inner.store.chunk_count()
    }

    /// Heap bytes of the in-memory chunk index (about 30 per chunk).
    pub fn index_bytes(&self) -> usize {
        self.inner.store.index_bytes()
    }

    /// Registers a server and its disk: an image file or a block device (it
    /// need not exist yet), stored absolute; or an NBD URI
    /// (`nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST[:PORT]/EXPORT`), its
    /// socket path stored absolute.
    pub fn add_server(&self, id: ServerId, name: &str, disk: impl AsRef<Path>) -> Result<Server> {
        self.add_server_as(id, name, disk.as_ref(), true, policy::DEFAULT_ACCOUNT)
    }

    /// [`Engine::add_server`] for `account` (the default account's
    /// otherwise): the API acts on it only for that account's tokens.
    pub fn add_server_for(
        &self,
        id: ServerId,
        name: &str,
        disk: impl AsRef<Path>,
        account: &str,
    ) -> Result<Server> {
        self.add_server_as(id, name, disk.as_ref(), true, account)
    }

    /// Moves server `id` to `account`.
    pub fn set_server_account(&self, id: ServerId, account: &str) -> Result<Server> {
        policy::check_account_name(account)?;
        self.writable("moving a server to another account")?;
        let mut state = self.inner.state.lock();
        let mut rec = state.server(id)?.clone();
        rec.account = account.to_string();
        self.inner.catalog.commit(&[Change::PutServer(&rec)])?;
        let view = state.server_view(&rec);
        state.servers.insert(id, rec);
        Ok(view)
    }

    /// [`Engine::add_server`]; `in_fleet`: in the fleet's catalog too
    /// (first), else only here (the fleet has it already).
    pub(crate) fn add_server_as(
        &self,
        id: ServerId,
        name: &str,
        disk: &Path,
        in_fleet: bool,
        account: &str,
    ) -> Result<Server> {
        policy::check_server_name(name)?;
        policy::check_account_name(account)?;
        self.writable("adding a server")?;
        if disk.as_os_str().is_empty() {
            return Err(Error::InvalidParameter("the disk path is empty".into()));
        }
        let disk = match disk.to_str() {
            Some(uri) if crate::nbd::is_uri(uri) => {
                PathBuf::from(crate::nbd::NbdUri::parse(uri)?.absolute()?.to_string())
            }
            Some(uri) if crate::live::is_uri(uri) => {
                PathBuf::from(crate::live::QemuDisk::parse(uri)?.to_uri()?)
            }
            _ => std::path::absolute(disk).at(disk)?,
        };
        let mut state = self.inner.state.lock();
        if state.servers.contains_key(&id) {
            return Err(Error::ServerExists(id));
        }
        if let (true, Some(c)) = (in_fleet, &self.inner.options.coordinator) {
            c.add_server(id, name, &disk)?;
        }
        let rec = ServerRecord {
            id,
            name: name.to_string(),
            disk,
            restoring_from: None,
            account: account.to_string(),
        };
        self.inner.catalog.commit(&[Change::PutServer(&rec)])?;
        let view = state.server_view(&rec);
        state.servers.insert(id, rec);
        self.inner.tracking.lock().add_server(id);
        drop(state);
        if let (true, Some(c)) = (in_fleet, &self.inner.options.coordinator) {
            // The snapshots other hosts took of it are this host's now.
            c.refresh(self).map_err(|e| {
                Error::WrongState(format!(
                    "server {id} is registered, but taking in the snapshots other hosts took \
                     of it failed ({e}); they are taken in when the store is next opened"
                ))
            })?;
        }
        Ok(view)
    }

    /// Opens a server's disk for a restore or its planning: a QEMU disk
    /// through an export of its node, with the blocks changed since the
    /// server's newest completed snapshot when its checkpoint tells;
    /// anything else with the disk opener.
    pub(super) fn open_disk(
        &self,
        server: ServerId,
        path: &Path,
        writable: bool,
    ) -> Result<(Box<dyn crate::disk::Disk>, Option<Changed>)> {
        match crate::live::disk_of(path)? {
            Some(q) => {
                let newest = self.inner.state.lock().newest_completed(server);
                let mut disk = crate::live::Writable::open(
                    &q,
                    &self.live_dir(server),
                    self.live_names()?,
                    path,
                    writable,
                    newest,
                    u64::from(self.inner.block_size),
                )?;
                let changed = disk.since.take();
                Ok((Box::new(disk), changed))
            }
            None => Ok(((self.inner.options.disk_opener)(path, writable)?, None)),
        }
    }

    /// How this store names what it creates in QEMU: with a tag of its
    /// own, made at first use and kept in the catalog.
    pub(super) fn live_names(&self) -> Result<crate::live::Names> {
        const KEY: &str = "live_tag";
        if let Some(tag) = self.inner.catalog.meta(KEY)? {
            return Ok(crate::live::Names { tag: tag as u32 });
        }
        let seed = format!(
            "{:?} {} {}",
            std::time::SystemTime::now(),
            std::process::id(),
            self.root().display()
        );
        let hash = blake3::hash(seed.as_bytes());
        let b = hash.as_bytes();
        let tag = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        self.inner.catalog.set_meta(KEY, u64::from(tag))?;
        Ok(crate::live::Names { tag })
    }

    /// Where live operations on `server` keep scratch files and private
    /// sockets (one directory a server, so that each cleans up only its
    /// own leftovers).
    pub(super) fn live_dir(&self, server: ServerId) -> PathBuf {
        self.root().join("live").join(server.0.to_string())
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

    /// Reads every chunk of one completed snapshot, or of all of them, and
    /// checks its CRC32 and BLAKE3. Corruption is reported, not returned as
    /// an error: the report names each bad chunk and the snapshots using it.
    pub fn verify(&self, snapshot: Option<SnapshotId>) -> Result<VerifyReport> {
        let ids: Vec<SnapshotId> = {
            let state = self.inner.state.lock();
            match snapshot {
                Some(id) => {
                    state.completed(id, "can be verified")?;
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
        // The table first: the chunks' look-ups below would rebuild a
        // damaged one by themselves, and the report must still say so.
        let index_error = match snapshot {
            None => self.inner.store.check_index().err().map(|e| e.to_string()),
            Some(_) => None,
        };
        let inner = &self.inner;
        let mut report = verify::verify(
            &inner.store,
            &ids,
            |id| inner.manifests.read(id),
            inner.options.block_list_memory,
            &inner.scratch_dir(),
        )?;
        report.catalog_error = self.inner.catalog.check().err().map(|e| e.to_string());
        report.index_error = index_error;
        if snapshot.is_none() {
            report.space_error = self.check_space();
        }
        Ok(report)
    }

    /// Rebuilds the chunk index table from the packs (which stay the
    /// source of truth), and the reference counts' table from the
    /// manifests, and returns what the index is then. Open does it
    /// by itself when the table is missing, stale or damaged, and so does
    /// a look-up that finds a damaged page; this is for operators.
    pub fn rebuild_index(&self) -> Result<crate::store::IndexInfo> {
        self.writable("rebuilding the chunk index")?;
        self.inner.store.rebuild_index()?;
        self.recount_space()?;
        Ok(self.inner.store.index_info())
    }
}

/// Refuses what cannot be opened as asked, before anything is made or
/// locked; returns whether the store exists. A new store's settings are
/// checked here, an existing store's once its block size is known.
fn check_request(root: &Path, options: &EngineOptions) -> Result<bool> {
    let catalog = root.join(CATALOG_FILE);
    let exists = catalog.exists();
    // Packs or manifests without a catalog: a store that lost its catalog,
    // not an empty directory. Making a new one here would hide them.
    let holds =
        |dir: &str| fs::read_dir(root.join(dir)).is_ok_and(|mut entries| entries.next().is_some());
    if !exists && (holds(PACK_DIR) || holds(MANIFEST_DIR)) {
        return Err(Error::corrupt(
            catalog,
            "it is missing, but the store holds packs or manifests: the list of its \
             snapshots is lost; put the catalog file back (from a backup) rather than make \
             a new store here",
        ));
    }
    if !exists && (!options.create || options.read_only) {
        return Err(Error::NoStore {
            path: root.to_path_buf(),
        });
    }
    if options.read_only && options.change_tracking {
        return Err(Error::InvalidParameter(
            "change tracking records writes in the store; a read-only open cannot have it".into(),
        ));
    }
    if !exists {
        options.validate(options.block_size.unwrap_or(DEFAULT_BLOCK_SIZE))?;
    }
    Ok(exists)
}

/// The catalog, created with the options' settings when new.
fn open_catalog(
    root: &Path,
    options: &EngineOptions,
    fs: Arc<dyn StoreFs>,
) -> Result<(Catalog, Loaded)> {
    let path = root.join(CATALOG_FILE);
    if options.read_only {
        return Catalog::open_read_only(&path, fs);
    }
    let compression = options.compression.unwrap_or_default();
    let block_size = options.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    let create = (block_size, compression.level(), compression.group_len());
    Catalog::open(&path, Some(create), fs)
}

/// Settings made when the store was created: asking an existing store for
/// others is an error that says what it has (never silently ignored).
fn check_fixed_settings(options: &EngineOptions, loaded: &Loaded) -> Result<()> {
    if let Some(bs) = options.block_size
        && bs != loaded.block_size
    {
        return Err(Error::InvalidParameter(format!(
            "the store uses {}-byte blocks, fixed at creation; {bs} was asked for",
            loaded.block_size
        )));
    }
    let has = Compression::new(loaded.compression_level, loaded.group_len);
    if let Some(asked) = options.compression
        && asked.canonical() != has
    {
        return Err(Error::InvalidParameter(format!(
            "the store compresses new chunks as {has}, set at creation; {asked} was asked for \
             (Engine::set_compression changes it)"
        )));
    }
    Ok(())
}

/// Scratch directories start so (see [`Inner::scratch_tables`]).
const SCRATCH_PREFIX: &str = ".scratch-";

/// Removes the scratch directories a process that died left in the store
/// (best effort: they hold nothing the store needs).
fn remove_scratch_dirs(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(SCRATCH_PREFIX) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

impl Inner {
    /// A scratch directory for tables of counts made to be compared and
    /// thrown away (`verify`'s count from every manifest): removed when
    /// dropped, or by the next open after a crash.
    fn scratch_tables(&self) -> Result<tempfile::TempDir> {
        let dir = self.scratch_dir();
        tempfile::Builder::new()
            .prefix(SCRATCH_PREFIX)
            .tempdir_in(&dir)
            .map_err(|e| Error::io(&dir, e))
    }

    /// Where scratch files go (a capture's block list, a chunk list being
    /// sorted): the store's directory, on its disk, or the system's
    /// temporary directory when the store is not on a real file system or
    /// is opened read-only (perhaps on a read-only mount).
    fn scratch_dir(&self) -> PathBuf {
        if self.root.is_dir() && !self.options.read_only {
            self.root.clone()
        } else {
            std::env::temp_dir()
        }
    }

    /// The distinct chunks a manifest references, sorted, in bounded
    /// memory ([`crate::EngineOptions::block_list_memory`]).
    fn chunks_of(&self, m: &crate::manifest::Manifest) -> Result<SortedIds> {
        m.chunks(self.options.block_list_memory, &self.scratch_dir())
    }

    /// Seals the open pack (so the next open need not scan it) and hands
    /// the trackers over cleanly (no write can be missed until the next
    /// open). Runs once; errors are reported, and both steps are tried.
    fn shutdown(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        let sealed = self.store.close();
        let counted = {
            let mut state = self.state.lock();
            space::persist_refs_if_due(self, &mut state)
        };
        let handed = if self.options.change_tracking {
            let rows = self.tracking.lock().hand_over();
            let changes: Vec<Change<'_>> = rows
                .iter()
                .map(|(server, row)| match row {
                    Some(bytes) => Change::PutTracking(*server, bytes.clone()),
                    None => Change::RemoveTracking(*server),
                })
                .collect();
            if changes.is_empty() {
                Ok(())
            } else {
                self.catalog.commit(&changes)
            }
        } else {
            Ok(())
        };
        sealed.and(counted).and(handed)
    }
}

impl Drop for Inner {
    /// The fallback for stores not closed with [`Engine::close`]: the same
    /// steps, their errors unseen. If the hand-over fails, the trackers
    /// stay unclean on disk and the next captures read everything.
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
