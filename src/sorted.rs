//! Fixed-size items in order, once each, in bounded memory: a disk's
//! distinct chunk ids (what the reference counts move and what `verify`
//! checks), and the chunk index's entries when it is rebuilt from the
//! packs.
//!
//! Items are gathered in a buffer of at most a budget's worth; a full
//! buffer is sorted, rid of repeats and written to an unnamed scratch file
//! as a run. Reading merges the runs and the buffer (a k-way merge, a few
//! thousand items read at a time from each run), each item once. A list
//! that fits the budget never touches a file; a dense 1 TiB disk (16M
//! ids, 512 MiB) is 32 runs of the default 16 MiB budget.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::ids::ChunkId;

/// Items read from a run at once.
const READ_ITEMS: usize = 2048;

/// Runs of one level merged into one of the next, so that at most this
/// many runs per level are open (and read at once) however many items
/// come: a billion ids of a 16 MiB budget are 2,000 runs, two levels.
const FAN_IN: usize = 64;

/// What [`Sorted`] holds: ordered, of a fixed encoded size. Items with
/// the same [`Item::Key`] are one: the least of them is kept.
pub trait Item: Copy + Ord {
    /// Bytes of an encoded item.
    const LEN: usize;
    type Key: PartialEq;
    fn key(&self) -> Self::Key;
    fn encode(&self, out: &mut Vec<u8>);
    /// Decodes [`Item::LEN`] bytes that [`Item::encode`] wrote.
    fn decode(bytes: &[u8]) -> Self;
}

impl Item for ChunkId {
    const LEN: usize = 32;
    type Key = ChunkId;
    fn key(&self) -> ChunkId {
        *self
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
    fn decode(bytes: &[u8]) -> Self {
        crate::le::chunk_id_at(bytes, 0)
    }
}

/// A sorted run of distinct items in a scratch file: of level 0 when
/// written from the buffer, of level `n + 1` when merged from runs of
/// level `n`.
struct Run {
    file: File,
    len: u64,
    level: u32,
}

/// Distinct items, sorted (see the module's text).
pub struct Sorted<T: Item> {
    runs: Vec<Run>,
    /// Items not in a run yet; sorted and distinct once gathering is done.
    buffer: Vec<T>,
    max_buffer: usize,
    dir: PathBuf,
    /// What the scratch files hold, for messages.
    what: &'static str,
}

/// A disk's distinct chunk ids.
pub type SortedIds = Sorted<ChunkId>;

impl SortedIds {
    /// No ids; at most `budget` bytes of them in memory, the rest in
    /// scratch files in `dir`.
    pub fn new(budget: u64, dir: &Path) -> Self {
        Sorted::with_budget(budget, dir, "a disk's chunk list")
    }

    /// The ids of `ids` (any order, repeats allowed).
    pub fn gather(
        ids: impl Iterator<Item = Result<ChunkId>>,
        budget: u64,
        dir: &Path,
    ) -> Result<Self> {
        let mut sorted = SortedIds::new(budget, dir);
        for id in ids {
            sorted.push(id?)?;
        }
        sorted.finish();
        Ok(sorted)
    }
}

impl<T: Item> Sorted<T> {
    /// No items; at most `budget` bytes of them in memory, the rest in
    /// scratch files (holding `what`) in `dir`.
    pub fn with_budget(budget: u64, dir: &Path, what: &'static str) -> Self {
        let max_buffer = (budget / T::LEN as u64).max(1024) as usize;
        Sorted {
            runs: Vec::new(),
            // At once: pages are touched only as items come, and doublings
            // would hold the old buffer and the new at the end.
            buffer: Vec::with_capacity(max_buffer.min(1 << 24)),
            max_buffer,
            dir: dir.to_path_buf(),
            what,
        }
    }

    /// Items kept in memory as they are, for tests and small lists.
    pub fn from_vec(items: Vec<T>) -> Self {
        let mut sorted = Sorted {
            runs: Vec::new(),
            max_buffer: items.len().max(1),
            buffer: items,
            dir: PathBuf::from("."),
            what: "a list",
        };
        sorted.finish();
        sorted
    }

