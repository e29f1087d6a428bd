//! Manifests: one immutable file per snapshot, listing every block of the
//! disk as zero or a chunk id. Byte layout in docs/FORMAT.md ("Manifests").
//!
//! ```text
//! header  magic "BSNPMANF" | version u8 | reserved [3] | block_size u32 |
//!         image_len u64 | block_count u64 | snapshot id u64 | server id u64 |
//!         data block count u64 | reserved u32 | header crc32 u32      64 bytes
//! body    data bitmap: ceil(block_count / 8) bytes, bit k of byte b set
//!         when block 8b+k holds data (least significant bit first)
//!         chunk ids: 32 bytes for each data block, in block order
//! footer  body crc32 u32
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use crate::blockmap::{Backing, BlockMap};
use crate::error::{Error, IoContext, Result};
use crate::fsio::{OpenMode, StoreFs};
use crate::ids::{ChunkId, ServerId, SnapshotId};
use crate::le;
use crate::sorted::SortedIds;
use crate::store::sync_dir;

pub const MANIFEST_MAGIC: [u8; 8] = *b"BSNPMANF";

const M_MAGIC: usize = 0;
const M_VERSION: usize = M_MAGIC + 8;
const M_RESERVED: usize = M_VERSION + 1;
const M_BLOCK_SIZE: usize = M_RESERVED + 3;
const M_IMAGE_LEN: usize = M_BLOCK_SIZE + 4;
const M_BLOCK_COUNT: usize = M_IMAGE_LEN + 8;
const M_SNAPSHOT: usize = M_BLOCK_COUNT + 8;
const M_SERVER: usize = M_SNAPSHOT + 8;
const M_DATA_COUNT: usize = M_SERVER + 8;
const M_RESERVED2: usize = M_DATA_COUNT + 8;
const M_HEADER_CRC: usize = M_RESERVED2 + 4;
pub const MANIFEST_HEADER_LEN: usize = M_HEADER_CRC + 4;
const _: () = assert!(MANIFEST_HEADER_LEN == 64);

/// Smallest and largest block sizes a store may use.
pub const MIN_BLOCK_SIZE: u32 = 4 << 10;
pub const MAX_BLOCK_SIZE: u32 = 4 << 20;

/// Manifest format versions this code reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestVersion {
    V1 = 1,
}

impl TryFrom<u8> for ManifestVersion {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            1 => Ok(ManifestVersion::V1),
            other => Err(format!("unsupported manifest version {other}")),
        }
    }
}

/// Checks that `block_size` is a power of two from 4 KiB to 4 MiB.
pub fn check_block_size(block_size: u32) -> Result<()> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(Error::InvalidParameter(format!(
            "block size {block_size} is not a power of two from 4 KiB to 4 MiB"
        )));
    }
    Ok(())
}

/// A snapshot's disk, block by block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub snapshot: SnapshotId,
    pub server: ServerId,
    pub block_size: u32,
    pub image_len: u64,
    blocks: BlockMap,
}

impl Manifest {
    /// A manifest for an image of `image_len` bytes; `blocks` must hold one
    /// entry per block (`None` for an all-zero block).
    pub fn new(
        snapshot: SnapshotId,
        server: ServerId,
        block_size: u32,
        image_len: u64,
        blocks: BlockMap,
    ) -> Result<Self> {
        check_block_size(block_size)?;
        if blocks.len() != block_count(image_len, block_size) {
            return Err(Error::InvalidParameter(format!(
                "{} block entries for an image of {image_len} bytes",
                blocks.len()
            )));
        }
        Ok(Manifest {
            snapshot,
            server,
            block_size,
            image_len,
            blocks,
        })
    }

    /// Every block in order: `None` for zero, else its chunk.
    pub fn blocks(&self) -> &BlockMap {
        &self.blocks
    }

    /// See [`BlockMap::spill_beyond`]: for copies of the block list made
    /// to be changed (an incremental capture's plan).
    pub fn spill_beyond(&mut self, bytes: u64, dir: PathBuf) {
        self.blocks.spill_beyond(bytes, dir);
    }

    /// Block `i`: its chunk, or `None` when zero.
    pub fn block(&self, i: u64) -> Result<Option<ChunkId>> {
        self.blocks.get(i)
    }

    /// Number of blocks (the last one may be partial).
    pub fn block_count(&self) -> u64 {
        self.blocks.len()
    }

    /// Byte length of block `i` (the last one may be short).
    pub fn block_len(&self, i: u64) -> usize {
        let start = i * u64::from(self.block_size);
        (self.image_len - start).min(u64::from(self.block_size)) as usize
    }

