//! Connection-level audit: the first packet of every new outbound flow of a sandbox is logged
//! by its nftables verdict rule (`log prefix "sb<slot> <verdict>" group <g>`) to an NFLOG
//! group of this server instance; this module reads that group from a netfilter netlink
//! socket and records `net.connection` audit entries (verdict, protocol, destination, port).
//!
//! The kernel's messages are parsed with explicit bounds checks on every length. The reader
//! never blocks the data path: when it falls behind the socket drops messages (ENOBUFS) and
//! those connections go unaudited, which is counted and logged, not hidden.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::collections::HashMap;

use cella_core::store::{NewAudit, Store};

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLMSG_HDRLEN: usize = 16;
const NFGEN_HDRLEN: usize = 4;

/// One logged packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// Sandbox slot from the prefix.
    pub slot: u32,
    /// Verdict word from the prefix (`allow`, `deny`, `blocked`, ...).
    pub verdict: String,
    /// IP protocol name or number.
    pub proto: String,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Destination port (TCP/UDP), 0 otherwise.
    pub dport: u16,
}

/// The NFLOG group of an instance (never 0).
pub fn group_of(instance: &str) -> u16 {
    let mut h: u32 = 2166136261;
    for b in instance.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(16777619);
    }
    ((h % 0xfff0) + 1) as u16
}

/// Parse one netlink datagram into the packets it logs.
pub fn parse_datagram(buf: &[u8]) -> Vec<Logged> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        if ty == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
            && let Some(l) = parse_packet(&buf[off + NLMSG_HDRLEN..off + len])
        {
            out.push(l);
        }
        off += align4(len);
    }
    out
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn parse_packet(msg: &[u8]) -> Option<Logged> {
    let mut off = NFGEN_HDRLEN;
    let (mut prefix, mut payload) = (None, None);
    while off + 4 <= msg.len() {
        let len = usize::from(u16::from_ne_bytes([msg[off], msg[off + 1]]));
        let ty = u16::from_ne_bytes([msg[off + 2], msg[off + 3]]) & 0x3fff;
        if len < 4 || off + len > msg.len() {
            break;
        }
        let data = &msg[off + 4..off + len];
        match ty {
            NFULA_PREFIX => prefix = Some(data),
            NFULA_PAYLOAD => payload = Some(data),
            _ => {}
        }
        off += align4(len);
    }
    let prefix = prefix?;
    let prefix = std::str::from_utf8(prefix.split(|b| *b == 0).next()?).ok()?;
    let (slot, verdict) = prefix.trim().split_once(' ')?;
    let slot: u32 = slot.strip_prefix("sb")?.parse().ok()?;
    let ip = payload?;
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let proto_num = ip[9];
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let dport = match proto_num {
        6 | 17 if ip.len() >= ihl + 4 => u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]),
        _ => 0,
    };
    let proto = match proto_num {
        1 => "icmp".to_string(),
        6 => "tcp".to_string(),
        17 => "udp".to_string(),
        n => n.to_string(),
    };
    Some(Logged {
        slot,
        verdict: verdict.to_string(),
        proto,
        dst,
        dport,
    })
}

/// Build a config request (`NFULNL_MSG_CONFIG`) for `group` with one attribute.
fn config_msg(group: u16, seq: u32, attr_type: u16, attr: &[u8]) -> Vec<u8> {
    let attr_len = 4 + attr.len();
    let total = NLMSG_HDRLEN + NFGEN_HDRLEN + align4(attr_len);
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(libc::AF_UNSPEC as u8);
    m.push(0); // NFNETLINK_V0
    m.extend_from_slice(&group.to_be_bytes());
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&attr_type.to_ne_bytes());
    m.extend_from_slice(attr);
    m.resize(total, 0);
    m
}

/// A running reader; dropping it stops the thread within a second.
pub struct Reader {
    stop: Arc<AtomicBool>,
    /// Messages the kernel dropped because the reader lagged (ENOBUFS events).
    pub overruns: Arc<AtomicU64>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Slot → sandbox ID, shared with the host network.
pub type Slots = Arc<Mutex<HashMap<u32, String>>>;

/// Bind `group` and audit what it logs until the returned reader is dropped.
pub fn start(group: u16, slots: Slots, store: Store) -> io::Result<Reader> {
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads a timeval of the given size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    send(
        &sock,
        &config_msg(group, 1, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]),
    )?;
    expect_ack(&sock)?;
    // copy_range (BE u32) + copy_mode + pad: the IP header and the ports are enough.
    let mut mode = 64u32.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    send(&sock, &config_msg(group, 2, NFULA_CFG_MODE, &mode))?;
    expect_ack(&sock)?;
    let stop = Arc::new(AtomicBool::new(false));
    let overruns = Arc::new(AtomicU64::new(0));
    let (stop2, over2) = (stop.clone(), overruns.clone());
    std::thread::Builder::new()
        .name("cella-nflog".into())
        .spawn(move || read_loop(sock, stop2, over2, slots, store))?;
    Ok(Reader { stop, overruns })
}

