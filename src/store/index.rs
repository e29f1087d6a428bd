//! The chunk index: chunk id -> record location.
//!
//! Three layers, looked up in this order:
//! - `patch`: what garbage collection changed in the base since it was
//!   written (a chunk's new place, or its removal);
//! - the overlay: chunks of the packs the base does not cover (sealed
//!   since it was written, or the open one), in a sorted array plus a
//!   small hash map of recent inserts merged into the array once it holds
//!   more than 1/32 of it (or 256): 28 + 2 bytes per chunk;
//! - `base`: the table on disk ([`super::table`]), memory-mapped, which
//!   covers a set of sealed packs and costs no heap at all.
//!
//! The store writes a new base (merging all three) when the overlay grows
//! past a share of the base, after a garbage collection, and when the
//! table was missing or stale at open.
//!
//! Each entry keeps the first 16 bytes of the id (the full 32 are in the
//! record header, checked on every read). Two different chunks sharing a
//! 128-bit id prefix (a 2^-64 event at four billion chunks) cannot corrupt
//! a disk: the dedup look-up would call the second chunk stored, and
//! restoring it would fail the record header's full-id check, or BLAKE3,
//! with a corruption error.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use super::pack::IndexEntry;
use super::table::{self, Damaged, Table};
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
pub struct Key([u8; 16]);

impl Hash for Key {
    /// BLAKE3 output is uniform: its first 8 bytes are the hash.
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(b));
    }
}

/// An overlay entry for `id` at `loc`.
pub fn entry_of(id: &ChunkId, loc: ChunkLoc) -> Entry {
    Entry::new(key(id), loc)
}

/// The first 16 bytes of a chunk id: what the index keys on.
pub fn key_bytes(id: &ChunkId) -> [u8; 16] {
    key(id).0
}

fn key(id: &ChunkId) -> Key {
    let mut k = [0u8; 16];
    k.copy_from_slice(&id.0[..16]);
    Key(k)
}

/// One sorted entry: 16 + 12 bytes, no padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Entry {
    key: Key,
    pack: u32,
    offset: u32,
    stored_len: u32,
}
const _: () = assert!(std::mem::size_of::<Entry>() == 28);

type Map<V> = HashMap<Key, V, BuildHasherDefault<PrefixHasher>>;

#[derive(Default)]
pub struct ChunkIndex {
    base: Option<Arc<Table>>,
    patch: Map<Option<ChunkLoc>>,
    /// Shared with a [`PersistView`] while a new base is written from it,
    /// so that writing one copies nothing (a change meanwhile, rare,
    /// copies it then).
    sorted: Arc<Vec<Entry>>,
    recent: Map<ChunkLoc>,
}

/// What a new base is written from ([`ChunkIndex::persist_view`]).
pub struct PersistView {
    base: Option<Arc<Table>>,
    patch: Map<Option<ChunkLoc>>,
    /// The overlay's entries, sorted (the index's own array, shared).
    overlay: Arc<Vec<Entry>>,
}

impl PersistView {
    /// The generation the new base will be.
    pub fn next_generation(&self) -> u64 {
        self.base.as_ref().map_or(1, |b| b.generation() + 1)
    }

    /// Every entry of the index whose pack is in `covered`, in key order
    /// (what the new base holds). The base's (or patch's) entries of other
    /// packs go to `kept`, for the overlay; the overlay's own stay there.
    pub fn entries<'a>(
        &'a self,
        covered: &'a HashSet<u32>,
        kept: &'a mut Vec<Entry>,
    ) -> impl Iterator<Item = std::result::Result<table::Entry, Damaged>> + 'a {
        let base = self
            .base
            .iter()
            .flat_map(|b| b.iter())
            .filter_map(move |e| match e {
                Err(d) => Some(Err(d)),
                Ok(e) => {
                    let key = Key(e.key);
                    match self.patch.get(&key) {
                        Some(None) => None,
                        Some(Some(l)) => Some(Ok(Entry::new(key, *l))),
                        None => Some(Ok(Entry::new(key, e.loc))),
                    }
                }
            });
        let overlay = self.overlay.iter().map(|e| Ok(*e));
        MergeByKey {
            a: base.peekable(),
            b: overlay.peekable(),
        }
        .filter_map(move |e| match e {
            Err(d) => Some(Err(d)),
            Ok((e, _)) if covered.contains(&e.pack) => Some(Ok(table::Entry {
                key: e.key.0,
                loc: e.loc(),
            })),
            Ok((e, from_overlay)) => {
                if !from_overlay {
                    kept.push(e);
                }
                None
            }
        })
    }
}

/// Two ascending streams of entries, each of distinct keys, merged; where
/// both hold a key, `b`'s entry (the overlay's: newer) alone. Each entry
/// comes with whether it is `b`'s.
struct MergeByKey<A: Iterator, B: Iterator> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

