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
use std::path::{Path, PathBuf};
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
                        let ev = SandboxEvent::from_agent(id.clone(), event);
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

/// A path that opens `fd` through the server's own descriptor table: valid as long as the
/// descriptor is open, and immune to pid reuse of whatever process it refers to.
pub fn own_fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_raw_fd()
    ))
}

/// Replace `/etc/resolv.conf` inside the sandbox whose init is `pid` (pinned by `pidfd`),
/// resolving `etc` inside the sandbox's root without following any symlink, and creating the
/// file afresh (`O_EXCL`), owned by the sandbox's root.
fn write_resolv_conf(pid: i32, pidfd: &OwnedFd, content: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let root_path =
        std::ffi::CString::new(format!("/proc/{pid}/root")).map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated path; the returned fd is owned below.
    let root = unsafe {
        libc::open(
            root_path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if root < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `root` was just opened and is owned by nobody else.
    let root = unsafe { OwnedFd::from_raw_fd(root) };
    // The pid could have been reused before the open; the pidfd still names our init only
    // while it lives, so a successful signal 0 after the open proves `root` is its root.
    // SAFETY: pidfd_send_signal with signal 0 and a NULL siginfo only checks the target.
    let alive = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if alive != 0 {
        return Err(io::Error::last_os_error());
    }
    // The sandbox's filesystems belong to its user namespace, where host uid 0 is unmapped
    // (creating a file as it fails with EOVERFLOW): act as the sandbox's root on this thread.
    let _ids = FsIds::become_id(cella_core::driver::SANDBOX_ID_BASE)?;
    /// `struct open_how` of openat2(2) (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads `how` (valid, with its exact size) and the NUL-terminated path.
    let etc = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c"etc".as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if etc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `etc` is a new descriptor owned by nobody else.
    let etc = unsafe { OwnedFd::from_raw_fd(etc as i32) };
    // SAFETY: unlinkat on a directory fd and a NUL-terminated name.
    if unsafe { libc::unlinkat(etc.as_raw_fd(), c"resolv.conf".as_ptr(), 0) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
    }
    // SAFETY: openat with O_CREAT|O_EXCL (never follows a symlink) and a NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            etc.as_raw_fd(),
            c"resolv.conf".as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    (&file).write_all(content)
}

/// Copy the overlay's upper directory under `disk_root` into the existing, empty `dest`, as
/// it is on disk: owners (the sandbox ID range), modes, xattrs (`user.overlay.*` opaque
/// markers), whiteouts (0/0 character devices), hard links, symlinks as symlinks, holes. The
/// result is a valid overlay lower layer. `cp` runs with the disk root as its working
/// directory, so no path of the sandbox's disk is ever resolved from the host's root.
fn copy_upper(disk_root: &OwnedFd, dest: &Path) -> Result<(), DriverError> {
    use std::os::unix::process::CommandExt;
    let fd = disk_root.as_raw_fd();
    let mut cmd = std::process::Command::new("cp");
    cmd.args(["-a", "--reflink=auto", "--", "upper/."])
        .arg(dest)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only calls fchdir, which
    // is async-signal-safe, on a descriptor the parent keeps open for the whole call.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fchdir(fd) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().map_err(|source| DriverError::Io {
        context: "running cp for a snapshot".into(),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    let err: String = String::from_utf8_lossy(&out.stderr)
        .chars()
        .take(2000)
        .collect();
    Err(DriverError::Setup(format!(
        "copying the sandbox's files failed ({}): {}",
        out.status,
        err.trim()
    )))
}

/// The calling thread's filesystem uid/gid set to `id` until dropped (then back to 0).
/// setfsuid/setfsgid are per-thread syscalls, so other threads are unaffected.
struct FsIds;

impl FsIds {
    fn become_id(id: u32) -> io::Result<FsIds> {
        // SAFETY: setfsgid/setfsuid take plain integers and only change this thread's ids.
        unsafe {
            libc::syscall(libc::SYS_setfsgid, id);
            libc::syscall(libc::SYS_setfsuid, id);
        }
        // SAFETY: as above; -1 is the documented "query only" value.
        let now = unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) };
        if now != i64::from(id) {
            drop(FsIds);
            return Err(io::Error::other("could not switch the filesystem uid"));
        }
        Ok(FsIds)
    }
}

impl Drop for FsIds {
    fn drop(&mut self) {
        // SAFETY: restores this thread's filesystem ids to root.
        unsafe {
            libc::syscall(libc::SYS_setfsuid, 0u32);
            libc::syscall(libc::SYS_setfsgid, 0u32);
        }
    }
}

/// How the sandbox's init ended, if it does within `wait` (`None` otherwise): lets a failed
/// start name how its agent or VMM died.
pub async fn exit_within(
    exit_rx: &watch::Receiver<Option<ExitInfo>>,
    wait: Duration,
) -> Option<ExitInfo> {
    let mut rx = exit_rx.clone();
    tokio::time::timeout(wait, async move {
        rx.wait_for(|v| v.is_some())
            .await
            .ok()
            .and_then(|v| v.clone())
    })
    .await
    .ok()
    .flatten()
}