fn send(sock: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: a zeroed sockaddr_nl is valid (pid 0 = the kernel).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: sendto reads `msg` and `addr` within their sizes.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv writes at most buf.len() bytes into buf.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Read the kernel's answer to a request: an NLMSG_ERROR with 0 is success.
fn expect_ack(sock: &OwnedFd) -> io::Result<()> {
    let mut buf = [0u8; 512];
    let n = recv(sock, &mut buf)?;
    if n < NLMSG_HDRLEN + 4 {
        return Err(io::Error::other("short netlink answer"));
    }
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    if ty == libc::NLMSG_ERROR as u16 {
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if code != 0 {
            return Err(io::Error::from_raw_os_error(-code));
        }
    }
    Ok(())
}

fn read_loop(
    sock: OwnedFd,
    stop: Arc<AtomicBool>,
    overruns: Arc<AtomicU64>,
    slots: Slots,
    store: Store,
) {
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        let n = match recv(&sock, &mut buf) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                let total = overruns.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    total,
                    "connection audit fell behind; some connections were not audited"
                );
                continue;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "connection audit socket failed");
                return;
            }
        };
        for l in parse_datagram(&buf[..n]) {
            let id = slots.lock().ok().and_then(|m| m.get(&l.slot).cloned());
            store.audit(NewAudit {
                actor: "server".into(),
                sandbox_id: id,
                kind: "net.connection".into(),
                detail: serde_json::json!({
                    "verdict": l.verdict, "proto": l.proto,
                    "dst": l.dst.to_string(), "dport": l.dport,
                }),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(ty: u16, data: &[u8]) -> Vec<u8> {
        let mut v = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(data);
        v.resize(align4(v.len()), 0);
        v
    }

    fn packet(prefix: &str, ip: &[u8]) -> Vec<u8> {
        let mut body = vec![2, 0, 0, 5];
        let mut p = prefix.as_bytes().to_vec();
        p.push(0);
        body.extend(nla(NFULA_PREFIX, &p));
        body.extend(nla(NFULA_PAYLOAD, ip));
        let total = NLMSG_HDRLEN + body.len();
        let mut m = (total as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend(body);
        m
    }

    fn tcp_syn(dst: [u8; 4], port: u16) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 245, 0, 2];
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(&[0x9c, 0x40]);
        ip.extend_from_slice(&port.to_be_bytes());
        ip.extend_from_slice(&[0; 16]);
        ip
    }

    #[test]
    fn logged_packets_parse_and_junk_does_not() {
        let mut dgram = packet("sb3 allow", &tcp_syn([198, 51, 100, 10], 80));
        dgram.extend(packet("sb12 blocked", &tcp_syn([169, 254, 169, 254], 80)));
        let got = parse_datagram(&dgram);
        assert_eq!(
            got,
            vec![
                Logged {
                    slot: 3,
                    verdict: "allow".into(),
                    proto: "tcp".into(),
                    dst: Ipv4Addr::new(198, 51, 100, 10),
                    dport: 80
                },
                Logged {
                    slot: 12,
                    verdict: "blocked".into(),
                    proto: "tcp".into(),
                    dst: Ipv4Addr::new(169, 254, 169, 254),
                    dport: 80
                },
            ]
        );
        // Truncations at every length never panic and never invent packets.
        for cut in 0..dgram.len() {
            assert!(parse_datagram(&dgram[..cut]).len() <= 2);
        }
        assert!(parse_datagram(&packet("other", &tcp_syn([1, 1, 1, 1], 1))).is_empty());
        assert!(
            parse_datagram(&packet("sb1 allow", &[0x60; 40])).is_empty(),
            "not IPv4"
        );
        assert_ne!(group_of("i0123456789ab"), 0);
    }

    #[test]
    fn config_messages_are_well_formed() {
        let m = config_msg(7, 1, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
        assert_eq!(m.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(&m[18..20], &7u16.to_be_bytes());
    }
}
