//! A fleet of hosts on one store in a bucket of the local Ceph RADOS
//! Gateway (see `rgw`): each host a cache of its own, some in this
//! process, some as separate `blocksnap` processes. Skipped (and saying
//! so) where Ceph cannot run, unless `BLOCKSNAP_REQUIRE_RGW` is set.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use blocksnap::bucket::Bucket;
use blocksnap::fleet::gc::{GcOptions, GcPhase};
use blocksnap::fleet::{self, FleetOptions};
use blocksnap::{Engine, EngineOptions, Error, ServerId, SnapshotId, SnapshotStatus};
use tempfile::TempDir;

use crate::common::{BS, disk_bytes, random_bytes};
use crate::rgw::{config, gateway, scratch_url};

/// A store of its own in the bucket, and a folder for the hosts' caches
/// and disks.
struct Fleet {
    url: String,
    vars: &'static [(String, String)],
    dir: TempDir,
}

impl Fleet {
    /// A new store (4 KiB blocks); `None` where the gateway cannot run.
    fn new(name: &str) -> Option<Fleet> {
        let vars = gateway()?;
        let fleet = Fleet {
            url: scratch_url(vars, name),
            vars,
            dir: tempfile::tempdir().unwrap(),
        };
        let first = fleet::init(
            &fleet.host("init"),
            EngineOptions::new().block_size(BS as u32),
        )
        .unwrap();
        drop(first);
        Some(fleet)
    }

    fn host(&self, name: &str) -> FleetOptions {
        FleetOptions::new(&self.url, self.dir.path().join(format!("cache-{name}")))
            .unwrap()
            .host(name)
            .bucket(config(self.vars))
    }

    fn open(&self, name: &str) -> Engine {
        fleet::open(&self.host(name), EngineOptions::new())
            .unwrap()
            .0
    }

