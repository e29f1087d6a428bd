//! What the command prints: tables for people, the API's JSON shapes for
//! scripts.

use blocksnap::{
    CaptureKind, Engine, ExportReport, FullReason, GcReport, RestorePlanReport, RestoreReport,
    Server, Snapshot, SnapshotId, StoreStats,
};
use serde::Serialize;
use serde_json::json;

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode JSON: {e}"),
    }
}

/// An export's report; on standard error when the image went to standard
/// output.
pub fn export(r: &ExportReport, json: bool, to_stdout: bool) {
    let text = if json {
        match serde_json::to_string_pretty(r) {
            Ok(s) => s,
            Err(e) => format!("error: cannot encode JSON: {e}"),
        }
    } else {
        format!(
            "exported snapshot {} (server {}) to {}: {} image, {} of data in {} of {} blocks; {:.3} s",
            r.snapshot_id,
            r.server_id,
            r.path
                .as_ref()
                .map_or("standard output".into(), |p| p.display().to_string()),
            human_bytes(r.image_bytes),
            human_bytes(r.data_bytes),
            r.blocks_data,
            r.blocks_total,
            r.micros as f64 / 1e6
        )
    };
    if to_stdout {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
}

/// `1.5 MiB`, `640 KiB`, `12 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn ratio(a: u64, b: u64) -> String {
    if b == 0 {
        "-".into()
    } else {
        format!("{:.2}x", a as f64 / b as f64)
    }
}

/// One line saying what a capture read, stored and how fast.
/// A created snapshot for `snapshot create --json`: the API's fields and
/// beside them a `capture` object saying what the capture read and stored.
pub fn created_json(snap: &Snapshot) -> serde_json::Value {
    let mut v = serde_json::to_value(snap).unwrap_or_else(|_| json!({}));
    if let (Some(s), Some(obj)) = (snap.stats, v.as_object_mut()) {
        obj.insert(
            "capture".into(),
            json!({
                "kind": s.kind,
                "parent": s.parent,
                "full_reason": s.full_reason,
                "blocks_read": s.blocks_read,
                "bytes_read": s.bytes_read,
                "bytes_stored": s.new_stored_bytes,
                "new_chunks": s.new_chunks,
                "sample_checked": s.sample_checked,
                "seconds": s.micros as f64 / 1e6,
                "freeze_ms": s.freeze_micros.map(|us| us as f64 / 1e3),
                "scratch_bytes": s.scratch_bytes,
            }),
        );
    }
    v
}

pub fn capture_summary(snap: &Snapshot) -> String {
    let Some(s) = snap.stats else {
        return format!("snapshot {} is {}", snap.id, snap.status.as_str());
    };
    let secs = s.micros as f64 / 1e6;
    let speed = if secs > 0.0 {
        format!("{}/s", human_bytes((s.bytes_read as f64 / secs) as u64))
    } else {
        "-".into()
    };
    let how = match (s.kind, s.parent, s.full_reason) {
        (CaptureKind::Incremental, Some(p), _) => format!(
            "; incremental from snapshot {p}, {} clean blocks sampled",
            s.sample_checked
        ),
        (_, _, Some(FullReason::SampleMismatch)) => format!(
            "; FULL rehash: {} of {} sampled clean blocks had changed, the dirty bitmap missed writes",
            s.sample_mismatches, s.sample_checked
        ),
        (_, _, Some(reason)) => format!("; full capture: {}", reason.describe()),
        _ => String::new(),
    };
    format!(
        "snapshot {} ({}) of server {} completed: read {} of {} ({} data), stored {} new; \
         dedup {}, compression {}; {:.3} s ({:.3} s of it to make it durable), {}{how}",
        snap.id,
        snap.name,
        snap.server.id,
        human_bytes(s.bytes_read),
        human_bytes(s.image_len),
        human_bytes(s.data_bytes),
        human_bytes(s.new_stored_bytes),
        ratio(s.data_bytes, s.new_raw_bytes),
        ratio(s.new_raw_bytes, s.new_stored_bytes),
        secs,
        s.sync_micros as f64 / 1e6,
        speed
    )
}

