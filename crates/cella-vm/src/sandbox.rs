//! A live VM sandbox: dialing into its network namespace, its exit, and teardown.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cella_api::Isolation;
use cella_core::driver::{DriverError, ExitInfo, SandboxHandle, SandboxStats};
use cella_jail::cgroup::Cgroups;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::layer::{self, LayerMeta};
use crate::snapshot::Qmp;
use crate::vmm::{Identity, Launch, Tail, pidfd_kill};

/// How long teardown waits for the killed VMM to be reaped.
const REAP_DEADLINE: Duration = Duration::from_secs(10);

/// Returns the sandbox's uid slot to the pool when dropped.
#[derive(Debug)]
pub(crate) struct SlotGuard {
    pub(crate) slot: u32,
    pub(crate) pool: Arc<Mutex<std::collections::BTreeSet<u32>>>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pool.lock() {
            p.remove(&self.slot);
        }
    }
}

/// How a VM sandbox came up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootPath {
    /// A full boot: kernel, init, agent.
    Cold,
    /// Restored from a golden VM's snapshot.
    Restored,
    /// Restored from another sandbox's memory snapshot: its processes run on.
    Resumed,
}

/// The VMM's QMP connection, opened (greeting read) on first use.
pub(crate) enum QmpConn {
    Unopened(tokio::net::UnixStream),
    Open(Qmp<tokio::net::UnixStream>),
    Lost,
}

/// What a memory snapshot must record to be restored into the same machine.
#[derive(Debug, Clone)]
pub(crate) struct MachineInfo {
    /// Whether guest RAM is the named backend (golden VMs and what started from them).
    pub(crate) named_memory: bool,
    /// Hash of everything the migration stream depends on (see `VmDriver::machine_key`).
    pub(crate) key: String,
}

/// What a filesystem snapshot of a sandbox needs to know about its disk.
#[derive(Debug, Clone)]
pub(crate) struct DiskInfo {
    /// The sandbox's qcow2 overlay, opened by the host when it was created: its directory
    /// belongs to the VMM's uid, so the path may point elsewhere by now.
    pub(crate) overlay: Arc<std::fs::File>,
    /// Where snapshot work directories go (`<data>/sandboxes`, root's; reaped at start).
    pub(crate) work_root: PathBuf,
    /// The VMM's identity: `qemu-img` runs as it on the copy of the overlay.
    pub(crate) identity: Option<Identity>,
    /// The raw template image at the bottom of the overlay's backing chain.
    pub(crate) base: PathBuf,
    /// Template name and build ID (recorded in the layer).
    pub(crate) template: String,
    pub(crate) build_id: String,
    /// The agent's access token (for `/fsfreeze`, `/fsthaw`).
    pub(crate) access_token: String,
    /// `qemu-img`.
    pub(crate) qemu_img: PathBuf,
    /// Group of layer files (QEMU's), root-owned.
    pub(crate) gid: Option<u32>,
    /// How long the agent may take to answer a freeze or thaw.
    pub(crate) agent_timeout: Duration,
    /// Virtual size the overlay was created with.
    pub(crate) virtual_size: u64,
}

/// A VM sandbox.
pub struct VmSandbox {
    pub(crate) id: String,
    pub(crate) isolation: Isolation,
    pub(crate) pidfd: Arc<OwnedFd>,
    pub(crate) netns: Mutex<Option<Arc<OwnedFd>>>,
    pub(crate) cgroups: Arc<Cgroups>,
    pub(crate) dir: PathBuf,
    pub(crate) exit_rx: watch::Receiver<Option<ExitInfo>>,
    pub(crate) destroyed: tokio::sync::Mutex<bool>,
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) console: Tail,
    pub(crate) stderr: Tail,
    pub(crate) slot: Mutex<Option<SlotGuard>>,
    pub(crate) boot: BootPath,
    pub(crate) disk: DiskInfo,
    /// Serialises pause, resume and filesystem snapshots.
    pub(crate) lifecycle: tokio::sync::Mutex<()>,
    pub(crate) qmp: tokio::sync::Mutex<QmpConn>,
    pub(crate) machine: MachineInfo,
}