    pub fn push(&mut self, item: T) -> Result<()> {
        if self.buffer.len() == self.max_buffer {
            self.spill()?;
        }
        self.buffer.push(item);
        Ok(())
    }

    fn sort_buffer(&mut self) {
        self.buffer.sort_unstable();
        // Of equal keys the first, the least, stays.
        self.buffer
            .dedup_by(|later, first| later.key() == first.key());
    }

    /// Writes the buffer out as a run, then merges runs of a level that
    /// has [`FAN_IN`] of them.
    fn spill(&mut self) -> Result<()> {
        self.sort_buffer();
        let run = write_run(
            &self.dir,
            self.what,
            self.buffer.iter().map(|item| Ok(*item)),
            0,
        )?;
        self.runs.push(run);
        self.buffer.clear();
        while let Some(level) = (0..=self.runs.iter().map(|r| r.level).max().unwrap_or(0))
            .find(|l| self.runs.iter().filter(|r| r.level == *l).count() >= FAN_IN)
        {
            let (merge, keep): (Vec<Run>, Vec<Run>) = std::mem::take(&mut self.runs)
                .into_iter()
                .partition(|r| r.level == level);
            self.runs = keep;
            let items = merged::<T>(&merge, &[], &self.dir);
            let merged = write_run(&self.dir, self.what, items, level + 1)?;
            self.runs.push(merged);
        }
        Ok(())
    }

    /// Ends gathering: the items can be read.
    pub fn finish(&mut self) {
        self.sort_buffer();
        self.buffer.shrink_to_fit();
    }

    /// At least the number of distinct items (exact when no run was
    /// written).
    pub fn len_bound(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum::<u64>() + self.buffer.len() as u64
    }

    /// Every item once, ascending.
    pub fn iter(&self) -> Merged<'_, T> {
        merged(&self.runs, &self.buffer, &self.dir)
    }
}

/// Writes `items` (ascending, distinct) to a new scratch file in `dir` as
/// a run of `level`.
fn write_run<T: Item>(
    dir: &Path,
    what: &str,
    items: impl Iterator<Item = Result<T>>,
    level: u32,
) -> Result<Run> {
    let file = crate::fsio::scratch_file(dir, what)?;
    let (mut at, mut len) = (0u64, 0u64);
    let mut bytes = Vec::with_capacity(READ_ITEMS * T::LEN);
    let mut items = items.peekable();
    while items.peek().is_some() {
        bytes.clear();
        for item in items.by_ref().take(READ_ITEMS) {
            item?.encode(&mut bytes);
            len += 1;
        }
        file.write_all_at(&bytes, at)
            .map_err(|e| Error::io(dir, e))?;
        at += bytes.len() as u64;
    }
    Ok(Run { file, len, level })
}

/// The items of `runs` and `buffer` (sorted), each once, ascending.
fn merged<'a, T: Item>(runs: &'a [Run], buffer: &'a [T], dir: &'a Path) -> Merged<'a, T> {
    let mut sources: Vec<Source<'a, T>> = runs
        .iter()
        .map(|r| Source {
            run: Some(r),
            next: 0,
            read: Vec::new(),
            buffer: &[],
            at: 0,
        })
        .collect();
    sources.push(Source {
        run: None,
        next: 0,
        read: Vec::new(),
        buffer,
        at: 0,
    });
    let mut heap = BinaryHeap::new();
    let mut error = None;
    for (k, s) in sources.iter_mut().enumerate() {
        match s.peek_refill(dir) {
            Ok(Some(item)) => heap.push(Reverse((item, k))),
            Ok(None) => {}
            Err(e) => error = error.or(Some(e)),
        }
    }
    Merged {
        sources,
        heap,
        last: None,
        error,
        dir,
    }
}

/// One run (or the buffer) being read.
struct Source<'a, T> {
    run: Option<&'a Run>,
    /// The run's next item not read yet.
    next: u64,
    /// Items read from the run.
    read: Vec<T>,
    /// The items, when this is the buffer.
    buffer: &'a [T],
    at: usize,
}

