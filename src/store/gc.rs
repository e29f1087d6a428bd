//! Garbage collection: gives back the space of chunks no snapshot needs.
//!
//! A record is *live* when the index points to it (not to another copy of
//! its chunk) and its chunk is needed: referenced by a completed snapshot
//! (the caller's `needed`) or pinned by a running capture. Sealed packs
//! holding no live record are deleted; packs holding garbage are rewritten,
//! most garbage first, until the garbage left is at most `max_unused` of
//! the live bytes (restic's prune policy). The open pack is never touched.
//!
//! Safety while captures, restores and deletes go on:
//! - a capture looks chunks up and pins them under
//!   [`ChunkStore::lookup_guard`] (shared); GC takes the same lock
//!   exclusively to re-check liveness and change the index, so a chunk a
//!   capture has just deduplicated against is pinned before GC decides,
//!   and a chunk GC removed is no longer found (the capture stores it
//!   again). Chunks written after GC started go to the open pack;
//! - a rewritten pack is written under a temporary name, fsynced, renamed
//!   and its directory fsynced before the index points into it; the old
//!   pack is deleted only after no index entry points into it. A reader
//!   that looked a chunk up in the old pack and finds the file gone looks
//!   it up again ([`ChunkStore::open_record`]);
//! - a crash at any point leaves each needed chunk in the old pack, the new
//!   one, or both (the next open takes the first copy; the next GC removes
//!   the other). Temporary files are removed on open.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::index::{Moves, move_key};
use super::pack::{
    self, ChunkRecord, GroupRecord, IndexEntry, PACK_HEADER_LEN, RECORD_HEADER_LEN, RecordKind,
    TRAILER_LEN,
};
use super::{ChunkLoc, ChunkStore, NewRecord, list_packs, pack_path, write_record};
use crate::error::{Error, IoContext, Result};
use crate::fsio::{OpenMode, StoreFs};
use crate::ids::ChunkId;

const TMP_PREFIX: &str = "gc-";
const TMP_SUFFIX: &str = ".tmp";

/// What a garbage collection did (or, dry, would do).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GcReport {
    pub dry_run: bool,
    /// Sealed packs looked at.
    pub packs_examined: u64,
    /// Packs deleted: nothing in them was needed.
    pub packs_dropped: u64,
    /// Packs whose needed records were copied to a new pack.
    pub packs_rewritten: u64,
    /// Records given back, and the pack bytes freed.
    pub chunks_reclaimed: u64,
    pub bytes_reclaimed: u64,
    /// Pack bytes on disk afterwards.
    pub bytes_stored: u64,
    /// Garbage bytes left in packs not worth rewriting.
    pub bytes_unused: u64,
    /// Packs left as they are because a needed record in them failed its
    /// checks while being copied (`verify` names it).
    pub packs_damaged: u64,
    /// Group records (compact setting) compressed again because some of
    /// their members were garbage.
    pub groups_recompressed: u64,
    /// Packs whose garbage at the end was cut off in place (no room
    /// needed: how a full disk gives back a failed capture's data).
    pub packs_cut: u64,
    /// Packs worth rewriting that were left as they are for want of free
    /// space, and the free bytes their rewrites would need: free that much
    /// (or delete more) and collect again.
    pub packs_short_of_space: u64,
    pub bytes_needed: u64,
    pub micros: u64,
}

/// How the store's bytes divide into what is needed and what is not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Space {
    /// Pack files' bytes on disk.
    pub stored_bytes: u64,
    /// Records of needed chunks: their bytes in the packs, before
    /// compression, and how many.
    pub live_bytes: u64,
    pub live_raw_bytes: u64,
    pub live_chunks: u64,
    /// Records nothing needs: what a full collection would give back.
    pub dead_bytes: u64,
    pub dead_chunks: u64,
}

/// One pack as GC sees it.
struct PackInfo {
    seq: u32,
    path: PathBuf,
    file_len: u64,
    entries: Vec<IndexEntry>,
    live: Vec<bool>,
}

