//! Live snapshots of a running QEMU guest's disk (a VM or
//! qemu-storage-daemon), through its QMP monitor and NBD server, as
//! libvirt's pull-mode backup does it:
//!
//! 1. a scratch qcow2 backed by the disk node is added, and one QMP
//!    `transaction` freezes the point in time: a new persistent checkpoint
//!    bitmap (`blocksnap-cp-ID`, which records every write from now on), a
//!    frozen copy of the parent snapshot's checkpoint on the scratch node,
//!    and a `blockdev-backup sync=none` job that copies each block the
//!    guest overwrites into the scratch node first (fleecing);
//! 2. the scratch node is exported over NBD, read-only, with the frozen
//!    bitmap; the capture reads it like any NBD disk, and only the dirty
//!    extents when the parent's checkpoint was there and consistent;
//! 3. everything is torn down (export, job, scratch node and file, the NBD
//!    server when blocksnap started it); on success the parent's
//!    checkpoint is removed (the new one replaces it), on failure the new
//!    one is. At most one checkpoint per server, plus one while a capture
//!    runs.
//!
//! Everything blocksnap creates in QEMU is named `blocksnap-...`; the next
//! operation on the server removes what a crashed one left
//! ([`Session::clean_up_leftovers`]).
//!
//! A server on QEMU has a disk "path" that is a URI:
//! `qemu:///NODE?qmp=PATH[&nbd=PATH]` (the QMP monitor socket, and the NBD
//! server's socket when the process already runs one).

pub mod qmp;
#[cfg(feature = "sample")]
pub mod testbed;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Value, json};

use crate::dirty::DirtyBitmap;
use crate::error::{Error, Result};
use crate::ids::SnapshotId;
use crate::nbd::{BASE_ALLOCATION, NbdDisk};
use crate::types::FullReason;
use qmp::Qmp;

const PREFIX: &str = "blocksnap-";
/// QEMU's meta context of how deep in a backing chain each extent lives:
/// depth 1 on the scratch node is what the fleecing copied there.
const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// True when `s` names a disk of a QEMU process.
pub fn is_uri(s: &str) -> bool {
    s.starts_with("qemu://")
}

/// The QEMU disk a server's disk path names, if it is one.
pub fn disk_of(path: &Path) -> Result<Option<QemuDisk>> {
    match path.to_str() {
        Some(s) if is_uri(s) => Ok(Some(QemuDisk::parse(s)?)),
        _ => Ok(None),
    }
}

/// A disk node of a QEMU process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuDisk {
    pub qmp: PathBuf,
    pub node: String,
    /// The socket of the NBD server the process already runs, if any.
    pub nbd_socket: Option<PathBuf>,
}

impl QemuDisk {
    /// Parses `qemu:///NODE?qmp=PATH[&nbd=PATH]`.
    pub fn parse(s: &str) -> Result<QemuDisk> {
        let bad = |why: &str| {
            Error::InvalidParameter(format!(
                "{s:?} is not a QEMU disk ({why}); use qemu:///NODE?qmp=PATH[&nbd=PATH]"
            ))
        };
        let rest = s
            .strip_prefix("qemu:///")
            .ok_or_else(|| bad("no qemu:/// prefix"))?;
        let (node, query) = rest.split_once('?').ok_or_else(|| bad("no ?qmp="))?;
        let node = crate::nbd::decode(node).ok_or_else(|| bad("bad %-escape"))?;
        if node.is_empty() || node.len() > 127 {
            return Err(bad("the node name must be 1 to 127 characters"));
        }
        let (mut qmp, mut nbd) = (None, None);
        for pair in query.split('&') {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad("a parameter without ="))?;
            let v = crate::nbd::decode(v)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| bad("an empty or badly escaped path"))?;
            match k {
                "qmp" => qmp = Some(PathBuf::from(v)),
                "nbd" => nbd = Some(PathBuf::from(v)),
                _ => return Err(bad("the parameters are qmp= and nbd=")),
            }
        }
        Ok(QemuDisk {
            qmp: qmp.ok_or_else(|| bad("no qmp="))?,
            node,
            nbd_socket: nbd,
        })
    }

    /// The URI, with its socket paths made absolute.
    pub fn to_uri(&self) -> Result<String> {
        let abs = |p: &Path| std::path::absolute(p).map_err(|e| Error::io(p, e));
        let mut s = format!(
            "qemu:///{}?qmp={}",
            crate::nbd::encode(&self.node),
            crate::nbd::encode(&abs(&self.qmp)?.to_string_lossy())
        );
        if let Some(n) = &self.nbd_socket {
            s += &format!("&nbd={}", crate::nbd::encode(&abs(n)?.to_string_lossy()));
        }
        Ok(s)
    }
}

