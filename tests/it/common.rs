//! Helpers shared by the integration tests.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};

use blocksnap::disk::{Disk, DiskOpener, FileDisk};
use blocksnap::sample::Rng;
use blocksnap::{Engine, EngineOptions, ServerId};
use tempfile::TempDir;

/// 4 KiB blocks keep test images small while exercising many blocks.
pub const BS: usize = 4096;

/// A store and a folder for disks, both temporary.
///
/// With `BLOCKSNAP_TEST_BACKEND=s3` the store is in the local gateway's
/// bucket instead (a prefix of its own, see `rgw`), one host with its
/// cache in the folder: the same tests then run on the bucket backend
/// (`.ci/run` runs the engine's suites both ways).
pub struct Fixture {
    pub dir: TempDir,
    pub engine: Engine,
    pub fleet: Option<blocksnap::fleet::FleetOptions>,
}

/// True when the tests run on the bucket backend.
pub fn on_bucket() -> bool {
    std::env::var("BLOCKSNAP_TEST_BACKEND").is_ok_and(|b| b == "s3")
}

/// The fleet of the fixture in `dir`, when the tests run on the bucket
/// backend: its bucket prefix is kept in `dir/fleet-url`, so that any
/// process can open it again ([`OpenIn`]).
fn test_fleet(dir: &Path) -> Option<blocksnap::fleet::FleetOptions> {
    if !on_bucket() {
        return None;
    }
    let vars = crate::rgw::gateway().expect("BLOCKSNAP_TEST_BACKEND=s3 needs the gateway");
    let marker = dir.join("fleet-url");
    let url = match std::fs::read_to_string(&marker) {
        Ok(url) => url,
        Err(_) => {
            let url = crate::rgw::scratch_url(vars, "fixture");
            std::fs::write(&marker, &url).unwrap();
            url
        }
    };
    Some(
        blocksnap::fleet::FleetOptions::new(&url, dir.join("cache"))
            .unwrap()
            .host("test-host")
            .bucket(crate::rgw::config(vars)),
    )
}

/// Opens the store of the fixture in a folder, on whichever backend the
/// tests run on.
pub trait OpenIn {
    fn open_in(self, dir: &Path) -> blocksnap::Result<Engine>;
}

impl OpenIn for EngineOptions {
    fn open_in(self, dir: &Path) -> blocksnap::Result<Engine> {
        match test_fleet(dir) {
            Some(f) if dir.join("fleet-url").exists() => {
                blocksnap::fleet::open(&f, self).map(|(e, _)| e)
            }
            _ => self.open(dir.join("store")),
        }
    }
}

impl Fixture {
    pub fn new() -> Self {
        Self::with(EngineOptions::new().block_size(BS as u32))
    }

    pub fn with(options: EngineOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fleet = test_fleet(dir.path());
        let engine = match &fleet {
            Some(f) => blocksnap::fleet::init(f, options).unwrap(),
            None => options.open_in(dir.path()).unwrap(),
        };
        Fixture { dir, engine, fleet }
    }

    /// The store's directory (on the bucket backend: the cache's store).
    pub fn store(&self) -> PathBuf {
        match &self.fleet {
            Some(_) => self.dir.path().join("cache").join("store"),
            None => self.dir.path().join("store"),
        }
    }

    pub fn disk(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `bytes` as disk `name` and registers it as server `id`.
    pub fn server(&self, id: u64, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.disk(&format!("{name}.img"));
        std::fs::write(&path, bytes).unwrap();
        self.engine.add_server(ServerId(id), name, &path).unwrap();
        path
    }

    /// Reopens the store (the old engine must be dropped first by the caller
    /// passing it in).
    pub fn reopen(self, options: EngineOptions) -> Self {
        let Fixture { dir, engine, fleet } = self;
        drop(engine);
        let engine = match &fleet {
            Some(f) => blocksnap::fleet::open(f, options).unwrap().0,
            None => options.open_in(dir.path()).unwrap(),
        };
        Fixture { dir, engine, fleet }
    }
}

/// Seeded bytes with every kind of block: zero runs, text, random, repeats.
pub fn disk_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let region = 16 * BS;
    for (r, chunk) in v.chunks_mut(region).enumerate() {
        blocksnap::sample::fill_region(seed, r as u64, chunk);
    }
    v
}

