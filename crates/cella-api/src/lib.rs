//! REST types shared by the server, the Rust client and the CLI.
//!
//! Field names follow E2B's OpenAPI spec exactly (camelCase, `sandboxID`, `templateID`),
//! because the official SDKs deserialize these bodies. cella-only additions are marked as
//! extensions and are always optional, so E2B clients ignore them.
//!
//! This crate depends on serde alone so that clients do not pull in a web framework.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the in-sandbox protocol that cella's agent reports. The SDKs enable features
/// by comparing against this; 0.6.4 is the newest gate the 2.x SDKs check (watching network
/// mounts), and everything up to it is implemented.
pub const ENVD_VERSION: &str = "0.6.4";

/// E2B returns this constant client ID for backward compatibility with old SDKs.
pub const CLIENT_ID: &str = "6532622b";

/// Port of the in-sandbox agent (E2B's envd port).
pub const ENVD_PORT: u16 = 49983;

/// Default sandbox lifetime in seconds when a create request gives none (E2B's API default).
pub const DEFAULT_TIMEOUT_SECS: u64 = 15;

/// Longest lifetime a sandbox may be given, in seconds (E2B Pro's 24 h).
pub const MAX_TIMEOUT_SECS: u64 = 86_400;

/// Header that routes a request to a sandbox through the proxy.
pub const HEADER_SANDBOX_ID: &str = "e2b-sandbox-id";
/// Header that picks the port inside the sandbox (default [`ENVD_PORT`]).
pub const HEADER_SANDBOX_PORT: &str = "e2b-sandbox-port";
/// API key header.
pub const HEADER_API_KEY: &str = "x-api-key";
/// Agent access token header.
pub const HEADER_ACCESS_TOKEN: &str = "x-access-token";

/// Error body of every non-2xx REST response: `{code, message}` as E2B's `Error` schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// HTTP status code, repeated in the body.
    pub code: u16,
    /// Human-readable description; names the offending field for validation errors.
    pub message: String,
}

/// Which isolation a sandbox got. Always reported, never implied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Isolation {
    /// Namespaces + seccomp + Landlock + cgroups on the host kernel.
    #[serde(rename = "jail")]
    Jail,
    /// Own kernel in a QEMU microvm accelerated by KVM.
    #[serde(rename = "microvm-kvm")]
    MicrovmKvm,
    /// Own kernel in a QEMU microvm under TCG (software emulation).
    #[serde(rename = "microvm-tcg")]
    MicrovmTcg,
}

impl Isolation {
    /// The wire name (`jail`, `microvm-kvm`, `microvm-tcg`).
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Jail => "jail",
            Isolation::MicrovmKvm => "microvm-kvm",
            Isolation::MicrovmTcg => "microvm-tcg",
        }
    }
}

/// Lifecycle state as E2B reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// The sandbox is alive.
    Running,
    /// The sandbox is paused: its processes are frozen in place, memory resident.
    Paused,
}

/// `POST /sandboxes` and `POST /v2/sandboxes` body (`NewSandbox` / `NewSandboxV2`).
///
/// Unknown fields are ignored, as E2B does, because newer SDKs send fields older servers
/// do not know.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    /// Template name or ID.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Lifetime in seconds from now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// User metadata, returned by info/list and usable as a list filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Environment variables for every process in the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Pause instead of kill on timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<bool>,
    /// Whether an auto-pause keeps memory (E2B default true). cella always pauses with
    /// memory; `false` is accepted and treated as `true` (see docs/compatibility.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause_memory: Option<bool>,
    /// Resume a paused sandbox when traffic for it reaches the proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_resume: Option<AutoResume>,
    /// Lifecycle in the form `SandboxDetail` reports it (`onTimeout`, `autoResume`); an
    /// alternative to `autoPause`/`autoResume` for direct API callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<LifecycleRequest>,
    /// Legacy flag; cella always secures sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<bool>,
    /// Internet access (E2B's snake_case name; SDK default `true`). `false` is
    /// `network.denyOut = ["0.0.0.0/0"]`. Honoured only on a server started with
    /// `--egress allowed`; otherwise sandboxes have no network whatever this says.
    #[serde(
        default,
        rename = "allow_internet_access",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_internet_access: Option<bool>,
    /// cella extension: number of vCPUs (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u32>,
    /// cella extension: memory limit in MiB (default 512).
    #[serde(default, rename = "memoryMB", skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// cella extension: writable disk size in MiB (default 1024).
    #[serde(
        default,
        rename = "diskSizeMB",
        skip_serializing_if = "Option::is_none"
    )]
    pub disk_size_mb: Option<u64>,
    /// cella extension: isolation driver to use (`jail`, `vm`); default is the server's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Network settings (`SandboxNetworkConfig`): `allowPublicTraffic`, `allowOut`, `denyOut`,
    /// `dnsServers`, `maskRequestHost`, `httpsPorts`, `egressProxy`, `rules`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    /// Workload identity tokens (`SandboxIam`): JWTs identifying the sandbox, minted per
    /// request where a `network.rules` header names them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam: Option<IamConfig>,
    /// Volumes to mount: refused (400), cella has no volume service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mounts: Option<Unsupported>,
    /// MCP servers for E2B's MCP gateway: refused (400), cella has no gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<Unsupported>,
}

