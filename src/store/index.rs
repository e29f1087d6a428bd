//! The chunk index: chunk id -> record location, in 28 bytes per chunk.
//!
//! A dedup index must stay small: it is the one structure that grows with
//! everything stored. Each entry keeps the first 16 bytes of the id (the
//! full 32 are in the record header, checked on every read) and a 12-byte
//! location. Entries live in one sorted array (binary search), plus a small
//! hash map of recent inserts that is merged into the array once it holds
//! more than 1/32 of it (or 256), so the whole costs about 28 + 2 = 30
//! bytes per chunk from 10,000 chunks on (measured by `bytes_per_chunk_is_at_most_32`).
//!
//! Two different chunks sharing a 128-bit id prefix (a 2^-64 event at
//! four billion chunks) cannot corrupt a disk: the dedup look-up would call
//! the second chunk stored, and restoring it would fail the record header's
//! full-id check, or BLAKE3, with a corruption error.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use super::{ChunkLoc, PrefixHasher};
use crate::ids::ChunkId;

/// What garbage collection does to the entries of one pack: (record
/// offset, first 16 bytes of the chunk id) -> the chunk's new offset and
/// stored length, or `None` to drop it.
pub type Moves = HashMap<(u32, [u8; 16]), Option<(u32, u32)>>;

/// The key of `id` at record `offset` in [`Moves`].
pub fn move_key(offset: u64, id: &ChunkId) -> (u32, [u8; 16]) {
    (offset as u32, key(id).0)
}

/// Recent inserts are merged into the sorted array past this share of it.
const MERGE_DIVISOR: usize = 32;
/// ... or past this many, whichever is larger.
const MERGE_MIN: usize = 256;

/// The first 16 bytes of a chunk id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key([u8; 16]);

impl Hash for Key {
    /// BLAKE3 output is uniform: its first 8 bytes are the hash.
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(b));
    }
}

fn key(id: &ChunkId) -> Key {
    let mut k = [0u8; 16];
    k.copy_from_slice(&id.0[..16]);
    Key(k)
}

/// One sorted entry: 16 + 12 bytes, no padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
struct Entry {
    key: Key,
    pack: u32,
    offset: u32,
    stored_len: u32,
}
const _: () = assert!(std::mem::size_of::<Entry>() == 28);

#[derive(Default)]
pub struct ChunkIndex {
    sorted: Vec<Entry>,
    recent: HashMap<Key, ChunkLoc, BuildHasherDefault<PrefixHasher>>,
}

impl ChunkIndex {
    pub fn get(&self, id: &ChunkId) -> Option<ChunkLoc> {
        let k = key(id);
        if let Some(loc) = self.recent.get(&k) {
            return Some(*loc);
        }
        self.sorted
            .binary_search_by(|e| e.key.cmp(&k))
            .ok()
            .map(|i| {
                let e = &self.sorted[i];
                ChunkLoc {
                    pack: e.pack,
                    offset: e.offset,
                    stored_len: e.stored_len,
                }
            })
    }

    pub fn contains_key(&self, id: &ChunkId) -> bool {
        self.get(id).is_some()
    }

    /// An index of `entries`, in pack order: where an id occurs twice, the
    /// first copy wins, as with [`ChunkIndex::insert_if_absent`].
    pub fn from_entries(entries: Vec<(ChunkId, ChunkLoc)>) -> Self {
        let mut sorted: Vec<Entry> = entries
            .into_iter()
            .map(|(id, l)| Entry {
                key: key(&id),
                pack: l.pack,
                offset: l.offset,
                stored_len: l.stored_len,
            })
            .collect();
        // Stable: equal keys keep their order, and dedup keeps the first.
        sorted.sort_by_key(|e| e.key);
        sorted.dedup_by_key(|e| e.key);
        sorted.shrink_to_fit();
        ChunkIndex {
            sorted,
            recent: HashMap::default(),
        }
    }

    /// Adds a chunk unless its id is already indexed (the first copy wins);
    /// returns whether it was added.
    pub fn insert_if_absent(&mut self, id: &ChunkId, loc: ChunkLoc) -> bool {
        if self.contains_key(id) {
            return false;
        }
        self.recent.insert(key(id), loc);
        if self.recent.len() > (self.sorted.len() / MERGE_DIVISOR).max(MERGE_MIN) {
            self.merge();
        }
        true
    }

    /// Moves or drops every entry that points into pack `from`: `moves`
    /// maps a record offset there and a chunk to where the chunk is now
    /// in pack `to` (offset and stored length), or to `None` to drop the
    /// entry. Returns how many entries still point into `from` (that
    /// `moves` does not name); garbage collection deletes a pack only when
    /// that is 0.
    pub fn relocate(&mut self, from: u32, to: u32, moves: &Moves) -> usize {
        let mut left = 0;
        let mut apply =
            |key: &Key, pack: &mut u32, offset: &mut u32, stored_len: &mut u32| -> bool {
                if *pack != from {
                    return true;
                }
                match moves.get(&(*offset, key.0)) {
                    Some(Some((new_offset, new_len))) => {
                        *pack = to;
                        *offset = *new_offset;
                        *stored_len = *new_len;
                        true
                    }
                    Some(None) => false,
                    None => {
                        left += 1;
                        true
                    }
                }
            };
        self.sorted
            .retain_mut(|e| apply(&e.key, &mut e.pack, &mut e.offset, &mut e.stored_len));
        self.recent
            .retain(|k, l| apply(k, &mut l.pack, &mut l.offset, &mut l.stored_len));
        left
    }