/// A list as the API prints it: `{"count": N, "results": [...]}`.
fn print_list_json<T: Serialize>(list: &[T]) {
    print_json(&json!({ "count": list.len(), "results": list }));
}

pub fn servers(list: &[Server], json: bool) {
    if json {
        return print_list_json(list);
    }
    if list.is_empty() {
        println!("no servers registered");
        return;
    }
    println!(
        "{:>8}  {:<10}  {:<24}  {:<16}  DISK",
        "ID", "STATUS", "NAME", "ACCOUNT"
    );
    for s in list {
        println!(
            "{:>8}  {:<10}  {:<24}  {:<16}  {}",
            s.id,
            s.state.as_str(),
            s.name,
            s.account,
            s.disk.display()
        );
    }
}

/// Snapshots as the API lists them, plus `exclusive_bytes`: the stored
/// bytes deleting that snapshot alone would give back.
pub fn snapshots(list: &[Snapshot], json: bool) {
    if json {
        let results: Vec<serde_json::Value> = list
            .iter()
            .map(|s| {
                let mut v = json!(s);
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("exclusive_bytes".into(), json!(s.exclusive_bytes));
                    obj.insert("kind".into(), json!(s.kind));
                }
                v
            })
            .collect();
        return print_list_json(&results);
    }
    if list.is_empty() {
        println!("no snapshots");
        return;
    }
    println!(
        "{:>6}  {:>8}  {:<24}  {:<7}  {:<11}  {:>8}  {:>10}  {:<20}  DESCRIPTION",
        "ID", "SERVER", "NAME", "KIND", "STATUS", "SIZE_MB", "EXCLUSIVE", "CREATED_AT"
    );
    for s in list {
        let size = s.size_mb.map_or("-".to_string(), |m| m.to_string());
        let exclusive = s.exclusive_bytes.map_or("-".to_string(), human_bytes);
        println!(
            "{:>6}  {:>8}  {:<24}  {:<7}  {:<11}  {:>8}  {:>10}  {:<20}  {}",
            s.id,
            s.server.id,
            s.name,
            s.kind.as_str(),
            s.status.as_str(),
            size,
            exclusive,
            s.created_at,
            s.description
        );
        if let Some(e) = &s.error {
            println!("        failed: {e}");
        }
    }
}

pub fn restore(
    engine: &Engine,
    id: SnapshotId,
    r: &RestoreReport,
    json: bool,
) -> blocksnap::Result<()> {
    // An undone restore's safety snapshot is replaced by the new one.
    let (name, created_at) = match engine.snapshot(id) {
        Ok(s) => (s.name, s.created_at),
        Err(_) => ("(safety snapshot, now replaced)".to_string(), String::new()),
    };
    let server = engine.server(r.server_id)?;
    let secs = r.micros as f64 / 1e6;
    if json {
        print_json(&json!({
            "status": "success",
            "snapshot": { "id": id, "name": name, "created_at": created_at },
            "server": { "id": server.id, "name": server.name, "status": server.state },
            "blocks_total": r.blocks_total,
            "method": r.method,
            "safety_snapshot": r.safety_snapshot,
            "vm_paused": r.vm_paused,
            "blocks_verified": r.blocks_verified,
            "blocks_rewritten": r.blocks_rewritten,
            "bytes_written": r.bytes_written,
            "seconds": secs,
        }));
    } else {
        println!(
            "restored snapshot {} ({}) onto server {} ({}): {} of {} blocks rewritten, \
             {} written, {} read back and checked; {:.3} s",
            id,
            name,
            server.id,
            server.disk.display(),
            r.blocks_rewritten,
            r.blocks_total,
            human_bytes(r.bytes_written),
            r.blocks_verified,
            secs
        );
        match r.safety_snapshot {
            Some(s) => println!(
                "the disk as it was is safety snapshot {s}: `blocksnap snapshot undo-restore {}` brings it back",
                server.id
            ),
            None => println!("no safety snapshot was taken: this restore cannot be undone"),
        }
        if r.vm_paused {
            println!(
                "the VM was paused for the restore and is still paused: resume it (QMP `cont`) when ready"
            );
        }
    }
    Ok(())
}

