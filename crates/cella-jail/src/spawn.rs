//! Starting one sandbox: `clone3` into fresh namespaces, build its root, exec the agent.
//!
//! Why it is written this way: the server is a multithreaded tokio process, and `clone3`
//! without `CLONE_VM` copies only the calling thread. Locks held by other threads (the
//! allocator's among them) stay locked forever in the child, so between `clone3` and `execve`
//! the child runs only raw syscalls on data the parent prepared: C strings, mount options,
//! the seccomp programs, the Landlock attributes and every file descriptor. Nothing in
//! [`child_main`] allocates, locks or panics.
//!
//! ```text
//!  parent (blocking thread)                      child (new user/pid/mnt/net/ipc/uts ns)
//!  ───────────────────────                       ───────────────────────────────────────
//!  (caller: ext4 image → loop → fsmount, detached; see crate::disk)
//!  socketpair, pipes, /dev/null, cgroup fd
//!  clone3(NEW*, PIDFD [, INTO_CGROUP]) ───────▶  close parent ends, move fds ≥ 10
//!  uid_map/gid_map "0 100000 65536"              read(sync) … blocks
//!  v1: pid → cella/<id>/cgroup.procs
//!  open /proc/<pid>/ns/net
//!  write(sync) ───────────────────────────────▶  setgroups/setresgid/setresuid(0)
//!                                                unshare(CGROUP); MS_PRIVATE on /
//!                                                move_mount(disk) onto data_dir/<id>
//!                                                overlay(lower=layers…:rootfs, upper/work on disk)
//!                                                proc, /dev (tmpfs + binds + devpts + shm),
//!                                                /.cella/agent (ro bind), sysfs (best effort)
//!                                                pivot_root + detach old root
//!                                                hostname, lo up, no_new_privs, caps,
//!                                                Landlock, fds 0-3, signals, seccomp
//!  read(err) ◀── EOF on exec / (step, errno) ──  execve("/.cella/agent --control-fd 3")
//! ```
//!
//! Every mount is attached inside the sandbox's own mount namespace, after `MS_PRIVATE`: the
//! host never sees any of them and the kernel tears all of them down with the namespace. The
//! ext4 disk under the overlay is the disk quota (writes fail with `ENOSPC` at `disk_mb`); it
//! is built by the parent as a detached mount because ext4 cannot be mounted from inside a
//! user namespace.
//!
//! The agent keeps the server's `oom_score_adj` (normally 0) and gives every process it
//! starts 1000, so when the sandbox runs out of memory the cgroup's OOM killer picks one of
//! the user's processes, not pid 1, whose death would end the whole sandbox. Raising the
//! score needs no privilege. Lowering the agent's instead (-1000) would need
//! `CAP_SYS_RESOURCE`, which a containerised server often lacks, and would let every
//! process in the sandbox lower itself to -1000 too (the floor is inherited) and so become
//! unkillable, leaving the cgroup's OOM killer without a victim.

use std::ffi::{CString, c_int, c_ulong};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use cella_core::driver::{Limits, SANDBOX_ID_BASE, SANDBOX_ID_COUNT};

use crate::cgroup::{CgroupError, Cgroups};
use crate::landlock::{LandlockPlan, PathBeneathAttr, RULE_PATH_BENEATH};
use crate::seccomp::SeccompPrograms;

/// How long the child may take from `clone3` to `execve`.
const EXEC_DEADLINE: Duration = Duration::from_secs(10);

/// PATH of the agent (its only environment variable).
const AGENT_PATH_ENV: &std::ffi::CStr =
    c"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `MOVE_MOUNT_F_EMPTY_PATH`: `move_mount` takes the source from the descriptor itself.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// `CLONE_INTO_CGROUP` (libc's constant is deprecated for overflowing `c_int`).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Where the agent binary appears inside the sandbox.
pub const AGENT_IN_SANDBOX: &str = "/.cella/agent";

/// The template's `sudo`, replaced by the agent's sudo shim when present.
pub const SUDO_IN_SANDBOX: &std::ffi::CStr = c"/usr/bin/sudo";

