//! The zombie reaper: the only place in the agent that calls `waitpid`.
//!
//! As PID 1 of a sandbox the agent inherits every orphan, so it must reap with
//! `waitpid(-1, WNOHANG)` whenever SIGCHLD arrives. That rules out `tokio::process` and
//! `std::process::Child::wait` (they would race with us for the same exit statuses). Instead,
//! code that starts a process [`Reaper::register`]s its PID and gets the status through a
//! oneshot channel. A child can exit before its PID is registered; such statuses are parked in
//! a small bounded map that registration checks first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

/// How many unclaimed exit statuses are kept (orphans' statuses are never claimed).
const MAX_UNCLAIMED: usize = 1024;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// Decode a raw `waitpid` status.
    pub fn from_raw(status: i32) -> Self {
        if libc::WIFEXITED(status) {
            ExitStatus {
                code: Some(libc::WEXITSTATUS(status)),
                signal: None,
            }
        } else if libc::WIFSIGNALED(status) {
            ExitStatus {
                code: None,
                signal: Some(libc::WTERMSIG(status)),
            }
        } else {
            ExitStatus {
                code: None,
                signal: None,
            }
        }
    }

    /// Exit code the way Go reports it (-1 when killed by a signal).
    pub fn exit_code(&self) -> i32 {
        self.code.unwrap_or(-1)
    }

    /// Exit code for the audit log (negative signal number when killed).
    pub fn audit_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => -s,
            (None, None) => -1,
        }
    }
}

#[derive(Default)]
struct Inner {
    waiters: HashMap<i32, oneshot::Sender<ExitStatus>>,
    unclaimed: HashMap<i32, ExitStatus>,
    order: VecDeque<i32>,
}

/// Dispatches exit statuses to whoever registered for them.
#[derive(Default)]
pub struct Reaper {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper").finish_non_exhaustive()
    }
}

impl Reaper {
    /// A reaper with no registrations.
    pub fn new() -> Arc<Self> {
        Arc::new(Reaper::default())
    }

    /// Ask for the exit status of `pid`.
    pub fn register(&self, pid: i32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(status) = inner.unclaimed.remove(&pid) {
            inner.order.retain(|p| *p != pid);
            let _ = tx.send(status);
        } else {
            inner.waiters.insert(pid, tx);
        }
        rx
    }

    fn dispatch(&self, pid: i32, status: ExitStatus) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = inner.waiters.remove(&pid) {
            let _ = tx.send(status);
            return;
        }
        inner.unclaimed.insert(pid, status);
        inner.order.push_back(pid);
        while inner.order.len() > MAX_UNCLAIMED {
            if let Some(old) = inner.order.pop_front() {
                inner.unclaimed.remove(&old);
            }
        }
    }

    /// Reap every exited child right now.
    pub fn reap_all(&self) {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid only writes the status integer we pass a valid pointer to.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            self.dispatch(pid, ExitStatus::from_raw(status));
        }
    }

    /// Reap on every SIGCHLD, plus a slow periodic sweep in case a signal was coalesced
    /// before the handler was installed. Runs forever.
    pub async fn run(self: Arc<Self>) {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("cannot watch SIGCHLD, falling back to polling: {e}");
                None
            }
        };
        let mut sweep = tokio::time::interval(Duration::from_millis(if sigchld.is_some() {
            2000
        } else {
            50
        }));
        loop {
            match sigchld.as_mut() {
                Some(s) => {
                    tokio::select! {
                        _ = s.recv() => {}
                        _ = sweep.tick() => {}
                    }
                }
                None => {
                    sweep.tick().await;
                }
            }
            self.reap_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_exit_is_parked_until_registered() {
        let r = Reaper::default();
        r.dispatch(
            10,
            ExitStatus {
                code: Some(3),
                signal: None,
            },
        );
        let mut rx = r.register(10);
        assert_eq!(rx.try_recv().map(|s| s.code), Ok(Some(3)));
    }

    #[test]
    fn unclaimed_statuses_are_bounded() {
        let r = Reaper::default();
        for pid in 0..(MAX_UNCLAIMED as i32 + 10) {
            r.dispatch(
                pid,
                ExitStatus {
                    code: Some(0),
                    signal: None,
                },
            );
        }
        let inner = r.inner.lock().expect("lock");
        assert_eq!(inner.unclaimed.len(), MAX_UNCLAIMED);
        assert!(!inner.unclaimed.contains_key(&0), "oldest evicted");
    }

    #[test]
    fn raw_status_decoding() {
        let exited = ExitStatus::from_raw(2 << 8);
        assert_eq!((exited.code, exited.signal), (Some(2), None));
        assert_eq!(exited.exit_code(), 2);
        let killed = ExitStatus::from_raw(9);
        assert_eq!((killed.code, killed.signal), (None, Some(9)));
        assert_eq!(killed.exit_code(), -1);
        assert_eq!(killed.audit_code(), -9);
    }
}