impl<T: Item> Source<'_, T> {
    /// The current item, reading the run on when its read part is used up.
    fn peek_refill(&mut self, dir: &Path) -> Result<Option<T>> {
        let Some(run) = self.run else {
            return Ok(self.buffer.get(self.at).copied());
        };
        if self.at == self.read.len() && self.next < run.len {
            let n = (run.len - self.next).min(READ_ITEMS as u64) as usize;
            let mut raw = vec![0u8; n * T::LEN];
            run.file
                .read_exact_at(&mut raw, self.next * T::LEN as u64)
                .map_err(|e| Error::io(dir, e))?;
            self.read = raw.chunks_exact(T::LEN).map(T::decode).collect();
            self.at = 0;
            self.next += n as u64;
        }
        Ok(self.read.get(self.at).copied())
    }
}

/// The merge of [`Sorted::iter`].
pub struct Merged<'a, T: Item> {
    sources: Vec<Source<'a, T>>,
    heap: BinaryHeap<Reverse<(T, usize)>>,
    last: Option<T::Key>,
    error: Option<Error>,
    dir: &'a Path,
}

impl<T: Item> Iterator for Merged<'_, T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        if let Some(e) = self.error.take() {
            self.heap.clear();
            return Some(Err(e));
        }
        loop {
            let Reverse((item, k)) = self.heap.pop()?;
            let s = &mut self.sources[k];
            s.at += 1;
            match s.peek_refill(self.dir) {
                Ok(Some(next)) => self.heap.push(Reverse((next, k))),
                Ok(None) => {}
                Err(e) => {
                    self.heap.clear();
                    return Some(Err(e));
                }
            }
            // The least item of a key comes first; the rest are repeats.
            let key = item.key();
            if self.last.as_ref() != Some(&key) {
                self.last = Some(key);
                return Some(Ok(item));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through runs or not, the ids come out sorted and once each.
    #[test]
    fn ids_come_out_sorted_and_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = crate::rng::Rng::new(3);
        let ids: Vec<ChunkId> = (0..20_000)
            .map(|_| ChunkId::of(&rng.below(7_000).to_le_bytes()))
            .collect();
        let mut want = ids.clone();
        want.sort_unstable_by_key(|id| id.0);
        want.dedup();
        for budget in [0, 32 * 3000, u64::MAX] {
            let sorted =
                SortedIds::gather(ids.iter().copied().map(Ok), budget, dir.path()).unwrap();
            if budget == 0 {
                // 20 runs of level 0 were written: fewer than FAN_IN.
                assert!(sorted.runs.len() >= 15);
            }
            let got: Vec<ChunkId> = sorted.iter().collect::<Result<_>>().unwrap();
            assert_eq!(got, want, "budget {budget}");
            assert!(sorted.len_bound() >= want.len() as u64);
        }
        let empty = SortedIds::gather(std::iter::empty(), 0, dir.path()).unwrap();
        assert_eq!(empty.iter().count(), 0);
        assert_eq!(empty.len_bound(), 0);
    }

    /// Past FAN_IN runs of a level they are merged into one of the next:
    /// the runs open at once stay few, and the ids come out the same.
    #[test]
    fn runs_are_merged_a_level_up_past_the_fan_in() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = crate::rng::Rng::new(5);
        let ids: Vec<ChunkId> = (0..100_000)
            .map(|_| ChunkId::of(&rng.below(60_000).to_le_bytes()))
            .collect();
        let mut want = ids.clone();
        want.sort_unstable_by_key(|id| id.0);
        want.dedup();
        let sorted = SortedIds::gather(ids.into_iter().map(Ok), 0, dir.path()).unwrap();
        assert!(sorted.runs.len() < FAN_IN, "{} runs", sorted.runs.len());
        assert!(sorted.runs.iter().any(|r| r.level == 1));
        let got: Vec<ChunkId> = sorted.iter().collect::<Result<_>>().unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn nothing_gathered_reads_as_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let empty = SortedIds::gather(std::iter::empty(), 0, dir.path()).unwrap();
        assert_eq!(empty.iter().count(), 0);
        assert_eq!(empty.len_bound(), 0);
    }
}
