//! Pack files: append-only sequences of CRC-framed chunk records, sealed with
//! a trailing index. Byte layout in docs/FORMAT.md ("Pack files").
//!
//! ```text
//! header   magic "BSNPPACK" | version u8 | reserved [3] | crc32 u32        16 bytes
//! record*  kind u8 | reserved [3] | raw_len u32 | stored_len u32 |
//!          chunk id [32] | payload crc32 u32 | header crc32 u32          52 bytes
//!          payload [stored_len]
//!          (kind 3, a group: payload = count u16 | reserved u16 |
//!          count x (chunk id [32] | raw_len u32) | one zstd frame of the
//!          members' bytes laid end to end; the header's id is the first
//!          member's)
//! index    (sealed packs) entry*: chunk id [32] | offset u64 |
//!          stored_len u32 | raw_len u32                                48 bytes each
//!          (a group member's entry: the group's offset, and in stored_len
//!          MEMBER_FLAG | its share of the group record's bytes)
//! trailer  magic "BSNPPEND" | index offset u64 | entry count u32 |
//!          index crc32 u32 | reserved u32 | trailer crc32 u32             32 bytes
//! ```
//!
//! A pack is readable by a forward scan alone; the index only makes opening
//! fast. All integers are little-endian.

use std::cell::RefCell;

use crate::error::{Error, Result};
use crate::ids::ChunkId;
use crate::le;

pub const PACK_MAGIC: [u8; 8] = *b"BSNPPACK";
pub const TRAILER_MAGIC: [u8; 8] = *b"BSNPPEND";

// Pack header layout.
const H_MAGIC: usize = 0;
const H_VERSION: usize = H_MAGIC + 8;
const H_RESERVED: usize = H_VERSION + 1;
const H_CRC: usize = H_RESERVED + 3;
pub const PACK_HEADER_LEN: usize = H_CRC + 4;
const _: () = assert!(PACK_HEADER_LEN == 16);

// Record header layout.
const R_KIND: usize = 0;
const R_RESERVED: usize = R_KIND + 1;
const R_RAW_LEN: usize = R_RESERVED + 3;
const R_STORED_LEN: usize = R_RAW_LEN + 4;
const R_ID: usize = R_STORED_LEN + 4;
const R_PAYLOAD_CRC: usize = R_ID + 32;
const R_HEADER_CRC: usize = R_PAYLOAD_CRC + 4;
pub const RECORD_HEADER_LEN: usize = R_HEADER_CRC + 4;
const _: () = assert!(RECORD_HEADER_LEN == 52);

// Index entry layout.
const E_ID: usize = 0;
const E_OFFSET: usize = E_ID + 32;
const E_STORED_LEN: usize = E_OFFSET + 8;
const E_RAW_LEN: usize = E_STORED_LEN + 4;
pub const INDEX_ENTRY_LEN: usize = E_RAW_LEN + 4;
const _: () = assert!(INDEX_ENTRY_LEN == 48);

// Trailer layout.
const T_MAGIC: usize = 0;
const T_INDEX_OFFSET: usize = T_MAGIC + 8;
const T_COUNT: usize = T_INDEX_OFFSET + 8;
const T_INDEX_CRC: usize = T_COUNT + 4;
const T_RESERVED: usize = T_INDEX_CRC + 4;
const T_CRC: usize = T_RESERVED + 4;
pub const TRAILER_LEN: usize = T_CRC + 4;
const _: () = assert!(TRAILER_LEN == 32);

/// The largest chunk a record may hold: the largest block size. A group
/// record's members add up to at most this too.
pub const MAX_CHUNK_LEN: usize = 4 << 20;

/// The most members a group record holds.
pub const MAX_GROUP_MEMBERS: usize = 256;

// Group payload layout: the member table, then the frame.
const G_COUNT: usize = 0;
const G_RESERVED: usize = G_COUNT + 2;
const G_TABLE: usize = G_RESERVED + 2;
const G_MEMBER_LEN: usize = 36;

