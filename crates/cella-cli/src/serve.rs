//! `cella serve`: the server with its embedded defaults (SQLite in the data dir, the jail
//! driver where no KVM, the `base` template built on first start).
//!
//! Start-up order matters: orphans of a previous run are removed *before* the listener opens,
//! so a new sandbox can never collide with a leftover one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use cella_core::driver::Driver;
use cella_core::manager::{Manager, ManagerConfig};
use cella_core::store::Store;
use cella_core::template::{TemplateSpec, TemplateStore};

/// Arguments of `cella serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address for the REST API and the sandbox proxy.
    #[arg(long, env = "CELLA_LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// State directory (database, sandboxes, templates).
    #[arg(long, env = "CELLA_DATA_DIR", default_value = "/var/lib/cella")]
    pub data_dir: PathBuf,
    /// Template directory (default: <data-dir>/templates).
    #[arg(long, env = "CELLA_TEMPLATE_DIR")]
    pub template_dir: Option<PathBuf>,
    /// Default isolation driver: auto (vm with KVM when available, else jail), jail or vm.
    #[arg(long, default_value = "auto")]
    pub driver: String,
    /// Path of the static cella-agent binary.
    #[arg(long, env = "CELLA_AGENT")]
    pub agent: Option<PathBuf>,
    /// Guest kernel and initramfs of the microVM driver (made by scripts/vm-assets).
    #[arg(long, env = "CELLA_VM_ASSETS", default_value = "/var/lib/cella/vm")]
    pub vm_assets: PathBuf,
    /// Seconds between two metrics samples of each sandbox (the series `get_metrics` returns).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub metrics_interval: u64,
    /// Templates to build at start if they are not built yet (comma-separated; empty: none).
    #[arg(long, default_value = "base", value_delimiter = ',')]
    pub build: Vec<String>,
    /// Outbound network of sandboxes: `none` (no sandbox gets a network interface, whatever
    /// the request says) or `allowed` (requests are honoured: `allow_internet_access`,
    /// `network.allowOut/denyOut`, behind the egress firewall).
    #[arg(long, env = "CELLA_EGRESS", default_value = "none")]
    pub egress: String,
    /// Address pool for sandboxes with egress (one /30 each).
    #[arg(long, default_value = cella_net::DEFAULT_POOL)]
    pub egress_pool: String,
    /// Only interface sandbox traffic may leave by (default: any the host routes to).
    #[arg(long)]
    pub egress_interface: Option<String>,
    /// Upstream DNS resolver for sandboxes (`IP` or `IP:port`, repeatable; default: the
    /// nameservers of the host's /etc/resolv.conf). Asked over UDP, and over TCP for
    /// sandboxes' TCP queries and truncated answers.
    #[arg(long)]
    pub dns_upstream: Vec<String>,
    /// Let a sandbox's `network.egressProxy` (SOCKS5) be on a private, loopback or other
    /// internal address (by default refused, like any sandbox traffic there).
    #[arg(long)]
    pub egress_proxy_private: bool,
    /// Extra CA certificates (a PEM file) trusted, besides the system store, for the servers
    /// that `network.rules` requests are forwarded to (e.g. a corporate CA).
    #[arg(long)]
    pub egress_upstream_ca: Option<PathBuf>,
    /// `iss` of the workload identity tokens (`iam`), the URL where this server's
    /// `/.well-known/openid-configuration` is reachable (default: `http://<--listen>`).
    #[arg(long)]
    pub identity_issuer: Option<String>,
    /// SPIFFE trust domain of the workload tokens' subject
    /// (`spiffe://<domain>/sandbox/<id>`).
    #[arg(long, default_value = "cella.local")]
    pub identity_trust_domain: String,
    /// How long a paused sandbox is kept before it is killed (its memory stays resident on
    /// this host while paused), e.g. 30m, 24h.
    #[arg(long, env = "CELLA_PAUSED_TTL", default_value = "24h", value_parser = parse_duration)]
    pub paused_ttl: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err("must be longer than 0".into());
    }
    Ok(d)
}

