//! `sudo` in jail sandboxes: an elevation broker in the agent and a `sudo` shim.
//!
//! Every process of a jail sandbox runs with no_new_privs (a hardening requirement), so a
//! setuid `sudo` cannot elevate. Templates still grant `user` passwordless sudo, and agents
//! run `sudo apt-get install ...` all the time. So the agent, root of the sandbox's user
//! namespace, runs what sudoers grants on the caller's behalf:
//!
//! * [`broker`]: the agent listens on the abstract Unix socket [`SOCKET_NAME`] (abstract
//!   sockets belong to the sandbox's own network namespace and need no file; the agent binds
//!   it before any sandbox process exists). The peer is identified by `SO_PEERCRED`, checked
//!   against [`sudoers`], and its stdin/stdout/stderr arrive by `SCM_RIGHTS`; the command runs
//!   as the target user with those descriptors, in its own session, and its exit status goes
//!   back. Signals the shim forwards go to the command's process group; a connection that
//!   closes first (the shim was killed) kills the group.
//! * [`shim`]: the same static agent binary, started as `sudo` (the jail binds it over
//!   `/usr/bin/sudo` when the template has one). It parses sudo's options, sends the request
//!   and relays signals and the exit status.
//!
//! Wire format on the stream: one byte carrying the three descriptors, then frames of a
//! 4-byte big-endian length and a JSON body ([`Request`], then [`ShimMsg`]s one way,
//! [`Reply`] the other).

pub mod broker;
pub mod shim;
pub mod sudoers;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Abstract socket name (without the leading NUL).
pub const SOCKET_NAME: &[u8] = b"cella-sudo";
/// `secure_path`, as Debian and Ubuntu configure it.
pub const SECURE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Largest request frame (argv + environment).
pub const MAX_REQUEST: usize = 1024 * 1024;
/// Largest frame after the request (signals, replies).
pub const MAX_SMALL_FRAME: usize = 64 * 1024;
/// Signals the shim forwards to the command.
pub const FORWARDED_SIGNALS: [i32; 7] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// How much of the caller's environment survives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Preserve {
    /// `env_reset`: only the kept variables.
    #[default]
    Reset,
    /// `-E`: everything.
    All,
    /// `--preserve-env=A,B`: `env_reset` plus these.
    Vars(Vec<String>),
}

/// What the shim asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Run a command.
    #[default]
    Run,
    /// `-l`: list what the caller may run.
    List,
}

/// One sudo invocation, as the shim parsed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Request {
    /// Run or list.
    pub mode: Mode,
    /// Command and arguments (may be empty with `-i`/`-s`).
    pub argv: Vec<String>,
    /// `-u`: target user name or `#uid` (`None`: root).
    pub user: Option<String>,
    /// Environment handling.
    pub preserve: Preserve,
    /// `-H`.
    pub set_home: bool,
    /// `-i`.
    pub login: bool,
    /// `-s`.
    pub shell: bool,
    /// Leading `VAR=value` arguments.
    pub assignments: Vec<(String, String)>,
    /// The caller's environment.
    pub env: Vec<(String, String)>,
    /// The caller's working directory.
    pub cwd: String,
}

/// Messages from the shim after the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShimMsg {
    /// Deliver this signal to the command's process group.
    Signal(i32),
}

/// The broker's final answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The command exited with this code.
    Exit(i32),
    /// A signal killed the command.
    Signaled(i32),
    /// Print this on stdout and exit 0 (`-l`).
    Output(String),
    /// Print this on stderr and exit with `code`.
    Error {
        /// Message (with the `sudo: ` prefix).
        message: String,
        /// Exit code.
        code: i32,
    },
}

/// Frame a message: 4-byte big-endian length, then JSON.
pub fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// A user as the environment needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvUser {
    /// Name.
    pub name: String,
    /// UID.
    pub uid: u32,
    /// Primary GID.
    pub gid: u32,
    /// Home.
    pub home: String,
    /// Login shell.
    pub shell: String,
}

/// Whether `env_reset` keeps a variable of the caller's environment.
fn kept_by_default(k: &str) -> bool {
    matches!(
        k,
        "TERM" | "DISPLAY" | "COLORS" | "LANG" | "LANGUAGE" | "XAUTHORITY"
    ) || k.starts_with("LC_")
}

