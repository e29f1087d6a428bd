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
//! 3. `index` — readers take it shared; `insert` takes it exclusive only to
//!    add entries, after the bytes are in the pack file.
//!
//! Invariant: a chunk is in the index only after its record was written to a
//! pack. A caller that saw a chunk in the index (dedup hit) and then calls
//! `sync` has that chunk durable, whichever capture wrote it.

pub mod gc;
mod groups;
mod index;
pub mod pack;
mod recovery;

use std::collections::{HashMap, HashSet};
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use index::ChunkIndex;

use crate::error::{Error, IoContext, Result};
use crate::fsio::{OpenMode, StoreFile, StoreFs};
use crate::ids::ChunkId;
use groups::{DecodedGroup, GroupCache};
use pack::{ChunkRecord, GroupRecord, IndexEntry, PACK_HEADER_LEN, RECORD_HEADER_LEN, RecordKind};
pub use recovery::Recovery;
use recovery::{list_packs, load_pack};

/// A pack is sealed once it grows past this many bytes.
pub const PACK_TARGET_LEN: u64 = 256 << 20;
// Record offsets are kept as u32 in memory: a pack never reaches 4 GiB.
const _: () = assert!(PACK_TARGET_LEN + (pack::MAX_CHUNK_LEN as u64) * 2 < u32::MAX as u64);

const PACK_SUFFIX: &str = ".pack";

/// Where a chunk's record lives. For a member of a group record, `offset`
/// is the group's and `stored_len` is flagged ([`pack::MEMBER_FLAG`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

/// The chunks one running capture has referenced: never collected while
/// the capture runs. Unregistered when dropped.
pub struct Pins {
    set: Mutex<HashSet<[u8; 16]>>,
    /// [`ChunkStore::sync_failures`] when the capture started.
    sync_failures: u64,
}

impl Pins {
    /// Pins chunks. Call with the capture's guard held
    /// ([`ChunkStore::lookup_guard`]) from the look-up that found them.
    pub fn add<'a>(&self, ids: impl IntoIterator<Item = &'a ChunkId>) {
        let mut set = self.set.lock();
        set.extend(ids.into_iter().map(pin_key));
    }

    fn contains(&self, id: &ChunkId) -> bool {
        self.set.lock().contains(&pin_key(id))
    }
}

fn pin_key(id: &ChunkId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k.copy_from_slice(&id.0[..16]);
    k
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
        let mut all = Vec::new();
        let mut max_seq = 0;
        for (seq, path) in list_packs(fs.as_ref(), dir)? {
            max_seq = max_seq.max(seq);
            match load_pack(fs.as_ref(), &path, &mut recovery, read_only) {
                Ok(entries) => all.extend(entries.into_iter().map(|e| {
                    let loc = ChunkLoc {
                        pack: seq,
                        offset: e.offset as u32,
                        stored_len: e.stored_len,
                    };
                    (e.id, loc)
                })),
                Err(e) => recovery.unreadable.push(e.to_string()),
            }
        }
        // One sort instead of a merge every few hundred inserts.
        let index = ChunkIndex::from_entries(all);
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
            fs,
        };
        Ok((store, recovery))
    }

    /// Registers the pins of a capture about to run.
    pub fn pin_scope(&self) -> Arc<Pins> {
        let pins = Arc::new(Pins {
            set: Mutex::new(HashSet::new()),
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

    /// True when the store holds this chunk (written, perhaps not yet synced).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.index.read().contains_key(id)
    }

    /// Number of distinct chunks stored.
    pub fn chunk_count(&self) -> usize {
        self.index.read().len()
    }

    /// Heap bytes the chunk index holds.
    pub fn index_bytes(&self) -> usize {
        self.index.read().heap_bytes()
    }

    /// Where a chunk lives, if stored.
    pub fn locate(&self, id: &ChunkId) -> Option<ChunkLoc> {
        self.index.read().get(id)
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
                let index = self.index.read();
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
            let mut index = self.index.write();
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
            if active.len >= PACK_TARGET_LEN {
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

    /// Seals the open pack (index, trailer, fsync). Called on clean close.
    pub fn close(&self) -> Result<()> {
        let mut w = self.writer.lock();
        self.seal(&mut w)?;
        if std::mem::take(&mut w.dir_dirty) {
            drop(w);
            self.sync_pack_dir()?;
        }
        Ok(())
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
        let mut loc = self.locate(id).ok_or(Error::ChunkMissing { chunk: *id })?;
        loop {
            match self.reader(loc.pack) {
                Ok(file) => return Ok((loc, file)),
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    let again = self.locate(id).ok_or(Error::ChunkMissing { chunk: *id })?;
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
        Ok(())
    }
}

impl Drop for ChunkStore {
    fn drop(&mut self) {
        // Best effort: an unsealed pack is recovered by a scan on next open.
        let _ = self.close();
    }
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