/// Run the server until SIGINT/SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // The libraries report what they cannot return (a failed cleanup, a dropped audit
    // record) through `tracing`; without a subscriber those warnings would vanish.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    if !running_as_root() {
        bail!("cella serve must run as root (it creates namespaces, cgroups and mounts)");
    }
    let data_dir = args.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    restrict_permissions(&data_dir)?;

    let store = Store::open(&data_dir.join("cella.db")).context("opening the database")?;
    setup_keys(&store)?;
    let stale = store.unfinished_sandboxes().unwrap_or_default();
    for rec in &stale {
        let _ = store.finish_sandbox(&rec.id, "server restarted");
    }

    let drivers = build_drivers(&args, &data_dir).await?;
    let net = start_egress(&args, &data_dir, &store).await?;
    let default_isolation = drivers[0].isolation();

    let template_dir = args
        .template_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("templates"));
    let templates = Arc::new(TemplateStore::new(template_dir));
    for name in args.build.iter().filter(|n| !n.is_empty()) {
        build_template(&templates, name).await?;
    }

    let manager = Manager::start_with_egress(
        drivers,
        0,
        templates,
        store.clone(),
        ManagerConfig {
            paused_ttl: args.paused_ttl,
            snapshot_dir: Some(data_dir.join("snapshots")),
            ..ManagerConfig::default()
        },
        net.clone()
            .map(|n| n as Arc<dyn cella_core::egress::Egress>),
    );
    let state = cella_server::AppState::new(manager.clone());
    // Signal handlers before the listening line: a supervisor may send SIGTERM right after it.
    let signals = Signals::install();
    let sampler = cella_server::spawn_metrics_sampler(
        state.clone(),
        std::time::Duration::from_secs(args.metrics_interval),
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!(
        "cella listening on http://{} (default isolation: {})",
        listener.local_addr().unwrap_or(args.listen),
        default_isolation.as_str()
    );
    store.audit(cella_core::store::NewAudit {
        actor: "server".into(),
        sandbox_id: None,
        kind: "server.start".into(),
        detail: serde_json::json!({ "listen": args.listen.to_string(),
            "isolation": default_isolation.as_str(), "staleSandboxes": stale.len(),
            "egress": args.egress }),
    });

    let shutdown_manager = manager.clone();
    let shutdown = async move {
        signals.wait().await;
        eprintln!(
            "cella: shutting down, destroying {} sandbox(es)",
            shutdown_manager.live_count()
        );
        shutdown_manager.shutdown().await;
    };
    cella_server::serve(listener, state, shutdown)
        .await
        .context("serving HTTP")?;
    sampler.abort();
    manager.shutdown().await;
    if let Some(net) = &net {
        net.shutdown().await;
    }
    store.flush_audit();
    Ok(())
}

