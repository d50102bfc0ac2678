//! The `sudo` shim: the agent binary started under the name `sudo`.
//!
//! It understands the options agents and scripts use, hands the request and its own three
//! standard descriptors to the broker, forwards the signals it receives while the command
//! runs, and ends like the command did (its exit code, or the same signal, so `$?` is 128+N).
//! Plain blocking system calls: it is a short-lived client, no runtime needed.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};

use super::{FORWARDED_SIGNALS, MAX_SMALL_FRAME, Mode, Preserve, Reply, Request, ShimMsg, frame};

const USAGE: &str = "usage: sudo -h | -K | -k | -V\n\
usage: sudo -v [-knS] [-u user]\n\
usage: sudo -l [-knS] [-u user]\n\
usage: sudo [-EHknS] [--preserve-env=list] [-u user] [VAR=value] [-i | -s] [command [arg ...]]";

/// What a command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `-V`.
    Version,
    /// `-h`.
    Help,
    /// `-k`/`-K`/`-v` without a command: nothing to do (no credentials are cached).
    Noop,
    /// Ask the broker.
    Send(Request),
}

fn unsupported(opt: &str) -> String {
    format!("sudo: unsupported option {opt} (cella's jail sudo)")
}

fn is_assignment(arg: &str) -> Option<(String, String)> {
    let (k, v) = arg.split_once('=')?;
    let mut chars = k.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    ok.then(|| (k.to_string(), v.to_string()))
}

/// Parse sudo's command line (without `argv[0]`). `Err` is the message to print (exit 1).
pub fn parse_args(args: &[String]) -> Result<Action, String> {
    let mut req = Request::default();
    let (mut version, mut help, mut list, mut noop_flag, mut validate) =
        (false, false, false, false, false);
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        if arg == "--" {
            i += 1;
            break;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            match name {
                "user" => {
                    let v = match inline {
                        Some(v) => v,
                        None => {
                            i += 1;
                            args.get(i).cloned().ok_or_else(|| {
                                "sudo: option '--user' requires an argument".to_string()
                            })?
                        }
                    };
                    req.user = Some(v);
                }
                "preserve-env" => {
                    req.preserve = match inline {
                        Some(v) => {
                            let mut names = match std::mem::take(&mut req.preserve) {
                                Preserve::Vars(n) => n,
                                _ => Vec::new(),
                            };
                            names
                                .extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_string));
                            Preserve::Vars(names)
                        }
                        None => Preserve::All,
                    }
                }
                "set-home" => req.set_home = true,
                "non-interactive" | "stdin" => {}
                "login" => req.login = true,
                "shell" => req.shell = true,
                "list" => list = true,
                "version" => version = true,
                "validate" => validate = true,
                "reset-timestamp" | "remove-timestamp" => noop_flag = true,
                "help" => help = true,
                _ => return Err(unsupported(arg)),
            }
            i += 1;
            continue;
        }
        let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.is_empty()) else {
            break;
        };
        for (pos, c) in cluster.char_indices() {
            match c {
                'u' => {
                    let rest = &cluster[pos + 1..];
                    let v = if rest.is_empty() {
                        i += 1;
                        args.get(i)
                            .cloned()
                            .ok_or_else(|| "sudo: option requires an argument -- 'u'".to_string())?
                    } else {
                        rest.to_string()
                    };
                    req.user = Some(v);
                    break;
                }
                'E' => req.preserve = Preserve::All,
                'H' => req.set_home = true,
                'n' | 'S' => {}
                'i' => req.login = true,
                's' => req.shell = true,
                'l' => list = true,
                'V' => version = true,
                'v' => validate = true,
                'k' | 'K' => noop_flag = true,
                'h' => help = true,
                other => return Err(unsupported(&format!("-{other}"))),
            }
        }
        i += 1;
    }
    while let Some(kv) = args.get(i).and_then(|a| is_assignment(a)) {
        req.assignments.push(kv);
        i += 1;
    }
    req.argv = args[i.min(args.len())..].to_vec();
    if version {
        return Ok(Action::Version);
    }
    if help {
        return Ok(Action::Help);
    }
    if req.login && req.shell {
        return Err("sudo: you may not specify both the -i and -s options".into());
    }
    if list {
        req.mode = Mode::List;
        return Ok(Action::Send(req));
    }
    if validate || (noop_flag && req.argv.is_empty() && !req.login && !req.shell) {
        return Ok(Action::Noop);
    }
    if req.argv.is_empty() && !req.login && !req.shell {
        return Err(USAGE.to_string());
    }
    Ok(Action::Send(req))
}

