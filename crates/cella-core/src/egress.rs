//! Outbound network policy of a sandbox, and the seam to the host-side network that enforces it.
//!
//! E2B's model: `allowOut` (CIDRs, IPs or domains, `*.x` included) always wins over `denyOut`
//! (CIDRs or IPs only); `allow_internet_access = false` is `denyOut = ["0.0.0.0/0"]`; a domain
//! in `allowOut` only restricts anything when `denyOut` denies the rest. The policy is parsed
//! and validated here, once, so the REST layer, the firewall and the DNS forwarder all see the
//! same typed rules. `dnsServers` (default `8.8.8.8`) only opens the firewall to those
//! servers, and only when `allowOut` names a domain: a sandbox that may reach named domains
//! may also talk to its own resolvers, as on E2B; cella's `/etc/resolv.conf` still names
//! cella's forwarder, which is what makes the domains resolve. Enforcement lives behind
//! [`Egress`] (the `cella-net` crate), injected into the manager so the core stays free of
//! netlink, nftables and sockets.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;

use async_trait::async_trait;

/// Most entries accepted in `allowOut` or `denyOut`.
pub const MAX_RULES: usize = 256;

/// Most entries accepted in `dnsServers` (E2B's limit).
pub const MAX_DNS_SERVERS: usize = 10;

/// The DNS server allowed when `dnsServers` is omitted (E2B's default).
pub const DEFAULT_DNS_SERVER: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);

/// `0.0.0.0/0`, E2B's `ALL_TRAFFIC`.
pub const ALL_TRAFFIC: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::UNSPECIFIED,
    prefix: 0,
};

/// An IPv4 network (`addr` has no host bits set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// A network from an address and prefix length; host bits are cleared.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Ipv4Cidr> {
        (prefix <= 32).then(|| Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }

    /// Network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// Whether `other` lies entirely inside `self`.
    pub fn contains_net(&self, other: &Ipv4Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    /// Whether the two share any address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains_net(other) || other.contains_net(self)
    }

    /// Number of addresses.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// Parse `a.b.c.d/n` strictly (no host bits, as E2B's validator) or a bare IP (a /32).
    pub fn parse(s: &str) -> Result<Ipv4Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => {
                let p: u8 = p
                    .parse()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| format!("{s:?}: prefix length must be 0-32"))?;
                (ip, p)
            }
            None => (s, 32),
        };
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address or CIDR"))?;
        let net = Ipv4Cidr::new(ip, prefix).ok_or_else(|| format!("{s:?}: bad prefix"))?;
        if net.addr != ip {
            return Err(format!("{s:?} has host bits set (did you mean {}?)", net));
        }
        Ok(net)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// A domain rule of `allowOut`: an exact name or `*.suffix` (any depth below, not the apex).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainPattern {
    /// Lowercase name without a trailing dot, without the `*.`.
    name: String,
    wildcard: bool,
}

impl DomainPattern {
    /// Parse and normalise (lowercase, trailing dot removed). Bare `*` is refused.
    pub fn parse(s: &str) -> Result<DomainPattern, String> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, lower),
        };
        if !is_hostname(&name) {
            return Err(format!(
                "{s:?} is not a CIDR, an IPv4 address or a domain name (e.g. example.com, *.example.com)"
            ));
        }
        Ok(DomainPattern { name, wildcard })
    }

    /// Whether this is a `*.name` pattern.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// Whether a queried name (any case, trailing dot allowed) matches.
    pub fn matches(&self, qname: &str) -> bool {
        let q = qname.trim_end_matches('.');
        if self.wildcard {
            q.len() > self.name.len() + 1
                && q[q.len() - self.name.len()..].eq_ignore_ascii_case(&self.name)
                && q.as_bytes()[q.len() - self.name.len() - 1] == b'.'
        } else {
            q.eq_ignore_ascii_case(&self.name)
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
        // Not an all-numeric name that looks like a malformed IP.
        && !s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// The outbound rules of one sandbox with egress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Networks always allowed.
    pub allow_cidrs: Vec<Ipv4Cidr>,
    /// Domains whose resolved addresses are allowed.
    pub allow_domains: Vec<DomainPattern>,
    /// Networks denied unless allowed.
    pub deny_cidrs: Vec<Ipv4Cidr>,
    /// `dnsServers`: addresses all traffic may reach when `allow_domains` is not empty (see
    /// [`EgressPolicy::open_dns_servers`]); `[8.8.8.8]` unless the request named others.
    pub dns_servers: Vec<Ipv4Addr>,
    /// `egressProxy`: the SOCKS5 proxy outbound TCP is tunneled through (after the rules).
    pub proxy: Option<EgressProxy>,
    /// `rules`: headers set on outbound HTTP/HTTPS requests to some hosts.
    pub rules: TransformRules,
    /// `iam` of the create: the workload tokens rules may name (kept across updates).
    pub iam: IamTokens,
}

/// Most tokens in `iam.tokens`.
pub const MAX_IAM_TOKENS: usize = 10;
/// The placeholder a rule's header value names a workload token with.
pub const IAM_PLACEHOLDER_PREFIX: &str = "${e2b.identity.tokens.";

/// E2B's `iam.tokens`, validated: name → audience (`JWT-SVID` is the only type).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IamTokens {
    tokens: std::collections::BTreeMap<String, String>,
}

impl IamTokens {
    /// Validate a create's `iam`.
    pub fn from_request(iam: Option<&cella_api::IamConfig>) -> Result<IamTokens, PolicyError> {
        let Some(tokens) = iam.and_then(|i| i.tokens.as_ref()) else {
            return Ok(IamTokens::default());
        };
        let bad = |m: String| PolicyError::new("iam", m);
        if tokens.len() > MAX_IAM_TOKENS {
            return Err(bad(format!("at most {MAX_IAM_TOKENS} tokens")));
        }
        let mut out = std::collections::BTreeMap::new();
        for (name, t) in tokens {
            if name.is_empty()
                || name.len() > 128
                || name.chars().any(|c| c == '{' || c == '}' || c.is_control())
            {
                return Err(bad(format!(
                    "token name {name:?} must be 1-128 characters without '{{', '}}' or \
                     control characters"
                )));
            }
            if t.token_type != "JWT-SVID" {
                return Err(bad(format!(
                    "tokens.{name}.tokenType {:?}: only JWT-SVID is supported",
                    t.token_type
                )));
            }
            if t.audience.is_empty()
                || t.audience.len() > 1024
                || t.audience.chars().any(char::is_control)
            {
                return Err(bad(format!(
                    "tokens.{name}.audience must be 1-1024 characters without control characters"
                )));
            }
            out.insert(name.clone(), t.audience.clone());
        }
        Ok(IamTokens { tokens: out })
    }

