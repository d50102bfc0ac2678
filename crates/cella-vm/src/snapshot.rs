//! Snapshot/restore: boot a golden VM once per (image, vCPUs, memory, disk, kernel,
//! initramfs, QEMU, machine arguments), then start every sandbox as a clone of it.
//!
//! Why: under TCG a cold boot takes 4–7 s and every VM pays for its own boot-time memory.
//! A clone skips the boot and shares every page the golden VM touched.
//!
//! How (verified on QEMU 7.2; see `docs/vm.md`):
//! * The golden VM's RAM is a `memory-backend-file` with `share=on` on `ram` here. It boots
//!   until the agent reports `cella-agent: awaiting config`. Then, over QMP: capability
//!   `x-ignore-shared`, `stop`, `migrate fd:N` to `state`. The stream holds device state
//!   only (~50 KiB); the RAM is already in the file. Its disk overlay becomes `disk.qcow2`,
//!   the read-only backing file of every clone's overlay.
//! * QEMU 7.2 opens a RAM file read-write even for a private mapping (`rom=on` is 8.2+). A
//!   clone that may write the golden file could change the memory of every other clone, and
//!   free-page reporting would punch holes into it. So clones never see the file: the server
//!   copies it once into a memfd, seals it (`F_SEAL_WRITE|GROW|SHRINK|SEAL`) and passes it
//!   as `mem-path=/proc/self/fd/N,share=off`. Writes to the seal-protected memfd fail; the
//!   private mapping gives each clone copy-on-write pages; untouched pages stay shared. The
//!   memfd is fully allocated (guest RAM size, once per snapshot, not per clone): holes would
//!   be filled, per touching clone, with unreclaimable shmem pages.
//! * A clone starts with `-incoming defer`; over QMP: `x-ignore-shared`, `migrate-incoming
//!   fd:N` (the state file, inherited), `cont` (the golden VM was stopped, so the clone would
//!   otherwise stay paused). No `-global migration.x-ignore-shared`: 7.2 has no such property.
//! * A snapshot is built in `.tmp-<key>-<n>/` and renamed to `<key>/` only when complete, so
//!   a half-made one is never used; the orphan reaper removes leftover `.tmp-*`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cella_jail::sandbox::{Line, read_line_bounded};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// Line the agent writes right before it blocks on its config.
pub const AWAITING_CONFIG: &[u8] = b"cella-agent: awaiting config";

/// Longest QMP line read (query-migrate answers are ~1 KiB).
const MAX_QMP_LINE: usize = 64 * 1024;

/// The files of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// The snapshot's directory.
    pub dir: PathBuf,
}

impl SnapshotFiles {
    /// Guest RAM (sparse; only touched pages hold data).
    pub fn ram(&self) -> PathBuf {
        self.dir.join("ram")
    }
    /// The device-state migration stream.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    /// The golden VM's disk overlay (qcow2 on the template image).
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    /// Whether every file exists (a renamed, complete snapshot).
    pub fn complete(&self) -> bool {
        self.ram().is_file() && self.state().is_file() && self.disk().is_file()
    }
}

/// The snapshot key: 24 hex digits of the SHA-256 over everything a clone depends on.
pub fn key(parts: &[String]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize()).chars().take(24).collect()
}

