//! `network.rules`: the HTTP/HTTPS interception engine that sets headers on a sandbox's
//! outbound requests, so credentials never enter the sandbox.
//!
//! The tunnel listener (see [`crate::socks`]) receives every new allowed TCP connection of a
//! sandbox with rules. This module gives it the pieces to intercept one:
//!
//! - [`sniff`] reads what the client sends first (without answering) and tells a TLS
//!   ClientHello (with its SNI) from an HTTP/1.x request head (with its `Host`) from anything
//!   else; [`Prefixed`] replays those bytes to whoever handles the connection next, so a
//!   connection that is not intercepted is spliced through unchanged.
//! - [`accept_tls`] terminates the sandbox's TLS with a leaf from the [`EgressCa`];
//!   [`connect_tls`] opens TLS to the real server and *verifies its certificate for the same
//!   name*, which is what keeps a sandbox from sending `SNI=api.example.com` to an address of its
//!   own choosing and receiving the secret headers there.
//! - [`serve_http1`] is an HTTP/1.1 proxy over one client and one upstream connection: each
//!   request gets the headers the rules give for its `Host` (replacing the request's own),
//!   bodies stream both ways, upgrades (WebSocket) become a raw tunnel.
//!
//! Why only HTTP/1.1: the leaf offers ALPN `http/1.1` alone, so clients never negotiate h2
//! with us, and one request at a time keeps injection and accounting simple.

use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, HeaderName, HeaderValue, UPGRADE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::Mutex;

use crate::ca::{EgressCa, LeafName};

/// Most bytes [`sniff`] reads (a ClientHello or a request head larger than this is not
/// inspected).
pub const SNIFF_CAP: usize = 16 * 1024;
/// How long [`sniff`] waits for the rest of a ClientHello or request head once it began.
pub const SNIFF_REST: Duration = Duration::from_secs(10);
/// The system trust store the upstream verification starts from.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A stream whose first bytes are `prefix` (what [`sniff`] consumed), then `inner`'s.
/// Writes go to `inner`.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Replay `prefix` before reading `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream, mutably (reading it directly skips the unreplayed prefix).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if let Some(rest) = me.prefix.get(me.pos..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            me.pos += n;
            if me.pos >= me.prefix.len() {
                me.prefix = Vec::new();
                me.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What a connection's first bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// A TLS handshake; `server_name` is the ClientHello's SNI `host_name` (lowercase), `None`
    /// when absent or when the hello is malformed, truncated or too large.
    Tls {
        /// SNI.
        server_name: Option<String>,
    },
    /// An HTTP/1.x request head; `host` is its `Host` (lowercase, port stripped).
    Http {
        /// `Host`.
        host: Option<String>,
    },
    /// Anything else: another protocol, nothing within the wait, EOF, an unfinished HTTP head.
    Other,
}

/// Read the client's first bytes into `buf` (replay them with [`Prefixed`]) and classify them.
///
/// Waits `wait` for the first byte (a server-speaks-first protocol sends nothing: `Other`),
/// then at most [`SNIFF_REST`] for the rest of a ClientHello or request head, reading at most
/// [`SNIFF_CAP`] bytes. Stops as soon as the bytes cannot be TLS or HTTP. Never fails: a read
/// error counts as EOF.
pub async fn sniff<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>, wait: Duration) -> Sniffed {
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut chunk = vec![0u8; 4096];
    let mut check = true;
    loop {
        if let Some(done) = check.then(|| classify(buf)).flatten() {
            return done;
        }
        let room = SNIFF_CAP.saturating_sub(buf.len()).min(chunk.len());
        if room == 0 {
            return finish(buf);
        }
        let now = tokio::time::Instant::now();
        let limit = if buf.is_empty() {
            wait
        } else {
            let d = *deadline.get_or_insert(now + SNIFF_REST);
            d.saturating_duration_since(now)
        };
        match tokio::time::timeout(limit, s.read(&mut chunk[..room])).await {
            Ok(Ok(n)) if n > 0 => {
                buf.extend_from_slice(&chunk[..n]);
                // Past the method, only a line break or a control byte can end an HTTP head:
                // skip re-parsing the rest (no quadratic work for a client trickling bytes).
                check = buf.first() == Some(&0x16)
                    || buf.len() <= 2 * head::MAX_METHOD
                    || chunk[..n].iter().any(|b| b.is_ascii_control());
            }
            _ => return finish(buf),
        }
    }
}

/// A verdict from what is in `buf`, or `None` if more bytes could change it.
fn classify(buf: &[u8]) -> Option<Sniffed> {
    match buf.first()? {
        0x16 => tls::classify(buf),
        b if is_tchar(*b) => head::classify(buf),
        _ => Some(Sniffed::Other),
    }
}

