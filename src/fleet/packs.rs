//! Packs in the bucket as this host's cache holds them.
//!
//! Every pack the bucket has is a file in the cache's `packs/` with a
//! sidecar `NNNNNNNN.remote` naming its object. A pack this host wrote
//! is whole on disk; one learnt from the bucket starts as a *placeholder*:
//! a sparse file of the object's length with only its header, index and
//! trailer written, so the local chunk store opens and indexes it as any
//! sealed pack. Its records are fetched by ranges, a segment at a time,
//! the first time something reads them ([`RemotePack`]); a byte a segment
//! in `NNNNNNNN.have` says which segments are here (set only once the
//! segment's bytes are durable, so a crash costs a fetch, never a wrong
//! byte; every record read is checked end to end anyway).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::bucket::Bucket;
use crate::error::{Error, IoContext, Result};
use crate::fsio::{OpenMode, StoreFile, StoreFs};
use crate::store::pack::{self, PACK_HEADER_LEN, TRAILER_LEN};

/// Records are fetched in segments of this many bytes (aligned).
pub(crate) const SEGMENT: u64 = 4 << 20;

const REMOTE_SUFFIX: &str = ".remote";
/// The largest index a pack object may claim.
const MAX_INDEX_LEN: u64 = 64 << 20;
const HAVE_SUFFIX: &str = ".have";

/// What the sidecar of a pack in the bucket says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Sidecar {
    /// The object's name in the bucket.
    pub key: String,
    pub len: u64,
    /// The pack's records are all here (this host wrote it).
    pub whole: bool,
    /// Where the index starts: records end there.
    pub index_offset: u64,
}

pub(crate) fn sidecar_path(pack: &Path) -> PathBuf {
    pack.with_extension(&REMOTE_SUFFIX[1..])
}

fn have_path(pack: &Path) -> PathBuf {
    pack.with_extension(&HAVE_SUFFIX[1..])
}

pub(crate) fn pack_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(format!("{seq:08}.pack"))
}