impl PackInfo {
    fn live_bytes(&self) -> u64 {
        self.records(true).map(IndexEntry::accounted_len).sum()
    }

    fn dead_bytes(&self) -> u64 {
        self.records(false).map(IndexEntry::accounted_len).sum()
    }

    fn records(&self, live: bool) -> impl Iterator<Item = &IndexEntry> {
        self.entries
            .iter()
            .zip(&self.live)
            .filter(move |(_, l)| **l == live)
            .map(|(e, _)| e)
    }
}

/// Removes what an interrupted collection left: temporary pack files.
pub(super) fn remove_leftovers(fs: &dyn StoreFs, dir: &Path) -> Result<()> {
    for path in fs.list(dir).at(dir)? {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string());
        if name.is_some_and(|n| {
            n.starts_with(TMP_PREFIX) && n.ends_with(TMP_SUFFIX)
                || n == format!("{}.tmp", super::table::FILE_NAME)
        }) {
            fs.remove(&path).at(&path)?;
        }
    }
    Ok(())
}

/// An unsealed pack's records, by a forward scan, and its length.
fn scan_unsealed(fs: &dyn StoreFs, path: &Path) -> Result<(u64, Vec<IndexEntry>)> {
    let file = fs.open(path, OpenMode::Read).at(path)?;
    let len = file.len().at(path)?;
    let (entries, _) = super::recovery::scan_records(file.as_ref(), path, len)?;
    Ok((len, entries))
}

/// A sealed pack's index and length; `None` for an unsealed pack.
fn read_sealed(fs: &dyn StoreFs, path: &Path) -> Result<Option<(u64, Vec<IndexEntry>)>> {
    let file = fs.open(path, OpenMode::Read).at(path)?;
    let len = file.len().at(path)?;
    if len < (PACK_HEADER_LEN + TRAILER_LEN) as u64 {
        return Ok(None);
    }
    let mut t = [0u8; TRAILER_LEN];
    file.read_exact_at(&mut t, len - TRAILER_LEN as u64)
        .at(path)?;
    let Some(tr) = pack::decode_trailer(&t, len) else {
        return Ok(None);
    };
    let mut bytes = vec![0u8; tr.count as usize * pack::INDEX_ENTRY_LEN];
    file.read_exact_at(&mut bytes, tr.index_offset).at(path)?;
    let entries = pack::decode_index(&bytes, &tr).map_err(|w| Error::corrupt(path, w))?;
    Ok(Some((len, entries)))
}

impl ChunkStore {
    /// True when this record is the indexed copy of a needed chunk.
    /// A damaged chunk index table fails the collection: deciding a
    /// record is dead on a look-up that cannot be trusted could delete a
    /// needed chunk.
    fn record_live(
        &self,
        seq: u32,
        e: &IndexEntry,
        needed: &dyn Fn(&ChunkId) -> bool,
    ) -> Result<bool> {
        let found = self.index()?.get(&e.id);
        let here = found.map_err(|d| self.damaged(d))?
            == Some(ChunkLoc {
                pack: seq,
                offset: e.offset as u32,
                stored_len: e.stored_len,
            });
        Ok(here && (needed(&e.id) || self.is_pinned(&e.id)))
    }

    /// The sealed packs other than the open one, with each record's
    /// liveness now, and with `include_open` the open one as if sealed.
    /// Packs that cannot be read are left out (verify reports them).
    fn survey(
        &self,
        needed: &dyn Fn(&ChunkId) -> bool,
        include_open: bool,
    ) -> Result<Vec<PackInfo>> {
        let mut packs = Vec::new();
        self.survey_each(needed, include_open, &mut |p| {
            packs.push(p);
            Ok(())
        })?;
        Ok(packs)
    }

