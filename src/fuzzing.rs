//! Entry points for the fuzz targets (`fuzz/`) and for the corpus tests
//! that replay their inputs under `cargo test`: one per decoder of bytes
//! from disk or from a client. Each must return, never panic, whatever the
//! input; each returns whether the input decoded. Not a stable API.

use crate::dirty::DirtyBitmap;
use crate::ids::ChunkId;
use crate::le;
use crate::manifest::Manifest;
use crate::store::{pack, table};
use crate::tracking::Tracker;

/// A manifest file's bytes.
pub fn manifest(bytes: &[u8]) -> bool {
    Manifest::decode(bytes).is_ok()
}

/// A pack record (52-byte header and payload), checked against the id in
/// its own header as the store does.
pub fn pack_record(bytes: &[u8]) -> bool {
    let Some(head) = bytes.get(..pack::RECORD_HEADER_LEN) else {
        return false;
    };
    match pack::RecordHeader::decode(head) {
        Ok(h) => pack::decode_record(bytes, &h.id).is_ok(),
        Err(_) => {
            // Also with an arbitrary expected id.
            let id = ChunkId::of(bytes);
            pack::decode_record(bytes, &id).is_ok()
        }
    }
}

/// A group record's payload (member table and zstd frame) past its CRCs,
/// which random bytes rarely get through: the first 4 bytes give the
/// header's raw length (at most 1 MiB here), the rest is the payload. The
/// table is checked, the frame decompressed and every member looked up.
pub fn group_payload(bytes: &[u8]) -> bool {
    let Some((len, payload)) = bytes.split_first_chunk::<4>() else {
        return false;
    };
    let raw_len = u32::from_le_bytes(*len) % (1 << 20);
    let Ok((members, frame)) = pack::decode_group_table(payload, raw_len) else {
        return false;
    };
    let mut data = vec![0u8; raw_len as usize];
    if pack::decompress_into(frame, &mut data).is_err() {
        return false;
    }
    members
        .iter()
        .all(|(id, _)| pack::group_member(&members, &data, id).is_ok())
}

/// A sealed pack's tail: index entries then the 32-byte trailer, as if
/// the input were the end of a pack file of its own length.
pub fn pack_tail(bytes: &[u8]) -> bool {
    let len = bytes.len() as u64;
    let Some(t) = bytes
        .len()
        .checked_sub(pack::TRAILER_LEN)
        .map(|at| &bytes[at..])
    else {
        return false;
    };
    let Some(tr) = pack::decode_trailer(t, len) else {
        return false;
    };
    let Some(index) = usize::try_from(tr.index_offset)
        .ok()
        .and_then(|at| bytes.get(at..bytes.len() - pack::TRAILER_LEN))
    else {
        return false;
    };
    pack::decode_index(index, &tr).is_ok()
}

/// A pack file's 16-byte header.
pub fn pack_header(bytes: &[u8]) -> bool {
    pack::check_pack_header(bytes).is_ok()
}

/// A `--dirty-bitmap` file: the first 8 bytes give the disk length and the
/// next byte the granularity's log2, the rest is the bitmap.
pub fn dirty_bitmap(bytes: &[u8]) -> bool {
    if bytes.len() < 9 {
        return false;
    }
    let disk_len = le::u64_at(bytes, 0) % (1 << 40);
    let granularity = 1u64 << (bytes[8] % 40);
    match DirtyBitmap::from_bytes(disk_len, granularity, &bytes[9..]) {
        Ok(map) => {
            // Whatever decodes must round-trip and expand without panicking.
            assert_eq!(map.to_bytes(), &bytes[9..]);
            let _ = map.block_runs(4096);
            true
        }
        Err(_) => false,
    }
}

/// A persisted change tracker (catalog `tracking` row).
pub fn tracker(bytes: &[u8]) -> bool {
    Tracker::decode(bytes).is_some()
}

/// The body of `POST /api/v1/snapshots/`.
#[cfg(feature = "server")]
pub fn create_body(bytes: &[u8]) -> bool {
    crate::http::create_request(bytes).is_ok()
}

