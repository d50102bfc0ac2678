//! fork/exec of sandbox commands.
//!
//! We fork by hand rather than use `std::process::Command` because the reaper owns `waitpid`
//! (std would `waitpid` an exec-failed child itself and panic if the reaper got there first),
//! and because the child needs things std does not offer together: a new session with a
//! controlling PTY, supplementary groups from our own `/etc/group` parsing, and a reset of the
//! signal state the agent's runtime installed (SIGPIPE is ignored by Rust programs, which exec
//! would otherwise pass on to every command).
//!
//! Everything the child needs is allocated before `fork`; between `fork` and `execve` the child
//! only makes async-signal-safe system calls. If a step fails, the child writes the step and
//! errno to a close-on-exec pipe and exits with 127; the parent reads that pipe to tell a
//! successful exec (EOF) from a failure.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// How the child's standard streams are set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdioMode {
    /// Pipes for stdout and stderr; a pipe for stdin when `stdin`, else `/dev/null`.
    Pipes {
        /// Whether to give the child a writable stdin pipe.
        stdin: bool,
    },
    /// A new PTY of this size for all three streams.
    Pty {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// These descriptors (kept open by the caller until `spawn` returns) as 0, 1 and 2; the
    /// parent gets no ends (the sudo broker passes a client's own streams through).
    Given {
        /// Becomes stdin.
        stdin: RawFd,
        /// Becomes stdout.
        stdout: RawFd,
        /// Becomes stderr.
        stderr: RawFd,
    },
}

/// Credentials to switch to in the child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User ID.
    pub uid: u32,
    /// Primary group ID.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Everything needed to start one command.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// Absolute path of the executable.
    pub program: String,
    /// `argv` (argv\[0\] included).
    pub argv: Vec<String>,
    /// `KEY=VALUE` environment.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// Credentials to switch to (`None`: keep the agent's).
    pub creds: Option<Credentials>,
    /// Stream setup.
    pub stdio: StdioMode,
}

/// A started child and the parent's ends of its streams.
#[derive(Debug)]
pub struct Spawned {
    /// PID (also its process group and session ID).
    pub pid: i32,
    /// Write end of stdin.
    pub stdin: Option<OwnedFd>,
    /// Read end of stdout.
    pub stdout: Option<OwnedFd>,
    /// Read end of stderr.
    pub stderr: Option<OwnedFd>,
    /// PTY master.
    pub pty: Option<OwnedFd>,
}

/// Why a command could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// An argument contained a NUL byte.
    #[error("argument, environment or path contains a NUL byte")]
    Nul,
    /// Setting up pipes, the PTY or forking failed.
    #[error("cannot {step}")]
    Setup {
        /// What failed.
        step: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The child failed before or at exec.
    #[error("{step} failed")]
    Child {
        /// What failed in the child.
        step: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

const CHILD_STEPS: [&str; 8] = [
    "exec",
    "chdir to the working directory",
    "setgroups",
    "setgid",
    "setuid",
    "set up stdio",
    "setsid",
    "set the controlling terminal",
];

fn cstr(s: &str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::Nul)
}

fn last_err(step: &'static str) -> SpawnError {
    SpawnError::Setup {
        step,
        source: std::io::Error::last_os_error(),
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(last_err("create a pipe"));
    }
    // SAFETY: both fds were just returned by pipe2 and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn open_pty(cols: u16, rows: u16) -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let mut master: RawFd = -1;
    let mut slave: RawFd = -1;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds; name and termios may be null, winsize points to a local.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc != 0 {
        return Err(last_err("open a PTY"));
    }
    // SAFETY: both fds were just returned by openpty and are owned by nobody else.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&m, &s] {
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((m, s))
}

/// A close-on-exec duplicate of a descriptor the caller keeps open.
fn dup_cloexec(fd: RawFd) -> Result<OwnedFd, SpawnError> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor; failure is checked.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(last_err("duplicate a standard stream"));
    }
    // SAFETY: `new` was just returned by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn open_dev_null() -> Result<OwnedFd, SpawnError> {
    // SAFETY: the path is a valid NUL-terminated string.
    let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(last_err("open /dev/null"));
    }
    // SAFETY: fd was just returned by open.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Set `O_NONBLOCK` on an fd (the parent's ends are driven by the async runtime).
