//! Export: a completed snapshot written out whole as a raw disk image,
//! into a new file or onto a stream, for a disk elsewhere (another host,
//! `qemu-img convert`, an archive).
//!
//! The same reads as a restore: every chunk checked against its BLAKE3
//! id before a byte of it goes out, batches fetched in parallel while the
//! previous one is written, one bit of memory a block for the plan.
//!
//! A file export writes a temporary file beside the target (its zero
//! blocks left as holes), fsyncs it, and only then renames it into place
//! and fsyncs the directory: the target path never holds a partial image,
//! and a failure (a damaged chunk, a full disk) removes the temporary. A
//! crash can leave one behind, named `.blocksnap-export-*`.
//!
//! A stream gets every byte in order, zeros included; a failure stops it
//! where it is, and the caller must not trust what it got (the command
//! exits non-zero).

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

use super::Engine;
use crate::disk::{Disk, FileDisk};
use crate::error::{Error, IoContext, Result};
use crate::ids::{ServerId, SnapshotId};
use crate::job::{Job, Progress};
use crate::manifest::Manifest;
use crate::restore::{self, BlockSet, RestorePlan};

/// An export running in the background.
pub type ExportJob = Job<ExportReport>;

/// Where an export goes.
#[non_exhaustive]
pub enum ExportTarget {
    /// A new image file. An existing file is refused unless `replace`;
    /// never a block device, a directory, a server's disk or a file in
    /// the store (restore writes onto disks).
    File { path: PathBuf, replace: bool },
    /// A stream (standard output, a pipe, a socket), every byte in order.
    Stream(Box<dyn Write + Send>),
}

/// What an export did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ExportReport {
    pub snapshot_id: SnapshotId,
    pub server_id: ServerId,
    /// The file written, `None` for a stream.
    pub path: Option<PathBuf>,
    /// Bytes of the image (its length).
    pub image_bytes: u64,
    /// Bytes of its data blocks, read from the store and written out.
    pub data_bytes: u64,
    /// Blocks of the image, and those holding data.
    pub blocks_total: u64,
    pub blocks_data: u64,
    pub micros: u64,
}

/// Zeros written to a stream per call.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

impl Engine {
    /// Exports a completed snapshot (see [`Engine::start_export`]) and
    /// returns once it is durable (a file) or flushed (a stream).
    pub fn export_snapshot(&self, id: SnapshotId, target: ExportTarget) -> Result<ExportReport> {
        self.start_export(id, target)?.wait()
    }