/// A fuzz target: any bytes in, whether they decoded out.
pub type Target = fn(&[u8]) -> bool;

/// Every target by name, for the corpus tests.
pub fn targets() -> Vec<(&'static str, Target)> {
    let mut t: Vec<(&'static str, Target)> = vec![
        ("manifest", manifest),
        ("pack_record", pack_record),
        ("group_payload", group_payload),
        ("pack_tail", pack_tail),
        ("pack_header", pack_header),
        ("dirty_bitmap", dirty_bitmap),
        ("tracker", tracker),
    ];
    #[cfg(feature = "server")]
    t.push(("create_body", create_body));
    t.push(("nbd_client", nbd_client));
    t.push(("qmp_client", qmp_client));
    t.push(("chunk_index", chunk_index));
    #[cfg(feature = "s3")]
    t.push(("fleet_document", fleet_document));
    t.push(("engine_ops", engine_ops));
    t
}

/// The bytes an NBD server sends (untrusted): negotiation asking for
/// `base:allocation`, then the replies to a read, a block status, a write
/// and a flush, as [`crate::nbd::NbdClient`] makes them. True when all of
/// them succeeded.
pub fn nbd_client(bytes: &[u8]) -> bool {
    use crate::nbd::script::{Replay, Script};
    let script = Script(bytes.to_vec());
    let Ok(c) = crate::nbd::NbdClient::handshake(
        Replay::boxed(script),
        "fuzz",
        "guest",
        &[crate::nbd::BASE_ALLOCATION],
    ) else {
        return false;
    };
    let size = c.info().size;
    let mut buf = vec![0u8; size.min(3 << 18) as usize];
    let read = c.read(&mut buf, 0).is_ok();
    let status = c
        .block_status(crate::nbd::BASE_ALLOCATION, 0..size.min(1 << 20))
        .is_ok_and(|extents| {
            // What the client hands back covers the range, in order.
            extents.first().is_none_or(|(r, _)| r.start == 0)
                && extents.windows(2).all(|w| w[0].0.end == w[1].0.start)
        });
    let wrote = c.write(&buf[..buf.len().min(4096)], 0).is_ok();
    read && status && wrote && c.flush().is_ok()
}

/// The bytes a QEMU monitor sends (untrusted): the greeting, the reply
/// to `qmp_capabilities`, then replies to `query-named-block-nodes` and
/// `query-block-exports` as blocksnap reads them. True when both queries
/// were answered and the node was found.
pub fn qmp_client(bytes: &[u8]) -> bool {
    use crate::live::qmp::Qmp;
    struct Sink;
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let reader = std::io::Cursor::new(bytes.to_vec());
    let Ok(mut qmp) = Qmp::over(Box::new(reader), Box::new(Sink), "fuzz") else {
        return false;
    };
    let nodes = qmp.execute("query-named-block-nodes", serde_json::json!({"flat": true}));
    let node = nodes
        .as_ref()
        .ok()
        .map(|n| crate::live::node_info(n, "disk0"));
    let exports = qmp
        .execute("query-block-exports", serde_json::json!({}))
        .map(|e| crate::live::strings_of(&e, "id"));
    matches!(node, Some(Ok(_))) && exports.is_ok()
}

