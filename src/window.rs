//! Reads a disk window by window, in parallel: each rayon task reads its
//! own slice of the window with a positioned read and works on it at once,
//! while the bytes are still in the core's cache. Reading is then spread
//! over both cores instead of one reader thread, and the hash or compare
//! reads the bytes from L2 rather than from memory.

use rayon::prelude::*;

use crate::disk::Disk;
use crate::error::Result;

/// Bytes one rayon task reads and processes: small enough to stay in a
/// core's L2 cache between the read and the hash.
pub const TASK_LEN: usize = 256 << 10;

/// Reads `buf.len()` bytes of `disk` at `offset` into `buf`, `task_len`
/// bytes per rayon task, and calls `work(offset, bytes, read)` on each
/// task's bytes right after reading them. `read` is how many bytes really
/// came from the disk (fewer only past its end; the rest are zero).
/// Returns the results in disk order.
pub fn read_and_process<T: Send>(
    disk: &dyn Disk,
    buf: &mut [u8],
    offset: u64,
    task_len: usize,
    work: impl Fn(u64, &[u8], usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    if disk.reads_best_in_bulk() {
        return read_ahead_and_process(disk, buf, offset, task_len, &work);
    }
    buf.par_chunks_mut(task_len)
        .enumerate()
        .map(|(t, slice)| {
            let at = offset + (t * task_len) as u64;
            let read = disk.read_at(slice, at)?;
            slice[read..].fill(0);
            work(at, slice, read)
        })
        .collect()
}

/// Bytes read per call from a disk that reads best in bulk (NBD): large
/// enough to pipeline many requests, small enough that reading the next
/// piece overlaps hashing this one several times a window.
pub const BULK_PIECE: usize = 4 << 20;

/// [`read_and_process`] for a disk that reads best in large calls: the
/// window is read piece by piece, each piece's read overlapping the work on
/// the piece before it.
fn read_ahead_and_process<T: Send>(
    disk: &dyn Disk,
    buf: &mut [u8],
    offset: u64,
    task_len: usize,
    work: &(impl Fn(u64, &[u8], usize) -> Result<T> + Sync),
) -> Result<Vec<T>> {
    let piece = BULK_PIECE.max(task_len) / task_len * task_len;
    let read = |slice: &mut [u8], at: u64| -> Result<usize> {
        let n = disk.read_at(slice, at)?;
        slice[n..].fill(0);
        Ok(n)
    };
    let process = |slice: &[u8], at: u64, got: usize| -> Result<Vec<T>> {
        slice
            .par_chunks(task_len)
            .enumerate()
            .map(|(t, s)| {
                let start = t * task_len;
                work(at + start as u64, s, got.saturating_sub(start).min(s.len()))
            })
            .collect()
    };
    let mut pieces: Vec<(u64, &mut [u8])> = buf
        .chunks_mut(piece)
        .enumerate()
        .map(|(i, slice)| (offset + (i * piece) as u64, slice))
        .collect();
    read_ahead(
        &mut pieces,
        |(at, slice)| read(slice, *at),
        |(at, slice), got| process(slice, *at, got),
    )
}

/// Reads `batches` in turn with `read`, each read overlapping `work` on
/// the batch before it (rayon::join: the read mostly waits on the disk or
/// the network while the work hashes); the work's results in order.
pub fn read_ahead<B: Send + Sync, R: Send, T: Send>(
    batches: &mut [B],
    read: impl Fn(&mut B) -> Result<R> + Sync,
    work: impl Fn(&B, R) -> Result<Vec<T>> + Sync,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let Some(first) = batches.first_mut() else {
        return Ok(out);
    };
    let mut got = read(first)?;
    for i in 0..batches.len() {
        let (done, rest) = batches.split_at_mut(i + 1);
        let (next, results) = rayon::join(
            || rest.first_mut().map(&read).transpose(),
            || work(&done[i], got),
        );
        out.extend(results?);
        match next? {
            Some(n) => got = n,
            None => break,
        }
    }
    Ok(out)
}

/// The task length for a block size: whole blocks, at least one.
pub fn task_len(block_size: u32) -> usize {
    let bs = block_size as usize;
    TASK_LEN.max(bs) / bs * bs
}

/// Sizes a reused buffer to `n` bytes. A buffer that must grow is replaced
/// by a fresh zeroed allocation rather than zero-filled in place: the
/// allocator then hands out pages the kernel zeroes on first touch, by
/// whichever thread fills them, instead of one thread zeroing the whole
/// window (tens of MiB) while the workers wait. Bytes past what was read
/// into it before are stale, never uninitialized.
pub fn fit(buf: &mut Vec<u8>, n: usize) {
    if buf.capacity() < n {
        *buf = vec![0u8; n];
    } else {
        buf.resize(n, 0);
    }
}
