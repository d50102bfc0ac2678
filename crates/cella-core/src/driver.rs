//! The isolation driver seam.
//!
//! A driver owns everything OS-specific about a sandbox: namespaces or a VM, cgroups, mounts,
//! the root filesystem overlay, and the channel to the agent. The core only asks it to create,
//! dial, measure, pause, resume and destroy. Both the jail and the microVM driver reach the agent the same way
//! from the proxy's point of view: [`SandboxHandle::dial`] returns a TCP stream to a port inside
//! the sandbox.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use cella_api::Isolation;
use cella_proto::control::{AgentEvent, StartCommand};
use tokio::sync::mpsc;

/// Resource limits applied to one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// vCPUs (CPU quota = `cpu_count` × period for the jail).
    pub cpu_count: u32,
    /// Memory limit in MiB (processes, page cache of the writable layer included).
    pub memory_mb: u64,
    /// Size of the writable layer in MiB.
    pub disk_mb: u64,
    /// Maximum number of processes/threads.
    pub max_pids: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu_count: 2,
            memory_mb: 512,
            disk_mb: 1024,
            max_pids: 1024,
        }
    }
}

/// A template resolved to a built root filesystem on disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TemplateImage {
    /// Template name (`base`).
    pub name: String,
    /// Build ID (hash of the spec).
    pub build_id: String,
    /// Directory holding the read-only root filesystem tree.
    pub rootfs: PathBuf,
    /// Default user for commands (`user`).
    pub default_user: String,
    /// Template-wide environment.
    pub env: BTreeMap<String, String>,
    /// Command the agent starts at boot (`None`: nothing).
    pub start_cmd: Option<StartCommand>,
    /// Filesystem snapshot layers stacked on `rootfs`, newest first (empty for a plain
    /// template). Each is what [`SandboxHandle::snapshot_filesystem`] of the same driver wrote.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<PathBuf>,
}

/// Everything a driver needs to start one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Sandbox ID (`[a-z0-9]+`), unique on this host.
    pub id: String,
    /// Root filesystem and defaults.
    pub template: TemplateImage,
    /// Limits.
    pub limits: Limits,
    /// Environment for every process (template env overlaid by the request's `envVars`).
    pub env_vars: BTreeMap<String, String>,
    /// Token the agent must require.
    pub access_token: String,
}

/// Something that happened in sandbox `sandbox_id`: reported by its agent (an untrusted claim
/// of the sandbox) or observed by the host from outside (e.g. the jail's process audit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxEvent {
    /// Which sandbox it concerns.
    pub sandbox_id: String,
    /// What happened.
    pub event: AgentEvent,
    /// Who says so.
    pub origin: EventOrigin,
}

impl SandboxEvent {
    /// An event the sandbox's agent reported.
    pub fn from_agent(sandbox_id: impl Into<String>, event: AgentEvent) -> SandboxEvent {
        SandboxEvent {
            sandbox_id: sandbox_id.into(),
            event,
            origin: EventOrigin::Agent,
        }
    }

    /// An event the host observed from outside the sandbox.
    pub fn from_host(sandbox_id: impl Into<String>, event: AgentEvent) -> SandboxEvent {
        SandboxEvent {
            sandbox_id: sandbox_id.into(),
            event,
            origin: EventOrigin::Host,
        }
    }
}

/// Who reported a [`SandboxEvent`]; the audit log's `actor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOrigin {
    /// The in-sandbox agent: a claim the sandbox makes about itself.
    Agent,
    /// The host (driver), looking from outside: not forgeable by the sandbox.
    Host,
}

impl EventOrigin {
    /// The audit actor name.
    pub fn actor(self) -> &'static str {
        match self {
            EventOrigin::Agent => "agent",
            EventOrigin::Host => "host",
        }
    }
}

/// Where drivers send agent events.
pub type EventSink = mpsc::UnboundedSender<SandboxEvent>;

/// Resource usage read from the sandbox's cgroup (or VMM).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxStats {
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// CPU time used, nanoseconds.
    pub cpu_usage_ns: u64,
    /// Number of tasks.
    pub pids: u64,
}

