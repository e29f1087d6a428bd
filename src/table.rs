//! Immutable sorted tables on disk, memory-mapped: the shape both the chunk
//! index (`store/table.rs`) and the reference counts (`refs`) are kept in.
//! Byte layout in docs/FORMAT.md ("Sorted tables").
//!
//! A table is a header page, its entries in pages of 4 KiB (as many whole
//! entries as fit before the page's last 8 bytes: zero, then the CRC32 of
//! the page's first 4092 bytes), and a list of items (what the table
//! covers: packs for the chunk index, snapshots for the counts) with a
//! CRC32 in the header. Entries are sorted by a 16-byte key taken from a
//! BLAKE3 id; ids are uniform, so searches interpolate on a key's first 8
//! bytes (see [`Bounds`]), and bisect only when that stalls (keys that are
//! not uniform: a crafted or damaged table). Each page's checksum is
//! checked the first time it is read (a bit per page remembers it), so a
//! damaged table is detected, never trusted, and open costs nothing per
//! entry.
//!
//! Three ways in:
//! - look-ups at random (a capture's dedup, garbage collection), once they
//!   number an eighth of the pages, read every page's first key prefix,
//!   once per process ("fences", 8 bytes a page, checking every page on
//!   the way), which then name the one page a key can be on. A table
//!   larger than its budget ([`Table::set_budget`]) is read a few entries
//!   at a time with `pread`, through the page cache, so that the process
//!   holds none of it; a smaller one, through its map;
//! - runs of look-ups in key order (a snapshot's chunks counted) and
//! - scans (merges, checks) read the map and give back the pages they
//!   have passed every 16 MiB.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::error::{Error, IoContext, Result};
use crate::fsio::{OpenMode, StoreFile, StoreFs};
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
    /// The file mapped, and the file (read instead of the map by look-ups
    /// at random when they have a budget).
    Mapped(memmap2::Mmap, Arc<dyn StoreFile>),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m, _) => m,
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
    /// The first 8 key bytes of every page, read at the first look-up at
    /// random (see [`Table::fences`]).
    fences: OnceLock<Option<Vec<u64>>>,
    /// Look-ups at random so far, until the fences are read.
    random_lookups: AtomicU64,
    /// Pages look-ups read.
    #[cfg(test)]
    probes: AtomicU64,
    /// Look-ups at random read pages from the file rather than the map
    /// (see [`Table::set_budget`]).
    read_at_random: AtomicBool,
    format: PhantomData<F>,
}

/// Pages a scan of a table (a merge into a new one, a check) or a run of
/// look-ups in key order (a snapshot's chunks counted) reads (16 MiB)
/// before it gives back the process's view of them ([`Table::release`]),
/// so that going through a large table does not hold it all. Look-ups at
/// random keep what they touch: reading a page again after it was given
/// back costs a fault, which at random costs more than it saves.
/// (Unit tests give pages back far more often, so that they read pages
/// given back.)
const RELEASE_EVERY: u64 = if cfg!(test) { 64 } else { 4_096 };

/// The first 8 bytes of a key as a number: keys sort as these do.
fn key_prefix(key: &[u8; 16]) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&key[..8]);
    u64::from_be_bytes(x)
}

/// Interpolation probes before a search falls back to bisection, which
/// bounds the worst case (keys that are not uniform: a damaged or crafted
/// table) to a few more than a binary search's.
const INTERPOLATIONS: u32 = 6;

/// The state of a search for `key` among `n` sorted slots (entries, or
/// pages of entries): the slots it can still be in, `lo..hi`, and the key
/// prefixes that bound them. Keys are uniform (BLAKE3 output), so the
/// next probe goes where the key's prefix falls between the bounds': a
/// key's place in N random keys is off a straight guess by about
/// sqrt(N)/2 places, which a second probe between the first's keys almost
/// always finds. (A guess then bisection took ~log2(pages) probes, each a
/// page missed in cache, most of the time.)
struct Bounds {
    key: u128,
    lo: usize,
    hi: usize,
    key_lo: u128,
    key_hi: u128,
    probes: u32,
}

impl Bounds {
    fn new(n: usize, key: &[u8; 16]) -> Self {
        Bounds {
            key: u128::from(key_prefix(key)),
            lo: 0,
            hi: n,
            key_lo: 0,
            key_hi: u128::from(u64::MAX),
            probes: 0,
        }
    }

