//! The chunk store: content-addressed chunks in append-only pack files, and
//! the in-memory index from chunk id to record location.
//!
//! The packs are the source of truth: the index is rebuilt on open from the
//! sealed packs' trailing indexes, and from a forward scan of any pack a crash
//! left unsealed (its torn tail is cut, then it is sealed).
//!
//! Locking (take in this order, never the reverse):
//! 1. `sync_lock` — one `sync` at a time, so a returning `sync` has really
//!    made every earlier append and pack creation durable.
//! 2. `writer` — the one open pack and its pending index entries.
//! 3. `pending`, then `unchecked`, then `unreadable` — the first use of
//!    the index reads the packs the table does not cover and checks those
//!    it does ([`ChunkStore::index`]).
//! 4. `index` — readers take it shared; `insert` takes it exclusive only to
//!    add entries, after the bytes are in the pack file.
//! 5. `stale` — why the table was found stale, if it was.
//!
//! Invariant: a chunk is in the index only after its record was written to a
//! pack. A caller that saw a chunk in the index (dedup hit) and then calls
//! `sync` has that chunk durable, whichever capture wrote it.

pub mod gc;
mod groups;
pub(crate) mod index;
pub mod pack;
mod recovery;
pub(crate) mod table;

use std::collections::{HashMap, HashSet};
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use index::ChunkIndex;
use table::{Covered, Table};

use crate::error::{Error, IoContext, Result};
use crate::fsio::{OpenMode, StoreFile, StoreFs};
use crate::ids::ChunkId;
use crate::sorted::Sorted;
use groups::{DecodedGroup, GroupCache};
use pack::{ChunkRecord, GroupRecord, IndexEntry, PACK_HEADER_LEN, RECORD_HEADER_LEN, RecordKind};
pub use recovery::Recovery;
use recovery::{list_packs, load_pack};

/// A pack is sealed once it grows past this many bytes...
pub const PACK_TARGET_LEN: u64 = 256 << 20;
/// ... or holds this many records. Until it is sealed, the open pack's
/// index entries (48 bytes each) are in memory twice over: its trailer to
/// be, and the chunk index's overlay, which no table takes them from. Data
/// that compresses to almost nothing (a block of zeros but for a few
/// bytes: some 60 bytes a record) would fill 256 MiB with 4M records:
/// 400 MiB held by a capture of 4M such blocks.
#[cfg(not(test))]
pub const PACK_MAX_RECORDS: usize = 1 << 18;
#[cfg(test)]
pub const PACK_MAX_RECORDS: usize = 64;
// Record offsets are kept as u32 in memory: a pack never reaches 4 GiB.
const _: () = assert!(PACK_TARGET_LEN + (pack::MAX_CHUNK_LEN as u64) * 2 < u32::MAX as u64);

const PACK_SUFFIX: &str = ".pack";

/// Where a chunk's record lives. For a member of a group record, `offset`
/// is the group's and `stored_len` is flagged ([`pack::MEMBER_FLAG`]).
/// Ordered by pack, then offset: the order records were written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChunkLoc {
    pub pack: u32,
    pub offset: u32,
    pub stored_len: u32,
}

impl ChunkLoc {
    /// A member of a group record.
    pub fn is_member(&self) -> bool {
        self.stored_len & pack::MEMBER_FLAG != 0
    }

    /// The pack bytes this chunk accounts for (see [`IndexEntry::accounted_len`]).
    pub fn accounted_len(&self) -> u64 {
        pack::accounted_len(self.stored_len)
    }
}

/// A record to append: one chunk, or a group of them.
pub enum NewRecord<'a> {
    Chunk(ChunkRecord<'a>),
    Group(&'a GroupRecord),
}

/// Writes `rec` at `at` in `file` with two positioned writes (no copy of
/// the payload into a frame); returns its pack index entries and length.
pub(crate) fn write_record(
    file: &dyn StoreFile,
    path: &Path,
    rec: &NewRecord<'_>,
    at: u64,
) -> Result<(Vec<IndexEntry>, u64)> {
    let (header, payload, entries) = match rec {
        NewRecord::Chunk(c) => (c.header(), c.payload(), vec![c.index_entry(at)]),
        NewRecord::Group(g) => (g.header(), g.payload(), g.index_entries(at)),
    };
    file.write_all_at(&header, at).at(path)?;
    file.write_all_at(payload, at + RECORD_HEADER_LEN as u64)
        .at(path)?;
    Ok((entries, (RECORD_HEADER_LEN + payload.len()) as u64))
}

/// Hashes a [`ChunkId`] by the one `u64` its `Hash` impl feeds: no rehashing.
#[derive(Default)]
pub struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

struct ActivePack {
    seq: u32,
    file: Arc<dyn StoreFile>,
    len: u64,
    /// Bytes made durable by the last fsync that succeeded.
    synced_len: u64,
    entries: Vec<IndexEntry>,
}

struct Writer {
    active: Option<ActivePack>,
    next_seq: u32,
    /// A pack file was created since the last directory fsync.
    dir_dirty: bool,
}

/// Outcome of appending a batch of chunks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Appended {
    pub chunks: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
}

/// The content-addressed chunk store under `packs/`.
pub struct ChunkStore {
    dir: PathBuf,
    sync_lock: Mutex<()>,
    writer: Mutex<Writer>,
    index: RwLock<ChunkIndex>,
    readers: RwLock<HashMap<u32, Arc<dyn StoreFile>>>,
    /// Every pack file is opened, written, synced, renamed and removed
    /// through this (the test seam for injected faults).
    fs: Arc<dyn StoreFs>,
    /// Held shared by a capture while it looks chunks up and pins them,
    /// exclusive by garbage collection while it removes chunks (see `gc`).
    gc_guard: RwLock<()>,
    /// The chunks each running capture has referenced so far.
    pins: Mutex<Vec<Weak<Pins>>>,
    groups: GroupCache,
    /// One garbage collection at a time.
    gc_lock: Mutex<()>,
    /// fsyncs of packs or of the pack directory that failed. A failed
    /// fsync may have lost what it was to make durable even if a later one
    /// succeeds (the kernel may drop the dirty pages), so its records are
    /// taken out of the index and every capture running then fails
    /// ([`ChunkStore::sync_pinned`]).
    sync_failures: AtomicU64,
    /// See [`ChunkStore::set_index_persist_min`].
    persist_min: std::sync::atomic::AtomicUsize,
    /// See [`ChunkStore::set_table_memory`].
    table_memory: AtomicU64,
    /// Sealed packs the table does not cover, not read yet, and whether
    /// they have been ([`ChunkStore::index`]).
    pending: Mutex<PackList>,
    /// The packs the table covers, as it says they were, until checked
    /// against the packs at the first look-up ([`ChunkStore::index`]).
    unchecked: Mutex<Vec<Covered>>,
    /// Why that check found the table stale, if it did.
    stale: Mutex<Option<String>>,
    loaded: std::sync::atomic::AtomicBool,
    /// Opened read-only: no new table is written.
    read_only: bool,
    /// Packs whose chunks open could not read: never covered by a table.
    unreadable: Mutex<HashSet<u32>>,
    /// A pack is sealed once it grows past this many bytes
    /// ([`ChunkStore::set_pack_target`]).
    pack_target: AtomicU64,
    /// Told of every pack sealed, once its trailer is durable.
    seal_hook: Mutex<Option<SealHook>>,
}

