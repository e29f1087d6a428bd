//! Garbage collection across the hosts of a fleet: mark, condemn, sweep.
//!
//! No host can see what another host's capture will reference: a capture
//! dedups against every pack its host has learnt, and its manifest is
//! known only once it is published. So a pack no completed snapshot needs
//! is not deleted at once; the fleet's catalog keeps the collection's
//! state (`catalog/gc`, changed only by compare-and-swap) and it goes in
//! four steps, each one or more runs of `gc` on any host:
//!
//! 1. **Mark and condemn** (phase idle -> condemned): the chunks of every
//!    completed snapshot's manifest are live; a pack that holds no live
//!    chunk's first copy (in the packs' name order) is condemned: one with
//!    none live, or only second copies of chunks two hosts uploaded at
//!    once. So is the manifest of a snapshot that is
//!    gone or failed (ids below the counter read first only: a newer one
//!    may be a capture not yet in the catalog).
//! 2. **Begin the sweep** (condemned -> sweeping), once the condemnation
//!    is older than the grace period: the snapshots in progress at that
//!    moment are read (after the phase change is visible) and recorded.
//! 3. **Agree** (sweeping -> deleting), once every one of those has
//!    ended: the chunks of every completed manifest are marked again, and
//!    the condemned packs still unneeded (with the condemned manifests
//!    whose snapshots are still gone) are written into the state as the
//!    set to delete, by one compare-and-swap: only that set is ever
//!    deleted, by whichever collector gets there.
//! 4. **Delete** (deleting -> idle): the agreed set goes.
//!
//! A capture publishing (see `host`) checks the packs it uses against
//! the state before it marks itself completed: none may be in the agreed
//! set; in the condemned phase it takes back the ones condemned (a
//! compare-and-swap that wins only before the sweep begins); in the
//! sweeping phase it may use condemned packs only if it was in progress
//! when the sweep began (then the sweep waits for it and marks it);
//! otherwise it fails, leaving nothing behind that the catalog lists.
//! Then, after that read, every pack it uses must still exist.
//!
//! Why no needed chunk is deleted: only an agreed set is deleted, and it
//! holds no first copy of a chunk that a manifest completed by step 3
//! uses. A capture that completes later either was in progress when the
//! sweep began (so step 3 waited for it and marked it), or read the state
//! after the condemnation and failed if it used a condemned pack; a pack
//! deleted before its read is missing when it looks.
//!
//! Failure cases:
//! - **A host that dies mid-capture** leaves a snapshot in progress that
//!   would hold a sweep forever: step 3 marks a snapshot in progress for
//!   longer than `stale_capture` (24 h) failed. Should that host come back
//!   and publish, its completing compare-and-swap finds the snapshot
//!   failed and the capture fails: it never completes over deleted packs.
//! - **A host that comes back after weeks** has a cache that knows packs
//!   since deleted: its captures' publish finds them missing (the packs it
//!   uses are looked up) and fails; its next open forgets every pack the
//!   bucket no longer has, so the capture run again stores those chunks.
//! - **Clock skew**: clocks only decide *when* a sweep may begin (the
//!   grace period, by the marking host's clock) and when a capture counts
//!   as stale (by the reserving host's clock against the sweeping host's);
//!   safety rests on the compare-and-swaps and the order of reads above,
//!   never on a clock. Skew can make a capture be declared stale early,
//!   which fails it; 24 h leaves room for any plausible skew.
//! - **A collector that dies** at any step leaves a state the next run
//!   goes on from (every step is a compare-and-swap of a whole state;
//!   deleting an object twice is no error, and pack names are never
//!   reused). A collector that stalls finds the phase moved on.
//!
//! Only packs wholly unneeded are deleted: a pack that holds one live
//! chunk's first copy stays whole (packs are sealed at every capture and at 32 MiB, so
//! this stays a fraction of the store; rewriting such packs is left to
//! come).

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::time::Duration;

pub use crate::bucket::catalog::GcPhase;
use crate::bucket::catalog::{FleetCatalog, FleetServer, GcState, GcStep};
use crate::error::{Error, Result};
use crate::fsio::StoreFs;
use crate::ids::{ChunkId, SnapshotId};
use crate::manifest::Manifest;
use crate::types::SnapshotStatus;

use super::host::manifest_key;
use super::packs;

/// How a collection runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct GcOptions {
    /// Report what would be condemned and swept; change nothing.
    pub dry_run: bool,
    /// How long after a condemnation its sweep may begin.
    pub grace: Duration,
    /// A capture in progress for longer than this is taken for one whose
    /// host died, and marked failed by a sweep waiting for it.
    pub stale_capture: Duration,
}

