//! Block devices as disks, through loop devices (needs root; skipped loudly
//! where loop devices cannot be made).

use std::path::{Path, PathBuf};
use std::process::Command;

use blocksnap::{Error, ServerId};

use crate::common::{Fixture, disk_bytes};

/// A loop device over a file, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let dev = String::from_utf8(out.stdout).ok()?.trim().to_string();
        Some(Loop { dev: dev.into() })
    }

    /// Makes the device pick up its backing file's new size.
    fn refresh(&self) {
        let ok = Command::new("losetup")
            .arg("-c")
            .arg(&self.dev)
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[test]
fn block_devices_capture_restore_and_refuse_a_smaller_device() {
    let fx = Fixture::new();
    let backing = fx.disk("backing.img");
    let bytes = disk_bytes(2 << 20, 21);
    std::fs::write(&backing, &bytes).unwrap();
    let Some(dev) = Loop::attach(&backing) else {
        // A machine that says it has none may not run this; any other fails.
        assert!(
            std::env::var("BLOCKSNAP_NO_LOOP_DEVICES").is_ok_and(|v| v == "1"),
            "block devices need a loop device (root, losetup); set \
             BLOCKSNAP_NO_LOOP_DEVICES=1 only on a machine that has none"
        );
        eprintln!(
            "\n!!! NOT RUN (block devices): no loop device, as BLOCKSNAP_NO_LOOP_DEVICES=1 says\n"
        );
        return;
    };
    fx.engine.add_server(ServerId(1), "vm", &dev.dev).unwrap();
    let snap = fx.engine.create_snapshot(ServerId(1), "s", "").unwrap();
    assert_eq!(snap.stats.unwrap().image_len, 2 << 20);

    // Scribble through the device, restore, read back through the file.
    std::fs::write(&dev.dev, vec![0x5Au8; 1 << 20]).unwrap();
    let r = fx.engine.restore_snapshot(snap.id).unwrap();
    assert!(r.blocks_rewritten > 0);
    assert!(std::fs::read(&dev.dev).unwrap() == bytes);

    // Shrink the device: the restore is refused before anything is written.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap();
    f.set_len(1 << 20).unwrap();
    drop(f);
    dev.refresh();
    std::fs::write(&dev.dev, vec![0x33u8; 1 << 20]).unwrap();
    let err = fx.engine.restore_snapshot(snap.id).unwrap_err();
    assert!(
        matches!(err, Error::DiskTooSmall { have, need, .. } if have == 1 << 20 && need == 2 << 20),
        "{err}"
    );
    assert!(std::fs::read(&dev.dev).unwrap() == vec![0x33u8; 1 << 20]);
}
