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

use crate::blockmap::BlockMap;
use crate::error::{Error, IoContext, Result};
use crate::fsio::{OpenMode, StoreFs};
use crate::ids::{ChunkId, ServerId, SnapshotId};
use crate::le;
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

    /// Block `i`: its chunk, or `None` when zero.
    pub fn block(&self, i: u64) -> Option<ChunkId> {
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

    /// The distinct chunks this manifest references.
    pub fn unique_chunks(&self) -> Vec<ChunkId> {
        let mut ids: Vec<ChunkId> = self.blocks.data().map(|(_, id)| id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The encoded file bytes.
    pub fn encode(&self) -> Vec<u8> {
        let data_count = self.blocks.data().count() as u64;
        let bitmap_len = self.blocks.len().div_ceil(8) as usize;
        let mut out =
            Vec::with_capacity(MANIFEST_HEADER_LEN + bitmap_len + data_count as usize * 32 + 4);
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.push(ManifestVersion::V1 as u8);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.image_len.to_le_bytes());
        out.extend_from_slice(&self.block_count().to_le_bytes());
        out.extend_from_slice(&self.snapshot.0.to_le_bytes());
        out.extend_from_slice(&self.server.0.to_le_bytes());
        out.extend_from_slice(&data_count.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len(), MANIFEST_HEADER_LEN);

        let mut bitmap = vec![0u8; bitmap_len];
        for (i, _) in self.blocks.data() {
            bitmap[(i / 8) as usize] |= 1 << (i % 8);
        }
        out.extend_from_slice(&bitmap);
        for (_, id) in self.blocks.data() {
            out.extend_from_slice(&id.0);
        }
        let body_crc = crc32fast::hash(&out[MANIFEST_HEADER_LEN..]);
        out.extend_from_slice(&body_crc.to_le_bytes());
        out
    }

    /// Decodes and checks a manifest file's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let h = bytes
            .get(..MANIFEST_HEADER_LEN)
            .ok_or("shorter than a manifest header")?;
        if h[M_MAGIC..M_VERSION] != MANIFEST_MAGIC {
            return Err("bad manifest magic".into());
        }
        if crc32fast::hash(&h[..M_HEADER_CRC]) != le::u32_at(h, M_HEADER_CRC) {
            return Err("manifest header checksum mismatch".into());
        }
        ManifestVersion::try_from(h[M_VERSION])?;
        let block_size = le::u32_at(h, M_BLOCK_SIZE);
        check_block_size(block_size).map_err(|e| e.to_string())?;
        let image_len = le::u64_at(h, M_IMAGE_LEN);
        let count = le::u64_at(h, M_BLOCK_COUNT);
        let data_count = le::u64_at(h, M_DATA_COUNT);
        if count != block_count(image_len, block_size) || data_count > count {
            return Err("manifest block counts do not match its image length".into());
        }
        let bitmap_len = count.div_ceil(8);
        let body_len = bitmap_len + data_count * 32;
        if bytes.len() as u64 != MANIFEST_HEADER_LEN as u64 + body_len + 4 {
            return Err("manifest length does not match its header".into());
        }
        let body_end = bytes.len() - 4;
        if crc32fast::hash(&bytes[MANIFEST_HEADER_LEN..body_end]) != le::u32_at(bytes, body_end) {
            return Err("manifest body checksum mismatch".into());
        }
        let bitmap = &bytes[MANIFEST_HEADER_LEN..MANIFEST_HEADER_LEN + bitmap_len as usize];
        let mut ids = bytes[MANIFEST_HEADER_LEN + bitmap_len as usize..body_end].chunks_exact(32);
        let mut blocks = BlockMap::zeros(count);
        for (b, byte) in bitmap.iter().enumerate().filter(|(_, byte)| **byte != 0) {
            for k in (0..8).filter(|k| byte & (1 << k) != 0) {
                let i = b as u64 * 8 + k;
                if i >= count {
                    return Err("the bitmap marks blocks past the end".into());
                }
                let raw = ids.next().ok_or("bitmap marks more data blocks than ids")?;
                blocks.set(i, Some(le::chunk_id_at(raw, 0)));
            }
        }
        if ids.next().is_some() {
            return Err("more ids than data blocks in the bitmap".into());
        }
        Ok(Manifest {
            snapshot: SnapshotId(le::u64_at(h, M_SNAPSHOT)),
            server: ServerId(le::u64_at(h, M_SERVER)),
            block_size,
            image_len,
            blocks,
        })
    }
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
}

/// Temporary files of manifests being written start and end so.
const TMP_PREFIX: &str = ".manifest-";
const TMP_SUFFIX: &str = ".tmp";

impl Manifests {
    /// The manifests in `dir` (created if missing).
    pub fn open(dir: PathBuf, fs: Arc<dyn StoreFs>) -> Result<Self> {
        fs.create_dir_all(&dir).at(&dir)?;
        Ok(Manifests { dir, fs })
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
        let path = self.path(m.snapshot);
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{:020}{TMP_SUFFIX}", m.snapshot.0));
        let written = (|| {
            let f = self.fs.open(&tmp, OpenMode::CreateNew).at(&tmp)?;
            f.write_all_at(&m.encode(), 0).at(&tmp)?;
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
    pub fn read(&self, snapshot: SnapshotId) -> Result<Manifest> {
        let path = self.path(snapshot);
        let bytes = match self.fs.read_all(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::corrupt(
                    &path,
                    format!("the manifest of snapshot {snapshot} is missing"),
                ));
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let m = Manifest::decode(&bytes).map_err(|w| Error::corrupt(&path, w))?;
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
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.block_len(4), 100);
        assert_eq!(m.unique_chunks().len(), 2);
    }

    #[test]
    fn every_flipped_bit_and_truncation_is_detected() {
        let bytes = sample().encode();
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
        let bytes = sample().encode();
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