/// Called with a pack's number and path once it is sealed and durable.
pub type SealHook = Arc<dyn Fn(u32, &Path) + Send + Sync>;

/// The chunks one running capture has referenced: never collected while
/// the capture runs. Unregistered when dropped.
///
/// Kept as a Bloom filter, about 10 bits a chunk whatever the disk's size
/// (a set of ids took 20 to 35 bytes a chunk: 530 MiB for a dense 1 TiB
/// disk). A chunk the filter wrongly holds (under 1% of the others) only
/// stays until a collection after the capture ends; a chunk pinned is
/// never missed.
pub struct Pins {
    filter: Mutex<PinFilter>,
    /// [`ChunkStore::sync_failures`] when the capture started.
    sync_failures: u64,
}

impl Pins {
    /// Pins chunks. Call with the capture's guard held
    /// ([`ChunkStore::lookup_guard`]) from the look-up that found them.
    pub fn add<'a>(&self, ids: impl IntoIterator<Item = &'a ChunkId>) {
        let mut filter = self.filter.lock();
        for id in ids {
            filter.insert(id);
        }
    }

    fn contains(&self, id: &ChunkId) -> bool {
        self.filter.lock().contains(id)
    }
}

/// A Bloom filter that grows: filters of doubling capacity, each filled
/// to its capacity before the next is made. A chunk id is a BLAKE3 hash,
/// so its bytes serve as the filter's hashes.
#[derive(Default)]
struct PinFilter {
    /// Bit arrays (a power of two bits each) and the ids put in each.
    parts: Vec<(Vec<u64>, u64)>,
}

/// Bits a chunk; with [`PIN_PROBES`] probes, about 0.8% false positives
/// for each part full.
const PIN_BITS: u64 = 10;
const PIN_PROBES: u64 = 7;
/// Chunks the first part holds (80 KiB).
const PIN_FIRST: u64 = 1 << 16;

impl PinFilter {
    /// The bits `id` sets in a part of `words` words.
    fn probes(id: &ChunkId, words: usize) -> impl Iterator<Item = (usize, u64)> {
        let h1 = crate::le::u64_at(&id.0, 0);
        let h2 = crate::le::u64_at(&id.0, 8) | 1;
        let mask = words as u64 * 64 - 1;
        (0..PIN_PROBES).map(move |i| {
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) & mask;
            ((bit / 64) as usize, 1u64 << (bit % 64))
        })
    }

    fn insert(&mut self, id: &ChunkId) {
        let full = self
            .parts
            .last()
            .is_none_or(|(bits, n)| *n >= bits.len() as u64 * 64 / PIN_BITS);
        if full {
            let chunks = PIN_FIRST << self.parts.len().min(20);
            let words = (chunks * PIN_BITS).next_power_of_two() / 64;
            self.parts.push((vec![0; words as usize], 0));
        }
        if let Some((bits, n)) = self.parts.last_mut() {
            for (w, b) in Self::probes(id, bits.len()) {
                bits[w] |= b;
            }
            *n += 1;
        }
    }

    fn contains(&self, id: &ChunkId) -> bool {
        self.parts
            .iter()
            .any(|(bits, _)| Self::probes(id, bits.len()).all(|(w, b)| bits[w] & b != 0))
    }
}

impl ChunkStore {
    /// Opens (creating if needed) the pack directory and rebuilds the index.
    pub fn open(dir: &Path, fs: Arc<dyn StoreFs>) -> Result<(Self, Recovery)> {
        Self::open_as(dir, fs, false)
    }

    /// Opens the packs without changing them: packs a crash left unsealed
    /// are scanned (their torn tails skipped, not cut) and left unsealed,
    /// and GC's leftovers stay for the next writable open.
    pub fn open_read_only(dir: &Path, fs: Arc<dyn StoreFs>) -> Result<(Self, Recovery)> {
        Self::open_as(dir, fs, true)
    }

    fn open_as(dir: &Path, fs: Arc<dyn StoreFs>, read_only: bool) -> Result<(Self, Recovery)> {
        if !read_only {
            fs.create_dir_all(dir).at(dir)?;
            gc::remove_leftovers(fs.as_ref(), dir)?;
        }
        let mut recovery = Recovery::default();
        let packs = list_packs(fs.as_ref(), dir)?;
        let max_seq = packs.last().map_or(0, |(seq, _)| *seq);
        // The table on disk, if it still says what the packs hold.
        // Only by the packs' names here: their lengths and trailers are
        // checked at the first look-up (see `ensure_loaded`), so that open
        // reads nothing per pack.
        let table = match Table::open(fs.as_ref(), &dir.join(table::FILE_NAME)) {
            Ok(Some(t)) => match gone(&t, &packs) {
                None => Some(t),
                Some(why) => {
                    recovery.index_rebuilt = Some(why);
                    None
                }
            },
            Ok(None) => {
                recovery.index_rebuilt = Some("the store had no chunk index".into());
                None
            }
            Err(e) => {
                recovery.index_rebuilt = Some(e.to_string());
                None
            }
        };
        // Sealed packs the table does not cover are read at the first
        // look-up, not now: commands that look nothing up (listing
        // servers and snapshots) open in time independent of the store.
        let mut pending = Vec::new();
        let mut unchecked = Vec::new();
        let mut unreadable = HashSet::new();
        let index = match table {
            Some(t) => {
                let covered: HashSet<u32> = t.items().iter().map(|c| c.seq).collect();
                unchecked = t.items().to_vec();
                let mut index = ChunkIndex::with_base(Arc::new(t));
                for (seq, path) in packs.iter().filter(|(seq, _)| !covered.contains(seq)) {
                    if let Ok(Some(_)) = sealed_fingerprint(fs.as_ref(), *seq, path) {
                        pending.push((*seq, path.clone()));
                        continue;
                    }
                    // Left unsealed by a crash: recovered now.
                    match load_pack(fs.as_ref(), path, &mut recovery, read_only) {
                        Ok(entries) => {
                            recovery.packs_indexed += 1;
                            for e in entries {
                                index.insert_if_absent(&e.id, loc_of(*seq, &e));
                            }
                        }
                        Err(e) => {
                            unreadable.insert(*seq);
                            recovery.unreadable.push(e.to_string());
                        }
                    }
                }
                index
            }
            None => index_packs(
                fs.as_ref(),
                &packs,
                &mut recovery,
                read_only,
                &mut unreadable,
            ),
        };
        if recovery.packs_sealed > 0 {
            fs.sync_dir(dir).at(dir)?;
        }
        let store = ChunkStore {
            dir: dir.to_path_buf(),
            sync_lock: Mutex::new(()),
            writer: Mutex::new(Writer {
                active: None,
                next_seq: max_seq + 1,
                dir_dirty: false,
            }),
            index: RwLock::new(index),
            readers: RwLock::new(HashMap::new()),
            gc_guard: RwLock::new(()),
            pins: Mutex::new(Vec::new()),
            groups: GroupCache::default(),
            gc_lock: Mutex::new(()),
            sync_failures: AtomicU64::new(0),
            persist_min: std::sync::atomic::AtomicUsize::new(PERSIST_MIN),
            table_memory: AtomicU64::new(u64::MAX),
            loaded: std::sync::atomic::AtomicBool::new(pending.is_empty() && unchecked.is_empty()),
            pending: Mutex::new(pending),
            unchecked: Mutex::new(unchecked),
            stale: Mutex::new(None),
            read_only,
            unreadable: Mutex::new(unreadable),
            pack_target: AtomicU64::new(PACK_TARGET_LEN),
            seal_hook: Mutex::new(None),
            fs,
        };
        if !read_only && (recovery.index_rebuilt.is_some() || store.index_due()) {
            // Best effort: without it the store works as before, from the
            // packs, and the next open tries again.
            if let Err(e) = store.persist_index(&store.gc_lock.lock()) {
                recovery.index_unsaved = Some(e.to_string());
            }
        }
        Ok((store, recovery))
    }

