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
//! The counts live on disk as a sorted table (`manifests/refs.tbl`, see
//! `crate::table`), memory-mapped, which covers a set of snapshots and
//! carries their exclusive bytes; what changed since is an overlay in
//! memory. A process that opens the store replays the snapshots completed
//! since the table was written, and those deleted since, from their
//! manifests: a deleted snapshot's manifest is kept while the table still
//! counts it. When the overlay has grown to an eighth of the table (or
//! more), a new table merging both is written (`Refs::write`), after which
//! those kept manifests go. Each snapshot's exclusive bytes are also
//! committed in the catalog with every change, so listing snapshots reads
//! neither this table nor any manifest.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasherDefault;
use std::path::Path;
use std::sync::Arc;

use crate::blockmap::BlockMap;
use crate::error::Result;
use crate::fsio::StoreFs;
use crate::ids::{ChunkId, SnapshotId};
use crate::le::{u32_at, u64_at};
use crate::store::PrefixHasher;
use crate::table::{Damaged, Format, Table};

/// The table's file name in the manifest directory.
pub const FILE_NAME: &str = "refs.tbl";

/// The first 16 bytes of a chunk id, as the chunk index keys it. Two chunks
/// sharing them (a 2^-64 event at four billion chunks) would both count as
/// needed, which only ever keeps a chunk, never loses one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key(u64, u64);

fn key(id: &ChunkId) -> Key {
    let mut k = [0u8; 16];
    k.copy_from_slice(&id.0[..16]);
    key_of(&k)
}

fn key_of(b: &[u8; 16]) -> Key {
    Key(u64_at(b, 0), u64_at(b, 8))
}

impl Key {
    fn bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.0.to_le_bytes());
        b[8..].copy_from_slice(&self.1.to_le_bytes());
        b
    }
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ref {
    count: u32,
    /// Stored bytes of the chunk (record header and payload), fixed when
    /// first referenced so that additions and removals balance.
    size: u32,
    owners_xor: u64,
}

/// One entry of the table: a chunk's key and its counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    key: [u8; 16],
    r: Ref,
}

/// The table's bytes: entries of key, count, size and owners' XOR (32
/// bytes, 127 to a page); items of the snapshots counted and their
/// exclusive bytes.
pub struct RefsFormat;

impl Format for RefsFormat {
    const WHAT: &'static str = "reference counts";
    const MAGIC: [u8; 8] = *b"BSNPREFS";
    const VERSION: u32 = 1;
    const ENTRY_LEN: usize = 32;
    const ITEM_LEN: usize = 16;
    type Entry = Entry;
    type Item = (SnapshotId, u64);

    fn key(e: &Entry) -> [u8; 16] {
        e.key
    }