    /// The audience of token `name`, if registered.
    pub fn audience(&self, name: &str) -> Option<&str> {
        self.tokens.get(name).map(String::as_str)
    }

    /// No token registered.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// For the audit log: name → audience.
    pub fn audit_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.tokens).unwrap_or_default()
    }
}

/// The token names `${e2b.identity.tokens.NAME}` placeholders in `value` refer to, in order;
/// `Err` for an unfinished placeholder or another `${e2b.identity.` form.
pub fn iam_placeholders(value: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    let mut rest = value;
    while let Some(i) = rest.find("${e2b.identity.") {
        let after = rest.get(i..).unwrap_or_default();
        let Some(tail) = after.strip_prefix(IAM_PLACEHOLDER_PREFIX) else {
            return Err("only ${e2b.identity.tokens.NAME} placeholders are supported".into());
        };
        let Some(end) = tail.find('}') else {
            return Err("an unfinished ${e2b.identity.tokens.NAME} placeholder".into());
        };
        names.push(tail.get(..end).unwrap_or_default());
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    Ok(names)
}

/// `value` with every `${e2b.identity.tokens.NAME}` replaced by `mint(NAME)` (a placeholder
/// `mint` cannot fill is left as it is: validation only lets registered names through).
pub fn fill_iam_placeholders(value: &str, mut mint: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find(IAM_PLACEHOLDER_PREFIX) {
        let tail = rest
            .get(i + IAM_PLACEHOLDER_PREFIX.len()..)
            .unwrap_or_default();
        let Some(end) = tail.find('}') else { break };
        let name = tail.get(..end).unwrap_or_default();
        out.push_str(rest.get(..i).unwrap_or_default());
        match mint(name) {
            Some(token) => out.push_str(&token),
            None => out.push_str(
                rest.get(i..i + IAM_PLACEHOLDER_PREFIX.len() + end + 1)
                    .unwrap_or_default(),
            ),
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

impl EgressPolicy {
    /// Whether new TCP connections go through the host's tunnel listener (a proxy, or
    /// requests to rewrite).
    pub fn tunnels(&self) -> bool {
        self.proxy.is_some() || !self.rules.is_empty()
    }
}

/// Most hosts in `rules` (E2B's limit).
pub const MAX_RULE_HOSTS: usize = 10;
/// Most headers in one rule (E2B's limit).
pub const MAX_RULE_HEADERS: usize = 20;
/// Longest header value accepted in a rule.
pub const MAX_RULE_HEADER_VALUE: usize = 8192;

/// Headers a rule may not set: they frame the message or the connection, so setting them
/// would break (or smuggle) requests rather than add a credential.
const FORBIDDEN_RULE_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "expect",
];

/// What a rule's host key matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleTarget {
    /// A name or `*.name`, matched against the request's TLS server name or `Host`.
    Domain(DomainPattern),
    /// An address or network, matched against the connection's destination.
    Cidr(Ipv4Cidr),
}

/// The validated rules of one host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRules {
    /// The key as given (reported back).
    pub key: String,
    /// What it matches.
    pub target: RuleTarget,
    /// Its rules in order; each is the headers it sets (names lowercase).
    pub rules: Vec<Vec<(String, String)>>,
}

/// E2B's `network.rules`, validated: per host, headers the egress proxy sets (replacing the
/// request's own) on matching requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransformRules {
    hosts: Vec<HostRules>,
}

impl TransformRules {
    /// Validate a request's `rules` (`field` names it in errors).
    pub fn from_request(
        rules: Option<&cella_api::NetworkRules>,
        iam: &IamTokens,
        field: &'static str,
    ) -> Result<TransformRules, PolicyError> {
        let Some(rules) = rules else {
            return Ok(TransformRules::default());
        };
        let bad = |m: String| PolicyError::new(field, m);
        if rules.len() > MAX_RULE_HOSTS {
            return Err(bad(format!("at most {MAX_RULE_HOSTS} hosts")));
        }
        let mut hosts = Vec::with_capacity(rules.len());
        for (key, list) in rules {
            let k = key.trim();
            if looks_like_ipv6(k) {
                return Err(bad(format!(
                    "{k:?}: IPv6 egress is not supported (cella blocks all IPv6)"
                )));
            }
            let target = if k.bytes().next().is_some_and(|b| b.is_ascii_digit()) && is_ipish(k) {
                RuleTarget::Cidr(Ipv4Cidr::parse(k).map_err(&bad)?)
            } else {
                RuleTarget::Domain(DomainPattern::parse(k).map_err(&bad)?)
            };
            let mut out = Vec::with_capacity(list.len());
            for rule in list {
                let headers = rule
                    .transform
                    .as_ref()
                    .and_then(|t| t.headers.as_ref())
                    .cloned()
                    .unwrap_or_default();
                if headers.len() > MAX_RULE_HEADERS {
                    return Err(bad(format!(
                        "{k}: at most {MAX_RULE_HEADERS} headers per rule"
                    )));
                }
                let mut set = Vec::with_capacity(headers.len());
                for (name, value) in headers {
                    let lower = name.to_ascii_lowercase();
                    if !is_header_name(&lower) {
                        return Err(bad(format!("{k}: {name:?} is not an HTTP header name")));
                    }
                    if FORBIDDEN_RULE_HEADERS.contains(&lower.as_str())
                        || lower.starts_with("proxy-")
                    {
                        return Err(bad(format!(
                            "{k}: the {name} header frames the request and cannot be set"
                        )));
                    }
                    if value.len() > MAX_RULE_HEADER_VALUE
                        || value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
                    {
                        return Err(bad(format!(
                            "{k}: the value of {name} must be at most {MAX_RULE_HEADER_VALUE} \
                             bytes without control characters"
                        )));
                    }
                    let names = iam_placeholders(&value)
                        .map_err(|m| bad(format!("{k}: the value of {name}: {m}")))?;
                    if let Some(unknown) = names.iter().find(|n| iam.audience(n).is_none()) {
                        return Err(bad(format!(
                            "{k}: the value of {name} names the workload token {unknown:?}, \
                             which the sandbox's iam.tokens do not register"
                        )));
                    }
                    set.push((lower, value));
                }
                out.push(set);
            }
            hosts.push(HostRules {
                key: k.to_string(),
                target,
                rules: out,
            });
        }
        Ok(TransformRules { hosts })
    }

    /// No rule at all.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The validated hosts.
    pub fn hosts(&self) -> &[HostRules] {
        &self.hosts
    }

