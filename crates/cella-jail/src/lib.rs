//! The jail isolation driver: sandboxes as Linux namespaces on the host kernel.
//!
//! Why this driver exists: a microVM gives a sandbox its own kernel, but needs working KVM
//! and boots in hundreds of milliseconds at best. A jail starts in about a millisecond of
//! kernel work and runs anywhere with user namespaces, at the price of sharing the host
//! kernel. Its isolation is layered so that no single mechanism is the only wall:
//!
//! * **user namespace**: root inside is host uid 100000 ([`SANDBOX_ID_BASE`]); no host file
//!   is owned by a sandbox id, and capabilities only count inside.
//! * **pid, mount, network, ipc, uts, cgroup namespaces**: the sandbox sees its own process
//!   tree (the agent is pid 1), its own mounts (none of which the host ever sees), only `lo`,
//!   its hostname (= sandbox id) and its own cgroup root.
//! * **overlay root on a per-sandbox disk** ([`disk`]): the template's rootfs is the read-only
//!   lower layer; writes land on a sparse ext4 image of `disk_mb` (the disk quota: `ENOSPC`,
//!   independent of the memory limit) that the kernel frees with the sandbox.
//! * **cgroups** ([`cgroup`]): memory (OOM kills stay inside and pick the user's processes,
//!   which the agent starts with `oom_score_adj` 1000, before the agent; see [`spawn`]), CPU
//!   quota, pids.
//! * **capability bounding set, no_new_privs, Landlock ([`landlock`]) and seccomp
//!   ([`seccomp`])**: cut the kernel surface that user namespaces still expose.
//!
//! See [`spawn`] for the start sequence and [`sandbox`] for a live sandbox's handle.
//!
//! [`SANDBOX_ID_BASE`]: cella_core::driver::SANDBOX_ID_BASE

pub mod cgroup;
pub mod disk;
pub mod fswatch;
pub mod landlock;
pub mod procwatch;
pub mod sandbox;
pub mod seccomp;
pub mod spawn;

use cella_core::manager::error_chain;
use std::ffi::c_ulong;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cella_api::Isolation;
use cella_core::driver::{
    Driver, DriverError, EventSink, Limits, ReapReport, SandboxEvent, SandboxHandle, SandboxSpec,
};
use cella_proto::control::{AgentConfig, AgentEvent, MAX_EVENT_LINE};
use cella_proto::envd::ENVD_PORT;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::watch;

use crate::cgroup::{CgroupError, Cgroups};
use crate::disk::{DiskError, LoopRef};
use crate::landlock::LandlockPlan;
use crate::sandbox::{JailSandbox, Line, read_line_bounded};
use crate::seccomp::{SeccompError, SeccompPrograms};
use crate::spawn::{SpawnError, SpawnRequest};

/// Where loop devices live.
const DEV_ROOT: &str = "/dev";

/// Where the kernel describes loop devices.
const SYS_ROOT: &str = "/sys";

/// How long a destroyed or reaped sandbox's loop device may take to be released.
const LOOP_RELEASE_DEADLINE: Duration = Duration::from_secs(5);

/// How long the agent has to report ready after exec.
const READY_DEADLINE: Duration = Duration::from_secs(10);

/// Longest a pause waits for every task of a sandbox to freeze (shared with the microVM
/// driver, whose QEMU is frozen the same way). A task stuck in uninterruptible I/O can hold a
/// v1 freeze in `FREEZING`; past this the sandbox is thawed and the pause fails.
pub const PAUSE_DEADLINE: Duration = Duration::from_secs(5);

/// Longest sandbox ID (it becomes the hostname, at most 64 bytes).
pub const MAX_ID_LEN: usize = 63;

/// Configuration of the jail driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// Per-sandbox state lives in `data_dir/<sandbox-id>/` (only a mount point on the host)
    /// and, for the moment until a loop device holds it, a disk image `data_dir/.disk-*.img`
    /// (see [`disk`]). Keep it on a real disk: the images are the sandboxes' writable layers.
    pub data_dir: PathBuf,
    /// Host path of the static `cella-agent` binary.
    pub agent_path: PathBuf,
    /// `/sys/fs/cgroup` in production; a temporary directory in tests.
    pub cgroup_root: PathBuf,
    /// Writable disks kept formatted ahead of time per disk size (0: make each on create).
    pub disk_pool: usize,
}

