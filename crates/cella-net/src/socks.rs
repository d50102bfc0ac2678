//! `network.egressProxy`: a sandbox's outbound TCP, tunneled through a SOCKS5 proxy.
//!
//! Why on the host and not in the sandbox: the sandbox must neither see the proxy nor route
//! around it (E2B's contract), so nothing runs inside. The firewall first judges each new TCP
//! connection of a proxied sandbox with that sandbox's own verdict chain, then redirects an
//! allowed one to this module's listener on the sandbox's host end ([`PROXY_PORT`]; see
//! [`crate::nft`]). The listener identifies the sandbox (one per sandbox, like the DNS
//! forwarder), reads the original destination (`SO_ORIGINAL_DST`), and opens a SOCKS5 CONNECT
//! to it through the proxy the sandbox's policy names *now* (an update applies to new
//! connections). A destination learned from an allowed domain is sent as that name
//! (ATYP=domain, the proxy resolves it), everything else as its IPv4 address.
//!
//! Fails closed: when the proxy cannot be resolved or reached, does not speak SOCKS5, refuses
//! the credentials or the CONNECT, the sandbox's connection is reset, never sent directly.
//! The proxy's address is resolved again at every dial and pinned for that connection; an
//! address inside the ranges sandboxes may never reach (`nft::BLOCKED`: loopback, private
//! networks, link-local, ...) is refused unless the server allows private proxies.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use cella_core::egress::{EgressPolicy, EgressProxy, Ipv4Cidr};
use cella_core::store::{NewAudit, Store};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Port of the tunnel listener on each sandbox's host end.
pub const PROXY_PORT: u16 = 1080;
/// Tunneled connections of one sandbox at once; more are reset.
const MAX_CONNECTIONS: usize = 256;
/// Resolving, connecting to and negotiating with the proxy, in all.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Most names remembered for the addresses of one sandbox (ATYP=domain).
pub const MAX_NAMES: usize = 4096;

/// Names of addresses the sandbox's DNS forwarder learned from allowed domains.
pub type Names = Arc<Mutex<HashMap<Ipv4Addr, String>>>;

/// Remember that `addrs` were answered for `name` (bounded: a full map starts over).
pub fn remember(names: &Names, name: &str, addrs: &[Ipv4Addr]) {
    if let Ok(mut m) = names.lock() {
        if m.len() + addrs.len() > MAX_NAMES {
            m.clear();
        }
        for ip in addrs {
            m.insert(*ip, name.to_string());
        }
    }
}

/// Where a tunneled connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// By address (ATYP=1).
    Ip(SocketAddrV4),
    /// By name, resolved by the proxy (ATYP=3).
    Name(String, u16),
}

/// How long a tunneled connection of a sandbox with `rules` may take to send its first bytes
/// before it is relayed as it is (a protocol where the server speaks first).
const SNIFF_WAIT: Duration = Duration::from_millis(500);

/// What `network.rules` interception needs: the CA that signs what the sandbox sees, and the
/// trust store real servers are verified against.
pub struct Interception {
    /// The interception CA.
    pub ca: Arc<crate::ca::EgressCa>,
    /// Client configuration toward the real servers.
    pub upstream: Arc<rustls::ClientConfig>,
}

/// Lifetime of a minted workload token (it is used at once, by the request it is set on).
const TOKEN_TTL_SECS: u64 = 300;

/// The issuer of `iam` workload tokens.
pub struct Identity {
    /// Signing key.
    pub key: crate::identity::IdentityKey,
    /// `iss`.
    pub issuer: String,
    /// SPIFFE trust domain of `sub`.
    pub trust_domain: String,
}

impl Identity {
    /// A fresh token of `sandbox_id` for `audience`.
    fn mint(&self, sandbox_id: &str, audience: &str) -> Option<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = crate::identity::claims_for(
            &self.issuer,
            &self.trust_domain,
            sandbox_id,
            audience,
            now,
            TOKEN_TTL_SECS,
        );
        match self.key.mint(&claims) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(sandbox = sandbox_id, error = %e, "minting a workload token failed");
                None
            }
        }
    }
}

