//! The sandbox registry and lifecycle: the typed commands the HTTP layer hands in.
//!
//! Handlers only parse and authenticate; every decision about a sandbox (validation, owner
//! checks, timeouts, audit) is made here, so the REST API, the CLI and tests share one path.
//!
//! Lifecycle: `create` asks a [`Driver`] for a sandbox and returns only once its agent answered.
//! A reaper task kills sandboxes whose end time passed; a watcher per sandbox notices when it
//! died on its own. Every transition is written to the audit log.
//!
//! Pause: `running → paused` freezes the sandbox in place through the driver (cgroup
//! freezer: memory stays resident on the host, nothing is written out), `paused → running`
//! thaws it (`connect`, the deprecated `resume`, or proxy traffic when `autoResume` is on). A
//! sandbox created with `autoPause` (`lifecycle.onTimeout = "pause"`) is paused instead of
//! killed when its timeout passes. A paused sandbox does not run down its timeout; it is kept
//! for [`ManagerConfig::paused_ttl`] and then killed (its `endAt` says when). Transitions of
//! one sandbox are serialized by a per-sandbox lock, so a kill, the reaper and a pause never
//! interleave; a kill of a paused sandbox thaws it first (a frozen v1 cgroup keeps SIGKILL
//! pending).
//!
//! Pause to disk (`memory: false`, and every frozen sandbox at shutdown): its files become a
//! hidden snapshot, a [`PausedRecord`] keeps the rest, a registry entry without processes
//! (`OnDisk`) replaces it and the sandbox is destroyed; a resume cold-starts it from the
//! snapshot under the same ID and tokens. Records are loaded at start, so those sandboxes
//! outlive a restart; memory-paused ones die with a crashed server.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cella_api::{
    CLIENT_ID, DEFAULT_TIMEOUT_SECS, ENVD_VERSION, Isolation, Lifecycle, ListedSandbox,
    MAX_TIMEOUT_SECS, NewSandbox, OnTimeout, Sandbox, SandboxDetail, SandboxMetric, SandboxState,
};
use rand::Rng;
use tokio::sync::mpsc;

use crate::driver::{
    Driver, DriverError, EventSink, Limits, SandboxEvent, SandboxHandle, SandboxSpec,
};
use crate::egress::{Egress, EgressError, EgressPolicy, IamTokens};
use crate::metrics::{DEFAULT_HISTORY, MetricsRing, Reading, cpu_percent};
use crate::snapshot::{
    MAX_CHAIN, PausedRecord, SnapshotError, SnapshotMeta, SnapshotStore, is_snapshot_name,
};
use crate::store::{NewAudit, SandboxRecord, Store, format_rfc3339_ms, now_ms};
use crate::template::{TemplateError, TemplateStore};

/// Errors of manager commands. The server maps each to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// A request field is invalid (400). `field` names it.
    #[error("invalid field '{field}': {message}")]
    InvalidField {
        /// JSON field name as the client sent it.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The sandbox does not exist or belongs to another key (404).
    #[error("sandbox '{0}' not found")]
    SandboxNotFound(String),
    /// The sandbox is not in the state the command needs (409), e.g. pausing a paused one.
    #[error("sandbox '{id}' is {state}")]
    WrongState {
        /// Sandbox ID.
        id: String,
        /// Its state: `paused` or `running`.
        state: &'static str,
    },
    /// This sandbox's driver or host cannot pause (501).
    #[error("pausing is not available for sandbox '{id}': {reason}")]
    PauseUnsupported {
        /// Sandbox ID.
        id: String,
        /// Why (no freezer, driver without pause).
        reason: String,
    },
    /// The template is unknown (404).
    #[error("template '{0}' not found")]
    TemplateNotFound(String),
    /// This sandbox's driver, or this server, cannot take snapshots (501).
    #[error("snapshots are not available for sandbox '{id}': {reason}")]
    SnapshotUnsupported {
        /// Sandbox ID.
        id: String,
        /// Why.
        reason: String,
    },
    /// The snapshot store failed (500).
    #[error("snapshot store failed")]
    Snapshot(#[from] SnapshotError),
    /// The template is known but its build is not available (503).
    #[error("template '{0}' is not built yet")]
    TemplateNotReady(String),
    /// The requested isolation cannot be provided on this host (400).
    #[error("driver '{0}' is not available on this host")]
    DriverUnavailable(String),
    /// The request conflicts with the sandbox's or the server's state (409).
    #[error("{0}")]
    Conflict(String),
    /// The host-side network failed (500).
    #[error("sandbox network failed")]
    Egress(#[from] EgressError),
    /// The server is shutting down (503).
    #[error("server is shutting down")]
    ShuttingDown,
    /// The isolation driver failed (500).
    #[error("sandbox driver failed")]
    Driver(#[from] DriverError),
    /// The state store failed (500).
    #[error("state store failed")]
    Store(#[from] crate::store::StoreError),
    /// Template resolution failed unexpectedly (500).
    #[error("template store failed")]
    Template(#[source] TemplateError),
}

/// Bounds and defaults applied to create requests.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Largest vCPU count a sandbox may ask for.
    pub max_cpu_count: u32,
    /// Largest memory limit in MiB.
    pub max_memory_mb: u64,
    /// Largest disk in MiB.
    pub max_disk_mb: u64,
    /// Process limit per sandbox.
    pub max_pids: u64,
    /// How often the reaper looks for expired sandboxes.
    pub reap_interval: Duration,
    /// How long a paused sandbox is kept before it is killed (its memory stays resident on
    /// the host all that time).
    pub paused_ttl: Duration,
    /// Where filesystem snapshots are kept (`None`: this server takes none; the snapshot and
    /// fork routes answer 501).
    pub snapshot_dir: Option<std::path::PathBuf>,
}

/// Default of [`ManagerConfig::paused_ttl`]: 24 h, the longest a running sandbox may live.
pub const DEFAULT_PAUSED_TTL: Duration = Duration::from_secs(MAX_TIMEOUT_SECS);

/// Shortest lifetime a sandbox gets when traffic auto-resumes it (E2B's minimum).
pub const MIN_AUTO_RESUME_TIMEOUT_SECS: u64 = 300;

/// Lifetime of a sandbox resumed by a connect without `timeout` (E2B's `ConnectSandboxV2`
/// default).
pub const CONNECT_DEFAULT_TIMEOUT_SECS: u64 = 300;

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            max_cpu_count: 8,
            max_memory_mb: 8192,
            max_disk_mb: 32768,
            max_pids: 1024,
            reap_interval: Duration::from_millis(100),
            paused_ttl: DEFAULT_PAUSED_TTL,
            snapshot_dir: None,
        }
    }
}

/// Source of [`LiveSandbox::incarnation`].
static INCARNATIONS: AtomicU64 = AtomicU64::new(1);

/// A live sandbox as the manager tracks it.
pub struct LiveSandbox {
    /// Driver handle (dial, stats, destroy).
    pub handle: Arc<dyn SandboxHandle>,
    /// Unique per registry entry, also across entries of one ID (a sandbox resumed from disk
    /// is a new one): pooled connections into a sandbox are keyed by it, so none outlives
    /// the incarnation it was made to.
    pub incarnation: u64,
    /// Owning API key ID.
    pub owner: String,
    /// Template name.
    pub template_id: String,
    /// Alias it was requested by, if different from the name.
    pub alias: Option<String>,
    /// Agent access token.
    pub access_token: String,
    /// Token the proxy requires for the sandbox's ports (other than the agent's) when the
    /// sandbox was created with `network.allowPublicTraffic = false`.
    pub traffic_access_token: Option<String>,
    /// Start time, ms since the epoch.
    pub started_at_ms: i64,
    end_at_ms: AtomicI64,
    /// User metadata.
    pub metadata: BTreeMap<String, String>,
    /// Limits.
    pub limits: Limits,
    /// Sampled metrics (see [`crate::metrics`]).
    metrics: Mutex<MetricsRing>,
    /// Egress rules in force; `None`: the sandbox has no network interface.
    egress: Mutex<Option<EgressPolicy>>,
    /// Lifetime in seconds the sandbox was created with (auto-resume gives it again).
    timeout_secs: u64,
    /// Pause instead of kill on timeout.
    auto_pause: std::sync::atomic::AtomicBool,
    /// Proxy traffic resumes it when paused.
    pub auto_resume: bool,
    /// Paused now (only changed under `transition`).
    paused: std::sync::atomic::AtomicBool,
    /// The snapshot it started from (its chain stays on disk while the sandbox lives).
    pub snapshot: Option<String>,
    /// What it started from (template, and snapshot layers).
    image: crate::driver::TemplateImage,
    /// The create request (template aside), so that forks start the same way.
    request: NewSandbox,
    /// Paused to disk: no processes, its files are this hidden snapshot (see
    /// [`Manager::pause`] with `memory: false`).
    on_disk: Option<String>,
    /// Auto-pause keeps memory (`autoPauseMemory`, default true); false pauses to disk.
    auto_pause_memory: bool,
    /// While paused in memory: the copy written at the pause (files, and memory where the
    /// driver can) that its paused record points to, so a restart after a crash brings it
    /// back. Released at the resume and the kill.
    saved: Mutex<Option<SnapshotPin>>,
    /// Serializes pause, resume and destroy of this sandbox.
    transition: tokio::sync::Mutex<()>,
}

impl LiveSandbox {
    /// End time, ms since the epoch: when a running sandbox times out, or when a paused one
    /// is killed for having been paused too long.
    pub fn end_at_ms(&self) -> i64 {
        self.end_at_ms.load(Ordering::Relaxed)
    }

    /// Whether the sandbox is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Running or paused.
    pub fn state(&self) -> SandboxState {
        if self.is_paused() {
            SandboxState::Paused
        } else {
            SandboxState::Running
        }
    }

    fn lifecycle(&self) -> Lifecycle {
        Lifecycle {
            auto_resume: self.auto_resume,
            on_timeout: if self.auto_pause.load(Ordering::Relaxed) {
                OnTimeout::Pause
            } else {
                OnTimeout::Kill
            },
        }
    }

    fn detail(&self) -> SandboxDetail {
        SandboxDetail {
            template_id: self.template_id.clone(),
            alias: self.alias.clone(),
            sandbox_id: self.handle.id().to_string(),
            client_id: CLIENT_ID.to_string(),
            started_at: format_rfc3339_ms(self.started_at_ms),
            end_at: format_rfc3339_ms(self.end_at_ms()),
            envd_version: ENVD_VERSION.to_string(),
            envd_access_token: Some(self.access_token.clone()),
            domain: None,
            cpu_count: self.limits.cpu_count,
            memory_mb: self.limits.memory_mb,
            disk_size_mb: self.limits.disk_mb,
            metadata: self.metadata.clone(),
            state: self.state(),
            lifecycle: self.lifecycle(),
            network: self.network_info(),
            allow_internet_access: Some(self.egress().is_some_and(|p| !p.denies_all())),
            isolation: self.handle.isolation(),
        }
    }

    /// The egress rules in force (`None`: no network interface).
    pub fn egress(&self) -> Option<EgressPolicy> {
        self.egress.lock().ok().and_then(|p| p.clone())
    }

    fn network_info(&self) -> Option<cella_api::NetworkConfig> {
        let policy = self.egress();
        let mask = self.mask_request_host().map(str::to_string);
        let https: Vec<i64> = self.https_ports().into_iter().map(i64::from).collect();
        if self.traffic_access_token.is_none()
            && policy.is_none()
            && mask.is_none()
            && https.is_empty()
        {
            return None;
        }
        Some(cella_api::NetworkConfig {
            allow_public_traffic: self.traffic_access_token.as_ref().map(|_| false),
            allow_out: policy.as_ref().map(EgressPolicy::allow_out),
            deny_out: policy.as_ref().map(EgressPolicy::deny_out),
            dns_servers: policy.as_ref().map(EgressPolicy::dns_servers_out),
            egress_proxy: policy
                .as_ref()
                .and_then(|p| p.proxy.as_ref())
                .map(crate::egress::EgressProxy::to_info),
            rules: policy.as_ref().and_then(|p| p.rules.to_info()),
            mask_request_host: mask,
            https_ports: (!https.is_empty()).then_some(https),
        })
    }

    /// Whether the proxy reaches `port` over TLS (`network.httpsPorts`).
    pub fn is_https_port(&self, port: u16) -> bool {
        self.https_ports().contains(&port)
    }

    fn https_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .request
            .network
            .as_ref()
            .and_then(|n| n.https_ports.as_ref())
            .map(|v| v.iter().filter_map(|p| u16::try_from(*p).ok()).collect())
            .unwrap_or_default();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// The `Host` the proxy gives requests to the sandbox's ports (`${PORT}` not yet
    /// replaced), when the create asked for one (`network.maskRequestHost`).
    pub fn mask_request_host(&self) -> Option<&str> {
        self.request
            .network
            .as_ref()
            .and_then(|n| n.mask_request_host.as_deref())
    }

    fn listed(&self) -> ListedSandbox {
        ListedSandbox {
            template_id: self.template_id.clone(),
            alias: self.alias.clone(),
            sandbox_id: self.handle.id().to_string(),
            client_id: CLIENT_ID.to_string(),
            started_at: format_rfc3339_ms(self.started_at_ms),
            end_at: format_rfc3339_ms(self.end_at_ms()),
            cpu_count: self.limits.cpu_count,
            memory_mb: self.limits.memory_mb,
            disk_size_mb: self.limits.disk_mb,
            metadata: self.metadata.clone(),
            state: self.state(),
            envd_version: ENVD_VERSION.to_string(),
            isolation: self.handle.isolation(),
        }
    }

    fn sandbox(&self) -> Sandbox {
        Sandbox {
            template_id: self.template_id.clone(),
            sandbox_id: self.handle.id().to_string(),
            client_id: CLIENT_ID.to_string(),
            envd_version: ENVD_VERSION.to_string(),
            alias: self.alias.clone(),
            envd_access_token: Some(self.access_token.clone()),
            traffic_access_token: self.traffic_access_token.clone(),
            domain: None,
            isolation: Some(self.handle.isolation()),
        }
    }
}

/// The sandbox manager. Cheap to share behind an `Arc`.
pub struct Manager {
    drivers: Vec<Arc<dyn Driver>>,
    default_driver: usize,
    templates: Arc<TemplateStore>,
    store: Store,
    config: ManagerConfig,
    live: RwLock<HashMap<String, Arc<LiveSandbox>>>,
    events: EventSink,
    shutting_down: std::sync::atomic::AtomicBool,
    /// Sandboxes being destroyed right now, so that a kill and the reaper do not race.
    dying: Mutex<std::collections::HashSet<String>>,
    /// Creates by `Idempotency-Key`: (owner, key) → the create's outcome and when it started.
    idempotent: Mutex<HashMap<(String, String), (i64, IdempotentCell)>>,
    /// Host-side sandbox networking; `None`: no sandbox gets a network (`--egress none`).
    egress: Option<Arc<dyn Egress>>,
    /// Filesystem snapshots; `None`: not configured or not usable.
    snapshots: Option<SnapshotStore>,
    /// Snapshots that creates in flight start from (raw ID → count): their layers must stay
    /// until the sandbox is registered. Locked across every [`SnapshotStore::gc`].
    pins: Arc<Mutex<HashMap<String, usize>>>,
}

/// What a create starts from: the image, the snapshot it comes from, and that snapshot's pin.
type Source = (
    crate::driver::TemplateImage,
    Option<SnapshotMeta>,
    Option<SnapshotPin>,
);

/// Keeps a snapshot's layers from [`SnapshotStore::gc`] while it lives.
struct SnapshotPin {
    pins: Arc<Mutex<HashMap<String, usize>>>,
    id: String,
}

impl SnapshotPin {
    /// Pin `id`; `pins` must be the locked map.
    fn new(
        pins: &Arc<Mutex<HashMap<String, usize>>>,
        map: &mut HashMap<String, usize>,
        id: &str,
    ) -> SnapshotPin {
        *map.entry(id.to_string()).or_insert(0) += 1;
        SnapshotPin {
            pins: pins.clone(),
            id: id.to_string(),
        }
    }
}

impl Drop for SnapshotPin {
    fn drop(&mut self) {
        if let Ok(mut map) = self.pins.lock()
            && let Some(n) = map.get_mut(&self.id)
        {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.id);
            }
        }
    }
}

