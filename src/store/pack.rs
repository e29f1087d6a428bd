//! Pack files: append-only sequences of CRC-framed chunk records, sealed with
//! a trailing index. Byte layout in docs/FORMAT.md ("Pack files").
//!
//! ```text
//! header   magic "BSNPPACK" | version u8 | reserved [3] | crc32 u32        16 bytes
//! record*  kind u8 | reserved [3] | raw_len u32 | stored_len u32 |
//!          chunk id [32] | payload crc32 u32 | header crc32 u32          52 bytes
//!          payload [stored_len]
//! index    (sealed packs) entry*: chunk id [32] | offset u64 |
//!          stored_len u32 | raw_len u32                                48 bytes each
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

/// The largest chunk a record may hold: the largest block size.
pub const MAX_CHUNK_LEN: usize = 4 << 20;

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
}

impl TryFrom<u8> for RecordKind {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            1 => Ok(RecordKind::Raw),
            2 => Ok(RecordKind::Zstd),
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
        static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { RefCell::new(None) };
        static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    let limit = data.len() - data.len() / 32;
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            let c = zstd::bulk::Compressor::new(level)
                .map_err(|e| Error::io("<zstd compressor>", e))?;
            *slot = Some((level, c));
        }
        let Some((_, c)) = slot.as_mut() else {
            return Ok(None);
        };
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < limit {
                scratch.resize(limit, 0);
            }
            // An error here is zstd running out of room: it does not pay.
            Ok(c.compress_to_buffer(data, &mut scratch[..limit])
                .ok()
                .map(|n| scratch[..n].to_vec()))
        })
    })
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

    /// The record header that frames this chunk.
    pub fn header(&self) -> [u8; RECORD_HEADER_LEN] {
        let payload = self.payload();
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[R_KIND] = self.kind() as u8;
        h[R_RAW_LEN..R_STORED_LEN].copy_from_slice(&(self.raw.len() as u32).to_le_bytes());
        h[R_STORED_LEN..R_ID].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        h[R_ID..R_PAYLOAD_CRC].copy_from_slice(&self.id.0);
        let pcrc = crc32fast::hash(payload);
        h[R_PAYLOAD_CRC..R_HEADER_CRC].copy_from_slice(&pcrc.to_le_bytes());
        let hcrc = crc32fast::hash(&h[..R_HEADER_CRC]);
        h[R_HEADER_CRC..].copy_from_slice(&hcrc.to_le_bytes());
        h
    }
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
        if raw_len as usize > MAX_CHUNK_LEN || stored_len as usize > MAX_CHUNK_LEN + 1024 {
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
    let data = match h.kind {
        RecordKind::Raw => payload.to_vec(),
        RecordKind::Zstd => decompress(payload, h.raw_len as usize)?,
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
        let end = entry
            .offset
            .checked_add(RECORD_HEADER_LEN as u64 + u64::from(entry.stored_len));
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