    /// Whether any key could match a request to `host` (a TLS server name or `Host`) on a
    /// connection to `ip`.
    pub fn matches(&self, host: Option<&str>, ip: Ipv4Addr) -> bool {
        self.hosts.iter().any(|h| h.target_matches(host, ip))
    }

    /// The headers to set on a request to `host` over a connection to `ip`: the rules of
    /// every matching key, addresses first, then `*.` names, then exact names (so the most
    /// specific key wins), each key's rules in order; a later value of a name replaces an
    /// earlier one. Names are lowercase.
    pub fn headers_for(&self, host: Option<&str>, ip: Ipv4Addr) -> Vec<(String, String)> {
        let rank = |t: &RuleTarget| match t {
            RuleTarget::Cidr(_) => 0,
            RuleTarget::Domain(d) if d.is_wildcard() => 1,
            RuleTarget::Domain(_) => 2,
        };
        let mut matching: Vec<&HostRules> = self
            .hosts
            .iter()
            .filter(|h| h.target_matches(host, ip))
            .collect();
        matching.sort_by_key(|h| rank(&h.target));
        let mut out: Vec<(String, String)> = Vec::new();
        for (name, value) in matching.iter().flat_map(|h| h.rules.iter().flatten()) {
            match out.iter_mut().find(|(n, _)| n == name) {
                Some(slot) => slot.1 = value.clone(),
                None => out.push((name.clone(), value.clone())),
            }
        }
        out
    }

    /// The request that gives these rules again, values included (for the 0600 record of a
    /// sandbox paused to disk, never for a response).
    pub fn to_request(&self) -> Option<cella_api::NetworkRules> {
        self.to_api(false)
    }

    /// As reported: hosts and header names, every value replaced by `"***"` (they are
    /// usually credentials the sandbox's owner meant to keep out of it).
    pub fn to_info(&self) -> Option<cella_api::NetworkRules> {
        self.to_api(true)
    }

    fn to_api(&self, redact: bool) -> Option<cella_api::NetworkRules> {
        if self.hosts.is_empty() {
            return None;
        }
        let map = self
            .hosts
            .iter()
            .map(|h| {
                let rules = h
                    .rules
                    .iter()
                    .map(|set| cella_api::NetworkRule {
                        transform: Some(cella_api::NetworkTransform {
                            headers: Some(
                                set.iter()
                                    .map(|(n, v)| {
                                        let v = if redact { "***".into() } else { v.clone() };
                                        (n.clone(), v)
                                    })
                                    .collect(),
                            ),
                        }),
                    })
                    .collect();
                (h.key.clone(), rules)
            })
            .collect();
        Some(map)
    }

    /// For the audit log: per host key, the header names it sets (never values).
    pub fn audit_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for h in &self.hosts {
            let names: Vec<&str> = h.rules.iter().flatten().map(|(n, _)| n.as_str()).collect();
            m.insert(h.key.clone(), names.into());
        }
        m.into()
    }
}

impl HostRules {
    fn target_matches(&self, host: Option<&str>, ip: Ipv4Addr) -> bool {
        match &self.target {
            RuleTarget::Cidr(c) => c.contains(ip),
            RuleTarget::Domain(d) => host.is_some_and(|h| d.matches(h)),
        }
    }
}

/// An RFC 9110 field name (token characters), lowercase.
fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Longest `egressProxy.username` / `password` (RFC 1929: one length byte).
pub const MAX_PROXY_CREDENTIAL: usize = 255;
/// Longest `egressProxy.tls.caCert`.
pub const MAX_PROXY_CA_PEM: usize = 8192;

/// A validated `egressProxy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressProxy {
    /// Host: a DNS name (re-resolved at every dial) or an IPv4 literal.
    pub host: String,
    /// Port.
    pub port: u16,
    /// RFC 1929 credentials.
    pub credentials: Option<(String, String)>,
    /// TLS to the proxy.
    pub tls: Option<EgressProxyTls>,
}

/// TLS settings of an [`EgressProxy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressProxyTls {
    /// Name verified and sent as SNI.
    pub server_name: String,
    /// Whether `server_name` was given (not derived from the address).
    pub server_name_set: bool,
    /// PEM roots replacing the system trust store.
    pub ca_pem: Option<String>,
}

impl EgressProxy {
    /// Validate E2B's `egressProxy` object (`field` names it in errors).
    pub fn from_request(
        cfg: &cella_api::EgressProxyConfig,
        field: &'static str,
    ) -> Result<EgressProxy, PolicyError> {
        let bad = |m: String| PolicyError::new(field, m);
        let address = cfg.address.trim();
        if address.starts_with('[') {
            return Err(bad(format!(
                "{address:?}: IPv6 proxy addresses are not supported (cella egress is IPv4)"
            )));
        }
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| bad(format!("{address:?} must be host:port")))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(format!("{address:?}: the port must be 1-65535")))?;
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !(is_ipv4_literal(&host) || is_dns_name(&host)) {
            return Err(bad(format!(
                "{address:?}: the host must be a name or an IPv4 address"
            )));
        }
        let credentials = match (&cfg.username, &cfg.password) {
            (None, None) => None,
            (None, Some(_)) => return Err(bad("password needs a username".into())),
            (Some(u), p) => {
                let p = p.clone().unwrap_or_default();
                if u.is_empty() || u.len() > MAX_PROXY_CREDENTIAL || p.len() > MAX_PROXY_CREDENTIAL
                {
                    return Err(bad(format!(
                        "username must be 1-{MAX_PROXY_CREDENTIAL} bytes and password at most \
                         {MAX_PROXY_CREDENTIAL}"
                    )));
                }
                Some((u.clone(), p))
            }
        };
        let tls = match &cfg.tls {
            None => None,
            Some(t) if !t.enabled => {
                if t.server_name.is_some() || t.ca_cert.is_some() {
                    return Err(bad(
                        "tls: with enabled=false no other field may be set".into()
                    ));
                }
                None
            }
            Some(t) => {
                let (server_name, set) = match &t.server_name {
                    Some(n) => {
                        let n = n.trim_end_matches('.').to_ascii_lowercase();
                        if !(is_dns_name(&n) || is_ipv4_literal(&n)) {
                            return Err(bad(format!("tls.serverName {n:?} is not a host name")));
                        }
                        (n, true)
                    }
                    None => (host.clone(), false),
                };
                if let Some(pem) = &t.ca_cert
                    && (pem.len() > MAX_PROXY_CA_PEM
                        || !pem.contains("-----BEGIN CERTIFICATE-----"))
                {
                    return Err(bad(format!(
                        "tls.caCert must be PEM certificates, at most {MAX_PROXY_CA_PEM} bytes"
                    )));
                }
                Some(EgressProxyTls {
                    server_name,
                    server_name_set: set,
                    ca_pem: t.ca_cert.clone(),
                })
            }
        };
        Ok(EgressProxy {
            host,
            port,
            credentials,
            tls,
        })
    }

    /// `host:port`.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The request that gives this proxy again (secrets included: for the 0600 record of a
    /// sandbox paused to disk, never for a response).
    pub fn to_request(&self) -> cella_api::EgressProxyConfig {
        cella_api::EgressProxyConfig {
            address: self.address(),
            username: self.credentials.as_ref().map(|(u, _)| u.clone()),
            password: self.credentials.as_ref().map(|(_, p)| p.clone()),
            tls: self.tls.as_ref().map(|t| cella_api::EgressProxyTls {
                enabled: true,
                server_name: t.server_name_set.then(|| t.server_name.clone()),
                ca_cert: t.ca_pem.clone(),
            }),
        }
    }

    /// As E2B reports it: no password, no CA certificates.
    pub fn to_info(&self) -> cella_api::EgressProxyConfig {
        cella_api::EgressProxyConfig {
            address: self.address(),
            username: self.credentials.as_ref().map(|(u, _)| u.clone()),
            password: None,
            tls: self.tls.as_ref().map(|t| cella_api::EgressProxyTls {
                enabled: true,
                server_name: t.server_name_set.then(|| t.server_name.clone()),
                ca_cert: None,
            }),
        }
    }
}