/// Errors of setting up the jail driver.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A configured path is not absolute.
    #[error("{field} must be an absolute path, got {path}")]
    RelativePath {
        /// Which setting.
        field: &'static str,
        /// The value.
        path: PathBuf,
    },
    /// The agent binary is missing or not executable by sandbox users.
    #[error("agent binary {path} is not a regular file executable by others (mode o+x)")]
    AgentNotExecutable {
        /// The configured path.
        path: PathBuf,
    },
    /// A directory on the way to the data directory or the agent cannot be searched by the
    /// sandbox's uids (which are not host root).
    #[error(
        "{path} is not searchable by sandbox users (mode {mode:o}); it needs o+x so sandboxes can reach {what}"
    )]
    NotSearchable {
        /// The directory.
        path: PathBuf,
        /// Its mode.
        mode: u32,
        /// What lies beneath.
        what: &'static str,
    },
    /// A path cannot be used in mount options.
    #[error("unusable path")]
    BadPath(#[source] SpawnError),
    /// User namespaces are off.
    #[error("user namespaces are not available: {0}")]
    UserNamespaces(String),
    /// No usable cgroup hierarchy.
    #[error("cgroups")]
    Cgroup(#[from] CgroupError),
    /// The per-sandbox disks cannot be made here (no mkfs.ext4, no loop devices).
    #[error("sandbox disks")]
    Disk(#[from] DiskError),
    /// The seccomp policy does not compile here.
    #[error("seccomp policy")]
    Seccomp(#[from] SeccompError),
    /// A file or directory operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl From<JailError> for DriverError {
    fn from(e: JailError) -> Self {
        DriverError::Unavailable(error_chain(&e))
    }
}

fn require_absolute(field: &'static str, path: &Path) -> Result<(), JailError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(JailError::RelativePath {
            field,
            path: path.to_path_buf(),
        })
    }
}

/// Every ancestor of `path` (and `path` itself when `include_self`) must be o+x.
pub fn check_searchable(
    path: &Path,
    include_self: bool,
    what: &'static str,
) -> Result<(), JailError> {
    let mut dirs: Vec<&Path> = path.ancestors().skip(usize::from(!include_self)).collect();
    dirs.reverse();
    for d in dirs {
        let meta = std::fs::metadata(d).map_err(|source| JailError::Io {
            context: format!("inspecting {}", d.display()),
            source,
        })?;
        let mode = meta.mode() & 0o7777;
        let sandbox_owned = (cella_core::driver::SANDBOX_ID_BASE
            ..cella_core::driver::SANDBOX_ID_BASE + cella_core::driver::SANDBOX_ID_COUNT)
            .contains(&meta.uid());
        if mode & 0o001 == 0 && !sandbox_owned {
            return Err(JailError::NotSearchable {
                path: d.to_path_buf(),
                mode,
                what,
            });
        }
    }
    Ok(())
}

/// Whether the user namespaces sandboxes need can be created (`proc_root` = `/proc`).
pub fn probe_user_namespaces(proc_root: &Path) -> Result<(), JailError> {
    let p = proc_root.join("sys/user/max_user_namespaces");
    match std::fs::read_to_string(&p) {
        Ok(s) => match s.trim().parse::<u64>() {
            Ok(0) => Err(JailError::UserNamespaces(format!("{} is 0", p.display()))),
            Ok(_) => Ok(()),
            Err(_) => Err(JailError::UserNamespaces(format!(
                "{} holds {:?}",
                p.display(),
                s.trim()
            ))),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(JailError::UserNamespaces(format!(
            "{} is missing (kernel without CONFIG_USER_NS?)",
            p.display()
        ))),
        Err(source) => Err(JailError::Io {
            context: format!("reading {}", p.display()),
            source,
        }),
    }
}

impl JailConfig {
    /// Static checks of the configuration (no side effects).
    pub fn validate(&self) -> Result<(), JailError> {
        require_absolute("data_dir", &self.data_dir)?;
        require_absolute("agent_path", &self.agent_path)?;
        require_absolute("cgroup_root", &self.cgroup_root)?;
        spawn::check_overlay_path("data_dir", &self.data_dir).map_err(JailError::BadPath)?;
        let meta =
            std::fs::metadata(&self.agent_path).map_err(|_| JailError::AgentNotExecutable {
                path: self.agent_path.clone(),
            })?;
        if !meta.is_file() || meta.mode() & 0o001 == 0 {
            return Err(JailError::AgentNotExecutable {
                path: self.agent_path.clone(),
            });
        }
        check_searchable(&self.agent_path, false, "the agent binary")?;
        Ok(())
    }
}

/// A sandbox ID is `[a-z0-9]{1,63}` (it is a hostname, a path component and a cgroup name).
pub fn validate_id(id: &str) -> Result<(), DriverError> {
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(DriverError::Setup(format!(
            "invalid sandbox id {id:?}: expected 1-{MAX_ID_LEN} characters [a-z0-9]"
        )));
    }
    Ok(())
}

