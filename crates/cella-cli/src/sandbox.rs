//! Sandbox commands that talk to a running server: `run`, `create`, `exec`, `ls`, `info`,
//! `kill`, `timeout`, `pause`, `resume`, `network`, `audit`, `logs`.
//!
//! `run` owns its sandbox: whatever happens (command failure, a broken pipe, Ctrl-C, SIGTERM)
//! the sandbox is destroyed before the CLI exits, so scripts never leak sandboxes.

use std::collections::BTreeMap;
use std::pin::pin;

use anyhow::{Context, bail};
use cella_api::{AuditEntry, NetworkConfig, NetworkUpdate, NewSandbox, SandboxDetail};
use cella_client::{Client, ExecEvent, ExecOptions, ExitStatus, ProcessStream};
use cella_proto::envd::process::signal_name;
use tokio::io::AsyncWriteExt;

use crate::args::{command_line, parse_key_value, parse_since};
use crate::output::{print_json, print_table, sanitize, short_time, write_error};

/// Exit code after an interruption (128 + SIGINT), as shells report it.
pub const EXIT_INTERRUPTED: u8 = 130;

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerOpts {
    /// Server URL.
    #[arg(long, env = "CELLA_URL", default_value = "http://127.0.0.1:3000")]
    pub url: String,
    /// API key (`e2b_...`).
    #[arg(long, env = "CELLA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl ServerOpts {
    /// A client for the server; fails early and clearly without a key.
    pub fn client(&self) -> anyhow::Result<Client> {
        let Some(key) = self.api_key.clone().filter(|k| !k.is_empty()) else {
            bail!(
                "no API key: pass --api-key or set CELLA_API_KEY (create one with `cella keys create`)"
            );
        };
        Ok(Client::new(&self.url, Some(key))?)
    }
}

/// `cella run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Template to start from.
    #[arg(long, short = 't', default_value = "base")]
    template: String,
    /// Sandbox lifetime in seconds (the sandbox is destroyed when the command ends anyway).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_key_value)]
    env: Vec<(String, String)>,
    /// User to run the command as.
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Working directory.
    #[arg(long, short = 'w')]
    cwd: Option<String>,
    /// Command to run; one argument is a shell line (`'ls | wc -l'`), several are a program
    /// and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    cmd: Vec<String>,
}

/// `cella create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Template to start from.
    #[arg(long, short = 't', default_value = "base")]
    template: String,
    /// Sandbox lifetime in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Metadata entry (repeatable).
    #[arg(long, short = 'm', value_name = "K=V", value_parser = parse_key_value)]
    metadata: Vec<(String, String)>,
    /// Environment variable for every process in the sandbox (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_key_value)]
    env: Vec<(String, String)>,
    #[command(flatten)]
    egress: EgressArgs,
    /// A sandbox port whose server speaks HTTPS; the proxy reaches it over TLS (repeatable).
    #[arg(long = "https-port", value_name = "PORT")]
    https_ports: Vec<u16>,
    /// Print the full response as JSON instead of the ID.
    #[arg(long)]
    json: bool,
}

/// Egress rules, as E2B's `allowOut`/`denyOut`/`allow_internet_access`, `dnsServers`,
/// `egressProxy` and `rules`. They take effect only on a server started with
/// `--egress allowed`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EgressArgs {
    /// Allow outbound traffic to a CIDR, an IPv4 address or a domain (`*.example.com` too);
    /// allow wins over deny (repeatable).
    #[arg(long = "allow-out", value_name = "DEST")]
    allow_out: Vec<String>,
    /// Deny outbound traffic to a CIDR or an IPv4 address (repeatable).
    #[arg(long = "deny-out", value_name = "CIDR")]
    deny_out: Vec<String>,
    /// Deny the public internet (`0.0.0.0/0`) except what `--allow-out` allows.
    #[arg(long)]
    no_internet: bool,
    /// A DNS server the sandbox may talk to when `--allow-out` names a domain (repeatable;
    /// default 8.8.8.8).
    #[arg(long = "dns-server", value_name = "IP")]
    dns_servers: Vec<String>,
    /// Tunnel outbound TCP through this SOCKS5 proxy: `host:port` or `user:password@host:port`.
    #[arg(long, value_name = "PROXY")]
    egress_proxy: Option<String>,
    /// Set a header on the sandbox's HTTP/HTTPS requests to a host, outside the sandbox:
    /// `HOST:NAME=VALUE` (repeatable; the value shows in the process list, see
    /// `--header-env`).
    #[arg(long = "header", value_name = "HOST:NAME=VALUE", value_parser = parse_header_rule)]
    headers: Vec<(String, String, String)>,
    /// Like `--header`, the value read from this CLI's environment variable:
    /// `HOST:NAME=VAR` (repeatable).
    #[arg(long = "header-env", value_name = "HOST:NAME=VAR", value_parser = parse_header_rule)]
    header_envs: Vec<(String, String, String)>,
}