/// One sandbox's tunnel listener.
pub struct Tunnel {
    /// Sandbox ID (audit).
    pub sandbox_id: String,
    /// The policy in force (its `proxy` is read per connection).
    pub policy: Arc<RwLock<EgressPolicy>>,
    /// Learned names.
    pub names: Names,
    /// Whether the proxy may be in a blocked range (`--egress-proxy-private`).
    pub allow_private: bool,
    /// Audit log (failures).
    pub store: Store,
    /// `rules` interception (`None`: a sandbox with rules gets its connections reset).
    pub intercept: Option<Arc<Interception>>,
    /// Mints the `iam` tokens rules name.
    pub identity: Arc<Identity>,
    /// The only interface direct connections may leave by (`--egress-interface`).
    pub uplink: Option<String>,
}

impl Tunnel {
    /// Accept redirected connections until the task is aborted (which ends them all).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((client, _)) = accepted else { continue };
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        reset(client);
                        continue;
                    };
                    let me = self.clone();
                    tasks.spawn(async move {
                        me.handle(client).await;
                        drop(permit);
                    });
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
    }

    async fn handle(&self, client: TcpStream) {
        let dst = match original_dst(&client) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(sandbox = %self.sandbox_id, error = %e, "no original destination");
                reset(client);
                return;
            }
        };
        let (proxy, rules, target) = {
            let Ok(p) = self.policy.read() else {
                reset(client);
                return;
            };
            let name = p
                .restricts_domains()
                .then(|| self.names.lock().ok()?.get(dst.ip()).cloned())
                .flatten();
            let target = match name {
                Some(n) => Target::Name(n, dst.port()),
                None => Target::Ip(dst),
            };
            (p.proxy.clone(), (p.rules.clone(), p.iam.clone()), target)
        };
        let _ = client.set_nodelay(true);
        let (rules, iam) = rules;
        if rules.is_empty() {
            let Some(proxy) = proxy else {
                // The proxy was removed by an update after the redirect: never go direct here.
                reset(client);
                return;
            };
            match self.dial(Some(&proxy), &target, dst).await {
                Ok(mut upstream) => {
                    let mut client = client;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                Err(e) => self.failed(client, &proxy, &target, &e),
            }
            return;
        }
        self.intercept(client, dst, proxy, (rules, iam), target)
            .await;
    }

    /// A connection of a sandbox with `rules`: rewritten when a rule matches what it sends
    /// first (a TLS server name, or a plain HTTP `Host` at an address learned for it),
    /// relayed as it is otherwise; through the proxy when the policy names one.
    async fn intercept(
        &self,
        mut client: TcpStream,
        dst: SocketAddrV4,
        proxy: Option<EgressProxy>,
        (rules, iam): (
            cella_core::egress::TransformRules,
            cella_core::egress::IamTokens,
        ),
        target: Target,
    ) {
        use crate::intercept::{Prefixed, Sniffed};
        let Some(icpt) = self.intercept.clone() else {
            reset(client);
            return;
        };
        let ip = *dst.ip();
        let mut first = Vec::new();
        let sniffed = crate::intercept::sniff(&mut client, &mut first, SNIFF_WAIT).await;
        let names = self.names.clone();
        let learned = move |host: &str| {
            names
                .lock()
                .ok()
                .and_then(|m| m.get(&ip).cloned())
                .is_some_and(|n| n == host)
        };
        // Only TLS and HTTP are ever rewritten: another protocol to an address a rule names
        // is relayed as it is.
        let (host, tls, matched) = match sniffed {
            Sniffed::Tls { server_name } => {
                let m = rules.matches(server_name.as_deref(), ip);
                (server_name, true, m)
            }
            Sniffed::Http { host } => {
                let host = host.filter(|h| learned(h));
                let m = rules.matches(host.as_deref(), ip);
                (host, false, m)
            }
            Sniffed::Other => (None, false, false),
        };
        let mut upstream = match self.dial(proxy.as_ref(), &target, dst).await {
            Ok(u) => u,
            Err(e) => {
                match &proxy {
                    Some(p) => self.failed(client, p, &target, &e),
                    None => reset(client),
                }
                return;
            }
        };
        if !matched {
            if upstream.write_all(&first).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
            return;
        }
        let client = Prefixed::new(first, client);
        let header_names: Vec<String> = rules
            .headers_for(host.as_deref(), ip)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let outcome = if tls {
            let name = match &host {
                Some(h) => crate::ca::LeafName::Dns(h.clone()),
                None => crate::ca::LeafName::Ip(ip),
            };
            // The real server proves the name first: a sandbox that sends a rule's name to
            // an address of its choosing gets a reset, never the headers.
            let up = tokio::time::timeout(
                DIAL_TIMEOUT,
                crate::intercept::connect_tls(icpt.upstream.clone(), upstream, &name),
            )
            .await
            .unwrap_or_else(|_| Err("TLS to the server timed out".into()));
            match up {
                Err(e) => Err(e),
                Ok(up) => match tokio::time::timeout(
                    DIAL_TIMEOUT,
                    crate::intercept::accept_tls(&icpt.ca, client, name),
                )
                .await
                .unwrap_or_else(|_| Err("TLS from the sandbox timed out".into()))
                {
                    Err(e) => Err(e),
                    Ok(cl) => {
                        let sni = host.clone();
                        let headers = self.headers_fn(rules, iam, ip);
                        crate::intercept::serve_http1(cl, up, move |_| headers(sni.as_deref()))
                            .await
                    }
                },
            }
        } else {
            let headers = self.headers_fn(rules, iam, ip);
            crate::intercept::serve_http1(client, upstream, move |h| {
                headers(h.filter(|h| learned(h)))
            })
            .await
        };
        let mut detail = serde_json::json!({ "host": host, "dst": ip.to_string(),
            "dport": dst.port(), "tls": tls, "headers": header_names });
        match outcome {
            Ok(served) => {
                detail["verdict"] = "rewritten".into();
                detail["requests"] = served.requests.into();
                detail["injected"] = served.injected.into();
                if let Some(e) = served.error {
                    detail["error"] = e.into();
                }
            }
            Err(e) => {
                detail["verdict"] = "failed".into();
                detail["error"] = e.into();
            }
        }
        self.store.audit(NewAudit {
            actor: "sandbox".into(),
            sandbox_id: Some(self.sandbox_id.clone()),
            kind: "net.transform".into(),
            detail,
        });
    }

    /// The headers for a request to a host (already checked) on a connection to `ip`, with
    /// their workload token placeholders filled by freshly minted tokens.
    fn headers_fn(
        &self,
        rules: cella_core::egress::TransformRules,
        iam: cella_core::egress::IamTokens,
        ip: Ipv4Addr,
    ) -> impl Fn(Option<&str>) -> Vec<(String, String)> + Send + Sync + 'static {
        let identity = self.identity.clone();
        let sandbox_id = self.sandbox_id.clone();
        move |host| {
            rules
                .headers_for(host, ip)
                .into_iter()
                .map(|(name, value)| {
                    let value = cella_core::egress::fill_iam_placeholders(&value, |token| {
                        identity.mint(&sandbox_id, iam.audience(token)?)
                    });
                    (name, value)
                })
                .collect()
        }
    }

    /// Open the connection to `target`: through `proxy`, or directly to `dst` (by the uplink
    /// when one is pinned).
    async fn dial(
        &self,
        proxy: Option<&EgressProxy>,
        target: &Target,
        dst: SocketAddrV4,
    ) -> Result<Box<dyn Stream>, String> {
        let work = async {
            match proxy {
                Some(p) => open(p, target, self.allow_private).await,
                None => {
                    let sock =
                        tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
                    if let Some(dev) = &self.uplink {
                        sock.bind_device(Some(dev.as_bytes()))
                            .map_err(|e| format!("binding to {dev}: {e}"))?;
                    }
                    let s = sock
                        .connect(dst.into())
                        .await
                        .map_err(|e| format!("connecting to {dst}: {e}"))?;
                    let _ = s.set_nodelay(true);
                    Ok(Box::new(s) as Box<dyn Stream>)
                }
            }
        };
        match tokio::time::timeout(DIAL_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err("timed out".into()),
        }
    }

    fn failed(&self, client: TcpStream, proxy: &EgressProxy, target: &Target, error: &str) {
        reset(client);
        let (dst, port) = match target {
            Target::Ip(a) => (a.ip().to_string(), a.port()),
            Target::Name(n, p) => (n.clone(), *p),
        };
        self.store.audit(NewAudit {
            actor: "sandbox".into(),
            sandbox_id: Some(self.sandbox_id.clone()),
            kind: "net.proxy".into(),
            detail: serde_json::json!({ "verdict": "failed", "proxy": proxy.address(),
                "dst": dst, "dport": port, "error": error }),
        });
    }
}