/// A freezer error as the driver seam reports it: no freezer on this host is "unavailable".
pub fn freeze_error(id: &str, e: crate::cgroup::CgroupError) -> DriverError {
    match e {
        crate::cgroup::CgroupError::NoFreezer { .. } => DriverError::Unavailable(e.to_string()),
        other => DriverError::Pause(format!("freezing sandbox {id}: {other}")),
    }
}

/// Freeze sandbox `id`'s cgroups until the kernel reports them frozen (bounded): the pause of
/// both drivers (a jail's processes, a microVM's VMM).
pub async fn freeze(cgroups: Arc<Cgroups>, id: &str) -> Result<(), DriverError> {
    let owned = id.to_string();
    tokio::task::spawn_blocking(move || cgroups.freeze(&owned, crate::PAUSE_DEADLINE))
        .await
        .map_err(|e| DriverError::Pause(format!("freeze task failed: {e}")))?
        .map_err(|e| freeze_error(id, e))
}

/// Thaw sandbox `id`'s cgroups (resume of both drivers).
pub async fn thaw(cgroups: Arc<Cgroups>, id: &str) -> Result<(), DriverError> {
    let owned = id.to_string();
    tokio::task::spawn_blocking(move || cgroups.thaw(&owned))
        .await
        .map_err(|e| DriverError::Pause(format!("thaw task failed: {e}")))?
        .map_err(|e| DriverError::Pause(format!("thawing sandbox {id}: {e}")))
}

/// State shared by the handle and its teardown.
pub struct JailSandbox {
    pub(crate) id: String,
    /// Host pid of the init (only used together with `pidfd`, which pins it).
    pub(crate) pid: i32,
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
    /// The host's process audit, which follows this sandbox until teardown.
    pub(crate) procwatch: Option<Arc<crate::procwatch::ProcWatch>>,
    /// The host's file audit, which holds this sandbox's disk root until teardown.
    pub(crate) fswatch: Option<Arc<crate::fswatch::FsWatch>>,
    /// The disk's root (upper and work directories), for snapshots; dropped when the init
    /// exits, because it keeps the disk alive.
    pub(crate) disk_root: Mutex<Option<Arc<OwnedFd>>>,
    /// Frozen by [`SandboxHandle::pause`] (a snapshot then leaves it frozen).
    pub(crate) paused: AtomicBool,
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
    /// Let go of the disk root (teardown waits for the disk, which it keeps alive).
    pub(crate) fn release_disk_root(&self) {
        if let Ok(mut r) = self.disk_root.lock() {
            r.take();
        }
    }

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
        if let Some(w) = &self.procwatch {
            w.unwatch(&self.id);
        }
        // Before waiting for the disk's release: the audit's and the snapshots' root fds keep
        // it alive.
        if let Some(w) = &self.fswatch {
            w.unwatch(&self.id);
        }
        self.release_disk_root();
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

    fn netns_path(&self) -> Option<PathBuf> {
        let ns = self.netns.lock().ok()?.clone()?;
        Some(own_fd_path(ns.as_ref()))
    }

    async fn set_nameserver(&self, nameserver: Ipv4Addr) -> Result<(), DriverError> {
        let pid = self.pid;
        let pidfd = self.pidfd.clone();
        let content = format!(
            "# Written by cella: the host-side resolver of this sandbox.\nnameserver {nameserver}\n"
        );
        tokio::task::spawn_blocking(move || write_resolv_conf(pid, &pidfd, content.as_bytes()))
            .await
            .map_err(|e| DriverError::Setup(format!("resolver task failed: {e}")))?
            .map_err(|source| DriverError::Io {
                context: "writing the sandbox's /etc/resolv.conf".into(),
                source,
            })
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
        freeze(self.cgroups.clone(), &self.id).await?;
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn resume(&self) -> Result<(), DriverError> {
        thaw(self.cgroups.clone(), &self.id).await?;
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    async fn snapshot_filesystem(&self, dest: &Path) -> Result<(), DriverError> {
        if self.destroying.load(Ordering::SeqCst) {
            return Err(DriverError::Setup(format!(
                "sandbox {} is being destroyed",
                self.id
            )));
        }
        let root = self
            .disk_root
            .lock()
            .map_err(|_| DriverError::Setup("sandbox state poisoned".into()))?
            .clone()
            .ok_or_else(|| {
                DriverError::Unavailable(format!("sandbox {}'s disk is not reachable", self.id))
            })?;
        let was_paused = self.paused.load(Ordering::SeqCst);
        if !was_paused {
            freeze(self.cgroups.clone(), &self.id).await?;
        }
        let dest = dest.to_path_buf();
        let copied = tokio::task::spawn_blocking(move || copy_upper(&root, &dest))
            .await
            .map_err(|e| DriverError::Setup(format!("snapshot task failed: {e}")))
            .and_then(|r| r);
        if !was_paused {
            thaw(self.cgroups.clone(), &self.id).await?;
        }
        copied
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
