//! A disk's blocks, each zero or a chunk id, kept in pages of 4,096 blocks.
//!
//! A page is one of three kinds:
//! - zero: every block of it is zero, and nothing is allocated (a sparse
//!   disk of a terabyte costs what its data does);
//! - in memory: 33 bytes a block;
//! - stored: the ids of its data blocks lie in a file, in block order, and
//!   only the page's 512-byte bitmap of which blocks hold data is in
//!   memory. A manifest read from its file keeps its pages there (see
//!   `Manifests::read`), and a map told to [`BlockMap::spill_beyond`] a
//!   budget writes its oldest in-memory pages to a scratch file as it
//!   grows, so that a dense disk of a terabyte (16M blocks of 64 KiB:
//!   530 MiB of ids) is captured and restored in bounded memory.
//!
//! Reading a stored page can fail (an I/O error, a file cut short), so
//! every read is a `Result`. A few recently read stored pages are kept
//! decoded, so that reads in block order cost one `pread` a page.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::fsio::StoreFile;
use crate::ids::ChunkId;

/// Blocks per page.
pub(crate) const PAGE: u64 = 4096;
/// Words of a page's bitmap.
const WORDS: usize = (PAGE / 64) as usize;
/// Bytes of memory an in-memory page takes.
pub const MEM_PAGE_BYTES: u64 = PAGE * std::mem::size_of::<Option<ChunkId>>() as u64;
/// Stored pages kept decoded for reads.
const CACHED_PAGES: usize = 4;

/// An in-memory page: every block's entry.
type Entries = Box<[Option<ChunkId>]>;

/// Which blocks of a page hold data, bit `k % 64` of word `k / 64`.
pub(crate) type Bits = [u64; WORDS];

/// A file that stored pages' ids are read from, named for errors.
pub struct Backing {
    file: Arc<dyn StoreFile>,
    path: PathBuf,
}

impl Backing {
    pub fn new(file: Arc<dyn StoreFile>, path: PathBuf) -> Arc<Self> {
        Arc::new(Backing { file, path })
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::corrupt(&self.path, "cut short: block ids are missing")
            } else {
                Error::io(&self.path, e)
            }
        })
    }
}

/// A page whose data blocks' ids lie in a file.
#[derive(Clone)]
struct Stored {
    backing: Arc<Backing>,
    /// Where the id of the page's first data block is.
    offset: u64,
    bits: Arc<Bits>,
}

impl Stored {
    fn count(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    fn has(&self, k: usize) -> bool {
        self.bits[k / 64] & (1 << (k % 64)) != 0
    }

    /// Reads the page's ids and lays them out block by block.
    fn load(&self) -> Result<Entries> {
        let mut raw = vec![0u8; self.count() * 32];
        self.backing.read(&mut raw, self.offset)?;
        laid_out(&self.bits, &raw)
            .ok_or_else(|| Error::Internal("a stored page has fewer ids than data blocks".into()))
    }
}

/// A page's entries from its bitmap and its data blocks' ids (32 bytes
/// each, in order); `None` when there are fewer ids than bits.
fn laid_out(bits: &Bits, raw: &[u8]) -> Option<Entries> {
    let mut ids = raw.chunks_exact(32);
    let mut page: Entries = vec![None; PAGE as usize].into_boxed_slice();
    for (k, slot) in page.iter_mut().enumerate() {
        if bits[k / 64] & (1 << (k % 64)) != 0 {
            *slot = Some(crate::le::chunk_id_at(ids.next()?, 0));
        }
    }
    Some(page)
}

/// Which blocks of a page hold data.
fn bits_of(entries: &Entries) -> Bits {
    let mut bits: Bits = [0; WORDS];
    for (k, b) in entries.iter().enumerate() {
        if b.is_some() {
            bits[k / 64] |= 1 << (k % 64);
        }
    }
    bits
}

#[derive(Clone)]
enum Page {
    Zero,
    Mem(Entries),
    Stored(Stored),
}

/// Where in-memory pages beyond a budget go.
struct Spill {
    dir: PathBuf,
    /// The scratch file, made at the first page spilled: unnamed, so it
    /// goes when the map does, or with the process.
    backing: Option<Arc<Backing>>,
    end: u64,
    max_mem: usize,
    /// The in-memory pages, by number.
    mem: BTreeSet<usize>,
}

/// Every block of a disk, in order: `None` for an all-zero block.
pub struct BlockMap {
    len: u64,
    pages: Vec<Page>,
    spill: Option<Spill>,
    /// Stored pages read lately, by number.
    cache: Mutex<Vec<(usize, Arc<Entries>)>>,
}

impl Default for BlockMap {
    fn default() -> Self {
        BlockMap::zeros(0)
    }
}

/// A copy shares the stored pages' files, and spills (to a scratch file
/// of its own) past the same budget.
impl Clone for BlockMap {
    fn clone(&self) -> Self {
        let mut copy = BlockMap {
            len: self.len,
            pages: self.pages.clone(),
            spill: None,
            cache: Mutex::new(Vec::new()),
        };
        if let Some(s) = &self.spill {
            copy.spill_beyond(s.max_mem as u64 * MEM_PAGE_BYTES, s.dir.clone());
        }
        copy
    }
}

/// Equal when the blocks are, however they are paged (and unequal when
/// either cannot be read).
impl PartialEq for BlockMap {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self
                .data()
                .zip(other.data())
                .all(|(a, b)| matches!((a, b), (Ok(a), Ok(b)) if a == b))
            && self.data_count() == other.data_count()
    }
}