/// The command's environment, like sudo with `env_reset` and `secure_path`: kept variables of
/// the caller (all with `-E`, plus named ones with `--preserve-env=`), PATH = secure_path,
/// HOME/USER/LOGNAME/SHELL of the target (HOME kept with `-E` unless `-H`), `SUDO_*`, then the
/// command line's `VAR=value` assignments.
pub fn build_env(req: &Request, invoker: &EnvUser, target: &EnvUser, command: &str) -> Vec<String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in &req.env {
        let keep = match &req.preserve {
            Preserve::All => !req.login,
            Preserve::Reset => kept_by_default(k),
            Preserve::Vars(names) => kept_by_default(k) || names.iter().any(|n| n == k),
        };
        if keep && !k.is_empty() && !k.contains('=') {
            env.insert(k.clone(), v.clone());
        }
    }
    let shell = if target.shell.is_empty() {
        "/bin/sh".to_string()
    } else {
        target.shell.clone()
    };
    let keep_home = matches!(req.preserve, Preserve::All) && !req.set_home && !req.login;
    if !keep_home || !env.contains_key("HOME") {
        env.insert("HOME".into(), target.home.clone());
    }
    if !matches!(req.preserve, Preserve::All) || req.login || !env.contains_key("SHELL") {
        env.insert("SHELL".into(), shell);
    }
    env.insert("PATH".into(), SECURE_PATH.into());
    env.insert("USER".into(), target.name.clone());
    env.insert("LOGNAME".into(), target.name.clone());
    env.insert("SUDO_USER".into(), invoker.name.clone());
    env.insert("SUDO_UID".into(), invoker.uid.to_string());
    env.insert("SUDO_GID".into(), invoker.gid.to_string());
    env.insert("SUDO_COMMAND".into(), command.to_string());
    for (k, v) in &req.assignments {
        env.insert(k.clone(), v.clone());
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Join a command for `sh -c`, escaping like sudo does for `-i`/`-s`: every character other
/// than alphanumerics, `_`, `-` and `$` gets a backslash.
pub fn shell_join(argv: &[String]) -> String {
    let mut out = String::new();
    for (i, a) in argv.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        for c in a.chars() {
            if !(c.is_alphanumeric() || matches!(c, '_' | '-' | '$')) {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, uid: u32, home: &str) -> EnvUser {
        EnvUser {
            name: name.into(),
            uid,
            gid: uid,
            home: home.into(),
            shell: "/bin/bash".into(),
        }
    }

    fn caller_env() -> Vec<(String, String)> {
        [
            ("HOME", "/home/user"),
            ("PATH", "/home/user/bin:/usr/bin"),
            ("TERM", "xterm"),
            ("LC_ALL", "C.UTF-8"),
            ("SECRET", "s3"),
            ("SHELL", "/bin/zsh"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn get<'a>(env: &'a [String], k: &str) -> Option<&'a str> {
        env.iter()
            .find_map(|kv| kv.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
    }

    #[test]
    fn env_reset_by_default() {
        let req = Request {
            env: caller_env(),
            ..Default::default()
        };
        let e = build_env(
            &req,
            &user("user", 1000, "/home/user"),
            &user("root", 0, "/root"),
            "/usr/bin/env",
        );
        assert_eq!(get(&e, "HOME"), Some("/root"));
        assert_eq!(get(&e, "PATH"), Some(SECURE_PATH));
        assert_eq!(get(&e, "TERM"), Some("xterm"));
        assert_eq!(get(&e, "LC_ALL"), Some("C.UTF-8"));
        assert_eq!(get(&e, "SECRET"), None);
        assert_eq!(get(&e, "SHELL"), Some("/bin/bash"));
        assert_eq!(get(&e, "USER"), Some("root"));
        assert_eq!(get(&e, "LOGNAME"), Some("root"));
        assert_eq!(get(&e, "SUDO_USER"), Some("user"));
        assert_eq!(get(&e, "SUDO_UID"), Some("1000"));
        assert_eq!(get(&e, "SUDO_GID"), Some("1000"));
        assert_eq!(get(&e, "SUDO_COMMAND"), Some("/usr/bin/env"));
    }

    #[test]
    fn env_preserved_with_e_and_named_vars() {
        let inv = user("user", 1000, "/home/user");
        let root = user("root", 0, "/root");
        let all = Request {
            env: caller_env(),
            preserve: Preserve::All,
            ..Default::default()
        };
        let e = build_env(&all, &inv, &root, "x");
        assert_eq!(get(&e, "SECRET"), Some("s3"));
        assert_eq!(get(&e, "HOME"), Some("/home/user"), "-E keeps HOME");
        assert_eq!(get(&e, "SHELL"), Some("/bin/zsh"));
        assert_eq!(get(&e, "PATH"), Some(SECURE_PATH), "secure_path wins");
        assert_eq!(get(&e, "USER"), Some("root"));
        let h = Request {
            set_home: true,
            ..all.clone()
        };
        assert_eq!(get(&build_env(&h, &inv, &root, "x"), "HOME"), Some("/root"));
        let named = Request {
            env: caller_env(),
            preserve: Preserve::Vars(vec!["SECRET".into(), "MISSING".into()]),
            ..Default::default()
        };
        let e = build_env(&named, &inv, &root, "x");
        assert_eq!(get(&e, "SECRET"), Some("s3"));
        assert_eq!(get(&e, "MISSING"), None);
        assert_eq!(get(&e, "HOME"), Some("/root"));
        let assigned = Request {
            env: caller_env(),
            assignments: vec![
                ("FOO".into(), "bar=baz".into()),
                ("PATH".into(), "/x".into()),
            ],
            ..Default::default()
        };
        let e = build_env(&assigned, &inv, &root, "x");
        assert_eq!(get(&e, "FOO"), Some("bar=baz"));
        assert_eq!(
            get(&e, "PATH"),
            Some("/x"),
            "explicit assignments are applied last"
        );
    }

    #[test]
    fn join_escapes_like_sudo() {
        let v = |s: &[&str]| s.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(
            shell_join(&v(&["echo", "a b", "$HOME"])),
            "echo a\\ b $HOME"
        );
        assert_eq!(shell_join(&v(&["ls", "-la", "/tmp"])), "ls -la \\/tmp");
        assert_eq!(shell_join(&[]), "");
    }

    #[test]
    fn frames_are_length_prefixed() {
        let f = frame(&ShimMsg::Signal(2));
        let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(len, f.len() - 4);
        let back: ShimMsg = serde_json::from_slice(&f[4..]).expect("json");
        assert_eq!(back, ShimMsg::Signal(2));
    }
}
