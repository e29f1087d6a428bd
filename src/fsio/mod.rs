//! The store's I/O seam: every file of the store (packs, manifests, the
//! catalog, through redb's storage backend) is opened, written, synced,
//! renamed and removed through [`StoreFs`], so tests can inject faults into
//! exactly the calls the engine makes. [`StdFs`] is the real file system.
//! With the `testing` feature, `FaultFs` wraps it, counts every call and
//! fails the one a test picks (EIO, ENOSPC, or a torn write that lands
//! only a prefix), and `CrashFs` keeps in memory only what was made
//! durable. The store's `LOCK` file is the one file outside the seam (an
//! OS lock, never written). Disks have their own seam
//! ([`crate::disk::DiskOpener`]).

#[cfg(any(test, feature = "testing"))]
mod crash;
#[cfg(any(test, feature = "testing"))]
mod fault;

#[cfg(any(test, feature = "testing"))]
pub use crash::{CrashFs, CrashFsHandle};
#[cfg(any(test, feature = "testing"))]
pub use fault::{Fault, FaultFs, FaultFsHandle};

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An unnamed scratch file in `dir` for `what`: it goes when closed, or
/// with the process. Outside the seam: nothing in it needs to last.
pub(crate) fn scratch_file(dir: &Path, what: &str) -> crate::error::Result<File> {
    tempfile::tempfile_in(dir).map_err(|e| {
        crate::error::Error::io(
            dir,
            io::Error::new(
                e.kind(),
                format!("cannot make a scratch file for {what}: {e}"),
            ),
        )
    })
}

/// How to open a store file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    Read,
    ReadWrite,
    /// Create; fail if it exists.
    CreateNew,
}

/// An open store file, addressed by offset.
pub trait StoreFile: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// Makes the data (and length) durable.
    fn sync(&self) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;

    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The file mapped read-only, where the file system has real files
    /// (`None`: read it instead). Only for files never written again once
    /// renamed into place, under the store's lock (the chunk index).
    fn map(&self) -> io::Result<Option<memmap2::Mmap>> {
        Ok(None)
    }

    /// Fills `buf` from `offset`; an early end is `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The file operations the store makes.
pub trait StoreFs: Send + Sync {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StoreFile>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the creation, renaming and removal of entries durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// The paths of the entries of `dir` (files only matter).
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;

    /// The whole contents of a file.
    fn read_all(&self, path: &Path) -> io::Result<Vec<u8>> {
        let f = self.open(path, OpenMode::Read)?;
        let mut buf = vec![0u8; usize::try_from(f.len()?).map_err(io::Error::other)?];
        f.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }
}

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdFs;

/// Another file system with every change refused (EROFS): what a
/// read-only engine reads its store through, so that nothing it does can
/// write, whatever path the code takes.
pub(crate) struct ReadOnlyFs(pub(crate) Arc<dyn StoreFs>);

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

impl StoreFs for ReadOnlyFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StoreFile>> {
        match mode {
            OpenMode::Read => self.0.open(path, mode),
            _ => Err(read_only()),
        }
    }
    fn rename(&self, _: &Path, _: &Path) -> io::Result<()> {
        Err(read_only())
    }
    fn remove(&self, _: &Path) -> io::Result<()> {
        Err(read_only())
    }
    fn sync_dir(&self, _: &Path) -> io::Result<()> {
        Err(read_only())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        self.0.list(dir)
    }
    fn create_dir_all(&self, _: &Path) -> io::Result<()> {
        // Directories of an existing store exist; a missing one reads as
        // empty through `list` failing, which the callers report.
        Ok(())
    }
}

impl StoreFile for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        FileExt::write_at(self, buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_all()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn map(&self) -> io::Result<Option<memmap2::Mmap>> {
        // SAFETY: a mapping is undefined behaviour if the file changes
        // under it. The store maps only its sorted tables (the chunk index,
        // the reference counts), which are
        // written under a temporary name, fsynced and renamed into place,
        // and never written, truncated or reused afterwards (a new
        // generation is a new file); the store's lock keeps other
        // blocksnap processes from replacing them while mapped, and a
        // rename or unlink of a mapped file leaves the mapping intact. What
        // no lock stops is another program truncating the file: reading a
        // page past the new end then raises SIGBUS, as it does for any
        // program whose mapped files are truncated (LMDB, git's packs).
        // Every page's checksum is checked before its contents are used,
        // so an overwrite is detected, never trusted.
        let map = unsafe { memmap2::Mmap::map(self)? };
        Ok(Some(map))
    }
}

impl StoreFs for StdFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StoreFile>> {
        let f = match mode {
            OpenMode::Read => File::open(path)?,
            OpenMode::ReadWrite => OpenOptions::new().read(true).write(true).open(path)?,
            OpenMode::CreateNew => OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)?,
        };
        Ok(Arc::new(f))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect()
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every call that could change the store fails with EROFS and
    /// changes nothing; reads go through.
    #[test]
    fn the_read_only_seam_refuses_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"kept").unwrap();
        let ro = ReadOnlyFs(Arc::new(StdFs));
        let erofs = |r: io::Result<()>| r.unwrap_err().raw_os_error() == Some(libc::EROFS);
        assert!(erofs(ro.rename(&a, &b)));
        assert!(erofs(ro.remove(&a)));
        assert!(erofs(ro.sync_dir(dir.path())));
        // A no-op: an existing store's directories exist.
        ro.create_dir_all(&dir.path().join("d")).unwrap();
        for mode in [OpenMode::ReadWrite, OpenMode::CreateNew] {
            assert!(erofs(ro.open(&b, mode).map(|_| ())));
        }
        assert_eq!(std::fs::read(&a).unwrap(), b"kept");
        assert!(!b.exists() && !dir.path().join("d").exists());
        assert_eq!(ro.read_all(&a).unwrap(), b"kept");
    }
}
