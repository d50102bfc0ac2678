//! Host-side sandbox networking for `cella serve --egress allowed`.
//!
//! A sandbox that may reach something gets a veth pair: `eth0` inside its network namespace
//! with the second address of a /30 from the server's pool, and the host end (named
//! `cn<instance><slot>`) in the host's root namespace with the first, which is the sandbox's
//! default gateway and DNS resolver. The host masquerades the pool out of whatever interface
//! routes the destination (or only `--egress-interface`), and one nftables table per server
//! instance decides what may pass (see [`nft`]). Domains in `allowOut` work through the DNS
//! forwarder ([`dns`], UDP and TCP): it answers only allowed names and adds their addresses
//! to the sandbox's set.
//!
//! Why the root namespace and not a router namespace: the host is already the sandbox's
//! upstream (it runs the proxy and DNS forwarder), the nftables input hook covers "the host
//! itself" for every host address at once, and there is one NAT instead of two. The cost is
//! that the rules live in the host's ruleset, so they are in one table of their own, named
//! per instance, created at start and deleted at start and shutdown.
//!
//! Interfaces, addresses and rules are set with `ip`, `nsenter` and `nft` (iproute2,
//! util-linux, nftables): each change is one `nft -f` transaction, and everything is undone
//! on release, on a failed attach, and at the next start after a crash.

pub mod ca;
pub mod dns;
pub mod identity;
pub mod intercept;
pub mod nflog;
pub mod nft;
pub mod pool;
pub mod socks;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use cella_core::egress::{Egress, EgressError, EgressPolicy, EgressProxy, Ipv4Cidr};
use cella_core::store::Store;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

use crate::nft::{Attachment, Ruleset};
use crate::pool::{Pool, Slot};

/// Default pool: a /16 rarely used by real networks.
pub const DEFAULT_POOL: &str = "10.245.0.0/16";

/// Settings of the host-side network.
#[derive(Clone)]
pub struct NetConfig {
    /// The server instance (`cella_jail::instance_name`): names the table and interfaces.
    pub instance: String,
    /// Address pool (/30 per sandbox).
    pub pool: Ipv4Cidr,
    /// Upstream DNS resolvers the forwarder asks.
    pub upstreams: Vec<SocketAddr>,
    /// Only interface egress may leave by (`None`: any the host routes to).
    pub uplink: Option<String>,
    /// `/proc` (routes, `ip_forward`).
    pub proc_root: PathBuf,
    /// `/sys` (interfaces left by a previous run).
    pub sys_root: PathBuf,
    /// Audit log (DNS queries).
    pub store: Store,
    /// Whether an `egressProxy` may resolve into the ranges sandboxes may never reach
    /// (`--egress-proxy-private`: a proxy on the host's own network).
    pub proxy_allow_private: bool,
    /// Where the interception CA of `network.rules` is kept (created on first start).
    pub ca_dir: PathBuf,
    /// Extra PEM roots trusted for the servers intercepted requests go to.
    pub upstream_ca_pem: Option<Vec<u8>>,
    /// Where the workload identity key of `iam` tokens is kept (created on first start).
    pub identity_dir: PathBuf,
    /// `iss` of the tokens (where `/.well-known/` is served).
    pub identity_issuer: String,
    /// SPIFFE trust domain of the tokens' `sub`.
    pub identity_trust_domain: String,
}

/// Errors starting the host-side network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// A tool or OS call failed.
    #[error("{0}")]
    Os(String),
}

/// What start-up removed of a previous run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    /// Host interfaces deleted.
    pub links: usize,
    /// Whether a previous table existed.
    pub table: bool,
}

struct Attached {
    att: Attachment,
    policy: Arc<RwLock<EgressPolicy>>,
    dns: JoinHandle<()>,
}

struct Entry {
    slot: Slot,
    attached: Option<Attached>,
}

