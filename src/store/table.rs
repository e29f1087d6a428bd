//! The chunk index on disk: one immutable, sorted table of every chunk in
//! a set of sealed packs (`packs/chunks.idx`), memory-mapped, so that
//! opening a store reads neither the packs' trailers nor the whole index.
//! Byte layout in docs/FORMAT.md ("The chunk index").
//!
//! The table is a header page, the entries in pages of 4 KiB (146 entries
//! of 28 bytes each and a CRC32), and the list of packs it covers (each
//! with its length and its trailer's CRC32, so that a pack changed or
//! removed since makes the table stale). BLAKE3 ids are uniform, so the
//! page holding a key is found by interpolation: its first 8 bytes say
//! where in the table it falls, and a look-up reads one page, rarely two
//! (a binary search over the pages bounds the worst case). Each page's
//! checksum is checked the first time a look-up touches it (a bit per page
//! remembers it), so a damaged table is detected, never trusted, and open
//! costs nothing per chunk.
//!
//! The packs stay the source of truth: a table that is missing, damaged,
//! or stale is rebuilt from them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::ChunkLoc;
use crate::error::{Error, IoContext, Result};
use crate::fsio::{OpenMode, StoreFs};

/// The table's file name in the pack directory, and its temporary name
/// while written.
pub const FILE_NAME: &str = "chunks.idx";
pub const TMP_NAME: &str = "chunks.idx.tmp";

const MAGIC: [u8; 8] = *b"BSNPCIDX";
const VERSION: u32 = 1;
pub const PAGE_LEN: usize = 4096;
pub const ENTRY_LEN: usize = 28;
/// Entries per page: 146 * 28 = 4088 bytes, then 4 zero bytes and the
/// page's CRC32 (of its first 4092 bytes).
pub const PER_PAGE: usize = (PAGE_LEN - 8) / ENTRY_LEN;
const PAGE_CRC: usize = PAGE_LEN - 4;
const _: () = assert!(PER_PAGE == 146);
/// Bytes of one covered pack: seq, trailer CRC32, length.
pub const PACK_LEN: usize = 16;

// Header fields (offsets).
const H_VERSION: usize = 8;
const H_PAGE_LEN: usize = 12;
const H_ENTRY_LEN: usize = 16;
const H_PER_PAGE: usize = 20;
const H_ENTRIES: usize = 24;
const H_PAGES: usize = 32;
const H_PACKS: usize = 40;
const H_PACKS_CRC: usize = 44;
const H_GENERATION: usize = 48;
const H_CRC: usize = PAGE_LEN - 4;

/// One entry: the first 16 bytes of a chunk id and where the chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: [u8; 16],
    pub loc: ChunkLoc,
}