    fn encode(e: &Entry, out: &mut [u8]) {
        out[..16].copy_from_slice(&e.key);
        out[16..20].copy_from_slice(&e.r.count.to_le_bytes());
        out[20..24].copy_from_slice(&e.r.size.to_le_bytes());
        out[24..32].copy_from_slice(&e.r.owners_xor.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Entry {
        let mut key = [0u8; 16];
        key.copy_from_slice(&b[..16]);
        Entry {
            key,
            r: Ref {
                count: u32_at(b, 16),
                size: u32_at(b, 20),
                owners_xor: u64_at(b, 24),
            },
        }
    }

    fn encode_item(i: &(SnapshotId, u64), out: &mut Vec<u8>) {
        out.extend_from_slice(&i.0.0.to_le_bytes());
        out.extend_from_slice(&i.1.to_le_bytes());
    }

    fn decode_item(b: &[u8]) -> (SnapshotId, u64) {
        (SnapshotId(u64_at(b, 0)), u64_at(b, 8))
    }
}

pub type RefsTable = Table<RefsFormat>;

/// Keys sort in the table as their bytes do; the overlay keeps them as
/// numbers, so the bytes are what a merge compares.
const _: () = assert!(RefsFormat::PER_PAGE == 127);

/// Reference counts and exclusive bytes.
#[derive(Default)]
pub(crate) struct Refs {
    base: Option<Arc<RefsTable>>,
    /// Counts changed since the table was written (a count of 0: gone).
    overlay: HashMap<Key, Ref, BuildHasherDefault<PrefixHasher>>,
    /// Exclusive bytes of every snapshot counted.
    exclusive: BTreeMap<SnapshotId, u64>,
    /// Snapshots whose exclusive bytes changed since the last
    /// [`Refs::take_touched`].
    touched: BTreeSet<SnapshotId>,
}

impl Refs {
    /// The counts a table holds, for the snapshots it covers.
    pub fn from_table(base: Arc<RefsTable>) -> Self {
        Refs {
            exclusive: base.items().iter().copied().collect(),
            base: Some(base),
            ..Refs::default()
        }
    }

    /// The snapshots counted.
    pub fn counted(&self) -> impl Iterator<Item = SnapshotId> + '_ {
        self.exclusive.keys().copied()
    }

    /// The table under the overlay, if any.
    pub fn base(&self) -> Option<&Arc<RefsTable>> {
        self.base.as_ref()
    }

    fn current(&self, k: Key) -> std::result::Result<Option<Ref>, Damaged> {
        match self.overlay.get(&k) {
            Some(r) => Ok(Some(*r).filter(|r| r.count > 0)),
            None => match &self.base {
                Some(b) => Ok(b.get(&k.bytes())?.map(|e| e.r)),
                None => Ok(None),
            },
        }
    }

    fn credit(&mut self, snap: SnapshotId, bytes: u64, up: bool) {
        if let Some(e) = self.exclusive.get_mut(&snap) {
            *e = if up {
                e.saturating_add(bytes)
            } else {
                e.saturating_sub(bytes)
            };
            self.touched.insert(snap);
        }
    }

    /// A completed snapshot referencing `ids` (each once); `size` gives a
    /// chunk's stored bytes. On an error (a damaged table) the counts are
    /// half changed: drop them.
    pub fn add(
        &mut self,
        snap: SnapshotId,
        ids: &[ChunkId],
        size: impl Fn(&ChunkId) -> u32,
    ) -> std::result::Result<(), Damaged> {
        self.exclusive.entry(snap).or_insert(0);
        self.touched.insert(snap);
        for id in ids {
            let k = key(id);
            let mut r = self.current(k)?.unwrap_or(Ref {
                count: 0,
                size: size(id),
                owners_xor: 0,
            });
            let bytes = u64::from(r.size);
            match r.count {
                0 => self.credit(snap, bytes, true),
                1 => self.credit(SnapshotId(r.owners_xor), bytes, false),
                _ => {}
            }
            r.count += 1;
            r.owners_xor ^= snap.0;
            self.overlay.insert(k, r);
        }
        Ok(())
    }

    /// The snapshot that referenced `ids` is deleted. On an error the
    /// counts are half changed: drop them.
    pub fn remove(
        &mut self,
        snap: SnapshotId,
        ids: &[ChunkId],
    ) -> std::result::Result<(), Damaged> {
        for id in ids {
            let k = key(id);
            let Some(mut r) = self.current(k)? else {
                continue;
            };
            r.count -= 1;
            r.owners_xor ^= snap.0;
            if r.count == 1 {
                self.credit(SnapshotId(r.owners_xor), u64::from(r.size), true);
            }
            self.overlay.insert(k, r);
        }
        self.exclusive.remove(&snap);
        self.touched.insert(snap);
        Ok(())
    }

    /// True when a completed snapshot references the chunk.
    pub fn is_needed(&self, id: &ChunkId) -> std::result::Result<bool, Damaged> {
        Ok(self.current(key(id))?.is_some())
    }

    /// Stored bytes only this snapshot references.
    pub fn exclusive(&self, snap: SnapshotId) -> Option<u64> {
        self.exclusive.get(&snap).copied()
    }

    /// Every counted snapshot's exclusive bytes.
    pub fn figures(&self) -> &BTreeMap<SnapshotId, u64> {
        &self.exclusive
    }

    /// The snapshots whose exclusive bytes changed since the last call,
    /// with their figure now (`None`: no longer counted).
    pub fn take_touched(&mut self) -> Vec<(SnapshotId, Option<u64>)> {
        std::mem::take(&mut self.touched)
            .into_iter()
            .map(|s| (s, self.exclusive(s)))
            .collect()
    }

    /// True when the overlay is worth merging into a new table: at least
    /// `min` entries and an eighth of the table, so that the table is
    /// rewritten O(log) times as it grows, and a process that opens the
    /// store replays at most that much.
    pub fn due(&self, min: usize) -> bool {
        let base = self.base.as_ref().map_or(0, |b| b.len());
        !self.overlay.is_empty() && self.overlay.len() as u64 >= (min as u64).max(base / 8)
    }

    /// A chunk's stored bytes changed (a collection compressed its group
    /// again): a sole owner's exclusive bytes follow. On an error the
    /// counts are half changed: drop them.
    pub fn resize(&mut self, id: &ChunkId, size: u32) -> std::result::Result<(), Damaged> {
        let k = key(id);
        let Some(mut r) = self.current(k)? else {
            return Ok(());
        };
        if r.size == size {
            return Ok(());
        }
        if r.count == 1 {
            let owner = SnapshotId(r.owners_xor);
            self.credit(owner, u64::from(r.size), false);
            self.credit(owner, u64::from(size), true);
        }
        r.size = size;
        self.overlay.insert(k, r);
        Ok(())
    }

    /// Every chunk counted, in key order: the table's entries with the
    /// overlay's applied.
    fn entries(&self) -> impl Iterator<Item = Result<Entry>> + '_ {
        let mut changed: Vec<([u8; 16], Ref)> =
            self.overlay.iter().map(|(k, r)| (k.bytes(), *r)).collect();
        changed.sort_unstable_by_key(|(k, _)| *k);
        Merge {
            base: self.base.as_ref().map(|b| b.iter().peekable()),
            changed: changed.into_iter().peekable(),
        }
    }

