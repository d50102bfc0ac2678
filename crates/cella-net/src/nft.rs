//! The nftables rules, as text for `nft -f -` (each script is one atomic transaction).
//!
//! One `inet` table per server instance holds everything, so a restart deletes and recreates
//! it in one transaction and nothing of a previous run survives. Verdict order inside a
//! sandbox's chain (first match wins):
//!
//! 1. not IPv4, or a source address that is not the sandbox's own: drop (IPv6 is blocked
//!    completely; no spoofing another sandbox's address);
//! 2. established/related: accept;
//! 3. (with `--egress-interface`) leaving by another interface: drop;
//! 4. another sandbox (the pool): drop, whatever the rules say;
//! 5. allowed CIDRs that lie *inside* an always-blocked range: accept (the only way to reach
//!    a private range is to name it; an open `dnsServers` entry counts as naming its /32);
//! 6. always-blocked ranges (loopback, link-local with 169.254.169.254, RFC 1918, CGNAT,
//!    multicast, reserved): drop;
//! 7. other allowed CIDRs (with the open `dnsServers`), then addresses learned from allowed
//!    domains: accept;
//! 8. denied CIDRs: drop;
//! 9. accept.
//!
//! Rules 1-3 live in `sbN` (forward hook) and `sbN_pre`; 4-9 in `sbN_dst`, which both jump
//! to. `sbN_pre` judges, in prerouting, the new TCP of a sandbox with an `egressProxy` (not
//! rule 3: before routing there is no output interface); what it accepts is redirected to the
//! tunnel listener on the sandbox's host end ([`crate::socks::PROXY_PORT`]), so the proxy only
//! ever sees connections the rules allow.
//!
//! Traffic from a sandbox to the host itself (the input hook) is dropped except DNS (UDP and
//! TCP port 53) and the tunnel port on the sandbox's own host end; new connections *into*
//! sandbox interfaces are dropped. `dnsServers` entries cannot open the host or another sandbox: the
//! host is the input hook, and the pool is dropped before any allow rule.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use cella_core::egress::{EgressPolicy, Ipv4Cidr};

/// Destinations denied unless a sandbox's `allowOut` names a CIDR inside them (or an open
/// `dnsServers` entry one address).
pub const BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Shortest learned-address lifetime: clients cache answers a bit past their TTL.
pub const MIN_LEARNED_SECS: u32 = 300;
/// Longest learned-address lifetime.
pub const MAX_LEARNED_SECS: u32 = 86_400;

/// Names and settings of one server instance's table.
#[derive(Debug, Clone)]
pub struct Ruleset {
    /// Table name (`cella_<instance>`).
    pub table: String,
    /// Host interface name prefix of this instance's sandboxes.
    pub prefix: String,
    /// The address pool.
    pub pool: Ipv4Cidr,
    /// Only interface egress may leave by (`None`: any).
    pub uplink: Option<String>,
    /// NFLOG group the verdict rules log new flows to (`None`: no connection audit).
    pub log_group: Option<u16>,
}

/// One attached sandbox as the rules see it.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// Slot index (chain and set names).
    pub index: u32,
    /// Host interface name.
    pub ifname: String,
    /// Host end address (the resolver).
    pub host: Ipv4Addr,
    /// Sandbox address.
    pub sandbox: Ipv4Addr,
}