    /// Narrows the slots to those `fences` (each slot's first key prefix)
    /// allow: from the last slot that starts below the key's prefix to
    /// the first that starts above it (one slot, unless prefixes tie).
    fn fence(&mut self, fences: &[u64]) {
        let x = self.key;
        let above = fences.partition_point(|&f| u128::from(f) <= x);
        let from = fences
            .partition_point(|&f| u128::from(f) < x)
            .saturating_sub(1);
        (self.lo, self.hi) = (from, above.max(from));
        if let Some(&f) = fences.get(from) {
            self.key_lo = u128::from(f);
        }
        if let Some(&f) = fences.get(above) {
            self.key_hi = u128::from(f);
        }
    }

    /// The next slot to look at, or `None` when the key is in none.
    fn probe(&mut self) -> Option<usize> {
        if self.lo >= self.hi {
            return None;
        }
        let span = self.hi - self.lo;
        self.probes += 1;
        let off = if self.probes <= INTERPOLATIONS {
            self.guess(span)
        } else {
            span / 2
        };
        Some(self.lo + off)
    }

    /// Where the key falls in `0..span`, its prefix placed between the
    /// bounds'.
    fn guess(&self, span: usize) -> usize {
        // key_lo <= key <= key_hi while the keys are in order; a damaged
        // table's disorder only makes the guess a bad one.
        let width = self.key_hi.saturating_sub(self.key_lo) + 1;
        let at = self.key.saturating_sub(self.key_lo).min(width - 1) * span as u128 / width;
        (at as usize).min(span.saturating_sub(1))
    }

    /// The key sorts before slot `at`, whose (first) key is `first`.
    fn below(&mut self, at: usize, first: &[u8; 16]) {
        self.hi = at;
        self.key_hi = u128::from(key_prefix(first));
    }

    /// The key sorts after slot `at`, whose (last) key is `last`.
    fn above(&mut self, at: usize, last: &[u8; 16]) {
        self.lo = at + 1;
        self.key_lo = u128::from(key_prefix(last));
    }
}

