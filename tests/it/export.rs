//! Export: a snapshot written out whole as a raw image, to a new file or a
//! stream; byte-exact, sparse, all or nothing, and never of damaged data.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

use blocksnap::{EngineOptions, Error, ExportTarget, ServerId, SnapshotId};

use crate::common::{BS, Fixture, disk_bytes, random_bytes};

/// A disk with data, long zero runs and a short last block.
fn sparse_disk() -> Vec<u8> {
    let mut bytes = vec![0u8; 300 * BS + 1000];
    bytes[..40 * BS].copy_from_slice(&disk_bytes(40 * BS, 7));
    bytes[200 * BS..210 * BS].copy_from_slice(&random_bytes(10 * BS, 8));
    let end = bytes.len();
    bytes[end - 500..].fill(0x5A);
    bytes
}

fn to_file(path: &Path, replace: bool) -> ExportTarget {
    ExportTarget::File {
        path: path.to_path_buf(),
        replace,
    }
}

/// A writer into shared memory.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Files in `dir` whose name starts with a dot: an export's temporaries.
fn hidden_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn a_file_export_is_the_disk_with_holes_for_zeros() {
    let fx = Fixture::new();
    let bytes = sparse_disk();
    fx.server(1, "web", &bytes);
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    let out = fx.disk("out.img");
    let report = fx
        .engine
        .export_snapshot(snap.id, to_file(&out, false))
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    assert_eq!(report.snapshot_id, snap.id);
    assert_eq!(report.path.as_deref(), Some(out.as_path()));
    assert_eq!(report.image_bytes, bytes.len() as u64);
    assert_eq!(report.blocks_total, 301);
    assert_eq!(report.blocks_data, 51);
    assert_eq!(report.data_bytes, 50 * BS as u64 + 1000);
    // Zero blocks are holes: far fewer bytes allocated than the image.
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated < 100 * BS as u64,
        "{allocated} bytes allocated for {} of data",
        report.data_bytes
    );
    assert!(hidden_files(fx.dir.path()).is_empty());

    // A disk whose last blocks are zeros: the file still has its length.
    let mut tail = random_bytes(10 * BS, 9);
    tail.resize(50 * BS + 7, 0);
    fx.server(2, "tail", &tail);
    let snap = fx.engine.create_snapshot(ServerId(2), "t", "").unwrap();
    let out = fx.disk("tail-out.img");
    fx.engine
        .export_snapshot(snap.id, to_file(&out, false))
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), tail);
    // Not private, as a temporary file would be.
    let mode = std::fs::metadata(&out).unwrap().mode();
    assert_ne!(mode & 0o044, 0, "mode {mode:o}");
}

#[test]
fn a_stream_export_is_every_byte_in_order() {
    let fx = Fixture::new();
    let bytes = sparse_disk();
    fx.server(1, "web", &bytes);
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    let sink = Shared::default();
    let report = fx
        .engine
        .export_snapshot(snap.id, ExportTarget::Stream(Box::new(sink.clone())))
        .unwrap();
    assert_eq!(report.path, None);
    assert!(*sink.0.lock().unwrap() == bytes, "the stream differs");

    // A disk of zeros only, and an empty one.
    fx.server(2, "zeros", &vec![0; 17 * BS + 3]);
    fx.server(3, "empty", &[]);
    for server in [2, 3] {
        let snap = fx
            .engine
            .create_snapshot(ServerId(server), "z", "")
            .unwrap();
        let sink = Shared::default();
        fx.engine
            .export_snapshot(snap.id, ExportTarget::Stream(Box::new(sink.clone())))
            .unwrap();
        let want = if server == 2 { 17 * BS + 3 } else { 0 };
        assert_eq!(*sink.0.lock().unwrap(), vec![0; want]);
    }
}

