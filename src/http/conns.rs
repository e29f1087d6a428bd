//! The API's accept loop: connections cannot be hoarded.
//!
//! A client that opens connections and never finishes a request (a
//! slowloris), or leaves them idle, would otherwise hold a file
//! descriptor each until the process runs out and stops answering
//! everyone. So:
//!
//! - a request's headers must arrive within [`HEADER_TIMEOUT`], and a
//!   connection with no request under way is closed after
//!   [`IDLE_TIMEOUT`];
//! - at most [`ConnLimits::max`] connections are open at once, below the
//!   file limit (which `serve` raises from its soft to its hard value):
//!   when a new connection finds them all taken, the one idle the longest
//!   (no request under way: half-open, or between requests) is closed to
//!   make room, so a well-formed request is answered while others hoard;
//! - an accept that fails for want of descriptors sheds such a connection
//!   too, and goes on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use parking_lot::Mutex;
use tower_service::Service;

/// A request's headers must all arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request under way is closed after this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Descriptors kept for the store's own files, the listener and the rest.
const RESERVED_FDS: u64 = 128;

/// How many connections the API holds open at once.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    pub max: usize,
}

impl ConnLimits {
    /// From the process's soft file limit: what is left after the store's
    /// own files.
    pub fn from_file_limit() -> Self {
        let soft = file_limit().0;
        ConnLimits {
            max: soft.saturating_sub(RESERVED_FDS).max(16) as usize,
        }
    }
}

/// The process's (soft, hard) limits on open files.
fn file_limit() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (1024, 1024);
    }
    (lim.rlim_cur, lim.rlim_max)
}

/// Raises the soft limit on open files to the hard one (what a service
/// manager's default of 1,024 leaves on the table); returns the soft
/// limit now.
pub fn raise_file_limit() -> u64 {
    let (soft, hard) = file_limit();
    if soft < hard {
        let lim = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the struct we pass; raising the soft
        // limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            return hard;
        }
    }
    soft
}

/// One open connection, as the loop sees it.
struct Conn {
    stats: Arc<Stats>,
    abort: tokio::task::AbortHandle,
}

/// What its requests tell of a connection.
#[derive(Default)]
struct Stats {
    /// Requests under way on it.
    busy: AtomicUsize,
    /// When it last started or finished a request (or opened), in
    /// milliseconds since the loop started.
    last: AtomicU64,
}

#[derive(Default)]
struct Open {
    conns: HashMap<u64, Conn>,
    next: u64,
}

struct Registry {
    open: Mutex<Open>,
    start: Instant,
}

impl Registry {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Closes the connection idle the longest, if one is idle.
    fn shed_one(&self) -> bool {
        let mut open = self.open.lock();
        let victim = open
            .conns
            .iter()
            .filter(|(_, c)| c.stats.busy.load(Ordering::Acquire) == 0)
            .min_by_key(|(_, c)| c.stats.last.load(Ordering::Acquire))
            .map(|(id, _)| *id);
        match victim.and_then(|id| open.conns.remove(&id)) {
            Some(c) => {
                c.abort.abort();
                true
            }
            None => false,
        }
    }

    /// Closes every connection idle for longer than `idle`.
    fn reap(&self, idle: Duration) {
        let now = self.now();
        let limit = idle.as_millis() as u64;
        self.open.lock().conns.retain(|_, c| {
            let idle = c.stats.busy.load(Ordering::Acquire) == 0
                && now.saturating_sub(c.stats.last.load(Ordering::Acquire)) > limit;
            if idle {
                c.abort.abort();
            }
            !idle
        });
    }

    fn len(&self) -> usize {
        self.open.lock().conns.len()
    }
}

/// Serves `router` on `listener` until `shutdown`, within `limits`; then
/// lets the requests under way finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ConnLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let registry = Arc::new(Registry {
        open: Mutex::new(Open::default()),
        start: Instant::now(),
    });
    let graceful = GracefulShutdown::new();
    let reaper = {
        let registry = registry.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                registry.reap(IDLE_TIMEOUT);
            }
        })
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors (EMFILE, ENFILE): make room; any
                    // other failure is the one connection's.
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        registry.shed_one();
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    continue;
                }
            },
        };
        if registry.len() >= limits.max {
            registry.shed_one();
        }
        let _ = stream.set_nodelay(true);
        spawn_conn(&registry, &graceful, &router, tls.clone(), stream);
    }
    drop(listener);
    reaper.abort();
    graceful.shutdown().await;
    Ok(())
}

/// Serves one connection on its own task, registered while it lives
/// (after its TLS handshake, which must end within [`HEADER_TIMEOUT`]).
fn spawn_conn(
    registry: &Arc<Registry>,
    graceful: &GracefulShutdown,
    router: &Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stream: tokio::net::TcpStream,
) {
    let mut open = registry.open.lock();
    let id = open.next;
    open.next += 1;
    let stats = Arc::new(Stats::default());
    stats.last.store(registry.now(), Ordering::Release);
    let service = {
        let (stats, registry, router) = (stats.clone(), registry.clone(), router.clone());
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            stats.busy.fetch_add(1, Ordering::AcqRel);
            stats.last.store(registry.now(), Ordering::Release);
            let (stats, registry) = (stats.clone(), registry.clone());
            let mut router = router.clone();
            async move {
                let resp = router.call(req).await;
                stats.last.store(registry.now(), Ordering::Release);
                stats.busy.fetch_sub(1, Ordering::AcqRel);
                resp
            }
        })
    };
    let watcher = graceful.watcher();
    let done = registry.clone();
    // Takes the registry's lock when it ends: not before it is entered.
    let task = tokio::spawn(async move {
        let http = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .clone();
        match tls {
            None => {
                let conn = http.serve_connection(TokioIo::new(stream), service);
                let _ = watcher.watch(conn).await;
            }
            Some(acceptor) => {
                if let Ok(Ok(stream)) =
                    tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await
                {
                    let conn = http.serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn).await;
                }
            }
        }
        done.open.lock().conns.remove(&id);
    });
    open.conns.insert(
        id,
        Conn {
            stats,
            abort: task.abort_handle(),
        },
    );
}