    /// Host `name` whose disk reads wait at `gate` (to hold a capture).
    fn open_gated(&self, name: &str, gate: &crate::common::Gate) -> Engine {
        fleet::open(
            &self.host(name),
            EngineOptions::new().disk_opener(gate.opener()),
        )
        .unwrap()
        .0
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn bucket(&self) -> Bucket {
        Bucket::open(&self.url, &config(self.vars)).unwrap()
    }

    /// `blocksnap` as host `host`, in a process of its own.
    fn command(&self, host: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_blocksnap"));
        cmd.args(args)
            .env("BLOCKSNAP_STORE", &self.url)
            .env(
                "BLOCKSNAP_CACHE",
                self.dir.path().join(format!("cache-{host}")),
            )
            .env("BLOCKSNAP_HOST", host);
        for (k, v) in self.vars {
            cmd.env(k, v);
        }
        cmd
    }

    /// `blocksnap server add` as host `host`, which must succeed.
    fn add_server_cli(&self, host: &str, id: u64, name: &str, disk: &Path) {
        let id = id.to_string();
        let disk = disk.to_str().unwrap();
        ok(&self.cli(
            host,
            &["server", "add", "--id", &id, "--name", name, "--disk", disk],
        ));
    }

    fn cli(&self, host: &str, args: &[&str]) -> Output {
        self.command(host, args).output().unwrap()
    }

    /// Bytes of the packs in the bucket.
    fn pack_bytes(&self) -> u64 {
        self.bucket()
            .list("packs")
            .unwrap()
            .iter()
            .map(|(_, len)| len)
            .sum()
    }
}

/// Restores a snapshot onto its server's disk here, without a safety
/// snapshot first.
fn restore_plain(engine: &Engine, id: SnapshotId) {
    engine
        .restore_snapshot_with(
            id,
            blocksnap::RestoreOptions::default().safety_snapshot(false),
        )
        .unwrap();
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A collection that sweeps at once (no grace), run until it has no more
/// to do now.
fn collect_all(engine: &Engine) -> Vec<blocksnap::fleet::gc::FleetGcReport> {
    let options = GcOptions::default().grace(Duration::ZERO);
    let mut reports = Vec::new();
    for _ in 0..3 {
        let r = fleet::collect(engine, &options).unwrap();
        let idle = r.phase == GcPhase::Idle;
        reports.push(r);
        if idle {
            break;
        }
    }
    reports
}

#[test]
fn a_snapshot_taken_on_one_host_restores_byte_exact_through_another() {
    let Some(f) = Fleet::new("cross-host") else {
        return;
    };
    let bytes = disk_bytes(600 * BS, 1);
    std::fs::write(f.path("a.img"), &bytes).unwrap();
    let a = f.open("host-a");
    a.add_server(ServerId(1), "web", f.path("a.img")).unwrap();
    let snap = a.create_snapshot(ServerId(1), "v1", "").unwrap();
    drop(a);

    // Host B attaches the same server with a disk of its own, which has
    // moved on, and restores host A's snapshot onto it.
    let mut other = bytes.clone();
    other[100 * BS..140 * BS].copy_from_slice(&random_bytes(40 * BS, 2));
    std::fs::write(f.path("b.img"), &other).unwrap();
    let b_disk = f.path("b.img");
    f.add_server_cli("host-b", 1, "web", &b_disk);
    let list = ok(&f.cli("host-b", &["snapshot", "list", "--json"]));
    assert!(list.contains("\"v1\""), "{list}");
    ok(&f.cli("host-b", &["snapshot", "restore", &snap.id.0.to_string()]));
    assert!(std::fs::read(&b_disk).unwrap() == bytes);

    // Its safety snapshot (the disk as it was) is the fleet's too, and
    // restores on host A.
    let a = f.open("host-a");
    let safety = a
        .snapshots(Some(ServerId(1)))
        .unwrap()
        .into_iter()
        .find(|s| s.id != snap.id)
        .expect("host B's safety snapshot");
    a.restore_snapshot(safety.id).unwrap();
    assert!(std::fs::read(f.path("a.img")).unwrap() == other);
    let report = a.verify(None).unwrap();
    assert!(report.is_ok(), "{report:?}");
}

#[test]
fn sixteen_creates_from_separate_host_processes_give_exactly_five() {
    let Some(f) = Fleet::new("cap-processes") else {
        return;
    };
    std::fs::write(f.path("d.img"), disk_bytes(64 * BS, 3)).unwrap();
    let disk = f.path("d.img");
    let hosts: Vec<String> = (0..16).map(|i| format!("h{i}")).collect();
    for h in &hosts {
        f.add_server_cli(h, 5, "db", &disk);
    }
    let children: Vec<_> = hosts
        .iter()
        .map(|h| {
            f.command(h, &["snapshot", "create", "--server", "5", "--name", h])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let made = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(
        made,
        5,
        "{:?}",
        outs.iter()
            .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
            .collect::<Vec<_>>()
    );
    for o in outs.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("5 snapshots"), "{err}");
    }
    // Every host sees the same five, each with an id of its own.
    let e = f.open("h0");
    let snaps = e.snapshots(Some(ServerId(5))).unwrap();
    assert_eq!(snaps.len(), 5);
    assert!(snaps.iter().all(|s| s.status == SnapshotStatus::Completed));
    let mut ids: Vec<u64> = snaps.iter().map(|s| s.id.0).collect();
    ids.dedup();
    assert_eq!(ids.len(), 5);
}

#[test]
fn ten_hosts_capturing_clones_of_one_template_store_it_once() {
    let Some(f) = Fleet::new("template") else {
        return;
    };
    let template = random_bytes(512 * BS, 4);
    for h in 0..10u64 {
        // A clone of the template that booted: a few blocks its own.
        let mut disk = template.clone();
        let at = (h as usize * 7 + 3) * BS;
        disk[at..at + 4 * BS].copy_from_slice(&random_bytes(4 * BS, 100 + h));
        let path = f.path(&format!("vm{h}.img"));
        std::fs::write(&path, &disk).unwrap();
        let e = f.open(&format!("host-{h}"));
        e.add_server(ServerId(h + 1), &format!("vm{h}"), &path)
            .unwrap();
        e.create_snapshot(ServerId(h + 1), "first", "").unwrap();
    }
    let stored = f.pack_bytes();
    let once = template.len() as u64 + 10 * 4 * BS as u64;
    // Pack headers, record headers and indexes: a few percent.
    assert!(
        stored < once + once / 10,
        "the bucket holds {stored} bytes for {once} of distinct data"
    );
    assert!(stored >= once, "{stored} < {once}");
}

#[test]
fn collecting_while_other_hosts_capture_and_delete_loses_no_chunk() {
    let Some(f) = Fleet::new("gc-race") else {
        return;
    };
    let rounds = crate::common::env_count("BLOCKSNAP_FLEET_GC_ROUNDS", 6);
    // Two hosts capture servers that share most blocks, and delete their
    // oldest; a third collects without grace all along, in this process
    // and, every other run, as a `blocksnap gc` process of a fourth host.
    let hosts: Vec<(Engine, PathBuf)> = (0..2u64)
        .map(|h| {
            let e = f.open(&format!("cap-{h}"));
            let path = f.path(&format!("s{h}.img"));
            std::fs::write(&path, disk_bytes(256 * BS, 7)).unwrap();
            e.add_server(ServerId(h + 1), &format!("s{h}"), &path)
                .unwrap();
            (e, path)
        })
        .collect();
    let collector = f.open("gc");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut kept: Vec<(SnapshotId, Vec<u8>)> = Vec::new();
    let mut deleted = 0;
    std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let options = GcOptions::default().grace(Duration::ZERO);
            let mut deleted = 0;
            for run in 0.. {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                if run % 2 == 0 {
                    deleted += fleet::collect(&collector, &options).unwrap().packs_deleted;
                } else {
                    let out = ok(&f.cli("gc-process", &["gc", "--grace", "0s", "--json"]));
                    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
                    deleted += report["packs_deleted"].as_u64().unwrap();
                }
            }
            deleted
        });
        let mut workers = Vec::new();
        for (h, (e, path)) in hosts.iter().enumerate() {
            workers.push(s.spawn(move || {
                let mut mine = Vec::new();
                for r in 0..rounds {
                    let mut bytes = std::fs::read(path).unwrap();
                    // The same blocks each round: a deleted snapshot's
                    // own chunks are garbage, its packs collectable.
                    let at = (h * 50 + (r as usize % 2) * 8) * BS;
                    bytes[at..at + 8 * BS]
                        .copy_from_slice(&random_bytes(8 * BS, r * 10 + h as u64));
                    std::fs::write(path, &bytes).unwrap();
                    match e.create_snapshot(ServerId(h as u64 + 1), &format!("r{r}"), "") {
                        Ok(snap) => mine.push((snap.id, bytes)),
                        // A capture that used a pack being swept fails,
                        // cleanly: nothing of it is listed as completed.
                        Err(Error::WrongState(why)) if why.contains("garbage collection") => {}
                        Err(e) => panic!("{e}"),
                    }
                    if mine.len() > 2 {
                        let (old, _) = mine.remove(0);
                        e.delete_snapshot(old).unwrap();
                    }
                }
                mine
            }));
        }
        for w in workers {
            kept.extend(w.join().unwrap());
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        deleted = gc.join().unwrap();
    });
    drop(hosts);
    deleted += collect_all(&collector)
        .iter()
        .map(|r| r.packs_deleted)
        .sum::<u64>();
    // The deletes gave space back: the collection ran, not only waited.
    assert!(deleted > 0);
    // A host that never saw any of it restores every snapshot kept.
    let fresh = f.open("fresh");
    for (h, srv) in [(0u64, ServerId(1)), (1, ServerId(2))] {
        let path = f.path(&format!("fresh{h}.img"));
        std::fs::write(&path, b"").unwrap();
        fresh.add_server(srv, &format!("s{h}"), &path).unwrap();
    }
    assert!(!kept.is_empty());
    for (id, bytes) in &kept {
        let snap = fresh.snapshot(*id).unwrap();
        let opts = blocksnap::RestoreOptions::default().safety_snapshot(false);
        fresh.restore_snapshot_with(*id, opts).unwrap();
        let path = f.path(&format!("fresh{}.img", snap.server.id.0 - 1));
        assert!(std::fs::read(&path).unwrap() == *bytes, "snapshot {id}");
    }
    let report = fresh.verify(None).unwrap();
    assert!(report.is_ok(), "{report:?}");
}