/// Most forks one request may ask for (the SDK's bound).
pub const MAX_FORK_COUNT: u32 = 20;

/// Lifetime of a fork when the request gives none (E2B's `SandboxForkRequest` default).
pub const DEFAULT_FORK_TIMEOUT_SECS: u64 = 15;

type IdempotentCell = Arc<tokio::sync::OnceCell<Sandbox>>;

/// How long an `Idempotency-Key` is remembered.
const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;

/// Driver names accepted in the create request's `driver` field.
fn driver_matches(name: &str, isolation: Isolation) -> bool {
    match name {
        "jail" => isolation == Isolation::Jail,
        "vm" | "microvm" => matches!(isolation, Isolation::MicrovmKvm | Isolation::MicrovmTcg),
        "microvm-kvm" => isolation == Isolation::MicrovmKvm,
        "microvm-tcg" => isolation == Isolation::MicrovmTcg,
        _ => false,
    }
}

const KNOWN_DRIVERS: &[&str] = &["jail", "vm", "microvm", "microvm-kvm", "microvm-tcg"];

/// What a snapshot keeps of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapshotWith {
    /// Its files (processes end; sandboxes started from it cold-start).
    Files,
    /// Files and memory; a driver that cannot is a 400 naming `memory`.
    Memory,
    /// Files and memory where the driver can, else files.
    MemoryIfPossible,
}

impl Manager {
    /// Build a manager and start its background tasks (reaper, agent-event recorder).
    /// `drivers[default_driver]` serves requests that do not ask for a driver.
    pub fn start(
        drivers: Vec<Arc<dyn Driver>>,
        default_driver: usize,
        templates: Arc<TemplateStore>,
        store: Store,
        config: ManagerConfig,
    ) -> Arc<Manager> {
        Manager::start_with_egress(drivers, default_driver, templates, store, config, None)
    }

    /// [`Manager::start`] with outbound networking: sandboxes whose request allows some
    /// egress get an interface and firewall rules from `egress`.
    pub fn start_with_egress(
        drivers: Vec<Arc<dyn Driver>>,
        default_driver: usize,
        templates: Arc<TemplateStore>,
        store: Store,
        config: ManagerConfig,
        egress: Option<Arc<dyn Egress>>,
    ) -> Arc<Manager> {
        let (tx, rx) = mpsc::unbounded_channel();
        let default_driver = default_driver.min(drivers.len().saturating_sub(1));
        let snapshots = config.snapshot_dir.clone().and_then(|dir| {
            SnapshotStore::open(dir)
                .map_err(|e| tracing::warn!(error = %error_chain(&e), "snapshots disabled"))
                .ok()
        });
        // Sandboxes paused to disk by the last run come back paused; then nothing else runs
        // yet, so fork snapshots and deleted ones of the last run go.
        let mut live = HashMap::new();
        if let Some(s) = &snapshots {
            for rec in s.load_paused() {
                match dormant_entry(s, &rec, config.max_pids) {
                    Some(l) => {
                        live.insert(rec.id.clone(), Arc::new(l));
                    }
                    None => {
                        tracing::warn!(sandbox = %rec.id, "the files of a paused sandbox are gone; forgetting it");
                        s.remove_paused(&rec.id);
                    }
                }
            }
            let in_use: std::collections::HashSet<String> = live
                .values()
                .filter_map(|l: &Arc<LiveSandbox>| l.snapshot.clone())
                .collect();
            let removed = s.gc(&in_use);
            if removed > 0 {
                tracing::info!(removed, "removed unused snapshot layers");
            }
            if !live.is_empty() {
                tracing::info!(
                    paused = live.len(),
                    "sandboxes paused to disk are back (paused)"
                );
            }
        }
        let manager = Arc::new(Manager {
            drivers,
            default_driver,
            templates,
            store,
            config,
            live: RwLock::new(live),
            events: tx,
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            dying: Mutex::new(Default::default()),
            idempotent: Mutex::new(HashMap::new()),
            egress,
            snapshots,
            pins: Arc::new(Mutex::new(HashMap::new())),
        });
        tokio::spawn(record_agent_events(manager.store.clone(), rx));
        tokio::spawn(reaper(Arc::downgrade(&manager)));
        manager
    }

    /// The isolation of the default driver.
    /// The workload identity issuer and its JWKS (`None` without egress).
    pub fn identity_discovery(&self) -> Option<(String, serde_json::Value)> {
        self.egress.as_ref()?.identity_discovery()
    }

    /// The isolation of the default driver.
    pub fn default_isolation(&self) -> Isolation {
        self.drivers
            .get(self.default_driver)
            .map_or(Isolation::Jail, |d| d.isolation())
    }

    /// The state store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The template store.
    pub fn templates(&self) -> &Arc<TemplateStore> {
        &self.templates
    }

    /// Create a sandbox for `owner`. Returns once its agent answers. `templateID` names a
    /// template, or one of `owner`'s snapshots (see [`crate::snapshot`]).
    pub async fn create(
        self: &Arc<Self>,
        owner: &str,
        req: NewSandbox,
    ) -> Result<Sandbox, ManagerError> {
        self.create_from(owner, req, None, None).await
    }