type Item = std::result::Result<Entry, Damaged>;

impl<A: Iterator<Item = Item>, B: Iterator<Item = Item>> Iterator for MergeByKey<A, B> {
    type Item = std::result::Result<(Entry, bool), Damaged>;
    fn next(&mut self) -> Option<Self::Item> {
        let take_a = match (self.a.peek(), self.b.peek()) {
            (Some(Err(_)), _) => true,
            (_, Some(Err(_))) => false,
            (Some(Ok(x)), Some(Ok(y))) if x.key == y.key => {
                // Shadowed by the overlay.
                self.a.next();
                false
            }
            (Some(Ok(x)), Some(Ok(y))) => x.key < y.key,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if take_a {
            self.a.next().map(|e| e.map(|e| (e, false)))
        } else {
            self.b.next().map(|e| e.map(|e| (e, true)))
        }
    }
}

impl Entry {
    fn new(key: Key, l: ChunkLoc) -> Entry {
        Entry {
            key,
            pack: l.pack,
            offset: l.offset,
            stored_len: l.stored_len,
        }
    }

    fn loc(&self) -> ChunkLoc {
        ChunkLoc {
            pack: self.pack,
            offset: self.offset,
            stored_len: self.stored_len,
        }
    }
}

impl ChunkIndex {
    /// An index of the table `base` and nothing else yet.
    pub fn with_base(base: Arc<Table>) -> Self {
        ChunkIndex {
            base: Some(base),
            ..ChunkIndex::default()
        }
    }

    pub fn base(&self) -> Option<&Arc<Table>> {
        self.base.as_ref()
    }

    fn overlay_get(&self, k: &Key) -> Option<ChunkLoc> {
        if let Some(loc) = self.recent.get(k) {
            return Some(*loc);
        }
        let sorted = &self.sorted;
        crate::table::search(sorted.len(), &k.0, |i| &sorted[i].key.0)
            .ok()
            .map(|i| sorted[i].loc())
    }

    /// Where the chunk is, if indexed; an error when the base's page that
    /// would hold it is damaged.
    pub fn get(&self, id: &ChunkId) -> std::result::Result<Option<ChunkLoc>, Damaged> {
        // The overlay first (a chunk stored again while the base could
        // not be read shadows it), then the base as the patch leaves it.
        let k = key(id);
        if let Some(l) = self.overlay_get(&k) {
            return Ok(Some(l));
        }
        match (self.patch.get(&k), &self.base) {
            (Some(l), _) => Ok(*l),
            (None, Some(b)) => b.get(&k.0).map(|e| e.map(|e| e.loc)),
            (None, None) => Ok(None),
        }
    }

    /// True when the chunk is indexed; a damaged base page answers no (the
    /// chunk is then stored again, which is safe).
    pub fn contains_key(&self, id: &ChunkId) -> bool {
        self.get(id).ok().flatten().is_some()
    }

