//! The kernel's process-events connector, for auditing every program a sandbox runs.
//!
//! Why this and not the agent's own records: sandbox code forks and execs on its own (a shell
//! script, `pip install`, a payload), and only the kernel sees all of it. The connector
//! (`NETLINK_CONNECTOR`, `CN_IDX_PROC`) multicasts fork, exec and exit of every task to any
//! socket with `CAP_NET_ADMIN` in the initial user namespace: the host has that for jail
//! sandboxes (`cella-jail`), and the agent has it inside a microVM guest, whose kernel is the
//! sandbox's own (`cella-agent`). Both use this crate; what belongs to which sandbox is theirs
//! to decide.
//!
//! Messages come from the kernel, but the parser still never trusts a length. The command
//! line is read from `/proc` after the event, which races with the process: one that already
//! ended reads as empty, one that exec'd again reads as its newer program. A token bucket
//! ([`RateLimit`]) keeps a busy sandbox from flooding the audit log.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

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

/// What one connector message says (the kinds the audit needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    /// `parent_tgid` forked a new process `child` (new threads are not reported).
    Fork {
        /// The parent's TGID.
        parent_tgid: i32,
        /// The child's PID (= its TGID).
        child: i32,
    },
    /// Process `tgid` executed a new program.
    Exec {
        /// Its TGID.
        tgid: i32,
    },
    /// Process `tgid` exited (thread exits are not reported).
    Exit {
        /// Its TGID.
        tgid: i32,
    },
}

/// Parse one datagram from the connector; unknown or short messages are `None`.
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

/// Split a `/proc/<pid>/cmdline` into arguments, at most [`MAX_ARGV_BYTES`] of it; the flag
/// says whether it was cut.
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

/// The PID in the innermost PID namespace and the real uid (as the reader's user namespace
/// sees it), from a `/proc/<pid>/status`.
pub fn parse_status(status: &str) -> (Option<u32>, Option<u32>) {
    let mut ns_pid = None;
    let mut uid = None;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("NSpid:") {
            ns_pid = rest.split_whitespace().last().and_then(|v| v.parse().ok());
        } else if let Some(rest) = line.strip_prefix("Uid:") {
            uid = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        }
    }
    (ns_pid, uid)
}

/// The PID of a process in a *nested* PID namespace (the last `NSpid` entry when there are
/// several): `None` for a process of the reader's own namespace, e.g. the host itself.
pub fn nested_pid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    let ids: Vec<&str> = line.split_whitespace().collect();
    if ids.len() < 2 {
        return None;
    }
    ids.last()?.parse().ok()
}

/// What `/proc` says about a process that just exec'd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecInfo {
    /// PID in its innermost PID namespace.
    pub ns_pid: Option<u32>,
    /// Real uid as the reader sees it.
    pub uid: Option<u32>,
    /// Command line (empty when the process was already gone).
    pub argv: Vec<String>,
    /// Whether `argv` was cut at [`MAX_ARGV_BYTES`].
    pub truncated: bool,
}

/// Read `<proc_root>/<pid>/{cmdline,status}`; whatever is gone stays empty.
pub fn read_exec_info(proc_root: &Path, pid: i32) -> ExecInfo {
    use std::io::Read;
    let dir = proc_root.join(pid.to_string());
    let mut raw = Vec::with_capacity(256);
    let (argv, truncated) = std::fs::File::open(dir.join("cmdline"))
        .and_then(|f| f.take(MAX_ARGV_BYTES as u64 + 1).read_to_end(&mut raw))
        .map(|_| split_cmdline(&raw))
        .unwrap_or_default();
    let (ns_pid, uid) = std::fs::read_to_string(dir.join("status"))
        .map(|st| parse_status(&st))
        .unwrap_or_default();
    ExecInfo {
        ns_pid,
        uid,
        argv,
        truncated,
    }
}

/// A token bucket: [`EXEC_BURST`] at once, [`EXEC_RATE`] per second after that.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    /// A full bucket at `now`.
    pub fn new(now: Instant) -> RateLimit {
        RateLimit {
            tokens: EXEC_BURST,
            at: now,
        }
    }

    /// Whether one more event may be logged at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
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

