//! The bucket seam and the fleet catalog over object stores that
//! misbehave on purpose: one that ignores conditional writes (which the
//! probe must refuse), and one whose conditional writes are lost before
//! they reach it or land without an answer (which the catalog must settle
//! without breaking a rule). Over `object_store`'s in-memory store, so
//! every fault is chosen, and no gateway is needed.

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use blocksnap::bucket::Bucket;
use blocksnap::bucket::catalog::FleetCatalog;
use blocksnap::sample::Rng;
use blocksnap::{Error, ServerId, SnapshotId, SnapshotStatus};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path as Key;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// What happens to a conditional write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Delivered,
    /// Lost before the store saw it: nothing written, no answer.
    Lost,
    /// Applied (or refused) by the store, but its answer lost.
    Unanswered,
}

/// An in-memory store whose conditional writes fail as [`Fate`] says, at
/// random once `faulty` is on; with `ignores`, it writes conditional
/// writes unconditionally (as some S3 servers do).
#[derive(Debug)]
struct Misbehaving {
    inner: InMemory,
    ignores: bool,
    faulty: AtomicBool,
    /// Percent of conditional writes lost, and as many unanswered.
    rate: u64,
    rng: Mutex<Rng>,
    lost: AtomicU64,
    unanswered: AtomicU64,
}

impl Misbehaving {
    fn new(ignores: bool, rate: u64, seed: u64) -> Self {
        Misbehaving {
            inner: InMemory::new(),
            ignores,
            faulty: AtomicBool::new(false),
            rate,
            rng: Mutex::new(Rng::new(seed)),
            lost: AtomicU64::new(0),
            unanswered: AtomicU64::new(0),
        }
    }

    fn fate(&self) -> Fate {
        if !self.faulty.load(Ordering::SeqCst) {
            return Fate::Delivered;
        }
        let roll = self.rng.lock().unwrap().below(100);
        if roll < self.rate {
            self.lost.fetch_add(1, Ordering::SeqCst);
            Fate::Lost
        } else if roll < 2 * self.rate {
            self.unanswered.fetch_add(1, Ordering::SeqCst);
            Fate::Unanswered
        } else {
            Fate::Delivered
        }
    }
}

impl fmt::Display for Misbehaving {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Misbehaving({})", self.inner)
    }
}

fn reset(when: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "misbehaving",
        source: format!("connection reset {when}").into(),
    }
}

