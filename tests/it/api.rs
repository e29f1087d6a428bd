//! The Snapshots REST API contract (docs/openapi.yaml), over real HTTP on
//! 127.0.0.1 with a real client.

use std::net::SocketAddr;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use blocksnap::http::{RunningApi, Tokens, start};
use blocksnap::{EngineOptions, ServerId};
use serde_json::{Value, json};

use crate::common::OpenIn;
use crate::common::{Gate, disk_bytes};

const TOKEN: &str = "test-token-0123456789";

struct Api {
    running: Option<RunningApi>,
    base: String,
    agent: ureq::Agent,
    dir: tempfile::TempDir,
}

/// A reply: status and parsed JSON body (`Null` when empty).
struct Reply {
    status: u16,
    body: Value,
    raw: String,
}

impl Api {
    fn new() -> Self {
        Self::with(EngineOptions::new())
    }

    /// A store with server 12345 ("web-server-01") on a 3 MiB + 1 byte disk
    /// of data followed by zeros, served on a free port.
    fn with(options: EngineOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let engine = options.open_in(dir.path()).unwrap();
        let disk = dir.path().join("web.img");
        std::fs::write(&disk, Self::disk_content()).unwrap();
        engine
            .add_server(ServerId(12345), "web-server-01", &disk)
            .unwrap();
        for id in [1u64, 2] {
            let path = dir.path().join(format!("other{id}.img"));
            std::fs::write(&path, disk_bytes(1 << 20, id)).unwrap();
            engine
                .add_server(ServerId(id), &format!("other-{id}"), &path)
                .unwrap();
        }
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let running = start(engine, addr, Tokens::new([TOKEN]).unwrap()).unwrap();
        let base = format!("http://{}", running.addr());
        let agent = crate::common::http_agent();
        Api {
            running: Some(running),
            base,
            agent,
            dir,
        }
    }

    fn disk_content() -> Vec<u8> {
        let mut v = vec![0u8; 8 << 20];
        v[..(3 << 20) + 1].copy_from_slice(&disk_bytes((3 << 20) + 1, 77));
        // Make sure no 64 KiB block of the data part is all zero.
        for b in v[..(3 << 20) + 1].chunks_mut(65536) {
            b[0] = 1;
        }
        v
    }

    fn disk(&self) -> std::path::PathBuf {
        self.dir.path().join("web.img")
    }

    fn call(&self, method: &str, path: &str, auth: Option<&str>, body: Option<&[u8]>) -> Reply {
        let url = format!("{}{}", self.base, path);
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        req = req.header("Content-Type", "application/json");
        let resp = match body {
            Some(b) => self.agent.run(req.body(b.to_vec()).unwrap()),
            None => self.agent.run(req.body(()).unwrap()),
        };
        let mut resp = resp.unwrap();
        let status = resp.status().as_u16();
        let raw = resp.body_mut().read_to_string().unwrap_or_default();
        let body = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&raw).unwrap_or_else(|e| panic!("not JSON ({e}): {raw:?}"))
        };
        Reply { status, body, raw }
    }

    fn get(&self, path: &str) -> Reply {
        self.call("GET", path, Some(&format!("Bearer {TOKEN}")), None)
    }

    fn post(&self, path: &str, body: &Value) -> Reply {
        let bytes = serde_json::to_vec(body).unwrap();
        self.call("POST", path, Some(&format!("Bearer {TOKEN}")), Some(&bytes))
    }

    fn post_raw(&self, path: &str, body: &[u8]) -> Reply {
        self.call("POST", path, Some(&format!("Bearer {TOKEN}")), Some(body))
    }

    fn delete(&self, path: &str) -> Reply {
        self.call("DELETE", path, Some(&format!("Bearer {TOKEN}")), None)
    }

    /// Snapshot `id` as listing `path` shows it, if it does.
    fn listed(&self, path: &str, id: u64) -> Option<Value> {
        let list = self.get(path);
        let results = list.body["results"].as_array().unwrap();
        results.iter().find(|s| s["id"] == id).cloned()
    }

    /// Polls the listing until snapshot `id` is no longer in progress (a
    /// safety snapshot, listed only when asked for, then carries its `kind`).
    fn wait_done(&self, id: u64) -> Value {
        let plain = "/api/v1/snapshots/";
        let path = if self.listed(plain, id).is_some() {
            plain
        } else {
            "/api/v1/snapshots/?include_safety=true"
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let snap = self.listed(path, id).unwrap();
            if snap["status"] != "in_progress" {
                return snap;
            }
            assert!(Instant::now() < deadline, "snapshot {id} never finished");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server; it waits for running captures and restores.
    fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().unwrap();
        }
    }
}