/// Capabilities removed from the bounding set before exec: the agent and everything it
/// starts can never hold them, even as root inside the sandbox. `CAP_NET_ADMIN` goes too:
/// the child brings `lo` up itself, and without it the sandbox cannot reach netfilter or
/// create interfaces (a large, exploit-prone kernel surface). `CAP_SYS_PTRACE` stays (see
/// the seccomp module).
const DROPPED_CAPS: [c_int; 20] = [
    12, // CAP_NET_ADMIN
    16, // CAP_SYS_MODULE
    17, // CAP_SYS_RAWIO
    20, // CAP_SYS_PACCT
    21, // CAP_SYS_ADMIN
    22, // CAP_SYS_BOOT
    25, // CAP_SYS_TIME
    26, // CAP_SYS_TTY_CONFIG
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    30, // CAP_AUDIT_CONTROL
    32, // CAP_MAC_OVERRIDE
    33, // CAP_MAC_ADMIN
    34, // CAP_SYSLOG
    35, // CAP_WAKE_ALARM
    36, // CAP_BLOCK_SUSPEND
    37, // CAP_AUDIT_READ
    38, // CAP_PERFMON
    39, // CAP_BPF
    40, // CAP_CHECKPOINT_RESTORE
];

/// Steps of the child's setup, reported with errno through the error pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Step {
    Fds = 1,
    WaitParent,
    SetGroups,
    SetGid,
    SetUid,
    CgroupNs,
    PrivateMounts,
    WritableLayer,
    LayerDirs,
    Overlay,
    EnterRoot,
    Mountpoints,
    Proc,
    Dev,
    DevNodes,
    Devpts,
    DevLinks,
    Shm,
    AgentMountpoint,
    AgentBind,
    AgentReadonly,
    PivotRoot,
    DetachOldRoot,
    SudoShim,
    Hostname,
    Loopback,
    NoNewPrivs,
    Capabilities,
    Landlock,
    Seccomp,
    Exec,
}

/// Human names of [`Step`], indexed by its code.
const STEP_NAMES: [&str; 32] = [
    "unknown",
    "moving file descriptors",
    "waiting for the parent",
    "setgroups",
    "setresgid(0)",
    "setresuid(0)",
    "cgroup namespace",
    "making mounts private",
    "attaching the writable layer (ext4 disk)",
    "creating upper/work directories",
    "mounting the overlay root (template rootfs)",
    "entering the new root",
    "creating mount points",
    "mounting /proc",
    "mounting /dev",
    "binding device nodes",
    "mounting /dev/pts",
    "creating /dev links",
    "mounting /dev/shm",
    "creating /.cella/agent",
    "binding the agent binary",
    "making the agent read-only",
    "pivot_root",
    "detaching the old root",
    "binding the sudo shim over /usr/bin/sudo",
    "sethostname",
    "bringing up lo",
    "no_new_privs",
    "dropping capabilities",
    "Landlock",
    "seccomp",
    "execve of the agent",
];

fn step_name(code: u32) -> &'static str {
    STEP_NAMES
        .get(usize::try_from(code).unwrap_or(0))
        .copied()
        .unwrap_or("unknown")
}

