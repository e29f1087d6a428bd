//! Restores users can trust: planned before acting, undoable, resumable
//! and verified after writing.
//!
//! A restore runs: stop hook → safety snapshot of the disk as it is (unless
//! turned off, or resuming an interrupted restore) → mark the server
//! restoring (persisted) → plan (by difference from the safety snapshot or
//! from change tracking when the disk's state is known, else by reading
//! and comparing every block) → write the differing blocks, fsync → read
//! them back and check them → clear the mark, and replace the server's
//! previous safety snapshot with the new one.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::state::State;
use super::tracking::new_tracker;
use super::{Changed, Engine};
use crate::catalog::Change;
use crate::disk::{Disk, MemDisk};
use crate::error::{Error, Result};
use crate::ids::{ServerId, SnapshotId};
use crate::job::{Job, Progress};
use crate::manifest::Manifest;
use crate::restore::{self, RestoreMethod, RestorePlan, RestoreReport};
use crate::tracking::Tracker;
use crate::types::Server;
use crate::types::{SnapshotKind, SnapshotStatus};

/// Catalog `meta` keys of the rates measured by restores, for estimates.
const META_WRITE_RATE: &str = "restore_write_bytes_per_sec";
const META_COMPARE_RATE: &str = "restore_compare_bytes_per_sec";
/// Rates assumed until a restore of at least `RATE_MIN_BYTES` measured them.
const DEFAULT_WRITE_RATE: u64 = 400 << 20;
const DEFAULT_COMPARE_RATE: u64 = 1 << 30;
const RATE_MIN_BYTES: u64 = 64 << 20;

/// A restore running in the background.
pub type RestoreJob = Job<RestoreReport>;

/// How one restore runs. The default is the careful one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreOptions {
    /// Capture the disk as it is first, as a safety snapshot that
    /// [`Engine::undo_restore`] restores. Default: on. If the capture
    /// fails, nothing is written.
    pub safety_snapshot: bool,
    /// Read back every written block after the fsync and check it against
    /// the snapshot. Default: on.
    pub verify: bool,
}

impl RestoreOptions {
    /// Whether to take a safety snapshot first (default: on).
    pub fn safety_snapshot(mut self, on: bool) -> Self {
        self.safety_snapshot = on;
        self
    }

    /// Whether to read back and check every written block (default: on).
    pub fn verify(mut self, on: bool) -> Self {
        self.verify = on;
        self
    }
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            safety_snapshot: true,
            verify: true,
        }
    }
}

/// What a restore would do ([`Engine::plan_restore`]), without doing it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct RestorePlanReport {
    pub snapshot_id: SnapshotId,
    pub server_id: ServerId,
    pub method: RestoreMethod,
    pub blocks_total: u64,
    pub blocks_to_rewrite: u64,
    /// The blocks to rewrite as `[first, end)` runs of block indexes.
    pub runs: Vec<(u64, u64)>,
    pub bytes_to_write: u64,
    /// Bytes of the disk read and compared to make the plan.
    pub bytes_compared: u64,
    /// Whether the restore would first take a safety snapshot.
    pub safety_snapshot: bool,
    /// Estimated seconds to write and verify (and, by comparing, to plan
    /// again), from the rates the store's earlier restores measured, or
    /// conservative defaults before any (`rates_measured`). A safety
    /// snapshot's capture comes on top.
    pub estimated_seconds: f64,
    pub rates_measured: bool,
}

impl Engine {
    /// Restores a snapshot onto its server's disk with the default
    /// [`RestoreOptions`] and returns once the disk is durable and checked.
    pub fn restore_snapshot(&self, id: SnapshotId) -> Result<RestoreReport> {
        self.start_restore(id)?.wait()
    }

    /// [`Engine::restore_snapshot`] with options.
    pub fn restore_snapshot_with(
        &self,
        id: SnapshotId,
        options: RestoreOptions,
    ) -> Result<RestoreReport> {
        self.start_restore_with(id, options)?.wait()
    }

