//! Live snapshots of a running QEMU disk, against the real
//! qemu-storage-daemon (`blocksnap::live::testbed`): a guest writer stamps
//! every block it writes with a sequence number while snapshots are taken;
//! each snapshot, restored, must equal the first disk plus exactly writes
//! 1..K for some K (a point in time). The second snapshot is incremental
//! from QEMU's checkpoint bitmap; nothing of blocksnap's stays in QEMU
//! afterwards, even after a SIGKILL of blocksnap mid-capture; a checkpoint
//! made inconsistent by a QEMU crash gives a full capture that says so.
//!
//! Needs qemu-storage-daemon and qemu-img; fails without them unless
//! `BLOCKSNAP_NO_QEMU=1` says the machine has no QEMU.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blocksnap::live::testbed::{Daemon, Guest, point_in_time, qcow2_image, read_export};
use blocksnap::{CaptureKind, EngineOptions, FullReason, RestoreMethod, RestoreOptions, ServerId};
use serde_json::Value;

use crate::common::OpenIn;
use crate::common::random_bytes;

const MIB: usize = 1 << 20;

/// The daemon on a qcow2 image of `first`, or `None` (said loudly) where
/// `BLOCKSNAP_NO_QEMU=1` says the machine has no QEMU.
fn vm(dir: &Path, first: &[u8]) -> Option<(Daemon, PathBuf)> {
    if !crate::common::qemu_here() {
        return None;
    }
    let image = dir.join("disk.qcow2");
    qcow2_image(first, &image).unwrap();
    Some((Daemon::start(dir, &image).unwrap(), image))
}

/// A store at `dir/store` with server 1 ("vm-1") on `vm`'s disk.
fn store_on(dir: &Path, vm: &Daemon) -> blocksnap::Engine {
    let engine = EngineOptions::new().open(dir.join("store")).unwrap();
    engine
        .add_server(ServerId(1), "vm-1", vm.qemu_uri())
        .unwrap();
    engine
}

fn first_disk(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v[..len / 2].copy_from_slice(&random_bytes(len / 2, 5));
    v
}