/// Where `key` is among `n` sorted, uniform keys (`key_at(i)`), as
/// `slice::binary_search` answers, found by interpolation (see [`Bounds`]).
pub(crate) fn search<'k>(
    n: usize,
    key: &[u8; 16],
    key_at: impl Fn(usize) -> &'k [u8; 16],
) -> std::result::Result<usize, usize> {
    let mut bounds = Bounds::new(n, key);
    while let Some(i) = bounds.probe() {
        let k = key_at(i);
        match k.cmp(key) {
            std::cmp::Ordering::Less => bounds.above(i, k),
            std::cmp::Ordering::Greater => bounds.below(i, k),
            std::cmp::Ordering::Equal => return Ok(i),
        }
    }
    Err(bounds.lo)
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
            Some(m) => {
                // Look-ups go to pages at random: no read-ahead. (Each
                // fault still maps the neighbouring pages cached: see
                // `Table::set_budget`.)
                let _ = m.advise(memmap2::Advice::Random);
                Bytes::Mapped(m, file)
            }
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
            read_at_random: AtomicBool::new(false),
            fences: OnceLock::new(),
            random_lookups: AtomicU64::new(0),
            #[cfg(test)]
            probes: AtomicU64::new(0),
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
        if let Bytes::Mapped(m, _) = &self.bytes {
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
        self.checked_page(p, &self.bytes[at..at + PAGE_LEN])
    }

    /// Page `p`'s entries read from the file into `buf`, its checksum
    /// checked (once: the file does not change, see `StdFs::map`).
    fn read_page<'b>(
        &self,
        p: u64,
        buf: &'b mut [u8; PAGE_LEN],
    ) -> std::result::Result<&'b [u8], Damaged> {
        let Bytes::Mapped(_, file) = &self.bytes else {
            return self.page(p).map(|page| {
                buf[..page.len()].copy_from_slice(page);
                &buf[..page.len()]
            });
        };
        file.read_exact_at(buf, (1 + p) * PAGE_LEN as u64)
            .map_err(|e| Damaged(format!("{}: page {p} unreadable: {e}", self.path.display())))?;
        self.checked_page(p, buf)
    }

    fn checked_page<'b>(&self, p: u64, page: &'b [u8]) -> std::result::Result<&'b [u8], Damaged> {
        if !self.is_checked(p) {
            if crc32fast::hash(&page[..PAGE_CRC]) != u32_at(page, PAGE_CRC) {
                return Err(Damaged(format!(
                    "{}: page {p} fails its checksum",
                    self.path.display()
                )));
            }
            self.checked[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
        let n = self.entries_in(p);
        Ok(&page[..n * F::ENTRY_LEN])
    }

    /// True once page `p`'s checksum was checked.
    fn is_checked(&self, p: u64) -> bool {
        self.checked[(p / 64) as usize].load(Ordering::Relaxed) & (1 << (p % 64)) != 0
    }

    fn entries_in(&self, p: u64) -> usize {
        if p + 1 < self.pages {
            F::PER_PAGE
        } else {
            (self.entries - p * F::PER_PAGE as u64) as usize
        }
    }

    fn key_at(page: &[u8], i: usize) -> &[u8; 16] {
        let at = i * F::ENTRY_LEN;
        page[at..at + 16].try_into().expect("16 bytes")
    }

    fn entry_at(page: &[u8], i: usize) -> F::Entry {
        F::decode(&page[i * F::ENTRY_LEN..(i + 1) * F::ENTRY_LEN])
    }

    /// The entry of `key` among the sorted entries of `run` (a page, or
    /// part of one), if there.
    fn entry_in(run: &[u8], key: &[u8; 16]) -> Option<F::Entry> {
        search(run.len() / F::ENTRY_LEN, key, |i| Self::key_at(run, i))
            .ok()
            .map(|i| Self::entry_at(run, i))
    }

    /// The entry whose key is `key`, if the table has it: the pages are
    /// searched as [`search`] searches entries, each probe reading one
    /// page's first and last keys.
    pub fn get(&self, key: &[u8; 16]) -> std::result::Result<Option<F::Entry>, Damaged> {
        let reading = self.read_at_random.load(Ordering::Relaxed);
        Ok(self.find(key, reading, self.fences())?.0)
    }

    /// The first 8 key bytes of every page (8 bytes a page: 0.2% of the
    /// table), which take a look-up at random straight to the page that
    /// can hold its key: one page read, where interpolation alone reads
    /// about two. Read (every page's checksum checked on the way) once
    /// look-ups at random have numbered an eighth of the pages, so that a
    /// few look-ups (a small restore, recovering a pack at open) never pay
    /// for reading the whole table; with a large `pread` at a time, not
    /// through the map. `None` until then, or when they could not be read
    /// (a page that fails its checksum or a read error: look-ups go on
    /// without them, each page still checked when read).
    fn fences(&self) -> Option<&[u64]> {
        if let Some(fences) = self.fences.get() {
            return fences.as_deref();
        }
        let asked = self.random_lookups.fetch_add(1, Ordering::Relaxed);
        if asked < (self.pages / 8).max(64) {
            return None;
        }
        self.fences
            .get_or_init(|| self.read_fences().ok())
            .as_deref()
    }

    fn read_fences(&self) -> std::result::Result<Vec<u64>, Damaged> {
        const AT_ONCE: u64 = 256;
        let mut fences = Vec::with_capacity(self.pages as usize);
        let mut buf = vec![0u8; AT_ONCE as usize * PAGE_LEN];
        for first in (0..self.pages).step_by(AT_ONCE as usize) {
            let n = AT_ONCE.min(self.pages - first);
            let at = (1 + first) as usize * PAGE_LEN;
            let bytes = &mut buf[..n as usize * PAGE_LEN];
            match &self.bytes {
                Bytes::Mapped(_, file) => file
                    .read_exact_at(bytes, at as u64)
                    .map_err(|e| Damaged(format!("{}: unreadable: {e}", self.path.display())))?,
                Bytes::Owned(v) => bytes.copy_from_slice(&v[at..at + bytes.len()]),
            }
            for (i, page) in bytes.chunks_exact(PAGE_LEN).enumerate() {
                let page = self.checked_page(first + i as u64, page)?;
                let key = page
                    .first_chunk::<16>()
                    .ok_or_else(|| Damaged(format!("{}: an empty page", self.path.display())))?;
                fences.push(key_prefix(key));
            }
        }
        Ok(fences)
    }

    /// What a process may hold of the table's pages: a mapped table larger
    /// than `bytes` is read by look-ups at random (one `pread` of 32
    /// entries or a page, through the page cache) instead of through its
    /// map, whose
    /// every page touched would stay in the process's resident set until
    /// the map goes, and whose faults map neighbouring pages too. Runs in
    /// key order and scans still read the map, giving pages back as they
    /// go. Unbounded (all through the map) by default.
    pub fn set_budget(&self, bytes: u64) {
        let read = matches!(self.bytes, Bytes::Mapped(..)) && self.file_bytes() > bytes;
        self.read_at_random.store(read, Ordering::Relaxed);
    }

    /// [`Table::get`] for keys asked in ascending order (`last` starts at
    /// `None` and is this run's own): past each 16 MiB of pages such a run
    /// has gone through, the process's view of them goes back, as a scan's
    /// does, since the run will not read them again.
    pub fn get_in_order(
        &self,
        key: &[u8; 16],
        last: &mut Option<u64>,
    ) -> std::result::Result<Option<F::Entry>, Damaged> {
        let (entry, page) = self.find(key, false, None)?;
        if page.is_some() && page != *last {
            *last = page;
            self.passed_page();
        }
        Ok(entry)
    }

    /// A scan or an ordered run moved on to another page.
    fn passed_page(&self) {
        if self.reads.fetch_add(1, Ordering::Relaxed) + 1 >= RELEASE_EVERY {
            self.release();
        }
    }

    /// The entry whose key is `key` and the page that would hold it,
    /// `reading` pages from the file rather than the map, starting from
    /// the pages `fences` allow, if given.
    fn find(
        &self,
        key: &[u8; 16],
        reading: bool,
        fences: Option<&[u64]>,
    ) -> std::result::Result<(Option<F::Entry>, Option<u64>), Damaged> {
        let mut bounds = Bounds::new(self.pages as usize, key);
        if let Some(fences) = fences {
            bounds.fence(fences);
        }
        if reading {
            if fences.is_some()
                && let Some(found) = self.read_window(&bounds, key)?
            {
                return Ok((found, Some(bounds.lo as u64)));
            }
            let mut buf = [0u8; PAGE_LEN];
            while let Some(p) = bounds.probe() {
                let page = self.read_page(p as u64, &mut buf)?;
                if let Some(found) = self.look_in(page, p, key, &mut bounds)? {
                    return Ok((found, Some(p as u64)));
                }
            }
        } else {
            while let Some(p) = bounds.probe() {
                let page = self.page(p as u64)?;
                if let Some(found) = self.look_in(page, p, key, &mut bounds)? {
                    return Ok((found, Some(p as u64)));
                }
            }
        }
        Ok((None, None))
    }

    /// The answer from a few entries read around where the key falls in
    /// the one page the fences allow, when they decide it: a look-up then
    /// copies 1 KiB, not a 4 KiB page. `None`: the key may lie outside
    /// them (rare), or the page was never checked (its checksum needs the
    /// whole page), or the search is not down to one page.
    fn read_window(
        &self,
        bounds: &Bounds,
        key: &[u8; 16],
    ) -> std::result::Result<Option<Option<F::Entry>>, Damaged> {
        const WINDOW: usize = 32;
        const MAX_ENTRY: usize = 32;
        let p = bounds.lo as u64;
        let Bytes::Mapped(_, file) = &self.bytes else {
            return Ok(None);
        };
        let n = self.entries_in(p);
        if bounds.hi != bounds.lo + 1
            || n <= WINDOW
            || F::ENTRY_LEN > MAX_ENTRY
            || !self.is_checked(p)
        {
            return Ok(None);
        }
        let guess = bounds.guess(n);
        let start = guess.saturating_sub(WINDOW / 2).min(n - WINDOW);
        let mut buf = [0u8; WINDOW * MAX_ENTRY];
        let buf = &mut buf[..WINDOW * F::ENTRY_LEN];
        let at = (1 + p) * PAGE_LEN as u64 + (start * F::ENTRY_LEN) as u64;
        file.read_exact_at(buf, at)
            .map_err(|e| Damaged(format!("{}: page {p} unreadable: {e}", self.path.display())))?;
        #[cfg(test)]
        self.probes.fetch_add(1, Ordering::Relaxed);
        if (key < Self::key_at(buf, 0) && start > 0)
            || (key > Self::key_at(buf, WINDOW - 1) && start + WINDOW < n)
        {
            return Ok(None);
        }
        Ok(Some(Self::entry_in(buf, key)))
    }

    /// One probe of a search: the answer when page `p` (its entries) can
    /// hold `key`, else `None` with the bounds narrowed.
    fn look_in(
        &self,
        page: &[u8],
        p: usize,
        key: &[u8; 16],
        bounds: &mut Bounds,
    ) -> std::result::Result<Option<Option<F::Entry>>, Damaged> {
        #[cfg(test)]
        self.probes.fetch_add(1, Ordering::Relaxed);
        let n = page.len() / F::ENTRY_LEN;
        if n == 0 {
            return Err(Damaged(format!("{}: an empty page", self.path.display())));
        }
        let (first, last) = (Self::key_at(page, 0), Self::key_at(page, n - 1));
        if key < first {
            bounds.below(p, first);
            Ok(None)
        } else if key > last {
            bounds.above(p, last);
            Ok(None)
        } else {
            Ok(Some(Self::entry_in(page, key)))
        }
    }

    /// Every entry in key order, each page checked.
    pub fn iter(&self) -> impl Iterator<Item = std::result::Result<F::Entry, Damaged>> + '_ {
        (0..self.pages).flat_map(move |p| {
            // A scan passes each page once: what it has passed goes back.
            self.passed_page();
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
) -> Result<()>
where
    F::Item: Clone,
{
    write_with::<F>(fs, path, entries, || items.to_vec(), generation)
}

/// [`write`], with the items made once every entry is written (they may
/// depend on the entries).
pub fn write_with<F: Format>(
    fs: &dyn StoreFs,
    path: &Path,
    entries: impl Iterator<Item = Result<F::Entry>>,
    items: impl FnOnce() -> Vec<F::Item>,
    generation: u64,
) -> Result<()> {
    let tmp = tmp_path(path);
    let dir = path.parent().unwrap_or(Path::new("."));
    let _ = fs.remove(&tmp);
    let written = (|| {
        let file = fs.open(&tmp, OpenMode::CreateNew).at(&tmp)?;
        encode_with::<F>(entries, items, generation, |bytes, at| {
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
#[cfg(any(test, feature = "testing"))]
pub fn encode<F: Format>(
    entries: impl Iterator<Item = Result<F::Entry>>,
    items: &[F::Item],
    generation: u64,
    out: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<()>
where
    F::Item: Clone,
{
    encode_with::<F>(entries, || items.to_vec(), generation, out)
}

/// [`encode`], with the items made once every entry is encoded.
fn encode_with<F: Format>(
    entries: impl Iterator<Item = Result<F::Entry>>,
    items: impl FnOnce() -> Vec<F::Item>,
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
    let items = items();
    let mut list = Vec::with_capacity(items.len() * F::ITEM_LEN);
    for i in &items {
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

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use proptest::prelude::*;

    use super::*;
    use crate::fsio::StdFs;
    use crate::ids::ChunkId;
    use crate::store::ChunkLoc;
    use crate::store::table::{ChunkFormat, Entry};

    fn uniform(n: u32) -> Vec<[u8; 16]> {
        let mut keys: Vec<[u8; 16]> = (0..n)
            .map(|i| ChunkId::of(&i.to_le_bytes()).0[..16].try_into().unwrap())
            .collect();
        keys.sort_unstable();
        keys
    }

    proptest! {
        /// Any sorted keys, uniform or not (a crafted or damaged table's):
        /// the answer `binary_search` gives.
        #[test]
        fn search_answers_as_binary_search_does(
            mut keys in prop::collection::vec(any::<[u8; 16]>(), 0..300),
            skew in 0usize..16,
            probe in any::<[u8; 16]>(),
        ) {
            // Skewed: the first bytes shared, so the prefixes bunch up.
            for k in &mut keys {
                k[..skew.min(8)].fill(0);
            }
            keys.sort_unstable();
            keys.dedup();
            for key in keys.iter().chain([&probe]) {
                prop_assert_eq!(search(keys.len(), key, |i| &keys[i]), keys.binary_search(key));
            }
        }
    }

    #[test]
    fn search_of_uniform_keys_takes_a_few_probes() {
        let keys = uniform(1 << 20);
        let probes = Cell::new(0u64);
        for i in (0..1u32 << 21).step_by(97) {
            let key: [u8; 16] = ChunkId::of(&i.to_le_bytes()).0[..16].try_into().unwrap();
            let found = search(keys.len(), &key, |j| {
                probes.set(probes.get() + 1);
                &keys[j]
            });
            assert_eq!(found.is_ok(), i < 1 << 20);
        }
        let per = probes.get() as f64 / f64::from((1u32 << 21).div_ceil(97));
        // A binary search takes 20.
        assert!(per < 5.0, "{per} probes a look-up");
    }

    /// A look-up at random reads the page that holds its key, rarely one
    /// more, once the fences are read (each page read is a cache and often
    /// a TLB miss, or a `pread`); before them, or in key order, about two.
    #[test]
    fn a_look_up_reads_one_page() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.idx");
        let entries = uniform(1 << 20).into_iter().map(|key| {
            Ok(Entry {
                key,
                loc: ChunkLoc {
                    pack: 1,
                    offset: 0,
                    stored_len: 1,
                },
            })
        });
        write::<ChunkFormat>(&StdFs, &path, entries, &[], 1).unwrap();
        let table = Table::<ChunkFormat>::open(&StdFs, &path).unwrap().unwrap();
        let keys: Vec<[u8; 16]> = (0..2000u32)
            .map(|i| {
                ChunkId::of(&(i * 500).to_le_bytes()).0[..16]
                    .try_into()
                    .unwrap()
            })
            .collect();
        // Look-ups without fences read about two pages; past an eighth of
        // the pages' count of them (898 here), the fences are read.
        table.probes.store(0, Ordering::Relaxed);
        for key in &keys[..500] {
            assert!(table.get(key).unwrap().is_some());
        }
        let per = table.probes.load(Ordering::Relaxed) as f64 / 500.0;
        assert!(table.fences.get().is_none());
        assert!(
            (1.2..3.0).contains(&per),
            "{per} pages a look-up before the fences"
        );
        for key in &keys {
            assert!(table.get(key).unwrap().is_some());
        }
        assert!(table.fences.get().is_some_and(Option::is_some));
        for (budget, most) in [(u64::MAX, 1.05), (0, 1.05)] {
            table.set_budget(budget);
            table.probes.store(0, Ordering::Relaxed);
            for key in &keys {
                assert!(table.get(key).unwrap().is_some());
            }
            let per = table.probes.load(Ordering::Relaxed) as f64 / keys.len() as f64;
            assert!(per <= most, "{per} pages a look-up, budget {budget}");
        }
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        table.probes.store(0, Ordering::Relaxed);
        let mut last = None;
        for key in &sorted {
            assert!(table.get_in_order(key, &mut last).unwrap().is_some());
        }
        let per = table.probes.load(Ordering::Relaxed) as f64 / keys.len() as f64;
        // Bisecting 7,183 pages read 13.
        assert!(per < 3.0, "{per} pages a look-up in order");
    }

    /// A run of look-ups in key order, its pages given back as it goes
    /// (every 64 pages in tests), answers as look-ups at random do.
    #[test]
    fn look_ups_in_order_answer_as_at_random() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.idx");
        let keys = uniform(40_000);
        let present: Vec<[u8; 16]> = keys.iter().copied().step_by(2).collect();
        let entries = present.iter().enumerate().map(|(i, &key)| {
            Ok(Entry {
                key,
                loc: ChunkLoc {
                    pack: 1,
                    offset: i as u32,
                    stored_len: 1,
                },
            })
        });
        write::<ChunkFormat>(&StdFs, &path, entries, &[], 1).unwrap();
        let table = Table::<ChunkFormat>::open(&StdFs, &path).unwrap().unwrap();
        let mut last = None;
        for (i, key) in keys.iter().enumerate() {
            let got = table.get_in_order(key, &mut last).unwrap();
            assert_eq!(
                got.map(|e| e.loc.offset as usize),
                (i % 2 == 0).then_some(i / 2)
            );
            assert_eq!(got, table.get(key).unwrap());
        }
    }
}
