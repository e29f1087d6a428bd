//! One host's side of the fleet: the engine's [`Coordinator`], and the
//! uploads of the packs it seals.
//!
//! A sealed pack goes to the bucket whole, as `packs/HOST/NNNNNNNN-T.pack`
//! (T: the upload's time in nanoseconds, so a host whose cache was wiped
//! never writes over an object). A PUT is atomic: the object is there
//! whole or not at all, so a host killed mid-upload leaves nothing
//! half-written that others could see. Uploads start when a pack is
//! sealed, on worker threads, while the capture goes on; publishing a
//! snapshot waits for those it needs, then writes its manifest, then marks
//! it completed in the fleet's catalog: data, manifest, catalog.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::SyncReport;
use super::packs::{self, Sidecar};
use crate::bucket::catalog::FleetCatalog;
use crate::coordinator::{Coordinator, Published};
use crate::engine::Engine;
use crate::error::{Error, IoContext, Result};
use crate::fleet::gc::{FleetGcReport, GcOptions};
use crate::fsio::{OpenMode, StoreFs};
use crate::ids::{ServerId, SnapshotId};
use crate::store::pack::{self as packfmt, TRAILER_LEN};
use crate::types::SnapshotKind;

/// Uploads at once.
const UPLOADERS: usize = 2;

pub(crate) fn manifest_key(id: SnapshotId) -> String {
    format!("manifests/{:020}", id.0)
}

#[derive(Default)]
struct Uploads {
    /// Packs the bucket has (uploaded by this host or learnt from it).
    done: HashSet<u32>,
    queued: VecDeque<(u32, PathBuf)>,
    busy: HashSet<u32>,
    /// The last upload of a pack failed, and why.
    failed: HashMap<u32, String>,
    workers: usize,
    closing: bool,
}

struct Shared {
    catalog: Arc<FleetCatalog>,
    fs: Arc<dyn StoreFs>,
    packs_dir: PathBuf,
    host: String,
    uploads: Mutex<Uploads>,
    changed: Condvar,
}

/// This host, as its engine's coordinator.
pub(crate) struct Host {
    shared: Arc<Shared>,
    /// The cache's lock, held as long as the engine.
    _lock: std::fs::File,
}

impl Host {
    pub fn new(
        catalog: Arc<FleetCatalog>,
        fs: Arc<dyn StoreFs>,
        packs_dir: PathBuf,
        in_bucket: impl IntoIterator<Item = u32>,
        lock: std::fs::File,
    ) -> Self {
        let host = catalog.host().to_string();
        let uploads = Uploads {
            done: in_bucket.into_iter().collect(),
            ..Uploads::default()
        };
        Host {
            shared: Arc::new(Shared {
                catalog,
                fs,
                packs_dir,
                host,
                uploads: Mutex::new(uploads),
                changed: Condvar::new(),
            }),
            _lock: lock,
        }
    }

    /// Queues `seq` for upload unless the bucket has it or it is on its
    /// way; starts a worker if fewer than [`UPLOADERS`] run.
    fn enqueue(&self, seq: u32, path: &Path) {
        let mut up = self.shared.uploads.lock();
        if up.done.contains(&seq) || up.busy.contains(&seq) || up.queued.iter().any(|q| q.0 == seq)
        {
            return;
        }
        up.failed.remove(&seq);
        up.queued.push_back((seq, path.to_path_buf()));
        if up.workers < UPLOADERS {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("pack-upload".into())
                .spawn(move || shared.work());
            if spawned.is_ok() {
                up.workers += 1;
            }
        }
        self.shared.changed.notify_all();
    }

    /// Waits until every one of `seqs` is in the bucket; the first that
    /// failed is the error.
    fn wait_uploaded(&self, seqs: &[u32]) -> Result<()> {
        let mut up = self.shared.uploads.lock();
        loop {
            if let Some((seq, why)) = seqs
                .iter()
                .find_map(|s| up.failed.get(s).map(|w| (*s, w.clone())))
            {
                return Err(Error::Remote {
                    peer: self.shared.catalog.bucket().url().to_string(),
                    what: format!("uploading pack {seq}: {why}"),
                    in_doubt: false,
                });
            }
            if seqs.iter().all(|s| up.done.contains(s)) {
                return Ok(());
            }
            if up.workers == 0 {
                return Err(Error::Internal("no pack uploader could be started".into()));
            }
            self.shared.changed.wait(&mut up);
        }
    }
}