    /// [`Manager::create`], from `fork_of` (a pinned, possibly hidden snapshot) when given
    /// instead of resolving `templateID`.
    async fn create_from(
        self: &Arc<Self>,
        owner: &str,
        req: NewSandbox,
        fork_of: Option<SnapshotMeta>,
        revival: Option<&PausedRecord>,
    ) -> Result<Sandbox, ManagerError> {
        let request = req.clone();
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(ManagerError::ShuttingDown);
        }
        let timeout = validate_timeout(req.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS), "timeout")?;
        if req.template_id.trim().is_empty() {
            return Err(ManagerError::InvalidField {
                field: "templateID",
                message: "must not be empty".into(),
            });
        }
        let (auto_pause, auto_resume) = lifecycle_of(&req)?;
        refuse_unsupported(&req)?;
        let metadata = req.metadata.unwrap_or_default();
        validate_map(&metadata, "metadata")?;
        let env_vars = req.env_vars.unwrap_or_default();
        validate_map(&env_vars, "envVars")?;
        for key in env_vars.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(ManagerError::InvalidField {
                    field: "envVars",
                    message: format!("invalid variable name {key:?}"),
                });
            }
        }
        let (image, snapshot, _pin) = self
            .resolve_source(owner, &req.template_id, fork_of)
            .await?;
        let driver = match &snapshot {
            None => self.pick_driver(req.driver.as_deref())?,
            Some(meta) => self.pick_snapshot_driver(req.driver.as_deref(), meta)?,
        };
        let network = req.network.clone().unwrap_or_default();
        let policy = EgressPolicy::from_request(
            req.allow_internet_access,
            network.allow_out.as_deref(),
            network.deny_out.as_deref(),
            "network.",
        )
        .and_then(|p| p.with_dns_servers(network.dns_servers.as_deref(), "network."))
        .and_then(|p| p.with_egress_proxy(network.egress_proxy.as_ref(), "network."))
        .and_then(|p| Ok(p.with_iam(IamTokens::from_request(req.iam.as_ref())?)))
        .and_then(|p| p.with_rules(network.rules.as_ref(), "network."))
        .map_err(|e| ManagerError::InvalidField {
            field: e.field,
            message: e.message,
        })?;
        self.check_proxy(&policy, "network.egressProxy").await?;
        // Only a server with egress gives a sandbox a network, and only if it may reach
        // something: everything else keeps the lo-only netns (no cost at create).
        let egress = self.egress.clone().filter(|_| policy.reaches_anything());
        if let Some(e) = &egress
            && !policy.rules.is_empty()
            && e.interception_ca().is_none()
        {
            return Err(no_interception_ca());
        }
        if egress.is_some() && !driver.supports_egress() {
            return Err(ManagerError::InvalidField {
                field: "allow_internet_access",
                message: format!(
                    "the {} driver has no outbound network yet; create with \
                     allow_internet_access=false or use the jail driver",
                    driver.isolation().as_str()
                ),
            });
        }

        let mut limits = Limits {
            max_pids: self.config.max_pids,
            ..Limits::default()
        };
        if let Some(meta) = &snapshot {
            limits.cpu_count = meta.cpu_count;
            limits.memory_mb = meta.memory_mb;
            limits.disk_mb = meta.disk_mb;
        } else if let Some(spec) = self.templates.spec(&image.name) {
            limits.cpu_count = spec.cpu_count;
            limits.memory_mb = spec.memory_mb;
            limits.disk_mb = spec.disk_mb;
        }
        if let Some(c) = req.cpu_count {
            limits.cpu_count =
                bounded(c as u64, 1, self.config.max_cpu_count as u64, "cpuCount")? as u32;
        }
        if let Some(m) = req.memory_mb {
            limits.memory_mb = bounded(m, 128, self.config.max_memory_mb, "memoryMB")?;
        }
        if let Some(d) = req.disk_size_mb {
            limits.disk_mb = bounded(d, 64, self.config.max_disk_mb, "diskSizeMB")?;
        }
        if let Some(meta) = &snapshot
            && limits.disk_mb < meta.disk_mb
        {
            return Err(ManagerError::InvalidField {
                field: "diskSizeMB",
                message: format!(
                    "must be at least {} (the disk of the sandbox the snapshot was taken of)",
                    meta.disk_mb
                ),
            });
        }

        let mut env = image.env.clone();
        if !policy.rules.is_empty() && self.egress.is_some() {
            for (k, v) in crate::egress::CA_ENV {
                env.insert((*k).to_string(), (*v).to_string());
            }
        }
        env.extend(env_vars);
        let id = revival.map_or_else(new_sandbox_id, |r| r.id.clone());
        let access_token = revival.map_or_else(|| random_hex(32), |r| r.access_token.clone());
        let traffic_access_token = match revival {
            Some(r) => r.traffic_access_token.clone(),
            None => req
                .network
                .and_then(|n| n.allow_public_traffic)
                .is_some_and(|public| !public)
                .then(|| random_hex(32)),
        };
        let template_id = match revival {
            Some(r) => r.template_id.clone(),
            None => snapshot
                .as_ref()
                .map_or_else(|| image.name.clone(), |m| m.id.clone()),
        };
        let alias = match revival {
            Some(r) => r.alias.clone(),
            None => (req.template_id != template_id).then(|| req.template_id.clone()),
        };
        let spec = SandboxSpec {
            id: id.clone(),
            template: image.clone(),
            limits,
            env_vars: env,
            access_token: access_token.clone(),
        };
        let started = std::time::Instant::now();
        let nameserver = match &egress {
            Some(e) => Some(e.reserve(&id)?),
            None => None,
        };
        let created = match driver.create(spec, self.events.clone()).await {
            Ok(h) => match (&egress, nameserver) {
                (Some(e), Some(ns)) => {
                    attach_egress(e.as_ref(), &id, &h, ns, &policy, &access_token)
                        .await
                        .map(|()| h.clone())
                        .map_err(|err| (err, Some(h)))
                }
                _ => Ok(h),
            },
            Err(e) => Err((ManagerError::from(e), None)),
        };
        let handle = match created {
            Ok(h) => h,
            Err((e, handle)) => {
                if let Some(h) = handle
                    && let Err(d) = h.destroy().await
                {
                    tracing::warn!(sandbox = %id, error = %d, "cleanup after failed egress setup");
                }
                if let Some(eg) = &egress
                    && let Err(r) = eg.release(&id).await
                {
                    tracing::warn!(sandbox = %id, error = %r, "releasing the network failed");
                }
                self.store.audit(NewAudit {
                    actor: owner.to_string(),
                    sandbox_id: Some(id.clone()),
                    kind: "sandbox.create_failed".into(),
                    detail: serde_json::json!({ "error": error_chain(&e) }),
                });
                return Err(e);
            }
        };
        let attached_policy = egress.as_ref().map(|_| policy.clone());
        let now = now_ms();
        let live = Arc::new(LiveSandbox {
            incarnation: INCARNATIONS.fetch_add(1, Ordering::Relaxed),
            handle: handle.clone(),
            owner: owner.to_string(),
            template_id: template_id.clone(),
            alias,
            image: image.clone(),
            snapshot: snapshot.as_ref().map(|m| m.id.clone()),
            auto_pause_memory: request.auto_pause_memory != Some(false),
            request,
            on_disk: None,
            access_token,
            traffic_access_token,
            started_at_ms: revival.map_or(now, |r| r.started_at_ms),
            end_at_ms: AtomicI64::new(now + (timeout as i64) * 1000),
            metadata: metadata.clone(),
            limits,
            metrics: Mutex::new(MetricsRing::new(DEFAULT_HISTORY)),
            egress: Mutex::new(attached_policy.clone()),
            timeout_secs: timeout,
            auto_pause: std::sync::atomic::AtomicBool::new(auto_pause),
            auto_resume,
            paused: std::sync::atomic::AtomicBool::new(false),
            saved: Mutex::new(None),
            transition: tokio::sync::Mutex::new(()),
        });
        let record = if revival.is_some() {
            Store::reopen_sandbox
        } else {
            Store::insert_sandbox
        };
        record(
            &self.store,
            &SandboxRecord {
                id: id.clone(),
                key_id: owner.to_string(),
                template: template_id.clone(),
                isolation: handle.isolation().as_str().to_string(),
                started_at_ms: now,
                end_at_ms: live.end_at_ms(),
                metadata,
                cpu_count: limits.cpu_count,
                memory_mb: limits.memory_mb,
                disk_mb: limits.disk_mb,
            },
        )?;
        self.store.audit(NewAudit {
            actor: owner.to_string(),
            sandbox_id: Some(id.clone()),
            kind: "sandbox.create".into(),
            detail: serde_json::json!({
                "template": image.name,
                "build": image.build_id,
                "snapshot": snapshot.as_ref().map(|m| m.id.clone()),
                "isolation": handle.isolation().as_str(),
                "timeout": timeout,
                "onTimeout": if auto_pause { "pause" } else { "kill" },
                "autoResume": auto_resume,
                "cpuCount": limits.cpu_count,
                "memoryMB": limits.memory_mb,
                "diskSizeMB": limits.disk_mb,
                "readyMs": started.elapsed().as_secs_f64() * 1000.0,
            }),
        });
        self.store.audit(NewAudit {
            actor: owner.to_string(),
            sandbox_id: Some(id.clone()),
            kind: "net.policy".into(),
            detail: match &attached_policy {
                Some(p) => {
                    let mut d = p.audit_json();
                    d["change"] = "create".into();
                    d["egress"] = true.into();
                    d
                }
                None => serde_json::json!({ "change": "create", "egress": false,
                    "reason": if self.egress.is_some() { "request allows no egress" }
                              else { "server runs with --egress none" } }),
            },
        });
        let out = live.sandbox();
        // A sandbox resumed from disk must not come back if it was killed meanwhile (the kill
        // took its paused entry out); the check and the insert are one step under `dying`.
        if !self.register(&id, live, revival.is_some()) {
            let _ = handle.destroy().await;
            if let Some(eg) = &egress
                && let Err(e) = eg.release(&id).await
            {
                tracing::warn!(sandbox = %id, error = %e, "releasing the network failed");
            }
            return Err(ManagerError::SandboxNotFound(id));
        }
        tokio::spawn(watch_exit(Arc::downgrade(self), id, handle));
        Ok(out)
    }

    /// Put `live` in the registry. With `unless_dying`, not when `id` is being destroyed
    /// (returns false then).
    fn register(&self, id: &str, live: Arc<LiveSandbox>, unless_dying: bool) -> bool {
        let Ok(dying) = self.dying.lock() else {
            return false;
        };
        if unless_dying && dying.contains(id) {
            return false;
        }
        if let Ok(mut map) = self.live.write() {
            map.insert(id.to_string(), live);
        }
        true
    }

    /// Create with an `Idempotency-Key`: the first request with a key creates; concurrent and
    /// later requests with the same key (from the same API key, within 24 h) get the same
    /// sandbox instead of a second one. A failed create does not consume the key.
    pub async fn create_idempotent(
        self: &Arc<Self>,
        owner: &str,
        key: &str,
        req: NewSandbox,
    ) -> Result<Sandbox, ManagerError> {
        if key.is_empty()
            || key.len() > 255
            || !key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(ManagerError::InvalidField {
                field: "Idempotency-Key",
                message: "1-255 lowercase letters, digits or hyphens".into(),
            });
        }
        let cell = {
            let mut map = self
                .idempotent
                .lock()
                .map_err(|_| ManagerError::ShuttingDown)?;
            let now = now_ms();
            map.retain(|_, (t, _)| now - *t < IDEMPOTENCY_TTL_MS);
            map.entry((owner.to_string(), key.to_string()))
                .or_insert_with(|| (now, Arc::new(tokio::sync::OnceCell::new())))
                .1
                .clone()
        };
        cell.get_or_try_init(|| self.create(owner, req))
            .await
            .cloned()
    }

    /// The image a create starts from: `fork_of`, else the template `reference` names, else
    /// `owner`'s snapshot it names. A snapshot comes pinned.
    async fn resolve_source(
        &self,
        owner: &str,
        reference: &str,
        fork_of: Option<SnapshotMeta>,
    ) -> Result<Source, ManagerError> {
        let templates = self.templates.clone();
        let snapshots = self.snapshots.clone();
        let pins = self.pins.clone();
        let owner = owner.to_string();
        let reference = reference.to_string();
        let resolved = tokio::task::spawn_blocking(move || {
            let meta = match fork_of {
                Some(meta) => meta,
                None => match templates.resolve(&reference) {
                    Ok(image) => return Ok((image, None, None)),
                    Err(TemplateError::NotFound(n)) => {
                        let found = snapshots.as_ref().and_then(|s| {
                            let map = pins.lock().ok()?;
                            let meta = s.resolve(&owner, &reference)?;
                            Some((meta, map))
                        });
                        let Some((meta, mut map)) = found else {
                            return Err(ManagerError::TemplateNotFound(n));
                        };
                        let pin = SnapshotPin::new(&pins, &mut map, &meta.id);
                        drop(map);
                        return snapshot_image(snapshots.as_ref(), meta, Some(pin));
                    }
                    Err(TemplateError::NotBuilt { name, .. }) => {
                        return Err(ManagerError::TemplateNotReady(name));
                    }
                    Err(other) => return Err(ManagerError::Template(other)),
                },
            };
            let pin = pins
                .lock()
                .ok()
                .map(|mut map| SnapshotPin::new(&pins, &mut map, &meta.id));
            snapshot_image(snapshots.as_ref(), meta, pin)
        })
        .await
        .map_err(|e| ManagerError::Driver(DriverError::Setup(e.to_string())))??;
        Ok(resolved)
    }

    /// The driver for a sandbox from `meta`: the one that wrote its layers.
    fn pick_snapshot_driver(
        &self,
        name: Option<&str>,
        meta: &SnapshotMeta,
    ) -> Result<Arc<dyn Driver>, ManagerError> {
        let driver = match name {
            None | Some("") | Some("auto") => self
                .drivers
                .iter()
                .find(|d| d.isolation() == meta.isolation)
                .cloned()
                .ok_or_else(|| ManagerError::DriverUnavailable(meta.isolation.as_str().into()))?,
            Some(n) => self.pick_driver(Some(n))?,
        };
        if driver.isolation() != meta.isolation {
            return Err(ManagerError::InvalidField {
                field: "driver",
                message: format!(
                    "snapshot {} was taken of a {} sandbox and starts only with that driver",
                    meta.snapshot_id(),
                    meta.isolation.as_str()
                ),
            });
        }
        Ok(driver)
    }

    fn snapshot_store(&self, id: &str) -> Result<&SnapshotStore, ManagerError> {
        self.snapshots
            .as_ref()
            .ok_or_else(|| ManagerError::SnapshotUnsupported {
                id: id.to_string(),
                reason: "this server keeps no snapshots (no snapshot directory)".into(),
            })
    }

    /// Snapshot a sandbox of `owner`'s filesystem (`POST /sandboxes/{id}/snapshots`). The
    /// sandbox is frozen while its files are read and then runs on (or stays paused).
    pub async fn create_snapshot(
        &self,
        owner: &str,
        id: &str,
        name: Option<String>,
        memory: Option<bool>,
    ) -> Result<SnapshotMeta, ManagerError> {
        self.snapshot_store(id)?;
        let with = match memory {
            Some(true) => SnapshotWith::Memory,
            None => SnapshotWith::MemoryIfPossible,
            Some(false) => SnapshotWith::Files,
        };
        if let Some(n) = &name {
            if !is_snapshot_name(n) {
                return Err(ManagerError::InvalidField {
                    field: "name",
                    message: SnapshotError::InvalidName(n.clone()).to_string(),
                });
            }
            if self.templates.spec(n).is_some() {
                return Err(ManagerError::Conflict(format!(
                    "a template is named {n:?}; choose another snapshot name"
                )));
            }
        }
        let live = self.get_live(Some(owner), id)?;
        let (meta, _pin) = self.snapshot_live(&live, owner, name, false, with).await?;
        Ok(meta)
    }

    /// Take a snapshot of `live`, returned pinned.
    async fn snapshot_live(
        &self,
        live: &Arc<LiveSandbox>,
        actor: &str,
        name: Option<String>,
        hidden: bool,
        with: SnapshotWith,
    ) -> Result<(SnapshotMeta, SnapshotPin), ManagerError> {
        let id = live.handle.id().to_string();
        let _t = live.transition.lock().await;
        if !self.is_live(&id) {
            return Err(ManagerError::SandboxNotFound(id));
        }
        if live.on_disk.is_some() {
            return Err(ManagerError::WrongState {
                id,
                state: "paused",
            });
        }
        self.take_snapshot(live, actor, name, hidden, with).await
    }

    /// [`Manager::snapshot_live`] with the transition lock held by the caller.
    async fn take_snapshot(
        &self,
        live: &Arc<LiveSandbox>,
        actor: &str,
        name: Option<String>,
        hidden: bool,
        with: SnapshotWith,
    ) -> Result<(SnapshotMeta, SnapshotPin), ManagerError> {
        let id = live.handle.id().to_string();
        let store = self.snapshot_store(&id)?.clone();
        let parents: Vec<String> = live
            .snapshot
            .as_ref()
            .and_then(|s| store.get_any(s))
            .map(|p| p.chain().map(str::to_string).collect())
            .unwrap_or_default();
        if parents.len() >= MAX_CHAIN {
            return Err(ManagerError::Conflict(format!(
                "sandbox '{id}' started from a chain of {} snapshots; at most {MAX_CHAIN} can be \
                 stacked",
                parents.len()
            )));
        }
        let pending = store.begin()?;
        let started = std::time::Instant::now();
        let dir = pending.layer_dir();
        let taken = match with {
            SnapshotWith::Files => live.handle.snapshot_filesystem(&dir).await.map(|()| false),
            SnapshotWith::Memory => match live.handle.snapshot_memory(&dir).await {
                Err(DriverError::Unavailable(reason)) => {
                    store.abort(pending);
                    return Err(ManagerError::InvalidField {
                        field: "memory",
                        message: format!(
                            "{reason} (sandbox '{id}' has {} isolation); ask for \
                             mode=\"filesystem\"",
                            live.handle.isolation().as_str()
                        ),
                    });
                }
                other => other.map(|()| true),
            },
            SnapshotWith::MemoryIfPossible => match live.handle.snapshot_memory(&dir).await {
                Ok(()) => Ok(true),
                Err(e) => {
                    if !matches!(e, DriverError::Unavailable(_)) {
                        tracing::warn!(sandbox = %id, error = %error_chain(&e), "memory snapshot failed; keeping the files only");
                    }
                    live.handle.snapshot_filesystem(&dir).await.map(|()| false)
                }
            },
        };
        if let Err(e) = taken {
            store.abort(pending);
            self.store.audit(NewAudit {
                actor: actor.to_string(),
                sandbox_id: Some(id.clone()),
                kind: "sandbox.snapshot_failed".into(),
                detail: serde_json::json!({ "error": error_chain(&e) }),
            });
            return Err(match e {
                DriverError::Unavailable(reason) => {
                    ManagerError::SnapshotUnsupported { id, reason }
                }
                other => other.into(),
            });
        }
        let memory = taken.unwrap_or(false);
        let snapshot_ms = started.elapsed().as_secs_f64() * 1000.0;
        let mut base = live.image.clone();
        base.layers.clear();
        let meta = SnapshotMeta {
            id: pending.id.clone(),
            name,
            owner: live.owner.clone(),
            source_sandbox: id.clone(),
            isolation: live.handle.isolation(),
            base,
            parents,
            cpu_count: live.limits.cpu_count,
            memory_mb: live.limits.memory_mb,
            disk_mb: live.limits.disk_mb,
            created_at_ms: now_ms(),
            size_bytes: 0,
            hidden,
            memory,
        };
        let pins = self.pins.clone();
        let (meta, pin) = tokio::task::spawn_blocking(move || {
            let meta = store.commit(pending, meta)?;
            let pin = pins
                .lock()
                .map(|mut map| SnapshotPin::new(&pins, &mut map, &meta.id))
                .map_err(|_| {
                    ManagerError::Driver(DriverError::Setup("snapshot pins poisoned".into()))
                })?;
            Ok::<_, ManagerError>((meta, pin))
        })
        .await
        .map_err(|e| ManagerError::Driver(DriverError::Setup(e.to_string())))??;
        self.store.audit(NewAudit {
            actor: actor.to_string(),
            sandbox_id: Some(id),
            kind: "sandbox.snapshot".into(),
            detail: serde_json::json!({
                "snapshot": meta.id,
                "snapshotID": meta.snapshot_id(),
                "name": meta.name,
                "forFork": hidden,
                "memory": meta.memory,
                "layers": meta.parents.len() + 1,
                "sizeBytes": meta.size_bytes,
                "snapshotMs": snapshot_ms,
            }),
        });
        Ok((meta, pin))
    }

    /// Fork a sandbox of `owner` (`POST /sandboxes/{id}/fork`): snapshot its files once and
    /// start `count` sandboxes from that, each with the source's settings and `timeout`. Each
    /// fork succeeds or fails on its own. The snapshot is never listed and goes once no fork
    /// uses it.
    pub async fn fork(
        self: &Arc<Self>,
        owner: &str,
        id: &str,
        count: Option<u32>,
        timeout: Option<u64>,
    ) -> Result<Vec<Result<Sandbox, ManagerError>>, ManagerError> {
        self.snapshot_store(id)?;
        let count = count.unwrap_or(1);
        if !(1..=MAX_FORK_COUNT).contains(&count) {
            return Err(ManagerError::InvalidField {
                field: "count",
                message: format!("must be between 1 and {MAX_FORK_COUNT}"),
            });
        }
        let timeout = validate_timeout(timeout.unwrap_or(DEFAULT_FORK_TIMEOUT_SECS), "timeout")?;
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(ManagerError::ShuttingDown);
        }
        let live = self.get_live(Some(owner), id)?;
        let (meta, pin) = self
            .snapshot_live(&live, owner, None, true, SnapshotWith::MemoryIfPossible)
            .await?;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..count {
            let mut req = request_in_force(&live);
            req.template_id = meta.id.clone();
            req.timeout = Some(timeout);
            req.driver = None;
            req.cpu_count = Some(live.limits.cpu_count);
            req.memory_mb = Some(live.limits.memory_mb);
            req.disk_size_mb = Some(live.limits.disk_mb);
            let (this, owner, meta) = (self.clone(), owner.to_string(), meta.clone());
            tasks.spawn(async move { (i, this.create_from(&owner, req, Some(meta), None).await) });
        }
        let mut results: Vec<Option<Result<Sandbox, ManagerError>>> =
            (0..count).map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, r)) => {
                    if let Some(slot) = results.get_mut(i as usize) {
                        *slot = Some(r);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "a fork task failed"),
            }
        }
        let results: Vec<Result<Sandbox, ManagerError>> = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(ManagerError::Driver(DriverError::Setup(
                        "the fork task failed".into(),
                    )))
                })
            })
            .collect();
        self.store.audit(NewAudit {
            actor: owner.to_string(),
            sandbox_id: Some(id.to_string()),
            kind: "sandbox.fork".into(),
            detail: serde_json::json!({
                "snapshot": meta.id,
                "count": count,
                "timeout": timeout,
                "forks": results.iter().map(|r| match r {
                    Ok(s) => serde_json::json!({ "sandboxID": s.sandbox_id }),
                    Err(e) => serde_json::json!({ "error": error_chain(e) }),
                }).collect::<Vec<_>>(),
            }),
        });
        drop(pin);
        self.gc_snapshots().await;
        Ok(results)
    }

    /// `owner`'s snapshots, newest first; only those of `sandbox_id` / named `name` when given.
    pub fn list_snapshots(
        &self,
        owner: &str,
        sandbox_id: Option<&str>,
        name: Option<&str>,
    ) -> Vec<SnapshotMeta> {
        let Some(store) = &self.snapshots else {
            return Vec::new();
        };
        let name = name.map(|n| n.strip_suffix(":default").unwrap_or(n));
        store
            .list(owner)
            .into_iter()
            .filter(|m| sandbox_id.is_none_or(|s| m.source_sandbox == s))
            .filter(|m| name.is_none_or(|n| m.name.as_deref() == Some(n) || m.id == n))
            .collect()
    }

    /// Delete `owner`'s snapshot(s) that `reference` names. `Ok(false)`: none. Sandboxes
    /// started from it keep running; its files go when the last of them ends.
    pub async fn delete_snapshot(
        &self,
        owner: &str,
        reference: &str,
    ) -> Result<bool, ManagerError> {
        let Some(store) = self.snapshots.clone() else {
            return Ok(false);
        };
        let (o, r) = (owner.to_string(), reference.to_string());
        let n = tokio::task::spawn_blocking(move || store.delete(&o, &r))
            .await
            .map_err(|e| ManagerError::Driver(DriverError::Setup(e.to_string())))??;
        if n > 0 {
            self.store.audit(NewAudit {
                actor: owner.to_string(),
                sandbox_id: None,
                kind: "snapshot.delete".into(),
                detail: serde_json::json!({ "snapshotID": reference, "deleted": n }),
            });
            self.gc_snapshots().await;
        }
        Ok(n > 0)
    }

    /// Remove snapshot layers nothing uses any more.
    async fn gc_snapshots(&self) {
        let Some(store) = self.snapshots.clone() else {
            return;
        };
        let live: std::collections::HashSet<String> = self
            .live
            .read()
            .map(|m| m.values().filter_map(|l| l.snapshot.clone()).collect())
            .unwrap_or_default();
        let pins = self.pins.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let Ok(map) = pins.lock() else { return 0 };
            let mut in_use = live;
            in_use.extend(map.keys().cloned());
            store.gc(&in_use)
        })
        .await
        .unwrap_or(0);
        if removed > 0 {
            tracing::debug!(removed, "removed unused snapshot layers");
        }
    }

    fn pick_driver(&self, name: Option<&str>) -> Result<Arc<dyn Driver>, ManagerError> {
        match name {
            None | Some("") | Some("auto") => self
                .drivers
                .get(self.default_driver)
                .cloned()
                .ok_or_else(|| ManagerError::DriverUnavailable("default".into())),
            Some(n) => {
                if !KNOWN_DRIVERS.contains(&n) {
                    return Err(ManagerError::InvalidField {
                        field: "driver",
                        message: format!("unknown driver {n:?} (expected jail, vm or auto)"),
                    });
                }
                self.drivers
                    .iter()
                    .find(|d| driver_matches(n, d.isolation()))
                    .cloned()
                    .ok_or_else(|| ManagerError::DriverUnavailable(n.to_string()))
            }
        }
    }

    fn get_live(&self, owner: Option<&str>, id: &str) -> Result<Arc<LiveSandbox>, ManagerError> {
        let map = self
            .live
            .read()
            .map_err(|_| ManagerError::SandboxNotFound(id.to_string()))?;
        match map.get(id) {
            Some(s) if owner.is_none_or(|o| o == s.owner) => Ok(s.clone()),
            _ => Err(ManagerError::SandboxNotFound(id.to_string())),
        }
    }

    /// Look up a live sandbox for the proxy (no owner check: the agent checks its token).
    pub fn route(&self, id: &str) -> Option<Arc<LiveSandbox>> {
        self.live.read().ok()?.get(id).cloned()
    }

    /// Sandbox details.
    pub fn info(&self, owner: &str, id: &str) -> Result<SandboxDetail, ManagerError> {
        Ok(self.get_live(Some(owner), id)?.detail())
    }

    /// List `owner`'s sandboxes whose metadata contains every pair of `filter` and whose
    /// state is in `states` (empty: any state).
    pub fn list(
        &self,
        owner: &str,
        filter: &BTreeMap<String, String>,
        states: &[SandboxState],
    ) -> Vec<ListedSandbox> {
        let Ok(map) = self.live.read() else {
            return Vec::new();
        };
        let mut out: Vec<ListedSandbox> = map
            .values()
            .filter(|s| s.owner == owner)
            .filter(|s| filter.iter().all(|(k, v)| s.metadata.get(k) == Some(v)))
            .filter(|s| states.is_empty() || states.contains(&s.state()))
            .map(|s| s.listed())
            .collect();
        out.sort_by(|a, b| {
            a.started_at
                .cmp(&b.started_at)
                .then(a.sandbox_id.cmp(&b.sandbox_id))
        });
        out
    }

    /// A running sandbox of `owner` (409 when paused).
    fn get_running(&self, owner: &str, id: &str) -> Result<Arc<LiveSandbox>, ManagerError> {
        let live = self.get_live(Some(owner), id)?;
        if live.is_paused() {
            return Err(ManagerError::WrongState {
                id: id.to_string(),
                state: "paused",
            });
        }
        Ok(live)
    }

    /// Set the sandbox to end `timeout` seconds from now (may shorten). A paused sandbox's
    /// timeout starts when it is resumed: 409.
    pub fn set_timeout(&self, owner: &str, id: &str, timeout: u64) -> Result<(), ManagerError> {
        let timeout = validate_timeout(timeout, "timeout")?;
        let live = self.get_running(owner, id)?;
        let end = now_ms() + (timeout as i64) * 1000;
        live.end_at_ms.store(end, Ordering::Relaxed);
        self.store.audit(NewAudit {
            actor: owner.to_string(),
            sandbox_id: Some(id.to_string()),
            kind: "sandbox.timeout".into(),
            detail: serde_json::json!({ "timeout": timeout, "endAt": format_rfc3339_ms(end) }),
        });
        Ok(())
    }

    /// Extend (never shorten) a running sandbox's end time to `timeout` seconds from now
    /// (`POST /sandboxes/{id}/refreshes`). A paused sandbox is not resumed by this: 409.
    pub fn extend(&self, owner: &str, id: &str, timeout: u64) -> Result<(), ManagerError> {
        let t = validate_timeout(timeout, "timeout")?;
        let live = self.get_running(owner, id)?;
        live.end_at_ms
            .fetch_max(now_ms() + (t as i64) * 1000, Ordering::Relaxed);
        Ok(())
    }

    /// Connect to a sandbox: returns its create response. A running sandbox's end time is
    /// extended (never shortened) to `timeout` seconds from now; a paused one is resumed and
    /// ends `timeout` seconds from now (default [`CONNECT_DEFAULT_TIMEOUT_SECS`]). The flag says
    /// whether it was resumed (E2B answers 201 then, 200 otherwise).
    pub async fn connect(
        self: &Arc<Self>,
        owner: &str,
        id: &str,
        timeout: Option<u64>,
    ) -> Result<(Sandbox, bool), ManagerError> {
        let t = timeout
            .map(|t| validate_timeout(t, "timeout"))
            .transpose()?;
        let live = self.get_live(Some(owner), id)?;
        if live.is_paused() {
            let secs = t.unwrap_or(CONNECT_DEFAULT_TIMEOUT_SECS);
            let resumed = self.resume_live(&live, owner, "connect", secs).await?;
            return Ok((live.sandbox(), resumed));
        }
        if let Some(t) = t {
            let end = now_ms() + (t as i64) * 1000;
            live.end_at_ms.fetch_max(end, Ordering::Relaxed);
        }
        Ok((live.sandbox(), false))
    }

    /// The deprecated `POST /sandboxes/{id}/resume`: resume a paused sandbox for `timeout`
    /// seconds (E2B default 15), optionally changing what its next timeout does. 409 when it
    /// is running.
    pub async fn resume(
        self: &Arc<Self>,
        owner: &str,
        id: &str,
        timeout: Option<u64>,
        auto_pause: Option<bool>,
    ) -> Result<Sandbox, ManagerError> {
        let secs = validate_timeout(timeout.unwrap_or(DEFAULT_TIMEOUT_SECS), "timeout")?;
        let live = self.get_live(Some(owner), id)?;
        if !self.resume_live(&live, owner, "resume", secs).await? {
            return Err(ManagerError::WrongState {
                id: id.to_string(),
                state: "running",
            });
        }
        // A sandbox resumed from disk is a new entry.
        let live = self.get_live(Some(owner), id)?;
        if let Some(p) = auto_pause {
            live.auto_pause.store(p, Ordering::Relaxed);
        }
        Ok(live.sandbox())
    }

    /// An `egressProxy` is checked (resolved, not into a blocked range) before anything
    /// depends on it, on a server with egress.
    async fn check_proxy(
        &self,
        policy: &EgressPolicy,
        field: &'static str,
    ) -> Result<(), ManagerError> {
        if let (Some(egress), Some(proxy)) = (&self.egress, &policy.proxy) {
            egress
                .check_proxy(proxy)
                .await
                .map_err(|message| ManagerError::InvalidField { field, message })?;
        }
        Ok(())
    }

    /// Replace a running sandbox's egress rules (`PUT /sandboxes/{id}/network`).
    pub async fn update_network(
        &self,
        owner: &str,
        id: &str,
        req: cella_api::NetworkUpdate,
    ) -> Result<(), ManagerError> {
        let live = self.get_live(Some(owner), id)?;
        if live.on_disk.is_some() {
            return Err(ManagerError::WrongState {
                id: id.to_string(),
                state: "paused",
            });
        }
        let policy = EgressPolicy::from_request(
            req.allow_internet_access,
            req.allow_out.as_deref(),
            req.deny_out.as_deref(),
            "",
        )
        .and_then(|p| p.with_dns_servers(req.dns_servers.as_deref(), ""))
        .and_then(|p| p.with_egress_proxy(req.egress_proxy.as_ref(), ""))
        .map(|p| p.with_iam(live.egress().map(|e| e.iam).unwrap_or_default()))
        .and_then(|p| p.with_rules(req.rules.as_ref(), ""))
        .map_err(|e| ManagerError::InvalidField {
            field: e.field,
            message: e.message,
        })?;
        self.check_proxy(&policy, "egressProxy").await?;
        let Some(egress) = &self.egress else {
            return Err(ManagerError::Conflict(
                "this server gives sandboxes no network (cella serve --egress none)".into(),
            ));
        };
        if live.egress().is_none() {
            return Err(ManagerError::Conflict(format!(
                "sandbox '{id}' was created without network access; its rules cannot be changed"
            )));
        }
        if !policy.rules.is_empty() {
            trust_interception_ca(egress.as_ref(), live.handle.as_ref(), &live.access_token)
                .await?;
        }
        egress.update(id, &policy).await?;
        if let Ok(mut p) = live.egress.lock() {
            *p = Some(policy.clone());
        }
        self.store.audit(NewAudit {
            actor: owner.to_string(),
            sandbox_id: Some(id.to_string()),
            kind: "net.policy".into(),
            detail: {
                let mut d = policy.audit_json();
                d["change"] = "update".into();
                d["egress"] = true.into();
                d
            },
        });
        Ok(())
    }

    /// Pause a running sandbox of `owner` (409 when it is paused already).
    pub async fn pause(&self, owner: &str, id: &str, memory: bool) -> Result<(), ManagerError> {
        let live = self.get_live(Some(owner), id)?;
        if !self.pause_live(&live, owner, "api", memory).await? {
            return Err(ManagerError::WrongState {
                id: id.to_string(),
                state: "paused",
            });
        }
        Ok(())
    }

    /// For the proxy: make sure a sandbox that traffic is addressed to runs. A paused sandbox
    /// with `autoResume` is resumed (for its create timeout, at least
    /// [`MIN_AUTO_RESUME_TIMEOUT_SECS`]); `None` when the sandbox is unknown, or paused without
    /// `autoResume`, or its resume failed.
    pub async fn route_running(self: &Arc<Self>, id: &str) -> Option<Arc<LiveSandbox>> {
        let live = self.route(id)?;
        if !live.is_paused() {
            return Some(live);
        }
        if !live.auto_resume {
            return None;
        }
        let secs = live
            .timeout_secs
            .clamp(MIN_AUTO_RESUME_TIMEOUT_SECS, MAX_TIMEOUT_SECS);
        match self.resume_live(&live, "server", "traffic", secs).await {
            Ok(_) => self.route(id),
            Err(e) => {
                tracing::warn!(sandbox = id, error = %error_chain(&e), "auto-resume failed");
                None
            }
        }
    }

    /// Freeze `live` if it runs. `Ok(false)`: it was paused already. The sandbox is then kept
    /// for the paused TTL.
    async fn pause_live(
        &self,
        live: &Arc<LiveSandbox>,
        actor: &str,
        reason: &str,
        memory: bool,
    ) -> Result<bool, ManagerError> {
        let id = live.handle.id().to_string();
        let _t = live.transition.lock().await;
        if !self.is_live(&id) {
            return Err(ManagerError::SandboxNotFound(id));
        }
        if live.is_paused() {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        if !memory && self.snapshots.is_some() {
            match self
                .pause_to_disk(live, actor, reason, SnapshotWith::Files)
                .await
            {
                Err(ManagerError::SnapshotUnsupported { reason: why, .. }) => {
                    tracing::debug!(sandbox = %id, reason = %why, "pausing in memory instead of to disk");
                }
                other => return other.map(|()| true),
            }
        }
        if let Err(e) = live.handle.pause().await {
            self.store.audit(NewAudit {
                actor: actor.to_string(),
                sandbox_id: Some(id.clone()),
                kind: "sandbox.pause_failed".into(),
                detail: serde_json::json!({ "reason": reason, "error": error_chain(&e) }),
            });
            return Err(match e {
                DriverError::Unavailable(why) => ManagerError::PauseUnsupported { id, reason: why },
                other => other.into(),
            });
        }
        let ttl_ms = i64::try_from(self.config.paused_ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let until = now_ms().saturating_add(ttl_ms);
        live.paused.store(true, Ordering::SeqCst);
        live.end_at_ms.store(until, Ordering::Relaxed);
        if let Err(e) = self.store.set_sandbox_end(&id, until) {
            tracing::warn!(sandbox = %id, error = %e, "recording pause end time failed");
        }
        let saved = self.save_paused_copy(live, actor, until).await;
        self.store.audit(NewAudit {
            actor: actor.to_string(),
            sandbox_id: Some(id),
            kind: "sandbox.pause".into(),
            detail: serde_json::json!({
                "reason": reason,
                "memory": true,
                "memoryRequested": memory,
                "saved": saved,
                "pausedUntil": format_rfc3339_ms(until),
                "pauseMs": started.elapsed().as_secs_f64() * 1000.0,
            }),
        });
        Ok(true)
    }

    /// For a sandbox just paused in memory (the caller holds its transition lock): snapshot
    /// it (hidden; memory too where the driver can) and write its paused record, so that a
    /// crash of the server while it is paused does not lose it: the next start finds it
    /// paused on disk, as after a clean stop. It stays paused in memory meanwhile (a resume
    /// is instant and open streams continue). What was saved (`"memory"`, `"files"`), or
    /// `"none"` when this server keeps no snapshots or the copy failed (logged; the pause
    /// itself stands).
    async fn save_paused_copy(
        &self,
        live: &Arc<LiveSandbox>,
        actor: &str,
        until: i64,
    ) -> &'static str {
        let Some(store) = self.snapshots.clone() else {
            return "none";
        };
        let id = live.handle.id().to_string();
        let (meta, pin) = match self
            .take_snapshot(live, actor, None, true, SnapshotWith::MemoryIfPossible)
            .await
        {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %error_chain(&e), "cannot save a paused sandbox to disk; a crash while it is paused would lose it");
                return "none";
            }
        };
        let rec = paused_record(live, &meta.id, until);
        let written = tokio::task::spawn_blocking(move || store.save_paused(&rec))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::warn!(sandbox = %id, error = %e, "cannot write a paused sandbox's record");
            return "none";
        }
        if let Ok(mut s) = live.saved.lock() {
            *s = Some(pin);
        }
        if meta.memory { "memory" } else { "files" }
    }

    /// End the processes of `live`, which lives on as its paused record on disk: thaw it (a
    /// frozen v1 cgroup must be thawed for SIGKILL to land), destroy it, release its network.
    async fn end_processes(&self, live: &LiveSandbox) {
        let id = live.handle.id();
        let _ = live.handle.resume().await;
        if let Err(e) = live.handle.destroy().await {
            tracing::warn!(sandbox = %id, error = %e, "destroying a sandbox paused to disk");
        }
        if let (Some(eg), Some(_)) = (&self.egress, live.egress())
            && let Err(e) = eg.release(id).await
        {
            tracing::warn!(sandbox = %id, error = %e, "releasing the network of a sandbox paused to disk");
        }
    }

    /// Drop the copy [`Self::save_paused_copy`] wrote (resumed or killed): its record goes,
    /// its snapshot with the next gc.
    fn release_paused_copy(&self, live: &LiveSandbox) -> bool {
        let pin = live.saved.lock().ok().and_then(|mut s| s.take());
        if pin.is_none() {
            return false;
        }
        if let Some(store) = &self.snapshots {
            store.remove_paused(live.handle.id());
        }
        true
    }

    /// Thaw `live` if it is paused and give it `secs` to live. `Ok(false)`: it was running.
    async fn resume_live(
        self: &Arc<Self>,
        live: &Arc<LiveSandbox>,
        actor: &str,
        reason: &str,
        secs: u64,
    ) -> Result<bool, ManagerError> {
        let id = live.handle.id().to_string();
        let _t = live.transition.lock().await;
        if !self.is_live(&id) {
            return Err(ManagerError::SandboxNotFound(id));
        }
        if !live.is_paused() {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        if let Some(snapshot) = &live.on_disk {
            return self
                .revive(live, snapshot, actor, reason, secs, started)
                .await
                .map(|()| true);
        }
        if let Err(e) = live.handle.resume().await {
            self.store.audit(NewAudit {
                actor: actor.to_string(),
                sandbox_id: Some(id.clone()),
                kind: "sandbox.resume_failed".into(),
                detail: serde_json::json!({ "reason": reason, "error": error_chain(&e) }),
            });
            return Err(e.into());
        }
        let end = now_ms() + (secs as i64) * 1000;
        live.end_at_ms.store(end, Ordering::Relaxed);
        live.paused.store(false, Ordering::SeqCst);
        if self.release_paused_copy(live) {
            self.gc_snapshots().await;
        }
        if let Err(e) = self.store.set_sandbox_end(&id, end) {
            tracing::warn!(sandbox = %id, error = %e, "recording resume end time failed");
        }
        self.store.audit(NewAudit {
            actor: actor.to_string(),
            sandbox_id: Some(id),
            kind: "sandbox.resume".into(),
            detail: serde_json::json!({
                "reason": reason,
                "timeout": secs,
                "endAt": format_rfc3339_ms(end),
                "resumeMs": started.elapsed().as_secs_f64() * 1000.0,
            }),
        });
        Ok(true)
    }

    /// Drop a sandbox paused to disk from this process (server shutdown): its record stays.
    fn forget(&self, id: &str) {
        if let Ok(mut m) = self.live.write() {
            m.remove(id);
        }
    }

    /// Pause `live` to disk (the caller holds its transition lock): freeze it, snapshot its
    /// files (hidden), persist what it takes to start it again, put a paused entry without
    /// processes in its place and destroy it. Frees its memory; a resume cold-starts it from
    /// the files with the same ID and tokens. [`ManagerError::SnapshotUnsupported`]: its driver
    /// cannot, nothing changed.
    async fn pause_to_disk(
        &self,
        live: &Arc<LiveSandbox>,
        actor: &str,
        reason: &str,
        with: SnapshotWith,
    ) -> Result<(), ManagerError> {
        let id = live.handle.id().to_string();
        let store = self.snapshot_store(&id)?.clone();
        let started = std::time::Instant::now();
        let was_paused = live.is_paused();
        if !was_paused {
            live.handle.pause().await.map_err(|e| match e {
                DriverError::Unavailable(why) => ManagerError::SnapshotUnsupported {
                    id: id.clone(),
                    reason: why,
                },
                other => other.into(),
            })?;
        }
        let thaw = || async {
            if !was_paused && let Err(e) = live.handle.resume().await {
                tracing::warn!(sandbox = %id, error = %e, "thawing after a failed pause to disk");
            }
        };
        let (meta, pin) = match self.take_snapshot(live, actor, None, true, with).await {
            Ok(x) => x,
            Err(e) => {
                thaw().await;
                return Err(e);
            }
        };
        let ttl_ms = i64::try_from(self.config.paused_ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let until = if was_paused {
            live.end_at_ms()
        } else {
            now_ms().saturating_add(ttl_ms)
        };
        let rec = paused_record(live, &meta.id, until);
        let saved = {
            let (store, rec) = (store.clone(), rec.clone());
            tokio::task::spawn_blocking(move || store.save_paused(&rec))
                .await
                .map_err(|e| ManagerError::Driver(DriverError::Setup(e.to_string())))
                .and_then(|r| r.map_err(ManagerError::from))
        };
        if let Err(e) = saved {
            thaw().await;
            return Err(e);
        }
        let Some(dormant) = dormant_entry(&store, &rec, self.config.max_pids) else {
            store.remove_paused(&id);
            thaw().await;
            return Err(ManagerError::Conflict(format!(
                "the snapshot of sandbox '{id}' vanished while pausing it"
            )));
        };
        let registered = self.register(&id, Arc::new(dormant), true);
        if !registered {
            // Killed meanwhile: the kill ends the sandbox; its record must not outlive it.
            store.remove_paused(&id);
        }
        drop(pin);
        self.end_processes(live).await;
        if let Err(e) = self.store.set_sandbox_end(&id, until) {
            tracing::warn!(sandbox = %id, error = %e, "recording pause end time failed");
        }
        self.store.audit(NewAudit {
            actor: actor.to_string(),
            sandbox_id: Some(id),
            kind: "sandbox.pause".into(),
            detail: serde_json::json!({
                "reason": reason,
                "memory": false,
                "snapshot": meta.id,
                "sizeBytes": meta.size_bytes,
                "pausedUntil": format_rfc3339_ms(until),
                "pauseMs": started.elapsed().as_secs_f64() * 1000.0,
            }),
        });
        Ok(())
    }

    /// Start a sandbox paused to disk again (the caller holds its transition lock): a cold
    /// start from its snapshot under the same ID and tokens, living `secs`.
    async fn revive(
        self: &Arc<Self>,
        live: &Arc<LiveSandbox>,
        snapshot: &str,
        actor: &str,
        reason: &str,
        secs: u64,
        started: std::time::Instant,
    ) -> Result<(), ManagerError> {
        let id = live.handle.id().to_string();
        let store = self.snapshot_store(&id)?.clone();
        let Some(meta) = store.get_any(snapshot) else {
            return Err(ManagerError::Conflict(format!(
                "the files of paused sandbox '{id}' are gone"
            )));
        };
        let rec = paused_record(live, snapshot, live.end_at_ms());
        let mut req = live.request.clone();
        req.template_id = meta.id.clone();
        req.timeout = Some(secs);
        req.driver = None;
        req.cpu_count = Some(live.limits.cpu_count);
        req.memory_mb = Some(live.limits.memory_mb);
        req.disk_size_mb = Some(live.limits.disk_mb);
        let owner = live.owner.clone();
        let result = self.create_from(&owner, req, Some(meta), Some(&rec)).await;
        if let Err(e) = &result {
            self.store.audit(NewAudit {
                actor: actor.to_string(),
                sandbox_id: Some(id.clone()),
                kind: "sandbox.resume_failed".into(),
                detail: serde_json::json!({ "reason": reason, "fromDisk": true, "error": error_chain(e) }),
            });
        }
        result?;
        store.remove_paused(&id);
        self.store.audit(NewAudit {
            actor: actor.to_string(),
            sandbox_id: Some(id),
            kind: "sandbox.resume".into(),
            detail: serde_json::json!({
                "reason": reason,
                "fromDisk": true,
                "snapshot": snapshot,
                "timeout": secs,
                "resumeMs": started.elapsed().as_secs_f64() * 1000.0,
            }),
        });
        Ok(())
    }

    fn is_live(&self, id: &str) -> bool {
        let dying = self.dying.lock().map(|d| d.contains(id)).unwrap_or(true);
        !dying
            && self
                .live
                .read()
                .map(|m| m.contains_key(id))
                .unwrap_or(false)
    }

    /// Kill a sandbox now (running or paused).
    pub async fn kill(&self, owner: &str, id: &str) -> Result<(), ManagerError> {
        self.get_live(Some(owner), id)?;
        self.destroy(id, owner, "killed").await
    }

    /// Remove a sandbox from the registry and destroy it; `reason` goes to the audit log. A
    /// paused sandbox is thawed first, so that its processes can die.
    async fn destroy(&self, id: &str, actor: &str, reason: &str) -> Result<(), ManagerError> {
        {
            let Ok(mut dying) = self.dying.lock() else {
                return Err(ManagerError::SandboxNotFound(id.to_string()));
            };
            if !dying.insert(id.to_string()) {
                return Ok(());
            }
        }
        let live = self.live.write().ok().and_then(|mut m| m.remove(id));
        let mut was_paused = false;
        let mut result = match &live {
            Some(l) => {
                let _t = l.transition.lock().await;
                was_paused = l.is_paused();
                let thawed = if was_paused {
                    l.handle.resume().await
                } else {
                    Ok(())
                };
                if thawed.is_ok() {
                    l.paused.store(false, Ordering::SeqCst);
                }
                // Destroy even when the thaw failed: the driver's kill path thaws again.
                let destroyed = l.handle.destroy().await;
                destroyed.and(thawed).map_err(ManagerError::from)
            }
            None => Ok(()),
        };
        if let (Some(l), Some(egress)) = (&live, &self.egress)
            && l.egress().is_some()
            && let Err(e) = egress.release(id).await
            && result.is_ok()
        {
            result = Err(e.into());
        }
        if let Ok(mut dying) = self.dying.lock() {
            dying.remove(id);
        }
        let Some(_) = live else {
            return Err(ManagerError::SandboxNotFound(id.to_string()));
        };
        let mut detail = match &result {
            Ok(()) => serde_json::json!({ "reason": reason }),
            Err(e) => serde_json::json!({ "reason": reason, "cleanupError": error_chain(e) }),
        };
        if was_paused {
            detail["state"] = "paused".into();
        }
        self.store.audit(NewAudit {
            actor: actor.to_string(),
            sandbox_id: Some(id.to_string()),
            kind: "sandbox.kill".into(),
            detail,
        });
        if let Err(e) = self.store.finish_sandbox(id, reason) {
            tracing::warn!(sandbox = id, error = %e, "recording sandbox end failed");
        }
        if let (Some(l), Some(store)) = (&live, &self.snapshots)
            && l.on_disk.is_some()
        {
            store.remove_paused(id);
        }
        let released = live.as_ref().is_some_and(|l| self.release_paused_copy(l));
        if released || live.as_ref().is_some_and(|l| l.snapshot.is_some()) {
            self.gc_snapshots().await;
        }
        result
    }

    /// Destroy every sandbox (server shutdown). New creates are refused from now on.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        let ids: Vec<String> = self
            .live
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for id in &ids {
            // A paused sandbox outlives the server on disk (its files; its processes end).
            if let Some(live) = self.route(id)
                && live.is_paused()
                && self.snapshots.is_some()
            {
                if live.on_disk.is_some() {
                    self.forget(id);
                    continue;
                }
                let _t = live.transition.lock().await;
                if live.saved.lock().is_ok_and(|s| s.is_some()) {
                    // Written out at the pause (it has been frozen since): that copy and its
                    // record are what the next start brings back.
                    self.forget(id);
                    self.end_processes(&live).await;
                    continue;
                }
                // Memory-paused without a copy (it failed at the pause): where the driver
                // can, its memory goes to disk too, so its processes are back after the
                // restart.
                match self
                    .pause_to_disk(&live, "server", "shutdown", SnapshotWith::MemoryIfPossible)
                    .await
                {
                    Ok(()) => {
                        self.forget(id);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %id, error = %error_chain(&e), "keeping a paused sandbox across the restart failed; killing it");
                    }
                }
            }
            if let Err(e) = self.destroy(id, "server", "server shutdown").await {
                tracing::warn!(error = %e, "destroying sandbox at shutdown failed");
            }
        }
        self.store.flush_audit();
    }

    /// Act on sandboxes whose end time passed: a running one is killed, or paused when it has
    /// `autoPause`; a paused one has been paused for the paused TTL and is killed. Returns how
    /// many sandboxes were acted on.
    pub async fn reap_expired(&self) -> usize {
        let now = now_ms();
        let expired: Vec<Arc<LiveSandbox>> = self
            .live
            .read()
            .map(|m| {
                m.values()
                    .filter(|s| s.end_at_ms() <= now)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let n = expired.len();
        for live in expired {
            let id = live.handle.id().to_string();
            if live.is_paused() {
                if let Err(e) = self.destroy(&id, "server", "paused too long").await {
                    tracing::warn!(sandbox = %id, error = %e, "killing long-paused sandbox failed");
                }
                continue;
            }
            if live.auto_pause.load(Ordering::Relaxed) {
                match self
                    .pause_live(&live, "server", "timeout", live.auto_pause_memory)
                    .await
                {
                    Ok(_) => continue,
                    Err(ManagerError::SandboxNotFound(_)) => continue,
                    Err(e) => {
                        // A sandbox that cannot be paused must not outlive its timeout.
                        tracing::warn!(sandbox = %id, error = %error_chain(&e), "auto-pause failed; killing");
                    }
                }
            }
            if let Err(e) = self.destroy(&id, "server", "timeout").await {
                tracing::warn!(sandbox = %id, error = %e, "killing expired sandbox failed");
            }
        }
        n
    }

    /// A fresh metrics sample of a sandbox, read from its cgroup. CPU use is averaged since
    /// the last recorded sample (or since start); nothing is recorded.
    pub fn metrics(&self, owner: &str, id: &str) -> Result<SandboxMetric, ManagerError> {
        let live = self.get_live(Some(owner), id)?;
        Ok(self.sample(&live)?.0)
    }

    /// The recorded samples of a sandbox within `[start, end]` (unix seconds), oldest first,
    /// followed by a fresh sample when the window reaches the present.
    pub fn metrics_history(
        &self,
        owner: &str,
        id: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<Vec<SandboxMetric>, ManagerError> {
        let live = self.get_live(Some(owner), id)?;
        let mut out = live
            .metrics
            .lock()
            .map_err(|_| ManagerError::SandboxNotFound(id.to_string()))?
            .window(start, end);
        let (now, _) = self.sample(&live)?;
        let in_window = start.is_none_or(|s| now.timestamp_unix >= s)
            && end.is_none_or(|e| now.timestamp_unix <= e);
        if in_window {
            out.push(now);
        }
        Ok(out)
    }

    /// Take a sample of sandbox `id` and record it in its history. `disk_used` is what its
    /// agent reported (only the agent sees its filesystem), already bounded by the caller.
    pub fn record_metrics(&self, id: &str, disk_used: Option<u64>) -> Result<(), ManagerError> {
        let live = self.get_live(None, id)?;
        let (mut sample, reading) = self.sample(&live)?;
        if let Some(used) = disk_used {
            sample.disk_used = used;
        }
        live.metrics
            .lock()
            .map_err(|_| ManagerError::SandboxNotFound(id.to_string()))?
            .push(sample, reading);
        Ok(())
    }

    /// IDs of every live sandbox (for the metrics sampler).
    pub fn live_ids(&self) -> Vec<String> {
        self.live
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn sample(&self, live: &LiveSandbox) -> Result<(SandboxMetric, Reading), ManagerError> {
        let stats = live.handle.stats()?;
        let now = Reading {
            at_ms: now_ms(),
            cpu_ns: stats.cpu_usage_ns,
        };
        let from = live
            .metrics
            .lock()
            .ok()
            .and_then(|r| r.last_reading())
            .unwrap_or(Reading {
                at_ms: live.started_at_ms,
                cpu_ns: 0,
            });
        let metric = SandboxMetric {
            timestamp: format_rfc3339_ms(now.at_ms),
            timestamp_unix: now.at_ms / 1000,
            cpu_count: live.limits.cpu_count,
            cpu_used_pct: cpu_percent(from, now, live.limits.cpu_count),
            mem_used: stats.memory_bytes,
            mem_total: live.limits.memory_mb * 1024 * 1024,
            mem_cache: 0,
            disk_used: 0,
            disk_total: live.limits.disk_mb * 1024 * 1024,
        };
        Ok((metric, now))
    }

    /// Templates as `GET /templates` lists them.
    pub fn template_list(&self) -> Vec<cella_api::Template> {
        self.templates
            .list()
            .into_iter()
            .map(|t| {
                let mut aliases = vec![t.spec.name.clone()];
                aliases.extend(t.spec.aliases.iter().cloned());
                cella_api::Template {
                    template_id: t.spec.name.clone(),
                    build_id: t.build_id.clone(),
                    cpu_count: t.spec.cpu_count,
                    memory_mb: t.spec.memory_mb,
                    disk_size_mb: t.spec.disk_mb,
                    public: true,
                    names: aliases.clone(),
                    aliases,
                    build_status: if t.ready { "ready" } else { "waiting" }.to_string(),
                    envd_version: ENVD_VERSION.to_string(),
                }
            })
            .collect()
    }

    /// Number of live sandboxes.
    pub fn live_count(&self) -> usize {
        self.live.read().map(|m| m.len()).unwrap_or(0)
    }

    /// Forget a sandbox that died on its own, clean up what is left, and record why.
    async fn on_exit(&self, id: &str, reason: String, handle: &Arc<dyn SandboxHandle>) {
        // Only if the entry is still this handle's: a sandbox paused to disk has a new entry
        // under the same ID once its processes are gone.
        if self
            .live
            .read()
            .map(|m| {
                m.get(id)
                    .is_some_and(|l| std::ptr::addr_eq(Arc::as_ptr(&l.handle), Arc::as_ptr(handle)))
            })
            .unwrap_or(false)
        {
            self.store.audit(NewAudit {
                actor: "server".into(),
                sandbox_id: Some(id.to_string()),
                kind: "sandbox.crash".into(),
                detail: serde_json::json!({ "reason": reason }),
            });
            if let Err(e) = self.destroy(id, "server", "crashed").await {
                tracing::warn!(sandbox = %id, error = %e, "cleaning up crashed sandbox failed");
            }
        }
    }
}

/// What it takes to start `live` again from its files in snapshot `snapshot`.
/// The create request of `live` with the network rules in force now: `update_network` may
/// have changed them since the create. What a revival after a pause to disk and a fork start
/// with.
fn request_in_force(live: &LiveSandbox) -> cella_api::NewSandbox {
    let mut request = live.request.clone();
    if let Some(p) = live.egress() {
        // `denyOut` holds `0.0.0.0/0` exactly when the internet is closed now; the create's
        // `allow_internet_access: false` would close it again after an update opened it.
        request.allow_internet_access = None;
        let net = request.network.get_or_insert_with(Default::default);
        net.allow_out = Some(p.allow_out());
        net.deny_out = Some(p.deny_out());
        net.dns_servers = Some(p.dns_servers_out());
        net.egress_proxy = p.proxy.as_ref().map(crate::egress::EgressProxy::to_request);
        net.rules = p.rules.to_request();
    }
    request
}

fn paused_record(live: &LiveSandbox, snapshot: &str, end_at_ms: i64) -> PausedRecord {
    let request = request_in_force(live);
    PausedRecord {
        id: live.handle.id().to_string(),
        owner: live.owner.clone(),
        snapshot: snapshot.to_string(),
        template_id: live.template_id.clone(),
        alias: live.alias.clone(),
        access_token: live.access_token.clone(),
        traffic_access_token: live.traffic_access_token.clone(),
        started_at_ms: live.started_at_ms,
        end_at_ms,
        timeout_secs: live.timeout_secs,
        isolation: live.handle.isolation(),
        request,
        cpu_count: live.limits.cpu_count,
        memory_mb: live.limits.memory_mb,
        disk_mb: live.limits.disk_mb,
    }
}

/// The registry entry of a sandbox paused to disk: paused, no processes. `None` when its
/// snapshot is gone.
fn dormant_entry(store: &SnapshotStore, rec: &PausedRecord, max_pids: u64) -> Option<LiveSandbox> {
    let meta = store.get_any(&rec.snapshot)?;
    let mut image = meta.base.clone();
    image.layers = store.layers(&meta);
    let (auto_pause, auto_resume) = lifecycle_of(&rec.request).unwrap_or((false, false));
    Some(LiveSandbox {
        incarnation: INCARNATIONS.fetch_add(1, Ordering::Relaxed),
        handle: Arc::new(OnDisk {
            id: rec.id.clone(),
            isolation: rec.isolation,
        }),
        owner: rec.owner.clone(),
        template_id: rec.template_id.clone(),
        alias: rec.alias.clone(),
        access_token: rec.access_token.clone(),
        traffic_access_token: rec.traffic_access_token.clone(),
        started_at_ms: rec.started_at_ms,
        end_at_ms: AtomicI64::new(rec.end_at_ms),
        metadata: rec.request.metadata.clone().unwrap_or_default(),
        limits: Limits {
            cpu_count: rec.cpu_count,
            memory_mb: rec.memory_mb,
            disk_mb: rec.disk_mb,
            max_pids,
        },
        metrics: Mutex::new(MetricsRing::new(DEFAULT_HISTORY)),
        egress: Mutex::new(None),
        timeout_secs: rec.timeout_secs,
        auto_pause: std::sync::atomic::AtomicBool::new(auto_pause),
        auto_resume,
        paused: std::sync::atomic::AtomicBool::new(true),
        snapshot: Some(rec.snapshot.clone()),
        image,
        auto_pause_memory: rec.request.auto_pause_memory != Some(false),
        request: rec.request.clone(),
        on_disk: Some(rec.snapshot.clone()),
        saved: Mutex::new(None),
        transition: tokio::sync::Mutex::new(()),
    })
}

/// The handle of a sandbox paused to disk: nothing runs, nothing to dial.
struct OnDisk {
    id: String,
    isolation: Isolation,
}

#[async_trait::async_trait]
impl SandboxHandle for OnDisk {
    fn id(&self) -> &str {
        &self.id
    }

    fn isolation(&self) -> Isolation {
        self.isolation
    }

    async fn dial(&self, _port: u16) -> std::io::Result<tokio::net::TcpStream> {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            "the sandbox is paused to disk",
        ))
    }

    fn stats(&self) -> Result<crate::driver::SandboxStats, DriverError> {
        Ok(crate::driver::SandboxStats::default())
    }

    async fn pause(&self) -> Result<(), DriverError> {
        Ok(())
    }

    async fn resume(&self) -> Result<(), DriverError> {
        // Nothing is frozen: starting it again is the manager's (`revive`).
        Ok(())
    }

    async fn wait_exit(&self) -> crate::driver::ExitInfo {
        std::future::pending().await
    }

    async fn destroy(&self) -> Result<(), DriverError> {
        Ok(())
    }
}

/// The image of a sandbox started from `meta`: its base template with the chain's layers.
fn snapshot_image(
    store: Option<&SnapshotStore>,
    meta: SnapshotMeta,
    pin: Option<SnapshotPin>,
) -> Result<Source, ManagerError> {
    let Some(store) = store else {
        return Err(ManagerError::TemplateNotFound(meta.snapshot_id()));
    };
    if !meta.base.rootfs.is_dir() {
        return Err(ManagerError::Conflict(format!(
            "snapshot {} was taken on template {} build {}, which is no longer on this server",
            meta.snapshot_id(),
            meta.base.name,
            meta.base.build_id
        )));
    }
    let mut image = meta.base.clone();
    image.layers = store.layers(&meta);
    if let Some(missing) = image.layers.iter().find(|l| !l.is_dir()) {
        return Err(ManagerError::Conflict(format!(
            "snapshot {} is incomplete: layer {} is missing",
            meta.snapshot_id(),
            missing.display()
        )));
    }
    Ok((image, Some(meta), pin))
}

/// Point the new sandbox's resolver at the host end and attach its interface and rules.
async fn attach_egress(
    egress: &dyn Egress,
    id: &str,
    handle: &Arc<dyn SandboxHandle>,
    nameserver: std::net::Ipv4Addr,
    policy: &EgressPolicy,
    access_token: &str,
) -> Result<(), ManagerError> {
    let netns = handle.netns_path().ok_or_else(|| {
        ManagerError::Driver(DriverError::Unavailable(
            "the sandbox's network namespace is not reachable".into(),
        ))
    })?;
    handle.set_nameserver(nameserver).await?;
    if !policy.rules.is_empty() {
        trust_interception_ca(egress, handle.as_ref(), access_token).await?;
    }
    egress.attach(id, &netns, policy).await?;
    Ok(())
}

/// How long the agent may take to install the interception CA (a microVM under TCG is slow
/// on its first requests).
const TRUST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

fn no_interception_ca() -> ManagerError {
    ManagerError::Conflict(
        "this server cannot serve network rules (no interception CA: its host has no system \
         trust store for the servers rules forward to; see the server's log)"
            .into(),
    )
}

/// Make the sandbox trust the CA that `rules` interception signs with (the agent's `/trust`).
async fn trust_interception_ca(
    egress: &dyn Egress,
    handle: &dyn SandboxHandle,
    access_token: &str,
) -> Result<(), ManagerError> {
    let pem = egress.interception_ca().ok_or_else(|| {
        ManagerError::Conflict("this server cannot serve network rules (no interception CA)".into())
    })?;
    crate::driver::agent_post(
        handle,
        access_token,
        "/trust",
        pem.as_bytes(),
        TRUST_TIMEOUT,
    )
    .await
    .map_err(|e| {
        ManagerError::Driver(DriverError::Setup(format!(
            "making the sandbox trust the egress CA: {e}"
        )))
    })
}

async fn watch_exit(manager: std::sync::Weak<Manager>, id: String, handle: Arc<dyn SandboxHandle>) {
    let info = handle.wait_exit().await;
    if let Some(m) = manager.upgrade() {
        m.on_exit(&id, info.reason, &handle).await;
    }
}

async fn reaper(manager: std::sync::Weak<Manager>) {
    loop {
        let interval = match manager.upgrade() {
            Some(m) => {
                m.reap_expired().await;
                m.config.reap_interval
            }
            None => return,
        };
        tokio::time::sleep(interval).await;
    }
}

async fn record_agent_events(store: Store, mut rx: mpsc::UnboundedReceiver<SandboxEvent>) {
    while let Some(ev) = rx.recv().await {
        let kind = ev.event.kind().to_string();
        let detail = serde_json::to_value(&ev.event).unwrap_or(serde_json::Value::Null);
        store.audit(NewAudit {
            actor: ev.origin.actor().into(),
            sandbox_id: Some(ev.sandbox_id),
            kind,
            detail,
        });
    }
}

/// `(autoPause, autoResume)` of a create request: `lifecycle` wins over the flat fields.
fn lifecycle_of(req: &NewSandbox) -> Result<(bool, bool), ManagerError> {
    let mut auto_pause = req.auto_pause.unwrap_or(false);
    let mut auto_resume = req.auto_resume.is_some_and(|a| a.enabled);
    if let Some(l) = &req.lifecycle {
        match l.on_timeout.as_deref() {
            None => {}
            Some("kill") => auto_pause = false,
            Some("pause") => auto_pause = true,
            Some(other) => {
                return Err(ManagerError::InvalidField {
                    field: "lifecycle.onTimeout",
                    message: format!("expected kill or pause, got {other:?}"),
                });
            }
        }
        if let Some(r) = l.auto_resume {
            auto_resume = r;
        }
    }
    Ok((auto_pause, auto_resume))
}

/// Fields of E2B features cella does not have are refused, never silently dropped: the
/// caller would get a sandbox other than the one asked for. `maskRequestHost` and
/// `httpsPorts` are checked.
fn refuse_unsupported(req: &NewSandbox) -> Result<(), ManagerError> {
    let refuse = |field: &'static str, what: &str| {
        Err(ManagerError::InvalidField {
            field,
            message: format!("{what} is not supported by this cella server"),
        })
    };
    if req.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
        return refuse("volumeMounts", "mounting volumes");
    }
    if req.mcp.as_ref().is_some_and(|v| !v.is_empty()) {
        return refuse(
            "mcp",
            "E2B's MCP gateway (catalog MCP servers run from container images)",
        );
    }
    if let Some(n) = &req.network {
        if let Some(ports) = &n.https_ports {
            validate_https_ports(ports)?;
        }
        if let Some(mask) = &n.mask_request_host
            && !is_valid_host_mask(mask)
        {
            return Err(ManagerError::InvalidField {
                field: "network.maskRequestHost",
                message: "must be a host name (letters, digits, '.', '-', '_', ':', and \
                          ${PORT}), at most 253 characters"
                    .into(),
            });
        }
    }
    Ok(())
}