impl std::fmt::Debug for VmSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSandbox")
            .field("id", &self.id)
            .field("isolation", &self.isolation)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl VmSandbox {
    /// Whether this sandbox was booted or restored from a snapshot.
    pub fn boot_path(&self) -> BootPath {
        self.boot
    }

    /// The QMP connection (opened on first use).
    pub(crate) async fn qmp(
        &self,
    ) -> Result<tokio::sync::MappedMutexGuard<'_, Qmp<tokio::net::UnixStream>>, String> {
        let mut conn = self.qmp.lock().await;
        if let QmpConn::Unopened(_) = &*conn
            && let QmpConn::Unopened(stream) = std::mem::replace(&mut *conn, QmpConn::Lost)
        {
            *conn = QmpConn::Open(Qmp::connect(stream).await?);
        }
        tokio::sync::MutexGuard::try_map(conn, |c| match c {
            QmpConn::Open(q) => Some(q),
            _ => None,
        })
        .map_err(|_| "the VMM has no QMP connection".to_string())
    }

    /// What the vCPUs, the interrupt controllers and the virtio console were doing, read over
    /// QMP: for a guest that stopped answering (the console alone is silent then).
    pub(crate) async fn machine_report(&self) -> String {
        let Ok(mut qmp) = self.qmp().await else {
            return String::new();
        };
        let mut parts = Vec::new();
        let mut hmp = async |cmd: &str| -> String {
            match qmp
                .execute(
                    "human-monitor-command",
                    serde_json::json!({ "command-line": cmd }),
                )
                .await
            {
                Ok(v) => v.as_str().unwrap_or_default().to_string(),
                Err(e) => format!("({e})"),
            }
        };
        let regs = hmp("info registers -a").await;
        let rips: Vec<&str> = regs
            .lines()
            .filter(|l| l.starts_with("RIP=") || l.starts_with("CPU#"))
            .map(str::trim)
            .collect();
        parts.push(format!("cpus: {}", rips.join(" | ")));
        let pic = hmp("info pic").await;
        let pins: Vec<&str> = pic
            .lines()
            .filter(|l| !l.contains("masked") && !l.trim().is_empty())
            .map(str::trim)
            .collect();
        parts.push(format!("ioapic: {}", pins.join(" | ")));
        for cpu in 0..rips.iter().filter(|l| l.starts_with("RIP=")).count() {
            let lapic = hmp(&format!("info lapic {cpu}")).await;
            let lapic: Vec<&str> = lapic
                .lines()
                .map(str::trim)
                .filter(|l| l.starts_with("ISR") || l.starts_with("IRR"))
                .collect();
            parts.push(format!("lapic {cpu}: {}", lapic.join(" | ")));
        }
        let devices = qmp
            .execute("x-query-virtio", serde_json::json!({}))
            .await
            .unwrap_or_default();
        for dev in devices.as_array().into_iter().flatten() {
            let (Some(name), Some(path)) = (
                dev.get("name").and_then(|n| n.as_str()),
                dev.get("path").and_then(|p| p.as_str()),
            ) else {
                continue;
            };
            if name != "virtio-serial" {
                continue;
            }
            if let Ok(st) = qmp
                .execute("x-query-virtio-status", serde_json::json!({ "path": path }))
                .await
            {
                parts.push(format!(
                    "serial: isr={} status={:?} broken={}",
                    st.get("isr").unwrap_or(&serde_json::Value::Null),
                    st.get("status")
                        .and_then(|s| s.get("statuses"))
                        .unwrap_or(&serde_json::Value::Null)
                        .to_string(),
                    st.get("broken").unwrap_or(&serde_json::Value::Null)
                ));
            }
            for queue in 0..6u16 {
                let Ok(q) = qmp
                    .execute(
                        "x-query-virtio-queue-status",
                        serde_json::json!({ "path": path, "queue": queue }),
                    )
                    .await
                else {
                    break;
                };
                let f = |k: &str| q.get(k).cloned().unwrap_or(serde_json::Value::Null);
                parts.push(format!(
                    "vq{queue}: shadow_avail={} last_avail={} used={} signalled={} inuse={}",
                    f("shadow-avail-idx"),
                    f("last-avail-idx"),
                    f("used-idx"),
                    f("signalled-used"),
                    f("inuse")
                ));
            }
        }
        parts.join("; ")
    }

    /// SIGKILL the VMM (no cleanup: that is [`Self::teardown`]).
    pub(crate) fn kill(&self) -> io::Result<()> {
        pidfd_kill(&self.pidfd)
    }

    /// The last lines of the guest console and QEMU's stderr (for error messages).
    pub fn diagnostics(&self) -> String {
        let mut parts = Vec::new();
        if let Some(key) =
            self.console
                .last_matching(&["Kernel panic", "cella-init", "error", "Error"])
        {
            parts.push(format!("guest: {key}"));
        }
        // PID 1 is the init script, then the agent: when it dies, the panic above only says
        // that init exited; its own last words (a shell error, anyhow's `Error: ...`) say why.
        if let Some(init) = self.console.last_matching(&["Error: ", "/init: "]) {
            parts.push(format!("init: {init}"));
        }
        let console = self.console.last_lines(2);
        if !console.is_empty() {
            parts.push(format!("console: {console}"));
        }
        let stderr = self.stderr.last_lines(3);
        if !stderr.is_empty() {
            parts.push(format!("qemu: {stderr}"));
        }
        parts.join("; ")
    }

    /// Kill the VMM, wait for it, remove its cgroups, overlay and directory, drop the netns.
    /// Shared by destroy and failed creates; idempotent.
    pub(crate) async fn teardown(&self) -> Result<(), DriverError> {
        pidfd_kill(&self.pidfd).map_err(|source| DriverError::Io {
            context: format!("killing the VMM of {}", self.id),
            source,
        })?;
        let mut rx = self.exit_rx.clone();
        let reaped = tokio::time::timeout(REAP_DEADLINE, async {
            rx.wait_for(|v| v.is_some()).await.is_ok()
        })
        .await;
        if reaped != Ok(true) {
            return Err(DriverError::Cleanup(format!(
                "the VMM of {} was not reaped within {REAP_DEADLINE:?}",
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
        tokio::task::spawn_blocking(move || -> Result<(), DriverError> {
            cgroups
                .remove(&id)
                .map_err(|e| DriverError::Cleanup(format!("cgroups of {id}: {e}")))?;
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(DriverError::Io {
                    context: format!("removing {}", dir.display()),
                    source,
                }),
            }
        })
        .await
        .map_err(|e| DriverError::Cleanup(format!("teardown task failed: {e}")))??;
        if let Ok(mut s) = self.slot.lock() {
            s.take();
        }
        Ok(())
    }
}

/// Paths of the agent's host-only routes (the server's proxy refuses them from outside).
const FSFREEZE: &str = "/fsfreeze";
const FSTHAW: &str = "/fsthaw";
const EGRESS: &str = "/egress";
/// Makes snapshot work directory names unique.
static WORK_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Copy all of `src` (from offset 0, whatever its file position) to `dst`.
fn copy_from_fd(src: &std::fs::File, dst: &mut std::fs::File) -> io::Result<u64> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = src.read_at(&mut buf, off)?;
        if n == 0 {
            dst.flush()?;
            return Ok(off);
        }
        dst.write_all(buf.get(..n).unwrap_or_default())?;
        off += n as u64;
    }
}

