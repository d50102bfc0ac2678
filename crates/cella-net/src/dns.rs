//! The per-sandbox DNS forwarder.
//!
//! Each sandbox with egress gets a resolver on its host-end address, port 53, over UDP and
//! TCP (its `/etc/resolv.conf` names it; the firewall lets the sandbox reach nothing else on
//! the host). The sockets identify the sandbox, and the source address is checked as well.
//! Queries are parsed with `hickory-proto` (never by hand: the bytes come from untrusted
//! code); when the sandbox's policy denies everything but named domains, a name that matches
//! none is refused without asking upstream, and the A records of an allowed answer are added
//! to the sandbox's nftables set before the answer is passed on, so the connection that
//! follows is allowed. Every query is audited with its verdict and transport. Both transports
//! go through one [`Forwarder::answer`], so they cannot disagree on a verdict.
//!
//! TCP exists because an answer may not fit a datagram: a query that came over TCP is asked
//! upstream over TCP, and a UDP answer the upstream truncated (TC bit) is asked again over
//! TCP; the full answer goes back to a UDP client when it fits the client's datagram size
//! (EDNS, 512 without), otherwise the truncated one does and the client retries over TCP.
//! TCP is bounded per sandbox: RFC 7766 framing (2-byte length, so one message is at most
//! 64 KiB), [`MAX_TCP_CONNECTIONS`] open at once (more are closed at once), and
//! [`TCP_IDLE_TIMEOUT`] for each query to arrive and each reply to be taken.
//!
//! Limits: an address shared by an allowed and a denied domain (CDNs, shared hosting) is
//! reachable under both names once the allowed one was resolved; no DNS over TLS/HTTPS.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cella_core::egress::EgressPolicy;
use cella_core::store::{NewAudit, Store};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::RData;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Largest datagram read (EDNS0 payloads are usually ≤ 1232 or 4096).
const MAX_DATAGRAM: usize = 4096;
/// Queries of one sandbox in flight at once over UDP; more are dropped (the client retries).
const MAX_IN_FLIGHT: usize = 64;
/// How long one upstream gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest DNS message over TCP (the 2-byte length prefix's maximum).
pub const MAX_TCP_MESSAGE: usize = u16::MAX as usize;
/// TCP connections of one sandbox open at once; a connection beyond it is closed unanswered.
pub const MAX_TCP_CONNECTIONS: usize = 16;
/// How long a TCP client may take to send its next query, or to take a reply, before its
/// connection is closed (RFC 7766 suggests seconds).
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Adds learned addresses to the sandbox's firewall set.
pub type Learn = Arc<
    dyn Fn(String, Vec<(Ipv4Addr, u32)>) -> futures_like::BoxFuture<Result<(), String>>
        + Send
        + Sync,
>;

/// A tiny boxed-future alias (no `futures` dependency needed).
pub mod futures_like {
    /// A boxed, sendable future.
    pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;
}

/// What one forwarder needs.
pub struct Forwarder {
    /// Sandbox ID (audit).
    pub sandbox_id: String,
    /// The only source address accepted.
    pub sandbox_addr: Ipv4Addr,
    /// Current policy, replaced on update.
    pub policy: Arc<RwLock<EgressPolicy>>,
    /// Upstream resolvers, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// Firewall hook.
    pub learn: Learn,
    /// Audit log.
    pub store: Store,
}

/// How a query arrived: decides how upstream is asked and how large the reply may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// One datagram; the reply must fit the client's payload size.
    Udp,
    /// A TCP connection (length-prefixed messages).
    Tcp,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// The verdict on one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Answer with this response code without asking upstream.
    Refuse(ResponseCode),
    /// Forward; learn addresses if `learn` is set.
    Forward {
        /// Whether answered addresses must be added to the firewall set.
        learn: bool,
    },
}

/// Decide on a parsed query. Returns the lowercase name, type and verdict.
pub fn judge(msg: &Message, policy: &EgressPolicy) -> (String, String, Verdict) {
    if msg.message_type() != MessageType::Query
        || msg.op_code() != OpCode::Query
        || msg.queries().len() != 1
    {
        return (
            String::new(),
            String::new(),
            Verdict::Refuse(ResponseCode::FormErr),
        );
    }
    let q = &msg.queries()[0];
    let name = q.name().to_lowercase().to_ascii();
    let name = name.trim_end_matches('.').to_string();
    let qtype = q.query_type().to_string();
    if !policy.allows_name(&name) {
        return (name, qtype, Verdict::Refuse(ResponseCode::Refused));
    }
    (
        name,
        qtype,
        Verdict::Forward {
            // Names are learned for the firewall (restricting domains) and for the tunnel
            // (rules match a plain-HTTP request's Host only at an address learned for it).
            learn: policy.restricts_domains() || !policy.rules.is_empty(),
        },
    )
}