#[test]
fn a_chunk_two_hosts_uploaded_at_once_is_kept_once_after_a_collection() {
    let Some(f) = Fleet::new("duplicates") else {
        return;
    };
    let bytes = random_bytes(300 * BS, 21);
    std::fs::write(f.path("x.img"), &bytes).unwrap();
    std::fs::write(f.path("y.img"), &bytes).unwrap();
    // Both hosts open before either uploads: neither knows the other's
    // packs, so both store the same chunks.
    let a = f.open("a");
    let b = f.open("b");
    a.add_server(ServerId(1), "x", f.path("x.img")).unwrap();
    b.add_server(ServerId(2), "y", f.path("y.img")).unwrap();
    let sa = a.create_snapshot(ServerId(1), "a", "").unwrap();
    let sb = b.create_snapshot(ServerId(2), "b", "").unwrap();
    assert!(
        sb.stats.unwrap().new_chunks > 0,
        "host B did not know host A's packs"
    );
    let twice = f.pack_bytes();
    assert!(twice >= 2 * bytes.len() as u64);
    let reports = collect_all(&a);
    assert!(reports.iter().any(|r| r.packs_deleted > 0), "{reports:?}");
    let once = f.pack_bytes();
    assert!(once < twice * 6 / 10, "{once} of {twice} bytes left");
    assert!(once >= bytes.len() as u64);
    drop((a, b));
    // Every snapshot restores, on a new host and on each host reopened
    // (which forgets the copy that went).
    let c = f.open("c");
    for (srv, id, name) in [(ServerId(1), sa.id, "x"), (ServerId(2), sb.id, "y")] {
        let path = f.path(&format!("c-{name}.img"));
        std::fs::write(&path, b"").unwrap();
        c.add_server(srv, name, &path).unwrap();
        restore_plain(&c, id);
        assert!(std::fs::read(&path).unwrap() == bytes, "snapshot {id}");
    }
    for (host, id, disk) in [("a", sa.id, "x.img"), ("b", sb.id, "y.img")] {
        let e = f.open(host);
        std::fs::write(f.path(disk), b"").unwrap();
        restore_plain(&e, id);
        assert!(std::fs::read(f.path(disk)).unwrap() == bytes, "host {host}");
        assert!(e.verify(None).unwrap().is_ok());
    }
}