    /// [`Self::survey`], each pack handed to `each` as it is read, so
    /// that only one is held at a time.
    fn survey_each(
        &self,
        needed: &dyn Fn(&ChunkId) -> bool,
        include_open: bool,
        each: &mut dyn FnMut(PackInfo) -> Result<()>,
    ) -> Result<()> {
        let open = self
            .writer
            .lock()
            .active
            .as_ref()
            .map(|a| (a.seq, a.len, a.entries.clone()));
        let active = open.as_ref().map(|(seq, _, _)| *seq);
        let info = |seq, path, file_len, mut entries: Vec<IndexEntry>| -> Result<PackInfo> {
            entries.sort_by_key(|e| e.offset);
            Ok(PackInfo {
                live: entries
                    .iter()
                    .map(|e| self.record_live(seq, e, needed))
                    .collect::<Result<_>>()?,
                seq,
                path,
                file_len,
                entries,
            })
        };
        if let (true, Some((seq, len, entries))) = (include_open, open) {
            let sealed_len = len + (entries.len() * pack::INDEX_ENTRY_LEN + TRAILER_LEN) as u64;
            each(info(seq, pack_path(&self.dir, seq), sealed_len, entries)?)?;
        }
        for (seq, path) in list_packs(self.fs.as_ref(), &self.dir)? {
            if Some(seq) == active {
                continue;
            }
            // An unsealed pack that is not the open one (its seal failed,
            // or a failed fsync cut it back) is collected by its records.
            let found = match read_sealed(self.fs.as_ref(), &path) {
                Ok(Some(sealed)) => Some(sealed),
                Ok(None) => scan_unsealed(self.fs.as_ref(), &path).ok(),
                Err(_) => None,
            };
            let Some((file_len, entries)) = found else {
                continue;
            };
            each(info(seq, path, file_len, entries)?)?;
        }
        Ok(())
    }

    /// How the store's bytes divide between needed and unneeded records.
    pub fn space(&self, needed: &dyn Fn(&ChunkId) -> bool) -> Result<Space> {
        let mut space = Space::default();
        self.survey_each(needed, true, &mut |p| {
            space.stored_bytes += p.file_len;
            for (e, live) in p.entries.iter().zip(&p.live) {
                if *live {
                    space.live_bytes += e.accounted_len();
                    space.live_raw_bytes += u64::from(e.raw_len);
                    space.live_chunks += 1;
                } else {
                    space.dead_bytes += e.accounted_len();
                    space.dead_chunks += 1;
                }
            }
            Ok(())
        })?;
        Ok(space)
    }