/// Limits must all be positive.
pub fn validate_limits(l: &Limits) -> Result<(), DriverError> {
    if l.cpu_count == 0 || l.memory_mb == 0 || l.disk_mb == 0 || l.max_pids == 0 {
        return Err(DriverError::Setup(format!(
            "invalid limits {l:?}: every limit must be positive"
        )));
    }
    Ok(())
}

/// Mount flags of the host mount holding `path` that a read-only bind of it must keep
/// (the kernel refuses to clear locked flags inside a user namespace).
fn locked_mount_flags(path: &Path) -> Result<c_ulong, JailError> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Io {
        context: format!("{} contains a NUL byte", path.display()),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes into `st`; `c` is NUL-terminated.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(JailError::Io {
            context: format!("statvfs {}", path.display()),
            source: io::Error::last_os_error(),
        });
    }
    let keep = libc::ST_NOSUID
        | libc::ST_NODEV
        | libc::ST_NOEXEC
        | libc::ST_NOATIME
        | libc::ST_NODIRATIME
        | libc::ST_RELATIME;
    // The ST_* bits equal the MS_* bits for these flags.
    Ok(st.f_flag & keep)
}

/// The cgroup instance level of a driver: a hash of its (canonical) data directory, so two
/// servers with different data directories never touch each other's sandboxes, and a
/// restarted server finds its own orphans.
pub fn instance_name(data_dir: &Path) -> String {
    let canonical = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    // FNV-1a, 64 bit: stable across Rust versions (unlike DefaultHasher).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canonical.as_os_str().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("i{:012x}", h & 0xffff_ffff_ffff)
}

struct Inner {
    config: JailConfig,
    mkfs: PathBuf,
    cgroups: Arc<Cgroups>,
    seccomp: SeccompPrograms,
    landlock: Option<LandlockPlan>,
    host_netns: Arc<OwnedFd>,
    agent_mount_flags: c_ulong,
    disks: DiskPool,
    procwatch: Option<Arc<procwatch::ProcWatch>>,
    fswatch: Option<Arc<fswatch::FsWatch>>,
}

/// The jail driver. Cheap to share; every sandbox it creates holds what it needs itself.
#[derive(Clone)]
pub struct JailDriver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JailDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JailDriver")
            .field("config", &self.inner.config)
            .field("cgroups", &self.inner.cgroups.mode())
            .field("landlock", &self.inner.landlock.is_some())
            .finish_non_exhaustive()
    }
}

