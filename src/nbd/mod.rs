//! Disks reached over NBD, the Network Block Device protocol: a capture
//! source and a restore target served by another program (qemu-nbd,
//! qemu-storage-daemon or a running VM's NBD server, nbdkit, libvirt's
//! pull-mode backup).
//!
//! A server whose disk is an NBD URI (`nbd://host[:port]/export` or
//! `nbd+unix:///export?socket=PATH`) is read and written through
//! [`NbdDisk`], which [`crate::disk::default_opener`] picks for such paths.
//! Captures skip the extents `base:allocation` reports as zero; an
//! incremental capture can read only the extents a dirty-bitmap meta
//! context marks ([`dirty_bitmap`]).

mod client;
pub mod proto;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod script;

use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use client::{DEPTH, ExportInfo, MAX_REQUEST, NbdClient, Stream};

use crate::dirty::DirtyBitmap;
use crate::disk::Disk;
use crate::error::{Error, Result};

/// The meta context that maps holes and zeros.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The NBD port when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;
/// How long a reply may keep the client waiting before the call fails.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Where an NBD export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed NBD URI (the `nbd` URI scheme of the NBD project, as qemu
/// and libnbd take it), without TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: NbdAddress,
    pub export: String,
}

/// True when `s` is meant as an NBD URI rather than a path.
pub fn is_uri(s: &str) -> bool {
    s.starts_with("nbd://") || s.starts_with("nbd+") || s.starts_with("nbds")
}

impl NbdUri {
    /// Parses `nbd://host[:port][/export]` or
    /// `nbd+unix:///[export]?socket=PATH`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidParameter(format!(
                "{s:?} is not an NBD URI ({why}); use nbd://HOST[:PORT]/EXPORT or \
                 nbd+unix:///EXPORT?socket=PATH"
            ))
        };
        if s.starts_with("nbds") {
            return Err(bad(
                "TLS is not supported; use a Unix socket or a trusted network",
            ));
        }
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').ok_or_else(|| bad("no ?socket="))?;
            let export = path
                .strip_prefix('/')
                .ok_or_else(|| bad("the part after nbd+unix:// must start with /"))?;
            let mut socket = None;
            for pair in query.split('&') {
                match pair.split_once('=') {
                    Some(("socket", v)) if !v.is_empty() => {
                        socket = Some(decode(v).ok_or_else(|| bad("bad %-escape"))?)
                    }
                    _ => return Err(bad("the only query parameter taken is socket=PATH")),
                }
            }
            let socket = socket.ok_or_else(|| bad("no ?socket="))?;
            return Ok(NbdUri {
                address: NbdAddress::Unix(PathBuf::from(socket)),
                export: decode(export).ok_or_else(|| bad("bad %-escape"))?,
            });
        }
        let rest = s
            .strip_prefix("nbd://")
            .or_else(|| s.strip_prefix("nbd+tcp://"))
            .ok_or_else(|| bad("unknown scheme"))?;
        if rest.contains('?') {
            return Err(bad("a TCP URI takes no query"));
        }
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        let port_of = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| bad("the port is not a number"))
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("no ] after [IPv6"))?;
            match after {
                "" => (host, DEFAULT_PORT),
                p => (
                    host,
                    port_of(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?)?,
                ),
            }
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, port_of(p)?),
                None => (authority, DEFAULT_PORT),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(NbdUri {
            address: NbdAddress::Tcp {
                host: host.to_string(),
                port,
            },
            export: decode(export).ok_or_else(|| bad("bad %-escape"))?,
        })
    }

    /// The URI with a relative socket path made absolute (a server's disk
    /// is kept so).
    pub fn absolute(mut self) -> Result<Self> {
        if let NbdAddress::Unix(p) = &self.address {
            let abs = std::path::absolute(p).map_err(|e| Error::io(p.clone(), e))?;
            self.address = NbdAddress::Unix(abs);
        }
        Ok(self)
    }

    /// Connects and negotiates, asking for the meta contexts `contexts`.
    pub fn connect(&self, contexts: &[&str]) -> Result<NbdClient> {
        let peer = self.to_string();
        let stream: Box<dyn Stream> = match &self.address {
            NbdAddress::Unix(path) => {
                let s = UnixStream::connect(path).map_err(|e| connect_error(&peer, e))?;
                s.set_read_timeout(Some(REPLY_TIMEOUT))
                    .and_then(|()| s.set_write_timeout(Some(REPLY_TIMEOUT)))
                    .map_err(|e| connect_error(&peer, e))?;
                Box::new(s)
            }
            NbdAddress::Tcp { host, port } => {
                let s = std::net::TcpStream::connect((host.as_str(), *port))
                    .map_err(|e| connect_error(&peer, e))?;
                s.set_nodelay(true).map_err(|e| connect_error(&peer, e))?;
                s.set_read_timeout(Some(REPLY_TIMEOUT))
                    .and_then(|()| s.set_write_timeout(Some(REPLY_TIMEOUT)))
                    .map_err(|e| connect_error(&peer, e))?;
                Box::new(s)
            }
        };
        NbdClient::handshake(
            Box::new(Buffered::new(stream)),
            &peer,
            &self.export,
            contexts,
        )
    }
}