/// How long saving a VM's memory may take.
const SAVE_DEADLINE: Duration = Duration::from_secs(120);

/// How long flattening a disk copy may take.
const FLATTEN_DEADLINE: Duration = Duration::from_secs(600);

/// Run `qemu-img` confined like a VMM (as `identity`, no new privileges), killed after
/// `deadline`; its stderr tail on failure.
async fn run_confined(
    program: &Path,
    args: Vec<String>,
    identity: Option<Identity>,
    deadline: Duration,
) -> Result<(), String> {
    let started = crate::vmm::spawn(Launch {
        program: program.to_path_buf(),
        args,
        inherit: Vec::new(),
        cgroup_procs: Vec::new(),
        identity,
    })
    .map_err(|e| format!("starting {}: {e}", program.display()))?;
    let mut child = started.child;
    let mut err = Vec::new();
    let work = async {
        if let Some(mut stderr) = started.stderr {
            let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut err).await;
        }
        child.wait().await
    };
    let status = match tokio::time::timeout(deadline, work).await {
        Ok(r) => r.map_err(|e| format!("waiting for {}: {e}", program.display()))?,
        Err(_) => {
            let _ = pidfd_kill(&started.pidfd);
            let _ = child.wait().await;
            return Err(format!(
                "{} did not finish within {deadline:?}",
                program.display()
            ));
        }
    };
    if status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&err);
    let tail: String = text
        .trim()
        .chars()
        .rev()
        .take(400)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(format!("{} failed ({status}): {tail}", program.display()))
}

