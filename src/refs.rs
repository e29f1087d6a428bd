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

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasherDefault;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{IoContext, Result};
use crate::fsio::StoreFs;
use crate::ids::{ChunkId, SnapshotId};
use crate::le::{u32_at, u64_at};
use crate::sorted::SortedIds;
use crate::store::PrefixHasher;
use crate::table::{Damaged, Format, Table};

/// The base table's file name in the manifest directory, and the delta's.
pub const FILE_NAME: &str = "refs.tbl";
pub const DELTA_NAME: &str = "refs.delta.tbl";

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

/// Where a run of look-ups in key order is in each table.
#[derive(Default)]
struct Cursor {
    base: Option<u64>,
    delta: Option<u64>,
}

/// Where counts go straight into a table: see [`Refs::set_direct`].
#[derive(Clone)]
pub(crate) struct Direct {
    pub fs: Arc<dyn StoreFs>,
    pub dir: PathBuf,
    /// Snapshots of more distinct chunks than this.
    pub min: u64,
}

/// Reference counts and exclusive bytes.
#[derive(Default)]
pub(crate) struct Refs {
    tables: Tables,
    direct: Option<Direct>,
    /// Counts changed since the newest table was written (a count of 0:
    /// gone).
    overlay: HashMap<Key, Ref, BuildHasherDefault<PrefixHasher>>,
    /// Exclusive bytes of every snapshot counted.
    exclusive: BTreeMap<SnapshotId, u64>,
    /// Snapshots whose exclusive bytes changed since the last
    /// [`Refs::take_touched`].
    touched: BTreeSet<SnapshotId>,
}

impl Refs {
    /// The counts the tables hold, for the snapshots they cover.
    pub fn from_tables(tables: Tables) -> Self {
        Refs {
            exclusive: tables.covered().iter().copied().collect(),
            tables,
            ..Refs::default()
        }
    }

    /// From here on, a snapshot of more than `direct.min` distinct chunks
    /// is added or removed by writing a new table (with what the overlay
    /// holds) in `direct.dir`, straight from its sorted chunk list, not
    /// through the overlay: memory then does not grow with the snapshot
    /// (a dense 1 TiB disk has 16M chunks: over a GiB of overlay). The
    /// table then covers the snapshot. Should that write fail, the change
    /// goes through the overlay after all.
    pub fn set_direct(&mut self, direct: Option<Direct>) {
        self.direct = direct;
    }

