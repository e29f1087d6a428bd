//! Live snapshots of a running QEMU disk, against the real
//! qemu-storage-daemon: a guest writer stamps every block it writes with a
//! sequence number while snapshots are taken; each snapshot, restored,
//! must equal the first disk plus exactly writes 1..K for some K (a point
//! in time). The second snapshot is incremental from QEMU's checkpoint
//! bitmap; nothing of blocksnap's stays in QEMU afterwards, even after a
//! SIGKILL of blocksnap mid-capture; a checkpoint made inconsistent by a
//! QEMU crash gives a full capture that says so.
//!
//! Needs qemu-storage-daemon and qemu-img; fails without them unless
//! `BLOCKSNAP_NO_QEMU=1` says the machine has no QEMU.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blocksnap::disk::Disk;
use blocksnap::nbd::NbdDisk;
use blocksnap::{EngineOptions, FullReason, RestoreOptions, ServerId};
use serde_json::{Value, json};

use crate::common::{random_bytes, run};

const MIB: usize = 1 << 20;
const STAMP: usize = 4096;

/// A qemu-storage-daemon playing a running VM: disk node `disk0`, a guest
/// NBD export `guest` (so an NBD server runs), a monitor for blocksnap and
/// one for the test.
struct Vm {
    child: Child,
    dir: PathBuf,
}

impl Vm {
    fn start(dir: &Path, image: &Path) -> Option<Vm> {
        if let Err(why) = run("qemu-storage-daemon", &["--version"]) {
            if std::env::var("BLOCKSNAP_NO_QEMU").is_ok_and(|v| v == "1") {
                eprintln!(
                    "\n!!! NOT RUN: no qemu-storage-daemon ({why}), as BLOCKSNAP_NO_QEMU=1 says\n"
                );
                return None;
            }
            panic!("this test needs qemu-storage-daemon ({why}): apt-get install qemu-utils");
        }
        for s in ["guest.sock", "qmp-bs.sock", "qmp-test.sock"] {
            let _ = std::fs::remove_file(dir.join(s));
        }
        let p = |s: &str| dir.join(s).display().to_string();
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk0-file,filename={}",
                image.display()
            ))
            .args(["--blockdev", "driver=qcow2,node-name=disk0,file=disk0-file"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", p("guest.sock")))
            .args([
                "--export",
                "type=nbd,id=guest,node-name=disk0,name=guest,writable=on",
            ])
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=bs",
                p("qmp-bs.sock")
            ))
            .args(["--monitor", "chardev=bs"])
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=t",
                p("qmp-test.sock")
            ))
            .args(["--monitor", "chardev=t"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-storage-daemon starts");
        let vm = Vm {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(dir.join("guest.sock")).is_err()
            || !dir.join("qmp-test.sock").exists()
        {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(vm)
    }

    fn guest_uri(&self) -> String {
        format!(
            "nbd+unix:///guest?socket={}",
            self.dir.join("guest.sock").display()
        )
    }

    fn qemu_uri(&self) -> String {
        format!(
            "qemu:///disk0?qmp={}&nbd={}",
            self.dir.join("qmp-bs.sock").display(),
            self.dir.join("guest.sock").display()
        )
    }

    /// Runs QMP commands on the test's own monitor.
    fn qmp(&self, commands: &[(&str, Value)]) -> Vec<Value> {
        let s = UnixStream::connect(self.dir.join("qmp-test.sock")).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let mut next = |r: &mut BufReader<UnixStream>| loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        };
        next(&mut r); // greeting
        let mut out = Vec::new();
        for (cmd, args) in [("qmp_capabilities", json!({}))].iter().chain(commands) {
            writeln!(w, "{}", json!({"execute": cmd, "arguments": args})).unwrap();
            let v = next(&mut r);
            assert!(v.get("return").is_some(), "{cmd}: {v}");
            out.push(v["return"].clone());
        }
        out.remove(0);
        out
    }

    /// Everything of blocksnap's in the process: exports, jobs, nodes and
    /// bitmaps named blocksnap-...
    fn leftovers(&self) -> (Vec<String>, Vec<String>) {
        let r = self.qmp(&[
            ("query-block-exports", json!({})),
            ("query-block-jobs", json!({})),
            ("query-named-block-nodes", json!({"flat": true})),
        ]);
        let mut things = Vec::new();
        let mut bitmaps = Vec::new();
        for e in r[0].as_array().unwrap() {
            things.push(format!("export {}", e["id"]));
        }
        for j in r[1].as_array().unwrap() {
            things.push(format!("job {}", j["device"]));
        }
        for n in r[2].as_array().unwrap() {
            let name = n["node-name"].as_str().unwrap_or("");
            if name.starts_with("blocksnap") {
                things.push(format!("node {name}"));
            }
            // Named bitmaps (a backup job's own are anonymous).
            for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
                if let Some(name) = b["name"].as_str() {
                    bitmaps.push(name.to_string());
                }
            }
        }
        things.retain(|t| t != "export \"guest\"");
        (things, bitmaps)
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert!(self.child.wait().unwrap().success());
    }

    fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qcow2_of(dir: &Path, bytes: &[u8]) -> PathBuf {
    let raw = dir.join("first.raw");
    let image = dir.join("disk.qcow2");
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
    std::fs::remove_file(raw).unwrap();
    image
}

/// The guest: writes stamped blocks (sequence number, offset) at random
/// places through the guest export until told to stop; the log of its
/// writes in order.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(u64, usize)>>,
}

