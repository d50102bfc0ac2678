//! End-to-end tests: spawn the agent binary in standalone mode on a free localhost port and
//! drive it over HTTP the way the E2B SDK does (Connect JSON, enveloped streams, `/files`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use cella_proto::envd::connect::{EnvelopeDecoder, FLAG_END_STREAM, encode_envelope};
use futures::StreamExt;
use serde_json::{Value, json};

const TOKEN: &str = "test-token";

struct Agent {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn current_user() -> String {
    // SAFETY: getuid has no memory effects.
    let uid = unsafe { libc::getuid() };
    let passwd = std::fs::read_to_string("/etc/passwd").expect("passwd");
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[2] == uid.to_string()).then(|| f[0].to_string())
        })
        .expect("current user in /etc/passwd")
}

fn start_agent() -> Agent {
    start_agent_with(&[])
}

fn start_agent_with(extra: &[&str]) -> Agent {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cella-agent"))
        .args(["--listen", "127.0.0.1:0", "--token", TOKEN, "--user"])
        .arg(current_user())
        .args(["--env", "SANDBOX_WIDE=from-sandbox"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn agent");
    let stderr = child.stderr.take().expect("stderr");
    let mut line = String::new();
    BufReader::new(stderr)
        .read_line(&mut line)
        .expect("read listen line");
    let addr = line.trim().rsplit(' ').next().expect("address").to_string();
    Agent {
        child,
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
    }
}

/// Decoded events of a server stream plus the end-stream payload.
struct StreamResult {
    messages: Vec<Value>,
    end: Value,
}

impl Agent {
    async fn unary(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("X-Access-Token", TOKEN)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("send");
        let status = r.status().as_u16();
        let v = r.json().await.unwrap_or(Value::Null);
        (status, v)
    }

    async fn open_stream(
        &self,
        path: &str,
        body: Value,
        extra: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("X-Access-Token", TOKEN)
            .header("Content-Type", "application/connect+json");
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let r = req
            .body(encode_envelope(0, body.to_string().as_bytes()).to_vec())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 200, "streams always answer 200");
        r
    }

    async fn stream(&self, path: &str, body: Value) -> StreamResult {
        let r = self.open_stream(path, body, &[]).await;
        collect(r).await
    }
}

struct Reader {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    dec: EnvelopeDecoder,
}

impl Reader {
    fn new(r: reqwest::Response) -> Self {
        Reader {
            body: Box::pin(r.bytes_stream()),
            dec: EnvelopeDecoder::new(1 << 24),
        }
    }

    /// Next envelope: (is_end, json).
    async fn next(&mut self) -> Option<(bool, Value)> {
        loop {
            if let Some(env) = self.dec.next_envelope().expect("valid envelope") {
                let v: Value = serde_json::from_slice(&env.payload).expect("json payload");
                return Some((env.flags & FLAG_END_STREAM != 0, v));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(20), self.body.next())
                .await
                .expect("stream stalled")?;
            self.dec.push(&chunk.expect("body chunk"));
        }
    }
}

async fn collect(r: reqwest::Response) -> StreamResult {
    let mut reader = Reader::new(r);
    let mut messages = Vec::new();
    while let Some((end, v)) = reader.next().await {
        if end {
            return StreamResult { messages, end: v };
        }
        messages.push(v);
    }
    panic!("stream ended without an end-stream envelope");
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn output(messages: &[Value], kind: &str) -> String {
    let mut out = Vec::new();
    for m in messages {
        if let Some(s) = m["event"]["data"][kind].as_str() {
            out.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .expect("base64"),
            );
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn end_event(messages: &[Value]) -> Value {
    messages
        .iter()
        .find_map(|m| m["event"].get("end").cloned())
        .expect("end event")
}

fn bash(cmd: &str) -> Value {
    json!({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd]}, "stdin": false})
}

#[tokio::test]
async fn health_envs_and_auth() {
    let a = start_agent();
    let r = a
        .http
        .get(format!("{}/health", a.base))
        .send()
        .await
        .expect("health");
    assert_eq!(r.status().as_u16(), 204);

    let r = a
        .http
        .get(format!("{}/envs", a.base))
        .send()
        .await
        .expect("envs");
    assert_eq!(r.status().as_u16(), 401, "envs needs the token");
    let body: Value = r.json().await.expect("json error");
    assert!(body["message"].as_str().is_some());

    let r = a
        .http
        .get(format!("{}/envs", a.base))
        .header("X-Access-Token", TOKEN)
        .send()
        .await
        .expect("envs");
    let envs: Value = r.json().await.expect("json");
    assert_eq!(envs["SANDBOX_WIDE"], "from-sandbox");

    let r = a
        .http
        .post(format!("{}/process.Process/List", a.base))
        .header("Content-Type", "application/json")
        .header("X-Access-Token", "wrong")
        .body("{}")
        .send()
        .await
        .expect("list");
    assert_eq!(r.status().as_u16(), 401);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["code"], "unauthenticated");

    let r = a
        .http
        .get(format!("{}/metrics", a.base))
        .header("X-Access-Token", TOKEN)
        .send()
        .await
        .expect("metrics");
    let m: Value = r.json().await.expect("json");
    assert!(m["cpu_count"].as_u64().unwrap_or(0) >= 1);
    assert!(m["mem_total"].as_u64().unwrap_or(0) > 0);
    assert!(m["disk_total"].as_u64().unwrap_or(0) > 0);
}

/// `/fsfreeze` and `/egress` are for a VM host only: a standalone agent (on a host, maybe as
/// root) must never freeze the filesystem it runs on or change its routes and resolver, and
/// without the token nobody gets that far.
#[tokio::test]
async fn host_only_system_routes_are_off_outside_a_sandbox() {
    let a = start_agent();
    for path in [
        "/fsfreeze",
        "/fsthaw",
        "/egress?gateway=192.0.2.1&nameserver=192.0.2.2",
    ] {
        let r = a
            .http
            .post(format!("{}{path}", a.base))
            .send()
            .await
            .expect("freeze");
        assert_eq!(r.status().as_u16(), 401, "{path} needs the token");
        let r = a
            .http
            .post(format!("{}{path}", a.base))
            .header("X-Access-Token", TOKEN)
            .send()
            .await
            .expect("freeze");
        assert_eq!(r.status().as_u16(), 404, "{path} is off in standalone mode");
        let body: Value = r.json().await.expect("json");
        assert!(
            body["message"].as_str().unwrap_or_default().contains("off"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn run_command_output_exit_code_env_and_cwd() {
    let a = start_agent();
    let dir = tempfile::tempdir().expect("tempdir");
    let s = a
        .stream(
            "/process.Process/Start",
            json!({
                "process": {
                    "cmd": "/bin/bash",
                    "args": ["-l", "-c", "echo out; echo err >&2; echo $MY_VAR $SANDBOX_WIDE; pwd; exit 3"],
                    "envs": {"MY_VAR": "hello"},
                    "cwd": dir.path().to_str().expect("utf8"),
                },
                "stdin": false,
            }),
        )
        .await;
    assert_eq!(s.end, json!({}));
    let pid = s.messages[0]["event"]["start"]["pid"]
        .as_u64()
        .expect("start event first");
    assert!(pid > 0);
    let stdout = output(&s.messages, "stdout");
    assert_eq!(
        stdout,
        format!("out\nhello from-sandbox\n{}\n", dir.path().display())
    );
    assert_eq!(output(&s.messages, "stderr"), "err\n");
    let end = end_event(&s.messages);
    assert_eq!(end["exitCode"], 3);
    assert_eq!(end["exited"], true);
    assert_eq!(end["status"], "exit status 3");

    let ok = a.stream("/process.Process/Start", bash("true")).await;
    let end = end_event(&ok.messages);
    assert_eq!(end.get("exitCode").and_then(Value::as_i64).unwrap_or(0), 0);
    assert!(end.get("error").is_none());

    // Without stdin the command reads EOF from /dev/null instead of hanging.
    let s = a
        .stream("/process.Process/Start", bash("cat; echo done"))
        .await;
    assert_eq!(output(&s.messages, "stdout"), "done\n");
}

#[tokio::test]
async fn start_errors_end_the_stream_with_an_error() {
    let a = start_agent();
    let s = a
        .stream(
            "/process.Process/Start",
            json!({"process": {"cmd": "/definitely/not/here"}}),
        )
        .await;
    assert!(s.messages.is_empty());
    assert_eq!(s.end["error"]["code"], "invalid_argument");
    let s = a
        .stream(
            "/process.Process/Start",
            json!({"process": {"cmd": "/bin/true", "cwd": "/no/such/dir"}}),
        )
        .await;
    assert_eq!(s.end["error"]["code"], "invalid_argument");
    assert!(
        s.end["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not exist"))
    );
}

#[tokio::test]
async fn stdin_send_and_close() {
    let a = start_agent();
    let r = a
        .open_stream(
            "/process.Process/Start",
            json!({"process": {"cmd": "/bin/cat"}, "stdin": true, "tag": "catter"}),
            &[],
        )
        .await;
    let mut reader = Reader::new(r);
    let (_, first) = reader.next().await.expect("start");
    let pid = first["event"]["start"]["pid"].as_u64().expect("pid");

    let (st, list) = a.unary("/process.Process/List", json!({})).await;
    assert_eq!(st, 200);
    let listed = list["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .any(|p| p["pid"] == pid && p["tag"] == "catter" && p["config"]["cmd"] == "/bin/cat");
    assert!(listed, "running process is listed: {list}");

    let (st, _) = a
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": b64(b"hello ")}}),
        )
        .await;
    assert_eq!(st, 200);

    // Client-streaming input over a chunked body, selecting by tag.
    let mut frames = Vec::new();
    frames.push(encode_envelope(
        0,
        json!({"start": {"process": {"tag": "catter"}}})
            .to_string()
            .as_bytes(),
    ));
    frames.push(encode_envelope(
        0,
        json!({"data": {"input": {"stdin": b64(b"world")}}})
            .to_string()
            .as_bytes(),
    ));
    let chunks = futures::stream::iter(
        frames
            .into_iter()
            .map(Ok::<_, std::io::Error>)
            .collect::<Vec<_>>(),
    );
    let r = a
        .http
        .post(format!("{}/process.Process/StreamInput", a.base))
        .header("X-Access-Token", TOKEN)
        .header("Content-Type", "application/connect+json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("stream input");
    let s = collect(r).await;
    assert_eq!(s.end, json!({}), "stream input succeeded");

    let (st, _) = a
        .unary(
            "/process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
        )
        .await;
    assert_eq!(st, 200);

    let mut out = Vec::new();
    let mut end = None;
    while let Some((is_end, v)) = reader.next().await {
        if is_end {
            break;
        }
        out.push(v.clone());
        if let Some(e) = v["event"].get("end") {
            end = Some(e.clone());
        }
    }
    assert_eq!(output(&out, "stdout"), "hello world");
    assert_eq!(end.expect("end")["exited"], true);

    let (st, body) = a
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": b64(b"x")}}),
        )
        .await;
    assert_eq!(st, 404, "ended process is gone: {body}");
    assert_eq!(body["code"], "not_found");
}

#[tokio::test]
async fn signal_kills_and_connect_reattaches() {
    let a = start_agent();
    let r = a
        .open_stream(
            "/process.Process/Start",
            json!({"process": {"cmd": "/bin/bash", "args": ["-c", "sleep 0.3; echo later; sleep 100"]}, "stdin": false, "tag": "sleeper"}),
            &[],
        )
        .await;
    let mut first = Reader::new(r);
    let (_, start) = first.next().await.expect("start");
    let pid = start["event"]["start"]["pid"].as_u64().expect("pid");

    // A second client attaches by tag and sees the later output.
    let r = a
        .open_stream(
            "/process.Process/Connect",
            json!({"process": {"tag": "sleeper"}}),
            &[],
        )
        .await;
    let mut second = Reader::new(r);
    let (_, s2) = second.next().await.expect("connect start");
    assert_eq!(s2["event"]["start"]["pid"].as_u64(), Some(pid));
    let (_, data) = second.next().await.expect("data");
    assert_eq!(output(&[data], "stdout"), "later\n");

    let (st, _) = a
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
        )
        .await;
    assert_eq!(st, 200);
    let mut end = None;
    while let Some((is_end, v)) = first.next().await {
        if is_end {
            break;
        }
        if let Some(e) = v["event"].get("end") {
            end = Some(e.clone());
        }
    }
    let end = end.expect("end event");
    assert_eq!(end["exited"], false);
    assert_eq!(end["status"], "signal: killed");
    assert_eq!(end["exitCode"], -1);

    let (st, body) = a
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": 999_999}, "signal": "SIGNAL_SIGTERM"}),
        )
        .await;
    assert_eq!((st, body["code"].as_str()), (404, Some("not_found")));
    let s = a
        .stream(
            "/process.Process/Connect",
            json!({"process": {"pid": 999_999}}),
        )
        .await;
    assert_eq!(s.end["error"]["code"], "not_found");
}

#[tokio::test]
async fn pty_session() {
    let a = start_agent();
    let r = a
        .open_stream(
            "/process.Process/Start",
            json!({
                "process": {"cmd": "/bin/bash", "args": ["--norc", "--noprofile", "-i"], "envs": {"TERM": "xterm-256color", "PS1": "$ "}},
                "pty": {"size": {"cols": 80, "rows": 24}},
            }),
            &[],
        )
        .await;
    let mut reader = Reader::new(r);
    let (_, start) = reader.next().await.expect("start");
    let pid = start["event"]["start"]["pid"].as_u64().expect("pid");
    let (st, _) = a
        .unary(
            "/process.Process/Update",
            json!({"process": {"pid": pid}, "pty": {"size": {"cols": 123, "rows": 45}}}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = a
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"pty": b64(b"echo $((6*7)); stty size; exit\n")}}),
        )
        .await;
    assert_eq!(st, 200);
    let mut msgs = Vec::new();
    while let Some((is_end, v)) = reader.next().await {
        if is_end {
            break;
        }
        msgs.push(v);
    }
    let out = output(&msgs, "pty");
    assert!(out.contains("42"), "pty output: {out:?}");
    assert!(out.contains("45 123"), "resized: {out:?}");
    assert_eq!(end_event(&msgs)["exited"], true);
}

