//! Starting one QEMU process, confined, and reading what it prints.
//!
//! Why each step of the child setup (between fork and exec, async-signal-safe calls only):
//! * join the VM's cgroups by writing `0` to pre-opened `cgroup.procs` descriptors, so every
//!   byte QEMU allocates is charged to the sandbox from its first instruction;
//! * `setsid`: a Ctrl-C on the server's terminal must not reach VMs; the server tears them down;
//! * `RLIMIT_CORE = 0`: a crashing VMM must not dump guest memory to disk;
//! * `PR_SET_THP_DISABLE`: guest RAM in transparent huge pages turns every touched 4 KiB into
//!   2 MiB of host memory, and free-page reporting works on the small pages;
//! * `PR_SET_NO_NEW_PRIVS` and dropping to a per-sandbox uid: QEMU runs unprivileged and can
//!   never regain privileges, even before its own `-sandbox` seccomp filter is installed;
//! * clear close-on-exec on exactly the descriptors QEMU is told about, nothing else leaks.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// The unprivileged identity QEMU runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User ID.
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Supplementary groups (e.g. the group of `/dev/kvm`).
    pub groups: Vec<u32>,
}

/// What to start.
#[derive(Debug)]
pub struct Launch {
    /// QEMU binary.
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Descriptors QEMU inherits (at the same numbers).
    pub inherit: Vec<RawFd>,
    /// `cgroup.procs` files opened for writing.
    pub cgroup_procs: Vec<std::fs::File>,
    /// Identity to drop to; `None` keeps the caller's (tests, or a server not running as root).
    pub identity: Option<Identity>,
}

