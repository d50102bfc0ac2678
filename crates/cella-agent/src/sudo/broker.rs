//! The elevation broker: runs what sudoers grants on behalf of a sandbox process.
//!
//! Trust: the peer is identified by the kernel (`SO_PEERCRED`, `SO_PEERGROUPS`), never by
//! what it says; the socket is abstract, so only processes in this sandbox's network namespace
//! reach it; the descriptors the command gets are the peer's own. What a granted request gets
//! is what sudo would give it: a process as the target user of the sandbox's user namespace
//! (root there is not root on the host), still under no_new_privs, seccomp and the sandbox's
//! dropped capabilities, because the agent itself is.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::sync::Arc;
use std::time::Duration;

use cella_proto::control::AgentEvent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

use super::sudoers::{self, Identity, Sudoers};
use super::{
    EnvUser, FORWARDED_SIGNALS, MAX_REQUEST, MAX_SMALL_FRAME, Mode, Reply, Request, SECURE_PATH,
    ShimMsg, build_env, frame, shell_join,
};
use crate::reaper::ExitStatus;
use crate::spawn::{self, Credentials, SpawnError, SpawnSpec, StdioMode};
use crate::state::AgentRef;
use crate::users::User;

/// sudo sessions running at once (more are refused).
const MAX_SESSIONS: usize = 64;
/// Time for a client to send its descriptors and request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Bind the broker's abstract socket ([`super::SOCKET_NAME`] in a sandbox). Call before any
/// sandbox process exists, so nothing else can have taken the name.
pub fn bind(name: &[u8]) -> std::io::Result<std::os::unix::net::UnixListener> {
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    let l = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Accept sudo sessions forever, authorizing them against `sudoers`.
pub async fn serve(agent: AgentRef, listener: std::os::unix::net::UnixListener, sudoers: Sudoers) {
    let sudoers = Arc::new(sudoers);
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("sudo broker: cannot register the socket: {e}");
            return;
        }
    };
    let sessions = Arc::new(Semaphore::new(MAX_SESSIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("sudo broker: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = agent.clone();
        let sudoers = sudoers.clone();
        let permit = sessions.clone().try_acquire_owned();
        tokio::spawn(async move {
            let mut stream = stream;
            match permit {
                Ok(_permit) => session(&agent, &sudoers, &mut stream).await,
                Err(_) => {
                    let _ = reply(
                        &mut stream,
                        &error("sudo: too many sudo sessions in this sandbox, try again"),
                    )
                    .await;
                }
            }
        });
    }
}

fn error(message: impl Into<String>) -> Reply {
    Reply::Error {
        message: message.into(),
        code: 1,
    }
}

async fn reply(stream: &mut UnixStream, r: &Reply) -> std::io::Result<()> {
    stream.write_all(&frame(r)).await
}

async fn read_frame(stream: &mut UnixStream, max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::other("frame too large"));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

/// `recvmsg` one byte and exactly three descriptors (close-on-exec).
fn recv_fds(fd: RawFd) -> std::io::Result<[OwnedFd; 3]> {
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((3 * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: msghdr is plain data; zeroed is valid, fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg points to live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n == 0 {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    }
    let mut got: Vec<OwnedFd> = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into our buffer; each SCM_RIGHTS
    // payload holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors now owned by us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    got.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other("descriptors truncated"));
    }
    <[OwnedFd; 3]>::try_from(got)
        .map_err(|_| std::io::Error::other("expected exactly three descriptors"))
}

/// The peer's supplementary groups (`SO_PEERGROUPS`).
fn peer_groups(fd: RawFd) -> std::io::Result<Vec<u32>> {
    let mut groups = vec![0u32; 256];
    loop {
        let mut len = (groups.len() * 4) as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into our buffer and updates `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / 4);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && groups.len() < 65536 {
            groups.resize((len as usize / 4).max(groups.len() * 2), 0);
            continue;
        }
        return Err(e);
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn env_user(u: &User) -> EnvUser {
    EnvUser {
        name: u.name.clone(),
        uid: u.uid,
        gid: u.gid,
        home: u.home.clone(),
        shell: u.shell.clone(),
    }
}

/// Resolve `-u` (a name or `#uid`; root when absent).
fn target_user(agent: &AgentRef, spec: Option<&str>) -> Result<User, String> {
    let spec = spec.unwrap_or("root");
    let name = match spec.strip_prefix('#') {
        Some(n) => {
            let uid: u32 = n
                .parse()
                .map_err(|_| format!("sudo: unknown user {spec}"))?;
            agent
                .users
                .by_uid(uid)
                .ok_or_else(|| format!("sudo: unknown user {spec}"))?
                .name
        }
        None => spec.to_string(),
    };
    agent
        .users
        .lookup(&name)
        .map_err(|_| format!("sudo: unknown user {spec}"))
}

/// What to execute: (program path, argv).
fn command(req: &Request, target: &User) -> Result<(String, Vec<String>), String> {
    if req.login || req.shell {
        let shell = if req.shell {
            req.env
                .iter()
                .find(|(k, _)| k == "SHELL")
                .map(|(_, v)| v.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| target.shell.clone())
        } else {
            target.shell.clone()
        };
        let shell = if shell.is_empty() {
            "/bin/sh".to_string()
        } else {
            shell
        };
        let argv0 = if req.login {
            format!("-{}", shell.rsplit('/').next().unwrap_or("sh"))
        } else {
            shell.clone()
        };
        let mut argv = vec![argv0];
        if !req.argv.is_empty() {
            argv.push("-c".into());
            argv.push(shell_join(&req.argv));
        }
        return Ok((shell, argv));
    }
    let cmd = req.argv.first().ok_or("sudo: no command given")?;
    let program = spawn::find_executable(cmd, SECURE_PATH)
        .ok_or_else(|| format!("sudo: {cmd}: command not found"))?;
    Ok((program, req.argv.clone()))
}

fn spawn_error(program: &str, cwd: &str, e: &SpawnError) -> String {
    let cause = std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_else(|| e.to_string());
    match e {
        SpawnError::Child { step, .. } if step.starts_with("chdir") => {
            format!("sudo: unable to change directory to {cwd}: {cause}")
        }
        _ => format!("sudo: unable to execute {program}: {cause}"),
    }
}

async fn session(agent: &AgentRef, sudoers: &Sudoers, stream: &mut UnixStream) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("sudo broker: no peer credentials: {e}");
            return;
        }
    };
    let fd = stream.as_raw_fd();
    let received = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let fds = stream
            .async_io(tokio::io::Interest::READABLE, || recv_fds(fd))
            .await?;
        let body = read_frame(stream, MAX_REQUEST).await?;
        let req: Request = serde_json::from_slice(&body).map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>((fds, req))
    })
    .await;
    let (fds, req) = match received {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!("sudo broker: bad request: {e}");
            let _ = reply(
                stream,
                &error(format!("sudo: bad request to the broker: {e}")),
            )
            .await;
            return;
        }
        Err(_) => {
            let _ = reply(stream, &error("sudo: request timed out")).await;
            return;
        }
    };
    let (uid, gid) = (cred.uid(), cred.gid());
    let names = agent.users.names();
    let invoker = agent.users.by_uid(uid).unwrap_or(User {
        name: uid.to_string(),
        uid,
        gid,
        home: "/".into(),
        shell: "/bin/sh".into(),
        groups: Vec::new(),
    });
    let mut gids = peer_groups(fd).unwrap_or_else(|_| invoker.groups.clone());
    gids.push(gid);
    gids.sort_unstable();
    gids.dedup();
    let ident = Identity {
        name: invoker.name.clone(),
        uid,
        groups: gids
            .iter()
            .map(|g| (*g, names.known_group(*g).map(str::to_string)))
            .collect(),
    };
    let target = target_user(agent, req.user.as_deref());
    let rules = sudoers.rules();
    let host = hostname();
    let allowed = match &target {
        Ok(t) => sudoers::authorize(&rules, &ident, t.uid),
        Err(_) => false,
    };
    agent.events.emit(AgentEvent::Sudo {
        pid: cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
        uid,
        user: invoker.name.clone(),
        target: match &target {
            Ok(t) => t.name.clone(),
            Err(_) => req.user.clone().unwrap_or_default(),
        },
        argv: req.argv.clone(),
        allowed,
    });
    let target = match target {
        Ok(t) => t,
        Err(msg) => {
            let _ = reply(stream, &error(msg)).await;
            return;
        }
    };
    if !allowed {
        let msg = format!(
            "sudo: {} is not allowed to run sudo on {host} (cella's jail sudo honours only NOPASSWD: ALL rules)",
            invoker.name
        );
        let _ = reply(stream, &error(msg)).await;
        return;
    }
    if req.mode == Mode::List {
        let mut text = format!(
            "User {} may run the following commands on {host}:\n",
            invoker.name
        );
        if uid == 0 {
            text.push_str("    (ALL : ALL) ALL\n");
        }
        for r in sudoers::rules_for(&rules, &ident) {
            text.push_str(&format!("    {}\n", r.text));
        }
        let _ = reply(stream, &Reply::Output(text)).await;
        return;
    }
    run(agent, stream, &req, &invoker, &target, fds).await;
}