    /// True when the index's overlay has grown enough to be written into a
    /// new table: past a sixteenth of the table (so that rewriting it
    /// costs little per chunk) or [`OVERLAY_MAX`] entries, whichever is
    /// fewer, and at least [`PERSIST_MIN`] entries.
    fn index_due(&self) -> bool {
        // Packs not read yet hold nothing a new table would add.
        if !self.loaded.load(Ordering::Acquire) {
            return false;
        }
        // The open pack's chunks stay out of a table until it is sealed.
        let open = self
            .writer
            .lock()
            .active
            .as_ref()
            .map_or(0, |a| a.entries.len());
        let index = self.index.read();
        // A stale table found at the first look-up: replaced at once, or
        // every open would find it stale again.
        if index.base().is_none() && self.stale.lock().is_some() {
            return true;
        }
        let base = index.base().map_or(0, |b| b.len() as usize);
        let min = self.persist_min.load(Ordering::Relaxed);
        index.overlay_len().saturating_sub(open) > (base / 16).min(OVERLAY_MAX).max(min)
    }

    /// What look-ups may hold of the chunk index table's pages (see
    /// [`crate::EngineOptions::table_memory`]): for the table now and
    /// every one written after.
    pub fn set_table_memory(&self, bytes: u64) {
        self.table_memory.store(bytes, Ordering::Relaxed);
        if let Some(base) = self.index.read().base() {
            base.set_budget(bytes);
        }
    }

    /// Seals a pack once it grows past `bytes` (at most
    /// [`PACK_TARGET_LEN`]): smaller packs for a store whose packs go to
    /// a bucket whole.
    pub fn set_pack_target(&self, bytes: u64) {
        self.pack_target.store(
            bytes.clamp(PACK_HEADER_LEN as u64, PACK_TARGET_LEN),
            Ordering::Relaxed,
        );
    }

    /// Calls `hook` with every pack sealed from now on, once it is durable.
    pub fn set_seal_hook(&self, hook: SealHook) {
        *self.seal_hook.lock() = Some(hook);
    }

    /// Seals the open pack, if any, and makes its name durable: every
    /// chunk appended so far is then in a sealed pack.
    pub fn seal_open_pack(&self) -> Result<()> {
        let _one_at_a_time = self.sync_lock.lock();
        let dir_dirty = {
            let mut w = self.writer.lock();
            self.seal(&mut w)?;
            std::mem::take(&mut w.dir_dirty)
        };
        if dir_dirty {
            self.sync_pack_dir()?;
        }
        Ok(())
    }

    /// Adds a sealed pack while the store is open: `make` writes it at the
    /// path it is given (quickly: the writer waits), then its index is
    /// read and its chunks indexed. Returns its number.
    #[cfg(feature = "s3")]
    pub(crate) fn adopt_pack(&self, make: impl FnOnce(&Path) -> Result<()>) -> Result<u32> {
        let (seq, path) = {
            let mut w = self.writer.lock();
            let seq = w.next_seq;
            let path = pack_path(&self.dir, seq);
            make(&path)?;
            w.next_seq += 1;
            w.dir_dirty = true;
            (seq, path)
        };
        let entries = load_pack(self.fs.as_ref(), &path, &mut Recovery::default(), true)?;
        let mut index = self.index_mut()?;
        for e in entries {
            index.insert_if_absent(&e.id, loc_of(seq, &e));
        }
        Ok(seq)
    }

    /// Takes packs out of the open store (gone from where they were
    /// shared): their entries leave the index, and the chunks they held
    /// that another pack holds too are indexed there instead (the first
    /// such copy in pack order). The caller removes their files after.
    #[cfg(feature = "s3")]
    pub(crate) fn forget_packs(&self, gone: &[u32]) -> Result<()> {
        use index::{Moves, move_key};
        let _one_at_a_time = self.gc_lock.lock();
        let mut dropped = HashSet::new();
        for &seq in gone {
            let path = pack_path(&self.dir, seq);
            let entries = load_pack(self.fs.as_ref(), &path, &mut Recovery::default(), true)?;
            let moves: Moves = entries
                .iter()
                .map(|e| (move_key(e.offset, &e.id), None))
                .collect();
            {
                let _guard = self.gc_guard.write();
                self.index_mut()?
                    .relocate(seq, seq, &moves, &entries)
                    .map_err(|d| self.damaged(d))?;
            }
            self.readers.write().remove(&seq);
            dropped.extend(entries.into_iter().map(|e| e.id));
        }
        for (seq, path) in self.sealed_packs()? {
            if gone.contains(&seq) || dropped.is_empty() {
                continue;
            }
            let entries = load_pack(self.fs.as_ref(), &path, &mut Recovery::default(), true)?;
            let mut index = self.index_mut()?;
            for e in entries {
                if dropped.remove(&e.id) {
                    index.insert_if_absent(&e.id, loc_of(seq, &e));
                }
            }
        }
        Ok(())
    }