fn connect_error(peer: &str, e: std::io::Error) -> Error {
    Error::Io {
        path: PathBuf::from(peer),
        source: std::io::Error::new(
            e.kind(),
            format!("cannot connect to the NBD server: {e}; is it running and the URI right?"),
        ),
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let export = encode(&self.export);
        match &self.address {
            NbdAddress::Unix(p) => {
                write!(
                    f,
                    "nbd+unix:///{export}?socket={}",
                    encode(&p.to_string_lossy())
                )
            }
            NbdAddress::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            NbdAddress::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
        }
    }
}

/// %-decoding of a URI component.
pub(crate) fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// %-encoding of what a URI component cannot hold as is.
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A socket with a read buffer (replies come in many small pieces) and a
/// write buffer (requests are 28 bytes), flushed before every wait.
struct Buffered {
    reader: std::io::BufReader<Box<dyn Stream>>,
}

impl Buffered {
    fn new(stream: Box<dyn Stream>) -> Self {
        Buffered {
            reader: std::io::BufReader::with_capacity(256 << 10, stream),
        }
    }
}

impl std::io::Read for Buffered {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf)
    }
}

impl std::io::Write for Buffered {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.reader.get_mut().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.reader.get_mut().flush()
    }
}

/// A disk served over NBD; see the module documentation.
pub struct NbdDisk {
    client: NbdClient,
    path: PathBuf,
}

impl NbdDisk {
    /// Connects to the export `uri` names (asking for `base:allocation`);
    /// `writable` refuses a read-only export.
    pub fn open(uri: &str, writable: bool) -> Result<Self> {
        let parsed = NbdUri::parse(uri)?;
        let client = parsed.connect(&[BASE_ALLOCATION])?;
        if writable && client.info().read_only() {
            return Err(Error::InvalidParameter(format!(
                "NBD export {uri} is read-only; a restore needs it writable"
            )));
        }
        Ok(NbdDisk {
            client,
            path: PathBuf::from(uri),
        })
    }

    /// A disk over a client already connected; `name` for messages.
    pub fn from_client(client: NbdClient, name: String) -> Self {
        NbdDisk {
            client,
            path: PathBuf::from(name),
        }
    }

    pub fn client(&self) -> &NbdClient {
        &self.client
    }
}

impl Disk for NbdDisk {
    fn len(&self) -> Result<u64> {
        Ok(self.client.info().size)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let size = self.client.info().size;
        let n = (size.saturating_sub(offset)).min(buf.len() as u64) as usize;
        if n > 0 {
            self.client.read(&mut buf[..n], offset)?;
        }
        Ok(n)
    }

