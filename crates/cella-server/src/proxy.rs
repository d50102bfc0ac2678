//! The sandbox proxy: forwards a request to a port inside a sandbox.
//!
//! A request is for a sandbox when it carries `E2b-Sandbox-Id` (port from `E2b-Sandbox-Port`,
//! default 49983) or when its Host is `<port>-<sandboxID>.<domain>`. The connection into the
//! sandbox comes from the driver's [`cella_core::driver::SandboxHandle::dial`], so jail and
//! microVM sandboxes share this one code path. Connections are pooled per sandbox and port.
//!
//! What never crosses into a sandbox: the caller's API key, the traffic access token, and
//! hop-by-hop headers. What is refused: envd's internal control routes (as E2B's proxy does),
//! and, for a sandbox created with `allowPublicTraffic: false`, requests to its ports without
//! the right `e2b-traffic-access-token` (403, E2B's texts; the agent's port is exempt because
//! it checks its own token). Failures answer with E2B's
//! exact 502 texts, which the SDKs match on.
//!
//! A paused sandbox is never dialed (its frozen agent would accept the connection and never
//! answer). With `autoResume` the request resumes it and is then forwarded, as E2B's client
//! proxy does; without, it is answered like a sandbox that is not there — 502 "The sandbox
//! was not found" (plus `"paused": true`), which both SDKs read as "not running"
//! (`is_running()` is false).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cella_api::{ENVD_PORT, HEADER_SANDBOX_ID, HEADER_SANDBOX_PORT, HEADER_TRAFFIC_ACCESS_TOKEN};
use cella_core::manager::Manager;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::AppState;
use crate::upstream::{self, Upstream};

/// envd routes that only the host may call; refused through the proxy.
const INTERNAL_ENVD_ROUTES: &[&str] = &[
    "/init",
    "/upgrade",
    "/freeze",
    "/unfreeze",
    "/collapse",
    "/fsfreeze",
    "/fsthaw",
    "/egress",
    "/trust",
];

/// Where a proxied request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Sandbox ID.
    pub sandbox_id: String,
    /// Port inside the sandbox.
    pub port: u16,
}

/// Outcome of looking at a request's routing headers.
#[derive(Debug, PartialEq, Eq)]
pub enum Routing {
    /// Not for a sandbox: the REST API.
    Api,
    /// For a sandbox.
    Sandbox(Target),
    /// Names a sandbox, but malformed (bad port or ID).
    Invalid(String),
}

/// Decide whether a request is for a sandbox, from its headers.
pub fn routing(headers: &HeaderMap) -> Routing {
    if let Some(id) = headers.get(HEADER_SANDBOX_ID) {
        let Ok(id) = id.to_str() else {
            return Routing::Invalid("E2b-Sandbox-Id is not valid text".into());
        };
        let port = match headers.get(HEADER_SANDBOX_PORT) {
            None => ENVD_PORT,
            Some(p) => match p.to_str().ok().and_then(|p| p.trim().parse::<u16>().ok()) {
                Some(p) if p > 0 => p,
                _ => return Routing::Invalid("E2b-Sandbox-Port is not a port number".into()),
            },
        };
        return Routing::Sandbox(Target {
            sandbox_id: id.trim().to_string(),
            port,
        });
    }
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok())
        && let Some(t) = parse_host(host)
    {
        return Routing::Sandbox(t);
    }
    Routing::Api
}

/// Parse `<port>-<sandboxID>.<domain>[:port]`; only the left-most label counts.
pub fn parse_host(host: &str) -> Option<Target> {
    let (label, rest) = host.split_once('.')?;
    if rest.is_empty() {
        return None;
    }
    let (port, id) = label.split_once('-')?;
    if id.contains('-') || !cella_api::is_valid_sandbox_id(id) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    Some(Target {
        sandbox_id: id.to_string(),
        port,
    })
}

/// Middleware: proxy sandbox requests, pass everything else to the REST router.
pub async fn route_or_next(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match routing(req.headers()) {
        Routing::Api => next.run(req).await,
        Routing::Invalid(msg) => proxy_error(StatusCode::BAD_REQUEST, "", None, &msg),
        Routing::Sandbox(target) => state.proxy.forward(target, req).await,
    }
}

/// E2B's proxy error body: `{sandboxId, message, code[, port]}`.
fn proxy_error(status: StatusCode, sandbox_id: &str, port: Option<u16>, message: &str) -> Response {
    let mut body = serde_json::json!({
        "sandboxId": sandbox_id,
        "message": message,
        "code": status.as_u16(),
    });
    if let Some(p) = port {
        body["port"] = p.into();
    }
    (status, axum::Json(body)).into_response()
}