impl Eq for BlockMap {}

impl std::fmt::Debug for BlockMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BlockMap({} blocks, {} data)",
            self.len,
            self.data_count()
        )
    }
}

impl BlockMap {
    /// `len` blocks, all zero (nothing allocated but the page list).
    pub fn zeros(len: u64) -> Self {
        BlockMap {
            len,
            pages: vec![Page::Zero; len.div_ceil(PAGE) as usize],
            spill: None,
            cache: Mutex::new(Vec::new()),
        }
    }

    /// Number of blocks.
    pub fn len(&self) -> u64 {
        self.len
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// From here on, in-memory pages beyond `bytes` of them are written to
    /// an unnamed scratch file in `dir` (the oldest-numbered first: a
    /// capture fills the map in block order) and read back from it when
    /// needed.
    pub fn spill_beyond(&mut self, bytes: u64, dir: PathBuf) {
        let mem = self
            .pages
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p, Page::Mem(_)))
            .map(|(i, _)| i)
            .collect();
        self.spill = Some(Spill {
            dir,
            backing: None,
            end: 0,
            max_mem: (bytes / MEM_PAGE_BYTES).max(1) as usize,
            mem,
        });
    }

    /// Block `i`: its chunk, or `None` when zero (or past the end).
    pub fn get(&self, i: u64) -> Result<Option<ChunkId>> {
        let p = (i / PAGE) as usize;
        let k = (i % PAGE) as usize;
        match self.pages.get(p) {
            None | Some(Page::Zero) => Ok(None),
            Some(Page::Mem(page)) => Ok(page[k]),
            Some(Page::Stored(s)) if !s.has(k) => Ok(None),
            Some(Page::Stored(s)) => Ok(self.cached(p, s)?[k]),
        }
    }

    /// Stored page `p`, decoded: from the cache, or read (outside its
    /// lock, so that threads reading other pages need not wait) into it.
    fn cached(&self, p: usize, s: &Stored) -> Result<Arc<Entries>> {
        if let Some((_, page)) = self.cache.lock().iter().find(|(n, _)| *n == p) {
            return Ok(page.clone());
        }
        let page = Arc::new(s.load()?);
        let mut cache = self.cache.lock();
        if !cache.iter().any(|(n, _)| *n == p) {
            // Each of the threads that read in parallel may be on a page
            // of its own.
            if cache.len() >= CACHED_PAGES.max(2 * rayon::current_num_threads()) {
                cache.remove(0);
            }
            cache.push((p, page.clone()));
        }
        Ok(page)
    }

    /// Sets block `i` (below [`BlockMap::len`]); a zero block in a page
    /// with no data allocates nothing. Fails only when a stored page
    /// cannot be read, or a page cannot be spilled.
    pub fn set(&mut self, i: u64, block: Option<ChunkId>) -> Result<()> {
        debug_assert!(i < self.len);
        let p = (i / PAGE) as usize;
        let k = (i % PAGE) as usize;
        match (self.pages.get(p), block) {
            (None, _) | (Some(Page::Zero), None) => return Ok(()),
            (Some(Page::Stored(s)), None) if !s.has(k) => return Ok(()),
            _ => {}
        }
        self.in_memory(p)?[k] = block;
        Ok(())
    }

    /// Page `p` in memory (allocated, or read back), to change; another
    /// page may be spilled to make room.
    fn in_memory(&mut self, p: usize) -> Result<&mut Entries> {
        let page = match &self.pages[p] {
            Page::Mem(_) => None,
            Page::Zero => Some(vec![None; PAGE as usize].into_boxed_slice()),
            Page::Stored(s) => Some(s.load()?),
        };
        if let Some(page) = page {
            self.cache.lock().retain(|(n, _)| *n != p);
            self.pages[p] = Page::Mem(page);
            if let Some(spill) = &mut self.spill {
                spill.mem.insert(p);
            }
            self.spill_all_but(p)?;
        }
        match &mut self.pages[p] {
            Page::Mem(page) => Ok(page),
            _ => Err(Error::Internal("a block map page is not in memory".into())),
        }
    }

    /// Spills in-memory pages, other than `keep`, while there are more than
    /// the budget allows.
    fn spill_all_but(&mut self, keep: usize) -> Result<()> {
        loop {
            let Some(spill) = &mut self.spill else {
                return Ok(());
            };
            if spill.mem.len() <= spill.max_mem {
                return Ok(());
            }
            let Some(p) = spill.mem.iter().copied().find(|&n| n != keep) else {
                return Ok(());
            };
            spill.mem.remove(&p);
            let Page::Mem(entries) = &self.pages[p] else {
                continue;
            };
            let bits = bits_of(entries);
            let raw: Vec<u8> = entries.iter().flatten().flat_map(|id| id.0).collect();
            if raw.is_empty() {
                self.pages[p] = Page::Zero;
                continue;
            }
            let backing = match &spill.backing {
                Some(b) => b.clone(),
                None => {
                    let file = crate::fsio::scratch_file(&spill.dir, "a disk's block list")?;
                    let b = Backing::new(Arc::new(file), spill.dir.clone());
                    spill.backing = Some(b.clone());
                    b
                }
            };
            backing
                .file
                .write_all_at(&raw, spill.end)
                .map_err(|e| Error::io(&spill.dir, e))?;
            self.pages[p] = Page::Stored(Stored {
                backing,
                offset: spill.end,
                bits: Arc::new(bits),
            });
            spill.end += raw.len() as u64;
        }
    }

    /// Makes the blocks of `range` zero.
    pub fn clear(&mut self, range: Range<u64>) -> Result<()> {
        let range = range.start..range.end.min(self.len);
        let mut i = range.start;
        while i < range.end {
            let p = (i / PAGE) as usize;
            let page_end = ((p as u64 + 1) * PAGE).min(range.end);
            let whole = i % PAGE == 0 && page_end - i == PAGE;
            if whole {
                self.pages[p] = Page::Zero;
                self.cache.lock().retain(|(n, _)| *n != p);
                if let Some(spill) = &mut self.spill {
                    spill.mem.remove(&p);
                }
            } else if !matches!(self.pages[p], Page::Zero) {
                self.in_memory(p)?[(i % PAGE) as usize..=((page_end - 1) % PAGE) as usize]
                    .fill(None);
            }
            i = page_end;
        }
        Ok(())
    }

    /// Every block in order.
    pub fn iter(&self) -> impl Iterator<Item = Result<Option<ChunkId>>> + '_ {
        let mut data = self.data().peekable();
        (0..self.len).map(
            move |i| match data.next_if(|d| !matches!(d, Ok((j, _)) if *j != i)) {
                Some(Ok((_, id))) => Ok(Some(id)),
                Some(Err(e)) => Err(e),
                None => Ok(None),
            },
        )
    }

    /// The data blocks in order, with their index; zero pages cost nothing
    /// and a stored page one read.
    pub fn data(&self) -> Data<'_> {
        Data {
            map: self,
            page: 0,
            loaded: Vec::new(),
            at: 0,
        }
    }

    /// Number of data blocks.
    pub fn data_count(&self) -> u64 {
        self.pages
            .iter()
            .map(|p| match p {
                Page::Zero => 0,
                Page::Mem(e) => e.iter().filter(|b| b.is_some()).count() as u64,
                Page::Stored(s) => s.count() as u64,
            })
            .sum()
    }

    /// The data bitmap of page `p` (bit `k` of byte `b`: block `8b + k`
    /// of the page), appended to `out`.
    pub(crate) fn page_bitmap(&self, p: usize, out: &mut Vec<u8>) {
        let bits = match &self.pages[p] {
            Page::Zero => [0; WORDS],
            Page::Stored(s) => *s.bits,
            Page::Mem(e) => bits_of(e),
        };
        for w in bits {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }

    /// Number of pages.
    pub(crate) fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// A map of `len` blocks whose pages are `bits` (one 512-byte data
    /// bitmap a page) with their ids in `backing` from `offset` on, page
    /// after page. Pages of no data are zero pages.
    pub(crate) fn stored(
        len: u64,
        bits: impl IntoIterator<Item = Bits>,
        backing: Arc<Backing>,
        mut offset: u64,
    ) -> Self {
        let mut map = BlockMap::zeros(len);
        for (p, bits) in bits.into_iter().enumerate().take(map.pages.len()) {
            let s = Stored {
                backing: backing.clone(),
                offset,
                bits: Arc::new(bits),
            };
            let n = s.count() as u64;
            if n > 0 {
                map.pages[p] = Page::Stored(s);
                offset += 32 * n;
            }
        }
        map
    }

    /// Sets page `p` of a map being read: `bits` says which of its blocks
    /// hold data, and `raw` holds their ids, 32 bytes each, in order.
    pub(crate) fn put_page(&mut self, p: usize, bits: &Bits, raw: &[u8]) {
        if let (Some(slot), Some(page)) = (self.pages.get_mut(p), laid_out(bits, raw)) {
            *slot = Page::Mem(page);
        }
    }

    /// Bytes of memory the pages take (stored pages: their bitmaps).
    #[cfg(any(test, feature = "testing"))]
    pub fn heap_bytes(&self) -> u64 {
        let per = |p: &Page| match p {
            Page::Zero => 0,
            Page::Mem(_) => MEM_PAGE_BYTES,
            Page::Stored(_) => std::mem::size_of::<Bits>() as u64,
        };
        self.pages.iter().map(per).sum::<u64>()
            + self.pages.len() as u64 * std::mem::size_of::<Page>() as u64
    }

    /// Pages in memory (for tests of the budget).
    #[cfg(test)]
    fn mem_pages(&self) -> usize {
        self.pages
            .iter()
            .filter(|p| matches!(p, Page::Mem(_)))
            .count()
    }
}