impl Ruleset {
    /// The whole table, replacing any previous one (also a previous run's).
    pub fn create(&self) -> String {
        let t = &self.table;
        let p = &self.prefix;
        let pool = self.pool;
        format!(
            "table inet {t}\n\
             delete table inet {t}\n\
             table inet {t} {{\n\
             \tset blocked {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {blocked} }} }}\n\
             \tmap sandboxes {{ type ifname : verdict; }}\n\
             \tset resolvers {{ type ifname . ipv4_addr; }}\n\
             \tmap proxied {{ type ifname : verdict; }}\n\
             \tset proxied_if {{ type ifname; }}\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname \"{p}*\" jump from_sandbox\n\
             \t}}\n\
             \tchain from_sandbox {{\n\
             \t\tudp dport 53 iifname . ip daddr @resolvers accept\n\
             \t\ttcp dport 53 iifname . ip daddr @resolvers accept\n\
             \t\ttcp dport {proxy} iifname . ip daddr @resolvers accept\n\
             \t\tcounter drop\n\
             \t}}\n\
             \tchain prerouting {{\n\
             \t\ttype filter hook prerouting priority -110; policy accept;\n\
             \t\tiifname \"{p}*\" meta l4proto tcp fib daddr type != local iifname vmap @proxied\n\
             \t}}\n\
             \tchain tunnel {{\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tiifname \"{p}*\" meta l4proto tcp fib daddr type != local iifname @proxied_if redirect to :{proxy}\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"{p}*\" jump egress\n\
             \t\toifname \"{p}*\" ct state established,related accept\n\
             \t\toifname \"{p}*\" counter drop\n\
             \t}}\n\
             \tchain egress {{\n\
             \t\tiifname vmap @sandboxes\n\
             \t\tcounter drop\n\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {pool} oifname != \"{p}*\" masquerade\n\
             \t}}\n\
             }}\n",
            blocked = BLOCKED.join(", "),
            proxy = crate::socks::PROXY_PORT,
        )
    }

    /// Delete the table.
    pub fn delete(&self) -> String {
        format!("table inet {t}\ndelete table inet {t}\n", t = self.table)
    }

    /// Add a sandbox's chain and sets and hook them up, with `policy`'s rules.
    pub fn attach(&self, a: &Attachment, policy: &EgressPolicy) -> String {
        let t = &self.table;
        let n = a.index;
        let mut s = String::new();
        for set in ["allow_priv", "allow", "deny"] {
            let _ = writeln!(
                s,
                "add set inet {t} sb{n}_{set} {{ type ipv4_addr; flags interval; auto-merge; }}"
            );
        }
        let _ = writeln!(
            s,
            "add set inet {t} sb{n}_dns {{ type ipv4_addr; flags timeout; }}"
        );
        let _ = writeln!(s, "add chain inet {t} sb{n}_dst");
        let _ = writeln!(s, "add chain inet {t} sb{n}");
        let _ = writeln!(s, "add chain inet {t} sb{n}_pre");
        // Only the first packet of a flow gets past `established`: log it with the verdict.
        let log = |verdict: &str| match self.log_group {
            Some(g) => format!("log prefix \"sb{n} {verdict}\" group {g} "),
            None => String::new(),
        };
        let (allow, deny, blocked) = (log("allow"), log("deny"), log("blocked"));
        // sb{n} (forward hook) and sb{n}_pre (prerouting: a tunneled sandbox's new TCP, before
        // the redirect) share the source checks and jump to the same destination verdicts.
        let main = format!("sb{n}");
        for chain in [main.clone(), format!("sb{n}_pre")] {
            let mut rule = |r: &str| {
                let _ = writeln!(s, "add rule inet {t} {chain} {r}");
            };
            rule("meta nfproto != ipv4 counter drop");
            rule(&format!("ip saddr != {} counter drop", a.sandbox));
            rule("ct state established,related accept");
            // Before routing there is no output interface; a tunneled connection leaves
            // from the host itself.
            if let Some(up) = self.uplink.as_ref().filter(|_| chain == main) {
                rule(&format!("oifname != \"{up}\" {blocked}counter drop"));
            }
            rule(&format!("jump sb{n}_dst"));
        }
        let mut rule = |r: &str| {
            let _ = writeln!(s, "add rule inet {t} sb{n}_dst {r}");
        };
        rule(&format!("ip daddr {} {blocked}counter drop", self.pool));
        rule(&format!("ip daddr @sb{n}_allow_priv {allow}accept"));
        rule(&format!("ip daddr @blocked {blocked}counter drop"));
        rule(&format!("ip daddr @sb{n}_allow {allow}accept"));
        rule(&format!("ip daddr @sb{n}_dns {allow}accept"));
        rule(&format!("ip daddr @sb{n}_deny {deny}counter drop"));
        rule(&format!("{allow}accept"));
        s.push_str(&self.elements(n, policy));
        let _ = writeln!(
            s,
            "add element inet {t} sandboxes {{ \"{}\" : jump sb{n} }}",
            a.ifname
        );
        let _ = writeln!(
            s,
            "add element inet {t} resolvers {{ \"{}\" . {} }}",
            a.ifname, a.host
        );
        s.push_str(&self.tunnel(a, policy.tunnels()));
        s
    }