/// Start the command (blocking). Like sudo, a working directory the target cannot enter is a
/// warning on the command's stderr, not an error (except for `-i`, whose directory is the
/// point): the command starts in `/` instead.
fn spawn_command(
    mut spec: SpawnSpec,
    fds: [OwnedFd; 3],
    login: bool,
) -> Result<spawn::Spawned, SpawnError> {
    let first = spawn::spawn(&spec);
    let retry = match &first {
        Err(e @ SpawnError::Child { step, .. }) if step.starts_with("chdir") && !login => {
            Some(format!("{}\n", spawn_error(&spec.program, &spec.cwd, e)))
        }
        _ => None,
    };
    let Some(warning) = retry else { return first };
    if let Ok(dup) = fds[2].try_clone() {
        let _ = std::io::Write::write_all(&mut std::fs::File::from(dup), warning.as_bytes());
    }
    spec.cwd = "/".into();
    spawn::spawn(&spec)
}

async fn run(
    agent: &AgentRef,
    stream: &mut UnixStream,
    req: &Request,
    invoker: &User,
    target: &User,
    fds: [OwnedFd; 3],
) {
    let (program, argv) = match command(req, target) {
        Ok(c) => c,
        Err(msg) => {
            let _ = reply(stream, &error(msg)).await;
            return;
        }
    };
    let cwd = if req.login {
        target.home.clone()
    } else if req.cwd.is_empty() {
        "/".to_string()
    } else {
        req.cwd.clone()
    };
    let mut command_text = program.clone();
    for a in argv.iter().skip(1) {
        command_text.push(' ');
        command_text.push_str(a);
    }
    let env = build_env(req, &env_user(invoker), &env_user(target), &command_text);
    let spec = SpawnSpec {
        program: program.clone(),
        argv,
        env,
        cwd: cwd.clone(),
        creds: Some(Credentials {
            uid: target.uid,
            gid: target.gid,
            groups: target.groups.clone(),
        }),
        stdio: StdioMode::Given {
            stdin: fds[0].as_raw_fd(),
            stdout: fds[1].as_raw_fd(),
            stderr: fds[2].as_raw_fd(),
        },
    };
    let login = req.login;
    let spawned = tokio::task::spawn_blocking(move || spawn_command(spec, fds, login)).await;
    let pid = match spawned {
        Ok(Ok(s)) => s.pid,
        Ok(Err(e)) => {
            let _ = reply(stream, &error(spawn_error(&program, &cwd, &e))).await;
            return;
        }
        Err(e) => {
            let _ = reply(stream, &error(format!("sudo: spawn task failed: {e}"))).await;
            return;
        }
    };
    let exit_rx = agent.reaper.register(pid);
    tokio::pin!(exit_rx);
    let status = loop {
        tokio::select! {
            s = &mut exit_rx => break s.ok(),
            msg = read_frame(stream, MAX_SMALL_FRAME) => match msg {
                Ok(body) => {
                    if let Ok(ShimMsg::Signal(sig)) = serde_json::from_slice(&body)
                        && FORWARDED_SIGNALS.contains(&sig)
                    {
                        let _ = spawn::signal_group(pid, sig);
                    }
                }
                Err(_) => {
                    // The shim is gone (killed, or its command was): so is what it ran.
                    tracing::debug!(pid, "sudo client went away, killing its command");
                    let _ = spawn::signal_group(pid, libc::SIGKILL);
                    let _ = exit_rx.await;
                    return;
                }
            }
        }
    };
    let r = match status {
        Some(ExitStatus { code: Some(c), .. }) => Reply::Exit(c),
        Some(ExitStatus {
            signal: Some(s), ..
        }) => Reply::Signaled(s),
        _ => Reply::Exit(1),
    };
    let _ = reply(stream, &r).await;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{SocketAddr, UnixStream as StdStream};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::reaper::Reaper;
    use crate::state::{Agent, EventSink, Settings};
    use crate::sudo::shim::{read_reply, send_fds};

    static NEXT: AtomicUsize = AtomicUsize::new(0);
    /// One test at a time: each fixture's reaper waits for any child of this process, so two
    /// at once would take each other's exit statuses.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    struct Fixture {
        _dir: tempfile::TempDir,
        name: Vec<u8>,
        events: tokio::sync::mpsc::Receiver<AgentEvent>,
    }

    /// A broker on a unique abstract name, with its own passwd and sudoers.
    fn fixture(sudoers: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).expect("etc");
        std::fs::write(
            etc.join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/nonexistent:/bin/sh\n",
        )
        .expect("passwd");
        std::fs::write(etc.join("group"), "root:x:0:\n").expect("group");
        std::fs::write(etc.join("sudoers"), sudoers).expect("sudoers");
        std::fs::set_permissions(etc.join("sudoers"), std::fs::Permissions::from_mode(0o440))
            .expect("chmod");
        let settings = Settings {
            token: String::new(),
            env_vars: BTreeMap::new(),
            default_user: "root".into(),
            default_workdir: String::new(),
            users_root: dir.path().to_path_buf(),
            proc_root: PathBuf::from("/"),
            system_root: None,
        };
        let reaper = Reaper::new();
        tokio::spawn(reaper.clone().run());
        let (tx, events) = tokio::sync::mpsc::channel(64);
        let agent = Arc::new(Agent::new(settings, reaper, EventSink::new(tx)));
        let name = format!(
            "cella-sudo-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
        .into_bytes();
        let listener = bind(&name).expect("bind");
        // SAFETY: getuid has no memory effects.
        let me = unsafe { libc::getuid() };
        tokio::spawn(serve(agent, listener, Sudoers::new(dir.path(), me)));
        Fixture {
            _dir: dir,
            name,
            events,
        }
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both were just created and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    struct Client {
        sock: StdStream,
        stdin: Option<std::fs::File>,
        stdout: std::fs::File,
        stderr: std::fs::File,
    }

    /// Connect like the shim does, with fresh pipes as the command's streams.
    fn start(name: &[u8], req: &Request) -> Client {
        let addr = SocketAddr::from_abstract_name(name).expect("addr");
        let mut sock = StdStream::connect_addr(&addr).expect("connect");
        let (in_r, in_w) = pipe();
        let (out_r, out_w) = pipe();
        let (err_r, err_w) = pipe();
        send_fds(
            &sock,
            &[in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
        )
        .expect("send fds");
        sock.write_all(&frame(req)).expect("request");
        Client {
            sock,
            stdin: Some(in_w.into()),
            stdout: out_r.into(),
            stderr: err_r.into(),
        }
    }

    fn sh(script: &str) -> Request {
        Request {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![
                ("TERM".into(), "dumb".into()),
                ("SECRET".into(), "x".into()),
            ],
            cwd: "/".into(),
            ..Default::default()
        }
    }

    fn am_root() -> bool {
        // SAFETY: getuid has no memory effects.
        let root = unsafe { libc::getuid() } == 0;
        if !root {
            eprintln!("skipping: running commands as another user needs root");
        }
        root
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_commands_with_the_callers_streams() {
        let _serial = SERIAL.lock().await;
        if !am_root() {
            return;
        }
        let mut fx = fixture("");
        let name = fx.name.clone();
        let (reply, out, err) = tokio::task::spawn_blocking(move || {
            let mut c = start(
                &name,
                &sh("read l; echo \"got $l $SUDO_USER $(id -u) ${SECRET:-none}\"; echo err >&2; exit 3"),
            );
            let mut input = c.stdin.take().expect("stdin");
            input.write_all(b"line\n").expect("write");
            drop(input);
            let reply = read_reply(&mut c.sock).expect("reply");
            let (mut out, mut err) = (String::new(), String::new());
            c.stdout.read_to_string(&mut out).expect("stdout");
            c.stderr.read_to_string(&mut err).expect("stderr");
            (reply, out, err)
        })
        .await
        .expect("client");
        assert_eq!(reply, Reply::Exit(3));
        assert_eq!(out, "got line root 0 none\n", "env_reset dropped SECRET");
        assert_eq!(err, "err\n");
        match fx.events.recv().await {
            Some(AgentEvent::Sudo {
                uid: 0,
                target,
                allowed: true,
                argv,
                ..
            }) => {
                assert_eq!(target, "root");
                assert_eq!(argv[0], "sh");
            }
            other => panic!("expected a sudo audit event, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn signals_errors_and_listing() {
        let _serial = SERIAL.lock().await;
        if !am_root() {
            return;
        }
        let fx = fixture("root ALL=(ALL:ALL) NOPASSWD: ALL\n");
        let name = fx.name.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = start(&name, &sh("kill -TERM $$"));
            assert_eq!(read_reply(&mut c.sock).expect("reply"), Reply::Signaled(15));
            // A forwarded signal reaches the command's group.
            let mut c = start(
                &name,
                &sh("trap 'exit 42' USR1; echo ready; while :; do sleep 0.05; done"),
            );
            let mut buf = [0u8; 6];
            c.stdout.read_exact(&mut buf).expect("ready");
            c.sock
                .write_all(&frame(&ShimMsg::Signal(libc::SIGUSR1)))
                .expect("signal");
            assert_eq!(read_reply(&mut c.sock).expect("reply"), Reply::Exit(42));
            let mut c = start(
                &name,
                &Request {
                    argv: vec!["definitely-not-a-command".into()],
                    ..Default::default()
                },
            );
            assert_eq!(
                read_reply(&mut c.sock).expect("reply"),
                error("sudo: definitely-not-a-command: command not found")
            );
            let mut c = start(
                &name,
                &Request {
                    user: Some("ghost".into()),
                    ..sh("true")
                },
            );
            assert_eq!(
                read_reply(&mut c.sock).expect("reply"),
                error("sudo: unknown user ghost")
            );
            let mut c = start(
                &name,
                &Request {
                    user: Some("#65534".into()),
                    ..sh("id -u")
                },
            );
            assert_eq!(read_reply(&mut c.sock).expect("reply"), Reply::Exit(0));
            let mut out = String::new();
            c.stdout.read_to_string(&mut out).expect("stdout");
            assert_eq!(out, "65534\n");
            // An unusable working directory is a warning; the command runs in /.
            let mut c = start(
                &name,
                &Request {
                    cwd: "/nonexistent-cwd".into(),
                    ..sh("pwd")
                },
            );
            assert_eq!(read_reply(&mut c.sock).expect("reply"), Reply::Exit(0));
            let (mut out, mut err) = (String::new(), String::new());
            c.stdout.read_to_string(&mut out).expect("stdout");
            c.stderr.read_to_string(&mut err).expect("stderr");
            assert_eq!(out, "/\n");
            assert!(
                err.starts_with("sudo: unable to change directory to /nonexistent-cwd"),
                "{err}"
            );
            let mut c = start(
                &name,
                &Request {
                    mode: Mode::List,
                    ..Default::default()
                },
            );
            match read_reply(&mut c.sock).expect("reply") {
                Reply::Output(text) => {
                    assert!(text.contains("root ALL=(ALL:ALL) NOPASSWD: ALL"), "{text}")
                }
                other => panic!("expected a listing, got {other:?}"),
            }
        })
        .await
        .expect("client");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vanished_client_takes_its_command_with_it() {
        let _serial = SERIAL.lock().await;
        if !am_root() {
            return;
        }
        let fx = fixture("");
        let name = fx.name.clone();
        let pid = tokio::task::spawn_blocking(move || {
            let mut c = start(&name, &sh("echo $$; exec sleep 1000"));
            let mut line = String::new();
            let mut byte = [0u8; 1];
            while c.stdout.read(&mut byte).expect("read") == 1 && byte[0] != b'\n' {
                line.push(byte[0] as char);
            }
            drop(c);
            line.parse::<i32>().expect("pid")
        })
        .await
        .expect("client");
        let gone = async {
            // SAFETY: signal 0 only checks whether the process exists.
            while unsafe { libc::kill(pid, 0) } == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), gone)
            .await
            .expect("the command was not killed when its client went away");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_requests_get_an_error() {
        let _serial = SERIAL.lock().await;
        let fx = fixture("");
        let name = fx.name.clone();
        tokio::task::spawn_blocking(move || {
            let addr = SocketAddr::from_abstract_name(&name).expect("addr");
            let mut sock = StdStream::connect_addr(&addr).expect("connect");
            send_fds(&sock, &[0, 1, 2]).expect("fds");
            sock.write_all(&[0, 0, 0, 3, b'{', b'x', b'}'])
                .expect("garbage");
            match read_reply(&mut sock).expect("reply") {
                Reply::Error { message, code: 1 } => {
                    assert!(message.starts_with("sudo: bad request"), "{message}")
                }
                other => panic!("expected an error, got {other:?}"),
            }
            // Too large a frame is refused without reading it.
            let mut sock = StdStream::connect_addr(&addr).expect("connect");
            send_fds(&sock, &[0, 1, 2]).expect("fds");
            sock.write_all(&u32::MAX.to_be_bytes()).expect("len");
            assert!(matches!(
                read_reply(&mut sock),
                Ok(Reply::Error { code: 1, .. })
            ));
            // Descriptors are mandatory.
            let mut sock = StdStream::connect_addr(&addr).expect("connect");
            sock.write_all(&frame(&Request::default())).expect("no fds");
            assert!(matches!(
                read_reply(&mut sock),
                Ok(Reply::Error { code: 1, .. })
            ));
        })
        .await
        .expect("client");
    }
}