/// Bytes the pack files of a host's cache take on disk.
fn cache_pack_bytes(f: &Fleet, host: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(f.dir.path().join(format!("cache-{host}/store/packs")))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
        .map(|e| e.metadata().unwrap().blocks() * 512)
        .sum()
}

#[test]
fn a_cache_kept_within_its_bound_still_restores_everything() {
    let Some(f) = Fleet::new("cache-max") else {
        return;
    };
    let bytes = random_bytes(1024 * BS, 22);
    std::fs::write(f.path("x.img"), &bytes).unwrap();
    let host = f.host("a").pack_len(256 << 10);
    let a = fleet::open(&host, EngineOptions::new()).unwrap().0;
    a.add_server(ServerId(1), "x", f.path("x.img")).unwrap();
    let snap = a.create_snapshot(ServerId(1), "x", "").unwrap();
    drop(a);
    let full = cache_pack_bytes(&f, "a");
    assert!(full >= bytes.len() as u64);
    let max = 1 << 20;
    let (a, sync) = fleet::open(&host.clone().cache_max(Some(max)), EngineOptions::new()).unwrap();
    assert!(sync.cache_trimmed >= full - max - (64 << 10), "{sync:?}");
    assert!(cache_pack_bytes(&f, "a") <= max);
    // What was given back is fetched again when read.
    std::fs::write(f.path("x.img"), b"").unwrap();
    restore_plain(&a, snap.id);
    assert!(std::fs::read(f.path("x.img")).unwrap() == bytes);
    assert!(a.verify(None).unwrap().is_ok());
    drop(a);
    // Trimmed again at the next open.
    fleet::open(&host.cache_max(Some(max)), EngineOptions::new()).unwrap();
    assert!(cache_pack_bytes(&f, "a") <= max);
}

#[test]
fn deleted_snapshots_go_from_the_bucket_after_condemnation_and_sweep() {
    let Some(f) = Fleet::new("gc-steps") else {
        return;
    };
    std::fs::write(f.path("x.img"), random_bytes(300 * BS, 8)).unwrap();
    std::fs::write(f.path("y.img"), random_bytes(300 * BS, 9)).unwrap();
    let a = f.open("a");
    a.add_server(ServerId(1), "x", f.path("x.img")).unwrap();
    a.add_server(ServerId(2), "y", f.path("y.img")).unwrap();
    let x = a.create_snapshot(ServerId(1), "x", "").unwrap();
    a.create_snapshot(ServerId(2), "y", "").unwrap();
    let before = f.pack_bytes();
    let b = f.open("b");
    // Nothing to collect while both are kept.
    assert_eq!(collect_all(&b)[0].packs_condemned, 0);
    a.delete_snapshot(x.id).unwrap();
    // With a grace period, the first run only condemns.
    let first = fleet::collect(&b, &GcOptions::default()).unwrap();
    assert_eq!(first.phase, GcPhase::Condemned);
    assert!(first.packs_condemned > 0 && first.manifests_condemned == 1);
    assert_eq!(f.pack_bytes(), before);
    assert!(first.grace_left.is_some());
    // A dry run changes nothing.
    let dry = fleet::collect(
        &b,
        &GcOptions::default().grace(Duration::ZERO).dry_run(true),
    )
    .unwrap();
    assert_eq!(dry.packs_deleted, 0);
    assert_eq!(f.pack_bytes(), before);
    // Past the grace period: swept.
    let swept = fleet::collect(&b, &GcOptions::default().grace(Duration::ZERO)).unwrap();
    assert_eq!(swept.packs_deleted, first.packs_condemned);
    assert_eq!(swept.manifests_deleted, 1);
    assert_eq!(f.pack_bytes(), before - swept.bytes_deleted);
    assert!(f.pack_bytes() >= 300 * BS as u64);
    drop(a);
    // Host A's cache forgets the packs that went, and its snapshot of y
    // still verifies.
    let (a, sync) = fleet::open(&f.host("a"), EngineOptions::new()).unwrap();
    assert_eq!(sync.packs_forgotten, swept.packs_deleted);
    assert!(a.verify(None).unwrap().is_ok());
}