    /// Collects garbage (see the module doc). `needed` says whether a
    /// completed snapshot references a chunk; `max_unused` is the share of
    /// the live bytes that may stay as garbage in packs not worth
    /// rewriting. With `dry_run` nothing changes and the report says what
    /// would be done. A group record some of whose members are garbage is
    /// compressed again, at `level`, with only the needed ones; `resized`
    /// hears of each member whose share of its group's bytes changed.
    pub fn gc(
        &self,
        needed: &dyn Fn(&ChunkId) -> bool,
        resized: &dyn Fn(&ChunkId, u32),
        max_unused: f64,
        dry_run: bool,
        level: i32,
    ) -> Result<GcReport> {
        let started = Instant::now();
        let one_at_a_time = self.gc_lock.lock();
        if !dry_run {
            // Seal the open pack so that its garbage can be collected too;
            // new chunks go to a new one. A seal that fails (a full disk)
            // has cut the pack back to what was durable, unsealed: it is
            // collected like any other (a scan gives its records).
            let mut w = self.writer.lock();
            let _ = self.seal(&mut w);
        }
        let mut packs = self.survey(needed, dry_run)?;
        let mut report = GcReport {
            dry_run,
            packs_examined: packs.len() as u64,
            ..GcReport::default()
        };
        let mut touched = false;
        // Garbage at the end of a pack is cut off in place first: it needs
        // no room, so a full disk can always give back the data of a
        // capture that failed for want of it.
        for p in packs.iter_mut() {
            if let Some(freed) = self.cut_dead_tail(p, needed, dry_run)? {
                touched |= !dry_run;
                report.packs_cut += 1;
                report.chunks_reclaimed += freed.0;
                report.bytes_reclaimed += freed.1;
            }
        }
        let live_total: u64 = packs.iter().map(PackInfo::live_bytes).sum();
        let (empty, mut partial): (Vec<&PackInfo>, Vec<&PackInfo>) =
            packs.iter().partition(|p| p.live.iter().all(|l| !l));
        partial.retain(|p| p.dead_bytes() > 0);
        // Most garbage first, until what is left is within the allowance.
        partial.sort_by_key(|p| std::cmp::Reverse(p.dead_bytes()));
        let allowance = (live_total as f64 * max_unused.max(0.0)) as u64;
        let mut unused: u64 = partial.iter().map(|p| p.dead_bytes()).sum();
        let rewrite: Vec<&PackInfo> = partial
            .into_iter()
            .take_while(|p| {
                let go = unused > allowance;
                if go {
                    unused -= p.dead_bytes();
                }
                go
            })
            .collect();
        report.bytes_unused = unused;
        for p in &empty {
            if dry_run || self.drop_pack(p, needed)? {
                report.packs_dropped += 1;
                report.chunks_reclaimed += p.entries.len() as u64;
                report.bytes_reclaimed += p.file_len;
                touched |= !dry_run;
            }
        }
        for p in &rewrite {
            let new_len = if dry_run {
                Some((estimate_rewritten_len(p), 0))
            } else {
                match self.rewrite_pack(p, needed, resized, level) {
                    Ok(n) => n,
                    // Keep a damaged pack as it is: its other records are
                    // still readable, and verify reports the damage.
                    Err(e) if e.is_corruption() => {
                        report.packs_damaged += 1;
                        None
                    }
                    // No room for the copy: the pack stays, and the report
                    // says how much room its rewrite needs.
                    Err(Error::Io { source, .. })
                        if source.raw_os_error() == Some(libc::ENOSPC) =>
                    {
                        report.packs_short_of_space += 1;
                        report.bytes_needed += estimate_rewritten_len(p);
                        None
                    }
                    Err(e) => return Err(e),
                }
            };
            if let Some((new_len, recompressed)) = new_len {
                report.groups_recompressed += recompressed;
                report.packs_rewritten += 1;
                report.chunks_reclaimed += p.live.iter().filter(|l| !**l).count() as u64;
                report.bytes_reclaimed += p.file_len.saturating_sub(new_len);
                touched |= !dry_run;
            }
        }
        if touched {
            self.sync_dir()?;
            // The table on disk covers packs that are gone or changed now:
            // a new one, from the index as GC left it. Best effort: if it
            // cannot be written, the next open finds the old one stale and
            // rebuilds it from the packs.
            let _ = self.persist_index(&one_at_a_time);
        }
        let open_len = if dry_run {
            0 // surveyed as a pack
        } else {
            self.writer.lock().active.as_ref().map_or(0, |a| a.len)
        };
        let before: u64 = packs.iter().map(|p| p.file_len).sum::<u64>() + open_len;
        report.bytes_stored = before.saturating_sub(report.bytes_reclaimed);
        report.micros = started.elapsed().as_micros() as u64;
        Ok(report)
    }

