//! Disks on NBD, against the real qemu-storage-daemon: a qcow2 image
//! exported over a Unix socket is captured (holes skipped through
//! `base:allocation`), written as a guest would, restored and compared
//! with `qemu-img compare`; an incremental snapshot reads only what a
//! persistent QEMU dirty bitmap marks, through the command line.
//!
//! These tests need `qemu-storage-daemon` and `qemu-img` (qemu-utils). They
//! fail without them, unless `BLOCKSNAP_NO_QEMU=1` says the machine has no
//! QEMU: then they say so loudly and pass.

use std::path::Path;
use std::process::Command;

use blocksnap::disk::Disk;
use blocksnap::live::testbed::Daemon;
use blocksnap::nbd::NbdDisk;
use blocksnap::{EngineOptions, ServerId};

use crate::common::OpenIn;
use crate::common::{random_bytes, run};

const MIB: usize = 1 << 20;

/// qemu-storage-daemon serving `image` as NBD export `guest` with the
/// export options `export` (`writable=on`, `bitmaps.0=cp1`), or `None`
/// where the machine has no QEMU and says so.
fn start_qsd(dir: &Path, image: &Path, export: &str) -> Option<Daemon> {
    crate::common::qemu_here().then(|| Daemon::start_with(dir, image, export).unwrap())
}

/// A disk of `len` bytes: random data in some places, zeros written in
/// others, holes elsewhere.
fn first_disk(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v[..6 * MIB].copy_from_slice(&random_bytes(6 * MIB, 1));
    v[20 * MIB..22 * MIB].copy_from_slice(&random_bytes(2 * MIB, 2));
    v
}

/// `bytes` as a qcow2 image at `image` (zeros left unallocated).
fn qcow2_of(dir: &Path, bytes: &[u8], image: &Path) {
    let raw = dir.join("source.raw");
    std::fs::write(&raw, bytes).unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
    )
    .unwrap();
}

/// `qemu-img compare`: QEMU's own word that `image` holds `bytes`.
fn assert_qemu_sees(dir: &Path, image: &Path, bytes: &[u8], what: &str) {
    let raw = dir.join("expected.raw");
    std::fs::write(&raw, bytes).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&raw)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Guest writes through the export: (offset, bytes).
