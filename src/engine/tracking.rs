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
use super::live::Tracking;
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

/// A tracker for a capture or restore of `base` just starting (no writes
/// yet); its generation is set when it begins
/// ([`super::live::Guard::begin`]). Allocated before any lock is taken.
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
    let servers: HashSet<ServerId> = servers.into_iter().collect();
    let mut trackers = HashMap::new();
    let rows = if on {
        catalog.load_tracking()?
    } else {
        Vec::new()
    };
    if !rows.is_empty() {
        let mut changes = Vec::new();
        for (server, bytes) in rows {
            match Tracker::decode(&bytes).filter(|_| servers.contains(&server)) {
                Some(t) => {
                    changes.push(Change::PutTracking(server, t.encode(false)));
                    trackers.insert(server, t);
                }
                None => changes.push(Change::RemoveTracking(server)),
            }
        }
        catalog.commit(&changes)?;
    }
    Ok(Tracking::new(servers, trackers))
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
        self.inner.tracking.record(server, offset, len)
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
        // Writes reported to the tracker it replaces happened too: keeping
        // them only ever reads more (when the shapes agree).
        if let Some(old) = tracking.begin(server, tracker)
            && let Some(new) = tracking.get(server)
        {
            let _ = new.dirty.union_with(&old.dirty);
        }
        let status = tracking.folded(server).map(|t| t.status());
        status.ok_or(Error::ServerNotFound(server))
    }

    /// The change tracking of `server`: `None` when off or not started (no
    /// snapshot or restore since it was turned on).
    pub fn tracking_status(&self, server: ServerId) -> Result<Option<TrackingStatus>> {
        let mut tracking = self.inner.tracking.lock();
        if !tracking.has_server(server) {
            return Err(Error::ServerNotFound(server));
        }
        Ok(tracking.folded(server).map(|t| t.status()))
    }
}
