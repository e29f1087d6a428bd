//! The chunk index on disk: one immutable, sorted table of every chunk in
//! a set of sealed packs (`packs/chunks.idx`), memory-mapped, so that
//! opening a store reads neither the packs' trailers nor the whole index.
//! Byte layout in docs/FORMAT.md ("The chunk index").
//!
//! It is a sorted table (`crate::table`): entries of 28 bytes (146 to a
//! page), and the list of packs it covers (each with its length and its
//! trailer's CRC32, so that a pack changed or removed since makes the
//! table stale).
//!
//! The packs stay the source of truth: a table that is missing, damaged,
//! or stale is rebuilt from them.

use std::path::Path;

use super::ChunkLoc;
use crate::error::Result;
use crate::fsio::StoreFs;
use crate::le::{u32_at, u64_at};
use crate::table::Format;

pub use crate::table::Damaged;

/// The table's file name in the pack directory.
pub const FILE_NAME: &str = "chunks.idx";

/// The chunk index's table.
pub type Table = crate::table::Table<ChunkFormat>;

pub const PER_PAGE: usize = ChunkFormat::PER_PAGE;
const _: () = assert!(PER_PAGE == 146);
/// Bytes of one covered pack: seq, trailer CRC32, length.
pub const PACK_LEN: usize = 16;

/// One entry: the first 16 bytes of a chunk id and where the chunk is.
/// Ordered by key, then place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub key: [u8; 16],
    pub loc: ChunkLoc,
}

/// Entries sorted in bounded memory when the table is rebuilt from the
/// packs: of one key, the least place (the first copy written) stays.
impl crate::sorted::Item for Entry {
    const LEN: usize = 28;
    type Key = [u8; 16];
    fn key(&self) -> [u8; 16] {
        self.key
    }
    fn encode(&self, out: &mut Vec<u8>) {
        let mut b = [0u8; 28];
        <ChunkFormat as Format>::encode(self, &mut b);
        out.extend_from_slice(&b);
    }
    fn decode(b: &[u8]) -> Self {
        <ChunkFormat as Format>::decode(b)
    }
}

/// A pack the table covers, as it was when the table was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Covered {
    pub seq: u32,
    /// CRC32 of the pack's trailer (its last [`super::pack::TRAILER_LEN`]
    /// bytes).
    pub trailer_crc: u32,
    pub len: u64,
}

/// The chunk index's bytes: entries of key and location, items of packs.
pub struct ChunkFormat;

impl Format for ChunkFormat {
    const WHAT: &'static str = "chunk index";
    const MAGIC: [u8; 8] = *b"BSNPCIDX";
    const VERSION: u32 = 1;
    const ENTRY_LEN: usize = 28;
    const ITEM_LEN: usize = PACK_LEN;
    type Entry = Entry;
    type Item = Covered;

    fn key(e: &Entry) -> [u8; 16] {
        e.key
    }

