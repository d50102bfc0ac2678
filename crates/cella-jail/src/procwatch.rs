//! Host-side audit of every program executed inside a jail sandbox.
//!
//! The agent reports the processes *it* starts, but sandbox code forks and execs on its own
//! (a shell script, `pip install`, a malicious payload), and the agent's word is a claim of
//! the sandbox anyway. The host sees every process through the kernel's process-events
//! connector (`NETLINK_CONNECTOR`, `CN_IDX_PROC`): fork, exec and exit of every task on the
//! machine, which no sandbox can hide or forge. One listener thread per driver follows the
//! process tree from each sandbox's init (fork events), so an exec is attributed to its
//! sandbox even when the process is already gone by the time we look; unknown PIDs fall back
//! to their cgroup (`/proc/<pid>/cgroup`). The command line is read from `/proc` (bounded),
//! which races with very short-lived processes: those are recorded with an empty `argv`.
//!
//! Busy sandboxes (a compiler runs thousands of processes) must not flood the audit log:
//! each sandbox has a token bucket, and what exceeds it is recorded as one
//! `process.exec.suppressed` count per second.
//!
//! The kernel only delivers these events to a socket with `CAP_NET_ADMIN` in the initial user
//! namespace. Without it the driver runs without this audit and says so.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use cella_core::driver::{EventSink, SANDBOX_ID_BASE, SANDBOX_ID_COUNT, SandboxEvent};
use cella_proto::control::AgentEvent;

/// Longest command line recorded, bytes.
pub const MAX_ARGV_BYTES: usize = 4096;
/// Executions per second a sandbox may log one by one (sustained).
pub const EXEC_RATE: f64 = 50.0;
/// Burst of executions logged one by one.
pub const EXEC_BURST: f64 = 200.0;

const NETLINK_CONNECTOR: libc::c_int = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_FORK: u32 = 0x0000_0001;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
const NLMSG_HDR: usize = 16;
const CN_MSG_HDR: usize = 20;
/// `proc_event`: what (4), cpu (4), timestamp (8), then the event data.
const PROC_EVENT_HDR: usize = 16;

/// A per-sandbox token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(now: Instant) -> Bucket {
        Bucket {
            tokens: EXEC_BURST,
            at: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * EXEC_RATE).min(EXEC_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Watched {
    sink: EventSink,
    bucket: Bucket,
    suppressed: u64,
}

/// Which sandbox every known process belongs to.
#[derive(Default)]
struct State {
    sandboxes: HashMap<String, Watched>,
    /// Host TGID → sandbox ID.
    pids: HashMap<i32, String>,
}

/// What one connector message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    /// `parent_tgid` forked a new process `child` (threads are not reported here).
    Fork {
        /// The parent's TGID.
        parent_tgid: i32,
        /// The child's PID (= TGID).
        child: i32,
    },
    /// Process `tgid` executed a new program.
    Exec {
        /// Its TGID.
        tgid: i32,
    },
    /// Process `tgid` exited (thread exits are not reported here).
    Exit {
        /// Its TGID.
        tgid: i32,
    },
}