/// The grace period between a condemnation and its sweep, by default.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);
/// When a capture in progress counts as abandoned, by default.
pub const DEFAULT_STALE_CAPTURE: Duration = Duration::from_secs(24 * 3600);

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            grace: DEFAULT_GC_GRACE,
            stale_capture: DEFAULT_STALE_CAPTURE,
        }
    }
}

impl GcOptions {
    pub fn dry_run(mut self, on: bool) -> Self {
        self.dry_run = on;
        self
    }
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }
    pub fn stale_capture(mut self, after: Duration) -> Self {
        self.stale_capture = after;
        self
    }
}

/// What a collection found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct FleetGcReport {
    /// The phase it left the collection in, and its generation.
    pub phase: GcPhase,
    pub generation: u64,
    /// Packs in the bucket, and their bytes, when it looked.
    pub packs: u64,
    pub bytes: u64,
    /// Packs (and their bytes) and manifests condemned by this run (with
    /// `dry_run`: that would be).
    pub packs_condemned: u64,
    pub bytes_condemned: u64,
    pub manifests_condemned: u64,
    /// Packs and bytes deleted by this run's sweep, and manifests.
    pub packs_deleted: u64,
    pub bytes_deleted: u64,
    pub manifests_deleted: u64,
    /// Condemned packs a capture had used meanwhile: kept.
    pub packs_spared: u64,
    /// The sweep waits for these snapshots, in progress when it began.
    pub waiting_for: Vec<SnapshotId>,
    /// Snapshots in progress past `stale_capture`, marked failed.
    pub captures_expired: Vec<SnapshotId>,
    /// The condemnation is younger than the grace period: seconds left.
    pub grace_left: Option<u64>,
}

fn unix_secs() -> u64 {
    (crate::bucket::unix_nanos() / 1_000_000_000) as u64
}

/// Runs one collection step (or as many as may run now): see the module
/// doc. `dir` is the cache's pack directory, where the indexes of the
/// packs this host knows are read.
pub(crate) fn collect(
    catalog: &FleetCatalog,
    fs: &dyn StoreFs,
    dir: &Path,
    options: &GcOptions,
) -> Result<FleetGcReport> {
    let mut report = FleetGcReport::default();
    let mut state = catalog.gc_state()?;
    if state.phase == GcPhase::Condemned {
        let age = unix_secs().saturating_sub(state.condemned_at);
        if age < options.grace.as_secs() {
            report.grace_left = Some(options.grace.as_secs() - age);
        } else if !options.dry_run {
            state = begin_sweep(catalog, state.generation)?;
        }
    }
    if state.phase == GcPhase::Sweeping && !options.dry_run {
        state = sweep(catalog, fs, dir, state, options, &mut report)?;
    }
    if state.phase == GcPhase::Deleting && !options.dry_run {
        state = delete(catalog, state, &mut report)?;
    }
    if state.phase == GcPhase::Idle {
        state = mark(catalog, fs, dir, options, &mut report)?;
        if state.phase == GcPhase::Condemned && !options.grace.is_zero() {
            report.grace_left = Some(options.grace.as_secs());
        }
    }
    report.phase = state.phase;
    report.generation = state.generation;
    Ok(report)
}

/// Step 2: the phase change, then the snapshots in progress (read after
/// it is visible), recorded.
fn begin_sweep(catalog: &FleetCatalog, generation: u64) -> Result<GcState> {
    catalog.gc_update(|s, _| {
        Ok(match (s.phase, s.generation == generation) {
            (GcPhase::Condemned, true) => {
                s.phase = GcPhase::Sweeping;
                s.waiting_for = None;
                GcStep::Write(())
            }
            _ => GcStep::Keep(()),
        })
    })?;
    record_running(catalog, generation)
}

/// The second write of step 2: the snapshots in progress, read now (after
/// the phase change is visible), recorded once. Also what a run does that
/// finds a collector died between the two writes.
fn record_running(catalog: &FleetCatalog, generation: u64) -> Result<GcState> {
    let running: BTreeSet<SnapshotId> = in_progress(&catalog.servers()?).collect();
    let (state, ()) = catalog.gc_update(|s, _| {
        Ok(
            match (s.phase, s.generation == generation, &s.waiting_for) {
                (GcPhase::Sweeping, true, None) => {
                    s.waiting_for = Some(running.clone());
                    GcStep::Write(())
                }
                _ => GcStep::Keep(()),
            },
        )
    })?;
    Ok(state)
}