fn error_detail(r: &Reply) -> &str {
    let obj = r
        .body
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {}", r.raw));
    assert_eq!(obj.len(), 1, "{}", r.raw);
    obj["detail"].as_str().unwrap()
}

/// An object's keys, in order.
fn keys_of(v: &Value) -> Vec<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

/// The fields of a snapshot object, in the API's documented order.
fn check_snapshot(s: &Value, extra: &[&str]) {
    let keys = keys_of(s);
    let mut want = vec![
        "id",
        "server",
        "name",
        "status",
        "size_mb",
        "created_at",
        "description",
    ];
    want.extend_from_slice(extra);
    assert_eq!(keys, want);
    assert!(s["id"].is_u64());
    let server: Vec<&str> = s["server"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(server, ["id", "name"]);
    let created = s["created_at"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(created).is_ok() && created.ends_with('Z'));
}

#[test]
fn create_list_restore_delete_as_the_api_describes() {
    let mut api = Api::new();
    let empty = api.get("/api/v1/snapshots/");
    assert_eq!(empty.status, 200);
    assert_eq!(empty.body, json!({"count": 0, "results": []}));

    let created = api.post(
        "/api/v1/snapshots/",
        &json!({"server_id": 12345, "name": "pre-migration-snapshot", "description": "Before major migration"}),
    );
    assert_eq!(created.status, 201, "{}", created.raw);
    check_snapshot(&created.body, &["message"]);
    assert_eq!(
        created.body["server"],
        json!({"id": 12345, "name": "web-server-01"})
    );
    assert_eq!(created.body["name"], "pre-migration-snapshot");
    assert_eq!(created.body["status"], "in_progress");
    assert_eq!(created.body["size_mb"], Value::Null);
    assert_eq!(created.body["description"], "Before major migration");
    assert_eq!(
        created.body["message"],
        "Snapshot is being created. This may take 3-10 minutes depending on server size."
    );
    let id = created.body["id"].as_u64().unwrap();

    let done = api.wait_done(id);
    check_snapshot(&done, &[]);
    assert_eq!(done["status"], "completed");
    // 3 MiB + 1 byte of data in 64 KiB blocks: 49 blocks, rounded up: 4 MiB.
    assert_eq!(done["size_mb"], 4);

    // A second, without description, and one on another server.
    let second = api.post(
        "/api/v1/snapshots",
        &json!({"server_id": 12345, "name": "weekly"}),
    );
    assert_eq!(second.status, 201);
    assert_eq!(second.body["description"], "");
    let second_id = second.body["id"].as_u64().unwrap();
    api.wait_done(second_id);
    let other = api.post("/api/v1/snapshots/", &json!({"server_id": 1, "name": "o"}));
    api.wait_done(other.body["id"].as_u64().unwrap());

    let list = api.get("/api/v1/snapshots/?server_id=12345");
    assert_eq!(list.status, 200);
    assert_eq!(keys_of(&list.body), ["count", "results"]);
    assert_eq!(list.body["count"], 2);
    let ids: Vec<u64> = list.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![second_id, id], "newest first");
    assert_eq!(api.get("/api/v1/snapshots").body["count"], 3);
    assert_eq!(api.get("/api/v1/snapshots/?server_id=999").body["count"], 0);

    // Restore: break the disk, restore, and find it byte-identical.
    std::fs::write(api.disk(), vec![0xEE; 1 << 20]).unwrap();
    let restored = api.post(&format!("/api/v1/snapshots/{id}/restore/"), &json!({}));
    assert_eq!(restored.status, 200, "{}", restored.raw);
    assert_eq!(
        keys_of(&restored.body),
        ["status", "message", "snapshot", "server"]
    );
    assert_eq!(restored.body["status"], "success");
    assert_eq!(
        restored.body["message"],
        "Server is being restored from snapshot. This may take 5-15 minutes."
    );
    assert_eq!(
        restored.body["snapshot"],
        json!({"id": id, "name": "pre-migration-snapshot", "created_at": done["created_at"]})
    );
    assert_eq!(
        restored.body["server"],
        json!({"id": 12345, "name": "web-server-01", "status": "restoring"})
    );
    // Wait for the background restore: the restore endpoint refuses while
    // it runs, then accepts again (without a trailing slash).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = api.post(&format!("/api/v1/snapshots/{id}/restore"), &json!({}));
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 400, "{}", r.raw);
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }

    let del = api.call(
        "DELETE",
        &format!("/api/v1/snapshots/{second_id}/"),
        Some(&format!("Bearer {TOKEN}")),
        None,
    );
    assert_eq!(del.status, 204);
    assert!(del.raw.is_empty());
    assert_eq!(
        api.delete(&format!("/api/v1/snapshots/{second_id}")).status,
        404
    );
    api.stop();
    assert!(std::fs::read(api.disk()).unwrap() == Api::disk_content());
}

