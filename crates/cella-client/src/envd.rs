//! Calls into a sandbox's agent (E2B's envd protocol) through the server's proxy.
//!
//! Processes use Connect with the JSON codec: `Start` is a server stream of enveloped
//! `{"event": ...}` messages ending in an end-stream envelope; `SendInput` and `Update` are
//! unary JSON calls. Files use the plain `/files` route with octet-stream bodies. The message
//! types and the envelope codec come from `cella_proto::envd`, shared with the agent.
//!
//! Which user runs a command is chosen, as in the SDKs, by HTTP Basic auth with an empty
//! password; the sandbox's access token goes in `X-Access-Token`.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use bytes::Bytes;
use cella_api::{ENVD_PORT, HEADER_ACCESS_TOKEN, HEADER_SANDBOX_ID, HEADER_SANDBOX_PORT};
use cella_proto::envd::connect::{
    self, ConnectError, DEFAULT_MAX_MESSAGE, EndStream, EnvelopeDecoder, STREAM_JSON_CONTENT_TYPE,
    UNARY_JSON_CONTENT_TYPE,
};
use cella_proto::envd::process::{
    ProcessConfig, ProcessInput, ProcessSelector, Pty, PtySize, SendInputRequest,
    SendSignalRequest, Signal, StartRequest, StreamResponse, UpdateRequest,
};
use reqwest::{Method, RequestBuilder, Response, header};
use serde::{Deserialize, Serialize};

use super::{Client, ClientError, check, checked_id, read_json};

/// Connect protocol version header.
const CONNECT_PROTOCOL_VERSION: (&str, &str) = ("connect-protocol-version", "1");

/// Options of [`Client::exec`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// Extra environment variables.
    pub envs: BTreeMap<String, String>,
    /// Working directory (default: the user's home or the template's workdir).
    pub cwd: Option<String>,
    /// User to run as (default: the template's user).
    pub user: Option<String>,
    /// Give the process a stdin pipe (fed with [`Client::send_stdin`]); otherwise stdin is
    /// `/dev/null`.
    pub stdin: bool,
}

/// The end of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code (`-1`-style values or 128+signal conventions are the agent's).
    pub exit_code: i32,
    /// Whether the process exited normally (rather than by a signal).
    pub exited: bool,
    /// Human-readable status (`exit status 1`, `signal: killed`).
    pub status: String,
    /// Error text if the process could not run.
    pub error: Option<String>,
}

/// One event of a running process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// The process started with this PID (inside the sandbox).
    Started {
        /// PID.
        pid: u32,
    },
    /// Bytes on stdout.
    Stdout(Bytes),
    /// Bytes on stderr.
    Stderr(Bytes),
    /// Bytes from the terminal (PTY processes).
    Pty(Bytes),
    /// The process ended; the stream is over.
    Exited(ExitStatus),
}

/// The event stream of a started process. Call [`ProcessStream::next`] until it returns
/// `None`; an [`ExecEvent::Exited`] is always the last event of a complete stream.
#[derive(Debug)]
pub struct ProcessStream {
    resp: Response,
    decoder: EnvelopeDecoder,
    pending: std::collections::VecDeque<ExecEvent>,
    state: StreamState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Open,
    /// The end event was delivered (or queued); later envelopes are only the trailer.
    Exited,
    Done,
}

impl ProcessStream {
    fn new(resp: Response) -> ProcessStream {
        ProcessStream {
            resp,
            decoder: EnvelopeDecoder::new(DEFAULT_MAX_MESSAGE),
            pending: std::collections::VecDeque::new(),
            state: StreamState::Open,
        }
    }

