//! Verification: read every chunk that completed snapshots reference and
//! check it end to end (record CRCs, decompression, BLAKE3), in pack order so
//! the packs are read sequentially.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde::Serialize;

use crate::error::Result;
use crate::ids::{ChunkId, SnapshotId};
use crate::manifest::Manifest;
use crate::sorted::SortedIds;
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

/// Chunks located, ordered by place and read together.
const BATCH: usize = 1 << 16;

/// Checks every chunk the manifests of `snapshots` (read with `read`)
/// reference, once each, in bounded memory: their ids are sorted through
/// scratch files beyond `memory` bytes (in `scratch`), then checked in
/// batches, each read in pack order. When a chunk fails, the manifests are
/// read again to name the snapshots that use it.
pub fn verify(
    store: &ChunkStore,
    snapshots: &[SnapshotId],
    read: impl Fn(SnapshotId) -> Result<Manifest>,
    memory: u64,
    scratch: &Path,
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut all = SortedIds::new(memory, scratch);
    let mut good = Vec::new();
    for &id in snapshots {
        report.snapshots_checked += 1;
        // A manifest that cannot be read is its snapshot's damage; a
        // scratch file that cannot be written is verify's own failure.
        let mut damage = None;
        match read(id) {
            Ok(m) => {
                for d in m.blocks().data() {
                    match d {
                        Ok((_, chunk)) => all.push(chunk)?,
                        Err(e) => {
                            damage = Some(e);
                            break;
                        }
                    }
                }
            }
            Err(e) => damage = Some(e),
        }
        match damage {
            None => good.push(id),
            Some(e) => report.bad_manifests.push(BadManifest {
                snapshot: id,
                error: e.to_string(),
            }),
        }
    }
    all.finish();
    let bytes = AtomicU64::new(0);
    let mut bad: Vec<BadChunk> = Vec::new();
    let mut ids = all.iter();
    loop {
        let batch: Vec<ChunkId> = ids.by_ref().take(BATCH).collect::<Result<_>>()?;
        if batch.is_empty() {
            break;
        }
        report.chunks_checked += batch.len() as u64;
        let mut chunks: Vec<(ChunkId, Option<crate::store::ChunkLoc>)> = batch
            .into_iter()
            .map(|c| (c, store.locate(&c).ok().flatten()))
            .collect();
        chunks.sort_by_key(|(_, loc)| loc.map(|l| (l.pack, l.offset)));
        bad.par_extend(
            chunks
                .par_iter()
                .filter_map(|(id, loc)| match store.read(id) {
                    Ok(data) => {
                        bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                        None
                    }
                    Err(e) => Some(BadChunk {
                        chunk: id.to_hex(),
                        location: loc.map(|l| {
                            format!("{} @ {}", store.pack_path_of(&l).display(), l.offset)
                        }),
                        error: e.to_string(),
                        snapshots: Vec::new(),
                    }),
                }),
        );
    }
    // Who needs the bad chunks.
    if !bad.is_empty() {
        let which: HashMap<String, usize> = bad
            .iter()
            .enumerate()
            .map(|(k, b)| (b.chunk.clone(), k))
            .collect();
        for &id in &good {
            // One deleted (or damaged) since the first pass names none.
            let Ok(m) = read(id) else {
                continue;
            };
            let mut users = BTreeSet::new();
            for (_, chunk) in m.blocks().data().map_while(|d| d.ok()) {
                if let Some(&k) = which.get(&chunk.to_hex()) {
                    users.insert(k);
                }
            }
            for k in users {
                bad[k].snapshots.push(id);
            }
        }
    }
    bad.sort_by(|a, b| a.chunk.cmp(&b.chunk));
    report.bytes_checked = bytes.into_inner();
    report.bad_chunks = bad;
    Ok(report)
}