/// The data blocks of a map, in order ([`BlockMap::data`]).
pub struct Data<'a> {
    map: &'a BlockMap,
    page: usize,
    /// The current page's data blocks, from `at` on.
    loaded: Vec<(u64, ChunkId)>,
    at: usize,
}

impl Iterator for Data<'_> {
    type Item = Result<(u64, ChunkId)>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.at == self.loaded.len() {
            let page = self.map.pages.get(self.page)?;
            let first = self.page as u64 * PAGE;
            self.page += 1;
            self.loaded.clear();
            self.at = 0;
            let read;
            let entries: &Entries = match page {
                Page::Zero => continue,
                Page::Mem(e) => e,
                Page::Stored(s) => match s.load() {
                    Ok(e) => {
                        read = e;
                        &read
                    }
                    Err(e) => {
                        // Nothing after an error.
                        self.page = self.map.pages.len();
                        return Some(Err(e));
                    }
                },
            };
            self.loaded.extend(
                entries
                    .iter()
                    .enumerate()
                    .filter_map(|(k, b)| b.map(|id| (first + k as u64, id))),
            );
        }
        self.at += 1;
        Some(Ok(self.loaded[self.at - 1]))
    }
}

impl From<Vec<Option<ChunkId>>> for BlockMap {
    fn from(blocks: Vec<Option<ChunkId>>) -> Self {
        let mut map = BlockMap::zeros(blocks.len() as u64);
        for (p, run) in blocks.chunks(PAGE as usize).enumerate() {
            if run.iter().any(Option::is_some) {
                let mut page: Entries = vec![None; PAGE as usize].into_boxed_slice();
                page[..run.len()].copy_from_slice(run);
                map.pages[p] = Page::Mem(page);
            }
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    fn all(map: &BlockMap) -> Vec<Option<ChunkId>> {
        map.iter().collect::<Result<_>>().unwrap()
    }

    #[test]
    fn behaves_as_a_vector_and_allocates_only_where_data_is() {
        let len = 3 * PAGE + 17;
        let mut map = BlockMap::zeros(len);
        let mut want = vec![None; len as usize];
        assert_eq!(map.heap_bytes(), 4 * std::mem::size_of::<Page>() as u64);
        for i in [0, 5, PAGE - 1, PAGE, 3 * PAGE + 16] {
            map.set(i, Some(id(i))).unwrap();
            want[i as usize] = Some(id(i));
        }
        map.set(2 * PAGE + 1, None).unwrap();
        assert_eq!(map.mem_pages(), 3);
        assert_eq!(all(&map), want);
        let data: Vec<(u64, ChunkId)> = map.data().collect::<Result<_>>().unwrap();
        let want_data: Vec<(u64, ChunkId)> = want
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|id| (i as u64, id)))
            .collect();
        assert_eq!(data, want_data);
        assert_eq!(map.data_count(), 5);
        assert_eq!(map.get(len + 5).unwrap(), None);
        for range in [3..PAGE + 1, PAGE..2 * PAGE, 0..0, 3 * PAGE..len + 9] {
            map.clear(range.clone()).unwrap();
            for i in range.start..range.end.min(len) {
                want[i as usize] = None;
            }
            assert_eq!(all(&map), want, "{range:?}");
        }
        // The second page was cleared whole: it is gone.
        assert!(matches!(map.pages[1], Page::Zero));
        assert_eq!(BlockMap::from(want.clone()), map);
    }

