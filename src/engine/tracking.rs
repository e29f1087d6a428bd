//! Change tracking calls: guest writes reported by the embedder, adopted
//! bitmaps, and the trackers' hand-over to and from the catalog.

use std::collections::{HashMap, HashSet};

use crate::catalog::{Catalog, Change};
use crate::dirty::DirtyBitmap;
use crate::error::{Error, Result};
use crate::ids::{ServerId, SnapshotId};
use crate::tracking::{Tracker, TrackingStatus};
use crate::types::{FullReason, SnapshotStatus};

use super::Engine;
use super::captures::CaptureMode;
use super::state::{State, check_parent};

/// How a snapshot without an explicit parent captures, from the server's
/// tracker as it was when the capture was reserved.
pub(super) fn tracked_mode(state: &State, tracker: Option<&Tracker>, disk_len: u64) -> CaptureMode {
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

/// Change tracking's own state, behind its own lock (`Inner::tracking`):
/// taken after `state` when both are needed, held only for in-memory work
/// (never across a catalog commit, a manifest read, a GC or a capture), so
/// that a guest write reported with [`Engine::record_write`] never waits
/// on the disk.
#[derive(Default)]
pub(super) struct Tracking {
    /// The registered servers, so that a write to an unknown one is
    /// refused without the state lock.
    pub(super) servers: HashSet<ServerId>,
    /// Per server (with `EngineOptions::change_tracking` on).
    pub(super) trackers: HashMap<ServerId, Tracker>,
}

impl Tracking {
    /// Starts tracking `server` from `fresh` (a capture or restore of its
    /// base just starting), in the next generation; returns the tracker it
    /// replaces. Writes reported from now on count from the new base.
    pub(super) fn begin(&mut self, server: ServerId, mut fresh: Tracker) -> Option<Tracker> {
        let previous = self.trackers.remove(&server);
        fresh.generation = previous.as_ref().map_or(1, |p| p.generation + 1);
        self.trackers.insert(server, fresh);
        previous
    }

    /// The catalog rows that hand the trackers over cleanly (on close).
    pub(super) fn hand_over(&self) -> Vec<(ServerId, Option<Vec<u8>>)> {
        self.trackers
            .iter()
            .map(|(server, t)| (*server, (!t.pending).then(|| t.encode(true))))
            .collect()
    }
}

/// A tracker for a capture or restore of `base` just starting (no writes
/// yet); its generation is set by [`Tracking::begin`]. Allocated before
/// any lock is taken.
pub(super) fn new_tracker(base: SnapshotId, disk_len: u64, block_size: u32) -> Result<Tracker> {
    Ok(Tracker {
        base,
        pending: true,
        dirty: DirtyBitmap::new(disk_len, u64::from(block_size))?,
        trusted: true,
        generation: 0,
    })
}

/// Loads the persisted trackers of `servers` and marks them unclean on
/// disk before any write can be reported. With tracking off they are left
/// as they are, neither loaded nor changed (a look at the store must not
/// make an agent's next captures full); a restore then removes its
/// server's, since it changes the disk behind the tracker's back.
pub(super) fn load_tracking(
    catalog: &Catalog,
    servers: impl IntoIterator<Item = ServerId>,
    on: bool,
) -> Result<Tracking> {
    let mut tracking = Tracking {
        servers: servers.into_iter().collect(),
        trackers: HashMap::new(),
    };
    if !on {
        return Ok(tracking);
    }
    let rows = catalog.load_tracking()?;
    if rows.is_empty() {
        return Ok(tracking);
    }
    let mut changes = Vec::new();
    for (server, bytes) in rows {
        match Tracker::decode(&bytes).filter(|_| tracking.servers.contains(&server)) {
            Some(t) => {
                changes.push(Change::PutTracking(server, t.encode(false)));
                tracking.trackers.insert(server, t);
            }
            None => changes.push(Change::RemoveTracking(server)),
        }
    }
    catalog.commit(&changes)?;
    Ok(tracking)
}

impl Engine {
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
        let mut tracking = self.inner.tracking.lock();
        if !tracking.servers.contains(&server) {
            return Err(Error::ServerNotFound(server));
        }
        if let Some(t) = tracking.trackers.get_mut(&server) {
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
        let state = inner.state.lock();
        let srv = state.server(server)?;
        state.check_not_restoring(srv)?;
        if let Some(capturing) = state.capturing(server) {
            return Err(Error::Busy {
                server,
                operation: format!("capturing snapshot {capturing}"),
            });
        }
        check_parent(&state, server, base, dirty, dirty.disk_len(), bs)?;
        let mut tracker = new_tracker(base, dirty.disk_len(), bs)?;
        for run in dirty.block_runs(bs)? {
            for b in run {
                tracker.dirty.set(b);
            }
        }
        tracker.pending = false;
        let mut tracking = inner.tracking.lock();
        tracking.begin(server, tracker);
        let status = tracking.trackers.get(&server).map(Tracker::status);
        status.ok_or(Error::ServerNotFound(server))
    }

    /// The change tracking of `server`: `None` when off or not started (no
    /// snapshot or restore since it was turned on).
    pub fn tracking_status(&self, server: ServerId) -> Result<Option<TrackingStatus>> {
        let tracking = self.inner.tracking.lock();
        if !tracking.servers.contains(&server) {
            return Err(Error::ServerNotFound(server));
        }
        Ok(tracking.trackers.get(&server).map(Tracker::status))
    }
}
