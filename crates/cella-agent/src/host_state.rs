//! What a VM clone must take from the host before it reports ready: its hostname, the wall
//! clock and fresh randomness.
//!
//! Why: a microVM restored from a snapshot wakes up as an exact copy of the golden VM. Its
//! hostname is the golden VM's, its wall clock is the snapshot's (signed-URL expiry and TLS
//! depend on it), and its kernel CRNG state is the same in every clone (same TCP sequence
//! numbers, same `/dev/urandom` bytes). The host sends all three in the [`AgentConfig`]; a jail
//! shares the host's clock and kernel, gets neither field and already has its hostname, so
//! nothing here runs for it.

use cella_proto::control::AgentConfig;

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` (`_IO('R', 0x07)`).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// Most entropy bytes mixed in (the kernel accepts more; the host sends 64).
const MAX_ENTROPY: usize = 512;

/// Apply the config's hostname, clock and entropy. Failures are logged, never fatal: envd
/// must come up even where one of them is not permitted.
pub fn adopt(cfg: &AgentConfig) {
    if let Err(e) = set_hostname(&cfg.sandbox_id) {
        tracing::warn!("cannot set the hostname: {e}");
    }
    if let Some(ns) = cfg.host_time_ns
        && let Err(e) = set_clock(ns)
    {
        tracing::warn!("cannot set the clock: {e}");
    }
    if !cfg.entropy.is_empty()
        && let Err(e) = add_entropy(&cfg.entropy)
    {
        tracing::warn!("cannot reseed the kernel CRNG: {e}");
    }
}

/// The current hostname (`uname -n`).
pub fn hostname() -> std::io::Result<String> {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let bytes: Vec<u8> = u
        .nodename
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Set the hostname unless it already is `name` (a jail's is, and may not change it).
fn set_hostname(name: &str) -> std::io::Result<()> {
    if name.is_empty() || hostname()? == name {
        return Ok(());
    }
    // SAFETY: sethostname reads exactly `len` bytes from the pointer.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_clock(ns: u64) -> std::io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads one timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `struct rand_pool_info` followed by its buffer, as `RNDADDENTROPY` reads it.
fn rand_pool_info(bytes: &[u8]) -> Vec<u32> {
    let bytes = &bytes[..bytes.len().min(MAX_ENTROPY)];
    let words = bytes.len().div_ceil(4);
    let mut v = Vec::with_capacity(2 + words);
    // entropy_count is in bits: the host's CRNG output is full-entropy.
    v.push((bytes.len() * 8) as u32);
    v.push(bytes.len() as u32);
    for chunk in bytes.chunks(4) {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        v.push(u32::from_ne_bytes(w));
    }
    v
}

fn add_entropy(bytes: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    let info = rand_pool_info(bytes);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info header and buf_size bytes after it, all
    // inside `info`.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_info_layout() {
        let v = rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(v[0], 40, "entropy in bits");
        assert_eq!(v[1], 5, "buffer size in bytes");
        assert_eq!(v.len(), 4);
        assert_eq!(v[2].to_ne_bytes(), [1, 2, 3, 4]);
        assert_eq!(v[3].to_ne_bytes(), [5, 0, 0, 0]);
        assert_eq!(rand_pool_info(&[0; 4096])[1] as usize, MAX_ENTROPY);
    }

    #[test]
    fn same_hostname_is_left_alone() {
        // Setting the current name is a no-op, so it works unprivileged too.
        let name = hostname().expect("uname");
        set_hostname(&name).expect("no change needed");
    }
}