/// Reset (not close) a sandbox's connection, so its client fails at once.
fn reset(client: TcpStream) {
    let _ = client.set_zero_linger();
    drop(client);
}

/// The destination a redirected connection was addressed to.
fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddrV4> {
    use std::os::fd::AsRawFd;
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `addr`, which lives for the call;
    // the fd is a socket we own.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

/// The range of `nft::BLOCKED` that holds `ip`, if any.
pub fn blocked_range(ip: Ipv4Addr) -> Option<&'static str> {
    crate::nft::BLOCKED
        .iter()
        .copied()
        .find(|b| Ipv4Cidr::parse(b).is_ok_and(|c| c.contains(ip)))
}

/// Resolve the proxy's address now (IPv4 only) and check it is not in a blocked range.
pub async fn resolve(proxy: &EgressProxy, allow_private: bool) -> Result<SocketAddrV4, String> {
    let addrs = tokio::net::lookup_host((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|e| format!("{} does not resolve: {e}", proxy.address()))?;
    let v4 = addrs
        .filter_map(|a| match a {
            std::net::SocketAddr::V4(v) => Some(v),
            std::net::SocketAddr::V6(_) => None,
        })
        .next()
        .ok_or_else(|| format!("{} has no IPv4 address", proxy.address()))?;
    if !allow_private && let Some(range) = blocked_range(*v4.ip()) {
        return Err(format!(
            "{} resolves to {}, inside {range}, which sandbox traffic may never reach \
             (start the server with --egress-proxy-private to allow proxies there)",
            proxy.address(),
            v4.ip()
        ));
    }
    Ok(v4)
}

/// Something a tunnel runs over: TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Connect to the proxy (TLS when configured), authenticate and CONNECT to `target`.
pub async fn open(
    proxy: &EgressProxy,
    target: &Target,
    allow_private: bool,
) -> Result<Box<dyn Stream>, String> {
    let addr = resolve(proxy, allow_private).await?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut stream: Box<dyn Stream> = match &proxy.tls {
        None => Box::new(tcp),
        Some(t) => {
            let cfg = tls_config(t.ca_pem.as_deref())?;
            let name = rustls::pki_types::ServerName::try_from(t.server_name.clone())
                .map_err(|e| format!("TLS server name {:?}: {e}", t.server_name))?;
            let s = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS to {addr}: {e}"))?;
            Box::new(s)
        }
    };
    handshake(&mut stream, proxy.credentials.as_ref(), target).await?;
    Ok(stream)
}

fn tls_config(ca_pem: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
    static SYSTEM: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    let build = |roots: rustls::RootCertStore| -> Result<Arc<rustls::ClientConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(cfg))
    };
    match ca_pem {
        Some(pem) => build(roots_from_pem(pem.as_bytes())?),
        None => SYSTEM
            .get_or_init(|| {
                let pem = std::fs::read("/etc/ssl/certs/ca-certificates.crt")
                    .map_err(|e| format!("reading the system trust store: {e}"))?;
                build(roots_from_pem(&pem)?)
            })
            .clone(),
    }
}

