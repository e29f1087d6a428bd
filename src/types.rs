//! What the engine shows its callers: servers, snapshots and their
//! states, capture stats, jobs and reports. Below every other module but
//! the ids, jobs and pipeline reports it names.

use std::path::PathBuf;
use std::sync::Arc;

use crate::compression::Compression;
use crate::error::Result;
use crate::ids::{ServerId, SnapshotId};
use crate::job::{Job, Progress};

use serde::{Deserialize, Serialize};

/// What a server is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    Idle,
    Capturing,
    /// A restore is running, or one was interrupted and must be run again.
    Restoring,
}

impl ServerState {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Idle => "idle",
            ServerState::Capturing => "capturing",
            ServerState::Restoring => "restoring",
        }
    }
}

/// A registered server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Server {
    pub id: ServerId,
    pub name: String,
    pub disk: PathBuf,
    #[serde(rename = "status")]
    pub state: ServerState,
    /// The snapshot an unfinished restore was writing, if any.
    pub restoring_from: Option<SnapshotId>,
    /// The account that owns it.
    pub account: String,
}

/// A server as a snapshot names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ServerRef {
    pub id: ServerId,
    pub name: String,
}

/// A snapshot. Serializes to exactly the snapshot object of the Snapshots
/// API (docs/openapi.yaml); the extra fields are for library users.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Snapshot {
    pub id: SnapshotId,
    pub server: ServerRef,
    pub name: String,
    pub status: SnapshotStatus,
    pub size_mb: Option<u64>,
    pub created_at: String,
    pub description: String,
    /// What the capture found and stored (completed snapshots).
    #[serde(skip)]
    pub stats: Option<CaptureStats>,
    /// Why the capture failed (failed snapshots).
    #[serde(skip)]
    pub error: Option<String>,
    /// Stored bytes only this snapshot references: what deleting it alone
    /// would give back after garbage collection. Known once space is
    /// accounted ([`Engine::account_space`]); completed snapshots only.
    #[serde(skip)]
    pub exclusive_bytes: Option<u64>,
    /// `Safety` for the snapshot a restore took of the disk before writing
    /// it (see [`Engine::undo_restore`]); it does not count toward the cap.
    #[serde(skip)]
    pub kind: SnapshotKind,
}

/// What `open` found and repaired.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct OpenReport {
    /// Captures a crash interrupted, now `failed`.
    pub failed_captures: Vec<SnapshotId>,
    /// Servers whose restore a crash interrupted: run it again.
    pub interrupted_restores: Vec<(ServerId, SnapshotId)>,
    /// Packs left unsealed by a crash, now sealed, and torn bytes cut.
    pub packs_recovered: u64,
    pub bytes_cut: u64,
    /// Packs that could not be read at all.
    pub unreadable_packs: Vec<String>,
    /// Packs whose chunks open read (those the chunk index table does not
    /// cover), why the table was rebuilt from the packs when it was, and
    /// why a new one could not be written when it could not.
    pub packs_indexed: u64,
    pub index_rebuilt: Option<String>,
    pub index_unsaved: Option<String>,
}

/// A capture running in the background.
pub struct CaptureJob {
    /// The snapshot as created: `in_progress`.
    pub snapshot: Snapshot,
    pub(super) job: Job<Snapshot>,
}

impl CaptureJob {
    /// `(done, total)` bytes of the disk read so far.
    pub fn progress(&self) -> (u64, u64) {
        self.job.progress()
    }

    /// The shared progress counter.
    pub fn progress_handle(&self) -> Arc<Progress> {
        self.job.progress_handle()
    }

    /// True once the capture has ended.
    pub fn is_finished(&self) -> bool {
        self.job.is_finished()
    }

    /// Waits for the capture; returns the completed snapshot, or the error
    /// that made it `failed`.
    pub fn wait(self) -> Result<Snapshot> {
        self.job.wait()
    }
}

/// Sizes and ratios of a whole store ([`Engine::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct StoreStats {
    /// Completed snapshots.
    pub snapshots: u64,
    /// Sum of their disks' lengths, and of their non-zero data.
    pub logical_bytes: u64,
    pub data_bytes: u64,
    /// Pack bytes on disk.
    pub stored_bytes: u64,
    /// Bytes of the chunks the snapshots need, and how many.
    pub live_bytes: u64,
    pub live_chunks: u64,
    /// Bytes of chunks no snapshot needs: what `gc` can give back.
    pub reclaimable_bytes: u64,
    /// Snapshots' data over the distinct data stored.
    pub dedup_ratio: f64,
    /// Distinct data over the bytes it takes in packs.
    pub compression_ratio: f64,
    /// The store's setting for new chunks: zstd level, and bytes of new
    /// chunks compressed together (0: one frame per chunk).
    pub compression: Compression,
    /// The chunk index: its table on disk and what is in memory.
    pub index: crate::store::IndexInfo,
}