    /// Starts restoring a completed snapshot with the default options.
    pub fn start_restore(&self, id: SnapshotId) -> Result<RestoreJob> {
        self.start_restore_with(id, RestoreOptions::default())
    }

    /// Starts restoring a completed snapshot onto its server's disk.
    ///
    /// Refused while the server captures or restores, or while the snapshot
    /// is not completed. The job runs the steps in the module doc. If it
    /// fails after writing, the server stays marked restoring (and new
    /// captures of it are refused) until a restore succeeds; running the
    /// same restore again finishes it, rewriting only what still differs.
    /// No other snapshot of the server is changed or deleted, except that a
    /// successful restore replaces the server's previous safety snapshot.
    pub fn start_restore_with(
        &self,
        id: SnapshotId,
        options: RestoreOptions,
    ) -> Result<RestoreJob> {
        self.writable("restoring a snapshot")?;
        let server = {
            let mut state = self.inner.state.lock();
            let server = restorable(&state, id)?;
            state.live_restores.insert(server.id, id);
            server
        };
        let engine = self.clone();
        let progress = Arc::new(Progress::default());
        let job_progress = progress.clone();
        let finisher = self.clone();
        let server_id = server.id;
        Job::spawn(
            format!("restore-{id}"),
            progress,
            move || engine.run_restore(&server, id, options, &job_progress),
            move |outcome: Result<RestoreReport>| {
                finisher.end_restore(server_id, id, outcome.is_ok());
                // Once the restore is over (its own source may be the old
                // safety snapshot, as in an undo), the new one replaces it.
                if let Some(new) = outcome.as_ref().ok().and_then(|r| r.safety_snapshot) {
                    finisher.replace_safety_snapshots(server_id, new);
                }
                outcome
            },
        )
        .inspect_err(|_| self.end_restore(server_id, id, false))
    }

    /// Undoes the last restore of `server`: restores its safety snapshot
    /// (taking a new one first, so the undo can be undone in turn).
    pub fn undo_restore(&self, server: ServerId) -> Result<RestoreReport> {
        let safety = {
            let state = self.inner.state.lock();
            state.server(server)?;
            state
                .snapshots_of(server)
                .filter(|s| s.kind == SnapshotKind::Safety)
                .filter(|s| s.status == SnapshotStatus::Completed)
                .map(|s| s.id)
                .max()
        };
        let Some(id) = safety else {
            return Err(Error::WrongState(format!(
                "server {server} has no safety snapshot: no restore with one has run, or it was deleted"
            )));
        };
        self.restore_snapshot(id)
    }

