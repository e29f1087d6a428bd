//! Dirty-block bitmaps: which parts of a disk were written since a
//! snapshot. A hypervisor's change tracker (a QEMU dirty bitmap, VMware
//! changed block tracking) hands one over, or the engine builds one from
//! the writes its embedder reports ([`crate::Engine::record_write`]).
//!
//! One bit covers `granularity` bytes of the disk, a power-of-two multiple
//! of the store's block size. As bytes (the `--dirty-bitmap` file of the
//! command), bit k of byte b, least significant bit first, marks region
//! 8b + k; the last byte's unused high bits are zero.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The most regions a bitmap tracks: 2^32 bits (512 MiB of bitmap), a
/// 256 TiB disk at 64 KiB per bit.
const MAX_REGIONS: u64 = 1 << 32;

/// A set of dirty regions of a disk of a known length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    disk_len: u64,
    granularity: u64,
    /// Number of regions: ceil(disk_len / granularity).
    bits: u64,
    words: Vec<u64>,
}

impl DirtyBitmap {
    /// An all-clean bitmap for a disk of `disk_len` bytes, one bit per
    /// `granularity` bytes (a power of two, at least 512).
    pub fn new(disk_len: u64, granularity: u64) -> Result<Self> {
        let bits = Self::regions(disk_len, granularity)?;
        let words = bits.div_ceil(64) as usize;
        Ok(DirtyBitmap {
            disk_len,
            granularity,
            bits,
            words: vec![0; words],
        })
    }

    /// Regions of `granularity` bytes in a disk of `disk_len` bytes, at
    /// most `MAX_REGIONS`.
    fn regions(disk_len: u64, granularity: u64) -> Result<u64> {
        if !granularity.is_power_of_two() || granularity < 512 {
            return Err(Error::InvalidParameter(format!(
                "dirty-bitmap granularity {granularity} is not a power of two of at least 512 bytes"
            )));
        }
        let bits = disk_len.div_ceil(granularity);
        if bits > MAX_REGIONS {
            return Err(Error::InvalidParameter(format!(
                "a disk of {disk_len} bytes at {granularity} bytes per bit is too large to track"
            )));
        }
        Ok(bits)
    }

    /// A bitmap from its raw bytes: exactly ceil(regions / 8) of them, bit
    /// k of byte b (least significant first) marking region 8b + k.
    pub fn from_bytes(disk_len: u64, granularity: u64, bytes: &[u8]) -> Result<Self> {
        // The length is checked before anything is allocated for it.
        let want = Self::regions(disk_len, granularity)?.div_ceil(8);
        if bytes.len() as u64 != want {
            return Err(Error::InvalidParameter(format!(
                "the dirty bitmap has {} bytes; a disk of {disk_len} bytes at {granularity} bytes per bit needs {want}",
                bytes.len()
            )));
        }
        let mut map = DirtyBitmap::new(disk_len, granularity)?;
        for (w, chunk) in map.words.iter_mut().zip(bytes.chunks(8)) {
            let mut le = [0u8; 8];
            le[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_le_bytes(le);
        }
        if let Some(last) = map.words.last()
            && map.bits % 64 != 0
            && last >> (map.bits % 64) != 0
        {
            return Err(Error::InvalidParameter(format!(
                "the dirty bitmap marks regions past the end of a {disk_len}-byte disk"
            )));
        }
        Ok(map)
    }

    /// A bitmap marking every region that the byte ranges `(offset, len)`
    /// touch.
    pub fn from_ranges(
        disk_len: u64,
        granularity: u64,
        ranges: impl IntoIterator<Item = (u64, u64)>,
    ) -> Result<Self> {
        let mut map = DirtyBitmap::new(disk_len, granularity)?;
        for (offset, len) in ranges {
            map.mark(offset, len)?;
        }
        Ok(map)
    }

    /// The raw bytes, as [`DirtyBitmap::from_bytes`] reads them.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(self.bits.div_ceil(8) as usize);
        out
    }