    /// The sealed packs, by number and path (the open one left out).
    pub fn sealed_packs(&self) -> Result<Vec<(u32, PathBuf)>> {
        let open = self.writer.lock().active.as_ref().map(|a| a.seq);
        let mut packs = list_packs(self.fs.as_ref(), &self.dir)?;
        packs.retain(|(seq, _)| Some(*seq) != open);
        Ok(packs)
    }

    /// Entries the index holds in memory before a new table is written
    /// ([`crate::EngineOptions::index_persist_min`]).
    pub fn set_index_persist_min(&self, entries: usize) {
        self.persist_min.store(entries, Ordering::Relaxed);
    }

    /// The index, for look-ups: reads the sealed packs the table does not
    /// cover first, once (their chunks join the in-memory overlay). Until
    /// they are read, nothing may be decided from the index (a collection
    /// would take their records for garbage), so a failure to read one is
    /// the caller's error, and the next call tries again.
    fn index(&self) -> Result<RwLockReadGuard<'_, ChunkIndex>> {
        self.ensure_loaded()?;
        Ok(self.index.read())
    }

    /// The index, to change (see [`ChunkStore::index`]).
    fn index_mut(&self) -> Result<parking_lot::RwLockWriteGuard<'_, ChunkIndex>> {
        self.ensure_loaded()?;
        Ok(self.index.write())
    }

    /// The index as it is, for figures: the packs not read yet are read
    /// if they can be, and left out if not.
    fn index_now(&self) -> RwLockReadGuard<'_, ChunkIndex> {
        let _ = self.ensure_loaded();
        self.index.read()
    }

    fn ensure_loaded(&self) -> Result<()> {
        if self.loaded.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut pending = self.pending.lock();
        if self.loaded.load(Ordering::Acquire) {
            return Ok(()); // another thread was first
        }
        let mut unchecked = self.unchecked.lock();
        if let Some(why) = stale(self.fs.as_ref(), &self.dir, &unchecked) {
            // Its packs changed since it was written (a collection whose
            // new table a crash lost): none of it is trusted, every pack
            // is read, and a new table is written when next due.
            self.reindex()?;
            *self.stale.lock() = Some(why);
            pending.clear();
            unchecked.clear();
            self.loaded.store(true, Ordering::Release);
            return Ok(());
        }
        unchecked.clear();
        let mut loaded = Vec::new();
        for (seq, path) in pending.iter() {
            let mut scratch = Recovery::default();
            loaded.push((*seq, load_pack(self.fs.as_ref(), path, &mut scratch, true)?));
        }
        pending.clear();
        let mut index = self.index.write();
        for (seq, entries) in loaded {
            for e in entries {
                index.insert_if_absent(&e.id, loc_of(seq, &e));
            }
        }
        self.loaded.store(true, Ordering::Release);
        Ok(())
    }

    /// The index from every pack, no table (which a stale one leaves):
    /// what open builds when there is no usable table.
    fn reindex(&self) -> Result<()> {
        let packs = list_packs(self.fs.as_ref(), &self.dir)?;
        let mut scratch = Recovery::default();
        let mut unreadable = self.unreadable.lock();
        let index = index_packs(
            self.fs.as_ref(),
            &packs,
            &mut scratch,
            true,
            &mut unreadable,
        );
        *self.index.write() = index;
        Ok(())
    }

    /// Why the chunk index table was found stale at the first look-up
    /// (its packs are checked then, not at open), if it was.
    pub fn stale_table(&self) -> Option<String> {
        self.stale.lock().clone()
    }

    /// The sealed packs a new table can cover: all but the open one, and
    /// but any a crash left unsealed.
    ///
    /// Taken with no fsync in flight and no seal half done (the sync lock,
    /// then the writer lock, held throughout): a pack sealed after a
    /// failed fsync of its records is cut back by `abandon`, so a pack
    /// found sealed here stays so, and a later `sync` never touches it
    /// (it is not the open pack). Also returns the packs neither covered
    /// nor open (unsealed ones, whose chunks the overlay keeps). Packs
    /// whose chunks could not be read are never covered: a table must not
    /// vouch for chunks the index lacks.
    fn coverable(&self) -> Result<(Vec<Covered>, PackList)> {
        let _no_fsync = self.sync_lock.lock();
        let w = self.writer.lock();
        let open = w.active.as_ref().map(|a| a.seq);
        let unreadable = self.unreadable.lock().clone();
        let (mut covered, mut others) = (Vec::new(), Vec::new());
        for (seq, path) in list_packs(self.fs.as_ref(), &self.dir)? {
            if Some(seq) == open {
                continue;
            }
            match sealed_fingerprint(self.fs.as_ref(), seq, &path)? {
                Some(c) if !unreadable.contains(&seq) => covered.push(c),
                _ => others.push((seq, path)),
            }
        }
        drop(w);
        Ok((covered, others))
    }

    /// Writes the whole index as a new table covering every sealed pack
    /// and makes it the base. `_gc` proves no garbage collection runs (it
    /// changes the index in ways a table written meanwhile would miss). A
    /// damaged base is rebuilt from the packs instead.
    fn persist_index(&self, gc: &parking_lot::MutexGuard<'_, ()>) -> Result<()> {
        let (covered, _) = self.coverable()?;
        let set: HashSet<u32> = covered.iter().map(|c| c.seq).collect();
        let view = self.index_mut()?.persist_view();
        let mut kept = Vec::new();
        let written = table::write(
            self.fs.as_ref(),
            &self.dir,
            view.entries(&set, &mut kept)
                .map(|e| e.map_err(|d| self.damaged(d))),
            &covered,
            view.next_generation(),
        );
        // The overlay's array no longer shared: installing (here or by a
        // rebuild) changes it in place.
        drop(view);
        match written {
            Err(e) if e.is_corruption() => return self.rebuild_index_locked(gc),
            r => r?,
        }
        self.install_written(&set, kept)
    }

    /// Makes the table just written (covering `covered`) the base, `kept`
    /// joining the overlay.
    fn install_written(&self, covered: &HashSet<u32>, kept: Vec<index::Entry>) -> Result<()> {
        let path = self.dir.join(table::FILE_NAME);
        let t = Table::open(self.fs.as_ref(), &path)?
            .ok_or_else(|| Error::io(&path, std::io::ErrorKind::NotFound.into()))?;
        t.set_budget(self.table_memory.load(Ordering::Relaxed));
        self.index_mut()?.install(Arc::new(t), covered, kept);
        Ok(())
    }

    /// Rebuilds the table from the packs (they are the source of truth)
    /// and makes it the base: what `blocksnap index rebuild` runs, and
    /// what a damaged table gets.
    pub fn rebuild_index(&self) -> Result<()> {
        self.rebuild_index_locked(&self.gc_lock.lock())
    }

    fn rebuild_index_locked(&self, _gc: &parking_lot::MutexGuard<'_, ()>) -> Result<()> {
        // The packs checked and read first, or the look-up below would
        // (and read them all again, were the table stale).
        self.ensure_loaded()?;
        let (covered, others) = self.coverable()?;
        let set: HashSet<u32> = covered.iter().map(|c| c.seq).collect();
        // The chunks of packs no table covers stay in the overlay, read
        // from the packs too (the old base may have covered them).
        let mut kept = Vec::new();
        for (seq, path) in &others {
            let mut scratch = Recovery::default();
            if let Ok(entries) = load_pack(self.fs.as_ref(), path, &mut scratch, true) {
                kept.extend(
                    entries
                        .iter()
                        .map(|e| index::entry_of(&e.id, loc_of(*seq, e))),
                );
            }
        }
        // Sorted in bounded memory, the rest in scratch files: of a chunk
        // stored twice, the first copy (the least pack and offset) stays.
        let mut all = Sorted::<table::Entry>::with_budget(
            REBUILD_MEMORY,
            &self.dir,
            "the chunk index being rebuilt",
        );
        for c in &covered {
            let path = pack_path(&self.dir, c.seq);
            let mut scratch = Recovery::default();
            let entries = load_pack(self.fs.as_ref(), &path, &mut scratch, true)?;
            for e in &entries {
                all.push(table::Entry {
                    key: index::key_bytes(&e.id),
                    loc: loc_of(c.seq, e),
                })?;
            }
        }
        all.finish();
        let generation = self.index()?.base().map_or(1, |b| b.generation() + 1);
        table::write(
            self.fs.as_ref(),
            &self.dir,
            all.iter(),
            &covered,
            generation,
        )?;
        self.install_written(&set, kept)
    }

    /// Writes a new table if the overlay grew enough (after captures).
    /// Skipped while a collection runs: it writes one at its end when it
    /// changed anything, and otherwise the next capture tries again (a
    /// capture's end must not wait for a collection).
    pub fn persist_index_if_due(&self) -> Result<()> {
        if self.read_only || !self.index_due() {
            return Ok(());
        }
        match self.gc_lock.try_lock() {
            Some(gc) => self.persist_index(&gc),
            None => Ok(()),
        }
    }

    /// What the chunk index is now, for `stats` and `verify`.
    pub fn index_info(&self) -> IndexInfo {
        let index = self.index_now();
        IndexInfo {
            chunks: index.len() as u64,
            table_entries: index.base().map_or(0, |b| b.len()),
            table_bytes: index.base().map_or(0, |b| b.file_bytes()),
            table_generation: index.base().map_or(0, |b| b.generation()),
            overlay_entries: index.overlay_len() as u64,
            heap_bytes: index.heap_bytes() as u64,
        }
    }

    /// Checks the whole table (every page's checksum, the keys' order) and
    /// that it holds what its packs hold: every record of a covered pack
    /// is found (at it, or at another copy of its chunk), and every entry
    /// points into a covered pack. What `verify` runs.
    pub fn check_index(&self) -> Result<()> {
        let base = self.index()?.base().cloned();
        let Some(base) = base else {
            return Ok(());
        };
        base.check().map_err(|d| self.damaged(d))?;
        let covered: HashSet<u32> = base.items().iter().map(|c| c.seq).collect();
        for e in base.iter() {
            let e = e.map_err(|d| self.damaged(d))?;
            if !covered.contains(&e.loc.pack) {
                return Err(Error::corrupt(
                    base.path(),
                    format!(
                        "an entry points into pack {}, which the index does not cover",
                        e.loc.pack
                    ),
                ));
            }
        }
        for c in base.items() {
            let path = pack_path(&self.dir, c.seq);
            let mut scratch = Recovery::default();
            let Ok(entries) = load_pack(self.fs.as_ref(), &path, &mut scratch, true) else {
                continue; // verify reports the pack itself
            };
            for e in entries {
                // The whole index: a chunk stored again while the table
                // could not be read is in the overlay.
                let found = self.index()?.get(&e.id).map_err(|d| self.damaged(d))?;
                if found.is_none() {
                    return Err(Error::corrupt(
                        base.path(),
                        format!("misses chunk {} of pack {}", e.id, c.seq),
                    ));
                }
            }
        }
        Ok(())
    }

    fn damaged(&self, d: table::Damaged) -> Error {
        Error::corrupt(
            self.dir.join(table::FILE_NAME),
            format!(
                "{}; `blocksnap index rebuild` makes it again from the packs",
                d.0
            ),
        )
    }

    /// A look-up found the table damaged: rebuilds it from the packs when
    /// no garbage collection runs (a collection fails on it instead).
    /// Returns whether it was rebuilt.
    fn heal(&self) -> bool {
        if self.read_only {
            return false;
        }
        match self.gc_lock.try_lock() {
            Some(gc) => self.rebuild_index_locked(&gc).is_ok(),
            None => false,
        }
    }

    /// Registers the pins of a capture about to run.
    pub fn pin_scope(&self) -> Arc<Pins> {
        let pins = Arc::new(Pins {
            filter: Mutex::new(PinFilter::default()),
            sync_failures: self.sync_failures.load(Ordering::SeqCst),
        });
        let mut all = self.pins.lock();
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&pins));
        pins
    }

    /// Held by a capture from looking chunks up until they are pinned, so
    /// that garbage collection cannot remove a chunk in between.
    pub fn lookup_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.gc_guard.read()
    }

    fn is_pinned(&self, id: &ChunkId) -> bool {
        self.pins
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .any(|p| p.contains(id))
    }

    /// True when the store holds this chunk (written, perhaps not yet
    /// synced). A damaged table is rebuilt; if it cannot be, the answer
    /// is no, and the chunk is stored again.
    pub fn contains(&self, id: &ChunkId) -> bool {
        let Ok(found) = self.index().map(|i| i.get(id)) else {
            return false; // stored again: safe
        };
        match found {
            Ok(l) => l.is_some(),
            Err(_) => self.heal() && self.index.read().contains_key(id),
        }
    }

    /// Number of distinct chunks stored.
    pub fn chunk_count(&self) -> usize {
        self.index_now().len()
    }

    /// Heap bytes the chunk index holds.
    pub fn index_bytes(&self) -> usize {
        self.index_now().heap_bytes()
    }

    /// Where a chunk lives, if stored. A damaged table is rebuilt from the
    /// packs; one that cannot be is a corruption error.
    pub fn locate(&self, id: &ChunkId) -> Result<Option<ChunkLoc>> {
        let found = self.index()?.get(id);
        match found {
            Ok(l) => Ok(l),
            Err(d) if !self.heal() => Err(self.damaged(d)),
            Err(_) => self.index.read().get(id).map_err(|d| self.damaged(d)),
        }
    }

    /// Appends the chunks the store does not hold yet (checked again under the
    /// writer lock, so racing captures store a chunk once).
    #[cfg(test)]
    pub fn insert(&self, records: &[ChunkRecord<'_>]) -> Result<Appended> {
        self.append(records.iter().map(|r| NewRecord::Chunk(*r)))
    }

    /// Appends records in order: chunks the store holds already are
    /// skipped, and a group is skipped when it holds all of its members
    /// (otherwise it is written whole and indexes the members it lacked).
    pub fn append<'a>(&self, records: impl IntoIterator<Item = NewRecord<'a>>) -> Result<Appended> {
        let mut done = Appended::default();
        let mut w = self.writer.lock();
        for rec in records {
            let held = {
                let index = self.index()?;
                match &rec {
                    NewRecord::Chunk(c) => index.contains_key(&c.id),
                    NewRecord::Group(g) => g.members().iter().all(|(id, _)| index.contains_key(id)),
                }
            };
            if held {
                continue;
            }
            let active = self.active_pack(&mut w)?;
            let path = pack_path(&self.dir, active.seq);
            let (entries, record_len) =
                write_record(active.file.as_ref(), &path, &rec, active.len)?;
            let mut index = self.index_mut()?;
            for e in entries {
                let loc = ChunkLoc {
                    pack: active.seq,
                    offset: e.offset as u32,
                    stored_len: e.stored_len,
                };
                if index.insert_if_absent(&e.id, loc) {
                    done.chunks += 1;
                    done.raw_bytes += u64::from(e.raw_len);
                }
                active.entries.push(e);
            }
            drop(index);
            active.len += record_len;
            done.stored_bytes += record_len;
            let target = self.pack_target.load(Ordering::Relaxed);
            if active.len >= target || active.entries.len() >= PACK_MAX_RECORDS {
                self.seal(&mut w)?;
            }
        }
        Ok(done)
    }

    /// Makes every chunk appended so far durable: fsyncs the open pack and,
    /// when a pack file was created since the last sync, the pack directory.
    pub fn sync(&self) -> Result<()> {
        let _one_at_a_time = self.sync_lock.lock();
        let (file, dir_dirty) = {
            let mut w = self.writer.lock();
            let dirty = std::mem::take(&mut w.dir_dirty);
            let active = w.active.as_ref();
            (
                active.map(|a| (a.file.clone(), a.seq, a.len, a.synced_len)),
                dirty,
            )
        };
        if let Some((file, seq, len, synced_len)) = file {
            if let Err(e) = file.sync() {
                let mut w = self.writer.lock();
                // A directory fsync still owed stays owed.
                w.dir_dirty |= dir_dirty;
                // Sealed meanwhile or not, its fsync may have reported OK
                // for this lost writeback: the pack is cut back either way.
                w.active.take_if(|a| a.seq == seq);
                self.abandon(seq, file.as_ref(), synced_len);
                return Err(Error::io(pack_path(&self.dir, seq), e));
            }
            if let Some(a) = self.writer.lock().active.as_mut().filter(|a| a.seq == seq) {
                a.synced_len = a.synced_len.max(len);
            }
        }
        if dir_dirty {
            self.sync_pack_dir()?;
        }
        Ok(())
    }

    /// [`ChunkStore::sync`] for a capture: also fails when any fsync failed
    /// since the capture started (`pins` were made), since a chunk it
    /// found stored may have been lost with it.
    pub fn sync_pinned(&self, pins: &Pins) -> Result<()> {
        self.sync()?;
        if self.sync_failures.load(Ordering::SeqCst) != pins.sync_failures {
            return Err(Error::io(
                &self.dir,
                std::io::Error::other(
                    "an fsync of the packs failed while this capture ran, so chunks it \
                     shares may not be durable; take the snapshot again",
                ),
            ));
        }
        Ok(())
    }

    /// Seals the open pack (index, trailer, fsync), then writes a new
    /// chunk index table if enough was added. Called on clean close.
    pub fn close(&self) -> Result<()> {
        let dir_dirty = {
            let mut w = self.writer.lock();
            self.seal(&mut w)?;
            std::mem::take(&mut w.dir_dirty)
        };
        if dir_dirty {
            self.sync_pack_dir()?;
        }
        self.persist_index_if_due()
    }

    /// After a failed fsync of the open pack: its records not known to be
    /// durable leave the index (a capture needing them stores them again,
    /// in a new pack), and the pack is left unsealed for the next open to
    /// scan. Call with the writer lock held.
    ///
    /// The pack is cut back to what was durable (best effort), so no
    /// trailer covers records that may be lost: the next open scans it and
    /// keeps only records that pass their checks, and takes the copies
    /// later captures stored again instead of lost ones. The failure is
    /// counted only once the index no longer offers those records, so a
    /// capture that sees the old count cannot have found them.
    fn abandon(&self, seq: u32, file: &dyn StoreFile, synced_len: u64) {
        self.index
            .write()
            .drop_from(seq, u32::try_from(synced_len).unwrap_or(u32::MAX));
        let _ = file.set_len(synced_len.max(PACK_HEADER_LEN as u64));
        self.sync_failures.fetch_add(1, Ordering::SeqCst);
    }

    /// Reads one chunk and checks it end to end (record CRCs, decompression,
    /// BLAKE3 against its id). A failed check is [`Error::Corruption`].
    pub fn read(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let (loc, file) = self.open_record(id)?;
        if loc.is_member() {
            return self.read_member(id, &loc, file.as_ref(), |b| Ok(b.to_vec()));
        }
        let path = pack_path(&self.dir, loc.pack);
        let mut rec = vec![0u8; RECORD_HEADER_LEN + loc.stored_len as usize];
        file.read_exact_at(&mut rec, u64::from(loc.offset))
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::corrupt(
                    &path,
                    format!("chunk {id} at offset {}: pack is truncated", loc.offset),
                ),
                _ => Error::io(&path, e),
            })?;
        pack::decode_record(&rec, id).map_err(|what| {
            Error::corrupt(
                &path,
                format!("chunk {id} at offset {}: {what}", loc.offset),
            )
        })
    }

    /// Reads a chunk straight into `out`, which must be its exact length:
    /// the restore path. Checks the record header (its CRC, kind, lengths,
    /// id), decompresses into `out`, and checks BLAKE3 of `out` against the
    /// id. The payload CRC is not needed here: BLAKE3 of the result covers
    /// every byte ([`ChunkStore::read`], used by verify, checks both).
    pub fn read_into(&self, id: &ChunkId, out: &mut [u8]) -> Result<()> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let (loc, file) = self.open_record(id)?;
        if loc.is_member() {
            return self.read_member(id, &loc, file.as_ref(), |b| {
                if b.len() != out.len() {
                    return Err(format!(
                        "chunk holds {} bytes where its block has {}",
                        b.len(),
                        out.len()
                    ));
                }
                out.copy_from_slice(b);
                Ok(())
            });
        }
        let path = pack_path(&self.dir, loc.pack);
        let corrupt = |what: String| {
            Error::corrupt(
                &path,
                format!("chunk {id} at offset {}: {what}", loc.offset),
            )
        };
        let read = |buf: &mut [u8], at: u64| {
            file.read_exact_at(buf, at).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => corrupt("pack is truncated".into()),
                _ => Error::io(&path, e),
            })
        };
        let mut header = [0u8; RECORD_HEADER_LEN];
        read(&mut header, u64::from(loc.offset))?;
        let h = pack::RecordHeader::decode(&header).map_err(corrupt)?;
        if h.id != *id || h.stored_len != loc.stored_len {
            return Err(corrupt("record does not match the index".into()));
        }
        if h.raw_len as usize != out.len() {
            return Err(corrupt(format!(
                "chunk holds {} bytes where its block has {}",
                h.raw_len,
                out.len()
            )));
        }
        let payload_at = u64::from(loc.offset) + RECORD_HEADER_LEN as u64;
        match h.kind {
            RecordKind::Raw => read(out, payload_at)?,
            RecordKind::Group => return Err(corrupt("record does not match the index".into())),
            RecordKind::Zstd => SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.resize(h.stored_len as usize, 0);
                read(&mut scratch, payload_at)?;
                pack::decompress_into(&scratch, out).map_err(corrupt)
            })?,
        }
        if ChunkId::of(out) != *id {
            return Err(corrupt("content does not match its BLAKE3 id".into()));
        }
        Ok(())
    }

    /// Hands member `id` of the group record at `loc` to `take`, checked
    /// against its BLAKE3 id, decompressing the group unless the cache
    /// holds it. A failed check, here or in `take`, is corruption.
    fn read_member<T>(
        &self,
        id: &ChunkId,
        loc: &ChunkLoc,
        file: &dyn StoreFile,
        take: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> Result<T> {
        let path = pack_path(&self.dir, loc.pack);
        let corrupt = |what: String| {
            Error::corrupt(
                &path,
                format!("chunk {id} in the group at offset {}: {what}", loc.offset),
            )
        };
        let slot = self.groups.slot((loc.pack, loc.offset));
        let group = {
            let mut slot = slot.lock();
            match slot.as_ref() {
                Some(g) => g.clone(),
                None => {
                    let g = Arc::new(self.decode_group_at(file, &path, loc)?);
                    *slot = Some(g.clone());
                    g
                }
            }
        };
        pack::group_member(&group.members, &group.data, id)
            .and_then(take)
            .map_err(corrupt)
    }

    /// Reads, checks and decompresses the group record at `loc`.
    fn decode_group_at(
        &self,
        file: &dyn StoreFile,
        path: &Path,
        loc: &ChunkLoc,
    ) -> Result<DecodedGroup> {
        let corrupt =
            |what: String| Error::corrupt(path, format!("group at offset {}: {what}", loc.offset));
        let read = |buf: &mut [u8]| {
            file.read_exact_at(buf, u64::from(loc.offset))
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => corrupt("pack is truncated".into()),
                    _ => Error::io(path, e),
                })
        };
        let mut header = [0u8; RECORD_HEADER_LEN];
        read(&mut header)?;
        let h = pack::RecordHeader::decode(&header).map_err(corrupt)?;
        if h.kind != RecordKind::Group {
            return Err(corrupt(
                "the index names a group, the record is not one".into(),
            ));
        }
        thread_local! {
            static RECORD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        RECORD.with(|record| {
            let mut record = record.borrow_mut();
            record.resize(h.record_len() as usize, 0);
            read(&mut record)?;
            let mut data = self.groups.buffer();
            let members = pack::decode_group(&record, &mut data).map_err(corrupt)?;
            Ok(DecodedGroup { members, data })
        })
    }

    /// The pack file a chunk lives in, for reports.
    pub fn pack_path_of(&self, loc: &ChunkLoc) -> PathBuf {
        pack_path(&self.dir, loc.pack)
    }

    /// Where a chunk is and its pack file, open. Garbage collection may
    /// have moved the chunk and deleted the pack between the look-up and
    /// the open: the index then already says where it went, so one more
    /// look-up finds it.
    fn open_record(&self, id: &ChunkId) -> Result<(ChunkLoc, Arc<dyn StoreFile>)> {
        let mut loc = self.locate(id)?.ok_or(Error::ChunkMissing { chunk: *id })?;
        loop {
            match self.reader(loc.pack) {
                Ok(file) => return Ok((loc, file)),
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    let again = self.locate(id)?.ok_or(Error::ChunkMissing { chunk: *id })?;
                    if again == loc {
                        return Err(Error::corrupt(
                            pack_path(&self.dir, loc.pack),
                            format!("chunk {id}: its pack file is missing"),
                        ));
                    }
                    loc = again;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// fsyncs the pack directory.
    fn sync_dir(&self) -> Result<()> {
        self.fs.sync_dir(&self.dir).at(&self.dir)
    }

    /// fsyncs the pack directory for new packs; on failure they stay to be
    /// synced again, and running captures fail (see `sync_failures`).
    fn sync_pack_dir(&self) -> Result<()> {
        let synced = self.sync_dir();
        if synced.is_err() {
            self.sync_failures.fetch_add(1, Ordering::SeqCst);
            self.writer.lock().dir_dirty = true;
        }
        synced
    }

    fn reader(&self, seq: u32) -> Result<Arc<dyn StoreFile>> {
        if let Some(f) = self.readers.read().get(&seq) {
            return Ok(f.clone());
        }
        let path = pack_path(&self.dir, seq);
        let f = self.fs.open(&path, OpenMode::Read).at(&path)?;
        self.readers.write().insert(seq, f.clone());
        Ok(f)
    }

    fn active_pack<'w>(&self, w: &'w mut Writer) -> Result<&'w mut ActivePack> {
        if w.active.is_none() {
            let seq = w.next_seq;
            let path = pack_path(&self.dir, seq);
            let file = self.fs.open(&path, OpenMode::CreateNew).at(&path)?;
            file.write_all_at(&pack::encode_pack_header(), 0)
                .at(&path)?;
            self.readers.write().insert(seq, file.clone());
            w.next_seq += 1;
            w.dir_dirty = true;
            w.active = Some(ActivePack {
                seq,
                file,
                len: PACK_HEADER_LEN as u64,
                synced_len: 0,
                entries: Vec::new(),
            });
        }
        Ok(w.active.as_mut().expect("active pack was just opened"))
    }

    fn seal(&self, w: &mut Writer) -> Result<()> {
        let Some(active) = w.active.take() else {
            return Ok(());
        };
        let path = pack_path(&self.dir, active.seq);
        let tail = pack::encode_index(&active.entries, active.len);
        let sealed = active
            .file
            .write_all_at(&tail, active.len)
            .and_then(|()| active.file.sync());
        if let Err(e) = sealed {
            // Its records since the last good fsync may not be durable, and
            // no later `sync` would cover them: they leave the index.
            self.abandon(active.seq, active.file.as_ref(), active.synced_len);
            return Err(Error::io(path, e));
        }
        if let Some(hook) = self.seal_hook.lock().clone() {
            hook(active.seq, &path);
        }
        Ok(())
    }
}

