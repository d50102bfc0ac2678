//! `HostNet` against the real kernel (root, `ip`, `nft`, `python3`; skips otherwise): attach a
//! network namespace, resolve through the forwarder from inside it (an allowed name is
//! forwarded to a local fake upstream and its address learned into the sandbox's set, another
//! name is refused without asking upstream; the same over TCP, asked upstream over TCP),
//! replace the rules, release, shut down — and nothing remains.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cella_core::egress::{Egress, EgressPolicy, Ipv4Cidr};
use cella_core::store::{AuditQuery, Store};
use cella_net::{HostNet, NetConfig};
use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::{Name, RData, Record, RecordType};

fn skip() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        return Some("not root".into());
    }
    for tool in ["nft", "ip", "python3"] {
        if Command::new(tool).arg("--version").output().is_err()
            && Command::new(tool).arg("-V").output().is_err()
        {
            return Some(format!("{tool} not installed"));
        }
    }
    None
}

fn sh(args: &[&str]) -> (bool, String) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn query_bytes(name: &str) -> String {
    let mut m = Message::new();
    m.set_id(4242);
    m.set_message_type(MessageType::Query);
    m.set_recursion_desired(true);
    m.add_query(Query::query(
        Name::from_ascii(name).expect("name"),
        RecordType::A,
    ));
    m.to_vec()
        .expect("encode")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fake upstream's answer to `raw`: every question gets one A record, `addr`.
fn reply(raw: &[u8], addr: Ipv4Addr) -> Option<Vec<u8>> {
    let q = Message::from_vec(raw).ok()?;
    let mut r = Message::new();
    r.set_id(q.id());
    r.set_message_type(MessageType::Response);
    for query in q.queries() {
        r.add_query(query.clone());
        r.add_answer(Record::from_rdata(
            query.name().clone(),
            30,
            RData::A(addr.into()),
        ));
    }
    r.to_vec().ok()
}

/// Send a query over TCP from inside `ns` to `server`:53; returns the response code and the
/// last answer's address (`-` without answers).
fn ask_tcp_from(ns: &str, server: Ipv4Addr, name: &str) -> String {
    let script = format!(
        "import socket,struct\nq=bytes.fromhex('{}')\n\
         s=socket.create_connection(('{server}',53),5)\ns.sendall(struct.pack('>H',len(q))+q)\n\
         def rx(n):\n b=b''\n while len(b)<n:\n  c=s.recv(n-len(b))\n  assert c,'eof'\n  b+=c\n return b\n\
         d=rx(struct.unpack('>H',rx(2))[0])\n\
         print(d[3]&15, socket.inet_ntoa(d[-4:]) if d[7] else '-')\n",
        query_bytes(name)
    );
    let (ok, out) = sh(&["ip", "netns", "exec", ns, "python3", "-c", &script]);
    assert!(ok, "TCP query from the namespace failed: {out}");
    out.trim().to_string()
}

/// Send a query from inside `ns` to `server`:53 and return the reply's response code.
fn ask_from(ns: &str, server: Ipv4Addr, name: &str) -> String {
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(5)\n\
         s.sendto(bytes.fromhex('{}'),('{server}',53))\nd=s.recv(4096)\nprint(d[3]&15)\n",
        query_bytes(name)
    );
    let (ok, out) = sh(&["ip", "netns", "exec", ns, "python3", "-c", &script]);
    assert!(ok, "query from the namespace failed: {out}");
    out.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_resolve_update_release() {
    if let Some(why) = skip() {
        eprintln!("SKIP attach_resolve_update_release: {why}");
        return;
    }
    // Fake upstream on loopback: answers every A query with 198.51.100.10.
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream_addr = upstream.local_addr().expect("addr");
    // The same port over TCP answers with 198.51.100.11, so a TCP path shows in the answer.
    let upstream_tcp = tokio::net::TcpListener::bind(upstream_addr)
        .await
        .expect("bind tcp");
    let asked_tcp = Arc::new(AtomicUsize::new(0));
    let asked_tcp2 = asked_tcp.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = upstream_tcp.accept().await {
            let asked = asked_tcp2.clone();
            tokio::spawn(async move {
                while let Ok(Some(raw)) =
                    cella_net::dns::read_frame(&mut s, cella_net::dns::MAX_TCP_MESSAGE).await
                {
                    asked.fetch_add(1, Ordering::SeqCst);
                    let Some(bytes) = reply(&raw, Ipv4Addr::new(198, 51, 100, 11)) else {
                        return;
                    };
                    if cella_net::dns::write_frame(&mut s, &bytes).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let asked = Arc::new(AtomicUsize::new(0));
    let asked2 = asked.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
            asked2.fetch_add(1, Ordering::SeqCst);
            if let Some(bytes) = reply(&buf[..n], Ipv4Addr::new(198, 51, 100, 10)) {
                let _ = upstream.send_to(&bytes, from).await;
            }
        }
    });

    let pid = std::process::id();
    let ns = format!("cnettest{pid}");
    let (ok, out) = sh(&["ip", "netns", "add", &ns]);
    assert!(ok, "{out}");
    let _ns_guard = Cleanup(vec![vec![
        "ip".into(),
        "netns".into(),
        "del".into(),
        ns.clone(),
    ]]);
    let store = Store::open_in_memory().expect("store");
    let instance = format!("i{:012x}", u64::from(pid) | 0xabc0_0000_0000);
    let ca_dir = tempfile::tempdir().expect("tmp");
    let (net, _) = HostNet::start(NetConfig {
        instance,
        pool: Ipv4Cidr::parse("10.247.0.0/24").expect("cidr"),
        upstreams: vec![upstream_addr],
        uplink: None,
        proc_root: "/proc".into(),
        sys_root: "/sys".into(),
        store: store.clone(),
        proxy_allow_private: true,
        ca_dir: ca_dir.path().join("egress-ca"),
        upstream_ca_pem: None,
        identity_dir: ca_dir.path().join("identity"),
        identity_issuer: "http://127.0.0.1:3000".into(),
        identity_trust_domain: "cella.local".into(),
    })
    .await
    .expect("start");
    let table = net.table().to_string();
    let prefix = net.prefix().to_string();
    // On a failed assertion: no table left behind (the interface dies with the namespace).
    let _table_guard = Cleanup(vec![vec![
        "nft".into(),
        "delete".into(),
        "table".into(),
        "inet".into(),
        table.clone(),
    ]]);

    let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let restricted = EgressPolicy::from_request(
        None,
        Some(&a(&["allowed.test"])),
        Some(&a(&["0.0.0.0/0"])),
        "",
    )
    .expect("policy");
    let resolver = net.reserve("sbxone").expect("reserve");
    net.attach(
        "sbxone",
        std::path::Path::new(&format!("/run/netns/{ns}")),
        &restricted,
    )
    .await
    .expect("attach");
    let ifname = format!("{prefix}0");
    assert!(
        std::path::Path::new("/sys/class/net")
            .join(&ifname)
            .exists()
    );
    let (_, addrs) = sh(&["ip", "-n", &ns, "-4", "addr", "show", "eth0"]);
    assert!(addrs.contains("10.247.0.2/30"), "{addrs}");

    // Allowed: forwarded (NOERROR) and learned; refused: REFUSED (5), upstream never asked.
    assert_eq!(ask_from(&ns, resolver, "allowed.test"), "0");
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    let (_, set) = sh(&["nft", "list", "set", "inet", &table, "sb0_dns"]);
    assert!(set.contains("198.51.100.10"), "{set}");
    assert_eq!(ask_from(&ns, resolver, "other.test"), "5");
    assert_eq!(
        asked.load(Ordering::SeqCst),
        1,
        "a refused name is never forwarded"
    );
    // Over TCP: the same verdicts, asked upstream over TCP, learned the same way.
    assert_eq!(
        ask_tcp_from(&ns, resolver, "allowed.test"),
        "0 198.51.100.11"
    );
    assert_eq!(asked_tcp.load(Ordering::SeqCst), 1);
    let (_, set) = sh(&["nft", "list", "set", "inet", &table, "sb0_dns"]);
    assert!(set.contains("198.51.100.11"), "{set}");
    assert_eq!(ask_tcp_from(&ns, resolver, "other.test"), "5 -");
    assert_eq!(asked_tcp.load(Ordering::SeqCst), 1);
    store.flush_audit();
    let dns: Vec<(String, String)> = store
        .query_audit(&AuditQuery {
            sandbox_id: Some("sbxone".into()),
            kind_prefix: Some("net.dns".into()),
            ..Default::default()
        })
        .expect("audit")
        .into_iter()
        .map(|e| {
            (
                e.detail["name"].as_str().unwrap_or_default().to_string(),
                e.detail["verdict"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert!(
        dns.contains(&("allowed.test".into(), "allowed".into())),
        "{dns:?}"
    );
    assert!(
        dns.contains(&("other.test".into(), "refused".into())),
        "{dns:?}"
    );

    // Update: learned addresses are forgotten, the new rules are in place, names resolve.
    net.update("sbxone", &EgressPolicy::default())
        .await
        .expect("update");
    let (_, set) = sh(&["nft", "list", "set", "inet", &table, "sb0_dns"]);
    assert!(!set.contains("198.51.100.10"), "{set}");
    assert_eq!(ask_from(&ns, resolver, "other.test"), "0");

    // A sandbox created while another is being released never gets the slot (the same
    // interface name and resolver address) before the release has finished with it.
    let mut releasing = Box::pin(net.release("sbxone"));
    assert!(
        futures_poll_once(releasing.as_mut()).is_none(),
        "release waits for the resolver and the interface"
    );
    let other = net.reserve("sbxtwo").expect("reserve during release");
    assert_ne!(other, resolver, "a slot in release was handed out again");
    releasing.await.expect("release");
    net.release("sbxtwo").await.expect("release unattached");
    // Once released, the slot is reused, and attaching on it works (the resolver's port is free).
    assert_eq!(net.reserve("sbxthree").expect("reserve"), resolver);
    net.attach(
        "sbxthree",
        std::path::Path::new(&format!("/run/netns/{ns}")),
        &EgressPolicy::default(),
    )
    .await
    .expect("attach on a released slot");
    assert_eq!(ask_from(&ns, resolver, "other.test"), "0");
    net.release("sbxthree").await.expect("release");
    net.release("sbxone").await.expect("release is idempotent");
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(&ifname)
            .exists()
    );
    let (_, listed) = sh(&["nft", "list", "table", "inet", &table]);
    assert!(!listed.contains("chain sb0"), "{listed}");
    let (_, inside) = sh(&["ip", "-n", &ns, "link"]);
    assert!(!inside.contains("eth0"), "{inside}");

    net.shutdown().await;
    let (exists, _) = sh(&["nft", "list", "table", "inet", &table]);
    assert!(!exists, "table removed at shutdown");
}

/// Poll a future once: `Some` if it completed right away.
fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match f.poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Commands run when dropped (best effort), so a failing test leaves nothing on the host.
struct Cleanup(Vec<Vec<String>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for cmd in &self.0 {
            let _ = Command::new(&cmd[0]).args(&cmd[1..]).output();
        }
    }
}
