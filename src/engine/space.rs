//! Space: which chunks snapshots need (reference counts, exclusive
//! bytes), deletes, garbage collection and the store's figures.

use crate::catalog::Change;
use crate::error::{Error, Result};
use crate::ids::{ChunkId, SnapshotId};
use crate::refs::{self, Refs};
use crate::store::ChunkStore;
use crate::store::gc::GcReport;
use crate::types::SnapshotStatus;

use super::Engine;
use super::state::State;
use crate::types::StoreStats;

/// Pack bytes a chunk accounts for (its record, or its share of its
/// group's); 0 if missing.
pub(super) fn stored_size(store: &ChunkStore, id: &ChunkId) -> u32 {
    store
        .locate(id)
        .ok()
        .flatten()
        .map_or(0, |l| u32::try_from(l.accounted_len()).unwrap_or(u32::MAX))
}

impl Engine {
    /// Deletes a snapshot: catalog entry first, then its manifest. Its
    /// chunks stay until garbage collection.
    pub fn delete_snapshot(&self, id: SnapshotId) -> Result<()> {
        self.writable("deleting a snapshot")?;
        let mut state = self.inner.state.lock();
        let rec = state.snapshot(id)?;
        let server = rec.server_id;
        if rec.status == SnapshotStatus::InProgress {
            return Err(Error::Busy {
                server,
                operation: format!("capturing snapshot {id}"),
            });
        }
        if state.live_restores.values().any(|s| *s == id) {
            return Err(Error::Busy {
                server,
                operation: format!("being restored from snapshot {id}"),
            });
        }
        if state.servers.values().any(|s| s.restoring_from == Some(id)) {
            return Err(Error::WrongState(format!(
                "server {server} was left half-restored from snapshot {id}; run that restore again before deleting it"
            )));
        }
        if let Some((child, _)) = state.capture_parents.iter().find(|(_, p)| **p == id) {
            return Err(Error::Busy {
                server,
                operation: format!("capturing snapshot {child} as an increment of snapshot {id}"),
            });
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

    pub(super) fn ensure_refs(&self, state: &mut State) -> Result<()> {
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
    pub(super) fn needed(&self, id: &ChunkId) -> bool {
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
        if !dry_run {
            self.writable("collecting garbage")?;
        }
        self.account_space()?;
        let needed = |id: &ChunkId| self.needed(id);
        self.inner.store.gc(
            &needed,
            self.inner.options.gc_max_unused,
            dry_run,
            self.level(),
        )
    }

    /// Runs a collection in the background after a delete (with
    /// [`EngineOptions::auto_gc`]); its outcome is kept for
    /// [`Engine::last_auto_gc`].
    pub(super) fn start_auto_gc(&self) {
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
            compression: self.compression(),
            index: self.inner.store.index_info(),
        })
    }
}
