//! Accounts and scoped tokens over real HTTP: every endpoint, for every
//! kind of token, on what the token's account owns, on what another
//! account owns, and on what does not exist. Another account's objects are
//! answered exactly as missing ones, and a refused call changes nothing.

use std::net::SocketAddr;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use blocksnap::http::{ApiConfig, RunningApi, Scope, Tokens, new_token, start};
use blocksnap::{Engine, EngineOptions, ServerId, SnapshotId, SnapshotStatus};
use serde_json::{Value, json};

use crate::common::disk_bytes;

const OPERATOR: &str = "operator-token-0123456789";

struct Fixture {
    running: Option<RunningApi>,
    base: String,
    agent: ureq::Agent,
    dir: tempfile::TempDir,
    engine: Engine,
    /// acme read-write, acme read-only, globex read-write.
    acme: String,
    acme_ro: String,
    globex: String,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.shutdown();
        }
    }
}

/// Server 1 and 3 are acme's, 2 and 4 globex's; servers 1 and 2 have one
/// completed snapshot each.
fn fixture() -> (Fixture, SnapshotId, SnapshotId) {
    fixture_with(EngineOptions::new(), |c| c)
}

/// [`fixture`] with the engine's options and the API's config as given.
fn fixture_with(
    options: EngineOptions,
    config: impl FnOnce(ApiConfig) -> ApiConfig,
) -> (Fixture, SnapshotId, SnapshotId) {
    let dir = tempfile::tempdir().unwrap();
    let engine = options.open(dir.path().join("store")).unwrap();
    for (id, account) in [(1u64, "acme"), (2, "globex"), (3, "acme"), (4, "globex")] {
        let path = dir.path().join(format!("s{id}.img"));
        // Servers 3 and 4 are twice as large: a gate on the second half
        // holds their captures, not the others'.
        let len = if id > 2 { 512 << 10 } else { 256 << 10 };
        std::fs::write(&path, disk_bytes(len, id)).unwrap();
        engine
            .add_server_for(ServerId(id), &format!("srv-{id}"), &path, account)
            .unwrap();
    }
    let s1 = engine.create_snapshot(ServerId(1), "one", "").unwrap().id;
    let s2 = engine.create_snapshot(ServerId(2), "two", "").unwrap().id;
    let (acme, l1) = new_token(Some("acme"), Scope::ReadWrite, Some("acme-ci")).unwrap();
    let (acme_ro, l2) = new_token(Some("acme"), Scope::Read, None).unwrap();
    let (globex, l3) = new_token(Some("globex"), Scope::ReadWrite, None).unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{l1}\n{l2}\n{l3}\n")).unwrap();
    let tokens = Tokens::load_all(Some(OPERATOR), None, Some(&file)).unwrap();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let running = start(engine.clone(), addr, config(ApiConfig::from(tokens))).unwrap();
    let base = format!("http://{}", running.addr());
    let agent = crate::common::http_agent();
    let fx = Fixture {
        running: Some(running),
        base,
        agent,
        dir,
        engine,
        acme,
        acme_ro,
        globex,
    };
    (fx, s1, s2)
}