/// The largest payload of a zstd record (a frame may outgrow its input a
/// little; the capture never stores one that does).
const MAX_ZSTD_STORED_LEN: usize = MAX_CHUNK_LEN + 1024;
/// The largest payload of a group record: the whole table and a frame no
/// longer than the members' bytes.
const MAX_GROUP_STORED_LEN: usize = G_TABLE + MAX_GROUP_MEMBERS * G_MEMBER_LEN + MAX_CHUNK_LEN;

/// A decoded group's members: each chunk's id and its bytes' range in the
/// decompressed frame.
pub type Members = Vec<(ChunkId, std::ops::Range<usize>)>;

/// Set in a pack index entry's (and the chunk index's) stored length for a
/// group member: the rest is the member's share of its group record's
/// bytes, which is what it accounts for in space reports.
pub const MEMBER_FLAG: u32 = 1 << 31;

/// Pack format versions this code reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackVersion {
    V1 = 1,
}

impl TryFrom<u8> for PackVersion {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            1 => Ok(PackVersion::V1),
            other => Err(format!("unsupported pack version {other}")),
        }
    }
}

/// How a record's payload is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// The block's bytes as they are (compression did not pay).
    Raw = 1,
    /// The block's bytes as one zstd frame.
    Zstd = 2,
    /// Several chunks as one zstd frame, after a table of their ids and
    /// lengths (the compact setting: more context, fewer bytes).
    Group = 3,
}

impl TryFrom<u8> for RecordKind {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            1 => Ok(RecordKind::Raw),
            2 => Ok(RecordKind::Zstd),
            3 => Ok(RecordKind::Group),
            other => Err(format!("unknown record kind {other}")),
        }
    }
}

/// The 16-byte header every pack starts with.
pub fn encode_pack_header() -> [u8; PACK_HEADER_LEN] {
    let mut h = [0u8; PACK_HEADER_LEN];
    h[H_MAGIC..H_VERSION].copy_from_slice(&PACK_MAGIC);
    h[H_VERSION] = PackVersion::V1 as u8;
    let crc = crc32fast::hash(&h[..H_CRC]);
    h[H_CRC..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a pack header; the error text says what is wrong.
pub fn check_pack_header(h: &[u8]) -> Result<PackVersion, String> {
    if h.len() < PACK_HEADER_LEN {
        return Err("file shorter than a pack header".into());
    }
    if h[H_MAGIC..H_VERSION] != PACK_MAGIC {
        return Err("bad pack magic".into());
    }
    if crc32fast::hash(&h[..H_CRC]) != le::u32_at(h, H_CRC) {
        return Err("pack header checksum mismatch".into());
    }
    PackVersion::try_from(h[H_VERSION])
}

/// Compresses `data` with zstd at `level`; `Some` only when that saves at
/// least 1/32 of the bytes (otherwise the chunk is stored raw).
///
/// zstd writes into a per-thread scratch buffer capped at the size that
/// pays, so incompressible data stops early and no chunk-sized output
/// buffer is allocated (and page-faulted in) per call; only the compressed
/// bytes are copied out.
pub fn compress(data: &[u8], level: i32) -> Result<Option<Vec<u8>>> {
    thread_local! {
        static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        Ok(compress_paying(data, level, &mut scratch)?.map(|n| scratch[..n].to_vec()))
    })
}

/// Compresses `data` into `out` (grown as needed), capped at the size that
/// saves 1/32: `Some(len)` when it fits, `None` when compression does not
/// pay. One zstd context per thread and level, reused.
fn compress_paying(data: &[u8], level: i32, out: &mut Vec<u8>) -> Result<Option<usize>> {
    thread_local! {
        static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { RefCell::new(None) };
    }
    let limit = data.len() - data.len() / 32;
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            let c = zstd::bulk::Compressor::new(level).map_err(|e| {
                Error::Internal(format!(
                    "cannot make a zstd compressor at level {level}: {e}"
                ))
            })?;
            *slot = Some((level, c));
        }
        let Some((_, c)) = slot.as_mut() else {
            return Ok(None);
        };
        if out.len() < limit {
            out.resize(limit, 0);
        }
        // An error here is zstd running out of room: it does not pay.
        Ok(c.compress_to_buffer(data, &mut out[..limit]).ok())
    })
}