/// The sidecar of `pack`, if it has a readable one (a damaged one reads
/// as none: the pack is then uploaded or learnt again).
pub(crate) fn read_sidecar(fs: &dyn StoreFs, pack: &Path) -> Option<Sidecar> {
    let bytes = fs.read_all(&sidecar_path(pack)).ok()?;
    let (json, crc) = bytes.split_last_chunk::<4>()?;
    if crc32fast::hash(json) != u32::from_le_bytes(*crc) {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// Writes `pack`'s sidecar durably (temporary name, fsync, rename; the
/// caller fsyncs the directory).
pub(crate) fn write_sidecar(fs: &dyn StoreFs, pack: &Path, car: &Sidecar) -> Result<()> {
    let path = sidecar_path(pack);
    let tmp = path.with_extension("remote-tmp");
    let mut bytes = serde_json::to_vec(car)
        .map_err(|e| Error::Internal(format!("cannot encode a sidecar: {e}")))?;
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let _ = fs.remove(&tmp);
    let f = fs.open(&tmp, OpenMode::CreateNew).at(&tmp)?;
    f.write_all_at(&bytes, 0).at(&tmp)?;
    f.sync().at(&tmp)?;
    fs.rename(&tmp, &path).at(&path)
}

/// The packs in `dir` the bucket has: pack number -> sidecar.
pub(crate) fn known(fs: &dyn StoreFs, dir: &Path) -> Result<HashMap<u32, Sidecar>> {
    let mut out = HashMap::new();
    for path in fs.list(dir).at(dir)? {
        let Some(seq) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pack"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(car) = read_sidecar(fs, &path) {
            out.insert(seq, car);
        }
    }
    Ok(out)
}

/// What a pack object's header and tail say.
pub(crate) struct RemoteIndex {
    pub header: Vec<u8>,
    /// The index and the trailer, as they end the object.
    pub tail: Vec<u8>,
    pub tr: pack::Trailer,
    pub entries: Vec<pack::IndexEntry>,
}

/// Reads pack `key`'s header, trailer and index from the bucket (the
/// other program's word: every field is checked).
pub(crate) fn read_index(bucket: &Bucket, key: &str, len: u64) -> Result<RemoteIndex> {
    let corrupt = |what: &str| Error::corrupt(format!("{}/{key}", bucket.url()), what);
    if len < (PACK_HEADER_LEN + TRAILER_LEN) as u64 {
        return Err(corrupt("it is shorter than a pack's header and trailer"));
    }
    // Record offsets are 32 bits: no pack blocksnap writes reaches 4 GiB.
    if len >= u64::from(u32::MAX) {
        return Err(corrupt("it is larger than any pack"));
    }
    let header = bucket.get_range(key, 0..PACK_HEADER_LEN as u64)?;
    pack::check_pack_header(&header).map_err(|e| corrupt(&e))?;
    let trailer = bucket.get_range(key, len - TRAILER_LEN as u64..len)?;
    let tr = pack::decode_trailer(&trailer, len)
        .ok_or_else(|| corrupt("it has no valid trailer (not a sealed pack)"))?;
    // A pack is sealed at a quarter of a million records and a group's
    // members: its index is some 12 MiB at most.
    if len - TRAILER_LEN as u64 - tr.index_offset > MAX_INDEX_LEN {
        return Err(corrupt("its index is larger than any pack's"));
    }
    let mut tail = bucket.get_range(key, tr.index_offset..len - TRAILER_LEN as u64)?;
    let entries = pack::decode_index(&tail, &tr).map_err(|e| corrupt(&e))?;
    tail.extend_from_slice(&trailer);
    Ok(RemoteIndex {
        header,
        tail,
        tr,
        entries,
    })
}

/// The index entries of a pack this cache holds (whole or placeholder:
/// its tail is here either way).
pub(crate) fn local_index(fs: &dyn StoreFs, path: &Path) -> Result<Vec<pack::IndexEntry>> {
    let file = fs.open(path, OpenMode::Read).at(path)?;
    let len = file.len().at(path)?;
    let corrupt = |what: &str| Error::corrupt(path, what);
    if len < (PACK_HEADER_LEN + TRAILER_LEN) as u64 {
        return Err(corrupt("it is shorter than a pack's header and trailer"));
    }
    let mut trailer = [0u8; TRAILER_LEN];
    file.read_exact_at(&mut trailer, len - TRAILER_LEN as u64)
        .at(path)?;
    let tr =
        pack::decode_trailer(&trailer, len).ok_or_else(|| corrupt("it has no valid trailer"))?;
    let mut index = vec![0u8; (len - TRAILER_LEN as u64 - tr.index_offset) as usize];
    file.read_exact_at(&mut index, tr.index_offset).at(path)?;
    pack::decode_index(&index, &tr).map_err(|e| corrupt(&e))
}

/// Removes pack `seq` of `dir` from this cache: the pack, its sidecar and
/// its segment list (the store must not be open).
pub(crate) fn forget(fs: &dyn StoreFs, dir: &Path, seq: u32) -> Result<()> {
    let path = pack_path(dir, seq);
    for p in [path.clone(), sidecar_path(&path), have_path(&path)] {
        match fs.remove(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&p, e)),
        }
    }
    Ok(())
}

/// Learns the pack `key` (of `len` bytes) of the bucket: reads its
/// header, trailer and index (the other program's word: every field is
/// checked) and writes its placeholder as pack `seq` in `dir`.
pub(crate) fn learn(
    bucket: &Bucket,
    fs: &dyn StoreFs,
    dir: &Path,
    seq: u32,
    key: &str,
    len: u64,
) -> Result<()> {
    let index = read_index(bucket, key, len)?;
    write_placeholder(fs, &pack_path(dir, seq), key, len, &index)
}

/// Writes the placeholder of pack object `key` at `path`: its length,
/// with its header and its tail; the sidecar first.
pub(crate) fn write_placeholder(
    fs: &dyn StoreFs,
    path: &Path,
    key: &str,
    len: u64,
    index: &RemoteIndex,
) -> Result<()> {
    let RemoteIndex {
        header, tail, tr, ..
    } = index;
    let path = path.to_path_buf();
    let tmp = path.with_extension("pack-tmp");
    let _ = fs.remove(&tmp);
    let written = (|| {
        let f = fs.open(&tmp, OpenMode::CreateNew).at(&tmp)?;
        f.set_len(len).at(&tmp)?;
        f.write_all_at(header, 0).at(&tmp)?;
        f.write_all_at(tail, tr.index_offset).at(&tmp)?;
        f.sync().at(&tmp)?;
        // The sidecar before the pack's name: a pack named without one
        // would pass for whole.
        let car = Sidecar {
            key: key.to_string(),
            len,
            whole: false,
            index_offset: tr.index_offset,
        };
        write_sidecar(fs, &path, &car)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        fs.sync_dir(dir).at(dir)?;
        fs.rename(&tmp, &path).at(&path)
    })();
    if written.is_err() {
        let _ = fs.remove(&tmp);
    }
    written
}