/// A started VMM.
#[derive(Debug)]
pub struct Started {
    /// The child (to wait for).
    pub child: Child,
    /// A pidfd for race-free signalling.
    pub pidfd: OwnedFd,
    /// The read end of QEMU's stderr.
    pub stderr: Option<tokio::process::ChildStderr>,
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Open a pidfd for `pid` (a child not yet reaped).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open has no memory arguments; the result is a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// SIGKILL through a pidfd (a no-op error if the process is already reaped).
pub fn pidfd_kill(pidfd: &OwnedFd) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a null siginfo on a descriptor we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Start QEMU.
pub fn spawn(launch: Launch) -> io::Result<Started> {
    let mut cmd = Command::new(&launch.program);
    cmd.args(&launch.args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(false);
    let cgroup_fds: Vec<RawFd> = launch.cgroup_procs.iter().map(|f| f.as_raw_fd()).collect();
    let inherit = launch.inherit.clone();
    let identity = launch.identity.clone();
    let groups: Vec<libc::gid_t> = identity
        .as_ref()
        .map(|i| i.groups.clone())
        .unwrap_or_default();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls on values prepared before the fork (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            for fd in &cgroup_fds {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            check(libc::setsid())?;
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            check(libc::setrlimit(libc::RLIMIT_CORE, &no_core))?;
            check(libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            for fd in &inherit {
                check(libc::fcntl(*fd, libc::F_SETFD, 0))?;
            }
            if let Some(id) = &identity {
                check(libc::setgroups(groups.len(), groups.as_ptr()))?;
                check(libc::setresgid(id.gid, id.gid, id.gid))?;
                check(libc::setresuid(id.uid, id.uid, id.uid))?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("QEMU exited before it could be tracked"))?;
    let pidfd = match pidfd_open(pid) {
        Ok(p) => p,
        Err(e) => {
            let _ = child.start_kill();
            return Err(e);
        }
    };
    let stderr = child.stderr.take();
    Ok(Started {
        child,
        pidfd,
        stderr,
    })
}

/// The last bytes a hostile or chatty stream produced, bounded.
#[derive(Debug, Clone, Default)]
pub struct Tail {
    inner: Arc<Mutex<Vec<u8>>>,
}

/// How much of a console or stderr stream is kept for error messages.
const TAIL_BYTES: usize = 4096;
/// Longest line forwarded to the debug log.
const MAX_LOG_LINE: usize = 1024;

impl Tail {
    fn push(&self, data: &[u8]) {
        if let Ok(mut v) = self.inner.lock() {
            v.extend_from_slice(data);
            if v.len() > TAIL_BYTES {
                let cut = v.len() - TAIL_BYTES;
                v.drain(..cut);
            }
        }
    }

    /// The last kept line containing one of `needles`.
    pub fn last_matching(&self, needles: &[&str]) -> Option<String> {
        let text = String::from_utf8_lossy(&self.inner.lock().ok()?).into_owned();
        text.lines()
            .rev()
            .find(|l| needles.iter().any(|n| l.contains(n)))
            .map(|l| l.trim().to_string())
    }

    /// The kept text's last `lines` non-empty lines, joined with " | ".
    pub fn last_lines(&self, lines: usize) -> String {
        let text = match self.inner.lock() {
            Ok(v) => String::from_utf8_lossy(&v).into_owned(),
            Err(_) => return String::new(),
        };
        let kept: Vec<&str> = text
            .lines()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .collect();
        kept.iter()
            .skip(kept.len().saturating_sub(lines))
            .copied()
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

/// Read a stream until EOF, keeping its tail and logging its lines (debug level).
pub fn spawn_tail_reader<R: AsyncRead + Unpin + Send + 'static>(
    what: &'static str,
    id: String,
    stream: R,
    tail: Tail,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::with_capacity(256);
        loop {
            let buf = match reader.fill_buf().await {
                Ok([]) | Err(_) => return,
                Ok(b) => b,
            };
            let n = buf.len();
            tail.push(buf);
            for b in buf {
                if *b == b'\n' {
                    tracing::debug!(sandbox = %id, "{what}: {}", String::from_utf8_lossy(&line).trim_end());
                    line.clear();
                } else if line.len() < MAX_LOG_LINE {
                    line.push(*b);
                }
            }
            reader.consume(n);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end() {
        let t = Tail::default();
        t.push(b"first\nsecond\n");
        t.push(&vec![b'x'; TAIL_BYTES]);
        t.push(b"\nKernel panic - not syncing\n\n");
        let last = t.last_lines(2);
        assert!(last.ends_with("Kernel panic - not syncing"), "{last}");
        assert!(!last.contains("first"));
        assert_eq!(
            t.last_matching(&["panic"]).as_deref(),
            Some("Kernel panic - not syncing")
        );
        assert_eq!(t.last_matching(&["nothing"]), None);
        let t = Tail::default();
        t.push(b"a\nb\nc\n");
        assert_eq!(t.last_lines(2), "b | c");
    }

    #[tokio::test]
    async fn spawn_confines_and_passes_only_named_fds() {
        // A shell stands in for QEMU and reports its no_new_privs and THP flags and which of
        // two descriptors it inherited.
        let tmp = tempfile::tempdir().expect("tmp");
        let out = tmp.path().join("out");
        let (passed, _peer) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (kept, _peer2) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (p, k) = (passed.as_raw_fd(), kept.as_raw_fd());
        let script = format!(
            "{{ grep -q 'NoNewPrivs:[[:space:]]*1' /proc/self/status && echo nnp; \
               grep -q 'THP_enabled:[[:space:]]*0' /proc/self/status && echo nothp; \
               [ -e /proc/$$/fd/{p} ] && echo passed; [ -e /proc/$$/fd/{k} ] && echo leaked; \
               echo done; }} > {}",
            out.display()
        );
        let started = spawn(Launch {
            program: PathBuf::from("/bin/sh"),
            args: vec!["-c".into(), script],
            inherit: vec![p],
            cgroup_procs: Vec::new(),
            identity: None,
        })
        .expect("spawn");
        let mut child = started.child;
        let status = child.wait().await.expect("wait");
        assert!(status.success());
        let got = std::fs::read_to_string(&out).expect("read");
        assert!(got.contains("nnp"), "no_new_privs not set: {got:?}");
        assert!(got.contains("nothp"), "THP not disabled: {got:?}");
        assert!(got.contains("passed"), "named fd not inherited: {got:?}");
        assert!(!got.contains("leaked"), "unnamed fd leaked: {got:?}");
        assert!(got.contains("done"));
        // killing a reaped process through its pidfd is not an error
        pidfd_kill(&started.pidfd).expect("kill after exit");
    }
}