/// Why a sandbox stopped by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// Human-readable reason (e.g. "agent exited with status 1", "killed by signal 9").
    pub reason: String,
}

/// What cleaning up after a previous server run removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// Processes killed.
    pub processes: usize,
    /// Cgroups removed.
    pub cgroups: usize,
    /// Sandbox directories removed.
    pub dirs: usize,
    /// Anything else removed (mounts, netns, VM images).
    pub other: usize,
}

/// Errors a driver reports.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The host cannot provide this isolation (missing kernel feature, no KVM, ...).
    #[error("isolation not available on this host: {0}")]
    Unavailable(String),
    /// Setting up the sandbox failed.
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    /// The agent did not report ready in time or died during start.
    #[error("agent did not become ready: {0}")]
    AgentNotReady(String),
    /// Tear-down left something behind.
    #[error("cleanup failed: {0}")]
    Cleanup(String),
    /// Pausing or resuming failed (the sandbox keeps the state it had).
    #[error("pause/resume failed: {0}")]
    Pause(String),
    /// An OS call failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// An isolation back-end.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// The isolation this driver gives.
    fn isolation(&self) -> Isolation;

    /// Start a sandbox and return once its agent reported ready. On error nothing of the
    /// sandbox remains. Agent events are sent to `events` for the sandbox's whole life.
    async fn create(
        &self,
        spec: SandboxSpec,
        events: EventSink,
    ) -> Result<Arc<dyn SandboxHandle>, DriverError>;

    /// Remove every process, mount, cgroup, netns and file a previous server run left behind.
    /// Called once at server start, before serving.
    async fn reap_orphans(&self) -> Result<ReapReport, DriverError>;

    /// Whether sandboxes of this driver can be given outbound network (their handles answer
    /// [`SandboxHandle::netns_path`] and [`SandboxHandle::set_nameserver`]).
    fn supports_egress(&self) -> bool {
        false
    }
}

/// A live sandbox.
#[async_trait]
pub trait SandboxHandle: Send + Sync + 'static {
    /// The sandbox ID.
    fn id(&self) -> &str;

    /// The isolation this sandbox got.
    fn isolation(&self) -> Isolation;

    /// Open a TCP connection to `port` inside the sandbox (the agent is on 49983).
    async fn dial(&self, port: u16) -> std::io::Result<tokio::net::TcpStream>;

    /// Current resource usage.
    fn stats(&self) -> Result<SandboxStats, DriverError>;

    /// Stop every process of the sandbox in place (cgroup freezer); memory stays resident.
    /// Returns once the freeze is complete. On error the sandbox keeps running. Drivers that
    /// cannot pause keep this default.
    async fn pause(&self) -> Result<(), DriverError> {
        Err(DriverError::Unavailable(
            "this driver cannot pause sandboxes".into(),
        ))
    }

    /// Let a paused sandbox run again. Resuming a running sandbox is a no-op.
    async fn resume(&self) -> Result<(), DriverError> {
        Err(DriverError::Unavailable(
            "this driver cannot pause sandboxes".into(),
        ))
    }

    /// Resolves when the sandbox's init (agent or VMM) exited, for whatever reason: a crash, or
    /// [`SandboxHandle::destroy`]. The manager tells the two apart by its own bookkeeping.
    async fn wait_exit(&self) -> ExitInfo;

    /// Kill every process and remove every trace, paused or not. Idempotent.
    async fn destroy(&self) -> Result<(), DriverError>;

    /// A path that opens the sandbox's network namespace for as long as the sandbox lives
    /// (the host side of egress puts the sandbox's interface there). `None`: not available.
    fn netns_path(&self) -> Option<PathBuf> {
        None
    }

    /// Write the sandbox's filesystem changes (everything it changed on top of its template
    /// and layers) into the new, empty directory `dest`, consistent as of one instant: the
    /// sandbox is frozen while they are read and keeps running (or stays paused) afterwards.
    /// A sandbox started with `dest` as its newest [`TemplateImage::layers`] entry sees the
    /// same files. Processes and memory are not part of it. Drivers that cannot keep this
    /// default.
    async fn snapshot_filesystem(&self, dest: &Path) -> Result<(), DriverError> {
        let _ = dest;
        Err(DriverError::Unavailable(
            "this driver cannot snapshot a sandbox's filesystem".into(),
        ))
    }

    /// [`Self::snapshot_filesystem`] plus the sandbox's memory and device state, saved at the
    /// same instant the files are read. A sandbox started with `dest` as its newest layer and
    /// the same CPU and memory limits resumes where this one was: its processes run on (the
    /// driver hands it its own ID, token, environment, clock and randomness first). Started
    /// with other limits, or where the saved machine no longer matches, it cold-starts from
    /// the files. Drivers that cannot keep this default.
    async fn snapshot_memory(&self, dest: &Path) -> Result<(), DriverError> {
        let _ = dest;
        Err(DriverError::Unavailable(
            "this driver cannot snapshot a sandbox's memory".into(),
        ))
    }

    /// Prepare the sandbox for the interface that egress adds to its [`Self::netns_path`]:
    /// point its `/etc/resolv.conf` at `nameserver` (the host end of that interface), and
    /// whatever else its driver needs so traffic reaches the interface (a microVM: the guest's
    /// route and its namespace's forwarding). Called once, before the interface exists.
    async fn set_nameserver(&self, nameserver: std::net::Ipv4Addr) -> Result<(), DriverError> {
        let _ = nameserver;
        Err(DriverError::Unavailable(
            "this driver cannot configure a sandbox's resolver".into(),
        ))
    }
}