    /// Hook the sandbox's TCP into the tunnel (`on`) or out of it, whatever it was before:
    /// adding an element and deleting it again in one transaction never fails.
    fn tunnel(&self, a: &Attachment, on: bool) -> String {
        let t = &self.table;
        let (n, ifname) = (a.index, &a.ifname);
        let add = format!(
            "add element inet {t} proxied {{ \"{ifname}\" : jump sb{n}_pre }}\n\
             add element inet {t} proxied_if {{ \"{ifname}\" }}\n"
        );
        let del = format!(
            "delete element inet {t} proxied {{ \"{ifname}\" }}\n\
             delete element inet {t} proxied_if {{ \"{ifname}\" }}\n"
        );
        if on {
            format!("{add}{del}{add}")
        } else {
            format!("{add}{del}")
        }
    }

    /// Replace a sandbox's rules (and forget learned addresses) in one transaction.
    pub fn update(&self, a: &Attachment, policy: &EgressPolicy) -> String {
        let t = &self.table;
        let index = a.index;
        let mut s = self.tunnel(a, policy.tunnels());
        for set in ["allow_priv", "allow", "deny", "dns"] {
            let _ = writeln!(s, "flush set inet {t} sb{index}_{set}");
        }
        s.push_str(&self.elements(index, policy));
        s
    }

    /// Remove a sandbox's chain, sets and hooks.
    pub fn detach(&self, a: &Attachment) -> String {
        let t = &self.table;
        let n = a.index;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "delete element inet {t} sandboxes {{ \"{}\" }}",
            a.ifname
        );
        let _ = writeln!(
            s,
            "delete element inet {t} resolvers {{ \"{}\" . {} }}",
            a.ifname, a.host
        );
        s.push_str(&self.tunnel(a, false));
        let chains = [format!("sb{n}"), format!("sb{n}_pre"), format!("sb{n}_dst")];
        for chain in &chains {
            let _ = writeln!(s, "flush chain inet {t} {chain}");
        }
        for chain in &chains {
            let _ = writeln!(s, "delete chain inet {t} {chain}");
        }
        for set in ["allow_priv", "allow", "deny", "dns"] {
            let _ = writeln!(s, "delete set inet {t} sb{n}_{set}");
        }
        s
    }

    /// Add addresses an allowed domain resolved to, each for `ttl` seconds (clamped).
    pub fn learn(&self, index: u32, addrs: &[(Ipv4Addr, u32)]) -> Option<String> {
        if addrs.is_empty() {
            return None;
        }
        let items: Vec<String> = addrs
            .iter()
            .map(|(ip, ttl)| {
                format!(
                    "{ip} timeout {}s",
                    (*ttl).clamp(MIN_LEARNED_SECS, MAX_LEARNED_SECS)
                )
            })
            .collect();
        // `add` keeps an existing element's timeout: a re-resolved address keeps its first
        // lifetime (at least MIN_LEARNED_SECS).
        Some(format!(
            "add element inet {} sb{index}_dns {{ {} }}\n",
            self.table,
            items.join(", ")
        ))
    }

    fn elements(&self, n: u32, policy: &EgressPolicy) -> String {
        let blocked: Vec<Ipv4Cidr> = BLOCKED
            .iter()
            .filter_map(|b| Ipv4Cidr::parse(b).ok())
            .collect();
        let is_private = |c: &Ipv4Cidr| blocked.iter().any(|b| b.contains_net(c));
        let (mut private, mut public): (Vec<Ipv4Cidr>, Vec<Ipv4Cidr>) =
            policy.allow_cidrs.iter().partition(|c| is_private(c));
        // Open dnsServers are explicit allows of one address; one a CIDR of the same set
        // covers already is skipped (no overlapping elements in one interval set).
        for ip in policy.open_dns_servers() {
            let Some(one) = Ipv4Cidr::new(*ip, 32) else {
                continue;
            };
            let set = if is_private(&one) {
                &mut private
            } else {
                &mut public
            };
            if !set.iter().any(|c| c.contains_net(&one)) {
                set.push(one);
            }
        }
        let mut s = String::new();
        for (set, items) in [
            ("allow_priv", private),
            ("allow", public),
            ("deny", policy.deny_cidrs.clone()),
        ] {
            if !items.is_empty() {
                let list: Vec<String> = items.iter().map(ToString::to_string).collect();
                let _ = writeln!(
                    s,
                    "add element inet {} sb{n}_{set} {{ {} }}",
                    self.table,
                    list.join(", ")
                );
            }
        }
        s
    }
}

