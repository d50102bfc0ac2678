//! `POST /egress?gateway=A&nameserver=B`: give a microVM guest its way out.
//!
//! Why the agent: a microVM's network is configured inside the guest, and the host cannot
//! write into a running guest's filesystem. When the server attaches outbound network to a
//! VM, its driver calls this host-only route: the guest gets a default route via the host end
//! of its link (the VM's namespace forwards and masquerades from there) and an
//! `/etc/resolv.conf` naming cella's per-sandbox DNS forwarder. Nothing here is a security
//! boundary (code in the guest is root and could do the same); the policy is enforced on the
//! host, after the namespace's NAT. Like `/fsfreeze`, the proxy refuses the route from outside,
//! it needs the access token, and only a sandboxed agent serves it.
//!
//! `POST /trust` (body: a PEM certificate) makes the sandbox trust cella's egress CA, which
//! signs the certificates of the hosts whose requests `network.rules` rewrites. The agent does
//! it from inside, for both drivers, so no host process ever resolves a path in the
//! sandbox's filesystem: the CA gets its own file under `/usr/local/share/ca-certificates`
//! (kept by `update-ca-certificates`) and is appended to the system bundle that OpenSSL,
//! curl, git and Debian's Python use.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::files::HttpError;
use crate::state::AgentRef;

/// Query of `/egress`.
#[derive(Debug, Deserialize)]
pub struct EgressQuery {
    gateway: Ipv4Addr,
    nameserver: Ipv4Addr,
}

/// Contents written to `/etc/resolv.conf`.
pub fn resolv_conf(nameserver: Ipv4Addr) -> String {
    format!(
        "# Written by cella: the host-side resolver of this sandbox.\nnameserver {nameserver}\n"
    )
}

/// Replace `<root>/etc/resolv.conf` by a new regular file (a symlink there is replaced, never
/// followed).
pub fn write_resolv_conf(root: &Path, content: &str) -> std::io::Result<()> {
    replace_file(&root.join("etc"), "resolv.conf", content.as_bytes())
}

/// Replace `dir/name` (created with its parents if missing) by a new regular file, mode
/// 0644: written to a temporary name in the same directory, then renamed over it, so a
/// symlink there is replaced, never followed.
fn replace_file(dir: &Path, name: &str, content: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.cella"));
    let _ = std::fs::remove_file(&tmp);
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(content)?;
    }
    std::fs::rename(&tmp, dir.join(name))
}

/// The egress CA's own file, under the sandbox's root.
pub const CA_DIR: &str = "usr/local/share/ca-certificates";
/// Its name there.
pub const CA_NAME: &str = "cella-egress-ca.crt";
/// The system bundle the CA is appended to.
pub const BUNDLE_DIR: &str = "etc/ssl/certs";
/// Its name.
pub const BUNDLE_NAME: &str = "ca-certificates.crt";
/// Largest `/trust` body.
const MAX_CA_PEM: usize = 16 * 1024;
/// Largest bundle read back (Debian's is ~220 KiB).
const MAX_BUNDLE: u64 = 16 * 1024 * 1024;