fn is_ipv4_literal(s: &str) -> bool {
    s.parse::<Ipv4Addr>().is_ok()
}

/// A DNS host name (lowercase), not something that looks like an address.
fn is_dns_name(s: &str) -> bool {
    !is_ipish(s) && is_hostname(s)
}

impl Default for EgressPolicy {
    /// Everything allowed; `dnsServers` at E2B's default.
    fn default() -> EgressPolicy {
        EgressPolicy {
            allow_cidrs: Vec::new(),
            allow_domains: Vec::new(),
            deny_cidrs: Vec::new(),
            dns_servers: vec![DEFAULT_DNS_SERVER],
            proxy: None,
            rules: TransformRules::default(),
            iam: IamTokens::default(),
        }
    }
}

impl EgressPolicy {
    /// Build from E2B's fields. `field_prefix` names the JSON object in errors
    /// (`network.` for create, empty for the update body).
    pub fn from_request(
        allow_internet_access: Option<bool>,
        allow_out: Option<&[String]>,
        deny_out: Option<&[String]>,
        field_prefix: &'static str,
    ) -> Result<EgressPolicy, PolicyError> {
        let (allow_field, deny_field) = if field_prefix.is_empty() {
            ("allowOut", "denyOut")
        } else {
            ("network.allowOut", "network.denyOut")
        };
        let mut p = EgressPolicy::default();
        let allow = allow_out.unwrap_or_default();
        let deny = deny_out.unwrap_or_default();
        if allow.len() > MAX_RULES {
            return Err(PolicyError::new(
                allow_field,
                format!("at most {MAX_RULES} entries"),
            ));
        }
        if deny.len() > MAX_RULES {
            return Err(PolicyError::new(
                deny_field,
                format!("at most {MAX_RULES} entries"),
            ));
        }
        for entry in allow {
            let e = entry.trim();
            refuse_ipv6(allow_field, e)?;
            if e.bytes().next().is_some_and(|b| b.is_ascii_digit()) && is_ipish(e) {
                let net = Ipv4Cidr::parse(e).map_err(|m| PolicyError::new(allow_field, m))?;
                push_unique(&mut p.allow_cidrs, net);
            } else {
                let d = DomainPattern::parse(e).map_err(|m| PolicyError::new(allow_field, m))?;
                if !p.allow_domains.contains(&d) {
                    p.allow_domains.push(d);
                }
            }
        }
        for entry in deny {
            let e = entry.trim();
            if looks_like_ipv6(e) {
                // IPv6 is always denied; accepting the rule keeps E2B's clients working.
                continue;
            }
            let net = Ipv4Cidr::parse(e).map_err(|m| {
                PolicyError::new(
                    deny_field,
                    format!("{m} (denyOut takes only CIDRs or IP addresses)"),
                )
            })?;
            push_unique(&mut p.deny_cidrs, net);
        }
        if allow_internet_access == Some(false) {
            push_unique(&mut p.deny_cidrs, ALL_TRAFFIC);
        }
        Ok(p)
    }

