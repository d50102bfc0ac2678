//! The `process.Process` service: starting commands, streaming their output, input, signals.
//!
//! Each started process gets a [`Proc`] in the [`ProcessTable`] and a supervisor task that
//! pumps its stdout/stderr (or PTY) into every subscribed stream and, once the reaper reports
//! the exit, drains what is left in the pipes and sends the `end` event. Subscribers are bounded
//! channels fed with back-pressure, like envd: a stream that stops reading eventually stalls the
//! command's output rather than making the agent buffer without limit; a client that goes away
//! drops its channel and stops counting.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use cella_proto::control::{AgentEvent, START_CMD_TAG, StartCommand};
use cella_proto::envd::connect::{Code, ConnectError};
use cella_proto::envd::process::{
    CloseStdinRequest, ConnectRequest, DataEvent, Empty, EndEvent, ListRequest, ListResponse,
    ProcessConfig, ProcessEvent, ProcessInfo, ProcessSelector, SendInputRequest, SendSignalRequest,
    Signal, StartRequest, StreamInputRequest, StreamResponse, UpdateRequest, exit_status_text,
};
use futures::StreamExt;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use crate::reaper::ExitStatus;
use crate::rpc::{self, err};
use crate::spawn::{self, Credentials, SpawnSpec, StdioMode};
use crate::state::{AgentRef, resolve_path};
use crate::users::User;

/// Output read size (envd uses 32 KiB for pipes).
const CHUNK: usize = 32 * 1024;
/// Events buffered per subscriber before output back-pressures.
const SUBSCRIBER_BUFFER: usize = 64;
/// Most bytes read from a stream after the process exited (background children may keep
/// writing to an inherited pipe forever).
const MAX_DRAIN: usize = 4 * 1024 * 1024;
/// PATH when the agent itself has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Most processes tracked at once.
const MAX_PROCESSES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutKind {
    Stdout,
    Stderr,
    Pty,
}

#[derive(Debug, Default)]
struct Subscribers {
    ended: bool,
    list: Vec<mpsc::Sender<ProcessEvent>>,
}

/// One process started through the agent.
#[derive(Debug)]
pub struct Proc {
    /// PID.
    pub pid: u32,
    /// How it was started.
    pub config: ProcessConfig,
    /// Tag.
    pub tag: Option<String>,
    stdin: tokio::sync::Mutex<Option<AsyncFd<OwnedFd>>>,
    pty: Option<Arc<AsyncFd<OwnedFd>>>,
    subs: Mutex<Subscribers>,
}

impl Proc {
    fn lock_subs(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attach a new subscriber; `None` if the process already ended.
    fn subscribe(&self) -> Option<mpsc::Receiver<ProcessEvent>> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let _ = tx.try_send(ProcessEvent::started(self.pid));
        let mut s = self.lock_subs();
        if s.ended {
            return None;
        }
        s.list.push(tx);
        Some(rx)
    }

    async fn broadcast(&self, event: ProcessEvent) {
        let list = self.lock_subs().list.clone();
        for tx in list {
            let _ = tx.send(event.clone()).await;
        }
        self.lock_subs().list.retain(|t| !t.is_closed());
    }

    async fn finish(&self, end: EndEvent) {
        let list = {
            let mut s = self.lock_subs();
            s.ended = true;
            std::mem::take(&mut s.list)
        };
        let event = ProcessEvent {
            end: Some(end),
            ..Default::default()
        };
        for tx in list {
            let _ = tx.send(event.clone()).await;
        }
    }
}

/// All processes started through the agent that have not ended yet.
#[derive(Debug, Default)]
pub struct ProcessTable {
    inner: Mutex<HashMap<u32, Arc<Proc>>>,
}

