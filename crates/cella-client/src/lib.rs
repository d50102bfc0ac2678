//! Rust client for a cella server: the REST API and, through the server's proxy, the agent
//! inside each sandbox.
//!
//! Why one client for both: the server is the only address a user has. In-sandbox calls
//! (commands, files, terminals) go to the same base URL and are routed by the
//! `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers, exactly as the official E2B SDKs do with
//! `E2B_SANDBOX_URL`, so this client exercises the same path the SDKs use.
//!
//! The API key is only ever sent on REST calls. In-sandbox calls carry the sandbox's own
//! access token instead, so a proxy bug can never hand the API key to code inside a sandbox.

mod envd;

use std::time::Duration;

use cella_api::{
    ApiError, AuditEntry, ConnectRequest, ForkRequest, ForkResult, HEADER_API_KEY, Health,
    ListedSandbox, NetworkUpdate, NewSandbox, PauseRequest, Sandbox, SandboxDetail, SnapshotInfo,
    SnapshotRequest, Template, TimeoutRequest,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use self::envd::{Download, ExecEvent, ExecOptions, ExitStatus, ProcessStream, UploadedEntry};

/// How long establishing a TCP connection to the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest error body kept when the server's error is not JSON.
const MAX_ERROR_TEXT: usize = 512;
/// Largest JSON response body accepted (listing many sandboxes or a big audit export).
const MAX_JSON_BODY: usize = 64 * 1024 * 1024;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is not an `http://` URL.
    #[error("invalid server URL `{0}`: expected http://host:port")]
    InvalidUrl(String),
    /// A sandbox ID is not lowercase alphanumerics.
    #[error("invalid sandbox ID `{0}`")]
    InvalidSandboxId(String),
    /// The server answered with an error (`{code, message}`).
    #[error("{} (HTTP {status})", error.message)]
    Api {
        /// HTTP status.
        status: u16,
        /// The server's error body.
        error: ApiError,
    },
    /// The agent inside the sandbox answered with a Connect error.
    #[error("sandbox agent: {0}")]
    Agent(#[from] cella_proto::envd::connect::ConnectError),
    /// The request could not be sent or the response not read.
    #[error("request to the server failed")]
    Http(#[from] reqwest::Error),
    /// A response was not the JSON expected.
    #[error("unexpected response from the server for {what}")]
    Decode {
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A response body exceeded the client's limit.
    #[error("response for {what} is larger than {max} bytes")]
    TooLarge {
        /// Which call.
        what: &'static str,
        /// Limit.
        max: usize,
    },
    /// The agent's event stream was malformed.
    #[error("malformed event stream from the sandbox")]
    Envelope(#[from] cella_proto::envd::connect::EnvelopeError),
    /// The agent's stream ended before the process did.
    #[error("the connection to the sandbox ended before the command finished")]
    StreamEnded,
    /// A local file could not be read or written.
    #[error("local I/O error")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// The HTTP status of an API error, if this is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the server said the thing does not exist (404).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
            || matches!(self, ClientError::Agent(e) if e.code == cella_proto::envd::connect::Code::NotFound)
    }
}

/// The answer of [`Client::resume_sandbox`].
#[derive(Debug, Clone)]
pub struct Resumed {
    /// The sandbox (with its access token).
    pub sandbox: Sandbox,
    /// `true` when it was paused and is now running again (HTTP 201); `false` when it was
    /// running already (HTTP 200) and only its timeout was extended.
    pub resumed: bool,
}

/// A connection to one cella server. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Client {
    /// A client for the server at `base_url` (`http://127.0.0.1:3000`), authenticating REST
    /// calls with `api_key` when given.
    pub fn new(base_url: &str, api_key: Option<String>) -> Result<Client, ClientError> {
        let base = base_url.trim().trim_end_matches('/').to_owned();
        let rest = base
            .strip_prefix("http://")
            .ok_or_else(|| ClientError::InvalidUrl(base_url.to_owned()))?;
        if rest.is_empty() || rest.contains(char::is_whitespace) {
            return Err(ClientError::InvalidUrl(base_url.to_owned()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("cella-client/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Client {
            http,
            base,
            api_key: api_key.filter(|k| !k.is_empty()),
        })
    }

    /// The base URL (without a trailing slash).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn rest(&self, method: Method, path: &str) -> RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(k) => req.header(HEADER_API_KEY, k),
            None => req,
        }
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        req: RequestBuilder,
        what: &'static str,
    ) -> Result<T, ClientError> {
        let resp = check(req.send().await?).await?;
        read_json(resp, what).await
    }

    async fn send_empty(&self, req: RequestBuilder) -> Result<(), ClientError> {
        check(req.send().await?).await?;
        Ok(())
    }

    /// `GET /health`.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.send_json(self.rest(Method::GET, "/health"), "health")
            .await
    }

    /// `POST /v2/sandboxes`: creates a sandbox and waits until its agent answers.
    pub async fn create_sandbox(&self, req: &NewSandbox) -> Result<Sandbox, ClientError> {
        self.send_json(
            self.rest(Method::POST, "/v2/sandboxes").json(req),
            "create sandbox",
        )
        .await
    }

    /// `GET /v2/sandboxes`: the caller's running sandboxes.
    pub async fn list_sandboxes(&self) -> Result<Vec<ListedSandbox>, ClientError> {
        self.send_json(self.rest(Method::GET, "/v2/sandboxes"), "list sandboxes")
            .await
    }

    /// `GET /sandboxes/{id}`.
    pub async fn get_sandbox(&self, id: &str) -> Result<SandboxDetail, ClientError> {
        let path = format!("/sandboxes/{}", checked_id(id)?);
        self.send_json(self.rest(Method::GET, &path), "sandbox info")
            .await
    }

    /// `DELETE /sandboxes/{id}`.
    pub async fn kill_sandbox(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("/sandboxes/{}", checked_id(id)?);
        self.send_empty(self.rest(Method::DELETE, &path)).await
    }

    /// `POST /sandboxes/{id}/timeout`: the sandbox now ends `secs` seconds from now.
    pub async fn set_timeout(&self, id: &str, secs: u64) -> Result<(), ClientError> {
        let path = format!("/sandboxes/{}/timeout", checked_id(id)?);
        let body = TimeoutRequest { timeout: secs };
        self.send_empty(self.rest(Method::POST, &path).json(&body))
            .await
    }

    /// `POST /v2/sandboxes/{id}/connect`: returns the sandbox (with its access token),
    /// extending its lifetime to at least `timeout_secs` from now when given.
    pub async fn connect(
        &self,
        id: &str,
        timeout_secs: Option<u64>,
    ) -> Result<Sandbox, ClientError> {
        let path = format!("/v2/sandboxes/{}/connect", checked_id(id)?);
        let body = ConnectRequest {
            timeout: timeout_secs,
            memory: None,
        };
        self.send_json(self.rest(Method::POST, &path).json(&body), "connect")
            .await
    }

    /// `POST /sandboxes/{id}/pause`: freezes the sandbox. A sandbox paused already is a 409
    /// ([`ClientError::Api`]).
    pub async fn pause_sandbox(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("/sandboxes/{}/pause", checked_id(id)?);
        self.send_empty(
            self.rest(Method::POST, &path)
                .json(&PauseRequest::default()),
        )
        .await
    }

    /// Resumes a paused sandbox through `POST /v2/sandboxes/{id}/connect` (E2B's replacement
    /// of the deprecated `/resume`), running for `timeout_secs` from now when given (else the
    /// server's connect default). A running sandbox is not an error: it is returned with
    /// `resumed: false`.
    pub async fn resume_sandbox(
        &self,
        id: &str,
        timeout_secs: Option<u64>,
    ) -> Result<Resumed, ClientError> {
        let path = format!("/v2/sandboxes/{}/connect", checked_id(id)?);
        let body = ConnectRequest {
            timeout: timeout_secs,
            memory: None,
        };
        let resp = check(self.rest(Method::POST, &path).json(&body).send().await?).await?;
        let resumed = resp.status() == StatusCode::CREATED;
        let sandbox = read_json(resp, "resume").await?;
        Ok(Resumed { sandbox, resumed })
    }

    /// `POST /sandboxes/{id}/snapshots`: snapshot the sandbox's files (it runs on).
    pub async fn create_snapshot(
        &self,
        id: &str,
        name: Option<&str>,
    ) -> Result<SnapshotInfo, ClientError> {
        let path = format!("/sandboxes/{}/snapshots", checked_id(id)?);
        let body = SnapshotRequest {
            name: name.map(str::to_owned),
            memory: None,
        };
        self.send_json(self.rest(Method::POST, &path).json(&body), "snapshot")
            .await
    }

    /// `GET /snapshots` (every page), newest first; only `sandbox_id`'s when given.
    pub async fn list_snapshots(
        &self,
        sandbox_id: Option<&str>,
    ) -> Result<Vec<SnapshotInfo>, ClientError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query: Vec<(&str, String)> = vec![("limit", "100".into())];
            if let Some(s) = sandbox_id {
                query.push(("sandboxID", checked_id(s)?.to_owned()));
            }
            if let Some(t) = &token {
                query.push(("nextToken", t.clone()));
            }
            let resp = check(
                self.rest(Method::GET, "/snapshots")
                    .query(&query)
                    .send()
                    .await?,
            )
            .await?;
            token = resp
                .headers()
                .get("x-next-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let page: Vec<SnapshotInfo> = read_json(resp, "list snapshots").await?;
            let empty = page.is_empty();
            out.extend(page);
            if token.is_none() || empty {
                return Ok(out);
            }
        }
    }

    /// `DELETE /templates/{snapshot}`: `false` when there is no such snapshot.
    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<bool, ClientError> {
        // Snapshot IDs are `[a-z0-9_-]+(:tag)?`; nothing else can name one.
        let valid = !snapshot_id.is_empty()
            && snapshot_id.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b':')
            });
        if !valid {
            return Ok(false);
        }
        let path = format!("/templates/{snapshot_id}");
        match self.send_empty(self.rest(Method::DELETE, &path)).await {
            Ok(()) => Ok(true),
            Err(ClientError::Api { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `POST /sandboxes/{id}/fork`: `count` sandboxes from one snapshot of its files, each
    /// living `timeout_secs`; one result per fork.
    pub async fn fork_sandbox(
        &self,
        id: &str,
        count: Option<u32>,
        timeout_secs: Option<u64>,
    ) -> Result<Vec<ForkResult>, ClientError> {
        let path = format!("/sandboxes/{}/fork", checked_id(id)?);
        let body = ForkRequest {
            timeout: timeout_secs,
            count,
        };
        self.send_json(self.rest(Method::POST, &path).json(&body), "fork")
            .await
    }

    /// `PUT /sandboxes/{id}/network`: replaces the sandbox's egress rules (omitted fields are
    /// cleared). 409 when the server or the sandbox has no egress.
    pub async fn update_network(
        &self,
        id: &str,
        update: &NetworkUpdate,
    ) -> Result<(), ClientError> {
        let path = format!("/sandboxes/{}/network", checked_id(id)?);
        self.send_empty(self.rest(Method::PUT, &path).json(update))
            .await
    }

    /// `GET /audit`: audit entries, optionally of one sandbox and from `since` on (RFC 3339 or
    /// Unix milliseconds, passed through as given).
    pub async fn audit(
        &self,
        sandbox: Option<&str>,
        since: Option<&str>,
    ) -> Result<Vec<AuditEntry>, ClientError> {
        #[derive(Serialize)]
        struct Query<'a> {
            #[serde(rename = "sandboxID", skip_serializing_if = "Option::is_none")]
            sandbox_id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            since: Option<&'a str>,
        }
        if let Some(id) = sandbox {
            checked_id(id)?;
        }
        let q = Query {
            sandbox_id: sandbox,
            since,
        };
        self.send_json(self.rest(Method::GET, "/audit").query(&q), "audit")
            .await
    }

    /// `GET /templates`.
    pub async fn templates(&self) -> Result<Vec<Template>, ClientError> {
        self.send_json(self.rest(Method::GET, "/templates"), "templates")
            .await
    }
}

fn checked_id(id: &str) -> Result<&str, ClientError> {
    if cella_api::is_valid_sandbox_id(id) {
        Ok(id)
    } else {
        Err(ClientError::InvalidSandboxId(id.chars().take(80).collect()))
    }
}

/// Turns a non-2xx response into [`ClientError::Api`].
async fn check(resp: Response) -> Result<Response, ClientError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.bytes().await.unwrap_or_default();
    Err(ClientError::Api {
        status: status.as_u16(),
        error: parse_api_error(status, &body),
    })
}

