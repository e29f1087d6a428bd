//! Connections cannot be hoarded: `blocksnap serve` with a file limit of
//! 1,024 (a common service default) keeps answering a well-formed request
//! while 2,000 connections that sent half a request header hold on.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use blocksnap::{EngineOptions, ServerId};

const TOKEN: &str = "conn-test-token";

/// This process's own soft file limit, raised to at least `want`.
fn raise_own_file_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the struct given.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

#[test]
fn half_open_connections_do_not_stop_a_well_formed_request() {
    let hoarders = crate::common::env_count("BLOCKSNAP_HALF_OPEN", 2000) as usize;
    if raise_own_file_limit(hoarders as u64 + 512) < hoarders as u64 + 256 {
        eprintln!("this process cannot open {hoarders} connections: test skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let engine = EngineOptions::new().open(&store).unwrap();
    let disk = dir.path().join("d.img");
    std::fs::write(&disk, crate::common::disk_bytes(64 << 10, 1)).unwrap();
    engine.add_server(ServerId(1), "d", &disk).unwrap();
    engine.create_snapshot(ServerId(1), "one", "").unwrap();
    drop(engine);
    // The server's file limit: 1,024, soft and hard (nothing to raise).
    let mut server = Command::new("prlimit")
        .arg("--nofile=1024:1024")
        .arg(env!("CARGO_BIN_EXE_blocksnap"))
        .args([
            "--store",
            store.to_str().unwrap(),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("BLOCKSNAP_API_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("prlimit (util-linux) runs the server");
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let line = lines.next().expect("serve ended").unwrap();
        if let Some(a) = line.strip_prefix("listening on http://") {
            break a.parse().unwrap();
        }
    };
    // Half a request header each, then nothing.
    let mut held = Vec::new();
    for _ in 0..hoarders {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            continue;
        };
        let _ = s.write_all(b"GET /api/v1/snapshots/ HTTP/1.1\r\nHost: x\r\n");
        held.push(s);
    }
    assert!(
        held.len() > 1024,
        "only {} connections were opened",
        held.len()
    );
    // A well-formed request is answered all the same.
    let agent = crate::common::http_agent();
    let answered = (0..3).find_map(|_| {
        agent
            .get(format!("http://{addr}/api/v1/snapshots/"))
            .header("Authorization", format!("Bearer {TOKEN}"))
            .call()
            .ok()
            .map(|mut r| {
                (
                    r.status().as_u16(),
                    r.body_mut().read_to_string().unwrap_or_default(),
                )
            })
    });
    let (status, body) = answered.expect("no answer while connections were held");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"one\""), "{body}");
    drop(held);
    let _ = Command::new("kill").arg(server.id().to_string()).status();
    assert!(server.wait().unwrap().success());
}

/// A store with one server and one snapshot ("one"), for `serve`.
fn served_store(dir: &std::path::Path) -> std::path::PathBuf {
    let store = dir.join("store");
    let engine = EngineOptions::new().open(&store).unwrap();
    let disk = dir.join("d.img");
    std::fs::write(&disk, crate::common::disk_bytes(64 << 10, 1)).unwrap();
    engine.add_server(ServerId(1), "d", &disk).unwrap();
    engine.create_snapshot(ServerId(1), "one", "").unwrap();
    store
}

/// `blocksnap serve ARGS` on `store`, and the address it says it listens
/// on (with its scheme).
fn serve(store: &std::path::Path, args: &[&str]) -> (std::process::Child, String) {
    let mut server = Command::new(env!("CARGO_BIN_EXE_blocksnap"))
        .args(["--store", store.to_str().unwrap(), "serve"])
        .args(args)
        .env("BLOCKSNAP_API_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("serve ended").unwrap();
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.to_string();
        }
    };
    (server, url)
}

fn stop(mut server: std::process::Child) {
    let _ = Command::new("kill").arg(server.id().to_string()).status();
    server.wait().unwrap();
}

#[test]
fn https_with_a_verified_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl makes the test's certificate");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let store = served_store(dir.path());
    let (server, url) = serve(
        &store,
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(url.starts_with("https://"), "{url}");
    let curl = |extra: &[&str], url: &str| {
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "-H"])
            .arg(format!("Authorization: Bearer {TOKEN}"))
            .args(extra)
            .arg(url)
            .output()
            .unwrap()
    };
    let list = format!("{url}/api/v1/snapshots/");
    // curl verifies the certificate against the one given.
    let out = curl(&["--cacert", cert.to_str().unwrap()], &list);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"one\""));
    // Without it, the self-signed certificate is refused: it is checked.
    assert!(!curl(&[], &list).status.success());
    // Plain HTTP on the TLS port gets no answer from the API.
    let plain = curl(&[], &list.replacen("https://", "http://", 1));
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("\"one\""));
    stop(server);
}

#[test]
fn plain_http_off_loopback_is_refused_unless_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let store = served_store(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_blocksnap"))
        .args([
            "--store",
            store.to_str().unwrap(),
            "serve",
            "--listen",
            "0.0.0.0:0",
        ])
        .env("BLOCKSNAP_API_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in the clear") && err.contains("--tls-cert"),
        "{err}"
    );
    let (server, url) = serve(&store, &["--listen", "0.0.0.0:0", "--insecure-http"]);
    assert!(url.starts_with("http://0.0.0.0:"), "{url}");
    stop(server);
}
