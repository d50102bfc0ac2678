//! The sandbox's writable layer: a sparse ext4 image on a loop device, handed to the sandbox
//! as a detached mount.
//!
//! Why not tmpfs: tmpfs pages are charged to the sandbox's memory cgroup and, without swap,
//! can never be reclaimed. With `disk_mb` larger than `memory_mb`, filling the disk ended in
//! the memory cgroup's OOM killer instead of `ENOSPC`. Page cache of a real filesystem is
//! reclaimable, so the disk quota and the memory limit are independent again: a full disk is
//! `ENOSPC` on write, nothing else.
//!
//! Why a detached mount: ext4 cannot be mounted from inside the sandbox's user namespace, and
//! a mount made in the host's namespace would appear in the host's mount table and propagate
//! to every namespace that shares it. `fsopen`/`fsconfig`/`fsmount` build the mount in the
//! parent without attaching it anywhere; the child attaches it in its own, already private,
//! mount namespace with `move_mount` (see [`crate::spawn`]). The host never sees it.
//!
//! Why it cleans up after itself: the image file is unlinked as soon as the loop device holds
//! it, the loop device is configured with `LO_FLAGS_AUTOCLEAR`, and the parent closes its
//! descriptors once the child has started. The only reference left is the sandbox's mount, so
//! when the sandbox's mount namespace dies the kernel unmounts the filesystem, detaches the
//! loop device and frees the disk space — also when the server crashed. [`release_under`]
//! is the safety net for a restarted server.
//!
//! Everything that reads `/dev` or `/sys` takes the root as a parameter so it can be tested
//! against a temporary directory.

use std::ffi::{CStr, CString, c_int, c_uint, c_ulong};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `LOOP_CTL_GET_FREE` on `/dev/loop-control`.
const LOOP_CTL_GET_FREE: c_ulong = 0x4C82;
/// `LOOP_CONFIGURE`: bind a backing file and set flags in one step (Linux 5.8).
const LOOP_CONFIGURE: c_ulong = 0x4C0A;
/// `LOOP_CLR_FD`: detach (or, while the device is open, arm autoclear).
const LOOP_CLR_FD: c_ulong = 0x4C01;
/// Detach the loop device when its last opener (the sandbox's mount) goes away.
const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// Read and write the backing file with direct I/O: the sandbox's page cache is the only
/// cache of its data, the host does not keep a second copy.
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `fsconfig` commands (uapi/linux/mount.h).
const FSCONFIG_SET_FLAG: c_uint = 0;
const FSCONFIG_SET_STRING: c_uint = 1;
const FSCONFIG_CMD_CREATE: c_uint = 6;
const FSOPEN_CLOEXEC: c_uint = 1;
const FSMOUNT_CLOEXEC: c_uint = 1;
const MOUNT_ATTR_NOSUID: c_uint = 0x2;
const MOUNT_ATTR_NODEV: c_uint = 0x4;

/// Attempts at grabbing a free loop device (another process may take the one the kernel
/// offered before we bind it).
const LOOP_ATTEMPTS: u32 = 16;

/// Largest accepted disk size (16 TiB): keeps the byte count far from overflow and out of
/// what mkfs would refuse anyway.
pub const MAX_DISK_MB: u64 = 16 << 20;

/// Prefix of image names in the data directory (an image is only named until the loop
/// device holds it).
pub const IMAGE_PREFIX: &str = ".disk-";

/// Where `mkfs.ext4` is looked for before `PATH`.
const MKFS_CANDIDATES: [&str; 3] = [
    "/usr/sbin/mkfs.ext4",
    "/sbin/mkfs.ext4",
    "/usr/local/sbin/mkfs.ext4",
];

/// Longest mkfs error output kept in an error message.
const MAX_MKFS_OUTPUT: usize = 2048;