/// Trust `pem` (one PEM certificate) under `root`: its own file, and appended to the system
/// bundle unless it is in there already (the bundle is created when missing). Idempotent.
pub fn install_ca(root: &Path, pem: &str) -> std::io::Result<()> {
    use std::io::Read;
    let pem = format!("{}\n", pem.trim_end());
    replace_file(&root.join(CA_DIR), CA_NAME, pem.as_bytes())?;
    let dir = root.join(BUNDLE_DIR);
    let mut bundle = Vec::new();
    match std::fs::File::open(dir.join(BUNDLE_NAME)) {
        Ok(f) => {
            f.take(MAX_BUNDLE + 1).read_to_end(&mut bundle)?;
            if bundle.len() as u64 > MAX_BUNDLE {
                return Err(std::io::Error::other("the system CA bundle is too large"));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let body = pem.trim_end().as_bytes();
    if bundle.windows(body.len()).any(|w| w == body) {
        return Ok(());
    }
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(pem.as_bytes());
    replace_file(&dir, BUNDLE_NAME, &bundle)
}

/// `POST /trust`: trust the PEM certificate in the body (the egress CA); 204.
pub async fn trust(State(agent): State<AgentRef>, body: axum::body::Bytes) -> Response {
    let Some(root) = agent.settings.system_root.clone() else {
        return HttpError::new(StatusCode::NOT_FOUND, "network configuration is off")
            .into_response();
    };
    let pem = match std::str::from_utf8(&body) {
        Ok(p)
            if p.len() <= MAX_CA_PEM
                && p.trim_start().starts_with("-----BEGIN CERTIFICATE-----")
                && p.trim_end().ends_with("-----END CERTIFICATE-----") =>
        {
            p.to_string()
        }
        _ => {
            return HttpError::new(
                StatusCode::BAD_REQUEST,
                "the body must be one PEM certificate, at most 16 KiB",
            )
            .into_response();
        }
    };
    match tokio::task::spawn_blocking(move || install_ca(&root, &pem)).await {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("installing the egress CA: {e}"),
        )
        .into_response(),
        Err(e) => HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("trust task: {e}"),
        )
        .into_response(),
    }
}

fn sockaddr_v4(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and are plain data; the
    // routing ioctls take IPv4 addresses in this form.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn default_route(gateway: Ipv4Addr) -> libc::rtentry {
    // SAFETY: rtentry is a plain C struct for which all-zero (null rt_dev) is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_v4(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    rt
}

/// Whether `/proc/net/route` (`route_table`) has the default route via `gateway` already.
pub fn has_default_route(route_table: &str, gateway: Ipv4Addr) -> bool {
    let want = format!("{:08X}", u32::from_ne_bytes(gateway.octets()));
    route_table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        matches!(f.as_slice(), [_, dst, gw, _, _, _, _, mask, ..]
            if *dst == "00000000" && *mask == "00000000" && gw.eq_ignore_ascii_case(&want))
    })
}

