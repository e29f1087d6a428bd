//! The catalog: servers, snapshots and the id counter, in a redb database
//! (ACID, checksummed pages, one fsync per commit). Values are JSON so the
//! catalog stays readable with generic tools; the schema is in
//! docs/FORMAT.md ("Catalog").
//!
//! Only persistence lives here; the rules (names, the cap) are in `policy`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsio::{OpenMode, StoreFile, StoreFs};
use crate::ids::{ServerId, SnapshotId};
use crate::types::{CaptureStats, SnapshotKind, SnapshotStatus};

/// Version of the catalog schema this code writes.
/// 2: every JSON value ends with the CRC32 of its bytes (little-endian),
/// because redb checks its pages' checksums only when repairing, not on
/// every read. Format-1 catalogs (no CRC) still open.
pub const CATALOG_FORMAT: u64 = 2;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SERVERS: TableDefinition<u64, &[u8]> = TableDefinition::new("servers");
const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");
/// Change tracking per server, binary (see `tracking.rs`); created on first
/// use, so older catalogs open unchanged.
const TRACKING: TableDefinition<u64, &[u8]> = TableDefinition::new("tracking");
/// Each completed snapshot's exclusive bytes (u64, then the CRC32 of the
/// snapshot id and that number), committed with every change to them;
/// `META_EXCLUSIVE_OF` is the digest of the set of snapshots they were
/// counted for. Created on first use.
const EXCLUSIVE: TableDefinition<u64, &[u8]> = TableDefinition::new("exclusive");

const META_FORMAT: &str = "format";
const META_BLOCK_SIZE: &str = "block_size";
const META_COMPRESSION: &str = "compression_level";
/// Bytes of new chunks compressed together (0 or absent: one frame each).
const META_GROUP_LEN: &str = "compression_group_len";
const META_NEXT_SNAPSHOT: &str = "next_snapshot_id";
const META_EXCLUSIVE_OF: &str = "exclusive_of";

/// A registered server, as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub id: ServerId,
    pub name: String,
    pub disk: PathBuf,
    /// Set while a restore from this snapshot has started and not finished;
    /// survives a crash, so a half-restored disk is never reported idle.
    pub restoring_from: Option<SnapshotId>,
    /// The account that owns it: the API shows and acts on it only for
    /// that account's tokens (and operators'). Stores from before accounts
    /// read as the default account's.
    #[serde(default = "crate::policy::default_account")]
    pub account: String,
}

/// A snapshot, as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub server_id: ServerId,
    pub name: String,
    pub description: String,
    pub status: SnapshotStatus,
    /// RFC 3339, UTC, whole seconds.
    pub created_at: String,
    pub stats: Option<CaptureStats>,
    /// Why a failed snapshot failed.
    pub error: Option<String>,
    #[serde(default)]
    pub kind: SnapshotKind,
}

impl SnapshotRecord {
    /// MiB of non-zero data, rounded up; `None` until completed.
    pub fn size_mb(&self) -> Option<u64> {
        match (self.status, &self.stats) {
            (SnapshotStatus::Completed, Some(s)) => Some(s.data_bytes.div_ceil(1 << 20)),
            _ => None,
        }
    }
}

/// Everything the catalog holds, loaded at open.
pub struct Loaded {
    pub block_size: u32,
    /// zstd level for new chunks, a store-level setting.
    pub compression_level: i32,
    /// Bytes of new chunks compressed as one group record; 0: none.
    pub group_len: u32,
    pub next_snapshot_id: u64,
    pub servers: BTreeMap<ServerId, ServerRecord>,
    pub snapshots: BTreeMap<SnapshotId, SnapshotRecord>,
    /// Exclusive bytes as last committed, and the digest of the snapshots
    /// they were counted for (see `refs::digest`); `None` when there are
    /// none or one fails its checksum.
    pub exclusive: Option<(u64, BTreeMap<SnapshotId, u64>)>,
}

