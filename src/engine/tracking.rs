//! Change tracking calls: guest writes reported by the embedder, adopted
//! bitmaps, and the trackers' hand-over to and from the catalog.

use crate::catalog::{Catalog, Change, FullReason, SnapshotStatus};
use crate::dirty::DirtyBitmap;
use crate::error::{Error, Result};
use crate::ids::{ServerId, SnapshotId};
use crate::tracking::{Tracker, TrackingStatus};

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

/// A tracker for a capture or restore of `base` just starting: no writes
/// yet, the next generation.
pub(super) fn new_tracker(
    base: SnapshotId,
    disk_len: u64,
    block_size: u32,
    previous: Option<&Tracker>,
) -> Result<Tracker> {
    Ok(Tracker {
        base,
        pending: true,
        dirty: DirtyBitmap::new(disk_len, u64::from(block_size))?,
        trusted: true,
        generation: previous.map_or(1, |p| p.generation + 1),
    })
}

/// Loads the persisted trackers and marks them unclean on disk before any
/// write can be reported (with tracking on), or forgets them (off).
pub(super) fn load_tracking(catalog: &Catalog, state: &mut State, on: bool) -> Result<()> {
    let rows = catalog.load_tracking()?;
    if rows.is_empty() {
        return Ok(());
    }
    if !on {
        let changes: Vec<Change<'_>> = rows
            .iter()
            .map(|(server, _)| Change::RemoveTracking(*server))
            .collect();
        return catalog.commit(&changes);
    }
    let mut changes = Vec::new();
    for (server, bytes) in rows {
        match Tracker::decode(&bytes).filter(|_| state.servers.contains_key(&server)) {
            Some(t) => {
                changes.push(Change::PutTracking(server, t.encode(false)));
                state.tracking.insert(server, t);
            }
            None => changes.push(Change::RemoveTracking(server)),
        }
    }
    catalog.commit(&changes)
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
        let mut state = self.inner.state.lock();
        state.server(server)?;
        if let Some(t) = state.tracking.get_mut(&server) {
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
        let mut state = inner.state.lock();
        let srv = state.server(server)?;
        state.check_not_restoring(srv)?;
        if let Some(capturing) = state.capturing(server) {
            return Err(Error::WrongState(format!(
                "server {server} is capturing snapshot {capturing}; wait for it to finish"
            )));
        }
        check_parent(&state, server, base, dirty, dirty.disk_len(), bs)?;
        let mut blocks = DirtyBitmap::new(dirty.disk_len(), u64::from(bs))?;
        for run in dirty.block_runs(bs)? {
            for b in run {
                blocks.set(b);
            }
        }
        let tracker = Tracker {
            base,
            pending: false,
            dirty: blocks,
            trusted: true,
            generation: state.tracking.get(&server).map_or(1, |t| t.generation + 1),
        };
        let status = tracker.status();
        state.tracking.insert(server, tracker);
        Ok(status)
    }

    /// The change tracking of `server`: `None` when off or not started (no
    /// snapshot or restore since it was turned on).
    pub fn tracking_status(&self, server: ServerId) -> Result<Option<TrackingStatus>> {
        let state = self.inner.state.lock();
        state.server(server)?;
        Ok(state.tracking.get(&server).map(Tracker::status))
    }
}