/// `POST path` with `body` to the sandbox's agent (its envd port, through [`SandboxHandle::dial`])
/// with the access token: `Ok` for a 200/204, else the status and the start of the body.
/// For the agent's host-only routes (`/fsfreeze`, `/egress`, `/trust`, ...), which the proxy
/// refuses from outside.
pub async fn agent_post(
    handle: &(impl SandboxHandle + ?Sized),
    token: &str,
    path: &str,
    body: &[u8],
    timeout: std::time::Duration,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if token.bytes().any(|b| b.is_ascii_control()) {
        return Err("the access token contains control characters".into());
    }
    let work = async {
        let mut s = handle
            .dial(cella_proto::envd::ENVD_PORT)
            .await
            .map_err(|e| format!("dialing the agent: {e}"))?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: sandbox\r\n{}: {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            cella_proto::envd::ACCESS_TOKEN_HEADER,
            body.len()
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("writing to the agent: {e}"))?;
        s.write_all(body)
            .await
            .map_err(|e| format!("writing to the agent: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the agent's answer: {e}"))?;
            if n == 0 || buf.len() > 8192 {
                break;
            }
            buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
        match http_status(&buf) {
            Some(204) | Some(200) => Ok(()),
            Some(code) => {
                let body = buf
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .and_then(|i| buf.get(i + 4..))
                    .unwrap_or_default();
                let body: String = String::from_utf8_lossy(body).chars().take(300).collect();
                Err(format!("the agent answered {path} with {code}: {body}"))
            }
            None => Err(format!("the agent's answer to {path} is not HTTP")),
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the agent did not answer {path} within {timeout:?}"
        )),
    }
}

/// The status code of an HTTP/1.x response head.
fn http_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// First host UID/GID that sandbox IDs map to: inside 0..[`SANDBOX_ID_COUNT`] is host
/// `SANDBOX_ID_BASE`.. . Template root filesystems are stored shifted by this base, so that
/// files owned by root inside a sandbox are never owned by root on the host.
pub const SANDBOX_ID_BASE: u32 = 100_000;

/// Number of UIDs/GIDs mapped into a sandbox.
pub const SANDBOX_ID_COUNT: u32 = 65_536;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(http_status(b"HTTP/1.1 204 No Content\r\n\r\n"), Some(204));
        assert_eq!(http_status(b"HTTP/1.0 409 Conflict\r\nx: y"), Some(409));
        assert_eq!(http_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(http_status(b""), None);
    }
}