/// Lifecycle of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotStatus {
    InProgress,
    Completed,
    Failed,
}

impl SnapshotStatus {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotStatus::InProgress => "in_progress",
            SnapshotStatus::Completed => "completed",
            SnapshotStatus::Failed => "failed",
        }
    }
}

/// How a capture found the disk's blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CaptureKind {
    /// Every block read and hashed (holes of a sparse image excepted).
    #[default]
    Full,
    /// Only the blocks a dirty bitmap marks read; the rest taken from the
    /// parent snapshot.
    Incremental,
}

/// Why a capture read the whole disk although it could have been
/// incremental.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FullReason {
    /// No change tracking for the server yet (no snapshot or restore since
    /// the store was opened, or the first snapshot).
    NoTracking,
    /// The tracked bitmap was not handed over cleanly (the engine was not
    /// closed cleanly), so it may miss writes.
    Untrusted,
    /// The snapshot the tracking started from was deleted or failed.
    BaseGone,
    /// The disk's length changed since that snapshot.
    DiskResized,
    /// Rehashing a sample of the blocks the bitmap called clean found some
    /// changed: the bitmap missed writes.
    SampleMismatch,
    /// A live capture of a QEMU disk: the parent snapshot has no checkpoint
    /// bitmap on the node (the first live snapshot, or it was removed).
    NoCheckpoint,
    /// A live capture of a QEMU disk: the parent's checkpoint bitmap is
    /// marked inconsistent (QEMU did not exit cleanly since).
    CheckpointInconsistent,
    /// A live capture of a QEMU disk: the parent's checkpoint bitmap was
    /// disabled (by hand, or another tool), so it may miss writes.
    CheckpointNotRecording,
}

impl FullReason {
    /// Words for users.
    pub fn describe(self) -> &'static str {
        match self {
            FullReason::NoTracking => "no change tracking yet",
            FullReason::Untrusted => "change tracking was not handed over cleanly",
            FullReason::BaseGone => "the tracked snapshot is gone",
            FullReason::DiskResized => "the disk changed length",
            FullReason::SampleMismatch => "a sample of blocks the bitmap called clean had changed",
            FullReason::NoCheckpoint => "no QEMU checkpoint bitmap for the parent snapshot",
            FullReason::CheckpointInconsistent => {
                "the QEMU checkpoint bitmap is inconsistent (QEMU did not exit cleanly)"
            }
            FullReason::CheckpointNotRecording => {
                "the QEMU checkpoint bitmap was disabled, so it may miss writes"
            }
        }
    }
}

/// What a completed capture found and stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct CaptureStats {
    pub kind: CaptureKind,
    /// The snapshot an incremental capture took its clean blocks from.
    pub parent: Option<SnapshotId>,
    /// Why a capture that could have been incremental read everything.
    pub full_reason: Option<FullReason>,
    /// Blocks and bytes read from the disk (holes and clean blocks are not).
    pub blocks_read: u64,
    pub bytes_read: u64,
    /// Blocks a dirty bitmap called clean that were rehashed as a check,
    /// and how many of them had changed.
    pub sample_checked: u64,
    pub sample_mismatches: u64,
    /// The change-tracking generation whose bitmap an incremental capture
    /// used (tracked captures only).
    pub tracking_generation: Option<u64>,
    /// Length of the disk in bytes.
    pub image_len: u64,
    /// Bytes in data (non-zero) blocks.
    pub data_bytes: u64,
    pub zero_blocks: u64,
    pub data_blocks: u64,
    /// Chunks this capture added to the store, and their size before and
    /// after compression (with record framing).
    pub new_chunks: u64,
    pub new_raw_bytes: u64,
    pub new_stored_bytes: u64,
    /// Wall time of the capture, in microseconds.
    pub micros: u64,
    /// Of which making it durable: the pack fsync and the manifest's
    /// write, fsync, rename and directory fsync.
    pub sync_micros: u64,
    /// A live capture of a QEMU disk: how long the freeze (the QMP
    /// transaction) took.
    pub freeze_micros: Option<u64>,
    /// A live capture: bytes the fleecing copied into its scratch image
    /// (what the guest overwrote while it ran).
    pub scratch_bytes: Option<u64>,
}

/// What a snapshot is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Taken by a user.
    #[default]
    Regular,
    /// The disk as it was just before a restore, taken by the engine so
    /// that the restore can be undone. Does not count toward the cap; the
    /// next successful restore of the server replaces it.
    Safety,
}

impl SnapshotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Regular => "regular",
            SnapshotKind::Safety => "safety",
        }
    }
}
