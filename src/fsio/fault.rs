//! `FaultFs`: the real file system with one chosen call failing (tests).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{OpenMode, StdFs, StoreFile, StoreFs};

/// The kind of fault [`FaultFs`] injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The call fails with EIO.
    Eio,
    /// The call fails with ENOSPC.
    NoSpace,
    /// A write lands only its first half, then fails with EIO (other calls
    /// fail with EIO).
    Torn,
}

/// The real file system, with every call counted and, optionally, the
/// `fail_at`-th call (from 0) failing with `fault`. Calls: opens, renames,
/// removes, directory syncs and listings, and each read, write, sync and
/// length change of an open file.
pub struct FaultFs {
    calls: AtomicU64,
    fail_at: AtomicU64,
    fault: parking_lot::Mutex<Fault>,
}

impl Default for FaultFs {
    fn default() -> Self {
        FaultFs {
            calls: AtomicU64::new(0),
            fail_at: AtomicU64::new(u64::MAX),
            fault: parking_lot::Mutex::new(Fault::Eio),
        }
    }
}

impl FaultFs {
    pub fn new() -> Arc<Self> {
        Arc::new(FaultFs::default())
    }

    /// Calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Fails call number `n` (counted from now on, from 0) with `fault`.
    pub fn fail(&self, n: u64, fault: Fault) {
        *self.fault.lock() = fault;
        self.calls.store(0, Ordering::SeqCst);
        self.fail_at.store(n, Ordering::SeqCst);
    }

    /// Stops failing, and counts from 0 again.
    pub fn heal(&self) {
        self.fail_at.store(u64::MAX, Ordering::SeqCst);
        self.calls.store(0, Ordering::SeqCst);
    }

    /// `Some(fault)` when this call is the one to fail.
    fn tick(&self) -> Option<Fault> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        (n == self.fail_at.load(Ordering::SeqCst)).then(|| *self.fault.lock())
    }

    fn check(&self) -> io::Result<()> {
        match self.tick() {
            None => Ok(()),
            Some(f) => Err(error(f)),
        }
    }
}

fn error(f: Fault) -> io::Error {
    match f {
        Fault::NoSpace => io::Error::from_raw_os_error(libc::ENOSPC),
        Fault::Eio | Fault::Torn => io::Error::from_raw_os_error(libc::EIO),
    }
}

struct FaultFile {
    inner: Arc<dyn StoreFile>,
    fs: Arc<FaultFs>,
}

impl StoreFile for FaultFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.fs.check()?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        match self.fs.tick() {
            None => self.inner.write_at(buf, offset),
            Some(Fault::Torn) => {
                let half = &buf[..buf.len() / 2];
                self.inner.write_all_at(half, offset)?;
                Err(error(Fault::Torn))
            }
            Some(f) => Err(error(f)),
        }
    }
    fn sync(&self) -> io::Result<()> {
        self.fs.check()?;
        self.inner.sync()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.fs.check()?;
        self.inner.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}

/// [`FaultFs`] as the store's file system (it needs its own `Arc` to hand
/// to the files it opens).
#[derive(Clone)]
pub struct FaultFsHandle(pub Arc<FaultFs>);

impl StoreFs for FaultFsHandle {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StoreFile>> {
        self.0.check()?;
        Ok(Arc::new(FaultFile {
            inner: StdFs.open(path, mode)?,
            fs: self.0.clone(),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.0.check()?;
        StdFs.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.0.check()?;
        StdFs.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.0.check()?;
        StdFs.sync_dir(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        self.0.check()?;
        StdFs.list(dir)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdFs.create_dir_all(dir)
    }
}