/// What blocksnap knows of a bitmap on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    pub name: String,
    pub inconsistent: bool,
    /// False for a bitmap someone disabled: it misses writes since.
    pub recording: bool,
}

/// The names a store gives what it creates in QEMU:
/// `blocksnap-TAG-KIND-ID`, TAG the store's own (so that two stores, or
/// a store made again at the same path, never take each other's
/// checkpoints for their own).
#[derive(Debug, Clone, Copy)]
pub struct Names {
    pub tag: u32,
}

impl Names {
    pub(crate) fn of(&self, kind: &str, id: SnapshotId) -> String {
        format!("{}{kind}-{}", self.prefix(), id.0)
    }
    fn prefix(&self) -> String {
        format!("{PREFIX}{:08x}-", self.tag)
    }
    /// The checkpoint bitmap a completed snapshot keeps on the node.
    pub fn checkpoint(&self, id: SnapshotId) -> String {
        self.of("cp", id)
    }
    fn scratch_node(&self, id: SnapshotId) -> String {
        self.of("scratch", id)
    }
    fn fleece_job(&self, id: SnapshotId) -> String {
        self.of("fleece", id)
    }
    fn export_id(&self, id: SnapshotId) -> String {
        self.of("export", id)
    }
    fn frozen_bitmap(&self, id: SnapshotId) -> String {
        self.of("frozen", id)
    }
    /// The export of the node itself, for a restore (`kind` "restore")
    /// or its planning ("plan").
    fn node_export(&self, kind: &str) -> String {
        format!("{}{kind}", self.prefix())
    }
}

/// A monitor connection to the process that holds a server's disk.
pub struct Session {
    qmp: Qmp,
    disk: QemuDisk,
    names: Names,
    /// Where scratch files and private sockets go.
    work_dir: PathBuf,
}

/// A frozen point in time, exported over NBD; torn down by
/// [`Frozen::finish`] (or, best effort, on drop).
pub struct Frozen {
    session: Session,
    id: SnapshotId,
    parent: Option<SnapshotId>,
    scratch_file: PathBuf,
    /// The private NBD socket when blocksnap started the server.
    own_server: Option<PathBuf>,
    disk: Option<NbdDisk>,
    /// What may hold data in the frozen view.
    data: Option<Vec<Range<u64>>>,
    /// The dirty extents since the parent, or why there are none.
    pub since_parent: std::result::Result<(SnapshotId, DirtyBitmap), FullReason>,
    /// How long the guest's I/O was held for the freeze.
    pub freeze_micros: u64,
    finished: bool,
}

impl Session {
    /// Connects to the monitor of `disk`'s process; scratch files go to
    /// `work_dir`; what it creates is named with `names`.
    pub fn open(disk: &QemuDisk, work_dir: &Path, names: Names) -> Result<Session> {
        std::fs::create_dir_all(work_dir).map_err(|e| Error::io(work_dir, e))?;
        Ok(Session {
            qmp: Qmp::connect(&disk.qmp)?,
            disk: disk.clone(),
            names,
            work_dir: work_dir.to_path_buf(),
        })
    }

    /// The node's size and its bitmaps.
    fn node(&mut self) -> Result<(u64, Vec<Bitmap>)> {
        let nodes = self
            .qmp
            .execute("query-named-block-nodes", json!({"flat": true}))?;
        node_info(&nodes, &self.disk.node).map_err(|e| match e {
            NodeError::Missing => Error::InvalidParameter(format!(
                "QEMU at {} has no block node {:?}; `query-named-block-nodes` lists them",
                self.qmp.peer(),
                self.disk.node
            )),
            NodeError::NoSize => self.bad("the node's image has no virtual-size"),
        })
    }

    fn bad(&self, what: &str) -> Error {
        Error::Qmp {
            peer: self.qmp.peer().to_string(),
            what: what.to_string(),
        }
    }