/// A minimal QMP client on a connected stream.
pub struct Qmp<S> {
    reader: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Qmp<S> {
    /// Read the greeting and leave capabilities negotiation mode.
    pub async fn connect(stream: S) -> Result<Qmp<S>, String> {
        let mut q = Qmp {
            reader: BufReader::new(stream),
        };
        let greeting = q.read_value().await?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting {greeting}"));
        }
        q.execute("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    async fn read_value(&mut self) -> Result<Value, String> {
        let mut buf = Vec::with_capacity(512);
        match read_line_bounded(&mut self.reader, &mut buf, MAX_QMP_LINE).await {
            Ok(Line::Full) => {
                serde_json::from_slice(&buf).map_err(|e| format!("malformed QMP line: {e}"))
            }
            Ok(Line::TooLong) => Err("oversized QMP line".into()),
            Ok(Line::Eof) => Err("QEMU closed QMP".into()),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    /// Send several commands at once, then read their answers in order (events skipped).
    pub async fn pipeline(&mut self, cmds: &[(&str, Value)]) -> Result<Vec<Value>, String> {
        let mut out = Vec::new();
        for (cmd, args) in cmds {
            let mut line = serde_json::to_vec(&json!({"execute": cmd, "arguments": args}))
                .map_err(|e| format!("encoding {cmd}: {e}"))?;
            line.push(b'\n');
            out.extend_from_slice(&line);
        }
        self.reader
            .get_mut()
            .write_all(&out)
            .await
            .map_err(|e| format!("writing QMP: {e}"))?;
        let mut answers = Vec::new();
        while answers.len() < cmds.len() {
            let v = self.read_value().await?;
            if let Some(r) = v.get("return") {
                answers.push(r.clone());
            } else if let Some(e) = v.get("error") {
                let cmd = cmds.get(answers.len()).map(|c| c.0).unwrap_or("?");
                return Err(format!("QMP {cmd}: {e}"));
            }
        }
        Ok(answers)
    }

    /// One command; its `return` value.
    pub async fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let mut v = self.pipeline(&[(cmd, args)]).await?;
        v.pop().ok_or_else(|| format!("QMP {cmd}: no answer"))
    }
}

impl Qmp<tokio::net::UnixStream> {
    /// Hand QEMU a descriptor under `name` (`getfd`, the descriptor rides along as
    /// SCM_RIGHTS). QEMU 7.2's outgoing `migrate fd:` takes only named descriptors.
    pub async fn send_fd(&mut self, name: &str, fd: &OwnedFd) -> Result<(), String> {
        let mut line =
            serde_json::to_vec(&json!({"execute": "getfd", "arguments": {"fdname": name}}))
                .map_err(|e| format!("encoding getfd: {e}"))?;
        line.push(b'\n');
        let sock = self.reader.get_ref().as_raw_fd();
        let raw = fd.as_raw_fd();
        self.reader
            .get_ref()
            .async_io(tokio::io::Interest::WRITABLE, || {
                send_with_fd(sock, &line, raw)
            })
            .await
            .map_err(|e| format!("sending the descriptor to QEMU: {e}"))?;
        loop {
            let v = self.read_value().await?;
            if v.get("return").is_some() {
                return Ok(());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP getfd: {e}"));
            }
        }
    }
}

/// One `sendmsg` of `data` with `fd` attached; the whole line or an error.
fn send_with_fd(sock: i32, data: &[u8], fd: i32) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; all-zero is valid before the fields are set.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes, enough for one cmsg with one int; the
    // CMSG_* macros stay inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::other("no room for the control message"));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
    }
    // SAFETY: msg and everything it points to live for the duration of the call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != data.len() {
        // The socket had room for a part only; QMP lines are tiny, so this does not happen
        // on a fresh connection. Report it rather than send a torn command.
        return Err(io::Error::other("short write of the getfd command"));
    }
    Ok(())
}

/// `x-ignore-shared`: shared RAM blocks are not written into the migration stream.
pub fn ignore_shared() -> Value {
    ignore_shared_set(true)
}

fn ignore_shared_set(state: bool) -> Value {
    json!({"capabilities": [{"capability": "x-ignore-shared", "state": state}]})
}

