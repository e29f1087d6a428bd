//! A fleet of hosts on one store in an S3 bucket (Ceph's RADOS Gateway,
//! or any S3 that honours conditional writes).
//!
//! In the bucket (under its prefix):
//!
//! - `catalog/...`: servers, snapshots and the id counter
//!   ([`crate::bucket::catalog`]), changed only by compare-and-swap;
//! - `packs/HOST/NNNNNNNN-T.pack`: sealed packs, uploaded whole; each
//!   ends with its own index, so a host learns the store's chunks from
//!   the packs' tails alone;
//! - `manifests/ID`: the manifest of each completed snapshot, immutable.
//!
//! Each host has a cache directory: a blocksnap store of its own
//! (`store/`), whose packs are this host's packs and placeholders of the
//! others' (fetched by ranges when read, see [`packs`]), and whose catalog
//! mirrors the fleet's for the servers whose disks this host has. Opening
//! brings the cache up to date: the fleet's catalog is read first, then
//! the packs it does not know yet are learnt (their tails only), then the
//! snapshots completed elsewhere are taken in (their manifests) and those
//! deleted elsewhere dropped. The engine then asks the fleet before every
//! change (see [`crate::coordinator`]): ids, the cap and states come from
//! the fleet's catalog, and a capture is published (packs, manifest, then
//! the catalog) before this host commits it.

pub mod gc;
mod host;
pub(crate) mod packs;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bucket::catalog::{FleetCatalog, FleetServer};
use crate::bucket::{Bucket, BucketConfig};
use crate::catalog::SnapshotRecord;
use crate::engine::Engine;
use crate::error::{Error, IoContext, Result};
use crate::fsio::StoreFs;
use crate::ids::SnapshotId;
use crate::options::EngineOptions;
use crate::types::SnapshotStatus;

pub use crate::bucket::catalog::FleetSnapshot;

/// Packs are sealed (and uploaded) past this many bytes by default.
pub const DEFAULT_FLEET_PACK_LEN: u64 = 32 << 20;

/// Where a host's store is and who the host is.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FleetOptions {
    /// `s3://BUCKET/PREFIX`.
    pub url: String,
    /// This host's cache directory.
    pub cache: PathBuf,
    /// This host's name in the fleet: unique to it, the same at every
    /// start (default: the machine's host name).
    pub host: String,
    pub bucket: BucketConfig,
    /// Packs are sealed and uploaded past this many bytes.
    pub pack_len: u64,
    /// The cache's packs are trimmed to this many bytes at every open
    /// (`None`: kept whole). Records of packs the bucket has are given
    /// back, least recently fetched first, and fetched again when read.
    pub cache_max: Option<u64>,
}

impl FleetOptions {
    /// The bucket at `url`, reached as the AWS variables say, this
    /// machine's host name, packs of [`DEFAULT_FLEET_PACK_LEN`].
    pub fn new(url: &str, cache: impl AsRef<Path>) -> Result<Self> {
        Ok(FleetOptions {
            url: url.to_string(),
            cache: cache.as_ref().to_path_buf(),
            host: machine_host_name()?,
            bucket: BucketConfig::from_env(),
            pack_len: DEFAULT_FLEET_PACK_LEN,
            cache_max: None,
        })
    }

    pub fn host(mut self, name: &str) -> Self {
        self.host = name.to_string();
        self
    }

    pub fn bucket(mut self, config: BucketConfig) -> Self {
        self.bucket = config;
        self
    }

    pub fn pack_len(mut self, bytes: u64) -> Self {
        self.pack_len = bytes;
        self
    }

    pub fn cache_max(mut self, bytes: Option<u64>) -> Self {
        self.cache_max = bytes;
        self
    }
}

/// The machine's host name.
pub fn machine_host_name() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(Error::InvalidParameter(
            "cannot read this machine's host name: pass --host NAME".into(),
        ));
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Packs of at least 64 KiB (smaller ones are objects to little
/// purpose) and at most the store's largest.
fn check_pack_len(bytes: u64) -> Result<()> {
    if (64 << 10..=crate::store::PACK_TARGET_LEN).contains(&bytes) {
        return Ok(());
    }
    Err(Error::InvalidParameter(format!(
        "packs of {bytes} bytes: give a size from 64K to {}M",
        crate::store::PACK_TARGET_LEN >> 20
    )))
}

/// A host name goes into object names: letters, digits, '.', '-', '_'.
fn check_host(host: &str) -> Result<()> {
    let ok = (1..=63).contains(&host.len())
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && !host.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidParameter(format!(
            "{host:?} is not a fleet host name: use 1-63 letters, digits, '.', '-' or '_' \
             (pass --host NAME or set BLOCKSNAP_HOST)"
        )))
    }
}