#[test]
fn a_capture_running_through_a_condemnation_takes_its_packs_back() {
    let Some(f) = Fleet::new("gc-takeback") else {
        return;
    };
    let bytes = random_bytes(200 * BS, 11);
    std::fs::write(f.path("x.img"), &bytes).unwrap();
    let a = f.open("a");
    a.add_server(ServerId(1), "x", f.path("x.img")).unwrap();
    let old = a.create_snapshot(ServerId(1), "old", "").unwrap();
    a.delete_snapshot(old.id).unwrap();
    // Its packs are condemned, and the same disk is captured again: the
    // capture dedups against them, and takes them back at publish.
    let b = f.open("b");
    let condemned = fleet::collect(&b, &GcOptions::default()).unwrap();
    assert!(condemned.packs_condemned > 0);
    let again = a.create_snapshot(ServerId(1), "again", "").unwrap();
    assert_eq!(
        again.stats.unwrap().new_chunks,
        0,
        "deduped against the condemned packs"
    );
    let swept = collect_all(&b);
    assert!(swept.iter().all(|r| r.packs_deleted == 0), "{swept:?}");
    drop(a);
    let fresh = f.open("c");
    let path = f.path("c.img");
    std::fs::write(&path, b"").unwrap();
    fresh.add_server(ServerId(1), "x", &path).unwrap();
    restore_plain(&fresh, again.id);
    assert!(std::fs::read(&path).unwrap() == bytes);
}

#[test]
fn a_capture_begun_after_a_sweep_began_that_uses_its_packs_fails_cleanly() {
    let Some(f) = Fleet::new("gc-fence") else {
        return;
    };
    let bytes = random_bytes(200 * BS, 12);
    std::fs::write(f.path("x.img"), &bytes).unwrap();
    let a = f.open("a");
    a.add_server(ServerId(1), "x", f.path("x.img")).unwrap();
    let old = a.create_snapshot(ServerId(1), "old", "").unwrap();
    a.delete_snapshot(old.id).unwrap();
    // A sweep begins, but waits: a capture of another server is running.
    let b = f.open("b");
    std::fs::write(f.path("y.img"), random_bytes(8 * BS, 13)).unwrap();
    let gate = crate::common::Gate::default();
    let slow = f.open_gated("slow", &gate);
    slow.add_server(ServerId(2), "y", f.path("y.img")).unwrap();
    let _opens = gate.open_on_drop();
    let running = slow.start_snapshot(ServerId(2), "slow", "").unwrap();
    gate.wait_for_a_reader();
    fleet::collect(&b, &GcOptions::default()).unwrap();
    let waiting = fleet::collect(&b, &GcOptions::default().grace(Duration::ZERO)).unwrap();
    assert_eq!(waiting.phase, GcPhase::Sweeping);
    assert_eq!(waiting.waiting_for, vec![running.snapshot.id]);
    // Host A captures the same disk again, deduping against the packs
    // being swept: it was not running when the sweep began, so it fails,
    // and nothing of it is completed anywhere.
    let err = a.create_snapshot(ServerId(1), "late", "").unwrap_err();
    assert!(
        matches!(err, Error::WrongState(ref why) if why.contains("garbage collection")),
        "{err}"
    );
    gate.open();
    running.wait().unwrap();
    let swept = collect_all(&b);
    assert!(swept.iter().any(|r| r.packs_deleted > 0), "{swept:?}");
    drop(a);
    // Opened again, host A has forgotten the packs that went: the capture
    // run again stores its chunks and restores byte-exact elsewhere.
    let a = f.open("a");
    let late = a.create_snapshot(ServerId(1), "late", "").unwrap();
    assert!(late.stats.unwrap().new_chunks > 0);
    let c = f.open("c");
    let path = f.path("c.img");
    std::fs::write(&path, b"").unwrap();
    c.add_server(ServerId(1), "x", &path).unwrap();
    restore_plain(&c, late.id);
    assert!(std::fs::read(&path).unwrap() == bytes);
    let listed: Vec<_> = c.snapshots(Some(ServerId(1))).unwrap();
    // The capture that failed is listed failed, never completed.
    assert!(
        listed
            .iter()
            .all(|s| s.name != "late" || s.id == late.id || s.status == SnapshotStatus::Failed),
        "{listed:?}"
    );
}