impl ProcessTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Proc>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, proc: Arc<Proc>) {
        self.lock().insert(proc.pid, proc);
    }

    fn remove(&self, pid: u32) {
        self.lock().remove(&pid);
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn find(&self, sel: Option<&ProcessSelector>) -> Result<Arc<Proc>, ConnectError> {
        let sel = sel.ok_or_else(|| err(Code::InvalidArgument, "process selector is required"))?;
        let table = self.lock();
        if let Some(pid) = sel.pid {
            return table
                .get(&pid)
                .cloned()
                .ok_or_else(|| err(Code::NotFound, format!("process with pid {pid} not found")));
        }
        if let Some(tag) = sel.tag.as_deref() {
            return table
                .values()
                .find(|p| p.tag.as_deref() == Some(tag))
                .cloned()
                .ok_or_else(|| err(Code::NotFound, format!("process with tag {tag} not found")));
        }
        Err(err(
            Code::InvalidArgument,
            "process selector needs a pid or a tag",
        ))
    }

    fn list(&self) -> Vec<ProcessInfo> {
        let mut v: Vec<ProcessInfo> = self
            .lock()
            .values()
            .map(|p| ProcessInfo {
                config: Some(p.config.clone()),
                pid: p.pid,
                tag: p.tag.clone(),
            })
            .collect();
        v.sort_by_key(|p| p.pid);
        v
    }
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: reading into a buffer we own from an fd kept open by the caller.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn write_fd(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: writing from a buffer we own to an fd kept open by the caller.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

async fn write_all(fd: &AsyncFd<OwnedFd>, data: &[u8]) -> std::io::Result<()> {
    let mut off = 0;
    while off < data.len() {
        let mut guard = fd.writable().await?;
        match guard.try_io(|inner| write_fd(inner.as_raw_fd(), &data[off..])) {
            Ok(Ok(n)) => off += n,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

fn data_event(kind: OutKind, bytes: &[u8]) -> ProcessEvent {
    let mut d = DataEvent::default();
    match kind {
        OutKind::Stdout => d.stdout = Some(bytes.to_vec()),
        OutKind::Stderr => d.stderr = Some(bytes.to_vec()),
        OutKind::Pty => d.pty = Some(bytes.to_vec()),
    }
    ProcessEvent {
        data: Some(d),
        ..Default::default()
    }
}

async fn pump_output(
    proc: Arc<Proc>,
    kind: OutKind,
    fd: Arc<AsyncFd<OwnedFd>>,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        tokio::select! {
            biased;
            ready = fd.readable() => {
                let Ok(mut guard) = ready else { return };
                match guard.try_io(|inner| read_fd(inner.as_raw_fd(), &mut buf)) {
                    Ok(Ok(0)) => return,
                    Ok(Ok(n)) => proc.broadcast(data_event(kind, &buf[..n])).await,
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // EIO on a PTY master once the terminal's last user is gone.
                    Ok(Err(_)) => return,
                    Err(_would_block) => {}
                }
            }
            changed = exited.changed() => {
                if changed.is_err() || *exited.borrow() {
                    break;
                }
            }
        }
    }
    // The process is gone: forward what is already buffered, without waiting for more.
    let mut drained = 0;
    while drained < MAX_DRAIN {
        match read_fd(fd.get_ref().as_raw_fd(), &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                drained += n;
                proc.broadcast(data_event(kind, &buf[..n])).await;
            }
        }
    }
}

async fn supervise(
    agent: AgentRef,
    proc: Arc<Proc>,
    outputs: Vec<(OutKind, Arc<AsyncFd<OwnedFd>>)>,
    exit_rx: tokio::sync::oneshot::Receiver<ExitStatus>,
    timeout: Option<Duration>,
) {
    let (exit_tx, exit_watch) = watch::channel(false);
    let pumps: Vec<_> = outputs
        .into_iter()
        .map(|(kind, fd)| tokio::spawn(pump_output(proc.clone(), kind, fd, exit_watch.clone())))
        .collect();
    let pid = proc.pid as i32;
    let status = match timeout {
        Some(t) => {
            tokio::pin!(exit_rx);
            tokio::select! {
                s = &mut exit_rx => s,
                _ = tokio::time::sleep(t) => {
                    tracing::info!(pid, "command timed out, killing it");
                    let _ = spawn::signal_group(pid, libc::SIGKILL);
                    exit_rx.await
                }
            }
        }
        None => exit_rx.await,
    };
    let status = status.unwrap_or(ExitStatus {
        code: None,
        signal: None,
    });
    let _ = exit_tx.send(true);
    for p in pumps {
        let _ = p.await;
    }
    let text = exit_status_text(status.code, status.signal);
    let end = EndEvent {
        exit_code: status.exit_code(),
        exited: status.code.is_some(),
        status: text.clone(),
        error: (status.code != Some(0)).then_some(text),
    };
    agent.processes.remove(proc.pid);
    proc.finish(end).await;
    proc.stdin.lock().await.take();
    agent.events.emit(AgentEvent::ProcessExit {
        pid: proc.pid,
        exit_code: status.audit_code(),
    });
}

fn build_env(agent: &AgentRef, user: &User, extra: &BTreeMap<String, String>) -> Vec<String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let path = std::env::var("PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PATH.to_string());
    env.insert("PATH".into(), path);
    env.insert("HOME".into(), user.home.clone());
    env.insert("USER".into(), user.name.clone());
    env.insert("LOGNAME".into(), user.name.clone());
    let shell = if user.shell.is_empty() {
        "/bin/sh".to_string()
    } else {
        user.shell.clone()
    };
    env.insert("SHELL".into(), shell);
    for (k, v) in agent.env_vars().iter().chain(extra.iter()) {
        if !k.is_empty() && !k.contains('=') {
            env.insert(k.clone(), v.clone());
        }
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn stream_of(
    rx: mpsc::Receiver<ProcessEvent>,
) -> impl futures::Stream<Item = Result<StreamResponse, ConnectError>> + Send {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|ev| (Ok(StreamResponse { event: Some(ev) }), rx))
    })
}

fn keepalive(headers: &HeaderMap) -> Option<(Duration, StreamResponse)> {
    rpc::keepalive_interval(headers).map(|d| {
        (
            d,
            StreamResponse {
                event: Some(ProcessEvent::keepalive()),
            },
        )
    })
}

async fn start_inner(
    agent: &AgentRef,
    user: User,
    req: StartRequest,
    timeout: Option<Duration>,
) -> Result<mpsc::Receiver<ProcessEvent>, ConnectError> {
    let config = req
        .process
        .clone()
        .ok_or_else(|| err(Code::InvalidArgument, "process config is required"))?;
    if agent.processes.len() >= MAX_PROCESSES {
        return Err(err(Code::ResourceExhausted, "too many processes"));
    }
    let default_workdir = agent.settings.default_workdir.as_str();
    let cwd = resolve_path(
        config.cwd.as_deref().unwrap_or_default(),
        &user.home,
        Some(default_workdir),
    )
    .map_err(|e| err(Code::InvalidArgument, e.to_string()))?;
    if !cwd.is_dir() {
        return Err(err(
            Code::InvalidArgument,
            format!("cwd '{}' does not exist", cwd.display()),
        ));
    }
    let env = build_env(agent, &user, &config.envs);
    let path_var = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let program = spawn::find_executable(&config.cmd, path_var).ok_or_else(|| {
        err(
            Code::InvalidArgument,
            format!(
                "error starting process '{}': executable not found",
                config.cmd
            ),
        )
    })?;
    let mut argv = vec![config.cmd.clone()];
    argv.extend(config.args.iter().cloned());
    let stdio = match req.pty.as_ref() {
        Some(pty) => {
            let size = pty.size.unwrap_or_default();
            StdioMode::Pty {
                cols: u16::try_from(size.cols).unwrap_or(u16::MAX).max(1),
                rows: u16::try_from(size.rows).unwrap_or(u16::MAX).max(1),
            }
        }
        None => StdioMode::Pipes {
            stdin: req.stdin.unwrap_or(true),
        },
    };
    let spec = SpawnSpec {
        program,
        argv,
        env,
        cwd: cwd.display().to_string(),
        creds: agent.is_root.then(|| Credentials {
            uid: user.uid,
            gid: user.gid,
            groups: user.groups.clone(),
        }),
        stdio,
    };
    let spawned = tokio::task::spawn_blocking(move || spawn::spawn(&spec))
        .await
        .map_err(|e| err(Code::Internal, format!("spawn task: {e}")))?
        .map_err(|e| {
            let mut msg = format!("error starting process '{}': {e}", config.cmd);
            if let Some(src) = std::error::Error::source(&e) {
                msg.push_str(&format!(": {src}"));
            }
            err(Code::InvalidArgument, msg)
        })?;
    let pid = spawned.pid;
    let exit_rx = agent.reaper.register(pid);

    let register = |fd: OwnedFd| {
        // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor stays open and
        // unchanged for the AsyncFd's whole lifetime.
        unsafe { AsyncFd::register(fd) }
            .map_err(|e| err(Code::Internal, format!("register stream: {e}")))
    };
    let mut outputs = Vec::new();
    let mut pty = None;
    let mut stdin = None;
    let setup = (|| {
        if let Some(fd) = spawned.stdout {
            outputs.push((OutKind::Stdout, Arc::new(register(fd)?)));
        }
        if let Some(fd) = spawned.stderr {
            outputs.push((OutKind::Stderr, Arc::new(register(fd)?)));
        }
        if let Some(fd) = spawned.pty {
            let m = Arc::new(register(fd)?);
            outputs.push((OutKind::Pty, m.clone()));
            pty = Some(m);
        }
        if let Some(fd) = spawned.stdin {
            stdin = Some(register(fd)?);
        }
        Ok::<(), ConnectError>(())
    })();
    if let Err(e) = setup {
        let _ = spawn::signal_group(pid, libc::SIGKILL);
        return Err(e);
    }

    let proc = Arc::new(Proc {
        pid: pid as u32,
        config: config.clone(),
        tag: req.tag.clone(),
        stdin: tokio::sync::Mutex::new(stdin),
        pty,
        subs: Mutex::new(Subscribers::default()),
    });
    let rx = proc
        .subscribe()
        .ok_or_else(|| err(Code::Internal, "process ended before it started"))?;
    agent.processes.insert(proc.clone());
    agent.events.emit(AgentEvent::ProcessStart {
        pid: pid as u32,
        cmd: config.cmd.clone(),
        args: config.args.clone(),
        cwd: cwd.display().to_string(),
        user: user.name.clone(),
        tag: req.tag.clone(),
    });
    tokio::spawn(supervise(agent.clone(), proc, outputs, exit_rx, timeout));
    Ok(rx)
}

/// Start the template's start command (a long-running server) as a tracked process tagged
/// [`START_CMD_TAG`], without a timeout. Its output goes to whoever `Connect`s to it, and is
/// otherwise dropped.
pub async fn start_boot_command(
    agent: &AgentRef,
    start: &StartCommand,
) -> Result<u32, ConnectError> {
    let user = agent
        .resolve_user((!start.user.is_empty()).then_some(start.user.as_str()))
        .map_err(|e| err(Code::InvalidArgument, format!("start command user: {e}")))?;
    let req = StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), start.cmd.clone()],
            envs: BTreeMap::new(),
            cwd: (!start.cwd.is_empty()).then(|| start.cwd.clone()),
        }),
        pty: None,
        tag: Some(START_CMD_TAG.to_string()),
        stdin: Some(false),
    };
    let mut rx = start_inner(agent, user, req, None).await?;
    // The first event is `start`, carrying the PID; later ones are dropped with the receiver.
    let pid = match rx.recv().await {
        Some(ProcessEvent {
            start: Some(started),
            ..
        }) => started.pid,
        _ => 0,
    };
    Ok(pid)
}