#[test]
fn an_existing_target_is_kept_unless_replaced() {
    let fx = Fixture::new();
    let bytes = random_bytes(8 * BS, 3);
    fx.server(1, "web", &bytes);
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    let out = fx.disk("out.img");
    std::fs::write(&out, b"keep me").unwrap();
    let err = fx
        .engine
        .export_snapshot(snap.id, to_file(&out, false))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidParameter(_)), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    fx.engine
        .export_snapshot(snap.id, to_file(&out, true))
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), bytes);

    // Never a directory or a device, nor into a missing directory.
    for bad in [fx.dir.path().to_path_buf(), "/dev/null".into()] {
        let err = fx
            .engine
            .export_snapshot(snap.id, to_file(&bad, true))
            .unwrap_err();
        assert!(err.to_string().contains("restore"), "{err}");
    }
    // Nor, even with --force, a server's disk (restore writes onto
    // disks) or anything in the store.
    let disk = fx.disk("web.img");
    let err = fx
        .engine
        .export_snapshot(snap.id, to_file(&disk, true))
        .unwrap_err();
    assert!(err.to_string().contains("disk of server 1"), "{err}");
    assert_eq!(std::fs::read(&disk).unwrap(), bytes);
    for inside in [fx.store().join("x.img"), fx.store().join("packs/x.img")] {
        let err = fx
            .engine
            .export_snapshot(snap.id, to_file(&inside, true))
            .unwrap_err();
        assert!(err.to_string().contains("inside the store"), "{err}");
    }
    let missing = fx.dir.path().join("no/such/dir/x.img");
    let err = fx
        .engine
        .export_snapshot(snap.id, to_file(&missing, false))
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = fx
        .engine
        .export_snapshot(SnapshotId(99), to_file(&fx.disk("x.img"), false))
        .unwrap_err();
    assert!(matches!(err, Error::SnapshotNotFound(_)), "{err}");
    // The refused exports hold nothing.
    fx.engine.delete_snapshot(snap.id).unwrap();
}

/// Finds `needle` in the store's packs and flips a byte of it.
fn damage(store: &Path, needle: &[u8]) {
    for e in std::fs::read_dir(store.join("packs")).unwrap().flatten() {
        let mut bytes = std::fs::read(e.path()).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[at + 100] ^= 1;
            std::fs::write(e.path(), bytes).unwrap();
            return;
        }
    }
    panic!("bytes not found in any pack");
}

#[test]
fn a_damaged_chunk_fails_the_export_and_leaves_no_file() {
    let fx = Fixture::new();
    // Random blocks are stored raw, so their bytes can be found.
    let bytes = random_bytes(64 * BS, 4);
    fx.server(1, "web", &bytes);
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    damage(&fx.store(), &bytes[50 * BS..51 * BS]);

    let out = fx.disk("out.img");
    let err = fx
        .engine
        .export_snapshot(snap.id, to_file(&out, false))
        .unwrap_err();
    assert!(err.is_corruption(), "{err}");
    assert!(!out.exists(), "a partial image was left at the target");
    assert!(
        hidden_files(fx.dir.path()).is_empty(),
        "a temporary was left"
    );

    // Replacing: the old file stays as it was.
    std::fs::write(&out, b"older").unwrap();
    let err = fx
        .engine
        .export_snapshot(snap.id, to_file(&out, true))
        .unwrap_err();
    assert!(err.is_corruption(), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"older");
    assert!(
        hidden_files(fx.dir.path()).is_empty(),
        "a temporary was left"
    );

    // A stream stops before the damaged block: it never carries its bytes.
    let sink = Shared::default();
    let err = fx
        .engine
        .export_snapshot(snap.id, ExportTarget::Stream(Box::new(sink.clone())))
        .unwrap_err();
    assert!(err.is_corruption(), "{err}");
    let got = sink.0.lock().unwrap();
    assert!(got.len() <= 50 * BS, "{} bytes streamed", got.len());
    assert!(bytes.starts_with(&got));
    // The failed exports hold nothing.
    fx.engine.delete_snapshot(snap.id).unwrap();
}

/// A writer that waits for a signal before its first write.
struct Held(mpsc::Receiver<()>, Shared, bool);

impl Write for Held {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.2 {
            let _ = self.0.recv();
            self.2 = true;
        }
        self.1.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_snapshot_being_exported_cannot_be_deleted() {
    let fx = Fixture::new();
    let bytes = random_bytes(16 * BS, 5);
    fx.server(1, "web", &bytes);
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    let (go, wait) = mpsc::channel();
    let sink = Shared::default();
    let job = fx
        .engine
        .start_export(
            snap.id,
            ExportTarget::Stream(Box::new(Held(wait, sink.clone(), false))),
        )
        .unwrap();
    let err = fx.engine.delete_snapshot(snap.id).unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    assert!(err.to_string().contains("exporting"), "{err}");
    go.send(()).unwrap();
    job.wait().unwrap();
    assert!(*sink.0.lock().unwrap() == bytes);
    // Over, the export no longer holds it.
    fx.engine.delete_snapshot(snap.id).unwrap();
}

#[test]
fn a_read_only_store_exports_a_spilled_manifest() {
    let fx = Fixture::with(
        EngineOptions::new()
            .block_size(BS as u32)
            .block_list_memory(0),
    );
    let bytes = sparse_disk();
    fx.server(1, "web", &bytes);
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    let fx = fx.reopen(
        EngineOptions::new()
            .read_only(true)
            .create(false)
            .block_list_memory(0),
    );
    let out = fx.disk("out.img");
    fx.engine
        .export_snapshot(snap.id, to_file(&out, false))
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
}
