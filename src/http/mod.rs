//! `blocksnap serve`: the provider's Snapshots REST API (docs/openapi.yaml) over
//! the engine, exactly: same paths (with and without the trailing slash),
//! JSON shapes, status codes and bearer-token auth. Described for clients in
//! docs/openapi.yaml; [`ROUTES`] is the list the spec is tested against.
//!
//! Engine calls block (fsync, catalog commits), so handlers run them on
//! tokio's blocking threads, never on the async workers. Captures and
//! restores continue in the background after the response; on shutdown
//! the server stops accepting requests and waits for them to finish.

mod auth;
mod conns;
mod guard;
mod handlers;

pub use handlers::create_request;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::{delete, get, post};
use parking_lot::Mutex;

pub use auth::{Principal, Scope, Tokens, new_token};
pub use conns::{ConnLimits, HEADER_TIMEOUT, IDLE_TIMEOUT, raise_file_limit};
pub use guard::ApiConfig;

use crate::engine::{Engine, RestoreJob};
use crate::error::{Error, IoContext, Result};
use crate::types::CaptureJob;

/// Largest request body accepted; larger ones get 413.
pub const MAX_BODY_LEN: usize = 64 << 10;

/// Every route the API serves, as `(method, path)` in OpenAPI's spelling.
/// Each is also served with its trailing slash removed.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/v1/snapshots/"),
    ("post", "/api/v1/snapshots/"),
    ("post", "/api/v1/snapshots/{snapshot_id}/restore/"),
    ("delete", "/api/v1/snapshots/{snapshot_id}/"),
];

/// Shared by every handler.
#[derive(Clone)]
struct App {
    engine: Engine,
    jobs: Arc<Mutex<Jobs>>,
    /// Captures and restores an account may have running at once.
    account_jobs: usize,
}

impl App {
    fn new(engine: Engine, config: &ApiConfig) -> Self {
        App {
            engine,
            jobs: Arc::new(Mutex::new(Jobs::default())),
            account_jobs: config.account_jobs,
        }
    }
}

/// Background work started by requests, with the account of its server,
/// kept so shutdown can wait for it.
#[derive(Default)]
struct Jobs {
    captures: Vec<(String, CaptureJob)>,
    restores: Vec<(String, RestoreJob)>,
}

impl Jobs {
    fn prune(&mut self) {
        self.captures.retain(|(_, j)| !j.is_finished());
        self.restores.retain(|(_, j)| !j.is_finished());
    }

    /// Captures and restores running for `account`.
    fn running_for(&mut self, account: &str) -> usize {
        self.prune();
        self.captures.iter().filter(|(a, _)| a == account).count()
            + self.restores.iter().filter(|(a, _)| a == account).count()
    }

    /// Waits for everything still running. Outcomes are in the catalog.
    fn wait_all(&mut self) {
        for (_, j) in self.captures.drain(..) {
            let _ = j.wait();
        }
        for (_, j) in self.restores.drain(..) {
            let _ = j.wait();
        }
    }
}

/// The API's router over `engine`, every route behind the tokens of
/// `config` (or just tokens).
pub fn router(engine: Engine, config: impl Into<ApiConfig>) -> Result<Router> {
    let config = config.into();
    let app = App::new(engine, &config);
    router_for(app, &config)
}

fn router_for(app: App, config: &ApiConfig) -> Result<Router> {
    let guard = auth::Guard {
        tokens: config.tokens.clone(),
        rate: config
            .rate
            .map(|(per_second, burst)| guard::RateLimiter::new(per_second, burst)),
        audit: match &config.audit_log {
            Some(path) => Some(guard::AuditLog::open(path)?),
            None => None,
        },
    };
    let list = get(handlers::list).post(handlers::create);
    let restore = post(handlers::restore);
    let remove = delete(handlers::delete);
    Ok(Router::new()
        .route("/api/v1/snapshots/", list.clone())
        .route("/api/v1/snapshots", list)
        .route("/api/v1/snapshots/{snapshot_id}/restore/", restore.clone())
        .route("/api/v1/snapshots/{snapshot_id}/restore", restore)
        .route("/api/v1/snapshots/{snapshot_id}/", remove.clone())
        .route("/api/v1/snapshots/{snapshot_id}", remove)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(guard),
            auth::require_token,
        ))
        .with_state(app))
}

/// A server running on its own thread (tests, embedders).
pub struct RunningApi {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl RunningApi {
    /// The address it listens on (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting requests, waits for running captures and restores,
    /// and returns.
    pub fn shutdown(mut self) -> std::io::Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("server panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for RunningApi {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Binds `listen` and serves on a new thread until [`RunningApi::shutdown`].
pub fn start(
    engine: Engine,
    listen: SocketAddr,
    config: impl Into<ApiConfig>,
) -> Result<RunningApi> {
    let config = config.into();
    config.check_listen(listen)?;
    let tls = config.acceptor()?;
    let app = App::new(engine, &config);
    let jobs = app.jobs.clone();
    let router = (router_for(app, &config)?, jobs, tls);
    let listener = bind(listen)?;
    let addr = listener.local_addr().at(listen.to_string())?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("blocksnap-http".into())
        .spawn(move || {
            runtime()?.block_on(serve_on(listener, router, async {
                let _ = stopped.await;
            }))
        })
        .at("<http thread>")?;
    Ok(RunningApi {
        addr,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// Binds `listen`, calls `ready` with the bound address, and serves until
/// SIGINT or SIGTERM; then waits for running captures and restores.
pub fn run_until_signal(
    engine: Engine,
    listen: SocketAddr,
    config: impl Into<ApiConfig>,
    ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    let config = config.into();
    config.check_listen(listen)?;
    let tls = config.acceptor()?;
    let app = App::new(engine, &config);
    let jobs = app.jobs.clone();
    let router = (router_for(app, &config)?, jobs, tls);
    // A service's default soft limit (1,024) is raised to the hard one:
    // connections are capped below what is then left.
    raise_file_limit();
    let listener = bind(listen)?;
    ready(listener.local_addr().at(listen.to_string())?);
    runtime()
        .at("<tokio runtime>")?
        .block_on(serve_on(listener, router, shutdown_signal()))
        .at(listen.to_string())
}

fn bind(listen: SocketAddr) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(listen).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable => {
            Error::InvalidParameter(format!("cannot listen on {listen}: {e}"))
        }
        _ => Error::io(listen.to_string(), e),
    })?;
    l.set_nonblocking(true).at(listen.to_string())?;
    Ok(l)
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

async fn serve_on(
    listener: std::net::TcpListener,
    (router, jobs, tls): (Router, Arc<Mutex<Jobs>>, Option<tokio_rustls::TlsAcceptor>),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    conns::serve(
        listener,
        router,
        ConnLimits::from_file_limit(),
        tls,
        shutdown,
    )
    .await?;
    tokio::task::spawn_blocking(move || jobs.lock().wait_all())
        .await
        .map_err(std::io::Error::other)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
