//! Host ↔ agent control channel: newline-delimited JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest control line the host accepts from an agent. Longer lines are dropped.
pub const MAX_EVENT_LINE: usize = 16 * 1024;

/// Configuration the host sends the agent as the first line of the control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// The sandbox's ID (also its hostname).
    pub sandbox_id: String,
    /// Token every envd request must carry in `X-Access-Token` (except `/health`, signed `/files`).
    pub access_token: String,
    /// Sandbox-wide environment variables (create request `envVars` plus template env).
    pub env_vars: BTreeMap<String, String>,
    /// User that commands run as unless the request names another (`user`).
    pub default_user: String,
    /// Working directory for commands that give none (empty: the user's home).
    #[serde(default)]
    pub default_workdir: String,
    /// TCP port the agent listens on (49983).
    pub port: u16,
    /// Address to bind (`0.0.0.0` in a jail's private netns).
    #[serde(default = "default_bind")]
    pub bind: String,
    /// The template's start command, spawned once the agent listens (a long-running server
    /// such as the code interpreter). Tracked like any process, with the tag
    /// [`START_CMD_TAG`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<StartCommand>,
    /// The host's wall clock when it sent this line, nanoseconds since the Unix epoch. A VM
    /// restored from a snapshot wakes with the snapshot's clock; the agent sets
    /// `CLOCK_REALTIME` to this before it reports ready. Absent: the clock is left alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_time_ns: Option<u64>,
    /// Fresh random bytes from the host. Every clone of a snapshot starts with the same
    /// kernel CRNG state; the agent mixes these in (`RNDADDENTROPY`) and forces a reseed
    /// (`RNDRESEEDCRNG`) before it reports ready. Empty: nothing to mix in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entropy: Vec<u8>,
}

/// Process tag of the template's start command (`Connect`/`List` find it by this tag).
pub const START_CMD_TAG: &str = "start_cmd";

/// A command a template starts in every sandbox at boot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartCommand {
    /// Shell command line, run with `/bin/sh -c`.
    pub cmd: String,
    /// User it runs as (empty: the sandbox's default user).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// Working directory (empty: the user's home).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cwd: String,
}

fn default_bind() -> String {
    "0.0.0.0".to_string()
}

/// Events the agent reports to the host. The host treats them as claims made by the sandbox
/// (it records them in the audit log under the sandbox, tagged `agent`), never as commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AgentEvent {
    /// The agent listens and answers requests.
    Ready {
        /// Agent version.
        version: String,
    },
    /// A process was started through the agent.
    ProcessStart {
        /// PID inside the sandbox.
        pid: u32,
        /// Executable.
        cmd: String,
        /// Arguments.
        args: Vec<String>,
        /// Working directory.
        cwd: String,
        /// User it runs as.
        user: String,
        /// Optional E2B tag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
    },
    /// A process started through the agent ended.
    ProcessExit {
        /// PID inside the sandbox.
        pid: u32,
        /// Exit code (negative signal number when killed by a signal).
        exit_code: i32,
    },
    /// A file was written through the agent (`POST /files`, compose).
    FileWrite {
        /// Absolute path inside the sandbox.
        path: String,
        /// Bytes written.
        size: u64,
        /// User it was written as.
        user: String,
    },
    /// A file or directory was removed through the agent.
    FileRemove {
        /// Absolute path inside the sandbox.
        path: String,
    },
    /// A file or directory was moved through the agent.
    FileMove {
        /// Source path.
        source: String,
        /// Destination path.
        destination: String,
    },
    /// A directory was created through the agent.
    MakeDir {
        /// Absolute path inside the sandbox.
        path: String,
    },
    /// A program was executed inside the sandbox, by anyone (seen by the host's process audit,
    /// not only what the agent started).
    ProcessExec {
        /// PID inside the sandbox (0 when it ended before it could be read).
        pid: u32,
        /// Real uid inside the sandbox (`None` when it could not be read).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        /// Its command line, bounded (empty when it ended before it could be read).
        argv: Vec<String>,
        /// Whether `argv` was cut at the bound.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    /// Executions not recorded one by one because the sandbox exceeded the audit rate.
    ProcessExecSuppressed {
        /// How many were left out.
        count: u64,
    },
    /// A file was closed after being written inside the sandbox, by anyone (seen by the host's
    /// file audit, not only what went through the file API).
    FsWrite {
        /// Path inside the sandbox.
        path: String,
        /// PID inside the sandbox of the writer, when it could be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
    },
    /// A file or directory was removed inside the sandbox.
    FsRemove {
        /// Path inside the sandbox.
        path: String,
        /// PID inside the sandbox, when it could be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
    },
    /// A file or directory was renamed inside the sandbox.
    FsRename {
        /// Old path.
        from: String,
        /// New path.
        to: String,
        /// PID inside the sandbox, when it could be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
    },
    /// File changes not recorded one by one because the sandbox exceeded the audit rate.
    FsSuppressed {
        /// How many were left out.
        count: u64,
    },
    /// A sandbox process asked the agent's sudo broker to run a command (jail sandboxes).
    Sudo {
        /// PID inside the sandbox of the asking process (`sudo` itself).
        pid: u32,
        /// Its uid inside the sandbox (from the kernel, `SO_PEERCRED`).
        uid: u32,
        /// Its user name.
        user: String,
        /// The user the command was to run as.
        target: String,
        /// The command line asked for (empty for a login shell or `-l`).
        argv: Vec<String>,
        /// Whether sudoers granted it.
        allowed: bool,
    },
}