    /// The next event; `None` once the stream is over. Keepalives are skipped.
    pub async fn next(&mut self) -> Option<Result<ExecEvent, ClientError>> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(Ok(ev));
            }
            if self.state == StreamState::Done {
                return None;
            }
            match self.decoder.next_envelope() {
                Err(e) => return Some(Err(self.fail(e.into()))),
                Ok(Some(env)) => {
                    if let Err(e) = self.handle(&env) {
                        return Some(Err(self.fail(e)));
                    }
                    continue;
                }
                Ok(None) => {}
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.decoder.push(&chunk),
                Ok(None) => {
                    let exited = self.state == StreamState::Exited;
                    self.state = StreamState::Done;
                    if let Err(e) = self.decoder.finish() {
                        return Some(Err(e.into()));
                    }
                    // A stream that delivered the exit event is complete even if the trailer
                    // was cut off.
                    return if exited {
                        None
                    } else {
                        Some(Err(ClientError::StreamEnded))
                    };
                }
                Err(e) => {
                    if self.state == StreamState::Exited {
                        self.state = StreamState::Done;
                        return None;
                    }
                    return Some(Err(self.fail(e.into())));
                }
            }
        }
    }

    fn fail(&mut self, e: ClientError) -> ClientError {
        self.state = StreamState::Done;
        e
    }

    fn handle(&mut self, env: &connect::Envelope) -> Result<(), ClientError> {
        if env.is_end_stream() {
            let end: EndStream =
                serde_json::from_slice(&env.payload).map_err(|source| ClientError::Decode {
                    what: "process stream trailer",
                    source,
                })?;
            let exited = self.state == StreamState::Exited;
            self.state = StreamState::Done;
            return match end.error {
                Some(e) => Err(ClientError::Agent(e)),
                None if exited => Ok(()),
                None => Err(ClientError::StreamEnded),
            };
        }
        let msg: StreamResponse =
            serde_json::from_slice(&env.payload).map_err(|source| ClientError::Decode {
                what: "process event",
                source,
            })?;
        let Some(ev) = msg.event else { return Ok(()) };
        if let Some(start) = ev.start {
            self.pending
                .push_back(ExecEvent::Started { pid: start.pid });
        }
        if let Some(data) = ev.data {
            if let Some(b) = data.stdout {
                self.pending.push_back(ExecEvent::Stdout(b.into()));
            }
            if let Some(b) = data.stderr {
                self.pending.push_back(ExecEvent::Stderr(b.into()));
            }
            if let Some(b) = data.pty {
                self.pending.push_back(ExecEvent::Pty(b.into()));
            }
        }
        if let Some(end) = ev.end {
            self.state = StreamState::Exited;
            self.pending.push_back(ExecEvent::Exited(ExitStatus {
                exit_code: end.exit_code,
                exited: end.exited,
                status: end.status,
                error: end.error,
            }));
        }
        Ok(())
    }

    /// Reads events until the first [`ExecEvent::Started`] and returns its PID. Output that
    /// arrives before it (there is none with cella's agent) is kept for [`ProcessStream::next`].
    pub async fn wait_started(&mut self) -> Result<u32, ClientError> {
        let mut early = Vec::new();
        let result = loop {
            match self.next().await {
                Some(Ok(ExecEvent::Started { pid })) => break Ok(pid),
                Some(Ok(ev @ ExecEvent::Exited(_))) => {
                    early.push(ev);
                    break Err(ClientError::StreamEnded);
                }
                Some(Ok(ev)) => early.push(ev),
                Some(Err(e)) => break Err(e),
                None => break Err(ClientError::StreamEnded),
            }
        };
        for ev in early.into_iter().rev() {
            self.pending.push_front(ev);
        }
        result
    }
}

/// A file being downloaded; read it with [`Download::chunk`].
#[derive(Debug)]
pub struct Download {
    resp: Response,
}

impl Download {
    /// Size announced by the agent, if any.
    pub fn content_length(&self) -> Option<u64> {
        self.resp.content_length()
    }

    /// The next piece of the file; `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        Ok(self.resp.chunk().await?)
    }
}

/// One file the agent reports as written by an upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadedEntry {
    /// Absolute path inside the sandbox.
    #[serde(default)]
    pub path: String,
    /// File name.
    #[serde(default)]
    pub name: String,
    /// Entry type (`file`).
    #[serde(default, rename = "type")]
    pub kind: String,
}

impl Client {
    /// A request to the agent of sandbox `id`, routed by the proxy headers.
    fn envd(
        &self,
        method: Method,
        id: &str,
        token: &str,
        path: &str,
        user: Option<&str>,
    ) -> Result<RequestBuilder, ClientError> {
        let id = checked_id(id)?;
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(HEADER_SANDBOX_ID, id)
            .header(HEADER_SANDBOX_PORT, ENVD_PORT.to_string())
            .header(HEADER_ACCESS_TOKEN, token);
        if let Some(user) = user.filter(|u| !u.is_empty()) {
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
            req = req.header(header::AUTHORIZATION, format!("Basic {basic}"));
        }
        Ok(req)
    }

