//! The change trackers' shared state: a write path without locks for
//! [`Engine::record_write`](super::Engine::record_write), and a locked
//! path for everything else.
//!
//! Each server's tracker ([`Tracker`], under the `slots` mutex) is paired
//! with the bits guest writes set since it was last folded ([`Live`]). The
//! live bits of every registered server are published as one immutable
//! map through an `ArcSwap`: a write loads the map, announces itself on the
//! live bits (`inflight`), checks they are still current, and sets its bits
//! with atomic ORs. No lock, no allocation, no wait for anything but its own
//! atomics: a guest write never waits on a commit, a manifest read, a GC, a
//! capture, or a thread that was preempted while holding a lock.
//!
//! Replacing a tracker (a capture or restore starting, an adopted bitmap)
//! publishes a new map, then waits until no write announced itself on the
//! old live bits (a grace period), then folds them into the old tracker:
//! every write is then in exactly the old tracker (it announced itself
//! before the swap) or in the new one (it saw the swap and retried there).
//! The two fences make this hold: a write's announcement and the swap's
//! store are each followed by a `SeqCst` fence before the other side's
//! load, so at least one of the two sees the other.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};

use arc_swap::ArcSwap;
use parking_lot::{Mutex, MutexGuard};

use crate::dirty::AtomicBits;
use crate::error::{Error, Result};
use crate::ids::ServerId;
use crate::tracking::Tracker;

/// The bits guest writes set for one tracker.
pub(super) struct Live {
    bits: AtomicBits,
    /// A write fell past the tracked disk's end (the disk grew).
    past_end: AtomicBool,
    /// Writes setting these bits right now.
    inflight: AtomicUsize,
}

/// Every registered server, with the live bits of its tracker if it has
/// one: what a write reads.
type LiveMap = HashMap<ServerId, Option<Arc<Live>>>;

struct Slot {
    tracker: Tracker,
    live: Arc<Live>,
}

impl Slot {
    fn new(tracker: Tracker) -> Self {
        let live = Arc::new(Live {
            bits: AtomicBits::shaped_as(&tracker.dirty),
            past_end: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
        });
        Slot { tracker, live }
    }

    /// Adds the writes so far to the tracker (a lower bound while writes
    /// go on; exact once the slot is retired).
    fn fold(&mut self) {
        if self
            .tracker
            .dirty
            .union_with_atomic(&self.live.bits)
            .is_err()
            || self.live.past_end.load(Ordering::Relaxed)
        {
            self.tracker.trusted = false;
        }
    }

    /// The tracker with every write that will ever reach these live bits:
    /// waits out the writes announced on them (the map no longer names
    /// them, so no new one stays).
    fn retire(mut self) -> Tracker {
        fence(Ordering::SeqCst);
        while self.live.inflight.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
            std::thread::yield_now();
        }
        self.fold();
        self.tracker
    }
}

/// Registered servers and their trackers.
#[derive(Default)]
struct Slots {
    servers: HashSet<ServerId>,
    slots: HashMap<ServerId, Slot>,
}

/// The trackers of every server (see the module doc).
pub(super) struct Tracking {
    slots: Mutex<Slots>,
    live: ArcSwap<LiveMap>,
}

impl Tracking {
    /// Tracking of `servers`, starting from `trackers`.
    pub(super) fn new(
        servers: impl IntoIterator<Item = ServerId>,
        trackers: HashMap<ServerId, Tracker>,
    ) -> Self {
        let slots = Slots {
            servers: servers.into_iter().collect(),
            slots: trackers
                .into_iter()
                .map(|(server, t)| (server, Slot::new(t)))
                .collect(),
        };
        let tracking = Tracking {
            live: ArcSwap::from_pointee(LiveMap::new()),
            slots: Mutex::new(Slots::default()),
        };
        {
            let mut guard = tracking.lock();
            *guard.slots = slots;
            guard.publish();
        }
        tracking
    }

    /// Records a guest write without taking a lock. A server without a
    /// tracker ignores it; an unknown server is an error.
    pub(super) fn record(&self, server: ServerId, offset: u64, len: u64) -> Result<()> {
        loop {
            let map = self.live.load();
            let live = match map.get(&server) {
                None => return Err(Error::ServerNotFound(server)),
                Some(None) => return Ok(()),
                Some(Some(live)) => live,
            };
            live.inflight.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let current = self
                .live
                .load()
                .get(&server)
                .and_then(Option::as_ref)
                .is_some_and(|now| Arc::ptr_eq(now, live));
            if current && !live.bits.mark(offset, len) {
                live.past_end.store(true, Ordering::Relaxed);
            }
            live.inflight.fetch_sub(1, Ordering::SeqCst);
            if current {
                return Ok(());
            }
            // Replaced meanwhile: the write goes to the new tracker.
        }
    }

    /// The trackers, for everything but recording writes. Taken after the
    /// engine's state lock when both are needed; held for in-memory work
    /// only.
    pub(super) fn lock(&self) -> Guard<'_> {
        Guard {
            slots: self.slots.lock(),
            live: &self.live,
        }
    }
}

/// The trackers, locked.
pub(super) struct Guard<'a> {
    slots: MutexGuard<'a, Slots>,
    live: &'a ArcSwap<LiveMap>,
}

