//! The store's lock file and what `open` repairs after a crash.

use std::fs::{self, File, OpenOptions};

use std::path::Path;

use crate::catalog::{Catalog, Change};
use crate::error::{Error, IoContext, Result};
use crate::manifest::Manifests;
use crate::types::SnapshotStatus;

use super::LOCK_FILE;
use super::state::State;
use crate::types::OpenReport;

/// Takes the store's lock: exclusive to write, shared to only read (read-only
/// opens may run side by side, never beside a writer).
pub(crate) fn lock_store(root: &Path, shared: bool) -> Result<File> {
    let path = root.join(LOCK_FILE);
    let file = if shared {
        OpenOptions::new().read(true).open(&path).at(&path)?
    } else {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at(&path)?
    };
    // A lock just released can stay held for a moment: a process forked
    // (by anyone in this process) while the store was open keeps a copy of
    // the descriptor, and with it the flock, until it execs. So a held lock
    // is tried again for a short while before it means another owner.
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        let locked = if shared {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match locked {
            Ok(()) => return Ok(file),
            Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::StoreLocked {
                    path: root.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(path, e)),
        }
    }
}

/// How long a held store lock is tried again before it means the store is
/// in use (see `lock_store`).
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Applies the crash rules: captures left in progress become failed (and
/// lose any manifest), manifests of no completed snapshot are removed,
/// interrupted restores are reported. Without `write` (a read-only open),
/// only the in-memory view changes: it shows what the next writable open
/// will make of the store.
pub(super) fn recover(
    catalog: &Catalog,
    manifests: &Manifests,
    state: &mut State,
    report: &mut OpenReport,
    write: bool,
) -> Result<()> {
    if write {
        manifests.clean_temporaries()?;
    }
    let mut failed = Vec::new();
    for rec in state.snapshots.values_mut() {
        if rec.status == SnapshotStatus::InProgress {
            rec.status = SnapshotStatus::Failed;
            rec.error =
                Some("interrupted: the process stopped before the capture completed".into());
            failed.push(rec.clone());
        }
    }
    if !failed.is_empty() {
        if write {
            let changes: Vec<Change<'_>> = failed.iter().map(Change::PutSnapshot).collect();
            catalog.commit(&changes)?;
        }
        report.failed_captures = failed.iter().map(|r| r.id).collect();
    }
    for id in manifests.ids()?.into_iter().filter(|_| write) {
        let completed = state
            .snapshots
            .get(&id)
            .is_some_and(|s| s.status == SnapshotStatus::Completed);
        // A deleted snapshot's manifest stays while the reference counts'
        // table counts it (see `refs`).
        if !completed && !state.refs_covered.contains(&id) {
            manifests.remove(id)?;
        }
    }
    report.interrupted_restores = state
        .servers
        .values()
        .filter_map(|s| s.restoring_from.map(|snap| (s.id, snap)))
        .collect();
    Ok(())
}