    /// Cuts off the records at the end of `p` that nothing needs (after its
    /// last live record), in place: under the guard, re-checks that none
    /// became live and takes them out of the index; then shortens the file
    /// and writes the index and trailer of what is left, and fsyncs. A
    /// crash in between leaves the pack unsealed, which the next open
    /// scans. Returns the chunks and bytes given back, `None` when the pack
    /// has no dead tail (or all of it is dead: it is dropped instead).
    fn cut_dead_tail(
        &self,
        p: &mut PackInfo,
        needed: &dyn Fn(&ChunkId) -> bool,
        dry_run: bool,
    ) -> Result<Option<(u64, u64)>> {
        let Some(cut) = dead_tail(p) else {
            return Ok(None);
        };
        let keep = p.entries.iter().take_while(|e| e.offset < cut).count();
        let new_len = cut + (keep * pack::INDEX_ENTRY_LEN + TRAILER_LEN) as u64;
        let freed = (
            (p.entries.len() - keep) as u64,
            p.file_len.saturating_sub(new_len),
        );
        if !dry_run {
            let moves: Moves = p.entries[keep..]
                .iter()
                .map(|e| (move_key(e.offset, &e.id), None))
                .collect();
            {
                let _guard = self.gc_guard.write();
                let tail = &p.entries[keep..];
                for e in tail {
                    if self.record_live(p.seq, e, needed)? {
                        return Ok(None);
                    }
                }
                self.index_mut()?
                    .relocate(p.seq, p.seq, &moves, tail)
                    .map_err(|d| self.damaged(d))?;
            }
            let file = self.fs.open(&p.path, OpenMode::ReadWrite).at(&p.path)?;
            file.set_len(cut).at(&p.path)?;
            let tail = pack::encode_index(&p.entries[..keep], cut);
            file.write_all_at(&tail, cut).at(&p.path)?;
            file.sync().at(&p.path)?;
        }
        p.entries.truncate(keep);
        p.live.truncate(keep);
        p.file_len = new_len;
        Ok(Some(freed))
    }

    /// Deletes a pack with no live record, unless one became live since
    /// the survey (a capture deduplicated against it). Returns whether it
    /// was deleted.
    fn drop_pack(&self, p: &PackInfo, needed: &dyn Fn(&ChunkId) -> bool) -> Result<bool> {
        let moves: Moves = p
            .entries
            .iter()
            .map(|e| (move_key(e.offset, &e.id), None))
            .collect();
        self.commit(p, p.seq, &moves, &HashSet::new(), needed)
    }

    /// Copies a pack's live records into a new, durable pack, points the
    /// index there and deletes the old pack. Returns the new pack's length
    /// and how many groups were compressed again, or `None` when a record
    /// became live since the survey and was not copied (the old pack then
    /// stays; the next GC looks again).
    fn rewrite_pack(
        &self,
        p: &PackInfo,
        needed: &dyn Fn(&ChunkId) -> bool,
        resized: &dyn Fn(&ChunkId, u32),
        level: i32,
    ) -> Result<Option<(u64, u64)>> {
        let seq = {
            let mut w = self.writer.lock();
            let seq = w.next_seq;
            w.next_seq += 1;
            seq
        };
        let tmp = self.dir.join(format!("{TMP_PREFIX}{seq:08}{TMP_SUFFIX}"));
        let copied = copy_records(self.fs.as_ref(), p, &tmp, level);
        let (pairs, new_len, recompressed) = match copied {
            Ok(done) => done,
            Err(e) => {
                let _ = self.fs.remove(&tmp);
                return Err(e);
            }
        };
        let final_path = pack_path(&self.dir, seq);
        if let Err(e) = self.fs.rename(&tmp, &final_path) {
            let _ = self.fs.remove(&tmp);
            return Err(Error::io(final_path, e));
        }
        self.sync_dir()?;
        let moves: Moves = p
            .entries
            .iter()
            .map(|e| (move_key(e.offset, &e.id), None))
            .chain(pairs.iter().map(|(old, new)| {
                let to = (new.offset as u32, new.stored_len);
                (move_key(old.offset, &old.id), Some(to))
            }))
            .collect();
        let copied: HashSet<(u32, [u8; 16])> = pairs
            .iter()
            .map(|(old, _)| move_key(old.offset, &old.id))
            .collect();
        if self.commit(p, seq, &moves, &copied, needed)? {
            // A group compressed again gives its members other shares.
            for (old, new) in &pairs {
                if old.accounted_len() != new.accounted_len() {
                    resized(
                        &old.id,
                        u32::try_from(new.accounted_len()).unwrap_or(u32::MAX),
                    );
                }
            }
            Ok(Some((new_len, recompressed)))
        } else {
            // Nothing points into the new pack: a duplicate, removed now.
            self.fs.remove(&final_path).at(&final_path)?;
            Ok(None)
        }
    }