    /// Replace `dnsServers` (`None`: E2B's default, `8.8.8.8`; `[]`: none). Each entry must
    /// be a unicast IPv4 address; at most [`MAX_DNS_SERVERS`].
    pub fn with_dns_servers(
        mut self,
        dns_servers: Option<&[String]>,
        field_prefix: &'static str,
    ) -> Result<EgressPolicy, PolicyError> {
        let field = if field_prefix.is_empty() {
            "dnsServers"
        } else {
            "network.dnsServers"
        };
        let Some(list) = dns_servers else {
            self.dns_servers = vec![DEFAULT_DNS_SERVER];
            return Ok(self);
        };
        if list.len() > MAX_DNS_SERVERS {
            return Err(PolicyError::new(
                field,
                format!("at most {MAX_DNS_SERVERS} entries"),
            ));
        }
        let mut servers = Vec::with_capacity(list.len());
        for entry in list {
            let e = entry.trim();
            refuse_ipv6(field, e)?;
            let ip: Ipv4Addr = e.parse().map_err(|_| {
                PolicyError::new(
                    field,
                    format!("{e:?} is not an IPv4 address (dnsServers takes addresses, not CIDRs or names)"),
                )
            })?;
            if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
                return Err(PolicyError::new(
                    field,
                    format!("{e:?} is not a unicast address"),
                ));
            }
            if !servers.contains(&ip) {
                servers.push(ip);
            }
        }
        self.dns_servers = servers;
        Ok(self)
    }

    /// Replace `egressProxy` (`None`: no tunneling).
    pub fn with_egress_proxy(
        mut self,
        proxy: Option<&cella_api::EgressProxyConfig>,
        field_prefix: &'static str,
    ) -> Result<EgressPolicy, PolicyError> {
        let field = if field_prefix.is_empty() {
            "egressProxy"
        } else {
            "network.egressProxy"
        };
        self.proxy = proxy
            .map(|p| EgressProxy::from_request(p, field))
            .transpose()?;
        Ok(self)
    }

    /// Replace `rules` (`None`: none).
    pub fn with_rules(
        mut self,
        rules: Option<&cella_api::NetworkRules>,
        field_prefix: &'static str,
    ) -> Result<EgressPolicy, PolicyError> {
        let field = if field_prefix.is_empty() {
            "rules"
        } else {
            "network.rules"
        };
        self.rules = TransformRules::from_request(rules, &self.iam, field)?;
        Ok(self)
    }

    /// Set the sandbox's workload tokens (before [`Self::with_rules`], which checks the
    /// placeholders against them).
    pub fn with_iam(mut self, iam: IamTokens) -> EgressPolicy {
        self.iam = iam;
        self
    }

    /// The `dnsServers` the firewall opens: all of them when `allowOut` names a domain, none
    /// otherwise (E2B: "with no domain in allow_out it has no effect"). An entry counts as
    /// an explicit allow, so it opens even an always-blocked range (e.g. a resolver on the
    /// LAN) for that one address, like an `allowOut` CIDR inside the range would.
    pub fn open_dns_servers(&self) -> &[Ipv4Addr] {
        if self.allow_domains.is_empty() {
            &[]
        } else {
            &self.dns_servers
        }
    }

    /// `dnsServers` as E2B reports it.
    pub fn dns_servers_out(&self) -> Vec<String> {
        self.dns_servers.iter().map(ToString::to_string).collect()
    }

    /// Whether everything not explicitly allowed is denied (`0.0.0.0/0` in `denyOut`).
    pub fn denies_all(&self) -> bool {
        self.deny_cidrs.contains(&ALL_TRAFFIC)
    }

    /// Whether this policy can reach anything at all, i.e. whether the sandbox needs a network
    /// interface. A sandbox that may reach nothing keeps the lo-only netns.
    pub fn reaches_anything(&self) -> bool {
        !(self.denies_all() && self.allow_cidrs.is_empty() && self.allow_domains.is_empty())
    }

    /// Whether DNS answers must be filtered by [`EgressPolicy::allow_domains`]: only when
    /// the rest is denied (otherwise every address is reachable anyway).
    pub fn restricts_domains(&self) -> bool {
        self.denies_all()
    }

    /// Whether a DNS name may be resolved.
    pub fn allows_name(&self, qname: &str) -> bool {
        !self.restricts_domains() || self.allow_domains.iter().any(|d| d.matches(qname))
    }

    /// `allowOut` as E2B reports it (CIDRs then domains).
    pub fn allow_out(&self) -> Vec<String> {
        self.allow_cidrs
            .iter()
            .map(ToString::to_string)
            .chain(self.allow_domains.iter().map(ToString::to_string))
            .collect()
    }

    /// `denyOut` as E2B reports it.
    pub fn deny_out(&self) -> Vec<String> {
        self.deny_cidrs.iter().map(ToString::to_string).collect()
    }

    /// JSON for the audit log.
    pub fn audit_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "allowOut": self.allow_out(), "denyOut": self.deny_out(),
            "dnsServers": self.dns_servers_out() });
        if let Some(p) = &self.proxy {
            v["egressProxy"] = serde_json::to_value(p.to_info()).unwrap_or_default();
        }
        if !self.rules.is_empty() {
            v["rules"] = self.rules.audit_json();
        }
        if !self.iam.is_empty() {
            v["iam"] = self.iam.audit_json();
        }
        v
    }
}

fn push_unique(v: &mut Vec<Ipv4Cidr>, net: Ipv4Cidr) {
    if !v.contains(&net) {
        v.push(net);
    }
}

fn looks_like_ipv6(s: &str) -> bool {
    s.contains(':')
}

fn refuse_ipv6(field: &'static str, entry: &str) -> Result<(), PolicyError> {
    if looks_like_ipv6(entry) {
        return Err(PolicyError::new(
            field,
            format!("{entry:?}: IPv6 egress is not supported (cella blocks all IPv6)"),
        ));
    }
    Ok(())
}

fn is_ipish(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/')
}

/// A policy field that does not validate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid field '{field}': {message}")]
pub struct PolicyError {
    /// JSON field name.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl PolicyError {
    fn new(field: &'static str, message: impl Into<String>) -> PolicyError {
        PolicyError {
            field,
            message: message.into(),
        }
    }
}

/// Errors of the host-side network.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// No free address slot.
    #[error("no free sandbox network address (pool {0} exhausted)")]
    PoolExhausted(String),
    /// Unknown sandbox.
    #[error("sandbox {0} has no network attachment")]
    NotAttached(String),
    /// A command or OS call failed.
    #[error("{0}")]
    Setup(String),
}

/// The host side of sandbox networking: addresses, interfaces, firewall, DNS.
#[async_trait]
pub trait Egress: Send + Sync + 'static {
    /// Reserve an address slot for `sandbox_id`; returns the resolver address the sandbox's
    /// `/etc/resolv.conf` must name. Must be followed by `attach` or `release`.
    fn reserve(&self, sandbox_id: &str) -> Result<Ipv4Addr, EgressError>;

    /// Give the sandbox whose network namespace is at `netns` its interface, route, firewall
    /// rules and resolver. On error nothing of the attachment remains but the reservation.
    async fn attach(
        &self,
        sandbox_id: &str,
        netns: &Path,
        policy: &EgressPolicy,
    ) -> Result<(), EgressError>;

    /// Replace the sandbox's rules atomically.
    async fn update(&self, sandbox_id: &str, policy: &EgressPolicy) -> Result<(), EgressError>;

    /// Check that an `egressProxy` may be used before any sandbox depends on it: its address
    /// resolves, and not into a range sandboxes may never reach. `Err` is the reason (a 400).
    async fn check_proxy(&self, proxy: &EgressProxy) -> Result<(), String> {
        let _ = proxy;
        Ok(())
    }

    /// The PEM certificate of the CA that signs the certificates `rules` interception shows
    /// the sandbox; a sandbox with rules must trust it. `None`: rules cannot be served.
    fn interception_ca(&self) -> Option<String> {
        None
    }

    /// The workload identity issuer (`iam` tokens): its `iss` and its JWKS (public keys),
    /// served at `/.well-known/` so relying parties can verify the tokens.
    fn identity_discovery(&self) -> Option<(String, serde_json::Value)> {
        None
    }

    /// Remove everything of the sandbox's attachment and free its slot. Idempotent.
    async fn release(&self, sandbox_id: &str) -> Result<(), EgressError>;
}