/// `HOST:NAME=VALUE` of `--header` / `--header-env`.
fn parse_header_rule(s: &str) -> Result<(String, String, String), String> {
    let (host, rest) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected HOST:NAME=VALUE"))?;
    let (name, value) = rest
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected HOST:NAME=VALUE"))?;
    if host.is_empty() || name.is_empty() {
        return Err(format!("{s:?}: expected HOST:NAME=VALUE"));
    }
    Ok((host.to_string(), name.to_string(), value.to_string()))
}

impl EgressArgs {
    fn is_empty(&self) -> bool {
        self.allow_out.is_empty()
            && self.deny_out.is_empty()
            && !self.no_internet
            && self.dns_servers.is_empty()
            && self.egress_proxy.is_none()
            && self.headers.is_empty()
            && self.header_envs.is_empty()
    }

    /// `network.rules` from `--header` and `--header-env` (one rule per host).
    fn rules(&self) -> anyhow::Result<Option<cella_api::NetworkRules>> {
        let mut by_host: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (host, name, value) in &self.headers {
            by_host
                .entry(host.clone())
                .or_default()
                .insert(name.clone(), value.clone());
        }
        for (host, name, var) in &self.header_envs {
            let value = std::env::var(var)
                .with_context(|| format!("--header-env {host}:{name}={var}: ${var} is not set"))?;
            by_host
                .entry(host.clone())
                .or_default()
                .insert(name.clone(), value);
        }
        Ok((!by_host.is_empty()).then(|| {
            by_host
                .into_iter()
                .map(|(host, headers)| {
                    let rule = cella_api::NetworkRule {
                        transform: Some(cella_api::NetworkTransform {
                            headers: Some(headers),
                        }),
                    };
                    (host, vec![rule])
                })
                .collect()
        }))
    }

    /// `--egress-proxy` as E2B's `egressProxy`.
    fn proxy(&self) -> Option<cella_api::EgressProxyConfig> {
        let p = self.egress_proxy.as_ref()?;
        let (creds, address) = match p.rsplit_once('@') {
            Some((c, a)) => (Some(c), a),
            None => (None, p.as_str()),
        };
        let (username, password) = match creds.map(|c| c.split_once(':').unwrap_or((c, ""))) {
            Some((u, pw)) => (
                Some(u.to_string()),
                (!pw.is_empty()).then(|| pw.to_string()),
            ),
            None => (None, None),
        };
        Some(cella_api::EgressProxyConfig {
            address: address.to_string(),
            username,
            password,
            tls: None,
        })
    }

    /// `network` and `allow_internet_access` of a create request (both absent when no flag
    /// was given, so the server's defaults apply).
    fn create_fields(&self) -> anyhow::Result<(Option<NetworkConfig>, Option<bool>)> {
        let rules = self.rules()?;
        let proxy = self.proxy();
        let any = !self.allow_out.is_empty()
            || !self.deny_out.is_empty()
            || !self.dns_servers.is_empty()
            || proxy.is_some()
            || rules.is_some();
        let network = any.then(|| NetworkConfig {
            allow_out: non_empty(&self.allow_out),
            deny_out: non_empty(&self.deny_out),
            dns_servers: non_empty(&self.dns_servers),
            egress_proxy: proxy,
            rules,
            ..NetworkConfig::default()
        });
        Ok((network, self.no_internet.then_some(false)))
    }

