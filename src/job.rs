//! Background work: a progress counter and a handle to wait on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crate::error::{Error, Result};

/// Bytes done out of bytes to do, updated by a running capture or restore.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// `(done, total)` in bytes.
    pub fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn start(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    pub(crate) fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
}

/// A capture or restore running on its own thread.
pub struct Job<T> {
    thread: JoinHandle<Result<T>>,
    progress: Arc<Progress>,
}

impl<T: Send + 'static> Job<T> {
    /// Runs `work` on its own thread, then `then` with its outcome (also
    /// when `work` panicked, as an error).
    pub(crate) fn spawn<U: Send + 'static>(
        name: String,
        progress: Arc<Progress>,
        work: impl FnOnce() -> Result<U> + Send + 'static,
        then: impl FnOnce(Result<U>) -> Result<T> + Send + 'static,
    ) -> Result<Self> {
        // A panic becomes an error, so the caller's bookkeeping after the
        // work (marking a snapshot failed, releasing a server) still runs.
        let guarded = move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .unwrap_or_else(|p| {
                    let what = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(Error::Internal(format!("{what} (a panic)")))
                });
            then(outcome)
        };
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(guarded)
            .map_err(|e| Error::Internal(format!("cannot start a thread: {e}")))?;
        Ok(Job { thread, progress })
    }

    /// `(done, total)` bytes so far.
    pub fn progress(&self) -> (u64, u64) {
        self.progress.get()
    }

    /// The shared progress counter, for a progress bar on another thread.
    pub fn progress_handle(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// True once the work has ended (successfully or not).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Blocks until the work ends and returns its outcome.
    pub fn wait(self) -> Result<T> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("a background job panicked".into())))
    }
}
