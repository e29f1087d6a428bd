//! Verification: read every chunk that completed snapshots reference and
//! check it end to end (record CRCs, decompression, BLAKE3), in pack order so
//! the packs are read sequentially.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde::Serialize;

use crate::error::Result;
use crate::ids::{ChunkId, SnapshotId};
use crate::manifest::Manifest;
use crate::store::ChunkStore;

/// A chunk that failed its checks, and who needs it.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct BadChunk {
    /// The chunk's id, hex.
    pub chunk: String,
    /// The pack file and offset, when the index knows it.
    pub location: Option<String>,
    pub error: String,
    /// Completed snapshots whose manifest references it.
    pub snapshots: Vec<SnapshotId>,
}

/// A manifest that could not be read.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct BadManifest {
    pub snapshot: SnapshotId,
    pub error: String,
}

/// What verification found.
#[derive(Clone, Debug, Default, Serialize)]
#[non_exhaustive]
pub struct VerifyReport {
    pub snapshots_checked: u64,
    pub chunks_checked: u64,
    /// Bytes of chunk data checked (before compression).
    pub bytes_checked: u64,
    pub bad_chunks: Vec<BadChunk>,
    pub bad_manifests: Vec<BadManifest>,
    /// What is wrong with the catalog, when its integrity check failed:
    /// then any snapshot may be affected.
    pub catalog_error: Option<String>,
    /// What is wrong with the chunk index table, when it failed its
    /// checks (`blocksnap index rebuild` makes it again from the packs;
    /// snapshots are not affected, the packs being the source of truth).
    pub index_error: Option<String>,
    /// What is wrong with the reference counts (their table failed its
    /// checks, or they disagree with a count from every manifest; `blocksnap
    /// index rebuild` counts them again). Snapshots are not affected: a
    /// chunk is never collected while the counts are in doubt.
    #[serde(default)]
    pub space_error: Option<String>,
}

impl VerifyReport {
    /// True when nothing failed a check.
    pub fn is_ok(&self) -> bool {
        self.bad_chunks.is_empty()
            && self.bad_manifests.is_empty()
            && self.catalog_error.is_none()
            && self.index_error.is_none()
            && self.space_error.is_none()
    }

    /// Snapshots that cannot be restored intact, ascending.
    pub fn damaged_snapshots(&self) -> Vec<SnapshotId> {
        let mut v: Vec<SnapshotId> = self
            .bad_chunks
            .iter()
            .flat_map(|c| c.snapshots.iter().copied())
            .chain(self.bad_manifests.iter().map(|m| m.snapshot))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Checks every chunk the given manifests reference, once each (the
/// manifests read one at a time).
pub fn verify(
    store: &ChunkStore,
    manifests: impl Iterator<Item = (SnapshotId, Result<Manifest>)>,
) -> VerifyReport {
    let mut report = VerifyReport::default();
    let mut users: HashMap<ChunkId, Vec<SnapshotId>> = HashMap::new();
    for (id, m) in manifests {
        report.snapshots_checked += 1;
        match m {
            Ok(m) => match m.unique_chunks() {
                Ok(chunks) => {
                    for c in chunks {
                        users.entry(c).or_default().push(id);
                    }
                }
                Err(e) => report.bad_manifests.push(BadManifest {
                    snapshot: id,
                    error: e.to_string(),
                }),
            },
            Err(e) => report.bad_manifests.push(BadManifest {
                snapshot: id,
                error: e.to_string(),
            }),
        }
    }
    let mut chunks: Vec<(ChunkId, Option<crate::store::ChunkLoc>)> = users
        .keys()
        .map(|c| (*c, store.locate(c).ok().flatten()))
        .collect();
    chunks.sort_by_key(|(_, loc)| loc.map(|l| (l.pack, l.offset)));
    let bytes = AtomicU64::new(0);
    let mut bad: Vec<BadChunk> = chunks
        .par_iter()
        .filter_map(|(id, loc)| match store.read(id) {
            Ok(data) => {
                bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                None
            }
            Err(e) => Some(BadChunk {
                chunk: id.to_hex(),
                location: loc
                    .map(|l| format!("{} @ {}", store.pack_path_of(&l).display(), l.offset)),
                error: e.to_string(),
                snapshots: users[id].clone(),
            }),
        })
        .collect();
    bad.sort_by(|a, b| a.chunk.cmp(&b.chunk));
    report.chunks_checked = chunks.len() as u64;
    report.bytes_checked = bytes.into_inner();
    report.bad_chunks = bad;
    report
}