/// What a cache belongs to, kept in `CACHE/fleet.json`: a cache serves
/// one host of one store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct CacheDoc {
    url: String,
    host: String,
}

/// What opening a host found and did to bring its cache up to date.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Packs of other hosts learnt now (their indexes read).
    pub packs_learnt: u64,
    /// Objects under `packs/` that are not sealed packs, and why.
    pub packs_refused: Vec<String>,
    /// Packs this cache held that the bucket no longer has (collected).
    pub packs_forgotten: u64,
    /// Snapshots completed on other hosts taken in now.
    pub snapshots_taken_in: u64,
    /// Snapshots dropped here because the fleet no longer has them.
    pub snapshots_dropped: u64,
    /// This host's captures left in progress by a crash, marked failed.
    pub captures_failed: u64,
    /// Bytes of the cache given back to stay within `cache_max`.
    pub cache_trimmed: u64,
}

/// Creates a new store in the bucket (refusing one that holds a store)
/// and opens this host on it.
/// The block size is the options' (default 64 KiB).
pub fn init(fleet: &FleetOptions, options: EngineOptions) -> Result<Engine> {
    check_host(&fleet.host)?;
    let block_size = options
        .block_size
        .unwrap_or(crate::options::DEFAULT_BLOCK_SIZE);
    let bucket = Bucket::open(&fleet.url, &fleet.bucket)?;
    FleetCatalog::init(bucket, &fleet.host, block_size)?;
    open(fleet, options).map(|(e, _)| e)
}

/// Opens this host on the store in the bucket: the cache is brought up
/// to date (see the module doc), then the engine over it is returned.
pub fn open(fleet: &FleetOptions, options: EngineOptions) -> Result<(Engine, SyncReport)> {
    check_host(&fleet.host)?;
    check_pack_len(fleet.pack_len)?;
    // Checked before the cache is made or marked as this store's.
    crate::bucket::parse_url(&fleet.url)?;
    if options.read_only {
        return open_read_only(fleet, options);
    }
    let cache = &fleet.cache;
    std::fs::create_dir_all(cache).at(cache)?;
    let lock = crate::engine::lock_store(cache, false)?;
    check_cache(fleet)?;
    let bucket = Bucket::open(&fleet.url, &fleet.bucket)?;
    let catalog = Arc::new(FleetCatalog::open(bucket, &fleet.host)?);
    let mut report = SyncReport::default();
    let root = cache.join("store");
    let packs_dir = root.join("packs");
    let fs: Arc<dyn StoreFs> = options.store_fs.clone();
    if !root.join(crate::engine::CATALOG_FILE).exists() {
        // A new cache: its store made empty first, so that the packs
        // learnt next are never found without a catalog.
        options
            .clone()
            .create(true)
            .block_size(catalog.block_size())
            .open(&root)?
            .close()?;
    }
    fs.create_dir_all(&packs_dir).at(&packs_dir)?;
    learn_packs(&catalog, fs.as_ref(), &packs_dir, &mut report)?;
    if let Some(max) = fleet.cache_max {
        report.cache_trimmed = packs::trim(fs.as_ref(), &packs_dir, max)?;
    }
    let in_bucket = packs::known(fs.as_ref(), &packs_dir)?;
    let fleet_fs: Arc<dyn StoreFs> =
        Arc::new(packs::FleetFs::new(fs.clone(), catalog.shared_bucket()));
    let host_handle = host::Host::new(
        catalog.clone(),
        fs,
        packs_dir,
        in_bucket.keys().copied(),
        lock,
    );
    let host = Arc::new(host_handle);
    let block_size = catalog.block_size();
    let engine = options
        .create(true)
        .block_size(block_size)
        .auto_gc(false)
        .store_fs(fleet_fs)
        .coordinator(host.clone(), fleet.pack_len)
        .open(&root)?;
    let now = host.sync(&engine, true)?;
    report.packs_learnt += now.packs_learnt;
    report.packs_refused.extend(now.packs_refused);
    report.snapshots_taken_in = now.snapshots_taken_in;
    report.snapshots_dropped = now.snapshots_dropped;
    report.captures_failed = now.captures_failed;
    Ok((engine, report))
}

