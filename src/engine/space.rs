//! Space: which chunks snapshots need (reference counts, exclusive
//! bytes), deletes, garbage collection and the store's figures.

use std::collections::BTreeSet;

use crate::catalog::Change;
use crate::error::{Error, Result};
use crate::ids::{ChunkId, SnapshotId};
use crate::refs::{self, Refs};
use crate::store::ChunkStore;
use crate::store::gc::GcReport;
use crate::table::Damaged;
use crate::types::SnapshotStatus;

use super::state::State;
use super::{Engine, Inner};
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

/// The catalog changes that commit the exclusive bytes changed since the
/// last call, counted for the snapshots `held`.
fn figure_changes(refs: &mut Refs, held: &BTreeSet<SnapshotId>) -> Vec<Change<'static>> {
    refs.take_touched()
        .into_iter()
        .map(|(s, bytes)| Change::Exclusive(s, bytes))
        .chain([Change::ExclusiveOf(refs::digest(held.iter().copied()))])
        .collect()
}

/// Writes the reference counts as a new table when enough changed since
/// the last one (see `Refs::due`).
pub(super) fn persist_refs_if_due(inner: &Inner, state: &mut State) -> Result<()> {
    persist_refs(inner, state, false)
}

/// Writes the reference counts as a new table (when due, or `always`, or
/// the table on disk is unusable), then removes the manifests of deleted
/// snapshots that only the old table counted. Not on a read-only store.
fn persist_refs(inner: &Inner, state: &mut State, always: bool) -> Result<()> {
    let min = inner.options.index_persist_min;
    let always = always || state.refs_table_unusable;
    let Some(refs) = state.refs.as_mut().filter(|r| always || r.due(min)) else {
        return Ok(());
    };
    if inner.options.read_only {
        return Ok(());
    }
    refs.write(inner.manifests.fs().as_ref(), inner.manifests.dir())?;
    tables_written(inner, state);
    Ok(())
}

