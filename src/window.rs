//! Reads a disk front to back in large windows on a reader thread, so the
//! next window is read while the caller works on the current one. Memory is
//! bounded by `WINDOWS_IN_FLIGHT` buffers, whatever the disk size.

use std::sync::mpsc::{channel, sync_channel};

use crate::disk::Disk;
use crate::error::Result;

/// Buffers in use at once: one being processed, the rest read ahead.
pub const WINDOWS_IN_FLIGHT: usize = 3;

/// One window of the disk.
pub struct Window<'a> {
    /// Byte offset of the window on the disk.
    pub offset: u64,
    /// The window's bytes; past the end of the disk they are zero.
    pub bytes: &'a [u8],
    /// How many of `bytes` were really read from the disk.
    pub read: usize,
}

/// Calls `each` for every window of `window_len` bytes covering `[0, len)`,
/// in order. A read error or an error from `each` stops the walk.
pub fn for_each_window(
    disk: &dyn Disk,
    len: u64,
    window_len: usize,
    mut each: impl FnMut(Window<'_>) -> Result<()>,
) -> Result<()> {
    let (full_tx, full_rx) = sync_channel::<Result<(u64, Vec<u8>, usize)>>(WINDOWS_IN_FLIGHT - 1);
    let (empty_tx, empty_rx) = channel::<Vec<u8>>();
    for _ in 0..WINDOWS_IN_FLIGHT {
        // Cannot fail: the receiver is alive.
        let _ = empty_tx.send(Vec::new());
    }
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut offset = 0u64;
            while offset < len {
                let Ok(mut buf) = empty_rx.recv() else { return };
                let n = (len - offset).min(window_len as u64) as usize;
                buf.clear();
                buf.resize(n, 0);
                let item = disk
                    .read_at(&mut buf, offset)
                    .map(|read| (offset, buf, read));
                let failed = item.is_err();
                if full_tx.send(item).is_err() || failed {
                    return;
                }
                offset += n as u64;
            }
        });
        // Owned here so that an early return drops it and wakes the reader.
        let empty_tx = empty_tx;
        for item in full_rx {
            let (offset, buf, read) = item?;
            each(Window {
                offset,
                bytes: &buf,
                read,
            })?;
            let _ = empty_tx.send(buf);
        }
        Ok(())
    })
}