/// What [`Subscription::recv`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// An event.
    Event(ProcEvent),
    /// A message of a kind the audit does not use.
    Other,
    /// Nothing within the timeout.
    Timeout,
    /// The socket's buffer overflowed: events were lost.
    Overflow,
}

/// A socket subscribed to the process-events multicast group.
#[derive(Debug)]
pub struct Subscription {
    sock: OwnedFd,
    buf: Vec<u8>,
}

impl Subscription {
    /// Subscribe; `recv` waits at most `timeout`. Fails without `CAP_NET_ADMIN` in the initial
    /// user namespace (e.g. inside a jail).
    pub fn open(timeout: Duration) -> io::Result<Subscription> {
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
        // A deep buffer: a burst of forks must not overflow it. (Best effort: FORCE needs
        // CAP_NET_ADMIN, which the subscription needs anyway.)
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
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
        };
        // SAFETY: as above, with a timeval.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
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
        let msg = listen_message();
        // SAFETY: msg is a live buffer of msg.len() bytes.
        let sent = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Subscription {
            sock,
            buf: vec![0u8; 4096],
        })
    }

    /// Wait for the next message (at most the timeout given to [`Subscription::open`]).
    pub fn recv(&mut self) -> io::Result<Received> {
        // SAFETY: buf is a live, writable buffer of buf.len() bytes.
        let n = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(Received::Timeout),
                Some(libc::ENOBUFS) => Ok(Received::Overflow),
                _ => Err(e),
            };
        }
        let n = usize::try_from(n).unwrap_or(0).min(self.buf.len());
        Ok(match parse_event(&self.buf[..n]) {
            Some(ev) => Received::Event(ev),
            None => Received::Other,
        })
    }
}

/// `nlmsghdr` + `cn_msg` + the "listen" op.
fn listen_message() -> Vec<u8> {
    let total = (NLMSG_HDR + CN_MSG_HDR + 4) as u32;
    let mut msg = Vec::with_capacity(total as usize);
    msg.extend_from_slice(&total.to_ne_bytes());
    msg.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
    msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
    msg.extend_from_slice(&4u16.to_ne_bytes()); // len
    msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
    msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
    msg
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
    fn the_listen_message_is_what_the_kernel_expects() {
        let m = listen_message();
        assert_eq!(m.len(), 40);
        assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]), 40);
        assert_eq!(&m[36..40], &PROC_CN_MCAST_LISTEN.to_ne_bytes());
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
    fn status_gives_the_inner_pid_and_the_uid() {
        let st = "Name:\tsh\nUid:\t101000\t101000\t101000\t101000\nNSpid:\t4242\t7\n";
        assert_eq!(parse_status(st), (Some(7), Some(101000)));
        assert_eq!(parse_status("garbage"), (None, None));
    }

    #[test]
    fn only_nested_pids_count_as_a_sandbox_pid() {
        assert_eq!(nested_pid("NSpid:\t4242\t7\n"), Some(7));
        assert_eq!(nested_pid("NSpid:\t4242\n"), None);
        assert_eq!(nested_pid("Name:\tx\n"), None);
    }

    #[test]
    fn exec_info_reads_what_is_there_and_leaves_the_rest_empty() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("5");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("cmdline"), b"ls\0-l\0").expect("write");
        std::fs::write(dir.join("status"), "Uid:\t1000\t0\t0\t0\nNSpid:\t5\n").expect("write");
        assert_eq!(
            read_exec_info(root.path(), 5),
            ExecInfo {
                ns_pid: Some(5),
                uid: Some(1000),
                argv: vec!["ls".into(), "-l".into()],
                truncated: false
            }
        );
        assert_eq!(read_exec_info(root.path(), 6), ExecInfo::default());
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = RateLimit::new(t0);
        let burst = (0..1000).filter(|_| b.take(t0)).count();
        assert_eq!(burst, EXEC_BURST as usize);
        let later = t0 + Duration::from_secs(1);
        let refilled = (0..1000).filter(|_| b.take(later)).count();
        assert_eq!(refilled, EXEC_RATE as usize);
    }
}
