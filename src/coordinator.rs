//! The seam through which an engine whose store several hosts share (a
//! fleet on one bucket, see `fleet`) asks the fleet before it acts. The
//! fleet's catalog is the authority on servers, snapshot ids, the cap and
//! snapshot states; the engine's own catalog mirrors what concerns this
//! host. Every call is made before the engine changes its own catalog,
//! so a refusal or failure here leaves the engine as it was.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::ids::{ServerId, SnapshotId};
use crate::types::{CaptureStats, SnapshotKind};

/// A captured snapshot, ready to publish.
pub struct Published<'a> {
    pub server: ServerId,
    pub id: SnapshotId,
    /// Its manifest, written and durable here.
    pub manifest: &'a Path,
    /// Every sealed pack, by number and path (those the fleet has are
    /// skipped).
    pub packs: &'a [(u32, PathBuf)],
    /// The packs its chunks are in.
    pub used: &'a BTreeSet<u32>,
    pub stats: &'a CaptureStats,
}

pub trait Coordinator: Send + Sync + std::any::Any {
    /// For the fleet to find its own type behind the engine's handle.
    fn as_any(&self) -> &dyn std::any::Any;

    /// Registers `server` in the fleet, or attaches this host's `disk`
    /// to it when the fleet has it under the same name.
    fn add_server(&self, server: ServerId, name: &str, disk: &Path) -> Result<()>;

    /// Reserves a snapshot of `server` in the fleet (the cap checked there
    /// for regular snapshots, whatever other hosts do) and gives its id,
    /// unique across the fleet.
    fn reserve(
        &self,
        server: ServerId,
        name: &str,
        description: &str,
        kind: SnapshotKind,
    ) -> Result<SnapshotId>;

    /// Publishes a captured snapshot: its packs and then its manifest
    /// are made durable in the fleet, then it is marked completed there.
    /// Only then does the engine commit it completed.
    fn publish(&self, snapshot: &Published<'_>) -> Result<()>;

    /// A reserved snapshot that will not complete here: marked failed in
    /// the fleet (best effort; the fleet's own clean-up covers a host that
    /// dies before).
    fn abandon(&self, server: ServerId, id: SnapshotId);

    /// Removes a snapshot from the fleet's catalog.
    fn delete(&self, server: ServerId, id: SnapshotId) -> Result<()>;

    /// Brings the engine up to date with the fleet (packs, snapshots):
    /// called once a server is attached, to take in its snapshots.
    fn refresh(&self, engine: &crate::engine::Engine) -> Result<()>;

    /// Told of every pack sealed, so its upload can start while the
    /// capture goes on.
    fn pack_sealed(&self, seq: u32, path: &Path);
}
