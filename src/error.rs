//! The library's one error type.
//!
//! Policy: every fallible public call returns [`Error`]. Each variant is
//! something a caller can act on (fix the input, pick another id, wait for a
//! job, repair the store), and its `Display` says what was wrong in one
//! sentence. Nothing read from disk or given by a caller is trusted: bad input
//! becomes [`Error::InvalidName`]/[`Error::InvalidParameter`], bad bytes on disk
//! become [`Error::Corruption`]; neither ever panics. I/O errors carry the path
//! they happened on. A fault inside the engine (a panic caught at a thread's
//! edge, a thread that cannot start) is [`Error::Internal`], never dressed up
//! as a caller's mistake.
//!
//! [`Error::class`] is the one place that decides whose the error is: the
//! command line's exit code (2 for the caller's, 1 for a fault) and the
//! HTTP status (404, 400, or 500 with a generic body) both come from it.

use std::path::PathBuf;

use crate::ids::{ChunkId, ServerId, SnapshotId};

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in blocksnap.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No server with this id is registered.
    #[error("server {0} does not exist")]
    ServerNotFound(ServerId),

    /// A server with this id is already registered.
    #[error("server {0} already exists")]
    ServerExists(ServerId),

    /// No snapshot with this id exists (never did, or was deleted).
    #[error("snapshot {0} does not exist")]
    SnapshotNotFound(SnapshotId),

    /// A snapshot or server name breaks the naming rule.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },

    /// Some other argument is out of range or malformed.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),

    /// The server already holds the maximum number of snapshots.
    #[error(
        "server {server} already has {limit} snapshots (the maximum); delete one before creating another"
    )]
    SnapshotLimit { server: ServerId, limit: usize },

    /// The server or snapshot is not in a state that allows the operation
    /// (and waiting will not change that: something must be done first).
    #[error("{0}")]
    WrongState(String),

    /// The server is busy with another operation; try again once it ends.
    #[error("server {server} is {operation}; wait for it to finish and try again")]
    Busy { server: ServerId, operation: String },

    /// The store was opened read-only ([`crate::EngineOptions::read_only`]).
    #[error("store {} is open read-only; {operation} needs it opened for writing", .path.display())]
    ReadOnly { path: PathBuf, operation: String },

    /// The disk changed under an operation that needs it still (its length
    /// changed during a capture).
    #[error("the disk changed during the operation: {0}; keep its length fixed and try again")]
    DiskChanged(String),

    /// A fault inside the engine: a panic caught where a thread ends, or a
    /// thread that could not start. Not the caller's doing.
    #[error("internal error: {0}")]
    Internal(String),

    /// Another process (or another `Engine` in this one) holds the store.
    #[error("store {} is locked by another process; stop it or use another store", .path.display())]
    StoreLocked { path: PathBuf },

    /// The store directory holds no store and creation was not asked for.
    #[error("no blocksnap store at {}; create it with `blocksnap --store {} init`", .path.display(), .path.display())]
    NoStore { path: PathBuf },

    /// A store already exists where a new one was asked for.
    #[error("a blocksnap store already exists at {}", .path.display())]
    StoreExists { path: PathBuf },

    /// Stored bytes failed a check (magic, version, length, CRC32 or BLAKE3).
    #[error("corruption detected in {}: {what}", .path.display())]
    Corruption { path: PathBuf, what: String },

    /// A chunk a manifest needs is not in the store.
    #[error("chunk {chunk} is missing from the store")]
    ChunkMissing { chunk: ChunkId },

    /// The disk target cannot hold the snapshot.
    #[error("disk {} is {have} bytes, smaller than the snapshot's {need} bytes", .path.display())]
    DiskTooSmall { path: PathBuf, have: u64, need: u64 },

    /// The safety snapshot a restore takes first failed, so the restore did
    /// not start and the disk is untouched.
    #[error(
        "the safety snapshot of server {server} failed, so nothing was restored: {source}; fix that, or restore without a safety snapshot"
    )]
    SafetySnapshot {
        server: ServerId,
        #[source]
        source: Box<Error>,
    },

    /// After a restore wrote its blocks, reading them back did not give the
    /// snapshot's bytes: the disk (or its driver) lost or changed writes.
    #[error("restore of snapshot {snapshot} wrote {} but block {block} (byte {offset}) reads back different; the server stays marked restoring: check the disk and restore again", .path.display())]
    VerifyFailed {
        snapshot: SnapshotId,
        path: PathBuf,
        block: u64,
        offset: u64,
    },

    /// The embedder's stop hook refused or failed.
    #[error("the stop hook failed for server {server}: {reason}")]
    StopHook { server: ServerId, reason: String },

    /// An operating-system I/O error, with the path it happened on.
    #[error("I/O error on {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The catalog database failed.
    /// An NBD server broke the protocol, refused the export, or went away.
    #[error("NBD server {peer}: {what}")]
    Nbd { peer: String, what: String },

    /// QEMU's monitor refused a command, broke the protocol, or went away.
    #[error("QEMU monitor {peer}: {what}")]
    Qmp { peer: String, what: String },

    #[error("catalog error: {0}")]
    Catalog(String),

    /// An object store (S3) refused a request, failed, or cannot be
    /// trusted. `in_doubt`: a write that got no clear answer, which may
    /// have landed.
    #[error("object store {peer}: {what}")]
    Remote {
        peer: String,
        what: String,
        in_doubt: bool,
    },
}