    fn encode(e: &Entry, out: &mut [u8]) {
        out[..16].copy_from_slice(&e.key);
        out[16..20].copy_from_slice(&e.loc.pack.to_le_bytes());
        out[20..24].copy_from_slice(&e.loc.offset.to_le_bytes());
        out[24..28].copy_from_slice(&e.loc.stored_len.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Entry {
        let mut key = [0u8; 16];
        key.copy_from_slice(&b[..16]);
        Entry {
            key,
            loc: ChunkLoc {
                pack: u32_at(b, 16),
                offset: u32_at(b, 20),
                stored_len: u32_at(b, 24),
            },
        }
    }

    fn encode_item(c: &Covered, out: &mut Vec<u8>) {
        out.extend_from_slice(&c.seq.to_le_bytes());
        out.extend_from_slice(&c.trailer_crc.to_le_bytes());
        out.extend_from_slice(&c.len.to_le_bytes());
    }

    fn decode_item(b: &[u8]) -> Covered {
        Covered {
            seq: u32_at(b, 0),
            trailer_crc: u32_at(b, 4),
            len: u64_at(b, 8),
        }
    }
}

/// Writes a table of `entries` (in strictly increasing key order)
/// covering `covered` into `dir` durably (see [`crate::table::write`]).
pub fn write(
    fs: &dyn StoreFs,
    dir: &Path,
    entries: impl Iterator<Item = Result<Entry>>,
    covered: &[Covered],
    generation: u64,
) -> Result<()> {
    crate::table::write::<ChunkFormat>(fs, &dir.join(FILE_NAME), entries, covered, generation)
}

/// The bytes of a table, handed to `out` with their offsets.
#[cfg(any(test, feature = "testing"))]
pub fn encode(
    entries: impl Iterator<Item = Result<Entry>>,
    covered: &[Covered],
    generation: u64,
    out: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    crate::table::encode::<ChunkFormat>(entries, covered, generation, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsio::StdFs;
    use crate::ids::ChunkId;

    /// A rebuild's sort, through scratch runs: every key once, in order,
    /// at its least place (the first copy written) wherever its copies
    /// came in.
    #[test]
    fn a_rebuild_keeps_each_chunks_first_copy_through_runs() {
        use crate::sorted::Sorted;
        let dir = tempfile::tempdir().unwrap();
        let all = entries(5_000);
        // Every key again at a later place, some before their first copy.
        let mut pushed: Vec<Entry> = all
            .iter()
            .map(|e| Entry {
                key: e.key,
                loc: ChunkLoc {
                    pack: e.loc.pack + 10,
                    ..e.loc
                },
            })
            .collect();
        pushed.extend(all.iter().copied());
        pushed.rotate_left(2_500);
        let mut sorted = Sorted::<Entry>::with_budget(0, dir.path(), "test entries");
        for e in &pushed {
            sorted.push(*e).unwrap();
        }
        sorted.finish();
        assert!(sorted.len_bound() > all.len() as u64, "no run was written");
        let got: Vec<Entry> = sorted.iter().collect::<Result<_>>().unwrap();
        assert_eq!(got, all);
    }

    fn entries(n: u32) -> Vec<Entry> {
        let mut v: Vec<Entry> = (0..n)
            .map(|i| {
                let id = ChunkId::of(&i.to_le_bytes());
                let mut key = [0u8; 16];
                key.copy_from_slice(&id.0[..16]);
                Entry {
                    key,
                    loc: ChunkLoc {
                        pack: i % 7,
                        offset: i,
                        stored_len: i * 3,
                    },
                }
            })
            .collect();
        v.sort_by_key(|e| e.key);
        v
    }

    fn key_of(i: u32) -> [u8; 16] {
        let mut key = [0u8; 16];
        key.copy_from_slice(&ChunkId::of(&i.to_le_bytes()).0[..16]);
        key
    }

    #[test]
    fn finds_every_entry_and_nothing_else_at_every_size() {
        let dir = tempfile::tempdir().unwrap();
        let covered = [Covered {
            seq: 3,
            trailer_crc: 9,
            len: 77,
        }];
        for n in [0u32, 1, 145, 146, 147, 1000, 30_000] {
            let all = entries(n);
            write(&StdFs, dir.path(), all.iter().copied().map(Ok), &covered, 5).unwrap();
            let t = Table::open(&StdFs, &dir.path().join(FILE_NAME))
                .unwrap()
                .unwrap();
            assert_eq!(
                (t.len(), t.generation(), t.items()),
                (n.into(), 5, &covered[..])
            );
            for i in 0..n {
                let got = t.get(&key_of(i)).unwrap().unwrap();
                assert_eq!(got.loc.offset, i, "entry {i} of {n}");
            }
            for i in n..n + 200 {
                assert_eq!(t.get(&key_of(i)).unwrap(), None);
            }
            assert_eq!(t.iter().map(|e| e.unwrap()).collect::<Vec<_>>(), all);
            t.check().unwrap();
            // Pages given back are read again, unchanged.
            t.release();
            for i in (0..n).step_by(7) {
                assert_eq!(t.get(&key_of(i)).unwrap().unwrap().loc.offset, i);
            }
        }
    }

    #[test]
    fn damage_is_detected_never_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let all = entries(2000);
        write(&StdFs, dir.path(), all.iter().copied().map(Ok), &[], 1).unwrap();
        let clean = std::fs::read(&path).unwrap();
        // Every byte of every page: flipped, the page is refused when read.
        let mut refused = 0;
        for at in (0..clean.len()).step_by(97) {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x20;
            std::fs::write(&path, &bytes).unwrap();
            match Table::open(&StdFs, &path) {
                Err(e) => {
                    assert!(e.is_corruption(), "{e}");
                    refused += 1;
                }
                Ok(t) => {
                    let t = t.unwrap();
                    assert!(t.check().is_err(), "byte {at} flipped, not seen");
                    let wrong = (0..2000u32).any(|i| {
                        t.get(&key_of(i))
                            .is_ok_and(|l| l.is_none_or(|l| l.loc.offset != i))
                    });
                    assert!(!wrong, "byte {at} flipped gave a wrong answer");
                    refused += 1;
                }
            }
        }
        assert_eq!(refused, clean.len().div_ceil(97));
        // Cut short, or something else.
        std::fs::write(&path, &clean[..clean.len() - 1]).unwrap();
        assert!(Table::open(&StdFs, &path).is_err_and(|e| e.is_corruption()));
        std::fs::write(&path, b"not an index").unwrap();
        assert!(Table::open(&StdFs, &path).is_err_and(|e| e.is_corruption()));
        std::fs::remove_file(&path).unwrap();
        assert!(Table::open(&StdFs, &path).unwrap().is_none());
    }

    #[test]
    fn out_of_order_entries_are_refused_when_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut all = entries(10);
        all.swap(2, 3);
        assert!(write(&StdFs, dir.path(), all.into_iter().map(Ok), &[], 1).is_err());
        assert!(!crate::table::tmp_path(&dir.path().join(FILE_NAME)).exists());
        assert!(!dir.path().join(FILE_NAME).exists());
    }
}