/// The verdict when no more bytes come (EOF, timeout, cap).
fn finish(buf: &[u8]) -> Sniffed {
    match buf {
        [0x16] | [0x16, 3, ..] => Sniffed::Tls { server_name: None },
        _ => Sniffed::Other,
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A byte reader that never reads out of bounds: every read is `None` past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u16(&mut self) -> Option<usize> {
        let b = self.take(2)?;
        Some(usize::from(b[0]) << 8 | usize::from(b[1]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

mod tls {
    use super::{Reader, SNIFF_CAP, Sniffed};

    /// Largest TLS record fragment (2^14) plus the expansion TLS 1.2 allows.
    const MAX_RECORD: usize = 16384 + 2048;

    pub(super) fn classify(buf: &[u8]) -> Option<Sniffed> {
        let none = Some(Sniffed::Tls { server_name: None });
        if buf.get(1).is_some_and(|&major| major != 3) {
            return Some(Sniffed::Other);
        }
        // The handshake message may span records: join the fragments of complete records.
        let mut hs = Vec::new();
        let mut r = Reader(buf);
        loop {
            let header = r.take(5)?;
            let (ctype, major) = (header[0], header[1]);
            let len = usize::from(header[3]) << 8 | usize::from(header[4]);
            if ctype != 0x16 || major != 3 || len == 0 || len > MAX_RECORD {
                return none;
            }
            let fragment = r.take(len)?;
            hs.extend_from_slice(fragment);
            if hs.len() >= 4 {
                if hs[0] != 1 {
                    return none;
                }
                let body_len =
                    usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]);
                if body_len + 4 > SNIFF_CAP {
                    return none;
                }
                if let Some(body) = hs.get(4..4 + body_len) {
                    return Some(Sniffed::Tls {
                        server_name: server_name(body),
                    });
                }
            }
        }
    }

    /// The SNI `host_name` of a ClientHello body (RFC 8446 4.1.2, RFC 6066 3).
    pub(super) fn server_name(body: &[u8]) -> Option<String> {
        let mut r = Reader(body);
        r.take(2)?; // legacy_version
        r.take(32)?; // random
        r.vec8()?; // legacy_session_id
        r.vec16()?; // cipher_suites
        r.vec8()?; // legacy_compression_methods
        let mut exts = Reader(r.vec16()?);
        while let Some(kind) = exts.u16() {
            let data = exts.vec16()?;
            if kind != 0 {
                continue;
            }
            let mut list = Reader(Reader(data).vec16()?);
            while let Some(name_type) = list.u8() {
                let name = list.vec16()?;
                if name_type == 0 {
                    return valid_name(name);
                }
            }
            return None;
        }
        None
    }

    fn valid_name(name: &[u8]) -> Option<String> {
        let ok = !name.is_empty()
            && name.len() <= 253
            && name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(b));
        ok.then(|| String::from_utf8_lossy(name).to_ascii_lowercase())
    }
}

mod head {
    use super::{Sniffed, is_tchar, normalize_host};

    /// Longest method considered.
    pub(super) const MAX_METHOD: usize = 32;

    pub(super) fn classify(buf: &[u8]) -> Option<Sniffed> {
        let other = Some(Sniffed::Other);
        let method_len = buf.iter().take_while(|b| is_tchar(**b)).count();
        if method_len > MAX_METHOD {
            return other;
        }
        match buf.get(method_len) {
            None => return None,
            Some(b' ') => {}
            Some(_) => return other,
        }
        // Binary after the method: not HTTP, and the client may be waiting for an answer.
        let nl = buf.iter().position(|b| *b == b'\n');
        let line = &buf[..nl.unwrap_or(buf.len())];
        let line = match nl {
            Some(_) => match line.strip_suffix(b"\r") {
                Some(l) => l,
                None => return other,
            },
            None => line.strip_suffix(b"\r").unwrap_or(line),
        };
        if line.iter().any(|b| b.is_ascii_control()) {
            return other;
        }
        let nl = nl?;
        let mut parts = line.split(|b| *b == b' ');
        let (Some(_), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return other;
        };
        if target.is_empty() || !(version == b"HTTP/1.1" || version == b"HTTP/1.0") {
            return other;
        }
        // The head ends at the first empty line ("\r\n\r\n").
        let rest = buf.get(nl + 1..).unwrap_or_default();
        let end = rest
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .map(|(i, _)| i)
            .find(|&i| {
                (i == 1 && rest.first() == Some(&b'\r'))
                    || (i >= 2 && rest.get(i - 2..=i) == Some(&b"\n\r\n"[..]))
            })?;
        let headers = &rest[..end];
        let host = headers
            .split(|b| *b == b'\n')
            .filter_map(|l| {
                let l = l.strip_suffix(b"\r").unwrap_or(l);
                let colon = l.iter().position(|b| *b == b':')?;
                let (name, value) = l.split_at(colon);
                name.eq_ignore_ascii_case(b"host")
                    .then(|| std::str::from_utf8(&value[1..]).ok())
                    .flatten()
            })
            .next()
            .and_then(normalize_host);
        Some(Sniffed::Http { host })
    }
}

/// A `Host` value without its port, lowercase; `None` if empty or not a plausible host.
fn normalize_host(v: &str) -> Option<String> {
    let v = v.trim();
    let host = if let Some(rest) = v.strip_prefix('[') {
        rest.split_once(']')?.0
    } else {
        match v.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => v,
        }
    };
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
    ok.then(|| host.to_ascii_lowercase())
}

/// Terminate the sandbox's TLS (`client`, usually a [`Prefixed`] after [`sniff`]) with a leaf
/// for `name` signed by `ca`.
pub async fn accept_tls<S>(
    ca: &EgressCa,
    client: S,
    name: LeafName,
) -> Result<tokio_rustls::server::TlsStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = ca.server_config(&name).map_err(|e| e.to_string())?;
    tokio_rustls::TlsAcceptor::from(cfg)
        .accept(client)
        .await
        .map_err(|e| format!("TLS from the sandbox for {name}: {e}"))
}