/// The part of E2B's `SandboxNetworkConfig` cella acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    /// `false`: the proxy requires `e2b-traffic-access-token` (the create response's
    /// `trafficAccessToken`) on every port but the agent's. Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_public_traffic: Option<bool>,
    /// Allowed egress destinations: CIDRs, IPv4 addresses or domains (`*.x` too). Allow
    /// always wins over deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    /// Denied egress destinations: CIDRs or IPv4 addresses only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    /// IPv4 addresses all traffic may reach when `allowOut` names a domain (at most 10;
    /// omitted: `8.8.8.8`; `[]`: none). Only opens the firewall; the sandbox still resolves
    /// through cella's forwarder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
    /// `Host` header requests through the proxy reach the sandbox's ports with (`${PORT}` is
    /// replaced by the port); default: the request's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<String>,
    /// Per-host request transforms (`SandboxNetworkConfigRules`): headers set on the
    /// sandbox's outbound HTTP/HTTPS requests to those hosts, outside the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<NetworkRules>,
    /// A SOCKS5 proxy the sandbox's outbound TCP is tunneled through (after the allow/deny
    /// rules), on the host; the sandbox does not see it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<EgressProxyConfig>,
    /// Sandbox ports whose servers speak HTTPS: the proxy reaches them over TLS (their
    /// certificates are not verified, so self-signed ones work). Not the agent's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_ports: Option<Vec<i64>>,
}

/// `iam` of a create (`SandboxIam`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IamConfig {
    /// Token name (the `${e2b.identity.tokens.NAME}` placeholder) to its definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<std::collections::BTreeMap<String, IamToken>>,
}

/// One workload token (`SandboxIamToken`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IamToken {
    /// The token's `aud`, exactly as given.
    pub audience: String,
    /// `JWT-SVID` (the only type).
    pub token_type: String,
}

/// `network.rules`: a host (a name, `*.name`, an IPv4 address or CIDR) mapped to the rules
/// applied, in order, to the sandbox's outbound requests to it.
pub type NetworkRules = std::collections::BTreeMap<String, Vec<NetworkRule>>;

/// One per-host rule (`SandboxNetworkRule`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkRule {
    /// What is changed in a matching request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<NetworkTransform>,
}

/// `SandboxNetworkTransform`: headers set (overriding the request's own) on a matching
/// request. In responses the values are never returned (they are usually credentials).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkTransform {
    /// Header name to value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<std::collections::BTreeMap<String, String>>,
}

/// A JSON value cella accepts only to refuse it with a clear error: a field of a feature it
/// does not have (silently ignoring it would give the caller something else than asked for).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Unsupported(pub serde_json::Value);

// JSON parsed by serde_json holds no NaN, so equality is reflexive.
impl Eq for Unsupported {}

impl Unsupported {
    /// `null`, `{}` or `[]`: nothing asked for.
    pub fn is_empty(&self) -> bool {
        match &self.0 {
            serde_json::Value::Null => true,
            serde_json::Value::Object(m) => m.is_empty(),
            serde_json::Value::Array(a) => a.is_empty(),
            _ => false,
        }
    }
}

/// `PUT /sandboxes/{id}/network` body (`SandboxNetworkUpdateConfig`): replaces the egress
/// rules; an omitted field is cleared.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkUpdate {
    /// See [`NetworkConfig::allow_out`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    /// See [`NetworkConfig::deny_out`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    /// See [`NetworkConfig::dns_servers`]; omitted resets it to `8.8.8.8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
    /// `false` adds `0.0.0.0/0` to `denyOut` (E2B's snake_case name here too).
    #[serde(
        default,
        rename = "allow_internet_access",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_internet_access: Option<bool>,
    /// See [`NetworkConfig::rules`]; omitted removes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<NetworkRules>,
    /// See [`NetworkConfig::egress_proxy`]; omitted stops tunneling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<EgressProxyConfig>,
}

