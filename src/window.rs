//! Reads a disk front to back in large windows on a reader thread, so the
//! next window is read while the caller works on the current one. Memory is
//! bounded by the number of buffers in flight, whatever the disk size:
//! a consumer that keeps a buffer (to hand it to a writer thread) gives it
//! back through [`Recycle`] when done, and the reader waits for one.

use std::sync::mpsc::{Sender, channel, sync_channel};

use crate::disk::Disk;
use crate::error::Result;

/// Buffers in use at once: one being read, one queued, one being processed,
/// one being written.
pub const WINDOWS_IN_FLIGHT: usize = 4;

/// One window of the disk, owned.
pub struct Window {
    /// Byte offset of the window on the disk.
    pub offset: u64,
    /// The window's bytes; past the end of the disk they are zero.
    pub bytes: Vec<u8>,
    /// How many of `bytes` were really read from the disk.
    pub read: usize,
}

/// Gives a window's buffer back to the reader.
#[derive(Clone)]
pub struct Recycle(Sender<Vec<u8>>);

impl Recycle {
    pub fn give_back(&self, buf: Vec<u8>) {
        // The reader may have stopped already; then the buffer is dropped.
        let _ = self.0.send(buf);
    }
}

/// Calls `each` for every window of `window_len` bytes covering `[0, len)`,
/// in order, handing over the buffer; `each` (or whoever it passes the
/// buffer to) gives it back through the [`Recycle`]. A read error or an
/// error from `each` stops the walk.
pub fn for_each_window(
    disk: &dyn Disk,
    len: u64,
    window_len: usize,
    mut each: impl FnMut(Window, &Recycle) -> Result<()>,
) -> Result<()> {
    let (full_tx, full_rx) = sync_channel::<Result<Window>>(1);
    let (empty_tx, empty_rx) = channel::<Vec<u8>>();
    for _ in 0..WINDOWS_IN_FLIGHT {
        // Cannot fail: the receiver is alive.
        let _ = empty_tx.send(Vec::new());
    }
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut offset = 0u64;
            while offset < len {
                let Ok(mut bytes) = empty_rx.recv() else {
                    return;
                };
                let n = (len - offset).min(window_len as u64) as usize;
                // Same-sized windows reuse the buffer as it is: the read
                // overwrites it, and only a short read's tail is zeroed.
                bytes.resize(n, 0);
                let item = disk.read_at(&mut bytes, offset).map(|read| {
                    bytes[read..].fill(0);
                    Window {
                        offset,
                        bytes,
                        read,
                    }
                });
                let failed = item.is_err();
                if full_tx.send(item).is_err() || failed {
                    return;
                }
                offset += n as u64;
            }
        });
        // Owned here so that an early return drops it and wakes the reader.
        let recycle = Recycle(empty_tx);
        for item in full_rx {
            each(item?, &recycle)?;
        }
        Ok(())
    })
}