/// Most `network.httpsPorts` entries.
pub const MAX_HTTPS_PORTS: usize = 64;

/// `network.httpsPorts`: ports 1-65535, not the agent's, at most [`MAX_HTTPS_PORTS`].
fn validate_https_ports(ports: &[i64]) -> Result<(), ManagerError> {
    let bad = |message: String| {
        Err(ManagerError::InvalidField {
            field: "network.httpsPorts",
            message,
        })
    };
    if ports.len() > MAX_HTTPS_PORTS {
        return bad(format!("at most {MAX_HTTPS_PORTS} ports"));
    }
    for &p in ports {
        if !(1..=65_535).contains(&p) {
            return bad(format!("{p} is not a port (1-65535)"));
        }
        if p == i64::from(cella_proto::envd::ENVD_PORT) {
            return bad(format!(
                "{p} is the sandbox agent's port, which is always plain HTTP"
            ));
        }
    }
    Ok(())
}

/// A `maskRequestHost`: a host (and port) with `${PORT}` placeholders, nothing that could
/// break the header.
fn is_valid_host_mask(mask: &str) -> bool {
    let plain = mask.replace("${PORT}", "1");
    !plain.is_empty()
        && plain.len() <= 253
        && plain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
}

fn validate_timeout(t: u64, field: &'static str) -> Result<u64, ManagerError> {
    if t == 0 || t > MAX_TIMEOUT_SECS {
        return Err(ManagerError::InvalidField {
            field,
            message: format!("must be between 1 and {MAX_TIMEOUT_SECS} seconds, got {t}"),
        });
    }
    Ok(t)
}

