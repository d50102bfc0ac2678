//! The microVM isolation driver: every sandbox is a QEMU `microvm` with its own guest kernel.
//!
//! Why a VM at all, when the jail driver starts in a millisecond: a jail shares the host
//! kernel, so one kernel bug reachable from a sandbox is a host compromise. A guest kernel
//! puts a second, much narrower wall (the VMM's device model and the hypervisor) between
//! sandbox code and the host. The price is boot time and memory, which this driver measures
//! and keeps down (see `docs/vm.md`).
//!
//! One sandbox is:
//!
//! ```text
//!  host                                         | guest (own kernel)
//!  cgroup cella-vm/<inst>/<id> (RAM + VMM      |
//!         overhead; cella_jail::cgroup)         |
//!   └ qemu-system-x86_64 -M microvm  uid 2000xx, no_new_privs, -sandbox on
//!       ├ virtio-blk  <- sandboxes/<id>/disk.qcow2 -> images/<template>.ext4 (shared, ro)
//!       ├ virtio-net  <- tap0 in a private netns 169.254.0.22/30 ---- eth0 169.254.0.21
//!       ├ virtconsole <- socketpair (control channel) ----------------- /dev/hvc0 (fd 3)
//!       ├ serial      <- socketpair (console, tail kept for errors) --- ttyS0
//!       └ balloon (free-page reporting), rng
//!                                               | /init (busybox, initramfs): modules,
//!                                               | mount /dev/vda, eth0, switch_root,
//!                                               | exec /.cella/agent --control-fd 3
//! ```
//!
//! The server reaches the guest only through [`SandboxHandle::dial`]: a socket created inside
//! the sandbox's namespace connects to 169.254.0.21. Accelerator choice is in [`accel`], the
//! command line in [`qemu`], images in [`image`], the VMM process in [`vmm`], golden-VM
//! snapshots in [`snapshot`], filesystem snapshot layers in [`layer`].
//!
//! [`SandboxHandle::dial`]: cella_core::driver::SandboxHandle::dial

pub mod accel;
pub mod image;
pub mod layer;
pub mod net;
pub mod qemu;
pub mod sandbox;
pub mod snapshot;
pub mod vmm;

use cella_core::manager::error_chain;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cella_api::Isolation;
use cella_core::driver::{
    Driver, DriverError, EventSink, ExitInfo, Limits, ReapReport, SandboxEvent, SandboxHandle,
    SandboxSpec,
};
use cella_jail::cgroup::{CFS_PERIOD_US, CgroupError, CgroupLimits, Cgroups};
use cella_proto::control::{AgentConfig, AgentEvent, MAX_EVENT_LINE};
use cella_proto::envd::ENVD_PORT;
use tokio::io::{AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::watch;

pub use crate::accel::{Accel, AccelChoice, AccelDecision, HostFacts};
use crate::image::{ImageError, ImageTools};
use crate::qemu::{BootMode, Memory, QemuPlan};
pub use crate::sandbox::{BootPath, VmSandbox};
use crate::sandbox::{DiskInfo, MachineInfo, QmpConn, SlotGuard};
use crate::snapshot::{AWAITING_CONFIG, SnapshotFiles};
use crate::vmm::{Identity, Launch, Tail};

/// Top cgroup of every VMM (of every cella instance); the jail's is `cella`.
pub const CGROUP_PARENT: &str = "cella-vm";

/// Longest sandbox ID (it becomes the hostname, a path component and a cgroup name).
pub const MAX_ID_LEN: usize = 63;

/// Line the guest init writes on the control channel once the agent may be configured.
const INIT_OK: &[u8] = b"cella-init: ok";
/// Prefix of the guest init's failure line.
const INIT_ERROR: &[u8] = b"cella-init: error: ";
/// Line of a probe boot.
const PROBE_OK: &[u8] = b"cella-init: probe ok";

/// How long a KVM probe guest may take to report in.
const PROBE_DEADLINE: Duration = Duration::from_secs(15);

/// The unprivileged identities QEMU processes run as: uid `uid_base + slot`, group `gid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// First uid (default 200000: above the jail's 100000..165536).
    pub uid_base: u32,
    /// How many concurrent VMs (and uids).
    pub slots: u32,
    /// Group of every QEMU process; images are readable by it.
    pub gid: u32,
}

impl Default for RunAs {
    fn default() -> Self {
        RunAs {
            uid_base: 200_000,
            slots: 4096,
            gid: 200_000,
        }
    }
}

/// Configuration of the microVM driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Images and per-sandbox state (`images/`, `sandboxes/<id>/`).
    pub data_dir: PathBuf,
    /// Output of `scripts/vm-assets`: `vmlinux`, `initramfs.cpio`.
    pub assets_dir: PathBuf,
    /// The static `cella-agent` copied into every image as `/.cella/agent`.
    pub agent_path: PathBuf,
    /// `/sys/fs/cgroup` (a temporary directory in tests).
    pub cgroup_root: PathBuf,
    /// `/proc` (for `cpuinfo`).
    pub proc_root: PathBuf,
    /// `/dev` (for `kvm`).
    pub dev_root: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `qemu-img`.
    pub qemu_img: PathBuf,
    /// `mkfs.ext4`.
    pub mkfs_ext4: PathBuf,
    /// KVM, TCG or probe.
    pub accel: AccelChoice,
    /// TCG translation cache, MiB.
    pub tb_size_mb: u32,
    /// Host memory allowed for the VMM on top of guest RAM, MiB (cgroup limit).
    pub overhead_mb: u64,
    /// How long a guest may take to report ready; `None` = 10 s with KVM, 45 s with TCG.
    pub ready_timeout: Option<Duration>,
    /// Drop QEMU to unprivileged uids; `None` keeps the server's identity.
    pub run_as: Option<RunAs>,
    /// Start sandboxes as clones of a golden VM's snapshot (see [`snapshot`]) instead of
    /// booting each. Default on; `CELLA_VM_SNAPSHOT=0` turns it off.
    pub snapshots: bool,
}

impl VmConfig {
    /// Defaults for everything but the three paths.
    pub fn new(data_dir: PathBuf, assets_dir: PathBuf, agent_path: PathBuf) -> VmConfig {
        VmConfig {
            data_dir,
            assets_dir,
            agent_path,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            proc_root: PathBuf::from("/proc"),
            dev_root: PathBuf::from("/dev"),
            qemu: PathBuf::from("qemu-system-x86_64"),
            qemu_img: PathBuf::from("qemu-img"),
            mkfs_ext4: PathBuf::from("mkfs.ext4"),
            accel: AccelChoice::Auto,
            tb_size_mb: 16,
            overhead_mb: 160,
            ready_timeout: None,
            run_as: Some(RunAs::default()),
            snapshots: std::env::var("CELLA_VM_SNAPSHOT").map_or(true, |v| v != "0"),
        }
    }

    /// The guest kernel.
    pub fn kernel(&self) -> PathBuf {
        self.assets_dir.join("vmlinux")
    }

    /// The guest initramfs.
    pub fn initramfs(&self) -> PathBuf {
        self.assets_dir.join("initramfs.cpio")
    }

    /// Static checks (no side effects besides reading metadata).
    pub fn validate(&self) -> Result<(), VmError> {
        for (field, p) in [
            ("data_dir", &self.data_dir),
            ("assets_dir", &self.assets_dir),
            ("agent_path", &self.agent_path),
            ("cgroup_root", &self.cgroup_root),
        ] {
            if !p.is_absolute() {
                return Err(VmError::Config(format!(
                    "{field} must be an absolute path, got {}",
                    p.display()
                )));
            }
        }
        if self.data_dir.to_string_lossy().contains(',') {
            return Err(VmError::Config(format!(
                "data_dir {} contains a comma (QEMU option syntax)",
                self.data_dir.display()
            )));
        }
        for (what, p) in [("kernel", self.kernel()), ("initramfs", self.initramfs())] {
            if !p.is_file() {
                return Err(VmError::Config(format!(
                    "guest {what} {} is missing (run scripts/vm-assets)",
                    p.display()
                )));
            }
            if p.to_string_lossy().contains(',') {
                return Err(VmError::Config(format!(
                    "guest {what} path {} contains a comma",
                    p.display()
                )));
            }
        }
        if !self.agent_path.is_file() {
            return Err(VmError::Config(format!(
                "agent binary {} is missing",
                self.agent_path.display()
            )));
        }
        if !(4..=1024).contains(&self.tb_size_mb) {
            return Err(VmError::Config(format!(
                "tb_size_mb {} is outside 4..=1024",
                self.tb_size_mb
            )));
        }
        if self.overhead_mb < 64 {
            return Err(VmError::Config(format!(
                "overhead_mb {} is below 64 (QEMU itself needs that)",
                self.overhead_mb
            )));
        }
        if let Some(r) = self.run_as
            && (r.slots == 0 || r.uid_base == 0 || r.uid_base.checked_add(r.slots).is_none())
        {
            return Err(VmError::Config(format!("invalid run_as {r:?}")));
        }
        Ok(())
    }
}

