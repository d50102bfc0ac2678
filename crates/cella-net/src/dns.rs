//! The per-sandbox DNS forwarder.
//!
//! Each sandbox with egress gets one UDP socket bound to its host-end address, port 53 (its
//! `/etc/resolv.conf` names it; the firewall lets the sandbox reach nothing else on the host).
//! The socket identifies the sandbox, and the source address is checked as well. Queries are
//! parsed with `hickory-proto` (never by hand: the bytes come from untrusted code); when the
//! sandbox's policy denies everything but named domains, a name that matches none is refused
//! without asking upstream, and the A records of an allowed answer are added to the sandbox's
//! nftables set before the answer is passed on, so the connection that follows is allowed.
//! Every query is audited with its verdict.
//!
//! Limits: UDP only (a truncated answer cannot be retried over TCP); an address shared by an
//! allowed and a denied domain (CDNs, shared hosting) is reachable under both names once the
//! allowed one was resolved.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cella_core::egress::EgressPolicy;
use cella_core::store::{NewAudit, Store};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::RData;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

/// Largest datagram read (EDNS0 payloads are usually ≤ 1232 or 4096).
const MAX_DATAGRAM: usize = 4096;
/// Queries of one sandbox in flight at once; more are dropped (the client retries).
const MAX_IN_FLIGHT: usize = 64;
/// How long one upstream gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Adds learned addresses to the sandbox's firewall set.
pub type Learn =
    Arc<dyn Fn(Vec<(Ipv4Addr, u32)>) -> futures_like::BoxFuture<Result<(), String>> + Send + Sync>;

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
            learn: policy.restricts_domains(),
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

impl Forwarder {
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
                if let Some(reply) = this.answer(&query).await {
                    let _ = socket.send_to(&reply, from).await;
                }
                drop(permit);
            });
        }
    }

    /// The reply to one datagram (`None`: drop it).
    pub async fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let msg = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => {
                self.audit("", "", "malformed", serde_json::Value::Null);
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
                self.audit(&name, &qtype, what, serde_json::Value::Null);
                refusal(&msg, code)
            }
            Verdict::Forward { learn } => match self.forward(query, msg.id()).await {
                Some((raw, resp)) => {
                    let addrs = a_records(&resp);
                    if learn
                        && !addrs.is_empty()
                        && let Err(e) = (self.learn)(addrs.clone()).await
                    {
                        tracing::warn!(sandbox = %self.sandbox_id, error = %e, "learning addresses failed");
                        self.audit(&name, &qtype, "error", serde_json::json!(e));
                        return refusal(&msg, ResponseCode::ServFail);
                    }
                    let list: Vec<String> = addrs.iter().map(|(ip, _)| ip.to_string()).collect();
                    self.audit(&name, &qtype, "allowed", serde_json::json!(list));
                    Some(raw)
                }
                None => {
                    self.audit(&name, &qtype, "upstream_failed", serde_json::Value::Null);
                    refusal(&msg, ResponseCode::ServFail)
                }
            },
        }
    }

    async fn forward(&self, query: &[u8], id: u16) -> Option<(Vec<u8>, Message)> {
        for up in &self.upstreams {
            let bind: SocketAddr = if up.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(sock) = UdpSocket::bind(bind).await else {
                continue;
            };
            if sock.connect(up).await.is_err() || sock.send(query).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                if let Ok(resp) = Message::from_vec(&buf[..n])
                    && resp.id() == id
                    && resp.message_type() == MessageType::Response
                {
                    return Some((buf[..n].to_vec(), resp));
                }
            }
        }
        None
    }

    fn audit(&self, name: &str, qtype: &str, verdict: &str, answers: serde_json::Value) {
        self.store.audit(NewAudit {
            actor: "server".into(),
            sandbox_id: Some(self.sandbox_id.clone()),
            kind: "net.dns".into(),
            detail: serde_json::json!({
                "name": name, "type": qtype, "verdict": verdict, "answers": answers,
            }),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, Record, RecordType};

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
            Some(&["allowed.test".to_string(), "*.ok.test".to_string()]),
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
}
