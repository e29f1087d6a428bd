//! blocksnap: point-in-time snapshots of server disks, as an in-process
//! storage engine.
//!
//! A disk (raw image file or block device) is cut into fixed-size blocks;
//! each block is hashed with BLAKE3 and stored once however many snapshots or
//! servers share it, compressed with zstd, framed with CRC32 in append-only
//! packs, and listed in an immutable manifest. Restore rewrites only the
//! blocks that differ. A server keeps at most five snapshots.
//!
//! Snapshots and restores cost what changed, not the disk's size, when the
//! engine knows what the guest wrote: from a hypervisor's dirty bitmap
//! ([`DirtyBitmap`], [`Engine::create_incremental`]) or from writes the
//! embedder reports ([`Engine::record_write`]).
//!
//! ```
//! use blocksnap::{Engine, ServerId};
//!
//! # fn main() -> blocksnap::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let disk = dir.path().join("disk.img");
//! std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
//!
//! let engine = Engine::open(dir.path().join("store"))?;
//! engine.add_server(ServerId(1), "web-01", &disk)?;
//! let snap = engine.create_snapshot(ServerId(1), "before-update", "")?;
//!
//! std::fs::write(&disk, vec![9u8; 1 << 20]).unwrap(); // the update goes wrong
//! let report = engine.restore_snapshot(snap.id)?;
//! assert_eq!(report.blocks_rewritten, 16); // every 64 KiB block differed
//! assert_eq!(std::fs::read(&disk).unwrap(), vec![7u8; 1 << 20]);
//! # Ok(())
//! # }
//! ```

#[cfg(not(target_os = "linux"))]
compile_error!(
    "blocksnap targets Linux: it relies on SEEK_DATA/SEEK_HOLE, hole punching, flock and \
     Linux's fsync semantics"
);

// The README's example runs as a doctest, so it cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod blockmap;
#[cfg(feature = "s3")]
pub mod bucket;
mod capture;
mod catalog;
mod compression;
#[cfg_attr(not(feature = "s3"), allow(dead_code))]
mod coordinator;
mod dirty;
pub mod disk;
mod engine;
mod error;
#[cfg(feature = "s3")]
pub mod fleet;
pub mod fsio;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod hotcore;
#[cfg(feature = "server")]
pub mod http;
mod ids;
mod job;
mod le;
pub mod live;
mod manifest;
pub mod nbd;
mod options;
mod policy;
mod refs;
mod restore;
mod rng;
#[cfg(feature = "sample")]
pub mod sample;
mod sorted;
mod store;
mod table;
mod tracking;
mod types;
mod verify;
mod window;

pub use compression::Compression;
pub use dirty::DirtyBitmap;
pub use engine::{
    Engine, ExportJob, ExportReport, ExportTarget, RestoreJob, RestoreOptions, RestorePlanReport,
};
pub use error::{Error, ErrorClass, Result};
pub use ids::{ChunkId, ServerId, SnapshotId};
pub use job::{Job, Progress};
pub use options::{
    DEFAULT_BLOCK_SIZE, DEFAULT_CLEAN_SAMPLE_RATE, DEFAULT_GC_MAX_UNUSED, DEFAULT_WINDOW_LEN,
    EngineOptions, StopHook,
};
pub use policy::{MAX_DESCRIPTION_LEN, MAX_NAME_LEN, MAX_SNAPSHOTS_PER_SERVER};
pub use restore::{RestoreMethod, RestoreReport};
pub use store::IndexInfo;
pub use store::gc::GcReport;
pub use tracking::TrackingStatus;
pub use types::{
    CaptureJob, CaptureKind, CaptureStats, FullReason, OpenReport, Server, ServerRef, ServerState,
    Snapshot, SnapshotKind, SnapshotStatus, StoreStats,
};
pub use verify::{BadChunk, BadManifest, VerifyReport};

// What an embedder shares between threads, checked at compile time.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Engine>();
    shared::<CaptureJob>();
    shared::<RestoreJob>();
    shared::<ExportJob>();
    shared::<Error>();
    shared::<Snapshot>();
    shared::<RestoreReport>();
    shared::<RestorePlanReport>();
    shared::<GcReport>();
    shared::<VerifyReport>();
    shared::<StoreStats>();
    shared::<OpenReport>();
};