/// Errors of setting up the microVM driver.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is unusable.
    #[error("invalid microVM configuration: {0}")]
    Config(String),
    /// A required host tool is missing.
    #[error(
        "{tool} is not usable ({reason}); install qemu-system-x86 / qemu-utils (scripts/install-deps)"
    )]
    MissingTool {
        /// The program.
        tool: String,
        /// What happened.
        reason: String,
    },
    /// KVM was required but does not work.
    #[error("{0}")]
    Accel(String),
    /// No usable cgroups.
    #[error("cgroups")]
    Cgroup(#[from] CgroupError),
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

impl From<VmError> for DriverError {
    fn from(e: VmError) -> Self {
        DriverError::Unavailable(error_chain(&e))
    }
}

fn setup_err(e: impl std::error::Error) -> DriverError {
    DriverError::Setup(error_chain(&e))
}

/// A sandbox ID is `[a-z0-9]{1,63}`.
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

/// Most vCPUs one VM may get.
pub const MAX_VCPUS: u32 = 64;

/// Limits must be positive, vCPUs at most [`MAX_VCPUS`], memory at least 128 MiB (the guest
/// kernel and agent need about 100).
pub fn validate_limits(l: &Limits) -> Result<(), DriverError> {
    if l.cpu_count == 0 || l.cpu_count > MAX_VCPUS || l.memory_mb < 128 || l.disk_mb == 0 {
        return Err(DriverError::Setup(format!(
            "invalid limits {l:?}: need 1..={MAX_VCPUS} vCPUs, memory >= 128 MiB, disk > 0"
        )));
    }
    if l.memory_mb > 1 << 20 {
        return Err(DriverError::Setup(format!(
            "memory_mb {} is too large",
            l.memory_mb
        )));
    }
    Ok(())
}

/// The cgroup limits of one VMM.
pub fn vmm_limits(l: &Limits, overhead_mb: u64, tb_size_mb: u32) -> CgroupLimits {
    let mb = l
        .memory_mb
        .saturating_add(overhead_mb)
        .saturating_add(u64::from(tb_size_mb));
    CgroupLimits {
        memory_bytes: mb.saturating_mul(1 << 20),
        // the vCPUs plus a quarter CPU for device emulation and I/O
        cpu_quota_us: u64::from(l.cpu_count)
            .saturating_mul(CFS_PERIOD_US)
            .saturating_add(CFS_PERIOD_US / 4),
        // main loop, vCPU threads, RCU, up to 64 block I/O workers
        pids: 96 + u64::from(l.cpu_count),
    }
}

use cella_jail::sandbox::{Line, read_line_bounded};

/// Wait for the guest init's go-ahead on the control channel.
async fn wait_init<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    want: &[u8],
) -> Result<(), String> {
    let mut buf = Vec::with_capacity(128);
    loop {
        match read_line_bounded(reader, &mut buf, 1024).await {
            Ok(Line::Full) if buf == want => return Ok(()),
            Ok(Line::Full) if buf.starts_with(INIT_ERROR) => {
                let msg = buf.get(INIT_ERROR.len()..).unwrap_or_default();
                return Err(format!(
                    "guest init failed: {}",
                    String::from_utf8_lossy(msg)
                ));
            }
            Ok(Line::Full) | Ok(Line::TooLong) => {}
            Ok(Line::Eof) => return Err("the VM closed the control channel".into()),
            Err(e) => return Err(format!("reading the control channel: {e}")),
        }
    }
}

/// Wait for the agent's ready event, forwarding anything else it reports.
async fn wait_ready<R: AsyncRead + Unpin>(
    id: &str,
    reader: &mut BufReader<R>,
    events: &EventSink,
) -> Result<(), String> {
    let mut buf = Vec::with_capacity(256);
    loop {
        match read_line_bounded(reader, &mut buf, MAX_EVENT_LINE).await {
            Ok(Line::Full) => match AgentEvent::parse_line(&buf) {
                Some(event) => {
                    let ready = matches!(event, AgentEvent::Ready { .. });
                    let _ = events.send(SandboxEvent::from_agent(id.to_string(), event));
                    if ready {
                        return Ok(());
                    }
                }
                None => tracing::debug!(sandbox = id, "dropped a malformed control line"),
            },
            Ok(Line::TooLong) => tracing::debug!(sandbox = id, "dropped an oversized control line"),
            Ok(Line::Eof) => return Err("the agent closed the control channel".into()),
            Err(e) => return Err(format!("reading the control channel: {e}")),
        }
    }
}

/// Forward the agent's events to the sink until EOF.
fn spawn_event_reader<R: AsyncRead + Unpin + Send + 'static>(
    id: String,
    mut reader: BufReader<R>,
    sink: EventSink,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = Vec::with_capacity(256);
        loop {
            match read_line_bounded(&mut reader, &mut buf, MAX_EVENT_LINE).await {
                Ok(Line::Full) => {
                    if let Some(event) = AgentEvent::parse_line(&buf) {
                        let _ = sink.send(SandboxEvent::from_agent(id.clone(), event));
                    }
                }
                Ok(Line::TooLong) => {}
                Ok(Line::Eof) | Err(_) => return,
            }
        }
    })
}

fn exit_reason(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => "the VM powered off (guest shutdown, reboot or panic)".into(),
        (Some(c), _) => format!("the VMM exited with status {c}"),
        (None, Some(s)) => format!("the VMM was killed by signal {s}"),
        _ => format!("the VMM ended ({status})"),
    }
}

fn socketpair() -> io::Result<(OwnedFd, tokio::net::UnixStream)> {
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    b.set_nonblocking(true)?;
    Ok((OwnedFd::from(a), tokio::net::UnixStream::from_std(b)?))
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> DriverError {
    let context = context.into();
    move |source| DriverError::Io { context, source }
}

/// Size, mtime seconds and nanoseconds of a file: when they are unchanged, so is its hash.
type FileStamp = (u64, i64, i64);

struct Inner {
    config: VmConfig,
    cgroups: Arc<Cgroups>,
    decision: AccelDecision,
    tsc_khz: Option<u64>,
    /// The host CPU a KVM guest sees ([`accel::cpuinfo_identity`]).
    cpu_identity: String,
    slots: Arc<Mutex<BTreeSet<u32>>>,
    image_lock: tokio::sync::Mutex<()>,
    agent_hash: Mutex<Option<(FileStamp, String)>>,
    kvm_gid: Option<u32>,
    /// `qemu --version` (part of every snapshot key).
    qemu_version: String,
    /// One lock per snapshot key: a snapshot is built at most once at a time.
    snapshot_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Sealed RAM copies of the snapshots in use, by key.
    rams: Mutex<HashMap<String, Arc<OwnedFd>>>,
    /// Makes snapshot temp directory names unique.
    tmp_counter: std::sync::atomic::AtomicU64,
    /// Snapshots built by this driver (see [`VmDriver::snapshots_built`]).
    built: std::sync::atomic::AtomicU64,
}

/// The microVM driver. Cheap to clone.
#[derive(Clone)]
pub struct VmDriver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VmDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmDriver")
            .field("config", &self.inner.config)
            .field("accel", &self.inner.decision)
            .finish_non_exhaustive()
    }
}

/// Run `program arg`; its first line of output.
fn tool_works(program: &Path, arg: &str) -> Result<String, VmError> {
    let out = std::process::Command::new(program)
        .arg(arg)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| VmError::MissingTool {
            tool: program.display().to_string(),
            reason: e.to_string(),
        })?;
    if out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().next().unwrap_or_default().trim().to_string())
    } else {
        Err(VmError::MissingTool {
            tool: program.display().to_string(),
            reason: format!("`{arg}` exited with {}", out.status),
        })
    }
}