impl Drop for ChunkStore {
    fn drop(&mut self) {
        // Best effort: an unsealed pack is recovered by a scan on next open.
        let _ = self.close();
    }
}

/// Packs by number and path.
type PackList = Vec<(u32, PathBuf)>;

/// The overlay is written into a new table once it holds this many
/// entries (and a sixteenth of the table), by default.
pub const PERSIST_MIN: usize = 4096;

/// ... and at the latest once it holds this many (1M: ~60 MiB in memory,
/// as much again while a new table is written from it), so that a
/// process's memory does not grow with the store: at 100M chunks a
/// sixteenth was 6.5M entries, 200 MiB, and a capture read them from the
/// packs at its first look-up. A capture writes the table when due as it
/// goes, so a dense disk of new chunks is held to this too. Rewriting the
/// table then costs 28 bytes a chunk in the store for every 1M chunks
/// added: at 100M chunks, 2.8 GB for 64 GiB of new data at 64 KiB blocks
/// (4% more writing), or 4 GiB at 4 KiB blocks (72%).
pub const OVERLAY_MAX: usize = 1 << 20;

/// Entries a rebuild of the chunk index keeps in memory (28 bytes each);
/// the rest are sorted in scratch files beside the packs.
const REBUILD_MEMORY: u64 = 64 << 20;