/// A server keeps at most five snapshots, as the API documents: the safety
/// snapshot a restore takes is listed only with `include_safety=true`
/// (every snapshot then carries its `kind`), and restoring it by id undoes
/// the restore.
#[test]
fn safety_snapshots_are_listed_only_when_asked_for_and_restore_like_any() {
    let mut api = Api::new();
    let created = api.post(
        "/api/v1/snapshots/",
        &json!({"server_id": 12345, "name": "good"}),
    );
    let id = created.body["id"].as_u64().unwrap();
    api.wait_done(id);
    let broken = vec![0xEE; 1 << 20];
    std::fs::write(api.disk(), &broken).unwrap();
    assert_eq!(
        api.post(&format!("/api/v1/snapshots/{id}/restore/"), &json!({}))
            .status,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let safety = loop {
        let all = api.get("/api/v1/snapshots/?server_id=12345&include_safety=true");
        assert_eq!(all.status, 200);
        let results = all.body["results"].as_array().unwrap().clone();
        assert!(
            results
                .iter()
                .all(|s| s["kind"] == "regular" || s["kind"] == "safety")
        );
        let done = results
            .iter()
            .find(|s| s["kind"] == "safety" && s["status"] == "completed");
        if let Some(s) = done {
            break s.clone();
        }
        assert!(Instant::now() < deadline, "no safety snapshot");
        std::thread::sleep(Duration::from_millis(20));
    };
    check_snapshot(&safety, &["kind"]);
    let regular = api.get("/api/v1/snapshots/?server_id=12345");
    assert_eq!(regular.body["count"], 1);
    assert_eq!(regular.body["results"][0]["id"], id);
    assert!(regular.body["results"][0].get("kind").is_none());
    let explicit = api.get("/api/v1/snapshots/?include_safety=false");
    assert_eq!(explicit.body["count"], 1);
    assert_eq!(
        api.get("/api/v1/snapshots/?include_safety=maybe").status,
        400
    );
    // Restoring the safety snapshot by id brings the broken disk back.
    // (Refused with 400 while the first restore still runs.)
    let safety_id = safety["id"].as_u64().unwrap();
    loop {
        let undo = api.post(
            &format!("/api/v1/snapshots/{safety_id}/restore/"),
            &json!({}),
        );
        if undo.status == 200 {
            break;
        }
        assert_eq!(undo.status, 400, "{}", undo.raw);
        assert!(Instant::now() < deadline, "the restore never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    api.stop();
    assert!(std::fs::read(api.disk()).unwrap() == broken);
}

/// A fault on the server's side is a 500 whose body names no internal
/// path or cause (those go to the server's log).
#[test]
fn a_fault_is_a_500_with_a_generic_detail() {
    let api = Api::new();
    std::fs::remove_file(api.disk()).unwrap();
    let r = api.post(
        "/api/v1/snapshots/",
        &json!({"server_id": 12345, "name": "no-disk"}),
    );
    assert_eq!(r.status, 500, "{}", r.raw);
    let detail = error_detail(&r);
    assert!(
        !detail.contains('/') && !detail.contains("web.img"),
        "{detail}"
    );
}

#[test]
fn invalid_requests_get_400_or_404_with_a_detail() {
    let api = Api::new();
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"name": "x"}), 400, "server_id is required"),
        (json!({"server_id": 12345}), 400, "name is required"),
        (
            json!({"server_id": "12345", "name": "x"}),
            400,
            "server_id must be",
        ),
        (
            json!({"server_id": -1, "name": "x"}),
            400,
            "server_id must be",
        ),
        (
            json!({"server_id": 1.5, "name": "x"}),
            400,
            "server_id must be",
        ),
        (
            json!({"server_id": 12345, "name": 7}),
            400,
            "name must be a string",
        ),
        (
            json!({"server_id": 12345, "name": "has space"}),
            400,
            "invalid name",
        ),
        (json!({"server_id": 12345, "name": ""}), 400, "invalid name"),
        (
            json!({"server_id": 12345, "name": "x".repeat(65)}),
            400,
            "invalid name",
        ),
        (
            json!({"server_id": 12345, "name": "ünïcode"}),
            400,
            "invalid name",
        ),
        (
            json!({"server_id": 12345, "name": "ok", "description": "d".repeat(1025)}),
            400,
            "description",
        ),
        (
            json!({"server_id": 12345, "name": "ok", "description": 5}),
            400,
            "description must be",
        ),
        (json!([1, 2]), 400, "JSON object"),
        (
            json!({"server_id": 999, "name": "x"}),
            404,
            "server 999 does not exist",
        ),
    ];
    for (body, status, detail) in cases {
        let r = api.post("/api/v1/snapshots/", &body);
        assert_eq!(r.status, status, "{body}: {}", r.raw);
        assert!(error_detail(&r).contains(detail), "{body}: {}", r.raw);
    }
    for raw in [
        &b"{not json"[..],
        b"",
        b"null",
        b"{\"server_id\": 1e400, \"name\": \"x\"}",
    ] {
        let r = api.post_raw("/api/v1/snapshots/", raw);
        assert_eq!(
            r.status,
            400,
            "{:?}: {}",
            String::from_utf8_lossy(raw),
            r.raw
        );
        error_detail(&r);
    }
    let r = api.get("/api/v1/snapshots/?server_id=abc");
    assert_eq!(r.status, 400);
    assert!(error_detail(&r).contains("server_id"));
    for path in [
        "/api/v1/snapshots/4242/restore/",
        "/api/v1/snapshots/abc/restore/",
        "/api/v1/snapshots/-3/restore/",
        "/api/v1/snapshots/99999999999999999999999/restore/",
    ] {
        let r = api.post(path, &json!({}));
        assert_eq!(r.status, 404, "{path}");
        error_detail(&r);
    }
    for path in ["/api/v1/snapshots/4242/", "/api/v1/snapshots/abc"] {
        assert_eq!(api.delete(path).status, 404, "{path}");
    }
    let r = api.get("/api/v1/nothing-here");
    assert_eq!(r.status, 404);
    assert_eq!(error_detail(&r), "Not found.");
    for (method, path) in [
        ("PUT", "/api/v1/snapshots/"),
        ("GET", "/api/v1/snapshots/1/restore/"),
        ("PATCH", "/api/v1/snapshots/1/"),
    ] {
        let r = api.call(method, path, Some(&format!("Bearer {TOKEN}")), Some(b"{}"));
        assert_eq!(r.status, 405, "{method} {path}");
        error_detail(&r);
    }
    let big = format!(
        "{{\"server_id\": 12345, \"name\": \"x\", \"description\": \"{}\"}}",
        "a".repeat(70_000)
    );
    let r = api.post_raw("/api/v1/snapshots/", big.as_bytes());
    assert_eq!(r.status, 413);
    error_detail(&r);
    let url = format!("{}/api/v1/snapshots/", api.base);
    let r = api
        .agent
        .post(&url)
        .header("Authorization", format!("Bearer {TOKEN}"))
        .header("Content-Type", "text/plain")
        .send("{\"server_id\": 12345, \"name\": \"x\"}")
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    // After all that, the server still answers and nothing was created.
    assert_eq!(api.get("/api/v1/snapshots/").body["count"], 0);
}