impl JailDriver {
    /// Check the host and prepare: validates the configuration, creates `data_dir`, probes
    /// user namespaces, the cgroup mode (v2, else v1) and the Landlock ABI, compiles the
    /// seccomp policy and remembers the host network namespace.
    pub fn new(config: JailConfig) -> Result<JailDriver, JailError> {
        config.validate()?;
        probe_user_namespaces(Path::new("/proc"))?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&config.data_dir)
            .map_err(|source| JailError::Io {
                context: format!("creating {}", config.data_dir.display()),
                source,
            })?;
        check_searchable(&config.data_dir, true, "their sandbox directories")?;
        let instance = instance_name(&config.data_dir);
        let mut cgroups = Cgroups::detect(&config.cgroup_root, &instance)?;
        cgroups.prepare()?;
        let mkfs = disk::find_mkfs(std::env::var_os("PATH").as_deref())?;
        disk::probe_loop(Path::new(DEV_ROOT))?;
        if on_tmpfs(&config.data_dir) {
            tracing::warn!(
                data_dir = %config.data_dir.display(),
                "the data directory is on tmpfs: sandbox disks will use host memory"
            );
        }
        let seccomp = seccomp::build()?;
        let landlock = landlock::probe_abi().map(landlock::plan_for);
        if landlock.is_none() {
            tracing::warn!("Landlock is not available: sandboxes run without it");
        }
        let host_netns =
            std::fs::File::open("/proc/self/ns/net").map_err(|source| JailError::Io {
                context: "opening the host network namespace".into(),
                source,
            })?;
        let agent_mount_flags = locked_mount_flags(&config.agent_path)?;
        let procwatch = match procwatch::ProcWatch::start(
            PathBuf::from("/proc"),
            cgroups.parent_name().to_string(),
            cgroups.instance().to_string(),
        ) {
            Ok(w) => Some(Arc::new(w)),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "process audit unavailable (the kernel's process events need CAP_NET_ADMIN): \
                     only processes started through the agent are audited"
                );
                None
            }
        };
        let fswatch = match fswatch::FsWatch::start(PathBuf::from("/proc")) {
            Ok(w) => Some(Arc::new(w)),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "file audit unavailable (fanotify needs CAP_SYS_ADMIN): \
                     only files written through the agent are audited"
                );
                None
            }
        };
        tracing::info!(
            process_audit = procwatch.is_some(),
            file_audit = fswatch.is_some(),
            cgroups = ?cgroups.mode(),
            landlock_abi = ?landlock::probe_abi(),
            "jail driver ready"
        );
        Ok(JailDriver {
            inner: Arc::new(Inner {
                config,
                mkfs,
                cgroups: Arc::new(cgroups),
                seccomp,
                landlock,
                host_netns: Arc::new(OwnedFd::from(host_netns)),
                agent_mount_flags,
                disks: DiskPool::default(),
                procwatch,
                fswatch,
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &JailConfig {
        &self.inner.config
    }

    /// The cgroup side (mode, per-sandbox paths).
    pub fn cgroups(&self) -> &Cgroups {
        &self.inner.cgroups
    }

    /// The Landlock ABI in use, if any.
    pub fn landlock_enabled(&self) -> bool {
        self.inner.landlock.is_some()
    }
}

/// Whether `path` lies on a tmpfs.
fn on_tmpfs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes into `st`; `c` is NUL-terminated.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    st.f_type == libc::TMPFS_MAGIC
}

/// Wait for a sandbox's loop device to be released by the kernel (it is, once the
/// sandbox's mount namespace is gone); if it is not, ask for a detach and report it.
fn release_disk(id: &str, disk: &LoopRef) -> Result<(), DriverError> {
    let sys = Path::new(SYS_ROOT);
    if disk::wait_released(sys, disk, LOOP_RELEASE_DEADLINE) {
        return Ok(());
    }
    if let Err(e) = disk::detach_loop(Path::new(DEV_ROOT), disk.index) {
        tracing::warn!(sandbox = id, "detaching loop{}: {e}", disk.index);
    }
    if disk::still_bound(sys, disk) {
        return Err(DriverError::Cleanup(format!(
            "the disk of sandbox {id} (loop{}) is still in use after {LOOP_RELEASE_DEADLINE:?}",
            disk.index
        )));
    }
    Ok(())
}

/// Remove a sandbox's cgroups, disk and directory after a failed start.
fn cleanup_failed(cgroups: &Cgroups, id: &str, dir: &Path, disk: Option<&LoopRef>) {
    if let Err(e) = cgroups.remove(id) {
        tracing::warn!(sandbox = id, "cleanup after failed start: {e}");
    }
    if let Some(d) = disk
        && let Err(e) = release_disk(id, d)
    {
        tracing::warn!(sandbox = id, "cleanup after failed start: {e}");
    }
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(sandbox = id, "cleanup after failed start: {e}");
    }
}

/// The blocking half of a start: sandbox directory, cgroups, disk, clone. Cleans up after
/// itself on error.
/// Format, attach and mount a fresh writable disk of `size_mb`.
fn new_disk(inner: &Inner, size_mb: u64) -> Result<disk::WritableDisk, disk::DiskError> {
    let image = disk::image_path(&inner.config.data_dir)?;
    disk::prepare(
        &inner.mkfs,
        Path::new(DEV_ROOT),
        &image,
        size_mb,
        cella_core::driver::SANDBOX_ID_BASE,
    )
}

/// Fresh writable disks made ahead of time, per size, so that `mkfs` and the loop setup
/// (~4–10 ms) stay off the create path. A pooled disk was never attached to any sandbox. The
/// pool's disks are detached mounts over unlinked images: dropping them (or the server dying)
/// releases everything, so they can never become leftovers.
#[derive(Default)]
struct DiskPool {
    ready: Mutex<std::collections::HashMap<u64, Vec<disk::WritableDisk>>>,
    filling: Mutex<std::collections::HashSet<u64>>,
}

/// Sizes kept warm at once (the most recently used ones win).
const DISK_POOL_SIZES: usize = 4;

impl DiskPool {
    fn take(&self, size_mb: u64) -> Option<disk::WritableDisk> {
        self.ready.lock().ok()?.get_mut(&size_mb)?.pop()
    }

    /// Top the pool up for `size_mb` (blocking; run it on a blocking thread).
    fn fill(inner: &Inner, size_mb: u64) {
        let depth = inner.config.disk_pool;
        if depth == 0 {
            return;
        }
        let Ok(mut filling) = inner.disks.filling.lock() else {
            return;
        };
        if !filling.insert(size_mb) {
            return;
        }
        drop(filling);
        loop {
            let have = inner
                .disks
                .ready
                .lock()
                .map(|m| m.get(&size_mb).map_or(0, Vec::len))
                .unwrap_or(depth);
            if have >= depth {
                break;
            }
            match new_disk(inner, size_mb) {
                Ok(d) => {
                    if let Ok(mut m) = inner.disks.ready.lock() {
                        if !m.contains_key(&size_mb) && m.len() >= DISK_POOL_SIZES {
                            // Forget the other sizes: an unusual size must not pin loop devices.
                            m.retain(|k, _| *k == size_mb);
                        }
                        m.entry(size_mb).or_default().push(d);
                    }
                }
                Err(e) => {
                    tracing::warn!("preparing a spare sandbox disk failed: {e}");
                    break;
                }
            }
        }
        if let Ok(mut filling) = inner.disks.filling.lock() {
            filling.remove(&size_mb);
        }
    }
}

/// What a successful start leaves: the init, its disk, the file audit's handle on the disk and
/// the driver's own (for snapshots).
type Started = (spawn::Spawned, LoopRef, Option<OwnedFd>, Option<OwnedFd>);

fn start_blocking(
    inner: &Inner,
    id: &str,
    dir: &Path,
    rootfs: &Path,
    layers: &[PathBuf],
    limits: Limits,
) -> Result<Started, DriverError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(DriverError::Setup(format!("sandbox {id} already exists")));
        }
        Err(source) => {
            return Err(DriverError::Io {
                context: format!("creating {}", dir.display()),
                source,
            });
        }
    }
    if let Err(e) = inner.cgroups.create(id, &limits) {
        let _ = std::fs::remove_dir(dir);
        return Err(DriverError::Setup(error_chain(&e)));
    }
    let disk = inner
        .disks
        .take(limits.disk_mb)
        .map_or_else(|| new_disk(inner, limits.disk_mb), Ok)
        .map_err(|e| {
            cleanup_failed(&inner.cgroups, id, dir, None);
            DriverError::Setup(error_chain(&e))
        })?;
    let req = SpawnRequest {
        id,
        sandbox_dir: dir,
        writable_layer: std::os::fd::AsFd::as_fd(&disk.mount),
        rootfs,
        layers,
        agent: &inner.config.agent_path,
        agent_mount_flags: inner.agent_mount_flags,
        limits,
        cgroups: &inner.cgroups,
        seccomp: &inner.seccomp,
        landlock: inner.landlock,
    };
    let spawned = spawn::spawn(&req);
    // The file audit's handle on the disk (released with the sandbox, see fswatch).
    let fs_root = inner.fswatch.as_ref().and_then(|_| {
        fswatch::FsWatch::open_root(std::os::fd::AsFd::as_fd(&disk.mount))
            .map_err(|e| tracing::warn!(sandbox = id, error = %e, "no file audit for this sandbox"))
            .ok()
    });
    // Snapshots read the upper layer through this (released when the init exits).
    let disk_root = fswatch::FsWatch::open_root(std::os::fd::AsFd::as_fd(&disk.mount))
        .map_err(|e| tracing::warn!(sandbox = id, error = %e, "no snapshots of this sandbox"))
        .ok();
    // The sandbox has its own attachment of the disk now (or failed): the detached original
    // must go, or it would keep the disk alive.
    let disk::WritableDisk { loop_ref, mount } = disk;
    drop(mount);
    match spawned {
        Ok(s) => Ok((s, loop_ref, fs_root, disk_root)),
        Err(e) => {
            cleanup_failed(&inner.cgroups, id, dir, Some(&loop_ref));
            Err(DriverError::Setup(error_chain(&e)))
        }
    }
}

