//! The generated nftables scripts against the real kernel (root and `nft` needed; skips
//! otherwise): every transaction applies, and the table is gone afterwards.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use cella_core::egress::{EgressPolicy, Ipv4Cidr};
use cella_net::nft::{Attachment, Ruleset};

fn nft(script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(script.as_bytes()).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}\n--- script:\n{script}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn list(table: &str) -> Option<String> {
    let out = Command::new("nft")
        .args(["list", "table", "inet", table])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn skip() -> Option<&'static str> {
    if !std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
    {
        return Some("not root");
    }
    if Command::new("nft").arg("--version").output().is_err() {
        return Some("nft not installed");
    }
    None
}

#[test]
fn scripts_apply_and_clean_up() {
    if let Some(why) = skip() {
        eprintln!("SKIP scripts_apply_and_clean_up: {why}");
        return;
    }
    let rs = Ruleset {
        table: format!("cella_test{}", std::process::id()),
        prefix: "cntest00".into(),
        pool: Ipv4Cidr::parse("10.246.0.0/16").expect("cidr"),
        uplink: Some("lo".into()),
        log_group: Some(4242),
    };
    let att = Attachment {
        index: 7,
        ifname: "cntest007".into(),
        host: Ipv4Addr::new(10, 246, 0, 29),
        sandbox: Ipv4Addr::new(10, 246, 0, 30),
    };
    let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let policy = EgressPolicy::from_request(
        None,
        Some(&a(&["10.1.0.0/16", "198.51.100.0/24", "allowed.test"])),
        Some(&a(&["0.0.0.0/0"])),
        "",
    )
    .and_then(|p| p.with_dns_servers(Some(&a(&["10.9.9.9", "1.1.1.1", "198.51.100.53"])), ""))
    .expect("policy");
    nft(&rs.create()).expect("create");
    nft(&rs.create()).expect("create again replaces");
    nft(&rs.attach(&att, &policy)).expect("attach");
    let listed = list(&rs.table).expect("listed");
    assert!(listed.contains("\"cntest007\" : jump sb7"), "{listed}");
    assert!(listed.contains("10.1.0.0/16"), "{listed}");
    // Open dnsServers: a private one in the private allow set, a public one in the other.
    assert!(
        listed.contains("10.9.9.9") && listed.contains("1.1.1.1"),
        "{listed}"
    );
    assert!(
        listed.contains("tcp dport 53 iifname . ip daddr @resolvers accept"),
        "{listed}"
    );
    nft(&rs.update(&att, &EgressPolicy::default())).expect("update to empty");
    nft(&rs.update(&att, &policy)).expect("update");
    // The tunnel hook goes on and off in any order, and twice in a row.
    let proxied = policy
        .clone()
        .with_egress_proxy(
            Some(&cella_api::EgressProxyConfig {
                address: "198.51.100.1:1080".into(),
                ..Default::default()
            }),
            "",
        )
        .expect("proxy");
    nft(&rs.update(&att, &proxied)).expect("tunnel on");
    nft(&rs.update(&att, &proxied)).expect("tunnel on again");
    let listed = list(&rs.table).expect("listed");
    assert!(
        listed.contains("\"cntest007\" : jump sb7_pre") && listed.contains("redirect to :1080"),
        "{listed}"
    );
    nft(&rs.update(&att, &policy)).expect("tunnel off");
    let listed = list(&rs.table).expect("listed");
    assert!(!listed.contains("jump sb7_pre"), "{listed}");
    nft(&rs.update(&att, &proxied)).expect("tunnel on for detach");
    nft(&rs
        .learn(7, &[(Ipv4Addr::new(198, 51, 100, 10), 60)])
        .expect("script"))
    .expect("learn");
    // Learning an address twice is fine.
    nft(&rs
        .learn(7, &[(Ipv4Addr::new(198, 51, 100, 10), 60)])
        .expect("script"))
    .expect("relearn");
    nft(&rs.detach(&att)).expect("detach");
    let listed = list(&rs.table).expect("listed");
    assert!(!listed.contains("sb7"), "{listed}");
    nft(&rs.delete()).expect("delete");
    assert!(list(&rs.table).is_none(), "table removed");
}