/// `struct loop_info64` (uapi/linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` (uapi/linux/loop.h).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Errors of preparing or releasing a writable layer.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// `mkfs.ext4` is not installed.
    #[error("mkfs.ext4 not found in {searched}; install e2fsprogs")]
    MkfsMissing {
        /// Where it was looked for.
        searched: String,
    },
    /// No loop device support.
    #[error("{0} is missing: the kernel has no loop device support (modprobe loop)")]
    NoLoopControl(PathBuf),
    /// The requested size cannot be a disk image.
    #[error("a disk of {0} MiB is out of range (1..={MAX_DISK_MB} MiB)")]
    BadSize(u64),
    /// `mkfs.ext4` failed.
    #[error("mkfs.ext4 on {image} failed ({status}): {output}")]
    Mkfs {
        /// The image.
        image: PathBuf,
        /// Exit status.
        status: String,
        /// Its (bounded) error output.
        output: String,
    },
    /// Every free loop device the kernel offered was taken by someone else first.
    #[error("no free loop device after {0} attempts")]
    NoFreeLoop(u32),
    /// Mounting the image failed.
    #[error("mounting the ext4 image on {device}: {step} failed{log}")]
    Mount {
        /// The loop device.
        device: String,
        /// Which call.
        step: &'static str,
        /// The kernel's message for the mount context, if any (": ..." form).
        log: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file or device operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> DiskError {
    let context = context.into();
    move |source| DiskError::Io { context, source }
}

/// A loop device bound to a sandbox's image: what teardown checks to know the disk is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopRef {
    /// N of `/dev/loopN`.
    pub index: u32,
    /// The image path as it was bound (the kernel reports it with " (deleted)" appended
    /// once unlinked).
    pub backing: PathBuf,
}

/// A prepared writable layer: an ext4 filesystem on a loop device, mounted nowhere yet.
#[derive(Debug)]
pub struct WritableDisk {
    /// The loop device and image.
    pub loop_ref: LoopRef,
    /// The detached mount (from `fsmount`); the child attaches it with `move_mount`.
    /// Dropping it (with no attached copy) releases filesystem and loop device.
    pub mount: OwnedFd,
}

/// A fresh image path in `data_dir`: random, not derived from the sandbox ID, because every
/// sandbox can read all loop devices' backing paths in sysfs and must not learn other
/// sandboxes' IDs from them.
pub fn image_path(data_dir: &Path) -> Result<PathBuf, DiskError> {
    let mut nonce = [0u8; 12];
    // SAFETY: getrandom writes at most `nonce.len()` bytes into the live buffer.
    let n = unsafe { libc::getrandom(nonce.as_mut_ptr().cast(), nonce.len(), 0) };
    if usize::try_from(n).ok() != Some(nonce.len()) {
        return Err(DiskError::Io {
            context: "drawing a random image name".into(),
            source: io::Error::last_os_error(),
        });
    }
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    Ok(data_dir.join(format!("{IMAGE_PREFIX}{hex}.img")))
}