fn not_found(id: &str) -> Response {
    proxy_error(
        StatusCode::BAD_GATEWAY,
        id,
        None,
        "The sandbox was not found",
    )
}

fn paused(id: &str) -> Response {
    let body = serde_json::json!({
        "sandboxId": id,
        "message": "The sandbox was not found",
        "code": StatusCode::BAD_GATEWAY.as_u16(),
        "paused": true,
    });
    (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response()
}

/// 502 for a port in `httpsPorts` whose server does not speak TLS (or fails the handshake).
fn tls_failed(id: &str, port: u16, e: &std::io::Error) -> Response {
    proxy_error(
        StatusCode::BAD_GATEWAY,
        id,
        Some(port),
        &format!("The sandbox port is listed in httpsPorts but its TLS handshake failed: {e}"),
    )
}

fn port_closed(id: &str, port: u16) -> Response {
    proxy_error(
        StatusCode::BAD_GATEWAY,
        id,
        Some(port),
        "The sandbox is running but port is not open",
    )
}

/// Dials `http://<sandboxID>:<port>` through the sandbox's driver.
#[derive(Clone)]
pub struct SandboxConnector {
    manager: Arc<Manager>,
    grace: std::time::Duration,
}

/// Errors of [`SandboxConnector`].
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The URI does not name a sandbox and port.
    #[error("bad proxy target")]
    BadTarget,
    /// No such live sandbox.
    #[error("sandbox not found")]
    NotFound,
    /// Nothing listens on the port.
    #[error("port is not open")]
    Connect(#[source] std::io::Error),
    /// A port in `httpsPorts` did not complete a TLS handshake.
    #[error("TLS handshake with the sandbox port failed")]
    Tls(#[source] std::io::Error),
}

impl tower::Service<Uri> for SandboxConnector {
    type Response = Upstream;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let manager = self.manager.clone();
        let grace = self.grace;
        Box::pin(async move {
            let (id, incarnation) = parse_upstream(uri.host().ok_or(DialError::BadTarget)?)
                .ok_or(DialError::BadTarget)?;
            let port = uri.port_u16().ok_or(DialError::BadTarget)?;
            let live = manager
                .route(id)
                .filter(|l| !l.is_paused() && l.incarnation == incarnation)
                .ok_or(DialError::NotFound)?;
            let stream = dial_with_grace(&live, port, grace).await?;
            let _ = stream.set_nodelay(true);
            let tls = tls_name(&live, port);
            drop(live);
            upstream::connect(stream, tls).await.map_err(DialError::Tls)
        })
    }
}

/// The host of upstream URIs, `<sandbox id>.g<incarnation>`: the connection pool's key, so
/// that an idle connection to an earlier incarnation of the same ID (a sandbox paused to disk
/// and started again; a dead microVM does not reset its connections) is never reused.
fn upstream_host(live: &cella_core::manager::LiveSandbox) -> String {
    format!("{}.g{}", live.handle.id(), live.incarnation)
}

/// `network.maskRequestHost` for `port`: what the sandbox's servers see as `Host` (never
/// applied to the agent's port).
fn host_mask(live: &cella_core::manager::LiveSandbox, port: u16) -> Option<HeaderValue> {
    if port == ENVD_PORT {
        return None;
    }
    let mask = live.mask_request_host()?;
    HeaderValue::from_str(&mask.replace("${PORT}", &port.to_string())).ok()
}

/// The TLS server name for `port` when it is in the sandbox's `httpsPorts`; `None`: plain.
fn tls_name(
    live: &cella_core::manager::LiveSandbox,
    port: u16,
) -> Option<rustls::pki_types::ServerName<'static>> {
    if port == ENVD_PORT || !live.is_https_port(port) {
        return None;
    }
    let mask = host_mask(live, port);
    Some(upstream::server_name(
        mask.as_ref().and_then(|h| h.to_str().ok()),
    ))
}

fn parse_upstream(host: &str) -> Option<(&str, u64)> {
    let (id, g) = host.split_once(".g")?;
    Some((id, g.parse().ok()?))
}

/// A young sandbox may not have opened its ports yet (a template's start command, such as the
/// code interpreter, is still starting): refused connections are retried for a while, as
/// E2B's proxy does, instead of failing the first request after create.
const YOUNG_SANDBOX_MS: i64 = 30_000;
/// Default longest time a request waits for a port of a young sandbox to open.
pub const DEFAULT_PORT_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

