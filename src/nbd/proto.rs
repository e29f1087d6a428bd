//! The NBD wire format (the protocol's `doc/proto.md`): fixed newstyle
//! negotiation and transmission with structured replies. Everything here
//! is big-endian. Decoders take the peer's bytes and check every field
//! they rely on; the client (`super::client`) checks what needs context
//! (handles, offsets inside the request).

/// `NBDMAGIC`: the server's first eight bytes.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of each option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The prefix of each option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;

pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
/// Option reply types with this bit are errors.
pub const REP_ERROR_BIT: u32 = 1 << 31;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Reply chunk types with this bit are errors.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flag.
pub const STATE_DIRTY: u32 = 1;

/// The longest option reply payload accepted (a description or a context
/// name is far shorter).
pub const MAX_OPTION_REPLY: u32 = 64 << 10;
/// The longest error chunk (or other small chunk) accepted.
pub const MAX_CHUNK_OVERHEAD: u32 = 64 << 10;
/// The longest block status chunk accepted: QEMU sends up to 128 Ki
/// extents (1 MiB) in one; the protocol suggests no more than 32 MiB.
pub const MAX_STATUS_CHUNK: u32 = 32 << 20;

/// A protocol violation or a refusal, described for an error message.
pub type Violation = String;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// An option request: `IHAVEOPT`, option, length, data.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// NBD_OPT_GO's data: the export name and the information wanted.
pub fn go_data(export: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d
}

/// NBD_OPT_SET_META_CONTEXT's data: the export name and the queries.
pub fn meta_context_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn decode_greeting(b: &[u8; 18]) -> Result<u16, Violation> {
    if u64_at(b, 0) != NBD_MAGIC {
        return Err("it is not an NBD server (no NBDMAGIC greeting)".into());
    }
    if u64_at(b, 8) != IHAVEOPT {
        return Err("it speaks only oldstyle negotiation, which blocksnap does not".into());
    }
    let flags = u16_at(b, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("it does not offer fixed newstyle negotiation".into());
    }
    Ok(flags)
}

/// The 20-byte head of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub kind: u32,
    pub len: u32,
}

pub fn decode_option_reply(b: &[u8; 20], sent: u32) -> Result<OptionReply, Violation> {
    if u64_at(b, 0) != OPTION_REPLY_MAGIC {
        return Err("an option reply with a bad magic".into());
    }
    let r = OptionReply {
        option: u32_at(b, 8),
        kind: u32_at(b, 12),
        len: u32_at(b, 16),
    };
    if r.option != sent {
        return Err(format!(
            "a reply to option {} when {sent} was asked",
            r.option
        ));
    }
    if r.len > MAX_OPTION_REPLY {
        return Err(format!("an option reply of {} bytes", r.len));
    }
    Ok(r)
}

/// What an option error reply means, for a message.
pub fn option_error(kind: u32, payload: &[u8]) -> String {
    let what = match kind & !REP_ERROR_BIT {
        1 => "unsupported",
        2 => "forbidden by policy",
        3 => "invalid",
        4 => "not supported on this platform",
        5 => "TLS required",
        6 => "no such export",
        7 => "server shutting down",
        8 => "block size negotiation required",
        9 => "too big",
        _ => "refused",
    };
    let msg = String::from_utf8_lossy(payload);
    if msg.is_empty() {
        what.to_string()
    } else {
        format!("{what} ({})", msg.chars().take(200).collect::<String>())
    }
}

/// An export's size and transmission flags (NBD_INFO_EXPORT).
pub fn decode_info_export(p: &[u8]) -> Result<(u64, u16), Violation> {
    if p.len() != 12 {
        return Err(format!("an export info of {} bytes (12 expected)", p.len()));
    }
    let size = u64_at(p, 2);
    let flags = u16_at(p, 10);
    if flags & TFLAG_HAS_FLAGS == 0 {
        return Err("transmission flags without HAS_FLAGS".into());
    }
    if size > i64::MAX as u64 {
        return Err(format!("an export of {size} bytes"));
    }
    Ok((size, flags))
}

/// An export's block size constraints (NBD_INFO_BLOCK_SIZE): minimum,
/// preferred, maximum.
pub fn decode_info_block_size(p: &[u8]) -> Result<(u32, u32, u32), Violation> {
    if p.len() != 14 {
        return Err(format!(
            "a block size info of {} bytes (14 expected)",
            p.len()
        ));
    }
    let (min, pref, max) = (u32_at(p, 2), u32_at(p, 6), u32_at(p, 10));
    let pow2 = |v: u32| v.is_power_of_two();
    if !pow2(min) || min > 65536 || !pow2(pref) || pref < min || max < pref.min(max) || max < min {
        return Err(format!(
            "block sizes min {min}, preferred {pref}, max {max}"
        ));
    }
    Ok((min, pref, max))
}

/// A meta context reply: its id and name.
pub fn decode_meta_context(p: &[u8]) -> Result<(u32, String), Violation> {
    if p.len() < 5 {
        return Err("a meta context reply too short for an id and a name".into());
    }
    let name = std::str::from_utf8(&p[4..])
        .map_err(|_| "a meta context name that is not UTF-8".to_string())?;
    Ok((u32_at(p, 0), name.to_string()))
}

