//! Reading the packs back at open: the sealed ones by their trailers, the
//! ones a crash left unsealed by a forward scan that cuts the torn tail and
//! seals them (or, read-only, only scans).

use std::path::{Path, PathBuf};

use super::PACK_SUFFIX;
use super::pack::{self, IndexEntry, PACK_HEADER_LEN, RECORD_HEADER_LEN, RecordKind, TRAILER_LEN};
use crate::error::{Error, IoContext, Result};
use crate::fsio::{OpenMode, StoreFile, StoreFs};
use crate::ids::ChunkId;

/// What the store did while opening.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    /// Unsealed packs found (left by a crash) and sealed now.
    pub packs_sealed: u64,
    /// Bytes of torn tails cut from them.
    pub bytes_cut: u64,
    /// Unsealed packs that could not be sealed (no room for their index):
    /// read by a scan, and sealed by a later open.
    pub left_unsealed: u64,
    /// Packs that could not be read at all, with the reason; their chunks
    /// are missing from the index and `verify` reports them.
    pub unreadable: Vec<String>,
    /// Packs whose chunks were read at open (those the chunk index table
    /// does not cover: none when it covers them all).
    pub packs_indexed: u64,
    /// Why the chunk index table was rebuilt from the packs, when it was
    /// (missing, damaged, or stale).
    pub index_rebuilt: Option<String>,
    /// Why a new table could not be written, when it could not (the store
    /// works from the packs meanwhile).
    pub index_unsaved: Option<String>,
}

pub(super) fn list_packs(fs: &dyn StoreFs, dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    let mut packs = Vec::new();
    for path in fs.list(dir).at(dir)? {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(seq) = name
            .strip_suffix(PACK_SUFFIX)
            .and_then(|s| s.parse::<u32>().ok())
        {
            packs.push((seq, path));
        }
    }
    packs.sort();
    Ok(packs)
}

/// Reads a pack's index: from its trailer when sealed, else by a forward scan
/// that cuts the torn tail and seals the pack (`read_only`: only scans).
pub(super) fn load_pack(
    fs: &dyn StoreFs,
    path: &Path,
    recovery: &mut Recovery,
    read_only: bool,
) -> Result<Vec<IndexEntry>> {
    let mode = if read_only {
        OpenMode::Read
    } else {
        OpenMode::ReadWrite
    };
    let file = fs.open(path, mode).at(path)?;
    let file = file.as_ref();
    let len = file.len().at(path)?;
    if len >= (PACK_HEADER_LEN + TRAILER_LEN) as u64 {
        let mut t = [0u8; TRAILER_LEN];
        file.read_exact_at(&mut t, len - TRAILER_LEN as u64)
            .at(path)?;
        if let Some(tr) = pack::decode_trailer(&t, len) {
            let mut bytes = vec![0u8; tr.count as usize * pack::INDEX_ENTRY_LEN];
            file.read_exact_at(&mut bytes, tr.index_offset).at(path)?;
            match pack::decode_index(&bytes, &tr) {
                Ok(entries) => return Ok(entries),
                // A damaged index: the records themselves are still readable.
                Err(_) => return scan_records(file, path, tr.index_offset).map(|(e, _)| e),
            }
        }
    }
    let mut header = [0u8; PACK_HEADER_LEN];
    if read_only {
        if len < PACK_HEADER_LEN as u64 {
            return Ok(Vec::new());
        }
        file.read_exact_at(&mut header, 0).at(path)?;
        pack::check_pack_header(&header).map_err(|w| Error::corrupt(path, w))?;
        return scan_records(file, path, len).map(|(entries, _)| entries);
    }
    if len < PACK_HEADER_LEN as u64 {
        // Created by a crash before its header reached the disk: empty.
        file.set_len(0).at(path)?;
        file.write_all_at(&pack::encode_pack_header(), 0).at(path)?;
    } else {
        file.read_exact_at(&mut header, 0).at(path)?;
        pack::check_pack_header(&header).map_err(|w| Error::corrupt(path, w))?;
    }
    let (entries, end) = scan_records(file, path, len)?;
    recovery.bytes_cut += len.saturating_sub(end);
    file.set_len(end).at(path)?;
    // A seal that fails (no room for the index on a full disk) leaves the
    // pack unsealed, its records indexed from the scan: the store opens,
    // GC can give its garbage back, and a later open seals it.
    let sealed = file
        .write_all_at(&pack::encode_index(&entries, end), end)
        .and_then(|()| file.sync());
    match sealed {
        Ok(()) => recovery.packs_sealed += 1,
        Err(_) => {
            let _ = file.set_len(end);
            recovery.left_unsealed += 1;
        }
    }
    Ok(entries)
}

/// Walks records from the pack header up to `limit`, stopping at the first
/// record that is incomplete or fails a check. Returns the entries found and
/// the offset where valid records end.
pub(super) fn scan_records(
    file: &dyn StoreFile,
    path: &Path,
    limit: u64,
) -> Result<(Vec<IndexEntry>, u64)> {
    let mut entries = Vec::new();
    let mut at = PACK_HEADER_LEN as u64;
    let mut header = [0u8; RECORD_HEADER_LEN];
    let mut payload = Vec::new();
    while at + RECORD_HEADER_LEN as u64 <= limit {
        file.read_exact_at(&mut header, at).at(path)?;
        let Ok(h) = pack::RecordHeader::decode(&header) else {
            break;
        };
        if at + h.record_len() > limit {
            break;
        }
        payload.resize(h.stored_len as usize, 0);
        file.read_exact_at(&mut payload, at + RECORD_HEADER_LEN as u64)
            .at(path)?;
        if crc32fast::hash(&payload) != h.payload_crc {
            break;
        }
        if h.kind == RecordKind::Group {
            let Ok((members, _)) = pack::decode_group_table(&payload, h.raw_len) else {
                break;
            };
            let members: Vec<(ChunkId, u32)> = members
                .into_iter()
                .map(|(id, r)| (id, (r.end - r.start) as u32))
                .collect();
            entries.extend(pack::member_entries(at, h.stored_len, &members));
        } else {
            entries.push(IndexEntry {
                id: h.id,
                offset: at,
                stored_len: h.stored_len,
                raw_len: h.raw_len,
            });
        }
        at += h.record_len();
    }
    Ok((entries, at))
}