/// Locate `mkfs.ext4`: the usual sbin directories, then `path_var` (a `PATH` value).
pub fn find_mkfs(path_var: Option<&std::ffi::OsStr>) -> Result<PathBuf, DiskError> {
    let mut searched: Vec<PathBuf> = MKFS_CANDIDATES.iter().map(PathBuf::from).collect();
    if let Some(p) = path_var {
        searched.extend(std::env::split_paths(p).map(|d| d.join("mkfs.ext4")));
    }
    for c in &searched {
        if c.is_absolute() && c.is_file() {
            return Ok(c.clone());
        }
    }
    Err(DiskError::MkfsMissing {
        searched: searched
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Check that loop devices can be used (`dev_root` = `/dev`).
pub fn probe_loop(dev_root: &Path) -> Result<(), DiskError> {
    let ctl = dev_root.join("loop-control");
    if ctl.exists() {
        Ok(())
    } else {
        Err(DiskError::NoLoopControl(ctl))
    }
}

/// The `mkfs.ext4` arguments for an image owned by `owner` (uid = gid) inside the sandbox.
///
/// Chosen for a throwaway filesystem that must be ready in milliseconds: no journal (nothing
/// survives a crash anyway), no reserved blocks (the sandbox gets all of `disk_mb`), lazy
/// inode table init (mkfs writes almost nothing to the sparse file; the mount uses
/// `noinit_itable`, the tables of a sparse file read as zeros), no discard pass (the file is
/// new), 4 KiB blocks (page-sized I/O through the loop device), and the root directory owned
/// by the sandbox's root so it can create the overlay's directories.
pub fn mkfs_args(image: &Path, owner: u32) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = [
        "-q",
        "-F",
        "-t",
        "ext4",
        "-b",
        "4096",
        "-m",
        "0",
        "-O",
        "^has_journal",
    ]
    .iter()
    .map(Into::into)
    .collect();
    args.push("-E".into());
    args.push(format!("lazy_itable_init=1,nodiscard,root_owner={owner}:{owner}").into());
    args.push(image.as_os_str().to_os_string());
    args
}

/// Create the sparse image `image` of `size_mb` MiB and format it. An existing file is never
/// touched; on error the new file is removed again.
pub fn create_image(
    mkfs: &Path,
    image: &Path,
    size_mb: u64,
    owner: u32,
) -> Result<File, DiskError> {
    if size_mb == 0 || size_mb > MAX_DISK_MB {
        return Err(DiskError::BadSize(size_mb));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)
        .map_err(io_err(format!("creating {}", image.display())))?;
    let formatted = size_and_format(mkfs, &file, image, size_mb, owner);
    if formatted.is_err() {
        let _ = std::fs::remove_file(image);
    }
    formatted.map(|()| file)
}

fn size_and_format(
    mkfs: &Path,
    file: &File,
    image: &Path,
    size_mb: u64,
    owner: u32,
) -> Result<(), DiskError> {
    file.set_len(size_mb << 20)
        .map_err(io_err(format!("sizing {}", image.display())))?;
    let out = Command::new(mkfs)
        .args(mkfs_args(image, owner))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(io_err(format!("running {}", mkfs.display())))?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if text.len() > MAX_MKFS_OUTPUT {
            let mut cut = MAX_MKFS_OUTPUT;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        return Err(DiskError::Mkfs {
            image: image.to_path_buf(),
            status: out.status.to_string(),
            output: text,
        });
    }
    Ok(())
}

fn open_rw(path: &Path) -> io::Result<OwnedFd> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    Ok(OwnedFd::from(f))
}

/// The device path of loop device `index` under `dev_root`.
pub fn loop_device(dev_root: &Path, index: u32) -> PathBuf {
    dev_root.join(format!("loop{index}"))
}

/// Bind `backing` to a free loop device (autoclear, direct I/O when the backing filesystem
/// allows it). Returns the index and an open descriptor of the device.
pub fn attach_loop(
    dev_root: &Path,
    backing: &File,
    backing_path: &Path,
) -> Result<(u32, OwnedFd), DiskError> {
    let ctl_path = dev_root.join("loop-control");
    let ctl = open_rw(&ctl_path).map_err(io_err(format!("opening {}", ctl_path.display())))?;
    let fd = u32::try_from(backing.as_raw_fd()).map_err(|_| DiskError::Io {
        context: "backing file descriptor".into(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    let mut name = [0u8; 64];
    for (dst, src) in name
        .iter_mut()
        .zip(backing_path.as_os_str().as_bytes().iter().take(63))
    {
        *dst = *src;
    }
    for _ in 0..LOOP_ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns an index or -1.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(DiskError::Io {
                context: "asking /dev/loop-control for a free loop device".into(),
                source: io::Error::last_os_error(),
            });
        }
        let index = u32::try_from(n).unwrap_or(0);
        let dev_path = loop_device(dev_root, index);
        let dev = match open_rw(&dev_path) {
            Ok(d) => d,
            // removed again by someone else between GET_FREE and open
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(DiskError::Io {
                    context: format!("opening {}", dev_path.display()),
                    source,
                });
            }
        };
        let mut flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO;
        loop {
            let config = LoopConfig {
                fd,
                block_size: 0,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: 0,
                    lo_sizelimit: 0,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: flags,
                    lo_file_name: name,
                    lo_crypt_name: [0; 64],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            // SAFETY: LOOP_CONFIGURE reads a `struct loop_config` that lives for the call.
            let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &config) };
            if r == 0 {
                return Ok((index, dev));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // direct I/O not possible on the backing filesystem: buffered instead
                Some(libc::EINVAL) if flags & LO_FLAGS_DIRECT_IO != 0 => {
                    flags &= !LO_FLAGS_DIRECT_IO;
                }
                // someone else bound it first
                Some(libc::EBUSY) => break,
                _ => {
                    return Err(DiskError::Io {
                        context: format!("binding {}", dev_path.display()),
                        source: e,
                    });
                }
            }
        }
    }
    Err(DiskError::NoFreeLoop(LOOP_ATTEMPTS))
}