/// Errors of starting a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A path cannot be passed to the kernel (NUL byte, or a character overlayfs options
    /// cannot carry).
    #[error("{what} path {path:?} cannot be used: {reason}")]
    BadPath {
        /// Which path.
        what: &'static str,
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// Preparing descriptors in the parent failed.
    #[error("preparing {what} failed")]
    Prepare {
        /// What was prepared.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `clone3` failed.
    #[error("clone3 into new namespaces failed")]
    Clone(#[source] io::Error),
    /// The parent's half of the setup failed.
    #[error("{what} for the sandbox init failed")]
    Parent {
        /// What the parent did.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Placing the child into its cgroups failed.
    #[error("placing the sandbox into its cgroups failed")]
    Cgroup(#[source] CgroupError),
    /// A setup step in the child failed.
    #[error("sandbox setup step \"{step}\" failed")]
    Child {
        /// The step.
        step: &'static str,
        /// The errno the child saw.
        #[source]
        source: io::Error,
    },
    /// The child neither exec'd nor failed within the deadline.
    #[error("sandbox setup did not finish within {0:?}")]
    Timeout(Duration),
}

/// What [`spawn`] needs.
pub struct SpawnRequest<'a> {
    /// Sandbox ID (hostname).
    pub id: &'a str,
    /// `data_dir/<id>` (exists; the child attaches the writable layer there).
    pub sandbox_dir: &'a Path,
    /// The writable layer: a detached mount (`fsmount`) of the sandbox's disk
    /// ([`crate::disk`]); the child attaches it with `move_mount`.
    pub writable_layer: BorrowedFd<'a>,
    /// Template root filesystem (overlay lowest layer).
    pub rootfs: &'a Path,
    /// Snapshot layers stacked on `rootfs`, newest (topmost) first.
    pub layers: &'a [std::path::PathBuf],
    /// Host path of the agent binary.
    pub agent: &'a Path,
    /// Mount flags the agent's bind must keep (from the host mount: locked flags).
    pub agent_mount_flags: c_ulong,
    /// Limits (/dev/shm size).
    pub limits: Limits,
    /// The cgroups (already created for `id`).
    pub cgroups: &'a Cgroups,
    /// Compiled seccomp policy.
    pub seccomp: &'a SeccompPrograms,
    /// Landlock plan, when the kernel has Landlock.
    pub landlock: Option<LandlockPlan>,
}

/// A started sandbox whose agent has been exec'd.
#[derive(Debug)]
pub struct Spawned {
    /// Host pid of the sandbox init (the agent).
    pub pid: i32,
    /// pidfd of the init (kill and wait without pid-reuse races).
    pub pidfd: OwnedFd,
    /// Parent end of the control socketpair (agent's fd 3).
    pub control: OwnedFd,
    /// Read end of the agent's stdout/stderr pipe.
    pub log: OwnedFd,
    /// The sandbox's network namespace.
    pub netns: OwnedFd,
}

/// Everything [`child_main`] touches. Built in the parent; read-only in the child.
struct ChildPlan {
    parent_ends: [RawFd; 4],
    sync_read: RawFd,
    err_write: RawFd,
    control: RawFd,
    null: RawFd,
    log_write: RawFd,
    sandbox_dir: CString,
    layer_mount: RawFd,
    upper: CString,
    work: CString,
    root: CString,
    overlay_opts: CString,
    agent: CString,
    agent_ro_flags: c_ulong,
    shm_opts: CString,
    hostname: CString,
    landlock: Option<LandlockPlan>,
    fprogs: Vec<libc::sock_fprog>,
}

fn cstring(what: &'static str, path: &Path) -> Result<CString, SpawnError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| SpawnError::BadPath {
        what,
        path: path.to_path_buf(),
        reason: "contains a NUL byte",
    })
}

/// Reject characters the legacy overlayfs option parser would split on.
fn overlay_safe(what: &'static str, path: &Path) -> Result<String, SpawnError> {
    let bad = |reason| SpawnError::BadPath {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let s = path.to_str().ok_or_else(|| bad("is not UTF-8"))?;
    if s.contains([',', ':', '\\', '\n', '\0']) {
        return Err(bad("contains ',', ':', '\\\\' or a control character"));
    }
    Ok(s.to_string())
}

/// Validate that `path` can be named in overlay options (exposed for config validation).
pub fn check_overlay_path(what: &'static str, path: &Path) -> Result<(), SpawnError> {
    overlay_safe(what, path).map(|_| ())
}

fn os_err(what: &'static str) -> impl FnOnce(io::Error) -> SpawnError {
    move |source| SpawnError::Prepare { what, source }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the 2-element array.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: socketpair writes two descriptors into the 2-element array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn open_path(path: &std::ffi::CStr, flags: c_int) -> io::Result<OwnedFd> {
    // SAFETY: `path` is a valid NUL-terminated string.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Send SIGKILL through a pidfd (no pid reuse possible). ESRCH (already dead) is fine.
pub fn pidfd_kill(pidfd: RawFd) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a NULL siginfo only reads the descriptor number.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// Reap the process behind `pidfd`; `nohang` returns `Ok(None)` while it still runs.
pub fn pidfd_reap(pidfd: RawFd, nohang: bool) -> io::Result<Option<libc::siginfo_t>> {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | if nohang { libc::WNOHANG } else { 0 };
        // SAFETY: waitid writes into `info`, which lives for the call.
        let r = unsafe { libc::waitid(libc::P_PIDFD, pidfd as libc::id_t, &mut info, flags) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        // SAFETY: waitid filled the SIGCHLD fields (or left zeroes with WNOHANG).
        let pid = unsafe { info.si_pid() };
        return Ok(if pid == 0 { None } else { Some(info) });
    }
}

/// If the process behind `pidfd` has already terminated, how (without reaping it).
fn exited_already(pidfd: &OwnedFd) -> Option<String> {
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes into `info`, which lives for the call.
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: waitid filled the SIGCHLD fields (or left zeroes with WNOHANG).
    if r != 0 || unsafe { info.si_pid() } == 0 {
        return None;
    }
    // SAFETY: as above, si_status is valid for an exited child.
    let status = unsafe { info.si_status() };
    Some(if info.si_code == libc::CLD_EXITED {
        format!("exited with status {status}")
    } else {
        format!("killed by signal {status}")
    })
}

/// Kills and reaps the child unless disarmed (every error path after `clone3`).
struct KillGuard {
    pidfd: Option<OwnedFd>,
}

impl KillGuard {
    fn disarm(mut self) -> Option<OwnedFd> {
        self.pidfd.take()
    }
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        if let Some(fd) = self.pidfd.take() {
            let _ = pidfd_kill(fd.as_raw_fd());
            let _ = pidfd_reap(fd.as_raw_fd(), false);
        }
    }
}

/// Wait for the child's exec (EOF on the CLOEXEC error pipe) or its report.
fn wait_exec(err_read: &OwnedFd) -> Result<(), SpawnError> {
    let deadline = Instant::now() + EXEC_DEADLINE;
    let mut buf = [0u8; 8];
    let mut got = 0usize;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SpawnError::Timeout(EXEC_DEADLINE));
        }
        let mut pfd = libc::pollfd {
            fd: err_read.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = c_int::try_from(left.as_millis().max(1)).unwrap_or(c_int::MAX);
        // SAFETY: poll on one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(SpawnError::Parent {
                what: "waiting for exec",
                source: e,
            });
        }
        if r == 0 {
            continue;
        }
        let rest = buf.get_mut(got..).unwrap_or_default();
        // SAFETY: reading into the unfilled tail of `buf`.
        let n = unsafe { libc::read(err_read.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(SpawnError::Parent {
                what: "reading the setup result",
                source: e,
            });
        }
        if n == 0 {
            if got == 0 {
                return Ok(());
            }
            return Err(SpawnError::Child {
                step: "unknown",
                source: io::Error::other("truncated setup report"),
            });
        }
        got += usize::try_from(n).unwrap_or(0);
        if got >= buf.len() {
            let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
            return Err(SpawnError::Child {
                step: step_name(step),
                source: io::Error::from_raw_os_error(errno),
            });
        }
    }
}