    /// Where these counts and `other`'s disagree on which snapshots
    /// reference a chunk (sizes aside), if they do: what `verify` compares
    /// against a count from every manifest.
    pub fn differ(&self, other: &Refs) -> Result<Option<String>> {
        let (mut a, mut b) = (self.entries(), other.entries());
        loop {
            match (a.next().transpose()?, b.next().transpose()?) {
                (None, None) => return Ok(None),
                (Some(x), Some(y))
                    if x.key == y.key
                        && (x.r.count, x.r.owners_xor) == (y.r.count, y.r.owners_xor) => {}
                (x, y) => {
                    let show = |e: Option<Entry>| {
                        e.map_or("nothing".to_string(), |e| {
                            format!("chunk {} in {} snapshots", hex(&e.key), e.r.count)
                        })
                    };
                    return Ok(Some(format!(
                        "the reference counts hold {} where the manifests give {}",
                        show(x),
                        show(y)
                    )));
                }
            }
        }
    }

    /// Writes the table and the overlay, merged, as a new table at `path`
    /// (durably, see [`crate::table::write`]), then counts from it alone.
    /// On an error nothing changes.
    pub fn write(&mut self, fs: &dyn StoreFs, path: &Path) -> Result<()> {
        let generation = self.base.as_ref().map_or(0, |b| b.generation()) + 1;
        let items: Vec<(SnapshotId, u64)> = self.exclusive.iter().map(|(s, e)| (*s, *e)).collect();
        crate::table::write::<RefsFormat>(fs, path, self.entries(), &items, generation)?;
        let table = RefsTable::open(fs, path)?.ok_or_else(|| {
            crate::error::Error::Internal("the reference counts just written are missing".into())
        })?;
        self.base = Some(Arc::new(table));
        self.overlay.clear();
        Ok(())
    }
}