/// Where a sandbox finds the interception CA (its own file) and the system bundle it is
/// appended to (the agent's `/trust` writes both).
pub const SANDBOX_CA_FILE: &str = "/usr/local/share/ca-certificates/cella-egress-ca.crt";
/// The system CA bundle inside a sandbox.
pub const SANDBOX_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Environment given to a sandbox created with `rules`, so runtimes with their own trust
/// stores trust the interception CA too (Node reads extra CAs only at start; `requests` uses
/// certifi's bundle otherwise). Variables the request sets win.
pub const CA_ENV: &[(&str, &str)] = &[
    ("NODE_EXTRA_CA_CERTS", SANDBOX_CA_FILE),
    ("REQUESTS_CA_BUNDLE", SANDBOX_CA_BUNDLE),
    ("SSL_CERT_FILE", SANDBOX_CA_BUNDLE),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn cidrs_parse_strictly() {
        assert_eq!(
            Ipv4Cidr::parse("10.0.0.0/8").map(|c| c.to_string()),
            Ok("10.0.0.0/8".into())
        );
        assert_eq!(
            Ipv4Cidr::parse("1.2.3.4").map(|c| c.to_string()),
            Ok("1.2.3.4/32".into())
        );
        assert!(Ipv4Cidr::parse("10.0.0.1/8").is_err(), "host bits");
        assert!(Ipv4Cidr::parse("10.0.0.0/33").is_err());
        assert!(Ipv4Cidr::parse("300.0.0.0/8").is_err());
        assert!(Ipv4Cidr::parse("1.2.3").is_err());
        let net = Ipv4Cidr::parse("203.0.113.0/24").unwrap_or(ALL_TRAFFIC);
        assert!(net.contains("203.0.113.9".parse().unwrap_or(Ipv4Addr::LOCALHOST)));
        assert!(!net.contains("203.0.114.9".parse().unwrap_or(Ipv4Addr::LOCALHOST)));
        assert!(ALL_TRAFFIC.contains_net(&net));
        assert!(!net.contains_net(&ALL_TRAFFIC));
        assert!(net.overlaps(&ALL_TRAFFIC));
    }

    #[test]
    fn domains_match_exactly_or_below_a_wildcard() {
        let exact = DomainPattern::parse("Allowed.Test.").expect("valid");
        assert!(exact.matches("allowed.test"));
        assert!(exact.matches("ALLOWED.test."));
        assert!(!exact.matches("x.allowed.test"));
        assert!(!exact.matches("notallowed.test"));
        let wild = DomainPattern::parse("*.example.com").expect("valid");
        assert!(wild.matches("a.example.com"));
        assert!(wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com"), "apex is not matched");
        assert!(!wild.matches("badexample.com"));
        assert!(!wild.matches("example.com.evil.net"));
        for bad in [
            "*",
            "*.",
            "a..b",
            "-a.com",
            "a b.com",
            "",
            "x.*.com",
            "1.2.3.4.5",
        ] {
            assert!(
                DomainPattern::parse(bad).is_err(),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn policy_follows_e2b_semantics() {
        let p = EgressPolicy::from_request(None, None, None, "network.").expect("valid");
        assert!(p.reaches_anything() && !p.restricts_domains());
        assert!(p.allows_name("anything.example"));

        let off = EgressPolicy::from_request(Some(false), None, None, "network.").expect("valid");
        assert!(off.denies_all() && !off.reaches_anything());

        let doms = EgressPolicy::from_request(
            None,
            Some(&s(&["allowed.test", "198.51.100.0/24", "*.ok.test"])),
            Some(&s(&["0.0.0.0/0"])),
            "network.",
        )
        .expect("valid");
        assert!(doms.reaches_anything() && doms.restricts_domains());
        assert!(doms.allows_name("allowed.test") && doms.allows_name("a.ok.test"));
        assert!(!doms.allows_name("other.test"));
        assert_eq!(
            doms.allow_out(),
            s(&["198.51.100.0/24", "allowed.test", "*.ok.test"])
        );
        assert_eq!(doms.deny_out(), s(&["0.0.0.0/0"]));

        // allow_internet_access=false plus an allow list: allow wins.
        let both = EgressPolicy::from_request(Some(false), Some(&s(&["1.1.1.1"])), None, "")
            .expect("valid");
        assert!(both.reaches_anything());
    }

    #[test]
    fn bad_entries_name_their_field() {
        let e = EgressPolicy::from_request(None, None, Some(&s(&["example.com"])), "network.")
            .expect_err("domain in deny");
        assert_eq!(e.field, "network.denyOut");
        let e = EgressPolicy::from_request(None, Some(&s(&["10.0.0.1/8"])), None, "")
            .expect_err("host bits");
        assert_eq!(e.field, "allowOut");
        let e =
            EgressPolicy::from_request(None, Some(&s(&["::1/128"])), None, "").expect_err("ipv6");
        assert!(e.message.contains("IPv6"));
        let e = EgressPolicy::from_request(None, Some(&s(&["bad name!"])), None, "")
            .expect_err("bad domain");
        assert_eq!(e.field, "allowOut");
        let many: Vec<String> = (0..=MAX_RULES)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        assert!(EgressPolicy::from_request(None, None, Some(&many), "").is_err());
        // IPv6 deny rules are accepted (IPv6 is always denied).
        assert!(EgressPolicy::from_request(None, None, Some(&s(&["::/0"])), "").is_ok());
    }

    #[test]
    fn dns_servers_follow_e2b_semantics() {
        let with_domain = || {
            EgressPolicy::from_request(
                None,
                Some(&s(&["allowed.test"])),
                Some(&s(&["0.0.0.0/0"])),
                "network.",
            )
            .expect("valid")
        };
        // Omitted: 8.8.8.8, and the same as the default policy's.
        let p = with_domain()
            .with_dns_servers(None, "network.")
            .expect("valid");
        assert_eq!(p.dns_servers, vec![DEFAULT_DNS_SERVER]);
        assert_eq!(p.open_dns_servers(), &[DEFAULT_DNS_SERVER]);
        assert_eq!(
            EgressPolicy::from_request(None, None, None, "").expect("valid"),
            EgressPolicy::default()
        );
        // A list replaces the default; duplicates and spaces are dropped; [] is none.
        let p = with_domain()
            .with_dns_servers(Some(&s(&["1.1.1.1", " 10.0.0.53", "1.1.1.1"])), "")
            .expect("valid");
        assert_eq!(p.dns_servers_out(), s(&["1.1.1.1", "10.0.0.53"]));
        assert_eq!(p.open_dns_servers().len(), 2);
        let none = with_domain()
            .with_dns_servers(Some(&[]), "")
            .expect("valid");
        assert!(none.dns_servers.is_empty() && none.open_dns_servers().is_empty());
        // No domain in allowOut: kept and reported, but nothing is opened.
        let cidr_only = EgressPolicy::from_request(None, Some(&s(&["1.2.3.4"])), None, "")
            .expect("valid")
            .with_dns_servers(Some(&s(&["1.1.1.1"])), "")
            .expect("valid");
        assert_eq!(cidr_only.dns_servers_out(), s(&["1.1.1.1"]));
        assert!(cidr_only.open_dns_servers().is_empty());
        assert_eq!(
            cidr_only.audit_json()["dnsServers"],
            serde_json::json!(["1.1.1.1"])
        );
    }

    #[test]
    fn bad_dns_servers_name_their_field() {
        let base = || EgressPolicy::default();
        for bad in [
            "1.1.1.0/24",
            "dns.google",
            "1.1.1",
            "",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
        ] {
            let e = base()
                .with_dns_servers(Some(&s(&[bad])), "network.")
                .expect_err(bad);
            assert_eq!(e.field, "network.dnsServers", "{bad:?}");
            let e = base()
                .with_dns_servers(Some(&s(&[bad])), "")
                .expect_err(bad);
            assert_eq!(e.field, "dnsServers", "{bad:?}");
        }
        let e = base()
            .with_dns_servers(Some(&s(&["2001:4860:4860::8888"])), "")
            .expect_err("ipv6");
        assert!(e.message.contains("IPv6"), "{e}");
        let ten: Vec<String> = (1..=MAX_DNS_SERVERS)
            .map(|i| format!("9.9.9.{i}"))
            .collect();
        assert!(base().with_dns_servers(Some(&ten), "").is_ok());
        let eleven: Vec<String> = (1..=MAX_DNS_SERVERS + 1)
            .map(|i| format!("9.9.9.{i}"))
            .collect();
        let e = base()
            .with_dns_servers(Some(&eleven), "")
            .expect_err("too many");
        assert!(e.message.contains("at most 10"), "{e}");
    }

    #[test]
    fn egress_proxy_is_validated_and_reported_without_secrets() {
        let cfg = |address: &str| cella_api::EgressProxyConfig {
            address: address.into(),
            ..Default::default()
        };
        let p = EgressProxy::from_request(
            &cella_api::EgressProxyConfig {
                address: "Proxy.Example.com.:1080".into(),
                username: Some("u".into()),
                password: Some("p".into()),
                tls: Some(cella_api::EgressProxyTls {
                    enabled: true,
                    server_name: None,
                    ca_cert: Some("-----BEGIN CERTIFICATE-----\nx\n".into()),
                }),
            },
            "egressProxy",
        )
        .expect("valid");
        assert_eq!((p.host.as_str(), p.port), ("proxy.example.com", 1080));
        assert_eq!(
            p.tls.as_ref().map(|t| t.server_name.as_str()),
            Some("proxy.example.com")
        );
        let info = p.to_info();
        assert_eq!(info.password, None);
        assert_eq!(info.tls.as_ref().and_then(|t| t.ca_cert.clone()), None);
        assert_eq!(
            p.to_request().password.as_deref(),
            Some("p"),
            "kept for a paused record"
        );
        assert!(EgressProxy::from_request(&cfg("198.51.100.1:9"), "f").is_ok());
        for bad in [
            "proxy",
            "proxy:0",
            "proxy:70000",
            "[::1]:1080",
            "bad host:1",
            ":1080",
            "-x.test:1",
        ] {
            let e = EgressProxy::from_request(&cfg(bad), "network.egressProxy").expect_err(bad);
            assert_eq!(e.field, "network.egressProxy");
        }
        let no_user = cella_api::EgressProxyConfig {
            password: Some("p".into()),
            ..cfg("proxy:1")
        };
        assert!(EgressProxy::from_request(&no_user, "f").is_err());
        let long = cella_api::EgressProxyConfig {
            username: Some("u".repeat(256)),
            ..cfg("proxy:1")
        };
        assert!(EgressProxy::from_request(&long, "f").is_err());
        let off_with_fields = cella_api::EgressProxyConfig {
            tls: Some(cella_api::EgressProxyTls {
                enabled: false,
                server_name: Some("x.test".into()),
                ca_cert: None,
            }),
            ..cfg("proxy:1")
        };
        assert!(EgressProxy::from_request(&off_with_fields, "f").is_err());
        let not_pem = cella_api::EgressProxyConfig {
            tls: Some(cella_api::EgressProxyTls {
                enabled: true,
                server_name: None,
                ca_cert: Some("hello".into()),
            }),
            ..cfg("proxy:1")
        };
        assert!(EgressProxy::from_request(&not_pem, "f").is_err());
        // In the policy: omitted means none; the audit never carries the password.
        let pol = EgressPolicy::default()
            .with_egress_proxy(
                Some(&cella_api::EgressProxyConfig {
                    username: Some("u".into()),
                    password: Some("secret".into()),
                    ..cfg("proxy:1")
                }),
                "",
            )
            .expect("policy");
        assert!(!pol.audit_json().to_string().contains("secret"));
        assert!(
            EgressPolicy::default()
                .with_egress_proxy(None, "")
                .expect("none")
                .proxy
                .is_none()
        );
    }

    fn rules_json(v: serde_json::Value) -> cella_api::NetworkRules {
        serde_json::from_value(v).expect("rules")
    }

    fn parse_rules(v: serde_json::Value) -> Result<TransformRules, PolicyError> {
        TransformRules::from_request(Some(&rules_json(v)), &IamTokens::default(), "network.rules")
    }

    #[test]
    fn rules_match_hosts_wildcards_and_addresses_most_specific_last() {
        let r = parse_rules(serde_json::json!({
            "api.example.com": [{"transform": {"headers": {"Authorization": "exact", "X-A": "1"}}}],
            "*.example.com": [{"transform": {"headers": {"authorization": "wild", "X-W": "w"}}}],
            "198.51.100.0/24": [{"transform": {"headers": {"Authorization": "net", "X-N": "n"}}},
                                {"transform": {"headers": {"X-N": "n2"}}}]
        }))
        .expect("valid");
        let ip = Ipv4Addr::new(198, 51, 100, 7);
        let other_ip = Ipv4Addr::new(203, 0, 113, 1);
        let h = r.headers_for(Some("API.example.com."), ip);
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        // Exact beats wildcard beats address; a later rule of one key beats an earlier one.
        assert_eq!(get("authorization"), Some("exact"));
        assert_eq!(get("x-n"), Some("n2"));
        assert_eq!((get("x-a"), get("x-w")), (Some("1"), Some("w")));
        assert_eq!(h.iter().filter(|(k, _)| k == "authorization").count(), 1);
        // The wildcard does not match the apex; addresses match without a name.
        assert!(!r.matches(Some("example.com"), other_ip));
        assert!(r.matches(Some("x.y.example.com"), other_ip));
        assert!(r.matches(None, ip));
        assert!(!r.matches(None, other_ip));
        assert!(r.headers_for(Some("other.test"), other_ip).is_empty());
        assert!(TransformRules::default().is_empty());
    }

    #[test]
    fn rules_refuse_what_would_break_or_smuggle_requests() {
        let one = |name: &str, value: &str| {
            parse_rules(serde_json::json!({"api.example.com":
                [{"transform": {"headers": {name: value}}}]}))
        };
        for name in [
            "Host",
            "content-length",
            "Transfer-Encoding",
            "Connection",
            "Upgrade",
            "TE",
            "Proxy-Authorization",
            "bad name",
            "",
            "x:y",
        ] {
            let e = one(name, "v").expect_err(name);
            assert_eq!(e.field, "network.rules", "{name}");
        }
        for value in ["a\r\nInjected: 1", "a\nb", "nul\0"] {
            assert!(one("X-Ok", value).is_err(), "{value:?}");
        }
        assert!(one("X-Ok", "tab\tand spaces are fine").is_ok());
        // A workload token placeholder must name a registered token.
        let e = one("X", "Bearer ${e2b.identity.tokens.aws}").expect_err("unregistered");
        assert!(e.message.contains("aws"), "{e}");
        assert!(one("X", "${e2b.identity.other}").is_err());
        let many: serde_json::Map<String, serde_json::Value> = (0..11)
            .map(|i| (format!("h{i}.test"), serde_json::json!([])))
            .collect();
        assert!(parse_rules(many.into()).is_err());
        let headers: serde_json::Map<String, serde_json::Value> =
            (0..21).map(|i| (format!("x-{i}"), "v".into())).collect();
        assert!(
            parse_rules(serde_json::json!({"a.test": [{"transform": {"headers": headers}}]}))
                .is_err()
        );
        assert!(parse_rules(serde_json::json!({"2001:db8::/32": []})).is_err());
        assert!(parse_rules(serde_json::json!({"not a host": []})).is_err());
        assert!(parse_rules(serde_json::json!({"10.0.0.0/33": []})).is_err());
        // Unknown rule or transform fields are refused by the API types, not ignored.
        assert!(
            serde_json::from_value::<cella_api::NetworkRules>(
                serde_json::json!({"a.test": [{"block": true}]})
            )
            .is_err()
        );
        assert!(
            serde_json::from_value::<cella_api::NetworkRules>(
                serde_json::json!({"a.test": [{"transform": {"body": "x"}}]})
            )
            .is_err()
        );
    }

    #[test]
    fn rules_are_reported_without_values_and_kept_whole_for_the_paused_record() {
        let p = EgressPolicy::default()
            .with_rules(
                Some(&rules_json(serde_json::json!({"api.example.com":
                [{"transform": {"headers": {"Authorization": "Bearer s3cret"}}}]}))),
                "network.",
            )
            .expect("valid");
        assert!(p.tunnels());
        let info = serde_json::to_value(p.rules.to_info()).expect("json");
        assert_eq!(
            info,
            serde_json::json!({"api.example.com":
            [{"transform": {"headers": {"authorization": "***"}}}]})
        );
        let audit = p.audit_json().to_string();
        assert!(
            audit.contains("authorization") && !audit.contains("s3cret"),
            "{audit}"
        );
        let back = serde_json::to_value(p.rules.to_request()).expect("json");
        assert_eq!(
            back["api.example.com"][0]["transform"]["headers"]["authorization"],
            "Bearer s3cret"
        );
        // What the record gives back validates to the same rules.
        let again = TransformRules::from_request(p.rules.to_request().as_ref(), &p.iam, "rules")
            .expect("valid");
        assert_eq!(again, p.rules);
        assert!(!EgressPolicy::default().tunnels());
        assert_eq!(
            EgressPolicy::default()
                .with_rules(None, "")
                .expect("none")
                .rules,
            TransformRules::default()
        );
    }

    fn iam(v: serde_json::Value) -> Result<IamTokens, PolicyError> {
        IamTokens::from_request(Some(&serde_json::from_value(v).expect("iam")))
    }

    #[test]
    fn iam_tokens_validate_and_rules_may_name_them() {
        let tokens = iam(
            serde_json::json!({"tokens": {"aws": {"audience": "sts.amazonaws.com",
            "tokenType": "JWT-SVID"}}}),
        )
        .expect("valid");
        assert_eq!(tokens.audience("aws"), Some("sts.amazonaws.com"));
        for bad in [
            serde_json::json!({"tokens": {"aws": {"audience": "a", "tokenType": "OIDC"}}}),
            serde_json::json!({"tokens": {"a}b": {"audience": "a", "tokenType": "JWT-SVID"}}}),
            serde_json::json!({"tokens": {"": {"audience": "a", "tokenType": "JWT-SVID"}}}),
            serde_json::json!({"tokens": {"aws": {"audience": "", "tokenType": "JWT-SVID"}}}),
        ] {
            assert_eq!(iam(bad.clone()).expect_err("bad").field, "iam", "{bad}");
        }
        assert!(IamTokens::from_request(None).expect("none").is_empty());
        let rules = rules_json(serde_json::json!({"api.test": [{"transform": {"headers":
            {"Authorization": "Bearer ${e2b.identity.tokens.aws}"}}}]}));
        let p = EgressPolicy::default()
            .with_iam(tokens)
            .with_rules(Some(&rules), "network.")
            .expect("a registered name is fine");
        let (_, v) = &p.rules.headers_for(Some("api.test"), Ipv4Addr::LOCALHOST)[0];
        assert_eq!(v, "Bearer ${e2b.identity.tokens.aws}");
        let filled = fill_iam_placeholders(v, |n| (n == "aws").then(|| "JWT".to_string()));
        assert_eq!(filled, "Bearer JWT");
        assert!(
            EgressPolicy::default()
                .with_rules(Some(&rules), "network.")
                .is_err()
        );
    }

    #[test]
    fn iam_placeholders_are_found_and_filled_exactly() {
        assert_eq!(iam_placeholders("plain").expect("ok"), Vec::<&str>::new());
        assert_eq!(
            iam_placeholders("${e2b.identity.tokens.a}-${e2b.identity.tokens.b}").expect("ok"),
            vec!["a", "b"]
        );
        assert!(iam_placeholders("${e2b.identity.tokens.a").is_err());
        assert!(iam_placeholders("${e2b.identity.x}").is_err());
        let mut asked = Vec::new();
        let out =
            fill_iam_placeholders("x${e2b.identity.tokens.a}y${e2b.identity.tokens.b}z", |n| {
                asked.push(n.to_string());
                (n == "a").then(|| "A".to_string())
            });
        assert_eq!(out, "xAy${e2b.identity.tokens.b}z");
        assert_eq!(asked, ["a", "b"]);
        assert_eq!(
            fill_iam_placeholders("no placeholder", |_| None),
            "no placeholder"
        );
    }
}