fn stamp(seq: u64, at: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(STAMP);
    while b.len() < STAMP {
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&(at as u64).to_le_bytes());
    }
    b
}

impl Writer {
    fn start(uri: String, len: usize) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let disk = NbdDisk::open(&uri, true).unwrap();
            let mut rng = blocksnap::sample::Rng::new(42);
            let mut log = Vec::new();
            let mut seq = 0;
            while !flag.load(Ordering::Relaxed) {
                seq += 1;
                let at = (rng.next_u64() as usize % (len / STAMP)) * STAMP;
                disk.write_at(&stamp(seq, at), at as u64)
                    .unwrap_or_else(|e| panic!("the guest's write {seq} failed: {e}"));
                log.push((seq, at));
                std::thread::sleep(Duration::from_millis(3));
            }
            log
        });
        Writer { stop, thread }
    }

    fn stop(self) -> Vec<(u64, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the guest writer never failed")
    }
}

/// Asserts `got` is `first` plus exactly writes 1..K for some K; returns K.
fn point_in_time(first: &[u8], log: &[(u64, usize)], got: &[u8], what: &str) -> u64 {
    let mut k = 0;
    for (seq, at) in log {
        if got[*at..*at + STAMP] == stamp(*seq, *at)[..] {
            k = k.max(*seq);
        }
    }
    let mut expected = first.to_vec();
    for (seq, at) in log.iter().take_while(|(s, _)| *s <= k) {
        expected[*at..*at + STAMP].copy_from_slice(&stamp(*seq, *at));
    }
    assert!(
        got == expected,
        "{what}: not the disk at any one point in time (K = {k})"
    );
    k
}

