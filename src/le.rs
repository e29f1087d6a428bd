//! Little-endian field reads for the on-disk decoders. Callers check
//! lengths first; these slice exactly the bytes they decode.

use crate::ids::ChunkId;

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub fn chunk_id_at(b: &[u8], at: usize) -> ChunkId {
    let mut id = [0u8; 32];
    id.copy_from_slice(&b[at..at + 32]);
    ChunkId(id)
}