/// Runs the operations the input encodes (three bytes each: operation,
/// two arguments; the operation's high bit makes the next disk read or
/// write fail) on a fresh store of two servers with in-memory disks, and
/// checks the engine against a model of the bytes each snapshot must
/// restore. Returns true once every check held (operations may have
/// failed, as injected); panics on a disagreement, which is the finding.
pub fn engine_ops(data: &[u8]) -> bool {
    use std::collections::{BTreeMap, HashMap};
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::disk::{Disk, DiskOpener, MemDisk};
    use crate::error::{Error, Result};
    use crate::ids::{ServerId, SnapshotId};
    use crate::options::EngineOptions;

    const BS: usize = 4096;
    const BLOCKS: usize = 16;

    struct Flaky {
        mem: Arc<MemDisk>,
        fail: Arc<AtomicBool>,
        path: PathBuf,
    }
    impl Flaky {
        fn check(&self) -> Result<()> {
            if self.fail.swap(false, Ordering::SeqCst) {
                return Err(Error::io(&self.path, std::io::Error::other("injected")));
            }
            Ok(())
        }
    }
    impl Disk for Flaky {
        fn len(&self) -> Result<u64> {
            self.mem.len()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
            self.check()?;
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.check()?;
            self.mem.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
            self.check()?;
            self.mem.write_zeroes(offset, len)
        }
        fn set_len(&self, len: u64) -> Result<()> {
            self.mem.set_len(len)
        }
        fn is_block_device(&self) -> bool {
            false
        }
        fn sync(&self) -> Result<()> {
            Ok(())
        }
        fn path(&self) -> &Path {
            &self.path
        }
    }

    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let fail = Arc::new(AtomicBool::new(false));
    let mut disks: HashMap<PathBuf, Arc<MemDisk>> = HashMap::new();
    for s in 1..=2u8 {
        let path = dir.path().join(format!("disk{s}"));
        // The file exists (so a restore takes a safety snapshot); the
        // bytes live in memory.
        let _ = std::fs::write(&path, b"");
        disks.insert(path, Arc::new(MemDisk::new(vec![s; BLOCKS * BS])));
    }
    let disks = Arc::new(disks);
    let opener: DiskOpener = {
        let disks = disks.clone();
        let fail = fail.clone();
        Arc::new(move |path: &Path, _writable: bool| {
            let mem = disks
                .get(path)
                .cloned()
                .ok_or_else(|| Error::io(path, std::io::ErrorKind::NotFound.into()))?;
            Ok(Box::new(Flaky {
                mem,
                fail: fail.clone(),
                path: path.to_path_buf(),
            }) as Box<dyn Disk>)
        })
    };
    let engine = EngineOptions::new()
        .block_size(BS as u32)
        .gc_max_unused(0.0)
        .disk_opener(opener)
        .open(dir.path().join("store"))
        .expect("a fresh store opens");
    let disk_of = |s: u64| dir.path().join(format!("disk{s}"));
    for s in 1..=2u64 {
        engine
            .add_server(ServerId(s), &format!("s{s}"), disk_of(s))
            .expect("a server registers");
    }
    let contents = |s: u64| disks[&disk_of(s)].contents();
    let mut model: BTreeMap<SnapshotId, (u64, Vec<u8>)> = BTreeMap::new();
    for op in data.chunks_exact(3) {
        let (code, a, b) = (op[0], op[1], op[2]);
        fail.store(code & 0x80 != 0, Ordering::SeqCst);
        let server = u64::from(a % 2) + 1;
        let pick = |m: &BTreeMap<SnapshotId, (u64, Vec<u8>)>| {
            m.keys().nth(usize::from(b) % m.len().max(1)).copied()
        };
        // Whether each operation succeeded does not matter: faults are
        // injected; what is checked is that successes are right.
        let _succeeded = match code % 6 {
            0 => {
                let at = (usize::from(b) % BLOCKS) * BS + usize::from(a);
                disks[&disk_of(server)]
                    .write_at(&[a, b, code], at as u64)
                    .is_ok()
            }
            1 => {
                let want = contents(server);
                match engine.create_snapshot(ServerId(server), "f", "") {
                    Ok(s) => {
                        model.insert(s.id, (server, want));
                        true
                    }
                    Err(_) => false,
                }
            }
            2 => match pick(&model) {
                Some(id) => {
                    let ok = engine.delete_snapshot(id).is_ok();
                    if ok {
                        model.remove(&id);
                    }
                    ok
                }
                None => true,
            },
            3 => match pick(&model) {
                Some(id) => match engine.restore_snapshot(id) {
                    Ok(_) => {
                        let (s, want) = &model[&id];
                        assert!(contents(*s) == *want, "restore of {id} is not its bytes");
                        true
                    }
                    Err(_) => false,
                },
                None => true,
            },
            4 => engine.gc(false).is_ok(),
            _ => {
                let report = engine.verify(None).expect("verify runs");
                assert!(report.is_ok(), "{report:?}");
                true
            }
        };
    }
    fail.store(false, Ordering::SeqCst);
    for (id, (s, want)) in &model {
        let restored = engine
            .restore_snapshot(*id)
            .or_else(|_| engine.restore_snapshot(*id));
        assert!(
            restored.is_ok(),
            "snapshot {id} does not restore: {restored:?}"
        );
        assert!(contents(*s) == *want, "snapshot {id} restores other bytes");
    }
    true
}