/// The chunk index, as `stats` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IndexInfo {
    pub chunks: u64,
    /// Entries in the table on disk, its bytes and generation.
    pub table_entries: u64,
    pub table_bytes: u64,
    pub table_generation: u64,
    /// Entries in memory (chunks of packs the table does not cover, and
    /// changes since it was written).
    pub overlay_entries: u64,
    pub heap_bytes: u64,
}

fn loc_of(seq: u32, e: &IndexEntry) -> ChunkLoc {
    ChunkLoc {
        pack: seq,
        offset: e.offset as u32,
        stored_len: e.stored_len,
    }
}

/// Why `t` no longer says what the packs hold, if it does not: a pack it
/// covers is gone, or changed (its length or trailer).
/// The index of every pack in `packs`, no table: the packs it cannot read
/// go to `unreadable` (and `recovery`, which also hears of the torn packs
/// sealed, unless `read_only`).
fn index_packs(
    fs: &dyn StoreFs,
    packs: &[(u32, PathBuf)],
    recovery: &mut Recovery,
    read_only: bool,
    unreadable: &mut HashSet<u32>,
) -> ChunkIndex {
    let mut all = Vec::new();
    for (seq, path) in packs {
        match load_pack(fs, path, recovery, read_only) {
            Ok(entries) => {
                recovery.packs_indexed += 1;
                all.extend(entries.iter().map(|e| (e.id, loc_of(*seq, e))));
            }
            Err(e) => {
                unreadable.insert(*seq);
                recovery.unreadable.push(e.to_string());
            }
        }
    }
    // One sort instead of a merge every few hundred inserts.
    ChunkIndex::from_entries(all)
}