/// The store's file system in a host's cache: a pack learnt from the
/// bucket opens as a [`RemotePack`]; everything else as it is.
pub(crate) struct FleetFs {
    pub inner: Arc<dyn StoreFs>,
    pub bucket: Arc<Bucket>,
    /// Placeholders open now, shared by every opener.
    open: Mutex<HashMap<PathBuf, Arc<RemotePack>>>,
}

impl FleetFs {
    pub fn new(inner: Arc<dyn StoreFs>, bucket: Arc<Bucket>) -> Self {
        FleetFs {
            inner,
            bucket,
            open: Mutex::new(HashMap::new()),
        }
    }
}

impl StoreFs for FleetFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StoreFile>> {
        let is_pack = path.extension().is_some_and(|e| e == "pack");
        if is_pack && mode != OpenMode::CreateNew {
            if let Some(open) = self.open.lock().get(path) {
                return Ok(open.clone());
            }
            if let Some(car) = read_sidecar(self.inner.as_ref(), path).filter(|c| !c.whole) {
                let remote = Arc::new(RemotePack::open(
                    self.inner.as_ref(),
                    path,
                    car,
                    self.bucket.clone(),
                )?);
                self.open.lock().insert(path.to_path_buf(), remote.clone());
                return Ok(remote);
            }
        }
        self.inner.open(path, mode)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.open.lock().remove(path);
        self.inner.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        self.inner.list(dir)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Seg {
    Missing,
    Fetching,
    Here,
}

/// A pack learnt from the bucket: reads of its records fetch the
/// segments they need first (one fetch a segment, however many threads
/// wait for it); its header, index and trailer are here from the start.
pub(crate) struct RemotePack {
    file: Arc<dyn StoreFile>,
    have: Arc<dyn StoreFile>,
    car: Sidecar,
    bucket: Arc<Bucket>,
    segs: Mutex<Vec<Seg>>,
    fetched: Condvar,
}

fn other(e: Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl RemotePack {
    fn open(fs: &dyn StoreFs, path: &Path, car: Sidecar, bucket: Arc<Bucket>) -> io::Result<Self> {
        let file = fs.open(path, OpenMode::ReadWrite)?;
        if file.len()? != car.len {
            return Err(io::Error::other(format!(
                "{} is {} bytes where its object has {}",
                path.display(),
                file.len()?,
                car.len
            )));
        }
        let count = car.index_offset.div_ceil(SEGMENT) as usize;
        let have_path = have_path(path);
        let have = match fs.open(&have_path, OpenMode::ReadWrite) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs.open(&have_path, OpenMode::CreateNew)?
            }
            Err(e) => return Err(e),
        };
        let mut bytes = vec![0u8; count];
        let got = have.len()?.min(count as u64) as usize;
        have.read_exact_at(&mut bytes[..got], 0)?;
        let segs = bytes
            .iter()
            .map(|b| if *b == 1 { Seg::Here } else { Seg::Missing })
            .collect();
        Ok(RemotePack {
            file,
            have,
            car,
            bucket,
            segs: Mutex::new(segs),
            fetched: Condvar::new(),
        })
    }

    /// Makes segment `i` here, fetching it unless another thread is.
    fn ensure(&self, i: usize) -> io::Result<()> {
        let mut segs = self.segs.lock();
        loop {
            match segs.get(i).copied() {
                None | Some(Seg::Here) => return Ok(()),
                Some(Seg::Fetching) => self.fetched.wait(&mut segs),
                Some(Seg::Missing) => break,
            }
        }
        segs[i] = Seg::Fetching;
        drop(segs);
        // A panic must not leave the segment fetching forever, with every
        // reader of it waiting.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.fetch(i)))
            .unwrap_or_else(|_| Err(io::Error::other("fetching a segment panicked")));
        let mut segs = self.segs.lock();
        segs[i] = if outcome.is_ok() {
            Seg::Here
        } else {
            Seg::Missing
        };
        self.fetched.notify_all();
        outcome
    }