/// The snapshots whose manifests must stay: completed or in progress.
fn held(servers: &[FleetServer]) -> HashSet<SnapshotId> {
    servers
        .iter()
        .flat_map(|s| &s.snapshots)
        .filter(|s| s.status != SnapshotStatus::Failed)
        .map(|s| s.id)
        .collect()
}

fn in_progress(servers: &[FleetServer]) -> impl Iterator<Item = SnapshotId> + '_ {
    servers
        .iter()
        .flat_map(|s| &s.snapshots)
        .filter(|s| s.status == SnapshotStatus::InProgress)
        .map(|s| s.id)
}

/// Step 3, when every snapshot it waits for has ended.
fn sweep(
    catalog: &FleetCatalog,
    fs: &dyn StoreFs,
    dir: &Path,
    state: GcState,
    options: &GcOptions,
    report: &mut FleetGcReport,
) -> Result<GcState> {
    let Some(waiting) = state.waiting_for.clone() else {
        // Between the two writes of step 2 (another collector's, which
        // may have died there): the second is made now, and the sweep
        // waits for what runs from here.
        return record_running(catalog, state.generation);
    };
    let mut servers = catalog.servers()?;
    let now = std::time::SystemTime::now();
    let mut expired = false;
    for srv in &servers {
        for snap in &srv.snapshots {
            if snap.status != SnapshotStatus::InProgress || !waiting.contains(&snap.id) {
                continue;
            }
            let age = humantime::parse_rfc3339(&snap.created_at)
                .ok()
                .and_then(|t| now.duration_since(t).ok());
            if age.is_some_and(|a| a > options.stale_capture) {
                // Its host is taken for dead; should it come back, its
                // completing write finds the snapshot failed.
                match catalog.finish_snapshot(srv.id, snap.id, false) {
                    Ok(()) | Err(Error::WrongState(_)) => {}
                    Err(e) => return Err(e),
                }
                report.captures_expired.push(snap.id);
                expired = true;
            }
        }
    }
    if expired {
        servers = catalog.servers()?;
    }
    let running: BTreeSet<SnapshotId> = in_progress(&servers).collect();
    report.waiting_for = waiting.intersection(&running).copied().collect();
    if !report.waiting_for.is_empty() {
        return Ok(state);
    }
    // Marked again: what completed since the condemnation is live.
    let live = live_chunks(catalog, &servers)?;
    let unneeded = unneeded_packs(catalog, fs, dir, &live)?;
    let doomed: BTreeSet<String> = state
        .packs
        .iter()
        .filter(|k| unneeded.packs.contains_key(*k))
        .cloned()
        .collect();
    report.packs_spared = state
        .packs
        .iter()
        .filter(|k| unneeded.listed.contains(*k) && !doomed.contains(*k))
        .count() as u64;
    let held = held(&servers);
    let manifests: BTreeSet<SnapshotId> = state
        .manifests
        .iter()
        .filter(|id| !held.contains(id))
        .copied()
        .collect();
    // Step 3a: the set to delete, agreed by compare-and-swap: only the
    // collector whose write lands deletes, and only that set (a collector
    // that stalled with a set of its own finds the phase moved on).
    let generation = state.generation;
    let (state, ()) = catalog.gc_update(|s, _| {
        Ok(match (s.phase, s.generation == generation) {
            (GcPhase::Sweeping, true) => {
                s.phase = GcPhase::Deleting;
                s.deleting = doomed.clone();
                s.deleting_manifests = manifests.clone();
                GcStep::Write(())
            }
            _ => GcStep::Keep(()),
        })
    })?;
    Ok(state)
}

/// Step 3b: deletes the agreed set (again, if a collector died midway:
/// deleting an object twice is no error), then goes idle.
fn delete(catalog: &FleetCatalog, state: GcState, report: &mut FleetGcReport) -> Result<GcState> {
    let sizes: std::collections::HashMap<String, u64> =
        catalog.bucket().list("packs")?.into_iter().collect();
    for key in &state.deleting {
        catalog.bucket().delete(key)?;
        if let Some(len) = sizes.get(key) {
            report.packs_deleted += 1;
            report.bytes_deleted += len;
        }
    }
    for id in &state.deleting_manifests {
        catalog.bucket().delete(&manifest_key(*id))?;
        report.manifests_deleted += 1;
    }
    let generation = state.generation;
    let (state, ()) = catalog.gc_update(|s, _| {
        Ok(match (s.phase, s.generation == generation) {
            (GcPhase::Deleting, true) => {
                s.phase = GcPhase::Idle;
                s.packs.clear();
                s.manifests.clear();
                s.waiting_for = None;
                s.deleting.clear();
                s.deleting_manifests.clear();
                GcStep::Write(())
            }
            _ => GcStep::Keep(()),
        })
    })?;
    Ok(state)
}