/// `Start` (server stream).
pub async fn start(State(agent): State<AgentRef>, headers: HeaderMap, body: Body) -> Response {
    let req: StartRequest = match rpc::stream_request(&headers, body).await {
        Ok(r) => r,
        Err(e) => return rpc::stream_error(e),
    };
    let started = match agent.request_user(&headers) {
        Ok(user) => start_inner(&agent, user, req, rpc::connect_timeout(&headers)).await,
        Err(e) => Err(e),
    };
    match started {
        Ok(rx) => rpc::stream_response(stream_of(rx), keepalive(&headers)),
        Err(e) => rpc::stream_error(e),
    }
}

/// `Connect` (server stream).
pub async fn connect(State(agent): State<AgentRef>, headers: HeaderMap, body: Body) -> Response {
    let req: ConnectRequest = match rpc::stream_request(&headers, body).await {
        Ok(r) => r,
        Err(e) => return rpc::stream_error(e),
    };
    let sub = agent.processes.find(req.process.as_ref()).and_then(|p| {
        p.subscribe()
            .ok_or_else(|| err(Code::NotFound, format!("process {} has ended", p.pid)))
    });
    match sub {
        Ok(rx) => rpc::stream_response(stream_of(rx), keepalive(&headers)),
        Err(e) => rpc::stream_error(e),
    }
}

