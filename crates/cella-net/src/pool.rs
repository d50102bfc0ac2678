//! The per-server address pool: one /30 per sandbox with egress (network, host end, sandbox
//! end, broadcast), so every sandbox has its own point-to-point link and a host address that
//! is its resolver. The pool must not overlap any route the host already has, or sandbox
//! traffic would shadow (or be shadowed by) a real network; that is checked against the
//! kernel's routing table at start.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use cella_core::egress::Ipv4Cidr;

/// One sandbox's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Index in the pool (part of the host interface name).
    pub index: u32,
    /// Host end: gateway and DNS resolver of the sandbox.
    pub host: Ipv4Addr,
    /// Sandbox end (`eth0`).
    pub sandbox: Ipv4Addr,
}

/// Free/used /30 slots of a pool.
#[derive(Debug)]
pub struct Pool {
    net: Ipv4Cidr,
    used: BTreeMap<u32, String>,
}

impl Pool {
    /// A pool over `net` (a /16 to /29).
    pub fn new(net: Ipv4Cidr) -> Result<Pool, String> {
        if !(8..=29).contains(&net.prefix()) {
            return Err(format!(
                "egress pool {net} must be between a /8 and a /29 (each sandbox takes a /30)"
            ));
        }
        Ok(Pool {
            net,
            used: BTreeMap::new(),
        })
    }

    /// The pool's network.
    pub fn net(&self) -> Ipv4Cidr {
        self.net
    }

    /// Number of slots.
    pub fn capacity(&self) -> u32 {
        (self.net.size() / 4).min(u64::from(u32::MAX)) as u32
    }

    /// Take the lowest free slot for `owner`.
    pub fn take(&mut self, owner: &str) -> Option<Slot> {
        let index = (0..self.capacity()).find(|i| !self.used.contains_key(i))?;
        self.used.insert(index, owner.to_string());
        Some(self.slot(index))
    }

    /// Free a slot.
    pub fn free(&mut self, index: u32) {
        self.used.remove(&index);
    }

    /// The addresses of slot `index`.
    pub fn slot(&self, index: u32) -> Slot {
        let base = u32::from(self.net.addr()) + index * 4;
        Slot {
            index,
            host: Ipv4Addr::from(base + 1),
            sandbox: Ipv4Addr::from(base + 2),
        }
    }
}

/// IPv4 routes of the main table (`/proc/net/route`: hex little-endian destination and mask).
pub fn host_routes(proc_root: &Path) -> std::io::Result<Vec<(String, Ipv4Cidr)>> {
    let text = std::fs::read_to_string(proc_root.join("net/route"))?;
    Ok(parse_routes(&text))
}

fn parse_routes(text: &str) -> Vec<(String, Ipv4Cidr)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let iface = f.first()?;
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            // Printed as the in-memory (network order) bytes read as a little-endian u32.
            let prefix = mask.count_ones();
            let addr = Ipv4Addr::from(dest.to_le_bytes());
            Some((iface.to_string(), Ipv4Cidr::new(addr, prefix as u8)?))
        })
        .collect()
}

/// Routes other than the default route that overlap `net`, except on interfaces whose name
/// starts with `own_prefix` (this server's own sandboxes).
pub fn conflicts(routes: &[(String, Ipv4Cidr)], net: Ipv4Cidr, own_prefix: &str) -> Vec<String> {
    routes
        .iter()
        .filter(|(iface, r)| r.prefix() > 0 && !iface.starts_with(own_prefix) && r.overlaps(&net))
        .map(|(iface, r)| format!("{r} dev {iface}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        Ipv4Cidr::parse(s).expect("cidr")
    }

    #[test]
    fn slots_are_disjoint_30s() {
        let mut p = Pool::new(cidr("10.245.0.0/28")).expect("pool");
        assert_eq!(p.capacity(), 4);
        let a = p.take("a").expect("slot");
        let b = p.take("b").expect("slot");
        assert_eq!(a.host, Ipv4Addr::new(10, 245, 0, 1));
        assert_eq!(a.sandbox, Ipv4Addr::new(10, 245, 0, 2));
        assert_eq!(b.host, Ipv4Addr::new(10, 245, 0, 5));
        p.take("c").expect("slot");
        p.take("d").expect("slot");
        assert!(p.take("e").is_none(), "exhausted");
        p.free(a.index);
        assert_eq!(p.take("f").map(|s| s.index), Some(0), "reused");
        assert!(Pool::new(cidr("10.0.0.0/30")).is_err());
    }

    #[test]
    fn routes_parse_and_conflicts_are_found() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
            cnab12340\t0000F50A\t00000000\t0001\t0\t0\t0\tFCFFFFFF\t0\t0\t0\n";
        let routes = parse_routes(text);
        assert_eq!(routes.len(), 4);
        assert_eq!(routes[1].1, cidr("192.0.2.0/24"));
        assert_eq!(routes[2].1, cidr("172.17.0.0/16"));
        assert_eq!(routes[3].1, cidr("10.245.0.0/30"));
        assert!(conflicts(&routes, cidr("10.245.0.0/16"), "cnab1234").is_empty());
        assert_eq!(
            conflicts(&routes, cidr("172.16.0.0/12"), "cnab1234"),
            vec!["172.17.0.0/16 dev docker0".to_string()]
        );
        assert_eq!(conflicts(&routes, cidr("10.245.0.0/16"), "other").len(), 1);
    }
}