    /// An index of `entries` (no base), in pack order: where an id occurs
    /// twice, the first copy wins, as with [`ChunkIndex::insert_if_absent`].
    pub fn from_entries(entries: Vec<(ChunkId, ChunkLoc)>) -> Self {
        let mut sorted: Vec<Entry> = entries
            .into_iter()
            .map(|(id, l)| Entry::new(key(&id), l))
            .collect();
        // Stable: equal keys keep their order, and dedup keeps the first.
        sorted.sort_by_key(|e| e.key);
        sorted.dedup_by_key(|e| e.key);
        sorted.shrink_to_fit();
        ChunkIndex {
            sorted: Arc::new(sorted),
            ..ChunkIndex::default()
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
    /// entry. `records` are the pack's records (where the base's entries
    /// for it can be). Returns how many entries still point into `from`
    /// (that `moves` does not name); garbage collection deletes a pack
    /// only when that is 0.
    pub fn relocate(
        &mut self,
        from: u32,
        to: u32,
        moves: &Moves,
        records: &[IndexEntry],
    ) -> std::result::Result<usize, Damaged> {
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
        Arc::make_mut(&mut self.sorted)
            .retain_mut(|e| apply(&e.key, &mut e.pack, &mut e.offset, &mut e.stored_len));
        self.recent
            .retain(|k, l| apply(k, &mut l.pack, &mut l.offset, &mut l.stored_len));
        let Some(base) = &self.base else {
            return Ok(left);
        };
        // The base's entries (or their patched places) in pack `from`.
        let mut seen = HashSet::new();
        for r in records {
            let k = key(&r.id);
            // A base entry shadowed by the overlay is patched too: left
            // as it is, it would point into a deleted pack once the
            // overlay's copy goes.
            if !seen.insert(k) {
                continue;
            }
            let now = match self.patch.get(&k) {
                Some(l) => *l,
                None => base.get(&k.0)?.map(|e| e.loc),
            };
            let Some(now) = now.filter(|l| l.pack == from) else {
                continue;
            };
            match moves.get(&(now.offset, k.0)) {
                Some(Some((offset, stored_len))) => {
                    let loc = ChunkLoc {
                        pack: to,
                        offset: *offset,
                        stored_len: *stored_len,
                    };
                    self.patch.insert(k, Some(loc));
                }
                Some(None) => {
                    self.patch.insert(k, None);
                }
                None => left += 1,
            }
        }
        Ok(left)
    }

    /// Drops every entry pointing into pack `pack` at `offset` or later
    /// (the open pack's, which the base never covers).
    pub fn drop_from(&mut self, pack: u32, offset: u32) {
        let gone = |p: u32, o: u32| p == pack && o >= offset;
        Arc::make_mut(&mut self.sorted).retain(|e| !gone(e.pack, e.offset));
        self.recent.retain(|_, l| !gone(l.pack, l.offset));
    }

    pub fn len(&self) -> usize {
        let removed = self.patch.values().filter(|l| l.is_none()).count();
        let base = self.base.as_ref().map_or(0, |b| b.len() as usize);
        (base + self.sorted.len() + self.recent.len()).saturating_sub(removed)
    }

    /// Entries outside the base: what a new base would take in.
    pub fn overlay_len(&self) -> usize {
        self.sorted.len() + self.recent.len() + self.patch.len()
    }

    /// Heap bytes held, for the bytes-per-chunk figure (the base is
    /// mapped, not on the heap).
    pub fn heap_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(Key, ChunkLoc)>() + 1;
        let patch_slot = std::mem::size_of::<(Key, Option<ChunkLoc>)>() + 1;
        self.sorted.capacity() * std::mem::size_of::<Entry>()
            + self.recent.capacity() * slot
            + self.patch.capacity() * patch_slot
    }

    /// What a new base is written from: the overlay (recent inserts
    /// merged into the sorted array first, which the view then shares),
    /// a copy of the patch (garbage collection's, small), and the base.
    pub fn persist_view(&mut self) -> PersistView {
        self.merge();
        PersistView {
            base: self.base.clone(),
            patch: self.patch.clone(),
            overlay: Arc::clone(&self.sorted),
        }
    }

    /// Makes `base`, which holds every entry of the packs in `covered`,
    /// the base: the patch is spent, and the overlay keeps only the other
    /// packs' entries (and `kept`, entries the new base left out).
    /// Call with no garbage collection running since the view was taken.
    pub fn install(&mut self, base: Arc<Table>, covered: &HashSet<u32>, kept: Vec<Entry>) {
        self.patch = Map::default();
        self.merge();
        Arc::make_mut(&mut self.sorted).retain(|e| !covered.contains(&e.pack));
        for e in kept {
            if self.overlay_get(&e.key).is_none() {
                self.recent.insert(e.key, e.loc());
            }
        }
        self.merge();
        Arc::make_mut(&mut self.sorted).shrink_to_fit();
        self.base = Some(base);
    }

    /// Moves the recent inserts into the sorted array, merging in place
    /// from the back: the array grows by what it takes in and is never
    /// held twice (a big array's growth is a remap, not a copy).
    fn merge(&mut self) {
        if self.recent.is_empty() {
            return;
        }
        let mut fresh: Vec<Entry> = self
            .recent
            .drain()
            .map(|(key, l)| Entry::new(key, l))
            .collect();
        fresh.sort_unstable_by_key(|e| e.key);
        let sorted = Arc::make_mut(&mut self.sorted);
        let old = sorted.len();
        sorted.reserve_exact(fresh.len());
        // Room at the end (filled with copies, each overwritten below).
        sorted.extend_from_slice(&fresh);
        let (mut i, mut j) = (old, fresh.len());
        while j > 0 {
            let k = i + j - 1;
            if i > 0 && sorted[i - 1].key > fresh[j - 1].key {
                sorted[k] = sorted[i - 1];
                i -= 1;
            } else {
                sorted[k] = fresh[j - 1];
                j -= 1;
            }
        }
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

    /// An index whose base is a table of `entries` (ids and places),
    /// written in `dir`.
    fn with_table(dir: &std::path::Path, entries: &[(ChunkId, ChunkLoc)]) -> ChunkIndex {
        let mut rows: Vec<table::Entry> = entries
            .iter()
            .map(|(id, loc)| table::Entry {
                key: key_bytes(id),
                loc: *loc,
            })
            .collect();
        rows.sort_by_key(|e| e.key);
        let fs = crate::fsio::StdFs;
        table::write(&fs, dir, rows.into_iter().map(Ok), &[], 1).unwrap();
        let t = Table::open(&fs, &dir.join(table::FILE_NAME))
            .unwrap()
            .unwrap();
        ChunkIndex::with_base(Arc::new(t))
    }

    /// Writes a new base from the index's view (covering `covered`) and
    /// installs it, as the store does.
    fn persist(idx: &mut ChunkIndex, view: &PersistView, dir: &std::path::Path, covered: &[u32]) {
        let set: HashSet<u32> = covered.iter().copied().collect();
        let mut kept = Vec::new();
        let fs = crate::fsio::StdFs;
        let rows: Vec<_> = view
            .entries(&set, &mut kept)
            .map(|e| e.map_err(|d| crate::error::Error::Internal(d.0)))
            .collect();
        table::write(&fs, dir, rows.into_iter(), &[], view.next_generation()).unwrap();
        let t = Table::open(&fs, &dir.join(table::FILE_NAME))
            .unwrap()
            .unwrap();
        idx.install(Arc::new(t), &set, kept);
    }

    /// Records of the open pack dropped (a failed fsync) while a new base
    /// was being written do not come back when it is installed.
    #[test]
    fn entries_dropped_while_a_base_is_written_stay_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let old = ChunkId::of(b"in the base");
        let mut idx = with_table(dir.path(), &[(old, loc(1))]);
        let open: Vec<ChunkId> = (0..50u32).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
        for (i, id) in open.iter().enumerate() {
            idx.insert_if_absent(
                id,
                ChunkLoc {
                    pack: 9,
                    offset: 100 + i as u32,
                    stored_len: 1,
                },
            );
        }
        let view = idx.persist_view();
        idx.drop_from(9, 100);
        persist(&mut idx, &view, dir.path(), &[1]);
        for id in &open {
            assert_eq!(idx.get(id).unwrap(), None, "a dropped entry came back");
        }
        assert_eq!(idx.get(&old).unwrap(), Some(loc(1)));
    }

    /// A chunk in the base and stored again in the overlay (the base could
    /// not be read when it was looked up): when a collection drops both
    /// copies' packs, neither entry survives to point into them.
    #[test]
    fn a_base_entry_shadowed_by_the_overlay_is_relocated_too() {
        let dir = tempfile::tempdir().unwrap();
        let k = ChunkId::of(b"stored twice");
        let at_p = ChunkLoc {
            pack: 1,
            offset: 16,
            stored_len: 5,
        };
        let at_o = ChunkLoc {
            pack: 2,
            offset: 16,
            stored_len: 5,
        };
        let mut idx = with_table(dir.path(), &[(k, at_p)]);
        idx.recent.insert(key(&k), at_o);
        let rec = |offset| IndexEntry {
            id: k,
            offset,
            stored_len: 5,
            raw_len: 5,
        };
        let drop_k: Moves = std::iter::once((move_key(16, &k), None)).collect();
        assert_eq!(idx.relocate(1, 1, &drop_k, &[rec(16)]).unwrap(), 0);
        assert_eq!(idx.get(&k).unwrap(), Some(at_o));
        assert_eq!(idx.relocate(2, 2, &drop_k, &[rec(16)]).unwrap(), 0);
        assert_eq!(idx.get(&k).unwrap(), None);
        let view = idx.persist_view();
        persist(&mut idx, &view, dir.path(), &[]);
        assert_eq!(
            idx.get(&k).unwrap(),
            None,
            "an entry into a dropped pack survived"
        );
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
        // Merged in place, the array stays strictly ascending.
        let _view = idx.persist_view();
        assert!(idx.recent.is_empty());
        assert!(idx.sorted.windows(2).all(|w| w[0].key < w[1].key));
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(idx.get(id).unwrap(), Some(loc(i as u32)));
        }
        assert!(idx.get(&ChunkId::of(b"absent")).unwrap().is_none());
        // The first copy wins.
        idx.insert_if_absent(&ids[5], loc(999));
        assert_eq!(idx.get(&ids[5]).unwrap(), Some(loc(5)));
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
        assert_eq!(idx.relocate(1, 7, &moves, &[]).unwrap(), 0);
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
            assert_eq!(idx.get(id).unwrap(), want, "{i}");
        }
        // An entry the moves do not name keeps its place, and is counted,
        // even when another chunk at its offset is named.
        let other = move_key(2, &ChunkId::of(b"another member"));
        let moves: Moves = std::iter::once((other, None)).collect();
        assert_eq!(idx.relocate(2, 8, &moves, &[]).unwrap(), 200);
        assert!(idx.get(&ids[2]).unwrap().is_some());
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
            assert_eq!(idx.get(id).unwrap(), Some(loc(i as u32)));
        }
        idx.insert_if_absent(&ChunkId::of(b"new"), loc(1));
        assert_eq!(idx.get(&ChunkId::of(b"new")).unwrap(), Some(loc(1)));
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
