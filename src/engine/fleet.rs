//! What a fleet (see `crate::fleet`) asks of the engine of one of its
//! hosts: this host's catalog brought in line with the fleet's, which is
//! the authority. Nothing here asks the fleet back.

use std::path::Path;

use crate::catalog::{Change, SnapshotRecord};
use crate::error::{Error, Result};
use crate::ids::{ServerId, SnapshotId};
use crate::types::SnapshotStatus;

use super::Engine;

impl Engine {
    /// The fleet this engine's host belongs to, if its store is a bucket.
    pub(crate) fn coordinator(&self) -> Option<&dyn crate::coordinator::Coordinator> {
        self.inner.options.coordinator.as_deref()
    }

    /// Registers a server the fleet has, with this host's disk for it.
    pub(crate) fn attach_server(&self, id: ServerId, name: &str, disk: &Path) -> Result<()> {
        self.add_server_as(id, name, disk, false, crate::policy::DEFAULT_ACCOUNT)
            .map(|_| ())
    }

    /// Adds a pack of the fleet to the store while it is open (see
    /// `ChunkStore::adopt_pack`).
    pub(crate) fn adopt_pack(&self, make: impl FnOnce(&Path) -> Result<()>) -> Result<u32> {
        self.inner.store.adopt_pack(make)
    }

    /// Takes packs the fleet no longer has out of the open store (see
    /// `ChunkStore::forget_packs`).
    pub(crate) fn forget_packs(&self, gone: &[u32]) -> Result<()> {
        self.inner.store.forget_packs(gone)
    }

    /// Removes a snapshot the fleet no longer has (deleted on another
    /// host, or failed there).
    pub(crate) fn forget_snapshot(&self, id: SnapshotId) -> Result<()> {
        self.delete_as(id, false)
    }

    /// The snapshots this host's catalog holds: id, server and status.
    pub(crate) fn local_snapshots(&self) -> Vec<(SnapshotId, ServerId, SnapshotStatus)> {
        let state = self.inner.state.lock();
        state
            .snapshots
            .values()
            .map(|r| (r.id, r.server_id, r.status))
            .collect()
    }

    /// Takes in a snapshot another host completed: its manifest (checked
    /// through, from `source`) is written here, its chunks counted, and it
    /// is committed completed. Every chunk it needs must already be in the
    /// store's packs (the fleet learns packs before manifests).
    pub(crate) fn import_snapshot(
        &self,
        record: SnapshotRecord,
        manifest: Option<(&[u8], &str)>,
    ) -> Result<()> {
        self.writable("taking in a snapshot")?;
        let id = record.id;
        {
            let state = self.inner.state.lock();
            state.server(record.server_id)?;
            if state.snapshots.contains_key(&id) {
                return Ok(());
            }
        }
        let chunks = match (record.status, manifest) {
            (SnapshotStatus::Completed, Some((bytes, source))) => {
                Some(self.take_manifest(&record, bytes, source)?)
            }
            (SnapshotStatus::Failed, None) => None,
            _ => {
                return Err(Error::Internal(format!(
                    "snapshot {id} is taken in completed with its manifest, or failed without"
                )));
            }
        };
        let mut state = self.inner.state.lock();
        let mut changes = vec![Change::PutSnapshot(&record)];
        if let Some(chunks) = &chunks {
            let mut held = state.held();
            held.insert(id);
            changes.extend(self.count(&mut state, &held, |refs, size| refs.add(id, chunks, size)));
        }
        state.next_snapshot_id = state.next_snapshot_id.max(id.0 + 1);
        changes.push(Change::NextSnapshotId(state.next_snapshot_id));
        if let Err(e) = self.inner.catalog.commit(&changes) {
            // Counted, not committed: counted again from the manifests.
            // The manifest stays (a table may count it); the next open
            // removes it if the commit did not land.
            state.forget_counts();
            return Err(e);
        }
        drop(changes);
        state.snapshots.insert(id, record);
        let _ = super::space::persist_refs_if_due(&self.inner, &mut state);
        Ok(())
    }

    /// Writes a manifest from another host here, checked through, and
    /// gives its chunks.
    fn take_manifest(
        &self,
        record: &SnapshotRecord,
        bytes: &[u8],
        source: &str,
    ) -> Result<crate::sorted::SortedIds> {
        let id = record.id;
        let m = self.inner.manifests.write_encoded(id, bytes, source)?;
        if m.server != record.server_id || m.block_size != self.inner.block_size {
            let _ = self.inner.manifests.remove(id);
            return Err(Error::corrupt(
                source,
                format!(
                    "the manifest of snapshot {id} is of server {} with blocks of {} bytes, \
                     not of server {} with blocks of {}",
                    m.server, m.block_size, record.server_id, self.inner.block_size
                ),
            ));
        }
        self.inner.chunks_of(&m).inspect_err(|_| {
            let _ = self.inner.manifests.remove(id);
        })
    }
}