fn bounded(v: u64, min: u64, max: u64, field: &'static str) -> Result<u64, ManagerError> {
    if v < min || v > max {
        return Err(ManagerError::InvalidField {
            field,
            message: format!("must be between {min} and {max}, got {v}"),
        });
    }
    Ok(v)
}

fn validate_map(m: &BTreeMap<String, String>, field: &'static str) -> Result<(), ManagerError> {
    const MAX_ENTRIES: usize = 256;
    const MAX_LEN: usize = 64 * 1024;
    if m.len() > MAX_ENTRIES {
        return Err(ManagerError::InvalidField {
            field,
            message: format!("at most {MAX_ENTRIES} entries"),
        });
    }
    if m.iter().any(|(k, v)| k.len() + v.len() > MAX_LEN) {
        return Err(ManagerError::InvalidField {
            field,
            message: format!("an entry is longer than {MAX_LEN} bytes"),
        });
    }
    Ok(())
}

/// A new sandbox ID: `i` + 20 characters of `[a-z0-9]`, as E2B's.
pub fn new_sandbox_id() -> String {
    crate::random_id('i')
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill(&mut buf[..]);
    hex::encode(buf)
}

/// Render an error with its sources, for logs and audit records.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

#[cfg(test)]
mod tests {
    //! The pause state machine against the fake driver (whose frozen sandboxes hang dials and
    //! refuse to be destroyed unless thawed first, like a v1 freezer).