/// `network.egressProxy` (`SandboxEgressProxyConfig`). In responses `password` and
/// `tls.caCert` are never set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressProxyConfig {
    /// `host:port` of the SOCKS5 proxy (a name or an IPv4 address).
    pub address: String,
    /// RFC 1929 user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// RFC 1929 password (only with `username`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// TLS to the proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<EgressProxyTls>,
}

/// `network.egressProxy.tls`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressProxyTls {
    /// Whether TLS is on (when false no other field may be set).
    pub enabled: bool,
    /// Name the proxy's certificate is verified against and sent as SNI (default: the
    /// address's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// PEM certificates that replace the system trust store for this proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
}

/// `autoResume` of a create request (`SandboxAutoResumeConfig`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoResume {
    /// Resume on traffic.
    pub enabled: bool,
}

/// `lifecycle` of a create request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleRequest {
    /// `kill` (default) or `pause`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<String>,
    /// Resume on traffic (only with `onTimeout: pause`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_resume: Option<bool>,
}

/// What happens when a sandbox's timeout passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Kill it (E2B's default).
    Kill,
    /// Pause it.
    Pause,
}

/// `SandboxDetail.lifecycle` (`SandboxLifecycle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    /// Whether traffic resumes the sandbox when it is paused.
    pub auto_resume: bool,
    /// What the timeout does.
    pub on_timeout: OnTimeout,
}

/// `POST /sandboxes/{id}/pause` body (`SandboxPauseRequest`); every field optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PauseRequest {
    /// Keep memory (default true). cella always keeps memory; `false` is treated as `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
    /// Refuse (503) when the agent does not answer, instead of pausing anyway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_healthy_guest: Option<bool>,
}

/// `POST /sandboxes/{id}/snapshots` body (`SandboxSnapshotRequest`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRequest {
    /// Name; a later snapshot with the same name takes the name over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Capture memory too. cella snapshots files only: `true` is refused (400); absent or
    /// `false` is a filesystem snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// A snapshot as the snapshot routes answer it (`SnapshotInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    /// What `Sandbox.create` takes: `name:default` when named, else `<id>:default`.
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    /// Every full name of the snapshot (`name:default`); empty when unnamed.
    pub names: Vec<String>,
}

/// `POST /sandboxes/{id}/fork` body (`SandboxForkRequest`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForkRequest {
    /// Lifetime of each fork in seconds (E2B default 15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// How many forks (1-20, default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

/// One fork's outcome (`SandboxForkResult`): exactly one field is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForkResult {
    /// The started fork.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    /// Why it did not start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

/// `POST /sandboxes/{id}/resume` body (deprecated route, `ResumedSandbox`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResumeRequest {
    /// Lifetime in seconds from now (E2B default 15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Pause instead of kill on the next timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<bool>,
    /// Resume from memory (cella: always).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// Header carrying a sandbox's traffic access token through the proxy.
pub const HEADER_TRAFFIC_ACCESS_TOKEN: &str = "e2b-traffic-access-token";

/// Create/connect response (`Sandbox` schema).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    /// Template the sandbox was created from.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Sandbox ID (`[a-z0-9]+`).
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// Constant, see [`CLIENT_ID`].
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// Agent protocol version.
    pub envd_version: String,
    /// Template alias, if it was addressed by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Token the agent requires in `X-Access-Token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    /// Token the proxy requires (`e2b-traffic-access-token`) for the sandbox's ports when it
    /// was created with `network.allowPublicTraffic = false`; null otherwise.
    #[serde(default)]
    pub traffic_access_token: Option<String>,
    /// Sandbox domain (null: the SDK uses its configured one).
    #[serde(default)]
    pub domain: Option<String>,
    /// cella extension: the isolation this sandbox got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
}

/// `GET /sandboxes/{id}` response (`SandboxDetail`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    /// Template ID.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Template alias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Sandbox ID.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// Constant, see [`CLIENT_ID`].
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// RFC 3339 start time.
    pub started_at: String,
    /// RFC 3339 time at which the sandbox will be killed.
    pub end_at: String,
    /// Agent protocol version.
    pub envd_version: String,
    /// Access token for the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    /// Sandbox domain.
    #[serde(default)]
    pub domain: Option<String>,
    /// vCPUs.
    pub cpu_count: u32,
    /// Memory in MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    /// Writable disk in MiB.
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// User metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// running or paused.
    pub state: SandboxState,
    /// What the timeout does and whether traffic resumes a paused sandbox.
    pub lifecycle: Lifecycle,
    /// Network settings: `allowPublicTraffic` when it was given, the current egress rules
    /// when the sandbox has egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    /// Whether the sandbox can reach the public internet (not denied by `0.0.0.0/0`). Always
    /// `false` on a server without egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_internet_access: Option<bool>,
    /// cella extension: the isolation this sandbox got.
    pub isolation: Isolation,
}