/// The kernel's message log of a mount context (": msg; msg"), bounded; empty if none.
fn fs_context_log(fsfd: &OwnedFd) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    for _ in 0..8 {
        // SAFETY: reading into a live stack buffer from a descriptor we own.
        let n = unsafe { libc::read(fsfd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(n) = usize::try_from(n) else { break };
        if n == 0 {
            break;
        }
        let msg = String::from_utf8_lossy(buf.get(..n).unwrap_or_default())
            .trim()
            .to_string();
        out.push(msg);
    }
    if out.is_empty() {
        String::new()
    } else {
        format!(": {}", out.join("; "))
    }
}

fn fsconfig(fsfd: &OwnedFd, cmd: c_uint, key: Option<&CStr>, value: Option<&CStr>) -> c_int {
    // SAFETY: fsconfig with NUL-terminated key/value strings (or NULL) that live for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fsfd.as_raw_fd(),
            cmd,
            key.map_or(std::ptr::null(), CStr::as_ptr),
            value.map_or(std::ptr::null(), CStr::as_ptr),
            0,
        )
    };
    c_int::try_from(r).unwrap_or(-1)
}

/// Mount the ext4 filesystem on `device` as a detached mount (nosuid, nodev).
pub fn mount_detached(device: &Path) -> Result<OwnedFd, DiskError> {
    let dev_name = device.display().to_string();
    let fail = |step: &'static str, log: String, source: io::Error| DiskError::Mount {
        device: dev_name.clone(),
        step,
        log,
        source,
    };
    let dev = CString::new(device.as_os_str().as_bytes()).map_err(|_| {
        fail(
            "naming the device",
            String::new(),
            io::ErrorKind::InvalidInput.into(),
        )
    })?;
    // SAFETY: fsopen with a NUL-terminated filesystem name.
    let r = unsafe { libc::syscall(libc::SYS_fsopen, c"ext4".as_ptr(), FSOPEN_CLOEXEC) };
    if r < 0 {
        return Err(fail("fsopen", String::new(), io::Error::last_os_error()));
    }
    // SAFETY: fsopen returned a new descriptor owned by nobody else.
    let fsfd = unsafe { OwnedFd::from_raw_fd(c_int::try_from(r).unwrap_or(-1)) };
    let steps: [(&'static str, c_uint, Option<&CStr>, Option<&CStr>); 3] = [
        (
            "setting the source",
            FSCONFIG_SET_STRING,
            Some(c"source"),
            Some(&dev),
        ),
        (
            "noinit_itable",
            FSCONFIG_SET_FLAG,
            Some(c"noinit_itable"),
            None,
        ),
        ("creating the superblock", FSCONFIG_CMD_CREATE, None, None),
    ];
    for (step, cmd, key, value) in steps {
        if fsconfig(&fsfd, cmd, key, value) != 0 {
            let e = io::Error::last_os_error();
            return Err(fail(step, fs_context_log(&fsfd), e));
        }
    }
    // SAFETY: fsmount on the configured context descriptor.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fsfd.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(fail("fsmount", fs_context_log(&fsfd), e));
    }
    // SAFETY: fsmount returned a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(c_int::try_from(r).unwrap_or(-1)) })
}

/// Build a sandbox's writable layer: create and format `image` (`size_mb` MiB, root
/// directory owned by `owner`), bind it to a loop device, unlink it, mount it detached.
/// On error nothing is left behind (the image is removed, the loop device autoclears when
/// its descriptor closes).
pub fn prepare(
    mkfs: &Path,
    dev_root: &Path,
    image: &Path,
    size_mb: u64,
    owner: u32,
) -> Result<WritableDisk, DiskError> {
    let file = create_image(mkfs, image, size_mb, owner)?;
    let attached = attach_loop(dev_root, &file, image);
    drop(file);
    // The loop device holds the file open now (or we failed): the name is no longer needed.
    if let Err(e) = std::fs::remove_file(image)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("removing {}: {e}", image.display());
    }
    let (index, dev) = attached?;
    let mount = mount_detached(&loop_device(dev_root, index))?;
    // The mount holds the block device; our descriptor may go (autoclear then waits for the
    // mount).
    drop(dev);
    Ok(WritableDisk {
        loop_ref: LoopRef {
            index,
            backing: image.to_path_buf(),
        },
        mount,
    })
}

/// Parse a sysfs `loop/backing_file` value (drops the newline and a " (deleted)" suffix).
pub fn parse_backing_file(raw: &str) -> PathBuf {
    let s = raw.strip_suffix('\n').unwrap_or(raw);
    PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(s))
}