pub(crate) fn roots_from_pem(pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("CA certificates: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no CA certificate".into());
    }
    Ok(roots)
}

/// RFC 1928 (+ RFC 1929 credentials) client side, then `target`'s CONNECT.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    s: &mut S,
    credentials: Option<&(String, String)>,
    target: &Target,
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("talking to the proxy: {e}");
    let method = if credentials.is_some() { 2u8 } else { 0u8 };
    s.write_all(&[5, 1, method]).await.map_err(io)?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await.map_err(io)?;
    if choice[0] != 5 {
        return Err("the proxy does not speak SOCKS5".into());
    }
    if choice[1] != method {
        return Err(if choice[1] == 0xff {
            "the proxy accepts none of the offered authentication methods".into()
        } else {
            format!("the proxy chose authentication method {}", choice[1])
        });
    }
    if let Some((user, pass)) = credentials {
        let mut auth = vec![1u8, user.len() as u8];
        auth.extend_from_slice(user.as_bytes());
        auth.push(pass.len() as u8);
        auth.extend_from_slice(pass.as_bytes());
        s.write_all(&auth).await.map_err(io)?;
        let mut status = [0u8; 2];
        s.read_exact(&mut status).await.map_err(io)?;
        if status[1] != 0 {
            return Err("the proxy refused the credentials".into());
        }
    }
    let mut req = vec![5u8, 1, 0];
    let port = match target {
        Target::Ip(a) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Target::Name(n, p) => {
            let len = u8::try_from(n.len()).map_err(|_| format!("name too long: {n}"))?;
            req.push(3);
            req.push(len);
            req.extend_from_slice(n.as_bytes());
            *p
        }
    };
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.map_err(io)?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.map_err(io)?;
    if head[0] != 5 {
        return Err("the proxy does not speak SOCKS5".into());
    }
    if head[1] != 0 {
        return Err(format!(
            "the proxy refused the connection ({})",
            reply_text(head[1])
        ));
    }
    // The bound address, which the tunnel does not use.
    let skip = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l).await.map_err(io)?;
            usize::from(l[0]) + 2
        }
        other => return Err(format!("bad address type {other} in the proxy's reply")),
    };
    let mut rest = vec![0u8; skip];
    s.read_exact(&mut rest).await.map_err(io)?;
    Ok(())
}

