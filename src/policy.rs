//! The rules of the model, as pure functions: names and descriptions, and
//! the five-snapshot cap (what counts toward it). They take records and
//! answer, so they are tested without a store.

use crate::catalog::SnapshotRecord;
use crate::error::{Error, Result};
use crate::ids::{ServerId, SnapshotId};
use crate::types::{SnapshotKind, SnapshotStatus};

/// At most this many counted (in-progress or completed) snapshots per server.
pub const MAX_SNAPSHOTS_PER_SERVER: usize = 5;
/// Longest snapshot name, in characters.
pub const MAX_NAME_LEN: usize = 64;
/// Longest snapshot description, in characters.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Longest server name, in characters.
pub const MAX_SERVER_NAME_LEN: usize = 255;

/// Checks a snapshot name: 1 to 64 characters from `[A-Za-z0-9_-]`.
pub fn check_snapshot_name(name: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("a snapshot name must not be empty");
    }
    if name.chars().count() > MAX_NAME_LEN {
        return bad("a snapshot name has at most 64 characters");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return bad(&format!(
            "{c:?} is not allowed; use letters, digits, hyphens and underscores"
        ));
    }
    Ok(())
}

/// Checks a snapshot description: at most 1,024 characters.
pub fn check_description(description: &str) -> Result<()> {
    let n = description.chars().count();
    if n > MAX_DESCRIPTION_LEN {
        return Err(Error::InvalidParameter(format!(
            "description has {n} characters; at most {MAX_DESCRIPTION_LEN} are allowed"
        )));
    }
    Ok(())
}

/// Checks a server name: 1 to 255 printable characters.
pub fn check_server_name(name: &str) -> Result<()> {
    let n = name.chars().count();
    if n == 0 || n > MAX_SERVER_NAME_LEN || name.chars().any(char::is_control) {
        return Err(Error::InvalidName {
            name: name.to_string(),
            reason: "a server name has 1 to 255 printable characters".to_string(),
        });
    }
    Ok(())
}

/// The account servers belong to unless another is given.
pub const DEFAULT_ACCOUNT: &str = "default";

pub(crate) fn default_account() -> String {
    DEFAULT_ACCOUNT.to_string()
}

/// An account name: 1 to 64 characters from `[A-Za-z0-9_-]`, or `*` is
/// refused (it names every account in a tokens file).
pub fn check_account_name(name: &str) -> Result<()> {
    let ok = (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            name: name.to_string(),
            reason: format!(
                "an account name has 1 to {MAX_NAME_LEN} characters from [A-Za-z0-9_-]"
            ),
        })
    }
}

/// Snapshots that count toward the cap: in progress or completed, and
/// taken by a user. Failed ones hold no data a user can restore, and safety
/// snapshots are the engine's, so neither blocks new captures.
pub fn counted(s: &SnapshotRecord) -> bool {
    counts(s.kind, s.status)
}

/// Whether a snapshot of this kind and status counts toward the cap.
pub fn counts(kind: SnapshotKind, status: SnapshotStatus) -> bool {
    kind == SnapshotKind::Regular
        && matches!(
            status,
            SnapshotStatus::InProgress | SnapshotStatus::Completed
        )
}

/// The cap rule: may `server` take one more snapshot, given its snapshots?
/// A snapshot whose completion is `in_doubt` (its commit reported an error
/// but may have landed) counts as if completed.
pub fn check_cap<'a>(
    server: ServerId,
    its_snapshots: impl IntoIterator<Item = &'a SnapshotRecord>,
    in_doubt: impl Fn(SnapshotId) -> bool,
) -> Result<()> {
    let n = its_snapshots
        .into_iter()
        .filter(|s| counted(s) || (s.kind == SnapshotKind::Regular && in_doubt(s.id)))
        .count();
    if n >= MAX_SNAPSHOTS_PER_SERVER {
        return Err(Error::SnapshotLimit {
            server,
            limit: MAX_SNAPSHOTS_PER_SERVER,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::catalog::test_record as snap;

    #[test]
    fn names_follow_the_api_rule() {
        for ok in ["a", "pre-update_2", &"x".repeat(64)] {
            assert!(check_snapshot_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            &"x".repeat(65),
            "has space",
            "../x",
            "héllo",
            "a/b",
            "a.b",
        ] {
            assert!(
                matches!(check_snapshot_name(bad), Err(Error::InvalidName { .. })),
                "{bad}"
            );
        }
        assert!(check_description(&"d".repeat(1024)).is_ok());
        assert!(check_description(&"d".repeat(1025)).is_err());
    }

    #[test]
    fn cap_counts_in_progress_and_completed_but_not_failed() {
        let mut v: Vec<_> = (1..=4)
            .map(|i| snap(i, SnapshotStatus::Completed))
            .collect();
        v.push(snap(5, SnapshotStatus::Failed));
        assert!(check_cap(ServerId(1), &v, |_| false).is_ok());
        // A snapshot whose completion is in doubt counts as completed.
        assert!(check_cap(ServerId(1), &v, |id| id == SnapshotId(5)).is_err());
        v.push(snap(6, SnapshotStatus::InProgress));
        assert!(matches!(
            check_cap(ServerId(1), &v, |_| false),
            Err(Error::SnapshotLimit { limit: 5, .. })
        ));
    }
}