/// The backing file of loop device `index`, or `None` when it is not bound (`sys_root` =
/// `/sys`).
pub fn backing_file(sys_root: &Path, index: u32) -> Option<PathBuf> {
    let p = sys_root.join(format!("block/loop{index}/loop/backing_file"));
    std::fs::read_to_string(p)
        .ok()
        .map(|s| parse_backing_file(&s))
}

/// Every bound loop device whose backing file lies under `dir` (`sys_root` = `/sys`).
pub fn loops_under(sys_root: &Path, dir: &Path) -> io::Result<Vec<LoopRef>> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(sys_root.join("block")) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(index) = name
            .to_str()
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(backing) = backing_file(sys_root, index)
            && backing.starts_with(&dir)
        {
            out.push(LoopRef { index, backing });
        }
    }
    out.sort_by_key(|l| l.index);
    Ok(out)
}

/// Whether `l` is still bound to the same image.
pub fn still_bound(sys_root: &Path, l: &LoopRef) -> bool {
    backing_file(sys_root, l.index).is_some_and(|b| b == l.backing)
}

/// Wait until `l` is no longer bound to its image (the kernel releases it when the
/// sandbox's mount namespace dies). Returns whether it was released within `timeout`.
pub fn wait_released(sys_root: &Path, l: &LoopRef, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(200);
    loop {
        if !still_bound(sys_root, l) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Ask the kernel to detach loop device `index` (`LOOP_CLR_FD`). If it is still mounted
/// somewhere the kernel only arms autoclear; a device that is already free is fine.
pub fn detach_loop(dev_root: &Path, index: u32) -> io::Result<()> {
    let fd = match open_rw(&loop_device(dev_root, index)) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    // SAFETY: LOOP_CLR_FD takes no argument.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), LOOP_CLR_FD, 0) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENXIO) {
            return Err(e);
        }
    }
    Ok(())
}

