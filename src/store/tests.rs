//! The chunk store's unit tests (beside `mod.rs`, which they test from
//! inside: appends, reads, recovery, fsync failures, groups).

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;

use super::*;
use crate::fsio::StdFs;

fn open(dir: &Path) -> Result<(ChunkStore, Recovery)> {
    ChunkStore::open(dir, Arc::new(StdFs))
}

/// Inserts each of `datas` as a chunk.
fn put(s: &ChunkStore, datas: &[&[u8]]) -> Appended {
    let compressed: Vec<Option<Vec<u8>>> = datas
        .iter()
        .map(|d| pack::compress(d, 1).unwrap())
        .collect();
    let records: Vec<ChunkRecord<'_>> = datas
        .iter()
        .zip(&compressed)
        .map(|(d, c)| ChunkRecord {
            id: ChunkId::of(d),
            raw: d,
            compressed: c.as_deref(),
        })
        .collect();
    s.insert(&records).unwrap()
}

#[test]
fn chunks_survive_a_clean_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<ChunkId> = {
        let (s, _) = open(dir.path()).unwrap();
        let data: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 5000]).collect();
        let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        let n = put(&s, &refs);
        assert_eq!(n.chunks, 10);
        s.sync().unwrap();
        data.iter().map(|d| ChunkId::of(d)).collect()
    };
    let (s, rec) = open(dir.path()).unwrap();
    assert_eq!(rec.packs_sealed, 0);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(s.read(id).unwrap(), vec![i as u8; 5000]);
    }
}

fn group_of(datas: &[Vec<u8>]) -> GroupRecord {
    let members: Vec<(ChunkId, &[u8])> = datas
        .iter()
        .map(|d| (ChunkId::of(d), d.as_slice()))
        .collect();
    GroupRecord::compress(&members, 3).unwrap().unwrap()
}

fn texts(from: u32, n: u32) -> Vec<Vec<u8>> {
    (from..from + n)
        .map(|i| {
            format!("member {i} of a group, text that compresses; ")
                .repeat(200)
                .into_bytes()
        })
        .collect()
}

#[test]
fn group_members_are_read_back_before_and_after_a_reopen_or_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (texts(0, 5), texts(5, 3));
    let check = |s: &ChunkStore| {
        for d in a.iter().chain(&b) {
            let id = ChunkId::of(d);
            assert_eq!(&s.read(&id).unwrap(), d);
            let mut out = vec![0u8; d.len()];
            s.read_into(&id, &mut out).unwrap();
            assert_eq!(&out, d);
            let mut wrong = vec![0u8; d.len() + 1];
            assert!(s.read_into(&id, &mut wrong).unwrap_err().is_corruption());
        }
    };
    {
        let (s, _) = open(dir.path()).unwrap();
        let (ga, gb) = (group_of(&a), group_of(&b));
        let n = s
            .append([NewRecord::Group(&ga), NewRecord::Group(&gb)])
            .unwrap();
        assert_eq!(n.chunks, 8);
        // Held already: skipped whole.
        assert_eq!(s.append([NewRecord::Group(&ga)]).unwrap().chunks, 0);
        assert!(s.locate(&ChunkId::of(&a[2])).unwrap().unwrap().is_member());
        check(&s);
    }
    // Sealed: the members come back from the pack's index.
    let (s, rec) = open(dir.path()).unwrap();
    assert_eq!(rec.packs_sealed, 0);
    assert_eq!(s.chunk_count(), 8);
    check(&s);
    // A crash before sealing: the members come back from a scan.
    let c = texts(8, 4);
    s.append([NewRecord::Group(&group_of(&c))]).unwrap();
    s.sync().unwrap();
    std::mem::forget(s);
    let (s, rec) = open(dir.path()).unwrap();
    assert_eq!(rec.packs_sealed, 1);
    assert_eq!(s.chunk_count(), 12);
    check(&s);
    for d in &c {
        assert_eq!(&s.read(&ChunkId::of(d)).unwrap(), d);
    }
}

#[test]
fn a_group_with_a_member_already_stored_indexes_only_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(dir.path()).unwrap();
    let a = texts(0, 3);
    let refs: Vec<&[u8]> = a.iter().map(|d| d.as_slice()).collect();
    put(&s, &refs[..1]);
    let first = s.locate(&ChunkId::of(&a[0])).unwrap().unwrap();
    let n = s.append([NewRecord::Group(&group_of(&a))]).unwrap();
    assert_eq!(n.chunks, 2);
    assert_eq!(s.locate(&ChunkId::of(&a[0])).unwrap().unwrap(), first);
    for d in &a {
        assert_eq!(&s.read(&ChunkId::of(d)).unwrap(), d);
    }
}