    /// The distinct chunks this manifest references, sorted: at most
    /// `memory` bytes of them in memory, the rest in scratch files in
    /// `scratch`.
    pub fn chunks(&self, memory: u64, scratch: &std::path::Path) -> Result<SortedIds> {
        SortedIds::gather(
            self.blocks.data().map(|d| d.map(|(_, id)| id)),
            memory,
            scratch,
        )
    }

    /// The encoded file bytes.
    #[cfg(any(test, feature = "testing"))]
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write_to(&mut |piece| {
            out.extend_from_slice(piece);
            Ok(())
        })?;
        Ok(out)
    }

    /// Hands the encoded file to `sink` piece by piece, in order: the ids
    /// of a dense disk are never all in memory at once.
    fn write_to(&self, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let data_count = self.blocks.data_count();
        let mut h = Vec::with_capacity(MANIFEST_HEADER_LEN);
        h.extend_from_slice(&MANIFEST_MAGIC);
        h.push(ManifestVersion::V1 as u8);
        h.extend_from_slice(&[0; 3]);
        h.extend_from_slice(&self.block_size.to_le_bytes());
        h.extend_from_slice(&self.image_len.to_le_bytes());
        h.extend_from_slice(&self.block_count().to_le_bytes());
        h.extend_from_slice(&self.snapshot.0.to_le_bytes());
        h.extend_from_slice(&self.server.0.to_le_bytes());
        h.extend_from_slice(&data_count.to_le_bytes());
        h.extend_from_slice(&[0; 4]);
        let crc = crc32fast::hash(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(h.len(), MANIFEST_HEADER_LEN);
        sink(&h)?;

        let mut body = crc32fast::Hasher::new();
        let mut bitmap = Vec::with_capacity(self.blocks.page_count() * PAGE_BITMAP_LEN);
        for p in 0..self.blocks.page_count() {
            self.blocks.page_bitmap(p, &mut bitmap);
        }
        bitmap.truncate(self.block_count().div_ceil(8) as usize);
        body.update(&bitmap);
        sink(&bitmap)?;
        drop(bitmap);
        let mut ids = Vec::with_capacity(WRITE_PIECE);
        for d in self.blocks.data() {
            ids.extend_from_slice(&d?.1.0);
            if ids.len() >= WRITE_PIECE {
                body.update(&ids);
                sink(&ids)?;
                ids.clear();
            }
        }
        body.update(&ids);
        sink(&ids)?;
        sink(&body.finalize().to_le_bytes())
    }

    /// Decodes and checks a manifest file's bytes.
    #[cfg(any(test, feature = "testing", feature = "s3"))]
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let read = |buf: &mut [u8], offset: u64| -> Result<()> {
            match copy_at(bytes, buf, offset) {
                true => Ok(()),
                false => Err(Error::Internal("read past the end".into())),
            }
        };
        parse(&read, bytes.len() as u64, None).map_err(|e| match e {
            Bad::Corrupt(what) => what,
            Bad::Io(e) => e.to_string(),
        })
    }
}

/// Fills `buf` from `bytes` at `offset`; false when they end first.
fn copy_at(bytes: &[u8], buf: &mut [u8], offset: u64) -> bool {
    let at = usize::try_from(offset).unwrap_or(usize::MAX);
    match bytes.get(at..at.saturating_add(buf.len())) {
        Some(part) => {
            buf.copy_from_slice(part);
            true
        }
        None => false,
    }
}

/// Bytes of one page's data bitmap (see [`BlockMap`]).
const PAGE_BITMAP_LEN: usize = crate::blockmap::PAGE as usize / 8;
/// Bytes of ids handed on (or read) at once.
const WRITE_PIECE: usize = 1 << 20;

/// Why a manifest could not be read.
enum Bad {
    Corrupt(String),
    Io(Error),
}

impl From<&str> for Bad {
    fn from(what: &str) -> Self {
        Bad::Corrupt(what.into())
    }
}