impl Fixture {
    fn call(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
        let url = format!("{}{}", self.base, path);
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Authorization", format!("Bearer {token}"))
            .header("Content-Type", "application/json");
        let resp = match body {
            Some(b) => self
                .agent
                .run(req.body(serde_json::to_vec(&b).unwrap()).unwrap()),
            None => self.agent.run(req.body(()).unwrap()),
        };
        let mut resp = resp.unwrap();
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().unwrap_or_default())
    }

    fn listed(&self, token: &str, query: &str) -> Vec<u64> {
        let (status, body) = self.call(token, "GET", &format!("/api/v1/snapshots/{query}"), None);
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_u64().unwrap())
            .collect()
    }

    /// Waits until nothing of server `id` is being captured or restored.
    fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .engine
            .servers()
            .iter()
            .any(|s| s.state != blocksnap::ServerState::Idle)
        {
            assert!(Instant::now() < deadline, "work still running");
            std::thread::sleep(Duration::from_millis(10));
        }
        while self
            .engine
            .snapshots(None)
            .unwrap()
            .iter()
            .any(|s| s.status == SnapshotStatus::InProgress)
        {
            assert!(Instant::now() < deadline, "a capture still running");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A 404's body with the id in it made generic, to compare "another
/// account's" with "none".
fn generic(body: &str, id: u64) -> String {
    body.replace(&id.to_string(), "ID")
}

#[test]
fn every_endpoint_for_every_token_on_own_other_and_missing_objects() {
    let (fx, s1, s2) = fixture();
    let missing_snap = 999_999u64;
    let missing_server = 777u64;

    // Listing: each account sees its servers' snapshots only; another
    // account's server lists nothing, exactly as an unknown one.
    assert_eq!(fx.listed(OPERATOR, ""), vec![s2.0, s1.0]);
    assert_eq!(fx.listed(&fx.acme, ""), vec![s1.0]);
    assert_eq!(fx.listed(&fx.acme_ro, ""), vec![s1.0]);
    assert_eq!(fx.listed(&fx.globex, ""), vec![s2.0]);
    for token in [&fx.acme, &fx.acme_ro] {
        let other = fx.call(token, "GET", "/api/v1/snapshots/?server_id=2", None);
        let none = fx.call(
            token,
            "GET",
            &format!("/api/v1/snapshots/?server_id={missing_server}"),
            None,
        );
        assert_eq!(other, none);
        assert_eq!(other.0, 200);
    }

    // A read-only token changes nothing, whatever it names: 403 before any
    // look-up, so it cannot probe either.
    for (method, path, body) in [
        (
            "POST",
            "/api/v1/snapshots/".to_string(),
            Some(json!({"server_id": 1, "name": "x"})),
        ),
        (
            "POST",
            "/api/v1/snapshots/".to_string(),
            Some(json!({"server_id": 2, "name": "x"})),
        ),
        ("POST", format!("/api/v1/snapshots/{}/restore/", s1.0), None),
        ("POST", format!("/api/v1/snapshots/{}/restore/", s2.0), None),
        ("DELETE", format!("/api/v1/snapshots/{}/", s1.0), None),
        ("DELETE", format!("/api/v1/snapshots/{missing_snap}/"), None),
    ] {
        let (status, body) = fx.call(&fx.acme_ro, method, &path, body);
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert!(body.contains("\"detail\""), "{body}");
    }

    // Create: own 201; another account's server and a missing one: the
    // same 404.
    let (status, body) = fx.call(
        &fx.acme,
        "POST",
        "/api/v1/snapshots/",
        Some(json!({"server_id": 1, "name": "mine"})),
    );
    assert_eq!(status, 201, "{body}");
    let (other_status, other) = fx.call(
        &fx.acme,
        "POST",
        "/api/v1/snapshots/",
        Some(json!({"server_id": 2, "name": "theirs"})),
    );
    let (none_status, none) = fx.call(
        &fx.acme,
        "POST",
        "/api/v1/snapshots/",
        Some(json!({"server_id": missing_server, "name": "nobody"})),
    );
    assert_eq!((other_status, none_status), (404, 404));
    assert_eq!(
        generic(&other, 2),
        generic(&none, missing_server),
        "{other} / {none}"
    );
    // The operator acts for every account.
    let (status, body) = fx.call(
        OPERATOR,
        "POST",
        "/api/v1/snapshots/",
        Some(json!({"server_id": 2, "name": "ops"})),
    );
    assert_eq!(status, 201, "{body}");
    fx.settle();

    // Restore and delete of another account's snapshot: the same 404 as a
    // missing one, and nothing changes (disk bytes, catalog).
    std::fs::write(fx.dir.path().join("s2.img"), disk_bytes(256 << 10, 50)).unwrap();
    let disk2_now = std::fs::read(fx.dir.path().join("s2.img")).unwrap();
    let before = fx.engine.snapshots(None).unwrap();
    for (method, suffix) in [("POST", "restore/"), ("DELETE", "")] {
        let (os, other) = fx.call(
            &fx.acme,
            method,
            &format!("/api/v1/snapshots/{}/{suffix}", s2.0),
            None,
        );
        let (ns, none) = fx.call(
            &fx.acme,
            method,
            &format!("/api/v1/snapshots/{missing_snap}/{suffix}"),
            None,
        );
        assert_eq!((os, ns), (404, 404), "{method}");
        assert_eq!(
            generic(&other, s2.0),
            generic(&none, missing_snap),
            "{other} / {none}"
        );
    }
    assert!(std::fs::read(fx.dir.path().join("s2.img")).unwrap() == disk2_now);
    assert_eq!(fx.engine.snapshots(None).unwrap(), before);

    // Own: restore, then delete; the other account's own token may too.
    let (status, body) = fx.call(
        &fx.globex,
        "POST",
        &format!("/api/v1/snapshots/{}/restore/", s2.0),
        None,
    );
    assert_eq!(status, 200, "{body}");
    fx.settle();
    assert!(std::fs::read(fx.dir.path().join("s2.img")).unwrap() == disk_bytes(256 << 10, 2));
    let (status, body) = fx.call(
        &fx.acme,
        "DELETE",
        &format!("/api/v1/snapshots/{}/", s1.0),
        None,
    );
    assert_eq!(status, 204, "{body}");
    assert!(!fx.listed(OPERATOR, "").contains(&s1.0));
    // A read-only token still reads after all that.
    assert_eq!(fx.listed(&fx.acme_ro, ""), fx.listed(&fx.acme, ""));
}

#[test]
fn sixteen_creates_from_two_accounts_give_five_per_server() {
    let (fx, _, _) = fixture();
    let gate = Barrier::new(16);
    let outcomes: Vec<(u64, u16)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let (token, server) = if i % 2 == 0 {
                    (&fx.acme, 3u64)
                } else {
                    (&fx.globex, 4u64)
                };
                let fx = &fx;
                let gate = &gate;
                s.spawn(move || {
                    gate.wait();
                    let (status, _) = fx.call(
                        token,
                        "POST",
                        "/api/v1/snapshots/",
                        Some(json!({"server_id": server, "name": format!("c{i}")})),
                    );
                    (server, status)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for server in [3u64, 4] {
        let made = outcomes.iter().filter(|o| **o == (server, 201)).count();
        assert_eq!(made, 5, "server {server}: {outcomes:?}");
    }
    fx.settle();
    for server in [3u64, 4] {
        let n = fx.engine.snapshots(Some(ServerId(server))).unwrap().len();
        assert_eq!(n, 5);
    }
}

/// `blocksnap token new` prints the token once and the line for the file;
/// `server add --account` and `server set-account` keep accounts in the
/// catalog, across a reopen.
#[test]
fn the_command_makes_tokens_and_moves_servers_between_accounts() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blocksnap"))
        .args([
            "token",
            "new",
            "--account",
            "acme",
            "--read-only",
            "--name",
            "dash",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let (token, line) = (lines.next().unwrap(), lines.next().unwrap());
    assert!(!line.contains(token));
    assert!(
        line.starts_with("blake3:")
            && line.contains("account=acme")
            && line.contains("scope=read ")
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokens"), format!("{line}\n")).unwrap();
    let tokens = Tokens::load_all(None, None, Some(&dir.path().join("tokens"))).unwrap();
    drop(tokens);
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_blocksnap"))
        .args(["token", "new", "--account", "no spaces"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));

    let store = dir.path().join("store");
    let engine = EngineOptions::new().open(&store).unwrap();
    let path = dir.path().join("d.img");
    std::fs::write(&path, b"").unwrap();
    engine
        .add_server_for(ServerId(1), "d", &path, "acme")
        .unwrap();
    engine.add_server(ServerId(2), "e", &path).unwrap();
    assert!(
        engine
            .add_server_for(ServerId(3), "f", &path, "a b")
            .is_err()
    );
    engine.set_server_account(ServerId(1), "globex").unwrap();
    drop(engine);
    let engine = EngineOptions::new().open(&store).unwrap();
    assert_eq!(engine.server(ServerId(1)).unwrap().account, "globex");
    assert_eq!(engine.server(ServerId(2)).unwrap().account, "default");
}

#[test]
fn a_flooding_account_is_throttled_and_the_others_are_not() {
    let (fx, _, _) = fixture_with(EngineOptions::new(), |c| c.rate_limit(5.0));
    let mut throttled = None;
    for _ in 0..40 {
        let url = format!("{}/api/v1/snapshots/", fx.base);
        let mut r = fx
            .agent
            .get(&url)
            .header("Authorization", format!("Bearer {}", fx.acme))
            .call()
            .unwrap();
        if r.status().as_u16() == 429 {
            let retry = r
                .headers()
                .get("Retry-After")
                .map(|v| v.to_str().unwrap().to_string());
            throttled = Some((retry, r.body_mut().read_to_string().unwrap()));
            break;
        }
    }
    let (retry, body) = throttled.expect("40 requests at once were never throttled");
    assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok_and(|s| s >= 1)));
    assert!(body.contains("\"detail\""), "{body}");
    // Another account, and the operator, are answered meanwhile.
    assert_eq!(
        fx.call(&fx.globex, "GET", "/api/v1/snapshots/", None).0,
        200
    );
    for _ in 0..40 {
        assert_eq!(fx.call(OPERATOR, "GET", "/api/v1/snapshots/", None).0, 200);
    }
}

#[test]
fn an_account_at_its_cap_of_running_jobs_gets_429_and_the_others_go_on() {
    let gate = crate::common::Gate::default();
    let (fx, _, _) = fixture_with(
        EngineOptions::new().disk_opener(gate.opener_from(256 << 10)),
        |c| c.account_jobs(1),
    );
    let _opens = gate.open_on_drop();
    let create = |token: &str, server: u64| {
        fx.call(
            token,
            "POST",
            "/api/v1/snapshots/",
            Some(json!({"server_id": server, "name": format!("n{server}")})),
        )
    };
    // Server 3's capture is held running: acme is at its cap of one.
    assert_eq!(create(&fx.acme, 3).0, 201);
    gate.wait_for_a_reader();
    let (status, body) = create(&fx.acme, 1);
    assert_eq!(status, 429, "{body}");
    let (status, body) = fx.call(&fx.acme, "POST", "/api/v1/snapshots/1/restore/", None);
    assert_eq!(status, 429, "{body}");
    // Another account is not starved, nor is the operator.
    assert_eq!(create(&fx.globex, 2).0, 201);
    assert_eq!(create(OPERATOR, 4).0, 201);
    gate.open();
    fx.settle();
    assert_eq!(create(&fx.acme, 1).0, 201);
    fx.settle();
}

#[test]
fn the_audit_log_records_every_change_and_every_refusal_durably() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let path = log.path().to_path_buf();
    let (fx, s1, s2) = fixture_with(EngineOptions::new(), |c| c.audit_log(Some(path.clone())));
    assert_eq!(
        fx.call(
            &fx.acme,
            "POST",
            "/api/v1/snapshots/",
            Some(json!({"server_id": 1, "name": "a"}))
        )
        .0,
        201
    );
    assert_eq!(
        fx.call(
            &fx.acme,
            "DELETE",
            &format!("/api/v1/snapshots/{}/", s2.0),
            None
        )
        .0,
        404
    );
    assert_eq!(
        fx.call("no-such-token", "GET", "/api/v1/snapshots/", None)
            .0,
        401
    );
    assert_eq!(
        fx.call(
            &fx.acme_ro,
            "DELETE",
            &format!("/api/v1/snapshots/{}/", s1.0),
            None
        )
        .0,
        403
    );
    assert_eq!(fx.call(&fx.acme, "GET", "/api/v1/snapshots/", None).0, 200);
    // Each answered request's line is in the file by then.
    let lines: Vec<Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[0]["method"], "POST");
    assert_eq!(lines[0]["status"], 201);
    assert_eq!(lines[0]["token"], "acme-ci");
    assert_eq!(lines[0]["account"], "acme");
    assert_eq!(lines[0]["server_id"], 1);
    assert!(lines[0]["snapshot_id"].as_u64().is_some());
    assert_eq!(lines[1]["status"], 404);
    assert_eq!(lines[1]["path"], format!("/api/v1/snapshots/{}/", s2.0));
    assert_eq!(lines[2]["status"], 401);
    assert_eq!(lines[2]["account"], Value::Null);
    assert_eq!(lines[3]["status"], 403);
    for l in &lines {
        assert!(l["time"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert!(l["micros"].as_u64().is_some());
    }
    fx.settle();
}