#[test]
fn the_sixth_snapshot_is_400_and_16_racing_posts_make_five() {
    let api = Api::new();
    let barrier = Barrier::new(16);
    let statuses: Vec<(u16, Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..16)
            .map(|i| {
                let (api, barrier) = (&api, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    let r = api.post(
                        "/api/v1/snapshots/",
                        &json!({"server_id": 1, "name": format!("r{i}")}),
                    );
                    (r.status, r.body)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let created: Vec<u64> = statuses
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, b)| b["id"].as_u64().unwrap())
        .collect();
    assert_eq!(created.len(), 5);
    let mut unique = created.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 5);
    for (status, body) in statuses.iter().filter(|(s, _)| *s != 201) {
        assert_eq!(*status, 400);
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("already has 5 snapshots")
        );
    }
    for id in created {
        assert_eq!(api.wait_done(id)["status"], "completed");
    }
    assert_eq!(api.get("/api/v1/snapshots/?server_id=1").body["count"], 5);
}

#[test]
fn wrong_states_are_400() {
    let gate = Gate::default();
    let api = Api::with(EngineOptions::new().disk_opener(gate.opener()));
    let _opens = gate.open_on_drop();
    let r = api.post(
        "/api/v1/snapshots/",
        &json!({"server_id": 2, "name": "slow"}),
    );
    assert_eq!(r.status, 201);
    let id = r.body["id"].as_u64().unwrap();
    // In progress: cannot be restored or deleted.
    let r = api.post(&format!("/api/v1/snapshots/{id}/restore/"), &json!({}));
    assert_eq!(r.status, 400);
    assert!(error_detail(&r).contains("in_progress"), "{}", r.raw);
    let r = api.delete(&format!("/api/v1/snapshots/{id}/"));
    assert_eq!(r.status, 400);
    error_detail(&r);
    gate.open();
    assert_eq!(api.wait_done(id)["status"], "completed");
    assert_eq!(api.delete(&format!("/api/v1/snapshots/{id}/")).status, 204);
}