    /// Marks the regions that `len` bytes at `offset` touch. A range past
    /// the end of the disk is an error (the disk grew: take a full
    /// snapshot).
    pub fn mark(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset.checked_add(len).filter(|&e| e <= self.disk_len);
        let Some(end) = end else {
            return Err(Error::InvalidParameter(format!(
                "a write of {len} bytes at {offset} is past the end of the {}-byte disk",
                self.disk_len
            )));
        };
        for bit in offset / self.granularity..end.div_ceil(self.granularity) {
            self.set(bit);
        }
        Ok(())
    }

    /// Marks region `bit`. Panics past the end (a caller's bug).
    pub fn set(&mut self, bit: u64) {
        assert!(bit < self.bits, "region {bit} of {}", self.bits);
        self.words[(bit / 64) as usize] |= 1 << (bit % 64);
    }

    /// True when region `bit` is dirty.
    pub fn get(&self, bit: u64) -> bool {
        bit < self.bits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Marks every region the other bitmap marks; both must describe the
    /// same disk at the same granularity.
    pub fn union_with(&mut self, other: &DirtyBitmap) -> Result<()> {
        if other.disk_len != self.disk_len || other.granularity != self.granularity {
            return Err(Error::InvalidParameter(
                "dirty bitmaps of different disks cannot be merged".into(),
            ));
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        Ok(())
    }

    /// Length of the disk the bitmap describes.
    pub fn disk_len(&self) -> u64 {
        self.disk_len
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Number of regions (bits).
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// True for a bitmap of an empty disk.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Number of dirty regions.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The dirty regions as runs of consecutive bits, ascending.
    pub fn runs(&self) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for (w, &word) in self.words.iter().enumerate() {
            let mut rest = word;
            while rest != 0 {
                let bit = w as u64 * 64 + u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                match runs.last_mut() {
                    Some(r) if r.end == bit => r.end += 1,
                    _ => runs.push(bit..bit + 1),
                }
            }
        }
        runs
    }

    /// The dirty blocks at `block_size` (which divides the granularity) as
    /// ascending runs of block indexes.
    pub fn block_runs(&self, block_size: u32) -> Result<Vec<Range<u64>>> {
        let bs = u64::from(block_size);
        if bs == 0 || !self.granularity.is_multiple_of(bs) {
            return Err(Error::InvalidParameter(format!(
                "dirty-bitmap granularity {} is not a multiple of the store's {block_size}-byte blocks",
                self.granularity
            )));
        }
        let per = self.granularity / bs;
        let blocks = self.disk_len.div_ceil(bs);
        Ok(self
            .runs()
            .into_iter()
            .map(|r| r.start * per..(r.end * per).min(blocks))
            .collect())
    }
}

/// A [`DirtyBitmap`]'s shape with atomic words: marked by many threads at
/// once without a lock (`Engine::record_write`), then folded into a
/// `DirtyBitmap` with [`DirtyBitmap::union_with_atomic`]. Bits are only
/// ever set, so a fold at any moment is a lower bound of the final set.
pub(crate) struct AtomicBits {
    disk_len: u64,
    granularity: u64,
    words: Box<[AtomicU64]>,
}

impl AtomicBits {
    /// All clean, for a disk shaped as `like`.
    pub fn shaped_as(like: &DirtyBitmap) -> Self {
        AtomicBits {
            disk_len: like.disk_len,
            granularity: like.granularity,
            words: (0..like.words.len()).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Marks the regions `len` bytes at `offset` touch, a word at a time.
    /// `false` (and nothing marked) for a range past the end of the disk.
    pub fn mark(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = offset.checked_add(len).filter(|&e| e <= self.disk_len) else {
            return false;
        };
        let (first, last) = (offset / self.granularity, (end - 1) / self.granularity);
        for w in first / 64..=last / 64 {
            let lo = if w == first / 64 { first % 64 } else { 0 };
            let hi = if w == last / 64 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            if let Some(word) = self.words.get(w as usize) {
                word.fetch_or(mask, Ordering::Relaxed);
            }
        }
        true
    }
}

impl DirtyBitmap {
    /// Marks every region `live` marks (same disk and granularity).
    pub(crate) fn union_with_atomic(&mut self, live: &AtomicBits) -> Result<()> {
        if live.disk_len != self.disk_len || live.granularity != self.granularity {
            return Err(Error::InvalidParameter(
                "dirty bitmaps of different disks cannot be merged".into(),
            ));
        }
        for (a, b) in self.words.iter_mut().zip(live.words.iter()) {
            *a |= b.load(Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_least_significant_bit_first() {
        // 20 regions of 4 KiB: 3 bytes, the last with 4 unused bits.
        let mut m = DirtyBitmap::new(20 * 4096 - 100, 4096).unwrap();
        assert_eq!(m.len(), 20);
        m.set(0);
        m.set(9);
        m.set(19);
        assert_eq!(m.to_bytes(), vec![0b0000_0001, 0b0000_0010, 0b0000_1000]);
        let back = DirtyBitmap::from_bytes(m.disk_len(), 4096, &m.to_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.runs(), vec![0..1, 9..10, 19..20]);
    }

    #[test]
    fn wrong_lengths_and_stray_bits_are_errors() {
        let len = 20 * 4096;
        assert!(DirtyBitmap::from_bytes(len, 4096, &[0, 0]).is_err());
        assert!(DirtyBitmap::from_bytes(len, 4096, &[0, 0, 0, 0]).is_err());
        assert!(DirtyBitmap::from_bytes(len, 4096, &[0, 0, 0x10]).is_err());
        assert!(DirtyBitmap::new(len, 1000).is_err());
        // A huge length in a damaged record is refused before allocating.
        assert!(DirtyBitmap::from_bytes(u64::MAX, 512, &[0; 8]).is_err());
        assert!(DirtyBitmap::new(1 << 60, 512).is_err());
    }

    #[test]
    fn ranges_mark_every_region_they_touch() {
        let m = DirtyBitmap::from_ranges(1 << 20, 65536, [(65535, 2), (200_000, 0), (300_000, 1)])
            .unwrap();
        assert_eq!(m.runs(), vec![0..2, 4..5]);
        assert_eq!(m.count(), 3);
        let mut m = m;
        assert!(m.mark((1 << 20) - 1, 2).is_err());
        assert!(m.mark(u64::MAX, 2).is_err());
    }

    #[test]
    fn coarse_regions_expand_to_blocks_and_stop_at_the_disk_end() {
        // 1 MiB regions over a disk of 2.5 MiB in 64 KiB blocks.
        let len = 5 << 19;
        let mut m = DirtyBitmap::new(len, 1 << 20).unwrap();
        m.set(0);
        m.set(2);
        assert_eq!(m.block_runs(65536).unwrap(), vec![0..16, 32..40]);
        assert!(m.block_runs(3 << 20).is_err());
    }

    #[test]
    fn union_merges_and_refuses_other_disks() {
        let mut a = DirtyBitmap::from_ranges(1 << 20, 4096, [(0, 1)]).unwrap();
        let b = DirtyBitmap::from_ranges(1 << 20, 4096, [(8192, 1)]).unwrap();
        a.union_with(&b).unwrap();
        assert_eq!(a.runs(), vec![0..1, 2..3]);
        let c = DirtyBitmap::new(2 << 20, 4096).unwrap();
        assert!(a.union_with(&c).is_err());
    }

    /// The lock-free marking sets exactly the bits the plain one does.
    #[test]
    fn atomic_marks_match_plain_marks() {
        let mut rng = crate::rng::Rng::new(5);
        for _ in 0..200 {
            let disk_len = 1 + rng.below(1 << 22);
            let mut plain = DirtyBitmap::new(disk_len, 4096).unwrap();
            let live = AtomicBits::shaped_as(&plain);
            for _ in 0..rng.below(20) {
                let offset = rng.below(disk_len + 8192);
                let len = rng.below(1 << 20);
                assert_eq!(live.mark(offset, len), plain.mark(offset, len).is_ok());
            }
            let mut folded = DirtyBitmap::new(disk_len, 4096).unwrap();
            folded.union_with_atomic(&live).unwrap();
            assert_eq!(folded, plain);
        }
    }
}
