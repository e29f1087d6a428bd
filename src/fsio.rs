//! The store's I/O seam: every file the store itself writes (packs,
//! manifests) goes through [`StoreFs`], so tests can inject faults into
//! exactly the calls the engine makes. [`StdFs`] is the real file system;
//! [`FaultFs`] wraps it, counts every call, and fails the one a test picks
//! (EIO, ENOSPC, or a torn write that lands only a prefix).
//! Disks have their own seam ([`crate::disk::DiskOpener`]).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// An in-memory file system that remembers what was made durable: each
/// file's contents as of its last fsync, and each directory's entries as of
/// its last directory fsync. [`CrashFs::crash`] throws away everything
/// else, as a power cut would, and fails every call until
/// [`CrashFs::restart`]: a test crashes a running engine at any call,
/// restarts, and opens the store again (as redb's crash-test backend does
/// for redb).
#[derive(Default)]
pub struct CrashFs {
    state: parking_lot::Mutex<CrashState>,
    /// Calls counted from `arm`; the `crash_at`-th crashes.
    calls: AtomicU64,
    crash_at: AtomicU64,
    /// fsyncs (of files and directories) counted from `fail_sync`; the
    /// `sync_fails_at`-th reports EIO, having landed or not.
    syncs: AtomicU64,
    sync_fails_at: AtomicU64,
    sync_fail_lands: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct CrashState {
    /// Path -> inode, as the running system sees it, and as it would be
    /// found after a crash.
    live: std::collections::HashMap<PathBuf, u64>,
    durable: std::collections::HashMap<PathBuf, u64>,
    inodes: std::collections::HashMap<u64, Inode>,
    next_inode: u64,
    crashed: bool,
}

#[derive(Default, Clone)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Byte ranges an fsync that failed without landing left dirty: as
    /// Linux does, the pages count as clean, so later fsyncs do not write
    /// them (they keep their durable bytes) until they are written again.
    lost: Vec<std::ops::Range<usize>>,
}

impl Inode {
    /// A successful fsync: everything becomes durable except lost pages.
    fn sync(&mut self) {
        let mut durable = self.live.clone();
        for r in &self.lost {
            for (i, b) in durable.iter_mut().enumerate().take(r.end).skip(r.start) {
                *b = self.durable.get(i).copied().unwrap_or(0);
            }
        }
        self.durable = durable;
    }

    /// An fsync that reported EIO without landing: what it was to write
    /// is lost for good (unless written again).
    fn fail_sync(&mut self) {
        let (live, durable) = (&self.live, &self.durable);
        let mut start = None;
        for i in 0..=live.len() {
            let dirty = i < live.len() && durable.get(i) != Some(&live[i]);
            match (dirty, start) {
                (true, None) => start = Some(i),
                (false, Some(st)) => {
                    self.lost.push(st..i);
                    start = None;
                }
                _ => {}
            }
        }
    }

    /// A write of `range`: those bytes are dirty again, to be synced.
    fn rewritten(&mut self, range: std::ops::Range<usize>) {
        let mut kept = Vec::new();
        for r in self.lost.drain(..) {
            if r.end <= range.start || r.start >= range.end {
                kept.push(r);
                continue;
            }
            if r.start < range.start {
                kept.push(r.start..range.start);
            }
            if r.end > range.end {
                kept.push(range.end..r.end);
            }
        }
        self.lost = kept;
    }
}

impl CrashFs {
    pub fn new() -> Arc<Self> {
        let fs = Arc::new(CrashFs::default());
        fs.crash_at.store(u64::MAX, Ordering::SeqCst);
        fs.sync_fails_at.store(u64::MAX, Ordering::SeqCst);
        fs
    }

    /// Crashes at the `n`-th call from now (from 0).
    pub fn arm(&self, n: u64) {
        self.calls.store(0, Ordering::SeqCst);
        self.crash_at.store(n, Ordering::SeqCst);
    }

    /// Makes the `n`-th fsync from now (of a file or a directory, from 0)
    /// report EIO: after it made everything durable (`lands`), or without,
    /// losing the file's unsynced writes for good (later fsyncs succeed
    /// without them, as Linux's page cache behaves) and leaving the
    /// directory's entries as they were. Calls go on working after it.
    pub fn fail_sync(&self, n: u64, lands: bool) {
        self.sync_fail_lands.store(lands, Ordering::SeqCst);
        self.syncs.store(0, Ordering::SeqCst);
        self.sync_fails_at.store(n, Ordering::SeqCst);
    }

    /// True once the fsync armed by [`CrashFs::fail_sync`] has failed.
    pub fn sync_failed(&self) -> bool {
        let at = self.sync_fails_at.load(Ordering::SeqCst);
        at != u64::MAX && self.syncs.load(Ordering::SeqCst) > at
    }

