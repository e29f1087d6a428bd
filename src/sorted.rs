//! The distinct chunk ids of a disk, in order, in bounded memory: what
//! the reference counts move and what `verify` checks.
//!
//! Ids are gathered in a buffer of at most a budget's worth; a full buffer
//! is sorted, rid of repeats and written to an unnamed scratch file as a
//! run. Reading merges the runs and the buffer (a k-way merge, 64 KiB read
//! at a time from each run), each id once. A disk whose ids fit the budget
//! never touches a file; a dense 1 TiB disk (16M ids, 512 MiB) is 32 runs
//! of the default 16 MiB budget.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::ids::ChunkId;

/// Ids read from a run at once.
const READ_IDS: usize = 2048;

/// Runs of one level merged into one of the next, so that at most this
/// many runs per level are open (and read at once) however many ids come:
/// a billion ids of a 16 MiB budget are 2,000 runs, two levels.
const FAN_IN: usize = 64;

/// A sorted run of distinct ids in a scratch file: of level 0 when
/// written from the buffer, of level `n + 1` when merged from runs of
/// level `n`.
struct Run {
    file: File,
    len: u64,
    level: u32,
}

/// Distinct chunk ids, sorted (see the module's text).
pub struct SortedIds {
    runs: Vec<Run>,
    /// Ids not in a run yet; sorted and distinct once gathering is done.
    buffer: Vec<ChunkId>,
    max_buffer: usize,
    dir: PathBuf,
}

impl SortedIds {
    /// No ids; at most `budget` bytes of them in memory, the rest in
    /// scratch files in `dir`.
    pub fn new(budget: u64, dir: &Path) -> Self {
        let max_buffer = (budget / 32).max(1024) as usize;
        SortedIds {
            runs: Vec::new(),
            // At once: pages are touched only as ids come, and doublings
            // would hold the old buffer and the new at the end.
            buffer: Vec::with_capacity(max_buffer.min(1 << 24)),
            max_buffer,
            dir: dir.to_path_buf(),
        }
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

    /// Ids kept in memory as they are, for tests and small lists.
    pub fn from_vec(ids: Vec<ChunkId>) -> Self {
        let mut sorted = SortedIds {
            runs: Vec::new(),
            max_buffer: ids.len().max(1),
            buffer: ids,
            dir: PathBuf::from("."),
        };
        sorted.finish();
        sorted
    }

    pub fn push(&mut self, id: ChunkId) -> Result<()> {
        if self.buffer.len() == self.max_buffer {
            self.spill()?;
        }
        self.buffer.push(id);
        Ok(())
    }

    fn sort_buffer(&mut self) {
        self.buffer.sort_unstable_by_key(|id| id.0);
        self.buffer.dedup();
    }

    /// Writes the buffer out as a run, then merges runs of a level that
    /// has [`FAN_IN`] of them.
    fn spill(&mut self) -> Result<()> {
        self.sort_buffer();
        let run = write_run(&self.dir, self.buffer.iter().map(|id| Ok(*id)), 0)?;
        self.runs.push(run);
        self.buffer.clear();
        while let Some(level) = (0..=self.runs.iter().map(|r| r.level).max().unwrap_or(0))
            .find(|l| self.runs.iter().filter(|r| r.level == *l).count() >= FAN_IN)
        {
            let (merge, keep): (Vec<Run>, Vec<Run>) = std::mem::take(&mut self.runs)
                .into_iter()
                .partition(|r| r.level == level);
            self.runs = keep;
            let merged = write_run(&self.dir, merged(&merge, &[], &self.dir), level + 1)?;
            self.runs.push(merged);
        }
        Ok(())
    }

    /// Ends gathering: the ids can be read.
    pub fn finish(&mut self) {
        self.sort_buffer();
        self.buffer.shrink_to_fit();
    }

    /// At least the number of distinct ids (exact when no run was
    /// written).
    pub fn len_bound(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum::<u64>() + self.buffer.len() as u64
    }

    /// Every id once, ascending.
    pub fn iter(&self) -> Merged<'_> {
        merged(&self.runs, &self.buffer, &self.dir)
    }
}

/// Writes `ids` (ascending, distinct) to a new scratch file in `dir` as a
/// run of `level`.
fn write_run(dir: &Path, ids: impl Iterator<Item = Result<ChunkId>>, level: u32) -> Result<Run> {
    let file = crate::fsio::scratch_file(dir, "a disk's chunk list")?;
    let (mut at, mut len) = (0u64, 0u64);
    let mut bytes = Vec::with_capacity(READ_IDS * 32);
    let mut ids = ids.peekable();
    while ids.peek().is_some() {
        bytes.clear();
        for id in ids.by_ref().take(READ_IDS) {
            bytes.extend_from_slice(&id?.0);
            len += 1;
        }
        file.write_all_at(&bytes, at)
            .map_err(|e| Error::io(dir, e))?;
        at += bytes.len() as u64;
    }
    Ok(Run { file, len, level })
}

/// The ids of `runs` and `buffer` (sorted), each once, ascending.
fn merged<'a>(runs: &'a [Run], buffer: &'a [ChunkId], dir: &'a Path) -> Merged<'a> {
    let mut sources: Vec<Source<'a>> = runs
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
            Ok(Some(id)) => heap.push(Reverse((id.0, k))),
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
struct Source<'a> {
    run: Option<&'a Run>,
    /// The run's next id not read yet.
    next: u64,
    /// Ids read from the run.
    read: Vec<ChunkId>,
    /// The ids, when this is the buffer.
    buffer: &'a [ChunkId],
    at: usize,
}

impl Source<'_> {
    /// The current id, reading the run on when its read part is used up.
    fn peek_refill(&mut self, dir: &Path) -> Result<Option<ChunkId>> {
        let Some(run) = self.run else {
            return Ok(self.buffer.get(self.at).copied());
        };
        if self.at == self.read.len() && self.next < run.len {
            let n = (run.len - self.next).min(READ_IDS as u64) as usize;
            let mut raw = vec![0u8; n * 32];
            run.file
                .read_exact_at(&mut raw, self.next * 32)
                .map_err(|e| Error::io(dir, e))?;
            self.read = raw
                .chunks_exact(32)
                .map(|b| crate::le::chunk_id_at(b, 0))
                .collect();
            self.at = 0;
            self.next += n as u64;
        }
        Ok(self.read.get(self.at).copied())
    }
}

/// The merge of [`SortedIds::iter`].
pub struct Merged<'a> {
    sources: Vec<Source<'a>>,
    heap: BinaryHeap<Reverse<([u8; 32], usize)>>,
    last: Option<[u8; 32]>,
    error: Option<Error>,
    dir: &'a Path,
}

impl Iterator for Merged<'_> {
    type Item = Result<ChunkId>;

    fn next(&mut self) -> Option<Result<ChunkId>> {
        if let Some(e) = self.error.take() {
            self.heap.clear();
            return Some(Err(e));
        }
        loop {
            let Reverse((id, k)) = self.heap.pop()?;
            let s = &mut self.sources[k];
            s.at += 1;
            match s.peek_refill(self.dir) {
                Ok(Some(next)) => self.heap.push(Reverse((next.0, k))),
                Ok(None) => {}
                Err(e) => {
                    self.heap.clear();
                    return Some(Err(e));
                }
            }
            if self.last != Some(id) {
                self.last = Some(id);
                return Some(Ok(ChunkId(id)));
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