/// Prints what a restore would do.
pub fn restore_plan(p: &RestorePlanReport, json: bool) {
    if json {
        return print_json(p);
    }
    println!(
        "restoring snapshot {} onto server {} would rewrite {} of {} blocks ({}) in {} runs, \
         found by {}; about {:.1} s{}{}",
        p.snapshot_id,
        p.server_id,
        p.blocks_to_rewrite,
        p.blocks_total,
        human_bytes(p.bytes_to_write),
        p.runs.len(),
        match p.method {
            blocksnap::RestoreMethod::Delta => "comparing snapshots (the disk's state is known)",
            blocksnap::RestoreMethod::Compare => "reading and comparing the disk",
        },
        p.estimated_seconds,
        if p.rates_measured {
            ""
        } else {
            " (default rates: no restore measured yet)"
        },
        if p.safety_snapshot {
            ", after a safety snapshot of the disk"
        } else {
            ""
        },
    );
    println!("nothing was written (dry run)");
}

/// Prints a verify report; exits 1 (through the returned code) on damage.
pub fn verify(engine: &Engine, id: Option<SnapshotId>, json: bool) -> blocksnap::Result<i32> {
    let report = engine.verify(id)?;
    if json {
        print_json(&json!({
            "ok": report.is_ok(),
            "snapshots_checked": report.snapshots_checked,
            "chunks_checked": report.chunks_checked,
            "bytes_checked": report.bytes_checked,
            "bad_chunks": report.bad_chunks,
            "bad_manifests": report.bad_manifests,
            "catalog_error": report.catalog_error,
            "index_error": report.index_error,
            "space_error": report.space_error,
            "damaged_snapshots": report.damaged_snapshots(),
        }));
    } else {
        if let Some(e) = &report.catalog_error {
            println!("CORRUPT catalog: {e}");
        }
        if let Some(e) = &report.index_error {
            println!("CORRUPT chunk index (the packs are intact; it is rebuilt from them): {e}");
        }
        if let Some(e) = &report.space_error {
            println!(
                "CORRUPT reference counts (no snapshot is affected; `blocksnap index rebuild` counts them again): {e}"
            );
        }
        for m in &report.bad_manifests {
            println!("CORRUPT manifest of snapshot {}: {}", m.snapshot, m.error);
        }
        for c in &report.bad_chunks {
            println!(
                "CORRUPT chunk {} at {}: {} (used by snapshots {:?})",
                c.chunk,
                c.location.as_deref().unwrap_or("<not in any pack>"),
                c.error,
                c.snapshots
            );
        }
        println!(
            "verified {} snapshots, {} chunks, {}: {}",
            report.snapshots_checked,
            report.chunks_checked,
            human_bytes(report.bytes_checked),
            match (report.is_ok(), report.damaged_snapshots()) {
                (true, _) => "all intact".to_string(),
                (false, d) if d.is_empty() => "snapshots intact, store damaged (above)".to_string(),
                (false, d) => format!("DAMAGED snapshots {d:?}"),
            }
        );
    }
    Ok(if report.is_ok() { 0 } else { 1 })
}

