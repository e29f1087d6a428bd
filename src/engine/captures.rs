//! Captures: reserve a slot, read the disk into chunks and a manifest, and
//! commit the snapshot completed (the durability order in `engine`).

use std::time::SystemTime;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::catalog::{Change, SnapshotRecord};
use crate::dirty::DirtyBitmap;
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::ids::{ServerId, SnapshotId};
use crate::job::{Job, Progress};
use crate::manifest::Manifest;
use crate::policy::{self, check_cap};
use crate::sorted::SortedIds;
use crate::store::Pins;
use crate::tracking::Tracker;
use crate::types::{CaptureKind, CaptureStats, FullReason, SnapshotKind, SnapshotStatus};

use super::Engine;
use super::state::check_parent;
use super::tracking::{new_tracker, tracked_mode};
use crate::capture::{self, CapturePlan, CaptureSettings};
use crate::types::{CaptureJob, Snapshot};

/// How a capture finds the disk's blocks.
pub(super) enum CaptureMode {
    Full(Option<FullReason>),
    Incremental {
        parent: SnapshotId,
        dirty: DirtyBitmap,
        /// The tracking generation the bitmap came from; `None` when the
        /// caller passed it (then a missing parent is an error, not a
        /// reason to read everything).
        generation: Option<u64>,
    },
}

pub(super) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