impl VmDriver {
    /// Check the host and prepare: validates the configuration, checks the tools, creates
    /// the data directories, detects cgroups and chooses the accelerator (booting a probe
    /// guest under KVM when the host might support it).
    pub async fn new(config: VmConfig) -> Result<VmDriver, VmError> {
        config.validate()?;
        let qemu_version = tool_works(&config.qemu, "--version")?;
        tool_works(&config.qemu_img, "--version")?;
        tool_works(&config.mkfs_ext4, "-V")?;
        let gid = config.run_as.map(|r| r.gid);
        for (dir, mode, group) in [
            (config.data_dir.clone(), 0o711, None),
            (config.data_dir.join("images"), 0o750, gid),
            (config.data_dir.join("sandboxes"), 0o711, None),
            (config.data_dir.join("snapshots"), 0o750, gid),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(&dir)
                .map_err(|source| VmError::Io {
                    context: format!("creating {}", dir.display()),
                    source,
                })?;
            if let Some(g) = group {
                std::os::unix::fs::chown(&dir, None, Some(g)).map_err(|source| VmError::Io {
                    context: format!("chown {}", dir.display()),
                    source,
                })?;
            }
        }
        // Scoped per server instance (a hash of the data directory, which exists by now so
        // it canonicalizes): the orphan reaper below only ever sees this server's VMs.
        let instance = cella_jail::instance_name(&config.data_dir);
        let mut cgroups = Cgroups::detect_under(&config.cgroup_root, CGROUP_PARENT, &instance)?;
        cgroups.prepare()?;
        let facts = HostFacts::gather(&config.proc_root, &config.dev_root);
        let kvm_gid = std::fs::metadata(config.dev_root.join("kvm"))
            .ok()
            .map(|m| m.gid());
        let probe =
            if config.accel != AccelChoice::Tcg && facts.cpu_virt && facts.kvm_device.is_ok() {
                Some(probe_kvm(&config, kvm_gid).await)
            } else {
                None
            };
        let decision = accel::decide(config.accel, &facts, || {
            probe.unwrap_or_else(|| Err("not probed".into()))
        })
        .map_err(VmError::Accel)?;
        if decision.accel == Accel::Tcg && facts.cpu_khz.is_none() {
            return Err(VmError::Config(
                "TCG guests need the host CPU clock (cpu MHz in /proc/cpuinfo) and none was found"
                    .into(),
            ));
        }
        tracing::info!(accel = ?decision.accel, reason = %decision.reason, cgroups = ?cgroups.mode(), "microVM driver ready");
        Ok(VmDriver {
            inner: Arc::new(Inner {
                tsc_khz: facts.cpu_khz,
                cpu_identity: facts.cpu_identity.clone(),
                config,
                cgroups: Arc::new(cgroups),
                decision,
                slots: Arc::new(Mutex::new(BTreeSet::new())),
                image_lock: tokio::sync::Mutex::new(()),
                agent_hash: Mutex::new(None),
                kvm_gid,
                qemu_version,
                snapshot_locks: Mutex::new(HashMap::new()),
                rams: Mutex::new(HashMap::new()),
                tmp_counter: std::sync::atomic::AtomicU64::new(0),
                built: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// How many golden VMs this driver has snapshotted (each key at most once at a time).
    pub fn snapshots_built(&self) -> u64 {
        self.inner.built.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The accelerator in use and why.
    pub fn accel(&self) -> &AccelDecision {
        &self.inner.decision
    }

    /// The configuration in use.
    pub fn config(&self) -> &VmConfig {
        &self.inner.config
    }

    /// This instance's cgroups (`cella-vm/<instance>/<id>`).
    pub fn cgroups(&self) -> &Cgroups {
        &self.inner.cgroups
    }

    fn ready_timeout(&self) -> Duration {
        self.inner
            .config
            .ready_timeout
            .unwrap_or(match self.inner.decision.accel {
                Accel::Kvm => Duration::from_secs(10),
                Accel::Tcg => Duration::from_secs(45),
            })
    }

    /// The agent's hash, recomputed only when its size or mtime changed.
    fn agent_hash(&self) -> Result<String, DriverError> {
        let p = &self.inner.config.agent_path;
        let m = std::fs::metadata(p).map_err(io_err(format!("inspecting {}", p.display())))?;
        let key = (m.size(), m.mtime(), m.mtime_nsec());
        if let Ok(cache) = self.inner.agent_hash.lock()
            && let Some((k, h)) = cache.as_ref()
            && *k == key
        {
            return Ok(h.clone());
        }
        let h = image::file_hash16(p).map_err(setup_err)?;
        if let Ok(mut cache) = self.inner.agent_hash.lock() {
            *cache = Some((key, h.clone()));
        }
        Ok(h)
    }

    /// The ext4 image of a template build, built on first use. Returns its path and size.
    pub async fn image_for(&self, spec: &SandboxSpec) -> Result<(PathBuf, u64), DriverError> {
        let rootfs = spec.template.rootfs.clone();
        if !rootfs.is_absolute() || !rootfs.is_dir() {
            return Err(DriverError::Setup(format!(
                "template rootfs {} is not an existing absolute directory",
                rootfs.display()
            )));
        }
        let _guard = self.inner.image_lock.lock().await;
        let this = self.clone();
        let name = spec.template.name.clone();
        let build = spec.template.build_id.clone();
        tokio::task::spawn_blocking(move || -> Result<(PathBuf, u64), DriverError> {
            let hash = this.agent_hash()?;
            let file = image::image_name(&name, &build, &hash);
            let cfg = &this.inner.config;
            let tools = ImageTools {
                mkfs_ext4: cfg.mkfs_ext4.clone(),
                qemu_img: cfg.qemu_img.clone(),
            };
            let started = Instant::now();
            let existed = cfg.data_dir.join("images").join(&file).is_file();
            let path = image::ensure_image(
                &tools,
                &cfg.data_dir.join("images"),
                &rootfs,
                &file,
                &cfg.agent_path,
                cfg.run_as.map(|r| r.gid),
            )
            .map_err(|e: ImageError| DriverError::Setup(error_chain(&e)))?;
            if !existed {
                tracing::info!(image = %path.display(), took_ms = started.elapsed().as_millis() as u64, "built VM image");
            }
            let size = std::fs::metadata(&path)
                .map_err(io_err(format!("inspecting {}", path.display())))?
                .len();
            Ok((path, size))
        })
        .await
        .map_err(|e| DriverError::Setup(format!("image task failed: {e}")))?
    }

    fn take_slot(&self) -> Result<Option<SlotGuard>, DriverError> {
        let Some(run_as) = self.inner.config.run_as else {
            return Ok(None);
        };
        let mut used = self
            .inner
            .slots
            .lock()
            .map_err(|_| DriverError::Setup("slot table poisoned".into()))?;
        let slot = (0..run_as.slots)
            .find(|s| !used.contains(s))
            .ok_or_else(|| {
                DriverError::Setup(format!("all {} VM slots are in use", run_as.slots))
            })?;
        used.insert(slot);
        Ok(Some(SlotGuard {
            slot,
            pool: self.inner.slots.clone(),
        }))
    }
}

/// Boot the probe guest under KVM; how long it took to report in.
async fn probe_kvm(config: &VmConfig, kvm_gid: Option<u32>) -> Result<Duration, String> {
    let started = Instant::now();
    let (ctl_guest, ctl_host) = socketpair().map_err(|e| e.to_string())?;
    let (con_guest, con_host) = socketpair().map_err(|e| e.to_string())?;
    let plan = QemuPlan {
        accel: Accel::Kvm,
        tb_size_mb: config.tb_size_mb,
        vcpus: 1,
        memory_mb: 256,
        kernel: config.kernel(),
        initramfs: config.initramfs(),
        disk: None,
        control_fd: ctl_guest.as_raw_fd(),
        serial_fd: con_guest.as_raw_fd(),
        tap_fd: None,
        mode: BootMode::Probe,
        memory: Memory::Anonymous,
        qmp_fd: None,
        incoming: false,
        tsc_khz: None,
    };
    let identity = config.run_as.map(|r| Identity {
        uid: r.uid_base.saturating_add(r.slots),
        gid: r.gid,
        groups: kvm_gid.into_iter().collect(),
    });
    let started_vmm = vmm::spawn(Launch {
        program: config.qemu.clone(),
        args: plan.args(),
        inherit: vec![ctl_guest.as_raw_fd(), con_guest.as_raw_fd()],
        cgroup_procs: Vec::new(),
        identity,
    })
    .map_err(|e| format!("starting QEMU: {e}"))?;
    drop(ctl_guest);
    drop(con_guest);
    let console = Tail::default();
    let con_task =
        vmm::spawn_tail_reader("probe console", "probe".into(), con_host, console.clone());
    let mut reader = BufReader::new(ctl_host);
    let result = tokio::time::timeout(PROBE_DEADLINE, wait_init(&mut reader, PROBE_OK)).await;
    let _ = vmm::pidfd_kill(&started_vmm.pidfd);
    let mut child = started_vmm.child;
    let _ = child.wait().await;
    con_task.abort();
    match result {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(format!("{e} ({})", console.last_lines(3))),
        Err(_) => Err(format!(
            "no report within {PROBE_DEADLINE:?} ({})",
            console.last_lines(3)
        )),
    }
}

/// How long a clone may take from QEMU start to the agent's ready before the driver gives
/// up on the snapshot and boots cold.
const RESTORE_DEADLINE: Duration = Duration::from_secs(20);
/// How long a VM restored from a sandbox's memory snapshot may take to answer its config
/// (the stream holds the whole guest RAM, not only device state).
const RESUME_DEADLINE: Duration = Duration::from_secs(20);
/// How long a resumed agent gets to answer (within [`RESUME_DEADLINE`], leaving time to read
/// the machine's state for the log).
const REKEY_DEADLINE: Duration = Duration::from_secs(15);
/// How long migrating a golden VM's device state to its file may take.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(30);

/// Guest RAM of a VM about to be launched.
enum LaunchMemory {
    Anonymous,
    /// Anonymous, in the named backend of a clone (a memory snapshot of one is loaded).
    Restored,
    /// Create this sparse file (guest RAM size) for a golden VM.
    Golden(PathBuf),
    /// A clone maps the golden RAM from this sealed memfd.
    Clone(Arc<OwnedFd>),
}

/// One QEMU process to start: a cold-booted sandbox, a golden VM or a clone.
struct VmLaunch {
    /// Sandbox ID, or the golden VM's name (its cgroup name too).
    name: String,
    /// Created 0700 for the VMM's uid; removed at teardown.
    dir: PathBuf,
    /// Backing file of the overlay and its format (`raw` image or `qcow2` snapshot disk).
    backing: PathBuf,
    backing_fmt: &'static str,
    /// The overlay to create, and its virtual size.
    disk: PathBuf,
    disk_size: u64,
    limits: Limits,
    memory: LaunchMemory,
    /// Give the VMM a QMP connection.
    qmp: bool,
    /// The migration stream, inherited: a clone reads it (`migrate-incoming fd:N`), a golden
    /// VM writes it (`migrate fd:N`, into a pipe the server drains into the state file).
    stream: Option<OwnedFd>,
    /// Start with `-incoming defer` (a clone).
    incoming: bool,
    boot: BootPath,
    /// A snapshot layer's disk to hard-link (or copy) to `backing` first.
    backing_source: Option<PathBuf>,
    /// What a filesystem snapshot of this VM starts from.
    snap: SnapSource,
}

/// The parts of a VM's [`DiskInfo`] that come from its request.
struct SnapSource {
    /// The raw template image at the bottom of the disk chain.
    base: PathBuf,
    template: String,
    build_id: String,
    access_token: String,
}

impl SnapSource {
    fn of(spec: &SandboxSpec, base: &Path) -> SnapSource {
        SnapSource {
            base: base.to_path_buf(),
            template: spec.template.name.clone(),
            build_id: spec.template.build_id.clone(),
            access_token: spec.access_token.clone(),
        }
    }
}

struct Launched {
    sandbox: Arc<VmSandbox>,
    ctl: tokio::net::UnixStream,
    /// Descriptor number of the migration stream inside QEMU.
    stream_fd: Option<i32>,
}

/// A failed restore; either way the create boots cold instead. `Launch`: the clone's VMM did
/// not start (no slot, an overlay or netns failure: the cold boot reports it again if it is
/// not the snapshot's fault). `Failed`: the clone ran but did not come up, so the snapshot is
/// dropped and rebuilt by the next create.
enum RestoreError {
    Launch(String),
    Failed(String),
}

/// The backing file of a cold-booted VM's overlay.
struct Backing {
    path: PathBuf,
    format: &'static str,
    /// A snapshot layer's disk, linked to `path` first.
    source: Option<PathBuf>,
    /// The raw template image at the bottom of the chain.
    base: PathBuf,
}

/// A complete snapshot and its key.
#[derive(Debug, Clone)]
struct Snapshot {
    key: String,
    files: SnapshotFiles,
    /// The template image under the golden disk.
    image: PathBuf,
}

impl VmDriver {
    /// Create a sandbox: restored from its key's snapshot when snapshots are on (building the
    /// snapshot first if there is none), booted cold otherwise or when that fails.
    pub async fn create_vm(
        &self,
        spec: SandboxSpec,
        events: EventSink,
    ) -> Result<Arc<VmSandbox>, DriverError> {
        validate_id(&spec.id)?;
        validate_limits(&spec.limits)?;
        let t0 = Instant::now();
        if let Some(newest) = spec.template.layers.first() {
            return self.create_from_layer(&spec, newest, events, t0).await;
        }
        let (image, image_size) = self.image_for(&spec).await?;
        let disk_size = image_size.saturating_add(spec.limits.disk_mb.saturating_mul(1 << 20));
        if self.inner.config.snapshots {
            match self.snapshot_for(&spec, &image, disk_size).await {
                Ok(snap) => match self.restore(&spec, &snap, disk_size, &events, t0).await {
                    Ok(sb) => return Ok(sb),
                    Err(RestoreError::Launch(reason)) => {
                        tracing::warn!(sandbox = %spec.id, snapshot = %snap.key, %reason, "cannot start a clone; booting cold");
                    }
                    Err(RestoreError::Failed(reason)) => {
                        tracing::warn!(sandbox = %spec.id, snapshot = %snap.key, %reason, "restore failed; dropping the snapshot and booting cold");
                        self.forget_snapshot(&snap).await;
                    }
                },
                Err(reason) => {
                    tracing::warn!(sandbox = %spec.id, %reason, "no snapshot; booting cold");
                }
            }
        }
        let backing = Backing {
            path: image.clone(),
            format: "raw",
            source: None,
            base: image,
        };
        self.cold_boot(&spec, backing, disk_size, events, t0).await
    }

    /// A sandbox on a filesystem snapshot: its overlay is backed by the newest layer's disk
    /// (flattened onto the template image, so older layers are not read) and it boots cold
    /// (a golden VM's page cache would not match that disk).
    async fn create_from_layer(
        &self,
        spec: &SandboxSpec,
        newest: &Path,
        events: EventSink,
        t0: Instant,
    ) -> Result<Arc<VmSandbox>, DriverError> {
        let dir = newest.to_path_buf();
        let meta = tokio::task::spawn_blocking(move || layer::read_layer(&dir))
            .await
            .map_err(|e| DriverError::Setup(format!("layer task failed: {e}")))?
            .map_err(DriverError::Setup)?;
        if (meta.template.as_str(), meta.build_id.as_str())
            != (spec.template.name.as_str(), spec.template.build_id.as_str())
        {
            return Err(DriverError::Setup(format!(
                "snapshot layer {} is of template {} build {}, not {} build {}",
                newest.display(),
                meta.template,
                meta.build_id,
                spec.template.name,
                spec.template.build_id
            )));
        }
        let base_size = std::fs::metadata(&meta.base)
            .map_err(io_err(format!("inspecting {}", meta.base.display())))?
            .len();
        // Never smaller than the snapshotted disk: its filesystem was grown to fill it.
        let disk_size = base_size
            .saturating_add(spec.limits.disk_mb.saturating_mul(1 << 20))
            .max(meta.virtual_size);
        let dir = self.inner.config.data_dir.join("sandboxes").join(&spec.id);
        let backing = Backing {
            path: dir.join("layer.qcow2"),
            format: "qcow2",
            source: Some(newest.join(layer::LAYER_DISK)),
            base: meta.base,
        };
        match self.memory_of(newest, &spec.limits) {
            Ok(Some(machine)) => {
                match self
                    .resume(
                        spec,
                        &backing,
                        meta.virtual_size,
                        newest,
                        &machine,
                        &events,
                        t0,
                    )
                    .await
                {
                    Ok(sb) => return Ok(sb),
                    Err(RestoreError::Launch(reason) | RestoreError::Failed(reason)) => {
                        tracing::warn!(sandbox = %spec.id, layer = %newest.display(), %reason, "cannot resume the memory snapshot; booting cold from its files");
                    }
                }
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::info!(sandbox = %spec.id, layer = %newest.display(), %reason, "booting cold from the snapshot's files");
            }
        }
        self.cold_boot(spec, backing, disk_size, events, t0).await
    }

    /// The memory snapshot in layer `dir` if a VM of `limits` can load it: `Ok(None)` for a
    /// filesystem-only layer, `Err(why not)` when there is one that does not fit.
    fn memory_of(&self, dir: &Path, limits: &Limits) -> Result<Option<layer::MachineMeta>, String> {
        let Some(machine) = layer::read_machine(dir)? else {
            return Ok(None);
        };
        if machine.key != self.machine_key(limits, machine.named_memory) {
            return Err(
                "its memory was saved from another machine (other vCPUs or memory, or another \
                 QEMU, kernel or initramfs)"
                    .into(),
            );
        }
        Ok(Some(machine))
    }

    /// Start a sandbox from a memory snapshot: the saved RAM and devices on the saved disk,
    /// then the new sandbox's config line to the running agent, which answers `ready`.
    #[allow(clippy::too_many_arguments)]
    async fn resume(
        &self,
        spec: &SandboxSpec,
        backing: &Backing,
        disk_size: u64,
        layer_dir: &Path,
        machine: &layer::MachineMeta,
        events: &EventSink,
        t0: Instant,
    ) -> Result<Arc<VmSandbox>, RestoreError> {
        let id = spec.id.clone();
        let dir = self.inner.config.data_dir.join("sandboxes").join(&id);
        let stream = std::fs::File::open(layer_dir.join(layer::LAYER_MEMORY))
            .map_err(|e| RestoreError::Launch(format!("opening the memory snapshot: {e}")))?;
        let launched = self
            .launch(VmLaunch {
                name: id.clone(),
                disk: dir.join("disk.qcow2"),
                dir,
                backing: backing.path.clone(),
                backing_fmt: backing.format,
                disk_size,
                limits: spec.limits,
                memory: if machine.named_memory {
                    LaunchMemory::Restored
                } else {
                    LaunchMemory::Anonymous
                },
                qmp: true,
                stream: Some(OwnedFd::from(stream)),
                incoming: true,
                boot: BootPath::Resumed,
                backing_source: backing.source.clone(),
                snap: SnapSource::of(spec, &backing.base),
            })
            .await
            .map_err(|e| RestoreError::Launch(error_chain(&e)))?;
        let sandbox = launched.sandbox;
        let mut loaded_at = None;
        let handshake = async {
            let fd = launched.stream_fd.ok_or("no incoming stream")?;
            // The config line goes out only to a running guest: while the stream loads, the
            // console device is not yet the guest's and could take the line early.
            snapshot::load_and_run(&mut *sandbox.qmp().await?, fd, None).await?;
            let mut reader = BufReader::new(launched.ctl);
            loaded_at = Some(t0.elapsed());
            match tokio::time::timeout(REKEY_DEADLINE, self.configure(spec, &mut reader, events))
                .await
            {
                Ok(answered) => answered?,
                Err(_) => {
                    return Err(format!(
                        "the resumed agent did not answer its config line within \
                         {REKEY_DEADLINE:?}; {}",
                        sandbox.machine_report().await
                    ));
                }
            }
            // Saved with the guest's filesystems frozen (so the files alone are consistent too).
            sandbox
                .fs_thaw()
                .await
                .map_err(|e| format!("thawing the guest's filesystem: {e}"))?;
            Ok::<_, String>(reader)
        };
        match self
            .finish_start(&sandbox, RESUME_DEADLINE, handshake, events.clone())
            .await
        {
            Ok(()) => {
                tracing::info!(
                    sandbox = %id,
                    accel = ?self.inner.decision.accel,
                    boot = "resumed",
                    layer = %layer_dir.display(),
                    launched_ms = loaded_at.map(|d| d.as_millis() as u64),
                    ready_ms = t0.elapsed().as_millis() as u64,
                    "VM ready"
                );
                Ok(sandbox)
            }
            Err(reason) => Err(RestoreError::Failed(reason)),
        }
    }

    fn agent_config(&self, spec: &SandboxSpec) -> AgentConfig {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_nanos()).ok());
        let mut entropy = vec![0u8; 64];
        if fill_random(&mut entropy).is_err() {
            entropy.clear();
        }
        AgentConfig {
            sandbox_id: spec.id.clone(),
            access_token: spec.access_token.clone(),
            env_vars: spec.env_vars.clone(),
            default_user: spec.template.default_user.clone(),
            default_workdir: String::new(),
            port: ENVD_PORT,
            bind: "0.0.0.0".to_string(),
            start: spec.template.start_cmd.clone(),
            host_time_ns: now,
            entropy,
        }
    }

    /// Start one VMM with everything it needs on the host; all undone on failure.
    async fn launch(&self, l: VmLaunch) -> Result<Launched, DriverError> {
        let slot = self.take_slot()?;
        let inner = self.inner.clone();
        let cfg = &inner.config;
        let identity = match (cfg.run_as, &slot) {
            (Some(r), Some(s)) => Some(Identity {
                uid: r.uid_base + s.slot,
                gid: r.gid,
                groups: match inner.decision.accel {
                    Accel::Kvm => inner.kvm_gid.into_iter().collect(),
                    Accel::Tcg => Vec::new(),
                },
            }),
            _ => None,
        };
        struct Prepared {
            net: net::GuestNet,
            cgroup_procs: Vec<std::fs::File>,
            overlay: std::fs::File,
        }
        let prepared = {
            let inner = inner.clone();
            let name = l.name.clone();
            let dir = l.dir.clone();
            let identity = identity.clone();
            let backing = l.backing.clone();
            let backing_fmt = l.backing_fmt;
            let backing_source = l.backing_source.clone();
            let disk = l.disk.clone();
            let disk_size = l.disk_size;
            let golden_ram = match &l.memory {
                LaunchMemory::Golden(p) => Some(p.clone()),
                _ => None,
            };
            let limits = l.limits;
            tokio::task::spawn_blocking(move || -> Result<Prepared, DriverError> {
                let cfg = &inner.config;
                match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return Err(DriverError::Setup(format!("sandbox {name} already exists")));
                    }
                    Err(source) => {
                        return Err(DriverError::Io {
                            context: format!("creating {}", dir.display()),
                            source,
                        });
                    }
                }
                let undo_dir = |e: DriverError| {
                    let _ = std::fs::remove_dir_all(&dir);
                    e
                };
                let tools = ImageTools {
                    mkfs_ext4: cfg.mkfs_ext4.clone(),
                    qemu_img: cfg.qemu_img.clone(),
                };
                // Stays root-owned and read-only for QEMU (a link shares the layer's inode).
                if let Some(src) = &backing_source {
                    layer::link_or_copy(src, &backing).map_err(|e| {
                        undo_dir(io_err(format!(
                            "linking snapshot layer {} into the sandbox",
                            src.display()
                        ))(e))
                    })?;
                }
                image::create_overlay(&tools, &backing, backing_fmt, &disk, disk_size)
                    .map_err(|e| undo_dir(setup_err(e)))?;
                // Opened before the VMM's uid owns the directory (snapshots read it).
                let overlay = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&disk)
                    .map_err(|e| undo_dir(io_err(format!("opening {}", disk.display()))(e)))?;
                let mut owned = vec![dir.clone(), disk.clone()];
                if let Some(ram) = &golden_ram {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(ram)
                        .and_then(|f| f.set_len(limits.memory_mb.saturating_mul(1 << 20)))
                        .map_err(|e| undo_dir(io_err(format!("creating {}", ram.display()))(e)))?;
                    owned.push(ram.clone());
                }
                if let Some(idn) = &identity {
                    for p in &owned {
                        std::os::unix::fs::chown(p, Some(idn.uid), Some(idn.gid))
                            .map_err(|e| undo_dir(io_err(format!("chown {}", p.display()))(e)))?;
                    }
                }
                inner
                    .cgroups
                    .create(&name, vmm_limits(&limits, cfg.overhead_mb, cfg.tb_size_mb))
                    .map_err(|e| undo_dir(setup_err(e)))?;
                let undo_all = |e: DriverError| {
                    let _ = inner.cgroups.remove(&name);
                    undo_dir(e)
                };
                let mut cgroup_procs = Vec::new();
                for f in inner.cgroups.procs_files(&name) {
                    let file = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&f)
                        .map_err(|e| undo_all(io_err(format!("opening {}", f.display()))(e)))?;
                    cgroup_procs.push(file);
                }
                let net = net::create_guest_net().map_err(|e| {
                    undo_all(io_err("creating the VM's network namespace and tap")(e))
                })?;
                Ok(Prepared {
                    net,
                    cgroup_procs,
                    overlay,
                })
            })
            .await
            .map_err(|e| DriverError::Setup(format!("setup task failed: {e}")))??
        };
        let undo_prepared = |inner: Arc<Inner>, name: String, dir: PathBuf| async move {
            let _ = tokio::task::spawn_blocking(move || {
                let _ = inner.cgroups.remove(&name);
                let _ = std::fs::remove_dir_all(&dir);
            })
            .await;
        };

        let sockets = (|| -> io::Result<_> {
            let ctl = socketpair()?;
            let con = socketpair()?;
            let qmp = if l.qmp { Some(socketpair()?) } else { None };
            Ok((ctl, con, qmp))
        })();
        let ((ctl_guest, ctl_host), (con_guest, con_host), qmp) = match sockets {
            Ok(s) => s,
            Err(e) => {
                undo_prepared(inner.clone(), l.name.clone(), l.dir.clone()).await;
                return Err(io_err("creating the VM's sockets")(e));
            }
        };
        let (qmp_guest, qmp_host) = match qmp {
            Some((g, h)) => (Some(g), Some(h)),
            None => (None, None),
        };
        let mut inherit = vec![
            ctl_guest.as_raw_fd(),
            con_guest.as_raw_fd(),
            prepared.net.tap.as_raw_fd(),
        ];
        let memory = match &l.memory {
            LaunchMemory::Anonymous => Memory::Anonymous,
            LaunchMemory::Restored => Memory::Restored,
            LaunchMemory::Golden(p) => Memory::Golden(p.clone()),
            LaunchMemory::Clone(fd) => {
                inherit.push(fd.as_raw_fd());
                Memory::Clone(fd.as_raw_fd())
            }
        };
        if let Some(q) = &qmp_guest {
            inherit.push(q.as_raw_fd());
        }
        let stream_fd = l.stream.as_ref().map(|f| f.as_raw_fd());
        if let Some(fd) = stream_fd {
            inherit.push(fd);
        }
        let machine = MachineInfo {
            named_memory: memory.named(),
            key: self.machine_key(&l.limits, memory.named()),
        };
        let plan = QemuPlan {
            accel: inner.decision.accel,
            tb_size_mb: cfg.tb_size_mb,
            vcpus: l.limits.cpu_count,
            memory_mb: l.limits.memory_mb,
            kernel: cfg.kernel(),
            initramfs: cfg.initramfs(),
            disk: Some(l.disk.clone()),
            control_fd: ctl_guest.as_raw_fd(),
            serial_fd: con_guest.as_raw_fd(),
            tap_fd: Some(prepared.net.tap.as_raw_fd()),
            mode: BootMode::Run,
            memory,
            qmp_fd: qmp_guest.as_ref().map(|q| q.as_raw_fd()),
            incoming: l.incoming,
            tsc_khz: inner.tsc_khz,
        };

        let snap_identity = identity.clone().map(|i| Identity {
            groups: Vec::new(),
            ..i
        });
        let launched = vmm::spawn(Launch {
            program: cfg.qemu.clone(),
            args: plan.args(),
            inherit,
            cgroup_procs: prepared.cgroup_procs,
            identity,
        });
        // QEMU holds its own copies now.
        drop(ctl_guest);
        drop(con_guest);
        drop(qmp_guest);
        drop(l.stream);
        let net::GuestNet { netns, tap } = prepared.net;
        drop(tap);
        let started = match launched {
            Ok(s) => s,
            Err(e) => {
                undo_prepared(inner.clone(), l.name.clone(), l.dir.clone()).await;
                return Err(io_err("starting QEMU")(e));
            }
        };

        let (exit_tx, exit_rx) = watch::channel(None);
        let console = Tail::default();
        let stderr_tail = Tail::default();
        let mut tasks = vec![vmm::spawn_tail_reader(
            "console",
            l.name.clone(),
            con_host,
            console.clone(),
        )];
        if let Some(err) = started.stderr {
            tasks.push(vmm::spawn_tail_reader(
                "qemu",
                l.name.clone(),
                err,
                stderr_tail.clone(),
            ));
        }
        let mut child = started.child;
        // The waiter is not aborted by teardown's task list: it must outlive the kill.
        tokio::spawn(async move {
            let info = match child.wait().await {
                Ok(status) => ExitInfo {
                    reason: exit_reason(&status),
                },
                Err(e) => ExitInfo {
                    reason: format!("lost track of the VMM: {e}"),
                },
            };
            let _ = exit_tx.send(Some(info));
        });
        let sandbox = Arc::new(VmSandbox {
            id: l.name.clone(),
            isolation: self.isolation(),
            pidfd: Arc::new(started.pidfd),
            netns: Mutex::new(Some(Arc::new(netns))),
            cgroups: inner.cgroups.clone(),
            dir: l.dir.clone(),
            exit_rx,
            destroyed: tokio::sync::Mutex::new(false),
            tasks: Mutex::new(tasks),
            console,
            stderr: stderr_tail,
            slot: Mutex::new(slot),
            boot: l.boot,
            disk: DiskInfo {
                overlay: Arc::new(prepared.overlay),
                work_root: cfg.data_dir.join("sandboxes"),
                identity: snap_identity,
                base: l.snap.base,
                template: l.snap.template,
                build_id: l.snap.build_id,
                access_token: l.snap.access_token,
                qemu_img: cfg.qemu_img.clone(),
                gid: cfg.run_as.map(|r| r.gid),
                agent_timeout: self.ready_timeout(),
                virtual_size: l.disk_size,
            },
            lifecycle: tokio::sync::Mutex::new(()),
            qmp: tokio::sync::Mutex::new(match qmp_host {
                Some(h) => QmpConn::Unopened(h),
                None => QmpConn::Lost,
            }),
            machine,
        });
        Ok(Launched {
            sandbox,
            ctl: ctl_host,
            stream_fd,
        })
    }