/// The host-side network for `--egress allowed` (`None` for `--egress none`).
async fn start_egress(
    args: &ServeArgs,
    data_dir: &Path,
    store: &Store,
) -> anyhow::Result<Option<Arc<cella_net::HostNet>>> {
    match args.egress.as_str() {
        "none" => return Ok(None),
        "allowed" => {}
        other => bail!("unknown --egress {other:?}: expected none or allowed"),
    }
    let pool = cella_core::egress::Ipv4Cidr::parse(&args.egress_pool)
        .map_err(|e| anyhow::anyhow!("--egress-pool: {e}"))?;
    let upstreams = if args.dns_upstream.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        cella_net::parse_resolv_conf(&text)
    } else {
        args.dns_upstream
            .iter()
            .map(|u| {
                u.parse::<SocketAddr>()
                    .or_else(|_| {
                        u.parse::<std::net::IpAddr>()
                            .map(|ip| SocketAddr::new(ip, 53))
                    })
                    .map_err(|_| anyhow::anyhow!("--dns-upstream {u:?}: expected IP or IP:port"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let td = &args.identity_trust_domain;
    if td.is_empty()
        || !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        bail!("--identity-trust-domain {td:?}: lowercase letters, digits, '.', '-', '_' only");
    }
    if let Some(iss) = &args.identity_issuer
        && !(iss.starts_with("https://") || iss.starts_with("http://"))
    {
        bail!("--identity-issuer {iss:?}: must be an http(s) URL");
    }
    let (net, reaped) = cella_net::HostNet::start(cella_net::NetConfig {
        instance: cella_jail::instance_name(&data_dir.join("sandboxes")),
        pool,
        upstreams,
        uplink: args.egress_interface.clone(),
        proc_root: PathBuf::from("/proc"),
        sys_root: PathBuf::from("/sys"),
        store: store.clone(),
        proxy_allow_private: args.egress_proxy_private,
        ca_dir: data_dir.join("egress-ca"),
        identity_dir: data_dir.join("identity"),
        identity_issuer: args
            .identity_issuer
            .clone()
            .unwrap_or_else(|| format!("http://{}", args.listen)),
        identity_trust_domain: args.identity_trust_domain.clone(),
        upstream_ca_pem: match &args.egress_upstream_ca {
            Some(p) => Some(
                std::fs::read(p)
                    .with_context(|| format!("--egress-upstream-ca {}", p.display()))?,
            ),
            None => None,
        },
    })
    .await
    .context("starting sandbox egress (--egress allowed)")?;
    if reaped.links > 0 || reaped.table {
        println!(
            "cella: removed leftovers of a previous run (network): {} interface(s), table {}",
            reaped.links,
            if reaped.table { "replaced" } else { "absent" }
        );
    }
    println!(
        "cella: sandbox egress allowed (pool {pool}, nftables table inet {}, interfaces {}*)",
        net.table(),
        net.prefix()
    );
    match net.connection_audit() {
        Ok(()) => println!("cella: egress connection audit on (net.connection records)"),
        Err(e) => println!("cella: egress connection audit off: {e}"),
    }
    Ok(Some(net))
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn restrict_permissions(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("setting permissions of {}", dir.display()))
}

fn setup_keys(store: &Store) -> anyhow::Result<()> {
    if let Ok(key) = std::env::var("CELLA_API_KEY")
        && !key.is_empty()
    {
        store
            .import_key("CELLA_API_KEY", &key)
            .context("registering CELLA_API_KEY")?;
        println!("cella: API key from CELLA_API_KEY registered");
        return Ok(());
    }
    if store.active_key_count()? == 0 {
        let created = store.create_key("default")?;
        println!("cella: created API key (shown only once, store it now):");
        println!("  {}", created.key);
        println!(
            "  export CELLA_API_KEY={} E2B_API_KEY={}",
            created.key, created.key
        );
    }
    Ok(())
}

async fn build_drivers(args: &ServeArgs, data_dir: &Path) -> anyhow::Result<Vec<Arc<dyn Driver>>> {
    if !matches!(args.driver.as_str(), "auto" | "jail" | "vm") {
        bail!(
            "unknown driver {:?}: expected auto, jail or vm",
            args.driver
        );
    }
    let agent_path = find_agent(args.agent.as_deref())?;
    let jail = cella_jail::JailDriver::new(cella_jail::JailConfig {
        data_dir: data_dir.join("sandboxes"),
        agent_path: agent_path.clone(),
        cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        disk_pool: 2,
    })
    .context("starting the jail driver")?;
    report_reaped("jail", jail.reap_orphans().await?);
    let jail: Arc<dyn Driver> = Arc::new(jail);

    let vm = match start_vm_driver(args, data_dir, &agent_path).await {
        Ok(vm) => Some(vm),
        Err(e) if args.driver == "vm" => return Err(e.context("starting the vm driver")),
        Err(e) => {
            println!(
                "cella: microVM driver unavailable ({e:#}); sandboxes asking for it get a 400"
            );
            None
        }
    };
    let vm_is_kvm = vm
        .as_ref()
        .is_some_and(|v| v.isolation() == cella_api::Isolation::MicrovmKvm);
    let drivers = match (args.driver.as_str(), vm) {
        ("vm", Some(vm)) => vec![vm, jail],
        ("auto", Some(vm)) if vm_is_kvm => vec![vm, jail],
        (_, Some(vm)) => vec![jail, vm],
        (_, None) => vec![jail],
    };
    let names: Vec<&str> = drivers.iter().map(|d| d.isolation().as_str()).collect();
    println!(
        "cella: drivers: {} (default {})",
        names.join(", "),
        names.first().copied().unwrap_or("none")
    );
    Ok(drivers)
}

async fn start_vm_driver(
    args: &ServeArgs,
    data_dir: &Path,
    agent_path: &Path,
) -> anyhow::Result<Arc<dyn Driver>> {
    let config = cella_vm::VmConfig::new(
        data_dir.join("vm"),
        args.vm_assets.clone(),
        agent_path.to_path_buf(),
    );
    if !config.kernel().is_file() {
        bail!(
            "no guest kernel in {} (run scripts/vm-assets)",
            args.vm_assets.display()
        );
    }
    let vm = cella_vm::VmDriver::new(config).await?;
    println!(
        "cella: microVM acceleration: {:?} ({})",
        vm.accel().accel,
        vm.accel().reason
    );
    report_reaped("vm", vm.reap_orphans().await?);
    Ok(Arc::new(vm))
}

fn report_reaped(driver: &str, report: cella_core::driver::ReapReport) {
    if report != Default::default() {
        println!(
            "cella: removed leftovers of a previous run ({driver}): {} process(es), {} cgroup(s), {} dir(s), {} other",
            report.processes, report.cgroups, report.dirs, report.other
        );
    }
}

/// The agent binary: `--agent`, else next to this executable, else the static build output,
/// else the installed location.
fn find_agent(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("agent binary {} does not exist", p.display());
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        // Installed side by side, or the output of scripts/build.
        candidates.push(dir.join("cella-agent-static"));
        if let (Some(profile), Some(target)) = (dir.file_name(), dir.parent()) {
            candidates.push(
                target
                    .join("x86_64-unknown-linux-gnu")
                    .join(profile)
                    .join("cella-agent"),
            );
        }
    }
    candidates.push(PathBuf::from("/usr/local/lib/cella/cella-agent"));
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow::anyhow!(
            "cannot find the static cella-agent binary; build it with scripts/build or pass --agent"
        )
    })
}

async fn build_template(templates: &Arc<TemplateStore>, name: &str) -> anyhow::Result<()> {
    let spec = TemplateSpec::builtin(name)
        .ok_or_else(|| anyhow::anyhow!("unknown template {name:?} in --build"))?;
    let store = templates.clone();
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        store
            .build(&spec, &mut |p| eprintln!("{p}"), false)
            .with_context(|| format!("building template {name}"))
    })
    .await
    .context("template build task")??;
    Ok(())
}

/// SIGTERM and SIGINT, registered at creation (so none is lost before `wait` is polled).
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    async fn wait(mut self) {
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        if self.term.is_none() && self.int.is_none() {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
        tokio::select! {
            _ = next(&mut self.term) => {}
            _ = next(&mut self.int) => {}
        }
    }
}
