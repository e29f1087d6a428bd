//! An NBD client: fixed newstyle negotiation (structured replies, meta
//! contexts, NBD_OPT_GO), then READ, WRITE, WRITE_ZEROES, FLUSH and
//! BLOCK_STATUS, pipelined: a call sends up to [`DEPTH`] requests before it
//! waits for a reply, and keeps that many in flight as replies come back.
//!
//! Every byte from the server is untrusted. Each reply must match a request
//! in flight by handle; a read's data and holes must lie inside the
//! request, never overlap, and cover it exactly; block status extents must
//! be for a negotiated context and never reach past the export. A server
//! that breaks a rule gets an [`Error::Nbd`] and the connection is closed to
//! further calls (its byte stream can no longer be trusted to be in step).
//! An error the server reports for one request (EIO, ENOSPC...) fails the
//! call and leaves the connection usable.
//!
//! One call at a time owns the connection (a mutex): callers on several
//! threads take turns, each call deeply pipelined on its own.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::ops::Range;

use parking_lot::Mutex;

use super::proto::{self, ChunkHead, ReplyHead};
use crate::error::{Error, Result};

/// Requests in flight at once within a call (QEMU-LIVE.md: 64 x 256 KiB
/// reads ran at the socket's speed; fewer, larger requests were slower).
pub const DEPTH: usize = 64;
/// The largest read or write request sent.
pub const MAX_REQUEST: u32 = 256 << 10;
/// Replies accepted to one option before the server is deemed to babble.
const MAX_OPTION_REPLIES: usize = 4096;

/// A byte stream to an NBD server (a Unix or TCP socket; any `Read +
/// Write` in the fuzz target).
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// What the server told about the export during negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// Minimum and maximum request sizes the server asked for.
    pub min_block: u32,
    pub max_request: u32,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// Meta contexts the server selected: name and its id.
    pub contexts: Vec<(String, u32)>,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.flags & proto::TFLAG_READ_ONLY != 0
    }

    /// The id the server gave a meta context, when it selected it.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, id)| id)
    }
}

/// A connected NBD client; see the module documentation.
pub struct NbdClient {
    peer: String,
    info: ExportInfo,
    conn: Mutex<Conn>,
}

struct Conn {
    stream: Box<dyn Stream>,
    next_handle: u64,
    /// Why the connection can no longer be used, once it cannot.
    broken: Option<String>,
}

/// One request of a call, in flight.
struct Pending {
    handle: u64,
    /// Index of the piece of the call (its place in the buffer).
    piece: usize,
    offset: u64,
    len: u32,
    /// Byte ranges (relative to `offset`) a read's chunks covered.
    covered: BTreeMap<u64, u64>,
    covered_len: u64,
    /// The first error the server reported for it.
    error: Option<String>,
}

impl Pending {
    /// Records that `at..at+len` (relative) was delivered, refusing bytes
    /// outside the request or delivered twice.
    fn cover(&mut self, at: u64, len: u64) -> std::result::Result<(), String> {
        let end = at.checked_add(len).filter(|&e| e <= u64::from(self.len));
        let Some(end) = end else {
            return Err(format!(
                "data at {}+{len} outside the request {}+{}",
                self.offset.wrapping_add(at),
                self.offset,
                self.len
            ));
        };
        if len == 0 {
            return Err("an empty data chunk".into());
        }
        let before = self.covered.range(..end).next_back();
        if before.is_some_and(|(_, &e)| e > at) {
            return Err(format!(
                "data for bytes {}..{} sent twice",
                self.offset + at,
                self.offset + end
            ));
        }
        self.covered.insert(at, end);
        self.covered_len += len;
        Ok(())
    }
}

/// What a call does with the replies to its requests.
enum Kind<'a> {
    /// Where each piece's bytes go.
    Read(Vec<&'a mut [u8]>),
    /// Write, write zeroes, flush: no data comes back.
    Ack,
}

fn violation(peer: &str, what: impl Into<String>) -> Error {
    Error::Nbd {
        peer: peer.to_string(),
        what: what.into(),
    }
}