/// Several new chunks compressed together as one group record.
pub struct GroupRecord {
    members: Vec<(ChunkId, u32)>,
    raw_len: u32,
    payload: Vec<u8>,
}

impl GroupRecord {
    /// Compresses `members` (ids and bytes, at least two, at most
    /// [`MAX_GROUP_MEMBERS`] and [`MAX_CHUNK_LEN`] bytes in all) as one
    /// frame. `None` when that does not save 1/32 of their bytes: they are
    /// then stored one record each.
    pub fn compress(members: &[(ChunkId, &[u8])], level: i32) -> Result<Option<GroupRecord>> {
        thread_local! {
            static JOINED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
            static FRAME: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let raw_len: usize = members.iter().map(|(_, b)| b.len()).sum();
        if members.len() < 2 || members.len() > MAX_GROUP_MEMBERS || raw_len > MAX_CHUNK_LEN {
            return Err(Error::InvalidParameter(format!(
                "a group holds 2 to {MAX_GROUP_MEMBERS} chunks of at most {MAX_CHUNK_LEN} bytes \
                 in all, not {} of {raw_len}",
                members.len()
            )));
        }
        JOINED.with(|joined| {
            FRAME.with(|frame| {
                let (mut joined, mut frame) = (joined.borrow_mut(), frame.borrow_mut());
                joined.clear();
                for (_, b) in members {
                    joined.extend_from_slice(b);
                }
                let Some(n) = compress_paying(&joined, level, &mut frame)? else {
                    return Ok(None);
                };
                let table = G_TABLE + members.len() * G_MEMBER_LEN;
                let mut payload = Vec::with_capacity(table + n);
                payload.extend_from_slice(&(members.len() as u16).to_le_bytes());
                payload.extend_from_slice(&[0, 0]);
                for (id, b) in members {
                    payload.extend_from_slice(&id.0);
                    payload.extend_from_slice(&(b.len() as u32).to_le_bytes());
                }
                payload.extend_from_slice(&frame[..n]);
                Ok(Some(GroupRecord {
                    members: members
                        .iter()
                        .map(|(id, b)| (*id, b.len() as u32))
                        .collect(),
                    raw_len: raw_len as u32,
                    payload,
                }))
            })
        })
    }

    /// The members' ids and lengths, in order.
    pub fn members(&self) -> &[(ChunkId, u32)] {
        &self.members
    }

    /// The bytes stored after the header: the table and the frame.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The record header that frames this group.
    pub fn header(&self) -> [u8; RECORD_HEADER_LEN] {
        encode_header(
            RecordKind::Group,
            self.raw_len,
            &self.members[0].0,
            &self.payload,
        )
    }

    /// The pack index entries of its members, for the record at `offset`.
    pub fn index_entries(&self, offset: u64) -> Vec<IndexEntry> {
        member_entries(offset, self.payload.len() as u32, &self.members)
    }
}

/// The pack index entries of a group record's members: each at the
/// group's offset, flagged, with its share (by raw bytes) of the record's
/// bytes; the shares add up to the whole record.
pub fn member_entries(offset: u64, stored_len: u32, members: &[(ChunkId, u32)]) -> Vec<IndexEntry> {
    let record = RECORD_HEADER_LEN as u64 + u64::from(stored_len);
    let total: u64 = members
        .iter()
        .map(|(_, r)| u64::from(*r))
        .sum::<u64>()
        .max(1);
    let mut given = 0u64;
    members
        .iter()
        .enumerate()
        .map(|(i, (id, raw))| {
            let share = if i + 1 == members.len() {
                record - given
            } else {
                record * u64::from(*raw) / total
            };
            given += share;
            IndexEntry {
                id: *id,
                offset,
                stored_len: MEMBER_FLAG | share as u32,
                raw_len: *raw,
            }
        })
        .collect()
}

/// A group record's payload, checked: its members (id, byte range in the
/// decompressed frame) and the frame.
pub fn decode_group_table(payload: &[u8], raw_len: u32) -> Result<(Members, &[u8]), String> {
    let head = payload.get(..G_TABLE).ok_or("truncated group table")?;
    let count = usize::from(u16::from_le_bytes([head[G_COUNT], head[G_COUNT + 1]]));
    if !(2..=MAX_GROUP_MEMBERS).contains(&count) || head[G_RESERVED..G_TABLE] != [0, 0] {
        return Err(format!("group table holds {count} members"));
    }
    let table = payload
        .get(G_TABLE..G_TABLE + count * G_MEMBER_LEN)
        .ok_or("truncated group table")?;
    let mut members = Vec::with_capacity(count);
    let mut at = 0usize;
    for m in table.chunks_exact(G_MEMBER_LEN) {
        let len = le::u32_at(m, 32) as usize;
        if len == 0 || at + len > raw_len as usize {
            return Err("group member lengths do not add up".into());
        }
        members.push((le::chunk_id_at(m, 0), at..at + len));
        at += len;
    }
    if at != raw_len as usize {
        return Err("group member lengths do not add up".into());
    }
    Ok((members, &payload[G_TABLE + count * G_MEMBER_LEN..]))
}

/// The bytes of member `expect` of a decoded group, checked against its
/// BLAKE3 id.
pub fn group_member<'d>(
    members: &[(ChunkId, std::ops::Range<usize>)],
    data: &'d [u8],
    expect: &ChunkId,
) -> Result<&'d [u8], String> {
    let (_, range) = members
        .iter()
        .find(|(id, _)| id == expect)
        .ok_or_else(|| format!("group does not hold chunk {expect}"))?;
    let bytes = data
        .get(range.clone())
        .ok_or("group member outside its frame")?;
    if ChunkId::of(bytes) != *expect {
        return Err("content does not match its BLAKE3 id".into());
    }
    Ok(bytes)
}