/// The host-side network of one server instance.
pub struct HostNet {
    rules: Ruleset,
    cfg: NetConfig,
    state: Mutex<State>,
    slots: nflog::Slots,
    conn_audit: Result<nflog::Reader, String>,
    /// `rules` interception (`None`: sandboxes cannot have rules on this server).
    intercept: Option<Arc<socks::Interception>>,
    /// Mints the `iam` tokens rules name.
    identity: Arc<socks::Identity>,
}

struct State {
    pool: Pool,
    sandboxes: HashMap<String, Entry>,
}

/// Interface name prefix of an instance (`cn` + 6 hex digits).
pub fn link_prefix(instance: &str) -> String {
    let hex: String = instance
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(6)
        .collect();
    format!("cn{hex}")
}

/// `nameserver` lines of a resolv.conf, as port-53 socket addresses.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == "nameserver").then_some(())?;
            let ip: std::net::IpAddr = f.next()?.split('%').next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

impl HostNet {
    /// Remove a previous run's table and interfaces, check the pool against the host's
    /// routes, create this run's table and enable IPv4 forwarding.
    pub async fn start(cfg: NetConfig) -> Result<(Arc<HostNet>, Reaped), NetError> {
        if cfg.upstreams.is_empty() {
            return Err(NetError::Config(
                "no upstream DNS resolver (none in /etc/resolv.conf; pass --dns-upstream)".into(),
            ));
        }
        if let Some(up) = &cfg.uplink
            && !nft::safe_ifname(up)
        {
            return Err(NetError::Config(format!("bad --egress-interface {up:?}")));
        }
        let prefix = link_prefix(&cfg.instance);
        let slots: nflog::Slots = Arc::default();
        let group = nflog::group_of(&cfg.instance);
        let conn_audit = nflog::start(group, slots.clone(), cfg.store.clone())
            .map_err(|e| format!("NFLOG group {group}: {e}"));
        if let Err(e) = &conn_audit {
            tracing::warn!(error = %e, "connection-level egress audit is off");
        }
        let rules = Ruleset {
            table: format!("cella_{}", cfg.instance),
            prefix: prefix.clone(),
            pool: cfg.pool,
            uplink: cfg.uplink.clone(),
            log_group: conn_audit.is_ok().then_some(group),
        };
        let pool = Pool::new(cfg.pool).map_err(NetError::Config)?;
        // A CA that exists but cannot be read is an error (never silently replaced: sandboxes
        // paused to disk trust it); a missing system trust store only turns rules off.
        let ca = crate::ca::EgressCa::load_or_create(&cfg.ca_dir)
            .map_err(|e| NetError::Config(format!("the egress interception CA: {e}")))?;
        let intercept = match crate::intercept::upstream_tls_config(cfg.upstream_ca_pem.as_deref())
        {
            Ok(upstream) => Some(Arc::new(socks::Interception {
                ca: Arc::new(ca),
                upstream,
            })),
            Err(e) if cfg.upstream_ca_pem.is_some() => {
                return Err(NetError::Config(format!("--egress-upstream-ca: {e}")));
            }
            Err(e) => {
                tracing::warn!(error = %e, "network.rules are off: no trust store for upstream servers");
                None
            }
        };
        let key = crate::identity::IdentityKey::load_or_create(&cfg.identity_dir)
            .map_err(|e| NetError::Config(format!("the workload identity key: {e}")))?;
        let identity = Arc::new(socks::Identity {
            key,
            issuer: cfg.identity_issuer.clone(),
            trust_domain: cfg.identity_trust_domain.clone(),
        });
        let mut reaped = Reaped {
            table: run_nft("list table", &format!("list table inet {}\n", rules.table))
                .await
                .is_ok(),
            ..Reaped::default()
        };
        for name in own_links(&cfg.sys_root, &prefix) {
            if run("ip", &["link", "del", &name], None).await.is_ok() {
                reaped.links += 1;
            }
        }
        let routes = pool::host_routes(&cfg.proc_root)
            .map_err(|e| NetError::Os(format!("reading the host's routes: {e}")))?;
        let clash = pool::conflicts(&routes, cfg.pool, &prefix);
        if !clash.is_empty() {
            return Err(NetError::Config(format!(
                "the egress pool {} overlaps host routes ({}); pick another with --egress-pool",
                cfg.pool,
                clash.join(", ")
            )));
        }
        run_nft("creating the egress table", &rules.create())
            .await
            .map_err(NetError::Os)?;
        let fwd = cfg.proc_root.join("sys/net/ipv4/ip_forward");
        if std::fs::read_to_string(&fwd)
            .map(|s| s.trim() != "1")
            .unwrap_or(true)
        {
            std::fs::write(&fwd, "1")
                .map_err(|e| NetError::Os(format!("enabling {}: {e}", fwd.display())))?;
            tracing::info!("enabled net.ipv4.ip_forward for sandbox egress");
        }
        let net = Arc::new(HostNet {
            rules,
            cfg,
            state: Mutex::new(State {
                pool,
                sandboxes: HashMap::new(),
            }),
            slots,
            conn_audit,
            intercept,
            identity,
        });
        Ok((net, reaped))
    }