/// Make `gateway` the IPv4 default route, replacing one that exists (the guest's init sets
/// this very route, so usually nothing changes).
fn set_default_route(gateway: Ipv4Addr) -> std::io::Result<()> {
    if has_default_route(
        &std::fs::read_to_string("/proc/net/route").unwrap_or_default(),
        gateway,
    ) {
        return Ok(());
    }
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let rt = default_route(gateway);
    // SAFETY: SIOCADDRT reads one valid rtentry.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &rt) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EEXIST) {
        return Err(e);
    }
    let mut any = default_route(Ipv4Addr::UNSPECIFIED);
    any.rt_flags = libc::RTF_UP;
    // SAFETY: SIOCDELRT reads one valid rtentry (the default route, any gateway).
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCDELRT, &any) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &rt) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Route via `gateway`, resolve through `nameserver`; 204.
pub async fn egress(
    State(agent): State<AgentRef>,
    query: Result<Query<EgressQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(root) = agent.settings.system_root.clone() else {
        return HttpError::new(StatusCode::NOT_FOUND, "network configuration is off")
            .into_response();
    };
    let Ok(Query(q)) = query else {
        return HttpError::new(
            StatusCode::BAD_REQUEST,
            "gateway and nameserver must be IPv4 addresses",
        )
        .into_response();
    };
    let r = tokio::task::spawn_blocking(move || {
        set_default_route(q.gateway)
            .map_err(|e| format!("setting the default route via {}: {e}", q.gateway))?;
        write_resolv_conf(&root, &resolv_conf(q.nameserver))
            .map_err(|e| format!("writing /etc/resolv.conf: {e}"))
    })
    .await;
    match r {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(msg)) => HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, msg).into_response(),
        Err(e) => HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("network task: {e}"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_replaces_a_symlink_without_following_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).expect("mkdir");
        let target = dir.path().join("outside");
        std::fs::write(&target, "keep").expect("write");
        std::os::unix::fs::symlink(&target, etc.join("resolv.conf")).expect("symlink");
        // A planted symlink at the temporary name is not followed either.
        std::os::unix::fs::symlink(&target, etc.join(".resolv.conf.cella")).expect("symlink");
        write_resolv_conf(dir.path(), &resolv_conf(Ipv4Addr::new(10, 245, 0, 1))).expect("write");
        let meta = std::fs::symlink_metadata(etc.join("resolv.conf")).expect("stat");
        assert!(meta.file_type().is_file());
        assert_eq!(
            std::fs::read_to_string(etc.join("resolv.conf")).expect("read"),
            "# Written by cella: the host-side resolver of this sandbox.\nnameserver 10.245.0.1\n"
        );
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "keep");
        assert!(!etc.join(".resolv.conf.cella").exists());
    }

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";

    #[test]
    fn ca_is_appended_to_the_bundle_once_and_gets_its_own_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let certs = dir.path().join(BUNDLE_DIR);
        std::fs::create_dir_all(&certs).expect("mkdir");
        std::fs::write(certs.join(BUNDLE_NAME), "SYSTEM ROOTS").expect("write");
        install_ca(dir.path(), PEM).expect("install");
        install_ca(dir.path(), PEM).expect("install again");
        let bundle = std::fs::read_to_string(certs.join(BUNDLE_NAME)).expect("read");
        assert_eq!(bundle, format!("SYSTEM ROOTS\n{PEM}\n"));
        let own = dir.path().join(CA_DIR).join(CA_NAME);
        assert_eq!(
            std::fs::read_to_string(own).expect("read"),
            format!("{PEM}\n")
        );
    }

    #[test]
    fn ca_creates_a_missing_bundle_and_never_follows_a_symlinked_one() {
        let dir = tempfile::tempdir().expect("tmp");
        install_ca(dir.path(), PEM).expect("install");
        let bundle = dir.path().join(BUNDLE_DIR).join(BUNDLE_NAME);
        assert_eq!(
            std::fs::read_to_string(&bundle).expect("read"),
            format!("{PEM}\n")
        );
        // A bundle that is a symlink to elsewhere: read through (it is the sandbox's own
        // file), but replaced by a regular file, the target untouched.
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "OTHER").expect("write");
        std::fs::remove_file(&bundle).expect("rm");
        std::os::unix::fs::symlink(&outside, &bundle).expect("symlink");
        install_ca(dir.path(), PEM).expect("install");
        assert!(
            std::fs::symlink_metadata(&bundle)
                .expect("stat")
                .file_type()
                .is_file()
        );
        assert_eq!(std::fs::read_to_string(&outside).expect("read"), "OTHER");
        assert_eq!(
            std::fs::read_to_string(&bundle).expect("read"),
            format!("OTHER\n{PEM}\n")
        );
    }

    #[test]
    fn existing_default_route_is_recognised() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t1600FEA9\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t1400FEA9\t00000000\t0001\t0\t0\t0\tFCFFFFFF\t0\t0\t0\n";
        assert!(has_default_route(table, Ipv4Addr::new(169, 254, 0, 22)));
        assert!(!has_default_route(table, Ipv4Addr::new(169, 254, 0, 21)));
        assert!(!has_default_route(
            "Iface\n",
            Ipv4Addr::new(169, 254, 0, 22)
        ));
    }

    #[test]
    fn default_route_entry() {
        let rt = default_route(Ipv4Addr::new(169, 254, 0, 22));
        assert_eq!(rt.rt_flags, libc::RTF_UP | libc::RTF_GATEWAY);
        // SAFETY: reading back the sockaddr_in written by sockaddr_v4.
        let gw: libc::sockaddr_in = unsafe { std::mem::transmute(rt.rt_gateway) };
        assert_eq!(gw.sin_addr.s_addr.to_ne_bytes(), [169, 254, 0, 22]);
        assert_eq!(gw.sin_family, libc::AF_INET as libc::sa_family_t);
    }
}