/// The server's `{code, message}` if the body is one, else a message made from the body
/// text (or the status reason for an empty body).
fn parse_api_error(status: StatusCode, body: &[u8]) -> ApiError {
    #[derive(serde::Deserialize)]
    struct Loose {
        message: String,
    }
    if let Ok(e) = serde_json::from_slice::<ApiError>(body) {
        return e;
    }
    // The proxy's and the agent's errors carry a message with other fields beside it.
    if let Ok(l) = serde_json::from_slice::<Loose>(body)
        && !l.message.is_empty()
    {
        return ApiError {
            code: status.as_u16(),
            message: l.message,
        };
    }
    let text = String::from_utf8_lossy(body);
    let text: String = text.trim().chars().take(MAX_ERROR_TEXT).collect();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_owned()
    } else {
        text
    };
    ApiError {
        code: status.as_u16(),
        message,
    }
}

/// Reads a JSON body, refusing bodies larger than [`MAX_JSON_BODY`]. An empty body reads as
/// JSON `null` so that endpoints answering 204 can still be decoded into `()`-like types.
async fn read_json<T: DeserializeOwned>(
    mut resp: Response,
    what: &'static str,
) -> Result<T, ClientError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > MAX_JSON_BODY {
            return Err(ClientError::TooLarge {
                what,
                max: MAX_JSON_BODY,
            });
        }
        body.extend_from_slice(&chunk);
    }
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"null"
    } else {
        &body
    };
    serde_json::from_slice(body).map_err(|source| ClientError::Decode { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_validates_base_url() {
        let c = Client::new("http://127.0.0.1:3000/", Some("e2b_00".into())).expect("client");
        assert_eq!(c.base_url(), "http://127.0.0.1:3000");
        assert!(
            !format!("{c:?}").contains("e2b_00"),
            "key must not be printed"
        );
        for bad in ["", "127.0.0.1:3000", "https://x", "http://", "http://a b"] {
            assert!(
                matches!(Client::new(bad, None), Err(ClientError::InvalidUrl(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn api_errors_are_parsed_from_any_shape() {
        let e = parse_api_error(
            StatusCode::NOT_FOUND,
            br#"{"code":404,"message":"sandbox ix not found"}"#,
        );
        assert_eq!(
            e,
            ApiError {
                code: 404,
                message: "sandbox ix not found".into()
            }
        );
        let e = parse_api_error(
            StatusCode::BAD_GATEWAY,
            br#"{"sandboxId":"ix","message":"The sandbox was not found","code":502}"#,
        );
        assert_eq!(e.message, "The sandbox was not found");
        let e = parse_api_error(StatusCode::BAD_GATEWAY, b"upstream exploded\n");
        assert_eq!(
            e,
            ApiError {
                code: 502,
                message: "upstream exploded".into()
            }
        );
        let e = parse_api_error(StatusCode::UNAUTHORIZED, b"");
        assert_eq!(e.message, "Unauthorized");
        let long = "x".repeat(10_000);
        assert_eq!(
            parse_api_error(StatusCode::INTERNAL_SERVER_ERROR, long.as_bytes())
                .message
                .len(),
            MAX_ERROR_TEXT
        );
    }

    #[test]
    fn api_error_display_is_the_servers_message() {
        let e = ClientError::Api {
            status: 401,
            error: ApiError {
                code: 401,
                message: "invalid API key".into(),
            },
        };
        assert_eq!(e.to_string(), "invalid API key (HTTP 401)");
        assert!(!e.is_not_found());
    }

    #[tokio::test]
    async fn bad_sandbox_ids_never_reach_the_network() {
        // Port 9 on localhost: nothing listens, so reaching the network would give Http.
        let c = Client::new("http://127.0.0.1:9", None).expect("client");
        for id in ["../etc", "A", "", "a/b"] {
            assert!(matches!(
                c.get_sandbox(id).await,
                Err(ClientError::InvalidSandboxId(_))
            ));
            assert!(matches!(
                c.kill_sandbox(id).await,
                Err(ClientError::InvalidSandboxId(_))
            ));
            assert!(matches!(
                c.pause_sandbox(id).await,
                Err(ClientError::InvalidSandboxId(_))
            ));
            assert!(matches!(
                c.resume_sandbox(id, Some(60)).await,
                Err(ClientError::InvalidSandboxId(_))
            ));
            assert!(matches!(
                c.update_network(id, &NetworkUpdate::default()).await,
                Err(ClientError::InvalidSandboxId(_))
            ));
        }
    }

    /// A one-request HTTP server: answers with `status` (`"204 No Content"`) and the JSON
    /// `body`, and hands back the raw request it received.
    async fn one_shot(status: &str, body: &str) -> (Client, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.expect("accept");
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = sock.read(&mut buf).await.expect("read");
                assert!(n > 0, "request ended early");
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).into_owned();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let len = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().expect("length"))
                        })
                        .unwrap_or(0);
                    if req.len() >= head_end + 4 + len {
                        break;
                    }
                }
            }
            sock.write_all(response.as_bytes()).await.expect("write");
            String::from_utf8_lossy(&req).into_owned()
        });
        let client = Client::new(&format!("http://{addr}"), Some("e2b_k".into())).expect("client");
        (client, task)
    }

    const SANDBOX_JSON: &str = r#"{"templateID":"base","sandboxID":"iabc","clientID":"x","envdVersion":"0.6.4","envdAccessToken":"tok"}"#;

    #[tokio::test]
    async fn pause_posts_to_the_pause_route() {
        let (c, req) = one_shot("204 No Content", "").await;
        c.pause_sandbox("iabc").await.expect("pause");
        let req = req.await.expect("server");
        assert!(
            req.starts_with("POST /sandboxes/iabc/pause HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(
            req.to_ascii_lowercase().contains("x-api-key: e2b_k"),
            "{req}"
        );

        let (c, _req) = one_shot(
            "409 Conflict",
            r#"{"code":409,"message":"sandbox iabc is paused"}"#,
        )
        .await;
        let e = c.pause_sandbox("iabc").await.expect_err("409");
        assert_eq!(e.status(), Some(409));
        assert_eq!(e.to_string(), "sandbox iabc is paused (HTTP 409)");
    }

    #[tokio::test]
    async fn resume_goes_through_connect_and_reports_201_as_resumed() {
        let (c, req) = one_shot("201 Created", SANDBOX_JSON).await;
        let r = c.resume_sandbox("iabc", Some(90)).await.expect("resume");
        assert!(r.resumed);
        assert_eq!(r.sandbox.sandbox_id, "iabc");
        let req = req.await.expect("server");
        assert!(
            req.starts_with("POST /v2/sandboxes/iabc/connect HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(req.ends_with(r#"{"timeout":90}"#), "{req}");

        let (c, _req) = one_shot("200 OK", SANDBOX_JSON).await;
        let r = c.resume_sandbox("iabc", None).await.expect("connect");
        assert!(!r.resumed, "200 means it was running already");

        let (c, _req) = one_shot(
            "404 Not Found",
            r#"{"code":404,"message":"sandbox iabc not found"}"#,
        )
        .await;
        let e = c.resume_sandbox("iabc", None).await.expect_err("404");
        assert!(e.is_not_found());
    }

    #[tokio::test]
    async fn update_network_puts_e2b_field_names() {
        let (c, req) = one_shot("204 No Content", "").await;
        let upd = NetworkUpdate {
            allow_out: Some(vec!["1.1.1.1".into()]),
            deny_out: Some(vec!["0.0.0.0/0".into()]),
            allow_internet_access: Some(false),
            ..NetworkUpdate::default()
        };
        c.update_network("iabc", &upd).await.expect("update");
        let req = req.await.expect("server");
        assert!(
            req.starts_with("PUT /sandboxes/iabc/network HTTP/1.1\r\n"),
            "{req}"
        );
        let body = &req[req.find("\r\n\r\n").expect("body") + 4..];
        let v: serde_json::Value = serde_json::from_str(body).expect("json body");
        assert_eq!(
            v,
            serde_json::json!({"allowOut": ["1.1.1.1"], "denyOut": ["0.0.0.0/0"],
                "allow_internet_access": false})
        );

        let msg = "this server gives sandboxes no network (cella serve --egress none)";
        let (c, _req) = one_shot(
            "409 Conflict",
            &format!(r#"{{"code":409,"message":"{msg}"}}"#),
        )
        .await;
        let e = c
            .update_network("iabc", &NetworkUpdate::default())
            .await
            .expect_err("409");
        assert_eq!(e.to_string(), format!("{msg} (HTTP 409)"));
    }
}