/// Start the sandbox described by `req`. Blocking (tens of microseconds to a few
/// milliseconds); call from a blocking thread. On error the child is killed and reaped; the
/// caller removes the cgroups and the directory.
pub fn spawn(req: &SpawnRequest<'_>) -> Result<Spawned, SpawnError> {
    let dir = overlay_safe("sandbox directory", req.sandbox_dir)?;
    let mut lower = String::new();
    for layer in req.layers {
        lower.push_str(&overlay_safe("snapshot layer", layer)?);
        lower.push(':');
    }
    lower.push_str(&overlay_safe("template rootfs", req.rootfs)?);
    let (ctl_parent, ctl_child) = socketpair().map_err(os_err("control socketpair"))?;
    let (sync_r, sync_w) = pipe().map_err(os_err("sync pipe"))?;
    let (err_r, err_w) = pipe().map_err(os_err("error pipe"))?;
    let (log_r, log_w) = pipe().map_err(os_err("log pipe"))?;
    let null = open_path(c"/dev/null", libc::O_RDWR).map_err(os_err("/dev/null"))?;
    let cgroup_fd = match req.cgroups.v2_dir(req.id) {
        Some(d) => Some(
            open_path(&cstring("cgroup", &d)?, libc::O_RDONLY | libc::O_DIRECTORY)
                .map_err(os_err("cgroup directory"))?,
        ),
        None => None,
    };
    let fprogs = req
        .seccomp
        .programs()
        .iter()
        .map(|p| libc::sock_fprog {
            len: u16::try_from(p.len()).unwrap_or(u16::MAX),
            filter: p.as_ptr().cast_mut(),
        })
        .collect();
    let cs = |s: String| {
        CString::new(s).map_err(|_| SpawnError::BadPath {
            what: "mount option",
            path: req.sandbox_dir.to_path_buf(),
            reason: "contains a NUL byte",
        })
    };
    let plan = ChildPlan {
        parent_ends: [
            ctl_parent.as_raw_fd(),
            sync_w.as_raw_fd(),
            err_r.as_raw_fd(),
            log_r.as_raw_fd(),
        ],
        sync_read: sync_r.as_raw_fd(),
        err_write: err_w.as_raw_fd(),
        control: ctl_child.as_raw_fd(),
        null: null.as_raw_fd(),
        log_write: log_w.as_raw_fd(),
        sandbox_dir: cstring("sandbox directory", req.sandbox_dir)?,
        layer_mount: req.writable_layer.as_raw_fd(),
        upper: cs(format!("{dir}/upper"))?,
        work: cs(format!("{dir}/work"))?,
        root: cs(format!("{dir}/root"))?,
        overlay_opts: cs(format!(
            "lowerdir={lower},upperdir={dir}/upper,workdir={dir}/work,userxattr"
        ))?,
        agent: cstring("agent", req.agent)?,
        agent_ro_flags: req.agent_mount_flags,
        shm_opts: cs(format!("mode=1777,size={}m", req.limits.memory_mb.max(1)))?,
        hostname: cs(req.id.to_string())?,
        landlock: req.landlock,
        fprogs,
    };

    let mut pidfd: c_int = -1;
    // SAFETY: an all-zero clone_args is the documented "no options" value.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    let ns_flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_PIDFD;
    let mut flags = u64::try_from(ns_flags).unwrap_or(0);
    if let Some(fd) = &cgroup_fd {
        flags |= CLONE_INTO_CGROUP;
        args.cgroup = u64::try_from(fd.as_raw_fd()).unwrap_or(0);
    }
    args.flags = flags;
    args.pidfd = std::ptr::addr_of_mut!(pidfd) as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    // SAFETY: fork-style clone3 (no CLONE_VM, no stack): the child gets a copy of this
    // thread's address space and continues here with return value 0. It then runs only
    // `child_main`, which makes raw async-signal-safe syscalls on `plan` and never returns.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of_mut!(args),
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if ret == 0 {
        // SAFETY: we are the freshly cloned child; see `child_main`'s contract.
        unsafe { child_main(&plan) }
    }
    if ret < 0 {
        return Err(SpawnError::Clone(io::Error::last_os_error()));
    }
    let pid = i32::try_from(ret).unwrap_or(-1);
    // SAFETY: CLONE_PIDFD stored a new descriptor owned by nobody else in `pidfd`.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let guard = KillGuard { pidfd: Some(pidfd) };
    drop((ctl_child, sync_r, err_w, log_w, null, cgroup_fd));

    let map = format!("0 {SANDBOX_ID_BASE} {SANDBOX_ID_COUNT}\n");
    for file in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{pid}/{file}"), &map).map_err(|source| {
            SpawnError::Parent {
                what: "writing the id map",
                source,
            }
        })?;
    }
    if !req.cgroups.is_v2() {
        req.cgroups
            .attach(req.id, pid)
            .map_err(SpawnError::Cgroup)?;
    }
    let netns_path =
        CString::new(format!("/proc/{pid}/ns/net")).map_err(|_| SpawnError::Parent {
            what: "naming the netns",
            source: io::Error::other("NUL in path"),
        })?;
    let netns = open_path(&netns_path, libc::O_RDONLY).map_err(|source| SpawnError::Parent {
        what: "opening the network namespace",
        source,
    })?;
    // SAFETY: writing one byte from a live stack buffer.
    let w = unsafe { libc::write(sync_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    if w != 1 {
        return Err(SpawnError::Parent {
            what: "releasing the child",
            source: io::Error::last_os_error(),
        });
    }
    drop(sync_w);
    wait_exec(&err_r)?;
    let pidfd = guard.disarm().ok_or(SpawnError::Parent {
        what: "keeping the pidfd",
        source: io::Error::other("pidfd missing"),
    })?;
    // EOF also happens when the child was killed before it could report: tell them apart.
    if let Some(status) = exited_already(&pidfd) {
        let _ = pidfd_reap(pidfd.as_raw_fd(), false);
        return Err(SpawnError::Child {
            step: "unknown (the child died during setup)",
            source: io::Error::other(status),
        });
    }
    Ok(Spawned {
        pid,
        pidfd,
        control: ctl_parent,
        log: log_r,
        netns,
    })
}

// ---------------------------------------------------------------------------------------
// The child. Everything below runs between clone3 and execve: raw syscalls only.
// ---------------------------------------------------------------------------------------

/// Report `step` with the current errno through the error pipe and exit.
///
/// # Safety
/// Child-only; `err_fd` is the error pipe's write end.
unsafe fn fail(err_fd: RawFd, step: Step) -> ! {
    // SAFETY: errno location is valid for the calling thread.
    let errno = unsafe { *libc::__errno_location() };
    let s = (step as u32).to_ne_bytes();
    let e = errno.to_ne_bytes();
    let buf = [s[0], s[1], s[2], s[3], e[0], e[1], e[2], e[3]];
    // SAFETY: writing a live stack buffer, then leaving without running any destructor.
    unsafe {
        libc::write(err_fd, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

fn errno() -> c_int {
    // SAFETY: errno location is valid for the calling thread.
    unsafe { *libc::__errno_location() }
}

/// `mkdir` that accepts an existing directory and replaces anything else (a template's
/// symlink must not redirect a mount point to a host path before `pivot_root`).
///
/// # Safety
/// Child-only.
unsafe fn ensure_dir(err: RawFd, path: &std::ffi::CStr, mode: libc::mode_t) {
    // SAFETY: path is NUL-terminated; `st` is written by fstatat.
    unsafe {
        if libc::mkdir(path.as_ptr(), mode) == 0 {
            return;
        }
        if errno() != libc::EEXIST {
            fail(err, Step::Mountpoints)
        }
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(
            libc::AT_FDCWD,
            path.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        ) != 0
        {
            fail(err, Step::Mountpoints)
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return;
        }
        if libc::unlink(path.as_ptr()) != 0 || libc::mkdir(path.as_ptr(), mode) != 0 {
            fail(err, Step::Mountpoints)
        }
    }
}

/// Create an empty regular file to bind-mount onto (fresh tmpfs or overlay; not a symlink).
///
/// # Safety
/// Child-only.
unsafe fn make_file(path: &std::ffi::CStr, mode: libc::mode_t) -> bool {
    // SAFETY: path is NUL-terminated.
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode,
        );
        if fd < 0 {
            return false;
        }
        libc::close(fd);
        true
    }
}

/// Why a read-only bind failed.
enum BindFailed {
    /// The bind itself.
    Bind,
    /// Making it read-only.
    Remount,
}

/// Bind `src` over `dst`, then make it read-only, no setuid, no devices, plus `extra` flags
/// (no allocation: runs in the child).
///
/// # Safety
/// Child-only.
unsafe fn bind_readonly(
    src: &std::ffi::CStr,
    dst: &std::ffi::CStr,
    extra: libc::c_ulong,
) -> Result<(), BindFailed> {
    // SAFETY: both paths are NUL-terminated; the null pointers are allowed for a bind.
    unsafe {
        if libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            return Err(BindFailed::Bind);
        }
        if libc::mount(
            std::ptr::null(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | extra,
            std::ptr::null(),
        ) != 0
        {
            return Err(BindFailed::Remount);
        }
    }
    Ok(())
}

/// Move `fd` to a number ≥ 10 (so dup2 onto 0..3 cannot clobber it), close-on-exec.
///
/// # Safety
/// Child-only.
unsafe fn lift(fd: RawFd) -> RawFd {
    // SAFETY: fcntl on a descriptor number; failure is reported by the caller.
    unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Device nodes bind-mounted from the host: (sandbox path, host path, required).
const DEV_NODES: [(&std::ffi::CStr, &std::ffi::CStr, bool); 6] = [
    (c"dev/null", c"/dev/null", true),
    (c"dev/zero", c"/dev/zero", true),
    (c"dev/full", c"/dev/full", true),
    (c"dev/random", c"/dev/random", true),
    (c"dev/urandom", c"/dev/urandom", true),
    (c"dev/tty", c"/dev/tty", false),
];

const DEV_LINKS: [(&std::ffi::CStr, &std::ffi::CStr); 5] = [
    (c"pts/ptmx", c"dev/ptmx"),
    (c"/proc/self/fd", c"dev/fd"),
    (c"/proc/self/fd/0", c"dev/stdin"),
    (c"/proc/self/fd/1", c"dev/stdout"),
    (c"/proc/self/fd/2", c"dev/stderr"),
];

/// The child's whole life until `execve`.
///
/// # Safety
/// Must only be called in the child right after a fork-style `clone3`. It performs raw
/// syscalls on `plan` (prepared before the clone) and never returns, allocates, locks or
/// unwinds.
unsafe fn child_main(plan: &ChildPlan) -> ! {
    // SAFETY: every call below is a raw syscall wrapper on NUL-terminated strings and plain
    // structs owned by `plan` or this stack frame; see the function contract.
    unsafe {
        for fd in plan.parent_ends {
            libc::close(fd);
        }
        let err = lift(plan.err_write);
        if err < 0 {
            libc::_exit(126);
        }
        libc::close(plan.err_write);
        let ctl = lift(plan.control);
        let null = lift(plan.null);
        let log = lift(plan.log_write);
        if ctl < 0 || null < 0 || log < 0 {
            fail(err, Step::Fds)
        }
        libc::umask(0);

        // Wait until the parent wrote the id maps and placed us in the cgroups.
        let mut b = 0u8;
        loop {
            let n = libc::read(plan.sync_read, std::ptr::addr_of_mut!(b).cast(), 1);
            if n == 1 {
                break;
            }
            if n == 0 {
                // The parent gave up on us.
                libc::_exit(125);
            }
            if errno() != libc::EINTR {
                fail(err, Step::WaitParent)
            }
        }
        libc::close(plan.sync_read);

        // Raw syscalls on purpose: glibc's set*id wrappers broadcast the change to every
        // thread the parent had (taking glibc-internal locks copied in whatever state the
        // parent's other threads left them), which can hang a forked child forever.
        if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0 {
            fail(err, Step::SetGroups)
        }
        if libc::syscall(libc::SYS_setresgid, 0u32, 0u32, 0u32) != 0 {
            fail(err, Step::SetGid)
        }
        if libc::syscall(libc::SYS_setresuid, 0u32, 0u32, 0u32) != 0 {
            fail(err, Step::SetUid)
        }
        // Now that we sit in cella/<id>, make that the root of our cgroup view.
        if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
            fail(err, Step::CgroupNs)
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(err, Step::PrivateMounts)
        }
        if libc::syscall(
            libc::SYS_move_mount,
            plan.layer_mount,
            c"".as_ptr(),
            libc::AT_FDCWD,
            plan.sandbox_dir.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        ) != 0
        {
            fail(err, Step::WritableLayer)
        }
        for d in [&plan.upper, &plan.work, &plan.root] {
            if libc::mkdir(d.as_ptr(), 0o755) != 0 {
                fail(err, Step::LayerDirs)
            }
        }
        if libc::mount(
            c"overlay".as_ptr(),
            plan.root.as_ptr(),
            c"overlay".as_ptr(),
            0,
            plan.overlay_opts.as_ptr().cast(),
        ) != 0
        {
            fail(err, Step::Overlay)
        }
        if libc::chdir(plan.root.as_ptr()) != 0 {
            fail(err, Step::EnterRoot)
        }
        // From here on, relative paths are inside the new root.
        ensure_dir(err, c"proc", 0o555);
        ensure_dir(err, c"dev", 0o755);
        ensure_dir(err, c"sys", 0o555);
        ensure_dir(err, c"tmp", 0o1777);
        ensure_dir(err, c".cella", 0o755);

        // procfs must be mounted while the host's procfs is still visible
        // (mount_too_revealing), i.e. before the old root is detached.
        if libc::mount(
            c"proc".as_ptr(),
            c"proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            fail(err, Step::Proc)
        }
        if libc::mount(
            c"tmpfs".as_ptr(),
            c"dev".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            c"mode=0755,size=64k".as_ptr().cast(),
        ) != 0
        {
            fail(err, Step::Dev)
        }
        for (inside, host, required) in DEV_NODES {
            let ok = make_file(inside, 0o666)
                && libc::mount(
                    host.as_ptr(),
                    inside.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) == 0;
            if !ok {
                if required {
                    fail(err, Step::DevNodes)
                }
                libc::unlink(inside.as_ptr());
            }
        }
        if libc::mkdir(c"dev/pts".as_ptr(), 0o755) != 0
            || libc::mount(
                c"devpts".as_ptr(),
                c"dev/pts".as_ptr(),
                c"devpts".as_ptr(),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                c"newinstance,ptmxmode=0666,mode=620".as_ptr().cast(),
            ) != 0
        {
            fail(err, Step::Devpts)
        }
        for (target, link) in DEV_LINKS {
            if libc::symlink(target.as_ptr(), link.as_ptr()) != 0 {
                fail(err, Step::DevLinks)
            }
        }
        if libc::mkdir(c"dev/shm".as_ptr(), 0o1777) != 0
            || libc::mount(
                c"tmpfs".as_ptr(),
                c"dev/shm".as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                plan.shm_opts.as_ptr().cast(),
            ) != 0
        {
            fail(err, Step::Shm)
        }

        // The agent: a read-only bind of the host binary.
        libc::unlink(c".cella/agent".as_ptr());
        if !make_file(c".cella/agent", 0o755) {
            fail(err, Step::AgentMountpoint)
        }
        match bind_readonly(&plan.agent, c".cella/agent", plan.agent_ro_flags) {
            Ok(()) => {}
            Err(BindFailed::Bind) => fail(err, Step::AgentBind),
            Err(BindFailed::Remount) => fail(err, Step::AgentReadonly),
        }
        // sysfs is optional (the kernel refuses it in some configurations); read-only.
        libc::mount(
            c"sysfs".as_ptr(),
            c"sys".as_ptr(),
            c"sysfs".as_ptr(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        );

        if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0 {
            fail(err, Step::PivotRoot)
        }
        if libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0 {
            fail(err, Step::DetachOldRoot)
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            fail(err, Step::DetachOldRoot)
        }

        // sudo cannot elevate under no_new_privs: when the template has a sudo, the agent
        // binary takes its place (read-only, in this mount namespace only: the template and
        // the writable layer never see it), and runs as the client of the agent's broker.
        // After pivot_root, so a symlinked /usr/bin/sudo resolves inside the sandbox.
        let mut st: libc::stat = std::mem::zeroed();
        if libc::stat(SUDO_IN_SANDBOX.as_ptr(), &mut st) == 0
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
            && bind_readonly(c"/.cella/agent", SUDO_IN_SANDBOX, plan.agent_ro_flags).is_err()
        {
            fail(err, Step::SudoShim)
        }

        let host = plan.hostname.as_bytes();
        if libc::sethostname(host.as_ptr().cast(), host.len()) != 0 {
            fail(err, Step::Hostname)
        }
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            fail(err, Step::Loopback)
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, std::ptr::addr_of_mut!(ifr)) != 0 {
            fail(err, Step::Loopback)
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock, libc::SIOCSIFFLAGS, std::ptr::addr_of_mut!(ifr)) != 0 {
            fail(err, Step::Loopback)
        }
        libc::close(sock);

        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(err, Step::NoNewPrivs)
        }
        for cap in DROPPED_CAPS {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno() != libc::EINVAL {
                fail(err, Step::Capabilities)
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        let mut hdr = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(
            libc::SYS_capget,
            std::ptr::addr_of_mut!(hdr),
            data.as_mut_ptr(),
        ) != 0
        {
            fail(err, Step::Capabilities)
        }
        data[0].inheritable = 0;
        data[1].inheritable = 0;
        if libc::syscall(libc::SYS_capset, std::ptr::addr_of_mut!(hdr), data.as_ptr()) != 0 {
            fail(err, Step::Capabilities)
        }

        if let Some(ll) = &plan.landlock {
            let ruleset = libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::addr_of!(ll.attr),
                ll.attr_size,
                0u32,
            );
            if ruleset < 0 {
                fail(err, Step::Landlock)
            }
            let ruleset = ruleset as c_int;
            let root = libc::open(
                c"/".as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            if root < 0 {
                fail(err, Step::Landlock)
            }
            let rule = PathBeneathAttr {
                allowed_access: ll.attr.handled_access_fs,
                parent_fd: root,
            };
            if libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset,
                RULE_PATH_BENEATH,
                std::ptr::addr_of!(rule),
                0u32,
            ) != 0
            {
                fail(err, Step::Landlock)
            }
            if libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) != 0 {
                fail(err, Step::Landlock)
            }
            libc::close(root);
            libc::close(ruleset);
        }

        // Descriptors: 0 = /dev/null, 1 and 2 = log pipe, 3 = control; all else close-on-exec.
        if libc::dup2(null, 0) < 0
            || libc::dup2(log, 1) < 0
            || libc::dup2(log, 2) < 0
            || libc::dup2(ctl, 3) < 0
        {
            fail(err, Step::Fds)
        }
        if libc::syscall(
            libc::SYS_close_range,
            4u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            for fd in 4..4096 {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        // Signal dispositions: ignored signals (Rust ignores SIGPIPE) survive execve.
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let empty_mask: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            std::ptr::addr_of!(empty_mask),
            std::ptr::null::<u64>(),
            8usize,
        );
        libc::umask(0o022);

        for prog in &plan.fprogs {
            if libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0u32,
                prog as *const libc::sock_fprog,
            ) != 0
            {
                fail(err, Step::Seccomp)
            }
        }

        let argv: [*const libc::c_char; 4] = [
            c"/.cella/agent".as_ptr(),
            c"--control-fd".as_ptr(),
            c"3".as_ptr(),
            std::ptr::null(),
        ];
        let envp: [*const libc::c_char; 2] = [AGENT_PATH_ENV.as_ptr(), std::ptr::null()];
        libc::execve(argv[0], argv.as_ptr(), envp.as_ptr());
        fail(err, Step::Exec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_cover_every_step() {
        assert_eq!(step_name(Step::Fds as u32), "moving file descriptors");
        assert_eq!(
            step_name(Step::Overlay as u32),
            "mounting the overlay root (template rootfs)"
        );
        assert_eq!(step_name(Step::Exec as u32), "execve of the agent");
        assert_eq!(STEP_NAMES.len(), Step::Exec as usize + 1);
        assert_eq!(step_name(999), "unknown");
    }

    #[test]
    fn overlay_paths_are_checked() {
        assert!(check_overlay_path("x", Path::new("/var/lib/cella/t/rootfs")).is_ok());
        for bad in ["/a,b", "/a:b", "/a\\b", "/a\nb"] {
            assert!(check_overlay_path("x", Path::new(bad)).is_err(), "{bad}");
        }
    }
}