/// Prints a garbage collection report.
#[cfg(feature = "s3")]
pub fn fleet_gc(r: &blocksnap::fleet::gc::FleetGcReport, json: bool) {
    use blocksnap::fleet::gc::GcPhase;
    if json {
        return print_json(r);
    }
    println!(
        "fleet gc: {} packs, {} in the bucket",
        r.packs,
        human_bytes(r.bytes)
    );
    if r.packs_deleted + r.manifests_deleted + r.packs_spared > 0 {
        println!(
            "swept: {} packs deleted ({}), {} manifests deleted, {} packs kept (used again meanwhile)",
            r.packs_deleted,
            human_bytes(r.bytes_deleted),
            r.manifests_deleted,
            r.packs_spared
        );
    }
    if !r.captures_expired.is_empty() {
        println!(
            "marked failed, in progress past --stale-capture: snapshots {:?}",
            r.captures_expired.iter().map(|s| s.0).collect::<Vec<_>>()
        );
    }
    match r.phase {
        GcPhase::Idle => {
            println!("nothing is condemned: every pack holds a chunk a snapshot needs")
        }
        GcPhase::Condemned => {
            println!(
                "condemned (generation {}): {} packs ({}) and {} manifests no snapshot needs; \
                 they go at a run of gc after the grace period{}",
                r.generation,
                r.packs_condemned,
                human_bytes(r.bytes_condemned),
                r.manifests_condemned,
                r.grace_left
                    .map(|s| format!(" ({s} s from now)"))
                    .unwrap_or_default()
            );
        }
        GcPhase::Deleting => println!(
            "deleting (generation {}): the packs agreed to go are being deleted; the next run \
             of gc finishes it if this one could not",
            r.generation
        ),
        GcPhase::Sweeping => println!(
            "sweeping (generation {}): waiting for snapshots {:?}, in progress when the sweep began",
            r.generation,
            r.waiting_for.iter().map(|s| s.0).collect::<Vec<_>>()
        ),
    }
}

pub fn gc(r: &GcReport, json: bool) {
    if json {
        return print_json(r);
    }
    let verb = if r.dry_run {
        "would give back"
    } else {
        "gave back"
    };
    println!(
        "gc {verb} {} ({} chunks): {} of {} packs dropped, {} cut short, {} rewritten; {} stored{}, {} unused left; {:.2} s",
        human_bytes(r.bytes_reclaimed),
        r.chunks_reclaimed,
        r.packs_dropped,
        r.packs_examined,
        r.packs_cut,
        r.packs_rewritten,
        human_bytes(r.bytes_stored),
        if r.dry_run { " after" } else { "" },
        human_bytes(r.bytes_unused),
        r.micros as f64 / 1e6
    );
    if r.packs_short_of_space > 0 {
        println!(
            "gc left {} packs as they are for want of free space: their rewrite needs {} free; \
             free that much (or delete more snapshots) and run gc again",
            r.packs_short_of_space,
            human_bytes(r.bytes_needed)
        );
    }
}

/// Prints the store's sizes and ratios.
pub fn stats(s: &StoreStats, json: bool) {
    if json {
        return print_json(s);
    }
    println!("snapshots         {}", s.snapshots);
    println!(
        "logical size      {} ({} of data)",
        human_bytes(s.logical_bytes),
        human_bytes(s.data_bytes)
    );
    println!("stored            {}", human_bytes(s.stored_bytes));
    println!(
        "needed            {} in {} chunks",
        human_bytes(s.live_bytes),
        s.live_chunks
    );
    println!(
        "reclaimable       {} (run `blocksnap gc`)",
        human_bytes(s.reclaimable_bytes)
    );
    println!("dedup ratio       {:.2}x", s.dedup_ratio);
    println!("compression ratio {:.2}x", s.compression_ratio);
    let groups = match s.compression.group_len() {
        0 => "one frame per chunk".to_string(),
        g => format!(
            "new chunks in groups of up to {}",
            human_bytes(u64::from(g))
        ),
    };
    println!(
        "new chunks        {} (zstd level {}, {groups})",
        s.compression,
        s.compression.level()
    );
    index(&s.index, false);
}

/// Prints what the chunk index is.
pub fn index(i: &blocksnap::IndexInfo, json: bool) {
    if json {
        return print_json(i);
    }
    println!(
        "chunk index       {} chunks: {} in its table on disk ({}, generation {}), {} in memory ({})",
        i.chunks,
        i.table_entries,
        human_bytes(i.table_bytes),
        i.table_generation,
        i.overlay_entries,
        human_bytes(i.heap_bytes)
    );
}
