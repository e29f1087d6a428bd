//! A scripted NBD server's side of a conversation, as bytes: for the
//! client's tests and the fuzz target's seeds. Not a server: it does not
//! read what the client sends, it only says what a server would answer.

use super::proto::*;

/// The bytes a server sends, built reply by reply.
#[derive(Default, Clone)]
pub struct Script(pub Vec<u8>);

impl Script {
    /// A greeting offering fixed newstyle and no zeroes.
    pub fn greeting() -> Self {
        let mut s = Script::default();
        s.0.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        s.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.0.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s
    }

    pub fn option_reply(mut self, opt: u32, kind: u32, payload: &[u8]) -> Self {
        self.0.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        self.0.extend_from_slice(&opt.to_be_bytes());
        self.0.extend_from_slice(&kind.to_be_bytes());
        self.0
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        self.0.extend_from_slice(payload);
        self
    }

    /// The usual negotiation: structured replies agreed, the meta contexts
    /// `contexts` selected with the given ids, an export of `size` bytes
    /// with transmission `flags`.
    pub fn negotiated(contexts: &[(u32, &str)], size: u64, flags: u16) -> Self {
        let mut s = Script::greeting().option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        for (id, name) in contexts {
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(name.as_bytes());
            s = s.option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &p);
        }
        s = s.option_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]);
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&size.to_be_bytes());
        info.extend_from_slice(&(flags | TFLAG_HAS_FLAGS).to_be_bytes());
        s.option_reply(OPT_GO, REP_INFO, &info)
            .option_reply(OPT_GO, REP_ACK, &[])
    }

    fn chunk(mut self, flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Self {
        self.0
            .extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        self.0.extend_from_slice(&flags.to_be_bytes());
        self.0.extend_from_slice(&kind.to_be_bytes());
        self.0.extend_from_slice(&handle.to_be_bytes());
        self.0
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        self.0.extend_from_slice(payload);
        self
    }

    fn done(done: bool) -> u16 {
        if done { REPLY_FLAG_DONE } else { 0 }
    }

    pub fn data(self, handle: u64, offset: u64, bytes: &[u8], done: bool) -> Self {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(bytes);
        self.chunk(Self::done(done), REPLY_TYPE_OFFSET_DATA, handle, &p)
    }

    pub fn hole(self, handle: u64, offset: u64, len: u32, done: bool) -> Self {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&len.to_be_bytes());
        self.chunk(Self::done(done), REPLY_TYPE_OFFSET_HOLE, handle, &p)
    }

    pub fn status(self, handle: u64, context: u32, extents: &[(u32, u32)], done: bool) -> Self {
        let mut p = context.to_be_bytes().to_vec();
        for (len, flags) in extents {
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
        }
        self.chunk(Self::done(done), REPLY_TYPE_BLOCK_STATUS, handle, &p)
    }

    pub fn error(self, handle: u64, errno: u32, msg: &str, done: bool) -> Self {
        let mut p = errno.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg.as_bytes());
        self.chunk(Self::done(done), REPLY_TYPE_ERROR_BIT | 1, handle, &p)
    }

    pub fn none(self, handle: u64) -> Self {
        self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, &[])
    }

    pub fn simple(mut self, handle: u64, errno: u32) -> Self {
        self.0.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        self.0.extend_from_slice(&errno.to_be_bytes());
        self.0.extend_from_slice(&handle.to_be_bytes());
        self
    }
}

/// A stream that reads a script and swallows what the client writes.
pub struct Replay(pub std::io::Cursor<Vec<u8>>);

impl Replay {
    pub fn boxed(script: Script) -> Box<dyn super::Stream> {
        Box::new(Replay(std::io::Cursor::new(script.0)))
    }
}

impl std::io::Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for Replay {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
