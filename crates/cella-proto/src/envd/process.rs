//! `process.Process` messages (envd `process/process.proto`) in the protobuf-JSON mapping.
//!
//! Oneofs are modelled as structs of optional fields (the JSON mapping puts the chosen member
//! directly on the parent object), which also tolerates peers that send unexpected extra keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::json::opt_b64;
use crate::proto_enum;

/// Connect path prefix of the service.
pub const SERVICE: &str = "process.Process";

/// How a command is started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ProcessConfig {
    /// Executable (`/bin/bash`).
    pub cmd: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub envs: BTreeMap<String, String>,
    /// Working directory (absent: default workdir or the user's home).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// Terminal size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PtySize {
    /// Columns.
    pub cols: u32,
    /// Rows.
    pub rows: u32,
}

/// PTY request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Pty {
    /// Initial size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<PtySize>,
}

/// `Start` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StartRequest {
    /// What to run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessConfig>,
    /// Run under a PTY.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pty: Option<Pty>,
    /// Caller-chosen tag to find the process later.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Give the process a stdin pipe. Absent means **true** (backwards compatibility); the SDK
    /// sends `false` unless asked for stdin, and then stdin is `/dev/null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdin: Option<bool>,
}

/// Selects a process by PID or tag.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessSelector {
    /// PID.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "opt_u32_lenient"
    )]
    pub pid: Option<u32>,
    /// Tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

fn opt_u32_lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let v: Option<serde_json::Value> = Option::deserialize(d)?;
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("pid out of range")),
        Some(serde_json::Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom("pid is not a number")),
        Some(_) => Err(serde::de::Error::custom("pid must be a number")),
    }
}

/// `Connect` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectRequest {
    /// Which process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSelector>,
}

/// `List` request (empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRequest {}

/// One running process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessInfo {
    /// How it was started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<ProcessConfig>,
    /// PID.
    pub pid: u32,
    /// Tag, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// `List` response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ListResponse {
    /// Running processes.
    pub processes: Vec<ProcessInfo>,
}

/// Input for a process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessInput {
    /// Bytes for stdin.
    #[serde(with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub stdin: Option<Vec<u8>>,
    /// Bytes for the PTY.
    #[serde(with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub pty: Option<Vec<u8>>,
}

/// `SendInput` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SendInputRequest {
    /// Which process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSelector>,
    /// What to send.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<ProcessInput>,
}

/// `StreamInput` start member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamInputStart {
    /// Which process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSelector>,
}

/// `StreamInput` data member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamInputData {
    /// What to send.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<ProcessInput>,
}

/// An empty keepalive message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepAlive {}

/// One message of the `StreamInput` client stream (oneof `event`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamInputRequest {
    /// First message: which process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<StreamInputStart>,
    /// Input data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<StreamInputData>,
    /// Keepalive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<KeepAlive>,
}

/// `CloseStdin` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CloseStdinRequest {
    /// Which process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSelector>,
}

proto_enum! {
    /// Signals a client may send.
    Signal {
        /// Not set.
        Unspecified = (0, "SIGNAL_UNSPECIFIED"),
        /// SIGTERM.
        Sigterm = (15, "SIGNAL_SIGTERM"),
        /// SIGKILL.
        Sigkill = (9, "SIGNAL_SIGKILL"),
    }
}

/// `SendSignal` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SendSignalRequest {
    /// Which process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSelector>,
    /// Which signal.
    pub signal: Signal,
}

/// `Update` request (PTY resize).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpdateRequest {
    /// Which process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSelector>,
    /// New PTY size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pty: Option<Pty>,
}

/// Empty response of the unary mutations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// `start` event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StartEvent {
    /// PID of the new process.
    pub pid: u32,
}

/// `data` event (oneof `output`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataEvent {
    /// Stdout bytes.
    #[serde(with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub stdout: Option<Vec<u8>>,
    /// Stderr bytes.
    #[serde(with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub stderr: Option<Vec<u8>>,
    /// PTY bytes.
    #[serde(with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub pty: Option<Vec<u8>>,
}

/// `end` event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EndEvent {
    /// Exit code (-1 when killed by a signal, like Go's `ProcessState.ExitCode`).
    #[serde(alias = "exit_code")]
    pub exit_code: i32,
    /// Whether the process exited normally (not by a signal).
    pub exited: bool,
    /// `exit status 1` / `signal: killed`.
    pub status: String,
    /// Error text for a failed command (`exit status 1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A process stream event (oneof `event`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessEvent {
    /// Process started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<StartEvent>,
    /// Output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<DataEvent>,
    /// Process ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<EndEvent>,
    /// Keepalive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<KeepAlive>,
}

impl ProcessEvent {
    /// A `start` event.
    pub fn started(pid: u32) -> Self {
        ProcessEvent {
            start: Some(StartEvent { pid }),
            ..Default::default()
        }
    }

    /// A keepalive event.
    pub fn keepalive() -> Self {
        ProcessEvent {
            keepalive: Some(KeepAlive {}),
            ..Default::default()
        }
    }
}

