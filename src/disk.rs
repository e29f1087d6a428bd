//! The disk seam: what capture reads and restore writes. One small trait
//! ([`Disk`]) with a file/block-device implementation ([`FileDisk`]); tests
//! and fault injection plug in their own through [`DiskOpener`].

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};

/// Zero bytes written per call when a hole cannot be punched.
const ZERO_WRITE_LEN: usize = 1 << 20;

/// A disk image or block device, addressed by byte offset.
pub trait Disk: Send + Sync {
    /// Current length in bytes.
    fn len(&self) -> Result<u64>;
    /// True when the disk holds no bytes.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Fills `buf` from `offset`; returns how many bytes were read, fewer
    /// only at the end of the disk.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes `len` bytes at `offset` read as zero: a hole where the disk
    /// supports it, written zeros otherwise.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// Sets the length (image files). Block devices have a fixed size.
    fn set_len(&self, len: u64) -> Result<()>;
    /// True for a block device, whose size cannot change.
    fn is_block_device(&self) -> bool;
    /// Makes every write durable.
    fn sync(&self) -> Result<()>;
    /// Hints that `len` bytes written at `offset` may start going to the
    /// device now, so the final [`Disk::sync`] has less left to wait for.
    /// Durability still comes only from `sync`. Default: nothing.
    fn start_writeback(&self, _offset: u64, _len: u64) {}
    /// The byte ranges that may hold data, ascending and disjoint; every
    /// byte outside them reads as zero (the holes of a sparse image file).
    /// `None` when the disk cannot tell, so every byte must be read.
    /// Default: `None`.
    fn data_ranges(&self) -> Result<Option<Vec<Range<u64>>>> {
        Ok(None)
    }
    /// Fills each `(offset, buffer)`, all inside the disk. A disk that
    /// reads best in bulk serves them in one pipelined call. Default: one
    /// [`Disk::read_at`] each; a short read is [`Error::DiskChanged`].
    fn read_many_at(&self, parts: &mut [(u64, &mut [u8])]) -> Result<()> {
        for (offset, buf) in parts.iter_mut() {
            let n = self.read_at(buf, *offset)?;
            if n < buf.len() {
                return Err(Error::DiskChanged(format!(
                    "it ended at byte {} while read",
                    *offset + n as u64
                )));
            }
        }
        Ok(())
    }
    /// True when one large read does better than many small ones, as
    /// over a network (NBD pipelines it): capture then reads each window
    /// with one call before hashing it in parallel. Default: false.
    fn reads_best_in_bulk(&self) -> bool {
        false
    }
    /// Where the disk is, for messages.
    fn path(&self) -> &Path;
}

/// How the engine opens a server's disk: `writable` for restore.
pub type DiskOpener = Arc<dyn Fn(&Path, bool) -> Result<Box<dyn Disk>> + Send + Sync>;

/// True for a disk reached through another program (an NBD or QEMU URI)
/// rather than a path.
pub fn is_remote(path: &Path) -> bool {
    path.to_str()
        .is_some_and(|s| crate::nbd::is_uri(s) || crate::live::is_uri(s))
}

/// The default opener: an NBD URI ([`crate::nbd::NbdDisk`]) or a path
/// ([`FileDisk::open`]).
pub fn default_opener() -> DiskOpener {
    Arc::new(|path, writable| {
        if let Some(uri) = path.to_str().filter(|s| crate::nbd::is_uri(s)) {
            return Ok(Box::new(crate::nbd::NbdDisk::open(uri, writable)?) as Box<dyn Disk>);
        }
        Ok(Box::new(FileDisk::open(path, writable)?) as Box<dyn Disk>)
    })
}

/// A raw image file or a block device.
pub struct FileDisk {
    file: File,
    path: PathBuf,
    block_device: bool,
}

