//! The cgroup of each QEMU process: guest RAM plus VMM overhead, CPU quota, thread count.
//!
//! Why: a guest can only use the RAM it was given, but the VMM around it (TCG translation
//! cache, device emulation, I/O buffers) lives on the host; the cgroup caps the whole process
//! so a misbehaving VMM hurts only its own sandbox. It is also the complete list of what a
//! sandbox left running after a server crash, which the orphan reaper relies on.
//!
//! Layout (parent [`PARENT`], so the jail driver's `cella/` tree is never touched):
//!
//! ```text
//! v2 (unified):  <root>/cella-vm/<id>/{memory.max, cpu.max, pids.max, cgroup.kill}
//! v1 (legacy):   <root>/{memory,cpu,cpuacct,pids}/cella-vm/<id>/...
//! ```
//!
//! All paths hang off the root given to [`VmCgroups::detect`], so the file handling is tested
//! against a temporary directory.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cella_core::driver::SandboxStats;

/// Name of the parent cgroup every VM lives under.
pub const PARENT: &str = "cella-vm";

/// CFS period used for CPU quotas, in microseconds.
pub const CFS_PERIOD_US: u64 = 100_000;

/// How long removal keeps retrying while a cgroup is busy.
const REMOVE_DEADLINE: Duration = Duration::from_secs(5);

/// Errors of cgroup handling.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a usable cgroup v2 nor the v1 controllers were found.
    #[error("no usable cgroup hierarchy under {root}: {reason}")]
    Unavailable {
        /// The probed root.
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
    /// A file held something that is not what the kernel writes there.
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
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Limits of one VMM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmLimits {
    /// Memory cap (guest RAM + VMM overhead), bytes.
    pub memory_bytes: u64,
    /// CPU quota per [`CFS_PERIOD_US`], microseconds.
    pub cpu_quota_us: u64,
    /// Maximum threads.
    pub pids: u64,
}

/// Which cgroup interface the host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupMode {
    /// cgroup2 with memory, cpu and pids.
    V2 {
        /// The cgroup2 mount.
        root: PathBuf,
    },
    /// Separate v1 hierarchies.
    V1 {
        /// memory hierarchy.
        memory: PathBuf,
        /// cpu hierarchy.
        cpu: PathBuf,
        /// cpuacct hierarchy, if mounted.
        cpuacct: Option<PathBuf>,
        /// pids hierarchy.
        pids: PathBuf,
        /// `memory.memsw.limit_in_bytes` exists.
        memsw: bool,
    },
}

/// Per-VM cgroups under a configurable root.
#[derive(Debug, Clone)]
pub struct VmCgroups {
    mode: CgroupMode,
}

fn read_trimmed(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(io_err(path))
}

fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    read_trimmed(path)?
        .parse::<u64>()
        .map_err(|_| CgroupError::Parse {
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
        Err(source) => Err(CgroupError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn v1_hierarchy(root: &Path, name: &str) -> Option<PathBuf> {
    let p = root.join(name);
    if p.join("cgroup.procs").is_file() {
        Some(std::fs::canonicalize(&p).unwrap_or(p))
    } else {
        None
    }
}

impl VmCgroups {
    /// Probe `root` for cgroup v2 (memory, cpu and pids in `cgroup.controllers`) or the v1
    /// memory/cpu/pids hierarchies. Reads only.
    pub fn detect(root: &Path) -> Result<VmCgroups, CgroupError> {
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
                return Ok(VmCgroups {
                    mode: CgroupMode::V2 {
                        root: root.to_path_buf(),
                    },
                });
            }
            v2_reason = format!("cgroup2 lacks controllers {}", missing.join(","));
        }
        match (
            v1_hierarchy(root, "memory"),
            v1_hierarchy(root, "cpu"),
            v1_hierarchy(root, "pids"),
        ) {
            (Some(memory), Some(cpu), Some(pids)) => {
                let cpuacct = v1_hierarchy(root, "cpuacct");
                let memsw = memory.join("memory.memsw.limit_in_bytes").is_file();
                Ok(VmCgroups {
                    mode: CgroupMode::V1 {
                        memory,
                        cpu,
                        cpuacct,
                        pids,
                        memsw,
                    },
                })
            }
            (m, c, p) => {
                let missing: Vec<&str> = [("memory", m), ("cpu", c), ("pids", p)]
                    .into_iter()
                    .filter(|(_, v)| v.is_none())
                    .map(|(n, _)| n)
                    .collect();
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

    /// Create the parent cgroups and (v2) enable the controllers below them.
    pub fn prepare(&self) -> Result<(), CgroupError> {
        match &self.mode {
            CgroupMode::V2 { root } => {
                let want = "+memory +pids +cpu";
                for dir in [root.clone(), root.join(PARENT)] {
                    mkdir(&dir)?;
                    let ctl = dir.join("cgroup.subtree_control");
                    let enabled = read_trimmed(&ctl).unwrap_or_default();
                    let on: BTreeSet<&str> = enabled.split_whitespace().collect();
                    if !["memory", "pids", "cpu"].iter().all(|c| on.contains(c)) {
                        write_file(&ctl, want)?;
                    }
                }
                Ok(())
            }
            CgroupMode::V1 { .. } => {
                for h in self.hierarchies() {
                    mkdir(&h.join(PARENT))?;
                }
                Ok(())
            }
        }
    }

    /// Every hierarchy in use, deduplicated.
    pub fn hierarchies(&self) -> Vec<PathBuf> {
        let candidates: Vec<&PathBuf> = match &self.mode {
            CgroupMode::V2 { root } => vec![root],
            CgroupMode::V1 {
                memory,
                cpu,
                cpuacct,
                pids,
                ..
            } => {
                let mut v = vec![memory, cpu, pids];
                v.extend(cpuacct.iter());
                v
            }
        };
        let mut out: Vec<PathBuf> = Vec::new();
        for c in candidates {
            if !out.contains(c) {
                out.push(c.clone());
            }
        }
        out
    }

    /// Every cgroup directory of VM `id`.
    pub fn dirs(&self, id: &str) -> Vec<PathBuf> {
        self.hierarchies()
            .into_iter()
            .map(|h| h.join(PARENT).join(id))
            .collect()
    }

    /// The `cgroup.procs` files a process writes `0` into to join VM `id`'s cgroups.
    pub fn procs_files(&self, id: &str) -> Vec<PathBuf> {
        self.dirs(id)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Create the cgroups of `id` and write its limits; on error nothing is left.
    pub fn create(&self, id: &str, limits: &VmmLimits) -> Result<(), CgroupError> {
        let mut made = Vec::new();
        for d in self.dirs(id) {
            match std::fs::create_dir(&d) {
                Ok(()) => made.push(d),
                Err(source) => {
                    for m in &made {
                        let _ = std::fs::remove_dir(m);
                    }
                    return Err(CgroupError::Io { path: d, source });
                }
            }
        }
        if let Err(e) = self.write_limits(id, limits) {
            for m in &made {
                let _ = std::fs::remove_dir(m);
            }
            return Err(e);
        }
        Ok(())
    }

    fn write_limits(&self, id: &str, l: &VmmLimits) -> Result<(), CgroupError> {
        let memory = l.memory_bytes.to_string();
        let quota = l.cpu_quota_us.to_string();
        let pids = l.pids.to_string();
        match &self.mode {
            CgroupMode::V2 { root } => {
                let d = root.join(PARENT).join(id);
                write_file(&d.join("memory.max"), &memory)?;
                let swap = d.join("memory.swap.max");
                if swap.is_file() {
                    write_file(&swap, "0")?;
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
                let m = mem_h.join(PARENT).join(id);
                write_file(&m.join("memory.limit_in_bytes"), &memory)?;
                if *memsw {
                    write_file(&m.join("memory.memsw.limit_in_bytes"), &memory)?;
                }
                let c = cpu.join(PARENT).join(id);
                write_file(&c.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                write_file(&c.join("cpu.cfs_quota_us"), &quota)?;
                write_file(&pids_h.join(PARENT).join(id).join("pids.max"), &pids)?;
            }
        }
        Ok(())
    }

    /// Resource usage of VM `id` (the whole VMM process, guest included).
    pub fn stats(&self, id: &str) -> Result<SandboxStats, CgroupError> {
        match &self.mode {
            CgroupMode::V2 { root } => {
                let d = root.join(PARENT).join(id);
                let stat_path = d.join("cpu.stat");
                let stat = read_trimmed(&stat_path)?;
                let usec = stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or(CgroupError::Parse { path: stat_path })?;
                Ok(SandboxStats {
                    memory_bytes: read_u64(&d.join("memory.current"))?,
                    cpu_usage_ns: usec.saturating_mul(1000),
                    pids: read_u64(&d.join("pids.current"))?,
                })
            }
            CgroupMode::V1 {
                memory,
                cpuacct,
                pids,
                ..
            } => Ok(SandboxStats {
                memory_bytes: read_u64(
                    &memory.join(PARENT).join(id).join("memory.usage_in_bytes"),
                )?,
                cpu_usage_ns: match cpuacct {
                    Some(a) => read_u64(&a.join(PARENT).join(id).join("cpuacct.usage"))?,
                    None => 0,
                },
                pids: read_u64(&pids.join(PARENT).join(id).join("pids.current"))?,
            }),
        }
    }

    /// Processes in any cgroup of `id` (missing cgroups count as empty).
    pub fn procs(&self, id: &str) -> Result<BTreeSet<i32>, CgroupError> {
        let mut out = BTreeSet::new();
        for path in self.procs_files(id) {
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

    /// SIGKILL everything in `id`'s cgroups until they are empty; returns how many
    /// processes were signalled.
    pub fn kill_all(&self, id: &str) -> Result<usize, CgroupError> {
        let mut killed = BTreeSet::new();
        let deadline = Instant::now() + REMOVE_DEADLINE;
        loop {
            let procs = self.procs(id)?;
            if procs.is_empty() {
                return Ok(killed.len());
            }
            for pid in procs.into_iter().filter(|p| *p > 0) {
                // SAFETY: kill(2) has no memory-safety preconditions; the pid comes from the
                // VM's cgroup, which only holds its VMM.
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

    /// Kill what is left and remove the cgroups of `id`; idempotent. Returns (processes
    /// killed, directories removed).
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

    /// Names of every VM cgroup under [`PARENT`] in any hierarchy.
    pub fn list(&self) -> Result<BTreeSet<String>, CgroupError> {
        let mut out = BTreeSet::new();
        for h in self.hierarchies() {
            let parent = h.join(PARENT);
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

    fn fake_v1(root: &Path) {
        for c in ["memory", "cpu", "cpuacct", "pids"] {
            let d = root.join(c);
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("cgroup.procs"), "").expect("write");
        }
    }

    #[test]
    fn detects_v1_and_writes_limits_under_its_own_parent() {
        let tmp = tempfile::tempdir().expect("tmp");
        fake_v1(tmp.path());
        let cg = VmCgroups::detect(tmp.path()).expect("v1");
        assert!(matches!(cg.mode(), CgroupMode::V1 { memsw: false, .. }));
        cg.prepare().expect("prepare");
        let limits = VmmLimits {
            memory_bytes: 384 << 20,
            cpu_quota_us: 125_000,
            pids: 130,
        };
        cg.create("abc", &limits).expect("create");
        let mem = tmp.path().join("memory/cella-vm/abc/memory.limit_in_bytes");
        assert_eq!(
            std::fs::read_to_string(mem).expect("read"),
            (384u64 << 20).to_string()
        );
        let quota = tmp.path().join("cpu/cella-vm/abc/cpu.cfs_quota_us");
        assert_eq!(std::fs::read_to_string(quota).expect("read"), "125000");
        let pids = tmp.path().join("pids/cella-vm/abc/pids.max");
        assert_eq!(std::fs::read_to_string(pids).expect("read"), "130");
        assert_eq!(cg.procs_files("abc").len(), 4);
        assert_eq!(
            cg.list().expect("list"),
            BTreeSet::from(["abc".to_string()])
        );
        // the jail's tree is not ours
        assert!(!tmp.path().join("memory/cella").exists());
        // a second create of the same id fails and leaves the first intact
        assert!(cg.create("abc", &limits).is_err());
        assert!(tmp.path().join("memory/cella-vm/abc").is_dir());
    }

    #[test]
    fn detects_v2_when_complete_and_reports_what_is_missing() {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::write(tmp.path().join("cgroup.controllers"), "cpu pids\n").expect("write");
        let err = VmCgroups::detect(tmp.path()).expect_err("no memory");
        assert!(
            err.to_string().contains("lacks controllers memory"),
            "{err}"
        );
        std::fs::write(
            tmp.path().join("cgroup.controllers"),
            "cpu memory pids io\n",
        )
        .expect("write");
        let cg = VmCgroups::detect(tmp.path()).expect("v2");
        assert!(matches!(cg.mode(), CgroupMode::V2 { .. }));
        assert_eq!(cg.dirs("x"), vec![tmp.path().join("cella-vm").join("x")]);
    }

    #[test]
    fn stats_parse_v2_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::write(tmp.path().join("cgroup.controllers"), "cpu memory pids").expect("w");
        let cg = VmCgroups::detect(tmp.path()).expect("v2");
        let d = tmp.path().join("cella-vm/v1");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("memory.current"), "1048576\n").expect("w");
        std::fs::write(d.join("pids.current"), "7\n").expect("w");
        std::fs::write(d.join("cpu.stat"), "usage_usec 250\nuser_usec 1\n").expect("w");
        let s = cg.stats("v1").expect("stats");
        assert_eq!(s.memory_bytes, 1 << 20);
        assert_eq!(s.cpu_usage_ns, 250_000);
        assert_eq!(s.pids, 7);
        std::fs::write(d.join("cpu.stat"), "garbage").expect("w");
        assert!(matches!(cg.stats("v1"), Err(CgroupError::Parse { .. })));
    }
}