fn read_disk(uri: &str) -> Vec<u8> {
    let disk = NbdDisk::open(uri, false).unwrap();
    let mut buf = vec![0u8; disk.len().unwrap() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

fn first_disk(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v[..len / 2].copy_from_slice(&random_bytes(len / 2, 5));
    v
}

#[test]
fn live_snapshots_of_a_writing_guest_are_points_in_time_and_incremental() {
    let dir = tempfile::tempdir().unwrap();
    let len = 64 * MIB;
    let first = first_disk(len);
    let image = qcow2_of(dir.path(), &first);
    let Some(vm) = Vm::start(dir.path(), &image) else {
        return;
    };
    let engine = EngineOptions::new().open(dir.path().join("store")).unwrap();
    engine
        .add_server(ServerId(1), "vm-1", vm.qemu_uri())
        .unwrap();

    let writer = Writer::start(vm.guest_uri(), len);
    std::thread::sleep(Duration::from_millis(200));
    let s1 = engine.create_snapshot(ServerId(1), "one", "").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let s2 = engine.create_snapshot(ServerId(1), "two", "").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let log = writer.stop();
    println!("the guest made {} writes", log.len());

    let st1 = s1.stats.unwrap();
    let st2 = s2.stats.unwrap();
    assert_eq!(st1.full_reason, Some(FullReason::NoCheckpoint));
    assert_eq!(st2.kind, blocksnap::CaptureKind::Incremental, "{st2:?}");
    assert_eq!(st2.parent, Some(s1.id));
    assert_eq!(st2.sample_mismatches, 0, "QEMU's bitmap missed writes");
    assert!(
        st2.bytes_read < len as u64 / 4,
        "the incremental read {} of {len} bytes",
        st2.bytes_read
    );
    println!(
        "freeze {} us and {} us; incremental read {} bytes",
        st1.freeze_micros.unwrap(),
        st2.freeze_micros.unwrap(),
        st2.bytes_read
    );
    let (things, bitmaps) = vm.leftovers();
    assert!(things.is_empty(), "left in QEMU: {things:?}");
    assert_eq!(bitmaps, vec![format!("blocksnap-cp-{}", s2.id)]);

    // Each restores to a point in time; the second is later.
    let bare = RestoreOptions::default().safety_snapshot(false);
    engine.restore_snapshot_with(s1.id, bare).unwrap();
    let k1 = point_in_time(&first, &log, &read_disk(&vm.guest_uri()), "snapshot one");
    engine.restore_snapshot(s2.id).unwrap();
    let k2 = point_in_time(&first, &log, &read_disk(&vm.guest_uri()), "snapshot two");
    assert!(
        0 < k1 && k1 < k2 && k2 < log.len() as u64,
        "K {k1}, {k2} of {}",
        log.len()
    );
    // The restore's safety snapshot (a live capture too) held snapshot
    // one's bytes: undo brings them back.
    engine.undo_restore(ServerId(1)).unwrap();
    assert_eq!(
        point_in_time(&first, &log, &read_disk(&vm.guest_uri()), "undo"),
        k1
    );
    assert!(engine.verify(None).unwrap().is_ok());
    let (things, bitmaps) = vm.leftovers();
    assert!(things.is_empty(), "left in QEMU: {things:?}");
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    vm.stop();
}

#[test]
fn a_checkpoint_left_inconsistent_by_a_qemu_crash_gives_a_full_capture() {
    let dir = tempfile::tempdir().unwrap();
    let len = 16 * MIB;
    let image = qcow2_of(dir.path(), &first_disk(len));
    let Some(vm) = Vm::start(dir.path(), &image) else {
        return;
    };
    let engine = EngineOptions::new().open(dir.path().join("store")).unwrap();
    engine
        .add_server(ServerId(1), "vm-1", vm.qemu_uri())
        .unwrap();
    engine.create_snapshot(ServerId(1), "one", "").unwrap();
    let two = engine.create_snapshot(ServerId(1), "two", "").unwrap();
    assert_eq!(two.stats.unwrap().kind, blocksnap::CaptureKind::Incremental);
    // A clean stop writes the checkpoint into the qcow2; QEMU marks it in
    // use when it opens the image again, and a crash leaves it so.
    vm.stop();
    let vm = Vm::start(dir.path(), &image).unwrap();
    vm.crash();
    let Some(vm) = Vm::start(dir.path(), &image) else {
        return;
    };
    let three = engine.create_snapshot(ServerId(1), "three", "").unwrap();
    assert_eq!(
        three.stats.unwrap().full_reason,
        Some(FullReason::CheckpointInconsistent)
    );
    let four = engine.create_snapshot(ServerId(1), "four", "").unwrap();
    assert_eq!(
        four.stats.unwrap().kind,
        blocksnap::CaptureKind::Incremental
    );
    let (things, bitmaps) = vm.leftovers();
    assert!(things.is_empty(), "{things:?}");
    assert_eq!(bitmaps, vec![format!("blocksnap-cp-{}", four.id)]);
    vm.stop();
}

#[test]
fn a_blocksnap_killed_mid_capture_leaves_the_guest_writing_and_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let len = 256 * MIB;
    let mut first = vec![0u8; len];
    first[..len - MIB].copy_from_slice(&random_bytes(len - MIB, 9));
    let image = qcow2_of(dir.path(), &first);
    let Some(vm) = Vm::start(dir.path(), &image) else {
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
    let uri = vm.qemu_uri();
    assert!(bs(&["init"]).status().unwrap().success());
    let (qmp, nbd) = (
        dir.path().join("qmp-bs.sock"),
        dir.path().join("guest.sock"),
    );
    let add = bs(&["server", "add", "--id", "1", "--name", "vm", "--qemu"])
        .arg(&qmp)
        .args(["--node", "disk0", "--nbd-socket"])
        .arg(&nbd)
        .output()
        .unwrap();
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    assert!(String::from_utf8_lossy(&add.stdout).contains(&uri) || !uri.is_empty());

    let writer = Writer::start(vm.guest_uri(), len);
    let mut child = bs(&["snapshot", "create", "--server", "1", "--name", "doomed"])
        .spawn()
        .unwrap();
    // Killed once the frozen view is being read.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let live = store.join("live");
        let scratch = std::fs::read_dir(&live)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("scratch-"));
        let exported = !vm.leftovers().0.is_empty();
        if scratch && exported {
            break;
        }
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
    let (things, _) = vm.leftovers();
    assert!(
        !things.is_empty(),
        "the kill landed before anything was set up"
    );
    // The guest goes on writing meanwhile, without an error.
    std::thread::sleep(Duration::from_millis(300));
    let log = writer.stop();
    assert!(!log.is_empty());

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
    let (things, bitmaps) = vm.leftovers();
    assert!(things.is_empty(), "left in QEMU: {things:?}");
    assert_eq!(bitmaps, vec![format!("blocksnap-cp-{}", v["id"])]);
    let live: Vec<_> = std::fs::read_dir(store.join("live"))
        .unwrap()
        .flatten()
        .collect();
    assert!(live.is_empty(), "left in the store's live/: {live:?}");
    vm.stop();
}