/// Whose an error is, which decides how it is answered (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorClass {
    /// The server or snapshot named does not exist (CLI exit 2, HTTP 404).
    NotFound,
    /// The request cannot be done as asked, now or at all: bad input, the
    /// cap, a busy server, a locked store (CLI exit 2, HTTP 400).
    Request,
    /// The store, the disk, the machine or the engine failed (CLI exit 1,
    /// HTTP 500 with a generic body; the details go to the log).
    Fault,
}

impl Error {
    /// Whose the error is: the one mapping the CLI and the API both use.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::ServerNotFound(_) | Error::SnapshotNotFound(_) => ErrorClass::NotFound,
            Error::ServerExists(_)
            | Error::InvalidName { .. }
            | Error::InvalidParameter(_)
            | Error::SnapshotLimit { .. }
            | Error::WrongState(_)
            | Error::Busy { .. }
            | Error::ReadOnly { .. }
            | Error::StoreLocked { .. }
            | Error::NoStore { .. }
            | Error::StoreExists { .. }
            | Error::DiskTooSmall { .. } => ErrorClass::Request,
            // The safety snapshot failed for its own reason: that decides.
            Error::SafetySnapshot { source, .. } => source.class(),
            Error::Corruption { .. }
            | Error::ChunkMissing { .. }
            | Error::VerifyFailed { .. }
            | Error::StopHook { .. }
            | Error::Io { .. }
            | Error::Catalog(_)
            | Error::Nbd { .. }
            | Error::Qmp { .. }
            | Error::Remote { .. }
            | Error::DiskChanged(_)
            | Error::Internal(_) => ErrorClass::Fault,
        }
    }

    /// True for errors caused by the caller's request rather than by the
    /// store, the machine or the engine ([`Error::class`] is not `Fault`).
    pub fn is_user_error(&self) -> bool {
        self.class() != ErrorClass::Fault
    }

    /// True when stored data failed a check.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corruption { .. } | Error::ChunkMissing { .. })
    }

    /// An I/O error on `path` (for embedders' own [`crate::disk::Disk`]s too).
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Corruption {
            path: path.into(),
            what: what.into(),
        }
    }
}

/// Attaches a path to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

macro_rules! catalog_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                // redb says when its file is damaged: that is corruption.
                let e: redb::Error = e.into();
                match e {
                    redb::Error::Corrupted(what) => Error::Corruption {
                        path: PathBuf::from("catalog"),
                        what: format!("the catalog database is damaged: {what}"),
                    },
                    // A read past the end of the file (its own structures
                    // point outside it), or tables that are not what this
                    // code made (a table's name or types damaged): only
                    // damage does that to a catalog this crate wrote.
                    redb::Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        Error::Corruption {
                            path: PathBuf::from("catalog"),
                            what: format!("the catalog database is damaged: {e}"),
                        }
                    }
                    e @ (redb::Error::TableTypeMismatch { .. }
                    | redb::Error::TypeDefinitionChanged { .. }
                    | redb::Error::TableIsMultimap { .. }
                    | redb::Error::TableIsNotMultimap { .. }
                    | redb::Error::TableDoesNotExist { .. }
                    | redb::Error::UpgradeRequired { .. }) => Error::Corruption {
                        path: PathBuf::from("catalog"),
                        what: format!("the catalog database is damaged: {e}"),
                    },
                    other => Error::Catalog(other.to_string()),
                }
            }
        }
    )*};
}

catalog_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
