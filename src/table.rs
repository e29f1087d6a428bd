//! Immutable sorted tables on disk, memory-mapped: the shape both the chunk
//! index (`store/table.rs`) and the reference counts (`refs`) are kept in.
//! Byte layout in docs/FORMAT.md ("Sorted tables").
//!
//! A table is a header page, its entries in pages of 4 KiB (as many whole
//! entries as fit before the page's last 8 bytes: zero, then the CRC32 of
//! the page's first 4092 bytes), and a list of items (what the table
//! covers: packs for the chunk index, snapshots for the counts) with a
//! CRC32 in the header. Entries are sorted by a 16-byte key taken from a
//! BLAKE3 id; ids are uniform, so the page holding a key is found by
//! interpolation on its first 8 bytes: a look-up reads one page, rarely
//! two (a binary search over the pages bounds the worst case). Each page's
//! checksum is checked the first time a look-up touches it (a bit per page
//! remembers it), so a damaged table is detected, never trusted, and open
//! costs nothing per entry.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, IoContext, Result};
use crate::fsio::{OpenMode, StoreFs};
use crate::le::u32_at;
use crate::le::u64_at;

pub const PAGE_LEN: usize = 4096;
const PAGE_CRC: usize = PAGE_LEN - 4;

// Header fields (offsets).
const H_VERSION: usize = 8;
const H_PAGE_LEN: usize = 12;
const H_ENTRY_LEN: usize = 16;
const H_PER_PAGE: usize = 20;
const H_ENTRIES: usize = 24;
const H_PAGES: usize = 32;
const H_ITEMS: usize = 40;
const H_ITEMS_CRC: usize = 44;
const H_GENERATION: usize = 48;
const H_CRC: usize = PAGE_LEN - 4;

/// What one kind of table holds.
pub trait Format {
    /// Its name in errors ("chunk index").
    const WHAT: &'static str;
    const MAGIC: [u8; 8];
    const VERSION: u32;
    const ENTRY_LEN: usize;
    /// Entries per page.
    const PER_PAGE: usize = (PAGE_LEN - 8) / Self::ENTRY_LEN;
    /// Bytes of one item of the trailing list.
    const ITEM_LEN: usize;
    type Entry: Copy;
    type Item;
    fn key(e: &Self::Entry) -> [u8; 16];
    /// Writes `e` into `out` (`ENTRY_LEN` bytes).
    fn encode(e: &Self::Entry, out: &mut [u8]);
    /// Reads an entry from `ENTRY_LEN` bytes.
    fn decode(b: &[u8]) -> Self::Entry;
    fn encode_item(i: &Self::Item, out: &mut Vec<u8>);
    /// Reads an item from `ITEM_LEN` bytes.
    fn decode_item(b: &[u8]) -> Self::Item;
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
pub struct Table<F: Format> {
    path: PathBuf,
    bytes: Bytes,
    entries: u64,
    pages: u64,
    generation: u64,
    items: Vec<F::Item>,
    /// One bit per page: its checksum was checked.
    checked: Vec<AtomicU64>,
    /// Pages scanned since the mapping's pages were last given back.
    reads: AtomicU64,
    format: PhantomData<F>,
}

/// Pages a scan of a table (a merge into a new one, a check) reads (64
/// MiB) before it gives back the process's view of them
/// ([`Table::release`]), so that scanning a large table does not hold it
/// all. Look-ups keep what they touch: reading a page again after it was
/// given back costs a fault, which at random costs more than it saves.
const RELEASE_EVERY: u64 = 16_384;

/// The first 8 bytes of a key as a number: keys sort as these do.
fn key_prefix(key: &[u8; 16]) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&key[..8]);
    u64::from_be_bytes(x)
}

impl<F: Format> Table<F> {
    /// Opens the table at `path`, checking its header and its list of
    /// items (O(1) in the entries: their pages are checked as they are
    /// read). `Ok(None)` when there is none; an error names what is wrong
    /// with one that is damaged.
    pub fn open(fs: &dyn StoreFs, path: &Path) -> Result<Option<Self>> {
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

    /// A table of bytes in memory (what the fuzz targets feed).
    #[cfg(feature = "testing")]
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(path, Bytes::Owned(bytes))
    }