fn hex(key: &[u8; 16]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// The table's entries with the overlay's applied, in key order, those
/// counted by no snapshot left out.
struct Merge<
    B: Iterator<Item = std::result::Result<Entry, Damaged>>,
    C: Iterator<Item = ([u8; 16], Ref)>,
> {
    base: Option<std::iter::Peekable<B>>,
    changed: std::iter::Peekable<C>,
}

impl<B, C> Iterator for Merge<B, C>
where
    B: Iterator<Item = std::result::Result<Entry, Damaged>>,
    C: Iterator<Item = ([u8; 16], Ref)>,
{
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Result<Entry>> {
        loop {
            let from_base = match self.base.as_mut().and_then(|b| b.peek()) {
                Some(Err(d)) => {
                    return Some(Err(crate::error::Error::Internal(format!(
                        "reference counts: {}",
                        d.0
                    ))));
                }
                Some(Ok(e)) => Some(e.key),
                None => None,
            };
            let from_overlay = self.changed.peek().map(|(k, _)| *k);
            let entry = match (from_base, from_overlay) {
                (None, None) => return None,
                (Some(b), Some(o)) if o <= b => {
                    if o == b {
                        self.base.as_mut().and_then(|b| b.next());
                    }
                    let (key, r) = self.changed.next()?;
                    Entry { key, r }
                }
                (Some(_), _) => match self.base.as_mut().and_then(|b| b.next()) {
                    Some(Ok(e)) => e,
                    _ => return None,
                },
                (None, Some(_)) => {
                    let (key, r) = self.changed.next()?;
                    Entry { key, r }
                }
            };
            if entry.r.count > 0 {
                return Some(Ok(entry));
            }
        }
    }
}

/// Each chunk id once, for [`Refs::add`] and [`Refs::remove`].
pub(crate) fn distinct(blocks: &BlockMap) -> Vec<ChunkId> {
    let mut ids: Vec<ChunkId> = blocks.data().map(|(_, id)| id).collect();
    ids.sort_unstable_by_key(|id| id.0);
    ids.dedup();
    ids
}

/// A number that changes with the set of snapshots counted: the catalog
/// keeps it beside the exclusive bytes it commits, so that figures for
/// another set (a capture whose completing commit never landed, a store
/// from before they were kept) are known stale.
pub(crate) fn digest(snapshots: impl Iterator<Item = SnapshotId>) -> u64 {
    let mut h = blake3::Hasher::new();
    for s in snapshots {
        h.update(&s.0.to_le_bytes());
    }
    u64_at(h.finalize().as_bytes(), 0)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;
    use crate::fsio::StdFs;

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
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(FILE_NAME);
            let mut refs = Refs::default();
            let mut live: BTreeMap<u64, BTreeSet<u8>> = BTreeMap::new();
            let mut next = 100u64;
            for (add, pick, chunks) in steps {
                // Now and then, the counts go to a table and come back.
                if pick == 5 {
                    refs.write(&StdFs, &path).unwrap();
                    let table = RefsTable::open(&StdFs, &path).unwrap().unwrap();
                    table.check().unwrap();
                    refs = Refs::from_table(Arc::new(table));
                }
                if add || live.is_empty() {
                    next += 1;
                    let ids: Vec<ChunkId> = chunks.iter().map(|&c| id(c)).collect();
                    refs.add(SnapshotId(next), &distinct(&ids.iter().copied().map(Some).collect::<Vec<_>>().into()), size).unwrap();
                    live.insert(next, chunks);
                } else {
                    let victim = *live.keys().nth(pick as usize % live.len()).unwrap();
                    let chunks = live.remove(&victim).unwrap();
                    let ids: Vec<ChunkId> = chunks.iter().map(|&c| id(c)).collect();
                    refs.remove(SnapshotId(victim), &ids).unwrap();
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
                    prop_assert_eq!(refs.is_needed(&id(c)).unwrap(), needed);
                }
            }
        }
    }
}