/// A whole group record, checked and decompressed into `data` (resized
/// to the members' length; pass a buffer back in to reuse it): returns its
/// members (id, byte range in `data`). Checks the header, the payload
/// CRC32, the table and the frame's length; each member's BLAKE3 is the
/// reader's to check.
pub fn decode_group(record: &[u8], data: &mut Vec<u8>) -> Result<Members, String> {
    let h = RecordHeader::decode(record)?;
    if h.kind != RecordKind::Group {
        return Err("not a group record".into());
    }
    let payload = record
        .get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + h.stored_len as usize)
        .ok_or("truncated record payload")?;
    if crc32fast::hash(payload) != h.payload_crc {
        return Err("payload checksum mismatch".into());
    }
    let (members, frame) = decode_group_table(payload, h.raw_len)?;
    if members[0].0 != h.id {
        return Err("group header names another first member".into());
    }
    data.resize(h.raw_len as usize, 0);
    decompress_into(frame, data)?;
    Ok(members)
}

/// A chunk about to be appended: its raw bytes and, when compression paid,
/// the zstd frame that is stored instead. Borrows both, so a raw chunk is
/// written straight from the window it was read into.
#[derive(Clone, Copy)]
pub struct ChunkRecord<'a> {
    pub id: ChunkId,
    pub raw: &'a [u8],
    pub compressed: Option<&'a [u8]>,
}

impl ChunkRecord<'_> {
    pub fn kind(&self) -> RecordKind {
        if self.compressed.is_some() {
            RecordKind::Zstd
        } else {
            RecordKind::Raw
        }
    }

    /// The bytes stored after the header.
    pub fn payload(&self) -> &[u8] {
        self.compressed.unwrap_or(self.raw)
    }

    /// Its pack index entry, for the record at `offset`.
    pub fn index_entry(&self, offset: u64) -> IndexEntry {
        IndexEntry {
            id: self.id,
            offset,
            stored_len: self.payload().len() as u32,
            raw_len: self.raw.len() as u32,
        }
    }

    /// The record header that frames this chunk.
    pub fn header(&self) -> [u8; RECORD_HEADER_LEN] {
        encode_header(self.kind(), self.raw.len() as u32, &self.id, self.payload())
    }
}