/// Message of the `Start` and `Connect` server streams.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamResponse {
    /// The event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<ProcessEvent>,
}

/// Alias matching the proto name.
pub type StartResponse = StreamResponse;
/// Alias matching the proto name.
pub type ConnectResponse = StreamResponse;

/// Status text for a process ended by `waitpid` status, as Go's `os.ProcessState.String()`
/// renders it (the SDK shows it to users).
pub fn exit_status_text(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal: {}", signal_name(s)),
        (None, None) => "unknown".to_string(),
    }
}

/// Go's (lowercase) names for the common signals.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        5 => "trace/breakpoint trap",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_start_request_parses() {
        // What `commands.run("echo hi", envs={"A":"1"}, cwd="/tmp")` sends.
        let body = r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"A":"1"},"cwd":"/tmp"},"stdin":false}"#;
        let r: StartRequest = serde_json::from_str(body).expect("parse");
        let p = r.process.expect("process");
        assert_eq!(p.cmd, "/bin/bash");
        assert_eq!(p.args, vec!["-l", "-c", "echo hi"]);
        assert_eq!(p.envs.get("A").map(String::as_str), Some("1"));
        assert_eq!(p.cwd.as_deref(), Some("/tmp"));
        assert_eq!(r.stdin, Some(false));
        assert!(r.pty.is_none());

        // PTY create: no stdin field, size given, unknown keys ignored.
        let body = r#"{"process":{"cmd":"/bin/bash","args":["-i","-l"],"envs":{"TERM":"xterm-256color"}},"pty":{"size":{"cols":80,"rows":24}},"future":1}"#;
        let r: StartRequest = serde_json::from_str(body).expect("parse pty");
        assert_eq!(
            r.pty.and_then(|p| p.size),
            Some(PtySize { cols: 80, rows: 24 })
        );
        assert_eq!(r.stdin, None);
    }

    #[test]
    fn selectors_signals_and_input() {
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":42},"signal":"SIGNAL_SIGKILL"}"#)
                .expect("parse");
        assert_eq!(r.process.and_then(|p| p.pid), Some(42));
        assert_eq!(r.signal, Signal::Sigkill);
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"tag":"t"},"signal":15}"#).expect("num");
        assert_eq!(r.signal, Signal::Sigterm);
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":"7"},"signal":"BOGUS"}"#).expect("lenient");
        assert_eq!(r.signal, Signal::Unspecified);
        assert_eq!(r.process.and_then(|p| p.pid), Some(7));
        assert!(serde_json::from_str::<SendSignalRequest>(r#"{"process":{"pid":-1}}"#).is_err());

        let r: SendInputRequest =
            serde_json::from_str(r#"{"process":{"pid":3},"input":{"stdin":"aGVsbG8="}}"#)
                .expect("input");
        assert_eq!(r.input.and_then(|i| i.stdin), Some(b"hello".to_vec()));

        let r: StreamInputRequest =
            serde_json::from_str(r#"{"data":{"input":{"pty":"AQ=="}}}"#).expect("stream input");
        assert_eq!(
            r.data.and_then(|d| d.input).and_then(|i| i.pty),
            Some(vec![1])
        );
    }

    #[test]
    fn events_serialize_like_protobuf_json() {
        let ev = StreamResponse {
            event: Some(ProcessEvent {
                data: Some(DataEvent {
                    stdout: Some(b"hi\n".to_vec()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        assert_eq!(
            serde_json::to_string(&ev).expect("ser"),
            r#"{"event":{"data":{"stdout":"aGkK"}}}"#
        );
        let end = StreamResponse {
            event: Some(ProcessEvent {
                end: Some(EndEvent {
                    exit_code: 1,
                    exited: true,
                    status: "exit status 1".into(),
                    error: Some("exit status 1".into()),
                }),
                ..Default::default()
            }),
        };
        assert_eq!(
            serde_json::to_string(&end).expect("ser"),
            r#"{"event":{"end":{"exitCode":1,"exited":true,"status":"exit status 1","error":"exit status 1"}}}"#
        );
        let back: StreamResponse = serde_json::from_str(
            r#"{"event":{"end":{"exit_code":-1,"exited":false,"status":"signal: killed"}}}"#,
        )
        .expect("snake input");
        assert_eq!(
            back.event.and_then(|e| e.end).map(|e| e.exit_code),
            Some(-1)
        );
        assert_eq!(
            serde_json::to_string(&ProcessEvent::keepalive()).expect("ser"),
            r#"{"keepalive":{}}"#
        );
    }

    #[test]
    fn status_text_matches_go() {
        assert_eq!(exit_status_text(Some(0), None), "exit status 0");
        assert_eq!(exit_status_text(None, Some(9)), "signal: killed");
        assert_eq!(exit_status_text(None, Some(15)), "signal: terminated");
        assert_eq!(exit_status_text(None, Some(40)), "signal: signal 40");
    }
}