/// Interface names nft accepts verbatim inside quotes.
pub fn safe_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs() -> Ruleset {
        Ruleset {
            table: "cella_i0123".into(),
            prefix: "cn0123ab".into(),
            pool: Ipv4Cidr::parse("10.245.0.0/16").expect("cidr"),
            uplink: Some("fake0".into()),
            log_group: None,
        }
    }

    fn att() -> Attachment {
        Attachment {
            index: 3,
            ifname: "cn0123ab3".into(),
            host: Ipv4Addr::new(10, 245, 0, 13),
            sandbox: Ipv4Addr::new(10, 245, 0, 14),
        }
    }

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        let a: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        let d: Vec<String> = deny.iter().map(|s| s.to_string()).collect();
        EgressPolicy::from_request(None, Some(&a), Some(&d), "").expect("policy")
    }

    #[test]
    fn table_is_replaced_atomically_and_guards_the_host() {
        let s = rs().create();
        assert!(s.starts_with("table inet cella_i0123\ndelete table inet cella_i0123\n"));
        assert!(
            s.contains("169.254.0.0/16") && s.contains("10.0.0.0/8") && s.contains("224.0.0.0/4")
        );
        assert!(s.contains("iifname \"cn0123ab*\" jump from_sandbox"));
        assert!(s.contains(
            "udp dport 53 iifname . ip daddr @resolvers accept\n\t\t\
             tcp dport 53 iifname . ip daddr @resolvers accept\n\t\t\
             tcp dport 1080 iifname . ip daddr @resolvers accept\n\t\tcounter drop"
        ));
        // Tunneled TCP: judged before the redirect, redirected only when not for the host.
        assert!(s.contains(
            "type filter hook prerouting priority -110; policy accept;\n\t\t\
             iifname \"cn0123ab*\" meta l4proto tcp fib daddr type != local iifname vmap @proxied"
        ));
        assert!(s.contains(
            "iifname \"cn0123ab*\" meta l4proto tcp fib daddr type != local iifname @proxied_if \
             redirect to :1080"
        ));
        assert!(
            s.contains("oifname \"cn0123ab*\" counter drop"),
            "no new connections into sandboxes"
        );
        assert!(s.contains("ip saddr 10.245.0.0/16 oifname != \"cn0123ab*\" masquerade"));
    }

    #[test]
    fn verdict_order_puts_allow_before_deny_and_blocked_ranges_first() {
        let s = rs().attach(
            &att(),
            &policy(
                &["10.1.2.0/24", "0.0.0.0/0", "allowed.test"],
                &["0.0.0.0/0", "203.0.113.0/24"],
            ),
        );
        let pos = |needle: &str| {
            s.find(needle)
                .unwrap_or_else(|| panic!("{needle} missing in\n{s}"))
        };
        assert!(pos("meta nfproto != ipv4 counter drop") < pos("ct state established"));
        assert!(pos("ip saddr != 10.245.0.14 counter drop") < pos("ct state established"));
        assert!(pos("oifname != \"fake0\"") < pos("ip daddr 10.245.0.0/16 counter drop"));
        assert!(pos("ip daddr 10.245.0.0/16 counter drop") < pos("@sb3_allow_priv accept"));
        assert!(pos("@sb3_allow_priv accept") < pos("@blocked counter drop"));
        assert!(pos("@blocked counter drop") < pos("@sb3_allow accept"));
        assert!(pos("@sb3_allow accept") < pos("@sb3_dns accept"));
        assert!(pos("@sb3_dns accept") < pos("@sb3_deny counter drop"));
        // 10.1.2.0/24 names a private range: it may open it; 0.0.0.0/0 may not.
        assert!(s.contains("add element inet cella_i0123 sb3_allow_priv { 10.1.2.0/24 }"));
        assert!(s.contains("add element inet cella_i0123 sb3_allow { 0.0.0.0/0 }"));
        assert!(s.contains("sb3_deny { 0.0.0.0/0, 203.0.113.0/24 }"));
        assert!(s.contains("sandboxes { \"cn0123ab3\" : jump sb3 }"));
        assert!(s.contains("resolvers { \"cn0123ab3\" . 10.245.0.13 }"));
        assert!(
            s.trim_end().lines().all(|l| !l.contains("{  }")),
            "no empty element lists"
        );
    }

    #[test]
    fn open_dns_servers_are_explicit_allows_of_one_address() {
        let with = |allow: &[&str], servers: Option<&[&str]>| {
            let s: Option<Vec<String>> = servers.map(|v| v.iter().map(|x| x.to_string()).collect());
            policy(allow, &["0.0.0.0/0"])
                .with_dns_servers(s.as_deref(), "")
                .expect("servers")
        };
        // Default with a domain: 8.8.8.8 opens (public set).
        let s = rs().update(&att(), &with(&["allowed.test"], None));
        assert!(
            s.contains("add element inet cella_i0123 sb3_allow { 8.8.8.8/32 }"),
            "{s}"
        );
        // A resolver in a blocked range counts as naming it; one inside an allowed CIDR is
        // not repeated.
        let s = rs().update(
            &att(),
            &with(
                &["allowed.test", "1.1.0.0/16"],
                Some(&["1.1.1.1", "192.168.1.53", "9.9.9.9"]),
            ),
        );
        assert!(s.contains("sb3_allow_priv { 192.168.1.53/32 }"), "{s}");
        assert!(s.contains("sb3_allow { 1.1.0.0/16, 9.9.9.9/32 }"), "{s}");
        // [] opens none; without a domain in allowOut they have no effect.
        let s = rs().update(&att(), &with(&["allowed.test"], Some(&[])));
        assert!(!s.contains("add element inet cella_i0123 sb3_allow"), "{s}");
        let s = rs().update(&att(), &with(&["1.2.3.4"], Some(&["1.1.1.1"])));
        assert!(!s.contains("1.1.1.1"), "{s}");
        assert!(s.contains("sb3_allow { 1.2.3.4/32 }"), "{s}");
        // 0.0.0.0/0 does not open a private resolver; the entry itself does.
        let s = rs().attach(
            &att(),
            &with(
                &["allowed.test", "0.0.0.0/0"],
                Some(&["10.9.9.9", "1.1.1.1"]),
            ),
        );
        assert!(s.contains("sb3_allow_priv { 10.9.9.9/32 }"), "{s}");
        assert!(s.contains("sb3_allow { 0.0.0.0/0 }"), "{s}");
    }

    #[test]
    fn new_flows_are_logged_with_their_verdict() {
        let mut r = rs();
        r.log_group = Some(77);
        let s = r.attach(&att(), &policy(&[], &["0.0.0.0/0"]));
        assert!(
            s.contains("ip daddr @sb3_allow log prefix \"sb3 allow\" group 77 accept"),
            "{s}"
        );
        assert!(s.contains("ip daddr @blocked log prefix \"sb3 blocked\" group 77 counter drop"));
        assert!(s.contains("ip daddr @sb3_deny log prefix \"sb3 deny\" group 77 counter drop"));
        assert!(s.contains(
            "add rule inet cella_i0123 sb3_dst log prefix \"sb3 allow\" group 77 accept"
        ));
        assert!(
            !s.contains("established,related log"),
            "established flows are not logged"
        );
    }

    #[test]
    fn forward_and_prerouting_chains_share_the_destination_verdicts() {
        let s = rs().attach(&att(), &policy(&[], &["0.0.0.0/0"]));
        for chain in ["sb3", "sb3_pre"] {
            assert!(
                s.contains(&format!("add rule inet cella_i0123 {chain} jump sb3_dst")),
                "{s}"
            );
            assert!(
                s.contains(&format!(
                    "add rule inet cella_i0123 {chain} ip saddr != 10.245.0.14 counter drop"
                )),
                "{s}"
            );
        }
        // The uplink is known only after routing: checked in the forward chain alone.
        assert!(
            s.contains("add rule inet cella_i0123 sb3 oifname != \"fake0\""),
            "{s}"
        );
        assert!(!s.contains("sb3_pre oifname"), "{s}");
        // Without a proxy the sandbox is hooked out of the tunnel.
        assert!(
            s.ends_with(
                "add element inet cella_i0123 proxied { \"cn0123ab3\" : jump sb3_pre }\n\
             add element inet cella_i0123 proxied_if { \"cn0123ab3\" }\n\
             delete element inet cella_i0123 proxied { \"cn0123ab3\" }\n\
             delete element inet cella_i0123 proxied_if { \"cn0123ab3\" }\n"
            ),
            "{s}"
        );
        let proxied = policy(&[], &[])
            .with_egress_proxy(
                Some(&cella_api::EgressProxyConfig {
                    address: "198.51.100.1:1080".into(),
                    ..Default::default()
                }),
                "",
            )
            .expect("proxy");
        let s = rs().update(&att(), &proxied);
        assert!(
            s.starts_with(
                "add element inet cella_i0123 proxied { \"cn0123ab3\" : jump sb3_pre }\n\
             add element inet cella_i0123 proxied_if { \"cn0123ab3\" }\n\
             delete element inet cella_i0123 proxied { \"cn0123ab3\" }\n\
             delete element inet cella_i0123 proxied_if { \"cn0123ab3\" }\n\
             add element inet cella_i0123 proxied { \"cn0123ab3\" : jump sb3_pre }\n\
             add element inet cella_i0123 proxied_if { \"cn0123ab3\" }\n\
             flush set"
            ),
            "{s}"
        );
        // Rules alone (no proxy) tunnel too: the listener rewrites or relays.
        let rules: cella_api::NetworkRules = serde_json::from_value(serde_json::json!(
            {"api.test": [{"transform": {"headers": {"X-Key": "v"}}}]}))
        .expect("rules");
        let ruled = policy(&[], &[])
            .with_rules(Some(&rules), "")
            .expect("rules");
        assert_eq!(rs().update(&att(), &ruled), s);
        let d = rs().detach(&att());
        assert!(
            d.find("delete chain inet cella_i0123 sb3_pre")
                < d.find("delete chain inet cella_i0123 sb3_dst"),
            "{d}"
        );
    }

    #[test]
    fn update_flushes_every_set_then_refills() {
        let s = rs().update(&att(), &policy(&[], &["203.0.113.0/24"]));
        let lines: Vec<&str> = s.lines().filter(|l| !l.contains(" proxied")).collect();
        assert_eq!(lines.len(), 5, "{s}");
        assert!(
            lines[..4]
                .iter()
                .all(|l| l.starts_with("flush set inet cella_i0123 sb3_"))
        );
        assert_eq!(
            lines[4],
            "add element inet cella_i0123 sb3_deny { 203.0.113.0/24 }"
        );
    }

    #[test]
    fn detach_removes_hooks_before_the_chain_and_sets() {
        let s = rs().detach(&att());
        let pos = |n: &str| s.find(n).unwrap_or(usize::MAX);
        assert!(pos("delete element inet cella_i0123 sandboxes") < pos("delete chain"));
        assert!(pos("flush chain") < pos("delete chain"));
        assert!(pos("delete chain") < pos("delete set inet cella_i0123 sb3_dns"));
    }

    #[test]
    fn learned_addresses_get_clamped_timeouts() {
        let s = rs()
            .learn(
                3,
                &[
                    (Ipv4Addr::new(198, 51, 100, 10), 5),
                    (Ipv4Addr::new(1, 1, 1, 1), 999_999),
                ],
            )
            .expect("script");
        assert_eq!(
            s,
            "add element inet cella_i0123 sb3_dns { 198.51.100.10 timeout 300s, 1.1.1.1 timeout 86400s }\n"
        );
        assert!(rs().learn(3, &[]).is_none());
        assert!(safe_ifname("eth0") && !safe_ifname("a\"b") && !safe_ifname("waytoolonginterface"));
    }
}
