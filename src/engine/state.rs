//! The in-memory mirror of the catalog (plus what only lives in memory),
//! guarded by `Inner::state`, and the checks made under it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::catalog::{ServerRecord, SnapshotRecord};
use crate::dirty::DirtyBitmap;
use crate::error::{Error, Result};
use crate::ids::{ServerId, SnapshotId};
use crate::job::Progress;
use crate::refs::{Refs, Tables};
use crate::types::SnapshotStatus;

use crate::types::{Server, ServerRef, ServerState, Snapshot};

pub(super) struct State {
    pub(super) servers: BTreeMap<ServerId, ServerRecord>,
    pub(super) snapshots: BTreeMap<SnapshotId, SnapshotRecord>,
    pub(super) next_snapshot_id: u64,
    /// Restores running in this process: server -> snapshot.
    pub(super) live_restores: HashMap<ServerId, SnapshotId>,
    /// Exports running in this process: snapshot -> how many.
    pub(super) live_exports: HashMap<SnapshotId, usize>,
    pub(super) progress: HashMap<SnapshotId, Arc<Progress>>,
    /// Reference counts and exclusive bytes, loaded on first need (see
    /// `refs`).
    pub(super) refs: Option<Refs>,
    /// The reference counts' tables on disk (their headers read at open).
    pub(super) refs_tables: Tables,
    /// The snapshots the newest table counts: their manifests stay, even
    /// once deleted, until a table no longer counts them.
    pub(super) refs_covered: BTreeSet<SnapshotId>,
    /// The table on disk could not be used (damaged, or a manifest it
    /// needs is gone): the next [`super::space::persist_refs_if_due`]
    /// replaces it whatever changed.
    pub(super) refs_table_unusable: bool,
    /// Exclusive bytes as the catalog holds them, while `refs` is not
    /// loaded; `None` when they do not count the snapshots held now.
    pub(super) figures: Option<BTreeMap<SnapshotId, u64>>,
    /// Running incremental captures and their parents, which cannot be
    /// deleted until they end.
    pub(super) capture_parents: HashMap<SnapshotId, SnapshotId>,
    /// Captures whose completing catalog commit reported an error: it may
    /// have reached the disk all the same, so until the store is opened
    /// again (which reads the truth) their manifests stay and their chunks
    /// count as needed. This process shows them failed.
    pub(super) in_doubt: HashSet<SnapshotId>,
    /// Servers whose "restoring" mark was being committed when the commit
    /// reported an error: the mark may be on disk, so this process keeps
    /// it too, and the next restore commits it again before writing.
    pub(super) restoring_in_doubt: HashSet<ServerId>,
}

impl State {
    /// The state of a store just read from its catalog.
    pub(super) fn new(
        servers: BTreeMap<ServerId, ServerRecord>,
        snapshots: BTreeMap<SnapshotId, SnapshotRecord>,
        next_snapshot_id: u64,
    ) -> Self {
        State {
            servers,
            snapshots,
            next_snapshot_id,
            live_restores: HashMap::new(),
            live_exports: HashMap::new(),
            progress: HashMap::new(),
            refs: None,
            refs_tables: Tables::default(),
            refs_covered: BTreeSet::new(),
            refs_table_unusable: false,
            figures: None,
            capture_parents: HashMap::new(),
            in_doubt: HashSet::new(),
            restoring_in_doubt: HashSet::new(),
        }
    }

    pub(super) fn server(&self, id: ServerId) -> Result<&ServerRecord> {
        self.servers.get(&id).ok_or(Error::ServerNotFound(id))
    }

    pub(super) fn snapshot(&self, id: SnapshotId) -> Result<&SnapshotRecord> {
        self.snapshots.get(&id).ok_or(Error::SnapshotNotFound(id))
    }

    /// Snapshot `id`, refused unless completed: only a completed snapshot
    /// `can` (e.g. "can be restored").
    pub(super) fn completed(&self, id: SnapshotId, can: &str) -> Result<&SnapshotRecord> {
        let rec = self.snapshot(id)?;
        if rec.status != SnapshotStatus::Completed {
            return Err(Error::WrongState(format!(
                "snapshot {id} is {}; only a completed snapshot {can}",
                rec.status.as_str()
            )));
        }
        Ok(rec)
    }

    pub(super) fn snapshots_of(&self, server: ServerId) -> impl Iterator<Item = &SnapshotRecord> {
        self.snapshots
            .values()
            .filter(move |s| s.server_id == server)
    }

    /// True when the snapshot's chunks must be kept: it is completed, or
    /// it may be (its completing commit's outcome is unknown).
    pub(super) fn holds_data(&self, rec: &SnapshotRecord) -> bool {
        rec.status == SnapshotStatus::Completed || self.in_doubt.contains(&rec.id)
    }

    /// Drops the counts and figures (they could not be kept exact): both are
    /// counted again when next needed.
    pub(super) fn forget_counts(&mut self) {
        self.refs = None;
        self.figures = None;
    }

    /// The snapshots whose chunks are needed: completed, or in doubt.
    pub(super) fn held(&self) -> BTreeSet<SnapshotId> {
        self.snapshots
            .values()
            .filter(|r| self.holds_data(r))
            .map(|r| r.id)
            .collect()
    }

    /// The server's newest completed snapshot and its disk length: what a
    /// QEMU checkpoint on the disk's node records changes since.
    pub(super) fn newest_completed(&self, server: ServerId) -> Option<(SnapshotId, u64)> {
        self.snapshots_of(server)
            .filter(|s| s.status == SnapshotStatus::Completed)
            .filter_map(|s| Some((s.id, s.stats?.image_len)))
            .max()
    }

    pub(super) fn capturing(&self, server: ServerId) -> Option<SnapshotId> {
        self.snapshots_of(server)
            .find(|s| s.status == SnapshotStatus::InProgress)
            .map(|s| s.id)
    }

    pub(super) fn server_view(&self, rec: &ServerRecord) -> Server {
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
            account: rec.account.clone(),
        }
    }

    pub(super) fn snapshot_view(&self, rec: &SnapshotRecord) -> Snapshot {
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
            exclusive_bytes: match (&self.refs, &self.figures) {
                (Some(refs), _) => refs.exclusive(rec.id),
                (None, Some(figures)) => figures.get(&rec.id).copied(),
                (None, None) => None,
            },
            kind: rec.kind,
        }
    }

    /// Refuses to start anything on a server that is being restored.
    pub(super) fn check_not_restoring(&self, rec: &ServerRecord) -> Result<()> {
        if let Some(snap) = self.live_restores.get(&rec.id) {
            return Err(Error::Busy {
                server: rec.id,
                operation: format!("being restored from snapshot {snap}"),
            });
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

/// Checks that `parent` can be the parent of an incremental snapshot of
/// `server` whose disk is `disk_len` bytes, with `dirty` as its bitmap.
pub(super) fn check_parent(
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