/// Run the shim; returns the process exit code (or does not return when re-raising a signal).
pub fn main(args: Vec<String>) -> i32 {
    let action = match parse_args(args.get(1..).unwrap_or_default()) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return 1;
        }
    };
    let mut req = match action {
        Action::Version => {
            println!(
                "Sudo version {} (cella's jail sudo broker)",
                env!("CARGO_PKG_VERSION")
            );
            return 0;
        }
        Action::Help => {
            println!("{USAGE}");
            return 0;
        }
        Action::Noop => return 0,
        Action::Send(r) => r,
    };
    req.env = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    req.cwd = std::env::current_dir()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/".into());
    match run(&req) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("{msg}");
            1
        }
    }
}

fn unreachable_msg(e: impl std::fmt::Display) -> String {
    format!("sudo: cella's sudo broker is not reachable: {e}")
}

fn connect() -> std::io::Result<UnixStream> {
    let addr = SocketAddr::from_abstract_name(super::SOCKET_NAME)?;
    UnixStream::connect_addr(&addr)
}

/// Our fd `n`, or `/dev/null` when it is closed (a descriptor must go for each of 0, 1, 2).
fn stdio_fd(n: RawFd) -> std::io::Result<Option<OwnedFd>> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(n, libc::F_GETFD) } >= 0 {
        return Ok(None);
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    Ok(Some(OwnedFd::from(f)))
}

/// Send one byte carrying our stdin, stdout and stderr.
fn send_stdio(sock: &UnixStream) -> std::io::Result<()> {
    let subs = [stdio_fd(0)?, stdio_fd(1)?, stdio_fd(2)?];
    let fds: Vec<RawFd> = subs
        .iter()
        .enumerate()
        .map(|(n, s)| s.as_ref().map_or(n as RawFd, |f| f.as_raw_fd()))
        .collect();
    send_fds(sock, &fds)
}

/// Send one byte carrying these descriptors (`SCM_RIGHTS`).
pub(super) fn send_fds(sock: &UnixStream, fds: &[RawFd]) -> std::io::Result<()> {
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut byte = [b'F'];
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
    // SAFETY: the control buffer is CMSG_SPACE(payload) bytes, so the first header and its
    // data fit; we write exactly `payload` bytes of descriptors into it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), payload);
    }
    loop {
        // SAFETY: msg points to live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n == 1 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if n < 0 && e.kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return Err(e);
    }
}

pub(super) fn read_reply(sock: &mut UnixStream) -> std::io::Result<Reply> {
    let mut len = [0u8; 4];
    sock.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_SMALL_FRAME {
        return Err(std::io::Error::other("reply too large"));
    }
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(std::io::Error::other)
}

/// Block the forwarded signals and receive them on a signalfd instead.
fn signal_fd() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset manipulation on a local; sigprocmask and signalfd have no memory effects
    // beyond the set we pass.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in FORWARDED_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn next_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data; read fills at most its size.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reading into a local of exactly `size` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), std::ptr::addr_of_mut!(info).cast(), size) };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

/// End the way the command did: its signal, with the default action.
fn reraise(sig: i32) -> i32 {
    // SAFETY: restoring a default disposition, clearing the mask and raising have no memory
    // effects; if the signal does not terminate us we fall through to 128+N.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::raise(sig);
    }
    128 + sig
}

