//! Unit tests of the interception engine: in-process tokio, loopback TCP, no root.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONNECTION, HOST, UPGRADE};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::ca::{EgressCa, LeafName};

const T: Duration = Duration::from_secs(20);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A ClientHello as a rustls client writes it for `name`.
fn client_hello(name: ServerName<'static>) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    out
}

fn hello_for(name: &str) -> Vec<u8> {
    client_hello(ServerName::try_from(name.to_string()).expect("name"))
}

/// Sniff `bytes` followed by EOF.
async fn sniff_bytes(bytes: &[u8]) -> Sniffed {
    let mut r: &[u8] = bytes;
    let mut buf = Vec::new();
    let s = sniff(&mut r, &mut buf, Duration::from_millis(200)).await;
    assert!(bytes.starts_with(&buf), "buf holds what was read");
    s
}

/// The same handshake message in records of `split` bytes at most.
fn reframe(hello: &[u8], split: usize) -> Vec<u8> {
    let msg = &hello[5..];
    let mut out = Vec::new();
    for part in msg.chunks(split) {
        out.extend_from_slice(&[0x16, 3, 1]);
        out.extend_from_slice(&u16::try_from(part.len()).expect("len").to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

#[tokio::test]
async fn sni_of_a_real_client_hello() {
    let hello = hello_for("API.Example.com");
    assert_eq!(hello[0], 0x16);
    assert_eq!(
        sniff_bytes(&hello).await,
        Sniffed::Tls {
            server_name: Some("api.example.com".into())
        }
    );
    // Sniffing stops at the hello: bytes after it stay unread.
    let mut more = hello.clone();
    more.extend_from_slice(b"after");
    let mut r: &[u8] = &more;
    let mut buf = Vec::new();
    sniff(&mut r, &mut buf, Duration::from_secs(1)).await;
    assert!(buf.len() <= more.len());
}

#[tokio::test]
async fn sni_of_a_hello_split_across_records_and_segments() {
    let hello = hello_for("split.example.com");
    let want = Sniffed::Tls {
        server_name: Some("split.example.com".into()),
    };
    for split in [1, 7, 40, 100, 300] {
        assert_eq!(sniff_bytes(&reframe(&hello, split)).await, want, "{split}");
    }
    // Two TCP segments with a pause between them.
    let (mut tx, mut rx) = tokio::io::duplex(64 * 1024);
    let two = reframe(&hello, 100);
    let (a, b) = two.split_at(3);
    let (a, b) = (a.to_vec(), b.to_vec());
    let writer = tokio::spawn(async move {
        tx.write_all(&a).await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.write_all(&b).await.expect("write");
        tx
    });
    let mut buf = Vec::new();
    assert_eq!(sniff(&mut rx, &mut buf, Duration::from_secs(5)).await, want);
    assert_eq!(buf, two);
    drop(writer.await);
}

#[tokio::test]
async fn truncated_garbage_and_oversized_hellos_never_panic() {
    let hello = hello_for("trunc.example.com");
    for n in 0..hello.len() {
        let s = sniff_bytes(&hello[..n]).await;
        assert!(
            matches!(s, Sniffed::Tls { server_name: None } | Sniffed::Other),
            "{n}: {s:?}"
        );
    }
    // Corrupt every byte of the hello body in turn: any verdict, no panic.
    for i in 5..hello.len() {
        for v in [0x00, 0xff, 0x80] {
            let mut bad = hello.clone();
            bad[i] = v;
            let _ = sniff_bytes(&bad).await;
        }
    }
    // Pseudo-random garbage behind a TLS record header.
    let mut x: u32 = 0x1234_5678;
    for len in [5usize, 9, 50, 600, 5000] {
        let mut g = vec![0x16, 3, 1];
        for _ in 0..len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            g.push((x >> 16) as u8);
        }
        let _ = sniff_bytes(&g).await;
    }
    // A handshake length beyond the cap: no name, without reading further.
    let mut big = vec![0x16, 3, 1, 0x40, 0x00, 1, 0x01, 0x00, 0x00];
    big.resize(5 + 0x4000, 0);
    assert_eq!(sniff_bytes(&big).await, Sniffed::Tls { server_name: None });
    // Records of 16 KiB that never complete the hello: stopped at the cap.
    let mut huge = Vec::new();
    for _ in 0..3 {
        huge.extend_from_slice(&[0x16, 3, 1, 0x40, 0x00]);
        huge.extend(std::iter::repeat_n(0u8, 0x4000));
    }
    huge[5] = 1;
    huge[6] = 0x00;
    huge[7] = 0xff;
    huge[8] = 0x00;
    assert_eq!(sniff_bytes(&huge).await, Sniffed::Tls { server_name: None });
    // Not TLS at all after 0x16.
    assert_eq!(sniff_bytes(&[0x16, 0x42, 0, 0]).await, Sniffed::Other);
    // A hello for an address carries no SNI.
    let ip = client_hello(ServerName::from(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))));
    assert_eq!(sniff_bytes(&ip).await, Sniffed::Tls { server_name: None });
}