impl Host {
    /// Brings `engine` (this host's) up to date with the fleet while it is
    /// open: the catalog is read, then the packs uploaded since are learnt
    /// (their tails), then the catalog is mirrored (see `reconcile`).
    pub fn sync(&self, engine: &Engine, at_open: bool) -> Result<SyncReport> {
        let sh = &self.shared;
        let mut report = SyncReport::default();
        let servers = sh.catalog.servers()?;
        let known = packs::known(sh.fs.as_ref(), &sh.packs_dir)?;
        let listed = sh.catalog.bucket().list("packs")?;
        // Packs the bucket no longer has (collected: a copy of anything
        // live is kept in another): out of the store, so that no capture
        // uses them and reads go to the copy kept.
        let names: HashSet<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
        let gone: Vec<u32> = known
            .iter()
            .filter(|(_, c)| !names.contains(c.key.as_str()))
            .map(|(s, _)| *s)
            .collect();
        if !gone.is_empty() {
            engine.forget_packs(&gone)?;
            for seq in &gone {
                packs::forget(sh.fs.as_ref(), &sh.packs_dir, *seq)?;
                sh.uploads.lock().done.remove(seq);
            }
            report.packs_forgotten += gone.len() as u64;
        }
        let known: HashSet<String> = known.into_values().map(|c| c.key).collect();
        for (key, len) in listed {
            if known.contains(&key) || !key.ends_with(".pack") {
                continue;
            }
            let index = match packs::read_index(sh.catalog.bucket(), &key, len) {
                Ok(index) => index,
                Err(e @ Error::Corruption { .. }) => {
                    report.packs_refused.push(e.to_string());
                    continue;
                }
                Err(e) => return Err(e),
            };
            let seq = engine.adopt_pack(|path| {
                packs::write_placeholder(sh.fs.as_ref(), path, &key, len, &index)
            })?;
            sh.uploads.lock().done.insert(seq);
            report.packs_learnt += 1;
        }
        super::reconcile(engine, &sh.catalog, &servers, &mut report, at_open)?;
        Ok(report)
    }

    /// One collection step across the fleet (see `gc`).
    pub fn collect(&self, options: &GcOptions) -> Result<FleetGcReport> {
        super::gc::collect(
            &self.shared.catalog,
            self.shared.fs.as_ref(),
            &self.shared.packs_dir,
            options,
        )
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.shared.uploads.lock().closing = true;
        self.shared.changed.notify_all();
    }
}

