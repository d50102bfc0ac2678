//! Host-side audit of the files that sandbox code writes, removes and renames.
//!
//! The agent records what goes through the file API; what a program in the sandbox writes
//! by itself only the kernel sees. Every jail sandbox writes to its own ext4 filesystem (the
//! overlay's upper layer, see [`crate::disk`]), so the host puts one fanotify mark on each of
//! those filesystems (`FAN_MARK_FILESYSTEM`, directory handle + name reporting) and turns the
//! events into `fs.write` (a file closed after writing), `fs.remove` and `fs.rename` records.
//! Nothing here runs inside the sandbox, so it cannot be switched off from there.
//!
//! Overlayfs shows through: a copy-up or a whiteout is a rename out of the `work/` directory.
//! Those are recognised (a whiteout is a removal; a copy-up is followed by the write that
//! caused it, so it is dropped). Paths are resolved on the host from the directory handle
//! (`open_by_handle_at`), so a directory removed meanwhile loses the event, and moving a
//! directory is reported for the directory, not for each file in it. Each sandbox has a rate
//! limit (the same as for execs); the excess is counted in one `fs.suppressed` record per
//! second, and repeated writes of one file within a second are one record.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use cella_core::driver::{EventSink, SandboxEvent};
use cella_procevents::{RateLimit, nested_pid};
use cella_proto::control::AgentEvent;

const FAN_CLOSE_WRITE: u64 = 0x0000_0008;
const FAN_DELETE: u64 = 0x0000_0200;
const FAN_RENAME: u64 = 0x1000_0000;
const FAN_ONDIR: u64 = 0x4000_0000;
const FAN_Q_OVERFLOW: u64 = 0x0000_4000;
const INFO_DFID_NAME: u8 = 2;
const INFO_OLD_DFID_NAME: u8 = 10;
const INFO_NEW_DFID_NAME: u8 = 12;
const METADATA_LEN: usize = 24;
/// Where the overlay keeps the sandbox's files on its disk (`crate::spawn`).
const UPPER: &str = "/upper";

/// A directory handle and an entry name from one info record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntryRef {
    /// `struct file_handle` bytes (handle_bytes, handle_type, f_handle).
    pub handle: Vec<u8>,
    /// The entry's name in that directory.
    pub name: String,
}

/// One fanotify event, as far as this audit needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsEvent {
    /// Event mask.
    pub mask: u64,
    /// Host PID of the process that caused it.
    pub pid: i32,
    /// The filesystem (`statfs` f_fsid).
    pub fsid: [i32; 2],
    /// The entry (`DFID_NAME`, or the old one of a rename).
    pub entry: Option<DirEntryRef>,
    /// The new entry of a rename.
    pub new_entry: Option<DirEntryRef>,
}

/// Parse a buffer of fanotify events; malformed records end the parse (never read past
/// what a length says, never trust it beyond the buffer).
pub fn parse_events(buf: &[u8]) -> Vec<FsEvent> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while let Some(head) = buf.get(off..off + METADATA_LEN) {
        let event_len = u32::from_ne_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let metadata_len = u16::from_ne_bytes([head[6], head[7]]) as usize;
        if event_len < METADATA_LEN || metadata_len < METADATA_LEN || metadata_len > event_len {
            break;
        }
        let Some(event) = buf.get(off..off + event_len) else {
            break;
        };
        let mask = u64::from_ne_bytes(head[8..16].try_into().unwrap_or([0; 8]));
        let pid = i32::from_ne_bytes(head[20..24].try_into().unwrap_or([0; 4]));
        let mut ev = FsEvent {
            mask,
            pid,
            fsid: [0, 0],
            entry: None,
            new_entry: None,
        };
        let mut info = metadata_len;
        while let Some(ih) = event.get(info..info + 4) {
            let kind = ih[0];
            let len = u16::from_ne_bytes([ih[2], ih[3]]) as usize;
            let Some(rec) = event.get(info..info + len).filter(|_| len >= 4) else {
                break;
            };
            if matches!(
                kind,
                INFO_DFID_NAME | INFO_OLD_DFID_NAME | INFO_NEW_DFID_NAME
            ) && let Some((fsid, entry)) = parse_dfid_name(&rec[4..])
            {
                ev.fsid = fsid;
                if kind == INFO_NEW_DFID_NAME {
                    ev.new_entry = Some(entry);
                } else {
                    ev.entry = Some(entry);
                }
            }
            info += len;
        }
        out.push(ev);
        off += event_len;
    }
    out
}