    /// Removes whatever a blocksnap operation that crashed or failed left
    /// in QEMU or in the work directory: exports, fleecing jobs, scratch
    /// nodes and files, and checkpoint bitmaps other than `keep`'s.
    pub fn clean_up_leftovers(&mut self, keep: &[SnapshotId]) -> Result<()> {
        let names = self.names;
        let ours = names.prefix();
        let exports = self.qmp.execute("query-block-exports", json!({}))?;
        for e in strings_of(&exports, "id") {
            if e.starts_with(&ours) {
                self.del_export(&e)?;
            }
        }
        let jobs = self.qmp.execute("query-block-jobs", json!({}))?;
        for j in strings_of(&jobs, "device") {
            if j.starts_with(&ours) {
                self.cancel_job(&j)?;
            }
        }
        let nodes = self
            .qmp
            .execute("query-named-block-nodes", json!({"flat": true}))?;
        for n in strings_of(&nodes, "node-name") {
            if n.starts_with(&format!("{ours}scratch-")) {
                self.qmp.execute("blockdev-del", json!({"node-name": n}))?;
            }
        }
        let keep: Vec<String> = keep.iter().map(|&id| names.checkpoint(id)).collect();
        let (_, bitmaps) = self.node()?;
        for b in bitmaps {
            if b.name.starts_with(&ours) && !keep.contains(&b.name) {
                self.remove_bitmap(&b.name)?;
            }
        }
        // A private NBD server left running: its socket file is still here.
        let entries =
            std::fs::read_dir(&self.work_dir).map_err(|e| Error::io(&self.work_dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("nbd-") && name.ends_with(".sock") && self.disk.nbd_socket.is_none()
            {
                let _ = self.qmp.try_execute("nbd-server-stop", json!({}))?;
            }
            if name.starts_with("scratch-") || name.starts_with("nbd-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// The socket of the process's NBD server: the one it runs (named
    /// with `--nbd-socket`), or one started now on a private socket
    /// `nbd-NAME.sock` in the work directory (also returned: stop it after).
    fn nbd_server(&mut self, name: &str) -> Result<(PathBuf, Option<PathBuf>)> {
        if let Some(s) = &self.disk.nbd_socket {
            return Ok((s.clone(), None));
        }
        let s = self.work_dir.join(format!("nbd-{name}.sock"));
        let _ = std::fs::remove_file(&s);
        self.qmp
            .execute(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": s}}}),
            )
            .map_err(|e| match e {
                Error::Qmp { peer, what } if what.contains("already running") => Error::Qmp {
                    peer,
                    what: format!(
                        "{what}: this QEMU runs an NBD server; add the server with --nbd-socket naming its socket"
                    ),
                },
                e => e,
            })?;
        Ok((s.clone(), Some(s)))
    }

    fn del_export(&mut self, id: &str) -> Result<()> {
        let _ = self
            .qmp
            .try_execute("block-export-del", json!({"id": id, "mode": "hard"}))?;
        self.wait_gone("query-block-exports", "id", id)
    }

    fn cancel_job(&mut self, id: &str) -> Result<()> {
        let _ = self
            .qmp
            .try_execute("block-job-cancel", json!({"device": id, "force": true}))?;
        self.wait_gone("query-block-jobs", "device", id)
    }

    fn remove_bitmap(&mut self, name: &str) -> Result<()> {
        self.qmp.execute(
            "block-dirty-bitmap-remove",
            json!({"node": self.disk.node, "name": name}),
        )?;
        Ok(())
    }

    /// Polls `query` until no entry has `key` = `value` (at most 30 s).
    fn wait_gone(&mut self, query: &str, key: &str, value: &str) -> Result<()> {
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let list = self.qmp.execute(query, json!({}))?;
            if !strings_of(&list, key).iter().any(|n| n == value) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.bad(&format!("{value} still listed by {query} after 30 s")));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Freezes the disk's point in time for capture `id`, incremental from
    /// `parent` (the server's newest completed snapshot) when its
    /// checkpoint is on the node and consistent and the size unchanged.
    pub fn freeze(
        mut self,
        id: SnapshotId,
        parent: Option<(SnapshotId, u64)>,
        granularity: u64,
    ) -> Result<Frozen> {
        // A checkpoint named for the new id is a leftover too (of a store
        // made again at the same path, say).
        let keep: Vec<SnapshotId> = parent.iter().map(|&(p, _)| p).collect();
        self.clean_up_leftovers(&keep)?;
        let names = self.names;
        let (size, bitmaps) = self.node()?;
        let from = usable_checkpoint(&bitmaps, names, parent, size);
        let scratch_file = self.work_dir.join(format!("scratch-{}.qcow2", id.0));
        let mut frozen = Frozen {
            session: self,
            id,
            parent: from.ok(),
            scratch_file: scratch_file.clone(),
            own_server: None,
            disk: None,
            data: None,
            since_parent: Err(FullReason::NoCheckpoint),
            freeze_micros: 0,
            finished: false,
        };
        frozen.set_up(size, from, granularity)?;
        Ok(frozen)
    }
}

/// `parent` (a completed snapshot and its disk length) when its checkpoint
/// on the node (of `size` bytes, with `bitmaps`) says exactly which blocks
/// changed since it; why not otherwise.
fn usable_checkpoint(
    bitmaps: &[Bitmap],
    names: Names,
    parent: Option<(SnapshotId, u64)>,
    size: u64,
) -> std::result::Result<SnapshotId, FullReason> {
    let Some((p, len)) = parent else {
        return Err(FullReason::NoCheckpoint);
    };
    match bitmaps.iter().find(|b| b.name == names.checkpoint(p)) {
        None => Err(FullReason::NoCheckpoint),
        Some(b) if b.inconsistent => Err(FullReason::CheckpointInconsistent),
        Some(b) if !b.recording => Err(FullReason::CheckpointNotRecording),
        Some(_) if len != size => Err(FullReason::DiskResized),
        Some(_) => Ok(p),
    }
}

/// An empty qcow2 of `size` bytes at `qcow2` whose data lives in
/// `data` (created empty). `qemu-img create` costs some 40 ms (a process
/// and its libraries), a fifth of a small incremental capture, so its
/// output is kept in `dir` as a template for the size and copied (the data
/// file's name in the copy's header does not matter: the scratch node names
/// its data file when it is added).
fn new_scratch(dir: &Path, qcow2: &Path, data: &Path, size: u64) -> Result<()> {
    let template = dir.join(format!("template-{size}.qcow2"));
    if !template.exists() {
        let partial = dir.join(format!("template-{size}.partial"));
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("data_file={}", dir.join("template.data").display()))
            .arg(&partial)
            .arg(size.to_string())
            .output()
            .map_err(|e| {
                Error::io(
                    "qemu-img",
                    std::io::Error::new(
                        e.kind(),
                        format!("{e}: live snapshots need qemu-img (qemu-utils)"),
                    ),
                )
            })?;
        let _ = std::fs::remove_file(dir.join("template.data"));
        if !out.status.success() {
            return Err(Error::Io {
                path: qcow2.to_path_buf(),
                source: std::io::Error::other(format!(
                    "qemu-img create: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            });
        }
        std::fs::rename(&partial, &template).map_err(|e| Error::io(&template, e))?;
    }
    std::fs::copy(&template, qcow2).map_err(|e| Error::io(qcow2, e))?;
    std::fs::File::create(data).map_err(|e| Error::io(data, e))?;
    Ok(())
}

/// Reserves `len` bytes for `path` (fallocate: allocated, nothing written).
fn reserve(path: &Path, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    // SAFETY: fallocate(2) on a descriptor we own.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if r != 0 {
        return Err(Error::io(path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Bytes free to an unprivileged writer on the file system of `dir`.
fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidParameter(format!("{} has a NUL byte", dir.display())))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(dir, std::io::Error::last_os_error()));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Why a node's information could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum NodeError {
    Missing,
    NoSize,
}

/// A node's size and its named bitmaps, from what
/// `query-named-block-nodes` returned (untrusted: anything missing or of
/// the wrong type is an error or left out, never a panic).
pub fn node_info(nodes: &Value, node: &str) -> std::result::Result<(u64, Vec<Bitmap>), NodeError> {
    let info = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == node))
        .ok_or(NodeError::Missing)?;
    let size = info["image"]["virtual-size"]
        .as_u64()
        .ok_or(NodeError::NoSize)?;
    let bitmaps = info["dirty-bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| {
                    Some(Bitmap {
                        name: b["name"].as_str()?.to_string(),
                        inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                        recording: b["recording"].as_bool().unwrap_or(false),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((size, bitmaps))
}

/// The `key` strings of a list QEMU returned.
pub fn strings_of(list: &Value, key: &str) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e[key].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

impl Frozen {
    fn set_up(
        &mut self,
        size: u64,
        from: std::result::Result<SnapshotId, FullReason>,
        granularity: u64,
    ) -> Result<()> {
        let id = self.id;
        let names = self.session.names;
        let node = self.session.disk.node.clone();
        // The scratch image's data is reserved whole: with `blockdev-backup`
        // fleecing, QEMU fails the guest's write when a copy-before-write
        // cannot land, so the copies must never meet a full file system.
        // Each cluster is copied at most once, so the disk's size is enough
        // whatever the guest writes. The qcow2 keeps its data in an external
        // file (`data_file`, guest offset = file offset) that is fallocated
        // (space reserved, nothing written), while its own metadata still
        // says which clusters were copied (the rest reads from the disk
        // through the backing link); a preallocated qcow2 would instead
        // read zeros for every cluster not copied. Given back at the end.
        let need = size + size / 1024 + (16 << 20);
        let free = free_bytes(&self.session.work_dir)?;
        if free < need {
            return Err(Error::Io {
                path: self.session.work_dir.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    format!(
                        "a live capture reserves scratch space the size of the disk, so that the \
                         guest's writes never fail: {need} bytes needed, {free} free; free space \
                         there or stop the guest and capture its disk as a file"
                    ),
                ),
            });
        }
        let data_file = self.scratch_file.with_extension("data");
        new_scratch(&self.session.work_dir, &self.scratch_file, &data_file, size)?;
        reserve(&data_file, size)?;
        let qmp = &mut self.session.qmp;
        qmp.execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": names.scratch_node(id), "backing": node,
                   "file": {"driver": "file", "filename": self.scratch_file},
                   "data-file": {"driver": "file", "filename": data_file}}),
        )?;
        let mut actions = vec![json!({"type": "block-dirty-bitmap-add",
            "data": {"node": node, "name": names.checkpoint(id), "persistent": true}})];
        if let Ok(p) = from {
            actions.push(json!({"type": "block-dirty-bitmap-add",
                "data": {"node": names.scratch_node(id), "name": names.frozen_bitmap(id), "disabled": true}}));
            actions.push(json!({"type": "block-dirty-bitmap-merge",
                "data": {"node": names.scratch_node(id), "target": names.frozen_bitmap(id),
                         "bitmaps": [{"node": node, "name": names.checkpoint(p)}]}}));
        }
        actions.push(json!({"type": "blockdev-backup",
            "data": {"job-id": names.fleece_job(id), "device": node, "target": names.scratch_node(id), "sync": "none"}}));
        let started = Instant::now();
        qmp.execute("transaction", json!({"actions": actions}))?;
        self.freeze_micros = started.elapsed().as_micros() as u64;

        let (socket, own) = self.session.nbd_server(&id.0.to_string())?;
        self.own_server = own;
        // What may hold data in the frozen view, without asking the frozen
        // view (see below): the live disk's data now, then what the
        // fleecing has copied. A cluster that held data at the freeze and
        // was discarded since was copied to the scratch before the discard
        // landed, so if the first look missed it the second sees it.
        // Only a full capture needs it: an incremental reads the dirty
        // extents, whose holes come back as hole chunks anyway.
        let live = names.of("alloc", id);
        let live_data = if from.is_ok() {
            None
        } else {
            self.session.qmp.execute(
                "block-export-add",
                json!({"type": "nbd", "id": live, "node-name": node, "name": live, "writable": false}),
            )?;
            let client = crate::nbd::NbdUri {
                address: crate::nbd::NbdAddress::Unix(socket.clone()),
                export: live.clone(),
            }
            .connect(&[BASE_ALLOCATION])?;
            let extents = client.block_status(BASE_ALLOCATION, 0..size)?;
            drop(client);
            self.session.del_export(&live)?;
            Some(crate::nbd::marked(&extents, |f| {
                f & crate::nbd::proto::STATE_ZERO == 0
            }))
        };
        let qmp = &mut self.session.qmp;
        let name = names.export_id(id);
        let mut export = json!({"type": "nbd", "id": names.export_id(id), "node-name": names.scratch_node(id),
                                "name": name, "writable": false, "allocation-depth": true});
        if from.is_ok() {
            export["bitmaps"] = json!([names.frozen_bitmap(id)]);
        }
        qmp.execute("block-export-add", export)?;
        let uri = crate::nbd::NbdUri {
            address: crate::nbd::NbdAddress::Unix(socket),
            export: name,
        };
        let context = format!("qemu:dirty-bitmap:{}", names.frozen_bitmap(id));
        // No `base:allocation` on the frozen view: for a cluster not copied
        // yet, QEMU answers it from the live disk, where a guest's discard
        // racing the query could call zero what the frozen view still
        // holds.
        let client = uri.connect(&[&context, ALLOCATION_DEPTH])?;
        if let Some(live_data) = live_data {
            let depth = client.block_status(ALLOCATION_DEPTH, 0..size)?;
            let copied = crate::nbd::marked(&depth, |d| d == 1);
            self.data = Some(union(&live_data, &copied));
        }
        self.since_parent = match from {
            Ok(p) => Ok((
                p,
                crate::nbd::bitmap_of(&client, &context, size, granularity)?,
            )),
            Err(reason) => Err(reason),
        };
        self.disk = Some(NbdDisk::from_client(client, uri.to_string()));
        Ok(())
    }

    /// Bytes the fleecing copied into the scratch image so far (the
    /// guest's overwrites of not yet read data), when QEMU tells.
    pub fn scratch_bytes(&self) -> Option<u64> {
        let client = self.disk.as_ref()?.client();
        client.info().context_id(ALLOCATION_DEPTH)?;
        let extents = client
            .block_status(ALLOCATION_DEPTH, 0..client.info().size)
            .ok()?;
        Some(
            extents
                .iter()
                .filter(|(_, depth)| *depth == 1)
                .map(|(r, _)| r.end - r.start)
                .sum(),
        )
    }

    /// The frozen view, to read: an NBD disk whose data ranges are the
    /// live disk's data when frozen plus what the fleecing copied.
    pub fn disk(&self) -> FrozenView<'_> {
        FrozenView {
            nbd: self.disk.as_ref().expect("set up before it is handed out"),
            data: self.data.as_deref(),
        }
    }

    /// Tears everything down; `completed` keeps the new checkpoint (and
    /// drops the parent's, which it replaces), otherwise drops the new one.
    pub fn finish(mut self, completed: bool) -> Result<()> {
        self.finished = true;
        self.tear_down(completed)
    }

    /// Every step is tried even when one before it failed (a job left
    /// running would copy on every guest write until the next
    /// operation); the first error is returned.
    fn tear_down(&mut self, completed: bool) -> Result<()> {
        self.disk = None; // disconnects
        let id = self.id;
        let names = self.session.names;
        let s = &mut self.session;
        let mut first = None;
        keep_first(&mut first, s.del_export(&names.of("alloc", id)));
        keep_first(&mut first, s.del_export(&names.export_id(id)));
        keep_first(&mut first, s.cancel_job(&names.fleece_job(id)));
        let nodes = keep_first(
            &mut first,
            s.qmp
                .execute("query-named-block-nodes", json!({"flat": true})),
        );
        if nodes.is_some_and(|n| strings_of(&n, "node-name").contains(&names.scratch_node(id))) {
            keep_first(
                &mut first,
                s.qmp
                    .execute("blockdev-del", json!({"node-name": names.scratch_node(id)})),
            );
        }
        if let Some(sock) = self.own_server.take() {
            keep_first(&mut first, s.qmp.execute("nbd-server-stop", json!({})));
            let _ = std::fs::remove_file(sock);
        }
        let _ = std::fs::remove_file(&self.scratch_file);
        let _ = std::fs::remove_file(self.scratch_file.with_extension("data"));
        let drop = if completed {
            self.parent.map(|p| names.checkpoint(p))
        } else {
            Some(names.checkpoint(id))
        };
        if let Some((_, bitmaps)) = keep_first(&mut first, s.node())
            && let Some(name) = drop.filter(|n| bitmaps.iter().any(|b| &b.name == n))
        {
            keep_first(&mut first, s.remove_bitmap(&name));
        }
        first.map_or(Ok(()), Err)
    }
}

/// The union of two ascending lists of disjoint ranges.
fn union(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut all: Vec<Range<u64>> = a.iter().chain(b).cloned().collect();
    all.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in all {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The frozen view of a live capture: reads go to the NBD export; the
/// data ranges are computed without asking it (see [`Frozen::disk`]).
pub struct FrozenView<'a> {
    nbd: &'a NbdDisk,
    data: Option<&'a [Range<u64>]>,
}

impl crate::disk::Disk for FrozenView<'_> {
    fn len(&self) -> Result<u64> {
        self.nbd.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.nbd.read_at(buf, offset)
    }
    fn read_many_at(&self, parts: &mut [(u64, &mut [u8])]) -> Result<()> {
        self.nbd.read_many_at(parts)
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
        Err(Error::Internal(
            "the frozen view of a live capture is read-only".into(),
        ))
    }
    fn write_zeroes(&self, _: u64, _: u64) -> Result<()> {
        Err(Error::Internal(
            "the frozen view of a live capture is read-only".into(),
        ))
    }
    fn set_len(&self, _: u64) -> Result<()> {
        Err(Error::Internal(
            "the frozen view of a live capture is read-only".into(),
        ))
    }
    fn is_block_device(&self) -> bool {
        true
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn data_ranges(&self) -> Result<Option<Vec<Range<u64>>>> {
        Ok(self.data.map(<[Range<u64>]>::to_vec))
    }
    fn reads_best_in_bulk(&self) -> bool {
        true
    }
    fn path(&self) -> &Path {
        self.nbd.path()
    }
}

/// `r`'s value; its error kept in `first` unless one is there already.
fn keep_first<T>(first: &mut Option<Error>, r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            first.get_or_insert(e);
            None
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.tear_down(false);
        }
    }
}

/// A writable NBD export of a QEMU server's disk node, for a restore:
/// removed (and the NBD server stopped, when blocksnap started it) when
/// dropped. A running VM is paused first (`stop`) and left paused.
pub struct Writable {
    session: Session,
    own_server: Option<PathBuf>,
    disk: Option<NbdDisk>,
    path: PathBuf,
    pub paused: bool,
    /// The blocks written since the newest snapshot, from its checkpoint,
    /// when it is on the node and consistent: the disk is that snapshot
    /// but for them, known without reading it.
    pub since: Option<(SnapshotId, DirtyBitmap)>,
    /// The frozen copy of the checkpoint the export carried.
    since_bitmap: Option<String>,
    /// The export's id and name.
    export: String,
    closed: bool,
}

/// Checks that blocksnap may write the disk's node, before a restore
/// pauses anything or takes its safety snapshot: QEMU refuses a second
/// writer of a disk whose VM device does not share write access
/// (`share-rw=off`, the default), paused or not.
pub fn check_writable(disk: &QemuDisk, work_dir: &Path, names: Names) -> Result<()> {
    let mut session = Session::open(disk, work_dir, names)?;
    let (_, own) = session.nbd_server("probe")?;
    let id = names.node_export("probe");
    let added = session.qmp.try_execute(
        "block-export-add",
        json!({"type": "nbd", "id": id, "node-name": disk.node, "name": id, "writable": true}),
    );
    let mut first = None;
    if matches!(added, Ok(Ok(_))) {
        keep_first(&mut first, session.del_export(&id));
    }
    if let Some(s) = own {
        keep_first(
            &mut first,
            session.qmp.execute("nbd-server-stop", json!({})),
        );
        let _ = std::fs::remove_file(s);
    }
    match added? {
        Ok(_) => first.map_or(Ok(()), Err),
        Err(refusal) if refusal.desc.contains("Permission conflict") => {
            Err(Error::WrongState(format!(
                "QEMU lets nothing but the VM write block node {:?}: its device does not share \
                 write access (share-rw=off, the default), paused or not ({}). Shut the VM down \
                 and restore with the disk served by qemu-storage-daemon, or attach the disk \
                 with share-rw=on",
                disk.node, refusal.desc
            )))
        }
        Err(refusal) => Err(session.bad(&format!(
            "block-export-add: {} ({})",
            refusal.desc, refusal.class
        ))),
    }
}

/// Pauses the VM whose disk `disk` is (QMP `stop`), when it runs; true if
/// it was paused now. qemu-storage-daemon, which has no guest, has nothing
/// to pause.
pub fn pause(disk: &QemuDisk) -> Result<bool> {
    pause_with(&mut Qmp::connect(&disk.qmp)?)
}

fn pause_with(qmp: &mut Qmp) -> Result<bool> {
    match qmp.try_execute("query-status", json!({}))? {
        Ok(status) if status["running"].as_bool() == Some(true) => {
            qmp.execute("stop", json!({}))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

impl Writable {
    /// Exports the node (writable when `writable`, which also pauses a
    /// running VM; a restore's planning only reads), with what changed
    /// since `newest` (the server's newest completed snapshot and its disk
    /// length) when its checkpoint tells, in blocks of `granularity`.
    pub fn open(
        disk: &QemuDisk,
        work_dir: &Path,
        names: Names,
        uri: &Path,
        writable: bool,
        newest: Option<(SnapshotId, u64)>,
        granularity: u64,
    ) -> Result<Writable> {
        let mut session = Session::open(disk, work_dir, names)?;
        // A restore excludes every other operation on the server: nothing
        // of a crashed one stays; checkpoints do (a restore writes through
        // QEMU, so they record it). A plan, which may run beside a capture,
        // touches nothing but what it makes, under names of its own.
        let kind = if writable { "restore" } else { "plan" };
        if writable {
            let (_, bitmaps) = session.node()?;
            let cp = format!("{}cp-", names.prefix());
            let keep: Vec<SnapshotId> = bitmaps
                .iter()
                .filter_map(|b| b.name.strip_prefix(&cp)?.parse().ok())
                .map(SnapshotId)
                .collect();
            session.clean_up_leftovers(&keep)?;
        }
        let paused = writable && pause_with(&mut session.qmp)?;
        let mut w = Writable {
            session,
            own_server: None,
            disk: None,
            path: uri.to_path_buf(),
            paused,
            since: None,
            since_bitmap: None,
            export: names.node_export(kind),
            closed: false,
        };
        let (socket, own) = w.session.nbd_server(kind)?;
        w.own_server = own;
        let node = w.session.disk.node.clone();
        let (size, bitmaps) = w.session.node()?;
        let base = usable_checkpoint(&bitmaps, names, newest, size).ok();
        let mut export = json!({"type": "nbd", "id": w.export, "node-name": node,
                                "name": w.export, "writable": writable});
        if let Some(p) = base {
            // QEMU exports a recording bitmap only on a writable export,
            // and the restore's own writes must not reach what it reads:
            // a disabled copy, taken while nothing writes (the VM paused,
            // or the stop hook run).
            let copy = names.of(&format!("{kind}-since"), p);
            w.session.qmp.execute(
                "transaction",
                json!({"actions": [
                    {"type": "block-dirty-bitmap-add",
                     "data": {"node": node, "name": copy, "disabled": true}},
                    {"type": "block-dirty-bitmap-merge",
                     "data": {"node": node, "target": copy, "bitmaps": [names.checkpoint(p)]}}]}),
            )?;
            w.since_bitmap = Some(copy.clone());
            export["bitmaps"] = json!([copy]);
        }
        w.session.qmp.execute("block-export-add", export)?;
        let uri = crate::nbd::NbdUri {
            address: crate::nbd::NbdAddress::Unix(socket),
            export: w.export.clone(),
        };
        let context = w
            .since_bitmap
            .as_ref()
            .map(|b| format!("qemu:dirty-bitmap:{b}"));
        let mut contexts = vec![BASE_ALLOCATION];
        contexts.extend(context.as_deref());
        let client = uri.connect(&contexts)?;
        if let (Some(p), Some(context)) = (base, &context) {
            w.since = Some((
                p,
                crate::nbd::bitmap_of(&client, context, size, granularity)?,
            ));
        }
        w.disk = Some(NbdDisk::from_client(client, uri.to_string()));
        Ok(w)
    }

    /// Removes the export and a server blocksnap started, whatever step
    /// of `open` got there (a failed one included); every step tried.
    fn close(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        self.disk = None;
        let export = self.export.clone();
        let mut first = None;
        keep_first(&mut first, self.session.del_export(&export));
        if let Some(copy) = self.since_bitmap.take() {
            keep_first(&mut first, self.session.remove_bitmap(&copy));
        }
        if let Some(sock) = self.own_server.take() {
            keep_first(
                &mut first,
                self.session.qmp.execute("nbd-server-stop", json!({})),
            );
            let _ = std::fs::remove_file(sock);
        }
        first.map_or(Ok(()), Err)
    }

    fn nbd(&self) -> &NbdDisk {
        self.disk.as_ref().expect("open until dropped")
    }
}

impl Drop for Writable {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl crate::disk::Disk for Writable {
    fn len(&self) -> Result<u64> {
        self.nbd().len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.nbd().read_at(buf, offset)
    }
    fn read_many_at(&self, parts: &mut [(u64, &mut [u8])]) -> Result<()> {
        self.nbd().read_many_at(parts)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.nbd().write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.nbd().write_zeroes(offset, len)
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.nbd().set_len(len)
    }
    fn is_block_device(&self) -> bool {
        true
    }
    fn sync(&self) -> Result<()> {
        self.nbd().sync()
    }
    fn data_ranges(&self) -> Result<Option<Vec<std::ops::Range<u64>>>> {
        self.nbd().data_ranges()
    }
    fn reads_best_in_bulk(&self) -> bool {
        true
    }
    fn path(&self) -> &Path {
        &self.path
    }
}