/// Parse one datagram from the connector. Unknown or short messages are `None`: the bytes
/// come from the kernel, but a parser that trusts lengths is a bug waiting anyway.
pub fn parse_event(buf: &[u8]) -> Option<ProcEvent> {
    let u32_at = |off: usize| -> Option<u32> {
        buf.get(off..off + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let i32_at = |off: usize| u32_at(off).map(|v| v as i32);
    let cn = NLMSG_HDR;
    if u32_at(cn)? != CN_IDX_PROC || u32_at(cn + 4)? != CN_VAL_PROC {
        return None;
    }
    let ev = cn + CN_MSG_HDR;
    let data = ev + PROC_EVENT_HDR;
    match u32_at(ev)? {
        PROC_EVENT_FORK => {
            // parent_pid, parent_tgid, child_pid, child_tgid
            let parent_tgid = i32_at(data + 4)?;
            let child_pid = i32_at(data + 8)?;
            let child_tgid = i32_at(data + 12)?;
            (child_pid == child_tgid).then_some(ProcEvent::Fork {
                parent_tgid,
                child: child_pid,
            })
        }
        PROC_EVENT_EXEC => Some(ProcEvent::Exec {
            tgid: i32_at(data + 4)?,
        }),
        PROC_EVENT_EXIT => {
            let pid = i32_at(data)?;
            let tgid = i32_at(data + 4)?;
            (pid == tgid).then_some(ProcEvent::Exit { tgid })
        }
        _ => None,
    }
}

/// Split a `/proc/<pid>/cmdline` into arguments, at most [`MAX_ARGV_BYTES`] of it.
pub fn split_cmdline(raw: &[u8]) -> (Vec<String>, bool) {
    let truncated = raw.len() > MAX_ARGV_BYTES;
    let raw = &raw[..raw.len().min(MAX_ARGV_BYTES)];
    let raw = raw.strip_suffix(b"\0").unwrap_or(raw);
    if raw.is_empty() {
        return (Vec::new(), truncated);
    }
    let argv = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (argv, truncated)
}

/// The PID inside the innermost PID namespace and the real uid inside the sandbox, from a
/// `/proc/<pid>/status`.
pub fn parse_status(status: &str) -> (Option<u32>, Option<u32>) {
    let mut ns_pid = None;
    let mut uid = None;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("NSpid:") {
            ns_pid = rest.split_whitespace().last().and_then(|v| v.parse().ok());
        } else if let Some(rest) = line.strip_prefix("Uid:") {
            uid = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u32>().ok())
                .map(|host| {
                    if (SANDBOX_ID_BASE..SANDBOX_ID_BASE + SANDBOX_ID_COUNT).contains(&host) {
                        host - SANDBOX_ID_BASE
                    } else {
                        host
                    }
                });
        }
    }
    (ns_pid, uid)
}

/// The sandbox ID in a `/proc/<pid>/cgroup` whose path contains `/<parent>/<instance>/<id>`.
pub fn sandbox_of_cgroup<'a>(cgroup: &'a str, parent: &str, instance: &str) -> Option<&'a str> {
    let needle = format!("/{parent}/{instance}/");
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        let at = path.find(&needle)? + needle.len();
        path[at..].split('/').next().filter(|id| !id.is_empty())
    })
}

/// The running audit: register sandboxes with [`ProcWatch::watch`].
pub struct ProcWatch {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for ProcWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcWatch").finish_non_exhaustive()
    }
}

impl ProcWatch {
    /// Subscribe to the kernel's process events and start the listener thread. `proc_root` is
    /// `/proc`; `cgroup_parent`/`instance` name this server's sandbox cgroups (the fallback for
    /// processes whose fork was missed).
    pub fn start(
        proc_root: PathBuf,
        cgroup_parent: String,
        instance: String,
    ) -> io::Result<ProcWatch> {
        let sock = subscribe()?;
        let state = Arc::new(Mutex::new(State::default()));
        let weak = Arc::downgrade(&state);
        std::thread::Builder::new()
            .name("cella-procwatch".into())
            .spawn(move || listen(sock, weak, &proc_root, &cgroup_parent, &instance))?;
        Ok(ProcWatch { state })
    }

    /// Audit every process that descends from `init_pid` (host PID) as sandbox `id`.
    pub fn watch(&self, id: &str, init_pid: i32, sink: EventSink) {
        if let Ok(mut s) = self.state.lock() {
            s.sandboxes.insert(
                id.to_string(),
                Watched {
                    sink,
                    bucket: Bucket::new(Instant::now()),
                    suppressed: 0,
                },
            );
            s.pids.insert(init_pid, id.to_string());
        }
    }

    /// Stop auditing sandbox `id` (it was destroyed); its suppressed count is flushed.
    pub fn unwatch(&self, id: &str) {
        if let Ok(mut s) = self.state.lock() {
            if let Some(w) = s.sandboxes.remove(id)
                && w.suppressed > 0
            {
                let _ = w.sink.send(SandboxEvent::from_host(
                    id,
                    AgentEvent::ProcessExecSuppressed {
                        count: w.suppressed,
                    },
                ));
            }
            s.pids.retain(|_, sid| sid != id);
        }
    }
}