/// Wait for the agent's ready line, forwarding anything else it reports.
async fn wait_ready(
    id: &str,
    reader: &mut BufReader<tokio::net::UnixStream>,
    events: &EventSink,
) -> Result<(), String> {
    let mut buf = Vec::with_capacity(256);
    loop {
        match read_line_bounded(reader, &mut buf, MAX_EVENT_LINE).await {
            Ok(Line::Full) => match AgentEvent::parse_line(&buf) {
                Some(AgentEvent::Ready { version }) => {
                    let _ = events.send(SandboxEvent::from_agent(
                        id.to_string(),
                        AgentEvent::Ready { version },
                    ));
                    return Ok(());
                }
                Some(event) => {
                    let _ = events.send(SandboxEvent::from_agent(id.to_string(), event));
                }
                None => tracing::debug!(sandbox = id, "dropped a malformed control line"),
            },
            Ok(Line::TooLong) => tracing::debug!(sandbox = id, "dropped an oversized control line"),
            Ok(Line::Eof) => return Err("the agent closed the control channel".into()),
            Err(e) => return Err(format!("reading the control channel: {e}")),
        }
    }
}

#[async_trait]
impl Driver for JailDriver {
    fn isolation(&self) -> Isolation {
        Isolation::Jail
    }

    async fn create(
        &self,
        spec: SandboxSpec,
        events: EventSink,
    ) -> Result<Arc<dyn SandboxHandle>, DriverError> {
        validate_id(&spec.id)?;
        validate_limits(&spec.limits)?;
        let rootfs = spec.template.rootfs.clone();
        if !rootfs.is_absolute() || !rootfs.is_dir() {
            return Err(DriverError::Setup(format!(
                "template rootfs {} is not an existing absolute directory",
                rootfs.display()
            )));
        }
        check_searchable(&rootfs, false, "the template rootfs")
            .map_err(|e| DriverError::Setup(error_chain(&e)))?;
        spawn::check_overlay_path("template rootfs", &rootfs)
            .map_err(|e| DriverError::Setup(error_chain(&e)))?;
        let layers = spec.template.layers.clone();
        for layer in &layers {
            if !layer.is_absolute() || !layer.is_dir() {
                return Err(DriverError::Setup(format!(
                    "snapshot layer {} is not an existing absolute directory",
                    layer.display()
                )));
            }
            check_searchable(layer, false, "a snapshot layer")
                .map_err(|e| DriverError::Setup(error_chain(&e)))?;
            spawn::check_overlay_path("snapshot layer", layer)
                .map_err(|e| DriverError::Setup(error_chain(&e)))?;
        }

        let inner = self.inner.clone();
        let id = spec.id.clone();
        let dir = inner.config.data_dir.join(&id);
        let limits = spec.limits;
        let started = std::time::Instant::now();
        let (spawned, disk, fs_root, disk_root) = {
            let inner = inner.clone();
            let id = id.clone();
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                start_blocking(&inner, &id, &dir, &rootfs, &layers, limits)
            })
            .await
            .map_err(|e| DriverError::Setup(format!("start task failed: {e}")))??
        };
        let exec_elapsed = started.elapsed();
        {
            let inner = inner.clone();
            let size = limits.disk_mb;
            tokio::task::spawn_blocking(move || DiskPool::fill(&inner, size));
        }
        if let Some(w) = &inner.procwatch {
            w.watch(&id, spawned.pid, events.clone());
        }
        if let (Some(w), Some(root)) = (&inner.fswatch, fs_root)
            && let Err(e) = w.watch(&id, root, events.clone())
        {
            tracing::warn!(sandbox = %id, error = %e, "no file audit for this sandbox");
        }
        let pidfd = Arc::new(spawned.pidfd);
        let (exit_tx, exit_rx) = watch::channel(None);
        let sandbox = Arc::new(JailSandbox {
            id: id.clone(),
            pid: spawned.pid,
            pidfd: pidfd.clone(),
            netns: Mutex::new(Some(Arc::new(spawned.netns))),
            host_netns: inner.host_netns.clone(),
            cgroups: inner.cgroups.clone(),
            dir: dir.clone(),
            disk,
            exit_rx,
            destroying: AtomicBool::new(false),
            destroyed: tokio::sync::Mutex::new(false),
            tasks: Mutex::new(Vec::new()),
            procwatch: inner.procwatch.clone(),
            fswatch: inner.fswatch.clone(),
            disk_root: Mutex::new(disk_root.map(Arc::new)),
            paused: AtomicBool::new(false),
        });

        // The audits and the snapshot handle forget the sandbox as soon as its init is gone
        // (killed, crashed, or reaped by a later server run), so they never keep its disk alive.
        {
            let mut exited = sandbox.exit_rx.clone();
            let (pw, fw, id) = (inner.procwatch.clone(), inner.fswatch.clone(), id.clone());
            let weak = Arc::downgrade(&sandbox);
            tokio::spawn(async move {
                let _ = exited.wait_for(|v| v.is_some()).await;
                if let Some(s) = weak.upgrade() {
                    s.release_disk_root();
                }
                if let Some(w) = fw {
                    w.unwatch(&id);
                }
                if let Some(w) = pw {
                    w.unwatch(&id);
                }
            });
        }
        let setup = async {
            let waiter = sandbox::spawn_waiter(pidfd.clone(), exit_tx)
                .map_err(|e| format!("watching the agent: {e}"))?;
            let log = sandbox::spawn_log_reader(id.clone(), spawned.log)
                .map_err(|e| format!("reading the agent log: {e}"))?;
            if let Ok(mut t) = sandbox.tasks.lock() {
                t.push(waiter);
                t.push(log);
            }
            let std_ctl = std::os::unix::net::UnixStream::from(spawned.control);
            std_ctl
                .set_nonblocking(true)
                .map_err(|e| format!("control channel: {e}"))?;
            let mut ctl = tokio::net::UnixStream::from_std(std_ctl)
                .map_err(|e| format!("control channel: {e}"))?;
            let config = AgentConfig {
                sandbox_id: id.clone(),
                access_token: spec.access_token.clone(),
                env_vars: spec.env_vars.clone(),
                default_user: spec.template.default_user.clone(),
                default_workdir: String::new(),
                port: ENVD_PORT,
                bind: "0.0.0.0".to_string(),
                start: spec.template.start_cmd.clone(),
                // The jail shares the host's clock and kernel CRNG.
                host_time_ns: None,
                entropy: Vec::new(),
            };
            let mut line =
                serde_json::to_vec(&config).map_err(|e| format!("encoding the config: {e}"))?;
            line.push(b'\n');
            ctl.write_all(&line)
                .await
                .map_err(|e| format!("sending the config: {e}"))?;
            let mut reader = BufReader::new(ctl);
            wait_ready(&id, &mut reader, &events).await?;
            Ok::<_, String>(reader)
        };
        let result = match tokio::time::timeout(READY_DEADLINE, setup).await {
            Ok(r) => r,
            Err(_) => Err(format!("no ready event within {READY_DEADLINE:?}")),
        };
        match result {
            Ok(reader) => {
                tracing::debug!(
                    sandbox = %id,
                    exec_us = exec_elapsed.as_micros(),
                    ready_us = started.elapsed().as_micros(),
                    "jail sandbox ready"
                );
                let task = sandbox::spawn_event_reader(id.clone(), reader, events);
                if let Ok(mut t) = sandbox.tasks.lock() {
                    t.push(task);
                }
                Ok(sandbox)
            }
            Err(reason) => {
                // Give a dying agent a moment so the reason can name its exit status.
                let exit = sandbox::exit_within(&sandbox.exit_rx, Duration::from_millis(200)).await;
                if let Err(e) = sandbox.teardown().await {
                    tracing::warn!(sandbox = %id, "cleanup after failed start: {e}");
                }
                let reason = match exit {
                    Some(info) => format!("{reason} ({})", info.reason),
                    None => reason,
                };
                Err(DriverError::AgentNotReady(reason))
            }
        }
    }

    fn supports_egress(&self) -> bool {
        true
    }

    async fn reap_orphans(&self) -> Result<ReapReport, DriverError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || -> Result<ReapReport, DriverError> {
            let mut report = ReapReport::default();
            let names = inner
                .cgroups
                .list()
                .map_err(|e| DriverError::Cleanup(error_chain(&e)))?;
            for name in names {
                let (killed, removed) = inner
                    .cgroups
                    .remove(&name)
                    .map_err(|e| DriverError::Cleanup(error_chain(&e)))?;
                report.processes += killed;
                report.cgroups += removed;
            }
            let data_dir = &inner.config.data_dir;
            // Disks of the killed sandboxes go with their mount namespaces; detach any the
            // kernel still holds after a grace period.
            let (found, left) = disk::release_under(
                Path::new(SYS_ROOT),
                Path::new(DEV_ROOT),
                data_dir,
                LOOP_RELEASE_DEADLINE,
            )
            .map_err(|source| DriverError::Io {
                context: "listing loop devices".into(),
                source,
            })?;
            if left > 0 {
                tracing::warn!(
                    found,
                    still_bound = left,
                    "orphaned sandbox disks still bound"
                );
            } else if found > 0 {
                tracing::info!(found, "released orphaned sandbox disks");
            }
            let entries = std::fs::read_dir(data_dir).map_err(|source| DriverError::Io {
                context: format!("listing {}", data_dir.display()),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| DriverError::Io {
                    context: format!("listing {}", data_dir.display()),
                    source,
                })?;
                let path = entry.path();
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                let r = if is_dir {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                r.map_err(|source| DriverError::Io {
                    context: format!("removing {}", path.display()),
                    source,
                })?;
                report.dirs += 1;
            }
            Ok(report)
        })
        .await
        .map_err(|e| DriverError::Cleanup(format!("reaper task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn instance_names_follow_the_data_dir() {
        let a = instance_name(Path::new("/var/lib/cella/sandboxes"));
        let b = instance_name(Path::new("/tmp/other/sandboxes"));
        assert_ne!(a, b);
        assert_eq!(a, instance_name(Path::new("/var/lib/cella/sandboxes")));
        assert_eq!(a.len(), 13);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
    }

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("abc123").is_ok());
        assert!(validate_id(&"a".repeat(MAX_ID_LEN)).is_ok());
        for bad in ["", "ABC", "a-b", "a/b", "../x", "a b", "é"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_id(&"a".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn limits_are_validated() {
        assert!(validate_limits(&Limits::default()).is_ok());
        let l = Limits {
            disk_mb: 0,
            ..Default::default()
        };
        assert!(validate_limits(&l).is_err());
        let l = Limits {
            max_pids: 0,
            ..Default::default()
        };
        assert!(validate_limits(&l).is_err());
    }

    fn config_in(tmp: &Path) -> JailConfig {
        let agent = tmp.join("agent");
        std::fs::write(&agent, b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        JailConfig {
            data_dir: tmp.join("data"),
            agent_path: agent,
            cgroup_root: tmp.join("cg"),
            disk_pool: 0,
        }
    }

    #[test]
    fn config_validation() {
        let tmp = tempfile::tempdir().expect("tmp");
        let good = config_in(tmp.path());
        good.validate().expect("valid");

        let mut c = good.clone();
        c.data_dir = PathBuf::from("relative/data");
        assert!(matches!(
            c.validate(),
            Err(JailError::RelativePath {
                field: "data_dir",
                ..
            })
        ));

        let mut c = good.clone();
        c.data_dir = tmp.path().join("a,b");
        assert!(matches!(c.validate(), Err(JailError::BadPath(_))));

        let mut c = good.clone();
        c.agent_path = tmp.path().join("missing");
        assert!(matches!(
            c.validate(),
            Err(JailError::AgentNotExecutable { .. })
        ));

        std::fs::set_permissions(&good.agent_path, std::fs::Permissions::from_mode(0o750))
            .expect("chmod");
        assert!(matches!(
            good.validate(),
            Err(JailError::AgentNotExecutable { .. })
        ));
    }

    #[test]
    fn searchability_is_checked() {
        let tmp = tempfile::tempdir().expect("tmp");
        let closed = tmp.path().join("closed");
        let inner = closed.join("inner");
        std::fs::create_dir_all(&inner).expect("mkdir");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let err = check_searchable(&inner, true, "x").expect_err("closed parent");
        assert!(matches!(err, JailError::NotSearchable { ref path, .. } if *path == closed));
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).expect("chmod");
        check_searchable(&inner, true, "x").expect("open now");
    }

    #[test]
    fn user_namespace_probe_reads_proc_root() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = tmp.path().join("sys/user");
        std::fs::create_dir_all(&p).expect("mkdir");
        assert!(probe_user_namespaces(tmp.path()).is_err());
        std::fs::write(p.join("max_user_namespaces"), "0\n").expect("write");
        assert!(matches!(
            probe_user_namespaces(tmp.path()),
            Err(JailError::UserNamespaces(_))
        ));
        std::fs::write(p.join("max_user_namespaces"), "15000\n").expect("write");
        probe_user_namespaces(tmp.path()).expect("enabled");
    }

    #[test]
    fn driver_starts_against_a_fake_cgroup_tree() {
        let tmp = tempfile::tempdir().expect("tmp");
        let config = config_in(tmp.path());
        // no cgroup tree at all: a clear error, not a panic
        let err = JailDriver::new(config.clone()).expect_err("no cgroups");
        assert!(matches!(err, JailError::Cgroup(_)), "{err}");
        for c in ["memory", "cpu", "pids"] {
            let d = config.cgroup_root.join(c);
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("cgroup.procs"), "").expect("write");
        }
        if let Err(e) = disk::find_mkfs(std::env::var_os("PATH").as_deref())
            .and_then(|_| disk::probe_loop(Path::new(DEV_ROOT)))
        {
            eprintln!("skipping the rest: {e}");
            return;
        }
        let driver = JailDriver::new(config.clone()).expect("driver");
        assert_eq!(driver.isolation(), Isolation::Jail);
        assert!(config.data_dir.is_dir());
        let inst = instance_name(&config.data_dir);
        assert!(config.cgroup_root.join("memory/cella").join(&inst).is_dir());
        assert!(!driver.cgroups().is_v2());
    }
}