fn guest_writes(uri: &str, expected: &mut [u8], writes: &[(usize, Vec<u8>)]) {
    let disk = NbdDisk::open(uri, true).unwrap();
    for (at, bytes) in writes {
        disk.write_at(bytes, *at as u64).unwrap();
        expected[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    disk.sync().unwrap();
}

fn read_all(uri: &str) -> Vec<u8> {
    let disk = NbdDisk::open(uri, false).unwrap();
    let mut buf = vec![0u8; disk.len().unwrap() as usize];
    assert_eq!(disk.read_at(&mut buf, 0).unwrap(), buf.len());
    buf
}

#[test]
fn a_disk_on_nbd_is_captured_without_its_holes_and_restored_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let len = 32 * MIB;
    let v1 = first_disk(len);
    qcow2_of(dir.path(), &v1, &image);
    let Some(qsd) = start_qsd(dir.path(), &image, "writable=on") else {
        return;
    };
    let uri = qsd.guest_uri();
    let engine = EngineOptions::new().open_in(dir.path()).unwrap();
    let server = engine.add_server(ServerId(1), "vm-1", &uri).unwrap();
    assert_eq!(server.disk.to_str(), Some(uri.as_str()));

    let s1 = engine.create_snapshot(ServerId(1), "first", "").unwrap();
    let stats = s1.stats.unwrap();
    assert_eq!(stats.image_len, len as u64);
    assert_eq!(stats.data_bytes, 8 * MIB as u64);
    assert!(
        stats.bytes_read <= 8 * MIB as u64,
        "base:allocation holes were read: {} bytes",
        stats.bytes_read
    );

    // The guest writes: new data, overwrites, zeros over data.
    let mut v2 = v1.clone();
    guest_writes(
        &uri,
        &mut v2,
        &[
            (0, random_bytes(64 << 10, 3)),
            (5 * MIB + 4096, random_bytes(100_000, 4)),
            (28 * MIB, random_bytes(MIB, 5)),
            (20 * MIB, vec![0u8; 512 << 10]),
            (len - 4096, random_bytes(4096, 6)),
        ],
    );
    let s2 = engine.create_snapshot(ServerId(1), "second", "").unwrap();

    let report = engine.restore_snapshot(s1.id).unwrap();
    assert!(report.blocks_rewritten > 0);
    assert!(
        read_all(&uri) == v1,
        "restore of the first snapshot over NBD"
    );
    // The restore's safety snapshot holds what was there (v2), and the
    // second snapshot restores too.
    engine.restore_snapshot(s2.id).unwrap();
    assert!(
        read_all(&uri) == v2,
        "restore of the second snapshot over NBD"
    );
    assert!(engine.verify(None).unwrap().is_ok());
    drop(engine);
    qsd.stop().unwrap();
    assert_qemu_sees(dir.path(), &image, &v2, "after the restores");
}

#[test]
fn an_incremental_snapshot_reads_only_what_a_qemu_dirty_bitmap_marks() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let store = dir.path().join("store");
    let len = 64 * MIB;
    let mut v1 = vec![0u8; len];
    v1[..40 * MIB].copy_from_slice(&random_bytes(40 * MIB, 7));
    qcow2_of(dir.path(), &v1, &image);
    let img = image.to_str().unwrap();
    // A persistent bitmap: every write from now on is marked in it.
    run("qemu-img", &["bitmap", "--add", img, "cp1"]).unwrap();
    let Some(qsd) = start_qsd(dir.path(), &image, "writable=on") else {
        return;
    };
    let uri = qsd.guest_uri();
    let bs = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_blocksnap"))
            .arg("--store")
            .arg(&store)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    bs(&["init"]);
    bs(&[
        "server", "add", "--id", "1", "--name", "vm-1", "--nbd", &uri,
    ]);
    bs(&["snapshot", "create", "--server", "1", "--name", "full"]);
    // The guest writes 1.5% of the disk, then the bitmap is frozen and
    // exported with the disk (as libvirt's pull-mode backup does).
    let mut v2 = v1.clone();
    let writes: Vec<(usize, Vec<u8>)> = (0..12)
        .map(|i| (i * 5 * MIB + 12345, random_bytes(80 << 10, 100 + i as u64)))
        .collect();
    guest_writes(&uri, &mut v2, &writes);
    qsd.stop().unwrap();
    run("qemu-img", &["bitmap", "--disable", img, "cp1"]).unwrap();
    let Some(qsd) = start_qsd(dir.path(), &image, "writable=off,bitmaps.0=cp1") else {
        return;
    };
    let out = bs(&[
        "snapshot",
        "create",
        "--server",
        "1",
        "--name",
        "incremental",
        "--parent",
        "1",
        "--nbd-bitmap",
        "qemu:dirty-bitmap:cp1",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let stats = &v["capture"];
    assert_eq!(stats["kind"], "incremental", "{out}");
    let read = stats["bytes_read"].as_u64().unwrap();
    println!("the incremental read {read} bytes of {len}");
    // 12 writes of 80 KiB, each dirtying at most three 64 KiB clusters,
    // plus the clean-block sample.
    assert!(
        read >= 12 * (80 << 10) && read < len as u64 / 20,
        "the incremental read {read} bytes of {len}"
    );
    bs(&["verify"]);
    qsd.stop().unwrap();

    // Restore it over a disk the guest scribbled on, and ask QEMU.
    let Some(qsd) = start_qsd(dir.path(), &image, "writable=on") else {
        return;
    };
    let mut scribbled = v2.clone();
    guest_writes(
        &qsd.guest_uri(),
        &mut scribbled,
        &[(3 * MIB, random_bytes(2 * MIB, 99))],
    );
    bs(&["snapshot", "restore", "2", "--no-safety-snapshot"]);
    qsd.stop().unwrap();
    assert_qemu_sees(dir.path(), &image, &v2, "the incremental snapshot restored");
}

#[test]
fn wrong_nbd_uris_and_absent_servers_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineOptions::new().open_in(dir.path()).unwrap();
    let err = engine
        .add_server(ServerId(1), "vm", "nbd+unix:///x")
        .unwrap_err();
    assert!(err.to_string().contains("socket="), "{err}");
    let absent = format!(
        "nbd+unix:///x?socket={}",
        dir.path().join("nobody.sock").display()
    );
    engine.add_server(ServerId(1), "vm", &absent).unwrap();
    let err = engine.create_snapshot(ServerId(1), "s", "").unwrap_err();
    assert!(
        err.to_string().contains("cannot connect to the NBD server"),
        "{err}"
    );
    // Nothing was left in progress, and the failed capture counts nothing.
    let snaps = engine.snapshots(Some(ServerId(1))).unwrap();
    assert!(
        snaps
            .iter()
            .all(|s| s.status != blocksnap::SnapshotStatus::InProgress)
    );
}
