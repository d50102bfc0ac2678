//! The host end of a VM's network: a private network namespace holding one tap device.
//!
//! Why a namespace per VM: the guest gets a fixed address (169.254.0.21, like E2B's
//! orchestrator), and the server must reach each guest without the guests reaching each
//! other or the host's networks. Each VM's tap lives alone in its own netns, so identical
//! addresses never collide and nothing routes between sandboxes. The server dials into the
//! namespace (a socket stays in the netns it was created in), exactly like the jail driver.
//!
//! Both the namespace and the tap are created on a short-lived dedicated thread: that thread
//! calls `unshare(CLONE_NEWNET)` and simply ends, so no pool thread ever sits in a sandbox's
//! namespace. The tap is not persistent: it disappears when QEMU and the driver close its
//! descriptor, and the namespace disappears with its last reference.

use std::ffi::c_char;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::qemu::{GUEST_IP, HOST_IP, LINK_PREFIX};

/// `TUNSETIFF` (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Name of the tap inside each namespace.
pub const TAP_NAME: &str = "tap0";
/// MAC of every tap (the host end). Fixed, because a clone's guest wakes up with the golden
/// VM's neighbour cache: a random MAC per tap would leave it sending to the golden tap's.
pub const TAP_MAC: [u8; 6] = [0x02, 0xce, 0x11, 0xa0, 0x00, 0x16];

/// Idle seconds before the first keepalive probe on a connection into a guest.
const KEEPALIVE_IDLE_S: libc::c_int = 5;
/// Seconds between keepalive probes.
const KEEPALIVE_INTERVAL_S: libc::c_int = 2;
/// Unanswered probes before the connection fails (~11 s after a VM is gone).
const KEEPALIVE_PROBES: libc::c_int = 3;

/// A VM's network namespace and its tap device.
#[derive(Debug)]
pub struct GuestNet {
    /// `/proc/thread-self/ns/net` of the namespace.
    pub netns: OwnedFd,
    /// The tap's queue descriptor, handed to QEMU.
    pub tap: OwnedFd,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is a plain C struct/union for which all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as c_char;
    }
    req
}

fn sockaddr_v4(a: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and sockaddr is plain
    // data; this is how the SIOCSIF* ioctls expect an IPv4 address.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn set_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq_for(name);
    // SAFETY: SIOCGIFFLAGS reads into `req`, a valid ifreq naming an interface.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the flags member of the union was just written by the kernel.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `req`, a valid ifreq.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(())
}

fn prefix_mask(prefix: u8) -> [u8; 4] {
    let bits: u32 = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    bits.to_be_bytes()
}

/// Runs on the dedicated thread, inside the new namespace.
fn setup_in_new_netns() -> io::Result<GuestNet> {
    // SAFETY: unshare affects only this (dedicated, short-lived) thread's namespaces.
    check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
    let netns = OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net")?);

    // SAFETY: open(2) with a constant NUL-terminated path.
    let tun = check(unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    })?;
    // SAFETY: `tun` was just opened and is owned by nobody else.
    let tap = unsafe { OwnedFd::from_raw_fd(tun) };
    let mut req = ifreq_for(TAP_NAME);
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads a valid ifreq naming the device and its flags.
    check(unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETIFF, &req) })?;

    // SAFETY: socket(2) with constant arguments.
    let s =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `s` was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    set_up(&sock, "lo")?;
    let mut req = ifreq_for(TAP_NAME);
    // SAFETY: writing the hwaddr member of the union; all-zero sockaddr is valid.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(TAP_MAC) {
            *dst = src as c_char;
        }
    }
    // SAFETY: SIOCSIFHWADDR reads a valid ifreq carrying an Ethernet address.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFHWADDR, &req) })?;
    let mut req = ifreq_for(TAP_NAME);
    req.ifr_ifru.ifru_addr = sockaddr_v4(HOST_IP);
    // SAFETY: SIOCSIFADDR reads a valid ifreq carrying an AF_INET address.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &req) })?;
    let mut req = ifreq_for(TAP_NAME);
    req.ifr_ifru.ifru_netmask = sockaddr_v4(prefix_mask(LINK_PREFIX));
    // SAFETY: SIOCSIFNETMASK reads a valid ifreq carrying an AF_INET mask.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &req) })?;
    set_up(&sock, TAP_NAME)?;
    Ok(GuestNet { netns, tap })
}

/// Create a network namespace with `lo` up and [`TAP_NAME`] addressed as the host end of the
/// guest link. Blocking (spawns and joins a thread).
pub fn create_guest_net() -> io::Result<GuestNet> {
    std::thread::Builder::new()
        .name("cella-vm-netns".into())
        .spawn(setup_in_new_netns)?
        .join()
        .map_err(|_| io::Error::other("netns setup thread panicked"))?
}

fn socket_in(netns: &OwnedFd) -> io::Result<std::net::TcpStream> {
    // SAFETY: setns on a namespace descriptor we hold; affects only this dedicated thread,
    // which ends right after.
    check(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) })?;
    // SAFETY: socket(2) with constant arguments.
    let fd = check(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: fd was just created and is owned by nobody else.
    let stream = std::net::TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    set_keepalive(&stream)?;
    Ok(stream)
}

