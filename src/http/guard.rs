//! What keeps one client from starving the others, and what is written
//! down: a request rate per token (429 with `Retry-After` past it), a cap
//! on the captures and restores an account runs at once, and the audit log
//! (one JSON line per request that changes something or is refused,
//! durable before the response goes).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;

use super::auth::Tokens;
use crate::error::{IoContext, Result};

/// How `serve` guards the API.
#[derive(Clone)]
#[non_exhaustive]
pub struct ApiConfig {
    pub tokens: Tokens,
    /// Requests a second per token, and the burst it may spend at once
    /// (`None`: no limit).
    pub rate: Option<(f64, f64)>,
    /// Captures and restores an account's tokens may have running at once
    /// (operators' are not counted).
    pub account_jobs: usize,
    /// Where the audit log is appended (`None`: no log).
    pub audit_log: Option<PathBuf>,
    /// TLS: the certificate chain and the private key, PEM files.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Serve plain HTTP on an address other than loopback all the same.
    pub insecure_http: bool,
}

impl From<Tokens> for ApiConfig {
    /// These tokens, no rate limit, no cap on jobs, no audit log.
    fn from(tokens: Tokens) -> Self {
        ApiConfig {
            tokens,
            rate: None,
            account_jobs: usize::MAX,
            audit_log: None,
            tls: None,
            insecure_http: false,
        }
    }
}

impl ApiConfig {
    /// `per_second` requests a second per token, with bursts of twice as
    /// many; 0: no limit.
    pub fn rate_limit(mut self, per_second: f64) -> Self {
        self.rate = (per_second > 0.0).then_some((per_second, (2.0 * per_second).max(1.0)));
        self
    }

    pub fn account_jobs(mut self, jobs: usize) -> Self {
        self.account_jobs = jobs.max(1);
        self
    }

    pub fn audit_log(mut self, path: Option<PathBuf>) -> Self {
        self.audit_log = path;
        self
    }

    /// Serves HTTPS with this certificate chain and key (PEM files).
    pub fn tls(mut self, cert: PathBuf, key: PathBuf) -> Self {
        self.tls = Some((cert, key));
        self
    }

    pub fn insecure_http(mut self, on: bool) -> Self {
        self.insecure_http = on;
        self
    }

    /// Refuses plain HTTP on an address other than loopback: tokens would
    /// cross the network in the clear.
    pub(crate) fn check_listen(&self, listen: std::net::SocketAddr) -> Result<()> {
        if self.tls.is_none() && !self.insecure_http && !listen.ip().is_loopback() {
            return Err(crate::Error::InvalidParameter(format!(
                "serving plain HTTP on {listen}, which is not a loopback address, would send \
                 API tokens in the clear: give --tls-cert FILE and --tls-key FILE, or \
                 --insecure-http if a proxy in front terminates TLS"
            )));
        }
        Ok(())
    }

    /// The TLS acceptor, when serving HTTPS.
    pub(crate) fn acceptor(&self) -> Result<Option<tokio_rustls::TlsAcceptor>> {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let Some((cert, key)) = &self.tls else {
            return Ok(None);
        };
        let bad = |path: &Path, why: String| {
            crate::Error::InvalidParameter(format!("{}: {why}", path.display()))
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad(cert, format!("cannot read a PEM certificate: {e}")))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(cert, format!("not a PEM certificate chain: {e}")))?;
        if certs.is_empty() {
            return Err(bad(cert, "holds no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| bad(key, format!("not a PEM private key: {e}")))?;
        // The provider named, not the process default: with more than one
        // compiled in, there is no default.
        let provider = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider();
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(
            std::sync::Arc::new(provider),
        )
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, format!("no TLS version to offer: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            bad(
                cert,
                format!("the certificate and key do not go together: {e}"),
            )
        })?;
        Ok(Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(
            config,
        ))))
    }
}

/// A token bucket per token.
pub(crate) struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<usize, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_second: f64, burst: f64) -> Self {
        RateLimiter {
            per_second,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request for token `key`: `Err(seconds)` until the next
    /// one is allowed when its bucket is empty.
    pub fn take(&self, key: usize) -> std::result::Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        let (tokens, at) = buckets.entry(key).or_insert((self.burst, now));
        let refill = now.duration_since(*at).as_secs_f64() * self.per_second;
        *tokens = (*tokens + refill).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_second).ceil().max(1.0) as u64)
        }
    }
}

/// One line of the audit log.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct AuditRecord {
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    /// The token's name, if it has one.
    pub token: Option<String>,
    /// The account it acts for (`*`: an operator's; `null`: no valid token).
    pub account: Option<String>,
    pub method: String,
    pub path: String,
    pub server_id: Option<u64>,
    pub snapshot_id: Option<u64>,
    pub status: u16,
    pub micros: u64,
}

/// The ids a handler acted on, for the audit log (set on the response).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Touched {
    pub server: Option<u64>,
    pub snapshot: Option<u64>,
}

type Pending = (
    AuditRecord,
    tokio::sync::oneshot::Sender<std::io::Result<()>>,
);

/// The audit log: lines appended by one writer thread, each batch made
/// durable (fdatasync) before the requests it holds are answered.
pub(crate) struct AuditLog {
    send: Mutex<mpsc::Sender<Pending>>,
    path: PathBuf,
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .at(path)?;
        let (send, recv) = mpsc::channel::<Pending>();
        let owned = path.to_path_buf();
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || write_loop(file, &owned, recv))
            .at(path)?;
        Ok(AuditLog {
            send: Mutex::new(send),
            path: path.to_path_buf(),
        })
    }

    /// Appends `record`; resolves once it is durable.
    pub async fn append(&self, record: AuditRecord) -> std::io::Result<()> {
        let (done, durable) = tokio::sync::oneshot::channel();
        if self.send.lock().send((record, done)).is_err() {
            return Err(std::io::Error::other(format!(
                "the audit log {} is closed",
                self.path.display()
            )));
        }
        durable
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("the audit log's writer stopped")))
    }
}

fn write_loop(mut file: File, path: &Path, recv: mpsc::Receiver<Pending>) {
    while let Ok(first) = recv.recv() {
        // Whatever else is waiting goes in the same write and fdatasync.
        let mut batch = vec![first];
        batch.extend(recv.try_iter());
        let mut bytes = Vec::new();
        for (record, _) in &batch {
            if let Ok(line) = serde_json::to_vec(record) {
                bytes.extend_from_slice(&line);
                bytes.push(b'\n');
            }
        }
        let outcome = file.write_all(&bytes).and_then(|()| file.sync_data());
        if let Err(e) = &outcome {
            eprintln!(
                "blocksnap serve: cannot append to the audit log {}: {e}",
                path.display()
            );
        }
        for (_, done) in batch {
            let _ = done.send(match &outcome {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}