    /// Checks the header, the length and the list of items.
    fn parse(path: &Path, bytes: Bytes) -> Result<Self> {
        let bad = |what: &str| Error::corrupt(path, format!("{}: {what}", F::WHAT));
        let len = bytes.len() as u64;
        if len < PAGE_LEN as u64 {
            return Err(bad("shorter than its header"));
        }
        let head = &bytes[..PAGE_LEN];
        if head[..8] != F::MAGIC {
            return Err(bad(&format!("not a {} (bad magic)", F::WHAT)));
        }
        if crc32fast::hash(&head[..H_CRC]) != u32_at(head, H_CRC) {
            return Err(bad("header fails its checksum"));
        }
        let version = u32_at(head, H_VERSION);
        if version != F::VERSION {
            return Err(bad(&format!(
                "version {version}, this build reads {}",
                F::VERSION
            )));
        }
        if u32_at(head, H_PAGE_LEN) as usize != PAGE_LEN
            || u32_at(head, H_ENTRY_LEN) as usize != F::ENTRY_LEN
            || u32_at(head, H_PER_PAGE) as usize != F::PER_PAGE
        {
            return Err(bad("unknown page layout"));
        }
        let entries = u64_at(head, H_ENTRIES);
        let pages = u64_at(head, H_PAGES);
        let items = u64::from(u32_at(head, H_ITEMS));
        if pages != entries.div_ceil(F::PER_PAGE as u64) {
            return Err(bad("entry and page counts disagree"));
        }
        let want = pages
            .checked_add(1)
            .and_then(|p| p.checked_mul(PAGE_LEN as u64))
            .and_then(|p| p.checked_add(items * F::ITEM_LEN as u64));
        if want != Some(len) {
            return Err(bad(&format!("{len} bytes long, not what its header says")));
        }
        let items_at = ((1 + pages) * PAGE_LEN as u64) as usize;
        let list = &bytes[items_at..];
        if crc32fast::hash(list) != u32_at(head, H_ITEMS_CRC) {
            return Err(bad("its list fails its checksum"));
        }
        let items = list.chunks_exact(F::ITEM_LEN).map(F::decode_item).collect();
        let generation = u64_at(head, H_GENERATION);
        Ok(Table {
            path: path.to_path_buf(),
            bytes,
            entries,
            pages,
            generation,
            items,
            checked: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            reads: AtomicU64::new(0),
            format: PhantomData,
        })
    }