#[tokio::test]
async fn keepalive_events_are_sent() {
    let a = start_agent();
    let r = a
        .open_stream(
            "/process.Process/Start",
            bash("sleep 2.5; echo ok"),
            &[("Keepalive-Ping-Interval", "1")],
        )
        .await;
    let s = collect(r).await;
    let keepalives = s
        .messages
        .iter()
        .filter(|m| m["event"].get("keepalive").is_some())
        .count();
    assert!(keepalives >= 1, "got {:?}", s.messages);
    assert_eq!(output(&s.messages, "stdout"), "ok\n");
}

#[tokio::test]
async fn upload_download_and_signed_urls() {
    let a = start_agent();
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("new/sub/file.bin");
    let target_s = target.to_str().expect("utf8").to_string();

    // Raw octet-stream upload into a directory that does not exist yet.
    let r = a
        .http
        .post(format!("{}/files", a.base))
        .query(&[("path", target_s.as_str())])
        .header("X-Access-Token", TOKEN)
        .header("Content-Type", "application/octet-stream")
        .header("X-Metadata-Purpose", "test")
        .body(vec![7u8; 200_000])
        .send()
        .await
        .expect("upload");
    assert_eq!(r.status().as_u16(), 200);
    let info: Value = r.json().await.expect("json");
    assert_eq!(info[0]["path"], target_s.as_str());
    assert_eq!(info[0]["name"], "file.bin");
    assert_eq!(info[0]["type"], "file");
    assert_eq!(
        std::fs::read(&target).expect("read back"),
        vec![7u8; 200_000]
    );

    // Multipart with two parts, paths taken from the part file names.
    let f1 = dir.path().join("m1.txt");
    let f2 = dir.path().join("deep/m2.txt");
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"one".to_vec())
                .file_name(f1.to_str().expect("utf8").to_string()),
        )
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"two".to_vec())
                .file_name(f2.to_str().expect("utf8").to_string()),
        );
    let r = a
        .http
        .post(format!("{}/files", a.base))
        .header("X-Access-Token", TOKEN)
        .multipart(form)
        .send()
        .await
        .expect("multipart");
    assert_eq!(r.status().as_u16(), 200);
    let info: Value = r.json().await.expect("json");
    assert_eq!(info.as_array().map(Vec::len), Some(2));
    assert_eq!(std::fs::read_to_string(&f1).expect("m1"), "one");
    assert_eq!(std::fs::read_to_string(&f2).expect("m2"), "two");

    // Gzip-encoded upload.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, b"compressed content").expect("gz");
    let gz = gz.finish().expect("gz finish");
    let gzpath = dir.path().join("gz.txt");
    let r = a
        .http
        .post(format!("{}/files", a.base))
        .query(&[("path", gzpath.to_str().expect("utf8"))])
        .header("X-Access-Token", TOKEN)
        .header("Content-Type", "application/octet-stream")
        .header("Content-Encoding", "gzip")
        .body(gz)
        .send()
        .await
        .expect("gzip upload");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        std::fs::read_to_string(&gzpath).expect("gz file"),
        "compressed content"
    );

    // Download, plain and gzip.
    let r = a
        .http
        .get(format!("{}/files", a.base))
        .query(&[("path", f1.to_str().expect("utf8"))])
        .header("X-Access-Token", TOKEN)
        .send()
        .await
        .expect("download");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.bytes().await.expect("body").as_ref(), b"one");
    let r = a
        .http
        .get(format!("{}/files", a.base))
        .query(&[("path", target_s.as_str())])
        .header("X-Access-Token", TOKEN)
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .expect("gzip download");
    assert_eq!(
        r.headers()
            .get("content-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("gzip")
    );
    let compressed = r.bytes().await.expect("body");
    let mut plain = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(compressed.as_ref()),
        &mut plain,
    )
    .expect("gunzip");
    assert_eq!(plain, vec![7u8; 200_000]);

    // Errors.
    let r = a
        .http
        .get(format!("{}/files", a.base))
        .query(&[("path", "/no/such/file")])
        .header("X-Access-Token", TOKEN)
        .send()
        .await
        .expect("404");
    assert_eq!(r.status().as_u16(), 404);
    let r = a
        .http
        .get(format!("{}/files", a.base))
        .query(&[("path", dir.path().to_str().expect("utf8"))])
        .header("X-Access-Token", TOKEN)
        .send()
        .await
        .expect("dir");
    assert_eq!(r.status().as_u16(), 400);
    let r = a
        .http
        .get(format!("{}/files", a.base))
        .query(&[("path", f1.to_str().expect("utf8"))])
        .send()
        .await
        .expect("no auth");
    assert_eq!(r.status().as_u16(), 401);

    // Signed URLs: valid, expired, tampered.
    use cella_proto::envd::signature::{Operation, sign};
    let p = f1.to_str().expect("utf8");
    let future = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64
        + 600;
    let sig = sign(p, Operation::Read, "", TOKEN, Some(future));
    let r = a
        .http
        .get(format!("{}/files", a.base))
        .query(&[
            ("path", p),
            ("signature", sig.as_str()),
            ("signature_expiration", future.to_string().as_str()),
        ])
        .send()
        .await
        .expect("signed");
    assert_eq!(r.status().as_u16(), 200);
    let past = 1_000;
    let sig = sign(p, Operation::Read, "", TOKEN, Some(past));
    let r = a
        .http
        .get(format!("{}/files", a.base))
        .query(&[
            ("path", p),
            ("signature", sig.as_str()),
            ("signature_expiration", past.to_string().as_str()),
        ])
        .send()
        .await
        .expect("expired");
    assert_eq!(r.status().as_u16(), 401);
    let write_sig = sign(p, Operation::Write, "", TOKEN, None);
    let r = a
        .http
        .get(format!("{}/files", a.base))
        .query(&[("path", p), ("signature", write_sig.as_str())])
        .send()
        .await
        .expect("wrong op");
    assert_eq!(r.status().as_u16(), 401);

    // Compose.
    let composed = dir.path().join("composed.txt");
    let r = a
        .http
        .post(format!("{}/files/compose", a.base))
        .header("X-Access-Token", TOKEN)
        .json(&json!({
            "source_paths": [f1.to_str(), f2.to_str()],
            "destination": composed.to_str(),
        }))
        .send()
        .await
        .expect("compose");
    assert_eq!(r.status().as_u16(), 200);
    let entry: Value = r.json().await.expect("entry");
    assert_eq!(entry["path"], composed.to_str().expect("utf8"));
    assert_eq!(entry["name"], "composed.txt");
    assert_eq!(
        std::fs::read_to_string(&composed).expect("composed"),
        "onetwo"
    );
    // As envd: the sources are consumed, and no temporary file is left behind.
    assert!(!f1.exists() && !f2.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("readdir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("cella-compose"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A directory is not a source; a destination is required; a missing source is a 404.
    for (body, status) in [
        (
            json!({"source_paths": [dir.path().to_str()], "destination": composed.to_str()}),
            400,
        ),
        (
            json!({"source_paths": [composed.to_str()], "destination": ""}),
            400,
        ),
        (
            json!({"source_paths": [dir.path().join("gone").to_str()], "destination": composed.to_str()}),
            404,
        ),
    ] {
        let r = a
            .http
            .post(format!("{}/files/compose", a.base))
            .header("X-Access-Token", TOKEN)
            .json(&body)
            .send()
            .await
            .expect("compose");
        assert_eq!(r.status().as_u16(), status, "{body}");
    }
    assert_eq!(
        std::fs::read_to_string(&composed).expect("composed"),
        "onetwo",
        "a failed compose must leave the destination alone"
    );
}

#[tokio::test]
async fn filesystem_rpcs() {
    let a = start_agent();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_str().expect("utf8").to_string();
    std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
    std::fs::write(dir.path().join("a/f.txt"), b"12345").expect("write");
    std::fs::write(dir.path().join("a/b/g.txt"), b"x").expect("write");

    let (st, v) = a
        .unary(
            "/filesystem.Filesystem/Stat",
            json!({"path": format!("{root}/a/f.txt")}),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["entry"]["type"], "FILE_TYPE_FILE");
    assert_eq!(v["entry"]["size"], "5");
    assert_eq!(v["entry"]["name"], "f.txt");
    assert!(
        v["entry"]["modifiedTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );

    let (st, v) = a
        .unary(
            "/filesystem.Filesystem/Stat",
            json!({"path": format!("{root}/missing")}),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")));

    let (st, v) = a
        .unary(
            "/filesystem.Filesystem/ListDir",
            json!({"path": format!("{root}/a"), "depth": 1}),
        )
        .await;
    assert_eq!(st, 200);
    let names: Vec<&str> = v["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names, vec!["b", "f.txt"]);
    let (_, v) = a
        .unary(
            "/filesystem.Filesystem/ListDir",
            json!({"path": format!("{root}/a"), "depth": 2}),
        )
        .await;
    let paths: Vec<String> = v["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["path"].as_str().map(str::to_string))
        .collect();
    assert!(paths.contains(&format!("{root}/a/b/g.txt")), "{paths:?}");
    let (st, v) = a
        .unary(
            "/filesystem.Filesystem/ListDir",
            json!({"path": format!("{root}/a/f.txt")}),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (400, Some("invalid_argument")));

    let (st, v) = a
        .unary(
            "/filesystem.Filesystem/MakeDir",
            json!({"path": format!("{root}/x/y/z")}),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["entry"]["type"], "FILE_TYPE_DIRECTORY");
    let (st, v) = a
        .unary(
            "/filesystem.Filesystem/MakeDir",
            json!({"path": format!("{root}/x/y/z")}),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (409, Some("already_exists")));

    let (st, v) = a
        .unary(
            "/filesystem.Filesystem/Move",
            json!({"source": format!("{root}/a/f.txt"), "destination": format!("{root}/moved/f2.txt")}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["entry"]["path"], format!("{root}/moved/f2.txt"));
    assert!(dir.path().join("moved/f2.txt").exists());

    let (st, _) = a
        .unary(
            "/filesystem.Filesystem/Remove",
            json!({"path": format!("{root}/a")}),
        )
        .await;
    assert_eq!(st, 200);
    assert!(!dir.path().join("a").exists());
    let (st, v) = a
        .unary(
            "/filesystem.Filesystem/Remove",
            json!({"path": format!("{root}/a")}),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn watch_dir_stream_and_polling_watcher() {
    let a = start_agent();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_str().expect("utf8").to_string();
    std::fs::create_dir(dir.path().join("sub")).expect("sub");

    let r = a
        .open_stream(
            "/filesystem.Filesystem/WatchDir",
            json!({"path": root, "recursive": true}),
            &[],
        )
        .await;
    let mut reader = Reader::new(r);
    let (_, start) = reader.next().await.expect("start");
    assert_eq!(start, json!({"start": {}}));
    std::fs::write(dir.path().join("sub/new.txt"), b"hi").expect("write");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (end, v) = reader.next().await.expect("event");
        assert!(!end);
        let ev = &v["filesystem"];
        seen.push((
            ev["name"].as_str().unwrap_or_default().to_string(),
            ev["type"].as_str().unwrap_or_default().to_string(),
        ));
    }
    assert_eq!(
        seen[0],
        ("sub/new.txt".to_string(), "EVENT_TYPE_CREATE".to_string())
    );
    assert_eq!(seen[1].1, "EVENT_TYPE_WRITE");

    let s = a
        .stream(
            "/filesystem.Filesystem/WatchDir",
            json!({"path": format!("{root}/nope")}),
        )
        .await;
    assert_eq!(s.end["error"]["code"], "not_found");

    // The polling trio.
    let (st, v) = a
        .unary(
            "/filesystem.Filesystem/CreateWatcher",
            json!({"path": root, "recursive": false}),
        )
        .await;
    assert_eq!(st, 200);
    let id = v["watcherId"].as_str().expect("watcher id").to_string();
    std::fs::write(dir.path().join("top.txt"), b"x").expect("write");
    std::fs::remove_file(dir.path().join("top.txt")).expect("rm");
    let mut types = Vec::new();
    for _ in 0..50 {
        let (st, v) = a
            .unary(
                "/filesystem.Filesystem/GetWatcherEvents",
                json!({"watcherId": id}),
            )
            .await;
        assert_eq!(st, 200);
        for e in v["events"].as_array().cloned().unwrap_or_default() {
            types.push(e["type"].as_str().unwrap_or_default().to_string());
        }
        if types.iter().any(|t| t == "EVENT_TYPE_REMOVE") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(types.first().map(String::as_str), Some("EVENT_TYPE_CREATE"));
    assert!(types.iter().any(|t| t == "EVENT_TYPE_REMOVE"), "{types:?}");
    let (st, _) = a
        .unary(
            "/filesystem.Filesystem/RemoveWatcher",
            json!({"watcherId": id}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, v) = a
        .unary(
            "/filesystem.Filesystem/GetWatcherEvents",
            json!({"watcherId": id}),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn start_command_runs_at_boot_as_a_tagged_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("started");
    let cmd = format!(
        "echo \"$SANDBOX_WIDE\" > {}; exec sleep 30",
        marker.display()
    );
    let a = start_agent_with(&["--start", &cmd]);
    let mut listed = Value::Null;
    // Generous bound: a loaded CI machine can be slow to run the shell. The marker counts only
    // once the echo has written it (the redirection creates it empty first).
    // List only once the marker is complete: the child can write it before the agent has
    // registered the process it just spawned, so a list taken earlier may lack it.
    for _ in 0..600 {
        if std::fs::read_to_string(&marker).is_ok_and(|s| s.ends_with('\n')) {
            let (st, list) = a.unary("/process.Process/List", json!({})).await;
            assert_eq!(st, 200);
            listed = list;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let procs = listed["processes"].as_array().expect("processes listed");
    let start = procs
        .iter()
        .find(|p| p["tag"] == "start_cmd")
        .unwrap_or_else(|| panic!("start command is listed: {listed}"));
    assert_eq!(start["config"]["cmd"], "/bin/sh");
    assert_eq!(
        std::fs::read_to_string(&marker).expect("marker").trim(),
        "from-sandbox",
        "the start command gets the sandbox env"
    );
    // It is an ordinary process: it can be killed by tag.
    let (st, _) = a
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"tag": "start_cmd"}, "signal": "SIGNAL_SIGKILL"}),
        )
        .await;
    assert_eq!(st, 200);
}
