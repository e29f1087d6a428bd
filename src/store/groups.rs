//! The cache of decompressed group records shared by a restore's or a
//! verification's threads.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;

use super::pack;

/// Group records decompressed recently, shared by the threads of a restore
/// or a verification so that each group is decompressed once, not once per
/// member. A slot is filled by the first thread that needs it; others wait
/// on the slot's lock instead of decompressing it again.
#[derive(Default)]
pub(super) struct GroupCache {
    slots: Mutex<VecDeque<((u32, u32), GroupSlot)>>,
    /// Buffers of evicted groups, reused: a fresh 4 MiB buffer per group
    /// would cost more in page faults than decompressing it.
    spare: Mutex<Vec<Vec<u8>>>,
}

/// One cached group: empty until the first reader has decoded it.
pub(super) type GroupSlot = Arc<Mutex<Option<Arc<DecodedGroup>>>>;

/// A group record's members (id, byte range) and their bytes.
pub(super) struct DecodedGroup {
    pub(super) members: pack::Members,
    pub(super) data: Vec<u8>,
}

/// Groups kept decompressed: at most 4 MiB each.
const GROUP_CACHE_SLOTS: usize = 8;

impl GroupCache {
    /// The slot of the group at `key` (pack, offset), most recently used last.
    pub(super) fn slot(&self, key: (u32, u32)) -> GroupSlot {
        let mut slots = self.slots.lock();
        if let Some(pos) = slots.iter().position(|(k, _)| *k == key)
            && let Some(hit) = slots.remove(pos)
        {
            let slot = hit.1.clone();
            slots.push_back(hit);
            return slot;
        }
        let slot = Arc::new(Mutex::new(None));
        slots.push_back((key, slot.clone()));
        if slots.len() > GROUP_CACHE_SLOTS
            && let Some((_, old)) = slots.pop_front()
            && let Some(mut old) = old.try_lock()
            && let Some(group) = old.take()
            && let Ok(group) = Arc::try_unwrap(group)
        {
            self.spare.lock().push(group.data);
        }
        slot
    }

    pub(super) fn buffer(&self) -> Vec<u8> {
        self.spare.lock().pop().unwrap_or_default()
    }
}