    /// The `PUT /sandboxes/{id}/network` body: the rules given, everything else cleared.
    fn update(&self) -> anyhow::Result<NetworkUpdate> {
        Ok(NetworkUpdate {
            allow_out: non_empty(&self.allow_out),
            deny_out: non_empty(&self.deny_out),
            allow_internet_access: self.no_internet.then_some(false),
            dns_servers: non_empty(&self.dns_servers),
            egress_proxy: self.proxy(),
            rules: self.rules()?,
        })
    }
}

fn non_empty(v: &[String]) -> Option<Vec<String>> {
    (!v.is_empty()).then(|| v.to_vec())
}

/// `cella exec`.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Sandbox ID.
    id: String,
    /// User to run the command as.
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Working directory.
    #[arg(long, short = 'w')]
    cwd: Option<String>,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_key_value)]
    env: Vec<(String, String)>,
    /// Command to run (see `cella run`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    cmd: Vec<String>,
}

/// `cella ls`.
#[derive(Debug, clap::Args)]
pub struct LsArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `cella info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Sandbox ID.
    id: String,
    /// Print JSON (includes the access token).
    #[arg(long)]
    json: bool,
}

/// `cella kill`.
#[derive(Debug, clap::Args)]
pub struct KillArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Sandbox IDs.
    #[arg(required = true)]
    ids: Vec<String>,
}

/// `cella timeout`.
#[derive(Debug, clap::Args)]
pub struct TimeoutArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Sandbox ID.
    id: String,
    /// New lifetime in seconds from now.
    secs: u64,
}

/// `cella pause`.
#[derive(Debug, clap::Args)]
pub struct PauseArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Sandbox ID.
    id: String,
}

/// `cella resume`.
#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Sandbox ID.
    id: String,
    /// Lifetime in seconds from now (default: the server's, 300 s).
    #[arg(long)]
    timeout: Option<u64>,
}

/// `cella network`.
#[derive(Debug, clap::Args)]
pub struct NetworkArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Sandbox ID.
    id: String,
    #[command(flatten)]
    egress: EgressArgs,
    /// Remove every rule (back to the server's default egress).
    #[arg(long, conflicts_with_all = ["allow_out", "deny_out", "no_internet", "dns_servers",
        "egress_proxy", "headers", "header_envs"])]
    clear: bool,
}

/// `cella audit`.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Only entries about this sandbox.
    #[arg(long)]
    sandbox: Option<String>,
    /// Only entries since: a duration ago (10m, 2h), an RFC 3339 time, or Unix ms.
    #[arg(long)]
    since: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `cella logs`.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Sandbox ID.
    id: String,
    /// Only entries since (see `cella audit`).
    #[arg(long)]
    since: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Termination requests: SIGINT, SIGTERM, SIGHUP. Once created, these signals no longer kill
/// the CLI; the caller decides what to clean up.
pub struct Signals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Starts catching the signals.
    pub fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
        }
    }

    /// Resolves when one of the signals arrives.
    pub async fn recv(&mut self) {
        async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = one(&mut self.int) => {}
            () = one(&mut self.term) => {}
            () = one(&mut self.hup) => {}
        }
    }
}

/// The shell exit code for a process end: the exit code, or 128 + signal number.
pub fn exit_code_of(st: &ExitStatus) -> u8 {
    if let Ok(code) = u8::try_from(st.exit_code)
        && (st.exited || code != 0 || st.status.is_empty() || st.status.starts_with("exit"))
    {
        return code;
    }
    if let Some(name) = st.status.strip_prefix("signal: ") {
        let num = (1..=64).find(|&n| signal_name(n) == name);
        if let Some(n) = num.and_then(|n| u8::try_from(128 + n).ok()) {
            return n;
        }
    }
    1
}

/// Copies a process's output to our stdout/stderr as it arrives; returns its end.
async fn pump(stream: &mut ProcessStream) -> anyhow::Result<ExitStatus> {
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    while let Some(ev) = stream.next().await {
        match ev? {
            ExecEvent::Stdout(b) | ExecEvent::Pty(b) => {
                let w = async {
                    stdout.write_all(&b).await?;
                    stdout.flush().await
                };
                w.await.map_err(|e| write_error(e, "writing stdout"))?;
            }
            ExecEvent::Stderr(b) => {
                let w = async {
                    stderr.write_all(&b).await?;
                    stderr.flush().await
                };
                w.await.map_err(|e| write_error(e, "writing stderr"))?;
            }
            ExecEvent::Started { .. } => {}
            ExecEvent::Exited(st) => return Ok(st),
        }
    }
    bail!("the command's output stream ended without an exit status")
}

fn warn_process_error(st: &ExitStatus) {
    if let Some(err) = st.error.as_deref().filter(|e| !e.is_empty()) {
        eprintln!("cella: {}", sanitize(err));
    }
}

/// `cella run`: create, run, stream, destroy.
pub async fn run(args: RunArgs) -> anyhow::Result<u8> {
    let client = args.server.client()?;
    let req = NewSandbox {
        template_id: args.template.clone(),
        timeout: Some(args.timeout),
        ..Default::default()
    };
    let mut signals = Signals::new();
    let mut create = pin!(client.create_sandbox(&req));
    let sandbox = tokio::select! {
        r = &mut create => r.context("creating the sandbox")?,
        () = signals.recv() => {
            // The server is already building it: wait for it (a second signal gives up) and
            // destroy it, so nothing is left behind.
            eprintln!("cella: interrupted; removing the sandbox being created");
            tokio::select! {
                r = &mut create => if let Ok(s) = r { destroy(&client, &s.sandbox_id).await },
                () = signals.recv() => {}
            }
            return Ok(EXIT_INTERRUPTED);
        }
    };
    let id = sandbox.sandbox_id.clone();
    let outcome = match sandbox.envd_access_token.as_deref() {
        None => Err(anyhow::anyhow!(
            "the server did not return an access token for sandbox {id}"
        )),
        Some(token) => {
            let opts = ExecOptions {
                envs: args.env.into_iter().collect(),
                cwd: args.cwd,
                user: args.user,
                stdin: false,
            };
            let line = command_line(&args.cmd);
            tokio::select! {
                r = async {
                    let mut stream = client.exec(&id, token, &line, &opts).await?;
                    pump(&mut stream).await
                } => r.map(Some),
                () = signals.recv() => Ok(None),
            }
        }
    };
    destroy(&client, &id).await;
    match outcome? {
        Some(st) => {
            warn_process_error(&st);
            Ok(exit_code_of(&st))
        }
        None => Ok(EXIT_INTERRUPTED),
    }
}

async fn destroy(client: &Client, id: &str) {
    match client.kill_sandbox(id).await {
        Ok(()) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => eprintln!(
            "cella: warning: could not destroy sandbox {id} ({}); it ends at its timeout",
            crate::one_line(&anyhow::Error::from(e))
        ),
    }
}

/// `cella create`.
pub async fn create(args: CreateArgs) -> anyhow::Result<u8> {
    let client = args.server.client()?;
    let metadata: BTreeMap<_, _> = args.metadata.into_iter().collect();
    let env: BTreeMap<_, _> = args.env.into_iter().collect();
    let (mut network, allow_internet_access) = args.egress.create_fields()?;
    if !args.https_ports.is_empty() {
        network
            .get_or_insert_with(NetworkConfig::default)
            .https_ports = Some(args.https_ports.iter().map(|p| i64::from(*p)).collect());
    }
    let req = NewSandbox {
        template_id: args.template,
        timeout: Some(args.timeout),
        metadata: (!metadata.is_empty()).then_some(metadata),
        env_vars: (!env.is_empty()).then_some(env),
        network,
        allow_internet_access,
        ..Default::default()
    };
    let sandbox = client.create_sandbox(&req).await?;
    if args.json {
        print_json(&sandbox)?;
    } else {
        println!("{}", sandbox.sandbox_id);
    }
    Ok(0)
}

/// The access token of sandbox `id` (from `GET /sandboxes/{id}`).
pub async fn access_token(client: &Client, id: &str) -> anyhow::Result<String> {
    let detail = client.get_sandbox(id).await?;
    detail
        .envd_access_token
        .with_context(|| format!("the server did not return an access token for sandbox {id}"))
}

/// `cella exec`.
pub async fn exec(args: ExecArgs) -> anyhow::Result<u8> {
    let client = args.server.client()?;
    let token = access_token(&client, &args.id).await?;
    let opts = ExecOptions {
        envs: args.env.into_iter().collect(),
        cwd: args.cwd,
        user: args.user,
        stdin: false,
    };
    let mut signals = Signals::new();
    let mut stream = client
        .exec(&args.id, &token, &command_line(&args.cmd), &opts)
        .await?;
    let pid = tokio::select! {
        r = stream.wait_started() => r?,
        () = signals.recv() => return Ok(EXIT_INTERRUPTED),
    };
    tokio::select! {
        r = pump(&mut stream) => {
            let st = r?;
            warn_process_error(&st);
            Ok(exit_code_of(&st))
        }
        () = signals.recv() => {
            if let Err(e) = client.kill_process(&args.id, &token, pid).await {
                eprintln!("cella: warning: could not kill process {pid}: {}", crate::one_line(&e.into()));
            }
            Ok(EXIT_INTERRUPTED)
        }
    }
}

/// `cella ls`.
pub async fn ls(args: LsArgs) -> anyhow::Result<u8> {
    let client = args.server.client()?;
    let mut list = client.list_sandboxes().await?;
    list.sort_by(|a, b| {
        a.started_at
            .cmp(&b.started_at)
            .then(a.sandbox_id.cmp(&b.sandbox_id))
    });
    if args.json {
        print_json(&list)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.sandbox_id.clone(),
                sanitize(s.alias.as_deref().unwrap_or(&s.template_id)),
                s.isolation.as_str().to_owned(),
                match s.state {
                    cella_api::SandboxState::Running => "running",
                    cella_api::SandboxState::Paused => "paused",
                }
                .to_owned(),
                short_time(&s.started_at),
                short_time(&s.end_at),
                s.cpu_count.to_string(),
                format!("{}M", s.memory_mb),
                format_metadata(&s.metadata),
            ]
        })
        .collect();
    print_table(
        &[
            "SANDBOX ID",
            "TEMPLATE",
            "ISOLATION",
            "STATE",
            "STARTED (UTC)",
            "ENDS (UTC)",
            "CPU",
            "MEM",
            "METADATA",
        ],
        &rows,
    )?;
    Ok(0)
}

fn format_metadata(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .map(|(k, v)| format!("{}={}", sanitize(k), sanitize(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// `cella info`.
pub async fn info(args: InfoArgs) -> anyhow::Result<u8> {
    let client = args.server.client()?;
    let d = client.get_sandbox(&args.id).await?;
    if args.json {
        print_json(&d)?;
        return Ok(0);
    }
    let state = match d.state {
        cella_api::SandboxState::Running => "running",
        cella_api::SandboxState::Paused => "paused",
    };
    let rows = [
        ("Sandbox ID", d.sandbox_id.clone()),
        ("Template", sanitize(&d.template_id)),
        ("Alias", sanitize(d.alias.as_deref().unwrap_or("-"))),
        ("State", state.to_owned()),
        ("Isolation", d.isolation.as_str().to_owned()),
        ("Started", d.started_at.clone()),
        ("Ends", d.end_at.clone()),
        ("CPUs", d.cpu_count.to_string()),
        ("Memory", format!("{} MiB", d.memory_mb)),
        ("Disk", format!("{} MiB", d.disk_size_mb)),
        ("envd version", sanitize(&d.envd_version)),
        ("Metadata", format_metadata(&d.metadata)),
        ("Internet", internet_text(&d).to_owned()),
        ("Allow out", egress_list(&d, |n| &n.allow_out)),
        ("Deny out", egress_list(&d, |n| &n.deny_out)),
    ];
    for (k, v) in rows {
        println!("{:<13} {}", format!("{k}:"), sanitize(&v));
    }
    Ok(0)
}

fn internet_text(d: &SandboxDetail) -> &'static str {
    match d.allow_internet_access {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    }
}

fn egress_list(
    d: &SandboxDetail,
    field: impl Fn(&NetworkConfig) -> &Option<Vec<String>>,
) -> String {
    match d.network.as_ref().and_then(|n| field(n).as_ref()) {
        Some(v) if !v.is_empty() => v.join(","),
        _ => "-".to_owned(),
    }
}

/// `cella kill`: kills each sandbox; failures are reported and make the exit code 1.
pub async fn kill(args: KillArgs) -> anyhow::Result<u8> {
    let client = args.server.client()?;
    let mut failed = 0usize;
    for id in &args.ids {
        match client.kill_sandbox(id).await {
            Ok(()) => println!("{id}"),
            Err(e) => {
                failed += 1;
                eprintln!("cella: {}: {}", sanitize(id), crate::one_line(&e.into()));
            }
        }
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

/// `cella timeout`.
pub async fn timeout(args: TimeoutArgs) -> anyhow::Result<u8> {
    let client = args.server.client()?;
    client.set_timeout(&args.id, args.secs).await?;
    Ok(0)
}

/// `cella pause`: freezes the sandbox and prints its ID.
pub async fn pause(args: PauseArgs) -> anyhow::Result<u8> {
    let client = args.server.client()?;
    client.pause_sandbox(&args.id).await?;
    println!("{}", args.id);
    Ok(0)
}

/// `cella resume`: resumes a paused sandbox (through connect) and prints its ID. A running
/// sandbox is not an error; stderr says so.
pub async fn resume(args: ResumeArgs) -> anyhow::Result<u8> {
    let client = args.server.client()?;
    let r = client.resume_sandbox(&args.id, args.timeout).await?;
    if !r.resumed {
        eprintln!("cella: sandbox {} was not paused", args.id);
    }
    println!("{}", r.sandbox.sandbox_id);
    Ok(0)
}

/// `cella network`: replaces the egress rules, or shows them when no rule flag is given.
pub async fn network(args: NetworkArgs) -> anyhow::Result<u8> {
    let client = args.server.client()?;
    if args.egress.is_empty() && !args.clear {
        let d = client.get_sandbox(&args.id).await?;
        for (k, v) in [
            ("Internet", internet_text(&d).to_owned()),
            ("Allow out", egress_list(&d, |n| &n.allow_out)),
            ("Deny out", egress_list(&d, |n| &n.deny_out)),
        ] {
            println!("{:<10} {}", format!("{k}:"), sanitize(&v));
        }
        return Ok(0);
    }
    client
        .update_network(&args.id, &args.egress.update()?)
        .await?;
    Ok(0)
}

/// `cella audit`.
pub async fn audit(args: AuditArgs) -> anyhow::Result<u8> {
    let client = args.server.client()?;
    show_audit(
        &client,
        args.sandbox.as_deref(),
        args.since.as_deref(),
        args.json,
    )
    .await
}

/// `cella logs ID` (the audit of one sandbox).
pub async fn logs(args: LogsArgs) -> anyhow::Result<u8> {
    let client = args.server.client()?;
    show_audit(&client, Some(&args.id), args.since.as_deref(), args.json).await
}

async fn show_audit(
    client: &Client,
    sandbox: Option<&str>,
    since: Option<&str>,
    json: bool,
) -> anyhow::Result<u8> {
    let since_ms = since
        .map(|s| parse_since(s, cella_core::store::now_ms()))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let since_text = since_ms.map(|ms| ms.to_string());
    let entries = client.audit(sandbox, since_text.as_deref()).await?;
    if json {
        print_json(&entries)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = entries.iter().map(audit_row).collect();
    print_table(&["TIME (UTC)", "ACTOR", "SANDBOX", "KIND", "DETAIL"], &rows)?;
    Ok(0)
}

fn audit_row(e: &AuditEntry) -> Vec<String> {
    let detail = match &e.detail {
        serde_json::Value::Object(m) if m.is_empty() => String::new(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    // Keep one entry on one line however long the detail is.
    let detail: String = sanitize(&detail).chars().take(200).collect();
    vec![
        e.time
            .replacen('T', " ", 1)
            .trim_end_matches('Z')
            .to_owned(),
        sanitize(&e.actor),
        sanitize(e.sandbox_id.as_deref().unwrap_or("-")),
        sanitize(&e.kind),
        detail,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(exit_code: i32, exited: bool, status: &str) -> ExitStatus {
        ExitStatus {
            exit_code,
            exited,
            status: status.into(),
            error: None,
        }
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code_of(&st(0, true, "exit status 0")), 0);
        assert_eq!(exit_code_of(&st(3, true, "exit status 3")), 3);
        assert_eq!(exit_code_of(&st(-1, false, "signal: killed")), 137);
        assert_eq!(exit_code_of(&st(0, false, "signal: terminated")), 143);
        assert_eq!(exit_code_of(&st(-1, false, "signal: signal 40")), 168);
        assert_eq!(exit_code_of(&st(-1, false, "weird")), 1);
        assert_eq!(exit_code_of(&st(300, true, "exit status 300")), 1);
    }

    fn egress(allow: &[&str], deny: &[&str], no_internet: bool) -> EgressArgs {
        EgressArgs {
            allow_out: allow.iter().map(|s| (*s).to_owned()).collect(),
            deny_out: deny.iter().map(|s| (*s).to_owned()).collect(),
            no_internet,
            ..EgressArgs::default()
        }
    }

    #[test]
    fn dns_proxy_and_header_flags_map_to_e2b_fields() {
        let e = EgressArgs {
            dns_servers: vec!["1.1.1.1".into()],
            egress_proxy: Some("agent:pw@proxy.example:1080".into()),
            headers: vec![
                parse_header_rule("api.example.com:Authorization=Bearer a=b").expect("parse"),
            ],
            ..EgressArgs::default()
        };
        assert!(!e.is_empty());
        let (network, _) = e.create_fields().expect("fields");
        assert_eq!(
            serde_json::to_value(&network).expect("json"),
            serde_json::json!({"dnsServers": ["1.1.1.1"],
                "egressProxy": {"address": "proxy.example:1080", "username": "agent", "password": "pw"},
                "rules": {"api.example.com": [{"transform": {"headers": {"Authorization": "Bearer a=b"}}}]}})
        );
        let u = serde_json::to_value(e.update().expect("update")).expect("json");
        assert_eq!(u["egressProxy"]["address"], "proxy.example:1080");
        assert!(parse_header_rule("no-colon").is_err());
        assert!(parse_header_rule("host:no-equals").is_err());
        let missing = EgressArgs {
            header_envs: vec![("h".into(), "X".into(), "CELLA_TEST_SURELY_UNSET_VAR".into())],
            ..EgressArgs::default()
        };
        assert!(missing.create_fields().is_err());
    }

    #[test]
    fn egress_flags_map_to_e2b_fields() {
        // No flag: nothing sent, the server's defaults apply.
        let none = egress(&[], &[], false);
        assert!(none.is_empty());
        assert_eq!(none.create_fields().expect("fields"), (None, None));
        assert_eq!(none.update().expect("update"), NetworkUpdate::default());

        let e = egress(&["1.1.1.1", "*.pypi.org"], &["10.0.0.0/8"], true);
        assert!(!e.is_empty());
        let (network, internet) = e.create_fields().expect("fields");
        assert_eq!(
            serde_json::to_value(&network).expect("json"),
            serde_json::json!({"allowOut": ["1.1.1.1", "*.pypi.org"], "denyOut": ["10.0.0.0/8"]})
        );
        assert_eq!(internet, Some(false));
        assert_eq!(
            serde_json::to_value(e.update().expect("update")).expect("json"),
            serde_json::json!({"allowOut": ["1.1.1.1", "*.pypi.org"], "denyOut": ["10.0.0.0/8"],
                "allow_internet_access": false})
        );

        // Only --no-internet: no `network` object, just the flag.
        let e = egress(&[], &[], true);
        assert!(!e.is_empty());
        assert_eq!(e.create_fields().expect("fields"), (None, Some(false)));
        let (network, _) = egress(&[], &["0.0.0.0/0"], false)
            .create_fields()
            .expect("fields");
        assert_eq!(
            network,
            Some(NetworkConfig {
                deny_out: Some(vec!["0.0.0.0/0".into()]),
                ..NetworkConfig::default()
            })
        );
    }

    #[test]
    fn audit_rows_are_one_line() {
        let e = AuditEntry {
            id: 1,
            time: "2024-05-06T07:08:09.010Z".into(),
            actor: "agent".into(),
            sandbox_id: Some("ia".into()),
            kind: "process.start".into(),
            detail: serde_json::json!({"cmd": "echo\nhi\u{1b}[2J"}),
        };
        let row = audit_row(&e);
        assert_eq!(row[0], "2024-05-06 07:08:09.010");
        assert!(
            !row[4].contains('\n') && !row[4].contains('\u{1b}'),
            "{}",
            row[4]
        );
    }
}