fn run(req: &Request) -> Result<i32, String> {
    let sigfd = signal_fd().map_err(|e| format!("sudo: cannot set up signal forwarding: {e}"))?;
    let mut sock = connect().map_err(unreachable_msg)?;
    send_stdio(&sock).map_err(unreachable_msg)?;
    sock.write_all(&frame(req)).map_err(unreachable_msg)?;
    let lost = |e: std::io::Error| format!("sudo: lost the connection to cella's sudo broker: {e}");
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sigfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polling two pollfds in a local array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(lost(e));
        }
        if fds[1].revents & libc::POLLIN != 0
            && let Some(sig) = next_signal(&sigfd)
        {
            // A failed write shows up as EOF on the next read.
            let _ = sock.write_all(&frame(&ShimMsg::Signal(sig)));
        }
        if fds[0].revents != 0 {
            return match read_reply(&mut sock).map_err(lost)? {
                Reply::Exit(code) => Ok(code),
                Reply::Signaled(sig) => Ok(reraise(sig)),
                Reply::Output(text) => {
                    print!("{text}");
                    Ok(0)
                }
                Reply::Error { message, code } => {
                    eprintln!("{message}");
                    Ok(code)
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Action, String> {
        parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn req(v: &[&str]) -> Request {
        match parse(v) {
            Ok(Action::Send(r)) => r,
            other => panic!("{v:?}: expected a request, got {other:?}"),
        }
    }

    #[test]
    fn commands_and_options() {
        let r = req(&["id", "-u"]);
        assert_eq!(
            r.argv,
            ["id", "-u"],
            "options after the command are the command's"
        );
        assert_eq!((r.user.as_deref(), r.mode), (None, Mode::Run));
        let r = req(&["-u", "nobody", "id", "-un"]);
        assert_eq!(r.user.as_deref(), Some("nobody"));
        assert_eq!(r.argv, ["id", "-un"]);
        assert_eq!(req(&["-unobody", "true"]).user.as_deref(), Some("nobody"));
        assert_eq!(req(&["--user=bob", "true"]).user.as_deref(), Some("bob"));
        assert_eq!(
            req(&["--user", "#1000", "true"]).user.as_deref(),
            Some("#1000")
        );
        let r = req(&["-nEHu", "bob", "--", "-weird"]);
        assert_eq!(
            (r.preserve.clone(), r.set_home, r.user.as_deref()),
            (Preserve::All, true, Some("bob"))
        );
        assert_eq!(r.argv, ["-weird"]);
        let r = req(&["--preserve-env=A,B", "--preserve-env=C", "env"]);
        assert_eq!(
            r.preserve,
            Preserve::Vars(vec!["A".into(), "B".into(), "C".into()])
        );
        assert_eq!(req(&["--preserve-env", "env"]).preserve, Preserve::All);
        let r = req(&["-S", "FOO=1", "_B2=x=y", "env", "C=3"]);
        assert_eq!(
            r.assignments,
            vec![("FOO".into(), "1".into()), ("_B2".into(), "x=y".into())]
        );
        assert_eq!(r.argv, ["env", "C=3"]);
        assert_eq!(
            req(&["1X=2"]).argv,
            ["1X=2"],
            "not a valid name: the command"
        );
        let r = req(&["-i"]);
        assert!(r.login && r.argv.is_empty());
        let r = req(&["-s", "echo", "hi"]);
        assert!(r.shell);
        assert_eq!(r.argv, ["echo", "hi"]);
        assert_eq!(req(&["-l"]).mode, Mode::List);
        assert!(
            req(&["-k", "true"]).argv == ["true"],
            "-k with a command runs it"
        );
    }

    #[test]
    fn informational_and_invalid() {
        assert_eq!(parse(&["-V"]), Ok(Action::Version));
        assert_eq!(parse(&["--version"]), Ok(Action::Version));
        assert_eq!(parse(&["-h"]), Ok(Action::Help));
        for noop in [&["-k"][..], &["-K"], &["-v"], &["-nv"], &["--validate"]] {
            assert_eq!(parse(noop), Ok(Action::Noop), "{noop:?}");
        }
        assert_eq!(
            parse(&["-X", "true"]),
            Err("sudo: unsupported option -X (cella's jail sudo)".into())
        );
        assert_eq!(
            parse(&["-g", "root", "true"]),
            Err("sudo: unsupported option -g (cella's jail sudo)".into())
        );
        assert_eq!(
            parse(&["--chroot=/x", "true"]),
            Err("sudo: unsupported option --chroot=/x (cella's jail sudo)".into())
        );
        assert!(parse(&["-u"]).is_err());
        assert!(parse(&["--user"]).is_err());
        assert!(parse(&[]).expect_err("usage").starts_with("usage: sudo"));
        assert!(
            parse(&["-E"])
                .expect_err("usage")
                .starts_with("usage: sudo")
        );
        assert!(parse(&["-i", "-s"]).is_err());
    }
}