    /// The snapshots counted.
    pub fn counted(&self) -> impl Iterator<Item = SnapshotId> + '_ {
        self.exclusive.keys().copied()
    }

    /// The tables under the overlay.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// The chunk's counts now, asked at random.
    fn current(&self, k: Key) -> std::result::Result<Option<Ref>, Damaged> {
        self.current_with(k, |t, key| t.get(key), |t, key| t.get(key))
    }

    /// The chunk's counts now; `cursor` is a run of keys asked in
    /// ascending order (see [`Table::get_in_order`]).
    fn current_in(&self, k: Key, cursor: &mut Cursor) -> std::result::Result<Option<Ref>, Damaged> {
        let (base, delta) = (&mut cursor.base, &mut cursor.delta);
        self.current_with(
            k,
            |t, key| t.get_in_order(key, delta),
            |t, key| t.get_in_order(key, base),
        )
    }

    /// The chunk's counts now: the overlay's, else the delta table's, else
    /// the base table's, each table read with its `get`.
    fn current_with(
        &self,
        k: Key,
        mut delta: impl FnMut(&RefsTable, &[u8; 16]) -> std::result::Result<Option<Entry>, Damaged>,
        mut base: impl FnMut(&RefsTable, &[u8; 16]) -> std::result::Result<Option<Entry>, Damaged>,
    ) -> std::result::Result<Option<Ref>, Damaged> {
        if let Some(r) = self.overlay.get(&k) {
            return Ok(Some(*r).filter(|r| r.count > 0));
        }
        if let Some(d) = &self.tables.delta
            && let Some(e) = delta(d, &k.bytes())?
        {
            return Ok(Some(e.r).filter(|r| r.count > 0));
        }
        match &self.tables.base {
            Some(b) => Ok(base(b, &k.bytes())?.map(|e| e.r)),
            None => Ok(None),
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

    /// A completed snapshot referencing `ids`; `size` gives a chunk's
    /// stored bytes. On an error (a damaged table, a scratch file of the
    /// ids that cannot be read) the counts are half changed: drop them.
    pub fn add(
        &mut self,
        snap: SnapshotId,
        ids: &SortedIds,
        size: impl Fn(&ChunkId) -> u32,
    ) -> std::result::Result<(), Damaged> {
        if self.written(snap, ids, Some(&size)) {
            return Ok(());
        }
        // At once, not by doublings: a doubling holds the old table and the
        // new, twice over, at a capture's end. (Not past what goes to a
        // table instead: here only when that write failed.)
        let hint = match &self.direct {
            Some(d) => ids.len_bound().min(d.min),
            None => ids.len_bound(),
        };
        self.overlay.reserve(hint as usize);
        self.exclusive.entry(snap).or_insert(0);
        self.touched.insert(snap);
        let mut cursor = Cursor::default();
        for id in ids.iter() {
            let id = id.map_err(unreadable)?;
            let k = key(&id);
            let mut r = self.current_in(k, &mut cursor)?.unwrap_or(Ref {
                count: 0,
                size: size(&id),
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
        ids: &SortedIds,
    ) -> std::result::Result<(), Damaged> {
        if self.written(snap, ids, None) {
            return Ok(());
        }
        let mut cursor = Cursor::default();
        for id in ids.iter() {
            let k = key(&id.map_err(unreadable)?);
            let Some(mut r) = self.current_in(k, &mut cursor)? else {
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

    /// Entries of the overlay.
    pub fn overlay_len(&self) -> usize {
        self.overlay.len()
    }

    /// True when the overlay is worth writing down: at least `min`
    /// entries and a 64th of the base table, so that a process that opens
    /// the store replays at most that much.
    pub fn due(&self, min: usize) -> bool {
        let base = self.tables.base.as_ref().map_or(0, |b| b.len());
        !self.overlay.is_empty() && self.overlay.len() as u64 >= (min as u64).max(base / 64)
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

    /// The overlay's entries in key order (a count of 0 kept: it hides
    /// the tables' entry).
    fn overlay_sorted(&self) -> impl Iterator<Item = Result<Entry>> + use<> {
        let mut changed: Vec<Entry> = self
            .overlay
            .iter()
            .map(|(k, r)| Entry {
                key: k.bytes(),
                r: *r,
            })
            .collect();
        changed.sort_unstable_by_key(|e| e.key);
        changed.into_iter().map(Ok)
    }

    /// The delta table's entries with the overlay's applied, counts of 0
    /// kept.
    fn changes(
        &self,
    ) -> Merge<impl Iterator<Item = Result<Entry>> + '_, impl Iterator<Item = Result<Entry>> + use<>>
    {
        Merge::new(
            table_entries(self.tables.delta.as_deref()),
            self.overlay_sorted(),
            true,
        )
    }

    /// Every chunk counted, in key order.
    fn entries(&self) -> impl Iterator<Item = Result<Entry>> + '_ {
        Merge::new(
            table_entries(self.tables.base.as_deref()),
            self.changes(),
            false,
        )
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

    /// Adds (with `size`) or removes (without) the snapshot's chunks by
    /// writing a new table, when [`Refs::set_direct`] says so. True when
    /// done; false when not asked for or the write failed (nothing
    /// changed then).
    fn written(
        &mut self,
        snap: SnapshotId,
        ids: &SortedIds,
        size: Option<&dyn Fn(&ChunkId) -> u32>,
    ) -> bool {
        let Some(direct) = self.direct.clone().filter(|d| ids.len_bound() > d.min) else {
            return false;
        };
        // Exclusive bytes moved, by snapshot: (credited, debited).
        let credits: RefCell<BTreeMap<SnapshotId, (u64, u64)>> = RefCell::default();
        let add = size.is_some();
        let written = {
            let this = &*self;
            let mut cursor = Cursor::default();
            let mut last: Option<[u8; 16]> = None;
            let changed = ids.iter().filter_map(|id| {
                let id = match id {
                    Ok(id) => id,
                    Err(e) => return Some(Err(e)),
                };
                let k = key(&id);
                // Two ids sharing a key (see `Key`) count once.
                if last.replace(k.bytes()) == Some(k.bytes()) {
                    return None;
                }
                let current = match this.current_in(k, &mut cursor) {
                    Ok(c) => c,
                    Err(d) => return Some(Err(damaged(d))),
                };
                let mut credits = credits.borrow_mut();
                let mut credit = |s: SnapshotId, bytes: u32, up: bool| {
                    let e = credits.entry(s).or_default();
                    if up {
                        e.0 += u64::from(bytes);
                    } else {
                        e.1 += u64::from(bytes);
                    }
                };
                let r = match (size, current) {
                    (Some(size), current) => {
                        let mut r = current.unwrap_or(Ref {
                            count: 0,
                            size: size(&id),
                            owners_xor: 0,
                        });
                        match r.count {
                            0 => credit(snap, r.size, true),
                            1 => credit(SnapshotId(r.owners_xor), r.size, false),
                            _ => {}
                        }
                        r.count += 1;
                        r.owners_xor ^= snap.0;
                        r
                    }
                    (None, None) => return None,
                    (None, Some(mut r)) => {
                        r.count -= 1;
                        r.owners_xor ^= snap.0;
                        if r.count == 1 {
                            credit(SnapshotId(r.owners_xor), r.size, true);
                        }
                        r
                    }
                };
                Some(Ok(Entry { key: k.bytes(), r }))
            });
            let items = || {
                let mut exclusive = this.exclusive.clone();
                if add {
                    exclusive.entry(snap).or_insert(0);
                }
                for (s, (up, down)) in credits.borrow().iter() {
                    if let Some(e) = exclusive.get_mut(s) {
                        *e = e.saturating_add(*up).saturating_sub(*down);
                    }
                }
                if !add {
                    exclusive.remove(&snap);
                }
                exclusive.into_iter().collect()
            };
            this.write_merged(
                direct.fs.as_ref(),
                &direct.dir,
                changed,
                ids.len_bound(),
                items,
            )
        };
        let Ok(tables) = written else {
            return false;
        };
        if add {
            self.exclusive.entry(snap).or_insert(0);
        }
        for (s, (up, down)) in credits.into_inner() {
            self.credit(s, up, true);
            self.credit(s, down, false);
        }
        if !add {
            self.exclusive.remove(&snap);
        }
        self.touched.insert(snap);
        self.tables = tables;
        self.overlay.clear();
        true
    }

    /// Writes the overlay down in `dir`, durably (see
    /// [`crate::table::write`]): merged with the delta table into a new
    /// delta while the changes are under an eighth of the base table,
    /// else everything merged into a new base table (and the delta gone).
    /// Then counts from the tables alone. On an error nothing changes.
    pub fn write(&mut self, fs: &dyn StoreFs, dir: &Path) -> Result<()> {
        let items: Vec<(SnapshotId, u64)> = self.exclusive.iter().map(|(s, e)| (*s, *e)).collect();
        self.tables = self.write_merged(fs, dir, std::iter::empty(), 0, || items)?;
        self.overlay.clear();
        Ok(())
    }

    /// Writes the tables [`Refs::write`] does, with `more` (about
    /// `more_len` changes, in key order, newer than the overlay) merged in
    /// and `items` (made once the entries are written) as the snapshots
    /// covered, and gives them back.
    fn write_merged(
        &self,
        fs: &dyn StoreFs,
        dir: &Path,
        more: impl Iterator<Item = Result<Entry>>,
        more_len: u64,
        items: impl FnOnce() -> Vec<(SnapshotId, u64)>,
    ) -> Result<Tables> {
        let base_len = self.tables.base.as_ref().map_or(0, |b| b.len());
        let delta_len = self.tables.delta.as_ref().map_or(0, |d| d.len());
        let memory = self.tables.memory;
        let open = |path: &Path| -> Result<Arc<RefsTable>> {
            let t = RefsTable::open(fs, path)?.ok_or_else(|| {
                crate::error::Error::Internal(
                    "the reference counts just written are missing".into(),
                )
            })?;
            if let Some(bytes) = memory {
                t.set_budget(bytes);
            }
            Ok(Arc::new(t))
        };
        let changes = Merge::new(self.changes(), more, true);
        let changed = delta_len + self.overlay.len() as u64 + more_len;
        match &self.tables.base {
            Some(base) if changed < base_len / 8 => {
                let path = dir.join(DELTA_NAME);
                let generation = base.generation();
                crate::table::write_with::<RefsFormat>(fs, &path, changes, items, generation)?;
                Ok(Tables {
                    base: Some(base.clone()),
                    delta: Some(open(&path)?),
                    memory,
                })
            }
            _ => {
                let path = dir.join(FILE_NAME);
                let generation = self.tables.base.as_ref().map_or(0, |b| b.generation()) + 1;
                // The delta goes first, for good: it names its base by
                // generation only, and a base written from no tables (a
                // recount) starts again at 1, so a delta left beside the
                // new base could be taken for its own.
                let delta = dir.join(DELTA_NAME);
                match fs.remove(&delta) {
                    Ok(()) => fs.sync_dir(dir).at(dir)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(crate::error::Error::io(&delta, e)),
                }
                let entries =
                    Merge::new(table_entries(self.tables.base.as_deref()), changes, false);
                crate::table::write_with::<RefsFormat>(fs, &path, entries, items, generation)?;
                Ok(Tables {
                    base: Some(open(&path)?),
                    delta: None,
                    memory,
                })
            }
        }
    }
}

/// The tables the counts are kept in: a base, and the changes to it since
/// (counts of 0 hide the base's entry), written with its generation.
#[derive(Clone, Default)]
pub struct Tables {
    pub base: Option<Arc<RefsTable>>,
    pub delta: Option<Arc<RefsTable>>,
    /// What look-ups may hold of each table's pages (see
    /// [`Table::set_budget`]); `None`: unbounded.
    memory: Option<u64>,
}

impl Tables {
    /// The tables in `dir`: `Ok` with none when there are none; an error
    /// when one is damaged or the delta belongs to another base (a crash
    /// between writing a new base and removing the old delta leaves that:
    /// then the base alone).
    pub fn open(fs: &dyn StoreFs, dir: &Path) -> Result<Tables> {
        let base = RefsTable::open(fs, &dir.join(FILE_NAME))?.map(Arc::new);
        let delta = match &base {
            Some(b) => RefsTable::open(fs, &dir.join(DELTA_NAME))?
                .filter(|d| d.generation() == b.generation())
                .map(Arc::new),
            None => None,
        };
        Ok(Tables {
            base,
            delta,
            memory: None,
        })
    }

    /// See [`crate::EngineOptions::table_memory`]: for these tables and
    /// those written from them.
    pub fn set_memory(&mut self, bytes: u64) {
        self.memory = Some(bytes);
        for t in self.base.iter().chain(&self.delta) {
            t.set_budget(bytes);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.base.is_none()
    }

    /// No tables, with these tables' memory setting.
    pub fn emptied(&self) -> Tables {
        Tables {
            memory: self.memory,
            ..Tables::default()
        }
    }

    /// The snapshots the newest table counts, with their exclusive bytes.
    pub fn covered(&self) -> &[(SnapshotId, u64)] {
        match (&self.delta, &self.base) {
            (Some(d), _) => d.items(),
            (None, Some(b)) => b.items(),
            (None, None) => &[],
        }
    }

    /// Checks every page of both tables.
    pub fn check(&self) -> std::result::Result<(), Damaged> {
        for t in [&self.base, &self.delta].into_iter().flatten() {
            t.check()?;
        }
        Ok(())
    }
}

fn table_entries(t: Option<&RefsTable>) -> impl Iterator<Item = Result<Entry>> + '_ {
    t.into_iter()
        .flat_map(|t| t.iter().map(|e| e.map_err(damaged)))
}

fn hex(key: &[u8; 16]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// Two runs of entries in key order merged: where both have a key, the
/// newer's entry wins; counts of 0 dropped unless `keep_zero`.
struct Merge<A: Iterator<Item = Result<Entry>>, B: Iterator<Item = Result<Entry>>> {
    older: std::iter::Peekable<A>,
    newer: std::iter::Peekable<B>,
    keep_zero: bool,
}

impl<A: Iterator<Item = Result<Entry>>, B: Iterator<Item = Result<Entry>>> Merge<A, B> {
    fn new(older: A, newer: B, keep_zero: bool) -> Self {
        Merge {
            older: older.peekable(),
            newer: newer.peekable(),
            keep_zero,
        }
    }
}

impl<A: Iterator<Item = Result<Entry>>, B: Iterator<Item = Result<Entry>>> Iterator
    for Merge<A, B>
{
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Result<Entry>> {
        loop {
            let older = match self.older.peek() {
                Some(Err(_)) => return self.older.next(),
                Some(Ok(e)) => Some(e.key),
                None => None,
            };
            let newer = match self.newer.peek() {
                Some(Err(_)) => return self.newer.next(),
                Some(Ok(e)) => Some(e.key),
                None => None,
            };
            let entry = match (older, newer) {
                (None, None) => return None,
                (Some(o), Some(n)) if n <= o => {
                    if n == o {
                        self.older.next();
                    }
                    self.newer.next()
                }
                (Some(_), _) => self.older.next(),
                (None, Some(_)) => self.newer.next(),
            };
            match entry? {
                Ok(e) if e.r.count == 0 && !self.keep_zero => continue,
                other => return Some(other),
            }
        }
    }
}

/// A list of ids that could not be read counts as damage: the counts are
/// dropped, and counted again from the manifests when next needed.
fn unreadable(e: crate::error::Error) -> Damaged {
    Damaged(format!("a snapshot's chunk list could not be read: {e}"))
}

fn damaged(d: Damaged) -> crate::error::Error {
    crate::error::Error::Internal(format!("reference counts: {}", d.0))
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
        /// With `direct`, snapshots of more than 3 chunks are counted
        /// straight into tables (`Refs::written`), the rest through the
        /// overlay.
        fn exclusive_bytes_match_a_recount(
            steps in proptest::collection::vec(
                (any::<bool>(), 1u64..6, proptest::collection::btree_set(0u8..12, 0..8)),
                1..40,
            ),
            direct in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let straight = direct.then(|| Direct {
                fs: Arc::new(StdFs),
                dir: dir.path().to_path_buf(),
                min: 3,
            });
            let mut refs = Refs::default();
            refs.set_direct(straight.clone());
            let mut live: BTreeMap<u64, BTreeSet<u8>> = BTreeMap::new();
            let mut next = 100u64;
            for (add, pick, chunks) in steps {
                // Now and then, the counts go to a table and come back.
                if pick == 5 {
                    refs.write(&StdFs, dir.path()).unwrap();
                    let tables = Tables::open(&StdFs, dir.path()).unwrap();
                    tables.check().unwrap();
                    refs = Refs::from_tables(tables);
                    refs.set_direct(straight.clone());
                }
                if add || live.is_empty() {
                    next += 1;
                    let ids: Vec<ChunkId> = chunks.iter().map(|&c| id(c)).collect();
                    refs.add(SnapshotId(next), &SortedIds::from_vec(ids.clone()), size).unwrap();
                    live.insert(next, chunks);
                } else {
                    let victim = *live.keys().nth(pick as usize % live.len()).unwrap();
                    let chunks = live.remove(&victim).unwrap();
                    let ids: Vec<ChunkId> = chunks.iter().map(|&c| id(c)).collect();
                    refs.remove(SnapshotId(victim), &SortedIds::from_vec(ids.clone())).unwrap();
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

    /// Many chunks, few changes at a time: the changes go to a delta table
    /// (the base untouched), deltas build on deltas, and a large change
    /// merges all into a new base; every time, reopened from the files,
    /// the counts are those of a count from scratch.
    /// A base written from no tables (a recount, after damage) starts
    /// again at generation 1: the delta of an older base of generation 1
    /// must be gone for good before it lands, or a crash could pair them.
    #[test]
    fn a_recounted_base_never_meets_an_old_delta() {
        use crate::fsio::{CrashFs, CrashFsHandle, StoreFs};
        let fs = CrashFs::new();
        let h = CrashFsHandle(fs.clone());
        let dir = Path::new("/refs");
        h.create_dir_all(dir).unwrap();
        h.sync_dir(Path::new("/")).unwrap();
        let ids: Vec<ChunkId> = (0..2010u32)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        let list = |r: std::ops::Range<usize>| SortedIds::from_vec(ids[r].to_vec());
        let mut refs = Refs::default();
        refs.add(SnapshotId(1), &list(0..2000), size).unwrap();
        refs.add(SnapshotId(2), &list(1990..2010), size).unwrap();
        refs.write(&h, dir).unwrap();
        refs.remove(SnapshotId(2), &list(1990..2010)).unwrap();
        refs.write(&h, dir).unwrap();
        let tables = Tables::open(&h, dir).unwrap();
        assert_eq!(tables.delta.as_ref().map(|d| d.generation()), Some(1));
        // Counted again from scratch, then the power goes.
        let mut fresh = Refs::from_tables(tables.emptied());
        fresh.add(SnapshotId(3), &list(5..10), size).unwrap();
        fresh.write(&h, dir).unwrap();
        fs.crash();
        fs.restart();
        let after = Tables::open(&h, dir).unwrap();
        assert_eq!(after.base.as_ref().map(|b| b.generation()), Some(1));
        assert!(
            after.delta.is_none(),
            "the old delta came back beside the new base"
        );
        let covered: Vec<SnapshotId> = after.covered().iter().map(|c| c.0).collect();
        assert_eq!(covered, [SnapshotId(3)]);
    }

    #[test]
    fn deltas_then_a_new_base_count_as_from_scratch() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<ChunkId> = (0..3300u32)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        let size = |c: &ChunkId| u32::from(c.0[1]) + 1;
        let mut live: BTreeMap<u64, Vec<ChunkId>> = BTreeMap::new();
        let mut refs = Refs::default();
        let snap = |n: u64, from: usize, to: usize| -> (u64, Vec<ChunkId>) {
            let mut v = ids[from..to].to_vec();
            v.sort_unstable_by_key(|id| id.0);
            (n, v)
        };
        let mut steps = vec![snap(1, 0, 2000), snap(2, 1000, 3000)];
        steps.extend((3..8).map(|n| snap(n, 3000 + n as usize * 30, 3030 + n as usize * 30)));
        steps.push(snap(8, 0, 3000));
        let mut kinds = Vec::new();
        for (n, chunks) in steps {
            refs.add(SnapshotId(n), &SortedIds::from_vec(chunks.clone()), size)
                .unwrap();
            live.insert(n, chunks);
            if n == 4 {
                let gone = live.remove(&3).unwrap();
                refs.remove(SnapshotId(3), &SortedIds::from_vec(gone))
                    .unwrap();
            }
            let base_before = std::fs::read(dir.path().join(FILE_NAME)).ok();
            refs.write(&StdFs, dir.path()).unwrap();
            let base_after = std::fs::read(dir.path().join(FILE_NAME)).ok();
            kinds.push(if base_before == base_after {
                "delta"
            } else {
                "base"
            });
            let tables = Tables::open(&StdFs, dir.path()).unwrap();
            tables.check().unwrap();
            refs = Refs::from_tables(tables);
            let mut scratch = Refs::default();
            for (s, chunks) in &live {
                scratch
                    .add(SnapshotId(*s), &SortedIds::from_vec(chunks.clone()), size)
                    .unwrap();
            }
            assert_eq!(refs.differ(&scratch).unwrap(), None, "after snapshot {n}");
            assert_eq!(refs.figures(), scratch.figures(), "after snapshot {n}");
            for id in &ids {
                assert_eq!(
                    refs.is_needed(id),
                    scratch.is_needed(id),
                    "after snapshot {n}"
                );
            }
        }
        assert_eq!(
            kinds,
            [
                "base", "base", "delta", "delta", "delta", "delta", "delta", "base"
            ]
        );
        assert!(!dir.path().join(DELTA_NAME).exists());
    }
}