    /// Drops every entry pointing into pack `pack` at `offset` or later.
    pub fn drop_from(&mut self, pack: u32, offset: u32) {
        let gone = |p: u32, o: u32| p == pack && o >= offset;
        self.sorted.retain(|e| !gone(e.pack, e.offset));
        self.recent.retain(|_, l| !gone(l.pack, l.offset));
    }

    pub fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }

    /// Heap bytes held, for the bytes-per-chunk figure.
    pub fn heap_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(Key, ChunkLoc)>() + 1;
        self.sorted.capacity() * std::mem::size_of::<Entry>() + self.recent.capacity() * slot
    }

    fn merge(&mut self) {
        let mut fresh: Vec<Entry> = self
            .recent
            .drain()
            .map(|(key, l)| Entry {
                key,
                pack: l.pack,
                offset: l.offset,
                stored_len: l.stored_len,
            })
            .collect();
        fresh.sort_unstable_by_key(|e| e.key);
        let old = std::mem::take(&mut self.sorted);
        let mut merged = Vec::with_capacity(old.len() + fresh.len());
        let (mut a, mut b) = (old.into_iter().peekable(), fresh.into_iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.key <= y.key => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            merged.extend(next);
        }
        self.sorted = merged;
        // Recent inserts stay few; give back what a big merge left behind.
        self.recent.shrink_to(MERGE_MIN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(i: u32) -> ChunkLoc {
        ChunkLoc {
            pack: i,
            offset: i * 2,
            stored_len: i * 3,
        }
    }

    #[test]
    fn finds_what_it_holds_across_merges() {
        let mut idx = ChunkIndex::default();
        let ids: Vec<ChunkId> = (0..20_000u32)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        for (i, id) in ids.iter().enumerate() {
            idx.insert_if_absent(id, loc(i as u32));
        }
        assert_eq!(idx.len(), ids.len());
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(idx.get(id), Some(loc(i as u32)));
        }
        assert!(idx.get(&ChunkId::of(b"absent")).is_none());
        // The first copy wins.
        idx.insert_if_absent(&ids[5], loc(999));
        assert_eq!(idx.get(&ids[5]), Some(loc(5)));
    }

    #[test]
    fn relocation_moves_and_drops_one_packs_entries() {
        let ids: Vec<ChunkId> = (0..600u32).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
        let mut idx = ChunkIndex::default();
        for (i, id) in ids.iter().enumerate() {
            let pack = (i % 3) as u32;
            idx.insert_if_absent(
                id,
                ChunkLoc {
                    pack,
                    offset: i as u32,
                    stored_len: 9,
                },
            );
        }
        // Pack 1: even offsets move to pack 7 (re-encoded: a new stored
        // length), odd ones are dropped.
        let moves: Moves = (0..600u32)
            .filter(|i| i % 3 == 1)
            .map(|i| {
                let key = move_key(u64::from(i), &ids[i as usize]);
                (key, (i % 2 == 0).then_some((i + 1000, 5)))
            })
            .collect();
        assert_eq!(idx.relocate(1, 7, &moves), 0);
        for (i, id) in ids.iter().enumerate() {
            let i = i as u32;
            let want = match (i % 3, i % 2) {
                (1, 0) => Some(ChunkLoc {
                    pack: 7,
                    offset: i + 1000,
                    stored_len: 5,
                }),
                (1, _) => None,
                (p, _) => Some(ChunkLoc {
                    pack: p,
                    offset: i,
                    stored_len: 9,
                }),
            };
            assert_eq!(idx.get(id), want, "{i}");
        }
        // An entry the moves do not name keeps its place, and is counted,
        // even when another chunk at its offset is named.
        let other = move_key(2, &ChunkId::of(b"another member"));
        let moves: Moves = std::iter::once((other, None)).collect();
        assert_eq!(idx.relocate(2, 8, &moves), 200);
        assert!(idx.get(&ids[2]).is_some());
    }

    #[test]
    fn bulk_loading_keeps_the_first_copy_and_finds_everything() {
        let ids: Vec<ChunkId> = (0..5_000u32)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        let mut entries: Vec<(ChunkId, ChunkLoc)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, loc(i as u32)))
            .collect();
        entries.push((ids[7], loc(77_777)));
        let mut idx = ChunkIndex::from_entries(entries);
        assert_eq!(idx.len(), ids.len());
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(idx.get(id), Some(loc(i as u32)));
        }
        idx.insert_if_absent(&ChunkId::of(b"new"), loc(1));
        assert_eq!(idx.get(&ChunkId::of(b"new")), Some(loc(1)));
    }

    #[test]
    fn bytes_per_chunk_is_at_most_32() {
        // Checked at every size from 10,000 chunks on (below that the whole
        // index is a few hundred KiB at most).
        let mut idx = ChunkIndex::default();
        for i in 0..300_000u32 {
            idx.insert_if_absent(&ChunkId::of(&i.to_le_bytes()), loc(i));
            let n = i as usize + 1;
            if n >= 10_000 && n.is_multiple_of(997) {
                let per_chunk = idx.heap_bytes() as f64 / n as f64;
                assert!(per_chunk <= 32.0, "{per_chunk:.1} bytes per chunk at {n}");
            }
        }
    }
}