#[tokio::test]
async fn http_request_heads() {
    let host = |h: &str| Sniffed::Http {
        host: Some(h.into()),
    };
    assert_eq!(
        sniff_bytes(b"GET /x HTTP/1.1\r\nAccept: */*\r\nHost: API.Example.com:8443\r\n\r\n").await,
        host("api.example.com")
    );
    assert_eq!(
        sniff_bytes(b"POST / HTTP/1.0\r\nhost:  plain.test \r\n\r\nbody").await,
        host("plain.test")
    );
    assert_eq!(
        sniff_bytes(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n").await,
        host("::1")
    );
    assert_eq!(
        sniff_bytes(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n").await,
        Sniffed::Http { host: None }
    );
    assert_eq!(
        sniff_bytes(b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n").await,
        Sniffed::Http { host: None }
    );
    for other in [
        &b"\x00\x01\x02garbage"[..],
        b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: unfinished",
        b"AVERYLONGTOKENTHATISNOTANYHTTPMETHODATALL / HTTP/1.1\r\n",
        b"",
    ] {
        assert_eq!(sniff_bytes(other).await, Sniffed::Other, "{other:?}");
    }
}

/// Sniff `bytes` written `step` bytes at a time.
async fn sniff_trickled(bytes: &[u8], step: usize) -> (Sniffed, Vec<u8>) {
    let (mut tx, mut rx) = tokio::io::duplex(64);
    let data = bytes.to_vec();
    let writer = tokio::spawn(async move {
        for part in data.chunks(step) {
            if tx.write_all(part).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
        // Stay open: the verdict must not need EOF.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut buf = Vec::new();
    let s = sniff(&mut rx, &mut buf, Duration::from_secs(5)).await;
    writer.abort();
    (s, buf)
}

#[tokio::test]
async fn trickled_heads_and_hellos_are_still_recognized() {
    let mut head = b"GET /".to_vec();
    head.extend(std::iter::repeat_n(b'a', 3000));
    head.extend_from_slice(b" HTTP/1.1\r\nAccept: x\r\nHost: Trickle.test\r\n\r\n");
    for step in [1, 2, 3, 5, 700] {
        let (s, buf) = sniff_trickled(&head, step).await;
        assert_eq!(
            s,
            Sniffed::Http {
                host: Some("trickle.test".into())
            },
            "{step}"
        );
        assert_eq!(buf, head, "{step}");
    }
    let (s, _) = sniff_trickled(b"GET / HTTP/1.1\r\n\r\n", 1).await;
    assert_eq!(s, Sniffed::Http { host: None });
    // Binary after a plausible start is rejected without waiting for more.
    let (s, _) = sniff_trickled(
        b"HELLO-WORLD-PROTOCOL-V1 xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\x00\x01",
        1,
    )
    .await;
    assert_eq!(s, Sniffed::Other);
    let hello = hello_for("trickle.example.com");
    for step in [1, 9, 100] {
        let (s, _) = sniff_trickled(&hello, step).await;
        assert_eq!(
            s,
            Sniffed::Tls {
                server_name: Some("trickle.example.com".into())
            },
            "{step}"
        );
    }
}

#[tokio::test]
async fn nothing_within_the_wait_is_other() {
    let (_tx, mut rx) = tokio::io::duplex(1024);
    let mut buf = Vec::new();
    let s = sniff(&mut rx, &mut buf, Duration::from_millis(50)).await;
    assert_eq!(s, Sniffed::Other);
    assert!(buf.is_empty());
}

#[tokio::test]
async fn prefixed_replays_then_reads_and_writes_through() {
    let (mut far, near) = tokio::io::duplex(1024);
    far.write_all(b"def").await.expect("write");
    let mut p = Prefixed::new(b"abc".to_vec(), near);
    let mut one = [0u8; 2];
    p.read_exact(&mut one).await.expect("read");
    assert_eq!(&one, b"ab");
    let mut rest = [0u8; 4];
    p.read_exact(&mut rest).await.expect("read");
    assert_eq!(&rest, b"cdef");
    p.write_all(b"out").await.expect("write");
    let mut got = [0u8; 3];
    far.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"out");
}

#[test]
fn upstream_roots_include_the_extra_ca() {
    let (ca_pem, _, _) = test_ca();
    let system = std::fs::read(SYSTEM_ROOTS).unwrap_or_else(|_| ca_pem.clone().into_bytes());
    let base = tls_client_config(&system, None).expect("system");
    let more = tls_client_config(&system, Some(ca_pem.as_bytes())).expect("extra");
    assert_eq!(base.alpn_protocols, vec![b"http/1.1".to_vec()]);
    assert!(tls_client_config(&system, Some(b"junk")).is_err());
    drop(more);
}

// ---- end to end -------------------------------------------------------------------------

/// A private CA for the test upstream: (PEM, cert, key).
fn test_ca() -> (String, rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = p.self_signed(&key).expect("ca");
    (cert.pem(), cert, key)
}

/// A TLS server config for `name`, signed by `ca`.
fn upstream_tls(
    ca: &(String, rcgen::Certificate, KeyPair),
    name: &str,
) -> Arc<rustls::ServerConfig> {
    let key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec![name.to_string()])
        .expect("params")
        .signed_by(&key, &ca.1, &ca.2)
        .expect("leaf");
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("cert");
    Arc::new(cfg)
}

/// The upstream: `/echo` answers the request's headers and body size, `/stream` streams the
/// request body back, an upgrade answers 101 then says "server-first" and echoes.
async fn upstream(tls: Option<Arc<rustls::ServerConfig>>) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(AtomicU64::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let io: Box<dyn Io> = match tls {
                    Some(cfg) => match tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                        Ok(s) => Box::new(s),
                        Err(_) => return,
                    },
                    None => Box::new(tcp),
                };
                let svc = hyper::service::service_fn(move |req| {
                    count.fetch_add(1, Ordering::Relaxed);
                    echo(req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(io), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, seen)
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

type TestBody = BoxBody<Bytes, hyper::Error>;

async fn echo(mut req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    if req.headers().contains_key(UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut up = TokioIo::new(up);
            let _ = up.write_all(b"server-first").await;
            let mut b = [0u8; 1024];
            while let Ok(n) = up.read(&mut b).await {
                if n == 0 || up.write_all(&b[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(UPGRADE, HeaderValue::from_static("echo"));
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        return Ok(r);
    }
    if req.uri().path() == "/stream" {
        return Ok(Response::new(req.into_body().boxed()));
    }
    let mut text = String::new();
    for (n, v) in req.headers() {
        text.push_str(&format!("{n}: {}\n", v.to_str().unwrap_or("?")));
    }
    let size = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    text.push_str(&format!("body-bytes: {size}\n"));
    Ok(Response::new(
        Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed(),
    ))
}

fn rules(host: Option<&str>) -> Vec<(String, String)> {
    match host {
        Some("api.test") => vec![
            ("authorization".into(), "Bearer secret".into()),
            ("X-Extra".into(), "1".into()),
        ],
        _ => Vec::new(),
    }
}

/// The engine for one connection, as the tunnel would run it.
async fn engine(
    ca: Arc<EgressCa>,
    listener: TcpListener,
    upstream: SocketAddr,
    upstream_cfg: Option<Arc<rustls::ClientConfig>>,
) -> Result<Served, String> {
    let (mut tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let sniffed = sniff(&mut tcp, &mut buf, Duration::from_secs(5)).await;
    let up = TcpStream::connect(upstream)
        .await
        .map_err(|e| e.to_string())?;
    match (sniffed, upstream_cfg) {
        (
            Sniffed::Tls {
                server_name: Some(n),
            },
            Some(cfg),
        ) => {
            let name = LeafName::Dns(n);
            let client = accept_tls(&ca, Prefixed::new(buf, tcp), name.clone()).await?;
            let up = connect_tls(cfg, up, &name).await?;
            serve_http1(client, up, rules).await
        }
        (Sniffed::Http { host: Some(_) }, None) => {
            serve_http1(Prefixed::new(buf, tcp), up, rules).await
        }
        (s, _) => Err(format!("sniffed {s:?}")),
    }
}

struct Setup {
    engine: tokio::task::JoinHandle<Result<Served, String>>,
    seen: Arc<AtomicU64>,
    sender: hyper::client::conn::http1::SendRequest<TestBody2>,
}

type TestBody2 = BoxBody<Bytes, Infallible>;

/// Upstream (TLS for `cert_name`, or plain), engine, and a client connected through it.
async fn setup(cert_name: Option<&str>) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = Arc::new(EgressCa::load_or_create(tmp.path()).expect("ca"));
    let test_ca = test_ca();
    let (addr, seen) = upstream(cert_name.map(|n| upstream_tls(&test_ca, n))).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let engine_addr = listener.local_addr().expect("addr");
    let up_cfg = cert_name.map(|_| {
        let system = std::fs::read(SYSTEM_ROOTS).unwrap_or_else(|_| test_ca.0.clone().into_bytes());
        tls_client_config(&system, Some(test_ca.0.as_bytes())).expect("upstream cfg")
    });
    let engine = tokio::spawn(engine(ca.clone(), listener, addr, up_cfg));
    let tcp = TcpStream::connect(engine_addr).await.expect("connect");
    let io: Box<dyn Io> = if cert_name.is_some() {
        let roots = crate::socks::roots_from_pem(ca.cert_pem().as_bytes()).expect("roots");
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = ServerName::try_from("api.test").expect("name");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .expect("client TLS to the engine");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("client handshake");
    tokio::spawn(conn.with_upgrades());
    std::mem::forget(tmp);
    Setup {
        engine,
        seen,
        sender,
    }
}

fn get(path: &str) -> Request<TestBody2> {
    Request::builder()
        .uri(path)
        .header(HOST, "api.test")
        .header(AUTHORIZATION, "Bearer sandbox")
        .body(Full::new(Bytes::new()).boxed())
        .expect("request")
}

async fn text(resp: Response<Incoming>) -> String {
    let b = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&b).into_owned()
}

/// A body fed by a channel (to prove streaming: the next chunk waits for the echo).
struct ChanBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

#[tokio::test]
async fn https_requests_get_the_rule_headers_and_bodies_stream() {
    tokio::time::timeout(T, async {
        let mut s = setup(Some("api.test")).await;
        for _ in 0..2 {
            s.sender.ready().await.expect("ready");
            let resp = s.sender.send_request(get("/echo")).await.expect("response");
            assert_eq!(resp.status(), StatusCode::OK);
            let body = text(resp).await;
            assert!(body.contains("authorization: Bearer secret\n"), "{body}");
            assert!(!body.contains("sandbox"), "{body}");
            assert_eq!(body.matches("authorization:").count(), 1, "{body}");
            assert!(body.contains("x-extra: 1\n"), "{body}");
        }
        // 1 MiB chunked upload.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let req = Request::builder()
            .method("POST")
            .uri("/echo")
            .header(HOST, "api.test")
            .body(ChanBody(rx).boxed())
            .expect("request");
        tokio::spawn(async move {
            for _ in 0..16 {
                if tx.send(Bytes::from(vec![7u8; 64 * 1024])).await.is_err() {
                    return;
                }
            }
        });
        s.sender.ready().await.expect("ready");
        let body = text(s.sender.send_request(req).await.expect("response")).await;
        assert!(body.contains("body-bytes: 1048576\n"), "{body}");
        assert!(body.contains("transfer-encoding: chunked\n"), "{body}");
        // Streaming both ways: each chunk must come back before the next is sent.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let req = Request::builder()
            .method("POST")
            .uri("/stream")
            .header(HOST, "api.test")
            .body(ChanBody(rx).boxed())
            .expect("request");
        tx.send(Bytes::from_static(b"ping-0")).await.expect("send");
        s.sender.ready().await.expect("ready");
        let mut body = s
            .sender
            .send_request(req)
            .await
            .expect("response")
            .into_body();
        for i in 1..4 {
            let frame = body.frame().await.expect("frame").expect("ok");
            assert_eq!(
                frame.data_ref().map(|b| b.as_ref()),
                Some(format!("ping-{}", i - 1).as_bytes())
            );
            tx.send(Bytes::from(format!("ping-{i}")))
                .await
                .expect("send");
        }
        drop(tx);
        let rest = body.collect().await.expect("rest").to_bytes();
        assert_eq!(&rest[..], b"ping-3");
        drop(s.sender);
        let served = s.engine.await.expect("join").expect("served");
        assert_eq!(served.requests, 4);
        assert_eq!(served.injected, 4);
        assert_eq!(s.seen.load(Ordering::Relaxed), 4);
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn an_upstream_certificate_for_another_name_is_refused() {
    tokio::time::timeout(T, async {
        let s = setup(Some("other.test")).await;
        let err = s.engine.await.expect("join").expect_err("must fail");
        assert!(err.contains("TLS to api.test"), "{err}");
        assert_eq!(s.seen.load(Ordering::Relaxed), 0, "no request reached it");
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn upgrades_become_a_raw_tunnel() {
    tokio::time::timeout(T, async {
        let mut s = setup(Some("api.test")).await;
        let req = Request::builder()
            .uri("/ws")
            .header(HOST, "api.test")
            .header(CONNECTION, "Upgrade")
            .header(UPGRADE, "echo")
            .body(Full::new(Bytes::new()).boxed())
            .expect("request");
        let resp = s.sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let mut io = TokioIo::new(hyper::upgrade::on(resp).await.expect("upgraded"));
        let mut first = [0u8; 12];
        io.read_exact(&mut first).await.expect("server first");
        assert_eq!(&first, b"server-first");
        io.write_all(b"hello both ways").await.expect("write");
        let mut back = [0u8; 15];
        io.read_exact(&mut back).await.expect("echo");
        assert_eq!(&back, b"hello both ways");
        drop(io);
        let served = s.engine.await.expect("join").expect("served");
        assert_eq!(served.requests, 1);
        assert_eq!(served.injected, 1);
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn plain_http_is_injected_too() {
    tokio::time::timeout(T, async {
        let mut s = setup(None).await;
        let body = text(s.sender.send_request(get("/echo")).await.expect("response")).await;
        assert!(body.contains("authorization: Bearer secret\n"), "{body}");
        assert!(!body.contains("sandbox"), "{body}");
        drop(s.sender);
        let served = s.engine.await.expect("join").expect("served");
        assert_eq!((served.requests, served.injected), (1, 1));
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn an_upstream_failure_is_a_502_and_ends_the_connection() {
    tokio::time::timeout(T, async {
        // An upstream that reads the request head and hangs up.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let mut b = [0u8; 1024];
            let _ = tcp.read(&mut b).await;
        });
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let up = TcpStream::connect(addr).await.expect("connect");
        let engine = tokio::spawn(serve_http1(client, up, rules));
        server
            .write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
            .await
            .expect("write");
        let mut resp = Vec::new();
        server.read_to_end(&mut resp).await.expect("read");
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
        assert!(resp.contains("cella egress: upstream"), "{resp}");
        let served = engine.await.expect("join").expect("served");
        assert_eq!(served.requests, 1);
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn an_upstream_closing_an_idle_connection_closes_the_clients() {
    tokio::time::timeout(T, async {
        // An upstream that answers one request (keep-alive) and then hangs up while idle.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let mut b = [0u8; 1024];
            let _ = tcp.read(&mut b).await;
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        let (client, mut sandbox) = tokio::io::duplex(64 * 1024);
        let up = TcpStream::connect(addr).await.expect("connect");
        let engine = tokio::spawn(serve_http1(client, up, rules));
        sandbox
            .write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
            .await
            .expect("write");
        // EOF (not a 502) once the upstream is gone.
        let mut resp = Vec::new();
        sandbox.read_to_end(&mut resp).await.expect("read");
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.ends_with("\r\n\r\nok"), "{resp}");
        let served = engine.await.expect("join").expect("served");
        assert_eq!((served.requests, served.injected), (1, 1));
        assert_eq!(served.error, None);
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn a_client_protocol_error_is_reported_with_the_counts() {
    tokio::time::timeout(T, async {
        let (addr, seen) = upstream(None).await;
        let (client, mut sandbox) = tokio::io::duplex(64 * 1024);
        let up = TcpStream::connect(addr).await.expect("connect");
        let engine = tokio::spawn(serve_http1(client, up, rules));
        sandbox
            .write_all(b"GET /echo HTTP/1.1\r\nHost: api.test\r\n\r\n")
            .await
            .expect("write");
        let mut b = vec![0u8; 4096];
        let n = sandbox.read(&mut b).await.expect("read");
        assert!(b[..n].starts_with(b"HTTP/1.1 200"));
        sandbox
            .write_all(b"GET /echo HTTP/1.1\r\nContent-Length: x\r\n\r\n")
            .await
            .expect("write");
        let mut rest = Vec::new();
        let _ = sandbox.read_to_end(&mut rest).await;
        let served = engine.await.expect("join").expect("served");
        assert_eq!((served.requests, served.injected), (1, 1));
        assert!(served.error.is_some(), "{served:?}");
        assert_eq!(seen.load(Ordering::Relaxed), 1);
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn header_case_is_kept_both_ways_and_the_rule_replaces_any_case() {
    tokio::time::timeout(T, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (head_tx, head_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                match tcp.read(&mut b).await {
                    Ok(n) if n > 0 => head.extend_from_slice(&b[..n]),
                    _ => return,
                }
            }
            let _ = head_tx.send(String::from_utf8_lossy(&head).into_owned());
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\nX-Resp-Case: 1\r\nContent-Length: 0\r\n\r\n")
                .await;
        });
        let (client, mut sandbox) = tokio::io::duplex(64 * 1024);
        let up = TcpStream::connect(addr).await.expect("connect");
        let engine = tokio::spawn(serve_http1(client, up, rules));
        sandbox
            .write_all(
                b"GET / HTTP/1.1\r\nHost: API.test:80\r\nX-Custom-Case: v\r\n\
                  AUTHORIZATION: Bearer sandbox\r\nauthorization: again\r\n\r\n",
            )
            .await
            .expect("write");
        let head = head_rx.await.expect("head");
        assert!(head.contains("\r\nX-Custom-Case: v\r\n"), "{head}");
        assert!(head.contains("Bearer secret\r\n"), "{head}");
        assert_eq!(
            head.to_ascii_lowercase().matches("authorization:").count(),
            1,
            "{head}"
        );
        assert!(
            !head.contains("sandbox") && !head.contains("again"),
            "{head}"
        );
        let mut b = vec![0u8; 4096];
        let n = sandbox.read(&mut b).await.expect("read");
        let resp = String::from_utf8_lossy(&b[..n]);
        assert!(resp.contains("\r\nX-Resp-Case: 1\r\n"), "{resp}");
        drop(sandbox);
        let served = engine.await.expect("join").expect("served");
        assert_eq!((served.requests, served.injected), (1, 1));
    })
    .await
    .expect("in time");
}

/// Benchmark (not a pass/fail limit): `cargo test -p cella-net --release --lib -- --ignored
/// bench_ --nocapture`. Upload throughput and keep-alive request rate through the TLS engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_tls_engine() {
    let mut s = setup(Some("api.test")).await;
    const MIB: usize = 256;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let req = Request::builder()
        .method("POST")
        .uri("/echo")
        .header(HOST, "api.test")
        .body(ChanBody(rx).boxed())
        .expect("request");
    let start = std::time::Instant::now();
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![7u8; 1024 * 1024]);
        for _ in 0..MIB {
            if tx.send(chunk.clone()).await.is_err() {
                return;
            }
        }
    });
    s.sender.ready().await.expect("ready");
    let body = text(s.sender.send_request(req).await.expect("response")).await;
    let secs = start.elapsed().as_secs_f64();
    assert!(body.contains(&format!("body-bytes: {}\n", MIB * 1024 * 1024)));
    println!(
        "upload {MIB} MiB through TLS engine: {:.0} MiB/s",
        MIB as f64 / secs
    );
    let n = 2000;
    let start = std::time::Instant::now();
    for _ in 0..n {
        s.sender.ready().await.expect("ready");
        let resp = s.sender.send_request(get("/echo")).await.expect("response");
        let _ = text(resp).await;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{n} keep-alive requests: {:.0} req/s, {:.0} us each",
        n as f64 / secs,
        secs * 1e6 / n as f64
    );
}