    pub fn len(&self) -> u64 {
        self.entries
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What the table covers, as it was when written.
    pub fn items(&self) -> &[F::Item] {
        &self.items
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of the file (mapped, not heap).
    pub fn file_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Gives back the process's view of the pages read so far: the page
    /// cache keeps them, and reading one again costs a minor fault. A
    /// no-op for a table read into memory.
    pub fn release(&self) {
        self.reads.store(0, Ordering::Relaxed);
        if let Bytes::Mapped(m) = &self.bytes {
            // SAFETY: `Mmap::map` maps the file shared and read-only, so
            // MADV_DONTNEED only drops page-table entries: the next read
            // of a page maps the same bytes again from the page cache or
            // the file (no page was written, so nothing is lost or zeroed,
            // which is what makes this advice unsafe for private maps).
            // Slices into the map held by other threads stay valid: their
            // next access faults the page back in, unchanged. The file
            // itself changes only as `StdFs::map` describes.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
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
        Ok(&page[..n * F::ENTRY_LEN])
    }

    fn entries_in(&self, p: u64) -> usize {
        if p + 1 < self.pages {
            F::PER_PAGE
        } else {
            (self.entries - p * F::PER_PAGE as u64) as usize
        }
    }

    fn key_at(page: &[u8], i: usize) -> &[u8] {
        &page[i * F::ENTRY_LEN..i * F::ENTRY_LEN + 16]
    }

    fn entry_at(page: &[u8], i: usize) -> F::Entry {
        F::decode(&page[i * F::ENTRY_LEN..(i + 1) * F::ENTRY_LEN])
    }

    /// The entry whose key is `key`, if the table has it.
    pub fn get(&self, key: &[u8; 16]) -> std::result::Result<Option<F::Entry>, Damaged> {
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
            let n = page.len() / F::ENTRY_LEN;
            if n == 0 {
                return Err(Damaged(format!("{}: an empty page", self.path.display())));
            }
            if key.as_slice() < Self::key_at(page, 0) {
                hi = probe;
            } else if key.as_slice() > Self::key_at(page, n - 1) {
                lo = probe + 1;
            } else {
                return Ok(Self::bsearch(page, n, key).map(|i| Self::entry_at(page, i)));
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

    fn bsearch(page: &[u8], n: usize, key: &[u8; 16]) -> Option<usize> {
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match Self::key_at(page, mid).cmp(key.as_slice()) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    /// Every entry in key order, each page checked.
    pub fn iter(&self) -> impl Iterator<Item = std::result::Result<F::Entry, Damaged>> + '_ {
        (0..self.pages).flat_map(move |p| {
            // A scan passes each page once: what it has passed goes back.
            if self.reads.fetch_add(1, Ordering::Relaxed) + 1 >= RELEASE_EVERY {
                self.release();
            }
            let page = self.page(p);
            let n = page.as_ref().map_or(1, |pg| pg.len() / F::ENTRY_LEN);
            (0..n).map(move |i| match &page {
                Ok(pg) => Ok(Self::entry_at(pg, i)),
                Err(d) => Err(d.clone()),
            })
        })
    }

    /// Checks the whole table: every page's checksum and the keys' strict
    /// order (what `verify` runs).
    pub fn check(&self) -> std::result::Result<(), Damaged> {
        let mut last: Option<[u8; 16]> = None;
        for e in self.iter() {
            let key = F::key(&e?);
            if last.is_some_and(|l| l >= key) {
                return Err(Damaged(format!(
                    "{}: keys out of order",
                    self.path.display()
                )));
            }
            last = Some(key);
        }
        Ok(())
    }
}

/// The name a table is written under before it is renamed to `path`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes a table of `entries` (in strictly increasing key order) and
/// `items` to `path`, durably: under a temporary name, fsynced, renamed
/// over the old one, the directory fsynced. An entry that is an error
/// stops it, and nothing changes.
pub fn write<F: Format>(
    fs: &dyn StoreFs,
    path: &Path,
    entries: impl Iterator<Item = Result<F::Entry>>,
    items: &[F::Item],
    generation: u64,
) -> Result<()> {
    let tmp = tmp_path(path);
    let dir = path.parent().unwrap_or(Path::new("."));
    let _ = fs.remove(&tmp);
    let written = (|| {
        let file = fs.open(&tmp, OpenMode::CreateNew).at(&tmp)?;
        encode::<F>(entries, items, generation, |bytes, at| {
            file.write_all_at(bytes, at).at(&tmp)
        })?;
        file.sync().at(&tmp)
    })();
    if let Err(e) = written {
        let _ = fs.remove(&tmp);
        return Err(e);
    }
    if let Err(e) = fs.rename(&tmp, path) {
        let _ = fs.remove(&tmp);
        return Err(Error::io(path, e));
    }
    fs.sync_dir(dir).at(dir)
}

/// The bytes of a table, handed to `out` with their offsets, a megabyte
/// of pages at a time, the header last.
pub fn encode<F: Format>(
    entries: impl Iterator<Item = Result<F::Entry>>,
    items: &[F::Item],
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
        let key = F::key(&e);
        if last.is_some_and(|l| l >= key) {
            return Err(Error::Internal(format!("{} entries out of order", F::WHAT)));
        }
        last = Some(key);
        let page = &mut buf[filled * PAGE_LEN..(filled + 1) * PAGE_LEN];
        F::encode(
            &e,
            &mut page[in_page * F::ENTRY_LEN..(in_page + 1) * F::ENTRY_LEN],
        );
        in_page += 1;
        n += 1;
        if in_page == F::PER_PAGE {
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
    let (count, pages) = (n, n.div_ceil(F::PER_PAGE as u64));
    out(&buf[..filled * PAGE_LEN], at)?;
    let mut list = Vec::with_capacity(items.len() * F::ITEM_LEN);
    for i in items {
        F::encode_item(i, &mut list);
    }
    debug_assert_eq!(list.len(), items.len() * F::ITEM_LEN);
    out(&list, (1 + pages) * PAGE_LEN as u64)?;
    let mut head = [0u8; PAGE_LEN];
    let mut put = |at: usize, bytes: &[u8]| head[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &F::MAGIC);
    put(H_VERSION, &F::VERSION.to_le_bytes());
    put(H_PAGE_LEN, &(PAGE_LEN as u32).to_le_bytes());
    put(H_ENTRY_LEN, &(F::ENTRY_LEN as u32).to_le_bytes());
    put(H_PER_PAGE, &(F::PER_PAGE as u32).to_le_bytes());
    put(H_ENTRIES, &count.to_le_bytes());
    put(H_PAGES, &pages.to_le_bytes());
    let n_items = u32::try_from(items.len())
        .map_err(|_| Error::Internal(format!("too many items for one {}", F::WHAT)))?;
    put(H_ITEMS, &n_items.to_le_bytes());
    put(H_ITEMS_CRC, &crc32fast::hash(&list).to_le_bytes());
    put(H_GENERATION, &generation.to_le_bytes());
    let crc = crc32fast::hash(&head[..H_CRC]);
    head[H_CRC..].copy_from_slice(&crc.to_le_bytes());
    out(&head, 0)
}

fn seal_page(page: &mut [u8]) {
    let crc = crc32fast::hash(&page[..PAGE_CRC]);
    page[PAGE_CRC..].copy_from_slice(&crc.to_le_bytes());
}