    use super::*;
    use crate::fake::FakeDriver;
    use crate::store::AuditQuery;
    use crate::template::TemplateSpec;

    struct Env {
        manager: Arc<Manager>,
        driver: FakeDriver,
        store: Store,
        _dir: tempfile::TempDir,
    }

    fn env(config: ManagerConfig) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = TemplateSpec::base();
        let build = dir.path().join(&spec.name).join(spec.build_id());
        std::fs::create_dir_all(build.join("rootfs")).expect("mkdir");
        std::fs::write(
            build.join("spec.json"),
            serde_json::to_vec(&spec).expect("json"),
        )
        .expect("write");
        let store = Store::open_in_memory().expect("store");
        let driver = FakeDriver::new();
        let manager = Manager::start(
            vec![Arc::new(driver.clone())],
            0,
            Arc::new(TemplateStore::new(dir.path().to_path_buf())),
            store.clone(),
            config,
        );
        Env {
            manager,
            driver,
            store,
            _dir: dir,
        }
    }

    fn fast() -> ManagerConfig {
        ManagerConfig {
            reap_interval: Duration::from_millis(20),
            ..ManagerConfig::default()
        }
    }

    async fn create(e: &Env, req: NewSandbox) -> String {
        e.manager.create("k", req).await.expect("create").sandbox_id
    }

    fn base(timeout: u64) -> NewSandbox {
        NewSandbox {
            template_id: "base".into(),
            timeout: Some(timeout),
            ..NewSandbox::default()
        }
    }

    fn kinds(e: &Env, id: &str) -> Vec<(String, serde_json::Value)> {
        e.store.flush_audit();
        e.store
            .query_audit(&AuditQuery {
                sandbox_id: Some(id.to_string()),
                ..Default::default()
            })
            .expect("audit")
            .into_iter()
            .map(|a| (a.kind, a.detail))
            .collect()
    }

    async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + limit;
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn pause_connect_resume_transitions_and_their_codes() {
        let e = env(fast());
        let id = create(&e, base(120)).await;
        e.manager.pause("k", &id, true).await.expect("pause");
        assert_eq!(e.driver.is_paused(&id), Some(true));
        let info = e.manager.info("k", &id).expect("info");
        assert_eq!(info.state, SandboxState::Paused);
        // pausing twice is E2B's 409, a stranger's sandbox is a 404
        assert!(matches!(
            e.manager.pause("k", &id, true).await,
            Err(ManagerError::WrongState {
                state: "paused",
                ..
            })
        ));
        assert!(matches!(
            e.manager.pause("other", &id, true).await,
            Err(ManagerError::SandboxNotFound(_))
        ));
        assert!(matches!(
            e.manager.pause("k", "nope", true).await,
            Err(ManagerError::SandboxNotFound(_))
        ));
        // a paused sandbox's timeout cannot be set or refreshed: it starts on resume
        assert!(matches!(
            e.manager.set_timeout("k", &id, 30),
            Err(ManagerError::WrongState { .. })
        ));
        assert!(matches!(
            e.manager.extend("k", &id, 30),
            Err(ManagerError::WrongState { .. })
        ));
        // connect resumes (E2B's 201) and sets the end time from now
        let before = now_ms();
        let (sbx, resumed) = e
            .manager
            .connect("k", &id, Some(60))
            .await
            .expect("connect");
        assert!(resumed);
        assert_eq!(sbx.sandbox_id, id);
        assert_eq!(e.driver.is_paused(&id), Some(false));
        let live = e.manager.route(&id).expect("live");
        assert!((before + 60_000..=now_ms() + 60_000).contains(&live.end_at_ms()));
        // connecting to a running one does not resume (200)
        let (_, resumed) = e.manager.connect("k", &id, Some(1)).await.expect("connect");
        assert!(!resumed);
        // the deprecated resume of a running sandbox is a 409; of a paused one, it resumes
        assert!(matches!(
            e.manager.resume("k", &id, None, None).await,
            Err(ManagerError::WrongState {
                state: "running",
                ..
            })
        ));
        e.manager.pause("k", &id, false).await.expect("pause");
        e.manager
            .resume("k", &id, Some(30), Some(true))
            .await
            .expect("resume");
        let info = e.manager.info("k", &id).expect("info");
        assert_eq!(info.state, SandboxState::Running);
        assert_eq!(info.lifecycle.on_timeout, OnTimeout::Pause);
        assert_eq!(e.driver.pause_counts(), (2, 2));
        let audit = kinds(&e, &id);
        let pauses: Vec<_> = audit.iter().filter(|(k, _)| k == "sandbox.pause").collect();
        assert_eq!(pauses.len(), 2, "{audit:?}");
        assert_eq!(pauses[1].1["memoryRequested"], false);
        assert_eq!(pauses[1].1["memory"], true);
        let resumes: Vec<_> = audit
            .iter()
            .filter(|(k, _)| k == "sandbox.resume")
            .map(|(_, d)| d["reason"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(resumes, vec!["connect", "resume"]);
    }

    #[tokio::test]
    async fn a_paused_sandbox_outlives_its_timeout_until_the_paused_ttl() {
        let e = env(ManagerConfig {
            paused_ttl: Duration::from_millis(2500),
            ..fast()
        });
        let id = create(&e, base(1)).await;
        e.manager.pause("k", &id, true).await.expect("pause");
        let info = e.manager.info("k", &id).expect("info");
        // endAt of a paused sandbox is when it will be killed
        assert!(
            info.end_at > format_rfc3339_ms(now_ms() + 2000),
            "{}",
            info.end_at
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            e.manager.info("k", &id).expect("still there").state,
            SandboxState::Paused,
            "a paused sandbox must not be killed by its running timeout"
        );
        wait_until("paused TTL kill", Duration::from_secs(5), || {
            e.manager.route(&id).is_none()
        })
        .await;
        // the fake refuses to destroy a frozen sandbox: gone means it was thawed, then killed
        assert!(e.driver.alive().is_empty());
        let audit = kinds(&e, &id);
        let kill = audit
            .iter()
            .find(|(k, _)| k == "sandbox.kill")
            .expect("kill audited");
        assert_eq!(kill.1["reason"], "paused too long");
        assert_eq!(kill.1["state"], "paused");
        assert!(kill.1.get("cleanupError").is_none(), "{kill:?}");
    }

    #[tokio::test]
    async fn auto_pause_pauses_on_timeout_instead_of_killing() {
        let e = env(fast());
        let id = create(
            &e,
            NewSandbox {
                auto_pause: Some(true),
                ..base(1)
            },
        )
        .await;
        let info = e.manager.info("k", &id).expect("info");
        assert_eq!(info.lifecycle.on_timeout, OnTimeout::Pause);
        assert!(!info.lifecycle.auto_resume);
        wait_until("auto-pause", Duration::from_secs(5), || {
            e.driver.is_paused(&id) == Some(true)
        })
        .await;
        assert_eq!(
            e.manager.info("k", &id).expect("info").state,
            SandboxState::Paused
        );
        let audit = kinds(&e, &id);
        assert!(
            audit
                .iter()
                .any(|(k, d)| k == "sandbox.pause" && d["reason"] == "timeout"),
            "{audit:?}"
        );
        assert!(!audit.iter().any(|(k, _)| k == "sandbox.kill"));
        let (_, resumed) = e
            .manager
            .connect("k", &id, Some(60))
            .await
            .expect("connect");
        assert!(resumed);
        // lifecycle.onTimeout is the same switch
        let id2 = create(
            &e,
            NewSandbox {
                lifecycle: Some(cella_api::LifecycleRequest {
                    on_timeout: Some("pause".into()),
                    auto_resume: Some(true),
                }),
                ..base(60)
            },
        )
        .await;
        let l = e.manager.info("k", &id2).expect("info").lifecycle;
        assert_eq!((l.on_timeout, l.auto_resume), (OnTimeout::Pause, true));
        let bad = e
            .manager
            .create(
                "k",
                NewSandbox {
                    lifecycle: Some(cella_api::LifecycleRequest {
                        on_timeout: Some("sleep".into()),
                        auto_resume: None,
                    }),
                    ..base(60)
                },
            )
            .await;
        assert!(matches!(
            bad,
            Err(ManagerError::InvalidField {
                field: "lifecycle.onTimeout",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn kill_of_a_paused_sandbox_thaws_and_cleans_up() {
        let e = env(fast());
        let id = create(&e, base(120)).await;
        e.manager.pause("k", &id, true).await.expect("pause");
        e.manager.kill("k", &id).await.expect("kill");
        assert!(e.driver.alive().is_empty());
        assert!(e.manager.route(&id).is_none());
        let audit = kinds(&e, &id);
        let kill = audit
            .iter()
            .find(|(k, _)| k == "sandbox.kill")
            .expect("kill audited");
        assert_eq!(kill.1["state"], "paused");
        assert!(kill.1.get("cleanupError").is_none(), "{kill:?}");
        // shutdown kills paused sandboxes too
        let id2 = create(&e, base(120)).await;
        e.manager.pause("k", &id2, true).await.expect("pause");
        e.manager.shutdown().await;
        assert!(e.driver.alive().is_empty());
    }

    #[tokio::test]
    async fn a_failed_pause_leaves_the_sandbox_running_and_is_audited() {
        let e = env(fast());
        let id = create(&e, base(120)).await;
        e.driver.fail_next_pause();
        let err = e.manager.pause("k", &id, true).await.expect_err("fails");
        assert!(matches!(err, ManagerError::Driver(_)), "{err}");
        assert_eq!(
            e.manager.info("k", &id).expect("info").state,
            SandboxState::Running
        );
        assert!(
            kinds(&e, &id)
                .iter()
                .any(|(k, _)| k == "sandbox.pause_failed")
        );
        // auto-pause that fails must not let the sandbox outlive its timeout
        let id2 = create(
            &e,
            NewSandbox {
                auto_pause: Some(true),
                ..base(1)
            },
        )
        .await;
        e.driver.fail_next_pause();
        wait_until(
            "kill after failed auto-pause",
            Duration::from_secs(5),
            || e.manager.route(&id2).is_none(),
        )
        .await;
    }

    #[tokio::test]
    async fn traffic_resumes_only_with_auto_resume_and_list_filters_by_state() {
        let e = env(fast());
        let plain = create(&e, base(120)).await;
        let auto = create(
            &e,
            NewSandbox {
                auto_pause: Some(true),
                auto_resume: Some(cella_api::AutoResume { enabled: true }),
                ..base(120)
            },
        )
        .await;
        let running = create(&e, base(120)).await;
        e.manager.pause("k", &plain, true).await.expect("pause");
        e.manager.pause("k", &auto, true).await.expect("pause");
        let ids = |states: &[SandboxState]| {
            let mut v: Vec<String> = e
                .manager
                .list("k", &BTreeMap::new(), states)
                .into_iter()
                .map(|s| s.sandbox_id)
                .collect();
            v.sort();
            v
        };
        let mut paused = vec![plain.clone(), auto.clone()];
        paused.sort();
        assert_eq!(ids(&[SandboxState::Paused]), paused);
        assert_eq!(ids(&[SandboxState::Running]), vec![running.clone()]);
        assert_eq!(ids(&[]).len(), 3);
        assert_eq!(ids(&[SandboxState::Running, SandboxState::Paused]).len(), 3);

        assert!(e.manager.route_running(&plain).await.is_none());
        assert_eq!(e.driver.is_paused(&plain), Some(true));
        let before = now_ms();
        let live = e.manager.route_running(&auto).await.expect("auto-resumed");
        assert!(!live.is_paused());
        assert_eq!(e.driver.is_paused(&auto), Some(false));
        // an auto-resume gives at least E2B's 300 s minimum
        assert!(live.end_at_ms() >= before + 300_000);
        assert!(
            kinds(&e, &auto)
                .iter()
                .any(|(k, d)| k == "sandbox.resume" && d["reason"] == "traffic")
        );
        // metrics of a paused sandbox still answer (cgroup counters)
        e.manager
            .metrics("k", &plain)
            .expect("metrics while paused");
    }

    #[tokio::test]
    async fn concurrent_connects_resume_once_and_pause_races_kill_cleanly() {
        let e = env(fast());
        let id = create(&e, base(120)).await;
        e.manager.pause("k", &id, true).await.expect("pause");
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let m = e.manager.clone();
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                m.connect("k", &id, None).await.expect("connect").1
            }));
        }
        let mut resumed = 0;
        for t in tasks {
            resumed += usize::from(t.await.expect("join"));
        }
        assert_eq!(
            resumed, 1,
            "exactly one connect resumes (201), the others see it running"
        );
        assert_eq!(e.driver.pause_counts(), (1, 1));
        // a connect without timeout resumes for E2B's connect default
        e.manager.pause("k", &id, true).await.expect("pause");
        let before = now_ms();
        e.manager.connect("k", &id, None).await.expect("connect");
        let end = e.manager.route(&id).expect("live").end_at_ms();
        assert!(end >= before + (CONNECT_DEFAULT_TIMEOUT_SECS as i64) * 1000);

        // pause and kill at once: whatever the order, the sandbox ends up gone and thawed
        for _ in 0..5 {
            let id = create(&e, base(120)).await;
            let (p, k) = tokio::join!(e.manager.pause("k", &id, true), e.manager.kill("k", &id));
            k.expect("kill");
            if let Err(err) = p {
                assert!(matches!(err, ManagerError::SandboxNotFound(_)), "{err}");
            }
            assert!(e.manager.route(&id).is_none());
        }
        e.manager.kill("k", &id).await.expect("kill");
        assert!(e.driver.alive().is_empty(), "{:?}", e.driver.alive());
    }

    fn snap_env() -> (Env, tempfile::TempDir) {
        let snaps = tempfile::tempdir().expect("tempdir");
        let e = env(ManagerConfig {
            snapshot_dir: Some(snaps.path().join("snapshots")),
            ..fast()
        });
        (e, snaps)
    }

    #[tokio::test]
    async fn a_snapshot_starts_sandboxes_with_its_layers_and_limits() {
        let (e, snaps) = snap_env();
        let src = create(
            &e,
            NewSandbox {
                memory_mb: Some(256),
                metadata: Some([("a".to_string(), "1".to_string())].into()),
                ..base(60)
            },
        )
        .await;
        let meta = e
            .manager
            .create_snapshot("k", &src, Some("snap".into()), None)
            .await
            .expect("snapshot");
        assert_eq!(meta.snapshot_id(), "snap:default");
        assert_eq!(meta.memory_mb, 256);
        let layer = snaps.path().join("snapshots").join(&meta.id).join("layer");
        let written = std::fs::read_to_string(layer.join("fake-snapshot")).expect("layer");
        assert!(written.starts_with(&src), "{written}");
        assert!(
            kinds(&e, &src)
                .iter()
                .any(|(k, d)| k == "sandbox.snapshot" && d["snapshot"] == meta.id.as_str())
        );

        for reference in ["snap", "snap:default", meta.id.as_str()] {
            let sb = e
                .manager
                .create(
                    "k",
                    NewSandbox {
                        template_id: reference.into(),
                        ..NewSandbox::default()
                    },
                )
                .await
                .expect("create from snapshot");
            assert_eq!(sb.template_id, meta.id);
            let spec = e.driver.spec(&sb.sandbox_id).expect("spec");
            assert_eq!(spec.template.layers, vec![layer.clone()]);
            assert_eq!(spec.template.name, "base");
            assert_eq!(spec.limits.memory_mb, 256);
        }
        // Another key sees neither the snapshot nor the sandbox.
        let err = e
            .manager
            .create(
                "other",
                NewSandbox {
                    template_id: "snap".into(),
                    ..NewSandbox::default()
                },
            )
            .await
            .expect_err("foreign snapshot");
        assert!(matches!(err, ManagerError::TemplateNotFound(_)), "{err:?}");
        let err = e
            .manager
            .create_snapshot("other", &src, None, None)
            .await
            .expect_err("foreign sandbox");
        assert!(matches!(err, ManagerError::SandboxNotFound(_)), "{err:?}");
        assert!(e.manager.list_snapshots("other", None, None).is_empty());
        let listed = e.manager.list_snapshots("k", Some(&src), None);
        assert_eq!(listed.len(), 1);
        assert!(
            e.manager
                .list_snapshots("k", Some("iother"), None)
                .is_empty()
        );
        // A smaller disk than the source's is refused.
        let err = e
            .manager
            .create(
                "k",
                NewSandbox {
                    template_id: "snap".into(),
                    disk_size_mb: Some(64),
                    ..NewSandbox::default()
                },
            )
            .await
            .expect_err("small disk");
        assert!(
            matches!(
                err,
                ManagerError::InvalidField {
                    field: "diskSizeMB",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn bad_snapshot_requests_are_refused() {
        let (e, _snaps) = snap_env();
        let src = create(&e, base(60)).await;
        for (name, memory) in [
            (Some("Bad Name".to_string()), None),
            (Some("../x".to_string()), None),
            (None, Some(true)),
        ] {
            let err = e
                .manager
                .create_snapshot("k", &src, name, memory)
                .await
                .expect_err("bad request");
            assert!(matches!(err, ManagerError::InvalidField { .. }), "{err:?}");
        }
        let err = e
            .manager
            .create_snapshot("k", &src, Some("base".into()), None)
            .await
            .expect_err("template name");
        assert!(matches!(err, ManagerError::Conflict(_)), "{err:?}");
        let err = e
            .manager
            .fork("k", &src, Some(0), None)
            .await
            .expect_err("count 0");
        assert!(matches!(
            err,
            ManagerError::InvalidField { field: "count", .. }
        ));
        let err = e
            .manager
            .fork("k", &src, Some(MAX_FORK_COUNT + 1), None)
            .await
            .expect_err("count 21");
        assert!(matches!(
            err,
            ManagerError::InvalidField { field: "count", .. }
        ));
        // memory=false is a filesystem snapshot.
        e.manager
            .create_snapshot("k", &src, None, Some(false))
            .await
            .expect("filesystem snapshot");
        // Without a snapshot directory: 501-style.
        let plain = env(fast());
        let id = create(&plain, base(60)).await;
        let err = plain
            .manager
            .create_snapshot("k", &id, None, None)
            .await
            .expect_err("no store");
        assert!(
            matches!(err, ManagerError::SnapshotUnsupported { .. }),
            "{err:?}"
        );
        let err = plain
            .manager
            .fork("k", &id, None, None)
            .await
            .expect_err("no store");
        assert!(
            matches!(err, ManagerError::SnapshotUnsupported { .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn forks_copy_the_source_and_their_snapshot_goes_with_them() {
        let (e, snaps) = snap_env();
        let src = create(
            &e,
            NewSandbox {
                metadata: Some([("role".to_string(), "src".to_string())].into()),
                env_vars: Some([("V".to_string(), "1".to_string())].into()),
                ..base(60)
            },
        )
        .await;
        let forks = e
            .manager
            .fork("k", &src, Some(3), Some(30))
            .await
            .expect("fork");
        assert_eq!(forks.len(), 3);
        let ids: Vec<String> = forks
            .into_iter()
            .map(|f| f.expect("fork started").sandbox_id)
            .collect();
        let root = snaps.path().join("snapshots");
        let mut layers = std::collections::BTreeSet::new();
        for id in &ids {
            assert_ne!(id, &src);
            let detail = e.manager.info("k", id).expect("info");
            assert_eq!(detail.metadata.get("role").map(String::as_str), Some("src"));
            let spec = e.driver.spec(id).expect("spec");
            assert_eq!(spec.env_vars.get("V").map(String::as_str), Some("1"));
            assert_eq!(spec.template.layers.len(), 1);
            layers.insert(spec.template.layers[0].clone());
        }
        assert_eq!(layers.len(), 1, "forks share one snapshot");
        let layer = layers.into_iter().next().expect("layer");
        assert!(layer.is_dir());
        // Fork snapshots are never listed nor usable by name.
        assert!(e.manager.list_snapshots("k", None, None).is_empty());
        // A fork of a fork stacks on the first fork's snapshot.
        let nested = e
            .manager
            .fork("k", &ids[0], None, None)
            .await
            .expect("fork of a fork")
            .remove(0)
            .expect("started")
            .sandbox_id;
        assert_eq!(
            e.driver.spec(&nested).expect("spec").template.layers.len(),
            2
        );
        for id in &ids {
            e.manager.kill("k", id).await.expect("kill");
        }
        // The nested fork still uses the first layer.
        assert!(layer.is_dir());
        e.manager.kill("k", &nested).await.expect("kill");
        assert!(!layer.exists(), "the fork snapshot outlived its forks");
        let left: Vec<_> = std::fs::read_dir(&root)
            .expect("readdir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name() != ".paused")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn a_deleted_snapshot_stays_on_disk_while_a_sandbox_uses_it() {
        let (e, snaps) = snap_env();
        let src = create(&e, base(60)).await;
        let meta = e
            .manager
            .create_snapshot("k", &src, None, None)
            .await
            .expect("snapshot");
        let user = e
            .manager
            .create(
                "k",
                NewSandbox {
                    template_id: meta.snapshot_id(),
                    ..NewSandbox::default()
                },
            )
            .await
            .expect("create")
            .sandbox_id;
        assert!(
            !e.manager
                .delete_snapshot("other", &meta.snapshot_id())
                .await
                .expect("delete")
        );
        assert!(
            e.manager
                .delete_snapshot("k", &meta.snapshot_id())
                .await
                .expect("delete")
        );
        assert!(
            !e.manager
                .delete_snapshot("k", &meta.snapshot_id())
                .await
                .expect("again")
        );
        assert!(e.manager.list_snapshots("k", None, None).is_empty());
        let dir = snaps.path().join("snapshots").join(&meta.id);
        assert!(dir.join("layer").is_dir(), "removed under a live sandbox");
        let err = e
            .manager
            .create(
                "k",
                NewSandbox {
                    template_id: meta.snapshot_id(),
                    ..NewSandbox::default()
                },
            )
            .await
            .expect_err("deleted");
        assert!(matches!(err, ManagerError::TemplateNotFound(_)), "{err:?}");
        e.manager.kill("k", &user).await.expect("kill");
        assert!(!dir.exists());
    }

    fn paused_records(snaps: &tempfile::TempDir) -> Vec<String> {
        std::fs::read_dir(snaps.path().join("snapshots/.paused"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn snapshot_dirs(snaps: &tempfile::TempDir) -> usize {
        std::fs::read_dir(snaps.path().join("snapshots"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn a_filesystem_pause_frees_the_sandbox_and_connect_starts_it_again() {
        let (e, snaps) = snap_env();
        let id = create(
            &e,
            NewSandbox {
                metadata: Some([("m".to_string(), "1".to_string())].into()),
                ..base(60)
            },
        )
        .await;
        let token = e.manager.info("k", &id).expect("info").envd_access_token;
        e.manager
            .pause("k", &id, false)
            .await
            .expect("pause to disk");
        // its processes are gone, its files and record are kept
        assert!(
            !e.driver.alive().contains(&id),
            "still running: {:?}",
            e.driver.alive()
        );
        assert_eq!(paused_records(&snaps), vec![format!("{id}.json")]);
        assert_eq!(snapshot_dirs(&snaps), 1);
        let info = e.manager.info("k", &id).expect("info while on disk");
        assert_eq!(info.state, SandboxState::Paused);
        assert_eq!(info.metadata.get("m").map(String::as_str), Some("1"));
        assert!(
            e.manager.list_snapshots("k", None, None).is_empty(),
            "hidden"
        );
        let err = e.manager.pause("k", &id, false).await.expect_err("again");
        assert!(matches!(err, ManagerError::WrongState { .. }), "{err:?}");
        let err = e
            .manager
            .create_snapshot("k", &id, None, None)
            .await
            .expect_err("snapshot of a sandbox on disk");
        assert!(matches!(err, ManagerError::WrongState { .. }), "{err:?}");
        assert!(
            e.manager.route_running(&id).await.is_none(),
            "no autoResume"
        );
        assert!(
            kinds(&e, &id)
                .iter()
                .any(|(k, d)| k == "sandbox.pause" && d["memory"] == false)
        );

        let (sbx, resumed) = e
            .manager
            .connect("k", &id, Some(90))
            .await
            .expect("connect");
        assert!(resumed);
        assert_eq!(sbx.sandbox_id, id);
        assert_eq!(
            sbx.envd_access_token, token,
            "the SDK's handle keeps its token"
        );
        assert!(e.driver.alive().contains(&id));
        let spec = e.driver.spec(&id).expect("spec");
        assert_eq!(spec.template.layers.len(), 1, "started from its files");
        assert_eq!(
            e.manager.info("k", &id).expect("info").state,
            SandboxState::Running
        );
        assert!(paused_records(&snaps).is_empty());
        assert!(
            kinds(&e, &id)
                .iter()
                .any(|(k, d)| k == "sandbox.resume" && d["fromDisk"] == true)
        );
        // the layer stays while the sandbox runs on it, and goes with it
        assert_eq!(snapshot_dirs(&snaps), 1);
        e.manager.kill("k", &id).await.expect("kill");
        assert_eq!(snapshot_dirs(&snaps), 0);
    }

    #[tokio::test]
    async fn killing_a_sandbox_on_disk_removes_its_files_and_record() {
        let (e, snaps) = snap_env();
        let id = create(&e, base(60)).await;
        e.manager
            .pause("k", &id, false)
            .await
            .expect("pause to disk");
        e.manager.kill("k", &id).await.expect("kill");
        assert!(paused_records(&snaps).is_empty());
        assert_eq!(snapshot_dirs(&snaps), 0);
        assert!(e.manager.info("k", &id).is_err());
    }

    #[tokio::test]
    async fn auto_resume_traffic_and_filesystem_auto_pause() {
        let (e, snaps) = snap_env();
        let id = create(
            &e,
            NewSandbox {
                auto_pause: Some(true),
                auto_pause_memory: Some(false),
                auto_resume: Some(cella_api::AutoResume { enabled: true }),
                ..base(1)
            },
        )
        .await;
        // (the record is written before the sandbox's processes go)
        wait_until("auto-pause to disk", Duration::from_secs(10), || {
            paused_records(&snaps).len() == 1 && !e.driver.alive().contains(&id)
        })
        .await;
        let live = e
            .manager
            .route_running(&id)
            .await
            .expect("traffic resumes it");
        assert!(!live.is_paused());
        assert!(e.driver.alive().contains(&id));
        assert!(paused_records(&snaps).is_empty());
    }

    #[tokio::test]
    async fn paused_sandboxes_outlive_a_server_restart_on_disk() {
        let snaps = tempfile::tempdir().expect("tempdir");
        let config = || ManagerConfig {
            snapshot_dir: Some(snaps.path().join("snapshots")),
            ..fast()
        };
        let e = env(config());
        let paused = create(&e, base(60)).await;
        let running = create(&e, base(60)).await;
        let token = e
            .manager
            .info("k", &paused)
            .expect("info")
            .envd_access_token;
        e.manager.pause("k", &paused, true).await.expect("pause");
        let copies = snapshot_dirs(&snaps);
        e.manager.shutdown().await;
        assert!(e.driver.alive().is_empty(), "{:?}", e.driver.alive());
        assert_eq!(paused_records(&snaps), vec![format!("{paused}.json")]);
        assert_eq!(
            (copies, snapshot_dirs(&snaps)),
            (1, 1),
            "the copy written at the pause is the one kept"
        );

        // a new server on the same directories (same templates)
        let store = e.store.clone();
        let driver = FakeDriver::new();
        let manager = Manager::start(
            vec![Arc::new(driver.clone())],
            0,
            e.manager.templates().clone(),
            store,
            config(),
        );
        let listed: Vec<String> = manager
            .list("k", &BTreeMap::new(), &[])
            .into_iter()
            .map(|s| s.sandbox_id)
            .collect();
        assert_eq!(
            listed,
            vec![paused.clone()],
            "the running one is gone, the paused one back"
        );
        assert_eq!(
            manager.info("k", &paused).expect("info").state,
            SandboxState::Paused
        );
        assert!(manager.info("other", &paused).is_err());
        let (sbx, resumed) = manager.connect("k", &paused, None).await.expect("connect");
        assert!(resumed);
        assert_eq!(sbx.envd_access_token, token);
        assert!(driver.alive().contains(&paused));
        assert!(manager.info("k", &running).is_err());
        manager.kill("k", &paused).await.expect("kill");
        assert_eq!(snapshot_dirs(&snaps), 0);
    }

    #[tokio::test]
    async fn a_memory_pause_is_on_disk_at_once_and_outlives_a_crash() {
        let snaps = tempfile::tempdir().expect("tempdir");
        let config = || ManagerConfig {
            snapshot_dir: Some(snaps.path().join("snapshots")),
            ..fast()
        };
        let e = env(config());
        let id = create(&e, base(60)).await;

        // paused in memory (still alive in the driver) and written out
        e.manager.pause("k", &id, true).await.expect("pause");
        assert!(e.driver.alive().contains(&id), "paused in memory");
        assert_eq!(paused_records(&snaps), vec![format!("{id}.json")]);
        assert_eq!(snapshot_dirs(&snaps), 1);
        // a resume drops the copy
        e.manager.connect("k", &id, None).await.expect("connect");
        assert!(paused_records(&snaps).is_empty());
        assert_eq!(snapshot_dirs(&snaps), 0);
        // a kill while paused too
        e.manager.pause("k", &id, true).await.expect("pause");
        e.manager.kill("k", &id).await.expect("kill");
        assert!(paused_records(&snaps).is_empty());
        assert_eq!(snapshot_dirs(&snaps), 0);

        // a crash: the manager is dropped without a shutdown
        let id = create(&e, base(60)).await;
        let token = e.manager.info("k", &id).expect("info").envd_access_token;
        e.manager.pause("k", &id, true).await.expect("pause");
        let driver = FakeDriver::new();
        let manager = Manager::start(
            vec![Arc::new(driver.clone())],
            0,
            e.manager.templates().clone(),
            e.store.clone(),
            config(),
        );
        assert_eq!(
            manager.info("k", &id).expect("info").state,
            SandboxState::Paused
        );
        let (sbx, resumed) = manager.connect("k", &id, None).await.expect("connect");
        assert!(resumed);
        assert_eq!(sbx.envd_access_token, token, "SDK handles keep working");
        assert!(driver.alive().contains(&id), "revived from the copy");
        assert!(
            paused_records(&snaps).is_empty(),
            "revived: no longer paused"
        );
        manager.kill("k", &id).await.expect("kill");
        assert_eq!(snapshot_dirs(&snaps), 0);
    }
}