#[async_trait]
impl ObjectStore for Misbehaving {
    async fn put_opts(
        &self,
        location: &Key,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if matches!(opts.mode, PutMode::Overwrite) {
            return self.inner.put_opts(location, payload, opts).await;
        }
        if self.ignores {
            opts.mode = PutMode::Overwrite;
        }
        match self.fate() {
            Fate::Delivered => self.inner.put_opts(location, payload, opts).await,
            Fate::Lost => Err(reset("before the request was sent")),
            Fate::Unanswered => {
                let _ = self.inner.put_opts(location, payload, opts).await;
                // The answer is slow to fail: other writers go on
                // meanwhile, and may overwrite what landed.
                std::thread::sleep(std::time::Duration::from_millis(5));
                Err(reset("before the answer came"))
            }
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Key,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Key,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Key,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Key>>,
    ) -> BoxStream<'static, object_store::Result<Key>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Key>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Key>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Key,
        to: &Key,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

const URL: &str = "s3://faults/fleet";

#[test]
fn a_store_that_ignores_conditional_writes_is_refused() {
    let store = Arc::new(Misbehaving::new(true, 0, 1));
    let err = Bucket::over(URL, store.clone()).err().unwrap();
    assert!(
        matches!(
            err,
            Error::Remote {
                in_doubt: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("If-None-Match"), "{err}");
    // The probe cleaned up after itself.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let left = runtime.block_on(async {
        use futures_util::TryStreamExt;
        store.list(None).try_collect::<Vec<_>>().await.unwrap()
    });
    assert!(left.is_empty(), "{left:?}");
    // The well-behaved store passes.
    Bucket::over(URL, Arc::new(Misbehaving::new(false, 0, 1))).unwrap();
}

/// A probe object a process killed mid-probe left is removed by the next
/// open; one of a probe running now stays.
#[test]
fn probes_left_by_killed_processes_are_removed() {
    let store = Arc::new(Misbehaving::new(false, 0, 1));
    let bucket = Bucket::over(URL, store.clone()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let old = format!("probe/4242-{}", now - 2 * 3600 * 1_000_000_000);
    let running = format!("probe/4343-{}", now - 1_000_000_000);
    bucket.put(&old, b"1".to_vec()).unwrap();
    bucket.put(&running, b"1".to_vec()).unwrap();
    bucket.put("probe/not-a-probe", b"1".to_vec()).unwrap();
    drop(bucket);
    let bucket = Bucket::over(URL, store).unwrap();
    let left: Vec<String> = bucket
        .list("probe")
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(left, [running.as_str(), "probe/not-a-probe"]);
}

/// What one host saw of one call.
#[derive(Debug)]
enum Saw {
    Reserved(SnapshotId),
    /// Refused or failed: the reservation may or may not exist.
    ReserveFailed(String),
    Finished(SnapshotId, bool),
    Deleted(SnapshotId),
}

/// Four hosts reserve, finish and delete snapshots of one server while a
/// fifth of their conditional writes are lost or land unanswered: the
/// cap holds, no id is used twice, everything a host was told happened
/// did, and a reservation refused (as over the cap) never exists.
#[test]
fn the_fleet_catalog_settles_lost_and_unanswered_writes() {
    let rounds = crate::common::env_count("BLOCKSNAP_FLEET_FAULT_ROUNDS", 10);
    for round in 0..rounds {
        let seed = crate::common::seed("BLOCKSNAP_FLEET_FAULT_SEED") + round;
        let store = Arc::new(Misbehaving::new(false, 10, seed));
        let first = Bucket::over(URL, store.clone()).unwrap();
        let catalog = FleetCatalog::init(first, "host-0", 65536).unwrap();
        catalog
            .add_server(ServerId(1), "web", Path::new("/d"))
            .unwrap();
        // Each host connects (and probes) before the faults begin.
        let hosts: Vec<FleetCatalog> = (0..4u64)
            .map(|h| {
                let bucket = Bucket::over(URL, store.clone()).unwrap();
                FleetCatalog::open(bucket, &format!("host-{h}")).unwrap()
            })
            .collect();
        store.faulty.store(true, Ordering::SeqCst);
        let threads: Vec<_> = hosts
            .into_iter()
            .zip(0u64..)
            .map(|(catalog, h)| {
                std::thread::spawn(move || {
                    let mut rng = Rng::new(seed * 31 + h);
                    let mut saw = Vec::new();
                    let mut mine: Vec<(SnapshotId, bool)> = Vec::new(); // (id, finished)
                    for i in 0..30 {
                        match rng.below(3) {
                            0 => match catalog.reserve_snapshot(
                                ServerId(1),
                                &format!("h{h}-{i}"),
                                "",
                            ) {
                                Ok(id) => {
                                    saw.push(Saw::Reserved(id));
                                    mine.push((id, false));
                                }
                                Err(e) => saw.push(Saw::ReserveFailed(format!("h{h}-{i}: {e}"))),
                            },
                            1 => {
                                let Some(at) = mine.iter().position(|(_, done)| !done) else {
                                    continue;
                                };
                                let ok = rng.below(2) == 0;
                                if catalog.finish_snapshot(ServerId(1), mine[at].0, ok).is_ok() {
                                    saw.push(Saw::Finished(mine[at].0, ok));
                                    mine[at].1 = true;
                                }
                            }
                            _ => {
                                let Some(at) = mine.iter().position(|(_, done)| *done) else {
                                    continue;
                                };
                                let id = mine[at].0;
                                if catalog.delete_snapshot(ServerId(1), id).is_ok() {
                                    saw.push(Saw::Deleted(id));
                                    mine.remove(at);
                                }
                            }
                        }
                    }
                    saw
                })
            })
            .collect();
        let saw: Vec<Saw> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        store.faulty.store(false, Ordering::SeqCst);
        let server = catalog.server(ServerId(1)).unwrap();
        let why = format!(
            "round {round} (seed {seed}; {} lost, {} unanswered): {:?}\n{saw:?}",
            store.lost.load(Ordering::SeqCst),
            store.unanswered.load(Ordering::SeqCst),
            server.snapshots
        );
        // The cap, and ids used once.
        let counted = server
            .snapshots
            .iter()
            .filter(|s| s.status != SnapshotStatus::Failed)
            .count();
        assert!(counted <= 5, "{why}");
        let mut ids: Vec<u64> = server.snapshots.iter().map(|s| s.id.0).collect();
        ids.sort_unstable();
        let all = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), all, "a snapshot listed twice: {why}");
        // What a host was told happened, did (the last word per id wins).
        let find = |id: SnapshotId| server.snapshots.iter().find(|s| s.id == id);
        let mut last: std::collections::BTreeMap<u64, &Saw> = Default::default();
        for s in &saw {
            match s {
                Saw::Reserved(id) | Saw::Finished(id, _) | Saw::Deleted(id) => {
                    last.insert(id.0, s);
                }
                Saw::ReserveFailed(_) => {}
            }
        }
        for (id, s) in &last {
            let now = find(SnapshotId(*id));
            match s {
                Saw::Reserved(_) => assert!(
                    now.is_some_and(|s| s.status == SnapshotStatus::InProgress),
                    "reserved {id} is not in progress: {why}"
                ),
                Saw::Finished(_, ok) => {
                    let want = if *ok {
                        SnapshotStatus::Completed
                    } else {
                        SnapshotStatus::Failed
                    };
                    assert!(
                        now.is_some_and(|s| s.status == want),
                        "finished {id}: {why}"
                    );
                }
                Saw::Deleted(_) => assert!(now.is_none(), "deleted {id} is back: {why}"),
                Saw::ReserveFailed(_) => unreachable!(),
            }
        }
        // A reservation refused as over the cap never exists.
        for s in &saw {
            if let Saw::ReserveFailed(what) = s
                && what.contains("maximum")
            {
                let name = what.split(':').next().unwrap();
                assert!(
                    !server.snapshots.iter().any(|s| s.name == name),
                    "{name} was refused, yet reserved: {why}"
                );
            }
        }
        assert!(
            store.unanswered.load(Ordering::SeqCst) > 0,
            "no fault was injected"
        );
    }
}