    /// Delete the table (call after every sandbox was released).
    pub async fn shutdown(&self) {
        if let Err(e) = run_nft("deleting the egress table", &self.rules.delete()).await {
            tracing::warn!(error = %e, "removing the egress table failed");
        }
    }

    /// Whether new connections are audited, or why not.
    pub fn connection_audit(&self) -> Result<(), String> {
        self.conn_audit.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    /// The nftables table name.
    pub fn table(&self) -> &str {
        &self.rules.table
    }

    /// The host interface name prefix.
    pub fn prefix(&self) -> &str {
        &self.rules.prefix
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, EgressError> {
        self.state
            .lock()
            .map_err(|_| EgressError::Setup("network state poisoned".into()))
    }

    fn ifname(&self, slot: &Slot) -> String {
        format!("{}{}", self.rules.prefix, slot.index)
    }

    async fn plumb(&self, att: &Attachment, netns: &Path) -> Result<(), String> {
        let inside = format!(
            "link add eth0 type veth peer name {host_if} netns {pid}\n\
             addr add {sbx}/30 dev eth0\n\
             link set eth0 up\n\
             route add default via {gw}\n",
            host_if = att.ifname,
            pid = std::process::id(),
            sbx = att.sandbox,
            gw = att.host,
        );
        let ns_arg = format!("--net={}", netns.display());
        run("nsenter", &[&ns_arg, "ip", "-b", "-"], Some(&inside)).await?;
        let outside = format!(
            "addr add {gw}/30 dev {host_if}\nlink set {host_if} up\n",
            gw = att.host,
            host_if = att.ifname
        );
        run("ip", &["-b", "-"], Some(&outside)).await
    }

    async fn undo(&self, att: &Attachment, rules: bool) {
        if rules && let Err(e) = run_nft("detaching", &self.rules.detach(att)).await {
            tracing::warn!(iface = %att.ifname, error = %e, "removing sandbox rules failed");
        }
        if link_exists(&self.cfg.sys_root, &att.ifname)
            && let Err(e) = run("ip", &["link", "del", &att.ifname], None).await
        {
            tracing::warn!(iface = %att.ifname, error = %e, "deleting the interface failed");
        }
    }
}

#[async_trait]
impl Egress for HostNet {
    fn reserve(&self, sandbox_id: &str) -> Result<Ipv4Addr, EgressError> {
        let mut st = self.lock()?;
        if let Some(e) = st.sandboxes.get(sandbox_id) {
            return Ok(e.slot.host);
        }
        let slot = st
            .pool
            .take(sandbox_id)
            .ok_or_else(|| EgressError::PoolExhausted(self.cfg.pool.to_string()))?;
        st.sandboxes.insert(
            sandbox_id.to_string(),
            Entry {
                slot,
                attached: None,
            },
        );
        Ok(slot.host)
    }

    async fn attach(
        &self,
        sandbox_id: &str,
        netns: &Path,
        policy: &EgressPolicy,
    ) -> Result<(), EgressError> {
        let slot = self
            .lock()?
            .sandboxes
            .get(sandbox_id)
            .map(|e| e.slot)
            .ok_or_else(|| EgressError::NotAttached(sandbox_id.to_string()))?;
        let att = Attachment {
            index: slot.index,
            ifname: self.ifname(&slot),
            host: slot.host,
            sandbox: slot.sandbox,
        };
        if let Ok(mut m) = self.slots.lock() {
            m.insert(att.index, sandbox_id.to_string());
        }
        if let Err(e) = self.plumb(&att, netns).await {
            self.undo(&att, false).await;
            return Err(EgressError::Setup(format!(
                "setting up {}: {e}",
                att.ifname
            )));
        }
        if let Err(e) = run_nft("attaching", &self.rules.attach(&att, policy)).await {
            self.undo(&att, false).await;
            return Err(EgressError::Setup(e));
        }
        let (socket, tcp) = match dns::bind(att.host).await {
            Ok(s) => s,
            Err(e) => {
                self.undo(&att, true).await;
                return Err(EgressError::Setup(format!(
                    "binding the resolver on {}:53: {e}",
                    att.host
                )));
            }
        };
        // Every attached sandbox has a tunnel listener; the firewall sends it connections
        // only while the policy names an `egressProxy` or `rules`.
        let tunnel_listener =
            match tokio::net::TcpListener::bind((att.host, socks::PROXY_PORT)).await {
                Ok(l) => l,
                Err(e) => {
                    self.undo(&att, true).await;
                    return Err(EgressError::Setup(format!(
                        "binding the egress tunnel on {}:{}: {e}",
                        att.host,
                        socks::PROXY_PORT
                    )));
                }
            };
        let shared = Arc::new(RwLock::new(policy.clone()));
        let rules = self.rules.clone();
        let index = att.index;
        let names: socks::Names = Arc::default();
        let learned_names = names.clone();
        let learn_policy = shared.clone();
        let learn: dns::Learn = Arc::new(move |name, addrs| {
            let rules = rules.clone();
            let ips: Vec<Ipv4Addr> = addrs.iter().map(|(ip, _)| *ip).collect();
            socks::remember(&learned_names, &name, &ips);
            let restricts = learn_policy.read().is_ok_and(|p| p.restricts_domains());
            Box::pin(async move {
                if !restricts {
                    return Ok(());
                }
                match rules.learn(index, &addrs) {
                    Some(script) => run_nft("learning addresses", &script).await,
                    None => Ok(()),
                }
            })
        });
        let fwd = Arc::new(dns::Forwarder {
            sandbox_id: sandbox_id.to_string(),
            sandbox_addr: att.sandbox,
            policy: shared.clone(),
            upstreams: self.cfg.upstreams.clone(),
            learn,
            store: self.cfg.store.clone(),
        });
        let tunnel = Arc::new(socks::Tunnel {
            sandbox_id: sandbox_id.to_string(),
            policy: shared.clone(),
            names,
            allow_private: self.cfg.proxy_allow_private,
            store: self.cfg.store.clone(),
            intercept: self.intercept.clone(),
            identity: self.identity.clone(),
            uplink: self.cfg.uplink.clone(),
        });
        let task = tokio::spawn(async move {
            tokio::join!(fwd.serve(socket, tcp), tunnel.serve(tunnel_listener));
        });
        let orphan = {
            let mut st = self.lock()?;
            match st.sandboxes.get_mut(sandbox_id) {
                Some(entry) => {
                    entry.attached = Some(Attached {
                        att: att.clone(),
                        policy: shared,
                        dns: task,
                    });
                    None
                }
                None => Some(task),
            }
        };
        if let Some(task) = orphan {
            // Released while attaching: undo.
            task.abort();
            self.undo(&att, true).await;
            return Err(EgressError::NotAttached(sandbox_id.to_string()));
        }
        Ok(())
    }

    async fn update(&self, sandbox_id: &str, policy: &EgressPolicy) -> Result<(), EgressError> {
        let (att, shared) = {
            let st = self.lock()?;
            let a = st
                .sandboxes
                .get(sandbox_id)
                .and_then(|e| e.attached.as_ref())
                .ok_or_else(|| EgressError::NotAttached(sandbox_id.to_string()))?;
            (a.att.clone(), a.policy.clone())
        };
        run_nft("updating rules", &self.rules.update(&att, policy))
            .await
            .map_err(EgressError::Setup)?;
        if let Ok(mut p) = shared.write() {
            *p = policy.clone();
        }
        Ok(())
    }

    fn identity_discovery(&self) -> Option<(String, serde_json::Value)> {
        Some((self.identity.issuer.clone(), self.identity.key.jwks()))
    }

    fn interception_ca(&self) -> Option<String> {
        self.intercept.as_ref().map(|i| i.ca.cert_pem().to_string())
    }

    async fn check_proxy(&self, proxy: &EgressProxy) -> Result<(), String> {
        socks::resolve(proxy, self.cfg.proxy_allow_private)
            .await
            .map(|_| ())
    }

    async fn release(&self, sandbox_id: &str) -> Result<(), EgressError> {
        let entry = {
            let mut st = self.lock()?;
            let entry = st.sandboxes.remove(sandbox_id);
            if let Some(e) = &entry
                && let Ok(mut m) = self.slots.lock()
            {
                m.remove(&e.slot.index);
            }
            entry
        };
        let Some(entry) = entry else {
            return Ok(());
        };
        if let Some(a) = entry.attached {
            // The slot is free for the next sandbox only once its resolver sockets are
            // closed (awaiting the aborted task drops them) and its interface is gone;
            // otherwise the next attach on this slot fails to bind `<host end>:53`.
            a.dns.abort();
            let _ = a.dns.await;
            self.undo(&a.att, true).await;
        }
        self.lock()?.pool.free(entry.slot.index);
        Ok(())
    }
}

fn own_links(sys_root: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(sys_root.join("class/net"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| {
                    n.strip_prefix(prefix).is_some_and(|rest| {
                        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

fn link_exists(sys_root: &Path, name: &str) -> bool {
    sys_root.join("class/net").join(name).exists()
}

async fn run_nft(what: &str, script: &str) -> Result<(), String> {
    run("nft", &["-f", "-"], Some(script))
        .await
        .map_err(|e| format!("{what}: {e}"))
}

/// Run a tool, feeding `stdin`; an error carries its stderr.
async fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("running {prog}: {e}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|e| format!("writing to {prog}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("waiting for {prog}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{prog} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_and_names() {
        let r = parse_resolv_conf(
            "# c\nnameserver 127.0.0.53\nsearch x\nnameserver fe80::1%eth0\nnameserver bad\n",
        );
        assert_eq!(
            r,
            vec![
                "127.0.0.53:53".parse().expect("addr"),
                "[fe80::1]:53".parse().expect("addr")
            ]
        );
        assert_eq!(link_prefix("i0123456789ab"), "cn012345");
        assert!(format!("{}16383", link_prefix("i0123456789ab")).len() <= 15);
    }

    #[test]
    fn own_links_match_only_this_prefix_and_digits() {
        let dir = tempfile::tempdir().expect("tmp");
        for n in [
            "cnabcdef0",
            "cnabcdef12",
            "cnabcdefx",
            "cnabcdef",
            "eth0",
            "cn999999",
        ] {
            std::fs::create_dir_all(dir.path().join("class/net").join(n)).expect("mkdir");
        }
        let mut got = own_links(dir.path(), "cnabcdef");
        got.sort();
        assert_eq!(got, vec!["cnabcdef0".to_string(), "cnabcdef12".to_string()]);
    }
}
