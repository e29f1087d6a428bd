//! A running "VM" for the demo and the tests of live snapshots: a
//! qemu-storage-daemon serving a qcow2 image (block node `disk0`, a guest
//! NBD export `guest`, a QMP monitor for blocksnap and one for the caller),
//! and a guest that stamps every block it writes with a sequence number,
//! so that a snapshot can be checked to be the disk at one point in time.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::nbd::NbdDisk;

/// Bytes of one stamped guest write.
pub const STAMP_LEN: usize = 4096;

/// A qemu-storage-daemon playing a running VM; killed when dropped.
pub struct Daemon {
    child: Child,
    dir: PathBuf,
}

/// True when qemu-storage-daemon and qemu-img can run here.
pub fn qemu_available() -> std::result::Result<(), String> {
    tools_available(&["qemu-storage-daemon", "qemu-img"])
}

/// True when a VM can run here too (`qemu-system-x86_64`).
pub fn vm_available() -> std::result::Result<(), String> {
    tools_available(&["qemu-system-x86_64", "qemu-img"])
}

fn tools_available(tools: &[&str]) -> std::result::Result<(), String> {
    for &tool in tools {
        match Command::new(tool).arg("--version").output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => return Err(format!("{tool} --version failed: {}", o.status)),
            Err(e) => {
                return Err(format!(
                    "{tool}: {e} (apt-get install qemu-utils qemu-system-x86)"
                ));
            }
        }
    }
    Ok(())
}

