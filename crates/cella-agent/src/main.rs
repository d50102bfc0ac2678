//! `cella-agent`: the first process of every sandbox.
//!
//! It speaks E2B's envd protocol on port 49983 so the official SDKs work unchanged, reaps
//! zombies (it is PID 1), and reports audit events to the host over the control channel.
//!
//! Two modes:
//! * `cella-agent --control-fd 3`: production. Reads one [`AgentConfig`] JSON line from the fd,
//!   binds, writes `ready`, then streams audit events on the same fd.
//! * `cella-agent --listen 127.0.0.1:PORT --token TOKEN [--user NAME] [--start CMD]`:
//!   standalone, for tests and debugging on a host.
//!
//! A template's start command (the config's `start`, or `--start`) is spawned once the agent
//! listens, as a tracked process tagged `start_cmd`.
//!
//! Started under the name `sudo` (the jail binds this binary over `/usr/bin/sudo`), it is the
//! client of the agent's sudo broker instead ([`sudo`]).

mod execaudit;
mod files;
mod fs;
mod host_state;
mod http;
mod netcfg;
mod process;
mod quiesce;
mod reaper;
mod rpc;
mod spawn;
mod state;
mod sudo;
mod users;
mod watch;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cella_proto::control::{AgentConfig, AgentEvent, StartCommand};

use crate::reaper::Reaper;
use crate::state::{Agent, EventSink, Settings};

/// Longest config line accepted on the control fd.
const MAX_CONFIG_LINE: usize = 1024 * 1024;
/// Line written on the control fd right before the agent blocks reading its config.
const AWAITING_CONFIG: &[u8] = b"cella-agent: awaiting config\n";
/// Audit events buffered while the host is slow to read.
const EVENT_BUFFER: usize = 1024;

#[derive(Debug, Default)]
struct Args {
    control_fd: Option<i32>,
    listen: Option<String>,
    token: Option<String>,
    user: Option<String>,
    workdir: Option<String>,
    envs: BTreeMap<String, String>,
    start: Option<String>,
}

const USAGE: &str = "usage: cella-agent --control-fd FD\n       cella-agent --listen ADDR:PORT [--token TOKEN] [--user NAME] [--workdir DIR] [--env K=V]... [--start CMD]";

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args> {
    let mut a = Args::default();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it.next().with_context(|| format!("{name} needs a value")),
            }
        };
        match flag.as_str() {
            "--control-fd" => {
                a.control_fd = Some(value("--control-fd")?.parse().context("--control-fd")?)
            }
            "--listen" => a.listen = Some(value("--listen")?),
            "--token" => a.token = Some(value("--token")?),
            "--user" => a.user = Some(value("--user")?),
            "--workdir" => a.workdir = Some(value("--workdir")?),
            "--start" => a.start = Some(value("--start")?),
            "--env" => {
                let kv = value("--env")?;
                let (k, v) = kv.split_once('=').context("--env takes KEY=VALUE")?;
                a.envs.insert(k.to_string(), v.to_string());
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if a.control_fd.is_none() && a.listen.is_none() {
        bail!("one of --control-fd or --listen is required\n{USAGE}");
    }
    Ok(a)
}

/// One line from the control fd without buffering past it; `None` at end of file. A line
/// longer than [`MAX_CONFIG_LINE`] is an error (the rest of it is skipped).
fn read_control_line(f: &mut std::fs::File) -> Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let mut too_long = false;
    let mut byte = [0u8; 1];
    loop {
        match f.read(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if too_long => {}
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_CONFIG_LINE {
                    too_long = true;
                    line.clear();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the control channel"),
        }
    }
    if too_long {
        bail!("configuration line too long");
    }
    Ok(Some(line))
}

/// The first line of the control fd: the agent's configuration.
fn read_config_line(f: &mut std::fs::File) -> Result<AgentConfig> {
    let Some(line) = read_control_line(f)? else {
        bail!("control channel closed before the configuration line");
    };
    serde_json::from_slice(&line).context("parsing the agent configuration")
}

/// Every later config line on the control fd re-keys a running agent: a microVM restored from
/// another sandbox's memory snapshot wakes with that sandbox's hostname, token, environment,
/// clock and CRNG state, and the host sends the new sandbox's (its listen address and start
/// command are not changed: the restored ones keep running). Each is answered with `ready`,
/// which the host waits for. Only the host writes this direction of the channel.
fn spawn_reconfigure_reader(mut control: std::fs::File, agent: Arc<Agent>) {
    let spawned = std::thread::Builder::new()
        .name("control-reader".into())
        .spawn(move || {
            loop {
                let line = match read_control_line(&mut control) {
                    Ok(Some(line)) => line,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!("no longer reading the control channel: {e:#}");
                        return;
                    }
                };
                match serde_json::from_slice::<AgentConfig>(&line) {
                    Ok(cfg) => {
                        host_state::adopt(&cfg);
                        agent.reconfigure(cfg.access_token, cfg.env_vars);
                        agent.events.emit(AgentEvent::Ready {
                            version: env!("CARGO_PKG_VERSION").to_string(),
                        });
                    }
                    Err(e) => tracing::warn!("ignoring a malformed config line: {e}"),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the control reader: {e}");
    }
}

/// Bring up `lo` (as PID 1 in a fresh network namespace it starts down).
fn loopback_up() {
    // SAFETY: plain socket creation; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        tracing::warn!("cannot open a socket to bring up lo");
        return;
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags into our ifreq.
    let got = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) };
    if got == 0 {
        // SAFETY: the union member written by SIOCGIFFLAGS is ifru_flags.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        if flags & libc::IFF_UP as libc::c_short == 0 {
            req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
            // SAFETY: SIOCSIFFLAGS reads our ifreq.
            if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) } != 0 {
                tracing::warn!("cannot bring up lo: {}", std::io::Error::last_os_error());
            }
        }
    }
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
}