fn check(first: &[u8], writes: &[(u64, usize)], uri: &str, what: &str) -> u64 {
    point_in_time(first, writes, &read_export(uri).unwrap())
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn assert_nothing_left(vm: &Daemon) -> Vec<String> {
    let (things, bitmaps) = vm.leftovers().unwrap();
    assert!(things.is_empty(), "left in QEMU: {things:?}");
    bitmaps
}

/// Asserts the node holds exactly one bitmap: snapshot `id`'s checkpoint.
fn only_checkpoint_of(bitmaps: &[String], id: impl std::fmt::Display) {
    assert!(
        bitmaps.len() == 1
            && bitmaps[0].starts_with("blocksnap-")
            && bitmaps[0].ends_with(&format!("-cp-{id}")),
        "bitmaps on the node: {bitmaps:?}, not just snapshot {id}'s checkpoint"
    );
}

#[test]
fn live_snapshots_of_a_writing_guest_are_points_in_time_and_incremental() {
    let dir = tempfile::tempdir().unwrap();
    let len = 64 * MIB;
    let first = first_disk(len);
    let Some((vm, _)) = vm(dir.path(), &first) else {
        return;
    };
    let engine = store_on(dir.path(), &vm);

    let guest = Guest::start(&vm.guest_uri(), len, Duration::from_millis(3)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let s1 = engine.create_snapshot(ServerId(1), "one", "").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let s2 = engine.create_snapshot(ServerId(1), "two", "").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let log = guest.stop().expect("the guest's writes never failed");
    let writes = &log.writes;
    println!(
        "the guest made {} writes, largest gap {:?}",
        writes.len(),
        log.max_gap
    );

    let (st1, st2) = (s1.stats.unwrap(), s2.stats.unwrap());
    assert_eq!(st1.full_reason, Some(FullReason::NoCheckpoint));
    assert_eq!(st2.kind, CaptureKind::Incremental, "{st2:?}");
    assert_eq!(st2.parent, Some(s1.id));
    assert_eq!(st2.sample_mismatches, 0, "QEMU's bitmap missed writes");
    assert!(
        st2.bytes_read < len as u64 / 4,
        "the incremental read {} of {len} bytes",
        st2.bytes_read
    );
    println!(
        "freeze {} us and {} us; incremental read {} bytes; scratch {:?} and {:?} bytes",
        st1.freeze_micros.unwrap(),
        st2.freeze_micros.unwrap(),
        st2.bytes_read,
        st1.scratch_bytes,
        st2.scratch_bytes
    );
    // The guest overwrote some blocks while the full capture read.
    assert!(
        st1.scratch_bytes
            .is_some_and(|b| b > 0 && b < len as u64 / 2)
    );
    only_checkpoint_of(&assert_nothing_left(&vm), s2.id);

    // Each restores to a point in time; the second is later. Without a
    // safety snapshot, the restore knows the disk from snapshot two's
    // checkpoint (two plus the guest's writes since) and reads none of it.
    let bare = RestoreOptions::default().safety_snapshot(false);
    let plan = engine.plan_restore(s1.id, bare).unwrap();
    let report = engine.restore_snapshot_with(s1.id, bare).unwrap();
    for (method, compared) in [
        (plan.method, plan.bytes_compared),
        (report.method, report.bytes_compared),
    ] {
        assert_eq!((method, compared), (RestoreMethod::Delta, 0));
    }
    assert_eq!(report.blocks_rewritten, plan.blocks_to_rewrite);
    let k1 = check(&first, writes, &vm.guest_uri(), "snapshot one");
    let report = engine.restore_snapshot(s2.id).unwrap();
    assert!(report.safety_snapshot.is_some() && !report.vm_paused);
    let k2 = check(&first, writes, &vm.guest_uri(), "snapshot two");
    assert!(
        0 < k1 && k1 < k2 && k2 < writes.len() as u64,
        "K {k1}, {k2} of {}",
        writes.len()
    );
    // The restore's safety snapshot (a live capture too) held snapshot
    // one's bytes: undo brings them back.
    engine.undo_restore(ServerId(1)).unwrap();
    assert_eq!(check(&first, writes, &vm.guest_uri(), "undo"), k1);
    assert!(engine.verify(None).unwrap().is_ok());
    assert_eq!(assert_nothing_left(&vm).len(), 1);
    vm.stop().unwrap();
}

#[test]
fn a_checkpoint_left_inconsistent_by_a_qemu_crash_gives_a_full_capture() {
    let dir = tempfile::tempdir().unwrap();
    let Some((vm, image)) = vm(dir.path(), &first_disk(16 * MIB)) else {
        return;
    };
    let engine = store_on(dir.path(), &vm);
    engine.create_snapshot(ServerId(1), "one", "").unwrap();
    let two = engine.create_snapshot(ServerId(1), "two", "").unwrap();
    assert_eq!(two.stats.unwrap().kind, CaptureKind::Incremental);
    // A clean stop writes the checkpoint into the qcow2; QEMU marks it in
    // use when it opens the image again, and a crash leaves it so.
    vm.stop().unwrap();
    Daemon::start(dir.path(), &image).unwrap().crash();
    let vm = Daemon::start(dir.path(), &image).unwrap();
    // Nor does a restore trust it: it reads and compares the disk.
    let bare = RestoreOptions::default().safety_snapshot(false);
    let report = engine.restore_snapshot_with(two.id, bare).unwrap();
    assert_eq!(report.method, RestoreMethod::Compare);
    assert_eq!(
        (report.bytes_compared, report.blocks_rewritten),
        (16 << 20, 0)
    );
    let three = engine.create_snapshot(ServerId(1), "three", "").unwrap();
    assert_eq!(
        three.stats.unwrap().full_reason,
        Some(FullReason::CheckpointInconsistent)
    );
    let four = engine.create_snapshot(ServerId(1), "four", "").unwrap();
    assert_eq!(four.stats.unwrap().kind, CaptureKind::Incremental);
    only_checkpoint_of(&assert_nothing_left(&vm), four.id);
    vm.stop().unwrap();
}

#[test]
fn a_blocksnap_killed_mid_capture_leaves_the_guest_writing_and_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let len = 256 * MIB;
    let mut first = vec![0u8; len];
    first[..len - MIB].copy_from_slice(&random_bytes(len - MIB, 9));
    let Some((vm, _)) = vm(dir.path(), &first) else {
        return;
    };
    let store = dir.path().join("store");
    let bs = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_blocksnap"));
        c.arg("--store")
            .arg(&store)
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::piped());
        c
    };
    assert!(bs(&["init"]).status().unwrap().success());
    let add = bs(&["server", "add", "--id", "1", "--name", "vm", "--qemu"])
        .arg(vm.dir().join("qmp-blocksnap.sock"))
        .args(["--node", "disk0", "--nbd-socket"])
        .arg(vm.dir().join("guest.sock"))
        .output()
        .unwrap();
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );

    let guest = Guest::start(&vm.guest_uri(), len, Duration::from_millis(2)).unwrap();
    let mut child = bs(&["snapshot", "create", "--server", "1", "--name", "doomed"])
        .spawn()
        .unwrap();
    // Killed once the frozen view is exported and being read.
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.leftovers().unwrap().0.is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the capture ended before it could be killed"
        );
        assert!(Instant::now() < deadline, "the capture never froze");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    child.kill().unwrap();
    assert!(child.wait().unwrap().code().is_none(), "killed by a signal");
    assert!(
        !vm.leftovers().unwrap().0.is_empty(),
        "the kill landed after the teardown"
    );
    // The guest goes on writing meanwhile, without an error.
    std::thread::sleep(Duration::from_millis(300));
    let log = guest.stop().expect("the guest's writes never failed");
    assert!(!log.writes.is_empty());

    // The next command cleans up, and its own capture works.
    let out = bs(&[
        "snapshot", "create", "--server", "1", "--name", "next", "--json",
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["capture"]["kind"], "full");
    assert!(v["capture"]["freeze_ms"].as_f64().is_some());
    only_checkpoint_of(&assert_nothing_left(&vm), &v["id"]);
    // Only the empty scratch image kept as a template for the disk's size.
    let live: Vec<_> = std::fs::read_dir(store.join("live/1"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n != &format!("template-{len}.qcow2"))
        .collect();
    assert!(live.is_empty(), "left in the store's live/1/: {live:?}");
    vm.stop().unwrap();
}

/// Two stores on one QEMU disk (or a store made again at the same path,
/// whose snapshot ids start over): neither takes the other's checkpoint
/// for its own, nor removes it.
#[test]
fn two_stores_on_one_qemu_disk_keep_their_own_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let len = 16 * MIB;
    let first = first_disk(len);
    let Some((vm, _)) = vm(dir.path(), &first) else {
        return;
    };
    let a = EngineOptions::new().open(dir.path().join("a")).unwrap();
    let b = EngineOptions::new().open(dir.path().join("b")).unwrap();
    for e in [&a, &b] {
        e.add_server(ServerId(1), "vm-1", vm.qemu_uri()).unwrap();
    }
    a.create_snapshot(ServerId(1), "a1", "").unwrap();
    // B's snapshot 1 has A's id: it must not be taken as a checkpoint.
    let b1 = b.create_snapshot(ServerId(1), "b1", "").unwrap();
    assert_eq!(
        b1.stats.unwrap().full_reason,
        Some(FullReason::NoCheckpoint)
    );
    let guest = Guest::start(&vm.guest_uri(), len, Duration::from_millis(1)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let log = guest.stop().unwrap();
    let a2 = a.create_snapshot(ServerId(1), "a2", "").unwrap();
    let b2 = b.create_snapshot(ServerId(1), "b2", "").unwrap();
    for (e, s) in [(&a, &a2), (&b, &b2)] {
        let st = s.stats.unwrap();
        assert_eq!(st.kind, CaptureKind::Incremental, "{st:?}");
        assert_eq!(st.sample_mismatches, 0);
        e.restore_snapshot_with(s.id, RestoreOptions::default().safety_snapshot(false))
            .unwrap();
        let k = check(
            &first,
            &log.writes,
            &vm.guest_uri(),
            "after both stores' snapshots",
        );
        assert_eq!(k, log.writes.len() as u64);
    }
    let (_, bitmaps) = vm.leftovers().unwrap();
    assert_eq!(bitmaps.len(), 2, "one checkpoint per store: {bitmaps:?}");
    vm.stop().unwrap();
}

/// The scratch space fills up while the guest writes during a capture.
#[test]
fn a_full_scratch_space_fails_the_snapshot_never_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let len = 64 * MIB;
    let first = first_disk(len);
    let Some((vm, _)) = vm(dir.path(), &first) else {
        return;
    };
    let store = dir.path().join("store");
    let engine = EngineOptions::new().open(&store).unwrap();
    engine
        .add_server(ServerId(1), "vm-1", vm.qemu_uri())
        .unwrap();
    let live = store.join("live");
    std::fs::create_dir_all(&live).unwrap();
    crate::common::run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=1M",
            "tmpfs",
            live.to_str().unwrap(),
        ],
    )
    .unwrap();
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = crate::common::run("umount", &[self.0.to_str().unwrap()]);
        }
    }
    let _umount = Umount(live.clone());
    let guest = Guest::start(&vm.guest_uri(), len, Duration::from_micros(200)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let err = engine
        .create_snapshot(ServerId(1), "squeezed", "")
        .unwrap_err();
    assert!(err.to_string().contains("scratch space"), "{err}");
    std::thread::sleep(Duration::from_millis(100));
    let log = guest.stop().expect("the guest's writes never failed");
    assert!(!log.writes.is_empty());
    let failed = engine.snapshots(Some(ServerId(1))).unwrap();
    assert_eq!(failed[0].status, blocksnap::SnapshotStatus::Failed);
    assert_nothing_left(&vm);
    drop(_umount);
    // With room, the next one works.
    let ok = engine.create_snapshot(ServerId(1), "roomy", "").unwrap();
    assert_eq!(ok.status, blocksnap::SnapshotStatus::Completed);
    vm.stop().unwrap();
}