async fn dial_with_grace(
    live: &cella_core::manager::LiveSandbox,
    port: u16,
    grace: std::time::Duration,
) -> Result<tokio::net::TcpStream, DialError> {
    let start = std::time::Instant::now();
    loop {
        match live.handle.dial(port).await {
            Ok(s) => return Ok(s),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && cella_core::store::now_ms() - live.started_at_ms < YOUNG_SANDBOX_MS
                    && start.elapsed() < grace =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            Err(e) => return Err(DialError::Connect(e)),
        }
    }
}

/// Pooled HTTP client into sandboxes.
#[derive(Clone)]
pub struct ProxyClient {
    manager: Arc<Manager>,
    client: Client<SandboxConnector, Body>,
    grace: std::time::Duration,
}

impl ProxyClient {
    /// A client that dials through `manager`'s sandboxes; refused connections to a young
    /// sandbox are retried for up to `grace`.
    pub fn new(manager: Arc<Manager>, grace: std::time::Duration) -> ProxyClient {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .build(SandboxConnector {
                manager: manager.clone(),
                grace,
            });
        ProxyClient {
            manager,
            client,
            grace,
        }
    }

    /// Forward `req` to `target` and stream the answer back.
    pub async fn forward(&self, target: Target, req: Request) -> Response {
        let Target { sandbox_id, port } = target;
        let live = match cella_api::is_valid_sandbox_id(&sandbox_id)
            .then(|| self.manager.route(&sandbox_id))
            .flatten()
        {
            Some(live) => live,
            None => return not_found(&sandbox_id),
        };
        if port == ENVD_PORT && INTERNAL_ENVD_ROUTES.contains(&req.uri().path()) {
            return proxy_error(StatusCode::NOT_FOUND, &sandbox_id, Some(port), "not found");
        }
        // The agent's port has its own auth (X-Access-Token); every other port of a sandbox
        // created with `allowPublicTraffic: false` needs the traffic token.
        if port != ENVD_PORT
            && let Some(want) = live.traffic_access_token.as_deref()
            && let Some(resp) = traffic_token_refusal(req.headers(), want, &sandbox_id)
        {
            return resp;
        }
        let live = if live.is_paused() {
            match self.manager.route_running(&sandbox_id).await {
                Some(l) => l,
                None => return paused(&sandbox_id),
            }
        } else {
            live
        };
        let upstream = upstream_host(&live);
        let host_mask = host_mask(&live, port);
        drop(live);
        if port == ENVD_PORT && signature_expired(req.uri(), cella_core::store::now_ms() / 1000) {
            // The host's clock decides: a guest clock (a microVM under emulation) may lag.
            return proxy_error(
                StatusCode::UNAUTHORIZED,
                &sandbox_id,
                Some(port),
                "signature is already expired",
            );
        }
        if is_upgrade(req.headers()) {
            return self.forward_upgrade(&sandbox_id, port, req).await;
        }
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let Ok(uri) = format!("http://{upstream}:{port}{path}").parse::<Uri>() else {
            return proxy_error(StatusCode::BAD_REQUEST, &sandbox_id, Some(port), "bad path");
        };
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        strip_request_headers(&mut parts.headers);
        if let Some(h) = host_mask {
            parts.headers.insert(header::HOST, h);
        }
        let out = Request::from_parts(parts, body);
        match self.client.request(out).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Body::new(body))
            }
            Err(e) => self.dial_failure(&sandbox_id, port, &e),
        }
    }

    /// Bytes used on the sandbox's root filesystem, as its agent reports it (`GET /metrics`).
    /// Drivers only see cgroup counters; the filesystem view is the agent's. `None` when the
    /// agent does not answer within a second or answers nonsense (a hostile agent can only
    /// lie about its own number, bounded to 64 KiB of JSON).
    pub async fn agent_disk_used(&self, sandbox_id: &str) -> Option<u64> {
        let live = self.manager.route(sandbox_id).filter(|l| !l.is_paused())?;
        let req = Request::builder()
            .uri(format!(
                "http://{}:{ENVD_PORT}/metrics",
                upstream_host(&live)
            ))
            .header(header::HOST, "localhost")
            .header(cella_api::HEADER_ACCESS_TOKEN, live.access_token.as_str())
            .body(Body::empty())
            .ok()?;
        let disk_total = live.limits.disk_mb * 1024 * 1024;
        drop(live);
        let fetch = async {
            let resp = self.client.request(req).await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let limited = http_body_util::Limited::new(resp.into_body(), 64 * 1024);
            let bytes = http_body_util::BodyExt::collect(limited)
                .await
                .ok()?
                .to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            let used = v.get("disk_used")?.as_u64()?;
            // The agent is inside the sandbox: never let it report more than the disk has.
            Some(if disk_total > 0 {
                used.min(disk_total)
            } else {
                used
            })
        };
        tokio::time::timeout(std::time::Duration::from_secs(1), fetch)
            .await
            .ok()
            .flatten()
    }

    fn dial_failure(
        &self,
        sandbox_id: &str,
        port: u16,
        e: &hyper_util::client::legacy::Error,
    ) -> Response {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(d) = err.downcast_ref::<DialError>() {
                return match d {
                    DialError::NotFound => not_found(sandbox_id),
                    DialError::Tls(e) => tls_failed(sandbox_id, port, e),
                    _ => port_closed(sandbox_id, port),
                };
            }
            cur = err.source();
        }
        if self.manager.route(sandbox_id).is_none() {
            return not_found(sandbox_id);
        }
        tracing::debug!(sandbox = sandbox_id, port, error = %e, "proxied request failed");
        proxy_error(
            StatusCode::BAD_GATEWAY,
            sandbox_id,
            Some(port),
            "The sandbox closed the connection",
        )
    }

    /// Whether the sandbox's agent answers `GET /health` within a second (a paused or hung
    /// agent does not).
    pub async fn agent_healthy(&self, sandbox_id: &str) -> bool {
        let Some(live) = self.manager.route(sandbox_id).filter(|l| !l.is_paused()) else {
            return false;
        };
        let Ok(req) = Request::builder()
            .uri(format!(
                "http://{}:{ENVD_PORT}/health",
                upstream_host(&live)
            ))
            .header(header::HOST, "localhost")
            .body(Body::empty())
        else {
            return false;
        };
        let probe = async {
            self.client
                .request(req)
                .await
                .is_ok_and(|r| r.status().is_success())
        };
        tokio::time::timeout(std::time::Duration::from_secs(1), probe)
            .await
            .unwrap_or(false)
    }

    /// WebSocket and other `Upgrade` requests: a dedicated connection, then raw byte copying.
    async fn forward_upgrade(&self, sandbox_id: &str, port: u16, mut req: Request) -> Response {
        let Some(live) = self.manager.route(sandbox_id).filter(|l| !l.is_paused()) else {
            return not_found(sandbox_id);
        };
        let stream = match dial_with_grace(&live, port, self.grace).await {
            Ok(s) => s,
            Err(_) => return port_closed(sandbox_id, port),
        };
        let stream = match upstream::connect(stream, tls_name(&live, port)).await {
            Ok(s) => s,
            Err(e) => return tls_failed(sandbox_id, port, &e),
        };
        let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake::<_, Body>(stream).await
        else {
            return port_closed(sandbox_id, port);
        };
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let client_upgrade = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        parts.uri = parts
            .uri
            .path_and_query()
            .and_then(|p| p.as_str().parse().ok())
            .unwrap_or_else(|| Uri::from_static("/"));
        parts.headers.remove(cella_api::HEADER_API_KEY);
        parts.headers.remove(HEADER_TRAFFIC_ACCESS_TOKEN);
        parts.headers.remove(HEADER_SANDBOX_ID);
        parts.headers.remove(HEADER_SANDBOX_PORT);
        if let Some(h) = host_mask(&live, port) {
            parts.headers.insert(header::HOST, h);
        }
        let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
            Ok(r) => r,
            Err(_) => return port_closed(sandbox_id, port),
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (parts, body) = resp.into_parts();
            return Response::from_parts(parts, Body::new(body));
        }
        let server_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(client), Ok(server)) = (client_upgrade.await, server_upgrade.await) else {
                return;
            };
            let mut client = TokioIo::new(client);
            let mut server = TokioIo::new(server);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
        let (parts, _) = resp.into_parts();
        Response::from_parts(parts, Body::empty())
    }
}