#[test]
fn a_damaged_group_is_corruption_for_every_member() {
    let dir = tempfile::tempdir().unwrap();
    let a = texts(0, 4);
    {
        let (s, _) = open(dir.path()).unwrap();
        s.append([NewRecord::Group(&group_of(&a))]).unwrap();
    }
    let path = pack_path(dir.path(), 1);
    let mut bytes = fs::read(&path).unwrap();
    let at = PACK_HEADER_LEN + RECORD_HEADER_LEN + 4 + 4 * 36 + 10;
    bytes[at] ^= 0x10;
    fs::write(&path, bytes).unwrap();
    let (s, _) = open(dir.path()).unwrap();
    for d in &a {
        let id = ChunkId::of(d);
        assert!(s.read(&id).unwrap_err().is_corruption());
        let mut out = vec![0u8; d.len()];
        assert!(s.read_into(&id, &mut out).unwrap_err().is_corruption());
    }
}

/// A failed fsync may have lost what it was to make durable, even if
/// a later one succeeds: the records since the last good fsync leave
/// the index (a later capture stores them again), and a capture that
/// ran across the failure cannot complete.
#[test]
fn records_a_failed_fsync_may_have_lost_leave_the_index() {
    use crate::fsio::{Fault, FaultFs, FaultFsHandle};
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::new();
    let (s, _) = ChunkStore::open(dir.path(), Arc::new(FaultFsHandle(fs.clone()))).unwrap();
    let durable: &[u8] = &[1u8; 4096];
    let doubtful: &[u8] = &[2u8; 4096];
    put(&s, &[durable]);
    s.sync().unwrap();
    let across = s.pin_scope();
    put(&s, &[doubtful]);
    fs.fail(0, Fault::Eio); // the pack's fsync
    assert!(s.sync().is_err());
    fs.heal();
    assert!(s.contains(&ChunkId::of(durable)));
    assert!(!s.contains(&ChunkId::of(doubtful)));
    assert!(s.sync_pinned(&across).is_err());
    let after = s.pin_scope();
    assert_eq!(put(&s, &[doubtful]).chunks, 1, "stored again");
    s.sync_pinned(&after).unwrap();
    assert_eq!(s.read(&ChunkId::of(doubtful)).unwrap(), doubtful);
    drop(s);
    let (s, _) = open(dir.path()).unwrap();
    assert_eq!(s.read(&ChunkId::of(durable)).unwrap(), durable);
    assert_eq!(s.read(&ChunkId::of(doubtful)).unwrap(), doubtful);
}

#[test]
fn a_chunk_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(dir.path()).unwrap();
    let n = put(&s, &[b"same", b"same"]);
    assert_eq!(n.chunks, 1);
    assert_eq!(put(&s, &[b"same"]).chunks, 0);
    assert_eq!(s.chunk_count(), 1);
}

#[test]
fn torn_pack_tail_is_cut_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(dir.path()).unwrap();
    put(&s, &[&[1u8; 3000], &[2u8; 3000]]);
    s.sync().unwrap();
    // Simulate a crash: no seal, then a half-written third record.
    std::mem::forget(s);
    let path = pack_path(dir.path(), 1);
    let good_len = fs::metadata(&path).unwrap().len();
    let third_raw = [3u8; 3000];
    let third_z = pack::compress(&third_raw, 1).unwrap();
    let third = ChunkRecord {
        id: ChunkId::of(&third_raw),
        raw: &third_raw,
        compressed: third_z.as_deref(),
    };
    let mut torn = third.header().to_vec();
    torn.extend_from_slice(&third.payload()[..third.payload().len() / 2]);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    FileExt::write_all_at(&f, &torn, good_len).unwrap();
    drop(f);

    let (s, rec) = open(dir.path()).unwrap();
    assert_eq!(rec.packs_sealed, 1);
    assert_eq!(rec.bytes_cut, torn.len() as u64);
    assert_eq!(s.chunk_count(), 2);
    assert_eq!(s.read(&ChunkId::of(&[2u8; 3000])).unwrap(), vec![2u8; 3000]);
    assert!(matches!(
        s.read(&ChunkId::of(&[3u8; 3000])),
        Err(Error::ChunkMissing { .. })
    ));
    // New chunks go to a new pack; the recovered one is sealed.
    put(&s, &[&[4u8; 10]]);
    assert_eq!(s.locate(&ChunkId::of(&[4u8; 10])).unwrap().unwrap().pack, 2);
}