#[test]
fn a_host_restarted_learns_only_what_is_new() {
    let Some(f) = Fleet::new("catch-up") else {
        return;
    };
    std::fs::write(f.path("x.img"), random_bytes(100 * BS, 14)).unwrap();
    let a = f.open("a");
    a.add_server(ServerId(1), "x", f.path("x.img")).unwrap();
    let first = a.create_snapshot(ServerId(1), "1", "").unwrap();
    let (b, sync) = fleet::open(&f.host("b"), EngineOptions::new()).unwrap();
    assert!(sync.packs_learnt > 0);
    b.add_server(ServerId(1), "x", f.path("x.img")).unwrap();
    drop(b);
    let (b, sync) = fleet::open(&f.host("b"), EngineOptions::new()).unwrap();
    assert_eq!(sync.packs_learnt, 0);
    assert_eq!(b.snapshots(None).unwrap().len(), 1);
    drop(b);
    // Host A goes on: a new snapshot, and the first one deleted.
    std::fs::write(f.path("x.img"), random_bytes(100 * BS, 15)).unwrap();
    let second = a.create_snapshot(ServerId(1), "2", "").unwrap();
    a.delete_snapshot(first.id).unwrap();
    let packs_before = f.bucket().list("packs").unwrap().len();
    let (b, sync) = fleet::open(&f.host("b"), EngineOptions::new()).unwrap();
    assert!(sync.packs_learnt > 0 && (sync.packs_learnt as usize) < packs_before);
    assert_eq!(sync.snapshots_taken_in, 1);
    assert_eq!(sync.snapshots_dropped, 1);
    let ids: Vec<SnapshotId> = b.snapshots(None).unwrap().iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![second.id]);
}

/// The child process of the kill test: captures as host `victim` slowly.
#[test]
#[ignore = "the child process of a harness: the harness runs it"]
fn fleet_child_captures_slowly() {
    let Ok(dir) = std::env::var("BLOCKSNAP_TEST_FLEET_CHILD") else {
        return;
    };
    let vars = gateway().unwrap();
    let url = std::fs::read_to_string(Path::new(&dir).join("url")).unwrap();
    let host = FleetOptions::new(&url, Path::new(&dir).join("cache-victim"))
        .unwrap()
        .host("victim")
        .bucket(config(vars))
        .pack_len(64 << 10);
    let engine = fleet::open(&host, EngineOptions::new()).unwrap().0;
    println!("capturing");
    engine.create_snapshot(ServerId(1), "doomed", "").unwrap();
    println!("done");
}