/// Step 1: mark, and condemn what no completed snapshot needs.
fn mark(
    catalog: &FleetCatalog,
    fs: &dyn StoreFs,
    dir: &Path,
    options: &GcOptions,
    report: &mut FleetGcReport,
) -> Result<GcState> {
    // The counter before the catalog: any id below it that the catalog
    // does not hold was given to a snapshot now gone (or in the making,
    // which has no manifest yet).
    let next = catalog.next_snapshot_id()?;
    let servers = catalog.servers()?;
    let live = live_chunks(catalog, &servers)?;
    let unneeded = unneeded_packs(catalog, fs, dir, &live)?;
    report.packs = unneeded.listed.len() as u64;
    report.bytes = unneeded.bytes;
    report.packs_condemned = unneeded.packs.len() as u64;
    report.bytes_condemned = unneeded.packs.values().sum();
    let packs: BTreeSet<String> = unneeded.packs.into_keys().collect();
    let held = held(&servers);
    let mut manifests = BTreeSet::new();
    for (key, _) in catalog.bucket().list("manifests")? {
        let Some(id) = key
            .strip_prefix("manifests/")
            .and_then(|n| n.parse::<u64>().ok())
            .map(SnapshotId)
        else {
            continue;
        };
        if id < next && !held.contains(&id) {
            manifests.insert(id);
        }
    }
    report.manifests_condemned = manifests.len() as u64;
    if options.dry_run || (packs.is_empty() && manifests.is_empty()) {
        return catalog.gc_state();
    }
    let (state, ()) = catalog.gc_update(|s, _| {
        Ok(match s.phase {
            GcPhase::Idle => {
                s.generation += 1;
                s.phase = GcPhase::Condemned;
                s.packs = packs.clone();
                s.manifests = manifests.clone();
                s.condemned_at = unix_secs();
                s.waiting_for = None;
                GcStep::Write(())
            }
            // Another collector condemned meanwhile: its marks stand.
            _ => GcStep::Keep(()),
        })
    })?;
    Ok(state)
}

/// The packs in the bucket, and those no completed snapshot needs.
struct Unneeded {
    /// Every pack object listed, and their bytes.
    listed: HashSet<String>,
    bytes: u64,
    /// Name -> bytes of the packs that can go.
    packs: std::collections::HashMap<String, u64>,
}

/// The packs that hold no live chunk but copies of ones another pack
/// holds first. Each live chunk's *first* copy (the first pack, in name
/// order, that holds it) is the one kept: so a chunk two hosts uploaded
/// at once, each not knowing the other's pack, is kept once, and a pack
/// holding only such second copies goes. A chunk's first copy is in a
/// pack that holds it first, which is never one that can go, so every
/// live chunk keeps a copy whatever set of these packs is deleted.
fn unneeded_packs(
    catalog: &FleetCatalog,
    fs: &dyn StoreFs,
    dir: &Path,
    live: &HashSet<ChunkId>,
) -> Result<Unneeded> {
    let known = known_by_key(fs, dir)?;
    let mut out = Unneeded {
        listed: HashSet::new(),
        bytes: 0,
        packs: std::collections::HashMap::new(),
    };
    let mut placed: HashSet<ChunkId> = HashSet::new();
    // `list` gives names in order: the same order on every host.
    for (key, len) in catalog.bucket().list("packs")? {
        if !key.ends_with(".pack") {
            continue;
        }
        let ids = match pack_ids(catalog, fs, dir, &known, &key, len) {
            Ok(ids) => ids,
            // Not a pack: never ours to delete.
            Err(Error::Corruption { .. }) => continue,
            Err(e) => return Err(e),
        };
        out.listed.insert(key.clone());
        out.bytes += len;
        let mut first = false;
        for id in ids.iter().filter(|id| live.contains(*id)) {
            first |= placed.insert(*id);
        }
        if !first {
            out.packs.insert(key, len);
        }
    }
    Ok(out)
}