    /// Wait for a start's `handshake` (its agent's `ready`) within `deadline`, then keep
    /// forwarding the agent's events. On failure the VM is torn down and the error is the
    /// reason with how QEMU ended ([`Self::failed`]).
    async fn finish_start(
        &self,
        sandbox: &VmSandbox,
        deadline: Duration,
        handshake: impl std::future::Future<Output = Result<BufReader<tokio::net::UnixStream>, String>>,
        events: EventSink,
    ) -> Result<(), String> {
        let result = match tokio::time::timeout(deadline, handshake).await {
            Ok(r) => r,
            Err(_) => Err(format!("no ready event within {deadline:?}")),
        };
        match result {
            Ok(reader) => {
                let task = spawn_event_reader(sandbox.id.clone(), reader, events);
                if let Ok(mut t) = sandbox.tasks.lock() {
                    t.push(task);
                }
                Ok(())
            }
            Err(reason) => Err(self.failed(sandbox, reason).await),
        }
    }

    /// Tear down a VM that did not come up; the reason, with how QEMU ended and its last words.
    async fn failed(&self, sandbox: &VmSandbox, reason: String) -> String {
        // Let a dying VMM finish so the reason can say how it ended.
        let exit =
            cella_jail::sandbox::exit_within(&sandbox.exit_rx, Duration::from_millis(300)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let diag = sandbox.diagnostics();
        if let Err(e) = sandbox.teardown().await {
            tracing::warn!(vm = %sandbox.id, "cleanup after failed start: {e}");
        }
        let mut reason = reason;
        if let Some(info) = exit {
            reason = format!("{reason} ({})", info.reason);
        }
        if !diag.is_empty() {
            reason = format!("{reason}; {diag}");
        }
        reason
    }

    /// Send the config and wait for ready; keeps forwarding events afterwards.
    async fn configure(
        &self,
        spec: &SandboxSpec,
        reader: &mut BufReader<tokio::net::UnixStream>,
        events: &EventSink,
    ) -> Result<(), String> {
        let config = self.agent_config(spec);
        let mut line =
            serde_json::to_vec(&config).map_err(|e| format!("encoding the config: {e}"))?;
        line.push(b'\n');
        reader
            .get_mut()
            .write_all(&line)
            .await
            .map_err(|e| format!("sending the config: {e}"))?;
        wait_ready(&spec.id, reader, events).await
    }

    async fn cold_boot(
        &self,
        spec: &SandboxSpec,
        backing: Backing,
        disk_size: u64,
        events: EventSink,
        t0: Instant,
    ) -> Result<Arc<VmSandbox>, DriverError> {
        let id = spec.id.clone();
        let dir = self.inner.config.data_dir.join("sandboxes").join(&id);
        let layered = backing.source.is_some();
        let launched = self
            .launch(VmLaunch {
                name: id.clone(),
                disk: dir.join("disk.qcow2"),
                dir,
                backing: backing.path,
                backing_fmt: backing.format,
                disk_size,
                limits: spec.limits,
                memory: LaunchMemory::Anonymous,
                // For memory snapshots (`snapshot_memory`).
                qmp: true,
                stream: None,
                incoming: false,
                boot: BootPath::Cold,
                backing_source: backing.source,
                snap: SnapSource::of(spec, &backing.base),
            })
            .await?;
        let sandbox = launched.sandbox;
        let timeout = self.ready_timeout();
        let mut boot_at = None;
        let handshake = async {
            let mut reader = BufReader::new(launched.ctl);
            wait_init(&mut reader, INIT_OK).await?;
            boot_at = Some(t0.elapsed());
            self.configure(spec, &mut reader, &events).await?;
            Ok::<_, String>(reader)
        };
        match self
            .finish_start(&sandbox, timeout, handshake, events.clone())
            .await
        {
            Ok(()) => {
                tracing::info!(
                    sandbox = %id,
                    accel = ?self.inner.decision.accel,
                    boot = "cold",
                    layered,
                    init_ms = boot_at.map(|d| d.as_millis() as u64),
                    ready_ms = t0.elapsed().as_millis() as u64,
                    "VM ready"
                );
                Ok(sandbox)
            }
            Err(reason) => Err(DriverError::AgentNotReady(reason)),
        }
    }

    async fn restore(
        &self,
        spec: &SandboxSpec,
        snap: &Snapshot,
        disk_size: u64,
        events: &EventSink,
        t0: Instant,
    ) -> Result<Arc<VmSandbox>, RestoreError> {
        let id = spec.id.clone();
        let dir = self.inner.config.data_dir.join("sandboxes").join(&id);
        let ram = self
            .sealed_ram(snap)
            .await
            .map_err(|e| RestoreError::Failed(format!("loading the snapshot's RAM: {e}")))?;
        let state = std::fs::File::open(snap.files.state())
            .map_err(|e| RestoreError::Failed(format!("opening the device state: {e}")))?;
        let launched = self
            .launch(VmLaunch {
                name: id.clone(),
                disk: dir.join("disk.qcow2"),
                dir,
                backing: snap.files.disk(),
                backing_fmt: "qcow2",
                disk_size,
                limits: spec.limits,
                memory: LaunchMemory::Clone(ram),
                qmp: true,
                stream: Some(OwnedFd::from(state)),
                incoming: true,
                boot: BootPath::Restored,
                backing_source: None,
                snap: SnapSource::of(spec, &snap.image),
            })
            .await
            .map_err(|e| RestoreError::Launch(error_chain(&e)))?;
        let sandbox = launched.sandbox;
        let t_launch = t0.elapsed();
        let mut resumed_at = None;
        let handshake = async {
            let fd = launched.stream_fd.ok_or("no incoming stream")?;
            snapshot::load_and_run(
                &mut *sandbox.qmp().await?,
                fd,
                Some(snapshot::ignore_shared()),
            )
            .await?;
            resumed_at = Some(t0.elapsed());
            let mut reader = BufReader::new(launched.ctl);
            self.configure(spec, &mut reader, events).await?;
            Ok::<_, String>(reader)
        };
        match self
            .finish_start(&sandbox, RESTORE_DEADLINE, handshake, events.clone())
            .await
        {
            Ok(()) => {
                tracing::info!(
                    sandbox = %id,
                    accel = ?self.inner.decision.accel,
                    boot = "restored",
                    snapshot = %snap.key,
                    launch_ms = t_launch.as_millis() as u64,
                    resumed_ms = resumed_at.map(|d| d.as_millis() as u64),
                    ready_ms = t0.elapsed().as_millis() as u64,
                    "VM ready"
                );
                Ok(sandbox)
            }
            Err(reason) => Err(RestoreError::Failed(reason)),
        }
    }

    /// Everything a memory snapshot's stream depends on besides the disk, hashed: a VM of
    /// `limits` whose RAM is named or not loads only a stream saved with the same key.
    fn machine_key(&self, limits: &Limits, named_memory: bool) -> String {
        let memory = if named_memory {
            Memory::Restored
        } else {
            Memory::Anonymous
        };
        // bump the tag when the memory snapshot layout or the guest protocol changes
        self.machine_hash(vec!["cella-vm-machine-1".to_string()], limits, memory, true)
    }

    /// Everything a clone depends on, hashed: the key of its snapshot.
    fn snapshot_key(&self, image: &Path, limits: &Limits, disk_size: u64) -> String {
        let head = vec![
            // bump when the snapshot layout or the guest protocol changes
            "cella-vm-snapshot-1".to_string(),
            image.to_string_lossy().into_owned(),
            disk_size.to_string(),
        ];
        self.machine_hash(head, limits, Memory::Golden(PathBuf::from("ram")), false)
    }

    /// `head`, then QEMU's version, the kernel's and initramfs's stamps and the whole QEMU
    /// command line of a sandbox of `limits` (placeholder descriptors and paths), hashed.
    fn machine_hash(
        &self,
        mut parts: Vec<String>,
        limits: &Limits,
        memory: Memory,
        incoming: bool,
    ) -> String {
        let cfg = &self.inner.config;
        let canonical = QemuPlan {
            accel: self.inner.decision.accel,
            tb_size_mb: cfg.tb_size_mb,
            vcpus: limits.cpu_count,
            memory_mb: limits.memory_mb,
            kernel: cfg.kernel(),
            initramfs: cfg.initramfs(),
            disk: Some(PathBuf::from("disk")),
            control_fd: 3,
            serial_fd: 4,
            tap_fd: Some(5),
            mode: BootMode::Run,
            memory,
            qmp_fd: Some(6),
            incoming,
            tsc_khz: self.inner.tsc_khz,
        };
        parts.extend([
            self.inner.qemu_version.clone(),
            file_stamp(&cfg.kernel()),
            file_stamp(&cfg.initramfs()),
        ]);
        if self.inner.decision.accel == Accel::Kvm {
            // `-cpu host`: the guest's CPU is this host's (TCG's `max` is the same everywhere).
            parts.push(format!("host cpu\n{}", self.inner.cpu_identity));
        }
        parts.extend(canonical.args());
        snapshot::key(&parts)
    }

    /// The complete snapshot for this request's key, built (once, under a per-key lock) if
    /// there is none yet.
    async fn snapshot_for(
        &self,
        spec: &SandboxSpec,
        image: &Path,
        disk_size: u64,
    ) -> Result<Snapshot, String> {
        let key = self.snapshot_key(image, &spec.limits, disk_size);
        let files = SnapshotFiles {
            dir: self.snapshots_dir().join(&key),
        };
        let snap = Snapshot {
            key: key.clone(),
            files,
            image: image.to_path_buf(),
        };
        if snap.files.complete() {
            return Ok(snap);
        }
        let lock = {
            let mut locks = self
                .inner
                .snapshot_locks
                .lock()
                .map_err(|_| "snapshot lock table poisoned".to_string())?;
            locks.entry(key.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if snap.files.complete() {
            return Ok(snap);
        }
        let t = Instant::now();
        self.build_snapshot(&snap, image, &spec.limits, disk_size)
            .await?;
        self.inner
            .built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(snapshot = %key, took_ms = t.elapsed().as_millis() as u64, "built VM snapshot");
        Ok(snap)
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.inner.config.data_dir.join("snapshots")
    }

    /// Boot the golden VM to the agent's config wait, save its device state, keep its RAM
    /// file and disk; install the result atomically.
    async fn build_snapshot(
        &self,
        snap: &Snapshot,
        image: &Path,
        limits: &Limits,
        disk_size: u64,
    ) -> Result<(), String> {
        let n = self
            .inner
            .tmp_counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = SnapshotFiles {
            dir: self
                .snapshots_dir()
                .join(format!(".tmp-{}-{}-{n}", snap.key, std::process::id())),
        };
        let name = format!("gold{}", &snap.key[..snap.key.len().min(20)]);
        let (state_w, state_r) = pipe_pair().map_err(|e| format!("creating a pipe: {e}"))?;
        let launched = self
            .launch(VmLaunch {
                name: name.clone(),
                disk: tmp.disk(),
                dir: tmp.dir.clone(),
                backing: image.to_path_buf(),
                backing_fmt: "raw",
                disk_size,
                limits: *limits,
                memory: LaunchMemory::Golden(tmp.ram()),
                qmp: true,
                stream: None,
                incoming: false,
                boot: BootPath::Cold,
                backing_source: None,
                snap: SnapSource {
                    base: image.to_path_buf(),
                    template: String::new(),
                    build_id: String::new(),
                    access_token: String::new(),
                },
            })
            .await
            .map_err(|e| format!("starting the golden VM: {}", error_chain(&e)))?;
        let sandbox = launched.sandbox;
        let state_path = tmp.state();
        // Drain the migration stream into the state file (QEMU cannot open files itself).
        let copier = tokio::task::spawn_blocking(move || -> io::Result<u64> {
            let mut r = std::fs::File::from(state_r);
            let mut w = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&state_path)?;
            let n = io::copy(&mut r, &mut w)?;
            w.sync_all()?;
            Ok(n)
        });
        let timeout = self.ready_timeout() + SNAPSHOT_DEADLINE;
        let t0 = Instant::now();
        let mut booted = None;
        let work = async {
            let mut reader = BufReader::new(launched.ctl);
            wait_init(&mut reader, INIT_OK).await?;
            wait_init(&mut reader, AWAITING_CONFIG).await?;
            booted = Some(t0.elapsed());
            // Let the agent enter its read and the guest go idle.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut qmp = sandbox.qmp().await?;
            snapshot::stop_and_save(&mut qmp, state_w, false).await?;
            Ok::<_, String>(reader)
        };
        let result = match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(format!("the golden VM did not snapshot within {timeout:?}")),
        };
        if let Err(reason) = result {
            let reason = self.failed(&sandbox, reason).await;
            copier.abort();
            let dir = tmp.dir.clone();
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
            return Err(format!("building the snapshot: {reason}"));
        }
        // QEMU is done with its RAM and disk; the stream's write end closes with it.
        let _ = sandbox.kill();
        let copied = copier.await.map_err(|e| format!("state copier: {e}"));
        let install = match copied {
            Ok(Ok(bytes)) => {
                let gid = self.inner.config.run_as.map(|r| r.gid);
                let tmp2 = tmp.clone();
                let dest = snap.files.dir.clone();
                tokio::task::spawn_blocking(move || install_snapshot(&tmp2, &dest, gid))
                    .await
                    .map_err(|e| format!("install task: {e}"))
                    .and_then(|r| r.map_err(|e| format!("installing the snapshot: {e}")))
                    .map(|()| bytes)
            }
            Ok(Err(e)) => Err(format!("writing the state file: {e}")),
            Err(e) => Err(e),
        };
        if let Err(e) = sandbox.teardown().await {
            tracing::warn!(vm = %name, "golden VM cleanup: {e}");
        }
        let bytes = install?;
        tracing::info!(
            snapshot = %snap.key,
            boot_ms = booted.map(|d| d.as_millis() as u64),
            total_ms = t0.elapsed().as_millis() as u64,
            state_bytes = bytes,
            "golden VM saved"
        );
        Ok(())
    }

    /// The snapshot's RAM as a sealed memfd, loaded once per server process.
    async fn sealed_ram(&self, snap: &Snapshot) -> io::Result<Arc<OwnedFd>> {
        if let Ok(rams) = self.inner.rams.lock()
            && let Some(fd) = rams.get(&snap.key)
        {
            return Ok(fd.clone());
        }
        let ram = snap.files.ram();
        let fd = tokio::task::spawn_blocking(move || snapshot::sealed_ram(&ram))
            .await
            .map_err(|e| io::Error::other(format!("loader task: {e}")))??;
        let fd = Arc::new(fd);
        if let Ok(mut rams) = self.inner.rams.lock() {
            return Ok(rams.entry(snap.key.clone()).or_insert(fd).clone());
        }
        Ok(fd)
    }

    /// Drop a snapshot that failed to restore (the next create rebuilds it).
    async fn forget_snapshot(&self, snap: &Snapshot) {
        if let Ok(mut rams) = self.inner.rams.lock() {
            rams.remove(&snap.key);
        }
        let dir = snap.files.dir.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    }
}

/// Make a finished golden VM's files root-owned and read-only for QEMU, then rename the
/// directory into place (readers only ever see complete snapshots).
fn install_snapshot(tmp: &SnapshotFiles, dest: &Path, gid: Option<u32>) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (p, mode, group) in [
        (tmp.ram(), 0o600, None),
        (tmp.state(), 0o600, None),
        // clones' QEMU opens it read-only as a backing file
        (tmp.disk(), 0o640, gid),
        (tmp.dir.clone(), 0o750, gid),
    ] {
        std::os::unix::fs::chown(&p, Some(0), group)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        if p.is_file() {
            std::fs::File::open(&p)?.sync_all()?;
        }
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest)?;
    }
    std::fs::rename(&tmp.dir, dest)
}