#[test]
fn a_host_killed_mid_upload_leaves_nothing_half_written_and_the_others_go_on() {
    let Some(f) = Fleet::new("kill") else {
        return;
    };
    std::fs::write(f.dir.path().join("url"), &f.url).unwrap();
    let bytes = random_bytes(4096 * BS, 16);
    std::fs::write(f.path("v.img"), &bytes).unwrap();
    let victim = f.open("victim");
    victim
        .add_server(ServerId(1), "v", f.path("v.img"))
        .unwrap();
    drop(victim);
    let bucket = f.bucket();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "--ignored",
            "fleet::fleet_child_captures_slowly",
            "--nocapture",
        ])
        .env("BLOCKSNAP_TEST_FLEET_CHILD", f.dir.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once some of its packs are in the bucket, mid-upload of more.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while bucket.list("packs/victim").unwrap().len() < 3 {
        assert!(std::time::Instant::now() < deadline, "no pack was uploaded");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Every pack object is a whole, sealed pack (a host learning them
    // refuses none); no manifest is there.
    assert!(!bucket.list("packs").unwrap().is_empty());
    let (_, sync) = fleet::open(&f.host("checker"), EngineOptions::new()).unwrap();
    assert!(sync.packs_refused.is_empty(), "{:?}", sync.packs_refused);
    assert!(sync.packs_learnt > 0);
    assert!(bucket.list("manifests").unwrap().is_empty());
    // Another host goes on meanwhile: captures, restores.
    std::fs::write(f.path("w.img"), disk_bytes(64 * BS, 17)).unwrap();
    let other = f.open("other");
    other.add_server(ServerId(2), "w", f.path("w.img")).unwrap();
    let w = other.create_snapshot(ServerId(2), "w", "").unwrap();
    std::fs::write(f.path("w.img"), b"").unwrap();
    restore_plain(&other, w.id);
    assert!(std::fs::read(f.path("w.img")).unwrap() == disk_bytes(64 * BS, 17));
    // The victim, restarted, marks its dead capture failed and captures
    // again; a collection takes what the dead one left.
    let (victim, sync) = fleet::open(&f.host("victim"), EngineOptions::new()).unwrap();
    assert_eq!(sync.captures_failed, 1);
    let again = victim.create_snapshot(ServerId(1), "again", "").unwrap();
    assert_eq!(victim.snapshots(Some(ServerId(1))).unwrap().len(), 2);
    collect_all(&other);
    drop(victim);
    let path = f.path("v2.img");
    std::fs::write(&path, b"").unwrap();
    other.add_server(ServerId(1), "v", &path).unwrap();
    drop(other);
    let other = f.open("other");
    restore_plain(&other, again.id);
    assert!(std::fs::read(&path).unwrap() == bytes);
}

#[test]
fn serve_on_a_bucket_takes_in_what_other_hosts_did() {
    use std::io::{BufRead, BufReader};
    let Some(f) = Fleet::new("serve") else {
        return;
    };
    std::fs::write(f.path("x.img"), disk_bytes(64 * BS, 23)).unwrap();
    for host in ["api", "other"] {
        f.add_server_cli(host, 1, "x", &f.path("x.img"));
    }
    let mut server = f
        .command(
            "api",
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--fleet-refresh",
                "200ms",
            ],
        )
        .env("BLOCKSNAP_API_TOKEN", "fleet-token")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("serve ended").unwrap();
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.to_string();
        }
    };
    // Another host captures the server the API host serves.
    ok(&f.cli(
        "other",
        &["snapshot", "create", "--server", "1", "--name", "elsewhere"],
    ));
    let agent = ureq::Agent::new_with_defaults();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let body = agent
            .get(format!("{addr}/api/v1/snapshots/"))
            .header("Authorization", "Bearer fleet-token")
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        if body.contains("elsewhere") || std::time::Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = Command::new("kill").arg(server.id().to_string()).status();
    server.wait().unwrap();
    assert!(seen.contains("elsewhere"), "{seen}");
}

/// Changes the collection's state by hand, as a collector between steps
/// would leave it.
fn force_gc_state(f: &Fleet, change: impl Fn(&mut blocksnap::bucket::catalog::GcState)) {
    use blocksnap::bucket::catalog::{FleetCatalog, GcStep};
    let catalog = FleetCatalog::open(f.bucket(), "test").unwrap();
    catalog
        .gc_update(|s, _| {
            change(s);
            Ok(GcStep::Write(()))
        })
        .unwrap();
}

#[test]
fn a_capture_using_a_pack_agreed_for_deletion_fails_and_a_stalled_collection_goes_on() {
    let Some(f) = Fleet::new("gc-agreed") else {
        return;
    };
    let bytes = random_bytes(100 * BS, 24);
    std::fs::write(f.path("x.img"), &bytes).unwrap();
    let a = f.open("a");
    a.add_server(ServerId(1), "x", f.path("x.img")).unwrap();
    a.create_snapshot(ServerId(1), "first", "").unwrap();
    let keys: std::collections::BTreeSet<String> = f
        .bucket()
        .list("packs")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    // Whatever the phase, a pack in the agreed set is never used again.
    force_gc_state(&f, |s| {
        s.phase = GcPhase::Deleting;
        s.deleting = keys.clone();
    });
    let err = a.create_snapshot(ServerId(1), "again", "").unwrap_err();
    assert!(
        matches!(err, Error::WrongState(ref why) if why.contains("garbage collection")),
        "{err}"
    );
    // A collector that died between the two writes that begin a sweep:
    // the next run makes the second, and the one after goes on to idle.
    force_gc_state(&f, |s| {
        s.phase = GcPhase::Sweeping;
        s.deleting.clear();
        s.packs.clear();
        s.waiting_for = None;
    });
    let b = f.open("b");
    let first = fleet::collect(&b, &GcOptions::default().grace(Duration::ZERO)).unwrap();
    assert_eq!(first.phase, GcPhase::Sweeping);
    let second = fleet::collect(&b, &GcOptions::default().grace(Duration::ZERO)).unwrap();
    assert_ne!(second.phase, GcPhase::Sweeping, "{second:?}");
    assert_eq!(second.packs_deleted, 0);
    // The failed capture's manifest (put before its check failed) is
    // condemned; its packs are the first snapshot's, kept.
    assert_eq!(second.manifests_condemned, 1, "{second:?}");
    assert_eq!(second.packs_condemned, 0, "{second:?}");
    // The snapshot that completed is intact, and the capture goes through.
    a.create_snapshot(ServerId(1), "again", "").unwrap();
    assert!(a.verify(None).unwrap().is_ok());
}