/// fsid (8 bytes), `struct file_handle` (8 + handle_bytes), NUL-terminated name.
fn parse_dfid_name(b: &[u8]) -> Option<([i32; 2], DirEntryRef)> {
    let fsid = [
        i32::from_ne_bytes(b.get(0..4)?.try_into().ok()?),
        i32::from_ne_bytes(b.get(4..8)?.try_into().ok()?),
    ];
    let handle_bytes = u32::from_ne_bytes(b.get(8..12)?.try_into().ok()?) as usize;
    if handle_bytes > 128 {
        return None; // MAX_HANDLE_SZ
    }
    let handle = b.get(8..16 + handle_bytes)?.to_vec();
    let rest = b.get(16 + handle_bytes..)?;
    let name_len = rest.iter().position(|c| *c == 0)?;
    let name = String::from_utf8_lossy(&rest[..name_len]).into_owned();
    Some((fsid, DirEntryRef { handle, name }))
}

/// The sandbox's path of a host path on its disk (`/upper/x` → `/x`); `None` for the
/// overlay's work directory and anything else.
pub fn sandbox_path(on_disk: &str) -> Option<String> {
    match on_disk.strip_prefix(UPPER)? {
        "" => Some("/".to_string()),
        rest if rest.starts_with('/') => Some(rest.to_string()),
        _ => None,
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

struct Watched {
    id: String,
    /// A directory fd on the disk's root (for `open_by_handle_at`).
    root: OwnedFd,
    sink: EventSink,
    limit: RateLimit,
    suppressed: u64,
    last: Option<(String, Instant)>,
}

#[derive(Default)]
struct State {
    by_fsid: HashMap<[i32; 2], Watched>,
}

/// The running audit: register each sandbox's disk with [`FsWatch::watch`].
pub struct FsWatch {
    fan: Arc<OwnedFd>,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for FsWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsWatch").finish_non_exhaustive()
    }
}

impl FsWatch {
    /// Create the fanotify group and its reader thread (needs `CAP_SYS_ADMIN`).
    pub fn start(proc_root: PathBuf) -> io::Result<FsWatch> {
        // SAFETY: fanotify_init with constant flags; the result is checked and owned.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF | libc::FAN_REPORT_DFID_NAME | libc::FAN_CLOEXEC,
                (libc::O_RDONLY | libc::O_LARGEFILE) as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fan = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let state = Arc::new(Mutex::new(State::default()));
        let (f, w) = (fan.clone(), Arc::downgrade(&state));
        std::thread::Builder::new()
            .name("cella-fswatch".into())
            .spawn(move || read_loop(&f, w, &proc_root))?;
        Ok(FsWatch { fan, state })
    }

    /// Open the root of a sandbox's (still detached) disk mount, to be watched with
    /// [`FsWatch::watch`] once the sandbox is set up.
    pub fn open_root(mount: BorrowedFd<'_>) -> io::Result<OwnedFd> {
        // SAFETY: openat of "." relative to a live mount fd; the result is checked.
        let fd = unsafe {
            libc::openat(
                mount.as_raw_fd(),
                c".".as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Audit the filesystem under `root` as sandbox `id`'s. `root` keeps the disk alive
    /// until [`FsWatch::unwatch`].
    pub fn watch(&self, id: &str, root: OwnedFd, sink: EventSink) -> io::Result<()> {
        let fsid = fsid_of(root.as_fd())?;
        let mask = FAN_CLOSE_WRITE | FAN_DELETE | FAN_RENAME | FAN_ONDIR;
        mark(
            &self.fan,
            libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
            mask,
            &root,
        )?;
        if let Ok(mut s) = self.state.lock() {
            s.by_fsid.insert(
                fsid,
                Watched {
                    id: id.to_string(),
                    root,
                    sink,
                    limit: RateLimit::new(Instant::now()),
                    suppressed: 0,
                    last: None,
                },
            );
        }
        Ok(())
    }

    /// Stop auditing sandbox `id` and release its disk root (teardown waits for the disk).
    pub fn unwatch(&self, id: &str) {
        let Ok(mut s) = self.state.lock() else { return };
        let Some(fsid) = s.by_fsid.iter().find(|(_, w)| w.id == id).map(|(k, _)| *k) else {
            return;
        };
        if let Some(w) = s.by_fsid.remove(&fsid) {
            let _ = mark(
                &self.fan,
                libc::FAN_MARK_REMOVE | libc::FAN_MARK_FILESYSTEM,
                FAN_CLOSE_WRITE | FAN_DELETE | FAN_RENAME | FAN_ONDIR,
                &w.root,
            );
            if w.suppressed > 0 {
                let _ = w.sink.send(SandboxEvent::from_host(
                    id,
                    AgentEvent::FsSuppressed {
                        count: w.suppressed,
                    },
                ));
            }
        }
    }
}

fn mark(fan: &OwnedFd, flags: libc::c_uint, mask: u64, root: &OwnedFd) -> io::Result<()> {
    // SAFETY: both fds are live; "." is a NUL-terminated path relative to `root`.
    let rc = unsafe {
        libc::fanotify_mark(
            fan.as_raw_fd(),
            flags,
            mask,
            root.as_raw_fd(),
            c".".as_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn fsid_of(fd: BorrowedFd<'_>) -> io::Result<[i32; 2]> {
    // SAFETY: statfs is plain data; zeroed is valid and fstatfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fd is live and st is a valid out pointer.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fsid_t is two c_ints; reading it as such is how the kernel lays it out.
    let v: [i32; 2] = unsafe { std::mem::transmute(st.f_fsid) };
    Ok(v)
}

fn read_loop(fan: &OwnedFd, state: Weak<Mutex<State>>, proc_root: &Path) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_flush = Instant::now();
    loop {
        let mut pfd = libc::pollfd {
            fd: fan.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, 1 s timeout.
        let ready = unsafe { libc::poll(&mut pfd, 1, 1000) };
        let Some(state) = state.upgrade() else {
            return; // the driver is gone
        };
        if ready > 0 {
            // SAFETY: buf is a live, writable buffer of buf.len() bytes.
            let n = unsafe { libc::read(fan.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                    tracing::warn!(error = %e, "file audit stopped");
                    return;
                }
            } else {
                let n = usize::try_from(n).unwrap_or(0).min(buf.len());
                for ev in parse_events(&buf[..n]) {
                    handle(&state, &ev, proc_root);
                }
            }
        }
        if last_flush.elapsed() >= Duration::from_secs(1) {
            last_flush = Instant::now();
            flush_suppressed(&state);
        }
    }
}

/// The on-disk path of `entry`, relative to the disk's root (`/upper/...`).
fn resolve(root: &OwnedFd, entry: &DirEntryRef) -> Option<String> {
    // SAFETY: the handle bytes are a complete `struct file_handle` (checked by the parser);
    // root is a live directory fd on the same filesystem.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            root.as_raw_fd(),
            entry.handle.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let dir = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let dir_path = fd_path(dir.as_raw_fd())?;
    let root_path = fd_path(root.as_raw_fd())?;
    let rel = match root_path.as_str() {
        "/" => dir_path,
        r => dir_path.strip_prefix(r)?.to_string(),
    };
    let rel = if rel.is_empty() { "/".to_string() } else { rel };
    Some(join(&rel, &entry.name))
}

fn fd_path(fd: RawFd) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Whether `path` (on the disk) is an overlay whiteout: a 0/0 character device.
fn is_whiteout(root: &OwnedFd, on_disk: &str) -> bool {
    let Ok(rel) = std::ffi::CString::new(on_disk.trim_start_matches('/')) else {
        return false;
    };
    // SAFETY: stat is plain data; fstatat fills it for a NUL-terminated relative path.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: root is live, rel is NUL-terminated, st is a valid out pointer.
    let rc = unsafe {
        libc::fstatat(
            root.as_raw_fd(),
            rel.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    rc == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFCHR && st.st_rdev == 0
}

fn handle(state: &Mutex<State>, ev: &FsEvent, proc_root: &Path) {
    if ev.mask & FAN_Q_OVERFLOW != 0 {
        tracing::warn!("file audit: the kernel's event queue overflowed; events were lost");
        return;
    }
    let Ok(mut s) = state.lock() else { return };
    let Some(w) = s.by_fsid.get_mut(&ev.fsid) else {
        return;
    };
    let Some(record) = classify(w, ev) else {
        return;
    };
    let now = Instant::now();
    let key = format!("{record:?}");
    if w.last
        .as_ref()
        .is_some_and(|(k, at)| *k == key && now.duration_since(*at) < Duration::from_secs(1))
    {
        return;
    }
    if !w.limit.take(now) {
        w.suppressed += 1;
        return;
    }
    w.last = Some((key, now));
    let (sink, id) = (w.sink.clone(), w.id.clone());
    drop(s);
    // The writer's PID as the sandbox sees it; none for the host itself (e.g. the server
    // writing the sandbox's resolv.conf).
    let pid = std::fs::read_to_string(proc_root.join(ev.pid.to_string()).join("status"))
        .ok()
        .and_then(|st| nested_pid(&st));
    let event = match record {
        Record::Write(path) => AgentEvent::FsWrite { path, pid },
        Record::Remove(path) => AgentEvent::FsRemove { path, pid },
        Record::Rename(from, to) => AgentEvent::FsRename { from, to, pid },
    };
    let _ = sink.send(SandboxEvent::from_host(id, event));
}

#[derive(Debug)]
enum Record {
    Write(String),
    Remove(String),
    Rename(String, String),
}

fn classify(w: &Watched, ev: &FsEvent) -> Option<Record> {
    let entry = ev.entry.as_ref()?;
    if ev.mask & FAN_CLOSE_WRITE != 0 && ev.mask & FAN_ONDIR == 0 {
        return sandbox_path(&resolve(&w.root, entry)?).map(Record::Write);
    }
    if ev.mask & FAN_DELETE != 0 {
        return sandbox_path(&resolve(&w.root, entry)?).map(Record::Remove);
    }
    if ev.mask & FAN_RENAME != 0 {
        let new_on_disk = resolve(&w.root, ev.new_entry.as_ref()?)?;
        let to = sandbox_path(&new_on_disk)?;
        let old_on_disk = resolve(&w.root, entry)?;
        return match sandbox_path(&old_on_disk) {
            Some(from) => Some(Record::Rename(from, to)),
            // Out of the overlay's work dir: a whiteout is a removal, anything else is a
            // copy-up or a new directory (the write that follows is what counts).
            None if is_whiteout(&w.root, &new_on_disk) => Some(Record::Remove(to)),
            None => None,
        };
    }
    None
}

fn flush_suppressed(state: &Mutex<State>) {
    let Ok(mut s) = state.lock() else { return };
    for w in s.by_fsid.values_mut() {
        if w.suppressed > 0 {
            let _ = w.sink.send(SandboxEvent::from_host(
                w.id.as_str(),
                AgentEvent::FsSuppressed {
                    count: w.suppressed,
                },
            ));
            w.suppressed = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dfid_name(kind: u8, fsid: [i32; 2], handle: &[u8], name: &str) -> Vec<u8> {
        let mut rec = vec![kind, 0, 0, 0];
        rec.extend_from_slice(&fsid[0].to_ne_bytes());
        rec.extend_from_slice(&fsid[1].to_ne_bytes());
        rec.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
        rec.extend_from_slice(&1i32.to_ne_bytes());
        rec.extend_from_slice(handle);
        rec.extend_from_slice(name.as_bytes());
        rec.push(0);
        while rec.len() % 4 != 0 {
            rec.push(0);
        }
        let len = rec.len() as u16;
        rec[2..4].copy_from_slice(&len.to_ne_bytes());
        rec
    }

    fn event(mask: u64, pid: i32, infos: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = infos.concat();
        let len = (METADATA_LEN + body.len()) as u32;
        let mut e = Vec::new();
        e.extend_from_slice(&len.to_ne_bytes());
        e.push(3); // version
        e.push(0);
        e.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        e.extend_from_slice(&mask.to_ne_bytes());
        e.extend_from_slice(&(-1i32).to_ne_bytes()); // fd: none in fid mode
        e.extend_from_slice(&pid.to_ne_bytes());
        e.extend_from_slice(&body);
        e
    }

    #[test]
    fn events_with_names_and_renames_parse() {
        let mut buf = event(
            FAN_CLOSE_WRITE,
            42,
            &[dfid_name(
                INFO_DFID_NAME,
                [7, 8],
                &[1, 2, 3, 4, 5, 6, 7, 8],
                "notes.txt",
            )],
        );
        buf.extend(event(
            FAN_RENAME,
            43,
            &[
                dfid_name(INFO_OLD_DFID_NAME, [7, 8], &[9; 8], "a"),
                dfid_name(INFO_NEW_DFID_NAME, [7, 8], &[10; 8], "b"),
            ],
        ));
        let evs = parse_events(&buf);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].mask, FAN_CLOSE_WRITE);
        assert_eq!(evs[0].pid, 42);
        assert_eq!(evs[0].fsid, [7, 8]);
        let e = evs[0].entry.as_ref().expect("entry");
        assert_eq!(e.name, "notes.txt");
        // handle_bytes, handle_type, then the handle itself
        assert_eq!(e.handle.len(), 16);
        assert_eq!(evs[1].entry.as_ref().map(|e| e.name.as_str()), Some("a"));
        assert_eq!(
            evs[1].new_entry.as_ref().map(|e| e.name.as_str()),
            Some("b")
        );
    }

    #[test]
    fn malformed_buffers_never_read_past_their_lengths() {
        let full = event(
            FAN_DELETE,
            1,
            &[dfid_name(INFO_DFID_NAME, [1, 1], &[0; 8], "x")],
        );
        for n in 0..full.len() {
            // A cut event is dropped whole, never half-read.
            assert!(parse_events(&full[..n]).is_empty(), "cut at {n}");
        }
        // An event length smaller than the header ends the parse.
        let mut bad = full.clone();
        bad[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse_events(&bad).is_empty());
        // A handle larger than MAX_HANDLE_SZ is ignored (the event stays, without entry).
        let mut big = full.clone();
        let at = METADATA_LEN + 4 + 8;
        big[at..at + 4].copy_from_slice(&4096u32.to_ne_bytes());
        let evs = parse_events(&big);
        assert_eq!(evs.len(), 1);
        assert!(evs[0].entry.is_none());
    }

    #[test]
    fn only_the_upper_layer_maps_to_sandbox_paths() {
        assert_eq!(
            sandbox_path("/upper/home/user/a"),
            Some("/home/user/a".into())
        );
        assert_eq!(sandbox_path("/upper"), Some("/".into()));
        assert_eq!(sandbox_path("/work/work/#123"), None);
        assert_eq!(sandbox_path("/upperx/a"), None);
        assert_eq!(sandbox_path("/lost+found/a"), None);
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/upper/d", "a"), "/upper/d/a");
    }
}