impl NbdClient {
    /// Negotiates `export` over `stream`, asking for the meta contexts
    /// `contexts` (those the server does not select are absent from
    /// [`ExportInfo::contexts`]). `peer` names the server in messages.
    pub fn handshake(
        mut stream: Box<dyn Stream>,
        peer: &str,
        export: &str,
        contexts: &[&str],
    ) -> Result<Self> {
        let bad = |what: String| violation(peer, what);
        let io = |e: std::io::Error| violation(peer, format!("negotiation failed: {e}"));
        if export.len() > 4096 || contexts.iter().any(|c| c.len() > 4096) {
            return Err(Error::InvalidParameter(
                "an NBD export or meta context name longer than 4096 bytes".into(),
            ));
        }
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).map_err(io)?;
        let flags = proto::decode_greeting(&greeting).map_err(bad)?;
        let client_flags = u32::from(proto::FLAG_FIXED_NEWSTYLE | (flags & proto::FLAG_NO_ZEROES));
        stream.write_all(&client_flags.to_be_bytes()).map_err(io)?;

        stream
            .write_all(&proto::option(proto::OPT_STRUCTURED_REPLY, &[]))
            .map_err(io)?;
        let mut replies = OptionReplies::new(&mut stream, peer, proto::OPT_STRUCTURED_REPLY);
        let (kind, _) = replies
            .next()
            .unwrap_or_else(|| Err(bad("no reply".into())))?;
        let structured = match kind {
            proto::REP_ACK => true,
            k if k & proto::REP_ERROR_BIT != 0 => false,
            k => return Err(bad(format!("reply type {k} to STRUCTURED_REPLY"))),
        };

        let mut selected = Vec::new();
        if structured && !contexts.is_empty() {
            let data = proto::meta_context_data(export, contexts);
            stream
                .write_all(&proto::option(proto::OPT_SET_META_CONTEXT, &data))
                .map_err(io)?;
            for reply in OptionReplies::new(&mut stream, peer, proto::OPT_SET_META_CONTEXT) {
                let (kind, payload) = reply?;
                match kind {
                    proto::REP_META_CONTEXT => {
                        let (id, name) = proto::decode_meta_context(&payload).map_err(bad)?;
                        if !contexts.contains(&name.as_str()) {
                            return Err(bad(format!("meta context {name:?}, never asked for")));
                        }
                        if selected.iter().any(|(n, i)| *n == name || *i == id) {
                            return Err(bad(format!("meta context {name:?} (id {id}) twice")));
                        }
                        selected.push((name, id));
                    }
                    proto::REP_ACK => break,
                    k if k & proto::REP_ERROR_BIT != 0 => {
                        // No context: callers that need one say so.
                        selected.clear();
                        break;
                    }
                    k => return Err(bad(format!("reply type {k} to SET_META_CONTEXT"))),
                }
            }
        }

