//! The `blocksnap` command, end to end, as users script it.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::disk_bytes;

fn blocksnap(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blocksnap"))
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .unwrap()
}

fn ok(store: &Path, args: &[&str]) -> String {
    let out = blocksnap(store, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails_with(store: &Path, args: &[&str], code: i32, stderr_has: &str) {
    let out = blocksnap(store, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(
        err.contains(stderr_has),
        "{args:?}: {err:?} lacks {stderr_has:?}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
}

/// Checks one snapshot object against the shape of the Snapshots API (docs/openapi.yaml).
fn check_snapshot_shape(s: &Value) {
    let obj = s.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "created_at",
            "description",
            "id",
            "name",
            "server",
            "size_mb",
            "status"
        ]
    );
    assert!(s["id"].is_u64());
    assert!(s["server"]["id"].is_u64());
    assert!(s["server"]["name"].is_string());
    assert_eq!(s["server"].as_object().unwrap().len(), 2);
    assert!(s["name"].is_string());
    assert!(s["description"].is_string());
    let status = s["status"].as_str().unwrap();
    assert!(["in_progress", "completed", "failed"].contains(&status));
    assert_eq!(s["size_mb"].is_u64(), status == "completed");
    let created = s["created_at"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(created).is_ok(), "{created}");
    assert!(created.ends_with('Z') && created.len() == 20, "{created}");
}

#[test]
fn the_command_drives_the_whole_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let disk = dir.path().join("web.img");
    let bytes = disk_bytes(3 << 20, 9);
    std::fs::write(&disk, &bytes).unwrap();

    // Before init there is no store, and saying so is a user error.
    fails_with(&store, &["server", "list"], 2, "init");
    ok(&store, &["init", "--block-size", "16K"]);
    fails_with(&store, &["init"], 2, "already exists");
    ok(
        &store,
        &[
            "server",
            "add",
            "--id",
            "12345",
            "--name",
            "web-server-01",
            "--disk",
            disk.to_str().unwrap(),
        ],
    );
    let servers: Value = serde_json::from_str(&ok(&store, &["server", "list", "--json"])).unwrap();
    assert_eq!(servers["count"], 1);
    assert_eq!(servers["results"][0]["status"], "idle");

    let created: Value = serde_json::from_str(&ok(
        &store,
        &[
            "snapshot",
            "create",
            "--server",
            "12345",
            "--name",
            "pre-migration",
            "--description",
            "Before major migration",
            "--json",
        ],
    ))
    .unwrap();
    // The API's fields, and beside them what the capture did.
    let mut api = created.clone();
    let capture = api.as_object_mut().unwrap().remove("capture").unwrap();
    check_snapshot_shape(&api);
    assert_eq!(capture["kind"], "full");
    assert!(capture["bytes_read"].as_u64().unwrap() > 0, "{capture}");
    assert!(capture["bytes_stored"].as_u64().unwrap() > 0, "{capture}");
    assert!(capture["seconds"].as_f64().is_some() && capture["freeze_ms"].is_null());
    assert_eq!(created["status"], "completed");
    assert_eq!(created["server"]["name"], "web-server-01");
    assert_eq!(created["description"], "Before major migration");
    ok(
        &store,
        &[
            "snapshot", "create", "--server", "12345", "--name", "second",
        ],
    );

    let list: Value = serde_json::from_str(&ok(&store, &["snapshot", "list", "--json"])).unwrap();
    assert_eq!(list.as_object().unwrap().len(), 2);
    assert_eq!(list["count"], 2);
    let results = list["results"].as_array().unwrap();
    // The API's fields, plus exactly one: the exclusive bytes.
    for r in results {
        let mut api = r.clone();
        let exclusive = api.as_object_mut().unwrap().remove("exclusive_bytes");
        assert!(exclusive.unwrap().is_u64(), "{r}");
        let kind = api.as_object_mut().unwrap().remove("kind");
        assert_eq!(kind.unwrap(), "regular");
        check_snapshot_shape(&api);
    }
    assert_eq!(results[0]["name"], "second", "newest first");
    let by_server: Value = serde_json::from_str(&ok(
        &store,
        &["snapshot", "list", "--server", "12345", "--json"],
    ))
    .unwrap();
    assert_eq!(by_server["count"], 2);

    // Break the disk, restore, and get the bytes back.
    std::fs::write(&disk, vec![0xEEu8; 1 << 20]).unwrap();
    let id = created["id"].as_u64().unwrap().to_string();
    let restored: Value =
        serde_json::from_str(&ok(&store, &["snapshot", "restore", &id, "--json"])).unwrap();
    assert_eq!(restored["status"], "success");
    assert_eq!(restored["server"]["status"], "idle");
    assert!(restored["blocks_rewritten"].as_u64().unwrap() > 0);
    assert!(std::fs::read(&disk).unwrap() == bytes);

    assert!(ok(&store, &["verify"]).contains("all intact"));
    assert!(ok(&store, &["verify", &id]).contains("all intact"));

    // Export: to a new file, and on standard output (the report then on
    // standard error), each the disk byte for byte.
    let image = dir.path().join("exported.img");
    let exported: Value = serde_json::from_str(&ok(
        &store,
        &["snapshot", "export", &id, image.to_str().unwrap(), "--json"],
    ))
    .unwrap();
    assert_eq!(exported["image_bytes"], bytes.len() as u64);
    assert!(std::fs::read(&image).unwrap() == bytes);
    fails_with(
        &store,
        &["snapshot", "export", &id, image.to_str().unwrap()],
        2,
        "--force",
    );
    let streamed = blocksnap(&store, &["snapshot", "export", &id, "-"]);
    assert!(streamed.status.success());
    assert!(streamed.stdout == bytes, "the stream differs from the disk");
    assert!(String::from_utf8_lossy(&streamed.stderr).contains("standard output"));

    ok(&store, &["snapshot", "delete", &id]);
    let list: Value = serde_json::from_str(&ok(&store, &["snapshot", "list", "--json"])).unwrap();
    // The other snapshot, and the safety snapshot the restore took.
    assert_eq!(list["count"], 2);
    assert_eq!(list["results"][0]["kind"], "safety");
    // Human output has a header and a row each.
    assert_eq!(ok(&store, &["snapshot", "list"]).lines().count(), 3);
}

#[test]
fn user_errors_exit_2_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let disk = dir.path().join("d.img");
    std::fs::write(&disk, vec![1u8; 1 << 16]).unwrap();
    ok(&store, &["init"]);
    ok(
        &store,
        &[
            "server",
            "add",
            "--id",
            "1",
            "--name",
            "web",
            "--disk",
            disk.to_str().unwrap(),
        ],
    );
    fails_with(
        &store,
        &["snapshot", "create", "--server", "1", "--name", "bad name"],
        2,
        "invalid name",
    );
    fails_with(
        &store,
        &["snapshot", "create", "--server", "1", "--name", "../x"],
        2,
        "invalid name",
    );
    fails_with(
        &store,
        &["snapshot", "create", "--server", "7", "--name", "a"],
        2,
        "server 7 does not exist",
    );
    fails_with(
        &store,
        &["snapshot", "restore", "99"],
        2,
        "snapshot 99 does not exist",
    );
    fails_with(
        &store,
        &["snapshot", "delete", "99"],
        2,
        "snapshot 99 does not exist",
    );
    fails_with(
        &store,
        &[
            "server", "add", "--id", "1", "--name", "again", "--disk", "x",
        ],
        2,
        "already exists",
    );
    fails_with(&store, &["init", "--block-size", "3K"], 2, "");
    for i in 0..5 {
        ok(
            &store,
            &[
                "snapshot",
                "create",
                "--server",
                "1",
                "--name",
                &format!("s{i}"),
            ],
        );
    }
    fails_with(
        &store,
        &["snapshot", "create", "--server", "1", "--name", "s5"],
        2,
        "already has 5 snapshots",
    );
    // A store held by another process.
    let _held = blocksnap::Engine::open(&store).unwrap();
    fails_with(&store, &["snapshot", "list"], 2, "locked");
}

