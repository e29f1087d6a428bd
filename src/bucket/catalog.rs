//! A catalog several hosts share in a bucket: servers, their snapshots
//! and the snapshot id counter, each an object changed only by
//! compare-and-swap, so that the rules hold whichever hosts act at once:
//! at most five snapshots a server, ids unique across the fleet, a server
//! registered once and attached by every host that has its disk.
//!
//! Objects, under the bucket's prefix (each JSON followed by the CRC32 of
//! its bytes, little-endian, checked on every read):
//!
//! - `catalog/store`: the store's format and block size, created once;
//! - `catalog/next-snapshot-id`: the next id to hand out;
//! - `catalog/servers/ID`: a server, the disk each host reaches it by, and
//!   its snapshots.
//!
//! Every change reads an object, changes it and replaces it if unchanged
//! since (`If-Match`), retrying from the read when another host's write
//! came first. Each write carries a stamp only its writer uses, so a write
//! whose outcome is unknown (no answer) is settled by reading the object
//! back: the stamp is there, or the change is made again.
//!
//! The engine of each host acts through it (see `crate::fleet`) and
//! keeps a mirror of what concerns its host in its own catalog.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Bucket, Version};
use crate::error::{Error, Result};
use crate::ids::{ServerId, SnapshotId};
use crate::policy;
use crate::types::{CaptureStats, SnapshotKind, SnapshotStatus};

/// The catalog format this code writes.
const FORMAT: u64 = 1;
const STORE: &str = "catalog/store";
const NEXT_ID: &str = "catalog/next-snapshot-id";
const GC: &str = "catalog/gc";
/// Tries of one change before giving up on contention.
const MAX_TRIES: u32 = 200;
/// Writes in a row without an answer before an update gives up (with
/// that error: the server is failing, not busy).
const MAX_DOUBTS: u32 = 8;

/// What a change makes of a document.
enum Step<R> {
    /// Already as wanted: nothing to write.
    Done(R),
    /// Changed: write it.
    Write(R),
}

/// A server as the fleet knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetServer {
    pub id: ServerId,
    pub name: String,
    /// Host name -> the path (or URI) of the server's disk there.
    pub disks: BTreeMap<String, PathBuf>,
    pub snapshots: Vec<FleetSnapshot>,
    /// The last writer's stamp.
    stamp: String,
}

/// A snapshot as the fleet knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSnapshot {
    pub id: SnapshotId,
    pub name: String,
    pub description: String,
    pub status: SnapshotStatus,
    pub kind: SnapshotKind,
    /// RFC 3339, UTC, whole seconds.
    pub created_at: String,
    /// The host that captured it.
    pub host: String,
    /// How it was captured, once completed.
    #[serde(default)]
    pub stats: Option<CaptureStats>,
}

/// Where the fleet's collection stands (`catalog/gc`): see `crate::fleet`
/// (module `gc`) for the protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcState {
    /// The current condemnation's number (0: none yet).
    pub generation: u64,
    pub phase: GcPhase,
    /// Pack objects no completed snapshot needed when they were marked.
    pub packs: BTreeSet<String>,
    /// Manifests of snapshots that were gone or failed when marked.
    pub manifests: BTreeSet<SnapshotId>,
    /// When condemned, by the marking host's clock (Unix seconds): the
    /// sweep waits a while after it, so that captures running then can
    /// take back what they use instead of failing.
    pub condemned_at: u64,
    /// Sweeping: the snapshots in progress when the sweep began (`None`
    /// for the moment until they are read); it waits for each to end.
    pub waiting_for: Option<BTreeSet<SnapshotId>>,
    /// Deleting: the packs and manifests agreed to go (a subset of those
    /// condemned, marked again), deleted by whichever collector gets
    /// there; nothing else is ever deleted, and no capture may use them.
    #[serde(default)]
    pub deleting: BTreeSet<String>,
    #[serde(default)]
    pub deleting_manifests: BTreeSet<SnapshotId>,
    /// The last writer's stamp.
    stamp: String,
}