/// `List`.
pub async fn list(State(agent): State<AgentRef>, headers: HeaderMap, body: Body) -> Response {
    let r: Result<ListRequest, _> = rpc::unary_request(&headers, body).await;
    rpc::unary_response(r.map(|_| ListResponse {
        processes: agent.processes.list(),
    }))
}

async fn send_input(
    proc: &Proc,
    stdin: Option<&[u8]>,
    pty: Option<&[u8]>,
) -> Result<(), ConnectError> {
    if let Some(data) = pty {
        let m = proc.pty.as_ref().ok_or_else(|| {
            err(
                Code::FailedPrecondition,
                "tty not assigned to process — input should be written to the stdin",
            )
        })?;
        write_all(m, data)
            .await
            .map_err(|e| err(Code::Internal, format!("error writing to tty: {e}")))?;
    }
    if let Some(data) = stdin {
        if proc.pty.is_some() {
            return Err(err(
                Code::FailedPrecondition,
                "tty assigned to process — input should be written to the pty",
            ));
        }
        let guard = proc.stdin.lock().await;
        let fd = guard
            .as_ref()
            .ok_or_else(|| err(Code::FailedPrecondition, "stdin not enabled or closed"))?;
        write_all(fd, data)
            .await
            .map_err(|e| err(Code::Internal, format!("error writing to stdin: {e}")))?;
    }
    Ok(())
}