fn subscribe() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_CONNECTOR,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // A deep buffer: a burst of forks on the host must not overflow it (ENOBUFS loses events).
    let rcvbuf: libc::c_int = 8 << 20;
    // SAFETY: the option value points at a live c_int of the given size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::addr_of!(rcvbuf).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: as above, with a timeval.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = CN_IDX_PROC;
    // SAFETY: addr is a valid sockaddr_nl of the given length.
    let rc = unsafe {
        libc::bind(
            fd,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // nlmsghdr + cn_msg + the listen op.
    let mut msg = Vec::with_capacity(NLMSG_HDR + CN_MSG_HDR + 4);
    let total = (NLMSG_HDR + CN_MSG_HDR + 4) as u32;
    msg.extend_from_slice(&total.to_ne_bytes());
    msg.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&4u16.to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
    // SAFETY: msg is a live buffer of msg.len() bytes.
    let sent = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn listen(
    sock: OwnedFd,
    state: Weak<Mutex<State>>,
    proc_root: &Path,
    parent: &str,
    instance: &str,
) {
    let mut buf = vec![0u8; 4096];
    let mut last_flush = Instant::now();
    let mut overflows = 0u64;
    loop {
        // SAFETY: buf is a live, writable buffer of buf.len() bytes.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Some(state) = state.upgrade() else {
            return; // the driver is gone
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                Some(libc::ENOBUFS) => {
                    overflows += 1;
                    tracing::warn!(
                        overflows,
                        "process audit: kernel events were lost (ENOBUFS)"
                    );
                }
                _ => {
                    tracing::warn!(error = %e, "process audit stopped");
                    return;
                }
            }
        } else if let Some(ev) = parse_event(&buf[..n as usize]) {
            handle(&state, ev, proc_root, parent, instance);
        }
        if last_flush.elapsed() >= Duration::from_secs(1) {
            last_flush = Instant::now();
            flush_suppressed(&state);
        }
    }
}

fn handle(state: &Mutex<State>, ev: ProcEvent, proc_root: &Path, parent: &str, instance: &str) {
    let Ok(mut s) = state.lock() else { return };
    match ev {
        ProcEvent::Fork { parent_tgid, child } => {
            if let Some(id) = s.pids.get(&parent_tgid).cloned() {
                s.pids.insert(child, id);
            }
        }
        ProcEvent::Exit { tgid } => {
            s.pids.remove(&tgid);
        }
        ProcEvent::Exec { tgid } => {
            let id = match s.pids.get(&tgid) {
                Some(id) => id.clone(),
                None => {
                    if s.sandboxes.is_empty() {
                        return;
                    }
                    // A fork we missed (or raced): ask its cgroup.
                    let cg =
                        std::fs::read_to_string(proc_root.join(tgid.to_string()).join("cgroup"))
                            .unwrap_or_default();
                    match sandbox_of_cgroup(&cg, parent, instance) {
                        Some(id) if s.sandboxes.contains_key(id) => {
                            let id = id.to_string();
                            s.pids.insert(tgid, id.clone());
                            id
                        }
                        _ => return,
                    }
                }
            };
            let Some(w) = s.sandboxes.get_mut(&id) else {
                return;
            };
            if !w.bucket.take(Instant::now()) {
                w.suppressed += 1;
                return;
            }
            let sink = w.sink.clone();
            drop(s);
            let dir = proc_root.join(tgid.to_string());
            let (argv, truncated) = read_bounded(&dir.join("cmdline"))
                .map(|raw| split_cmdline(&raw))
                .unwrap_or_default();
            let (ns_pid, uid) = std::fs::read_to_string(dir.join("status"))
                .map(|st| parse_status(&st))
                .unwrap_or_default();
            let _ = sink.send(SandboxEvent::from_host(
                id,
                AgentEvent::ProcessExec {
                    pid: ns_pid.unwrap_or(0),
                    uid,
                    argv,
                    truncated,
                },
            ));
        }
    }
}