    /// Under the guard: re-checks that every record of `p` live now is in
    /// `copied`, then applies `moves` to the index (into pack `to`), and
    /// deletes `p` once nothing points into it.
    fn commit(
        &self,
        p: &PackInfo,
        to: u32,
        moves: &Moves,
        copied: &HashSet<(u32, [u8; 16])>,
        needed: &dyn Fn(&ChunkId) -> bool,
    ) -> Result<bool> {
        let left = {
            let _guard = self.gc_guard.write();
            for e in &p.entries {
                if !copied.contains(&move_key(e.offset, &e.id))
                    && self.record_live(p.seq, e, needed)?
                {
                    return Ok(false);
                }
            }
            self.index_mut()?
                .relocate(p.seq, to, moves, &p.entries)
                .map_err(|d| self.damaged(d))?
        };
        if left > 0 {
            // Cannot happen (every record of the pack is in `moves`); keep
            // the pack rather than lose what still points into it.
            return Ok(true);
        }
        self.readers.write().remove(&p.seq);
        self.fs.remove(&p.path).at(&p.path)?;
        Ok(true)
    }
}

/// Where `p`'s dead tail starts: the offset of the first record after its
/// last live one, if there is such a record and the pack has a live one
/// (records are contiguous, a group's members share its offset).
fn dead_tail(p: &PackInfo) -> Option<u64> {
    let last_live = p
        .entries
        .iter()
        .zip(&p.live)
        .filter(|(_, l)| **l)
        .map(|(e, _)| e.offset)
        .max()?;
    p.entries
        .iter()
        .map(|e| e.offset)
        .filter(|&o| o > last_live)
        .min()
}

/// What a rewritten pack would measure: header, live records, index, trailer.
fn estimate_rewritten_len(p: &PackInfo) -> u64 {
    let live = p.records(true).count() as u64;
    PACK_HEADER_LEN as u64
        + p.live_bytes()
        + live * pack::INDEX_ENTRY_LEN as u64
        + TRAILER_LEN as u64
}

/// Each live entry with its entry in the new pack, the new pack's length,
/// and how many groups were compressed again.
type Copied = (Vec<(IndexEntry, IndexEntry)>, u64, u64);

