//! A live jailed sandbox: the control channel, dialing into its netns, exit and teardown.
//!
//! Why a pidfd: the driver is the only reaper of the init it cloned, and a pidfd lets it
//! kill and wait without racing pid reuse, and wait asynchronously (the pidfd polls
//! readable when the process exits) without parking a thread per sandbox.
//!
//! Why dial through `setns`: the sandbox's netns has only `lo`, so there is no address the
//! host could route to. A blocking thread enters the netns, creates the socket there (a
//! socket stays in the netns it was created in), and returns to the host netns before doing
//! anything else; connecting then happens on the tokio reactor.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cella_api::Isolation;
use cella_core::driver::{
    DriverError, EventSink, ExitInfo, SandboxEvent, SandboxHandle, SandboxStats,
};
use cella_proto::control::{AgentEvent, MAX_EVENT_LINE};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cgroup::Cgroups;
use crate::disk::LoopRef;
use crate::spawn::{pidfd_kill, pidfd_reap};

/// How long destroy waits for the killed init to be reaped.
const REAP_DEADLINE: Duration = Duration::from_secs(10);

/// Longest agent log line forwarded to tracing.
const MAX_LOG_LINE: usize = 4096;

/// One line from a hostile byte stream, bounded.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line (without the newline) of at most the limit.
    Full,
    /// A line longer than the limit; its bytes were discarded.
    TooLong,
    /// End of stream.
    Eof,
}

/// Read one newline-terminated line into `buf` (cleared first, without the newline or a
/// trailing `\r`), keeping at most `limit` bytes in memory no matter what the peer sends.
/// Both drivers read their agents' control channels with it.
pub async fn read_line_bounded<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(Line::Eof);
        }
        let (chunk, used, done) = match avail.iter().position(|b| *b == b'\n') {
            Some(i) => (avail.get(..i).unwrap_or_default(), i + 1, true),
            None => (avail, avail.len(), false),
        };
        if !too_long {
            if buf.len() + chunk.len() > limit {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        r.consume(used);
        if done {
            // A tty-backed channel (a VM's virtio console) may end lines with "\r\n".
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(if too_long { Line::TooLong } else { Line::Full });
        }
    }
}

/// Describe how the init ended.
pub(crate) fn exit_reason(info: &libc::siginfo_t) -> String {
    // SAFETY: the siginfo came from waitid(WEXITED), so the SIGCHLD fields are set.
    let status = unsafe { info.si_status() };
    match info.si_code {
        libc::CLD_EXITED => format!("agent exited with status {status}"),
        libc::CLD_KILLED | libc::CLD_DUMPED => format!("agent killed by signal {status}"),
        other => format!("agent stopped (code {other}, status {status})"),
    }
}

/// Wait for the init to exit, reap it, publish why.
pub(crate) fn spawn_waiter(
    pidfd: Arc<OwnedFd>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
) -> io::Result<JoinHandle<()>> {
    // SAFETY: the AsyncFd owns a fresh duplicate of the pidfd; nothing else closes or
    // replaces that descriptor while it is registered.
    let afd = unsafe {
        AsyncFd::register_with_interest(pidfd.try_clone()?, tokio::io::Interest::READABLE)
    }
    .map_err(io::Error::from)?;
    Ok(tokio::spawn(async move {
        loop {
            let mut guard = match afd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    let _ = exit_tx.send(Some(ExitInfo {
                        reason: format!("lost track of the agent: {e}"),
                    }));
                    return;
                }
            };
            match pidfd_reap(pidfd.as_raw_fd(), true) {
                Ok(Some(info)) => {
                    let _ = exit_tx.send(Some(ExitInfo {
                        reason: exit_reason(&info),
                    }));
                    return;
                }
                Ok(None) => guard.clear_ready(),
                Err(e) => {
                    let _ = exit_tx.send(Some(ExitInfo {
                        reason: format!("lost track of the agent: {e}"),
                    }));
                    return;
                }
            }
        }
    }))
}

