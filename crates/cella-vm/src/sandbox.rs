//! A live VM sandbox: dialing into its network namespace, its exit, and teardown.

use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cella_api::Isolation;
use cella_core::driver::{DriverError, ExitInfo, SandboxHandle, SandboxStats};
use cella_jail::cgroup::Cgroups;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::vmm::{Tail, pidfd_kill};

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

    fn stats(&self) -> Result<SandboxStats, DriverError> {
        self.cgroups
            .stats(&self.id)
            .map_err(|e| DriverError::Setup(format!("reading cgroup stats of {}: {e}", self.id)))
    }

    /// Pause = freeze the VMM's cgroup (QEMU's vCPU and I/O threads stop; guest RAM stays
    /// resident), the same call as the jail's. The guest's clock jumps on resume.
    async fn pause(&self) -> Result<(), DriverError> {
        cella_jail::sandbox::freeze(self.cgroups.clone(), &self.id).await
    }

    async fn resume(&self) -> Result<(), DriverError> {
        cella_jail::sandbox::thaw(self.cgroups.clone(), &self.id).await
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