/// Reads and checks a manifest of `len` bytes through `read`, every byte
/// of it (the body's checksum covers them all). The ids stay in memory,
/// unless `stored` gives the file they are in and the memory they may
/// take (a page of 4,096 blocks in memory takes 135 KiB however few of
/// them hold data): then only the data bitmap (one bit a block) is kept,
/// and the ids are read again from the file when needed.
fn parse(
    read: &dyn Fn(&mut [u8], u64) -> Result<()>,
    len: u64,
    stored: Option<(Arc<Backing>, u64)>,
) -> Result<Manifest, Bad> {
    let mut h = [0u8; MANIFEST_HEADER_LEN];
    if len < MANIFEST_HEADER_LEN as u64 {
        return Err("shorter than a manifest header".into());
    }
    read(&mut h, 0).map_err(Bad::Io)?;
    if h[M_MAGIC..M_VERSION] != MANIFEST_MAGIC {
        return Err("bad manifest magic".into());
    }
    if crc32fast::hash(&h[..M_HEADER_CRC]) != le::u32_at(&h, M_HEADER_CRC) {
        return Err("manifest header checksum mismatch".into());
    }
    ManifestVersion::try_from(h[M_VERSION]).map_err(Bad::Corrupt)?;
    let block_size = le::u32_at(&h, M_BLOCK_SIZE);
    check_block_size(block_size).map_err(|e| Bad::Corrupt(e.to_string()))?;
    let image_len = le::u64_at(&h, M_IMAGE_LEN);
    let count = le::u64_at(&h, M_BLOCK_COUNT);
    let data_count = le::u64_at(&h, M_DATA_COUNT);
    if count != block_count(image_len, block_size) || data_count > count {
        return Err("manifest block counts do not match its image length".into());
    }
    let bitmap_len = count.div_ceil(8);
    let body_len = bitmap_len + data_count * 32;
    if len != MANIFEST_HEADER_LEN as u64 + body_len + 4 {
        return Err("manifest length does not match its header".into());
    }
    let mut body = crc32fast::Hasher::new();
    let mut bitmap = vec![0u8; bitmap_len as usize];
    read(&mut bitmap, MANIFEST_HEADER_LEN as u64).map_err(Bad::Io)?;
    body.update(&bitmap);
    // Each page's bits, as words.
    let pages: Vec<[u64; PAGE_BITMAP_LEN / 8]> = bitmap
        .chunks(PAGE_BITMAP_LEN)
        .map(|b| {
            let mut words = [0u64; PAGE_BITMAP_LEN / 8];
            for (w, bytes) in words.iter_mut().zip(b.chunks(8)) {
                let mut word = [0u8; 8];
                word[..bytes.len()].copy_from_slice(bytes);
                *w = u64::from_le_bytes(word);
            }
            words
        })
        .collect();
    drop(bitmap);
    if let Some(last) = pages.last() {
        let k = (count - 1) % (PAGE_BITMAP_LEN as u64 * 8);
        let past = (k + 1..PAGE_BITMAP_LEN as u64 * 8)
            .any(|k| last[(k / 64) as usize] & (1 << (k % 64)) != 0);
        if past {
            return Err("the bitmap marks blocks past the end".into());
        }
    }
    let marked: u64 = pages
        .iter()
        .flat_map(|w| w.iter())
        .map(|w| u64::from(w.count_ones()))
        .sum();
    if marked > data_count {
        return Err("bitmap marks more data blocks than ids".into());
    }
    if marked < data_count {
        return Err("more ids than data blocks in the bitmap".into());
    }
    // The ids, page by page: checked against the body's checksum, and
    // kept unless they stay in the file.
    let ids_at = MANIFEST_HEADER_LEN as u64 + bitmap_len;
    let mut at = ids_at;
    let with_data = pages.iter().filter(|w| w.iter().any(|&x| x != 0)).count() as u64;
    let stored = stored
        .filter(|(_, memory)| with_data.saturating_mul(crate::blockmap::MEM_PAGE_BYTES) > *memory)
        .map(|(backing, _)| backing);
    let mut kept = stored.is_none().then(|| BlockMap::zeros(count));
    let mut raw = Vec::new();
    for (p, words) in pages.iter().enumerate() {
        let n: usize = words.iter().map(|w| w.count_ones() as usize).sum();
        if n == 0 {
            continue;
        }
        raw.resize(n * 32, 0);
        read(&mut raw, at).map_err(Bad::Io)?;
        body.update(&raw);
        at += raw.len() as u64;
        if let Some(kept) = &mut kept {
            kept.put_page(p, words, &raw);
        }
    }
    let mut crc = [0u8; 4];
    read(&mut crc, at).map_err(Bad::Io)?;
    if body.finalize() != u32::from_le_bytes(crc) {
        return Err("manifest body checksum mismatch".into());
    }
    let blocks = match (kept, stored) {
        (Some(kept), _) => kept,
        (None, Some(backing)) => BlockMap::stored(count, pages, backing, ids_at),
        (None, None) => return Err(Bad::Io(Error::Internal("no manifest pages".into()))),
    };
    Ok(Manifest {
        snapshot: SnapshotId(le::u64_at(&h, M_SNAPSHOT)),
        server: ServerId(le::u64_at(&h, M_SERVER)),
        block_size,
        image_len,
        blocks,
    })
}