/// Open TLS over `upstream` to the real server for `name`, verifying its certificate for
/// `name` against `cfg`'s roots (ALPN `http/1.1`).
pub async fn connect_tls<S>(
    cfg: Arc<rustls::ClientConfig>,
    upstream: S,
    name: &LeafName,
) -> Result<tokio_rustls::client::TlsStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let server_name = match name {
        LeafName::Dns(n) => {
            ServerName::try_from(n.clone()).map_err(|e| format!("TLS server name {n:?}: {e}"))?
        }
        LeafName::Ip(ip) => ServerName::from(IpAddr::V4(*ip)),
    };
    let http11 = vec![b"http/1.1".to_vec()];
    let cfg = if cfg.alpn_protocols == http11 {
        cfg
    } else {
        let mut c = (*cfg).clone();
        c.alpn_protocols = http11;
        Arc::new(c)
    };
    tokio_rustls::TlsConnector::from(cfg)
        .connect(server_name, upstream)
        .await
        .map_err(|e| format!("TLS to {name}: {e}"))
}

/// The client configuration for upstream servers: the system trust store ([`SYSTEM_ROOTS`])
/// plus `extra_ca_pem` (`--egress-upstream-ca`), ALPN `http/1.1`.
pub fn upstream_tls_config(
    extra_ca_pem: Option<&[u8]>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let system = std::fs::read(SYSTEM_ROOTS)
        .map_err(|e| format!("reading the system trust store {SYSTEM_ROOTS}: {e}"))?;
    tls_client_config(&system, extra_ca_pem)
}