/// After the counts were written as a new table (by [`persist_refs`], or
/// straight from a large snapshot's chunk list: see `Refs::set_direct`):
/// the store's view follows, and the manifests of deleted snapshots that
/// only the old table counted go. Nothing when no table was written.
fn tables_written(inner: &Inner, state: &mut State) {
    let Some(refs) = state.refs.as_ref() else {
        return;
    };
    let same = |a: &Option<std::sync::Arc<refs::RefsTable>>,
                b: &Option<std::sync::Arc<refs::RefsTable>>| match (a, b) {
        (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    };
    let (now, was) = (refs.tables(), &state.refs_tables);
    if same(&now.base, &was.base) && same(&now.delta, &was.delta) {
        return;
    }
    let counted: BTreeSet<SnapshotId> = refs.counted().collect();
    state.refs_tables = now.clone();
    state.refs_table_unusable = false;
    let before = std::mem::replace(&mut state.refs_covered, counted);
    for gone in before.difference(&state.refs_covered) {
        // Never the manifest of a snapshot still listed: a delete whose
        // commit has yet to land, or failed.
        if state.snapshots.contains_key(gone) {
            continue;
        }
        // Best effort: one left behind goes at the next open.
        let _ = inner.manifests.remove(*gone);
    }
}

/// When counts are written straight into a table: for snapshots of more
/// chunks than a block list may hold in memory, on a writable store.
fn direct(inner: &Inner) -> Option<refs::Direct> {
    (!inner.options.read_only).then(|| refs::Direct {
        fs: inner.manifests.fs().clone(),
        dir: inner.manifests.dir().to_path_buf(),
        min: inner.options.block_list_memory / 32,
    })
}

impl Engine {
    /// Deletes a snapshot: catalog entry first, then its manifest. Its
    /// chunks stay until garbage collection.
    pub fn delete_snapshot(&self, id: SnapshotId) -> Result<()> {
        self.delete_as(id, true)
    }

    /// A delete; `in_fleet`: in the fleet's catalog too (first), else
    /// only here (the fleet deleted it already).
    pub(crate) fn delete_as(&self, id: SnapshotId, in_fleet: bool) -> Result<()> {
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
        if state.live_exports.contains_key(&id) {
            return Err(Error::Busy {
                server,
                operation: format!("exporting snapshot {id}"),
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
        if let (true, Some(fleet)) = (in_fleet, &self.inner.options.coordinator) {
            fleet.delete(server, id)?;
        }
        let mut changes = vec![Change::RemoveSnapshot(id)];
        // The counts need the chunk list, which goes with the manifest.
        let chunks = if state.holds_data(rec) {
            let chunks = self
                .inner
                .manifests
                .read(id)
                .and_then(|m| self.inner.chunks_of(&m));
            let mut held = state.held();
            held.remove(&id);
            match chunks {
                Ok(chunks) => {
                    changes
                        .extend(self.count(&mut state, &held, |refs, _| refs.remove(id, &chunks)));
                    Some(chunks)
                }
                // A damaged manifest: count again from the others when
                // needed.
                Err(_) => {
                    state.forget_counts();
                    None
                }
            }
        } else {
            None
        };
        // Should this commit report an error, the snapshot stays as it was
        // in this process (listed, its chunks needed) until a delete
        // commits or the next open reads the truth.
        if let Err(e) = self.inner.catalog.commit(&changes) {
            if let (Some(refs), Some(chunks)) = (state.refs.as_mut(), chunks) {
                let store = &self.inner.store;
                let undone = refs.add(id, &chunks, |c| stored_size(store, c));
                refs.take_touched();
                if undone.is_err() {
                    state.forget_counts();
                }
                tables_written(&self.inner, &mut state);
            }
            return Err(e);
        }
        state.snapshots.remove(&id);
        state.in_doubt.remove(&id);
        // The delete is done once the catalog says so. A manifest that cannot
        // be removed now is an orphan, which the next open removes; one the
        // reference counts' table still counts stays until the next table.
        if !state.refs_covered.contains(&id) {
            let _ = self.inner.manifests.remove(id);
        }
        let _ = persist_refs_if_due(&self.inner, &mut state);
        drop(state);
        if self.inner.options.auto_gc {
            self.start_auto_gc();
        }
        Ok(())
    }

    /// Counts which snapshots reference each chunk, so that snapshots
    /// carry their exclusive bytes and garbage collection knows what is
    /// needed: from the reference counts' table and the manifests of what
    /// changed since it was written, or (none, or damaged) from every
    /// completed manifest. Later captures and deletes keep the counts exact
    /// without reading manifests again.
    pub fn account_space(&self) -> Result<()> {
        let mut state = self.inner.state.lock();
        self.ensure_refs(&mut state)
    }

    /// Makes sure every completed snapshot's exclusive bytes are known:
    /// from the catalog when they count the snapshots held now, else
    /// counted (see [`Engine::account_space`]).
    pub fn account_figures(&self) -> Result<()> {
        let mut state = self.inner.state.lock();
        if state.refs.is_some() || state.figures.is_some() {
            return Ok(());
        }
        self.ensure_refs(&mut state)
    }

    pub(super) fn ensure_refs(&self, state: &mut State) -> Result<()> {
        if state.refs.is_some() {
            return Ok(());
        }
        let held = state.held();
        let had_table = !state.refs_tables.is_empty();
        let direct = direct(&self.inner);
        let from_table = Some(state.refs_tables.clone())
            .filter(|t| !t.is_empty())
            .and_then(|t| {
                let mut refs = Refs::from_tables(t);
                refs.set_direct(direct.clone());
                self.replay(refs, &held).ok()
            });
        state.refs_table_unusable |= had_table && from_table.is_none();
        let mut refs = match from_table {
            Some(refs) => refs,
            None => {
                let mut refs = Refs::from_tables(state.refs_tables.emptied());
                refs.set_direct(direct);
                for id in &held {
                    self.count_manifest(&mut refs, *id, true)?;
                }
                refs
            }
        };
        refs.take_touched();
        // The catalog's figures follow the counts (best effort: they are
        // counted again when they do not match).
        if state.figures.as_ref() != Some(refs.figures()) && !self.inner.options.read_only {
            let mut changes: Vec<Change<'_>> = state
                .snapshots
                .keys()
                .map(|s| Change::Exclusive(*s, refs.exclusive(*s)))
                .collect();
            changes.push(Change::ExclusiveOf(refs::digest(held.iter().copied())));
            let _ = self.inner.catalog.commit(&changes);
        }
        state.figures = None;
        state.refs = Some(refs);
        tables_written(&self.inner, state);
        Ok(())
    }

    /// The table's counts brought up to the snapshots `held` now: those
    /// deleted since it was written taken out, those completed since
    /// added, each from its manifest.
    fn replay(&self, mut refs: Refs, held: &BTreeSet<SnapshotId>) -> Result<Refs> {
        let counted: BTreeSet<SnapshotId> = refs.counted().collect();
        for gone in counted.difference(held) {
            self.count_manifest(&mut refs, *gone, false)?;
        }
        for new in held.difference(&counted) {
            self.count_manifest(&mut refs, *new, true)?;
        }
        Ok(refs)
    }

    fn count_manifest(&self, refs: &mut Refs, id: SnapshotId, add: bool) -> Result<()> {
        let m = self.inner.manifests.read(id)?;
        let chunks = self.inner.chunks_of(&m)?;
        let store = &self.inner.store;
        let counted = if add {
            refs.add(id, &chunks, |c| stored_size(store, c))
        } else {
            refs.remove(id, &chunks)
        };
        counted.map_err(|d| self.refs_damaged(d))
    }

    fn refs_damaged(&self, d: Damaged) -> Error {
        Error::corrupt(self.inner.manifests.dir().join(refs::FILE_NAME), d.0)
    }

    /// Applies `change` to the counts (loaded first), and gives the
    /// catalog changes that commit the new exclusive bytes, counted for
    /// the snapshots `held` once the change commits. Counts that cannot be
    /// loaded or changed are dropped (counted again when next needed), and
    /// then nothing is committed for them: the catalog's figures, whose
    /// digest no longer matches, are known stale.
    pub(super) fn count(
        &self,
        state: &mut State,
        held: &BTreeSet<SnapshotId>,
        change: impl Fn(&mut Refs, &dyn Fn(&ChunkId) -> u32) -> std::result::Result<(), Damaged>,
    ) -> Vec<Change<'static>> {
        let store = &self.inner.store;
        let size = |c: &ChunkId| stored_size(store, c);
        // A damaged page of the table found on the way: counted again from
        // the manifests, without it, and once more.
        for _ in 0..2 {
            if self.ensure_refs(state).is_err() {
                break;
            }
            let Some(refs) = state.refs.as_mut() else {
                break;
            };
            if change(refs, &size).is_ok() {
                let changes = figure_changes(refs, held);
                tables_written(&self.inner, state);
                return changes;
            }
            self.drop_table(state);
        }
        state.forget_counts();
        Vec::new()
    }

    /// Stops using the table on disk (found damaged): the counts come from
    /// the manifests until a new one replaces it.
    fn drop_table(&self, state: &mut State) {
        state.forget_counts();
        state.refs_tables = state.refs_tables.emptied();
        state.refs_table_unusable = true;
    }

    /// Counts the reference counts again from every manifest, writes them
    /// as a new table and commits the figures (what `index rebuild` runs).
    pub(super) fn recount_space(&self) -> Result<()> {
        let mut state = self.inner.state.lock();
        state.forget_counts();
        state.refs_tables = state.refs_tables.emptied();
        self.ensure_refs(&mut state)?;
        persist_refs(&self.inner, &mut state, true)
    }

    /// What is wrong with the reference counts, if anything: their table's
    /// pages, and every chunk's count against a count from every manifest
    /// (damaged manifests aside: verify reports those).
    pub(super) fn check_space(&self) -> Option<String> {
        let mut state = self.inner.state.lock();
        if let Err(d) = state.refs_tables.check() {
            // Reported, and replaced (derived data, never trusted).
            self.drop_table(&mut state);
            if self.ensure_refs(&mut state).is_ok() {
                let _ = persist_refs_if_due(&self.inner, &mut state);
            }
            return Some(d.0);
        }
        self.ensure_refs(&mut state).ok()?;
        // The count from every manifest goes into tables of its own, in
        // a scratch directory, whenever it holds more than a block list
        // may: its memory does not grow with the store.
        let scratch = match self.inner.scratch_tables() {
            Ok(dir) => dir,
            Err(e) => return Some(format!("the reference counts could not be checked: {e}")),
        };
        let min = self.inner.options.block_list_memory / 32;
        let mut recount = Refs::default();
        recount.set_direct(Some(refs::Direct {
            fs: std::sync::Arc::new(crate::fsio::StdFs),
            dir: scratch.path().to_path_buf(),
            min,
        }));
        for id in state.held() {
            self.count_manifest(&mut recount, id, true).ok()?;
            if recount.overlay_len() as u64 > min
                && let Err(e) = recount.write(&crate::fsio::StdFs, scratch.path())
            {
                return Some(format!("the reference counts could not be checked: {e}"));
            }
        }
        let refs = state.refs.as_ref()?;
        match refs.differ(&recount) {
            Ok(differ) => differ,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Stored bytes only this completed snapshot references: what deleting
    /// it alone would give back after garbage collection.
    pub fn exclusive_bytes(&self, id: SnapshotId) -> Result<u64> {
        let mut state = self.inner.state.lock();
        self.ensure_refs(&mut state)?;
        state.completed(id, "holds data")?;
        Ok(state
            .refs
            .as_ref()
            .and_then(|r| r.exclusive(id))
            .unwrap_or(0))
    }

    /// True when a completed snapshot references the chunk (or the counts
    /// cannot say: a chunk is kept, never lost, on doubt).
    pub(super) fn needed(&self, id: &ChunkId) -> bool {
        self.inner
            .state
            .lock()
            .refs
            .as_ref()
            .is_none_or(|r| r.is_needed(id).unwrap_or(true))
    }

    /// Gives back the space of chunks no snapshot needs (see
    /// `store::gc`): deletes packs that hold none, and rewrites the packs
    /// with the most garbage until what is left is within
    /// [`EngineOptions::gc_max_unused`]. Safe while captures, restores and
    /// deletes run. With `dry_run`, changes nothing and reports what it
    /// would do.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport> {
        if self.inner.options.coordinator.is_some() {
            return Err(Error::WrongState(
                "this store's packs are shared by a fleet of hosts: a local collection would \
                 remove chunks other hosts need; run `blocksnap fleet gc` instead"
                    .into(),
            ));
        }
        if !dry_run {
            self.writable("collecting garbage")?;
        }
        self.account_space()?;
        let needed = |id: &ChunkId| self.needed(id);
        let resized = |id: &ChunkId, size: u32| {
            let mut state = self.inner.state.lock();
            if let Some(refs) = state.refs.as_mut()
                && refs.resize(id, size).is_err()
            {
                state.forget_counts();
            }
        };
        let report = self.inner.store.gc(
            &needed,
            &resized,
            self.inner.options.gc_max_unused,
            dry_run,
            self.level(),
        )?;
        // Best effort: figures that do not match the counts are committed
        // again when the counts are next loaded.
        let mut state = self.inner.state.lock();
        let held = state.held();
        if let Some(refs) = state.refs.as_mut() {
            let changes = figure_changes(refs, &held);
            if changes.len() > 1 && !dry_run {
                let _ = self.inner.catalog.commit(&changes);
            }
        }
        let _ = persist_refs_if_due(&self.inner, &mut state);
        Ok(report)
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