/// Number of blocks of `block_size` needed to cover `image_len` bytes.
pub fn block_count(image_len: u64, block_size: u32) -> u64 {
    image_len.div_ceil(u64::from(block_size))
}

/// The manifest directory, through the store's file system seam.
#[derive(Clone)]
pub struct Manifests {
    dir: PathBuf,
    fs: Arc<dyn StoreFs>,
    /// Bytes of ids a manifest read may hold in memory; a larger one keeps
    /// its ids in its file (see [`crate::EngineOptions::block_list_memory`]).
    memory: u64,
}

/// Temporary files of manifests being written start and end so.
const TMP_PREFIX: &str = ".manifest-";
const TMP_SUFFIX: &str = ".tmp";

impl Manifests {
    /// The manifests in `dir` (created if missing).
    pub fn open(dir: PathBuf, fs: Arc<dyn StoreFs>, memory: u64) -> Result<Self> {
        fs.create_dir_all(&dir).at(&dir)?;
        Ok(Manifests { dir, fs, memory })
    }

    /// The directory the manifests (and the reference counts' table) are
    /// in.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The file seam the manifests are read and written through.
    pub fn fs(&self) -> &Arc<dyn StoreFs> {
        &self.fs
    }

    /// Where the manifest of `snapshot` lives.
    pub fn path(&self, snapshot: SnapshotId) -> PathBuf {
        self.dir.join(format!("{:020}.manifest", snapshot.0))
    }

    /// Writes a manifest durably: temporary file, fsync, rename, directory
    /// fsync. A failure leaves at most a temporary file, which
    /// [`Manifests::clean_temporaries`] removes.
    pub fn write(&self, m: &Manifest) -> Result<PathBuf> {
        self.write_pieces(m.snapshot, |out| m.write_to(out))
    }

    /// Writes the manifest of `snapshot` from its encoded bytes (made by
    /// another host), as [`Manifests::write`] does, then reads it back
    /// through every check: one that fails them is removed again and
    /// reported as corruption of `source`.
    #[cfg_attr(not(feature = "s3"), allow(dead_code))]
    pub fn write_encoded(
        &self,
        snapshot: SnapshotId,
        bytes: &[u8],
        source: &str,
    ) -> Result<Manifest> {
        let path = self.write_pieces(snapshot, |out| out(bytes))?;
        match self.read(snapshot) {
            Ok(m) if m.snapshot == snapshot => Ok(m),
            outcome => {
                let _ = self.remove(snapshot);
                let why = match outcome {
                    Ok(m) => format!("it is the manifest of snapshot {}", m.snapshot),
                    Err(e) => e.to_string(),
                };
                Err(Error::corrupt(
                    &path,
                    format!("the manifest of snapshot {snapshot} from {source}: {why}"),
                ))
            }
        }
    }

    fn write_pieces(
        &self,
        snapshot: SnapshotId,
        fill: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>,
    ) -> Result<PathBuf> {
        let path = self.path(snapshot);
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{:020}{TMP_SUFFIX}", snapshot.0));
        let written = (|| {
            let f = self.fs.open(&tmp, OpenMode::CreateNew).at(&tmp)?;
            let mut at = 0;
            let mut buf = Vec::with_capacity(WRITE_PIECE);
            fill(&mut |piece| {
                buf.extend_from_slice(piece);
                if buf.len() >= WRITE_PIECE {
                    f.write_all_at(&buf, at).at(&tmp)?;
                    at += buf.len() as u64;
                    buf.clear();
                }
                Ok(())
            })?;
            f.write_all_at(&buf, at).at(&tmp)?;
            f.sync().at(&tmp)?;
            self.fs.rename(&tmp, &path).at(&path)
        })();
        if let Err(e) = written {
            let _ = self.fs.remove(&tmp);
            return Err(e);
        }
        sync_dir(self.fs.as_ref(), &self.dir)?;
        Ok(path)
    }