/// Writes the live records of pack `p` into a new sealed pack at `to`,
/// checking each on the way (header CRC, id, payload CRC; a group's table
/// and frame), and fsyncs it. A group with garbage members is compressed
/// again at `level` with its live members only. Returns each live entry
/// with its new entry, the new pack's length and how many groups were
/// compressed again.
fn copy_records(fs: &dyn StoreFs, p: &PackInfo, to: &Path, level: i32) -> Result<Copied> {
    let from = p.path.as_path();
    let src = fs.open(from, OpenMode::Read).at(from)?;
    let dst = fs.open(to, OpenMode::CreateNew).at(to)?;
    dst.write_all_at(&pack::encode_pack_header(), 0).at(to)?;
    // Each record's entries (one, or a group's members) and their liveness.
    let mut records: BTreeMap<u64, Vec<(IndexEntry, bool)>> = BTreeMap::new();
    for (e, live) in p.entries.iter().zip(&p.live) {
        records.entry(e.offset).or_default().push((*e, *live));
    }
    let mut at = PACK_HEADER_LEN as u64;
    let mut recompressed = 0;
    let mut pairs = Vec::new();
    let mut entries = Vec::new();
    let mut buf = Vec::new();
    for (offset, members) in records {
        if !members.iter().any(|(_, live)| *live) {
            continue;
        }
        let damaged = |what: String| {
            Error::corrupt(
                from,
                format!("the record at offset {offset} is damaged ({what}); run verify"),
            )
        };
        let mut header = [0u8; RECORD_HEADER_LEN];
        src.read_exact_at(&mut header, offset).at(from)?;
        let h = pack::RecordHeader::decode(&header).map_err(&damaged)?;
        buf.resize(h.record_len() as usize, 0);
        src.read_exact_at(&mut buf, offset).at(from)?;
        // A record copied as it is, unless it is a group with garbage.
        match h.kind {
            RecordKind::Group => {
                let mut data = Vec::new();
                let table = pack::decode_group(&buf, &mut data).map_err(&damaged)?;
                let all_live = members.len() == table.len() && members.iter().all(|(_, l)| *l);
                if !all_live {
                    let live = members.iter().filter(|(_, l)| *l).map(|(e, _)| e);
                    let new = reencode(&table, &data, live, level).map_err(&damaged)?;
                    recompressed += 1;
                    for (old, rec) in new {
                        let written = write_record(dst.as_ref(), to, &rec.record(), at)?;
                        for (o, n) in old.iter().zip(written.0) {
                            pairs.push((**o, n));
                            entries.push(n);
                        }
                        at += written.1;
                    }
                    continue;
                }
            }
            _ => {
                let [(e, _)] = members[..] else {
                    return Err(damaged(
                        "several index entries name one chunk record".into(),
                    ));
                };
                if h.id != e.id || crc32fast::hash(&buf[RECORD_HEADER_LEN..]) != h.payload_crc {
                    return Err(damaged(format!("chunk {} does not check", e.id)));
                }
            }
        }
        dst.write_all_at(&buf, at).at(to)?;
        for (e, _) in &members {
            let n = IndexEntry { offset: at, ..*e };
            pairs.push((*e, n));
            entries.push(n);
        }
        at += buf.len() as u64;
    }
    let tail = pack::encode_index(&entries, at);
    dst.write_all_at(&tail, at).at(to)?;
    dst.sync().at(to)?;
    Ok((pairs, at + tail.len() as u64, recompressed))
}

/// A record made again from some members of a decoded group, and the old
/// entries it replaces, in its entries' order.
type Reencoded<'e> = (Vec<&'e IndexEntry>, Owned);

/// An owned record to write: a group, or one chunk and its frame.
enum Owned {
    Group(GroupRecord),
    Chunk(ChunkId, Vec<u8>, Option<Vec<u8>>),
}

impl Owned {
    fn record(&self) -> NewRecord<'_> {
        match self {
            Owned::Group(g) => NewRecord::Group(g),
            Owned::Chunk(id, raw, z) => NewRecord::Chunk(ChunkRecord {
                id: *id,
                raw,
                compressed: z.as_deref(),
            }),
        }
    }
}

/// The `live` members of a decoded group (each checked against its
/// BLAKE3 id) as a smaller group, or as one record each when fewer than two
/// are left or grouping them no longer pays.
fn reencode<'e>(
    table: &[(ChunkId, std::ops::Range<usize>)],
    data: &[u8],
    live: impl Iterator<Item = &'e IndexEntry>,
    level: i32,
) -> std::result::Result<Vec<Reencoded<'e>>, String> {
    let mut olds = Vec::new();
    let mut members = Vec::new();
    for e in live {
        members.push((e.id, pack::group_member(table, data, &e.id)?));
        olds.push(e);
    }
    let fail = |e: Error| e.to_string();
    if members.len() >= 2
        && let Some(g) = GroupRecord::compress(&members, level).map_err(fail)?
    {
        return Ok(vec![(olds, Owned::Group(g))]);
    }
    members
        .iter()
        .zip(olds)
        .map(|((id, bytes), old)| {
            let z = pack::compress(bytes, level).map_err(fail)?;
            Ok((vec![old], Owned::Chunk(*id, bytes.to_vec(), z)))
        })
        .collect()
}