    async fn start_process(
        &self,
        id: &str,
        token: &str,
        user: Option<&str>,
        start: &StartRequest,
    ) -> Result<ProcessStream, ClientError> {
        let body = connect::encode_message(start).map_err(|source| ClientError::Decode {
            what: "start request",
            source,
        })?;
        let resp = self
            .envd(Method::POST, id, token, "/process.Process/Start", user)?
            .header(header::CONTENT_TYPE, STREAM_JSON_CONTENT_TYPE)
            .header(CONNECT_PROTOCOL_VERSION.0, CONNECT_PROTOCOL_VERSION.1)
            .body(body)
            .send()
            .await?;
        Ok(ProcessStream::new(check_connect(resp).await?))
    }

    /// Runs `cmd` with `/bin/bash -l -c` in sandbox `id` and streams its events.
    pub async fn exec(
        &self,
        id: &str,
        token: &str,
        cmd: &str,
        opts: &ExecOptions,
    ) -> Result<ProcessStream, ClientError> {
        let start = StartRequest {
            process: Some(ProcessConfig {
                cmd: "/bin/bash".into(),
                args: vec!["-l".into(), "-c".into(), cmd.into()],
                envs: opts.envs.clone(),
                cwd: opts.cwd.clone(),
            }),
            pty: None,
            tag: None,
            stdin: Some(opts.stdin),
        };
        self.start_process(id, token, opts.user.as_deref(), &start)
            .await
    }

    /// Starts an interactive login shell under a `cols`×`rows` terminal in sandbox `id`.
    /// Feed it with [`Client::send_pty_input`] and resize it with [`Client::resize_pty`]; the
    /// PID comes from [`ProcessStream::wait_started`].
    pub async fn pty(
        &self,
        id: &str,
        token: &str,
        cols: u16,
        rows: u16,
        opts: &ExecOptions,
    ) -> Result<ProcessStream, ClientError> {
        let mut envs = opts.envs.clone();
        envs.entry("TERM".into())
            .or_insert_with(|| "xterm-256color".into());
        let start = StartRequest {
            process: Some(ProcessConfig {
                cmd: "/bin/bash".into(),
                args: vec!["-i".into(), "-l".into()],
                envs,
                cwd: opts.cwd.clone(),
            }),
            pty: Some(Pty {
                size: Some(PtySize {
                    cols: u32::from(cols),
                    rows: u32::from(rows),
                }),
            }),
            tag: None,
            stdin: None,
        };
        self.start_process(id, token, opts.user.as_deref(), &start)
            .await
    }

    async fn unary<Req: Serialize>(
        &self,
        id: &str,
        token: &str,
        method: &str,
        req: &Req,
    ) -> Result<(), ClientError> {
        let resp = self
            .envd(
                Method::POST,
                id,
                token,
                &format!("/process.Process/{method}"),
                None,
            )?
            .header(header::CONTENT_TYPE, UNARY_JSON_CONTENT_TYPE)
            .header(CONNECT_PROTOCOL_VERSION.0, CONNECT_PROTOCOL_VERSION.1)
            .json(req)
            .send()
            .await?;
        check_connect(resp).await?;
        Ok(())
    }

    /// Sends keystrokes to a PTY process.
    pub async fn send_pty_input(
        &self,
        id: &str,
        token: &str,
        pid: u32,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let req = SendInputRequest {
            process: Some(pid_selector(pid)),
            input: Some(ProcessInput {
                stdin: None,
                pty: Some(data.to_vec()),
            }),
        };
        self.unary(id, token, "SendInput", &req).await
    }

    /// Writes to the stdin pipe of a process started with [`ExecOptions::stdin`].
    pub async fn send_stdin(
        &self,
        id: &str,
        token: &str,
        pid: u32,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let req = SendInputRequest {
            process: Some(pid_selector(pid)),
            input: Some(ProcessInput {
                stdin: Some(data.to_vec()),
                pty: None,
            }),
        };
        self.unary(id, token, "SendInput", &req).await
    }