impl AgentEvent {
    /// Parse one control line from an agent; `None` for oversized or malformed lines.
    pub fn parse_line(line: &[u8]) -> Option<AgentEvent> {
        if line.len() > MAX_EVENT_LINE {
            return None;
        }
        serde_json::from_slice(line).ok()
    }

    /// The audit `kind` this event is stored under.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentEvent::Ready { .. } => "agent.ready",
            AgentEvent::ProcessStart { .. } => "process.start",
            AgentEvent::ProcessExit { .. } => "process.exit",
            AgentEvent::FileWrite { .. } => "file.write",
            AgentEvent::FileRemove { .. } => "file.remove",
            AgentEvent::FileMove { .. } => "file.move",
            AgentEvent::MakeDir { .. } => "file.mkdir",
            AgentEvent::ProcessExec { .. } => "process.exec",
            AgentEvent::ProcessExecSuppressed { .. } => "process.exec.suppressed",
            AgentEvent::FsWrite { .. } => "fs.write",
            AgentEvent::FsRemove { .. } => "fs.remove",
            AgentEvent::FsRename { .. } => "fs.rename",
            AgentEvent::FsSuppressed { .. } => "fs.suppressed",
            AgentEvent::Sudo { .. } => "sudo",
        }
    }

    /// Encode as one control line (with the trailing newline).
    pub fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_roundtrip() {
        let e = AgentEvent::ProcessStart {
            pid: 7,
            cmd: "/bin/bash".into(),
            args: vec!["-c".into(), "true".into()],
            cwd: "/home/user".into(),
            user: "user".into(),
            tag: None,
        };
        let line = e.to_line();
        assert_eq!(line.last(), Some(&b'\n'));
        let back = AgentEvent::parse_line(&line[..line.len() - 1]).expect("parse");
        assert_eq!(back, e);
        assert_eq!(back.kind(), "process.start");
    }

    #[test]
    fn config_start_command_is_optional() {
        let json =
            r#"{"sandbox_id":"a","access_token":"t","env_vars":{},"default_user":"user","port":1}"#;
        let cfg: AgentConfig = serde_json::from_str(json).expect("parse");
        assert_eq!(cfg.start, None);
        assert!(!serde_json::to_string(&cfg).expect("json").contains("start"));
        let with = AgentConfig {
            start: Some(StartCommand {
                cmd: "exec server".into(),
                user: "user".into(),
                cwd: String::new(),
            }),
            ..cfg
        };
        let back: AgentConfig =
            serde_json::from_str(&serde_json::to_string(&with).expect("json")).expect("parse");
        assert_eq!(back, with);
    }

    #[test]
    fn config_clock_and_entropy_are_optional() {
        let json =
            r#"{"sandbox_id":"a","access_token":"t","env_vars":{},"default_user":"user","port":1}"#;
        let cfg: AgentConfig = serde_json::from_str(json).expect("parse");
        assert_eq!(cfg.host_time_ns, None);
        assert!(cfg.entropy.is_empty());
        let text = serde_json::to_string(&cfg).expect("json");
        assert!(
            !text.contains("host_time_ns") && !text.contains("entropy"),
            "{text}"
        );
        let with = AgentConfig {
            host_time_ns: Some(1_800_000_000_000_000_000),
            entropy: vec![0, 255, 7],
            ..cfg
        };
        let back: AgentConfig =
            serde_json::from_str(&serde_json::to_string(&with).expect("json")).expect("parse");
        assert_eq!(back, with);
    }

    #[test]
    fn hostile_lines_are_dropped() {
        assert!(AgentEvent::parse_line(b"{not json").is_none());
        assert!(AgentEvent::parse_line(&vec![b'x'; MAX_EVENT_LINE + 1]).is_none());
        assert!(AgentEvent::parse_line(br#"{"event":"nope"}"#).is_none());
    }
}