#[test]
fn every_endpoint_needs_a_valid_token() {
    let api = Api::new();
    let endpoints = [
        ("GET", "/api/v1/snapshots/"),
        ("GET", "/api/v1/snapshots"),
        ("POST", "/api/v1/snapshots/"),
        ("POST", "/api/v1/snapshots/1/restore/"),
        ("DELETE", "/api/v1/snapshots/1/"),
        ("GET", "/api/v1/unknown"),
    ];
    let body = serde_json::to_vec(&json!({"server_id": 12345, "name": "x"})).unwrap();
    let wrong = format!("Bearer {TOKEN}x");
    let bad_auth: [Option<&str>; 7] = [
        None,
        Some("Bearer"),
        Some(TOKEN),
        Some("Token abc"),
        Some("Bearer a b"),
        Some(&wrong),
        Some("Bearer "),
    ];
    for (method, path) in endpoints {
        for auth in bad_auth {
            let r = api.call(method, path, auth, Some(&body));
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}");
            assert!(!error_detail(&r).is_empty());
        }
    }
    assert_eq!(api.get("/api/v1/snapshots/").body["count"], 0);
    // The scheme is case-insensitive, as HTTP says.
    let r = api.call(
        "GET",
        "/api/v1/snapshots/",
        Some(&format!("bearer {TOKEN}")),
        None,
    );
    assert_eq!(r.status, 200);
}

#[test]
fn the_openapi_spec_lists_exactly_the_served_routes() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml")).unwrap();
    let spec: Value = serde_yaml_ng::from_str(&text).unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    let mut in_spec: Vec<(String, String)> = Vec::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                in_spec.push((method.clone(), path.clone()));
            }
        }
    }
    let mut served: Vec<(String, String)> = blocksnap::http::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    in_spec.sort();
    served.sort();
    assert_eq!(in_spec, served);
    // And every route in ROUTES really is served (not 404/405).
    let api = Api::new();
    for (method, path) in blocksnap::http::ROUTES {
        let path = path.replace("{snapshot_id}", "1");
        let r = api.call(
            &method.to_uppercase(),
            &path,
            Some(&format!("Bearer {TOKEN}")),
            Some(b"{}"),
        );
        assert!(
            r.status != 405 && (r.status != 404 || r.body["detail"] != "Not found."),
            "{method} {path}: {}",
            r.raw
        );
    }
}

#[test]
fn serve_needs_a_token_and_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    drop(blocksnap::Engine::open(&store).unwrap());
    let serve = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_blocksnap"));
        c.arg("--store")
            .arg(&store)
            .args(["serve", "--listen", "127.0.0.1:0"]);
        c
    };
    let out = serve().env_remove("BLOCKSNAP_API_TOKEN").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no API token"));

    let token_file = dir.path().join("tokens");
    std::fs::write(&token_file, "# ops\nfile-token\n\n").unwrap();
    let mut child = serve()
        .arg("--token-file")
        .arg(&token_file)
        .env("BLOCKSNAP_API_TOKEN", "env-token")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let agent = crate::common::http_agent();
    for token in ["file-token", "env-token"] {
        let r = agent
            .get(format!("{url}/api/v1/snapshots/"))
            .header("Authorization", format!("Bearer {token}"))
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{token}");
    }
    // The store is held while serving.
    assert!(matches!(
        blocksnap::Engine::open(&store),
        Err(blocksnap::Error::StoreLocked { .. })
    ));
    sigterm(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    drop(blocksnap::Engine::open(&store).unwrap());
}

fn sigterm(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}
