//! Change tracking: which blocks of a server's disk were written since the
//! disk last equalled a known snapshot (its *base*: the last snapshot taken
//! or restored).
//!
//! The embedder reports guest writes ([`crate::Engine::record_write`]); the
//! next snapshot of the server reads only those blocks, and a restore
//! rewrites only the blocks that differ between the base and the target
//! plus those. A tracker that may miss writes is never used:
//!
//! - it is *trusted* only after a clean hand-over: the engine persisted it
//!   when it closed (`clean` below) or the embedder adopted its own bitmap
//!   ([`crate::Engine::adopt_dirty_bitmap`]). Opening the store marks every
//!   persisted tracker unclean before any write can be reported, so after a
//!   crash the next capture rehashes everything;
//! - every *generation* (each new base) gets a new number, reported with
//!   each capture, so an embedder can tell which hand-over a bitmap
//!   belongs to.
//!
//! Persisted form, one catalog row per server (little-endian):
//!
//! ```text
//! version u8 (2) | clean u8 | trusted u8 | reserved u8 | generation u64 |
//! base snapshot u64 | disk length u64 | granularity u64 | bitmap bytes |
//! crc32 u32 of everything before it
//! ```

use crate::dirty::DirtyBitmap;
use crate::ids::SnapshotId;
use crate::le;

const VERSION: u8 = 2;
const HEADER_LEN: usize = 36;

/// A server's change tracker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Tracker {
    /// The snapshot the disk equalled when tracking started.
    pub base: SnapshotId,
    /// The base is a capture or restore still running: the tracker only
    /// collects writes until it ends.
    pub pending: bool,
    /// Blocks written since, at the store's block size, over the disk's
    /// length when tracking started.
    pub dirty: DirtyBitmap,
    /// False when writes may have been missed (see the module doc).
    pub trusted: bool,
    pub generation: u64,
}

/// What an embedder sees of a server's change tracking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TrackingStatus {
    /// The snapshot the disk equals, plus the dirty blocks.
    pub base: SnapshotId,
    /// Counts hand-overs: a new base, an adopted bitmap, a reopened store.
    pub generation: u64,
    /// True when the next capture may rely on it.
    pub trusted: bool,
    /// The base is still being captured or restored.
    pub pending: bool,
    /// Blocks marked written since the base.
    pub dirty_blocks: u64,
}

impl Tracker {
    pub fn status(&self) -> TrackingStatus {
        TrackingStatus {
            base: self.base,
            generation: self.generation,
            trusted: self.trusted,
            pending: self.pending,
            dirty_blocks: self.dirty.count(),
        }
    }

    /// Records a guest write. A write past the tracked length (the disk
    /// grew) makes the tracker untrusted: the next capture reads all. (The
    /// engine records through `engine::live`, without a lock.)
    #[cfg(test)]
    pub fn record(&mut self, offset: u64, len: u64) {
        if self.dirty.mark(offset, len).is_err() {
            self.trusted = false;
        }
    }

    /// The persisted form; `clean` says the engine is closing and no write
    /// can be missed until it opens again.
    pub fn encode(&self, clean: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.dirty.len().div_ceil(8) as usize);
        out.extend_from_slice(&[VERSION, u8::from(clean), u8::from(self.trusted), 0]);
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.base.0.to_le_bytes());
        out.extend_from_slice(&self.dirty.disk_len().to_le_bytes());
        out.extend_from_slice(&self.dirty.granularity().to_le_bytes());
        out.extend_from_slice(&self.dirty.to_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a persisted tracker; it is trusted only if it was trusted and
    /// persisted clean. `None` for a record that does not decode (the
    /// server's next capture is then full, which is always safe).
    pub fn decode(bytes: &[u8]) -> Option<Tracker> {
        // A row that fails its checksum, or of another version, is dropped:
        // the next capture reads everything.
        let n = bytes.len().checked_sub(4)?;
        if crc32fast::hash(&bytes[..n]) != le::u32_at(bytes, n) {
            return None;
        }
        let bytes = &bytes[..n];
        if bytes.len() < HEADER_LEN || bytes[0] != VERSION {
            return None;
        }
        let clean = bytes[1] == 1;
        let trusted = bytes[2] == 1;
        let generation = le::u64_at(bytes, 4);
        let base = SnapshotId(le::u64_at(bytes, 12));
        let disk_len = le::u64_at(bytes, 20);
        let granularity = le::u64_at(bytes, 28);
        let dirty = DirtyBitmap::from_bytes(disk_len, granularity, &bytes[HEADER_LEN..]).ok()?;
        Some(Tracker {
            base,
            pending: false,
            dirty,
            trusted: clean && trusted,
            generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> Tracker {
        let mut dirty = DirtyBitmap::new(10 << 16, 1 << 16).unwrap();
        dirty.set(3);
        Tracker {
            base: SnapshotId(7),
            pending: false,
            dirty,
            trusted: true,
            generation: 4,
        }
    }

    #[test]
    fn a_clean_record_round_trips_trusted() {
        let t = tracker();
        assert_eq!(Tracker::decode(&t.encode(true)), Some(t));
    }

    #[test]
    fn an_unclean_record_is_untrusted() {
        let t = Tracker::decode(&tracker().encode(false)).unwrap();
        assert!(!t.trusted);
        assert_eq!(t.dirty.runs(), vec![3..4]);
    }

    #[test]
    fn damaged_records_do_not_decode() {
        let bytes = tracker().encode(true);
        assert_eq!(Tracker::decode(&bytes[..HEADER_LEN - 1]), None);
        assert_eq!(Tracker::decode(&bytes[..bytes.len() - 1]), None);
        let mut v = bytes.clone();
        v[0] = 9;
        assert_eq!(Tracker::decode(&v), None);
    }

    #[test]
    fn a_write_past_the_tracked_length_untrusts() {
        let mut t = tracker();
        t.record(0, 1);
        assert!(t.trusted);
        t.record(10 << 16, 1);
        assert!(!t.trusted);
    }
}