/// Incompressible bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// The store's pack files, in sequence order.
pub fn pack_files(store: &Path) -> Vec<PathBuf> {
    let mut packs: Vec<PathBuf> = std::fs::read_dir(store.join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .collect();
    packs.sort();
    packs
}

/// Bytes the store's pack files take (the chunk index table aside).
pub fn packs_bytes(store: &Path) -> u64 {
    pack_files(store)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

/// A gate that holds disk reads until opened, to keep a capture in progress.
/// It counts the reads that reached it, so a test can wait for them.
#[derive(Clone, Default)]
pub struct Gate(
    Arc<(Mutex<bool>, Condvar)>,
    Arc<std::sync::atomic::AtomicUsize>,
);

/// Opens its gate when dropped: declared after what waits on the gate's
/// reads, it is dropped first, so a failing test reports its failure
/// instead of hanging on a capture that can never finish.
pub struct OpenOnDrop(Gate);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

impl Gate {
    /// A guard that opens the gate when dropped (see [`OpenOnDrop`]).
    pub fn open_on_drop(&self) -> OpenOnDrop {
        OpenOnDrop(self.clone())
    }

    pub fn open(&self) {
        *self.0.0.lock().unwrap() = true;
        self.0.1.notify_all();
    }

    /// Blocks until a read waits at the gate.
    pub fn wait_for_a_reader(&self) {
        while self.1.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn wait(&self) {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.0.0.lock().unwrap();
        while !*open {
            open = self.0.1.wait(open).unwrap();
        }
    }

    /// A disk opener whose reads wait for the gate.
    pub fn opener(&self) -> DiskOpener {
        self.opener_from(0)
    }

    /// A disk opener whose reads of bytes at `from` or later wait for the
    /// gate (those before it go through).
    pub fn opener_from(&self, from: u64) -> DiskOpener {
        let gate = self.clone();
        Arc::new(move |path: &Path, writable: bool| {
            Ok(Box::new(GatedDisk {
                inner: FileDisk::open(path, writable)?,
                gate: gate.clone(),
                from,
            }) as Box<dyn Disk>)
        })
    }
}

struct GatedDisk {
    inner: FileDisk,
    gate: Gate,
    from: u64,
}

impl Disk for GatedDisk {
    fn len(&self) -> blocksnap::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blocksnap::Result<usize> {
        if offset + buf.len() as u64 > self.from {
            self.gate.wait();
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blocksnap::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> blocksnap::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn set_len(&self, len: u64) -> blocksnap::Result<()> {
        self.inner.set_len(len)
    }
    fn is_block_device(&self) -> bool {
        self.inner.is_block_device()
    }
    fn sync(&self) -> blocksnap::Result<()> {
        self.inner.sync()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
}

/// How a [`FaultyDisk`] misbehaves.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Sleep this long before each write (to keep a restore running).
    pub write_delay: std::time::Duration,
    /// Every read fails with an I/O error.
    pub fail_reads: bool,
    /// Writes at this byte offset are silently dropped (a lying disk).
    pub drop_write_at: Option<u64>,
    /// Every write lands its first half, then fails (a torn write).
    pub tear_writes: bool,
}

/// A disk opener over image files that misbehaves as `faults` says.
pub fn faulty_opener(faults: Faults) -> DiskOpener {
    Arc::new(move |path: &Path, writable: bool| {
        Ok(Box::new(FaultyDisk {
            inner: FileDisk::open(path, writable)?,
            faults,
        }) as Box<dyn Disk>)
    })
}

struct FaultyDisk {
    inner: FileDisk,
    faults: Faults,
}

impl Disk for FaultyDisk {
    fn len(&self) -> blocksnap::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blocksnap::Result<usize> {
        if self.faults.fail_reads {
            return Err(blocksnap::Error::io(
                self.inner.path(),
                std::io::Error::other("injected read error"),
            ));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blocksnap::Result<()> {
        std::thread::sleep(self.faults.write_delay);
        if let Some(at) = self.faults.drop_write_at
            && (offset..offset + buf.len() as u64).contains(&at)
        {
            return Ok(());
        }
        if self.faults.tear_writes {
            self.inner.write_at(&buf[..buf.len() / 2], offset)?;
            return Err(blocksnap::Error::io(
                self.inner.path(),
                std::io::Error::other("injected torn write"),
            ));
        }
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> blocksnap::Result<()> {
        std::thread::sleep(self.faults.write_delay);
        self.inner.write_zeroes(offset, len)
    }
    fn set_len(&self, len: u64) -> blocksnap::Result<()> {
        self.inner.set_len(len)
    }
    fn is_block_device(&self) -> bool {
        self.inner.is_block_device()
    }
    fn sync(&self) -> blocksnap::Result<()> {
        self.inner.sync()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
}

/// Runs `f` on its own thread and fails loudly if it has not finished
/// within `secs` seconds: a deadlock is a test failure, not a hang.
pub fn with_deadline<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(v) => {
            let _ = worker.join();
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not finish within {secs} s: a deadlock?")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // The worker panicked: report its panic.
            match worker.join() {
                Err(p) => std::panic::resume_unwind(p),
                Ok(()) => unreachable!("the worker sends before it ends"),
            }
        }
    }
}

/// A count from environment variable `var` (long runs), else `default`.
pub fn env_count(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The seed of a randomised test: from `var` (to replay a run), else the
/// clock; printed either way.
pub fn seed(var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        });
    println!("seed {seed} ({var} replays it)");
    seed
}

/// Copies a directory tree (a store, for a trial on a copy of it).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

pub fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `EXT4_IOC_SHUTDOWN`: `_IOR('X', 125, __u32)`.
const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587D;
/// Shut down without flushing the journal: a power cut.
const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;

/// An ext4 file system on a loop device, mounted; unmounted and detached
/// on drop.
pub struct Ext4 {
    device: String,
    pub mnt: PathBuf,
}

impl Ext4 {
    /// A mounted ext4 of `len` bytes for the test `what`. A machine that
    /// cannot make one (not root, no loop devices) fails the test, unless
    /// `BLOCKSNAP_NO_LOOP_DEVICES=1` says it has none: then `None`, said
    /// loudly.
    pub fn for_test(dir: &Path, len: u64, what: &str) -> Option<Self> {
        match Ext4::new(dir, len) {
            Ok(fs) => Some(fs),
            Err(why) if std::env::var("BLOCKSNAP_NO_LOOP_DEVICES").is_ok_and(|v| v == "1") => {
                eprintln!(
                    "\n!!! NOT RUN ({what}): no loop-mounted ext4 ({why}), as BLOCKSNAP_NO_LOOP_DEVICES=1 says\n"
                );
                None
            }
            Err(why) => panic!(
                "{what} need a loop-mounted ext4 (root, loop devices): {why}; \
                 set BLOCKSNAP_NO_LOOP_DEVICES=1 only on a machine that has none"
            ),
        }
    }

    fn new(dir: &Path, len: u64) -> Result<Self, String> {
        // SAFETY: geteuid reads the caller's effective user id; no memory.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        let image = dir.join("fs.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(len))
            .map_err(|e| e.to_string())?;
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()])?;
        let device = run("losetup", &["--find", "--show", image.to_str().unwrap()])?;
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
        let fs = Ext4 { device, mnt };
        fs.mount()?;
        Ok(fs)
    }

    pub fn mount(&self) -> Result<(), String> {
        run(
            "mount",
            &["-t", "ext4", &self.device, self.mnt.to_str().unwrap()],
        )
        .map(|_| ())
    }

    pub fn umount(&self) -> Result<(), String> {
        run("umount", &[self.mnt.to_str().unwrap()]).map(|_| ())
    }

    /// Cuts the power: the file system stops, dropping whatever the journal
    /// has not committed.
    pub fn cut(&self) {
        let dir = std::fs::File::open(&self.mnt).unwrap();
        let flags = EXT4_GOING_FLAGS_NOLOGFLUSH;
        // SAFETY: the ioctl reads one u32 from a pointer to a live local.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_SHUTDOWN, &flags) };
        assert_eq!(
            rc,
            0,
            "EXT4_IOC_SHUTDOWN: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = self.umount();
        let _ = run("losetup", &["-d", &self.device]);
    }
}

/// A child of the harness, its output collected on threads.
pub struct Victim {
    child: Child,
    stdout: std::thread::JoinHandle<Vec<String>>,
    stderr: std::thread::JoinHandle<String>,
}

impl Victim {
    /// Fails the test, with the child's stderr, unless it is still running.
    pub fn assert_alive(&mut self, what: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            let err = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
            panic!(
                "{what}: the child died on its own before the kill ({status}):\n{}",
                err.join().unwrap_or_default()
            );
        }
    }

    /// Runs the test `test` of this binary as a child with `env`, and
    /// returns once it printed `opened` (failing the test if it does not).
    pub fn spawn(test: &str, env: &[(&str, String)]) -> Victim {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "--ignored", test, "--nocapture"])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line == "opened" {
                    let _ = tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(err).read_to_string(&mut s);
            s
        });
        let mut victim = Victim {
            child,
            stdout,
            stderr,
        };
        if rx.recv_timeout(std::time::Duration::from_secs(60)).is_err() {
            victim.assert_alive(&format!("{test} never opened its store"));
            panic!("{test} never opened its store in 60 s");
        }
        victim
    }

    /// Checks the child is alive, SIGKILLs it, and returns its output.
    pub fn kill(mut self, what: &str) -> Vec<String> {
        self.assert_alive(what);
        self.kill_any()
    }

    /// SIGKILLs the child, alive or not (after a power cut it may have died
    /// of the errors), and returns its output.
    pub fn kill_any(mut self) -> Vec<String> {
        let _ = self.child.kill();
        self.child.wait().unwrap();
        self.stdout.join().unwrap()
    }
}

/// True when QEMU's qemu-storage-daemon and qemu-img can run here; false
/// (said loudly) only where `BLOCKSNAP_NO_QEMU=1` says the machine has no
/// QEMU; otherwise their absence fails the test.
pub fn qemu_here() -> bool {
    present(blocksnap::live::testbed::qemu_available())
}

/// [`qemu_here`] for a real VM (`qemu-system-x86_64`).
pub fn vm_here() -> bool {
    present(blocksnap::live::testbed::vm_available())
}

fn present(available: Result<(), String>) -> bool {
    match available {
        Ok(()) => true,
        Err(why) if std::env::var("BLOCKSNAP_NO_QEMU").is_ok_and(|v| v == "1") => {
            eprintln!("\n!!! NOT RUN: no QEMU ({why}), as BLOCKSNAP_NO_QEMU=1 says\n");
            false
        }
        Err(why) => panic!(
            "this test needs QEMU ({why}): .ci/run installs it, or set \
             BLOCKSNAP_NO_QEMU=1 only on a machine that cannot have it"
        ),
    }
}

/// An HTTP client for the API tests: statuses are answers, not errors.
pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into()
}