/// The phases of a collection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GcPhase {
    /// Nothing condemned.
    #[default]
    Idle,
    /// Condemned: a capture that uses a condemned pack takes it back.
    Condemned,
    /// Being swept: what is condemned goes once every capture that was
    /// running when the sweep began has ended; a capture begun since that
    /// uses a condemned pack fails.
    Sweeping,
    /// The set to delete is agreed (`deleting`): it is being deleted.
    Deleting,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoreDoc {
    format: u64,
    block_size: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Counter {
    next: u64,
    stamp: String,
}

/// A document changed by compare-and-swap: it carries its writer's stamp.
trait Stamped: Serialize + DeserializeOwned + Clone {
    fn stamp(&mut self) -> &mut String;
}

impl Stamped for FleetServer {
    fn stamp(&mut self) -> &mut String {
        &mut self.stamp
    }
}

impl Stamped for GcState {
    fn stamp(&mut self) -> &mut String {
        &mut self.stamp
    }
}

impl Stamped for Counter {
    fn stamp(&mut self) -> &mut String {
        &mut self.stamp
    }
}

/// The fleet's catalog in one bucket, as one host acts on it.
pub struct FleetCatalog {
    bucket: std::sync::Arc<Bucket>,
    host: String,
    block_size: u32,
}

fn server_key(id: ServerId) -> String {
    format!("catalog/servers/{}", id.0)
}

/// JSON and its CRC32.
fn encode<T: Serialize>(doc: &T) -> Result<Vec<u8>> {
    let mut bytes =
        serde_json::to_vec(doc).map_err(|e| Error::Internal(format!("cannot encode: {e}")))?;
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

/// A document from an object's bytes (the other program's word): its
/// checksum, then its JSON.
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> std::result::Result<T, String> {
    let Some(split) = bytes.len().checked_sub(4) else {
        return Err("shorter than its checksum".into());
    };
    let (json, crc) = bytes.split_at(split);
    if crc32fast::hash(json).to_le_bytes() != crc {
        return Err("its checksum does not match".into());
    }
    serde_json::from_slice(json).map_err(|e| format!("not a catalog document: {e}"))
}

/// Any bytes as each kind of catalog document: true when one decodes.
#[cfg(feature = "testing")]
pub(crate) fn fuzz_documents(bytes: &[u8]) -> bool {
    decode::<FleetServer>(bytes).is_ok()
        || decode::<Counter>(bytes).is_ok()
        || decode::<StoreDoc>(bytes).is_ok()
        || decode::<GcState>(bytes).is_ok()
}

/// One valid document of each kind, for the fuzz corpus.
#[cfg(feature = "testing")]
pub(crate) fn fuzz_seeds() -> Vec<Vec<u8>> {
    let server = FleetServer {
        id: ServerId(3),
        name: "web".into(),
        disks: BTreeMap::from([("host-a".to_string(), PathBuf::from("/srv/web.img"))]),
        snapshots: vec![FleetSnapshot {
            id: SnapshotId(9),
            name: "nightly".into(),
            description: String::new(),
            status: SnapshotStatus::Completed,
            kind: SnapshotKind::Regular,
            created_at: "2026-12-01T00:00:00Z".into(),
            host: "host-a".into(),
            stats: Some(CaptureStats::default()),
        }],
        stamp: "host-a/1/2/3".into(),
    };
    let counter = Counter {
        next: 10,
        stamp: String::new(),
    };
    let store = StoreDoc {
        format: FORMAT,
        block_size: 65536,
    };
    let gc = GcState {
        generation: 2,
        phase: GcPhase::Sweeping,
        packs: BTreeSet::from(["packs/host-a/00000007-1.pack".to_string()]),
        manifests: BTreeSet::from([SnapshotId(4)]),
        condemned_at: 1_764_547_200,
        waiting_for: Some(BTreeSet::from([SnapshotId(9)])),
        deleting: BTreeSet::new(),
        deleting_manifests: BTreeSet::new(),
        stamp: "host-b/7/8/9".into(),
    };
    [
        encode(&server),
        encode(&counter),
        encode(&store),
        encode(&gc),
    ]
    .into_iter()
    .filter_map(|e| e.ok())
    .collect()
}

impl FleetCatalog {
    /// Creates the catalog of a new store in `bucket`; refuses a bucket
    /// (prefix) that holds one.
    pub fn init(
        bucket: impl Into<std::sync::Arc<Bucket>>,
        host: &str,
        block_size: u32,
    ) -> Result<Self> {
        let bucket = bucket.into();
        crate::manifest::check_block_size(block_size)?;
        let doc = StoreDoc {
            format: FORMAT,
            block_size,
        };
        // The counter first: a store object exists only once its counter
        // does (a counter left by an init that failed is used as it is).
        let counter = Counter {
            next: 1,
            stamp: String::new(),
        };
        bucket.create(NEXT_ID, encode(&counter)?)?;
        if bucket.create(STORE, encode(&doc)?)?.is_none() {
            return Err(Error::StoreExists {
                path: PathBuf::from(bucket.url()),
            });
        }
        Self::open(bucket, host)
    }

    /// The catalog of the store in `bucket`, acting as `host`.
    pub fn open(bucket: impl Into<std::sync::Arc<Bucket>>, host: &str) -> Result<Self> {
        let bucket = bucket.into();
        if host.is_empty() || host.len() > 255 || host.chars().any(|c| c.is_control()) {
            return Err(Error::InvalidParameter(format!(
                "{host:?} is not a host name (1-255 printable characters)"
            )));
        }
        let mut catalog = FleetCatalog {
            bucket,
            host: host.to_string(),
            block_size: 0,
        };
        let Some((doc, _)) = catalog.read::<StoreDoc>(STORE)? else {
            return Err(Error::NoStore {
                path: PathBuf::from(catalog.bucket.url()),
            });
        };
        if doc.format != FORMAT {
            return Err(Error::WrongState(format!(
                "the store in {} has catalog format {}; this blocksnap reads format {FORMAT}",
                catalog.bucket.url(),
                doc.format
            )));
        }
        crate::manifest::check_block_size(doc.block_size)
            .map_err(|_| catalog.corrupt(STORE, "its block size is not one blocksnap writes"))?;
        catalog.block_size = doc.block_size;
        Ok(catalog)
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The bucket the catalog is in.
    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    /// The bucket, to share.
    pub fn shared_bucket(&self) -> std::sync::Arc<Bucket> {
        self.bucket.clone()
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    fn corrupt(&self, key: &str, what: &str) -> Error {
        Error::corrupt(format!("{}/{key}", self.bucket.url()), what)
    }

    /// Reads and checks a document; `None` when there is none.
    fn read<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, Version)>> {
        let Some((bytes, version)) = self.bucket.get(key)? else {
            return Ok(None);
        };
        let doc = decode(&bytes).map_err(|what| self.corrupt(key, &what))?;
        Ok(Some((doc, version)))
    }

    /// A stamp no other write uses.
    fn new_stamp(&self) -> String {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let nanos = super::unix_nanos();
        format!("{}/{}/{nanos}/{n}", self.host, std::process::id())
    }

    /// Changes the document at `key` with `change` by compare-and-swap,
    /// retrying from a fresh read when another writer came first; returns
    /// the document as left and what `change` returned.
    ///
    /// `change` sees the document and whether a write of this update may
    /// already have landed (one that got no answer): it refuses with an
    /// error, says the document is already as wanted ([`Step::Done`]:
    /// nothing is written), or changes it ([`Step::Write`]). Each change
    /// recognises its own effect, so an update whose first write landed
    /// unseen, and was then overwritten by another host, is not applied
    /// twice.
    fn update<T: Stamped, R>(
        &self,
        key: &str,
        missing: impl Fn() -> Error,
        mut change: impl FnMut(&mut T, bool) -> Result<Step<R>>,
    ) -> Result<(T, R)> {
        let seed = super::unix_nanos() as u64 ^ u64::from(std::process::id()) << 32;
        let mut rng = crate::rng::Rng::new(seed);
        let (mut doubted, mut doubts_in_a_row) = (false, 0);
        for attempt in 0..MAX_TRIES {
            let Some((mut doc, version)) = self.read::<T>(key)? else {
                return Err(missing());
            };
            let out = match change(&mut doc, doubted)? {
                Step::Done(out) => return Ok((doc, out)),
                Step::Write(out) => out,
            };
            let stamp = self.new_stamp();
            *doc.stamp() = stamp.clone();
            match self.bucket.replace(key, encode(&doc)?, &version) {
                Ok(Some(_)) => return Ok((doc, out)),
                Ok(None) => doubts_in_a_row = 0,
                // Unknown: read it back; ours if it carries our stamp,
                // else (not landed, or overwritten since) `change` tells.
                Err(e @ Error::Remote { in_doubt: true, .. }) => {
                    doubted = true;
                    doubts_in_a_row += 1;
                    match self.read::<T>(key) {
                        Ok(Some((mut now, _))) if doubts_in_a_row < MAX_DOUBTS => {
                            if *now.stamp() == stamp {
                                return Ok((doc, out));
                            }
                        }
                        _ => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
            // Another host's write came first: back off a little, at
            // random, so that contenders spread out.
            let cap = 1u64 << attempt.min(6);
            std::thread::sleep(std::time::Duration::from_millis(rng.below(cap + 1)));
        }
        Err(Error::Remote {
            peer: self.bucket.url().to_string(),
            what: format!("{key} changed under every one of {MAX_TRIES} tries: too many writers"),
            in_doubt: doubted,
        })
    }

    /// Registers server `id`, or, when the fleet has it already under the
    /// same name, attaches this host's disk path to it (a server can
    /// move between hosts). Another name is [`Error::ServerExists`].
    pub fn add_server(&self, id: ServerId, name: &str, disk: &Path) -> Result<FleetServer> {
        policy::check_server_name(name)?;
        let key = server_key(id);
        let fresh = FleetServer {
            id,
            name: name.to_string(),
            disks: BTreeMap::from([(self.host.clone(), disk.to_path_buf())]),
            snapshots: Vec::new(),
            stamp: self.new_stamp(),
        };
        // A create without an answer is tried again: if it had landed,
        // the server exists, with this host's disk already attached.
        let mut tries = 0;
        loop {
            match self.bucket.create(&key, encode(&fresh)?) {
                Ok(Some(_)) => return Ok(fresh),
                Ok(None) => break,
                Err(Error::Remote { in_doubt: true, .. }) if tries + 1 < MAX_DOUBTS => tries += 1,
                Err(e) => return Err(e),
            }
        }
        let (attached, ()) = self.update(
            &key,
            || Error::Internal(format!("server {} went while it was added", id.0)),
            |doc: &mut FleetServer, _| {
                if doc.id != id {
                    return Err(self.corrupt(&key, "it names another server"));
                }
                if doc.name != name {
                    return Err(Error::ServerExists(id));
                }
                if doc.disks.get(&self.host).map(PathBuf::as_path) == Some(disk) {
                    return Ok(Step::Done(()));
                }
                doc.disks.insert(self.host.clone(), disk.to_path_buf());
                Ok(Step::Write(()))
            },
        )?;
        Ok(attached)
    }

    /// One server.
    pub fn server(&self, id: ServerId) -> Result<FleetServer> {
        let key = server_key(id);
        match self.read::<FleetServer>(&key)? {
            Some((doc, _)) if doc.id == id => Ok(doc),
            Some(_) => Err(self.corrupt(&key, "it names another server")),
            None => Err(Error::ServerNotFound(id)),
        }
    }

    /// Every server, by id.
    pub fn servers(&self) -> Result<Vec<FleetServer>> {
        let mut out = Vec::new();
        for (key, _) in self.bucket.list("catalog/servers")? {
            let Some(id) = key
                .strip_prefix("catalog/servers/")
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            out.push(self.server(ServerId(id))?);
        }
        out.sort_by_key(|s| s.id);
        Ok(out)
    }

    /// A new snapshot id, unique across the fleet.
    fn next_id(&self) -> Result<SnapshotId> {
        let missing = || self.corrupt(NEXT_ID, "the snapshot id counter is missing");
        // An increment that landed unseen only leaves a gap in the ids.
        let (_, id) = self.update(NEXT_ID, missing, |c: &mut Counter, _| {
            let id = c.next;
            c.next = id
                .checked_add(1)
                .ok_or_else(|| self.corrupt(NEXT_ID, "the snapshot id counter is exhausted"))?;
            Ok(Step::Write(SnapshotId(id)))
        })?;
        Ok(id)
    }

    /// Reserves a snapshot of `server` (in progress, captured by this
    /// host), within the cap of five whatever other hosts do meanwhile.
    pub fn reserve_snapshot(
        &self,
        server: ServerId,
        name: &str,
        description: &str,
    ) -> Result<SnapshotId> {
        self.reserve(server, name, description, SnapshotKind::Regular)
    }

    /// [`FleetCatalog::reserve_snapshot`] of a snapshot of `kind`: the
    /// cap holds for regular snapshots only (a restore's safety snapshot
    /// is the engine's own).
    pub fn reserve(
        &self,
        server: ServerId,
        name: &str,
        description: &str,
        kind: SnapshotKind,
    ) -> Result<SnapshotId> {
        policy::check_snapshot_name(name)?;
        policy::check_description(description)?;
        let capped = kind == SnapshotKind::Regular;
        // Refused before an id is spent when the cap is plainly reached.
        let found = self.server(server)?;
        if capped {
            check_cap(&found)?;
        }
        let id = self.next_id()?;
        let snapshot = FleetSnapshot {
            id,
            name: name.to_string(),
            description: description.to_string(),
            status: SnapshotStatus::InProgress,
            kind,
            created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            host: self.host.clone(),
            stats: None,
        };
        self.update(
            &server_key(server),
            || Error::ServerNotFound(server),
            |doc: &mut FleetServer, _| {
                // The id is this call's alone: there, it is ours.
                if doc.snapshots.iter().any(|s| s.id == id) {
                    return Ok(Step::Done(()));
                }
                if capped {
                    check_cap(doc)?;
                }
                doc.snapshots.push(snapshot.clone());
                Ok(Step::Write(()))
            },
        )?;
        Ok(id)
    }

    /// Marks a reserved snapshot completed, with how it was captured.
    pub fn complete(&self, server: ServerId, id: SnapshotId, stats: &CaptureStats) -> Result<()> {
        self.finish(server, id, Some(*stats))
    }

    /// Marks a reserved snapshot completed (`ok`) or failed.
    pub fn finish_snapshot(&self, server: ServerId, id: SnapshotId, ok: bool) -> Result<()> {
        self.finish(server, id, ok.then(CaptureStats::default))
    }

    /// Completed with `stats`, or failed (`None`).
    fn finish(&self, server: ServerId, id: SnapshotId, stats: Option<CaptureStats>) -> Result<()> {
        let ok = stats.is_some();
        self.update(
            &server_key(server),
            || Error::ServerNotFound(server),
            |doc: &mut FleetServer, doubted| {
                let s = doc
                    .snapshots
                    .iter_mut()
                    .find(|s| s.id == id)
                    .ok_or(Error::SnapshotNotFound(id))?;
                let target = if ok {
                    SnapshotStatus::Completed
                } else {
                    SnapshotStatus::Failed
                };
                // Our own earlier write, landed unseen.
                if doubted && s.status == target {
                    return Ok(Step::Done(()));
                }
                if s.status != SnapshotStatus::InProgress {
                    return Err(Error::WrongState(format!(
                        "snapshot {} is {}, not in progress",
                        id.0,
                        s.status.as_str()
                    )));
                }
                s.status = target;
                s.stats = stats;
                Ok(Step::Write(()))
            },
        )?;
        Ok(())
    }

    /// Removes a snapshot that is not in progress.
    pub fn delete_snapshot(&self, server: ServerId, id: SnapshotId) -> Result<()> {
        self.update(
            &server_key(server),
            || Error::ServerNotFound(server),
            |doc: &mut FleetServer, doubted| {
                let Some(at) = doc.snapshots.iter().position(|s| s.id == id) else {
                    // Gone by our own earlier write, landed unseen.
                    if doubted {
                        return Ok(Step::Done(()));
                    }
                    return Err(Error::SnapshotNotFound(id));
                };
                if doc.snapshots[at].status == SnapshotStatus::InProgress {
                    return Err(Error::Busy {
                        server,
                        operation: format!(
                            "capturing snapshot {} on host {}",
                            id.0, doc.snapshots[at].host
                        ),
                    });
                }
                doc.snapshots.remove(at);
                Ok(Step::Write(()))
            },
        )?;
        Ok(())
    }
}

/// The collection's state, as [`FleetCatalog::gc_update`] changes it.
pub enum GcStep<R> {
    /// As wanted: nothing to write.
    Keep(R),
    /// Changed: write it.
    Write(R),
}

impl FleetCatalog {
    /// Where the collection stands.
    pub fn gc_state(&self) -> Result<GcState> {
        Ok(self
            .read::<GcState>(GC)?
            .map(|(d, _)| d)
            .unwrap_or_default())
    }

    /// Changes the collection's state by compare-and-swap (see
    /// `update`), creating it first if the store has none yet.
    pub fn gc_update<R>(
        &self,
        mut change: impl FnMut(&mut GcState, bool) -> Result<GcStep<R>>,
    ) -> Result<(GcState, R)> {
        if self.read::<GcState>(GC)?.is_none() {
            // Another host's create first is as good.
            let fresh = GcState {
                stamp: self.new_stamp(),
                ..GcState::default()
            };
            self.bucket.create(GC, encode(&fresh)?)?;
        }
        self.update(
            GC,
            || self.corrupt(GC, "the collection's state went"),
            |doc: &mut GcState, doubted| {
                Ok(match change(doc, doubted)? {
                    GcStep::Keep(r) => Step::Done(r),
                    GcStep::Write(r) => Step::Write(r),
                })
            },
        )
    }

    /// The next snapshot id the counter will give (every id below it was
    /// given out already).
    pub fn next_snapshot_id(&self) -> Result<SnapshotId> {
        match self.read::<Counter>(NEXT_ID)? {
            Some((c, _)) => Ok(SnapshotId(c.next)),
            None => Err(self.corrupt(NEXT_ID, "the snapshot id counter is missing")),
        }
    }
}

/// The cap: may the server take one more snapshot?
fn check_cap(doc: &FleetServer) -> Result<()> {
    let n = doc
        .snapshots
        .iter()
        .filter(|s| policy::counts(s.kind, s.status))
        .count();
    if n >= policy::MAX_SNAPSHOTS_PER_SERVER {
        return Err(Error::SnapshotLimit {
            server: doc.id,
            limit: policy::MAX_SNAPSHOTS_PER_SERVER,
        });
    }
    Ok(())
}