    /// True when this fsync is the one to fail.
    fn sync_fails(&self) -> Option<bool> {
        let n = self.syncs.fetch_add(1, Ordering::SeqCst);
        (n == self.sync_fails_at.load(Ordering::SeqCst))
            .then(|| self.sync_fail_lands.load(Ordering::SeqCst))
    }

    /// Calls since the last `arm`.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Loses everything not durable, now; every call fails until
    /// [`CrashFs::restart`].
    pub fn crash(&self) {
        let mut s = self.state.lock();
        s.live = s.durable.clone();
        for inode in s.inodes.values_mut() {
            inode.live = inode.durable.clone();
            inode.lost.clear();
        }
        s.crashed = true;
    }

    /// True once crashed (and not restarted).
    pub fn crashed(&self) -> bool {
        self.state.lock().crashed
    }

    /// The machine comes back: calls work again, on what was durable.
    pub fn restart(&self) {
        self.crash_at.store(u64::MAX, Ordering::SeqCst);
        self.sync_fails_at.store(u64::MAX, Ordering::SeqCst);
        self.state.lock().crashed = false;
    }

    /// Counts a call; crashes when it is the armed one. Fails once crashed.
    fn call(&self) -> io::Result<()> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n == self.crash_at.load(Ordering::SeqCst) {
            self.crash();
        }
        if self.state.lock().crashed {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

/// A file of a [`CrashFs`], by inode.
struct CrashFile {
    fs: Arc<CrashFs>,
    inode: u64,
    writable: bool,
}

impl StoreFile for CrashFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.fs.call()?;
        let s = self.fs.state.lock();
        let data = &s.inodes[&self.inode].live;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.fs.call()?;
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        let mut s = self.fs.state.lock();
        let inode = s.inodes.get_mut(&self.inode).expect("open inode");
        let end = offset as usize + buf.len();
        if inode.live.len() < end {
            inode.live.resize(end, 0);
        }
        inode.live[offset as usize..end].copy_from_slice(buf);
        inode.rewritten(offset as usize..end);
        Ok(buf.len())
    }
    fn sync(&self) -> io::Result<()> {
        self.fs.call()?;
        let fails = self.fs.sync_fails();
        let mut s = self.fs.state.lock();
        let inode = s.inodes.get_mut(&self.inode).expect("open inode");
        match fails {
            None => inode.sync(),
            Some(true) => {
                inode.sync();
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            Some(false) => {
                inode.fail_sync();
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.fs.call()?;
        let mut s = self.fs.state.lock();
        s.inodes
            .get_mut(&self.inode)
            .expect("open inode")
            .live
            .resize(len as usize, 0);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.fs.state.lock().inodes[&self.inode].live.len() as u64)
    }
}

/// [`CrashFs`] as the store's file system.
#[derive(Clone)]
pub struct CrashFsHandle(pub Arc<CrashFs>);

impl StoreFs for CrashFsHandle {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StoreFile>> {
        self.0.call()?;
        let mut s = self.0.state.lock();
        let inode = match (s.live.get(path).copied(), mode) {
            (Some(_), OpenMode::CreateNew) => return Err(io::ErrorKind::AlreadyExists.into()),
            (Some(i), _) => i,
            (None, OpenMode::CreateNew) => {
                s.next_inode += 1;
                let i = s.next_inode;
                s.inodes.insert(i, Inode::default());
                s.live.insert(path.to_path_buf(), i);
                i
            }
            (None, _) => return Err(io::ErrorKind::NotFound.into()),
        };
        Ok(Arc::new(CrashFile {
            fs: self.0.clone(),
            inode,
            writable: mode != OpenMode::Read,
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.0.call()?;
        let mut s = self.0.state.lock();
        let i = s.live.remove(from).ok_or(io::ErrorKind::NotFound)?;
        s.live.insert(to.to_path_buf(), i);
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.0.call()?;
        let mut s = self.0.state.lock();
        s.live.remove(path).ok_or(io::ErrorKind::NotFound)?;
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.0.call()?;
        let fails = self.0.sync_fails();
        if fails == Some(false) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let mut s = self.0.state.lock();
        let s = &mut *s;
        s.durable.retain(|p, _| p.parent() != Some(dir));
        for (p, i) in &s.live {
            if p.parent() == Some(dir) {
                s.durable.insert(p.clone(), *i);
            }
        }
        match fails {
            Some(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
            None => Ok(()),
        }
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        self.0.call()?;
        let s = self.0.state.lock();
        let mut out: Vec<PathBuf> = s
            .live
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .cloned()
            .collect();
        out.sort();
        Ok(out)
    }
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}
