//! Which snapshots need each chunk, and each snapshot's exclusive bytes:
//! the stored bytes deleting that snapshot alone would give back.
//!
//! Kept exact as snapshots come and go, without rescanning manifests: each
//! chunk has a count of the completed snapshots that reference it and the
//! XOR of their ids. When the count is 1, the XOR *is* the one owner, so a
//! chunk moving from two owners to one (a delete) credits the survivor,
//! and one moving from one to two debits the former sole owner, each in
//! constant time.
//!
//! Built once from the manifests when first needed, then updated by every
//! completed capture and every delete.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::ids::{ChunkId, SnapshotId};
use crate::store::PrefixHasher;

/// The first 16 bytes of a chunk id, as the chunk index keys it. Two chunks
/// sharing them (a 2^-64 event at four billion chunks) would both count as
/// needed, which only ever keeps a chunk, never loses one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key(u64, u64);

fn key(id: &ChunkId) -> Key {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&id.0[..8]);
    b.copy_from_slice(&id.0[8..16]);
    Key(u64::from_le_bytes(a), u64::from_le_bytes(b))
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0);
    }
}

#[derive(Clone, Copy, Debug)]
struct Ref {
    count: u32,
    /// Stored bytes of the chunk (record header and payload), fixed when
    /// first referenced so that additions and removals balance.
    size: u32,
    owners_xor: u64,
}

/// Reference counts and exclusive bytes.
#[derive(Default)]
pub(crate) struct Refs {
    chunks: HashMap<Key, Ref, BuildHasherDefault<PrefixHasher>>,
    exclusive: HashMap<SnapshotId, u64>,
}

impl Refs {
    /// A completed snapshot referencing `ids` (each once); `size` gives a
    /// chunk's stored bytes.
    pub fn add(&mut self, snap: SnapshotId, ids: &[ChunkId], size: impl Fn(&ChunkId) -> u32) {
        self.exclusive.entry(snap).or_insert(0);
        for id in ids {
            let r = self.chunks.entry(key(id)).or_insert(Ref {
                count: 0,
                size: size(id),
                owners_xor: 0,
            });
            let bytes = u64::from(r.size);
            match r.count {
                0 => *self.exclusive.entry(snap).or_insert(0) += bytes,
                1 => {
                    let owner = SnapshotId(r.owners_xor);
                    if let Some(e) = self.exclusive.get_mut(&owner) {
                        *e = e.saturating_sub(bytes);
                    }
                }
                _ => {}
            }
            r.count += 1;
            r.owners_xor ^= snap.0;
        }
    }

    /// The snapshot that referenced `ids` is deleted.
    pub fn remove(&mut self, snap: SnapshotId, ids: &[ChunkId]) {
        for id in ids {
            let k = key(id);
            let Some(r) = self.chunks.get_mut(&k) else {
                continue;
            };
            r.count = r.count.saturating_sub(1);
            r.owners_xor ^= snap.0;
            let bytes = u64::from(r.size);
            if r.count == 1 {
                *self.exclusive.entry(SnapshotId(r.owners_xor)).or_insert(0) += bytes;
            } else if r.count == 0 {
                self.chunks.remove(&k);
            }
        }
        self.exclusive.remove(&snap);
    }

    /// True when a completed snapshot references the chunk.
    pub fn is_needed(&self, id: &ChunkId) -> bool {
        self.chunks.contains_key(&key(id))
    }

    /// Stored bytes only this snapshot references.
    pub fn exclusive(&self, snap: SnapshotId) -> Option<u64> {
        self.exclusive.get(&snap).copied()
    }
}

/// Each chunk id once, for [`Refs::add`] and [`Refs::remove`].
pub(crate) fn distinct(blocks: &[Option<ChunkId>]) -> Vec<ChunkId> {
    let mut ids: Vec<ChunkId> = blocks.iter().flatten().copied().collect();
    ids.sort_unstable_by_key(|id| id.0);
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n])
    }

    fn size(id: &ChunkId) -> u32 {
        u32::from(id.0[0]) + 100
    }

    proptest! {
        /// Against recounting from scratch after every step.
        #[test]
        fn exclusive_bytes_match_a_recount(
            steps in proptest::collection::vec(
                (any::<bool>(), 1u64..6, proptest::collection::btree_set(0u8..12, 0..8)),
                1..40,
            ),
        ) {
            let mut refs = Refs::default();
            let mut live: BTreeMap<u64, BTreeSet<u8>> = BTreeMap::new();
            let mut next = 100u64;
            for (add, pick, chunks) in steps {
                if add || live.is_empty() {
                    next += 1;
                    let ids: Vec<ChunkId> = chunks.iter().map(|&c| id(c)).collect();
                    refs.add(SnapshotId(next), &distinct(&ids.iter().copied().map(Some).collect::<Vec<_>>()), size);
                    live.insert(next, chunks);
                } else {
                    let victim = *live.keys().nth(pick as usize % live.len()).unwrap();
                    let chunks = live.remove(&victim).unwrap();
                    let ids: Vec<ChunkId> = chunks.iter().map(|&c| id(c)).collect();
                    refs.remove(SnapshotId(victim), &ids);
                }
                for (snap, chunks) in &live {
                    let want: u64 = chunks
                        .iter()
                        .filter(|c| live.iter().filter(|(_, o)| o.contains(c)).count() == 1)
                        .map(|&c| u64::from(size(&id(c))))
                        .sum();
                    prop_assert_eq!(refs.exclusive(SnapshotId(*snap)), Some(want));
                }
                for c in 0u8..12 {
                    let needed = live.values().any(|o| o.contains(&c));
                    prop_assert_eq!(refs.is_needed(&id(c)), needed);
                }
            }
        }
    }
}