/// Write audit events to the control fd from a dedicated thread, so a host that stops reading
/// blocks only that thread; the channel in front of it drops events when full.
fn spawn_event_writer(
    mut out: std::fs::File,
    mut rx: tokio::sync::mpsc::Receiver<AgentEvent>,
    written: tokio::sync::watch::Sender<u64>,
) {
    let spawned = std::thread::Builder::new()
        .name("control-writer".into())
        .spawn(move || {
            while let Some(ev) = rx.blocking_recv() {
                if out.write_all(&ev.to_line()).is_err() {
                    break;
                }
                written.send_modify(|n| *n += 1);
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the control writer: {e}");
    }
}

/// The name we were started under, when it is one of the multi-call names (`sudo`, and
/// `sudoedit`, which Debian links to sudo).
fn multi_call_name(argv0: Option<&str>) -> Option<&'static str> {
    match argv0.and_then(|a| a.rsplit('/').next()) {
        Some("sudo") => Some("sudo"),
        Some("sudoedit") => Some("sudoedit"),
        _ => None,
    }
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    match multi_call_name(argv.first().map(String::as_str)) {
        Some("sudo") => std::process::exit(sudo::shim::main(argv)),
        Some(_) => {
            eprintln!(
                "sudo: sudoedit is not supported (cella's jail sudo); use sudo with an editor"
            );
            std::process::exit(1);
        }
        None => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CELLA_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = parse_args(std::env::args().skip(1))?;
    // SAFETY: getpid has no memory effects.
    if unsafe { libc::getpid() } == 1 {
        loopback_up();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let reaper = Reaper::new();
    // Install the SIGCHLD handler before anything can exit.
    tokio::spawn(reaper.clone().run());

    let mut sudo_listener = None;
    let (settings, addr, control, start) = match args.control_fd {
        Some(fd) => {
            // SAFETY: the driver passes this fd to us; we take sole ownership of it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut file = std::fs::File::from(owned);
            // Tells a VM host that the agent is blocked on its config: the point where a
            // golden VM is snapshotted. Not JSON, so hosts that do not care drop it.
            file.write_all(AWAITING_CONFIG)
                .context("writing to the control channel")?;
            let cfg = read_config_line(&mut file)?;
            host_state::adopt(&cfg);
            // Sandboxed: bind the sudo broker's name before any sandbox process exists.
            match sudo::broker::bind(sudo::SOCKET_NAME) {
                Ok(l) => sudo_listener = Some(l),
                Err(e) => tracing::warn!("sudo broker unavailable: {e}"),
            }
            let settings = Settings {
                token: cfg.access_token,
                env_vars: cfg.env_vars,
                default_user: cfg.default_user,
                default_workdir: cfg.default_workdir,
                users_root: PathBuf::from("/"),
                proc_root: PathBuf::from("/"),
                system_root: Some(PathBuf::from("/")),
            };
            (
                settings,
                format!("{}:{}", cfg.bind, cfg.port),
                Some(file),
                cfg.start,
            )
        }
        None => {
            let default_user = match args.user {
                Some(u) => u,
                None => {
                    // SAFETY: getuid has no memory effects.
                    let uid = unsafe { libc::getuid() };
                    users::UserDb::new("/").user_name(uid)
                }
            };
            let settings = Settings {
                token: args.token.unwrap_or_default(),
                env_vars: args.envs,
                default_user,
                default_workdir: args.workdir.unwrap_or_default(),
                users_root: PathBuf::from("/"),
                proc_root: PathBuf::from("/"),
                // Standalone on a host: never freeze the host's filesystem.
                system_root: None,
            };
            let start = args.start.map(|cmd| StartCommand {
                cmd,
                user: String::new(),
                cwd: String::new(),
            });
            (settings, args.listen.unwrap_or_default(), None, start)
        }
    };

    // Parse the address ourselves: a static glibc binary must not reach getaddrinfo/NSS.
    let sock: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("listen address {addr:?} must be IP:PORT"))?;
    let listener = tokio::net::TcpListener::bind(sock)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr().context("local address")?;

    let mut control_in = None;
    let events = match control {
        Some(file) => {
            match file.try_clone() {
                Ok(f) => control_in = Some(f),
                Err(e) => tracing::warn!("cannot keep reading the control channel: {e}"),
            }
            let (tx, rx) = tokio::sync::mpsc::channel(EVENT_BUFFER);
            let (written_tx, written_rx) = tokio::sync::watch::channel(0u64);
            spawn_event_writer(file, rx, written_tx);
            let sink = EventSink::tracked(tx, written_rx);
            sink.emit(AgentEvent::Ready {
                version: env!("CARGO_PKG_VERSION").to_string(),
            });
            // In a microVM guest: every exec in the guest (a jail's host does this itself).
            if execaudit::spawn(sink.clone(), settings.proc_root.join("proc")) {
                tracing::info!("auditing every program executed in this guest");
            }
            sink
        }
        None => {
            eprintln!("cella-agent listening on {local}");
            EventSink::default()
        }
    };

    let agent = Arc::new(Agent::new(settings, reaper, events));
    if let Some(control) = control_in {
        spawn_reconfigure_reader(control, agent.clone());
    }
    if let Some(listener) = sudo_listener {
        // Sandbox root (uid 0 of its user namespace) owns the policy files.
        let sudoers = sudo::sudoers::Sudoers::new("/", 0);
        tokio::spawn(sudo::broker::serve(agent.clone(), listener, sudoers));
    }
    if let Some(start) = start {
        // After `ready` and while we already accept connections: the template's server
        // comes up next to envd, and a failure to start it never takes envd down.
        let agent = agent.clone();
        tokio::spawn(async move {
            match process::start_boot_command(&agent, &start).await {
                Ok(pid) => tracing::info!(pid, "start command running"),
                Err(e) => tracing::error!("cannot run the start command: {}", e.message),
            }
        });
    }
    // Small stream frames (process output, the end event) must not wait for Nagle + delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, http::app(agent))
        .await
        .context("serving")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args> {
        parse_args(v.iter().map(|s| s.to_string()))
    }

    fn settings(token: &str) -> Settings {
        Settings {
            token: token.into(),
            env_vars: BTreeMap::from([("A".to_string(), "1".to_string())]),
            default_user: "root".into(),
            default_workdir: String::new(),
            users_root: PathBuf::from("/"),
            proc_root: PathBuf::from("/"),
            system_root: None,
        }
    }

    #[test]
    fn control_lines_are_bounded_and_end_at_eof() {
        use std::io::Write as _;
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let mut w = std::fs::File::from(OwnedFd::from(a));
        let mut r = std::fs::File::from(OwnedFd::from(b));
        // More than a socket buffer holds: written while the reader reads.
        let writer = std::thread::spawn(move || {
            w.write_all(b"one\n").expect("write");
            w.write_all(&vec![b'x'; MAX_CONFIG_LINE + 10])
                .expect("write");
            w.write_all(b"\ntwo\npartial").expect("write");
        });
        assert_eq!(
            read_control_line(&mut r).expect("line"),
            Some(b"one".to_vec())
        );
        let err = read_control_line(&mut r).expect_err("too long");
        assert!(err.to_string().contains("too long"), "{err}");
        // The oversized line was skipped whole: the next one is intact.
        assert_eq!(
            read_control_line(&mut r).expect("line"),
            Some(b"two".to_vec())
        );
        assert_eq!(read_control_line(&mut r).expect("eof"), None);
        writer.join().expect("writer");
    }

    /// A later config line (a memory restore) replaces the token and environment and is
    /// answered with `ready`; a malformed one changes nothing.
    #[tokio::test]
    async fn later_config_lines_rekey_the_agent() {
        use std::io::Write as _;
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let agent = Arc::new(Agent::new(
            settings("old"),
            Reaper::new(),
            state::EventSink::new(tx),
        ));
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        spawn_reconfigure_reader(std::fs::File::from(OwnedFd::from(b)), agent.clone());
        let mut host = std::fs::File::from(OwnedFd::from(a));
        host.write_all(b"{not json\n").expect("write");
        let cfg = AgentConfig {
            // The current hostname: adopting it changes nothing on the test host.
            sandbox_id: host_state::hostname().expect("hostname"),
            access_token: "new".into(),
            env_vars: BTreeMap::from([("B".to_string(), "2".to_string())]),
            default_user: "root".into(),
            default_workdir: String::new(),
            port: 1,
            bind: "127.0.0.1".into(),
            start: None,
            host_time_ns: None,
            entropy: Vec::new(),
        };
        let mut line = serde_json::to_vec(&cfg).expect("json");
        line.push(b'\n');
        host.write_all(&line).expect("write");
        let ev = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("in time")
            .expect("event");
        assert!(matches!(ev, AgentEvent::Ready { .. }), "{ev:?}");
        assert!(agent.token_ok(Some("new")));
        assert!(!agent.token_ok(Some("old")));
        assert_eq!(agent.env_vars().get("B").map(String::as_str), Some("2"));
        assert!(!agent.env_vars().contains_key("A"));
        assert!(rx.try_recv().is_err(), "the malformed line made no event");
    }

    #[test]
    fn argument_parsing() {
        let a = args(&[
            "--listen",
            "127.0.0.1:1",
            "--token=t",
            "--user",
            "root",
            "--env",
            "A=b=c",
        ])
        .expect("parse");
        assert_eq!(a.listen.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(a.token.as_deref(), Some("t"));
        assert_eq!(a.user.as_deref(), Some("root"));
        assert_eq!(a.envs.get("A").map(String::as_str), Some("b=c"));
        assert_eq!(
            args(&["--control-fd", "3"]).expect("fd").control_fd,
            Some(3)
        );
        assert!(args(&[]).is_err());
        assert!(args(&["--bogus"]).is_err());
        assert!(args(&["--control-fd", "x"]).is_err());
        assert!(args(&["--listen"]).is_err());
    }

    #[test]
    fn multi_call_names() {
        assert_eq!(multi_call_name(Some("sudo")), Some("sudo"));
        assert_eq!(multi_call_name(Some("/usr/bin/sudo")), Some("sudo"));
        assert_eq!(multi_call_name(Some("/usr/bin/sudoedit")), Some("sudoedit"));
        assert_eq!(multi_call_name(Some("/.cella/agent")), None);
        assert_eq!(multi_call_name(Some("sudo-x")), None);
        assert_eq!(multi_call_name(None), None);
    }

    #[test]
    fn config_line_is_read_exactly() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("ctl");
        let cfg = AgentConfig {
            sandbox_id: "abc".into(),
            access_token: "tok".into(),
            env_vars: BTreeMap::new(),
            default_user: "user".into(),
            default_workdir: String::new(),
            port: 49983,
            bind: "0.0.0.0".into(),
            start: None,
            host_time_ns: Some(1),
            entropy: vec![1, 2],
        };
        let mut line = serde_json::to_vec(&cfg).expect("json");
        line.extend_from_slice(b"\nEXTRA");
        std::fs::write(&p, &line).expect("write");
        let mut f = std::fs::File::open(&p).expect("open");
        assert_eq!(read_config_line(&mut f).expect("read"), cfg);
        let mut rest = String::new();
        f.read_to_string(&mut rest).expect("rest");
        assert_eq!(rest, "EXTRA", "nothing past the newline is consumed");
        std::fs::write(&p, b"{}").expect("write");
        let mut f = std::fs::File::open(&p).expect("open");
        assert!(read_config_line(&mut f).is_err());
    }
}
