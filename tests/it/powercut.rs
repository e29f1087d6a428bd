//! Power cuts, not only process deaths: the crash harness of `crash.rs`
//! run on a store inside an ext4 file system on a loop device, cut with
//! the ext4 shutdown ioctl (no log flush: what was not committed to the
//! journal is lost, as in a power failure), then unmounted, mounted again
//! (journal replay) and checked. This is what catches a missing fsync of
//! an append or of a directory after a rename. Needs root and loop
//! devices: without them it fails, unless `BLOCKSNAP_NO_LOOP_DEVICES=1`
//! says this machine has none. `BLOCKSNAP_POWERCUT_CYCLES` sets the number
//! of cuts (default 3).

use std::time::Duration;

use blocksnap::sample::Rng;

use crate::common::{Ext4, run};
use crate::crash::{Layout, Ledger, check_invariants, spawn_child};

#[test]
fn a_power_cut_anywhere_loses_no_completed_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Ext4::for_test(dir.path(), 256 << 20, "power cuts") else {
        return;
    };
    let layout = Layout {
        root: fs.mnt.join("root"),
        expected: dir.path().join("expected"),
    };
    std::fs::create_dir_all(&layout.root).unwrap();
    layout.create();
    run("sync", &[]).unwrap();
    let seed = crate::common::seed("BLOCKSNAP_POWERCUT_SEED");
    let mut rng = Rng::new(seed);
    let mut ledger = Ledger::default();
    for cut in 0..crate::common::env_count("BLOCKSNAP_POWERCUT_CYCLES", 3) {
        let mut child = spawn_child(&layout, seed.wrapping_add(cut));
        std::thread::sleep(Duration::from_millis(rng.below(500)));
        child.assert_alive(&format!("power cut {cut} (seed {seed})"));
        fs.cut();
        ledger.read(child.kill_any());
        ledger.kills += 1;
        fs.umount().unwrap();
        fs.mount().unwrap();
        let what = format!("power cut {cut} (seed {seed})");
        drop(check_invariants(&layout, &ledger, &what));
        run("sync", &[]).unwrap();
    }
    println!(
        "{} power cuts survived, {} snapshots checked at the end",
        ledger.kills,
        ledger.completed.len()
    );
    let min_kinds = if ledger.kills >= 100 { 3 } else { 0 };
    ledger.assert_coverage(&format!("power cuts, seed {seed}"), min_kinds);
}