/// A reply with `code` to `query` (same ID and question).
pub fn refusal(query: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut m = Message::error_msg(query.id(), query.op_code(), code);
    for q in query.queries() {
        m.add_query(q.clone());
    }
    m.set_recursion_desired(query.recursion_desired());
    m.set_recursion_available(true);
    m.to_vec().ok()
}

/// IPv4 answers and their TTLs.
pub fn a_records(resp: &Message) -> Vec<(Ipv4Addr, u32)> {
    resp.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((a.0, r.ttl())),
            _ => None,
        })
        .collect()
}

/// The largest reply a UDP client of `query` takes: its EDNS payload size (512 without),
/// at most what the forwarder reads itself.
pub fn udp_reply_limit(query: &Message) -> usize {
    usize::from(query.max_payload()).min(MAX_DATAGRAM)
}

/// Read one length-prefixed DNS message (RFC 1035 4.2.2). `Ok(None)`: the peer closed
/// cleanly between messages. An empty or longer-than-`max` message is an error, so a
/// hostile length never decides how much is allocated beyond `max`.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut len[1..]).await?;
    let n = usize::from(u16::from_be_bytes(len));
    if n == 0 || n > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("DNS message of {n} bytes (1-{max} accepted)"),
        ));
    }
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Write one length-prefixed DNS message, in one write (no small first segment).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len())
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("DNS message of {} bytes cannot be framed", msg.len()),
            )
        })?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    w.write_all(&out).await?;
    w.flush().await
}

/// Bind a sandbox's resolver sockets: UDP and TCP on `host`, port 53.
pub async fn bind(host: Ipv4Addr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let udp = UdpSocket::bind((host, 53)).await?;
    let tcp = TcpListener::bind((host, 53))
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("TCP: {e}")))?;
    Ok((udp, tcp))
}

impl Forwarder {
    /// Serve the sandbox's UDP socket and TCP listener until the task is aborted (dropping
    /// it also ends every open TCP connection).
    pub async fn serve(self: Arc<Self>, udp: UdpSocket, tcp: TcpListener) {
        tokio::join!(self.clone().run(udp), self.run_tcp(tcp));
    }