/// Forward the agent's control events to the sink until EOF.
pub(crate) fn spawn_event_reader(
    id: String,
    mut reader: BufReader<tokio::net::UnixStream>,
    sink: EventSink,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = Vec::with_capacity(256);
        loop {
            match read_line_bounded(&mut reader, &mut buf, MAX_EVENT_LINE).await {
                Ok(Line::Full) => match AgentEvent::parse_line(&buf) {
                    Some(event) => {
                        let ev = SandboxEvent {
                            sandbox_id: id.clone(),
                            event,
                        };
                        if sink.send(ev).is_err() {
                            // nobody listens any more; keep draining so the agent never blocks
                        }
                    }
                    None => tracing::debug!(sandbox = %id, "dropped a malformed control line"),
                },
                Ok(Line::TooLong) => {
                    tracing::debug!(sandbox = %id, "dropped an oversized control line")
                }
                Ok(Line::Eof) | Err(_) => return,
            }
        }
    })
}

/// Forward the agent's stdout/stderr to tracing (debug level) until EOF.
pub(crate) fn spawn_log_reader(id: String, log: OwnedFd) -> io::Result<JoinHandle<()>> {
    let file = std::fs::File::from(log);
    let rx = tokio::net::unix::pipe::Receiver::from_file(file)?;
    Ok(tokio::spawn(async move {
        let mut reader = BufReader::new(rx);
        let mut buf = Vec::with_capacity(256);
        loop {
            match read_line_bounded(&mut reader, &mut buf, MAX_LOG_LINE).await {
                Ok(Line::Full) => {
                    tracing::debug!(sandbox = %id, "agent: {}", String::from_utf8_lossy(&buf))
                }
                Ok(Line::TooLong) => tracing::debug!(sandbox = %id, "agent: <long line dropped>"),
                Ok(Line::Eof) | Err(_) => return,
            }
        }
    }))
}

/// Create a TCP socket inside the netns `netns`, restoring `host` before returning.
fn socket_in_netns(netns: &OwnedFd, host: &OwnedFd) -> io::Result<std::net::TcpStream> {
    // SAFETY: setns on a namespace descriptor we own; affects only this thread.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    let made = if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: fd was just created and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    // SAFETY: setns back to the host netns descriptor opened at driver start.
    if unsafe { libc::setns(host.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        // A pool thread left inside a sandbox's netns would connect later host traffic
        // into the sandbox: that must never happen, so stop the whole process.
        tracing::error!("cannot return to the host network namespace; aborting");
        std::process::abort();
    }
    made.map(std::net::TcpStream::from)
}

/// A freezer error as the driver seam reports it: no freezer on this host is "unavailable".
pub fn freeze_error(id: &str, e: crate::cgroup::CgroupError) -> DriverError {
    match e {
        crate::cgroup::CgroupError::NoFreezer { .. } => DriverError::Unavailable(e.to_string()),
        other => DriverError::Pause(format!("freezing sandbox {id}: {other}")),
    }
}

/// State shared by the handle and its teardown.
pub struct JailSandbox {
    pub(crate) id: String,
    pub(crate) pidfd: Arc<OwnedFd>,
    pub(crate) netns: Mutex<Option<Arc<OwnedFd>>>,
    pub(crate) host_netns: Arc<OwnedFd>,
    pub(crate) cgroups: Arc<Cgroups>,
    pub(crate) dir: PathBuf,
    pub(crate) disk: LoopRef,
    pub(crate) exit_rx: watch::Receiver<Option<ExitInfo>>,
    pub(crate) destroying: AtomicBool,
    pub(crate) destroyed: tokio::sync::Mutex<bool>,
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for JailSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JailSandbox")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl JailSandbox {
    /// Kill, reap, remove cgroups, wait for the disk's release, remove the directory. Shared
    /// by destroy and failed creates; idempotent.
    pub(crate) async fn teardown(&self) -> Result<(), DriverError> {
        // A frozen (paused) sandbox keeps SIGKILL pending until thawed (v1 freezer).
        if let Err(e) = self.cgroups.thaw(&self.id) {
            tracing::warn!(sandbox = %self.id, error = %e, "thawing before kill failed");
        }
        pidfd_kill(self.pidfd.as_raw_fd()).map_err(|source| DriverError::Io {
            context: format!("killing sandbox {}", self.id),
            source,
        })?;
        let mut rx = self.exit_rx.clone();
        let reaped = tokio::time::timeout(REAP_DEADLINE, async {
            rx.wait_for(|v| v.is_some()).await.is_ok()
        })
        .await;
        if reaped != Ok(true) {
            return Err(DriverError::Cleanup(format!(
                "sandbox {} init was not reaped within {REAP_DEADLINE:?}",
                self.id
            )));
        }
        if let Ok(mut tasks) = self.tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
        if let Ok(mut ns) = self.netns.lock() {
            ns.take();
        }
        let cgroups = self.cgroups.clone();
        let id = self.id.clone();
        let dir = self.dir.clone();
        let disk = self.disk.clone();
        tokio::task::spawn_blocking(move || -> Result<(), DriverError> {
            cgroups
                .remove(&id)
                .map_err(|e| DriverError::Cleanup(format!("cgroups of {id}: {e}")))?;
            // The init is reaped, so the mount namespace is gone and with it the last user
            // of the disk; the kernel detaches the loop device and frees the image.
            let released = crate::release_disk(&id, &disk);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(DriverError::Io {
                        context: format!("removing {}", dir.display()),
                        source,
                    });
                }
            }
            released
        })
        .await
        .map_err(|e| DriverError::Cleanup(format!("teardown task failed: {e}")))?
    }
}