impl Guard<'_> {
    /// Makes the current servers and live bits what writes see.
    fn publish(&mut self) {
        let map: LiveMap = self
            .slots
            .servers
            .iter()
            .map(|s| (*s, self.slots.slots.get(s).map(|slot| slot.live.clone())))
            .collect();
        self.live.store(Arc::new(map));
    }

    /// A server was registered: writes to it are accepted (and ignored
    /// until it has a tracker).
    pub(super) fn add_server(&mut self, server: ServerId) {
        self.slots.servers.insert(server);
        self.publish();
    }

    /// True for a registered server.
    pub(super) fn has_server(&self, server: ServerId) -> bool {
        self.slots.servers.contains(&server)
    }

    /// Starts tracking `server` from `fresh` (a capture or restore of its
    /// base just starting, or an adopted bitmap), in the next generation;
    /// returns the tracker it replaces, with every write made to it.
    pub(super) fn begin(&mut self, server: ServerId, mut fresh: Tracker) -> Option<Tracker> {
        let old = self.slots.slots.remove(&server);
        fresh.generation = old.as_ref().map_or(1, |p| p.tracker.generation + 1);
        self.slots.slots.insert(server, Slot::new(fresh));
        self.publish();
        old.map(Slot::retire)
    }

    /// The server's tracker, for its base, generation and flags: its
    /// dirty bitmap may lack the latest writes (see [`Guard::folded`]).
    pub(super) fn get(&mut self, server: ServerId) -> Option<&mut Tracker> {
        self.slots
            .slots
            .get_mut(&server)
            .map(|slot| &mut slot.tracker)
    }

    /// The server's tracker with every write reported so far in its bitmap.
    pub(super) fn folded(&mut self, server: ServerId) -> Option<&Tracker> {
        let slot = self.slots.slots.get_mut(&server)?;
        slot.fold();
        Some(&slot.tracker)
    }

    /// Stops tracking `server`; returns its tracker with every write.
    pub(super) fn remove(&mut self, server: ServerId) -> Option<Tracker> {
        let slot = self.slots.slots.remove(&server)?;
        self.publish();
        Some(slot.retire())
    }

    /// Tracks `server` from `tracker`, as it is (its generation kept);
    /// returns the tracker it replaces, with every write made to it. No
    /// write falls between the two: the new one is published first.
    pub(super) fn swap(&mut self, server: ServerId, tracker: Tracker) -> Option<Tracker> {
        let old = self.slots.slots.insert(server, Slot::new(tracker));
        self.publish();
        old.map(Slot::retire)
    }

    /// The catalog rows that hand the trackers over cleanly (on close):
    /// a tracker still pending (its base never completed) is removed.
    pub(super) fn hand_over(&mut self) -> Vec<(ServerId, Option<Vec<u8>>)> {
        self.slots
            .slots
            .iter_mut()
            .map(|(server, slot)| {
                slot.fold();
                let t = &slot.tracker;
                (*server, (!t.pending).then(|| t.encode(true)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::DirtyBitmap;
    use crate::ids::SnapshotId;

    fn tracker(base: u64) -> Tracker {
        Tracker {
            base: SnapshotId(base),
            pending: false,
            dirty: DirtyBitmap::new(1 << 30, 4096).unwrap(),
            trusted: true,
            generation: 0,
        }
    }

    /// Writes racing a tracker's replacement land in the old tracker or the
    /// new one, never in neither.
    #[test]
    fn no_write_is_lost_across_a_replacement() {
        let server = ServerId(1);
        let tracking = Arc::new(Tracking::new([server], HashMap::new()));
        tracking.lock().begin(server, tracker(1));
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let tracking = tracking.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        let block = w * 100_000 + i;
                        tracking.record(server, block * 4096, 1).unwrap();
                    }
                })
            })
            .collect();
        let mut retired = Vec::new();
        for base in 2..200 {
            retired.push(tracking.lock().begin(server, tracker(base)).unwrap());
        }
        for w in writers {
            w.join().unwrap();
        }
        retired.push(tracking.lock().remove(server).unwrap());
        let mut all = DirtyBitmap::new(1 << 30, 4096).unwrap();
        let mut total = 0;
        for t in &retired {
            total += t.dirty.count();
            all.union_with(&t.dirty).unwrap();
        }
        assert_eq!(all.count(), 40_000, "every write recorded");
        assert_eq!(total, 40_000, "and recorded once");
    }

    #[test]
    fn unknown_servers_are_refused_and_untracked_ones_ignored() {
        let tracking = Tracking::new([ServerId(1)], HashMap::new());
        assert!(matches!(
            tracking.record(ServerId(2), 0, 1),
            Err(Error::ServerNotFound(_))
        ));
        tracking.record(ServerId(1), 0, 1).unwrap();
        tracking.lock().add_server(ServerId(2));
        tracking.record(ServerId(2), 0, 1).unwrap();
        tracking.lock().swap(ServerId(2), tracker(1));
        tracking.record(ServerId(2), 1 << 40, 1).unwrap();
        assert!(!tracking.lock().folded(ServerId(2)).unwrap().trusted);
    }
}