/// Keepalive probes on every connection into a guest, so a connection to a VM that is gone
/// fails within seconds instead of hanging: a dead guest sends no FIN or RST (its tap is
/// gone), unlike a jail, whose kernel closes the sockets of killed processes.
fn set_keepalive(stream: &std::net::TcpStream) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_S),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES),
    ] {
        let v: libc::c_int = value;
        // SAFETY: setsockopt reads exactly size_of::<c_int>() bytes from `v`, which lives
        // for the duration of the call; `fd` is a socket we own.
        check(unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    Ok(())
}

/// Connect to `port` on the guest through the VM's namespace.
pub async fn dial(netns: std::sync::Arc<OwnedFd>, port: u16) -> io::Result<tokio::net::TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("cella-vm-dial".into())
        .spawn(move || {
            let _ = tx.send(socket_in(&netns));
        })?;
    let std_stream = rx
        .await
        .map_err(|_| io::Error::other("dial thread ended without a socket"))??;
    let socket = tokio::net::TcpSocket::from_std_stream(std_stream);
    let [a, b, c, d] = GUEST_IP;
    socket
        .connect(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(a, b, c, d),
            port,
        )))
        .await
}

/// nftables table a VM's namespace gets when it is given outbound network.
const EGRESS_TABLE: &str = "cella_vm";

/// The namespace-side rules of a VM with outbound network: the guest's new connections (from
/// its own address only) may leave by `eth0`, masqueraded to the sandbox's address, and only
/// their replies come back. The host's per-sandbox rules then see this sandbox's address,
/// exactly as for a jail.
pub fn egress_rules() -> String {
    let [a, b, c, d] = GUEST_IP;
    format!(
        "table ip {EGRESS_TABLE} {{\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy drop;\n\
         \t\tct state invalid drop\n\
         \t\tct state established,related accept\n\
         \t\tiifname \"{TAP_NAME}\" oifname \"eth0\" ip saddr {a}.{b}.{c}.{d} ct state new accept\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"eth0\" masquerade\n\
         \t}}\n\
         }}\n"
    )
}

fn egress_in(netns: &OwnedFd) -> io::Result<()> {
    use std::io::Write;
    // SAFETY: setns on a namespace descriptor we hold; affects only this dedicated thread,
    // which ends right after (its child inherits the namespace).
    check(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) })?;
    // /proc/sys/net is the namespace of the thread that opens it.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("running nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(egress_rules().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "nft failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Let the VM's namespace forward the guest's traffic out of the `eth0` the host side of
/// egress adds: IPv4 forwarding on and [`egress_rules`], in that namespace only. Blocking
/// (spawns and joins a thread).
pub fn enable_egress(netns: &std::sync::Arc<OwnedFd>) -> io::Result<()> {
    let netns = netns.clone();
    std::thread::Builder::new()
        .name("cella-vm-egress".into())
        .spawn(move || egress_in(&netns))?
        .join()
        .map_err(|_| io::Error::other("egress setup thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(prefix_mask(30), [255, 255, 255, 252]);
        assert_eq!(prefix_mask(24), [255, 255, 255, 0]);
        assert_eq!(prefix_mask(0), [0, 0, 0, 0]);
        assert_eq!(prefix_mask(32), [255, 255, 255, 255]);
    }

    #[test]
    fn ifreq_names_are_truncated_and_terminated() {
        let r = ifreq_for("a-very-long-interface-name");
        assert_eq!(r.ifr_name[libc::IFNAMSIZ - 1], 0);
        assert_eq!(r.ifr_name[0], b'a' as c_char);
    }

    #[test]
    fn keepalive_is_set_on_guest_sockets() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("conn");
        set_keepalive(&s).expect("keepalive");
        let get = |level, name| {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `v`.
            let r = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    level,
                    name,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(r, 0);
            v
        };
        assert_eq!(get(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), KEEPALIVE_IDLE_S);
        assert_eq!(
            get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
            KEEPALIVE_INTERVAL_S
        );
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT), KEEPALIVE_PROBES);
    }

    #[test]
    fn egress_rules_forward_only_the_guests_new_connections() {
        let r = egress_rules();
        assert!(r.contains("policy drop;"), "{r}");
        assert!(
            r.contains(
                "iifname \"tap0\" oifname \"eth0\" ip saddr 169.254.0.21 ct state new accept"
            ),
            "{r}"
        );
        assert!(r.contains("oifname \"eth0\" masquerade"), "{r}");
        // Nothing from eth0 is accepted unless it belongs to a connection the guest opened.
        assert!(!r.contains("iifname \"eth0\""), "{r}");
    }

    #[test]
    fn tap_in_own_namespace() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipping: needs root and /dev/net/tun");
            return;
        }
        let net = create_guest_net().expect("netns + tap");
        let host = std::fs::read_link("/proc/self/ns/net").expect("readlink");
        let ours = std::fs::read_link(format!("/proc/self/fd/{}", net.netns.as_raw_fd()))
            .expect("readlink");
        assert_ne!(host, ours, "the tap must live in its own namespace");
    }
}