#[test]
fn a_refresh_while_a_capture_runs_leaves_it_running() {
    let Some(f) = Fleet::new("refresh-running") else {
        return;
    };
    std::fs::write(f.path("x.img"), disk_bytes(64 * BS, 25)).unwrap();
    let gate = crate::common::Gate::default();
    let a = f.open_gated("a", &gate);
    a.add_server(ServerId(1), "x", f.path("x.img")).unwrap();
    let _opens = gate.open_on_drop();
    let job = a.start_snapshot(ServerId(1), "running", "").unwrap();
    gate.wait_for_a_reader();
    let sync = fleet::refresh(&a).unwrap();
    assert_eq!(sync.captures_failed, 0);
    gate.open();
    let snap = job.wait().unwrap();
    assert_eq!(snap.status, SnapshotStatus::Completed);
    fleet::refresh(&a).unwrap();
    assert_eq!(
        a.snapshot(snap.id).unwrap().status,
        SnapshotStatus::Completed
    );
}

#[test]
fn a_long_running_host_goes_on_after_its_copy_of_a_chunk_is_collected() {
    let Some(f) = Fleet::new("dup-running") else {
        return;
    };
    let bytes = random_bytes(200 * BS, 26);
    std::fs::write(f.path("x.img"), &bytes).unwrap();
    std::fs::write(f.path("y.img"), &bytes).unwrap();
    let a = f.open("a");
    let b = f.open("b");
    a.add_server(ServerId(1), "x", f.path("x.img")).unwrap();
    b.add_server(ServerId(2), "y", f.path("y.img")).unwrap();
    a.create_snapshot(ServerId(1), "a", "").unwrap();
    let sb = b.create_snapshot(ServerId(2), "b", "").unwrap();
    let reports = collect_all(&a);
    assert!(reports.iter().any(|r| r.packs_deleted > 0), "{reports:?}");
    // Host B, still open, takes the collection in: whichever copy went,
    // its snapshot restores and the same data is captured again.
    let sync = fleet::refresh(&b).unwrap();
    std::fs::write(f.path("y.img"), b"").unwrap();
    restore_plain(&b, sb.id);
    assert!(std::fs::read(f.path("y.img")).unwrap() == bytes);
    let again = b.create_snapshot(ServerId(2), "again", "").unwrap();
    assert_eq!(again.status, SnapshotStatus::Completed);
    assert!(b.verify(None).unwrap().is_ok(), "{sync:?}");
}

/// The command's bucket options are checked before anything is reached,
/// each wrong one with an error that says what to do.
#[test]
fn wrong_bucket_options_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_blocksnap"))
            .args(args)
            .env_remove("BLOCKSNAP_STORE")
            .env_remove("BLOCKSNAP_CACHE")
            .env_remove("BLOCKSNAP_HOST")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let store = dir.path().join("store");
    let cache = dir.path().join("cache");
    let (store, cache) = (store.to_str().unwrap(), cache.to_str().unwrap());
    let err = run(&["--store", store, "--cache", cache, "server", "list"]);
    assert!(err.contains("for a store in a bucket"), "{err}");
    let err = run(&["--store", "s3://blocksnap-test/x", "server", "list"]);
    assert!(err.contains("--cache DIR"), "{err}");
    for (url, extra, says) in [
        ("s3://blocksnap-test/x", ["--pack-size", "1K"], "from 64K"),
        (
            "s3://blocksnap-test/x",
            ["--host", "a/b"],
            "not a fleet host name",
        ),
        (
            "s3://Not_A_Bucket/x",
            ["--host", "a"],
            "not a bucket address",
        ),
    ] {
        let mut args = vec!["--store", url, "--cache", cache];
        args.extend(extra);
        args.extend(["server", "list"]);
        let err = run(&args);
        assert!(err.contains(says), "{err}");
    }
    // Nothing was made of a cache for a store that could not be named.
    assert!(!dir.path().join("cache").join("fleet.json").exists());
}