/// A transmission request (28 bytes; a write's data follows it).
pub fn request(flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// The head of a reply: simple (16 bytes) or a structured chunk (20).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHead {
    Simple { error: u32, handle: u64 },
    Chunk(ChunkHead),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHead {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub len: u32,
}

/// The reply magic in the first 4 bytes: how long the rest of the head is.
pub fn reply_head_len(magic: &[u8; 4]) -> Result<usize, Violation> {
    match u32::from_be_bytes(*magic) {
        SIMPLE_REPLY_MAGIC => Ok(16),
        STRUCTURED_REPLY_MAGIC => Ok(20),
        m => Err(format!("a reply with magic {m:#010x}")),
    }
}

/// Decodes a whole reply head (16 or 20 bytes, magic included).
pub fn decode_reply_head(b: &[u8]) -> Result<ReplyHead, Violation> {
    match (u32_at(b, 0), b.len()) {
        (SIMPLE_REPLY_MAGIC, 16) => Ok(ReplyHead::Simple {
            error: u32_at(b, 4),
            handle: u64_at(b, 8),
        }),
        (STRUCTURED_REPLY_MAGIC, 20) => Ok(ReplyHead::Chunk(ChunkHead {
            flags: u16_at(b, 4),
            kind: u16_at(b, 6),
            handle: u64_at(b, 8),
            len: u32_at(b, 16),
        })),
        (m, n) => Err(format!("a reply head of {n} bytes with magic {m:#010x}")),
    }
}

/// An error chunk's payload: the error number and the server's message.
pub fn decode_error_chunk(p: &[u8]) -> Result<(u32, String), Violation> {
    if p.len() < 6 {
        return Err("an error chunk too short for its error and message length".into());
    }
    let error = u32_at(p, 0);
    let mlen = u16_at(p, 4) as usize;
    let Some(msg) = p.get(6..6 + mlen) else {
        return Err("an error chunk whose message overruns it".into());
    };
    Ok((
        error,
        String::from_utf8_lossy(msg).chars().take(200).collect(),
    ))
}

/// A block status chunk's payload: the context id and its extents
/// (length, flags); every length non-zero, at least one extent.
pub fn decode_block_status(p: &[u8]) -> Result<(u32, Vec<(u32, u32)>), Violation> {
    if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
        return Err(format!("a block status chunk of {} bytes", p.len()));
    }
    let id = u32_at(p, 0);
    let extents: Vec<(u32, u32)> = p[4..]
        .chunks_exact(8)
        .map(|e| (u32_at(e, 0), u32_at(e, 4)))
        .collect();
    if extents.iter().any(|&(len, _)| len == 0) {
        return Err("a block status extent of length 0".into());
    }
    Ok((id, extents))
}

/// An NBD error number, in words.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        1 => "EPERM (not permitted)",
        5 => "EIO (I/O error)",
        12 => "ENOMEM (out of memory)",
        22 => "EINVAL (invalid request)",
        28 => "ENOSPC (no space left)",
        75 => "EOVERFLOW (request too large)",
        95 => "ENOTSUP (not supported)",
        108 => "ESHUTDOWN (server shutting down)",
        _ => "an error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_encodes_as_the_spec_lays_it_out() {
        let r = request(0, CMD_READ, 7, 4096, 512);
        assert_eq!(&r[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(u16_at(&r, 6), CMD_READ);
        assert_eq!(u64_at(&r, 8), 7);
        assert_eq!(u64_at(&r, 16), 4096);
        assert_eq!(u32_at(&r, 24), 512);
    }

    #[test]
    fn greetings_and_heads_are_checked() {
        let mut g = [0u8; 18];
        g[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        assert!(decode_greeting(&g).is_err(), "no fixed newstyle");
        g[17] = 3;
        assert_eq!(decode_greeting(&g), Ok(3));
        g[0] ^= 1;
        assert!(decode_greeting(&g).is_err());
        assert!(decode_reply_head(&[0u8; 16]).is_err());
        assert!(reply_head_len(&[0, 0, 0, 0]).is_err());
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        h[6..8].copy_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        h[8..16].copy_from_slice(&9u64.to_be_bytes());
        h[16..20].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(
            decode_reply_head(&h),
            Ok(ReplyHead::Chunk(ChunkHead {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_OFFSET_DATA,
                handle: 9,
                len: 100
            }))
        );
    }

    #[test]
    fn block_status_payloads_are_checked() {
        let mut p = 3u32.to_be_bytes().to_vec();
        assert!(decode_block_status(&p).is_err(), "no extent");
        p.extend_from_slice(&65536u32.to_be_bytes());
        p.extend_from_slice(&STATE_ZERO.to_be_bytes());
        assert_eq!(decode_block_status(&p), Ok((3, vec![(65536, STATE_ZERO)])));
        p.extend_from_slice(&0u32.to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        assert!(decode_block_status(&p).is_err(), "zero length extent");
        p.pop();
        assert!(decode_block_status(&p).is_err(), "ragged");
        assert!(decode_error_chunk(&[0, 0, 0, 5, 0, 9, b'x']).is_err());
        assert_eq!(
            decode_error_chunk(&[0, 0, 0, 5, 0, 1, b'x']),
            Ok((5, "x".to_string()))
        );
    }
}