    /// Starts writing a completed snapshot out as a raw image. The
    /// snapshot cannot be deleted while it runs; a read-only engine
    /// exports too. A file target is checked before the job starts.
    pub fn start_export(&self, id: SnapshotId, target: ExportTarget) -> Result<ExportJob> {
        let server = {
            let mut state = self.inner.state.lock();
            let server = state.completed(id, "can be exported")?.server_id;
            *state.live_exports.entry(id).or_default() += 1;
            server
        };
        let release = move |engine: &Engine| {
            let mut state = engine.inner.state.lock();
            if let Some(n) = state.live_exports.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    state.live_exports.remove(&id);
                }
            }
        };
        if let ExportTarget::File { path, replace } = &target
            && let Err(e) = self.check_target(path, *replace)
        {
            release(self);
            return Err(e);
        }
        let engine = self.clone();
        let finisher = self.clone();
        let progress = Arc::new(Progress::default());
        let job_progress = progress.clone();
        Job::spawn(
            format!("export-{id}"),
            progress,
            move || engine.run_export(id, server, target, &job_progress),
            move |outcome| {
                release(&finisher);
                outcome
            },
        )
        .inspect_err(|_| release(self))
    }

    fn run_export(
        &self,
        id: SnapshotId,
        server: ServerId,
        target: ExportTarget,
        progress: &Progress,
    ) -> Result<ExportReport> {
        let started = std::time::Instant::now();
        let manifest = self.checked_manifest(server, id)?;
        let plan = data_plan(&manifest)?;
        let path = match target {
            ExportTarget::File { path, replace } => {
                self.export_to_file(&manifest, &plan, &path, replace, progress)?;
                Some(path)
            }
            ExportTarget::Stream(out) => {
                let stream = Stream::new(out);
                self.apply_plan(&manifest, &plan, &stream, progress)?;
                stream.set_len(manifest.image_len)?;
                stream.sync()?;
                None
            }
        };
        Ok(ExportReport {
            snapshot_id: id,
            server_id: server,
            path,
            image_bytes: manifest.image_len,
            data_bytes: plan.bytes_to_write,
            blocks_total: plan.blocks_total,
            blocks_data: plan.rewrite.len(),
            micros: started.elapsed().as_micros() as u64,
        })
    }

    /// Writes the image into a temporary file beside `path`, makes it
    /// durable, then renames it into place and syncs the directory.
    fn export_to_file(
        &self,
        manifest: &Manifest,
        plan: &RestorePlan,
        path: &Path,
        replace: bool,
        progress: &Progress,
    ) -> Result<()> {
        let dir = parent_of(path);
        // Readable as any image the user makes (the umask applies), not
        // private as a temporary file is by default.
        let temp = tempfile::Builder::new()
            .prefix(".blocksnap-export-")
            .permissions(std::fs::Permissions::from_mode(0o666))
            .tempfile_in(dir)
            .at(dir)?;
        let file = temp.as_file().try_clone().at(temp.path())?;
        let disk = FileDisk::from_file(file, temp.path())?;
        // Holes first: only data blocks are written.
        disk.set_len(manifest.image_len)?;
        self.apply_plan(manifest, plan, &disk, progress)?;
        disk.sync()?;
        drop(disk);
        let placed = if replace {
            temp.persist(path).map(drop)
        } else {
            temp.persist_noclobber(path).map(drop)
        };
        placed.map_err(|e| Error::io(path, e.error))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| {
                let why = format!(
                    "{} holds the whole image, but its directory could not be synced, \
                     so a crash may still lose it: {e}",
                    path.display()
                );
                Error::io(dir, std::io::Error::new(e.kind(), why))
            })
    }

    /// Reads and checks the plan's blocks and writes them to `disk`.
    fn apply_plan(
        &self,
        manifest: &Manifest,
        plan: &RestorePlan,
        disk: &dyn Disk,
        progress: &Progress,
    ) -> Result<()> {
        let mut written = 0;
        let window = self.inner.options.window_len;
        let store = &self.inner.store;
        restore::apply(store, manifest, disk, plan, window, progress, &mut written)
    }

    /// Refuses a file target that is not a new (or, with `replace`, a
    /// regular) file in an existing directory, or that lies in the store
    /// or is a server's disk, before anything is read.
    fn check_target(&self, path: &Path, replace: bool) -> Result<()> {
        let dir = parent_of(path);
        let refuse = |why: String| {
            Err(Error::InvalidParameter(format!(
                "cannot export to {}: {why}",
                path.display()
            )))
        };
        let Ok(real_dir) = dir.canonicalize() else {
            return refuse(format!("directory {} does not exist", dir.display()));
        };
        if let Ok(root) = self.root().canonicalize()
            && real_dir.starts_with(&root)
        {
            return refuse(format!(
                "it is inside the store {} (export writes a new image file elsewhere)",
                root.display()
            ));
        }
        let meta = match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(path, e)),
            Ok(m) => m,
        };
        if !meta.is_file() {
            return refuse(
                "it exists and is not a regular file; export writes a new image file \
                 (to write a snapshot onto a disk, restore it)"
                    .into(),
            );
        }
        if !replace {
            return refuse(
                "it exists; export writes a new image file (give --force to replace it)".into(),
            );
        }
        let same = |disk: &Path| {
            std::fs::metadata(disk).is_ok_and(|d| d.dev() == meta.dev() && d.ino() == meta.ino())
        };
        if let Some(server) = self.servers().iter().find(|s| same(&s.disk)) {
            return refuse(format!(
                "it is the disk of server {} ({}); to write a snapshot onto a server's disk, \
                 restore it (a safety snapshot first, only the blocks that differ)",
                server.id, server.name
            ));
        }
        Ok(())
    }
}

/// The directory a file target goes into.
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Every data block of the manifest: what an export reads and writes.
fn data_plan(manifest: &Manifest) -> Result<RestorePlan> {
    let blocks_total = manifest.block_count();
    let mut rewrite = BlockSet::new(blocks_total);
    let mut bytes_to_write = 0;
    for block in manifest.blocks().data() {
        let (i, _) = block?;
        rewrite.insert(i);
        bytes_to_write += manifest.block_len(i) as u64;
    }
    Ok(RestorePlan {
        snapshot: manifest.snapshot,
        blocks_total,
        rewrite,
        bytes_to_write,
        bytes_compared: 0,
    })
}

/// A stream as a [`Disk`] that is only ever written forwards: what lies
/// between one write and the next (zero blocks) goes out as zeros.
struct Stream {
    out: Mutex<(Box<dyn Write + Send>, u64)>,
}

impl Stream {
    fn new(out: Box<dyn Write + Send>) -> Self {
        Stream {
            out: Mutex::new((out, 0)),
        }
    }

    /// Writes zeros up to `to`, then `buf`, failing on a write behind
    /// what was written (which export never does).
    fn put(&self, to: u64, buf: &[u8]) -> Result<()> {
        let mut guard = self.out.lock();
        let (out, at) = &mut *guard;
        if to < *at {
            return Err(Error::Internal(format!(
                "a stream export wrote byte {to} after byte {at}"
            )));
        }
        let failed = |e| Error::io(Path::new("the export stream"), e);
        while *at < to {
            let n = (to - *at).min(ZEROS.len() as u64) as usize;
            out.write_all(&ZEROS[..n]).map_err(failed)?;
            *at += n as u64;
        }
        out.write_all(buf).map_err(failed)?;
        *at += buf.len() as u64;
        Ok(())
    }
}

impl Disk for Stream {
    fn len(&self) -> Result<u64> {
        Ok(self.out.lock().1)
    }

    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<usize> {
        Err(Error::Internal("an export stream cannot be read".into()))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.put(offset, buf)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.put(offset + len, &[])
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.put(len, &[])
    }

    fn is_block_device(&self) -> bool {
        false
    }

    fn sync(&self) -> Result<()> {
        self.out
            .lock()
            .0
            .flush()
            .map_err(|e| Error::io(Path::new("the export stream"), e))
    }

    fn path(&self) -> &Path {
        Path::new("-")
    }
}