/// Writes `bytes` as the qcow2 image `image` (zeros left unallocated).
pub fn qcow2_image(bytes: &[u8], image: &Path) -> Result<()> {
    let raw = image.with_extension("raw");
    std::fs::write(&raw, bytes).map_err(|e| Error::io(&raw, e))?;
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(image)
        .output()
        .map_err(|e| Error::io("qemu-img", e))?;
    let _ = std::fs::remove_file(&raw);
    if !out.status.success() {
        return Err(Error::io(
            image,
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(())
}

/// The arguments of the two QMP monitors (blocksnap's, the caller's),
/// on sockets in `dir`, as a VM or qemu-storage-daemon takes them.
fn monitors(dir: &Path, vm: bool) -> Vec<String> {
    let (chardev, monitor, mode) = if vm {
        ("-chardev", "-mon", ",mode=control")
    } else {
        ("--chardev", "--monitor", "")
    };
    let mut args = Vec::new();
    for (id, socket) in [("bs", "qmp-blocksnap.sock"), ("t", "qmp-test.sock")] {
        args.push(chardev.to_string());
        args.push(format!(
            "socket,path={},server=on,wait=off,id={id}",
            dir.join(socket).display()
        ));
        args.push(monitor.to_string());
        args.push(format!("chardev={id}{mode}"));
    }
    args
}

impl Daemon {
    /// Starts one on `image`, its sockets in `dir`; the guest's export is
    /// writable.
    pub fn start(dir: &Path, image: &Path) -> Result<Daemon> {
        Self::start_with(dir, image, "writable=on")
    }

    /// [`Daemon::start`] with the guest export's options (`writable=off`,
    /// `bitmaps.0=NAME`...).
    pub fn start_with(dir: &Path, image: &Path, export: &str) -> Result<Daemon> {
        for s in ["guest.sock", "qmp-blocksnap.sock", "qmp-test.sock"] {
            let _ = std::fs::remove_file(dir.join(s));
        }
        let p = |s: &str| dir.join(s).display().to_string();
        let mut command = Command::new("qemu-storage-daemon");
        command
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk0-file,filename={}",
                image.display()
            ))
            .args(["--blockdev", "driver=qcow2,node-name=disk0,file=disk0-file"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", p("guest.sock")))
            .arg("--export")
            .arg(format!(
                "type=nbd,id=guest,node-name=disk0,name=guest,{export}"
            ))
            .args(monitors(dir, false));
        Self::spawn(command, dir, "guest.sock")
    }

    /// Starts `command` (whose monitors are in `dir`); ready once `ready`
    /// in `dir` and the test monitor accept connections.
    fn spawn(mut command: Command, dir: &Path, ready: &str) -> Result<Daemon> {
        let program = command.get_program().to_string_lossy().to_string();
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::io(&program, e))?;
        let daemon = Daemon {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(dir.join(ready)).is_err()
            || UnixStream::connect(dir.join("qmp-test.sock")).is_err()
        {
            if Instant::now() > deadline {
                return Err(Error::Internal(format!("{program} did not start in 20 s")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    /// A real VM instead (qemu-system-x86_64, software-emulated, no OS:
    /// its firmware finds nothing to boot and idles) with the image as a
    /// virtio disk, node `disk0`, the same monitors, and, when the device
    /// shares write access (`share_rw`), the same writable `guest` export
    /// on an NBD server started through the monitor. Without `share_rw`,
    /// QEMU lets nothing but the VM write the disk, so there is no export.
    pub fn start_vm(dir: &Path, image: &Path, share_rw: bool) -> Result<Daemon> {
        for s in ["guest.sock", "qmp-blocksnap.sock", "qmp-test.sock"] {
            let _ = std::fs::remove_file(dir.join(s));
        }
        let p = |s: &str| dir.join(s).display().to_string();
        let share = if share_rw { "on" } else { "off" };
        let mut command = Command::new("qemu-system-x86_64");
        command
            .args([
                "-machine",
                "q35,accel=tcg",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-m", "64"])
            .arg("-blockdev")
            .arg(format!(
                "driver=file,node-name=disk0-file,filename={}",
                image.display()
            ))
            .args(["-blockdev", "driver=qcow2,node-name=disk0,file=disk0-file"])
            .arg("-device")
            .arg(format!("virtio-blk-pci,drive=disk0,share-rw={share}"))
            .args(monitors(dir, true));
        let vm = Self::spawn(command, dir, "qmp-blocksnap.sock")?;
        let mut commands = vec![(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": p("guest.sock")}}}),
        )];
        if share_rw {
            commands.push((
                "block-export-add",
                json!({"type": "nbd", "id": "guest", "node-name": "disk0",
                       "name": "guest", "writable": true}),
            ));
        }
        vm.qmp(&commands)?;
        Ok(vm)
    }

    /// True while the VM runs (QMP `query-status`).
    pub fn running(&self) -> Result<bool> {
        let r = self.qmp(&[("query-status", json!({}))])?;
        Ok(r[0]["running"].as_bool() == Some(true))
    }

    /// The guest's export.
    pub fn guest_uri(&self) -> String {
        format!(
            "nbd+unix:///guest?socket={}",
            self.dir.join("guest.sock").display()
        )
    }

    /// The disk as a server's disk for blocksnap.
    pub fn qemu_uri(&self) -> String {
        format!(
            "qemu:///disk0?qmp={}&nbd={}",
            self.dir.join("qmp-blocksnap.sock").display(),
            self.dir.join("guest.sock").display()
        )
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs QMP commands on the caller's own monitor; their results.
    pub fn qmp(&self, commands: &[(&str, Value)]) -> Result<Vec<Value>> {
        let bad = |what: String| Error::Qmp {
            peer: "test monitor".into(),
            what,
        };
        let s =
            UnixStream::connect(self.dir.join("qmp-test.sock")).map_err(|e| bad(e.to_string()))?;
        let mut w = s.try_clone().map_err(|e| bad(e.to_string()))?;
        let mut r = BufReader::new(s);
        let mut next = || -> Result<Value> {
            loop {
                let mut line = String::new();
                r.read_line(&mut line).map_err(|e| bad(e.to_string()))?;
                let v: Value = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
                if v.get("event").is_none() {
                    return Ok(v);
                }
            }
        };
        next()?; // greeting
        let mut out = Vec::new();
        for (cmd, args) in [("qmp_capabilities", json!({}))].iter().chain(commands) {
            writeln!(w, "{}", json!({"execute": cmd, "arguments": args}))
                .map_err(|e| bad(e.to_string()))?;
            let v = next()?;
            let r = v.get("return").ok_or_else(|| bad(format!("{cmd}: {v}")))?;
            out.push(r.clone());
        }
        out.remove(0);
        Ok(out)
    }

    /// What of blocksnap's is in the process: exports (other than the
    /// guest's), jobs and nodes; and the named bitmaps of every node.
    pub fn leftovers(&self) -> Result<(Vec<String>, Vec<String>)> {
        let r = self.qmp(&[
            ("query-block-exports", json!({})),
            ("query-block-jobs", json!({})),
            ("query-named-block-nodes", json!({"flat": true})),
        ])?;
        let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
        let mut things = Vec::new();
        for e in list(&r[0]) {
            if e["id"] != "guest" {
                things.push(format!("export {}", e["id"]));
            }
        }
        for j in list(&r[1]) {
            things.push(format!("job {}", j["device"]));
        }
        let mut bitmaps = Vec::new();
        for n in list(&r[2]) {
            let name = n["node-name"].as_str().unwrap_or("");
            if name.starts_with("blocksnap") {
                things.push(format!("node {name}"));
            }
            // Named bitmaps (a backup job's own are anonymous).
            for b in list(&n["dirty-bitmaps"]) {
                if let Some(name) = b["name"].as_str() {
                    bitmaps.push(name.to_string());
                }
            }
        }
        Ok((things, bitmaps))
    }

    /// Stops it cleanly (SIGTERM): persistent bitmaps are saved.
    pub fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self
            .child
            .wait()
            .map_err(|e| Error::io("qemu-storage-daemon", e))?;
        if !status.success() {
            return Err(Error::Internal(format!(
                "qemu-storage-daemon exited with {status}"
            )));
        }
        Ok(())
    }

    /// Kills it (SIGKILL): QEMU's crash.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bytes of guest write `seq` at `at`: (seq, at) repeated.
pub fn stamp(seq: u64, at: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(STAMP_LEN);
    while b.len() < STAMP_LEN {
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&(at as u64).to_le_bytes());
    }
    b
}

/// A guest writing stamped blocks at random places, one at a time.
pub struct Guest {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<GuestLog>>,
}

/// What the guest did: its writes in order (sequence, offset), and the
/// largest gap between two write completions.
#[derive(Debug, Default)]
pub struct GuestLog {
    pub writes: Vec<(u64, usize)>,
    pub max_gap: Duration,
}

impl Guest {
    /// Starts writing to export `uri` of `len` bytes, a write every
    /// `period`.
    pub fn start(uri: &str, len: usize, period: Duration) -> Result<Guest> {
        let disk = NbdDisk::open(uri, true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = crate::rng::Rng::new(42);
            let mut log = GuestLog::default();
            let mut last = Instant::now();
            let mut seq = 0;
            while !flag.load(Ordering::Relaxed) {
                seq += 1;
                let at = (rng.next_u64() as usize % (len / STAMP_LEN)) * STAMP_LEN;
                disk.write_at(&stamp(seq, at), at as u64)?;
                log.writes.push((seq, at));
                let now = Instant::now();
                log.max_gap = log.max_gap.max(now - last);
                last = now;
                std::thread::sleep(period);
            }
            disk.sync()?;
            Ok(log)
        });
        Ok(Guest { stop, thread })
    }

    /// Stops it; its log, or the error a write met.
    pub fn stop(self) -> Result<GuestLog> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| Error::Internal("the guest writer panicked".into()))?
    }
}

/// Checks that `got` is `first` plus exactly writes 1..K of `writes` for
/// some K (one point in time); returns K, or what is wrong.
pub fn point_in_time(
    first: &[u8],
    writes: &[(u64, usize)],
    got: &[u8],
) -> std::result::Result<u64, String> {
    if got.len() != first.len() {
        return Err(format!("{} bytes, the disk has {}", got.len(), first.len()));
    }
    let k = writes
        .iter()
        .filter(|(seq, at)| got[*at..*at + STAMP_LEN] == stamp(*seq, *at)[..])
        .map(|(seq, _)| *seq)
        .max()
        .unwrap_or(0);
    let mut expected = first.to_vec();
    for (seq, at) in writes.iter().take_while(|(s, _)| *s <= k) {
        expected[*at..*at + STAMP_LEN].copy_from_slice(&stamp(*seq, *at));
    }
    match expected.iter().zip(got).position(|(a, b)| a != b) {
        None => Ok(k),
        Some(at) => Err(format!(
            "not the disk at any one point in time: with writes 1..{k}, byte {at} differs"
        )),
    }
}

/// The whole of export `uri`.
pub fn read_export(uri: &str) -> Result<Vec<u8>> {
    let disk = NbdDisk::open(uri, false)?;
    let mut buf = vec![0u8; disk.len()? as usize];
    disk.read_at(&mut buf, 0)?;
    Ok(buf)
}