/// Why the table cannot be used, if a pack it covers is gone.
fn gone(t: &Table, packs: &[(u32, PathBuf)]) -> Option<String> {
    let listed: HashSet<u32> = packs.iter().map(|(s, _)| *s).collect();
    t.items()
        .iter()
        .find(|c| !listed.contains(&c.seq))
        .map(|c| format!("pack {} it covers is gone", c.seq))
}

/// Why the table cannot be used, if a pack it covers changed since it was
/// written (its length or trailer).
fn stale(fs: &dyn StoreFs, dir: &Path, covered: &[Covered]) -> Option<String> {
    for c in covered {
        match sealed_fingerprint(fs, c.seq, &pack_path(dir, c.seq)) {
            Ok(Some(now)) if now == *c => {}
            Ok(_) => return Some(format!("pack {} it covers has changed", c.seq)),
            Err(e) => return Some(format!("pack {} it covers: {e}", c.seq)),
        }
    }
    None
}

/// A sealed pack's length and trailer checksum; `None` when unsealed.
fn sealed_fingerprint(fs: &dyn StoreFs, seq: u32, path: &Path) -> Result<Option<Covered>> {
    let file = fs.open(path, OpenMode::Read).at(path)?;
    let len = file.len().at(path)?;
    if len < (PACK_HEADER_LEN + pack::TRAILER_LEN) as u64 {
        return Ok(None);
    }
    let mut t = [0u8; pack::TRAILER_LEN];
    file.read_exact_at(&mut t, len - pack::TRAILER_LEN as u64)
        .at(path)?;
    if pack::decode_trailer(&t, len).is_none() {
        return Ok(None);
    }
    Ok(Some(Covered {
        seq,
        trailer_crc: crc32fast::hash(&t),
        len,
    }))
}

/// The chunk index table's file name in the pack directory.
#[cfg(feature = "s3")]
pub(crate) const INDEX_TABLE_FILE: &str = table::FILE_NAME;

/// The highest pack number in `dir` (0: none).
#[cfg(feature = "s3")]
pub(crate) fn max_pack_seq(fs: &dyn StoreFs, dir: &Path) -> Result<u32> {
    Ok(list_packs(fs, dir)?.last().map_or(0, |(seq, _)| *seq))
}

fn pack_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(format!("{seq:08}{PACK_SUFFIX}"))
}

/// fsyncs a directory, making the creation or rename of its entries durable.
pub(crate) fn sync_dir(fs: &dyn StoreFs, dir: &Path) -> Result<()> {
    fs.sync_dir(dir).at(dir)
}

#[cfg(test)]
mod tests;
