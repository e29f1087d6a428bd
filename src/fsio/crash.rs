//! `CrashFs`: an in-memory file system that loses what was not made
//! durable when it "crashes" (tests).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{OpenMode, StoreFile, StoreFs};

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
    /// With a seed: a crash keeps a random subset of each file's unsynced
    /// writes, torn at 512-byte sectors (see `keep_unsynced_subsets`).
    subsets: parking_lot::Mutex<Option<crate::rng::Rng>>,
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
    /// Writes and length changes since the last fsync, in order.
    pending: Vec<Pending>,
}

/// A change not yet made durable.
#[derive(Clone)]
enum Pending {
    Write(usize, Vec<u8>),
    Len(usize),
}

/// Sectors a disk writes whole: a torn write keeps some of its sectors.
const SECTOR: usize = 512;

impl Inode {
    /// What a crash leaves when the disk wrote back any subset of the
    /// unsynced writes (each torn at sector boundaries, some sectors kept),
    /// in their order, and kept the old or the new length.
    fn crash_subset(&mut self, rng: &mut crate::rng::Rng) {
        let mut out = self.durable.clone();
        for op in &self.pending {
            match op {
                Pending::Len(len) if rng.below(2) == 0 => out.resize(*len, 0),
                Pending::Len(_) => {}
                Pending::Write(offset, data) => {
                    let end = offset + data.len();
                    let mut at = *offset;
                    while at < end {
                        let piece_end = ((at / SECTOR + 1) * SECTOR).min(end);
                        if rng.below(2) == 0 {
                            if out.len() < piece_end {
                                out.resize(piece_end, 0);
                            }
                            out[at..piece_end]
                                .copy_from_slice(&data[at - offset..piece_end - offset]);
                        }
                        at = piece_end;
                    }
                }
            }
        }
        self.durable = out;
    }

    /// A successful fsync: everything becomes durable except lost pages.
    fn sync(&mut self) {
        self.pending.clear();
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
        self.pending.clear();
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
        let mut subsets = self.subsets.lock();
        let mut ids: Vec<u64> = s.inodes.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let Some(inode) = s.inodes.get_mut(&id) else {
                continue;
            };
            if let Some(rng) = subsets.as_mut() {
                inode.crash_subset(rng);
            }
            inode.live = inode.durable.clone();
            inode.lost.clear();
            inode.pending.clear();
        }
        s.crashed = true;
    }

    /// From now on a crash keeps, of each file's writes since its last
    /// fsync, a random subset (drawn from `seed`), each write torn at
    /// 512-byte sectors, as a disk's write cache may (redb's and SQLite's
    /// crash tests do the same); without it, a crash keeps none of them.
    pub fn keep_unsynced_subsets(&self, seed: u64) {
        *self.subsets.lock() = Some(crate::rng::Rng::new(seed));
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
        inode
            .pending
            .push(Pending::Write(offset as usize, buf.to_vec()));
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
        let inode = s.inodes.get_mut(&self.inode).expect("open inode");
        inode.live.resize(len as usize, 0);
        inode.pending.push(Pending::Len(len as usize));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A crash in subset mode keeps, of an unsynced write, any subset of its
    /// sectors: none, some (torn) or all, over enough seeds.
    #[test]
    fn a_crash_keeps_any_subset_of_unsynced_sectors() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let fs = CrashFs::new();
            fs.keep_unsynced_subsets(seed);
            let handle = CrashFsHandle(fs.clone());
            let dir = Path::new("/d");
            let path = dir.join("f");
            let f = handle.open(&path, OpenMode::CreateNew).unwrap();
            f.write_all_at(&[1u8; 512], 0).unwrap();
            f.sync().unwrap();
            handle.sync_dir(dir).unwrap();
            f.write_all_at(&[2u8; 1024], 0).unwrap(); // two sectors, unsynced
            fs.crash();
            fs.restart();
            let after = handle.read_all(&path).unwrap();
            let kept: Vec<bool> = [0, 512].iter().map(|&o| after.get(o) == Some(&2)).collect();
            assert!(
                after[..512].iter().all(|b| *b == after[0]),
                "sectors stay whole"
            );
            seen.insert(kept);
        }
        assert_eq!(
            seen.len(),
            4,
            "none, either one, or both sectors kept: {seen:?}"
        );
    }
}
