//! A disk's blocks, each zero or a chunk id, kept in pages of 4,096 blocks
//! that exist only where the disk holds data: a sparse disk of a terabyte
//! costs what its data does, not 33 bytes for each of its 16 million
//! blocks. Captures build one, manifests hold one, restores and verify
//! read them.

use std::ops::Range;

use crate::ids::ChunkId;

/// Blocks per page.
const PAGE: u64 = 4096;

type Page = Box<[Option<ChunkId>]>;

/// Every block of a disk, in order: `None` for an all-zero block.
#[derive(Clone, Default)]
pub struct BlockMap {
    len: u64,
    /// `None`: every block of the page is zero.
    pages: Vec<Option<Page>>,
}

/// Equal when the blocks are, however they are paged.
impl PartialEq for BlockMap {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.data().eq(other.data())
    }
}

impl Eq for BlockMap {}

impl std::fmt::Debug for BlockMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BlockMap({} blocks, {} data)",
            self.len,
            self.data().count()
        )
    }
}

impl BlockMap {
    /// `len` blocks, all zero (nothing allocated but the page list).
    pub fn zeros(len: u64) -> Self {
        BlockMap {
            len,
            pages: vec![None; len.div_ceil(PAGE) as usize],
        }
    }

    /// Number of blocks.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Block `i`: its chunk, or `None` when zero (or past the end).
    pub fn get(&self, i: u64) -> Option<ChunkId> {
        match self.pages.get((i / PAGE) as usize) {
            Some(Some(page)) => page[(i % PAGE) as usize],
            _ => None,
        }
    }

    /// Sets block `i` (below [`BlockMap::len`]); a zero block in a page
    /// with no data allocates nothing.
    pub fn set(&mut self, i: u64, block: Option<ChunkId>) {
        debug_assert!(i < self.len);
        let Some(slot) = self.pages.get_mut((i / PAGE) as usize) else {
            return;
        };
        match (slot, block) {
            (Some(page), block) => page[(i % PAGE) as usize] = block,
            (slot @ None, Some(id)) => {
                let mut page: Page = vec![None; PAGE as usize].into_boxed_slice();
                page[(i % PAGE) as usize] = Some(id);
                *slot = Some(page);
            }
            (None, None) => {}
        }
    }

    /// Makes the blocks of `range` zero.
    pub fn clear(&mut self, range: Range<u64>) {
        let range = range.start..range.end.min(self.len);
        let mut i = range.start;
        while i < range.end {
            let p = (i / PAGE) as usize;
            let page_end = ((p as u64 + 1) * PAGE).min(range.end);
            let whole = i % PAGE == 0 && page_end - i == PAGE;
            match &mut self.pages[p] {
                Some(_) if whole => self.pages[p] = None,
                Some(page) => {
                    page[(i % PAGE) as usize..=((page_end - 1) % PAGE) as usize].fill(None)
                }
                None => {}
            }
            i = page_end;
        }
    }

    /// Every block in order.
    pub fn iter(&self) -> impl Iterator<Item = Option<ChunkId>> + '_ {
        (0..self.len).map(move |i| self.get(i))
    }

    /// The data blocks in order, with their index; pages with no data
    /// cost nothing.
    pub fn data(&self) -> impl Iterator<Item = (u64, ChunkId)> + '_ {
        self.pages
            .iter()
            .enumerate()
            .filter_map(|(p, page)| page.as_ref().map(|page| (p as u64 * PAGE, page)))
            .flat_map(|(first, page)| {
                page.iter()
                    .enumerate()
                    .filter_map(move |(k, b)| b.map(|id| (first + k as u64, id)))
            })
    }

    /// Bytes of memory the pages take.
    pub fn heap_bytes(&self) -> u64 {
        let pages = self.pages.iter().flatten().count() as u64;
        pages * PAGE * std::mem::size_of::<Option<ChunkId>>() as u64 + self.pages.len() as u64 * 8
    }
}

impl From<Vec<Option<ChunkId>>> for BlockMap {
    fn from(blocks: Vec<Option<ChunkId>>) -> Self {
        let mut map = BlockMap::zeros(blocks.len() as u64);
        for (i, b) in blocks.into_iter().enumerate() {
            map.set(i as u64, b);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_vector_and_allocates_only_where_data_is() {
        let len = 3 * PAGE + 17;
        let mut map = BlockMap::zeros(len);
        let mut want = vec![None; len as usize];
        assert_eq!(map.heap_bytes(), 4 * 8);
        let id = |n: u64| ChunkId::of(&n.to_le_bytes());
        for i in [0, 5, PAGE - 1, PAGE, 3 * PAGE + 16] {
            map.set(i, Some(id(i)));
            want[i as usize] = Some(id(i));
        }
        map.set(2 * PAGE + 1, None);
        assert_eq!(map.pages.iter().flatten().count(), 3);
        assert_eq!(map.iter().collect::<Vec<_>>(), want);
        let data: Vec<(u64, ChunkId)> = map.data().collect();
        let want_data: Vec<(u64, ChunkId)> = want
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|id| (i as u64, id)))
            .collect();
        assert_eq!(data, want_data);
        assert_eq!(map.get(len + 5), None);
        for range in [3..PAGE + 1, PAGE..2 * PAGE, 0..0, 3 * PAGE..len + 9] {
            map.clear(range.clone());
            for i in range.start..range.end.min(len) {
                want[i as usize] = None;
            }
            assert_eq!(map.iter().collect::<Vec<_>>(), want, "{range:?}");
        }
        // The second page was cleared whole: it is gone.
        assert!(map.pages[1].is_none());
        assert_eq!(BlockMap::from(want.clone()), map);
    }
}