fn flush_suppressed(state: &Mutex<State>) {
    let Ok(mut s) = state.lock() else { return };
    for (id, w) in s.sandboxes.iter_mut() {
        if w.suppressed > 0 {
            let _ = w.sink.send(SandboxEvent::from_host(
                id.as_str(),
                AgentEvent::ProcessExecSuppressed {
                    count: w.suppressed,
                },
            ));
            w.suppressed = 0;
        }
    }
}

/// Read at most [`MAX_ARGV_BYTES`] + 1 bytes (one more tells that it was cut).
fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(256);
    std::fs::File::open(path)?
        .take(MAX_ARGV_BYTES as u64 + 1)
        .read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(what: u32, data: &[i32]) -> Vec<u8> {
        let mut m = vec![0u8; NLMSG_HDR];
        m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        m.extend_from_slice(&[0u8; CN_MSG_HDR - 8]);
        m.extend_from_slice(&what.to_ne_bytes());
        m.extend_from_slice(&[0u8; PROC_EVENT_HDR - 4]);
        for d in data {
            m.extend_from_slice(&d.to_ne_bytes());
        }
        m
    }

    #[test]
    fn connector_messages_parse_and_threads_are_ignored() {
        assert_eq!(
            parse_event(&message(PROC_EVENT_FORK, &[10, 10, 11, 11])),
            Some(ProcEvent::Fork {
                parent_tgid: 10,
                child: 11
            })
        );
        // A new thread (child pid != tgid) is not a process.
        assert_eq!(
            parse_event(&message(PROC_EVENT_FORK, &[10, 10, 12, 11])),
            None
        );
        assert_eq!(
            parse_event(&message(PROC_EVENT_EXEC, &[11, 11])),
            Some(ProcEvent::Exec { tgid: 11 })
        );
        assert_eq!(
            parse_event(&message(PROC_EVENT_EXIT, &[11, 11, 0, 0])),
            Some(ProcEvent::Exit { tgid: 11 })
        );
        assert_eq!(
            parse_event(&message(PROC_EVENT_EXIT, &[12, 11, 0, 0])),
            None
        );
    }

    #[test]
    fn short_or_foreign_messages_are_dropped() {
        let full = message(PROC_EVENT_FORK, &[10, 10, 11, 11]);
        for n in 0..full.len() {
            assert_eq!(parse_event(&full[..n]), None, "truncated at {n}");
        }
        let mut foreign = full.clone();
        foreign[NLMSG_HDR] = 9;
        assert_eq!(parse_event(&foreign), None);
        assert_eq!(parse_event(&message(0x40, &[1, 1])), None);
    }

    #[test]
    fn cmdlines_split_and_are_bounded() {
        assert_eq!(
            split_cmdline(b"python3\0-c\0print(1)\0"),
            (
                vec!["python3".into(), "-c".into(), "print(1)".into()],
                false
            )
        );
        assert_eq!(split_cmdline(b""), (vec![], false));
        assert_eq!(split_cmdline(b"a\xff\0"), (vec!["a\u{fffd}".into()], false));
        let long = vec![b'x'; MAX_ARGV_BYTES + 1];
        let (argv, cut) = split_cmdline(&long);
        assert!(cut);
        assert_eq!(argv[0].len(), MAX_ARGV_BYTES);
    }

    #[test]
    fn status_gives_the_inner_pid_and_the_sandbox_uid() {
        let st = "Name:\tsh\nUid:\t101000\t101000\t101000\t101000\nNSpid:\t4242\t7\n";
        assert_eq!(parse_status(st), (Some(7), Some(1000)));
        // A uid outside the sandbox range is reported as is.
        assert_eq!(
            parse_status("Uid:\t0\t0\t0\t0\nNSpid:\t9\n"),
            (Some(9), Some(0))
        );
        assert_eq!(parse_status("garbage"), (None, None));
    }

    #[test]
    fn cgroup_paths_name_the_sandbox_of_this_instance_only() {
        let v1 = "12:pids:/cella/inst1/abc\n3:memory:/cella/inst1/abc\n";
        assert_eq!(sandbox_of_cgroup(v1, "cella", "inst1"), Some("abc"));
        assert_eq!(sandbox_of_cgroup(v1, "cella", "other"), None);
        let v2 = "0::/system.slice/x/cella/inst1/def\n";
        assert_eq!(sandbox_of_cgroup(v2, "cella", "inst1"), Some("def"));
        assert_eq!(
            sandbox_of_cgroup("0::/user.slice\n", "cella", "inst1"),
            None
        );
        assert_eq!(
            sandbox_of_cgroup("0::/cella/inst1/\n", "cella", "inst1"),
            None
        );
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(t0);
        let burst = (0..1000).filter(|_| b.take(t0)).count();
        assert_eq!(burst, EXEC_BURST as usize);
        let later = t0 + Duration::from_secs(1);
        let refilled = (0..1000).filter(|_| b.take(later)).count();
        assert_eq!(refilled, EXEC_RATE as usize);
    }

    #[test]
    fn events_follow_the_process_tree_and_are_rate_limited() {
        let proc_root = tempfile::tempdir().expect("tempdir");
        let state = Mutex::new(State::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        {
            let mut s = state.lock().expect("lock");
            s.sandboxes.insert(
                "sb".into(),
                Watched {
                    sink: tx,
                    bucket: Bucket::new(Instant::now()),
                    suppressed: 0,
                },
            );
            s.pids.insert(100, "sb".into());
        }
        let dir = proc_root.path().join("101");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("cmdline"), b"/bin/ls\0-l\0").expect("write");
        std::fs::write(
            dir.join("status"),
            "Uid:\t101000\t0\t0\t0\nNSpid:\t101\t5\n",
        )
        .expect("write");
        let h = |ev| handle(&state, ev, proc_root.path(), "cella", "i");
        h(ProcEvent::Fork {
            parent_tgid: 100,
            child: 101,
        });
        h(ProcEvent::Exec { tgid: 101 });
        // A process of no sandbox is ignored.
        h(ProcEvent::Fork {
            parent_tgid: 1,
            child: 300,
        });
        h(ProcEvent::Exec { tgid: 300 });
        let ev = rx.try_recv().expect("an exec event");
        assert_eq!(ev.sandbox_id, "sb");
        assert_eq!(ev.origin, cella_core::driver::EventOrigin::Host);
        assert_eq!(
            ev.event,
            AgentEvent::ProcessExec {
                pid: 5,
                uid: Some(1000),
                argv: vec!["/bin/ls".into(), "-l".into()],
                truncated: false
            }
        );
        assert!(rx.try_recv().is_err(), "only one event");
        // An exec by a process that is gone is still attributed, with nothing read.
        h(ProcEvent::Fork {
            parent_tgid: 101,
            child: 102,
        });
        h(ProcEvent::Exec { tgid: 102 });
        let ev = rx.try_recv().expect("an exec event");
        assert!(
            matches!(ev.event, AgentEvent::ProcessExec { pid: 0, ref argv, .. } if argv.is_empty())
        );
        // Past the burst, executions are counted, then flushed as one record.
        for _ in 0..(EXEC_BURST as usize + 10) {
            h(ProcEvent::Exec { tgid: 102 });
        }
        let logged = std::iter::from_fn(|| rx.try_recv().ok()).count();
        assert!(logged < EXEC_BURST as usize + 10, "logged {logged}");
        flush_suppressed(&state);
        let ev = rx.try_recv().expect("a suppressed count");
        assert!(matches!(ev.event, AgentEvent::ProcessExecSuppressed { count } if count >= 10));
        // Exit forgets the pid.
        h(ProcEvent::Exit { tgid: 102 });
        assert!(!state.lock().expect("lock").pids.contains_key(&102));
    }
}
