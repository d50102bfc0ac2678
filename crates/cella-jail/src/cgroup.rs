//! Per-sandbox cgroups: memory, CPU and pid limits, usage, and killing what is left.
//!
//! Why a cgroup per sandbox: the limits must hold for every process inside, including ones the
//! agent never saw (double forks, daemons), and the kernel's memcg OOM killer must pick its
//! victim *inside* the sandbox so the host and other sandboxes carry on. The cgroup is also the
//! only complete list of a sandbox's processes after a server crash, which is what
//! [`Cgroups::kill_all`] and the orphan reaper rely on.
//!
//! Why one module for both drivers: this crate is also the "jailer" of the microVM driver's
//! VMM processes (the Firecracker model: the VMM itself is confined like any other untrusted
//! process, and a QEMU cgroup caps guest RAM plus VMM overhead). The two drivers differ only
//! in the parent name ([`JAIL_PARENT`], `cella-vm`) and in the limits they write
//! ([`CgroupLimits`]), so the subtle parts (v1/v2 detection, controller delegation, killing
//! until empty, `rmdir` retries, instance scoping) exist once.
//!
//! Layout: every sandbox gets `<parent>/<instance>/<id>` in each controller it needs. The
//! instance level keeps several cella servers (or test runs) on one host apart: the orphan
//! reaper of one must never kill the live sandboxes of another. The drivers derive the
//! instance name from their data directory ([`crate::instance_name`]), so a restarted server
//! finds its own leftovers.
//!
//! ```text
//! v2 (unified):  <root>/<parent>/<inst>/<id>/{memory.max, memory.swap.max, cpu.max, pids.max, cgroup.kill}
//! v1 (legacy):   <root>/memory/<parent>/<inst>/<id>/memory.limit_in_bytes (+ memory.memsw.limit_in_bytes)
//!                <root>/cpu/<parent>/<inst>/<id>/cpu.cfs_{period,quota}_us
//!                <root>/cpuacct/<parent>/<inst>/<id>/cpuacct.usage   (if a separate hierarchy)
//!                <root>/pids/<parent>/<inst>/<id>/pids.max
//!                <root>/freezer/<parent>/<inst>/<id>/freezer.state (if mounted: pause/resume)
//! ```
//!
//! Pausing a sandbox is freezing its cgroup ([`Cgroups::freeze`]): v2 `cgroup.freeze` (done
//! when `cgroup.events` says `frozen 1`), v1 `freezer.state` (`FREEZING` until every task is
//! stopped, then `FROZEN`). Both drivers pause this way — a jail's processes and a microVM's
//! QEMU alike — so memory stays resident and nothing is serialized. A frozen v1 task does not
//! act on SIGKILL until thawed, so [`Cgroups::kill_all`] thaws first.
//!
//! All paths hang off a root given to [`Cgroups::detect`], so the file handling is tested
//! against a temporary directory; only killing and `rmdir` semantics need the real cgroupfs.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cella_core::driver::{Limits, SandboxStats};

/// Name of the top cgroup all jail sandboxes (of every cella instance) live under.
pub const JAIL_PARENT: &str = "cella";

/// CFS period used for CPU quotas, in microseconds.
pub const CFS_PERIOD_US: u64 = 100_000;

/// How long [`Cgroups::remove`] keeps retrying `rmdir` while the cgroup is busy.
const REMOVE_DEADLINE: Duration = Duration::from_secs(5);

/// How often [`Cgroups::freeze`] looks whether the freeze completed.
const FREEZE_POLL: Duration = Duration::from_millis(2);

/// Errors of cgroup handling.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a usable cgroup v2 nor the v1 controllers were found.
    #[error("no usable cgroup hierarchy under {root}: {reason}")]
    Unavailable {
        /// The cgroup root that was probed.
        root: PathBuf,
        /// What was missing.
        reason: String,
    },
    /// A cgroup file or directory operation failed.
    #[error("cgroup operation on {path} failed")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file held something that is not the number the kernel writes there.
    #[error("unexpected content in {path}")]
    Parse {
        /// The file.
        path: PathBuf,
    },
    /// The cgroup still had processes after the kill deadline.
    #[error("cgroup {path} still busy after killing its processes")]
    Busy {
        /// The cgroup directory.
        path: PathBuf,
    },
    /// The host has no freezer: v1 without a `freezer` hierarchy, or a v2 kernel older than
    /// 5.2 (no `cgroup.freeze`).
    #[error("no cgroup freezer for {path}: {reason}")]
    NoFreezer {
        /// The cgroup directory.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// Not every task stopped within the deadline; the cgroup was thawed again.
    #[error("cgroup {path} did not finish freezing within {waited:?} (thawed again)")]
    FreezeTimeout {
        /// The cgroup directory.
        path: PathBuf,
        /// How long it waited.
        waited: Duration,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What one sandbox's cgroups enforce, in the units the kernel files take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Memory cap in bytes (swap is disabled where the kernel accounts it).
    pub memory_bytes: u64,
    /// CPU quota per [`CFS_PERIOD_US`], microseconds.
    pub cpu_quota_us: u64,
    /// Maximum processes (v1 and v2 count threads too).
    pub pids: u64,
}

impl From<&Limits> for CgroupLimits {
    /// A jail sandbox's limits: exactly its memory, one period per CPU, its pid cap.
    fn from(l: &Limits) -> CgroupLimits {
        CgroupLimits {
            memory_bytes: l.memory_mb.saturating_mul(1024 * 1024),
            cpu_quota_us: u64::from(l.cpu_count).saturating_mul(CFS_PERIOD_US),
            pids: l.max_pids,
        }
    }
}

/// Which cgroup interface the host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupMode {
    /// The unified hierarchy (`cgroup2`) with memory, cpu and pids available.
    V2 {
        /// The cgroup2 mount (`/sys/fs/cgroup`).
        root: PathBuf,
        /// `memory.swap.max` exists (swap accounting), so swap can be disabled per sandbox.
        swap: bool,
    },
    /// Separate v1 hierarchies per controller.
    V1 {
        /// The memory hierarchy.
        memory: PathBuf,
        /// The cpu hierarchy (may be the same directory as `cpuacct`).
        cpu: PathBuf,
        /// The cpuacct hierarchy, if mounted.
        cpuacct: Option<PathBuf>,
        /// The pids hierarchy.
        pids: PathBuf,
        /// The freezer hierarchy, if mounted (needed to pause sandboxes).
        freezer: Option<PathBuf>,
        /// `memory.memsw.limit_in_bytes` exists (swap accounting).
        memsw: bool,
    },
}