/// One entry of `GET /sandboxes` and `GET /v2/sandboxes` (`ListedSandbox`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedSandbox {
    /// Template ID.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Template alias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Sandbox ID.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// Constant, see [`CLIENT_ID`].
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// RFC 3339 start time.
    pub started_at: String,
    /// RFC 3339 end time.
    pub end_at: String,
    /// vCPUs.
    pub cpu_count: u32,
    /// Memory in MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    /// Writable disk in MiB.
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// User metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// running or paused.
    pub state: SandboxState,
    /// Agent protocol version.
    pub envd_version: String,
    /// cella extension: the isolation this sandbox got.
    pub isolation: Isolation,
}

/// `POST /sandboxes/{id}/timeout` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeoutRequest {
    /// New lifetime in seconds from now.
    pub timeout: u64,
}

/// `POST /sandboxes/{id}/connect` and `/v2/.../connect` body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectRequest {
    /// Lifetime in seconds from now; only ever extends the current end time of a running
    /// sandbox, and sets it for a resumed one.
    #[serde(default)]
    pub timeout: Option<u64>,
    /// `false` asks to cold-boot a paused sandbox from its disk (`on_resume="reboot"`).
    /// cella always resumes from memory, which keeps what a reboot would keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// `GET /health` body (cella reports which drivers it serves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// Always `"ok"` when the server answers.
    pub status: String,
    /// Default isolation for new sandboxes.
    pub default_isolation: Isolation,
    /// cella version.
    pub version: String,
}

/// One audit record (`GET /audit`, cella extension).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Monotonic sequence number.
    pub id: i64,
    /// RFC 3339 timestamp with milliseconds.
    pub time: String,
    /// Who: the API key's ID, `agent` for in-sandbox events, `server` for the server itself.
    pub actor: String,
    /// Sandbox concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// Event kind, e.g. `api`, `sandbox.create`, `process.start`, `process.exit`, `file.write`.
    pub kind: String,
    /// Event details (free-form JSON object).
    pub detail: serde_json::Value,
}

/// A template as `GET /templates` lists it (subset of E2B's `Template`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    /// Template ID (cella uses the name).
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Build ID (hash of the spec).
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// Default vCPUs.
    pub cpu_count: u32,
    /// Default memory in MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    /// Default disk in MiB.
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// Whether the template is public (always true for cella's built-ins).
    pub public: bool,
    /// Names the template answers to.
    pub aliases: Vec<String>,
    /// Names the template answers to.
    pub names: Vec<String>,
    /// `ready`, `building`, `waiting` or `error`.
    pub build_status: String,
    /// Agent protocol version.
    pub envd_version: String,
}

/// An API key as `cella keys list` shows it (cella extension). The secret is never listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyInfo {
    /// Key ID (public).
    pub id: String,
    /// Human name.
    pub name: String,
    /// First characters of the key, for recognition.
    pub mask: String,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// A freshly created key; the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedApiKey {
    /// Key metadata.
    #[serde(flatten)]
    pub info: ApiKeyInfo,
    /// The secret key (`e2b_` + 40 hex).
    pub key: String,
}