/// `SendInput`.
pub async fn send_input_rpc(
    State(agent): State<AgentRef>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let req: SendInputRequest = rpc::unary_request(&headers, body).await?;
        let proc = agent.processes.find(req.process.as_ref())?;
        let input = req.input.unwrap_or_default();
        send_input(&proc, input.stdin.as_deref(), input.pty.as_deref()).await?;
        Ok(Empty {})
    }
    .await;
    rpc::unary_response(result)
}

/// `StreamInput` (client stream).
pub async fn stream_input(
    State(agent): State<AgentRef>,
    _headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let mut messages = Box::pin(rpc::envelope_stream(body));
        let mut proc: Option<Arc<Proc>> = None;
        while let Some(msg) = messages.next().await {
            let msg = msg?;
            let req: StreamInputRequest = serde_json::from_slice(&msg)
                .map_err(|e| err(Code::InvalidArgument, format!("cannot decode request: {e}")))?;
            if let Some(start) = req.start {
                proc = Some(agent.processes.find(start.process.as_ref())?);
            }
            if let Some(data) = req.data {
                let p = proc.as_ref().ok_or_else(|| {
                    err(Code::InvalidArgument, "first message must be a start event")
                })?;
                let input = data.input.unwrap_or_default();
                send_input(p, input.stdin.as_deref(), input.pty.as_deref()).await?;
            }
        }
        Ok(Empty {})
    }
    .await;
    rpc::stream_single(result)
}

/// `SendSignal`.
pub async fn send_signal(
    State(agent): State<AgentRef>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let req: SendSignalRequest = rpc::unary_request(&headers, body).await?;
        let proc = agent.processes.find(req.process.as_ref())?;
        let sig = match req.signal {
            Signal::Sigkill => libc::SIGKILL,
            Signal::Sigterm => libc::SIGTERM,
            Signal::Unspecified => {
                return Err(err(Code::InvalidArgument, "unsupported signal"));
            }
        };
        spawn::signal_group(proc.pid as i32, sig)
            .map_err(|e| err(Code::Internal, format!("error sending signal: {e}")))?;
        Ok(Empty {})
    }
    .await;
    rpc::unary_response(result)
}

/// `CloseStdin`.
pub async fn close_stdin(
    State(agent): State<AgentRef>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let req: CloseStdinRequest = rpc::unary_request(&headers, body).await?;
        let proc = agent.processes.find(req.process.as_ref())?;
        if proc.pty.is_some() {
            return Err(err(
                Code::FailedPrecondition,
                "cannot close stdin for PTY process — send Ctrl+D (0x04) instead",
            ));
        }
        proc.stdin.lock().await.take();
        Ok(Empty {})
    }
    .await;
    rpc::unary_response(result)
}

/// `Update` (PTY resize).
pub async fn update(State(agent): State<AgentRef>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let req: UpdateRequest = rpc::unary_request(&headers, body).await?;
        let proc = agent.processes.find(req.process.as_ref())?;
        if let Some(size) = req.pty.and_then(|p| p.size) {
            let m = proc
                .pty
                .as_ref()
                .ok_or_else(|| err(Code::FailedPrecondition, "tty not assigned to process"))?;
            let cols = u16::try_from(size.cols).unwrap_or(u16::MAX);
            let rows = u16::try_from(size.rows).unwrap_or(u16::MAX);
            spawn::resize_pty(m.get_ref().as_raw_fd(), cols, rows)
                .map_err(|e| err(Code::Internal, format!("error resizing tty: {e}")))?;
        }
        Ok(Empty {})
    }
    .await;
    rpc::unary_response(result)
}