    /// Reads and checks the manifest of `snapshot`. Only snapshots that
    /// have one are read, so a missing file is damage.
    ///
    /// Every byte is read and checked; the ids stay in memory when they
    /// fit [`Manifests::memory`], else in the file, read again as needed.
    pub fn read(&self, snapshot: SnapshotId) -> Result<Manifest> {
        let path = self.path(snapshot);
        let file = match self.fs.open(&path, OpenMode::Read) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::corrupt(
                    &path,
                    format!("the manifest of snapshot {snapshot} is missing"),
                ));
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let len = file.len().at(&path)?;
        let stored = Some((Backing::new(file.clone(), path.clone()), self.memory));
        let cut = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::corrupt(&path, "cut short")
            } else {
                Error::io(&path, e)
            }
        };
        // A small manifest in one read, a large one as a stream.
        let whole = if len <= WRITE_PIECE as u64 {
            let mut bytes = vec![0u8; len as usize];
            file.read_exact_at(&mut bytes, 0).map_err(cut)?;
            Some(bytes)
        } else {
            None
        };
        let read = |buf: &mut [u8], offset: u64| -> Result<()> {
            match &whole {
                Some(bytes) if copy_at(bytes, buf, offset) => Ok(()),
                Some(_) => Err(Error::corrupt(&path, "cut short")),
                None => file.read_exact_at(buf, offset).map_err(cut),
            }
        };
        let m = parse(&read, len, stored).map_err(|e| match e {
            Bad::Corrupt(what) => Error::corrupt(&path, what),
            Bad::Io(e) => e,
        })?;
        if m.snapshot != snapshot {
            return Err(Error::corrupt(
                &path,
                format!("holds snapshot {}", m.snapshot),
            ));
        }
        Ok(m)
    }

    /// Removes a manifest (after its catalog entry is gone) and syncs the
    /// directory.
    pub fn remove(&self, snapshot: SnapshotId) -> Result<()> {
        let path = self.path(snapshot);
        match self.fs.remove(&path) {
            Ok(()) => sync_dir(self.fs.as_ref(), &self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// The snapshot ids of the manifests present.
    pub fn ids(&self) -> Result<Vec<SnapshotId>> {
        Ok(self
            .fs
            .list(&self.dir)
            .at(&self.dir)?
            .iter()
            .filter_map(|p| {
                p.file_name()?
                    .to_str()?
                    .strip_suffix(".manifest")?
                    .parse()
                    .ok()
            })
            .map(SnapshotId)
            .collect())
    }

    /// Removes temporary files a crash left behind while writing manifests.
    pub fn clean_temporaries(&self) -> Result<()> {
        for path in self.fs.list(&self.dir).at(&self.dir)? {
            let name = path.file_name().map(|n| n.to_string_lossy().to_string());
            if name.is_some_and(|n| n.starts_with(TMP_PREFIX) && n.ends_with(TMP_SUFFIX)) {
                self.fs.remove(&path).at(&path)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let blocks = vec![
            Some(ChunkId::of(b"a")),
            None,
            Some(ChunkId::of(b"b")),
            Some(ChunkId::of(b"a")),
            None,
        ];
        Manifest::new(
            SnapshotId(7),
            ServerId(3),
            4096,
            4 * 4096 + 100,
            blocks.into(),
        )
        .unwrap()
    }

    #[test]
    fn manifest_round_trips() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode().unwrap()).unwrap(), m);
        assert_eq!(m.block_len(4), 100);
        assert_eq!(
            m.chunks(0, std::path::Path::new("."))
                .unwrap()
                .iter()
                .count(),
            2
        );
    }

    #[test]
    fn every_flipped_bit_and_truncation_is_detected() {
        let bytes = sample().encode().unwrap();
        for i in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(Manifest::decode(&bad).is_err(), "bit {i} went unnoticed");
        }
        for len in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..len]).is_err());
        }
    }

    #[test]
    fn golden_header_bytes() {
        let bytes = sample().encode().unwrap();
        assert_eq!(&bytes[..8], b"BSNPMANF");
        assert_eq!(bytes[8], 1);
        assert_eq!(&bytes[12..16], &4096u32.to_le_bytes());
        assert_eq!(&bytes[16..24], &(4 * 4096 + 100u64).to_le_bytes());
        assert_eq!(&bytes[24..32], &5u64.to_le_bytes());
        // bitmap: blocks 0, 2, 3 hold data
        assert_eq!(bytes[64], 0b0000_1101);
        assert_eq!(bytes.len(), 64 + 1 + 3 * 32 + 4);
    }

    #[test]
    fn block_size_must_be_a_power_of_two_in_range() {
        for ok in [4096, 65536, 4 << 20] {
            assert!(check_block_size(ok).is_ok());
        }
        for bad in [0, 2048, 65535, 8 << 20] {
            assert!(check_block_size(bad).is_err());
        }
    }
}