    /// What restoring `id` would do now, without writing anything: the
    /// blocks it would rewrite, the bytes, and an estimate of the time.
    /// The restore itself then makes the same plan (if the disk does not
    /// change in between).
    pub fn plan_restore(
        &self,
        id: SnapshotId,
        options: RestoreOptions,
    ) -> Result<RestorePlanReport> {
        let (server, tracker, resuming) = {
            let state = self.inner.state.lock();
            let server = restorable(&state, id)?;
            let resuming = state.server(server.id)?.restoring_from.is_some()
                && !state.restoring_in_doubt.contains(&server.id);
            let tracker = self.inner.tracking.lock().folded(server.id).cloned();
            (server, tracker, resuming)
        };
        let manifest = self.checked_manifest(server.id, id)?;
        let (disk, checkpoint) = match self.open_disk(server.id, &server.disk, false) {
            Ok(d) => d,
            // A disk that does not exist yet is restored whole.
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                (Box::new(MemDisk::new(Vec::new())) as Box<dyn Disk>, None)
            }
            Err(e) => return Err(e),
        };
        let known = self.known_state(tracker, checkpoint, &manifest, disk.as_ref())?;
        let plan = match &known {
            Some((base, dirty)) => restore::plan_delta(base, dirty, &manifest)?,
            None => restore::plan(
                &manifest,
                disk.as_ref(),
                self.inner.options.window_len,
                &Progress::default(),
            )?,
        };
        let method = if known.is_some() {
            RestoreMethod::Delta
        } else {
            RestoreMethod::Compare
        };
        let safety = options.safety_snapshot && !resuming;
        let (estimated_seconds, rates_measured) = self.estimate(
            &plan,
            options.verify,
            method == RestoreMethod::Compare && !safety,
        )?;
        Ok(RestorePlanReport {
            snapshot_id: id,
            server_id: server.id,
            method,
            blocks_total: plan.blocks_total,
            blocks_to_rewrite: plan.rewrite.len(),
            runs: plan.rewrite.runs(),
            bytes_to_write: plan.bytes_to_write,
            bytes_compared: plan.bytes_compared,
            safety_snapshot: safety,
            estimated_seconds,
            rates_measured,
        })
    }

    /// Seconds to apply `plan` at the measured (or default) rates.
    fn estimate(&self, plan: &RestorePlan, verify: bool, compare: bool) -> Result<(f64, bool)> {
        let catalog = &self.inner.catalog;
        let write = catalog.meta(META_WRITE_RATE)?;
        let read = catalog.meta(META_COMPARE_RATE)?;
        let measured = write.is_some() && read.is_some();
        let write = write.unwrap_or(DEFAULT_WRITE_RATE).max(1) as f64;
        let read = read.unwrap_or(DEFAULT_COMPARE_RATE).max(1) as f64;
        let mut secs = plan.bytes_to_write as f64 / write;
        if verify {
            secs += plan.bytes_to_write as f64 / read;
        }
        if compare {
            secs += plan.bytes_compared as f64 / read;
        }
        Ok((secs, measured))
    }

    /// After a restore: tracking goes on from the restored snapshot, or,
    /// when the restore failed, stops (the disk's state is unknown).
    pub(super) fn end_restore(&self, server: ServerId, id: SnapshotId, ok: bool) {
        let mut state = self.inner.state.lock();
        state.live_restores.remove(&server);
        let mut tracking = self.inner.tracking.lock();
        if let Some(t) = tracking.get(server).filter(|t| t.base == id) {
            if ok {
                t.pending = false;
            } else {
                tracking.remove(server);
            }
        }
    }

    /// Persists (or clears) the mark saying the server's disk is being
    /// restored from `snapshot`.
    fn set_restoring_from(&self, server: ServerId, snapshot: Option<SnapshotId>) -> Result<()> {
        let mut state = self.inner.state.lock();
        let mut rec = state.server(server)?.clone();
        if rec.restoring_from == snapshot && !state.restoring_in_doubt.contains(&server) {
            return Ok(());
        }
        rec.restoring_from = snapshot;
        let committed = self.inner.catalog.commit(&[Change::PutServer(&rec)]);
        match (&committed, snapshot) {
            (Ok(()), _) => {
                state.restoring_in_doubt.remove(&server);
                state.servers.insert(server, rec);
            }
            // The mark may be on disk: keep it here too (the server stays
            // restoring, as the next open would say), and commit it again
            // before any restore writes.
            (Err(_), Some(_)) => {
                state.restoring_in_doubt.insert(server);
                state.servers.insert(server, rec);
            }
            // Clearing it failed: it stays set, here as on disk.
            (Err(_), None) => {}
        }
        committed
    }

    /// Snapshot `id`'s manifest, checked against its catalog entry (of a
    /// snapshot of `server`).
    pub(super) fn checked_manifest(&self, server: ServerId, id: SnapshotId) -> Result<Manifest> {
        let inner = &self.inner;
        let manifest = inner.manifests.read(id)?;
        if manifest.block_size != inner.block_size || manifest.server != server {
            return Err(Error::corrupt(
                inner.manifests.path(id),
                "manifest does not match its catalog entry (block size or server)",
            ));
        }
        Ok(manifest)
    }

    fn run_restore(
        &self,
        server: &Server,
        id: SnapshotId,
        options: RestoreOptions,
        progress: &Progress,
    ) -> Result<RestoreReport> {
        let started = std::time::Instant::now();
        let inner = &self.inner;
        if let Some(hook) = &inner.options.stop_hook {
            hook(server).map_err(|reason| Error::StopHook {
                server: server.id,
                reason,
            })?;
        }
        // A running VM is paused before its disk is captured (the safety
        // snapshot, which the restore then plans from, must be the disk as
        // it will be written) and left paused.
        let qemu = crate::live::disk_of(&server.disk)?;
        let vm_paused = match &qemu {
            Some(q) => {
                crate::live::check_writable(q, &self.live_dir(server.id), self.live_names()?)?;
                crate::live::pause(q)?
            }
            None => false,
        };
        let manifest = self.checked_manifest(server.id, id)?;
        // A restore that was interrupted after it began writing resumes: the
        // disk is half-restored, and a safety snapshot of it would replace
        // the one taken before the first attempt.
        // (A mark whose commit failed, in doubt, was never acted on: no
        // write followed it, so this is no resumption.)
        let resuming = {
            let state = inner.state.lock();
            state.server(server.id)?.restoring_from.is_some()
                && !state.restoring_in_doubt.contains(&server.id)
        };
        let safety = if options.safety_snapshot && !resuming {
            self.take_safety_snapshot(server, id)
                .map_err(|e| Error::SafetySnapshot {
                    server: server.id,
                    source: Box::new(e),
                })?
        } else {
            None
        };
        // Writes from now on are relative to the restored snapshot. (A
        // QEMU disk's writes are QEMU's to track, in its checkpoint.)
        let previous = if inner.options.change_tracking && qemu.is_none() {
            let fresh = new_tracker(id, manifest.image_len, inner.block_size)?;
            inner.tracking.lock().begin(server.id, fresh)
        } else {
            // Tracked by no one in this process, the disk is about to change
            // behind the tracker a tracking process saved: it goes first.
            if inner.catalog.has_tracking(server.id)? {
                inner.catalog.commit(&[Change::RemoveTracking(server.id)])?;
            }
            None
        };
        self.set_restoring_from(server.id, Some(id))?;
        let mut written = 0;
        let outcome = (|| {
            let (disk, checkpoint) = self.open_disk(server.id, &server.disk, true)?;
            // Just captured with the guest stopped, the safety snapshot is
            // exactly the disk: plan by difference, without reading it again.
            let known = match safety {
                Some(s) => Some((inner.manifests.read(s)?, Vec::new())),
                None => self.known_state(previous, checkpoint, &manifest, disk.as_ref())?,
            };
            restore::restore(
                &inner.store,
                &manifest,
                disk.as_ref(),
                known.as_ref().map(|(base, dirty)| (base, dirty.as_slice())),
                inner.options.window_len,
                options.verify,
                progress,
                &mut written,
            )
        })();
        // A failure before anything was written (or tried: a torn write
        // counts) leaves the disk as it was, unless an earlier attempt had
        // already half-restored it.
        if outcome.is_ok() || (written == 0 && !resuming) {
            self.set_restoring_from(server.id, None)?;
        }
        let mut report = outcome?;
        report.safety_snapshot = safety;
        report.vm_paused = vm_paused;
        report.micros = started.elapsed().as_micros() as u64;
        self.record_rates(&report);
        Ok(report)
    }

    /// Captures the server's disk as a safety snapshot. `None` when the disk
    /// does not exist (nothing to keep).
    fn take_safety_snapshot(
        &self,
        server: &Server,
        target: SnapshotId,
    ) -> Result<Option<SnapshotId>> {
        if is_missing(&server.disk) {
            return Ok(None);
        }
        let snap = self
            .start_capture(
                server.id,
                &format!("safety-before-restore-of-{target}"),
                &format!(
                    "the disk of server {} just before snapshot {target} was restored; `undo-restore` brings it back",
                    server.id
                ),
                None,
                SnapshotKind::Safety,
            )?
            .wait()?;
        Ok(Some(snap.id))
    }

    /// Deletes the server's safety snapshots other than `keep`: a
    /// successful restore replaces the previous one. Best effort: one that
    /// cannot be deleted now stays listed, and the next restore tries again.
    fn replace_safety_snapshots(&self, server: ServerId, keep: SnapshotId) {
        let old: Vec<SnapshotId> = {
            let state = self.inner.state.lock();
            state
                .snapshots_of(server)
                .filter(|s| s.kind == SnapshotKind::Safety && s.id != keep)
                .map(|s| s.id)
                .collect()
        };
        for id in old {
            let _ = self.delete_snapshot(id);
        }
    }

    /// Keeps the write and read rates of a large enough restore for later
    /// estimates.
    fn record_rates(&self, r: &RestoreReport) {
        let rate = |bytes: u64, micros: u64| bytes.saturating_mul(1_000_000) / micros.max(1);
        if r.bytes_written >= RATE_MIN_BYTES {
            let _ = self
                .inner
                .catalog
                .set_meta(META_WRITE_RATE, rate(r.bytes_written, r.write_micros));
        }
        let read = r.bytes_compared.max(if r.blocks_verified > 0 {
            r.bytes_written
        } else {
            0
        });
        let read_micros = if r.bytes_compared > 0 {
            r.plan_micros
        } else {
            r.verify_micros
        };
        if read >= RATE_MIN_BYTES {
            let _ = self
                .inner
                .catalog
                .set_meta(META_COMPARE_RATE, rate(read, read_micros));
        }
    }

    /// What the engine knows of the disk's current state, for a delta
    /// restore of `target`: a snapshot's manifest and the dirty block runs
    /// since, from the engine's own tracker when it is trusted, else from
    /// the QEMU checkpoint the disk's export reported (`checkpoint`).
    /// `None` (compare every block) without either, or unless the base,
    /// the target and the disk have one length.
    pub(super) fn known_state(
        &self,
        tracker: Option<Tracker>,
        checkpoint: Option<Changed>,
        target: &Manifest,
        disk: &dyn Disk,
    ) -> Result<Option<(Manifest, Vec<std::ops::Range<u64>>)>> {
        let Some((base_id, dirty)) = tracker
            .filter(|t| t.trusted && !t.pending)
            .map(|t| (t.base, t.dirty))
            .or(checkpoint)
        else {
            return Ok(None);
        };
        let completed = self
            .inner
            .state
            .lock()
            .snapshots
            .get(&base_id)
            .is_some_and(|s| s.status == SnapshotStatus::Completed);
        let Some(base) = completed
            .then(|| self.inner.manifests.read(base_id).ok())
            .flatten()
        else {
            return Ok(None);
        };
        let len = target.image_len;
        if base.image_len != len || dirty.disk_len() != len || disk.len()? != len {
            return Ok(None);
        }
        Ok(Some((base, dirty.block_runs(self.inner.block_size)?)))
    }
}

/// The server a restore of `id` would write, if it may start now.
fn restorable(state: &State, id: SnapshotId) -> Result<Server> {
    let server_id = state.completed(id, "can be restored")?.server_id;
    let srv = state.server(server_id)?;
    if let Some(capturing) = state.capturing(server_id) {
        return Err(Error::Busy {
            server: server_id,
            operation: format!("capturing snapshot {capturing}"),
        });
    }
    if let Some(other) = state.live_restores.get(&server_id) {
        return Err(Error::Busy {
            server: server_id,
            operation: format!("being restored from snapshot {other}"),
        });
    }
    Ok(state.server_view(srv))
}

/// True for an image file that does not exist; a disk reached over NBD or
/// QEMU is never missing (its export fails to open instead).
fn is_missing(path: &Path) -> bool {
    if crate::disk::is_remote(path) {
        return false;
    }
    matches!(std::fs::metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}