pub fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fcntl on an fd we own.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Report a failed step to the parent and exit. Async-signal-safe.
fn child_fail(err_fd: RawFd, step: usize) -> ! {
    // SAFETY: errno location is valid in the child; write and _exit are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&(step as u32).to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(err_fd, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

/// Start a command. Blocking (briefly: until the child has exec'd), so call it from a blocking
/// context. The caller must have registered nothing yet; it registers the returned PID with the
/// reaper (an early exit is parked there).
pub fn spawn(spec: &SpawnSpec) -> Result<Spawned, SpawnError> {
    let program = cstr(&spec.program)?;
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = spec.env.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let cwd = cstr(&spec.cwd)?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let groups: Vec<libc::gid_t> = spec
        .creds
        .as_ref()
        .map(|c| c.groups.clone())
        .unwrap_or_default();

    // Child-side fds for 0, 1, 2 and the parent's ends.
    let mut parent = Spawned {
        pid: -1,
        stdin: None,
        stdout: None,
        stderr: None,
        pty: None,
    };
    let (child_in, child_out, child_err, ctty): (OwnedFd, OwnedFd, OwnedFd, bool) = match spec.stdio
    {
        StdioMode::Pipes { stdin } => {
            let cin = if stdin {
                let (r, w) = pipe()?;
                parent.stdin = Some(w);
                r
            } else {
                open_dev_null()?
            };
            let (or, ow) = pipe()?;
            let (er, ew) = pipe()?;
            parent.stdout = Some(or);
            parent.stderr = Some(er);
            (cin, ow, ew, false)
        }
        StdioMode::Pty { cols, rows } => {
            let (m, s) = open_pty(cols, rows)?;
            let s2 = s.try_clone().map_err(|source| SpawnError::Setup {
                step: "duplicate the PTY",
                source,
            })?;
            let s3 = s.try_clone().map_err(|source| SpawnError::Setup {
                step: "duplicate the PTY",
                source,
            })?;
            parent.pty = Some(m);
            (s, s2, s3, true)
        }
        StdioMode::Given {
            stdin,
            stdout,
            stderr,
        } => (
            dup_cloexec(stdin)?,
            dup_cloexec(stdout)?,
            dup_cloexec(stderr)?,
            false,
        ),
    };
    let (err_r, err_w) = pipe()?;
    let (fd_in, fd_out, fd_err, fd_errpipe) = (
        child_in.as_raw_fd(),
        child_out.as_raw_fd(),
        child_err.as_raw_fd(),
        err_w.as_raw_fd(),
    );
    let creds = spec.creds.clone();

    // SAFETY: fork is called with all allocations done; the child branch below only makes
    // async-signal-safe calls on memory prepared before the fork, then execs or _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_err("fork"));
    }
    if pid == 0 {
        // SAFETY: child after fork. Only async-signal-safe libc calls, no allocation.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            // Rank every process we start above the agent for the OOM killer (raising needs
            // no privilege; do it before dropping to the user). Best effort.
            let oom = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if oom >= 0 {
                libc::write(oom, b"1000".as_ptr().cast(), 4);
                libc::close(oom);
            }
            if libc::setsid() < 0 {
                child_fail(fd_errpipe, 6);
            }
            if ctty && libc::ioctl(fd_in, libc::TIOCSCTTY as _, 0) < 0 {
                child_fail(fd_errpipe, 7);
            }
            if libc::dup2(fd_in, 0) < 0 || libc::dup2(fd_out, 1) < 0 || libc::dup2(fd_err, 2) < 0 {
                child_fail(fd_errpipe, 5);
            }
            if let Some(c) = creds.as_ref() {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0 {
                    child_fail(fd_errpipe, 2);
                }
                if libc::setgid(c.gid) < 0 {
                    child_fail(fd_errpipe, 3);
                }
                if libc::setuid(c.uid) < 0 {
                    child_fail(fd_errpipe, 4);
                }
            }
            if libc::chdir(cwd.as_ptr()) < 0 {
                child_fail(fd_errpipe, 1);
            }
            libc::execve(program.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
            child_fail(fd_errpipe, 0);
        }
    }

    // Parent.
    drop((child_in, child_out, child_err, err_w));
    parent.pid = pid;
    let mut buf = [0u8; 8];
    let mut got = 0usize;
    loop {
        // SAFETY: reading into a local buffer from an fd we own.
        let n = unsafe {
            libc::read(
                err_r.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
            )
        };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if n == 0 {
            break;
        }
        got += n as usize;
        if got == buf.len() {
            break;
        }
    }
    if got == buf.len() {
        let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
        return Err(SpawnError::Child {
            step: CHILD_STEPS.get(step).copied().unwrap_or("child setup"),
            source: std::io::Error::from_raw_os_error(errno),
        });
    }
    for fd in [&parent.stdin, &parent.stdout, &parent.stderr, &parent.pty]
        .into_iter()
        .flatten()
    {
        set_nonblocking(fd).map_err(|source| SpawnError::Setup {
            step: "make a stream non-blocking",
            source,
        })?;
    }
    Ok(parent)
}