fn reply_text(code: u8) -> &'static str {
    match code {
        1 => "general failure",
        2 => "not allowed by its rules",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused",
        6 => "TTL expired",
        7 => "command not supported",
        8 => "address type not supported",
        _ => "unknown error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal SOCKS5 server: checks the greeting (and credentials), records the CONNECT
    /// target, answers `reply`, then echoes.
    async fn fake_proxy(
        creds: Option<(&'static str, &'static str)>,
        reply: u8,
    ) -> (SocketAddrV4, tokio::task::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let std::net::SocketAddr::V4(addr) = l.local_addr().expect("addr") else {
            panic!("v4");
        };
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut g = [0u8; 3];
            s.read_exact(&mut g).await.expect("greeting");
            let want = if creds.is_some() { 2 } else { 0 };
            assert_eq!(g, [5, 1, want]);
            s.write_all(&[5, want]).await.expect("choice");
            if let Some((u, p)) = creds {
                let mut b = vec![0u8; 3 + u.len() + p.len()];
                s.read_exact(&mut b).await.expect("auth");
                let ok = b[2..2 + u.len()] == *u.as_bytes() && b[3 + u.len()..] == *p.as_bytes();
                s.write_all(&[1, if ok { 0 } else { 1 }])
                    .await
                    .expect("status");
                if !ok {
                    return Vec::new();
                }
            }
            let mut head = [0u8; 4];
            s.read_exact(&mut head).await.expect("req");
            let mut target = head.to_vec();
            let n = match head[3] {
                1 => 6,
                3 => {
                    let mut l = [0u8; 1];
                    s.read_exact(&mut l).await.expect("len");
                    target.push(l[0]);
                    usize::from(l[0]) + 2
                }
                _ => 0,
            };
            let mut rest = vec![0u8; n];
            s.read_exact(&mut rest).await.expect("addr");
            target.extend_from_slice(&rest);
            s.write_all(&[5, reply, 0, 1, 0, 0, 0, 0, 0, 0])
                .await
                .expect("reply");
            if reply == 0 {
                let mut buf = [0u8; 5];
                if s.read_exact(&mut buf).await.is_ok() {
                    let _ = s.write_all(&buf).await;
                }
            }
            target
        });
        (addr, task)
    }

    fn proxy_at(addr: SocketAddrV4, creds: Option<(&str, &str)>) -> EgressProxy {
        EgressProxy {
            host: addr.ip().to_string(),
            port: addr.port(),
            credentials: creds.map(|(u, p)| (u.to_string(), p.to_string())),
            tls: None,
        }
    }

    #[tokio::test]
    async fn connect_by_address_and_echo() {
        let (addr, task) = fake_proxy(None, 0).await;
        let target = Target::Ip(SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 80));
        let mut s = open(&proxy_at(addr, None), &target, true)
            .await
            .expect("open");
        s.write_all(b"hello").await.expect("write");
        let mut back = [0u8; 5];
        s.read_exact(&mut back).await.expect("read");
        assert_eq!(&back, b"hello");
        assert_eq!(
            task.await.expect("task"),
            vec![5, 1, 0, 1, 198, 51, 100, 10, 0, 80]
        );
    }

    #[tokio::test]
    async fn connect_by_name_with_credentials() {
        let (addr, task) = fake_proxy(Some(("u", "secret")), 0).await;
        let target = Target::Name("allowed.test".into(), 443);
        open(&proxy_at(addr, Some(("u", "secret"))), &target, true)
            .await
            .expect("open");
        let mut want = vec![5, 1, 0, 3, 12];
        want.extend_from_slice(b"allowed.test");
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(task.await.expect("task"), want);
    }

    #[tokio::test]
    async fn refusals_fail_closed() {
        let (addr, _t) = fake_proxy(Some(("u", "right")), 0).await;
        let target = Target::Ip(SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 80));
        let e = open(&proxy_at(addr, Some(("u", "wrong"))), &target, true)
            .await
            .err()
            .expect("bad credentials fail");
        assert!(e.contains("credentials"), "{e}");
        let (addr, _t) = fake_proxy(None, 5).await;
        let e = open(&proxy_at(addr, None), &target, true)
            .await
            .err()
            .expect("a refused CONNECT fails");
        assert!(e.contains("connection refused"), "{e}");
        // Not SOCKS at all: an HTTP server's answer.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let std::net::SocketAddr::V4(http) = l.local_addr().expect("addr") else {
            panic!("v4");
        };
        tokio::spawn(async move {
            if let Ok((mut s, _)) = l.accept().await {
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let e = open(&proxy_at(http, None), &target, true)
            .await
            .err()
            .expect("not SOCKS fails");
        assert!(e.contains("SOCKS5"), "{e}");
    }

    #[tokio::test]
    async fn private_proxies_are_refused_unless_allowed() {
        let p = proxy_at(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1080), None);
        let e = resolve(&p, false).await.expect_err("loopback refused");
        assert!(e.contains("127.0.0.0/8"), "{e}");
        assert!(resolve(&p, true).await.is_ok());
        let public = proxy_at(
            SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 1080),
            None,
        );
        assert!(resolve(&public, false).await.is_ok());
        assert_eq!(
            blocked_range(Ipv4Addr::new(10, 1, 2, 3)),
            Some("10.0.0.0/8")
        );
        assert_eq!(blocked_range(Ipv4Addr::new(8, 8, 8, 8)), None);
    }

    #[test]
    fn names_are_bounded() {
        let names: Names = Arc::default();
        remember(&names, "a.test", &[Ipv4Addr::new(1, 1, 1, 1)]);
        assert_eq!(
            names.lock().expect("lock").get(&Ipv4Addr::new(1, 1, 1, 1)),
            Some(&"a.test".to_string())
        );
        let many: Vec<Ipv4Addr> = (0..MAX_NAMES as u32).map(Ipv4Addr::from).collect();
        remember(&names, "b.test", &many);
        assert!(names.lock().expect("lock").len() <= MAX_NAMES);
    }
}