impl Entry {
    fn encode(&self, out: &mut [u8]) {
        out[..16].copy_from_slice(&self.key);
        out[16..20].copy_from_slice(&self.loc.pack.to_le_bytes());
        out[20..24].copy_from_slice(&self.loc.offset.to_le_bytes());
        out[24..28].copy_from_slice(&self.loc.stored_len.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Entry {
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut key = [0u8; 16];
        key.copy_from_slice(&b[..16]);
        Entry {
            key,
            loc: ChunkLoc {
                pack: u32_at(16),
                offset: u32_at(20),
                stored_len: u32_at(24),
            },
        }
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

/// A table page failed its checksum, or the table broke its own order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damaged(pub String);

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An open table.
pub struct Table {
    path: PathBuf,
    bytes: Bytes,
    entries: u64,
    pages: u64,
    generation: u64,
    covered: Vec<Covered>,
    /// One bit per page: its checksum was checked.
    checked: Vec<AtomicU64>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// The first 8 bytes of a key as a number: keys sort as these do.
fn key_prefix(key: &[u8; 16]) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&key[..8]);
    u64::from_be_bytes(x)
}

impl Table {
    /// Opens the table at `path`, checking its header and its list of
    /// packs (O(1) in the entries: their pages are checked as they are
    /// read). `Ok(None)` when there is none; an error names what is wrong
    /// with one that is damaged.
    pub fn open(fs: &dyn StoreFs, path: &Path) -> Result<Option<Table>> {
        let file = match fs.open(path, OpenMode::Read) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        let bytes = match file.map().at(path)? {
            Some(m) => Bytes::Mapped(m),
            None => Bytes::Owned(fs.read_all(path).at(path)?),
        };
        Self::parse(path, bytes).map(Some)
    }

    /// A table of bytes in memory (what the fuzz target feeds).
    #[cfg(feature = "testing")]
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Table> {
        Self::parse(path, Bytes::Owned(bytes))
    }

    /// Checks the header, the length and the list of packs.
    fn parse(path: &Path, bytes: Bytes) -> Result<Table> {
        let bad = |what: &str| Error::corrupt(path, format!("chunk index: {what}"));
        let len = bytes.len() as u64;
        if len < PAGE_LEN as u64 {
            return Err(bad("shorter than its header"));
        }
        let head = &bytes[..PAGE_LEN];
        if head[..8] != MAGIC {
            return Err(bad("not a chunk index (bad magic)"));
        }
        if crc32fast::hash(&head[..H_CRC]) != u32_at(head, H_CRC) {
            return Err(bad("header fails its checksum"));
        }
        let version = u32_at(head, H_VERSION);
        if version != VERSION {
            return Err(bad(&format!(
                "version {version}, this build reads {VERSION}"
            )));
        }
        if u32_at(head, H_PAGE_LEN) as usize != PAGE_LEN
            || u32_at(head, H_ENTRY_LEN) as usize != ENTRY_LEN
            || u32_at(head, H_PER_PAGE) as usize != PER_PAGE
        {
            return Err(bad("unknown page layout"));
        }
        let entries = u64_at(head, H_ENTRIES);
        let pages = u64_at(head, H_PAGES);
        let packs = u64::from(u32_at(head, H_PACKS));
        if pages != entries.div_ceil(PER_PAGE as u64) {
            return Err(bad("entry and page counts disagree"));
        }
        let want = pages
            .checked_add(1)
            .and_then(|p| p.checked_mul(PAGE_LEN as u64))
            .and_then(|p| p.checked_add(packs * PACK_LEN as u64));
        if want != Some(len) {
            return Err(bad(&format!("{len} bytes long, not what its header says")));
        }
        let packs_at = ((1 + pages) * PAGE_LEN as u64) as usize;
        let list = &bytes[packs_at..];
        if crc32fast::hash(list) != u32_at(head, H_PACKS_CRC) {
            return Err(bad("list of packs fails its checksum"));
        }
        let covered = list
            .chunks_exact(PACK_LEN)
            .map(|c| Covered {
                seq: u32_at(c, 0),
                trailer_crc: u32_at(c, 4),
                len: u64_at(c, 8),
            })
            .collect();
        let generation = u64_at(head, H_GENERATION);
        Ok(Table {
            path: path.to_path_buf(),
            bytes,
            entries,
            pages,
            generation,
            covered,
            checked: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    pub fn len(&self) -> u64 {
        self.entries
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn covered(&self) -> &[Covered] {
        &self.covered
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of the file (mapped, not heap).
    pub fn file_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Page `p`'s entries, its checksum checked (once).
    fn page(&self, p: u64) -> std::result::Result<&[u8], Damaged> {
        let at = (1 + p as usize) * PAGE_LEN;
        let page = &self.bytes[at..at + PAGE_LEN];
        let (word, bit) = ((p / 64) as usize, 1u64 << (p % 64));
        if self.checked[word].load(Ordering::Relaxed) & bit == 0 {
            if crc32fast::hash(&page[..PAGE_CRC]) != u32_at(page, PAGE_CRC) {
                return Err(Damaged(format!(
                    "{}: page {p} fails its checksum",
                    self.path.display()
                )));
            }
            self.checked[word].fetch_or(bit, Ordering::Relaxed);
        }
        let n = self.entries_in(p);
        Ok(&page[..n * ENTRY_LEN])
    }

    fn entries_in(&self, p: u64) -> usize {
        if p + 1 < self.pages {
            PER_PAGE
        } else {
            (self.entries - p * PER_PAGE as u64) as usize
        }
    }

    fn key_at(page: &[u8], i: usize) -> &[u8] {
        &page[i * ENTRY_LEN..i * ENTRY_LEN + 16]
    }

    /// Where the chunk whose id starts with `key` is, if the table has it.
    pub fn get(&self, key: &[u8; 16]) -> std::result::Result<Option<ChunkLoc>, Damaged> {
        if self.pages == 0 {
            return Ok(None);
        }
        // Interpolate, then look at the guess's neighbours, then search.
        let guess = ((u128::from(key_prefix(key)) * u128::from(self.pages)) >> 64) as u64;
        let (mut lo, mut hi) = (0, self.pages);
        let mut probe = guess;
        let mut probes = 0;
        loop {
            let page = self.page(probe)?;
            let n = page.len() / ENTRY_LEN;
            if n == 0 {
                return Err(Damaged(format!("{}: an empty page", self.path.display())));
            }
            if key.as_slice() < Self::key_at(page, 0) {
                hi = probe;
            } else if key.as_slice() > Self::key_at(page, n - 1) {
                lo = probe + 1;
            } else {
                return Ok(bsearch(page, n, key)
                    .map(|i| Entry::decode(&page[i * ENTRY_LEN..(i + 1) * ENTRY_LEN]).loc));
            }
            if lo >= hi {
                return Ok(None);
            }
            probes += 1;
            probe = if probes == 1 && hi == guess && guess > lo {
                guess - 1
            } else if probes == 1 && lo == guess + 1 && lo < hi {
                lo
            } else {
                lo + (hi - lo) / 2
            };
        }
    }

    /// Every entry in key order, each page checked.
    pub fn iter(&self) -> impl Iterator<Item = std::result::Result<Entry, Damaged>> + '_ {
        (0..self.pages).flat_map(move |p| {
            let page = self.page(p);
            let n = page.as_ref().map_or(1, |pg| pg.len() / ENTRY_LEN);
            (0..n).map(move |i| match &page {
                Ok(pg) => Ok(Entry::decode(&pg[i * ENTRY_LEN..(i + 1) * ENTRY_LEN])),
                Err(d) => Err(d.clone()),
            })
        })
    }

    /// Checks the whole table: every page's checksum and the keys' strict
    /// order (what `verify` runs).
    pub fn check(&self) -> std::result::Result<(), Damaged> {
        let mut last: Option<[u8; 16]> = None;
        for e in self.iter() {
            let e = e?;
            if last.is_some_and(|l| l >= e.key) {
                return Err(Damaged(format!(
                    "{}: keys out of order",
                    self.path.display()
                )));
            }
            last = Some(e.key);
        }
        Ok(())
    }
}

fn bsearch(page: &[u8], n: usize, key: &[u8; 16]) -> Option<usize> {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match Table::key_at(page, mid).cmp(key.as_slice()) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return Some(mid),
        }
    }
    None
}

/// Writes a table of `entries` (in strictly increasing key order)
/// covering `covered`, durably: under a temporary name, fsynced, renamed
/// over the old one, the directory fsynced. An entry that is an error
/// stops it, and nothing changes.
pub fn write(
    fs: &dyn StoreFs,
    dir: &Path,
    entries: impl Iterator<Item = Result<Entry>>,
    covered: &[Covered],
    generation: u64,
) -> Result<()> {
    let tmp = dir.join(TMP_NAME);
    let path = dir.join(FILE_NAME);
    let _ = fs.remove(&tmp);
    let written = (|| {
        let file = fs.open(&tmp, OpenMode::CreateNew).at(&tmp)?;
        encode(entries, covered, generation, |bytes, at| {
            file.write_all_at(bytes, at).at(&tmp)
        })?;
        file.sync().at(&tmp)
    })();
    if let Err(e) = written {
        let _ = fs.remove(&tmp);
        return Err(e);
    }
    if let Err(e) = fs.rename(&tmp, &path) {
        let _ = fs.remove(&tmp);
        return Err(Error::io(&path, e));
    }
    fs.sync_dir(dir).at(dir)
}

/// The bytes of a table, handed to `out` with their offsets, a megabyte
/// of pages at a time, the header last.
pub fn encode(
    entries: impl Iterator<Item = Result<Entry>>,
    covered: &[Covered],
    generation: u64,
    mut out: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    const BATCH: usize = 256;
    let mut buf = vec![0u8; BATCH * PAGE_LEN];
    let mut filled = 0; // pages in buf
    let mut at = PAGE_LEN as u64;
    let mut n = 0u64;
    let mut in_page = 0;
    let mut last: Option<[u8; 16]> = None;
    for e in entries {
        let e = e?;
        if last.is_some_and(|l| l >= e.key) {
            return Err(Error::Internal("chunk index entries out of order".into()));
        }
        last = Some(e.key);
        let page = &mut buf[filled * PAGE_LEN..(filled + 1) * PAGE_LEN];
        e.encode(&mut page[in_page * ENTRY_LEN..(in_page + 1) * ENTRY_LEN]);
        in_page += 1;
        n += 1;
        if in_page == PER_PAGE {
            seal_page(page);
            in_page = 0;
            filled += 1;
            if filled == BATCH {
                out(&buf, at)?;
                at += buf.len() as u64;
                buf.fill(0);
                filled = 0;
            }
        }
    }
    if in_page > 0 {
        seal_page(&mut buf[filled * PAGE_LEN..(filled + 1) * PAGE_LEN]);
        filled += 1;
    }
    let (count, pages) = (n, n.div_ceil(PER_PAGE as u64));
    out(&buf[..filled * PAGE_LEN], at)?;
    let mut list = Vec::with_capacity(covered.len() * PACK_LEN);
    for c in covered {
        list.extend_from_slice(&c.seq.to_le_bytes());
        list.extend_from_slice(&c.trailer_crc.to_le_bytes());
        list.extend_from_slice(&c.len.to_le_bytes());
    }
    out(&list, (1 + pages) * PAGE_LEN as u64)?;
    let mut head = [0u8; PAGE_LEN];
    head[..8].copy_from_slice(&MAGIC);
    head[H_VERSION..H_VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
    head[H_PAGE_LEN..H_PAGE_LEN + 4].copy_from_slice(&(PAGE_LEN as u32).to_le_bytes());
    head[H_ENTRY_LEN..H_ENTRY_LEN + 4].copy_from_slice(&(ENTRY_LEN as u32).to_le_bytes());
    head[H_PER_PAGE..H_PER_PAGE + 4].copy_from_slice(&(PER_PAGE as u32).to_le_bytes());
    head[H_ENTRIES..H_ENTRIES + 8].copy_from_slice(&count.to_le_bytes());
    head[H_PAGES..H_PAGES + 8].copy_from_slice(&pages.to_le_bytes());
    let packs = u32::try_from(covered.len())
        .map_err(|_| Error::Internal("too many packs for one chunk index".into()))?;
    head[H_PACKS..H_PACKS + 4].copy_from_slice(&packs.to_le_bytes());
    head[H_PACKS_CRC..H_PACKS_CRC + 4].copy_from_slice(&crc32fast::hash(&list).to_le_bytes());
    head[H_GENERATION..H_GENERATION + 8].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32fast::hash(&head[..H_CRC]);
    head[H_CRC..].copy_from_slice(&crc.to_le_bytes());
    out(&head, 0)
}

fn seal_page(page: &mut [u8]) {
    let crc = crc32fast::hash(&page[..PAGE_CRC]);
    page[PAGE_CRC..].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsio::StdFs;
    use crate::ids::ChunkId;

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
                (t.len(), t.generation(), t.covered()),
                (n.into(), 5, &covered[..])
            );
            for i in 0..n {
                let got = t.get(&key_of(i)).unwrap().unwrap();
                assert_eq!(got.offset, i, "entry {i} of {n}");
            }
            for i in n..n + 200 {
                assert_eq!(t.get(&key_of(i)).unwrap(), None);
            }
            assert_eq!(t.iter().map(|e| e.unwrap()).collect::<Vec<_>>(), all);
            t.check().unwrap();
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
                            .is_ok_and(|l| l.is_none_or(|l| l.offset != i))
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
        assert!(!dir.path().join(TMP_NAME).exists());
        assert!(!dir.path().join(FILE_NAME).exists());
    }
}