fn encode_header(
    kind: RecordKind,
    raw_len: u32,
    id: &ChunkId,
    payload: &[u8],
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[R_KIND] = kind as u8;
    h[R_RAW_LEN..R_STORED_LEN].copy_from_slice(&raw_len.to_le_bytes());
    h[R_STORED_LEN..R_ID].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[R_ID..R_PAYLOAD_CRC].copy_from_slice(&id.0);
    let pcrc = crc32fast::hash(payload);
    h[R_PAYLOAD_CRC..R_HEADER_CRC].copy_from_slice(&pcrc.to_le_bytes());
    let hcrc = crc32fast::hash(&h[..R_HEADER_CRC]);
    h[R_HEADER_CRC..].copy_from_slice(&hcrc.to_le_bytes());
    h
}

/// A record header, checked and decoded.
#[derive(Clone, Copy, Debug)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub raw_len: u32,
    pub stored_len: u32,
    pub id: ChunkId,
    pub payload_crc: u32,
}

impl RecordHeader {
    /// Decodes and checks a 52-byte record header (its own CRC, kind, lengths).
    pub fn decode(h: &[u8]) -> Result<Self, String> {
        if h.len() < RECORD_HEADER_LEN {
            return Err("truncated record header".into());
        }
        if crc32fast::hash(&h[..R_HEADER_CRC]) != le::u32_at(h, R_HEADER_CRC) {
            return Err("record header checksum mismatch".into());
        }
        let kind = RecordKind::try_from(h[R_KIND])?;
        let raw_len = le::u32_at(h, R_RAW_LEN);
        let stored_len = le::u32_at(h, R_STORED_LEN);
        let max_stored = match kind {
            RecordKind::Raw => MAX_CHUNK_LEN,
            RecordKind::Zstd => MAX_ZSTD_STORED_LEN,
            RecordKind::Group => MAX_GROUP_STORED_LEN,
        };
        if raw_len as usize > MAX_CHUNK_LEN || stored_len as usize > max_stored {
            return Err(format!(
                "record lengths out of range ({raw_len}/{stored_len})"
            ));
        }
        if kind == RecordKind::Raw && raw_len != stored_len {
            return Err("raw record with differing lengths".into());
        }
        Ok(RecordHeader {
            kind,
            raw_len,
            stored_len,
            id: le::chunk_id_at(h, R_ID),
            payload_crc: le::u32_at(h, R_PAYLOAD_CRC),
        })
    }

    /// Total bytes of the record, header included.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.stored_len)
    }
}

/// Checks a whole record (header and payload, as read from a pack) and
/// returns the chunk's original bytes: payload CRC32, decompression to exactly
/// `raw_len` bytes, and BLAKE3 of the result against `expect`.
pub fn decode_record(record: &[u8], expect: &ChunkId) -> Result<Vec<u8>, String> {
    let h = RecordHeader::decode(record)?;
    if h.kind == RecordKind::Group {
        let mut data = Vec::new();
        let members = decode_group(record, &mut data)?;
        return group_member(&members, &data, expect).map(<[u8]>::to_vec);
    }
    if h.id != *expect {
        return Err(format!("record holds chunk {} instead", h.id));
    }
    let end = RECORD_HEADER_LEN + h.stored_len as usize;
    let payload = record
        .get(RECORD_HEADER_LEN..end)
        .ok_or("truncated record payload")?;
    if crc32fast::hash(payload) != h.payload_crc {
        return Err("payload checksum mismatch".into());
    }
    let data = if h.kind == RecordKind::Raw {
        payload.to_vec()
    } else {
        decompress(payload, h.raw_len as usize)?
    };
    if data.len() != h.raw_len as usize {
        return Err("decompressed length mismatch".into());
    }
    if ChunkId::of(&data) != *expect {
        return Err("content does not match its BLAKE3 id".into());
    }
    Ok(data)
}

/// Decompresses one zstd frame into exactly `out.len()` bytes.
pub fn decompress_into(payload: &[u8], out: &mut [u8]) -> Result<(), String> {
    with_decompressor(|d| {
        let n = d
            .decompress_to_buffer(payload, out)
            .map_err(|e| format!("zstd frame does not decode: {e}"))?;
        if n == out.len() {
            Ok(())
        } else {
            Err("decompressed length mismatch".into())
        }
    })
}

fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> Result<T, String>,
) -> Result<T, String> {
    thread_local! {
        static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { RefCell::new(None) };
    }
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        f(slot.as_mut().ok_or("no decompressor")?)
    })
}

fn decompress(payload: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; raw_len];
    decompress_into(payload, &mut out)?;
    Ok(out)
}

/// One entry of a sealed pack's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub id: ChunkId,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
}

impl IndexEntry {
    /// A member of a group record (see [`MEMBER_FLAG`]).
    pub fn is_member(&self) -> bool {
        self.stored_len & MEMBER_FLAG != 0
    }

    /// The pack bytes this chunk accounts for: its whole record, or its
    /// share of its group's.
    pub fn accounted_len(&self) -> u64 {
        accounted_len(self.stored_len)
    }
}

/// See [`IndexEntry::accounted_len`], from an entry's stored length.
pub fn accounted_len(stored_len: u32) -> u64 {
    if stored_len & MEMBER_FLAG != 0 {
        u64::from(stored_len & !MEMBER_FLAG)
    } else {
        RECORD_HEADER_LEN as u64 + u64::from(stored_len)
    }
}

/// The index and trailer appended when a pack is sealed, where the index
/// starts at `index_offset` (the end of the last record).
pub fn encode_index(entries: &[IndexEntry], index_offset: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * INDEX_ENTRY_LEN + TRAILER_LEN);
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
    }
    let index_crc = crc32fast::hash(&out);
    let mut t = [0u8; TRAILER_LEN];
    t[T_MAGIC..T_INDEX_OFFSET].copy_from_slice(&TRAILER_MAGIC);
    t[T_INDEX_OFFSET..T_COUNT].copy_from_slice(&index_offset.to_le_bytes());
    t[T_COUNT..T_INDEX_CRC].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    t[T_INDEX_CRC..T_RESERVED].copy_from_slice(&index_crc.to_le_bytes());
    let tcrc = crc32fast::hash(&t[..T_CRC]);
    t[T_CRC..].copy_from_slice(&tcrc.to_le_bytes());
    out.extend_from_slice(&t);
    out
}

/// A decoded trailer: where the index starts and how many entries it has.
#[derive(Clone, Copy, Debug)]
pub struct Trailer {
    pub index_offset: u64,
    pub count: u32,
    pub index_crc: u32,
}

/// Decodes the last 32 bytes of a pack of `file_len` bytes; `None` when they
/// are not a valid trailer (an unsealed pack).
pub fn decode_trailer(t: &[u8], file_len: u64) -> Option<Trailer> {
    if t.len() != TRAILER_LEN || t[T_MAGIC..T_INDEX_OFFSET] != TRAILER_MAGIC {
        return None;
    }
    if crc32fast::hash(&t[..T_CRC]) != le::u32_at(t, T_CRC) {
        return None;
    }
    let tr = Trailer {
        index_offset: le::u64_at(t, T_INDEX_OFFSET),
        count: le::u32_at(t, T_COUNT),
        index_crc: le::u32_at(t, T_INDEX_CRC),
    };
    let expect_len = tr
        .index_offset
        .checked_add(u64::from(tr.count) * INDEX_ENTRY_LEN as u64)?
        .checked_add(TRAILER_LEN as u64)?;
    (expect_len == file_len && tr.index_offset >= PACK_HEADER_LEN as u64).then_some(tr)
}