#[test]
fn init_sets_the_compression_setting() {
    let dir = tempfile::tempdir().unwrap();
    let groups = 4 << 20;
    for (arg, level, group) in [
        ("fast", 1, 0),
        ("balanced", 3, 0),
        ("compact", 3, groups),
        ("5", 5, 0),
    ] {
        let store = dir.path().join(arg);
        let out = ok(&store, &["init", "--compression", arg]);
        assert!(out.contains(&format!("zstd level {level}")), "{out}");
        assert_eq!(out.contains("groups of up to 4.0 MiB"), group > 0, "{out}");
        let engine = blocksnap::Engine::open(&store).unwrap();
        let c = engine.compression();
        assert_eq!((c.level(), c.group_len()), (level, group));
        assert_eq!(c.name(), if arg == "5" { "level-5" } else { arg });
    }
    let store = dir.path().join("bad");
    for bad in ["0", "20", "tiny"] {
        let out = blocksnap(&store, &["init", "--compression", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
    }
    assert!(!store.exists());
}

#[test]
fn store_comes_from_the_environment_too() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("envstore");
    let out = Command::new(env!("CARGO_BIN_EXE_blocksnap"))
        .env("BLOCKSNAP_STORE", &store)
        .arg("init")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(store.join("catalog").exists());
    let out = Command::new(env!("CARGO_BIN_EXE_blocksnap"))
        .env_remove("BLOCKSNAP_STORE")
        .args(["server", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_demo_restores_byte_exact() {
    let out = Command::new(env!("CARGO_BIN_EXE_blocksnap"))
        .args(["demo", "--size", "24M"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("restore is byte-exact"), "{text}");
}

#[test]
fn an_incremental_snapshot_from_a_dirty_bitmap_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let disk = dir.path().join("web.img");
    let len = 40 * 65536;
    std::fs::write(&disk, disk_bytes(len, 21)).unwrap();
    ok(&store, &["init"]);
    let d = disk.to_str().unwrap();
    ok(
        &store,
        &["server", "add", "--id", "1", "--name", "web", "--disk", d],
    );
    ok(
        &store,
        &["snapshot", "create", "--server", "1", "--name", "a"],
    );

    // The guest writes blocks 3 and 17; the hypervisor's bitmap says so.
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[3 * 65536..3 * 65536 + 4].copy_from_slice(b"new!");
    bytes[17 * 65536] ^= 0xFF;
    std::fs::write(&disk, &bytes).unwrap();
    let bitmap = dir.path().join("dirty.bin");
    std::fs::write(&bitmap, [0b0000_1000, 0, 0b0000_0010, 0, 0]).unwrap();
    let b = bitmap.to_str().unwrap();
    let out = blocksnap(
        &store,
        &[
            "snapshot",
            "create",
            "--server",
            "1",
            "--name",
            "b",
            "--parent",
            "1",
            "--dirty-bitmap",
            b,
        ],
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(summary.contains("incremental from snapshot 1"), "{summary}");
    assert!(summary.contains("read 128.0 KiB of 2.5 MiB"), "{summary}");

    std::fs::write(&disk, vec![0u8; len]).unwrap();
    ok(&store, &["snapshot", "restore", "2"]);
    assert!(std::fs::read(&disk).unwrap() == bytes);

    // The disk is known to hold snapshot 2: back to 1 by difference alone.
    let out = ok(
        &store,
        &["snapshot", "restore", "1", "--current", "2", "--json"],
    );
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["method"], "delta");
    assert_eq!(report["blocks_rewritten"], 2);
    assert!(std::fs::read(&disk).unwrap() == disk_bytes(len, 21));

    // A bitmap file of the wrong length, a parent given without a bitmap.
    std::fs::write(&bitmap, [0u8; 4]).unwrap();
    let args = [
        "snapshot",
        "create",
        "--server",
        "1",
        "--name",
        "c",
        "--parent",
        "1",
        "--dirty-bitmap",
        b,
    ];
    fails_with(&store, &args, 2, "needs 5");
    let out = blocksnap(
        &store,
        &[
            "snapshot", "create", "--server", "1", "--name", "c", "--parent", "1",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dirty-bitmap"));
}

#[test]
fn gc_and_stats_from_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let disk = dir.path().join("web.img");
    std::fs::write(&disk, disk_bytes(2 << 20, 31)).unwrap();
    ok(&store, &["init", "--block-size", "16K"]);
    let d = disk.to_str().unwrap();
    ok(
        &store,
        &["server", "add", "--id", "1", "--name", "web", "--disk", d],
    );
    ok(
        &store,
        &["snapshot", "create", "--server", "1", "--name", "a"],
    );
    std::fs::write(&disk, disk_bytes(2 << 20, 32)).unwrap();
    ok(
        &store,
        &["snapshot", "create", "--server", "1", "--name", "b"],
    );
    let list = ok(&store, &["snapshot", "list"]);
    assert!(list.contains("EXCLUSIVE"), "{list}");
    ok(&store, &["snapshot", "delete", "1"]);

    let stats: Value = serde_json::from_str(&ok(&store, &["stats", "--json"])).unwrap();
    assert_eq!(stats["snapshots"], 1);
    let reclaimable = stats["reclaimable_bytes"].as_u64().unwrap();
    assert!(reclaimable > 0, "{stats}");
    assert!(stats["dedup_ratio"].as_f64().unwrap() > 0.0);
    assert_eq!(stats["compression"], "fast");
    let human = ok(&store, &["stats"]);
    assert!(
        human.contains("zstd level 1, one frame per chunk"),
        "{human}"
    );

    let dry: Value = serde_json::from_str(&ok(&store, &["gc", "--dry-run", "--json"])).unwrap();
    assert_eq!(dry["dry_run"], true);
    let again: Value = serde_json::from_str(&ok(&store, &["stats", "--json"])).unwrap();
    assert_eq!(
        again["reclaimable_bytes"], reclaimable,
        "a dry run changes nothing"
    );
    let human = ok(&store, &["gc"]);
    assert!(human.starts_with("gc gave back"), "{human}");
    let after: Value = serde_json::from_str(&ok(&store, &["stats", "--json"])).unwrap();
    assert!(after["stored_bytes"].as_u64().unwrap() < stats["stored_bytes"].as_u64().unwrap());
    ok(&store, &["verify"]);

    // The chunk index: its table made again from the packs, by hand.
    let before = &after["index"];
    let rebuilt: Value =
        serde_json::from_str(&ok(&store, &["index", "rebuild", "--json"])).unwrap();
    assert_eq!(rebuilt["chunks"], before["chunks"], "{rebuilt}");
    assert_eq!(rebuilt["table_entries"], rebuilt["chunks"], "{rebuilt}");
    assert_eq!(rebuilt["overlay_entries"], 0, "{rebuilt}");
    assert!(
        rebuilt["table_generation"].as_u64() > before["table_generation"].as_u64(),
        "{rebuilt} after {before}"
    );
    let human = ok(&store, &["stats"]);
    assert!(human.contains("in its table on disk"), "{human}");
    ok(&store, &["verify"]);
}

#[test]
fn dry_run_restore_and_undo_from_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let disk = dir.path().join("web.img");
    let v1 = disk_bytes(1 << 20, 51);
    std::fs::write(&disk, &v1).unwrap();
    ok(&store, &["init", "--block-size", "16K"]);
    let d = disk.to_str().unwrap();
    ok(
        &store,
        &["server", "add", "--id", "1", "--name", "web", "--disk", d],
    );
    ok(
        &store,
        &["snapshot", "create", "--server", "1", "--name", "a"],
    );
    let mut work = v1.clone();
    work[5 * 16384] ^= 1;
    work[40 * 16384] ^= 1;
    std::fs::write(&disk, &work).unwrap();

    let plan: Value = serde_json::from_str(&ok(
        &store,
        &["snapshot", "restore", "1", "--dry-run", "--json"],
    ))
    .unwrap();
    assert_eq!(plan["blocks_to_rewrite"], 2);
    assert_eq!(plan["safety_snapshot"], true);
    let human = ok(&store, &["snapshot", "restore", "1", "--dry-run"]);
    assert!(human.contains("would rewrite 2 of 64 blocks"), "{human}");
    assert!(
        std::fs::read(&disk).unwrap() == work,
        "a dry run writes nothing"
    );

    let done: Value =
        serde_json::from_str(&ok(&store, &["snapshot", "restore", "1", "--json"])).unwrap();
    assert_eq!(done["blocks_rewritten"], 2);
    assert_eq!(done["blocks_verified"], 2);
    let safety = done["safety_snapshot"].as_u64().unwrap();
    assert!(std::fs::read(&disk).unwrap() == v1);

    let undone = ok(&store, &["snapshot", "undo-restore", "1"]);
    assert!(
        undone.contains(&format!("restored snapshot {safety}")),
        "{undone}"
    );
    assert!(
        std::fs::read(&disk).unwrap() == work,
        "undo brings the work back"
    );
    fails_with(
        &store,
        &["snapshot", "undo-restore", "9"],
        2,
        "server 9 does not exist",
    );
}