impl FileDisk {
    /// Opens `path`; with `writable`, an image file that does not exist is
    /// created (a restore brings it back).
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = if writable {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
        } else {
            File::open(path)
        }
        .at(path)?;
        Self::from_file(file, path)
    }

    /// A disk over a file already open (for writing, if it is to be
    /// written); `path` names it in messages.
    pub fn from_file(file: File, path: &Path) -> Result<Self> {
        let meta = file.metadata().at(path)?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(Error::InvalidParameter(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        }
        Ok(FileDisk {
            file,
            path: path.to_path_buf(),
            block_device,
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        punch_hole(&self.file, offset, len)
    }
}

/// Gives back the blocks of bytes `offset..offset + len` of `file`,
/// which then read as zeros (its length unchanged).
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate takes a file descriptor we own for the duration of
    // the call and plain integers; it touches no memory of ours.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Disk for FileDisk {
    fn len(&self) -> Result<u64> {
        if self.block_device {
            use std::io::{Seek, SeekFrom};
            // The size of a block device is where its end is.
            (&self.file).seek(SeekFrom::End(0)).at(&self.path)
        } else {
            Ok(self.file.metadata().at(&self.path)?.len())
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.path, e)),
            }
        }
        Ok(done)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).at(&self.path)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if !self.block_device && self.punch_hole(offset, len).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; ZERO_WRITE_LEN.min(len as usize)];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if self.block_device {
            let have = self.len()?;
            if have < len {
                return Err(Error::DiskTooSmall {
                    path: self.path.clone(),
                    have,
                    need: len,
                });
            }
            return Ok(());
        }
        self.file.set_len(len).at(&self.path)
    }

    fn is_block_device(&self) -> bool {
        self.block_device
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_all().at(&self.path)
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: sync_file_range takes a file descriptor we own for the
        // duration of the call and plain integers; it touches no memory of
        // ours. SYNC_FILE_RANGE_WRITE only starts writeback, it does not
        // wait; a failure only means the final fsync does all the work.
        unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    fn data_ranges(&self) -> Result<Option<Vec<Range<u64>>>> {
        if self.block_device {
            return Ok(None);
        }
        let len = self.len()?;
        let fd = self.file.as_raw_fd();
        let seek = |from: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
            let Ok(from) = i64::try_from(from) else {
                return Ok(None);
            };
            // SAFETY: lseek takes a file descriptor we own for the duration
            // of the call and plain integers. It moves the shared file
            // offset, which this crate never uses (all I/O is positioned).
            let at = unsafe { libc::lseek(fd, from, whence) };
            if at >= 0 {
                return Ok(Some(at as u64));
            }
            let e = std::io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after `from`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            }
        };
        let mut ranges = Vec::new();
        let mut at = 0;
        while at < len {
            let data = match seek(at, libc::SEEK_DATA) {
                Ok(Some(d)) => d,
                Ok(None) => break,
                // The filesystem cannot tell: read everything.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
                Err(e) => return Err(Error::io(&self.path, e)),
            };
            let hole = seek(data, libc::SEEK_HOLE)
                .at(&self.path)?
                .unwrap_or(len)
                .min(len);
            if hole <= data {
                break;
            }
            ranges.push(data..hole);
            at = hole;
        }
        Ok(Some(ranges))
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// A disk in memory: for tests, benches and fault injection.
pub struct MemDisk {
    bytes: parking_lot::RwLock<Vec<u8>>,
    path: PathBuf,
}

impl MemDisk {
    pub fn new(bytes: Vec<u8>) -> Self {
        MemDisk {
            bytes: parking_lot::RwLock::new(bytes),
            path: PathBuf::from("<memory>"),
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.read().clone()
    }
}

impl Disk for MemDisk {
    fn len(&self) -> Result<u64> {
        Ok(self.bytes.read().len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let bytes = self.bytes.read();
        let start = (offset as usize).min(bytes.len());
        let n = buf.len().min(bytes.len() - start);
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut bytes = self.bytes.write();
        let end = offset as usize + buf.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let mut bytes = self.bytes.write();
        let end = (offset + len) as usize;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset as usize..end].fill(0);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.bytes.write().resize(len as usize, 0);
        Ok(())
    }

    fn is_block_device(&self) -> bool {
        false
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// True when every byte of `b` is zero. Folds 256-byte runs with OR, which
/// the compiler vectorises (a plain `iter().all` does not), and stops at the
/// first run holding data.
pub fn is_zero(b: &[u8]) -> bool {
    let mut runs = b.chunks_exact(256);
    for run in &mut runs {
        if run.iter().fold(0u8, |acc, x| acc | x) != 0 {
            return false;
        }
    }
    runs.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check_agrees_with_the_naive_one() {
        let mut b = vec![0u8; 70_000];
        assert!(is_zero(&b));
        for at in [0, 255, 256, 69_999, 65_536] {
            b[at] = 1;
            assert!(!is_zero(&b), "{at}");
            b[at] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn zeroes_read_back_as_zero_and_keep_the_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![7u8; 3 * 65536]).unwrap();
        let d = FileDisk::open(&path, true).unwrap();
        d.write_zeroes(65536, 65536).unwrap();
        d.sync().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 3 * 65536);
        assert!(bytes[65536..131072].iter().all(|&b| b == 0));
        assert!(bytes[..65536].iter().all(|&b| b == 7));
        assert!(bytes[131072..].iter().all(|&b| b == 7));
    }

    #[test]
    fn a_directory_is_not_a_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            FileDisk::open(dir.path(), false),
            Err(Error::InvalidParameter(_))
        ));
    }
}