/// Release every loop device bound to an image under `dir` (the reaper after a crash):
/// give the kernel `grace` to release them by itself (their sandboxes were just killed),
/// then detach what is left. Returns how many were found and how many are still bound.
pub fn release_under(
    sys_root: &Path,
    dev_root: &Path,
    dir: &Path,
    grace: Duration,
) -> io::Result<(usize, usize)> {
    let found = loops_under(sys_root, dir)?;
    let deadline = Instant::now() + grace;
    let mut left = 0;
    for l in &found {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait_released(sys_root, l, wait) {
            continue;
        }
        if let Err(e) = detach_loop(dev_root, l.index) {
            tracing::warn!(
                loop_index = l.index,
                "detaching an orphaned loop device: {e}"
            );
        }
        if still_bound(sys_root, l) {
            left += 1;
        }
    }
    Ok((found.len(), left))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    #[test]
    fn loop_structs_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn image_names_are_random_and_in_the_data_dir() {
        let a = image_path(Path::new("/d")).expect("name");
        let b = image_path(Path::new("/d")).expect("name");
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("/d")));
        let name = a.file_name().and_then(|n| n.to_str()).expect("utf-8");
        assert!(
            name.starts_with(IMAGE_PREFIX) && name.ends_with(".img"),
            "{name}"
        );
        assert_eq!(name.len(), IMAGE_PREFIX.len() + 24 + 4);
    }

    #[test]
    fn backing_file_values_are_parsed() {
        assert_eq!(
            parse_backing_file("/var/lib/cella/sandboxes/ab/disk.img (deleted)\n"),
            PathBuf::from("/var/lib/cella/sandboxes/ab/disk.img")
        );
        assert_eq!(parse_backing_file("/x/y\n"), PathBuf::from("/x/y"));
        assert_eq!(parse_backing_file("/x/y"), PathBuf::from("/x/y"));
    }

    fn fake_loop(sys: &Path, index: u32, backing: Option<&str>) {
        let d = sys.join(format!("block/loop{index}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        if let Some(b) = backing {
            std::fs::create_dir_all(d.join("loop")).expect("mkdir");
            std::fs::write(d.join("loop/backing_file"), format!("{b}\n")).expect("write");
        }
    }

    #[test]
    fn loops_are_found_by_backing_directory() {
        let tmp = tempfile::tempdir().expect("tmp");
        let sys = tmp.path().join("sys");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).expect("mkdir");
        let data_s = std::fs::canonicalize(&data)
            .expect("canonical")
            .display()
            .to_string();
        fake_loop(&sys, 0, Some("/var/lib/other/disk.img"));
        fake_loop(&sys, 1, None);
        fake_loop(&sys, 3, Some(&format!("{data_s}/a1/disk.img (deleted)")));
        fake_loop(&sys, 12, Some(&format!("{data_s}/b2/disk.img")));
        fake_loop(&sys, 13, Some(&format!("{data_s}x/c3/disk.img")));
        std::fs::create_dir_all(sys.join("block/vda")).expect("mkdir");
        let found = loops_under(&sys, &data).expect("scan");
        assert_eq!(
            found,
            vec![
                LoopRef {
                    index: 3,
                    backing: PathBuf::from(format!("{data_s}/a1/disk.img"))
                },
                LoopRef {
                    index: 12,
                    backing: PathBuf::from(format!("{data_s}/b2/disk.img"))
                },
            ]
        );
        assert!(still_bound(&sys, &found[0]));
        assert_eq!(
            read_all(&sys.join("block/loop0/loop/backing_file")),
            "/var/lib/other/disk.img\n"
        );
        // reused by another image: no longer "ours"
        fake_loop(&sys, 3, Some("/elsewhere/disk.img"));
        assert!(!still_bound(&sys, &found[0]));
        assert!(wait_released(&sys, &found[0], Duration::ZERO));
        // unbound: the attribute disappears
        std::fs::remove_dir_all(sys.join("block/loop12/loop")).expect("rm");
        assert!(wait_released(&sys, &found[1], Duration::from_millis(50)));
        // no /sys/block at all: nothing found, no error
        assert!(
            loops_under(&tmp.path().join("nosys"), &data)
                .expect("scan")
                .is_empty()
        );
    }

    #[test]
    fn a_bound_loop_is_waited_for_until_the_deadline() {
        let tmp = tempfile::tempdir().expect("tmp");
        let sys = tmp.path().join("sys");
        fake_loop(&sys, 5, Some("/d/x/disk.img (deleted)"));
        let l = LoopRef {
            index: 5,
            backing: PathBuf::from("/d/x/disk.img"),
        };
        assert!(!wait_released(&sys, &l, Duration::from_millis(20)));
        // release_under with a fake /dev that has no loop5: detach is a no-op, still bound
        let (found, left) = release_under(
            &sys,
            &tmp.path().join("dev"),
            Path::new("/d"),
            Duration::ZERO,
        )
        .expect("release");
        assert_eq!((found, left), (1, 1));
    }

    #[test]
    fn mkfs_arguments_are_deliberate() {
        let args: Vec<String> = mkfs_args(Path::new("/d/x/disk.img"), 100_000)
            .into_iter()
            .map(|a| a.to_string_lossy().to_string())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-O ^has_journal"), "{joined}");
        assert!(joined.contains("-m 0"), "{joined}");
        assert!(joined.contains("root_owner=100000:100000"), "{joined}");
        assert!(joined.contains("lazy_itable_init=1"), "{joined}");
        assert_eq!(args.last().map(String::as_str), Some("/d/x/disk.img"));
    }

    #[test]
    fn sizes_are_bounded_before_touching_the_disk() {
        let tmp = tempfile::tempdir().expect("tmp");
        let img = tmp.path().join("disk.img");
        for bad in [0, MAX_DISK_MB + 1, u64::MAX] {
            assert!(matches!(
                create_image(Path::new("/nonexistent/mkfs"), &img, bad, 1),
                Err(DiskError::BadSize(_))
            ));
        }
        assert!(!img.exists());
    }

    #[test]
    fn mkfs_and_loop_control_are_located() {
        let tmp = tempfile::tempdir().expect("tmp");
        assert!(matches!(
            probe_loop(tmp.path()),
            Err(DiskError::NoLoopControl(_))
        ));
        std::fs::write(tmp.path().join("loop-control"), "").expect("write");
        probe_loop(tmp.path()).expect("present");
        let bin = tmp.path().join("bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        std::fs::write(bin.join("mkfs.ext4"), "").expect("write");
        let found = find_mkfs(Some(bin.as_os_str())).expect("found");
        assert!(found.ends_with("mkfs.ext4"));
        if !MKFS_CANDIDATES.iter().any(|c| Path::new(c).is_file()) {
            assert_eq!(found, bin.join("mkfs.ext4"));
            assert!(matches!(
                find_mkfs(Some(tmp.path().join("empty").as_os_str())),
                Err(DiskError::MkfsMissing { .. })
            ));
        }
    }
}