    /// Serve `socket` until it fails or the task is aborted.
    pub async fn run(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(sandbox = %self.sandbox_id, error = %e, "dns socket failed");
                    return;
                }
            };
            if from.ip() != IpAddr::V4(self.sandbox_addr) {
                continue;
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                continue;
            };
            let query = buf[..n].to_vec();
            let this = self.clone();
            let socket = socket.clone();
            tokio::spawn(async move {
                if let Some(reply) = this.answer(&query, Transport::Udp).await {
                    let _ = socket.send_to(&reply, from).await;
                }
                drop(permit);
            });
        }
    }

    /// Accept TCP connections from the sandbox until the future is dropped; at most
    /// [`MAX_TCP_CONNECTIONS`] at once, each ended when it is dropped.
    pub async fn run_tcp(self: Arc<Self>, listener: TcpListener) {
        let mut conns = JoinSet::new();
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(v) => v,
                Err(e) => {
                    // Per-connection failures (aborted handshakes, fd limits) pass.
                    tracing::debug!(sandbox = %self.sandbox_id, error = %e, "dns accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            while conns.try_join_next().is_some() {}
            if from.ip() != IpAddr::V4(self.sandbox_addr) || conns.len() >= MAX_TCP_CONNECTIONS {
                continue;
            }
            conns.spawn(self.clone().serve_connection(stream));
        }
    }

    /// Answer the queries of one TCP connection in order until it closes, errs, sends a
    /// malformed frame or idles.
    pub async fn serve_connection(self: Arc<Self>, mut stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.split();
        loop {
            let query =
                match tokio::time::timeout(TCP_IDLE_TIMEOUT, read_frame(&mut rd, MAX_TCP_MESSAGE))
                    .await
                {
                    Ok(Ok(Some(q))) => q,
                    _ => return,
                };
            // A message that does not parse ends the connection (RFC 7766 6.2.4).
            let Some(reply) = self.answer(&query, Transport::Tcp).await else {
                return;
            };
            if !matches!(
                tokio::time::timeout(TCP_IDLE_TIMEOUT, write_frame(&mut wr, &reply)).await,
                Ok(Ok(()))
            ) {
                return;
            }
        }
    }

    /// The reply to one query (`None`: drop it) — the same verdict, learning and audit for
    /// both transports.
    pub async fn answer(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let msg = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => {
                self.audit("", "", "malformed", serde_json::Value::Null, transport);
                return None;
            }
        };
        let policy = self.policy.read().ok()?.clone();
        let (name, qtype, verdict) = judge(&msg, &policy);
        match verdict {
            Verdict::Refuse(code) => {
                let what = if code == ResponseCode::Refused {
                    "refused"
                } else {
                    "malformed"
                };
                self.audit(&name, &qtype, what, serde_json::Value::Null, transport);
                refusal(&msg, code)
            }
            Verdict::Forward { learn } => match self.forward(query, &msg, transport).await {
                Some((raw, resp)) => {
                    let addrs = a_records(&resp);
                    if learn
                        && !addrs.is_empty()
                        && let Err(e) = (self.learn)(name.clone(), addrs.clone()).await
                    {
                        tracing::warn!(sandbox = %self.sandbox_id, error = %e, "learning addresses failed");
                        self.audit(&name, &qtype, "error", serde_json::json!(e), transport);
                        return refusal(&msg, ResponseCode::ServFail);
                    }
                    let list: Vec<String> = addrs.iter().map(|(ip, _)| ip.to_string()).collect();
                    self.audit(&name, &qtype, "allowed", serde_json::json!(list), transport);
                    Some(raw)
                }
                None => {
                    self.audit(
                        &name,
                        &qtype,
                        "upstream_failed",
                        serde_json::Value::Null,
                        transport,
                    );
                    refusal(&msg, ResponseCode::ServFail)
                }
            },
        }
    }

    /// Ask the upstreams in order: over TCP for a TCP client; over UDP otherwise, again
    /// over TCP when that answer was truncated (kept if the full one does not fit).
    async fn forward(
        &self,
        query: &[u8],
        msg: &Message,
        transport: Transport,
    ) -> Option<(Vec<u8>, Message)> {
        let id = msg.id();
        for up in &self.upstreams {
            let got = match transport {
                Transport::Tcp => tcp_exchange(*up, query, id).await,
                Transport::Udp => match udp_exchange(*up, query, id).await {
                    Some((raw, resp)) if resp.truncated() => {
                        match tcp_exchange(*up, query, id).await {
                            Some((full, r)) if full.len() <= udp_reply_limit(msg) => {
                                Some((full, r))
                            }
                            _ => Some((raw, resp)),
                        }
                    }
                    other => other,
                },
            };
            if got.is_some() {
                return got;
            }
        }
        None
    }

    fn audit(
        &self,
        name: &str,
        qtype: &str,
        verdict: &str,
        answers: serde_json::Value,
        transport: Transport,
    ) {
        self.store.audit(NewAudit {
            actor: "server".into(),
            sandbox_id: Some(self.sandbox_id.clone()),
            kind: "net.dns".into(),
            detail: serde_json::json!({
                "name": name, "type": qtype, "verdict": verdict, "answers": answers,
                "transport": transport.as_str(),
            }),
        });
    }
}

/// One query to one upstream over UDP: the first response with the query's ID.
async fn udp_exchange(up: SocketAddr, query: &[u8], id: u16) -> Option<(Vec<u8>, Message)> {
    let bind: SocketAddr = if up.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await.ok()?;
    if sock.connect(up).await.is_err() || sock.send(query).await.is_err() {
        return None;
    }
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
        if let Some(resp) = response_to(&buf[..n], id) {
            return Some((buf[..n].to_vec(), resp));
        }
    }
    None
}