#[async_trait]
impl SandboxHandle for JailSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn isolation(&self) -> Isolation {
        Isolation::Jail
    }

    async fn dial(&self, port: u16) -> io::Result<tokio::net::TcpStream> {
        let netns = self
            .netns
            .lock()
            .map_err(|_| io::Error::other("sandbox state poisoned"))?
            .clone()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "sandbox destroyed"))?;
        let host = self.host_netns.clone();
        let std_stream = tokio::task::spawn_blocking(move || socket_in_netns(&netns, &host))
            .await
            .map_err(io::Error::other)??;
        let socket = tokio::net::TcpSocket::from_std_stream(std_stream);
        socket
            .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .await
    }

    fn stats(&self) -> Result<SandboxStats, DriverError> {
        self.cgroups
            .stats(&self.id)
            .map_err(|e| DriverError::Setup(format!("reading cgroup stats of {}: {e}", self.id)))
    }

    async fn pause(&self) -> Result<(), DriverError> {
        if self.destroying.load(Ordering::SeqCst) {
            return Err(DriverError::Pause(format!(
                "sandbox {} is being destroyed",
                self.id
            )));
        }
        let cgroups = self.cgroups.clone();
        let id = self.id.clone();
        tokio::task::spawn_blocking(move || cgroups.freeze(&id, crate::PAUSE_DEADLINE))
            .await
            .map_err(|e| DriverError::Pause(format!("freeze task failed: {e}")))?
            .map_err(|e| freeze_error(&self.id, e))
    }

    async fn resume(&self) -> Result<(), DriverError> {
        let cgroups = self.cgroups.clone();
        let id = self.id.clone();
        tokio::task::spawn_blocking(move || cgroups.thaw(&id))
            .await
            .map_err(|e| DriverError::Pause(format!("thaw task failed: {e}")))?
            .map_err(|e| DriverError::Pause(format!("thawing sandbox {}: {e}", self.id)))
    }

    async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit_rx.clone();
        let info = rx
            .wait_for(|v| v.is_some())
            .await
            .ok()
            .and_then(|v| v.clone());
        // Resolves after destroy too (the trait's contract): a watcher must never be parked
        // forever on a sandbox that is gone.
        info.unwrap_or_else(|| ExitInfo {
            reason: "sandbox state dropped".into(),
        })
    }

    async fn destroy(&self) -> Result<(), DriverError> {
        self.destroying.store(true, Ordering::SeqCst);
        let mut done = self.destroyed.lock().await;
        if *done {
            return Ok(());
        }
        self.teardown().await?;
        *done = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], limit: usize) -> Vec<(Line, Vec<u8>)> {
        let mut r = BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        loop {
            let l = read_line_bounded(&mut r, &mut buf, limit)
                .await
                .expect("read");
            if l == Line::Eof {
                return out;
            }
            out.push((l, buf.clone()));
        }
    }

    #[tokio::test]
    async fn bounded_lines() {
        let got = lines(b"abc\n0123456789\nxy\n", 5).await;
        assert_eq!(
            got,
            vec![
                (Line::Full, b"abc".to_vec()),
                (Line::TooLong, Vec::new()),
                (Line::Full, b"xy".to_vec()),
            ]
        );
        // an unterminated tail is not delivered as a line
        assert!(lines(b"partial", 100).await.is_empty());
        // empty lines are lines
        assert_eq!(lines(b"\n", 5).await, vec![(Line::Full, Vec::new())]);
    }
}