    /// Kills process `pid` (SIGKILL).
    pub async fn kill_process(&self, id: &str, token: &str, pid: u32) -> Result<(), ClientError> {
        let req = SendSignalRequest {
            process: Some(pid_selector(pid)),
            signal: Signal::Sigkill,
        };
        self.unary(id, token, "SendSignal", &req).await
    }

    /// Resizes the terminal of a PTY process.
    pub async fn resize_pty(
        &self,
        id: &str,
        token: &str,
        pid: u32,
        cols: u16,
        rows: u16,
    ) -> Result<(), ClientError> {
        let req = UpdateRequest {
            process: Some(pid_selector(pid)),
            pty: Some(Pty {
                size: Some(PtySize {
                    cols: u32::from(cols),
                    rows: u32::from(rows),
                }),
            }),
        };
        self.unary(id, token, "Update", &req).await
    }

    /// Writes `data` to `path` inside the sandbox (parents are created, the file replaced).
    pub async fn upload(
        &self,
        id: &str,
        token: &str,
        path: &str,
        user: Option<&str>,
        data: Bytes,
    ) -> Result<Vec<UploadedEntry>, ClientError> {
        self.upload_body(id, token, path, user, reqwest::Body::from(data))
            .await
    }

    /// Streams the local file `local` to `path` inside the sandbox.
    pub async fn upload_file(
        &self,
        id: &str,
        token: &str,
        path: &str,
        user: Option<&str>,
        local: &Path,
    ) -> Result<Vec<UploadedEntry>, ClientError> {
        let file = tokio::fs::File::open(local).await?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        self.upload_body(id, token, path, user, body).await
    }

    async fn upload_body(
        &self,
        id: &str,
        token: &str,
        path: &str,
        user: Option<&str>,
        body: reqwest::Body,
    ) -> Result<Vec<UploadedEntry>, ClientError> {
        let resp = self
            .envd(Method::POST, id, token, "/files", user)?
            .query(&file_query(path, user))
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .send()
            .await?;
        read_json(check(resp).await?, "upload").await
    }

    /// Starts downloading `path` from the sandbox.
    pub async fn download_stream(
        &self,
        id: &str,
        token: &str,
        path: &str,
        user: Option<&str>,
    ) -> Result<Download, ClientError> {
        let resp = self
            .envd(Method::GET, id, token, "/files", user)?
            .query(&file_query(path, user))
            .send()
            .await?;
        Ok(Download {
            resp: check(resp).await?,
        })
    }

    /// Reads the whole file `path` from the sandbox.
    pub async fn download(
        &self,
        id: &str,
        token: &str,
        path: &str,
        user: Option<&str>,
    ) -> Result<Bytes, ClientError> {
        let d = self.download_stream(id, token, path, user).await?;
        Ok(d.resp.bytes().await?)
    }
}

fn pid_selector(pid: u32) -> ProcessSelector {
    ProcessSelector {
        pid: Some(pid),
        tag: None,
    }
}

fn file_query<'a>(path: &'a str, user: Option<&'a str>) -> Vec<(&'static str, &'a str)> {
    let mut q = vec![("path", path)];
    if let Some(u) = user.filter(|u| !u.is_empty()) {
        q.push(("username", u));
    }
    q
}