/// Stop the VM and write its migration stream into `stream` (a pipe the caller drains), then
/// wait until QEMU reports it complete. `with_ram`: the guest RAM goes into the stream too (a
/// sandbox's memory snapshot); else shared RAM stays out (a golden VM's RAM is its file).
/// The VM stays stopped (`postmigrate`); `cont` runs it again.
pub async fn stop_and_save(
    qmp: &mut Qmp<tokio::net::UnixStream>,
    stream: OwnedFd,
    with_ram: bool,
) -> Result<(), String> {
    qmp.send_fd("stream", &stream).await?;
    // Only QEMU may hold the write end now: the reader's EOF is the stream's end.
    drop(stream);
    qmp.pipeline(&[
        ("migrate-set-capabilities", ignore_shared_set(!with_ram)),
        // QEMU 7.2 caps migration at 128 MiB/s by default: far below a local file.
        (
            "migrate-set-parameters",
            json!({"max-bandwidth": MIGRATE_BANDWIDTH}),
        ),
        ("stop", json!({})),
        ("migrate", json!({"uri": "fd:stream"})),
    ])
    .await?;
    loop {
        let st = qmp.execute("query-migrate", json!({})).await?;
        match st.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                return Err(format!("saving the VM failed: {st}"));
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

/// Load the migration stream on descriptor `fd` into a VM started with `-incoming defer`
/// (after `caps`), then run the guest. Returns once it runs.
///
/// The saved VMs were stopped, and a finished load takes the source's run state: QEMU 7.2
/// ends it `paused` even when `cont` came during the load (that `cont` only sets autostart,
/// which the migrated state overrides). So `cont` goes out only after the load: sent early,
/// a slow load (two at once under TCG) left about one resume in three paused for good.
pub async fn load_and_run<S: AsyncRead + AsyncWrite + Unpin>(
    qmp: &mut Qmp<S>,
    fd: i32,
    caps: Option<Value>,
) -> Result<(), String> {
    let mut cmds = Vec::new();
    if let Some(caps) = caps {
        cmds.push(("migrate-set-capabilities", caps));
    }
    cmds.push(("migrate-incoming", json!({"uri": format!("fd:{fd}")})));
    qmp.pipeline(&cmds).await?;
    let mut continued = false;
    loop {
        let st = qmp.execute("query-status", json!({})).await?;
        if st.get("running").and_then(Value::as_bool) == Some(true) {
            return Ok(());
        }
        match st.get("status").and_then(Value::as_str) {
            Some("inmigrate") => tokio::time::sleep(std::time::Duration::from_millis(2)).await,
            Some("paused" | "postmigrate" | "prelaunch") if !continued => {
                qmp.execute("cont", json!({})).await?;
                continued = true;
            }
            other => {
                return Err(format!(
                    "the loaded VM is {}",
                    other.unwrap_or("in no state")
                ));
            }
        }
    }
}

/// Bytes per second a save may write (effectively unlimited: 64 GiB/s).
const MIGRATE_BANDWIDTH: u64 = 64 << 30;

/// Copy `ram` (sparse) into a new memfd and seal it against every change.
pub fn sealed_ram(ram: &Path) -> io::Result<OwnedFd> {
    let src = std::fs::File::open(ram)?;
    let size = src.metadata()?.len();
    // SAFETY: memfd_create with a constant NUL-terminated name; returns a new fd or -1.
    let fd = unsafe {
        libc::memfd_create(
            c"cella-snapshot-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nobody else owns it.
    let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
    let dst = std::fs::File::from(memfd);
    dst.set_len(size)?;
    // Allocate every page now, holes included. In a sparse memfd, a clone's first touch of a
    // hole (read, or the read half of a copy-on-write) allocates a new shmem page, charged to
    // that clone's cgroup, kept in the memfd after the clone is gone, and unreclaimable
    // without swap: a clone filling its page cache was OOM-killed at ~2x its guest RAM.
    let len = libc::off_t::try_from(size).map_err(|_| io::Error::other("RAM file too large"))?;
    // SAFETY: fallocate on a descriptor we own, mode 0 (allocate), within its size.
    if unsafe { libc::fallocate(dst.as_raw_fd(), 0, 0, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in data_ranges(&src, size)? {
        let mut pos = start;
        while pos < end {
            let want = usize::try_from((end - pos).min(buf.len() as u64)).unwrap_or(buf.len());
            let chunk = buf.get_mut(..want).unwrap_or_default();
            let n = src.read_at(chunk, pos)?;
            if n == 0 {
                break;
            }
            // Skip all-zero pages: a hole in the memfd reads as zeros and costs nothing.
            let data = chunk.get(..n).unwrap_or_default();
            if data.iter().any(|b| *b != 0) {
                dst.write_all_at(data, pos)?;
            }
            pos += n as u64;
        }
    }
    // Let the file's page cache go: clones map the memfd, not the file.
    // SAFETY: posix_fadvise on a descriptor we own; advisory only.
    unsafe { libc::posix_fadvise(src.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd we own.
    if unsafe { libc::fcntl(dst.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(dst))
}

/// The data (non-hole) ranges of a sparse file.
fn data_ranges(f: &std::fs::File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off: u64 = 0;
    while off < size {
        let pos = libc::off_t::try_from(off).map_err(|_| io::Error::other("offset"))?;
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (d, h) = (data as u64, (hole as u64).min(size));
        out.push((d, h));
        off = h.max(d + 1);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_every_part() {
        let a = key(&["img".into(), "1".into()]);
        assert_eq!(a.len(), 24);
        assert_eq!(a, key(&["img".into(), "1".into()]));
        assert_ne!(a, key(&["img".into(), "2".into()]));
        assert_ne!(a, key(&["img1".into()]), "parts are length-prefixed");
    }

    #[test]
    fn sealed_ram_is_a_frozen_copy() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ram = tmp.path().join("ram");
        let f = std::fs::File::create(&ram).expect("create");
        f.set_len(8 << 20).expect("size");
        f.write_all_at(b"golden", 4 << 20).expect("write");
        drop(f);
        let fd = sealed_ram(&ram).expect("seal");
        let m = std::fs::File::from(fd);
        assert_eq!(m.metadata().expect("meta").len(), 8 << 20);
        assert_eq!(
            std::os::unix::fs::MetadataExt::blocks(&m.metadata().expect("meta")) * 512,
            8 << 20,
            "fully allocated: no holes for clones to fill"
        );
        let mut got = [0u8; 6];
        m.read_exact_at(&mut got, 4 << 20).expect("read");
        assert_eq!(&got, b"golden");
        assert!(m.write_all_at(b"x", 0).is_err(), "sealed against writes");
        assert!(m.set_len(1 << 20).is_err(), "sealed against shrinking");
        // a private writable mapping is still allowed (that is what a clone does)
        // SAFETY: mapping a descriptor we own; unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                m.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: `p` is the 4096-byte mapping made above.
        unsafe { libc::munmap(p, 4096) };
        // SAFETY: as above, a shared writable mapping must be refused.
        let s = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                m.as_raw_fd(),
                0,
            )
        };
        assert_eq!(s, libc::MAP_FAILED);
    }

    /// A fake QMP server: greets, then answers each command with the raw line(s) `reply`
    /// gives (events may come first). Returns the commands it got.
    async fn fake_qmp(
        b: tokio::io::DuplexStream,
        mut reply: impl FnMut(&str) -> Vec<u8>,
    ) -> Vec<String> {
        let mut r = BufReader::new(b);
        r.get_mut()
            .write_all(b"{\"QMP\":{\"version\":{}}}\n")
            .await
            .expect("greet");
        let mut buf = Vec::new();
        let mut got = Vec::new();
        while let Ok(Line::Full) = read_line_bounded(&mut r, &mut buf, 4096).await {
            let v: Value = serde_json::from_slice(&buf).expect("json");
            let cmd = v["execute"].as_str().expect("execute").to_string();
            let line = reply(&cmd);
            got.push(cmd);
            r.get_mut().write_all(&line).await.expect("reply");
        }
        got
    }

    /// [`fake_qmp`] for [`load_and_run`]: `inmigrate` for the first `loading` status queries,
    /// then `paused` until `cont`, then running.
    async fn fake_incoming(b: tokio::io::DuplexStream, loading: usize) -> Vec<String> {
        let (mut queries, mut running) = (0, false);
        fake_qmp(b, move |cmd| {
            let reply = match cmd {
                "query-status" => {
                    queries += 1;
                    let status = match (running, queries <= loading) {
                        (true, _) => "running",
                        (false, true) => "inmigrate",
                        (false, false) => "paused",
                    };
                    json!({"return": {"running": running, "status": status}})
                }
                "cont" if queries > loading => {
                    running = true;
                    json!({"return": {}})
                }
                // What QEMU does with an early `cont`: nothing that survives the load.
                _ => json!({"return": {}}),
            };
            let mut line = serde_json::to_vec(&reply).expect("encode");
            line.push(b'\n');
            line
        })
        .await
    }

    #[tokio::test]
    async fn a_load_is_continued_only_once_it_has_finished() {
        for loading in [0, 3] {
            let (a, b) = tokio::io::duplex(4096);
            let server = tokio::spawn(fake_incoming(b, loading));
            let mut q = Qmp::connect(a).await.expect("connect");
            load_and_run(&mut q, 7, Some(ignore_shared()))
                .await
                .expect("runs");
            drop(q);
            let got = server.await.expect("server");
            let cont = got.iter().position(|c| c == "cont").expect("cont sent");
            let queries_before = got[..cont].iter().filter(|c| *c == "query-status").count();
            assert_eq!(queries_before, loading + 1, "{got:?}");
            assert_eq!(got[..2], ["qmp_capabilities", "migrate-set-capabilities"]);
            assert_eq!(got[2], "migrate-incoming");
            assert_eq!(got.last().map(String::as_str), Some("query-status"));
        }
    }

    #[tokio::test]
    async fn a_load_that_ends_in_a_bad_state_is_an_error() {
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(fake_qmp(b, |cmd| match cmd {
            "query-status" => {
                b"{\"return\":{\"running\":false,\"status\":\"internal-error\"}}\n".to_vec()
            }
            _ => b"{\"return\":{}}\n".to_vec(),
        }));
        let mut q = Qmp::connect(a).await.expect("connect");
        let err = load_and_run(&mut q, 7, None).await.expect_err("bad state");
        assert!(err.contains("internal-error"), "{err}");
        drop(q);
        server.await.expect("server");
    }

    #[tokio::test]
    async fn qmp_pipeline_skips_events_and_reports_errors() {
        let (a, b) = tokio::io::duplex(4096);
        let mut n = 0;
        let server = tokio::spawn(fake_qmp(b, move |_| {
            n += 1;
            match n {
                1 | 2 => b"{\"return\":{}}\n".to_vec(),
                3 => b"{\"event\":\"RESUME\"}\n{\"return\":{\"status\":\"ok\"}}\n".to_vec(),
                _ => b"{\"error\":{\"class\":\"GenericError\",\"desc\":\"no\"}}\n".to_vec(),
            }
        }));
        let mut q = Qmp::connect(a).await.expect("connect");
        let got = q
            .pipeline(&[("stop", json!({})), ("query-status", json!({}))])
            .await
            .expect("pipeline");
        assert_eq!(got[1]["status"], "ok");
        let err = q.execute("cont", json!({})).await.expect_err("error");
        assert!(err.contains("cont") && err.contains("no"), "{err}");
        drop(q);
        server.await.expect("server");
    }
}