/// `dest` must be an existing, empty, absolute directory.
fn check_dest(dest: &Path) -> Result<(), DriverError> {
    if !dest.is_absolute() {
        return Err(DriverError::Setup(format!(
            "snapshot destination {} is not an absolute path",
            dest.display()
        )));
    }
    let mut entries = std::fs::read_dir(dest).map_err(|source| DriverError::Io {
        context: format!("opening the snapshot destination {}", dest.display()),
        source,
    })?;
    if entries.next().is_some() {
        return Err(DriverError::Setup(format!(
            "snapshot destination {} is not empty",
            dest.display()
        )));
    }
    Ok(())
}

/// The status code of an HTTP/1.1 response head.
impl VmSandbox {
    /// `POST path` to the agent with the access token (see [`cella_core::driver::agent_post`]).
    async fn agent_post(&self, path: &str) -> Result<(), String> {
        cella_core::driver::agent_post(
            self,
            &self.disk.access_token,
            path,
            b"",
            self.disk.agent_timeout,
        )
        .await
    }

    /// The snapshot after the checks: copy (quiesced) into `work`, put a paused sandbox back
    /// to sleep, flatten and compact the copy as the VMM's uid, write the layer. Returns how long the VM
    /// was stopped and the layer's size.
    async fn snapshot_into(
        &self,
        dest: &Path,
        work: &Path,
        top: &Path,
        was_paused: bool,
        memory: bool,
    ) -> Result<(Duration, u64), DriverError> {
        let identity = self.disk.identity.clone();
        let (w, t) = (work.to_path_buf(), top.to_path_buf());
        let file = tokio::task::spawn_blocking(move || -> io::Result<std::fs::File> {
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            std::fs::DirBuilder::new().mode(0o711).create(&w)?;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&t)
        })
        .await
        .map_err(|e| DriverError::Setup(format!("work task failed: {e}")))?
        .map_err(|source| DriverError::Io {
            context: format!("creating {}", top.display()),
            source,
        });
        let copied = match file {
            Ok(f) if memory => self.saved_copy(f, &dest.join(layer::LAYER_MEMORY)).await,
            Ok(f) => self.quiesced_copy(f).await,
            Err(e) => Err(e),
        };
        let repaused = if was_paused {
            cella_jail::sandbox::freeze(self.cgroups.clone(), &self.id).await
        } else {
            Ok(())
        };
        let stopped = copied?;
        repaused?;
        // qemu-img (as the VMM's uid) writes only these two files; the directory is root's.
        let flat = work.join("flat.qcow2");
        let (t, f, idn) = (top.to_path_buf(), flat.clone(), identity.clone());
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&f)?;
            if let Some(idn) = &idn {
                for p in [&t, &f] {
                    std::os::unix::fs::chown(p, Some(idn.uid), Some(idn.gid))?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| DriverError::Setup(format!("work task failed: {e}")))?
        .map_err(|source| DriverError::Io {
            context: format!("preparing {}", work.display()),
            source,
        })?;
        let args = layer::rebase_args(&self.disk.base, top)
            .map_err(|e| DriverError::Setup(cella_core::manager::error_chain(&e)))?;
        // The copy's header is the VMM's: check it describes the disk the host made.
        let size = layer::qcow2_virtual_size(top).map_err(|source| DriverError::Io {
            context: format!("reading {}", top.display()),
            source,
        })?;
        if size != self.disk.virtual_size {
            return Err(DriverError::Setup(format!(
                "the disk overlay claims {size} bytes, it was made with {}",
                self.disk.virtual_size
            )));
        }
        run_confined(
            &self.disk.qemu_img,
            args,
            identity.clone(),
            FLATTEN_DEADLINE,
        )
        .await
        .map_err(|e| DriverError::Setup(format!("flattening the disk copy: {e}")))?;
        let args = layer::compact_args(&self.disk.base, top, &flat)
            .map_err(|e| DriverError::Setup(cella_core::manager::error_chain(&e)))?;
        run_confined(&self.disk.qemu_img, args, identity, FLATTEN_DEADLINE)
            .await
            .map_err(|e| DriverError::Setup(format!("compacting the disk copy: {e}")))?;
        let info = self.disk.clone();
        let machine = memory.then(|| layer::MachineMeta {
            key: self.machine.key.clone(),
            named_memory: self.machine.named_memory,
        });
        let (top, dest) = (flat, dest.to_path_buf());
        let bytes = tokio::task::spawn_blocking(move || -> Result<u64, DriverError> {
            let virtual_size =
                layer::qcow2_virtual_size(&top).map_err(|source| DriverError::Io {
                    context: format!("reading {}", top.display()),
                    source,
                })?;
            let meta = LayerMeta {
                base: info.base.clone(),
                virtual_size,
                template: info.template.clone(),
                build_id: info.build_id.clone(),
            };
            let bytes = layer::finish_layer(&top, &dest, &meta, info.gid)
                .map_err(|e| DriverError::Setup(cella_core::manager::error_chain(&e)))?;
            if let Some(machine) = &machine {
                layer::write_machine(&dest, machine).map_err(|source| DriverError::Io {
                    context: format!("writing {}", dest.join(layer::LAYER_MACHINE).display()),
                    source,
                })?;
            }
            Ok(bytes)
        })
        .await
        .map_err(|e| DriverError::Setup(format!("layer task failed: {e}")))??;
        Ok((stopped, bytes))
    }

    /// A filesystem snapshot into `dest`, with the memory stream when `memory`.
    async fn snapshot(&self, dest: &Path, memory: bool) -> Result<(), DriverError> {
        check_dest(dest)?;
        let _life = self.lifecycle.lock().await;
        if self.exit_rx.borrow().is_some() {
            return Err(DriverError::Setup(format!(
                "sandbox {} is not running",
                self.id
            )));
        }
        let t0 = Instant::now();
        let was_paused = self
            .cgroups
            .is_frozen(&self.id)
            .map_err(|e| cella_jail::sandbox::freeze_error(&self.id, e))?;
        if was_paused {
            cella_jail::sandbox::thaw(self.cgroups.clone(), &self.id).await?;
        }
        let work = self.disk.work_root.join(format!(
            ".snap-{}-{}",
            self.id,
            WORK_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let top = work.join("top.qcow2");
        let finished = self
            .snapshot_into(dest, &work, &top, was_paused, memory)
            .await;
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&work)).await;
        match finished {
            Ok((stopped, bytes)) => {
                tracing::info!(
                    sandbox = %self.id,
                    paused = was_paused,
                    stopped_ms = stopped.as_millis() as u64,
                    total_ms = t0.elapsed().as_millis() as u64,
                    layer_bytes = bytes,
                    memory,
                    "snapshot"
                );
                Ok(())
            }
            Err(e) => {
                let dest = dest.to_path_buf();
                let _ = tokio::task::spawn_blocking(move || layer::clear_dir(&dest)).await;
                Err(e)
            }
        }
    }

    /// Stop the VM, save its RAM and device state into `memory` (a new file, root's, 0600:
    /// it holds everything the sandbox had in memory) and copy its overlay to `top` at that
    /// same instant, then let it run on. No filesystem freeze: with the guest stopped, its
    /// page cache is part of the saved RAM. Returns how long it was stopped.
    async fn saved_copy(&self, top: std::fs::File, memory: &Path) -> Result<Duration, DriverError> {
        let (stream_w, stream_r) = crate::pipe_pair().map_err(|source| DriverError::Io {
            context: "creating the memory stream pipe".into(),
            source,
        })?;
        let path = memory.to_path_buf();
        let writer = tokio::task::spawn_blocking(move || -> io::Result<u64> {
            use std::os::unix::fs::OpenOptionsExt;
            let mut r = std::fs::File::from(stream_r);
            let mut w = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            let n = io::copy(&mut r, &mut w)?;
            w.sync_all()?;
            Ok(n)
        });
        // Frozen first, so the disk copy is consistent on its own: a sandbox whose machine no
        // longer fits the saved memory cold-starts from the files. A resumed VM wakes frozen
        // and is thawed by the driver.
        self.agent_post(FSFREEZE)
            .await
            .map_err(|e| DriverError::Setup(format!("freezing the guest's filesystem: {e}")))?;
        let stopped_at = Instant::now();
        let saved = {
            let mut qmp = self.qmp().await.map_err(DriverError::Setup)?;
            let r = tokio::time::timeout(
                SAVE_DEADLINE,
                crate::snapshot::stop_and_save(&mut qmp, stream_w, true),
            )
            .await
            .unwrap_or_else(|_| Err(format!("not saved within {SAVE_DEADLINE:?}")));
            if r.is_err() {
                let _ = qmp.execute("migrate_cancel", serde_json::json!({})).await;
            }
            r
        };
        let copied = match saved {
            Ok(()) => {
                // QEMU closed the stream when the save completed.
                let written = tokio::time::timeout(SAVE_DEADLINE, writer)
                    .await
                    .map_err(|_| DriverError::Setup("the memory stream did not end".into()))
                    .and_then(|j| {
                        j.map_err(|e| DriverError::Setup(format!("stream task failed: {e}")))
                    })
                    .and_then(|r| {
                        r.map_err(|source| DriverError::Io {
                            context: "writing the memory snapshot".into(),
                            source,
                        })
                    });
                match written {
                    Ok(bytes) => {
                        tracing::info!(sandbox = %self.id, memory_bytes = bytes, "memory saved");
                        self.copy_overlay(top).await
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => {
                writer.abort();
                Err(DriverError::Setup(format!("saving the VM's memory: {e}")))
            }
        };
        // Whatever happened: the source runs on (a no-op if it never stopped).
        let resumed = match self.qmp().await {
            Ok(mut qmp) => qmp
                .execute("cont", serde_json::json!({}))
                .await
                .map(|_| ())
                .map_err(|e| DriverError::Setup(format!("resuming the VM after its save: {e}"))),
            Err(e) => Err(DriverError::Setup(e)),
        };
        let stopped = stopped_at.elapsed();
        let fs_thawed = match resumed {
            Ok(()) => self
                .agent_post(FSTHAW)
                .await
                .map_err(|e| DriverError::Setup(format!("thawing the guest's filesystem: {e}"))),
            Err(e) => Err(e),
        };
        copied.and(fs_thawed).map(|()| stopped)
    }

    /// Copy the overlay (as the host opened it) to `top` and sync it; the VM must be stopped.
    async fn copy_overlay(&self, top: std::fs::File) -> Result<(), DriverError> {
        let src = self.disk.overlay.clone();
        let mut dst = top;
        tokio::task::spawn_blocking(move || {
            copy_from_fd(&src, &mut dst)
                .and_then(|_| dst.sync_all())
                .map_err(|source| DriverError::Io {
                    context: "copying the sandbox's disk overlay".into(),
                    source,
                })
        })
        .await
        .map_err(|e| DriverError::Setup(format!("copy task failed: {e}")))
        .and_then(|r| r)
    }

    /// Thaw the guest's filesystems (after a resume from a memory snapshot saved frozen).
    pub(crate) async fn fs_thaw(&self) -> Result<(), String> {
        self.agent_post(FSTHAW).await
    }

    /// Freeze the guest's filesystem, stop the VM, copy its overlay to `top`, let the VM
    /// run and thaw the filesystem. The VM must be running. Returns how long it was stopped.
    async fn quiesced_copy(&self, top: std::fs::File) -> Result<Duration, DriverError> {
        self.agent_post(FSFREEZE)
            .await
            .map_err(|e| DriverError::Setup(format!("freezing the guest's filesystem: {e}")))?;
        let stopped_at = Instant::now();
        let copied = match cella_jail::sandbox::freeze(self.cgroups.clone(), &self.id).await {
            Ok(()) => {
                let copied = self.copy_overlay(top).await;
                let thawed = cella_jail::sandbox::thaw(self.cgroups.clone(), &self.id).await;
                copied.and(thawed)
            }
            Err(e) => Err(e),
        };
        let stopped = stopped_at.elapsed();
        let fs_thawed = self
            .agent_post(FSTHAW)
            .await
            .map_err(|e| DriverError::Setup(format!("thawing the guest's filesystem: {e}")));
        copied.and(fs_thawed).map(|()| stopped)
    }
}

#[async_trait]
impl SandboxHandle for VmSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn isolation(&self) -> Isolation {
        self.isolation
    }

    async fn dial(&self, port: u16) -> io::Result<tokio::net::TcpStream> {
        let netns = self
            .netns
            .lock()
            .map_err(|_| io::Error::other("sandbox state poisoned"))?
            .clone()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "sandbox destroyed"))?;
        crate::net::dial(netns, port).await
    }

    /// The VM's namespace (where its tap lives) through the server's own descriptor table:
    /// valid while the sandbox holds the descriptor. Egress adds the sandbox's `eth0` there.
    fn netns_path(&self) -> Option<PathBuf> {
        let ns = self.netns.lock().ok()?.clone()?;
        Some(cella_jail::sandbox::own_fd_path(ns.as_ref()))
    }

    /// Prepare the VM for outbound network: its namespace forwards and masquerades the
    /// guest's connections ([`crate::net::enable_egress`]), and the guest agent routes via the
    /// host end of the link and points `/etc/resolv.conf` at `nameserver`.
    async fn set_nameserver(&self, nameserver: Ipv4Addr) -> Result<(), DriverError> {
        let netns = self
            .netns
            .lock()
            .map_err(|_| DriverError::Setup("sandbox state poisoned".into()))?
            .clone()
            .ok_or_else(|| DriverError::Setup(format!("sandbox {} is gone", self.id)))?;
        let t0 = Instant::now();
        tokio::task::spawn_blocking(move || crate::net::enable_egress(&netns))
            .await
            .map_err(|e| DriverError::Setup(format!("egress task failed: {e}")))?
            .map_err(|source| DriverError::Io {
                context: "letting the VM's namespace forward its traffic".into(),
                source,
            })?;
        let netns_ms = t0.elapsed().as_millis() as u64;
        let [a, b, c, d] = crate::qemu::HOST_IP;
        self.agent_post(&format!(
            "{EGRESS}?gateway={a}.{b}.{c}.{d}&nameserver={nameserver}"
        ))
        .await
        .map_err(DriverError::Setup)?;
        tracing::debug!(
            sandbox = %self.id,
            netns_ms,
            total_ms = t0.elapsed().as_millis() as u64,
            "egress prepared"
        );
        Ok(())
    }

    fn stats(&self) -> Result<SandboxStats, DriverError> {
        self.cgroups
            .stats(&self.id)
            .map_err(|e| DriverError::Setup(format!("reading cgroup stats of {}: {e}", self.id)))
    }

    /// Pause = freeze the VMM's cgroup (QEMU's vCPU and I/O threads stop; guest RAM stays
    /// resident), the same call as the jail's. The guest's clock jumps on resume.
    async fn pause(&self) -> Result<(), DriverError> {
        let _life = self.lifecycle.lock().await;
        cella_jail::sandbox::freeze(self.cgroups.clone(), &self.id).await
    }

    async fn resume(&self) -> Result<(), DriverError> {
        let _life = self.lifecycle.lock().await;
        cella_jail::sandbox::thaw(self.cgroups.clone(), &self.id).await
    }

    /// The guest agent freezes `/` (every dirty page reaches the virtual disk), the VMM's
    /// cgroup is frozen while its qcow2 overlay is copied (milliseconds: only what the
    /// sandbox wrote), then both thaw; the copy is flattened onto the template image outside
    /// that window (see [`crate::layer`]). A paused sandbox runs for that short window (its
    /// guest must flush) and is paused again before this returns.
    async fn snapshot_filesystem(&self, dest: &Path) -> Result<(), DriverError> {
        self.snapshot(dest, false).await
    }

    async fn snapshot_memory(&self, dest: &Path) -> Result<(), DriverError> {
        self.snapshot(dest, true).await
    }

    async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit_rx.clone();
        let info = rx
            .wait_for(|v| v.is_some())
            .await
            .ok()
            .and_then(|v| v.clone());
        // Resolves after destroy too (the trait's contract): the manager tells a crash from a
        // destroy by its own bookkeeping, and no watcher may stay parked on a dead VM.
        info.unwrap_or_else(|| ExitInfo {
            reason: "sandbox state dropped".into(),
        })
    }

    async fn destroy(&self) -> Result<(), DriverError> {
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

    /// The flattening `qemu-img` runs as the VMM's uid: a root-only file (what a hostile
    /// overlay header could name as its backing file) is out of its reach.
    #[tokio::test]
    async fn qemu_img_runs_confined() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: switching uids needs root");
            return;
        }
        let qemu_img = Path::new("qemu-img");
        if std::process::Command::new(qemu_img)
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipping: qemu-img is not installed");
            return;
        }
        let tmp = tempfile::tempdir().expect("tmp");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let secret = tmp.path().join("secret.raw");
        std::fs::write(&secret, vec![0u8; 4096]).expect("write");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let args = vec!["info".to_string(), secret.to_string_lossy().into_owned()];
        let t = Duration::from_secs(60);
        run_confined(qemu_img, args.clone(), None, t)
            .await
            .expect("root can read it");
        let nobody = Identity {
            uid: 65534,
            gid: 65534,
            groups: Vec::new(),
        };
        let err = run_confined(qemu_img, args, Some(nobody), t)
            .await
            .expect_err("the confined uid cannot");
        assert!(err.contains("ermission denied"), "{err}");
    }

    #[test]
    fn destinations_must_be_empty_absolute_dirs() {
        let tmp = tempfile::tempdir().expect("tmp");
        check_dest(tmp.path()).expect("empty dir");
        assert!(check_dest(Path::new("rel")).is_err());
        assert!(check_dest(&tmp.path().join("missing")).is_err());
        std::fs::write(tmp.path().join("x"), b"").expect("write");
        let err = check_dest(tmp.path()).expect_err("not empty");
        assert!(err.to_string().contains("not empty"), "{err}");
    }
}