/// The chunks of every completed snapshot, from the manifests in the
/// bucket.
fn live_chunks(catalog: &FleetCatalog, servers: &[FleetServer]) -> Result<HashSet<ChunkId>> {
    let mut live = HashSet::new();
    for snap in servers.iter().flat_map(|s| &s.snapshots) {
        if snap.status != SnapshotStatus::Completed {
            continue;
        }
        let key = manifest_key(snap.id);
        let source = format!("{}/{key}", catalog.bucket().url());
        let Some((bytes, _)) = catalog.bucket().get(&key)? else {
            return Err(Error::corrupt(
                source,
                format!(
                    "snapshot {} is completed, but its manifest is missing: nothing is collected \
                     until that is understood",
                    snap.id
                ),
            ));
        };
        let m = Manifest::decode(&bytes).map_err(|e| Error::corrupt(&source, e))?;
        for i in 0..m.block_count() {
            if let Some(id) = m.block(i)? {
                live.insert(id);
            }
        }
    }
    Ok(live)
}

/// This cache's packs by object name.
fn known_by_key(fs: &dyn StoreFs, dir: &Path) -> Result<std::collections::HashMap<String, u32>> {
    Ok(packs::known(fs, dir)?
        .into_iter()
        .map(|(seq, car)| (car.key, seq))
        .collect())
}

/// The chunks in pack `key`: from this cache's copy of its index when it
/// has one, else from the bucket.
fn pack_ids(
    catalog: &FleetCatalog,
    fs: &dyn StoreFs,
    dir: &Path,
    known: &std::collections::HashMap<String, u32>,
    key: &str,
    len: u64,
) -> Result<Vec<ChunkId>> {
    let entries = match known.get(key) {
        Some(seq) => packs::local_index(fs, &packs::pack_path(dir, *seq))?,
        None => packs::read_index(catalog.bucket(), key, len)?.entries,
    };
    Ok(entries.into_iter().map(|e| e.id).collect())
}

/// A publishing capture's check of the packs it uses (their names in the
/// bucket) against the collection (see the module doc); `Ok` when it may
/// mark itself completed.
pub(crate) fn check_used(
    catalog: &FleetCatalog,
    snapshot: SnapshotId,
    used: &BTreeSet<String>,
) -> Result<()> {
    check_state(catalog, snapshot, used)?;
    // After the state: a pack deleted before it was read is missing here;
    // one agreed for deletion after it was read was condemned after the
    // read too, when this capture was running, so the sweep waits for it.
    for key in used {
        if !catalog.bucket().exists(key)? {
            return Err(collected(catalog, key));
        }
    }
    Ok(())
}

fn check_state(
    catalog: &FleetCatalog,
    snapshot: SnapshotId,
    used: &BTreeSet<String>,
) -> Result<()> {
    // The state's two writes at the start of a sweep are moments apart.
    for _ in 0..600 {
        let state = catalog.gc_state()?;
        if let Some(key) = state.deleting.intersection(used).next() {
            return Err(collected(catalog, key));
        }
        let hit: BTreeSet<String> = state.packs.intersection(used).cloned().collect();
        if hit.is_empty() || state.phase == GcPhase::Idle {
            return Ok(());
        }
        match (state.phase, &state.waiting_for) {
            (GcPhase::Condemned, _) => {
                let generation = state.generation;
                let (_, taken) = catalog.gc_update(|s, _| {
                    Ok(match (s.phase, s.generation == generation) {
                        (GcPhase::Condemned, true) => {
                            s.packs.retain(|k| !hit.contains(k));
                            GcStep::Write(true)
                        }
                        _ => GcStep::Keep(false),
                    })
                })?;
                if taken {
                    return Ok(());
                }
            }
            // Waited for: its manifest is marked before anything goes.
            (GcPhase::Sweeping, Some(waiting)) if waiting.contains(&snapshot) => return Ok(()),
            // Only `deleting` goes (none of it used, as checked above).
            (GcPhase::Deleting, _) => return Ok(()),
            (_, Some(_)) => {
                let key = hit.iter().next().map_or("", String::as_str);
                return Err(collected(catalog, key));
            }
            (_, None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    Err(Error::Remote {
        peer: catalog.bucket().url().to_string(),
        what: "the collection's state stayed between two steps for 12 s".into(),
        in_doubt: false,
    })
}

fn collected(catalog: &FleetCatalog, key: &str) -> Error {
    Error::WrongState(format!(
        "the capture uses pack {}/{key}, which the fleet's garbage collection has deleted or is \
         deleting; take the snapshot again (a new open of the store forgets that pack, so the \
         capture stores those chunks again)",
        catalog.bucket().url()
    ))
}