/// This host's cache as it is, to read: not brought up to date, nothing
/// written to the bucket or the cache's store (chunks of other hosts'
/// packs are still fetched into it when read). Beside a process that has
/// the cache open for writing it fails, as for any store.
fn open_read_only(fleet: &FleetOptions, options: EngineOptions) -> Result<(Engine, SyncReport)> {
    let root = fleet.cache.join("store");
    if !root.join(crate::engine::CATALOG_FILE).exists() {
        return Err(Error::NoStore { path: root });
    }
    check_cache(fleet)?;
    let bucket = Arc::new(Bucket::open(&fleet.url, &fleet.bucket)?);
    let fleet_fs: Arc<dyn StoreFs> =
        Arc::new(packs::FleetFs::new(options.store_fs.clone(), bucket));
    let engine = options.store_fs(fleet_fs).open(&root)?;
    Ok((engine, SyncReport::default()))
}

/// Refuses a cache made for another store or host; marks a new one.
fn check_cache(fleet: &FleetOptions) -> Result<()> {
    let path = fleet.cache.join("fleet.json");
    let want = CacheDoc {
        url: fleet.url.clone(),
        host: fleet.host.clone(),
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let found: CacheDoc = serde_json::from_slice(&bytes)
                .map_err(|e| Error::corrupt(&path, format!("not a cache's record: {e}")))?;
            if found != want {
                return Err(Error::InvalidParameter(format!(
                    "{} is the cache of host {:?} of {}, not of host {:?} of {}: give each host \
                     and store a cache of its own",
                    fleet.cache.display(),
                    found.host,
                    found.url,
                    want.host,
                    want.url
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = serde_json::to_vec_pretty(&want)
                .map_err(|e| Error::Internal(format!("cannot encode: {e}")))?;
            let tmp = path.with_extension("json-tmp");
            std::fs::write(&tmp, bytes).at(&tmp)?;
            File::open(&tmp).and_then(|f| f.sync_all()).at(&tmp)?;
            std::fs::rename(&tmp, &path).at(&path)?;
            File::open(&fleet.cache)
                .and_then(|f| f.sync_all())
                .at(&fleet.cache)
        }
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Learns the packs in the bucket this cache does not know yet: only
/// what is new is read (each pack's header and tail).
fn learn_packs(
    catalog: &FleetCatalog,
    fs: &dyn StoreFs,
    dir: &Path,
    report: &mut SyncReport,
) -> Result<()> {
    let known = packs::known(fs, dir)?;
    let keys: HashMap<&str, u32> = known.iter().map(|(s, c)| (c.key.as_str(), *s)).collect();
    let mut next = crate::store::max_pack_seq(fs, dir)? + 1;
    let bucket = catalog.bucket();
    let listed = bucket.list("packs")?;
    // Packs the bucket no longer has (collected): forgotten here, so
    // that no capture uses them again.
    let names: std::collections::HashSet<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    let mut learnt = false;
    for (seq, car) in &known {
        if !names.contains(car.key.as_str()) {
            packs::forget(fs, dir, *seq)?;
            report.packs_forgotten += 1;
            learnt = true;
        }
    }
    for (key, len) in listed.iter().map(|(k, l)| (k.clone(), *l)) {
        if keys.contains_key(key.as_str()) || !key.ends_with(".pack") {
            continue;
        }
        match packs::learn(bucket, fs, dir, next, &key, len) {
            Ok(()) => {
                next += 1;
                report.packs_learnt += 1;
                learnt = true;
            }
            // Another program's object: refused, reported, never used.
            Err(e @ Error::Corruption { .. }) => report.packs_refused.push(e.to_string()),
            Err(e) => return Err(e),
        }
    }
    if report.packs_forgotten > 0 {
        // The chunk index table names them: made again from the packs.
        let table = dir.join(crate::store::INDEX_TABLE_FILE);
        match fs.remove(&table) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&table, e)),
        }
    }
    if learnt {
        fs.sync_dir(dir).at(dir)?;
    }
    Ok(())
}

/// Brings this host's catalog in line with the fleet's.
///
/// `at_open`: no capture of this host runs (the cache's lock says so), so
/// its captures the fleet shows in progress were left by a crash and are
/// marked failed. While open, they are this process's own, running.
fn reconcile(
    engine: &Engine,
    catalog: &FleetCatalog,
    servers: &[FleetServer],
    report: &mut SyncReport,
    at_open: bool,
) -> Result<()> {
    let host = catalog.host();
    let mut fleet: BTreeMap<SnapshotId, (&FleetServer, FleetSnapshot)> = BTreeMap::new();
    let mut failed = Vec::new();
    for srv in servers {
        for snap in &srv.snapshots {
            if snap.host == host && snap.status == SnapshotStatus::InProgress && at_open {
                match catalog.finish_snapshot(srv.id, snap.id, false) {
                    // Failed meanwhile (by a collection): as wanted.
                    Ok(()) | Err(Error::WrongState(_)) => {}
                    Err(e) => return Err(e),
                }
                report.captures_failed += 1;
                failed.push((srv, snap.clone()));
                continue;
            }
            fleet.insert(snap.id, (srv, snap.clone()));
        }
        if let Some(disk) = srv.disks.get(host)
            && engine.server(srv.id).is_err()
        {
            engine.attach_server(srv.id, &srv.name, disk)?;
        }
    }
    for (srv, mut snap) in failed {
        snap.status = SnapshotStatus::Failed;
        fleet.insert(snap.id, (srv, snap));
    }
    for (id, _, status) in engine.local_snapshots() {
        use SnapshotStatus::{Completed, Failed, InProgress};
        // Dropped here when the fleet no longer has it, or says it failed
        // where this host has it completed (a completing write in doubt
        // that did not land), or completed where this host has it failed
        // (one that did: it is taken in below). A snapshot the fleet
        // shows in progress is one whose end this read predates.
        let keep = match (fleet.get(&id).map(|(_, s)| s.status), status) {
            (None, _) => false,
            (Some(InProgress), _) | (_, InProgress) => true,
            (Some(Completed), Failed) | (Some(Failed), Completed) => false,
            (Some(_), _) => true,
        };
        if !keep {
            match engine.forget_snapshot(id) {
                Ok(()) => report.snapshots_dropped += 1,
                // Being restored or exported here: dropped at a later
                // refresh, once that ends.
                Err(Error::Busy { .. } | Error::WrongState(_)) if !at_open => {}
                Err(e) => return Err(e),
            }
        }
    }
    let here: std::collections::HashSet<SnapshotId> =
        engine.local_snapshots().iter().map(|l| l.0).collect();
    for (id, (srv, snap)) in fleet {
        if here.contains(&id)
            || engine.server(srv.id).is_err()
            || snap.status == SnapshotStatus::InProgress
        {
            continue;
        }
        let record = SnapshotRecord {
            id,
            server_id: srv.id,
            name: snap.name.clone(),
            description: snap.description.clone(),
            status: snap.status,
            created_at: snap.created_at.clone(),
            stats: snap.stats,
            error: (snap.status == SnapshotStatus::Failed)
                .then(|| format!("failed on host {}", snap.host)),
            kind: snap.kind,
        };
        let key = host::manifest_key(id);
        let manifest = if snap.status == SnapshotStatus::Completed {
            let source = format!("{}/{key}", catalog.bucket().url());
            let Some((bytes, _)) = catalog.bucket().get(&key)? else {
                return Err(Error::corrupt(
                    source,
                    format!(
                        "snapshot {id} is completed in the fleet's catalog, but its manifest is missing"
                    ),
                ));
            };
            Some((bytes, source))
        } else {
            None
        };
        engine.import_snapshot(
            record,
            manifest.as_ref().map(|(b, s)| (b.as_slice(), s.as_str())),
        )?;
        report.snapshots_taken_in += 1;
    }
    Ok(())
}

/// Brings an open host up to date with the fleet: packs uploaded since
/// are learnt, snapshots completed elsewhere taken in and those deleted
/// elsewhere dropped (what opening does; packs the bucket no longer has
/// are forgotten only by opening). A long-running process (`serve`) calls
/// it now and then.
pub fn refresh(engine: &Engine) -> Result<SyncReport> {
    host_of(engine)?.sync(engine, false)
}

fn host_of(engine: &Engine) -> Result<&host::Host> {
    engine
        .coordinator()
        .and_then(|c| c.as_any().downcast_ref::<host::Host>())
        .ok_or_else(|| {
            Error::InvalidParameter(
                "this store is not in a bucket: it has no fleet to act with".into(),
            )
        })
}

/// One step of the fleet's garbage collection, run from this host (see
/// [`gc`]): refused for an engine whose store is not in a bucket.
pub fn collect(engine: &Engine, options: &gc::GcOptions) -> Result<gc::FleetGcReport> {
    host_of(engine)?.collect(options)
}

/// The fleet's servers and snapshots as the bucket says now (every host's).
pub fn servers(fleet: &FleetOptions) -> Result<Vec<FleetServer>> {
    check_host(&fleet.host)?;
    let bucket = Bucket::open(&fleet.url, &fleet.bucket)?;
    FleetCatalog::open(bucket, &fleet.host)?.servers()
}