/// Sandbox IDs are lowercase alphanumerics, as E2B's (`[a-z0-9]+`).
pub fn is_valid_sandbox_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_sandbox_accepts_sdk_body_with_unknown_fields() {
        let body = r#"{"templateID":"base","timeout":300,"metadata":{"a":"b"},
            "envVars":{"X":"1"},"autoPause":false,"mcp":null,"network":{}}"#;
        let parsed: NewSandbox = serde_json::from_str(body).expect("parse");
        assert_eq!(parsed.template_id, "base");
        assert_eq!(parsed.timeout, Some(300));
        assert_eq!(parsed.env_vars.expect("env")["X"], "1");
    }

    #[test]
    fn network_fields_use_e2b_names() {
        let body = r#"{"templateID":"base","allow_internet_access":false,
            "network":{"allowOut":["a.test"],"denyOut":["0.0.0.0/0"],"dnsServers":[]}}"#;
        let parsed: NewSandbox = serde_json::from_str(body).expect("parse");
        assert_eq!(parsed.allow_internet_access, Some(false));
        let net = parsed.network.expect("network");
        assert_eq!(net.allow_out, Some(vec!["a.test".to_string()]));
        assert_eq!(net.deny_out, Some(vec!["0.0.0.0/0".to_string()]));
        assert_eq!(
            net.dns_servers,
            Some(vec![]),
            "[] is kept apart from omitted"
        );
        let upd: NetworkUpdate = serde_json::from_str(
            r#"{"allowOut":["1.1.1.1"],"allow_internet_access":true,"dnsServers":["1.1.1.1"]}"#,
        )
        .expect("parse");
        assert_eq!(upd.allow_out, Some(vec!["1.1.1.1".to_string()]));
        assert_eq!(upd.allow_internet_access, Some(true));
        assert_eq!(upd.deny_out, None);
        assert_eq!(upd.dns_servers, Some(vec!["1.1.1.1".to_string()]));
        let none: NetworkUpdate = serde_json::from_str("{}").expect("parse");
        assert_eq!(none.dns_servers, None);
    }

    #[test]
    fn lifecycle_fields_parse_as_the_sdks_send_them() {
        let body = r#"{"templateID":"base","autoPause":true,"autoPauseMemory":true,
            "autoResume":{"enabled":true}}"#;
        let parsed: NewSandbox = serde_json::from_str(body).expect("parse");
        assert_eq!(parsed.auto_pause, Some(true));
        assert_eq!(parsed.auto_pause_memory, Some(true));
        assert_eq!(parsed.auto_resume, Some(AutoResume { enabled: true }));
        let body = r#"{"templateID":"base","lifecycle":{"onTimeout":"pause","autoResume":false}}"#;
        let parsed: NewSandbox = serde_json::from_str(body).expect("parse");
        let l = parsed.lifecycle.expect("lifecycle");
        assert_eq!(l.on_timeout.as_deref(), Some("pause"));
        assert_eq!(l.auto_resume, Some(false));
        let p: PauseRequest =
            serde_json::from_str(r#"{"memory":false,"requireHealthyGuest":true}"#).expect("pause");
        assert_eq!(p.memory, Some(false));
        assert_eq!(p.require_healthy_guest, Some(true));
        let v = serde_json::to_value(Lifecycle {
            auto_resume: true,
            on_timeout: OnTimeout::Pause,
        })
        .expect("json");
        assert_eq!(
            v,
            serde_json::json!({"autoResume": true, "onTimeout": "pause"})
        );
        assert_eq!(
            serde_json::to_value(SandboxState::Paused).expect("json"),
            "paused"
        );
    }

    #[test]
    fn sandbox_serializes_with_e2b_names() {
        let s = Sandbox {
            template_id: "base".into(),
            sandbox_id: "iabc".into(),
            client_id: CLIENT_ID.into(),
            envd_version: ENVD_VERSION.into(),
            alias: None,
            envd_access_token: Some("t".into()),
            traffic_access_token: None,
            domain: None,
            isolation: Some(Isolation::Jail),
        };
        let v = serde_json::to_value(&s).expect("json");
        assert_eq!(v["sandboxID"], "iabc");
        assert_eq!(v["templateID"], "base");
        assert_eq!(v["clientID"], CLIENT_ID);
        assert_eq!(v["envdVersion"], ENVD_VERSION);
        assert_eq!(v["envdAccessToken"], "t");
        assert_eq!(v["isolation"], "jail");
        assert!(v.get("trafficAccessToken").is_some());
    }

    #[test]
    fn sandbox_id_validation() {
        assert!(is_valid_sandbox_id("i0a9z"));
        assert!(!is_valid_sandbox_id(""));
        assert!(!is_valid_sandbox_id("a-b"));
        assert!(!is_valid_sandbox_id("ABC"));
        assert!(!is_valid_sandbox_id("../x"));
    }
}

/// One metrics sample (`SandboxMetric`), from the sandbox's cgroup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxMetric {
    /// RFC 3339 time of the sample.
    pub timestamp: String,
    /// Unix seconds of the sample.
    pub timestamp_unix: i64,
    /// vCPUs.
    pub cpu_count: u32,
    /// CPU use in percent of `cpu_count` CPUs since the previous sample.
    pub cpu_used_pct: f64,
    /// Memory used, bytes.
    pub mem_used: u64,
    /// Memory limit, bytes.
    pub mem_total: u64,
    /// Page cache, bytes (0 when unknown).
    pub mem_cache: u64,
    /// Disk used, bytes (0 when unknown).
    pub disk_used: u64,
    /// Disk size, bytes.
    pub disk_total: u64,
}

/// `POST /sandboxes/{id}/refreshes` body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshRequest {
    /// Seconds to extend the lifetime by (E2B: at most 3600).
    #[serde(default)]
    pub duration: Option<u64>,
}