/// Set a PTY's window size.
pub fn resize_pty(master: RawFd, cols: u16, rows: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer we pass.
    let rc = unsafe { libc::ioctl(master, libc::TIOCSWINSZ as _, &ws) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Send a signal to a process group, falling back to the process itself.
pub fn signal_group(pid: i32, sig: i32) -> std::io::Result<()> {
    if pid <= 0 {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: kill has no memory effects.
    if unsafe { libc::kill(-pid, sig) } == 0 {
        return Ok(());
    }
    // SAFETY: kill has no memory effects.
    if unsafe { libc::kill(pid, sig) } == 0 {
        return Ok(());
    }
    Err(std::io::Error::last_os_error())
}

/// Find an executable: names with a `/` are taken as is, others searched in `path`.
pub fn find_executable(cmd: &str, path: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    if cmd.is_empty() {
        return None;
    }
    if cmd.contains('/') {
        return Some(cmd.to_string());
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{}/{cmd}", d.trim_end_matches('/')))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_lookup() {
        assert_eq!(
            find_executable("sh", "/nonexistent:/bin:/usr/bin").as_deref(),
            Some("/bin/sh")
        );
        assert_eq!(find_executable("/x/y", "").as_deref(), Some("/x/y"));
        assert_eq!(find_executable("definitely-not-a-command", "/bin"), None);
        assert_eq!(find_executable("", "/bin"), None);
    }

    #[test]
    fn exec_failure_is_reported_not_panicked() {
        let spec = SpawnSpec {
            program: "/nonexistent/binary".into(),
            argv: vec!["x".into()],
            env: vec![],
            cwd: "/".into(),
            creds: None,
            stdio: StdioMode::Pipes { stdin: false },
        };
        match spawn(&spec) {
            Err(SpawnError::Child { step, source }) => {
                assert_eq!(step, "exec");
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("expected exec failure, got {other:?}"),
        }
        let bad_cwd = SpawnSpec {
            program: "/bin/true".into(),
            cwd: "/nonexistent-dir".into(),
            ..spec
        };
        assert!(matches!(
            spawn(&bad_cwd),
            Err(SpawnError::Child {
                step: "chdir to the working directory",
                ..
            })
        ));
        assert!(matches!(
            spawn(&SpawnSpec {
                argv: vec!["a\0b".into()],
                ..bad_cwd
            }),
            Err(SpawnError::Nul)
        ));
    }
}