/// The catalog database.
pub struct Catalog {
    /// A format-1 catalog: its older values carry no CRC.
    legacy: std::sync::atomic::AtomicBool,
    /// Written only to check integrity, which redb does through `&mut`.
    db: parking_lot::RwLock<Db>,
    path: PathBuf,
}

/// The database, open for writing or (a read-only engine) only reading.
enum Db {
    Writable(Database),
    ReadOnly(redb::ReadOnlyDatabase),
}

impl Db {
    fn begin_read(&self) -> std::result::Result<redb::ReadTransaction, redb::TransactionError> {
        match self {
            Db::Writable(db) => db.begin_read(),
            Db::ReadOnly(db) => db.begin_read(),
        }
    }

    fn begin_write(&self, path: &Path) -> Result<redb::WriteTransaction> {
        match self {
            Db::Writable(db) => Ok(db.begin_write()?),
            Db::ReadOnly(_) => Err(Error::ReadOnly {
                path: path.parent().unwrap_or(path).to_path_buf(),
                operation: "a catalog change".into(),
            }),
        }
    }
}

/// One change to apply in a catalog commit.
pub enum Change<'a> {
    PutServer(&'a ServerRecord),
    PutSnapshot(&'a SnapshotRecord),
    RemoveSnapshot(SnapshotId),
    NextSnapshotId(u64),
    PutTracking(ServerId, Vec<u8>),
    RemoveTracking(ServerId),
    /// A snapshot's exclusive bytes (`None`: no longer counted).
    Exclusive(SnapshotId, Option<u64>),
    /// The digest of the set of snapshots the exclusive bytes count.
    ExclusiveOf(u64),
}

impl Catalog {
    /// Opens the catalog at `path`; when it does not exist yet and `create`
    /// (block size, compression level, group length) is given, creates it.
    ///
    /// redb panics on some kinds of damage to its file instead of returning
    /// an error; that panic is caught here and reported as corruption.
    ///
    /// The file is read and written through the store's file seam (redb's
    /// `StorageBackend`), like packs and manifests; the store's own lock
    /// keeps it to one owner.
    pub fn open(
        path: &Path,
        create: Option<(u32, i32, u32)>,
        fs: Arc<dyn StoreFs>,
    ) -> Result<(Self, Loaded)> {
        no_panic(path, || Self::open_inner(path, create, fs))
    }

    /// Opens an existing catalog without changing it: a catalog that needs
    /// recovery (not closed cleanly) is an error, not repaired.
    pub fn open_read_only(path: &Path, fs: Arc<dyn StoreFs>) -> Result<(Self, Loaded)> {
        no_panic(path, || {
            let file = match fs.open(path, OpenMode::Read) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::NoStore {
                        path: path.parent().unwrap_or(path).to_path_buf(),
                    });
                }
                Err(e) => return Err(Error::io(path, e)),
            };
            let backend = Backend {
                file,
                path: path.to_path_buf(),
            };
            let db = match Database::builder().open_read_only_with_backend(backend) {
                Err(redb::DatabaseError::RepairAborted) => {
                    return Err(Error::WrongState(format!(
                        "the catalog {} was not closed cleanly; open the store for writing once to recover it",
                        path.display()
                    )));
                }
                other => other?,
            };
            let catalog = Catalog {
                legacy: std::sync::atomic::AtomicBool::new(false),
                db: parking_lot::RwLock::new(Db::ReadOnly(db)),
                path: path.to_path_buf(),
            };
            let loaded = catalog.load()?;
            Ok((catalog, loaded))
        })
    }

    fn open_inner(
        path: &Path,
        create: Option<(u32, i32, u32)>,
        fs: Arc<dyn StoreFs>,
    ) -> Result<(Self, Loaded)> {
        let (file, exists) = match fs.open(path, OpenMode::ReadWrite) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if create.is_none() {
                    return Err(Error::NoStore {
                        path: path.parent().unwrap_or(path).to_path_buf(),
                    });
                }
                (fs.open(path, OpenMode::CreateNew).at(path)?, false)
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let db = Database::builder().create_with_backend(Backend {
            file,
            path: path.to_path_buf(),
        })?;
        let catalog = Catalog {
            legacy: std::sync::atomic::AtomicBool::new(false),
            db: parking_lot::RwLock::new(Db::Writable(db)),
            path: path.to_path_buf(),
        };
        if !exists {
            let (block_size, level, group_len) = create.ok_or_else(|| Error::NoStore {
                path: path.parent().unwrap_or(path).to_path_buf(),
            })?;
            let tx = catalog.db.read().begin_write(path)?;
            {
                let mut meta = tx.open_table(META)?;
                meta.insert(META_FORMAT, CATALOG_FORMAT)?;
                meta.insert(META_BLOCK_SIZE, u64::from(block_size))?;
                meta.insert(META_COMPRESSION, level as u64)?;
                meta.insert(META_GROUP_LEN, u64::from(group_len))?;
                meta.insert(META_NEXT_SNAPSHOT, 1)?;
                tx.open_table(SERVERS)?;
                tx.open_table(SNAPSHOTS)?;
            }
            tx.commit()?;
        }
        let loaded = catalog.load()?;
        Ok((catalog, loaded))
    }

    fn load(&self) -> Result<Loaded> {
        let tx = self.db.read().begin_read()?;
        let meta = tx.open_table(META)?;
        let get = |key: &str| -> Result<u64> {
            meta.get(key)?
                .map(|v| v.value())
                .ok_or_else(|| Error::corrupt(&self.path, format!("catalog lacks {key}")))
        };
        let format = get(META_FORMAT)?;
        self.legacy
            .store(format == 1, std::sync::atomic::Ordering::Relaxed);
        if format != CATALOG_FORMAT && format != 1 {
            return Err(Error::corrupt(
                &self.path,
                format!("unsupported catalog format {format}"),
            ));
        }
        let block_size = u32::try_from(get(META_BLOCK_SIZE)?)
            .map_err(|_| Error::corrupt(&self.path, "block size out of range"))?;
        crate::manifest::check_block_size(block_size)
            .map_err(|e| Error::corrupt(&self.path, e.to_string()))?;
        let next_snapshot_id = get(META_NEXT_SNAPSHOT)?;
        let compression_level = i32::try_from(get(META_COMPRESSION)?)
            .ok()
            .filter(|l| (1..=19).contains(l))
            .ok_or_else(|| Error::corrupt(&self.path, "compression level out of range"))?;
        let group_len = match meta.get(META_GROUP_LEN)? {
            None => 0,
            Some(v) => u32::try_from(v.value())
                .ok()
                .filter(|&g| g as usize <= crate::store::pack::MAX_CHUNK_LEN)
                .ok_or_else(|| {
                    Error::corrupt(&self.path, "compression group length out of range")
                })?,
        };

        let mut servers = BTreeMap::new();
        for row in tx.open_table(SERVERS)?.iter()? {
            let (k, v) = row?;
            let rec: ServerRecord = self.decode(v.value(), "server", k.value())?;
            if rec.id.0 != k.value() {
                return Err(Error::corrupt(
                    &self.path,
                    format!("server row {} holds server {}", k.value(), rec.id),
                ));
            }
            servers.insert(rec.id, rec);
        }
        let mut snapshots = BTreeMap::new();
        for row in tx.open_table(SNAPSHOTS)?.iter()? {
            let (k, v) = row?;
            let rec: SnapshotRecord = self.decode(v.value(), "snapshot", k.value())?;
            if rec.id.0 != k.value() || rec.id.0 >= next_snapshot_id {
                return Err(Error::corrupt(
                    &self.path,
                    format!(
                        "snapshot row {} holds snapshot {}, or is not below the id counter",
                        k.value(),
                        rec.id
                    ),
                ));
            }
            snapshots.insert(rec.id, rec);
        }
        let exclusive = match meta.get(META_EXCLUSIVE_OF)? {
            None => None,
            Some(digest) => match tx.open_table(EXCLUSIVE) {
                Ok(table) => {
                    let mut figures = BTreeMap::new();
                    let mut intact = true;
                    for row in table.iter()? {
                        let (k, v) = row?;
                        match exclusive_value(k.value(), v.value()) {
                            Some(bytes) => {
                                figures.insert(SnapshotId(k.value()), bytes);
                            }
                            None => intact = false,
                        }
                    }
                    intact.then_some((digest.value(), figures))
                }
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            },
        };
        Ok(Loaded {
            block_size,
            compression_level,
            group_len,
            next_snapshot_id,
            servers,
            snapshots,
            exclusive,
        })
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        bytes: &[u8],
        what: &str,
        key: u64,
    ) -> Result<T> {
        let body = match bytes.len().checked_sub(4) {
            Some(n) if crc32fast::hash(&bytes[..n]) == crate::le::u32_at(bytes, n) => &bytes[..n],
            _ if self.legacy.load(std::sync::atomic::Ordering::Relaxed) => bytes,
            _ => {
                return Err(Error::corrupt(
                    &self.path,
                    format!("{what} {key} fails its checksum"),
                ));
            }
        };
        serde_json::from_slice(body)
            .map_err(|e| Error::corrupt(&self.path, format!("{what} {key} does not decode: {e}")))
    }

    /// The persisted change-tracking records, by server.
    pub fn load_tracking(&self) -> Result<Vec<(ServerId, Vec<u8>)>> {
        no_panic(&self.path, || self.load_tracking_inner())
    }

    fn load_tracking_inner(&self) -> Result<Vec<(ServerId, Vec<u8>)>> {
        let tx = self.db.read().begin_read()?;
        let table = match tx.open_table(TRACKING) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((ServerId(k.value()), v.value().to_vec()));
        }
        Ok(out)
    }

    /// True when a change-tracking record of `server` is persisted.
    pub fn has_tracking(&self, server: ServerId) -> Result<bool> {
        no_panic(&self.path, || {
            let tx = self.db.read().begin_read()?;
            let table = match tx.open_table(TRACKING) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
                Err(e) => return Err(e.into()),
            };
            Ok(table.get(server.0)?.is_some())
        })
    }

    /// Checks the whole catalog file (redb's integrity check, which also
    /// repairs what it can). `Err` with what is wrong when it is damaged.
    pub fn check(&self) -> Result<()> {
        no_panic(&self.path, || {
            let mut db = self.db.write();
            // redb checks (and repairs) only through a writable handle: a
            // read-only catalog is read, not checked.
            let Db::Writable(db) = &mut *db else {
                return Ok(());
            };
            match db.check_integrity() {
                Ok(true) => Ok(()),
                Ok(false) => Err(Error::corrupt(
                    &self.path,
                    "the catalog database was damaged (redb repaired it)",
                )),
                // Busy with another transaction: not checked now.
                Err(redb::DatabaseError::TransactionInProgress) => Ok(()),
                Err(e) => Err(Error::corrupt(&self.path, e.to_string())),
            }
        })
    }

    /// A number kept in the catalog's `meta` table (measured rates).
    pub fn meta(&self, key: &str) -> Result<Option<u64>> {
        no_panic(&self.path, || self.meta_inner(key))
    }

    fn meta_inner(&self, key: &str) -> Result<Option<u64>> {
        let tx = self.db.read().begin_read()?;
        Ok(tx.open_table(META)?.get(key)?.map(|v| v.value()))
    }

    /// Sets a number in the `meta` table.
    pub fn set_meta(&self, key: &str, value: u64) -> Result<()> {
        no_panic(&self.path, || self.set_meta_inner(key, value))
    }

    fn set_meta_inner(&self, key: &str, value: u64) -> Result<()> {
        let tx = self.db.read().begin_write(&self.path)?;
        tx.open_table(META)?.insert(key, value)?;
        tx.commit()?;
        Ok(())
    }

    /// Changes how new chunks are compressed: the zstd level and the bytes
    /// compressed together, in one transaction.
    pub fn set_compression(&self, level: i32, group_len: u32) -> Result<()> {
        no_panic(&self.path, || {
            let tx = self.db.read().begin_write(&self.path)?;
            {
                let mut meta = tx.open_table(META)?;
                meta.insert(META_COMPRESSION, level as u64)?;
                meta.insert(META_GROUP_LEN, u64::from(group_len))?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Applies `changes` in one durable transaction: all or nothing.
    pub fn commit(&self, changes: &[Change<'_>]) -> Result<()> {
        no_panic(&self.path, || self.commit_inner(changes))
    }

    fn commit_inner(&self, changes: &[Change<'_>]) -> Result<()> {
        let tx = self.db.read().begin_write(&self.path)?;
        {
            let mut servers = tx.open_table(SERVERS)?;
            let mut snapshots = tx.open_table(SNAPSHOTS)?;
            let mut meta = tx.open_table(META)?;
            let mut tracking = tx.open_table(TRACKING)?;
            let mut exclusive = tx.open_table(EXCLUSIVE)?;
            for change in changes {
                match change {
                    Change::PutServer(s) => {
                        servers.insert(s.id.0, json(s).as_slice())?;
                    }
                    Change::PutSnapshot(s) => {
                        snapshots.insert(s.id.0, json(s).as_slice())?;
                    }
                    Change::RemoveSnapshot(id) => {
                        snapshots.remove(id.0)?;
                        exclusive.remove(id.0)?;
                    }
                    Change::NextSnapshotId(n) => {
                        meta.insert(META_NEXT_SNAPSHOT, *n)?;
                    }
                    Change::PutTracking(server, bytes) => {
                        tracking.insert(server.0, bytes.as_slice())?;
                    }
                    Change::RemoveTracking(server) => {
                        tracking.remove(server.0)?;
                    }
                    Change::Exclusive(id, Some(bytes)) => {
                        exclusive.insert(id.0, exclusive_row(*id, *bytes).as_slice())?;
                    }
                    Change::Exclusive(id, None) => {
                        exclusive.remove(id.0)?;
                    }
                    Change::ExclusiveOf(digest) => {
                        meta.insert(META_EXCLUSIVE_OF, *digest)?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// An exclusive-bytes row: the number, then the CRC32 of the snapshot id
/// and the number.
fn exclusive_row(id: SnapshotId, bytes: u64) -> [u8; 12] {
    let mut row = [0u8; 12];
    let mut h = crc32fast::Hasher::new();
    h.update(&id.0.to_le_bytes());
    h.update(&bytes.to_le_bytes());
    row[..8].copy_from_slice(&bytes.to_le_bytes());
    row[8..].copy_from_slice(&h.finalize().to_le_bytes());
    row
}

/// The number an exclusive-bytes row of snapshot `id` holds, if intact.
fn exclusive_value(id: u64, row: &[u8]) -> Option<u64> {
    let bytes = (row.len() == 12).then(|| crate::le::u64_at(row, 0))?;
    (exclusive_row(SnapshotId(id), bytes)[..] == *row).then_some(bytes)
}

/// A record as stored: its JSON, then the CRC32 of the JSON.
fn json<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).expect("catalog records always serialize");
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// redb's storage over a store file.
struct Backend {
    file: Arc<dyn StoreFile>,
    path: PathBuf,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "catalog file {}", self.path.display())
    }
}

impl redb::StorageBackend for Backend {
    fn len(&self) -> std::result::Result<u64, std::io::Error> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::result::Result<(), std::io::Error> {
        self.file.read_exact_at(out, offset)
    }
    fn set_len(&self, len: u64) -> std::result::Result<(), std::io::Error> {
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::result::Result<(), std::io::Error> {
        self.file.sync()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::result::Result<(), std::io::Error> {
        self.file.write_all_at(data, offset)
    }
}

/// Runs a catalog operation, turning a panic inside redb (its answer to
/// some damaged files) into a corruption error naming the catalog.
fn no_panic<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Error::corrupt(
            path,
            format!("the catalog database is damaged ({what})"),
        ))
    })
}

/// A regular snapshot of server 1 named `s{id}`, for unit tests.
#[cfg(test)]
pub(crate) fn test_record(id: u64, status: SnapshotStatus) -> SnapshotRecord {
    SnapshotRecord {
        id: SnapshotId(id),
        server_id: ServerId(1),
        name: format!("s{id}"),
        description: String::new(),
        status,
        created_at: "2026-01-01T00:00:00Z".into(),
        stats: None,
        error: None,
        kind: SnapshotKind::Regular,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::catalog::test_record as snap;

    #[test]
    fn catalog_commits_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        {
            let (c, loaded) =
                Catalog::open(&path, Some((65536, 3, 0)), Arc::new(crate::fsio::StdFs)).unwrap();
            assert_eq!(loaded.next_snapshot_id, 1);
            let server = ServerRecord {
                id: ServerId(9),
                name: "web".into(),
                disk: "/dev/null".into(),
                restoring_from: None,
                account: "default".into(),
            };
            c.commit(&[
                Change::PutServer(&server),
                Change::PutSnapshot(&snap(1, SnapshotStatus::Completed)),
                Change::NextSnapshotId(2),
            ])
            .unwrap();
        }
        let (_, loaded) = Catalog::open(&path, None, Arc::new(crate::fsio::StdFs)).unwrap();
        assert_eq!(loaded.block_size, 65536);
        assert_eq!(loaded.next_snapshot_id, 2);
        assert_eq!(loaded.servers[&ServerId(9)].name, "web");
        assert_eq!(
            loaded.snapshots[&SnapshotId(1)].status,
            SnapshotStatus::Completed
        );
    }

    fn open_at(path: &Path) -> Result<(Catalog, Loaded)> {
        Catalog::open(path, None, Arc::new(crate::fsio::StdFs))
    }

    fn create_at(path: &Path) -> Catalog {
        Catalog::open(path, Some((65536, 3, 0)), Arc::new(crate::fsio::StdFs))
            .unwrap()
            .0
    }

    #[test]
    fn meta_values_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        create_at(&path).set_meta("live_tag", 0xfeed).unwrap();
        let (c, _) = open_at(&path).unwrap();
        assert_eq!(c.meta("live_tag").unwrap(), Some(0xfeed));
        assert_eq!(c.meta("absent").unwrap(), None);
    }

    #[test]
    fn an_unknown_format_is_refused_and_format_1_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        create_at(&path).set_meta(META_FORMAT, 3).unwrap();
        let err = open_at(&path).err().unwrap();
        assert!(
            err.to_string().contains("unsupported catalog format 3"),
            "{err}"
        );

        // Format 1: values without their CRC.
        let path = dir.path().join("legacy");
        {
            let c = create_at(&path);
            c.set_meta(META_FORMAT, 1).unwrap();
            c.set_meta(META_NEXT_SNAPSHOT, 5).unwrap();
            let rec = snap(4, SnapshotStatus::Completed);
            let json = serde_json::to_vec(&rec).unwrap();
            let tx = c.db.read().begin_write(&c.path).unwrap();
            tx.open_table(SNAPSHOTS)
                .unwrap()
                .insert(4, json.as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let (_, loaded) = open_at(&path).unwrap();
        assert_eq!(loaded.snapshots[&SnapshotId(4)].name, "s4");
    }
}