/// Like [`check`], but a Connect error body (`{"code":"not_found","message":...}`) becomes
/// [`ClientError::Agent`].
async fn check_connect(resp: Response) -> Result<Response, ClientError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    if let Ok(e) = serde_json::from_slice::<ConnectError>(&body) {
        return Err(ClientError::Agent(e));
    }
    Err(ClientError::Api {
        status: status.as_u16(),
        error: super::parse_api_error(status, &body),
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use cella_proto::envd::connect::{Code, encode_end_stream, encode_envelope};

    use super::*;

    /// A one-shot HTTP server: accepts one connection, records the request head and body,
    /// answers with `response`, and returns what it received.
    fn one_shot(response: Vec<u8>) -> (String, std::thread::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handle = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // Read the head, then as much body as Content-Length says.
            loop {
                let n = sock.read(&mut buf).expect("read");
                got.extend_from_slice(&buf[..n]);
                if let Some(pos) = find(&got, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&got[..pos]).to_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    while got.len() < pos + 4 + len {
                        let n = sock.read(&mut buf).expect("read body");
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                    break;
                }
                if n == 0 {
                    break;
                }
            }
            sock.write_all(&response).expect("write");
            got
        });
        (format!("http://{addr}"), handle)
    }

    fn find(h: &[u8], n: &[u8]) -> Option<usize> {
        h.windows(n.len()).position(|w| w == n)
    }

    fn http_response(content_type: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn event(json: &str) -> Vec<u8> {
        encode_envelope(0, json.as_bytes()).to_vec()
    }

    #[tokio::test]
    async fn exec_sends_e2b_request_and_decodes_events() {
        let mut body = Vec::new();
        body.extend(event(r#"{"event":{"start":{"pid":42}}}"#));
        body.extend(event(r#"{"event":{"keepalive":{}}}"#));
        body.extend(event(r#"{"event":{"data":{"stdout":"aGVsbG8K"}}}"#));
        body.extend(event(r#"{"event":{"data":{"stderr":"b29wcw=="}}}"#));
        body.extend(event(
            r#"{"event":{"end":{"exitCode":3,"exited":true,"status":"exit status 3"}}}"#,
        ));
        body.extend(encode_end_stream(None).to_vec());
        let (url, server) = one_shot(http_response(STREAM_JSON_CONTENT_TYPE, &body));

        let client = Client::new(&url, Some("e2b_deadbeef".into())).expect("client");
        let opts = ExecOptions {
            envs: BTreeMap::from([("A".into(), "1".into())]),
            cwd: Some("/tmp".into()),
            user: Some("root".into()),
            stdin: false,
        };
        let mut stream = client
            .exec("isbx", "tok", "echo hello", &opts)
            .await
            .expect("exec");
        let mut events = Vec::new();
        while let Some(ev) = stream.next().await {
            events.push(ev.expect("event"));
        }
        assert_eq!(
            events,
            vec![
                ExecEvent::Started { pid: 42 },
                ExecEvent::Stdout(Bytes::from_static(b"hello\n")),
                ExecEvent::Stderr(Bytes::from_static(b"oops")),
                ExecEvent::Exited(ExitStatus {
                    exit_code: 3,
                    exited: true,
                    status: "exit status 3".into(),
                    error: None
                }),
            ]
        );

        let req = server.join().expect("server");
        let pos = find(&req, b"\r\n\r\n").expect("head");
        let head = String::from_utf8_lossy(&req[..pos]).to_lowercase();
        assert!(
            head.starts_with("post /process.process/start http/1.1"),
            "{head}"
        );
        assert!(head.contains("e2b-sandbox-id: isbx"));
        assert!(head.contains("e2b-sandbox-port: 49983"));
        assert!(head.contains("x-access-token: tok"));
        assert!(head.contains("content-type: application/connect+json"));
        assert!(head.contains("connect-protocol-version: 1"));
        // "root:" in base64.
        assert!(head.contains("authorization: basic cm9vddo="));
        assert!(
            !head.contains("e2b_deadbeef"),
            "API key must not go to the sandbox"
        );
        let envs = connect::decode_all(&req[pos + 4..], 1 << 20).expect("envelopes");
        assert_eq!(envs.len(), 1);
        let sent: serde_json::Value = serde_json::from_slice(&envs[0].payload).expect("json");
        assert_eq!(sent["process"]["cmd"], "/bin/bash");
        assert_eq!(
            sent["process"]["args"],
            serde_json::json!(["-l", "-c", "echo hello"])
        );
        assert_eq!(sent["process"]["envs"]["A"], "1");
        assert_eq!(sent["process"]["cwd"], "/tmp");
        assert_eq!(sent["stdin"], false);
    }

    #[tokio::test]
    async fn stream_error_trailer_becomes_agent_error() {
        let mut body = event(r#"{"event":{"start":{"pid":1}}}"#);
        body.extend(
            encode_end_stream(Some(&ConnectError::new(Code::NotFound, "no such cwd"))).to_vec(),
        );
        let (url, _server) = one_shot(http_response(STREAM_JSON_CONTENT_TYPE, &body));
        let client = Client::new(&url, None).expect("client");
        let mut stream = client
            .exec("isbx", "tok", "true", &ExecOptions::default())
            .await
            .expect("exec");
        assert_eq!(stream.wait_started().await.expect("started"), 1);
        match stream.next().await {
            Some(Err(ClientError::Agent(e))) => {
                assert_eq!(e.code, Code::NotFound);
                assert_eq!(e.message, "no such cwd");
            }
            other => panic!("expected agent error, got {other:?}"),
        }
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn truncated_stream_is_reported() {
        let body = event(r#"{"event":{"start":{"pid":1}}}"#);
        let (url, _server) = one_shot(http_response(STREAM_JSON_CONTENT_TYPE, &body));
        let client = Client::new(&url, None).expect("client");
        let mut stream = client
            .exec("isbx", "tok", "true", &ExecOptions::default())
            .await
            .expect("exec");
        assert!(matches!(
            stream.next().await,
            Some(Ok(ExecEvent::Started { pid: 1 }))
        ));
        assert!(matches!(
            stream.next().await,
            Some(Err(ClientError::StreamEnded))
        ));
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn unary_connect_errors_are_typed() {
        let body = br#"{"code":"not_found","message":"process 9 not found"}"#;
        let resp = format!(
            "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            body.len(),
            String::from_utf8_lossy(body)
        );
        let (url, server) = one_shot(resp.into_bytes());
        let client = Client::new(&url, None).expect("client");
        let err = client
            .resize_pty("isbx", "tok", 9, 100, 40)
            .await
            .expect_err("must fail");
        assert!(err.is_not_found(), "{err:?}");
        let req = server.join().expect("server");
        let pos = find(&req, b"\r\n\r\n").expect("head");
        let head = String::from_utf8_lossy(&req[..pos]).to_lowercase();
        assert!(head.starts_with("post /process.process/update "), "{head}");
        let sent: serde_json::Value = serde_json::from_slice(&req[pos + 4..]).expect("json");
        assert_eq!(sent["process"]["pid"], 9);
        assert_eq!(
            sent["pty"]["size"],
            serde_json::json!({"cols": 100, "rows": 40})
        );
    }

    #[tokio::test]
    async fn upload_sends_octet_stream_with_query() {
        let (url, server) = one_shot(http_response(
            "application/json",
            br#"[{"path":"/home/user/a b.txt","name":"a b.txt","type":"file"}]"#,
        ));
        let client = Client::new(&url, None).expect("client");
        let entries = client
            .upload(
                "isbx",
                "tok",
                "/home/user/a b.txt",
                Some("user"),
                Bytes::from_static(b"DATA"),
            )
            .await
            .expect("upload");
        assert_eq!(entries[0].path, "/home/user/a b.txt");
        assert_eq!(entries[0].kind, "file");
        let req = server.join().expect("server");
        let text = String::from_utf8_lossy(&req);
        assert!(
            text.starts_with("POST /files?path=%2Fhome%2Fuser%2Fa+b.txt&username=user HTTP/1.1"),
            "{text}"
        );
        assert!(
            text.to_lowercase()
                .contains("content-type: application/octet-stream")
        );
        assert!(text.ends_with("\r\n\r\nDATA"));
    }

    #[tokio::test]
    async fn download_returns_bytes_and_maps_errors() {
        let (url, _server) = one_shot(http_response("application/octet-stream", b"\x00\x01binary"));
        let client = Client::new(&url, None).expect("client");
        let data = client
            .download("isbx", "tok", "/etc/x", None)
            .await
            .expect("download");
        assert_eq!(&data[..], b"\x00\x01binary");

        let body = br#"{"code":404,"message":"path not found"}"#;
        let resp = format!(
            "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            body.len(),
            String::from_utf8_lossy(body)
        );
        let (url, _server) = one_shot(resp.into_bytes());
        let client = Client::new(&url, None).expect("client");
        let err = client
            .download("isbx", "tok", "/nope", None)
            .await
            .expect_err("404");
        assert!(err.is_not_found());
        assert_eq!(err.to_string(), "path not found (HTTP 404)");
    }

    #[test]
    fn file_query_omits_empty_user() {
        assert_eq!(file_query("/a", None), vec![("path", "/a")]);
        assert_eq!(file_query("/a", Some("")), vec![("path", "/a")]);
        assert_eq!(
            file_query("/a", Some("u")),
            vec![("path", "/a"), ("username", "u")]
        );
    }
}
