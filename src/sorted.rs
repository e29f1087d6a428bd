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

/// A sorted run of distinct ids in a scratch file.
struct Run {
    file: File,
    len: u64,
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
    pub fn from_vec(mut ids: Vec<ChunkId>) -> Self {
        let mut sorted = SortedIds::new(u64::MAX, Path::new("."));
        sorted.buffer.append(&mut ids);
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

    /// Writes the buffer out as a run.
    fn spill(&mut self) -> Result<()> {
        self.sort_buffer();
        let file = crate::fsio::scratch_file(&self.dir, "a disk's chunk list")?;
        let mut at = 0u64;
        for part in self.buffer.chunks(READ_IDS * 16) {
            let bytes: Vec<u8> = part.iter().flat_map(|id| id.0).collect();
            file.write_all_at(&bytes, at)
                .map_err(|e| Error::io(&self.dir, e))?;
            at += bytes.len() as u64;
        }
        self.runs.push(Run {
            file,
            len: self.buffer.len() as u64,
        });
        self.buffer.clear();
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
        let mut sources: Vec<Source<'_>> = self
            .runs
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
            buffer: &self.buffer,
            at: 0,
        });
        let mut heap = BinaryHeap::new();
        let mut error = None;
        for (k, s) in sources.iter_mut().enumerate() {
            match s.peek_refill(&self.dir) {
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
            dir: &self.dir,
        }
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
}