/// E2B's refusal (403, with its texts) for a missing or wrong `e2b-traffic-access-token`;
/// `None` when the request carries the right token.
fn traffic_token_refusal(headers: &HeaderMap, want: &str, sandbox_id: &str) -> Option<Response> {
    let message = match headers.get(HEADER_TRAFFIC_ACCESS_TOKEN) {
        None => format!(
            "Sandbox is secured with traffic access token. Token header '{HEADER_TRAFFIC_ACCESS_TOKEN}' is missing"
        ),
        Some(got) if constant_time_eq(got.as_bytes(), want.as_bytes()) => return None,
        Some(_) => {
            "Sandbox is secured with traffic access token. Provided token is invalid.".into()
        }
    };
    Some(proxy_error(
        StatusCode::FORBIDDEN,
        sandbox_id,
        None,
        &message,
    ))
}

/// Compare secrets without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A signed `/files` URL whose `signature_expiration` (unix seconds) lies in the past.
/// The agent checks signatures too, against the sandbox's clock; this check uses the host's.
fn signature_expired(uri: &Uri, now_s: i64) -> bool {
    if uri.path() != "/files" {
        return false;
    }
    let Some(q) = uri.query() else {
        return false;
    };
    form_urlencoded::parse(q.as_bytes())
        .filter(|(k, _)| k == "signature_expiration")
        .filter_map(|(_, v)| v.trim().parse::<i64>().ok())
        .any(|exp| exp < now_s)
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(listed.iter().map(String::as_str))
    {
        h.remove(name);
    }
}