/// The cgroups of one driver instance (`<parent>/<instance>`), rooted at a configurable path.
#[derive(Debug, Clone)]
pub struct Cgroups {
    mode: CgroupMode,
    parent: String,
    instance: String,
}

fn read_trimmed(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(io_err(path))
}

fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let s = read_trimmed(path)?;
    s.parse::<u64>().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
    })
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_err(path))
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Resolve a v1 hierarchy directory (`cpu` is often a symlink to `cpu,cpuacct`).
fn v1_hierarchy(root: &Path, name: &str) -> Option<PathBuf> {
    let p = root.join(name);
    if p.join("cgroup.procs").is_file() {
        Some(std::fs::canonicalize(&p).unwrap_or(p))
    } else {
        None
    }
}

impl Cgroups {
    /// [`Cgroups::detect_under`] for jail sandboxes (parent [`JAIL_PARENT`]).
    pub fn detect(root: &Path, instance: &str) -> Result<Cgroups, CgroupError> {
        Cgroups::detect_under(root, JAIL_PARENT, instance)
    }

    /// Probe `root` for cgroup v2 (preferred when memory, cpu and pids are all available in
    /// `cgroup.controllers`) or the v1 memory/cpu/pids hierarchies. Reads only. `parent`
    /// (`[a-z0-9-]+`, e.g. `cella` or `cella-vm`) is the driver's top cgroup, `instance`
    /// (`[a-z0-9]+`) names this server's level under it.
    pub fn detect_under(root: &Path, parent: &str, instance: &str) -> Result<Cgroups, CgroupError> {
        let name_ok = |name: &str, dash: bool| {
            !name.is_empty()
                && !name.starts_with('-')
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || (dash && b == b'-'))
        };
        if !name_ok(parent, true) {
            return Err(CgroupError::Unavailable {
                root: root.to_path_buf(),
                reason: format!("invalid parent cgroup name {parent:?}"),
            });
        }
        if !name_ok(instance, false) {
            return Err(CgroupError::Unavailable {
                root: root.to_path_buf(),
                reason: format!("invalid instance name {instance:?}"),
            });
        }
        let parent = parent.to_string();
        let instance = instance.to_string();
        let controllers = root.join("cgroup.controllers");
        let mut v2_reason = String::from("no cgroup.controllers");
        if controllers.is_file() {
            let list = read_trimmed(&controllers)?;
            let have: BTreeSet<&str> = list.split_whitespace().collect();
            let missing: Vec<&str> = ["memory", "cpu", "pids"]
                .into_iter()
                .filter(|c| !have.contains(c))
                .collect();
            if missing.is_empty() {
                return Ok(Cgroups {
                    mode: CgroupMode::V2 {
                        root: root.to_path_buf(),
                        swap: false,
                    },
                    parent,
                    instance,
                });
            }
            v2_reason = format!("cgroup2 lacks controllers {}", missing.join(","));
        }
        let memory = v1_hierarchy(root, "memory");
        let cpu = v1_hierarchy(root, "cpu");
        let pids = v1_hierarchy(root, "pids");
        match (memory, cpu, pids) {
            (Some(memory), Some(cpu), Some(pids)) => {
                let cpuacct = v1_hierarchy(root, "cpuacct");
                let freezer = v1_hierarchy(root, "freezer");
                let memsw = memory.join("memory.memsw.limit_in_bytes").is_file();
                Ok(Cgroups {
                    mode: CgroupMode::V1 {
                        memory,
                        cpu,
                        cpuacct,
                        pids,
                        freezer,
                        memsw,
                    },
                    parent,
                    instance,
                })
            }
            (m, c, p) => {
                let mut missing = Vec::new();
                for (name, v) in [("memory", m), ("cpu", c), ("pids", p)] {
                    if v.is_none() {
                        missing.push(name);
                    }
                }
                Err(CgroupError::Unavailable {
                    root: root.to_path_buf(),
                    reason: format!("{v2_reason}; v1 lacks {}", missing.join(",")),
                })
            }
        }
    }

    /// The detected mode.
    pub fn mode(&self) -> &CgroupMode {
        &self.mode
    }

    /// Whether this is the unified hierarchy.
    pub fn is_v2(&self) -> bool {
        matches!(self.mode, CgroupMode::V2 { .. })
    }

    /// The driver's top cgroup name (`cella`, `cella-vm`).
    pub fn parent_name(&self) -> &str {
        &self.parent
    }

    /// This server's level under the parent.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Create the `<parent>/<instance>` cgroups and (v2) enable the controllers for
    /// sandboxes on the way down.
    pub fn prepare(&mut self) -> Result<(), CgroupError> {
        self.ensure_parents()?;
        let swap_file = self
            .v2_dir("x")
            .and_then(|d| d.parent().map(|p| p.join("memory.swap.max")));
        if let (CgroupMode::V2 { swap, .. }, Some(f)) = (&mut self.mode, swap_file) {
            // The parent is a non-root cgroup with memory enabled by its parent, so it shows
            // whether swap accounting exists.
            *swap = f.is_file();
        }
        Ok(())
    }

    /// Make sure `<parent>/<instance>` exists (and, on v2, passes the controllers down). Called
    /// before every create, so an administrator removing the empty parent does not break the
    /// server.
    fn ensure_parents(&self) -> Result<(), CgroupError> {
        match &self.mode {
            CgroupMode::V2 { root, .. } => {
                let top = root.join(&self.parent);
                let parent = self.parent(root);
                for (dir, create) in [(root.clone(), false), (top, true), (parent, true)] {
                    if create {
                        mkdir(&dir)?;
                    }
                    let ctl = dir.join("cgroup.subtree_control");
                    let enabled = read_trimmed(&ctl).unwrap_or_default();
                    let on: BTreeSet<&str> = enabled.split_whitespace().collect();
                    if !["memory", "pids", "cpu"].iter().all(|c| on.contains(c)) {
                        write_file(&ctl, "+memory +pids +cpu")?;
                    }
                }
                Ok(())
            }
            CgroupMode::V1 { .. } => {
                for h in self.hierarchies() {
                    mkdir(&h.join(&self.parent))?;
                    mkdir(&self.parent(&h))?;
                }
                Ok(())
            }
        }
    }

    /// `<hierarchy>/<parent>/<instance>`.
    fn parent(&self, hierarchy: &Path) -> PathBuf {
        hierarchy.join(&self.parent).join(&self.instance)
    }

    /// Every hierarchy directory in use (deduplicated: `cpu` and `cpuacct` may be one).
    pub fn hierarchies(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        let candidates: Vec<&PathBuf> = match &self.mode {
            CgroupMode::V2 { root, .. } => vec![root],
            CgroupMode::V1 {
                memory,
                cpu,
                cpuacct,
                pids,
                freezer,
                ..
            } => {
                let mut v = vec![memory, cpu, pids];
                if let Some(a) = cpuacct {
                    v.push(a);
                }
                if let Some(f) = freezer {
                    v.push(f);
                }
                v
            }
        };
        for c in candidates {
            if !out.contains(c) {
                out.push(c.clone());
            }
        }
        out
    }

    /// Every cgroup directory of sandbox `id`.
    pub fn dirs(&self, id: &str) -> Vec<PathBuf> {
        self.hierarchies()
            .into_iter()
            .map(|h| self.parent(&h).join(id))
            .collect()
    }

    /// The `cgroup.procs` files of `id`: a child opens them before exec and writes `0` to
    /// join every cgroup of the sandbox (how VMM processes are placed).
    pub fn procs_files(&self, id: &str) -> Vec<PathBuf> {
        self.dirs(id)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// The v2 cgroup directory of `id` (for `CLONE_INTO_CGROUP`); `None` on v1.
    pub fn v2_dir(&self, id: &str) -> Option<PathBuf> {
        match &self.mode {
            CgroupMode::V2 { root, .. } => Some(self.parent(root).join(id)),
            CgroupMode::V1 { .. } => None,
        }
    }

    /// Create the cgroups of sandbox `id` and write its limits (a jail's [`Limits`] or the
    /// [`CgroupLimits`] a driver computed). On error the directories created so far are
    /// removed again.
    pub fn create(&self, id: &str, limits: impl Into<CgroupLimits>) -> Result<(), CgroupError> {
        let limits = limits.into();
        self.ensure_parents()?;
        let dirs = self.dirs(id);
        let mut made = Vec::new();
        for d in &dirs {
            match std::fs::create_dir(d) {
                Ok(()) => made.push(d.clone()),
                Err(source) => {
                    self.rmdir_all(&made);
                    return Err(CgroupError::Io {
                        path: d.clone(),
                        source,
                    });
                }
            }
        }
        if let Err(e) = self.write_limits(id, &limits) {
            self.rmdir_all(&made);
            return Err(e);
        }
        Ok(())
    }

    fn rmdir_all(&self, dirs: &[PathBuf]) {
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }

    fn write_limits(&self, id: &str, limits: &CgroupLimits) -> Result<(), CgroupError> {
        let memory = limits.memory_bytes.to_string();
        let quota = limits.cpu_quota_us.to_string();
        let pids = limits.pids.to_string();
        match &self.mode {
            CgroupMode::V2 { root, swap } => {
                let d = self.parent(root).join(id);
                write_file(&d.join("memory.max"), &memory)?;
                if *swap {
                    write_file(&d.join("memory.swap.max"), "0")?;
                }
                write_file(&d.join("cpu.max"), &format!("{quota} {CFS_PERIOD_US}"))?;
                write_file(&d.join("pids.max"), &pids)?;
            }
            CgroupMode::V1 {
                memory: mem_h,
                cpu,
                pids: pids_h,
                memsw,
                ..
            } => {
                let m = self.parent(mem_h).join(id);
                write_file(&m.join("memory.limit_in_bytes"), &memory)?;
                if *memsw {
                    write_file(&m.join("memory.memsw.limit_in_bytes"), &memory)?;
                }
                let c = self.parent(cpu).join(id);
                write_file(&c.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                write_file(&c.join("cpu.cfs_quota_us"), &quota)?;
                let p = self.parent(pids_h).join(id);
                write_file(&p.join("pids.max"), &pids)?;
            }
        }
        Ok(())
    }

    /// Move `pid` into every cgroup of `id` (v1, or v2 without `CLONE_INTO_CGROUP`).
    pub fn attach(&self, id: &str, pid: i32) -> Result<(), CgroupError> {
        for d in self.dirs(id) {
            write_file(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Resource usage of sandbox `id`.
    pub fn stats(&self, id: &str) -> Result<SandboxStats, CgroupError> {
        match &self.mode {
            CgroupMode::V2 { root, .. } => {
                let d = self.parent(root).join(id);
                let memory_bytes = read_u64(&d.join("memory.current"))?;
                let pids = read_u64(&d.join("pids.current"))?;
                let stat_path = d.join("cpu.stat");
                let stat = read_trimmed(&stat_path)?;
                let usec = stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or(CgroupError::Parse { path: stat_path })?;
                Ok(SandboxStats {
                    memory_bytes,
                    cpu_usage_ns: usec.saturating_mul(1000),
                    pids,
                })
            }
            CgroupMode::V1 {
                memory,
                cpuacct,
                pids,
                ..
            } => {
                let memory_bytes =
                    read_u64(&self.parent(memory).join(id).join("memory.usage_in_bytes"))?;
                let pids = read_u64(&self.parent(pids).join(id).join("pids.current"))?;
                let cpu_usage_ns = match cpuacct {
                    Some(a) => read_u64(&self.parent(a).join(id).join("cpuacct.usage"))?,
                    None => 0,
                };
                Ok(SandboxStats {
                    memory_bytes,
                    cpu_usage_ns,
                    pids,
                })
            }
        }
    }

    /// Processes currently in any cgroup of `id` (missing cgroups count as empty).
    pub fn procs(&self, id: &str) -> Result<BTreeSet<i32>, CgroupError> {
        let mut out = BTreeSet::new();
        for d in self.dirs(id) {
            let path = d.join("cgroup.procs");
            match std::fs::read_to_string(&path) {
                Ok(s) => {
                    for l in s.lines() {
                        let pid = l
                            .trim()
                            .parse::<i32>()
                            .map_err(|_| CgroupError::Parse { path: path.clone() })?;
                        out.insert(pid);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(CgroupError::Io { path, source }),
            }
        }
        Ok(out)
    }

    /// Where the freezer of `id` is controlled: (v2) `cgroup.freeze` + `cgroup.events`, or
    /// (v1) `freezer.state`.
    fn freezer_dir(&self, id: &str) -> Result<PathBuf, CgroupError> {
        match &self.mode {
            CgroupMode::V2 { root, .. } => Ok(self.parent(root).join(id)),
            CgroupMode::V1 {
                freezer, memory, ..
            } => match freezer {
                Some(f) => Ok(self.parent(f).join(id)),
                None => Err(CgroupError::NoFreezer {
                    path: self.parent(memory).join(id),
                    reason: "the v1 freezer controller is not mounted".into(),
                }),
            },
        }
    }

    /// Whether sandboxes of this host can be paused (a freezer exists). On v2 the kernel's
    /// `cgroup.freeze` (5.2+) is checked on the instance's parent cgroup.
    pub fn can_freeze(&self) -> bool {
        match &self.mode {
            CgroupMode::V2 { root, .. } => self.parent(root).join("cgroup.freeze").is_file(),
            CgroupMode::V1 { freezer, .. } => freezer.is_some(),
        }
    }

    /// Whether the cgroup of `id` is frozen now (v1: `FROZEN`; `FREEZING` is not yet).
    pub fn is_frozen(&self, id: &str) -> Result<bool, CgroupError> {
        let d = self.freezer_dir(id)?;
        if self.is_v2() {
            let events = d.join("cgroup.events");
            let text = read_trimmed(&events)?;
            match text.lines().find_map(|l| l.strip_prefix("frozen ")) {
                Some(v) => Ok(v.trim() == "1"),
                None => Err(CgroupError::Parse { path: events }),
            }
        } else {
            Ok(read_trimmed(&d.join("freezer.state"))? == "FROZEN")
        }
    }

    /// Freeze every task of `id` and wait until the kernel reports the freeze complete (v2
    /// `frozen 1`, v1 `FROZEN`), at most `deadline`. On timeout the cgroup is thawed again
    /// and [`CgroupError::FreezeTimeout`] returned, so a failed pause leaves it running.
    pub fn freeze(&self, id: &str, deadline: Duration) -> Result<(), CgroupError> {
        let d = self.freezer_dir(id)?;
        let (ctl, value) = if self.is_v2() {
            (d.join("cgroup.freeze"), "1")
        } else {
            (d.join("freezer.state"), "FROZEN")
        };
        if !ctl.is_file() {
            return Err(CgroupError::NoFreezer {
                path: d,
                reason: format!("{} is missing", ctl.display()),
            });
        }
        let start = Instant::now();
        write_file(&ctl, value)?;
        loop {
            if self.is_frozen(id)? {
                return Ok(());
            }
            if start.elapsed() > deadline {
                let _ = self.thaw(id);
                return Err(CgroupError::FreezeTimeout {
                    path: d,
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(FREEZE_POLL);
            if !self.is_v2() {
                // v1 retries the freeze of tasks that were busy only when asked again.
                write_file(&ctl, value)?;
            }
        }
    }

    /// Let the tasks of `id` run again. Thawing a thawed or missing cgroup, or one on a host
    /// without a freezer, is fine.
    pub fn thaw(&self, id: &str) -> Result<(), CgroupError> {
        let Ok(d) = self.freezer_dir(id) else {
            return Ok(());
        };
        let (ctl, value) = if self.is_v2() {
            (d.join("cgroup.freeze"), "0")
        } else {
            (d.join("freezer.state"), "THAWED")
        };
        if !ctl.is_file() {
            return Ok(());
        }
        match std::fs::write(&ctl, value) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CgroupError::Io { path: ctl, source }),
        }
    }

    /// SIGKILL every process in the cgroups of `id` until none is left (or the deadline
    /// passes). Returns how many distinct processes were signalled. A frozen cgroup is thawed
    /// first: a frozen v1 task would keep the signal pending forever.
    pub fn kill_all(&self, id: &str) -> Result<usize, CgroupError> {
        self.thaw(id)?;
        let mut killed = BTreeSet::new();
        if let Some(d) = self.v2_dir(id) {
            let kill_file = d.join("cgroup.kill");
            if kill_file.is_file() {
                killed.extend(self.procs(id)?);
                // cgroup.kill (5.14+) kills atomically, forks included.
                write_file(&kill_file, "1")?;
            }
        }
        let deadline = Instant::now() + REMOVE_DEADLINE;
        loop {
            let procs = self.procs(id)?;
            if procs.is_empty() {
                return Ok(killed.len());
            }
            for pid in procs {
                if pid <= 0 {
                    continue;
                }
                // SAFETY: kill(2) has no memory-safety preconditions; the pid comes from the
                // sandbox's cgroup, which only holds sandbox processes.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                killed.insert(pid);
            }
            if Instant::now() > deadline {
                return Err(CgroupError::Busy {
                    path: self.dirs(id).into_iter().next().unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kill what is left in the cgroups of `id` and remove them. Missing cgroups are fine
    /// (idempotent). Returns (processes killed, cgroup directories removed).
    pub fn remove(&self, id: &str) -> Result<(usize, usize), CgroupError> {
        let killed = self.kill_all(id)?;
        let mut removed = 0;
        for d in self.dirs(id) {
            let deadline = Instant::now() + REMOVE_DEADLINE;
            loop {
                match std::fs::remove_dir(&d) {
                    Ok(()) => {
                        removed += 1;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        if Instant::now() > deadline {
                            return Err(CgroupError::Busy { path: d });
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(source) => return Err(CgroupError::Io { path: d, source }),
                }
            }
        }
        Ok((killed, removed))
    }

    /// Names of every sandbox cgroup of this instance (`<parent>/<instance>/*`) in any
    /// hierarchy; other instances and other parents are never listed.
    pub fn list(&self) -> Result<BTreeSet<String>, CgroupError> {
        let mut out = BTreeSet::new();
        for h in self.hierarchies() {
            let parent = self.parent(&h);
            let entries = match std::fs::read_dir(&parent) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(CgroupError::Io {
                        path: parent,
                        source,
                    });
                }
            };
            for entry in entries {
                let entry = entry.map_err(io_err(&parent))?;
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if let (true, Some(name)) = (is_dir, entry.file_name().to_str()) {
                    out.insert(name.to_string());
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path, content: &str) {
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, content).expect("write");
    }

    fn limits() -> Limits {
        Limits {
            cpu_count: 3,
            memory_mb: 256,
            disk_mb: 100,
            max_pids: 77,
        }
    }

    fn v1_fixture(root: &Path, memsw: bool, cpuacct: bool) {
        touch(&root.join("memory/cgroup.procs"), "");
        if memsw {
            touch(&root.join("memory/memory.memsw.limit_in_bytes"), "");
        }
        touch(&root.join("cpu/cgroup.procs"), "");
        touch(&root.join("pids/cgroup.procs"), "");
        if cpuacct {
            touch(&root.join("cpuacct/cgroup.procs"), "");
        }
    }

    #[test]
    fn v1_limits_are_written() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        v1_fixture(root, true, true);
        let mut cg = Cgroups::detect(root, "t").expect("detect");
        assert!(!cg.is_v2());
        cg.prepare().expect("prepare");
        assert_eq!(cg.hierarchies().len(), 4);
        cg.create("abc", &limits()).expect("create");
        let rd = |p: &str| std::fs::read_to_string(root.join(p)).expect(p);
        assert_eq!(
            rd("memory/cella/t/abc/memory.limit_in_bytes"),
            (256u64 << 20).to_string()
        );
        assert_eq!(
            rd("memory/cella/t/abc/memory.memsw.limit_in_bytes"),
            (256u64 << 20).to_string()
        );
        assert_eq!(rd("cpu/cella/t/abc/cpu.cfs_period_us"), "100000");
        assert_eq!(rd("cpu/cella/t/abc/cpu.cfs_quota_us"), "300000");
        assert_eq!(rd("pids/cella/t/abc/pids.max"), "77");
        assert!(root.join("cpuacct/cella/t/abc").is_dir());
        // creating the same sandbox twice is an error, not a silent reuse
        assert!(cg.create("abc", &limits()).is_err());
        let names = cg.list().expect("list");
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            vec!["abc".to_string()]
        );
    }

    #[test]
    fn v1_without_memsw_skips_swap_limit() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        v1_fixture(root, false, false);
        let mut cg = Cgroups::detect(root, "t").expect("detect");
        cg.prepare().expect("prepare");
        assert_eq!(cg.hierarchies().len(), 3);
        cg.create("x1", &limits()).expect("create");
        assert!(
            !root
                .join("memory/cella/t/x1/memory.memsw.limit_in_bytes")
                .exists()
        );
        assert!(
            root.join("memory/cella/t/x1/memory.limit_in_bytes")
                .exists()
        );
    }

    #[test]
    fn v1_cpu_cpuacct_symlink_is_one_hierarchy() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        touch(&root.join("memory/cgroup.procs"), "");
        touch(&root.join("pids/cgroup.procs"), "");
        touch(&root.join("cpu,cpuacct/cgroup.procs"), "");
        std::os::unix::fs::symlink("cpu,cpuacct", root.join("cpu")).expect("ln");
        std::os::unix::fs::symlink("cpu,cpuacct", root.join("cpuacct")).expect("ln");
        let mut cg = Cgroups::detect(root, "t").expect("detect");
        cg.prepare().expect("prepare");
        assert_eq!(cg.hierarchies().len(), 3);
        cg.create("s", &limits()).expect("create");
        assert!(
            root.join("cpu,cpuacct/cella/t/s/cpu.cfs_quota_us")
                .is_file()
        );
    }

    #[test]
    fn v1_stats_are_read() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        v1_fixture(root, false, true);
        let mut cg = Cgroups::detect(root, "t").expect("detect");
        cg.prepare().expect("prepare");
        cg.create("s", &limits()).expect("create");
        touch(
            &root.join("memory/cella/t/s/memory.usage_in_bytes"),
            "4096\n",
        );
        touch(&root.join("pids/cella/t/s/pids.current"), "5\n");
        touch(&root.join("cpuacct/cella/t/s/cpuacct.usage"), "123456789\n");
        let st = cg.stats("s").expect("stats");
        assert_eq!(
            st,
            SandboxStats {
                memory_bytes: 4096,
                cpu_usage_ns: 123_456_789,
                pids: 5
            }
        );
        touch(&root.join("pids/cella/t/s/pids.current"), "garbage");
        assert!(matches!(cg.stats("s"), Err(CgroupError::Parse { .. })));
    }

    #[test]
    fn v2_limits_and_stats() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        touch(
            &root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        );
        touch(&root.join("cgroup.subtree_control"), "");
        // a real kernel creates these when memory is enabled in the parent
        touch(&root.join("cella/t/memory.swap.max"), "max\n");
        touch(&root.join("cella/t/cgroup.subtree_control"), "");
        let mut cg = Cgroups::detect(root, "t").expect("detect");
        assert!(cg.is_v2());
        cg.prepare().expect("prepare");
        assert_eq!(
            std::fs::read_to_string(root.join("cgroup.subtree_control")).expect("read"),
            "+memory +pids +cpu"
        );
        for level in ["cella", "cella/t"] {
            assert_eq!(
                std::fs::read_to_string(root.join(level).join("cgroup.subtree_control"))
                    .expect("read"),
                "+memory +pids +cpu"
            );
        }
        cg.create("v", &limits()).expect("create");
        let rd = |p: &str| std::fs::read_to_string(root.join(p)).expect(p);
        assert_eq!(rd("cella/t/v/memory.max"), (256u64 << 20).to_string());
        assert_eq!(rd("cella/t/v/memory.swap.max"), "0");
        assert_eq!(rd("cella/t/v/cpu.max"), "300000 100000");
        assert_eq!(rd("cella/t/v/pids.max"), "77");
        assert_eq!(cg.v2_dir("v"), Some(root.join("cella/t/v")));

        touch(&root.join("cella/t/v/memory.current"), "8192\n");
        touch(&root.join("cella/t/v/pids.current"), "2\n");
        touch(
            &root.join("cella/t/v/cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        );
        let st = cg.stats("v").expect("stats");
        assert_eq!(
            st,
            SandboxStats {
                memory_bytes: 8192,
                cpu_usage_ns: 1_500_000,
                pids: 2
            }
        );
    }

    #[test]
    fn v2_without_controllers_falls_back_to_v1_or_fails() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        touch(&root.join("cgroup.controllers"), "hugetlb\n");
        let err = Cgroups::detect(root, "t").expect_err("no controllers anywhere");
        let msg = err.to_string();
        assert!(msg.contains("memory"), "{msg}");
        v1_fixture(root, false, false);
        let cg = Cgroups::detect(root, "t").expect("v1 fallback");
        assert!(!cg.is_v2());
    }

    #[test]
    fn instances_do_not_see_each_other() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        v1_fixture(root, false, false);
        let mut a = Cgroups::detect(root, "a").expect("detect");
        let mut b = Cgroups::detect(root, "b").expect("detect");
        a.prepare().expect("prepare");
        b.prepare().expect("prepare");
        a.create("s1", &limits()).expect("create");
        b.create("s2", &limits()).expect("create");
        assert_eq!(
            a.list().expect("list").into_iter().collect::<Vec<_>>(),
            vec!["s1"]
        );
        assert_eq!(
            b.list().expect("list").into_iter().collect::<Vec<_>>(),
            vec!["s2"]
        );
        assert!(root.join("pids/cella/a/s1").is_dir());
        assert!(Cgroups::detect(root, "../x").is_err());
        assert!(Cgroups::detect(root, "").is_err());
    }

    #[test]
    fn procs_of_missing_cgroup_is_empty_and_parsed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        v1_fixture(root, false, false);
        let mut cg = Cgroups::detect(root, "t").expect("detect");
        cg.prepare().expect("prepare");
        assert!(cg.procs("nope").expect("procs").is_empty());
        assert_eq!(cg.kill_all("nope").expect("kill"), 0);
        cg.create("p", &limits()).expect("create");
        touch(&root.join("pids/cella/t/p/cgroup.procs"), "x\n");
        assert!(matches!(cg.procs("p"), Err(CgroupError::Parse { .. })));
    }
    // The microVM driver's use: its own parent, limits in kernel units, joining by fd.

    fn vmm_limits() -> CgroupLimits {
        CgroupLimits {
            memory_bytes: 384 << 20,
            cpu_quota_us: 125_000,
            pids: 130,
        }
    }

    #[test]
    fn vm_parent_v1_limits_and_procs_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        v1_fixture(root, false, true);
        let mut cg = Cgroups::detect_under(root, "cella-vm", "i1").expect("v1");
        assert!(matches!(cg.mode(), CgroupMode::V1 { memsw: false, .. }));
        assert_eq!(cg.parent_name(), "cella-vm");
        assert_eq!(cg.instance(), "i1");
        cg.prepare().expect("prepare");
        cg.create("abc", vmm_limits()).expect("create");
        let rd = |p: &str| std::fs::read_to_string(root.join(p)).expect(p);
        assert_eq!(
            rd("memory/cella-vm/i1/abc/memory.limit_in_bytes"),
            (384u64 << 20).to_string()
        );
        assert_eq!(rd("cpu/cella-vm/i1/abc/cpu.cfs_quota_us"), "125000");
        assert_eq!(rd("cpu/cella-vm/i1/abc/cpu.cfs_period_us"), "100000");
        assert_eq!(rd("pids/cella-vm/i1/abc/pids.max"), "130");
        assert_eq!(
            cg.procs_files("abc"),
            ["memory", "cpu", "pids", "cpuacct"]
                .iter()
                .map(|h| root
                    .join(h)
                    .canonicalize()
                    .expect("canonical")
                    .join("cella-vm/i1/abc/cgroup.procs"))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            cg.list().expect("list"),
            BTreeSet::from(["abc".to_string()])
        );
        // the jail's tree is not touched
        assert!(!root.join("memory/cella").exists());
        // a second create of the same id fails and leaves the first intact
        assert!(cg.create("abc", vmm_limits()).is_err());
        assert!(root.join("memory/cella-vm/i1/abc").is_dir());
    }

    #[test]
    fn vm_parent_v2_limits_swap_and_stats() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        std::fs::write(root.join("cgroup.controllers"), "cpu pids\n").expect("write");
        let err = Cgroups::detect_under(root, "cella-vm", "i1").expect_err("no memory");
        assert!(
            err.to_string().contains("lacks controllers memory"),
            "{err}"
        );
        touch(&root.join("cgroup.controllers"), "cpu memory pids io\n");
        touch(&root.join("cgroup.subtree_control"), "memory pids cpu\n");
        touch(&root.join("cella-vm/i1/memory.swap.max"), "max\n");
        let mut cg = Cgroups::detect_under(root, "cella-vm", "i1").expect("v2");
        cg.prepare().expect("prepare");
        // already delegated at the root: left alone
        assert_eq!(
            std::fs::read_to_string(root.join("cgroup.subtree_control")).expect("read"),
            "memory pids cpu\n"
        );
        cg.create("x", vmm_limits()).expect("create");
        let rd = |p: &str| std::fs::read_to_string(root.join(p)).expect(p);
        assert_eq!(rd("cella-vm/i1/x/memory.max"), (384u64 << 20).to_string());
        assert_eq!(rd("cella-vm/i1/x/memory.swap.max"), "0");
        assert_eq!(rd("cella-vm/i1/x/cpu.max"), "125000 100000");
        assert_eq!(rd("cella-vm/i1/x/pids.max"), "130");
        assert_eq!(cg.dirs("x"), vec![root.join("cella-vm/i1/x")]);
        assert_eq!(
            cg.procs_files("x"),
            vec![root.join("cella-vm/i1/x/cgroup.procs")]
        );
        touch(&root.join("cella-vm/i1/x/memory.current"), "1048576\n");
        touch(&root.join("cella-vm/i1/x/pids.current"), "7\n");
        touch(
            &root.join("cella-vm/i1/x/cpu.stat"),
            "usage_usec 250\nuser_usec 1\n",
        );
        let s = cg.stats("x").expect("stats");
        assert_eq!(
            s,
            SandboxStats {
                memory_bytes: 1 << 20,
                cpu_usage_ns: 250_000,
                pids: 7
            }
        );
        touch(&root.join("cella-vm/i1/x/cpu.stat"), "garbage");
        assert!(matches!(cg.stats("x"), Err(CgroupError::Parse { .. })));
    }

    #[test]
    fn parents_and_instances_are_apart() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        v1_fixture(root, false, false);
        let mut jail = Cgroups::detect(root, "i1").expect("jail");
        let mut vm = Cgroups::detect_under(root, "cella-vm", "i1").expect("vm");
        let mut vm2 = Cgroups::detect_under(root, "cella-vm", "i2").expect("vm2");
        for cg in [&mut jail, &mut vm, &mut vm2] {
            cg.prepare().expect("prepare");
        }
        jail.create("j", &limits()).expect("create");
        vm.create("v", vmm_limits()).expect("create");
        vm2.create("w", vmm_limits()).expect("create");
        let names = |cg: &Cgroups| cg.list().expect("list").into_iter().collect::<Vec<_>>();
        assert_eq!(names(&jail), vec!["j"]);
        assert_eq!(names(&vm), vec!["v"]);
        assert_eq!(names(&vm2), vec!["w"]);
        // The orphan reaper of one VM instance cannot reach the other's sandbox, not even by
        // name (a real cgroupfs is needed for an actual removal: see tests/jail.rs).
        assert_eq!(vm.remove("w").expect("remove"), (0, 0));
        assert!(root.join("pids/cella-vm/i2/w").is_dir());
        assert!(root.join("pids/cella-vm/i1/v").is_dir());
        assert!(root.join("pids/cella/i1/j").is_dir());
        for bad in ["", "-x", "a/b", "..", "Cella"] {
            assert!(Cgroups::detect_under(root, bad, "i1").is_err(), "{bad:?}");
        }
        assert!(Cgroups::detect_under(root, "cella-vm", "i-1").is_err());
    }

    #[test]
    fn v1_freezer_is_a_hierarchy_and_freezes_and_thaws() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        v1_fixture(root, false, false);
        touch(&root.join("freezer/cgroup.procs"), "");
        let mut cg = Cgroups::detect(root, "t").expect("detect");
        assert!(cg.can_freeze());
        cg.prepare().expect("prepare");
        assert_eq!(cg.hierarchies().len(), 4);
        cg.create("f", &limits()).expect("create");
        let dir = root.join("freezer/cella/t/f");
        assert!(dir.is_dir());
        assert!(cg.dirs("f").contains(&dir.canonicalize().expect("canon")));
        // the kernel creates freezer.state with the cgroup
        touch(&dir.join("freezer.state"), "THAWED\n");
        assert!(!cg.is_frozen("f").expect("state"));
        cg.freeze("f", Duration::from_secs(1)).expect("freeze");
        assert_eq!(
            std::fs::read_to_string(dir.join("freezer.state")).expect("read"),
            "FROZEN"
        );
        assert!(cg.is_frozen("f").expect("state"));
        cg.thaw("f").expect("thaw");
        assert_eq!(
            std::fs::read_to_string(dir.join("freezer.state")).expect("read"),
            "THAWED"
        );
        // killing a frozen sandbox thaws it first (a frozen v1 task ignores SIGKILL)
        cg.freeze("f", Duration::from_secs(1)).expect("freeze");
        assert_eq!(cg.kill_all("f").expect("kill"), 0);
        assert!(!cg.is_frozen("f").expect("state"));
    }

    #[test]
    fn v1_without_freezer_cannot_pause_but_thaw_and_kill_work() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        v1_fixture(root, false, false);
        let mut cg = Cgroups::detect(root, "t").expect("detect");
        assert!(!cg.can_freeze());
        cg.prepare().expect("prepare");
        cg.create("n", &limits()).expect("create");
        let err = cg
            .freeze("n", Duration::from_millis(10))
            .expect_err("no freezer");
        assert!(matches!(err, CgroupError::NoFreezer { .. }), "{err}");
        cg.thaw("n").expect("thaw is a no-op");
        assert_eq!(cg.kill_all("n").expect("kill"), 0);
    }

    fn v2_fixture(root: &Path) -> Cgroups {
        touch(&root.join("cgroup.controllers"), "cpu memory pids\n");
        touch(&root.join("cgroup.subtree_control"), "");
        touch(&root.join("cella/t/cgroup.freeze"), "0\n");
        let mut cg = Cgroups::detect(root, "t").expect("v2");
        cg.prepare().expect("prepare");
        cg
    }

    #[test]
    fn v2_freeze_waits_for_the_kernel_to_report_frozen() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        let cg = v2_fixture(root);
        assert!(cg.can_freeze());
        cg.create("z", &limits()).expect("create");
        let d = root.join("cella/t/z");
        touch(&d.join("cgroup.freeze"), "0\n");
        touch(&d.join("cgroup.events"), "populated 1\nfrozen 0\n");
        let events = d.join("cgroup.events");
        let flip = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(60));
            std::fs::write(events, "populated 1\nfrozen 1\n").expect("write");
        });
        let start = Instant::now();
        cg.freeze("z", Duration::from_secs(5)).expect("freeze");
        let waited = start.elapsed();
        flip.join().expect("join");
        assert!(
            waited >= Duration::from_millis(50),
            "returned early: {waited:?}"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("cgroup.freeze")).expect("read"),
            "1"
        );
        assert!(cg.is_frozen("z").expect("frozen"));
        cg.thaw("z").expect("thaw");
        assert_eq!(
            std::fs::read_to_string(d.join("cgroup.freeze")).expect("read"),
            "0"
        );
    }

    #[test]
    fn v2_freeze_that_never_completes_times_out_and_thaws() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        let cg = v2_fixture(root);
        cg.create("s", &limits()).expect("create");
        let d = root.join("cella/t/s");
        touch(&d.join("cgroup.freeze"), "0\n");
        touch(&d.join("cgroup.events"), "populated 1\nfrozen 0\n");
        let err = cg
            .freeze("s", Duration::from_millis(50))
            .expect_err("never frozen");
        assert!(matches!(err, CgroupError::FreezeTimeout { .. }), "{err}");
        assert_eq!(
            std::fs::read_to_string(d.join("cgroup.freeze")).expect("read"),
            "0",
            "a failed pause must leave the sandbox running"
        );
        touch(&d.join("cgroup.events"), "garbage\n");
        assert!(matches!(cg.is_frozen("s"), Err(CgroupError::Parse { .. })));
        // a kernel without cgroup.freeze (< 5.2) cannot pause
        std::fs::remove_file(d.join("cgroup.freeze")).expect("rm");
        assert!(matches!(
            cg.freeze("s", Duration::from_millis(10)),
            Err(CgroupError::NoFreezer { .. })
        ));
    }

    #[test]
    fn jail_limits_convert_to_kernel_units() {
        assert_eq!(
            CgroupLimits::from(&limits()),
            CgroupLimits {
                memory_bytes: 256 << 20,
                cpu_quota_us: 300_000,
                pids: 77
            }
        );
    }
}