#[test]
fn a_flipped_payload_byte_is_corruption_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let data = b"some text that compresses ".repeat(200);
    let id = ChunkId::of(&data);
    {
        let (s, _) = open(dir.path()).unwrap();
        put(&s, &[&data]);
    }
    let path = pack_path(dir.path(), 1);
    let mut bytes = fs::read(&path).unwrap();
    bytes[PACK_HEADER_LEN + RECORD_HEADER_LEN + 3] ^= 0x40;
    fs::write(&path, bytes).unwrap();
    let (s, _) = open(dir.path()).unwrap();
    let err = s.read(&id).unwrap_err();
    assert!(err.is_corruption(), "{err}");
}

/// A pack cut short under a chunk that the index (built before the cut)
/// still places there is corruption naming the pack, not a plain I/O error.
#[test]
fn a_pack_cut_short_after_open_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(dir.path()).unwrap();
    let data: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 5000]).collect();
    let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
    put(&s, &refs);
    s.sync().unwrap();
    let last = ChunkId::of(&data[3]);
    let loc = s.locate(&last).unwrap().unwrap();
    let path = s.pack_path_of(&loc);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(u64::from(loc.offset) + 10).unwrap();
    let err = s.read(&last).unwrap_err();
    assert!(err.is_corruption(), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

/// A pack removed from under an open store (by hand, or a file system
/// that lost it) is corruption naming it: never a hang, never a panic.
#[test]
fn a_pack_removed_after_open_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(dir.path()).unwrap();
    put(&s, &[&[1u8; 5000][..]]);
    s.close().unwrap();
    let (s, _) = open(dir.path()).unwrap();
    let id = ChunkId::of(&[1u8; 5000]);
    let path = s.pack_path_of(&s.locate(&id).unwrap().unwrap());
    fs::remove_file(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(s.read(&id).map(|_| ()));
    });
    let err = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("reading a chunk of a removed pack returned")
        .unwrap_err();
    assert!(err.is_corruption(), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
}

/// Pins never miss a chunk pinned, through every part the filter grows;
/// chunks not pinned are seldom taken for pinned.
#[test]
fn pins_hold_every_chunk_pinned() {
    let mut filter = super::PinFilter::default();
    let id = |n: u64| ChunkId::of(&n.to_le_bytes());
    let n = 5 * super::PIN_FIRST;
    for i in 0..n {
        filter.insert(&id(i));
    }
    assert!(filter.parts.len() >= 3);
    assert!((0..n).all(|i| filter.contains(&id(i))));
    let others = 100_000;
    let wrong = (n..n + others).filter(|&i| filter.contains(&id(i))).count();
    assert!(wrong < others as usize * 3 / 100, "{wrong} false positives");
    let bytes: usize = filter.parts.iter().map(|(b, _)| b.len() * 8).sum();
    assert!(bytes as u64 <= n * 4, "{bytes} bytes for {n} chunks");
}

/// A pack of chunks that compress to almost nothing is sealed at
/// `PACK_MAX_RECORDS`, not only at its byte target, and every chunk reads
/// back after a reopen.
#[test]
fn a_pack_is_sealed_at_its_record_cap() {
    let dir = tempfile::tempdir().unwrap();
    let n = 2 * PACK_MAX_RECORDS as u64 + 5;
    let data: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut d = vec![0u8; 4096];
            d[..8].copy_from_slice(&(i + 1).to_le_bytes());
            d
        })
        .collect();
    {
        let (s, _) = open(dir.path()).unwrap();
        let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        assert_eq!(put(&s, &refs).chunks, n);
        s.close().unwrap();
    }
    let packs = recovery::list_packs(&StdFs, dir.path()).unwrap();
    assert_eq!(packs.len(), 3, "{packs:?}");
    let (s, _) = open(dir.path()).unwrap();
    for d in &data {
        assert_eq!(&s.read(&ChunkId::of(d)).unwrap(), d);
    }
}