/// Valid inputs for each target, the seeds of `fuzz/corpus/`
/// (`cargo run --example fuzz_seeds` writes them).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::ids::{ServerId, SnapshotId};
    use crate::store::pack::{ChunkRecord, IndexEntry};

    let text = b"blocksnap seed data, compressible enough ".repeat(40);
    let zero = [0u8; 100];
    let mut out = Vec::new();
    let a = ChunkId::of(&text);
    let blocks = vec![Some(a), None, Some(ChunkId::of(b"x")), None];
    if let Ok(bytes) = Manifest::new(
        SnapshotId(7),
        ServerId(3),
        4096,
        4 * 4096 - 100,
        blocks.into(),
    )
    .and_then(|m| m.encode())
    {
        out.push(("manifest", bytes));
    }
    for raw in [&text[..], &zero[..], b"x"] {
        let compressed = pack::compress(raw, 1).ok().flatten();
        let rec = ChunkRecord {
            id: ChunkId::of(raw),
            raw,
            compressed: compressed.as_deref(),
        };
        let mut bytes = rec.header().to_vec();
        bytes.extend_from_slice(rec.payload());
        out.push(("pack_record", bytes));
    }
    // A group record of two chunks (the compact setting).
    let other = b"a second member, also compressible ".repeat(30);
    let members = [
        (ChunkId::of(&text), &text[..]),
        (ChunkId::of(&other), &other[..]),
    ];
    if let Ok(Some(g)) = pack::GroupRecord::compress(&members, 3) {
        let mut bytes = g.header().to_vec();
        bytes.extend_from_slice(g.payload());
        out.push(("pack_record", bytes));
        let raw_len = (text.len() + other.len()) as u32;
        let mut payload = raw_len.to_le_bytes().to_vec();
        payload.extend_from_slice(g.payload());
        out.push(("group_payload", payload));
    }
    // A whole small pack: header, one record, index, trailer.
    let x = ChunkRecord {
        id: ChunkId::of(b"x"),
        raw: b"x",
        compressed: None,
    };
    let mut whole = pack::encode_pack_header().to_vec();
    whole.extend_from_slice(&x.header());
    whole.extend_from_slice(x.payload());
    let entries = vec![IndexEntry {
        id: x.id,
        offset: pack::PACK_HEADER_LEN as u64,
        stored_len: 1,
        raw_len: 1,
    }];
    let index_offset = whole.len() as u64;
    whole.extend_from_slice(&pack::encode_index(&entries, index_offset));
    out.push(("pack_tail", whole));
    out.push(("pack_header", pack::encode_pack_header().to_vec()));
    let mut bitmap = (40u64 * 4096).to_le_bytes().to_vec();
    bitmap.push(12);
    bitmap.extend_from_slice(&[0b1010_0001, 0, 0xFF, 0, 0x80]);
    out.push(("dirty_bitmap", bitmap));
    if let Ok(mut dirty) = DirtyBitmap::new(10 << 16, 1 << 16) {
        dirty.set(3);
        let t = Tracker {
            base: SnapshotId(4),
            pending: false,
            dirty,
            trusted: true,
            generation: 2,
        };
        out.push(("tracker", t.encode(true)));
    }
    out.push((
        "create_body",
        br#"{"server_id": 12345, "name": "before-update", "description": "seed"}"#.to_vec(),
    ));
    out.push(("create_body", br#"{"server_id": 1, "name": "x"}"#.to_vec()));
    // Write, snapshot, write, snapshot, restore the first, gc, verify; then
    // the same with a fault on the second snapshot and on the restore.
    out.push((
        "engine_ops",
        vec![
            0, 1, 2, 1, 0, 0, 0, 1, 9, 1, 0, 0, 3, 0, 0, 4, 0, 0, 5, 0, 0,
        ],
    ));
    out.push((
        "engine_ops",
        vec![
            0, 0, 1, 1, 0, 0, 0, 0, 5, 0x81, 0, 0, 0x83, 0, 0, 2, 0, 0, 5, 0, 0,
        ],
    ));
    // An NBD server answering a 64 KiB read with data then a hole, a block
    // status, a write and a flush.
    {
        use crate::nbd::{proto, script::Script};
        let s = Script::negotiated(
            &[(1, crate::nbd::BASE_ALLOCATION)],
            65536,
            proto::TFLAG_SEND_FLUSH,
        )
        .data(1, 0, &text[..1000], false)
        .hole(1, 1000, 64536, true)
        .status(2, 1, &[(4096, 0), (61440, 3)], true)
        .simple(3, 0)
        .none(4);
        out.push(("nbd_client", s.0));
    }
    // A monitor: greeting, capabilities, a node list and an export list
    // (an event in between, as QEMU sends them).
    out.push((
        "qmp_client",
        concat!(
            r#"{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}}, "capabilities": ["oob"]}}"#,
            "\n",
            r#"{"return": {}, "id": 1}"#,
            "\n",
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "j"}}"#,
            "\n",
            r#"{"return": [{"node-name": "disk0", "image": {"virtual-size": 67108864}, "dirty-bitmaps": [{"name": "cp", "inconsistent": false}]}], "id": 2}"#,
            "\n",
            r#"{"return": [{"id": "guest", "node-name": "disk0"}], "id": 3}"#,
            "\n"
        )
        .as_bytes()
        .to_vec(),
    ));
    // A chunk index table of 300 entries (three pages) over two packs.
    let mut keys: Vec<[u8; 16]> = (0..300u32)
        .map(|i| crate::store::index::key_bytes(&ChunkId::of(&i.to_le_bytes())))
        .collect();
    keys.sort_unstable();
    let entries = keys.into_iter().enumerate().map(|(i, key)| {
        Ok(table::Entry {
            key,
            loc: crate::store::ChunkLoc {
                pack: 1 + (i % 2) as u32,
                offset: 16 + 80 * i as u32,
                stored_len: 28,
            },
        })
    });
    let covered = [1, 2].map(|seq| table::Covered {
        seq,
        trailer_crc: seq * 7,
        len: 50_000,
    });
    let mut file = Vec::new();
    let encoded = table::encode(entries, &covered, 3, |bytes, at| {
        let end = at as usize + bytes.len();
        if file.len() < end {
            file.resize(end, 0);
        }
        file[at as usize..end].copy_from_slice(bytes);
        Ok(())
    });
    if encoded.is_ok() {
        out.push(("chunk_index", file));
    }
    #[cfg(feature = "s3")]
    for doc in crate::bucket::catalog::fuzz_seeds() {
        out.push(("fleet_document", doc));
    }
    out
}

/// An object of a fleet's catalog in a bucket (the object store's word):
/// checked and decoded as each kind of document, never a panic. True when
/// one kind decoded.
#[cfg(feature = "s3")]
pub fn fleet_document(bytes: &[u8]) -> bool {
    crate::bucket::catalog::fuzz_documents(bytes)
}

/// A chunk index table file (`packs/chunks.idx`): parsed, looked up at
/// keys taken from the input, every entry read and every page checked.
/// Damage must be refused or reported, never a panic. True when it parsed
/// and checked clean.
pub fn chunk_index(bytes: &[u8]) -> bool {
    let Ok(t) = table::Table::from_bytes(std::path::Path::new("fuzz"), bytes.to_vec()) else {
        return false;
    };
    for piece in bytes.chunks(16).step_by(7).take(64) {
        let mut key = [0u8; 16];
        key[..piece.len()].copy_from_slice(piece);
        let _ = t.get(&key);
    }
    let _ = t.iter().take(100_000).count();
    t.check().is_ok()
}