/// One query to one upstream over TCP (a connection of its own), within the upstream
/// timeout.
async fn tcp_exchange(up: SocketAddr, query: &[u8], id: u16) -> Option<(Vec<u8>, Message)> {
    let exchange = async {
        let mut s = TcpStream::connect(up).await.ok()?;
        let _ = s.set_nodelay(true);
        write_frame(&mut s, query).await.ok()?;
        loop {
            let raw = read_frame(&mut s, MAX_TCP_MESSAGE).await.ok()??;
            if let Some(resp) = response_to(&raw, id) {
                return Some((raw, resp));
            }
        }
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .ok()
        .flatten()
}

fn response_to(raw: &[u8], id: u16) -> Option<Message> {
    Message::from_vec(raw)
        .ok()
        .filter(|m| m.id() == id && m.message_type() == MessageType::Response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Query};
    use hickory_proto::rr::{Name, Record, RecordType};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn query(name: &str, t: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(77);
        m.set_message_type(MessageType::Query);
        m.set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
        m
    }

    fn restricted() -> EgressPolicy {
        EgressPolicy::from_request(
            None,
            Some(&[
                "allowed.test".to_string(),
                "*.ok.test".to_string(),
                "big.test".to_string(),
                "mid.test".to_string(),
            ]),
            Some(&["0.0.0.0/0".to_string()]),
            "",
        )
        .expect("policy")
    }

    #[test]
    fn names_are_judged_by_the_policy() {
        let p = restricted();
        let (n, t, v) = judge(&query("Allowed.Test.", RecordType::A), &p);
        assert_eq!((n.as_str(), t.as_str()), ("allowed.test", "A"));
        assert_eq!(v, Verdict::Forward { learn: true });
        let (_, _, v) = judge(&query("a.b.ok.test.", RecordType::AAAA), &p);
        assert_eq!(v, Verdict::Forward { learn: true });
        let (n, _, v) = judge(&query("other.test.", RecordType::A), &p);
        assert_eq!(n, "other.test");
        assert_eq!(v, Verdict::Refuse(ResponseCode::Refused));
        let open = EgressPolicy::default();
        let (_, _, v) = judge(&query("other.test.", RecordType::A), &open);
        assert_eq!(v, Verdict::Forward { learn: false });
        let mut two = query("a.test.", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("b.test.").expect("n"),
            RecordType::A,
        ));
        assert_eq!(judge(&two, &open).2, Verdict::Refuse(ResponseCode::FormErr));
        let mut resp = query("a.test.", RecordType::A);
        resp.set_message_type(MessageType::Response);
        assert_eq!(
            judge(&resp, &open).2,
            Verdict::Refuse(ResponseCode::FormErr)
        );
    }

    #[test]
    fn refusals_echo_the_question_and_answers_yield_a_records() {
        let q = query("other.test.", RecordType::A);
        let bytes = refusal(&q, ResponseCode::Refused).expect("encode");
        let r = Message::from_vec(&bytes).expect("decode");
        assert_eq!(r.id(), 77);
        assert_eq!(r.response_code(), ResponseCode::Refused);
        assert_eq!(r.message_type(), MessageType::Response);
        assert_eq!(r.queries().len(), 1);

        let mut resp = query("allowed.test.", RecordType::A);
        resp.set_message_type(MessageType::Response);
        let name = Name::from_ascii("allowed.test.").expect("n");
        resp.add_answer(Record::from_rdata(
            name.clone(),
            60,
            RData::A(Ipv4Addr::new(198, 51, 100, 10).into()),
        ));
        resp.add_answer(Record::from_rdata(
            name,
            60,
            RData::AAAA(std::net::Ipv6Addr::LOCALHOST.into()),
        ));
        assert_eq!(
            a_records(&resp),
            vec![(Ipv4Addr::new(198, 51, 100, 10), 60)]
        );
    }

    #[test]
    fn hostile_bytes_are_dropped_not_trusted() {
        for junk in [&b""[..], &b"\x00"[..], &[0xffu8; 12][..], &[0u8; 3000][..]] {
            // Either an error or a message; never a panic.
            let _ = Message::from_vec(junk);
        }
    }

    #[test]
    fn udp_reply_limit_follows_edns() {
        let mut q = query("a.test.", RecordType::A);
        assert_eq!(udp_reply_limit(&q), 512);
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        q.set_edns(edns.clone());
        assert_eq!(udp_reply_limit(&q), 1232);
        edns.set_max_payload(65_000);
        q.set_edns(edns);
        assert_eq!(udp_reply_limit(&q), MAX_DATAGRAM);
    }

    #[tokio::test]
    async fn frames_round_trip_and_bad_lengths_are_refused() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"first").await.expect("frame");
        write_frame(&mut wire, &[7u8; MAX_TCP_MESSAGE])
            .await
            .expect("largest frame");
        assert_eq!(&wire[..7], b"\x00\x05first");
        let mut r = &wire[..];
        assert_eq!(
            read_frame(&mut r, MAX_TCP_MESSAGE).await.expect("read"),
            Some(b"first".to_vec())
        );
        let big = read_frame(&mut r, MAX_TCP_MESSAGE)
            .await
            .expect("read")
            .expect("frame");
        assert_eq!(big.len(), MAX_TCP_MESSAGE);
        assert_eq!(
            read_frame(&mut r, MAX_TCP_MESSAGE).await.expect("eof"),
            None
        );

        // Too long, empty, or cut off: errors, and the length alone allocates nothing.
        let err = |bytes: &'static [u8], max: usize| async move {
            let mut r = bytes;
            read_frame(&mut r, max).await.expect_err("refused").kind()
        };
        assert_eq!(
            err(b"\x01\x00rest", 255).await,
            std::io::ErrorKind::InvalidData
        );
        assert_eq!(err(b"\x00\x00", 255).await, std::io::ErrorKind::InvalidData);
        assert_eq!(
            err(b"\x00\x05abc", 255).await,
            std::io::ErrorKind::UnexpectedEof
        );
        assert_eq!(err(b"\x00", 255).await, std::io::ErrorKind::UnexpectedEof);

        let mut sink = Vec::new();
        assert!(
            write_frame(&mut sink, &vec![0u8; MAX_TCP_MESSAGE + 1])
                .await
                .is_err()
        );
        assert!(write_frame(&mut sink, b"").await.is_err());
        assert!(
            sink.is_empty(),
            "nothing written for an unframeable message"
        );
    }

    /// An upstream on 127.0.0.1 answering over UDP and TCP on one port. `big.` (40 A
    /// records) and `mid.` (2) names are truncated over UDP; every other name gets one
    /// record, 198.51.100.10 over UDP and 198.51.100.100 over TCP.
    struct Upstream {
        addr: SocketAddr,
        udp: Arc<AtomicUsize>,
        tcp: Arc<AtomicUsize>,
    }

    fn upstream_reply(q: &Message, tcp: bool) -> Vec<u8> {
        let mut r = Message::new();
        r.set_id(q.id());
        r.set_message_type(MessageType::Response);
        let Some(question) = q.queries().first().cloned() else {
            return Vec::new();
        };
        r.add_query(question.clone());
        let label = question.name().to_ascii();
        let n: u8 = if label.starts_with("big.") {
            40
        } else if label.starts_with("mid.") {
            2
        } else {
            1
        };
        if !tcp && n > 1 {
            r.set_truncated(true);
        } else {
            let base = if tcp { 100 } else { 10 };
            for i in 0..n {
                r.add_answer(Record::from_rdata(
                    question.name().clone(),
                    60,
                    RData::A(Ipv4Addr::new(198, 51, 100, base + i).into()),
                ));
            }
        }
        r.to_vec().expect("encode")
    }

    async fn upstream() -> Upstream {
        let (udp_sock, tcp_sock) = loop {
            let u = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
            let port = u.local_addr().expect("addr").port();
            if let Ok(t) = TcpListener::bind(("127.0.0.1", port)).await {
                break (u, t);
            }
        };
        let addr = udp_sock.local_addr().expect("addr");
        let (udp, tcp) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let count = udp.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok((n, from)) = udp_sock.recv_from(&mut buf).await {
                count.fetch_add(1, Ordering::SeqCst);
                if let Ok(q) = Message::from_vec(&buf[..n]) {
                    let _ = udp_sock.send_to(&upstream_reply(&q, false), from).await;
                }
            }
        });
        let count = tcp.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp_sock.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    while let Ok(Some(raw)) = read_frame(&mut s, MAX_TCP_MESSAGE).await {
                        count.fetch_add(1, Ordering::SeqCst);
                        let Ok(q) = Message::from_vec(&raw) else {
                            return;
                        };
                        if write_frame(&mut s, &upstream_reply(&q, true))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Upstream { addr, udp, tcp }
    }

    type Learned = Arc<Mutex<Vec<Ipv4Addr>>>;

    fn forwarder(up: &Upstream) -> (Arc<Forwarder>, Learned, Store) {
        let learned: Learned = Arc::default();
        let sink = learned.clone();
        let learn: Learn = Arc::new(move |_name, addrs| {
            let sink = sink.clone();
            Box::pin(async move {
                if let Ok(mut l) = sink.lock() {
                    l.extend(addrs.into_iter().map(|(ip, _)| ip));
                }
                Ok(())
            })
        });
        let store = Store::open_in_memory().expect("store");
        let fwd = Arc::new(Forwarder {
            sandbox_id: "sbxdns".into(),
            sandbox_addr: Ipv4Addr::LOCALHOST,
            policy: Arc::new(RwLock::new(restricted())),
            upstreams: vec![up.addr],
            learn,
            store: store.clone(),
        });
        (fwd, learned, store)
    }

    async fn tcp_resolver(fwd: &Arc<Forwarder>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(fwd.clone().run_tcp(listener));
        addr
    }

    async fn ask(s: &mut TcpStream, name: &str) -> Option<Message> {
        let q = query(name, RecordType::A).to_vec().expect("encode");
        write_frame(s, &q).await.ok()?;
        let raw = read_frame(s, MAX_TCP_MESSAGE).await.ok()??;
        Message::from_vec(&raw).ok()
    }

    fn addrs(m: &Message) -> Vec<Ipv4Addr> {
        a_records(m).into_iter().map(|(ip, _)| ip).collect()
    }

    #[tokio::test]
    async fn tcp_queries_take_the_same_verdicts_and_go_upstream_over_tcp() {
        let up = upstream().await;
        let (fwd, learned, store) = forwarder(&up);
        let resolver = tcp_resolver(&fwd).await;
        let mut s = TcpStream::connect(resolver).await.expect("connect");
        // Several queries on one connection, answered in order.
        let r = ask(&mut s, "allowed.test.").await.expect("answer");
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert_eq!(addrs(&r), vec![Ipv4Addr::new(198, 51, 100, 100)]);
        let r = ask(&mut s, "other.test.").await.expect("answer");
        assert_eq!(r.response_code(), ResponseCode::Refused);
        let r = ask(&mut s, "big.test.").await.expect("answer");
        assert_eq!(addrs(&r).len(), 40, "a large answer passes over TCP whole");
        assert_eq!(up.tcp.load(Ordering::SeqCst), 2, "refused: never forwarded");
        assert_eq!(up.udp.load(Ordering::SeqCst), 0);
        let got = learned.lock().expect("lock").clone();
        assert_eq!(got.len(), 41);
        assert!(got.contains(&Ipv4Addr::new(198, 51, 100, 100)));

        store.flush_audit();
        let audit: Vec<(String, String, String)> = store
            .query_audit(&cella_core::store::AuditQuery {
                sandbox_id: Some("sbxdns".into()),
                ..Default::default()
            })
            .expect("audit")
            .into_iter()
            .map(|e| {
                let f = |k: &str| e.detail[k].as_str().unwrap_or_default().to_string();
                (f("name"), f("verdict"), f("transport"))
            })
            .collect();
        for want in [
            ("allowed.test", "allowed", "tcp"),
            ("other.test", "refused", "tcp"),
        ] {
            assert!(
                audit.contains(&(want.0.into(), want.1.into(), want.2.into())),
                "{audit:?}"
            );
        }

        // Garbage in a well-formed frame closes the connection, audited as malformed.
        write_frame(&mut s, &[0xff; 5]).await.expect("send");
        assert_eq!(
            read_frame(&mut s, MAX_TCP_MESSAGE).await.expect("closed"),
            None
        );
        // A frame length beyond what was sent, then close: nothing answered, no hang.
        let mut s = TcpStream::connect(resolver).await.expect("connect");
        s.write_all(b"\x00\x30abc").await.expect("send");
        s.shutdown().await.expect("shutdown");
        assert_eq!(
            read_frame(&mut s, MAX_TCP_MESSAGE).await.expect("closed"),
            None
        );
    }

    #[tokio::test]
    async fn truncated_udp_answers_are_asked_again_over_tcp() {
        let up = upstream().await;
        let (fwd, _, _) = forwarder(&up);
        let ask_udp = |name: &str, edns: Option<u16>| {
            let mut q = query(name, RecordType::A);
            if let Some(size) = edns {
                let mut e = Edns::new();
                e.set_max_payload(size);
                q.set_edns(e);
            }
            let fwd = fwd.clone();
            async move {
                let raw = fwd
                    .answer(&q.to_vec().expect("encode"), Transport::Udp)
                    .await
                    .expect("reply");
                Message::from_vec(&raw).expect("decode")
            }
        };
        // Not truncated: UDP only.
        let r = ask_udp("allowed.test.", None).await;
        assert_eq!(addrs(&r), vec![Ipv4Addr::new(198, 51, 100, 10)]);
        assert_eq!(up.tcp.load(Ordering::SeqCst), 0);
        // Truncated, and the full answer fits 512 bytes: the client gets it whole.
        let r = ask_udp("mid.test.", None).await;
        assert!(!r.truncated());
        assert_eq!(addrs(&r).len(), 2);
        assert_eq!(up.tcp.load(Ordering::SeqCst), 1);
        // Truncated and too big for the client's 512 bytes: the truncated answer, so the
        // client retries over TCP; with EDNS 4096 it fits.
        let r = ask_udp("big.test.", None).await;
        assert!(r.truncated() && r.answers().is_empty());
        let r = ask_udp("big.test.", Some(4096)).await;
        assert!(!r.truncated());
        assert_eq!(addrs(&r).len(), 40);
        assert_eq!(up.udp.load(Ordering::SeqCst), 4);
        assert_eq!(up.tcp.load(Ordering::SeqCst), 3);
        // Denied names are refused over UDP as over TCP, upstream never asked.
        let r = ask_udp("other.test.", None).await;
        assert_eq!(r.response_code(), ResponseCode::Refused);
        assert_eq!(up.udp.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn tcp_connections_are_capped_per_sandbox() {
        let up = upstream().await;
        let (fwd, _, _) = forwarder(&up);
        let resolver = tcp_resolver(&fwd).await;
        let mut held = Vec::new();
        for _ in 0..MAX_TCP_CONNECTIONS {
            let mut s = TcpStream::connect(resolver).await.expect("connect");
            assert!(ask(&mut s, "other.test.").await.is_some(), "served");
            held.push(s);
        }
        let mut extra = TcpStream::connect(resolver).await.expect("connect");
        assert!(
            ask(&mut extra, "other.test.").await.is_none(),
            "one connection too many is closed unanswered"
        );
        // Closing one makes room again.
        drop(held.pop());
        let mut served = false;
        for _ in 0..100 {
            let mut s = TcpStream::connect(resolver).await.expect("connect");
            if ask(&mut s, "other.test.").await.is_some() {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served, "a freed slot is reused");
    }

    #[tokio::test]
    async fn idle_and_half_sent_tcp_connections_are_closed() {
        let up = upstream().await;
        let (fwd, _, _) = forwarder(&up);
        let resolver = tcp_resolver(&fwd).await;
        // Silent, a length and part of the message, half a length: each closed unanswered
        // once the idle timeout passed (concurrently, so the test waits it once).
        let idle = |opening: &'static [u8]| async move {
            let start = tokio::time::Instant::now();
            let mut s = TcpStream::connect(resolver).await.expect("connect");
            s.write_all(opening).await.expect("send");
            let mut buf = [0u8; 8];
            let n = s.read(&mut buf).await.unwrap_or(0);
            (n, start.elapsed())
        };
        let got = tokio::time::timeout(TCP_IDLE_TIMEOUT * 3, async {
            tokio::join!(idle(b""), idle(b"\x00\x40\x01\x02"), idle(b"\x00"))
        })
        .await
        .expect("idle connections are closed, not kept");
        for (n, waited) in [got.0, got.1, got.2] {
            assert_eq!(n, 0, "closed without a reply");
            assert!(waited >= TCP_IDLE_TIMEOUT, "closed after {waited:?}");
        }
    }

    #[tokio::test]
    async fn other_sources_are_not_served() {
        let up = upstream().await;
        let (fwd, _, _) = forwarder(&up);
        let fwd = Arc::new(Forwarder {
            sandbox_id: fwd.sandbox_id.clone(),
            sandbox_addr: Ipv4Addr::new(127, 0, 0, 2),
            policy: fwd.policy.clone(),
            upstreams: fwd.upstreams.clone(),
            learn: fwd.learn.clone(),
            store: fwd.store.clone(),
        });
        let resolver = tcp_resolver(&fwd).await;
        let mut s = TcpStream::connect(resolver).await.expect("connect");
        assert!(ask(&mut s, "allowed.test.").await.is_none());
        assert_eq!(up.tcp.load(Ordering::SeqCst), 0);
    }
}