/// `blocksnap serve` on a store with a QEMU server: the API's create takes
/// a live snapshot, its restore writes through QEMU, and nothing stays.
#[test]
fn the_api_takes_live_snapshots_of_a_qemu_server() {
    use blocksnap::http::{Tokens, start};
    const TOKEN: &str = "live-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let len = 16 * MIB;
    let first = first_disk(len);
    let Some((vm, _)) = vm(dir.path(), &first) else {
        return;
    };
    let engine = EngineOptions::new().open_in(dir.path()).unwrap();
    engine
        .add_server(ServerId(7), "vm-7", vm.qemu_uri())
        .unwrap();
    let running = start(
        engine,
        "127.0.0.1:0".parse().unwrap(),
        Tokens::new([TOKEN]).unwrap(),
    )
    .unwrap();
    let base = format!("http://{}", running.addr());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let auth = format!("Bearer {TOKEN}");
    let post = |path: &str, body: Value| {
        let mut r = agent
            .post(&format!("{base}{path}"))
            .header("Authorization", &auth)
            .send_json(body)
            .unwrap();
        (
            r.status().as_u16(),
            r.body_mut().read_json::<Value>().unwrap_or(Value::Null),
        )
    };
    let (status, created) = post(
        "/api/v1/snapshots/",
        serde_json::json!({"server_id": 7, "name": "live-api"}),
    );
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut r = agent
            .get(&format!("{base}/api/v1/snapshots/?server_id=7"))
            .header("Authorization", &auth)
            .call()
            .unwrap();
        let list: Value = r.body_mut().read_json().unwrap();
        if list["results"][0]["status"] == "completed" {
            break;
        }
        assert_ne!(list["results"][0]["status"], "failed", "{list}");
        assert!(Instant::now() < deadline, "{list}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The guest scribbles; the API's restore brings the snapshot back.
    let guest = Guest::start(&vm.guest_uri(), len, Duration::from_millis(1)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!guest.stop().unwrap().writes.is_empty());
    let (status, body) = post(
        &format!("/api/v1/snapshots/{id}/restore"),
        serde_json::json!({}),
    );
    assert_eq!(status, 200, "{body}");
    // The restore runs on (the server shows `restoring`): done when the
    // disk is the snapshot again and its export is gone.
    let deadline = Instant::now() + Duration::from_secs(60);
    while read_export(&vm.guest_uri()).unwrap() != first || !vm.leftovers().unwrap().0.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the API's restore never finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    running.shutdown().unwrap();
    vm.stop().unwrap();
}

/// A checkpoint someone disabled (it stops recording writes) is never
/// trusted: the next snapshot is full and says why.
#[test]
fn a_disabled_checkpoint_gives_a_full_capture() {
    let dir = tempfile::tempdir().unwrap();
    let Some((vm, _)) = vm(dir.path(), &first_disk(16 * MIB)) else {
        return;
    };
    let engine = store_on(dir.path(), &vm);
    engine.create_snapshot(ServerId(1), "one", "").unwrap();
    let (_, bitmaps) = vm.leftovers().unwrap();
    vm.qmp(&[(
        "block-dirty-bitmap-disable",
        serde_json::json!({"node": "disk0", "name": bitmaps[0]}),
    )])
    .unwrap();
    let two = engine.create_snapshot(ServerId(1), "two", "").unwrap();
    assert_eq!(
        two.stats.unwrap().full_reason,
        Some(FullReason::CheckpointNotRecording)
    );
    let three = engine.create_snapshot(ServerId(1), "three", "").unwrap();
    assert_eq!(three.stats.unwrap().kind, CaptureKind::Incremental);
    vm.stop().unwrap();
}

/// A real VM (QEMU's q35 machine, software-emulated, without an OS):
/// live snapshots while a writer writes its disk, and restores that pause
/// it first, leave it paused and say so. A disk whose device does not
/// share write access (QEMU's default) is captured live the same, but its
/// restore is refused before anything is paused or written.
#[test]
fn a_running_vm_is_captured_live_and_paused_for_a_restore() {
    if !crate::common::vm_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let len = 16 * MIB;
    let first = first_disk(len);
    let image = dir.path().join("disk.qcow2");
    qcow2_image(&first, &image).unwrap();
    let vm = Daemon::start_vm(dir.path(), &image, true).unwrap();
    let engine = store_on(dir.path(), &vm);
    assert!(vm.running().unwrap());

    let guest = Guest::start(&vm.guest_uri(), len, Duration::from_millis(2)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let s1 = engine.create_snapshot(ServerId(1), "one", "").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let s2 = engine.create_snapshot(ServerId(1), "two", "").unwrap();
    let log = guest.stop().expect("the writer's writes never failed");
    let st2 = s2.stats.unwrap();
    assert_eq!(st2.kind, CaptureKind::Incremental, "{st2:?}");
    assert_eq!(st2.sample_mismatches, 0);
    assert!(vm.running().unwrap(), "a capture does not pause the VM");

    let report = engine.restore_snapshot(s1.id).unwrap();
    assert!(report.vm_paused, "the restore says it paused the VM");
    assert!(!vm.running().unwrap(), "and leaves it paused");
    let k1 = check(&first, &log.writes, &vm.guest_uri(), "snapshot one");
    assert!(0 < k1 && k1 < log.writes.len() as u64);
    // Already paused, the VM is not paused again, and the undo is exact.
    let undo = engine.undo_restore(ServerId(1)).unwrap();
    assert!(!undo.vm_paused);
    let all = check(&first, &log.writes, &vm.guest_uri(), "undo");
    assert_eq!(all, log.writes.len() as u64);
    assert_eq!(assert_nothing_left(&vm).len(), 1);
    vm.qmp(&[("cont", serde_json::json!({}))]).unwrap();
    assert!(vm.running().unwrap());
    vm.stop().unwrap();

    // The device's default: nothing else may write its disk.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    qcow2_image(&first, &image).unwrap();
    let vm = Daemon::start_vm(dir.path(), &image, false).unwrap();
    let engine = store_on(dir.path(), &vm);
    let s = engine.create_snapshot(ServerId(1), "one", "").unwrap();
    let err = engine.restore_snapshot(s.id).unwrap_err();
    assert!(
        matches!(err, blocksnap::Error::WrongState(_)) && err.to_string().contains("share-rw"),
        "{err}"
    );
    assert!(vm.running().unwrap(), "a refused restore pauses nothing");
    let kept = engine.snapshots(Some(ServerId(1))).unwrap();
    assert_eq!(kept.len(), 1, "and takes no safety snapshot: {kept:?}");
    only_checkpoint_of(&assert_nothing_left(&vm), s.id);
    vm.stop().unwrap();
}