/// A pipe: (write end, read end).
pub(crate) fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned these descriptors; nobody else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[1]), OwnedFd::from_raw_fd(fds[0])) })
}

/// Size and mtime of a file, as a key part ("missing" if it is not there).
fn file_stamp(p: &Path) -> String {
    match std::fs::metadata(p) {
        Ok(m) => format!("{}:{}:{}", m.size(), m.mtime(), m.mtime_nsec()),
        Err(_) => "missing".into(),
    }
}

/// Fill `buf` from the kernel's CRNG.
fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = buf.get_mut(done..).unwrap_or_default();
        // SAFETY: getrandom writes at most rest.len() bytes into rest.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

#[async_trait]
impl Driver for VmDriver {
    fn isolation(&self) -> Isolation {
        match self.inner.decision.accel {
            Accel::Kvm => Isolation::MicrovmKvm,
            Accel::Tcg => Isolation::MicrovmTcg,
        }
    }

    async fn create(
        &self,
        spec: SandboxSpec,
        events: EventSink,
    ) -> Result<Arc<dyn SandboxHandle>, DriverError> {
        let sb: Arc<dyn SandboxHandle> = self.create_vm(spec, events).await?;
        Ok(sb)
    }

    /// The guest's link ends in a namespace of its own, where egress adds the sandbox's
    /// interface; the namespace forwards to it (see [`SandboxHandle::set_nameserver`]).
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
            let sandboxes = inner.config.data_dir.join("sandboxes");
            for entry in std::fs::read_dir(&sandboxes)
                .map_err(io_err(format!("listing {}", sandboxes.display())))?
            {
                let entry = entry.map_err(io_err(format!("listing {}", sandboxes.display())))?;
                let path = entry.path();
                let r = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                r.map_err(io_err(format!("removing {}", path.display())))?;
                report.dirs += 1;
            }
            let images = inner.config.data_dir.join("images");
            for entry in std::fs::read_dir(&images)
                .map_err(io_err(format!("listing {}", images.display())))?
            {
                let entry = entry.map_err(io_err(format!("listing {}", images.display())))?;
                if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                    let path = entry.path();
                    std::fs::remove_dir_all(&path)
                        .map_err(io_err(format!("removing {}", path.display())))?;
                    report.other += 1;
                }
            }
            // Half-made snapshots (a server that died while building one).
            let snapshots = inner.config.data_dir.join("snapshots");
            for entry in std::fs::read_dir(&snapshots)
                .map_err(io_err(format!("listing {}", snapshots.display())))?
            {
                let entry = entry.map_err(io_err(format!("listing {}", snapshots.display())))?;
                if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                    let path = entry.path();
                    std::fs::remove_dir_all(&path)
                        .map_err(io_err(format!("removing {}", path.display())))?;
                    report.other += 1;
                }
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

    #[test]
    fn ids_and_limits() {
        assert!(validate_id("abc123").is_ok());
        for bad in ["", "ABC", "a-b", "a/b", "../x", "a,b"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_limits(&Limits::default()).is_ok());
        let l = Limits {
            memory_mb: 64,
            ..Limits::default()
        };
        assert!(
            validate_limits(&l).is_err(),
            "too little RAM for a guest kernel"
        );
        let l = Limits {
            cpu_count: MAX_VCPUS + 1,
            ..Limits::default()
        };
        assert!(validate_limits(&l).is_err());
    }

    #[test]
    fn vmm_limits_add_overhead() {
        let l = Limits {
            cpu_count: 2,
            memory_mb: 256,
            disk_mb: 512,
            max_pids: 10,
        };
        let v = vmm_limits(&l, 160, 32);
        assert_eq!(v.memory_bytes, (256 + 160 + 32) << 20);
        assert_eq!(v.cpu_quota_us, 225_000);
        assert_eq!(v.pids, 98);
    }

    fn config_in(tmp: &Path) -> VmConfig {
        let assets = tmp.join("assets");
        std::fs::create_dir_all(&assets).expect("mkdir");
        std::fs::write(assets.join("vmlinux"), b"ELF").expect("write");
        std::fs::write(assets.join("initramfs.cpio"), b"070701").expect("write");
        std::fs::write(tmp.join("agent"), b"agent").expect("write");
        VmConfig::new(tmp.join("data"), assets, tmp.join("agent"))
    }

    #[test]
    fn config_validation() {
        let tmp = tempfile::tempdir().expect("tmp");
        let good = config_in(tmp.path());
        good.validate().expect("valid");

        let mut c = good.clone();
        c.data_dir = PathBuf::from("rel");
        assert!(c.validate().is_err());
        let mut c = good.clone();
        c.data_dir = tmp.path().join("a,b");
        assert!(c.validate().is_err());
        let mut c = good.clone();
        c.tb_size_mb = 0;
        assert!(c.validate().is_err());
        let mut c = good.clone();
        c.overhead_mb = 10;
        assert!(c.validate().is_err());
        let mut c = good.clone();
        c.run_as = Some(RunAs {
            uid_base: u32::MAX,
            slots: 2,
            gid: 1,
        });
        assert!(c.validate().is_err());
        std::fs::remove_file(good.kernel()).expect("rm");
        let err = good.validate().expect_err("no kernel");
        assert!(err.to_string().contains("scripts/vm-assets"), "{err}");
    }

    #[tokio::test]
    async fn init_handshake_lines() {
        let input: &[u8] = b"noise\n\xff\xfe garbage\ncella-init: ok\r\nrest";
        let mut r = BufReader::new(input);
        wait_init(&mut r, INIT_OK).await.expect("ok line");
        let input: &[u8] = b"cella-init: error: cannot mount the root filesystem\n";
        let mut r = BufReader::new(input);
        let err = wait_init(&mut r, INIT_OK).await.expect_err("error line");
        assert!(err.contains("cannot mount the root filesystem"), "{err}");
        let long = vec![b'a'; 100_000];
        let mut r = BufReader::new(long.as_slice());
        let err = wait_init(&mut r, INIT_OK).await.expect_err("eof");
        assert!(err.contains("closed"), "{err}");
    }

    #[tokio::test]
    async fn ready_forwards_events() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let input: &[u8] = b"{\"event\":\"make_dir\",\"path\":\"/x\"}\nnot json\n{\"event\":\"ready\",\"version\":\"1\"}\n";
        let mut r = BufReader::new(input);
        wait_ready("s1", &mut r, &tx).await.expect("ready");
        let first = rx.try_recv().expect("event");
        assert_eq!(first.sandbox_id, "s1");
        assert!(matches!(first.event, AgentEvent::MakeDir { .. }));
        assert!(matches!(
            rx.try_recv().expect("ready").event,
            AgentEvent::Ready { .. }
        ));
    }
}