    fn fetch(&self, i: usize) -> io::Result<()> {
        let start = i as u64 * SEGMENT;
        let end = (start + SEGMENT).min(self.car.index_offset);
        let bytes = match self.bucket.get_range(&self.car.key, start..end) {
            Ok(bytes) => bytes,
            Err(e) => {
                if let Ok(false) = self.bucket.exists(&self.car.key) {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "{}/{} is gone from the bucket (collected: another copy of its \
                             chunks is kept); open the store again, which forgets it and \
                             reads those chunks from the copy kept",
                            self.bucket.url(),
                            self.car.key
                        ),
                    ));
                }
                return Err(other(e));
            }
        };
        // The header is checked again: the object must still be the pack
        // whose index was learnt.
        if i == 0 && pack::check_pack_header(&bytes[..PACK_HEADER_LEN.min(bytes.len())]).is_err() {
            return Err(io::Error::other(format!(
                "{}/{} no longer starts with a pack header",
                self.bucket.url(),
                self.car.key
            )));
        }
        self.file.write_all_at(&bytes, start)?;
        self.file.sync()?;
        self.have.write_all_at(&[1], i as u64)?;
        Ok(())
    }
}

impl StoreFile for RemotePack {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let end = (offset + buf.len() as u64).min(self.car.len);
        // Only the records' part is fetched; the rest is here.
        let records_end = end.min(self.car.index_offset);
        let records_start = offset.max(PACK_HEADER_LEN as u64);
        if records_start < records_end {
            let first = (records_start / SEGMENT) as usize;
            let last = ((records_end - 1) / SEGMENT) as usize;
            for i in first..=last {
                self.ensure(i)?;
            }
        }
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.car.len)
    }
}

/// Bytes the packs in `dir` take on disk (allocated, not their lengths:
/// a placeholder takes only what was fetched).
pub(crate) fn cache_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        if path.extension().is_some_and(|e| e == "pack") {
            total += std::fs::metadata(&path).at(&path)?.blocks() * 512;
        }
    }
    Ok(total)
}

/// Keeps the packs of `dir` within `max` bytes on disk: the records of
/// packs the bucket has are given back (hole punched), those used least
/// recently first (by when their segments were last fetched, or their
/// upload), until the cache fits; their headers, indexes and trailers
/// stay, so their chunks stay indexed and are fetched again when read.
/// Packs not yet in the bucket are never touched. The store must not be
/// open. Returns the bytes given back.
pub(crate) fn trim(fs: &dyn StoreFs, dir: &Path, max: u64) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut used = cache_bytes(dir)?;
    if used <= max {
        return Ok(0);
    }
    let mut candidates = Vec::new();
    for (seq, car) in known(fs, dir)? {
        let path = pack_path(dir, seq);
        let meta = std::fs::metadata(&path).at(&path)?;
        let held = meta.blocks() * 512;
        if held <= car.len - car.index_offset + PACK_HEADER_LEN as u64 + 8192 {
            continue; // nothing of its records here
        }
        let touched = std::fs::metadata(have_path(&path))
            .or_else(|_| std::fs::metadata(sidecar_path(&path)))
            .map(|m| m.mtime())
            .unwrap_or(0);
        candidates.push((touched, seq, car, held));
    }
    candidates.sort_by_key(|c| (c.0, c.1));
    let mut freed = 0;
    for (_, seq, car, held) in candidates {
        if used <= max {
            break;
        }
        let path = pack_path(dir, seq);
        // Marked missing first, then given back: a crash between the two
        // costs a fetch, never a record read from a hole.
        let have = have_path(&path);
        match fs.remove(&have) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&have, e)),
        }
        if car.whole {
            write_sidecar(
                fs,
                &path,
                &Sidecar {
                    whole: false,
                    ..car.clone()
                },
            )?;
        }
        fs.sync_dir(dir).at(dir)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .at(&path)?;
        let start = PACK_HEADER_LEN as u64;
        crate::disk::punch_hole(&file, start, car.index_offset - start).at(&path)?;
        let now = std::fs::metadata(&path).at(&path)?.blocks() * 512;
        freed += held.saturating_sub(now);
        used = used.saturating_sub(held.saturating_sub(now));
    }
    Ok(freed)
}

/// True when `path` has no hole: every byte of it was written (a pack this
/// host wrote), never a placeholder whose records were not all fetched.
pub(crate) fn has_no_hole(path: &Path) -> Result<bool> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).at(path)?;
    let len = file.metadata().at(path)?.len();
    // SAFETY: lseek on a descriptor we own; no memory is touched.
    let hole = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(Error::io(path, io::Error::last_os_error()));
    }
    Ok(hole as u64 >= len)
}