/// Decodes the index bytes a trailer points at.
pub fn decode_index(bytes: &[u8], tr: &Trailer) -> Result<Vec<IndexEntry>, String> {
    if bytes.len() != tr.count as usize * INDEX_ENTRY_LEN {
        return Err("index length does not match its trailer".into());
    }
    if crc32fast::hash(bytes) != tr.index_crc {
        return Err("index checksum mismatch".into());
    }
    let mut out = Vec::with_capacity(tr.count as usize);
    for e in bytes.chunks_exact(INDEX_ENTRY_LEN) {
        let entry = IndexEntry {
            id: le::chunk_id_at(e, E_ID),
            offset: le::u64_at(e, E_OFFSET),
            stored_len: le::u32_at(e, E_STORED_LEN),
            raw_len: le::u32_at(e, E_RAW_LEN),
        };
        // A member's group record is at least its header long.
        let body = if entry.is_member() {
            0
        } else {
            u64::from(entry.stored_len)
        };
        let end = entry.offset.checked_add(RECORD_HEADER_LEN as u64 + body);
        if entry.offset < PACK_HEADER_LEN as u64 || end.is_none_or(|e| e > tr.index_offset) {
            return Err("index entry points outside the pack's records".into());
        }
        out.push(entry);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compression must save at least 1/32 of a chunk to be kept: a chunk
    /// of random bytes with a 2% run of zeros is stored raw, one with 10%
    /// compressed.
    #[test]
    fn compression_is_kept_only_when_it_saves_a_32nd() {
        let chunk = |zeros: usize| {
            let mut c = vec![0u8; 65536];
            crate::rng::Rng::new(3).fill(&mut c[zeros..]);
            c
        };
        assert!(compress(&chunk(65536 / 50), 1).unwrap().is_none());
        let some = compress(&chunk(65536 / 10), 1).unwrap().unwrap();
        assert!(some.len() <= 65536 - 65536 / 32);
    }

    fn record_bytes(data: &[u8]) -> Vec<u8> {
        let compressed = compress(data, 3).unwrap();
        let rec = ChunkRecord {
            id: ChunkId::of(data),
            raw: data,
            compressed: compressed.as_deref(),
        };
        let mut r = rec.header().to_vec();
        r.extend_from_slice(rec.payload());
        r
    }

    #[test]
    fn compressible_chunk_round_trips_as_zstd() {
        let data = b"hello blocksnap ".repeat(4096);
        let id = ChunkId::of(&data);
        let rec = record_bytes(&data);
        assert_eq!(rec[0], RecordKind::Zstd as u8);
        assert!(rec.len() < data.len() / 10);
        assert_eq!(decode_record(&rec, &id).unwrap(), data);
    }

    #[test]
    fn incompressible_chunk_is_stored_raw() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let id = ChunkId::of(&data);
        let rec = record_bytes(&data);
        assert_eq!(rec[0], RecordKind::Raw as u8);
        assert_eq!(decode_record(&rec, &id).unwrap(), data);
    }

    #[test]
    fn every_flipped_bit_of_a_record_is_detected() {
        let data = b"abcdefgh".repeat(64);
        let id = ChunkId::of(&data);
        let rec = record_bytes(&data);
        for i in 0..rec.len() * 8 {
            let mut bad = rec.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(decode_record(&bad, &id).is_err(), "bit {i} went unnoticed");
        }
    }

    fn group_bytes(members: &[&[u8]]) -> (Vec<ChunkId>, Vec<u8>) {
        let ids: Vec<ChunkId> = members.iter().map(|m| ChunkId::of(m)).collect();
        let pairs: Vec<(ChunkId, &[u8])> =
            ids.iter().copied().zip(members.iter().copied()).collect();
        let g = GroupRecord::compress(&pairs, 3)
            .unwrap()
            .expect("compressible");
        let mut r = g.header().to_vec();
        r.extend_from_slice(g.payload());
        (ids, r)
    }

    #[test]
    fn a_group_record_gives_back_each_member() {
        let a = b"first member text ".repeat(300);
        let b = b"second member, different text ".repeat(100);
        let c = vec![7u8; 999];
        let (ids, rec) = group_bytes(&[&a, &b, &c]);
        assert_eq!(rec[0], RecordKind::Group as u8);
        assert!(rec.len() < (a.len() + b.len() + c.len()) / 10);
        for (id, want) in ids.iter().zip([&a[..], &b[..], &c[..]]) {
            assert_eq!(decode_record(&rec, id).unwrap(), want);
        }
        let err = decode_record(&rec, &ChunkId::of(b"absent")).unwrap_err();
        assert!(err.contains("does not hold"), "{err}");
        // The members' index entries share the record, and their shares
        // add up to it.
        let entries = member_entries(
            100,
            (rec.len() - RECORD_HEADER_LEN) as u32,
            &[
                (ids[0], a.len() as u32),
                (ids[1], b.len() as u32),
                (ids[2], c.len() as u32),
            ],
        );
        assert!(entries.iter().all(|e| e.is_member() && e.offset == 100));
        let total: u64 = entries.iter().map(IndexEntry::accounted_len).sum();
        assert_eq!(total, rec.len() as u64);
    }

    #[test]
    fn every_flipped_bit_of_a_group_record_is_detected() {
        let a = b"abcdefgh".repeat(40);
        let b = b"ijklmnop".repeat(30);
        let (ids, rec) = group_bytes(&[&a, &b]);
        for i in 0..rec.len() * 8 {
            let mut bad = rec.clone();
            bad[i / 8] ^= 1 << (i % 8);
            for id in &ids {
                assert!(decode_record(&bad, id).is_err(), "bit {i} went unnoticed");
            }
        }
    }

    #[test]
    fn a_group_table_that_does_not_add_up_is_refused() {
        let a = b"abcdefgh".repeat(40);
        let b = b"ijklmnop".repeat(30);
        let (_, rec) = group_bytes(&[&a, &b]);
        let h = RecordHeader::decode(&rec).unwrap();
        let payload = &rec[RECORD_HEADER_LEN..];
        assert!(decode_group_table(payload, h.raw_len).is_ok());
        assert!(decode_group_table(payload, h.raw_len + 1).is_err());
        for count in [0u16, 1, 3, 257] {
            let mut p = payload.to_vec();
            p[..2].copy_from_slice(&count.to_le_bytes());
            assert!(decode_group_table(&p, h.raw_len).is_err(), "count {count}");
        }
        let mut zero_len = payload.to_vec();
        zero_len[G_TABLE + 32..G_TABLE + 36].copy_from_slice(&0u32.to_le_bytes());
        assert!(decode_group_table(&zero_len, h.raw_len).is_err());
        assert!(decode_group_table(&payload[..G_TABLE + 40], h.raw_len).is_err());
        // Groups need two members, and at most 4 MiB in all.
        let one = [(ChunkId::of(&a), &a[..])];
        assert!(GroupRecord::compress(&one, 3).is_err());
        let big = vec![1u8; MAX_CHUNK_LEN / 2 + 1];
        let two = [(ChunkId::of(&big), &big[..]), (ChunkId::of(&big), &big[..])];
        assert!(GroupRecord::compress(&two, 3).is_err());
    }

    #[test]
    fn an_incompressible_group_is_not_made() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut noise = || -> Vec<u8> {
            (0..65536)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        let (a, b) = (noise(), noise());
        let members = [(ChunkId::of(&a), &a[..]), (ChunkId::of(&b), &b[..])];
        assert!(GroupRecord::compress(&members, 3).unwrap().is_none());
    }

    #[test]
    fn index_round_trips_and_rejects_a_wrong_length() {
        let entries = vec![IndexEntry {
            id: ChunkId::of(b"x"),
            offset: PACK_HEADER_LEN as u64,
            stored_len: 10,
            raw_len: 10,
        }];
        let index_offset = (PACK_HEADER_LEN + RECORD_HEADER_LEN + 10) as u64;
        let bytes = encode_index(&entries, index_offset);
        let file_len = index_offset + bytes.len() as u64;
        let tr = decode_trailer(&bytes[bytes.len() - TRAILER_LEN..], file_len).unwrap();
        assert_eq!(
            decode_index(&bytes[..bytes.len() - TRAILER_LEN], &tr).unwrap(),
            entries
        );
        assert!(decode_trailer(&bytes[bytes.len() - TRAILER_LEN..], file_len + 1).is_none());
    }

    #[test]
    fn pack_header_is_pinned() {
        let h = encode_pack_header();
        assert_eq!(&h[..8], b"BSNPPACK");
        assert_eq!(h[8], 1);
        assert_eq!(check_pack_header(&h), Ok(PackVersion::V1));
        let mut bad = h;
        bad[9] = 1;
        assert!(check_pack_header(&bad).is_err());
    }
}