impl Shared {
    fn work(&self) {
        loop {
            let (seq, path) = {
                let mut up = self.uploads.lock();
                loop {
                    if let Some(next) = up.queued.pop_front() {
                        up.busy.insert(next.0);
                        break next;
                    }
                    if up.closing {
                        up.workers -= 1;
                        self.changed.notify_all();
                        return;
                    }
                    self.changed.wait(&mut up);
                }
            };
            // A panic must not leave the pack busy forever, with every
            // publish that needs it waiting.
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.upload(seq, &path)))
                    .unwrap_or_else(|_| Err(Error::Internal("uploading a pack panicked".into())));
            let mut up = self.uploads.lock();
            up.busy.remove(&seq);
            match outcome {
                Ok(()) => {
                    up.done.insert(seq);
                }
                Err(e) => {
                    up.failed.insert(seq, e.to_string());
                }
            }
            self.changed.notify_all();
        }
    }

    /// Uploads pack `seq` whole, then records it in its sidecar; a pack
    /// with a sidecar is in the bucket already (learnt from it, or
    /// uploaded before a restart).
    fn upload(&self, seq: u32, path: &Path) -> Result<()> {
        if packs::read_sidecar(self.fs.as_ref(), path).is_some() {
            return Ok(());
        }
        // A pack without a (readable) sidecar is this host's own, written
        // whole; a placeholder whose sidecar was damaged has holes, and
        // must never go up as if it held its records.
        if !packs::has_no_hole(path)? {
            return Err(Error::corrupt(
                path,
                "a pack with holes and no sidecar: a placeholder whose sidecar is damaged, \
                 not a pack of this host's to upload; remove it (and its .remote and .have) \
                 and open the store again, which learns it anew",
            ));
        }
        // Mapped where the file system allows: the pack goes to the
        // socket without a copy in between. A sealed pack is never
        // written again (the local collection, the one writer of old
        // packs, is refused in a fleet).
        let file = self.fs.open(path, OpenMode::Read).at(path)?;
        let bytes = match file.map().at(path)? {
            Some(map) => bytes::Bytes::from_owner(map),
            None => bytes::Bytes::from(self.fs.read_all(path).at(path)?),
        };
        let len = bytes.len() as u64;
        // Only a sealed pack goes: its trailer must say so.
        let trailer = bytes
            .get(bytes.len().saturating_sub(TRAILER_LEN)..)
            .and_then(|t| packfmt::decode_trailer(t, len))
            .ok_or_else(|| Error::corrupt(path, "a pack to upload has no valid trailer"))?;
        let key = format!(
            "packs/{}/{seq:08}-{:016x}.pack",
            self.host,
            crate::bucket::unix_nanos()
        );
        self.catalog.bucket().put(&key, bytes)?;
        let car = Sidecar {
            key,
            len,
            whole: true,
            index_offset: trailer.index_offset,
        };
        packs::write_sidecar(self.fs.as_ref(), path, &car)?;
        self.fs.sync_dir(&self.packs_dir).at(&self.packs_dir)
    }
}

impl Coordinator for Host {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn add_server(&self, server: ServerId, name: &str, disk: &Path) -> Result<()> {
        self.shared
            .catalog
            .add_server(server, name, disk)
            .map(|_| ())
    }

    fn reserve(
        &self,
        server: ServerId,
        name: &str,
        description: &str,
        kind: SnapshotKind,
    ) -> Result<SnapshotId> {
        self.shared.catalog.reserve(server, name, description, kind)
    }

    fn publish(&self, snap: &Published<'_>) -> Result<()> {
        for (seq, path) in snap.packs {
            self.enqueue(*seq, path);
        }
        // Only the packs it uses hold it up: one that will not upload
        // fails the captures that need it, not every capture.
        let seqs: Vec<u32> = snap.used.iter().copied().collect();
        {
            let up = self.shared.uploads.lock();
            let sealed: HashSet<u32> = snap.packs.iter().map(|p| p.0).collect();
            if let Some(seq) = seqs
                .iter()
                .find(|s| !up.done.contains(s) && !sealed.contains(s))
            {
                return Err(Error::Internal(format!(
                    "snapshot {} uses pack {seq}, which is neither sealed nor in the bucket",
                    snap.id
                )));
            }
        }
        self.wait_uploaded(&seqs)?;
        let bytes = self.shared.fs.read_all(snap.manifest).at(snap.manifest)?;
        self.shared
            .catalog
            .bucket()
            .put(&manifest_key(snap.id), bytes)?;
        // The packs it uses, by name: each must outlive the collection.
        let mut used = BTreeSet::new();
        for seq in snap.used {
            let path = packs::pack_path(&self.shared.packs_dir, *seq);
            let car = packs::read_sidecar(self.shared.fs.as_ref(), &path).ok_or_else(|| {
                Error::Internal(format!(
                    "pack {seq} holds chunks of snapshot {} but is not in the bucket",
                    snap.id
                ))
            })?;
            used.insert(car.key);
        }
        super::gc::check_used(&self.shared.catalog, snap.id, &used)?;
        self.shared
            .catalog
            .complete(snap.server, snap.id, snap.stats)
    }

    fn abandon(&self, server: ServerId, id: SnapshotId) {
        let _ = self.shared.catalog.finish_snapshot(server, id, false);
    }

    fn delete(&self, server: ServerId, id: SnapshotId) -> Result<()> {
        self.shared.catalog.delete_snapshot(server, id)
    }

    fn refresh(&self, engine: &Engine) -> Result<()> {
        self.sync(engine, false).map(|_| ())
    }

    fn pack_sealed(&self, seq: u32, path: &Path) {
        self.enqueue(seq, path);
    }
}