    fn read_many_at(&self, parts: &mut [(u64, &mut [u8])]) -> Result<()> {
        self.client.read_many(parts)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.client.write(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.client.write_zeroes(offset, len)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if len == self.client.info().size {
            return Ok(());
        }
        Err(Error::InvalidParameter(format!(
            "NBD export {} is {} bytes and cannot be resized to {len}",
            self.path.display(),
            self.client.info().size
        )))
    }

    /// An export's size is fixed, as a block device's is.
    fn is_block_device(&self) -> bool {
        true
    }

    fn sync(&self) -> Result<()> {
        self.client.flush()
    }

    fn data_ranges(&self) -> Result<Option<Vec<Range<u64>>>> {
        if self.client.info().context_id(BASE_ALLOCATION).is_none() {
            return Ok(None);
        }
        let size = self.client.info().size;
        let extents = self.client.block_status(BASE_ALLOCATION, 0..size)?;
        Ok(Some(marked(&extents, |flags| {
            flags & proto::STATE_ZERO == 0
        })))
    }

    fn reads_best_in_bulk(&self) -> bool {
        true
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// The ranges of `extents` whose flags `keep` accepts, merged.
pub(crate) fn marked(extents: &[(Range<u64>, u32)], keep: impl Fn(u32) -> bool) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (r, flags) in extents {
        if !keep(*flags) {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r.clone()),
        }
    }
    out
}

/// The dirty bitmap a `qemu:dirty-bitmap:NAME` meta context (`context`)
/// of export `uri` marks, over `disk_len` bytes at `granularity`: what an
/// incremental capture reads. The export must be exactly `disk_len` long.
pub fn dirty_bitmap(
    uri: &str,
    context: &str,
    disk_len: u64,
    granularity: u64,
) -> Result<DirtyBitmap> {
    let client = NbdUri::parse(uri)?.connect(&[context])?;
    let size = client.info().size;
    if size != disk_len {
        return Err(Error::DiskChanged(format!(
            "NBD export {uri} is {size} bytes, the parent snapshot's disk {disk_len}; a resized \
             disk needs a full snapshot"
        )));
    }
    if client.info().context_id(context).is_none() {
        return Err(Error::InvalidParameter(format!(
            "NBD export {uri} does not offer meta context {context:?}; export the bitmap with the \
             disk (qemu: block-export-add ... bitmaps=[NAME], context qemu:dirty-bitmap:NAME)"
        )));
    }
    bitmap_of(&client, context, disk_len, granularity)
}

/// The dirty bitmap meta context `context` of `client`'s export marks.
pub fn bitmap_of(
    client: &NbdClient,
    context: &str,
    disk_len: u64,
    granularity: u64,
) -> Result<DirtyBitmap> {
    let extents = client.block_status(context, 0..client.info().size)?;
    let ranges = marked(&extents, |flags| flags & proto::STATE_DIRTY != 0);
    let mut bitmap = DirtyBitmap::new(disk_len, granularity)?;
    for r in ranges {
        bitmap.mark(r.start, r.end - r.start)?;
    }
    Ok(bitmap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_as_qemu_and_libnbd_write_them() {
        let u = NbdUri::parse("nbd+unix:///guest?socket=/run/qsd/nbd.sock").unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/run/qsd/nbd.sock".into()));
        assert_eq!(u.export, "guest");
        assert_eq!(u.to_string(), "nbd+unix:///guest?socket=/run/qsd/nbd.sock");
        let u = NbdUri::parse("nbd://10.0.0.5/disk%20a").unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Tcp {
                host: "10.0.0.5".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "disk a");
        let u = NbdUri::parse("nbd://[::1]:10900/x").unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Tcp {
                host: "::1".into(),
                port: 10900
            }
        );
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        assert_eq!(NbdUri::parse("nbd://h").unwrap().export, "");
        for bad in [
            "nbds://h/x",
            "nbd+unix:///x",
            "nbd+unix:///x?socket=",
            "nbd+unix://x?socket=/s",
            "nbd://h:port/x",
            "nbd://:10809/x",
            "nbd://h/x?socket=/s",
            "nbd+unix:///%zz?socket=/s",
            "http://h/x",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad}");
        }
        assert!(is_uri("nbd+unix:///x?socket=/s") && !is_uri("/var/disk.img"));
    }

    #[test]
    fn marked_ranges_merge() {
        let e = [
            (0..10, 0),
            (10..20, 2),
            (20..30, 0),
            (30..40, 0),
            (40..50, 3),
        ];
        assert_eq!(marked(&e, |f| f & 2 == 0), vec![0..10, 20..40]);
    }
}