fn strip_request_headers(h: &mut HeaderMap) {
    strip_hop_by_hop(h);
    // The API key is the caller's credential for this server, never for code in a sandbox.
    h.remove(cella_api::HEADER_API_KEY);
    h.remove(HEADER_TRAFFIC_ACCESS_TOKEN);
    h.remove(HEADER_SANDBOX_ID);
    h.remove(HEADER_SANDBOX_PORT);
    if !h.contains_key(header::HOST) {
        h.insert(header::HOST, HeaderValue::from_static("localhost"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_routing() {
        let mut h = HeaderMap::new();
        assert_eq!(routing(&h), Routing::Api);
        h.insert("e2b-sandbox-id", HeaderValue::from_static("iabc"));
        assert_eq!(
            routing(&h),
            Routing::Sandbox(Target {
                sandbox_id: "iabc".into(),
                port: 49983
            })
        );
        h.insert("e2b-sandbox-port", HeaderValue::from_static("8080"));
        assert_eq!(
            routing(&h),
            Routing::Sandbox(Target {
                sandbox_id: "iabc".into(),
                port: 8080
            })
        );
        h.insert("e2b-sandbox-port", HeaderValue::from_static("99999"));
        assert!(matches!(routing(&h), Routing::Invalid(_)));
    }

    #[test]
    fn host_routing() {
        assert_eq!(
            parse_host("8080-iabc123.cella.local:3000"),
            Some(Target {
                sandbox_id: "iabc123".into(),
                port: 8080
            })
        );
        assert_eq!(parse_host("localhost:3000"), None);
        assert_eq!(parse_host("127.0.0.1:3000"), None);
        assert_eq!(parse_host("8080-ABC.x"), None);
        assert_eq!(parse_host("x-abc.domain"), None);
        assert_eq!(parse_host("0-abc.domain"), None);
        assert_eq!(parse_host("80-abc."), None);
    }

    #[test]
    fn traffic_token_missing_wrong_and_right() {
        let mut h = HeaderMap::new();
        let missing = traffic_token_refusal(&h, "secret", "iabc").expect("missing");
        assert_eq!(missing.status(), StatusCode::FORBIDDEN);
        h.insert(
            HEADER_TRAFFIC_ACCESS_TOKEN,
            HeaderValue::from_static("secreT"),
        );
        let wrong = traffic_token_refusal(&h, "secret", "iabc").expect("wrong");
        assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
        h.insert(
            HEADER_TRAFFIC_ACCESS_TOKEN,
            HeaderValue::from_static("secret"),
        );
        assert!(traffic_token_refusal(&h, "secret", "iabc").is_none());
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn expired_file_signatures_are_refused_by_the_host_clock() {
        let uri = |s: &str| s.parse::<Uri>().expect("uri");
        assert!(signature_expired(
            &uri("/files?path=%2Fa&signature=v1_x&signature_expiration=99"),
            100
        ));
        assert!(!signature_expired(
            &uri("/files?path=%2Fa&signature=v1_x&signature_expiration=100"),
            100
        ));
        assert!(!signature_expired(
            &uri("/files?path=%2Fa&signature=v1_x"),
            100
        ));
        assert!(!signature_expired(
            &uri("/other?signature_expiration=1"),
            100
        ));
    }

    #[test]
    fn api_key_never_forwarded() {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("e2b_secret"));
        h.insert("connection", HeaderValue::from_static("keep-alive, x-foo"));
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("x-access-token", HeaderValue::from_static("t"));
        h.insert(
            HEADER_TRAFFIC_ACCESS_TOKEN,
            HeaderValue::from_static("traffic"),
        );
        strip_request_headers(&mut h);
        assert!(h.get("x-api-key").is_none());
        assert!(h.get(HEADER_TRAFFIC_ACCESS_TOKEN).is_none());
        assert!(h.get("x-foo").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(
            h.get("x-access-token").map(|v| v.as_bytes()),
            Some(&b"t"[..])
        );
    }
}