fn tls_client_config(
    system_pem: &[u8],
    extra_ca_pem: Option<&[u8]>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = crate::socks::roots_from_pem(system_pem)?;
    if let Some(extra) = extra_ca_pem {
        let extra = crate::socks::roots_from_pem(extra).map_err(|e| format!("extra {e}"))?;
        roots.roots.extend(extra.roots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// What one [`serve_http1`] connection did (for the audit record).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Served {
    /// Requests forwarded (or answered 502).
    pub requests: u64,
    /// Requests that got at least one header set.
    pub injected: u64,
    /// Why the client connection ended abnormally (a protocol error, a reset), if it did.
    pub error: Option<String>,
}

type Body = Either<Incoming, Full<Bytes>>;

struct Forwarder<F> {
    upstream: Mutex<Option<hyper::client::conn::http1::SendRequest<Incoming>>>,
    headers: F,
    requests: AtomicU64,
    injected: AtomicU64,
    /// A request asked for an upgrade (its upstream connection ends by handing over).
    upgrading: AtomicBool,
    /// Both halves of an accepted upgrade, for the tunnel.
    upgrade: std::sync::Mutex<Option<(hyper::upgrade::OnUpgrade, hyper::upgrade::OnUpgrade)>>,
}

impl<F> Forwarder<F>
where
    F: Fn(Option<&str>) -> Vec<(String, String)>,
{
    async fn forward(&self, mut req: Request<Incoming>) -> Response<Body> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let host = req
            .headers()
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .and_then(normalize_host)
            .or_else(|| req.uri().host().and_then(normalize_host));
        let mut set = false;
        for (name, value) in (self.headers)(host.as_deref()) {
            match (
                HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                (Ok(n), Ok(v)) => {
                    req.headers_mut().insert(n, v);
                    set = true;
                }
                _ => tracing::debug!(header = %name, "unusable rule header skipped"),
            }
        }
        if set {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        let wants_upgrade = is_upgrade(&req);
        let client_upgrade = wants_upgrade.then(|| {
            self.upgrading.store(true, Ordering::Relaxed);
            hyper::upgrade::on(&mut req)
        });
        let mut guard = self.upstream.lock().await;
        let Some(sender) = guard.as_mut() else {
            return bad_gateway("upstream connection closed");
        };
        if let Err(e) = sender.ready().await {
            *guard = None;
            return bad_gateway(&format!("upstream: {e}"));
        }
        let connect = req.method() == Method::CONNECT;
        match sender.send_request(req).await {
            Ok(mut resp) => {
                let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                    || (connect && resp.status().is_success());
                if !upgraded {
                    self.upgrading.store(false, Ordering::Relaxed);
                }
                if let (true, Some(client)) = (upgraded, client_upgrade) {
                    let up = hyper::upgrade::on(&mut resp);
                    if let Ok(mut slot) = self.upgrade.lock() {
                        *slot = Some((client, up));
                    }
                }
                resp.map(Either::Left)
            }
            Err(e) => {
                *guard = None;
                bad_gateway(&format!("upstream: {e}"))
            }
        }
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    if req.method() == Method::CONNECT {
        return true;
    }
    let connection_upgrade = req.headers().get_all(CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    connection_upgrade && req.headers().contains_key(UPGRADE)
}

fn bad_gateway(msg: &str) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "cella egress: {msg}\n"
    )))));
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// Proxy HTTP/1.1 from `client` (the sandbox, TLS already terminated if any) to `upstream`
/// (one connection, requests in order), setting on each request the headers
/// `headers(host)` gives for its `Host` (lowercase, no port): each replaces every value of
/// that name the request had. Bodies stream both ways; an upgrade (`101`, or a `2xx` to
/// `CONNECT`) becomes a raw tunnel. An upstream failure answers `502` and ends the
/// connection; when the upstream closes an idle connection, the client's is closed too.
///
/// Returns when the client connection ends. `Err` only if the upstream connection could not
/// be set up.
pub async fn serve_http1<C, U, F>(client: C, upstream: U, headers: F) -> Result<Served, String>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Option<&str>) -> Vec<(String, String)> + Send + Sync + 'static,
{
    // Header case preserved both ways: the engine should be invisible except for the rules.
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .handshake::<_, Incoming>(TokioIo::new(upstream))
        .await
        .map_err(|e| format!("upstream HTTP/1.1: {e}"))?;
    let fwd = Arc::new(Forwarder {
        upstream: Mutex::new(Some(sender)),
        headers,
        requests: AtomicU64::new(0),
        injected: AtomicU64::new(0),
        upgrading: AtomicBool::new(false),
        upgrade: std::sync::Mutex::new(None),
    });
    let service = {
        let fwd = fwd.clone();
        hyper::service::service_fn(move |req| {
            let fwd = fwd.clone();
            async move { Ok::<_, Infallible>(fwd.forward(req).await) }
        })
    };
    let mut upstream_conn = pin!(conn.with_upgrades());
    let mut upstream_done = false;
    let mut server = pin!(
        hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .half_close(true)
            .preserve_header_case(true)
            .serve_connection(TokioIo::new(client), service)
            .with_upgrades()
    );
    let result = loop {
        tokio::select! {
            r = server.as_mut() => break r,
            r = upstream_conn.as_mut(), if !upstream_done => {
                upstream_done = true;
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
                if !fwd.upgrading.load(Ordering::Relaxed) {
                    server.as_mut().graceful_shutdown();
                }
            }
        }
    };
    let pending = fwd.upgrade.lock().ok().and_then(|mut s| s.take());
    if let Some((client, up)) = pending {
        let halves = async { tokio::join!(client, up) };
        let mut halves = pin!(halves);
        // The upstream half is handed over only by its connection task: keep driving it.
        let halves = loop {
            tokio::select! {
                h = halves.as_mut() => break h,
                _ = upstream_conn.as_mut(), if !upstream_done => upstream_done = true,
            }
        };
        if let (Ok(c), Ok(u)) = halves {
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
        }
    }
    Ok(Served {
        requests: fwd.requests.load(Ordering::Relaxed),
        injected: fwd.injected.load(Ordering::Relaxed),
        error: result.err().map(|e| e.to_string()),
    })
}

#[cfg(test)]
mod tests;