    /// A map that spills past one page's worth answers as one that does
    /// not, through sets, clears, copies and reads at random.
    #[test]
    fn a_spilled_map_answers_as_one_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let len = 9 * PAGE + 100;
        let mut small = BlockMap::zeros(len);
        small.spill_beyond(2 * MEM_PAGE_BYTES, dir.path().to_path_buf());
        let mut want = vec![None; len as usize];
        let mut rng = crate::rng::Rng::new(7);
        // In block order, as a capture fills it, then at random.
        for i in (0..len).step_by(3) {
            small.set(i, Some(id(i))).unwrap();
            want[i as usize] = Some(id(i));
            assert!(small.mem_pages() <= 2);
        }
        for _ in 0..2000 {
            let i = rng.below(len);
            let b = (rng.below(4) != 0).then(|| id(rng.below(1 << 30)));
            small.set(i, b).unwrap();
            want[i as usize] = b;
            assert!(small.mem_pages() <= 2);
        }
        small.clear(2 * PAGE..3 * PAGE).unwrap();
        small.clear(5 * PAGE + 7..6 * PAGE + 9).unwrap();
        for i in (2 * PAGE..3 * PAGE).chain(5 * PAGE + 7..6 * PAGE + 9) {
            want[i as usize] = None;
        }
        assert!(small.mem_pages() <= 2);
        assert_eq!(all(&small), want);
        for _ in 0..500 {
            let i = rng.below(len + 10);
            assert_eq!(
                small.get(i).unwrap(),
                want.get(i as usize).copied().flatten()
            );
        }
        let copy = small.clone();
        assert_eq!(all(&copy), want);
        assert_eq!(copy, BlockMap::from(want.clone()));
        assert_eq!(
            small.data_count(),
            want.iter().filter(|b| b.is_some()).count() as u64
        );
    }

    /// A stored page whose file is cut short is an error, never zeros.
    #[test]
    fn a_stored_page_cut_short_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids");
        let file = std::fs::File::create_new(&path).unwrap();
        let mut raw = Vec::new();
        for n in 0..3 {
            raw.extend_from_slice(&id(n).0);
        }
        file.write_all_at(&raw[..70], 0).unwrap();
        let mut bits: Bits = [0; WORDS];
        bits[0] = 0b1011;
        let map = BlockMap::stored(PAGE, [bits], Backing::new(Arc::new(file), path), 0);
        assert!(map.get(0).is_err());
        assert_eq!(map.get(2).unwrap(), None);
        assert!(map.data().any(|d| d.is_err()));
        assert!(map.iter().any(|d| d.is_err()));
    }
}