        stream
            .write_all(&proto::option(proto::OPT_GO, &proto::go_data(export)))
            .map_err(io)?;
        let mut export_info = None;
        let (mut min_block, mut max_request) = (1, MAX_REQUEST);
        for reply in OptionReplies::new(&mut stream, peer, proto::OPT_GO) {
            let (kind, payload) = reply?;
            match kind {
                proto::REP_INFO if payload.len() >= 2 => {
                    match u16::from_be_bytes([payload[0], payload[1]]) {
                        proto::INFO_EXPORT => {
                            export_info = Some(proto::decode_info_export(&payload).map_err(bad)?);
                        }
                        proto::INFO_BLOCK_SIZE => {
                            let (min, _, max) =
                                proto::decode_info_block_size(&payload).map_err(bad)?;
                            min_block = min;
                            // Whole minimum blocks, at most our own cap.
                            max_request = (max.min(MAX_REQUEST) / min * min).max(min);
                        }
                        _ => {} // names and descriptions: not needed
                    }
                }
                proto::REP_INFO => return Err(bad("an info reply without its type".into())),
                proto::REP_ACK => {
                    let Some((size, flags)) = export_info else {
                        return Err(bad("GO acknowledged without the export's size".into()));
                    };
                    let info = ExportInfo {
                        size,
                        flags,
                        min_block,
                        max_request,
                        structured,
                        contexts: selected,
                    };
                    return Ok(NbdClient {
                        peer: peer.to_string(),
                        info,
                        conn: Mutex::new(Conn {
                            stream,
                            next_handle: 1,
                            broken: None,
                        }),
                    });
                }
                k if k & proto::REP_ERROR_BIT != 0 => {
                    return Err(violation(
                        peer,
                        format!("export {export:?}: {}", proto::option_error(k, &payload)),
                    ));
                }
                k => return Err(bad(format!("reply type {k} to GO"))),
            }
        }
        Err(bad("no end to the replies to GO".into()))
    }

    /// What negotiation established.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// The server, as named in messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Reads `buf.len()` bytes at `offset`, all inside the export.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_many(&mut [(offset, buf)])
    }

    /// Reads each `(offset, buffer)` in one pipelined call, all inside the
    /// export.
    pub fn read_many(&self, parts: &mut [(u64, &mut [u8])]) -> Result<()> {
        let step = self.info.max_request as usize;
        let mut pieces = Vec::new();
        let mut dests = Vec::new();
        for (offset, buf) in parts.iter_mut() {
            self.check_range(*offset, buf.len() as u64)?;
            for (i, dest) in buf.chunks_mut(step.max(1)).enumerate() {
                pieces.push((*offset + (i * step) as u64, dest.len() as u32));
                dests.push(dest);
            }
        }
        self.call(
            proto::CMD_READ,
            pieces.into_iter(),
            Kind::Read(dests),
            |_| &[],
        )
    }

    /// Writes all of `buf` at `offset`, inside the export.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let step = self.info.max_request as usize;
        let pieces = (0..buf.len())
            .step_by(step.max(1))
            .map(|at| (offset + at as u64, (buf.len() - at).min(step) as u32));
        self.call(proto::CMD_WRITE, pieces, Kind::Ack, |piece| {
            let at = piece * step;
            &buf[at..(at + step).min(buf.len())]
        })
    }

    /// Makes `len` bytes at `offset` read as zero: WRITE_ZEROES when the
    /// server offers it, written zeros otherwise.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if self.info.flags & proto::TFLAG_SEND_WRITE_ZEROES == 0 {
            let zeros = vec![0u8; (self.info.max_request as usize).min(len as usize)];
            let mut at = 0;
            while at < len {
                let n = (len - at).min(zeros.len() as u64) as usize;
                self.write(&zeros[..n], offset + at)?;
                at += n as u64;
            }
            return Ok(());
        }
        // Large requests carry no data: up to 1 GiB in whole minimum blocks.
        let step = (1u64 << 30) / u64::from(self.info.min_block) * u64::from(self.info.min_block);
        let pieces = (0..len)
            .step_by(step as usize)
            .map(|at| (offset + at, (len - at).min(step) as u32));
        self.call(proto::CMD_WRITE_ZEROES, pieces, Kind::Ack, |_| &[])
    }

    /// Asks the server to make every completed write durable (nothing to
    /// do when the server does not take flushes: it has no write cache).
    pub fn flush(&self) -> Result<()> {
        if self.info.flags & proto::TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.call(proto::CMD_FLUSH, std::iter::once((0, 0)), Kind::Ack, |_| {
            &[]
        })
    }

    /// The extents of meta context `context` over `range`: ascending,
    /// contiguous, covering it exactly, each with the context's flags.
    pub fn block_status(&self, context: &str, range: Range<u64>) -> Result<Vec<(Range<u64>, u32)>> {
        let Some(id) = self.info.context_id(context) else {
            return Err(violation(
                &self.peer,
                format!("the server did not select meta context {context:?}; is it exported?"),
            ));
        };
        self.check_range(range.start, range.end.saturating_sub(range.start))?;
        let mut out: Vec<(Range<u64>, u32)> = Vec::new();
        let mut at = range.start;
        let mut conn = self.conn.lock();
        // A request may ask up to 4 GiB less a minimum block.
        let cap =
            (u64::from(u32::MAX) / u64::from(self.info.min_block)) * u64::from(self.info.min_block);
        while at < range.end {
            let ask = (range.end - at).min(cap) as u32;
            let extents = self.guarded(&mut conn, |conn| self.status_locked(conn, id, at, ask))?;
            for (len, flags) in extents {
                let end = (at + u64::from(len)).min(range.end);
                match out.last_mut() {
                    Some((last, f)) if *f == flags && last.end == at => last.end = end,
                    _ => out.push((at..end, flags)),
                }
                at = end;
                if at == range.end {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.info.size) {
            return Err(Error::InvalidParameter(format!(
                "bytes {offset}+{len} reach past the end of NBD export {} ({} bytes)",
                self.peer, self.info.size
            )));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.info.read_only() {
            return Err(Error::InvalidParameter(format!(
                "NBD export {} is read-only; export it writable to restore into it",
                self.peer
            )));
        }
        Ok(())
    }

    /// Runs one pipelined call: a request per piece (offset, length), with
    /// `data(piece)` after each (writes), and the replies handled by `kind`.
    fn call<'d>(
        &self,
        cmd: u16,
        pieces: impl Iterator<Item = (u64, u32)>,
        mut kind: Kind<'_>,
        data: impl Fn(usize) -> &'d [u8],
    ) -> Result<()> {
        let mut conn = self.conn.lock();
        self.guarded(&mut conn, |conn| {
            self.call_locked(conn, cmd, pieces, &mut kind, data)
        })
    }

    /// Runs `f` on the connection unless a protocol violation made it
    /// unusable; a violation in `f` makes it so (the byte stream can no
    /// longer be trusted to be in step).
    fn guarded<T>(&self, conn: &mut Conn, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        if let Some(why) = &conn.broken {
            return Err(violation(
                &self.peer,
                format!("the connection is unusable: {why}"),
            ));
        }
        let outcome = f(conn);
        if let Err(Error::Nbd { what, .. }) = &outcome {
            conn.broken.get_or_insert_with(|| what.clone());
        }
        outcome
    }

    fn call_locked<'d>(
        &self,
        conn: &mut Conn,
        cmd: u16,
        pieces: impl Iterator<Item = (u64, u32)>,
        kind: &mut Kind<'_>,
        data: impl Fn(usize) -> &'d [u8],
    ) -> Result<()> {
        let peer = &self.peer;
        let io = |e: std::io::Error| violation(peer, format!("connection lost: {e}"));
        let mut pieces = pieces.enumerate().peekable();
        let mut inflight: Vec<Pending> = Vec::with_capacity(DEPTH);
        let mut first_error: Option<String> = None;
        let mut out = Vec::with_capacity(DEPTH * 28);
        loop {
            // Top the pipeline up.
            out.clear();
            while inflight.len() < DEPTH {
                let Some((piece, (offset, len))) = pieces.next() else {
                    break;
                };
                let handle = conn.next_handle;
                conn.next_handle += 1;
                out.extend_from_slice(&proto::request(0, cmd, handle, offset, len));
                if cmd == proto::CMD_WRITE {
                    conn.stream.write_all(&out).map_err(io)?;
                    conn.stream.write_all(data(piece)).map_err(io)?;
                    out.clear();
                }
                inflight.push(Pending {
                    handle,
                    piece,
                    offset,
                    len,
                    covered: BTreeMap::new(),
                    covered_len: 0,
                    error: None,
                });
            }
            if !out.is_empty() {
                conn.stream.write_all(&out).map_err(io)?;
            }
            if inflight.is_empty() {
                break;
            }
            conn.stream.flush().map_err(io)?;
            // One reply (or reply chunk).
            let head = read_head(&mut conn.stream, peer)?;
            let handle = match head {
                ReplyHead::Simple { handle, .. } => handle,
                ReplyHead::Chunk(c) => c.handle,
            };
            let Some(i) = inflight.iter().position(|p| p.handle == handle) else {
                return Err(violation(
                    peer,
                    format!("a reply for handle {handle}, not in flight"),
                ));
            };
            let done = self.reply(&mut conn.stream, head, &mut inflight[i], kind)?;
            if done {
                let p = inflight.swap_remove(i);
                if let Some(e) = p.error {
                    first_error.get_or_insert(e);
                } else if let Kind::Read(_) = kind
                    && p.covered_len != u64::from(p.len)
                {
                    return Err(violation(
                        peer,
                        format!(
                            "a read of {}+{} ended with {} bytes delivered",
                            p.offset, p.len, p.covered_len
                        ),
                    ));
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(Error::Io {
                path: peer.into(),
                source: std::io::Error::other(format!("the NBD server answered {e}")),
            }),
        }
    }

    /// Handles one reply for `p`; true when it was the request's last.
    fn reply(
        &self,
        stream: &mut Box<dyn Stream>,
        head: ReplyHead,
        p: &mut Pending,
        kind: &mut Kind<'_>,
    ) -> Result<bool> {
        let peer = &self.peer;
        let bad = |what: String| violation(peer, what);
        let io = |e: std::io::Error| violation(peer, format!("connection lost: {e}"));
        let chunk = match head {
            ReplyHead::Simple { error, .. } => {
                if error != 0 {
                    p.error
                        .get_or_insert_with(|| proto::errno_name(error).to_string());
                    return Ok(true);
                }
                if let Kind::Read(dests) = kind {
                    if self.info.structured {
                        return Err(bad(
                            "a simple reply to a read after structured replies were agreed".into(),
                        ));
                    }
                    stream.read_exact(dests[p.piece]).map_err(io)?;
                    p.cover(0, u64::from(p.len)).map_err(bad)?;
                }
                return Ok(true);
            }
            ReplyHead::Chunk(c) => c,
        };
        if !self.info.structured {
            return Err(bad("a structured reply that was never agreed".into()));
        }
        let done = chunk.flags & proto::REPLY_FLAG_DONE != 0;
        match (chunk.kind, &mut *kind) {
            (proto::REPLY_TYPE_NONE, _) => {
                if chunk.len != 0 || !done {
                    return Err(bad(format!(
                        "a NONE chunk of {} bytes or not the last",
                        chunk.len
                    )));
                }
            }
            (proto::REPLY_TYPE_OFFSET_DATA, Kind::Read(dests)) => {
                if chunk.len < 9 || chunk.len - 8 > p.len {
                    return Err(bad(format!(
                        "a data chunk of {} bytes for a read of {}",
                        chunk.len, p.len
                    )));
                }
                let mut off = [0u8; 8];
                stream.read_exact(&mut off).map_err(io)?;
                let rel = u64::from_be_bytes(off).wrapping_sub(p.offset);
                let n = u64::from(chunk.len - 8);
                p.cover(rel, n).map_err(bad)?;
                let at = rel as usize;
                stream
                    .read_exact(&mut dests[p.piece][at..at + n as usize])
                    .map_err(io)?;
            }
            (proto::REPLY_TYPE_OFFSET_HOLE, Kind::Read(dests)) => {
                if chunk.len != 12 {
                    return Err(bad(format!("a hole chunk of {} bytes", chunk.len)));
                }
                let mut b = [0u8; 12];
                stream.read_exact(&mut b).map_err(io)?;
                let mut off = [0u8; 8];
                off.copy_from_slice(&b[..8]);
                let rel = u64::from_be_bytes(off).wrapping_sub(p.offset);
                let n = u64::from(u32::from_be_bytes([b[8], b[9], b[10], b[11]]));
                p.cover(rel, n).map_err(bad)?;
                let at = rel as usize;
                dests[p.piece][at..at + n as usize].fill(0);
            }
            (k, _) if k & proto::REPLY_TYPE_ERROR_BIT != 0 => {
                let payload = read_payload(stream, peer, &chunk)?;
                let (error, msg) = proto::decode_error_chunk(&payload).map_err(bad)?;
                if error == 0 {
                    return Err(bad("an error chunk with error 0".into()));
                }
                let name = proto::errno_name(error);
                p.error.get_or_insert_with(|| {
                    if msg.is_empty() {
                        name.to_string()
                    } else {
                        format!("{name}: {msg}")
                    }
                });
            }
            (k, _) => {
                return Err(bad(format!(
                    "a reply chunk of type {k} to request {}",
                    p.handle
                )));
            }
        }
        Ok(done)
    }

    /// One BLOCK_STATUS request: the extents of context `id` from `at`,
    /// at least one, none past the export's end.
    fn status_locked(
        &self,
        conn: &mut Conn,
        id: u32,
        at: u64,
        len: u32,
    ) -> Result<Vec<(u32, u32)>> {
        let peer = &self.peer;
        let bad = |what: String| violation(peer, what);
        let io = |e: std::io::Error| violation(peer, format!("connection lost: {e}"));
        let handle = conn.next_handle;
        conn.next_handle += 1;
        let req = proto::request(0, proto::CMD_BLOCK_STATUS, handle, at, len);
        conn.stream.write_all(&req).map_err(io)?;
        conn.stream.flush().map_err(io)?;
        let mut mine: Option<Vec<(u32, u32)>> = None;
        let mut error = None;
        loop {
            let head = read_head(&mut conn.stream, peer)?;
            let chunk = match head {
                ReplyHead::Simple {
                    handle: h,
                    error: e,
                } if h == handle && e != 0 => {
                    error = Some(proto::errno_name(e).to_string());
                    break;
                }
                ReplyHead::Simple { .. } => {
                    return Err(bad("a simple reply to BLOCK_STATUS".into()));
                }
                ReplyHead::Chunk(c) => c,
            };
            if chunk.handle != handle {
                return Err(bad(format!(
                    "a reply for handle {}, not in flight",
                    chunk.handle
                )));
            }
            let payload = read_payload(&mut conn.stream, peer, &chunk)?;
            match chunk.kind {
                proto::REPLY_TYPE_BLOCK_STATUS => {
                    let (ctx, extents) = proto::decode_block_status(&payload).map_err(bad)?;
                    if !self.info.contexts.iter().any(|&(_, i)| i == ctx) {
                        return Err(bad(format!(
                            "block status for context {ctx}, never selected"
                        )));
                    }
                    let total: u64 = extents.iter().map(|&(l, _)| u64::from(l)).sum();
                    let last = extents.last().map_or(0, |&(l, _)| u64::from(l));
                    // Only the last extent may run past the request, and
                    // none past the export.
                    if total - last >= u64::from(len) || at + total - last >= self.info.size {
                        return Err(bad(format!(
                            "block status extents of {total} bytes for {len}"
                        )));
                    }
                    if ctx == id {
                        if mine.is_some() {
                            return Err(bad(format!("two block status chunks for context {ctx}")));
                        }
                        mine = Some(extents);
                    }
                }
                proto::REPLY_TYPE_NONE if payload.is_empty() => {}
                k if k & proto::REPLY_TYPE_ERROR_BIT != 0 => {
                    let (e, msg) = proto::decode_error_chunk(&payload).map_err(bad)?;
                    error.get_or_insert(format!("{}: {msg}", proto::errno_name(e)));
                }
                k => return Err(bad(format!("a reply chunk of type {k} to BLOCK_STATUS"))),
            }
            if chunk.flags & proto::REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if let Some(e) = error {
            return Err(Error::Io {
                path: peer.into(),
                source: std::io::Error::other(format!("the NBD server answered {e}")),
            });
        }
        mine.ok_or_else(|| bad(format!("no block status for context {id}")))
    }
}

impl Drop for NbdClient {
    /// Says goodbye (NBD_CMD_DISC) so the server ends the connection
    /// cleanly; best effort.
    fn drop(&mut self) {
        let conn = self.conn.get_mut();
        if conn.broken.is_none() {
            let handle = conn.next_handle;
            let _ = conn
                .stream
                .write_all(&proto::request(0, proto::CMD_DISC, handle, 0, 0));
            let _ = conn.stream.flush();
        }
    }
}

fn read_head(stream: &mut Box<dyn Stream>, peer: &str) -> Result<ReplyHead> {
    let io = |e: std::io::Error| violation(peer, format!("connection lost: {e}"));
    let mut head = [0u8; 20];
    stream.read_exact(&mut head[..4]).map_err(io)?;
    let magic = [head[0], head[1], head[2], head[3]];
    let n = proto::reply_head_len(&magic).map_err(|w| violation(peer, w))?;
    stream.read_exact(&mut head[4..n]).map_err(io)?;
    proto::decode_reply_head(&head[..n]).map_err(|w| violation(peer, w))
}

fn read_payload(stream: &mut Box<dyn Stream>, peer: &str, chunk: &ChunkHead) -> Result<Vec<u8>> {
    let limit = if chunk.kind == proto::REPLY_TYPE_BLOCK_STATUS {
        proto::MAX_STATUS_CHUNK
    } else {
        proto::MAX_CHUNK_OVERHEAD
    };
    if chunk.len > limit {
        return Err(violation(
            peer,
            format!("a reply chunk of {} bytes", chunk.len),
        ));
    }
    let mut payload = vec![0u8; chunk.len as usize];
    stream
        .read_exact(&mut payload)
        .map_err(|e| violation(peer, format!("connection lost: {e}")))?;
    Ok(payload)
}

/// The replies to one option: (type, payload) until the caller stops, at
/// most [`MAX_OPTION_REPLIES`].
struct OptionReplies<'s> {
    stream: &'s mut Box<dyn Stream>,
    peer: &'s str,
    option: u32,
    seen: usize,
}

impl<'s> OptionReplies<'s> {
    fn new(stream: &'s mut Box<dyn Stream>, peer: &'s str, option: u32) -> Self {
        OptionReplies {
            stream,
            peer,
            option,
            seen: 0,
        }
    }
}

impl Iterator for OptionReplies<'_> {
    type Item = Result<(u32, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.seen += 1;
        if self.seen > MAX_OPTION_REPLIES {
            return Some(Err(violation(
                self.peer,
                format!("over {MAX_OPTION_REPLIES} replies to one option"),
            )));
        }
        let mut head = [0u8; 20];
        let read = self.stream.read_exact(&mut head).and_then(|()| {
            let r =
                proto::decode_option_reply(&head, self.option).map_err(std::io::Error::other)?;
            let mut payload = vec![0u8; r.len as usize];
            self.stream.read_exact(&mut payload)?;
            Ok((r.kind, payload))
        });
        Some(read.map_err(|e| violation(self.peer, format!("negotiation failed: {e}"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::script::{Replay, Script};

    const CTX: &str = "base:allocation";

    fn client(script: Script) -> Result<NbdClient> {
        NbdClient::handshake(Replay::boxed(script), "test", "guest", &[CTX])
    }

    fn base(size: u64) -> Script {
        Script::negotiated(&[(5, CTX)], size, proto::TFLAG_SEND_FLUSH)
    }

    fn is_violation(e: &Error) -> bool {
        matches!(e, Error::Nbd { .. })
    }

    #[test]
    fn a_read_assembles_data_and_holes_in_any_order() {
        let c = client(
            base(1 << 20)
                .hole(1, 4096 + 100, 400, false)
                .data(1, 4096, &[7u8; 100], false)
                .data(1, 4096 + 500, &[9u8; 12], true),
        )
        .unwrap();
        assert_eq!(c.info().size, 1 << 20);
        assert_eq!(c.info().context_id(CTX), Some(5));
        let mut buf = vec![1u8; 512];
        c.read(&mut buf, 4096).unwrap();
        assert_eq!(&buf[..100], &[7u8; 100]);
        assert_eq!(&buf[100..500], &[0u8; 400]);
        assert_eq!(&buf[500..], &[9u8; 12]);
    }

    #[test]
    fn lies_about_reads_are_errors_and_end_the_connection() {
        let lies: Vec<(&str, Script)> = vec![
            (
                "outside the request",
                base(1 << 20).data(1, 4096 + 500, &[0u8; 13], true),
            ),
            (
                "before the request",
                base(1 << 20).data(1, 4095, &[0u8; 512], true),
            ),
            (
                "twice",
                base(1 << 20).data(1, 4096, &[0u8; 300], false).data(
                    1,
                    4096 + 200,
                    &[0u8; 312],
                    true,
                ),
            ),
            ("short", base(1 << 20).data(1, 4096, &[0u8; 511], true)),
            (
                "another handle",
                base(1 << 20).data(2, 4096, &[0u8; 512], true),
            ),
            (
                "a status chunk",
                base(1 << 20).status(1, 5, &[(512, 0)], true),
            ),
            ("a simple reply with data", base(1 << 20).simple(1, 0)),
            (
                "a NONE chunk not last",
                base(1 << 20).none(1).data(1, 4096, &[0; 512], true),
            ),
            ("cut off", base(1 << 20).data(1, 4096, &[0u8; 100], false)),
        ];
        for (what, script) in lies {
            let c = client(script).unwrap();
            let mut buf = vec![0u8; 512];
            let e = c.read(&mut buf, 4096).unwrap_err();
            assert!(is_violation(&e), "{what}: {e}");
            let again = c.read(&mut buf, 4096).unwrap_err();
            assert!(again.to_string().contains("unusable"), "{what}: {again}");
        }
    }

    #[test]
    fn a_reported_error_fails_the_call_but_not_the_connection() {
        let c = client(
            base(1 << 20)
                .error(1, 5, "bad sector", false)
                .hole(1, 0, 512, true)
                .data(2, 0, &[3u8; 512], true),
        )
        .unwrap();
        let mut buf = vec![0u8; 512];
        let e = c.read(&mut buf, 0).unwrap_err();
        assert!(!is_violation(&e) && e.to_string().contains("EIO"), "{e}");
        c.read(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![3u8; 512]);
    }

    #[test]
    fn requests_past_the_export_are_refused_before_sending() {
        let c = client(base(4096)).unwrap();
        let mut buf = vec![0u8; 512];
        assert!(matches!(
            c.read(&mut buf, 4000),
            Err(Error::InvalidParameter(_))
        ));
        assert!(matches!(
            c.write(&buf, u64::MAX - 10),
            Err(Error::InvalidParameter(_))
        ));
    }

    #[test]
    fn block_status_is_checked_and_clipped() {
        let c = client(base(1 << 20).status(1, 5, &[(4096, 3), (8192, 0), (1 << 20, 3)], true))
            .unwrap();
        let got = c.block_status(CTX, 0..16384).unwrap();
        assert_eq!(got, vec![(0..4096, 3), (4096..12288, 0), (12288..16384, 3)]);
        let lies: Vec<(&str, Script)> = vec![
            (
                "another context",
                base(1 << 20).status(1, 6, &[(4096, 0)], true),
            ),
            ("none for ours", base(1 << 20).none(1)),
            (
                "an empty extent",
                base(1 << 20).status(1, 5, &[(0, 0)], true),
            ),
            (
                "past the request",
                base(1 << 20).status(1, 5, &[(16384, 0), (1, 0)], true),
            ),
            (
                "twice",
                base(1 << 20)
                    .status(1, 5, &[(4096, 0)], false)
                    .status(1, 5, &[(4096, 0)], true),
            ),
        ];
        for (what, script) in lies {
            let c = client(script).unwrap();
            let e = c.block_status(CTX, 0..16384).unwrap_err();
            assert!(is_violation(&e), "{what}: {e}");
        }
        let c = client(base(1 << 20)).unwrap();
        let e = c.block_status("qemu:dirty-bitmap:x", 0..4096).unwrap_err();
        assert!(e.to_string().contains("did not select"), "{e}");
    }

    /// QEMU sends up to 128 Ki extents in one chunk (1 MiB).
    #[test]
    fn a_block_status_chunk_of_a_mebibyte_is_taken() {
        let extents: Vec<(u32, u32)> = (0..131_072u32).map(|i| (4096, i % 2 * 3)).collect();
        let c = client(base(1 << 30).status(1, 5, &extents, true)).unwrap();
        let got = c.block_status(CTX, 0..(131_072 * 4096)).unwrap();
        assert_eq!(got.len(), 131_072);
    }

    #[test]
    fn negotiation_failures_say_what_the_server_said() {
        let unknown = Script::greeting()
            .option_reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[])
            .option_reply(proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &[])
            .option_reply(
                proto::OPT_GO,
                proto::REP_ERROR_BIT | 6,
                b"export 'guest' not present",
            );
        let e = client(unknown).err().unwrap();
        assert!(e.to_string().contains("no such export"), "{e}");
        let mut not_nbd = Script::greeting();
        not_nbd.0[0] = b'X';
        assert!(client(not_nbd).is_err());
        let no_size = Script::greeting()
            .option_reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[])
            .option_reply(proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &[])
            .option_reply(proto::OPT_GO, proto::REP_ACK, &[]);
        assert!(client(no_size).is_err());
        let unasked = Script::negotiated(&[(1, "qemu:allocation-depth")], 4096, 0);
        assert!(client(unasked).is_err());
    }

    #[test]
    fn without_structured_replies_reads_take_simple_replies() {
        let mut s = Script::greeting().option_reply(
            proto::OPT_STRUCTURED_REPLY,
            proto::REP_ERROR_BIT | 1,
            &[],
        );
        let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&8192u64.to_be_bytes());
        info.extend_from_slice(&(proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY).to_be_bytes());
        s = s
            .option_reply(proto::OPT_GO, proto::REP_INFO, &info)
            .option_reply(proto::OPT_GO, proto::REP_ACK, &[])
            .simple(1, 0);
        s.0.extend_from_slice(&[4u8; 1024]);
        let c = client(s).unwrap();
        assert!(!c.info().structured && c.info().contexts.is_empty());
        let mut buf = vec![0u8; 1024];
        c.read(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![4u8; 1024]);
        let e = c.write(&buf, 0).unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
    }

    #[test]
    fn a_large_read_is_pipelined_in_pieces() {
        let len = 3 * MAX_REQUEST as usize + 5;
        let mut s = base(1 << 30);
        // Replies come back in reverse order.
        for piece in (0..4u64).rev() {
            let at = piece * u64::from(MAX_REQUEST);
            let n = (len as u64 - at).min(u64::from(MAX_REQUEST)) as usize;
            s = s.data(piece + 1, at, &vec![piece as u8 + 1; n], true);
        }
        let c = client(s).unwrap();
        let mut buf = vec![0u8; len];
        c.read(&mut buf, 0).unwrap();
        for (i, b) in buf.iter().enumerate() {
            assert_eq!(*b as usize, i / MAX_REQUEST as usize + 1);
        }
    }
}