pub(super) fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Engine {
    /// Captures a snapshot of `server` and returns it once completed.
    pub fn create_snapshot(
        &self,
        server: ServerId,
        name: &str,
        description: &str,
    ) -> Result<Snapshot> {
        self.start_snapshot(server, name, description)?.wait()
    }

    /// Reserves a snapshot slot and id at once and captures in the
    /// background. The returned job holds the `in_progress` snapshot.
    ///
    /// The checks (name, server, restoring, the five-snapshot cap) and the
    /// reservation are one step under the state lock, committed to the
    /// catalog before this returns: racing callers never make a sixth.
    ///
    /// With change tracking on and a trusted tracker for the server, the
    /// capture is incremental from the tracked snapshot; otherwise every
    /// block is read (the snapshot's stats say why).
    pub fn start_snapshot(
        &self,
        server: ServerId,
        name: &str,
        description: &str,
    ) -> Result<CaptureJob> {
        self.start_capture(server, name, description, None, SnapshotKind::Regular)
    }

    /// Captures a snapshot that reads only the blocks `dirty` marks and
    /// takes every other block from `parent`, a completed snapshot of the
    /// same server and disk length; returns it once completed. A sample of
    /// the clean blocks is rehashed first (see
    /// [`EngineOptions::clean_sample_rate`]); if any changed, the capture
    /// reads everything and its stats say so.
    ///
    /// A bitmap that misses a written block is the caller's bug: the
    /// snapshot keeps the parent's bytes for that block, unless the sample
    /// happens to catch it.
    pub fn create_incremental(
        &self,
        server: ServerId,
        name: &str,
        description: &str,
        parent: SnapshotId,
        dirty: DirtyBitmap,
    ) -> Result<Snapshot> {
        self.start_incremental(server, name, description, parent, dirty)?
            .wait()
    }

    /// [`Engine::create_incremental`] in the background.
    pub fn start_incremental(
        &self,
        server: ServerId,
        name: &str,
        description: &str,
        parent: SnapshotId,
        dirty: DirtyBitmap,
    ) -> Result<CaptureJob> {
        self.start_capture(
            server,
            name,
            description,
            Some((parent, dirty)),
            SnapshotKind::Regular,
        )
    }

    pub(super) fn start_capture(
        &self,
        server: ServerId,
        name: &str,
        description: &str,
        explicit: Option<(SnapshotId, DirtyBitmap)>,
        kind: SnapshotKind,
    ) -> Result<CaptureJob> {
        policy::check_snapshot_name(name)?;
        policy::check_description(description)?;
        self.writable("taking a snapshot")?;
        let inner = &self.inner;
        let disk_path = inner.state.lock().server(server)?.disk.clone();
        // A QEMU disk is frozen and opened by the job itself, once the
        // snapshot's id (its checkpoint's name) is known.
        let live = crate::live::disk_of(&disk_path)?;
        if live.is_some() && explicit.is_some() {
            return Err(Error::InvalidParameter(format!(
                "server {server} is a QEMU disk: its snapshots are incremental from QEMU's own \
                 checkpoint bitmaps, so a dirty bitmap cannot be given"
            )));
        }
        let disk = match live {
            Some(_) => None,
            None => Some((inner.options.disk_opener)(&disk_path, false)?),
        };
        let disk_len = match &disk {
            Some(d) => d.len()?,
            None => 0,
        };
        let progress = Arc::new(Progress::default());
        // Allocated before any lock; its base is set once the id is known.
        let fresh = if inner.options.change_tracking && live.is_none() {
            Some(new_tracker(SnapshotId(0), disk_len, inner.block_size)?)
        } else {
            None
        };
        let (record, mode, previous, snapshot, live_parent) = {
            let mut state = inner.state.lock();
            let srv = state.server(server)?;
            // A live capture is incremental from the newest completed
            // snapshot, when its checkpoint is on the node.
            let live_parent = state.newest_completed(server);
            // A safety snapshot is the first step of a restore, and the
            // engine's own: neither the restore nor the cap stops it.
            let fleet = inner.options.coordinator.as_ref();
            if kind == SnapshotKind::Regular {
                state.check_not_restoring(srv)?;
                // In a fleet, the fleet's catalog holds the cap.
                if fleet.is_none() {
                    check_cap(server, state.snapshots_of(server), |id| {
                        state.in_doubt.contains(&id)
                    })?;
                }
            }
            if let Some((parent, dirty)) = &explicit {
                check_parent(&state, server, *parent, dirty, disk_len, inner.block_size)?;
            }
            let id = match fleet {
                Some(c) => c.reserve(server, name, description, kind)?,
                None => SnapshotId(state.next_snapshot_id),
            };
            let record = SnapshotRecord {
                id,
                server_id: server,
                name: name.to_string(),
                description: description.to_string(),
                status: SnapshotStatus::InProgress,
                created_at: now_rfc3339(),
                stats: None,
                error: None,
                kind,
            };
            // The id is spent whatever the commit says: one that reported
            // an error may have landed, and ids are never reused.
            state.next_snapshot_id = state.next_snapshot_id.max(id.0 + 1);
            let next = state.next_snapshot_id;
            let committed = inner
                .catalog
                .commit(&[Change::PutSnapshot(&record), Change::NextSnapshotId(next)]);
            if let (Err(_), Some(c)) = (&committed, fleet) {
                c.abandon(server, id);
            }
            committed?;
            state.snapshots.insert(id, record.clone());
            state.progress.insert(id, progress.clone());
            // Writes from now on are relative to this capture.
            let previous = fresh.and_then(|mut t| {
                t.base = id;
                inner.tracking.lock().begin(server, t)
            });
            let mode = match explicit {
                Some((parent, dirty)) => CaptureMode::Incremental {
                    parent,
                    dirty,
                    generation: None,
                },
                None => tracked_mode(&state, previous.as_ref(), disk_len),
            };
            if let CaptureMode::Incremental { parent, .. } = &mode {
                state.capture_parents.insert(id, *parent);
            }
            let view = state.snapshot_view(&record);
            (record, mode, previous, view, live_parent)
        };
        let engine = self.clone();
        let job_progress = progress.clone();
        let id = record.id;
        let finisher = self.clone();
        // Pinned until the snapshot is completed and counted (or failed).
        let pins = inner.store.pin_scope();
        let job_pins = pins.clone();
        let job = Job::spawn(
            format!("capture-{id}"),
            progress,
            move || match (live, disk) {
                (Some(q), _) => {
                    engine.run_live_capture(&record, &q, live_parent, &job_pins, &job_progress)
                }
                (None, Some(disk)) => {
                    engine.run_capture(&record, disk.as_ref(), mode, &job_pins, &job_progress)
                }
                (None, None) => Err(Error::Internal("a capture without a disk".into())),
            },
            move |outcome| {
                let done = finisher.finish_capture(id, outcome, previous);
                drop(pins);
                // Best effort: until it is written, the chunks are found
                // in memory, and the next open reads their packs.
                let _ = finisher.inner.store.persist_index_if_due();
                done
            },
        )
        .inspect_err(|e| {
            let _ = self.finish_capture(id, Err(Error::Internal(e.to_string())), None);
        })?;
        Ok(CaptureJob { snapshot, job })
    }

    /// A live capture of a QEMU disk: freeze, read the frozen view (only
    /// what changed since `parent` when its checkpoint allows), tear down.
    fn run_live_capture(
        &self,
        rec: &SnapshotRecord,
        disk: &crate::live::QemuDisk,
        parent: Option<(SnapshotId, u64)>,
        pins: &Pins,
        progress: &Progress,
    ) -> Result<(CaptureStats, SortedIds)> {
        // The whole of it counts: the freeze and the teardown are part of
        // what a live capture costs.
        let started = std::time::Instant::now();
        let session =
            crate::live::Session::open(disk, &self.live_dir(rec.server_id), self.live_names()?)?;
        let frozen = session.freeze(rec.id, parent, u64::from(self.inner.block_size))?;
        let mode = match &frozen.since_parent {
            Ok((p, dirty)) => CaptureMode::Incremental {
                parent: *p,
                dirty: dirty.clone(),
                generation: None,
            },
            Err(reason) => CaptureMode::Full(Some(*reason)),
        };
        let freeze = frozen.freeze_micros;
        match self.run_capture(rec, &frozen.disk(), mode, pins, progress) {
            Ok((stats, chunks)) => {
                let scratch = frozen.scratch_bytes();
                frozen.finish(true)?;
                let stats = CaptureStats {
                    freeze_micros: Some(freeze),
                    scratch_bytes: scratch,
                    micros: started.elapsed().as_micros() as u64,
                    ..stats
                };
                Ok((stats, chunks))
            }
            Err(e) => {
                let _ = frozen.finish(false);
                Err(e)
            }
        }
    }

    /// Reads the disk and writes chunks and the manifest (steps 1 and 2 of
    /// the durability order).
    pub(super) fn run_capture(
        &self,
        rec: &SnapshotRecord,
        disk: &dyn Disk,
        mode: CaptureMode,
        pins: &Pins,
        progress: &Progress,
    ) -> Result<(CaptureStats, SortedIds)> {
        let started = std::time::Instant::now();
        let inner = &self.inner;
        let bs = inner.block_size;
        let settings = CaptureSettings {
            block_size: bs,
            compression_level: inner.compression_level.load(Ordering::Relaxed),
            window_len: inner.options.window_len,
            group_len: inner.group_len.load(Ordering::Relaxed) as usize,
        };
        let len = disk.len()?;
        // Holes of a sparse image are zero without reading.
        let data = disk.data_ranges()?;
        let mut how = CaptureStats::default();
        let full = |how: &mut CaptureStats, reason| {
            how.full_reason = reason;
            CapturePlan::full(len, bs, data.as_deref())
        };
        let plan = match mode {
            CaptureMode::Full(reason) => full(&mut how, reason),
            CaptureMode::Incremental {
                parent,
                dirty,
                generation,
            } => match inner.manifests.read(parent) {
                Err(e) if generation.is_none() => return Err(e),
                Err(_) => full(&mut how, Some(FullReason::BaseGone)),
                Ok(p) if p.image_len != len || p.block_size != bs => {
                    full(&mut how, Some(FullReason::DiskResized))
                }
                Ok(mut p) => {
                    // The plan's copy of it spills as it changes.
                    p.spill_beyond(inner.options.block_list_memory, inner.scratch_dir());
                    let runs = dirty.block_runs(bs)?;
                    let seed = rec.id.0 ^ started.elapsed().as_nanos() as u64 ^ now_nanos();
                    let rate = inner.options.clean_sample_rate;
                    let sample = capture::sample_check(disk, p.blocks(), &runs, bs, rate, seed)?;
                    how.sample_checked = sample.checked;
                    how.sample_mismatches = sample.mismatches;
                    if sample.mismatches > 0 {
                        full(&mut how, Some(FullReason::SampleMismatch))
                    } else {
                        how.kind = CaptureKind::Incremental;
                        how.parent = Some(parent);
                        how.tracking_generation = generation;
                        CapturePlan::incremental(p.blocks(), &runs, bs, data.as_deref())?
                    }
                }
            },
        };
        let mut plan = plan;
        // A dense disk's list of blocks goes to a scratch file as it grows.
        plan.base
            .spill_beyond(inner.options.block_list_memory, inner.scratch_dir());
        let captured = capture::capture(&inner.store, disk, &settings, plan, pins, progress)?;
        let synced = std::time::Instant::now();
        inner.store.sync_pinned(pins)?;
        let manifest = Manifest::new(
            rec.id,
            rec.server_id,
            bs,
            captured.stats.image_len,
            captured.blocks,
        )?;
        let manifest_path = inner.manifests.write(&manifest)?;
        let chunks = inner.chunks_of(&manifest)?;
        let mut stats = CaptureStats {
            micros: started.elapsed().as_micros() as u64,
            sync_micros: synced.elapsed().as_micros() as u64,
            kind: how.kind,
            parent: how.parent,
            full_reason: how.full_reason,
            sample_checked: how.sample_checked,
            sample_mismatches: how.sample_mismatches,
            tracking_generation: how.tracking_generation,
            freeze_micros: None,
            scratch_bytes: None,
            ..captured.stats
        };
        if let Some(fleet) = &inner.options.coordinator {
            // Every chunk the snapshot holds is then in a sealed pack.
            inner.store.seal_open_pack()?;
            let packs = inner.store.sealed_packs()?;
            let mut used = std::collections::BTreeSet::new();
            for id in chunks.iter() {
                let id = id?;
                let loc = inner
                    .store
                    .locate(&id)?
                    .ok_or(Error::ChunkMissing { chunk: id })?;
                used.insert(loc.pack);
            }
            let published = crate::coordinator::Published {
                server: rec.server_id,
                id: rec.id,
                manifest: &manifest_path,
                packs: &packs,
                used: &used,
                stats: &stats,
            };
            fleet.publish(&published)?;
            stats.micros = started.elapsed().as_micros() as u64;
        }
        Ok((stats, chunks))
    }

    /// Step 3: the catalog commit that marks the snapshot completed (or
    /// failed, with the reason).
    pub(super) fn finish_capture(
        &self,
        id: SnapshotId,
        outcome: Result<(CaptureStats, SortedIds)>,
        previous: Option<Tracker>,
    ) -> Result<Snapshot> {
        let mut state = self.inner.state.lock();
        state.progress.remove(&id);
        state.capture_parents.remove(&id);
        let (outcome, chunks) = match outcome {
            Ok((stats, chunks)) => (Ok(stats), chunks),
            Err(e) => (Err(e), SortedIds::from_vec(Vec::new())),
        };
        let mut rec = state.snapshot(id)?.clone();
        let server = rec.server_id;
        {
            let mut tracking = self.inner.tracking.lock();
            let ours = tracking.get(server).is_some_and(|t| t.base == id);
            if ours && outcome.is_ok() {
                if let Some(t) = tracking.get(server) {
                    t.pending = false;
                }
            } else if ours {
                // Not captured: the writes since count from the previous
                // base, which takes over first, so that no write falls in
                // between.
                match previous.filter(|p| !p.pending) {
                    Some(p) => {
                        let current = tracking.swap(server, p);
                        let merged = match (current, tracking.get(server)) {
                            (Some(c), Some(p)) => {
                                p.trusted &= c.trusted;
                                p.dirty.union_with(&c.dirty).is_ok()
                            }
                            _ => true,
                        };
                        if !merged {
                            tracking.remove(server);
                        }
                    }
                    None => {
                        tracking.remove(server);
                    }
                }
            }
        }
        match &outcome {
            Ok(stats) => {
                rec.status = SnapshotStatus::Completed;
                rec.stats = Some(*stats);
            }
            Err(e) => {
                rec.status = SnapshotStatus::Failed;
                rec.error = Some(e.to_string());
            }
        }
        if let (Err(_), Some(fleet)) = (&outcome, &self.inner.options.coordinator) {
            fleet.abandon(server, id);
        }
        let mut changes = vec![Change::PutSnapshot(&rec)];
        if outcome.is_ok() {
            let mut held = state.held();
            held.insert(id);
            changes.extend(self.count(&mut state, &held, |refs, size| refs.add(id, &chunks, size)));
        }
        let committed = self.inner.catalog.commit(&changes);
        drop(changes);
        if outcome.is_err() {
            // Not completed: its manifest, if written, must not outlive it.
            rec.status = SnapshotStatus::Failed;
            let _ = self.inner.manifests.remove(id);
        } else if let Err(e) = &committed {
            // A commit that reported an error may still have reached the
            // disk. Until the next open reads the truth (completed: kept;
            // in progress: failed, manifest removed), the snapshot is in
            // doubt: this process offers it as failed, but its manifest
            // stays and its chunks count as needed, so no collection or
            // delete in between can take what a completed snapshot needs.
            rec.status = SnapshotStatus::Failed;
            rec.error = Some(format!(
                "the catalog commit completing it failed ({e}); whether it completed is known when the store is opened again"
            ));
            state.in_doubt.insert(id);
        }
        state.snapshots.insert(id, rec.clone());
        // Best effort: until a table is written, the next open counts this
        // snapshot from its manifest.
        let _ = super::space::persist_refs_if_due(&self.inner, &mut state);
        committed?;
        outcome?;
        Ok(state.snapshot_view(&rec))
    }
}
