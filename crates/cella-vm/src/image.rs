//! Disk images: one ext4 image per template build (cached), one qcow2 overlay per sandbox.
//!
//! Why: a VM cannot share the host's directory tree the way a jail's overlayfs does, and
//! copying a template per sandbox would cost seconds and hundreds of MiB. So each template
//! build becomes an ext4 image once, and every sandbox boots from a thin qcow2 overlay whose
//! backing file is that image: creating it is a few KiB and milliseconds, writes stay in the
//! overlay, and deleting the overlay deletes every trace of the sandbox's disk.
//!
//! Ownership: template trees are stored shifted by [`SANDBOX_ID_BASE`] (the jail maps them
//! back with a user namespace). A guest kernel has no such mapping, so the image is made from
//! an *unshifted* copy: every uid/gid in `BASE..BASE+COUNT` becomes `id - BASE`; set-id bits
//! that `chown` clears are restored. The agent binary is copied in as `/.cella/agent`. The
//! cache key is template name + build id + the agent's hash, so a new agent means a new image.
//!
//! ```text
//! <data_dir>/images/<name>-<build_id>-<agent16>.ext4     0640 root:<vm gid>  (read-only use)
//! <data_dir>/images/.tmp-<pid>-<n>/                      work dir, removed on success/failure
//! <data_dir>/sandboxes/<id>/disk.qcow2                   backing = the image, size = image + disk_mb
//! ```
//!
//! [`SANDBOX_ID_BASE`]: cella_core::driver::SANDBOX_ID_BASE

use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use cella_core::driver::{SANDBOX_ID_BASE, SANDBOX_ID_COUNT};
use sha2::{Digest, Sha256};

/// Free space added to every image on top of the template's contents (the sandbox's own
/// `disk_mb` comes on top of this via the overlay's size and an online resize in the guest).
const IMAGE_SLACK_BYTES: u64 = 64 << 20;

/// Errors of image handling.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An external tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The program.
        tool: String,
        /// Its exit status.
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

/// Run a command, turning a failure into [`ImageError::Tool`] with the tail of its stderr.
pub(crate) fn run_tool(cmd: &mut Command) -> Result<(), ImageError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(io_ctx(format!("running {tool}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr
        .chars()
        .rev()
        .take(600)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(ImageError::Tool {
        tool,
        status: out.status.to_string(),
        stderr: tail.trim().to_string(),
    })
}

/// First 16 hex digits of the SHA-256 of a file.
pub fn file_hash16(path: &Path) -> Result<String, ImageError> {
    let mut f = std::fs::File::open(path).map_err(io_ctx(format!("opening {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io_ctx(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(buf.get(..n).unwrap_or_default());
    }
    let digest = hex::encode(h.finalize());
    Ok(digest.chars().take(16).collect())
}

/// A file name component made of `[A-Za-z0-9._-]`, or a hash of the input if it has others.
fn safe_component(s: &str) -> String {
    if !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        s.to_string()
    } else {
        let d = hex::encode(Sha256::digest(s.as_bytes()));
        d.chars().take(16).collect()
    }
}

/// The cache file name of an image.
pub fn image_name(template: &str, build_id: &str, agent_hash: &str) -> String {
    format!(
        "{}-{}-{}.ext4",
        safe_component(template),
        safe_component(build_id),
        safe_component(agent_hash)
    )
}

/// Map a shifted id back to the guest's view; ids outside the sandbox range stay.
pub fn unshift(id: u32) -> u32 {
    if (SANDBOX_ID_BASE..SANDBOX_ID_BASE.saturating_add(SANDBOX_ID_COUNT)).contains(&id) {
        id - SANDBOX_ID_BASE
    } else {
        id
    }
}

/// What walking a tree found (for sizing the image).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeUsage {
    /// Sum of file sizes rounded up to 4 KiB blocks.
    pub bytes: u64,
    /// Number of entries.
    pub inodes: u64,
}

/// Unshift the owners of every entry under `root` (not following symlinks), keeping set-id
/// bits, and measure the tree.
pub fn unshift_tree(root: &Path) -> Result<TreeUsage, ImageError> {
    let mut usage = TreeUsage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)
            .map_err(io_ctx(format!("inspecting {}", path.display())))?;
        usage.inodes += 1;
        usage.bytes += meta.len().div_ceil(4096) * 4096;
        let (uid, gid) = (unshift(meta.uid()), unshift(meta.gid()));
        if (uid, gid) != (meta.uid(), meta.gid()) {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
                .map_err(io_ctx(format!("chown {}", path.display())))?;
            if !meta.file_type().is_symlink() && meta.mode() & 0o6000 != 0 {
                std::fs::set_permissions(
                    &path,
                    std::fs::Permissions::from_mode(meta.mode() & 0o7777),
                )
                .map_err(io_ctx(format!("chmod {}", path.display())))?;
            }
        }
        if meta.is_dir() {
            for entry in
                std::fs::read_dir(&path).map_err(io_ctx(format!("listing {}", path.display())))?
            {
                let entry = entry.map_err(io_ctx(format!("listing {}", path.display())))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

/// Size of the ext4 image for a tree: contents plus 25 % for metadata, plus slack, in MiB
/// granularity.
pub fn image_size_bytes(usage: TreeUsage) -> u64 {
    let raw = usage.bytes + usage.inodes * 256 + usage.bytes / 4 + IMAGE_SLACK_BYTES;
    raw.div_ceil(1 << 20) * (1 << 20)
}

/// Tools the image code runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageTools {
    /// `mkfs.ext4`.
    pub mkfs_ext4: PathBuf,
    /// `qemu-img`.
    pub qemu_img: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Build (or find) the image of a template build. Blocking; callers serialise builds.
pub fn ensure_image(
    tools: &ImageTools,
    images_dir: &Path,
    rootfs: &Path,
    image_file: &str,
    agent: &Path,
    gid: Option<u32>,
) -> Result<PathBuf, ImageError> {
    let target = images_dir.join(image_file);
    if target.is_file() {
        return Ok(target);
    }
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let work = images_dir.join(format!(".tmp-{}-{n}", std::process::id()));
    let result = build_image(tools, &work, rootfs, agent, gid, &target);
    if let Err(e) = std::fs::remove_dir_all(&work)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("removing {}: {e}", work.display());
    }
    result.map(|()| target)
}

fn build_image(
    tools: &ImageTools,
    work: &Path,
    rootfs: &Path,
    agent: &Path,
    gid: Option<u32>,
    target: &Path,
) -> Result<(), ImageError> {
    std::fs::create_dir(work).map_err(io_ctx(format!("creating {}", work.display())))?;
    let tree = work.join("root");
    let mut src = rootfs.as_os_str().to_os_string();
    src.push("/.");
    run_tool(Command::new("cp").arg("-a").arg("--").arg(&src).arg(&tree))?;
    let cella = tree.join(".cella");
    match std::fs::create_dir(&cella) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_ctx(format!("creating {}", cella.display()))(e)),
    }
    let agent_dst = cella.join("agent");
    std::fs::copy(agent, &agent_dst).map_err(io_ctx(format!("copying {}", agent.display())))?;
    std::fs::set_permissions(&agent_dst, std::fs::Permissions::from_mode(0o755))
        .map_err(io_ctx("chmod the agent"))?;
    let usage = unshift_tree(&tree)?;
    // The agent and /.cella are root's inside the guest (they were created by host root).
    std::os::unix::fs::lchown(&cella, Some(0), Some(0)).map_err(io_ctx("chown /.cella"))?;
    std::os::unix::fs::lchown(&agent_dst, Some(0), Some(0)).map_err(io_ctx("chown the agent"))?;

    let img = work.join("image.ext4");
    let f = std::fs::File::create(&img).map_err(io_ctx(format!("creating {}", img.display())))?;
    f.set_len(image_size_bytes(usage))
        .map_err(io_ctx(format!("sizing {}", img.display())))?;
    drop(f);
    let inodes = usage.inodes.saturating_mul(2).saturating_add(16_384);
    run_tool(
        Command::new(&tools.mkfs_ext4)
            .args([
                "-q",
                "-F",
                "-m",
                "0",
                "-O",
                "^has_journal",
                "-L",
                "cella-root",
            ])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-d")
            .arg(&tree)
            .arg(&img),
    )?;
    std::os::unix::fs::lchown(&img, Some(0), gid).map_err(io_ctx("chown the image"))?;
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o640))
        .map_err(io_ctx("chmod the image"))?;
    std::fs::rename(&img, target).map_err(io_ctx(format!("installing {}", target.display())))
}

/// Create a sandbox's qcow2 overlay on top of `base` (format `base_format`: `raw` for a
/// template image, `qcow2` for a snapshot's disk), `size_bytes` large.
pub fn create_overlay(
    tools: &ImageTools,
    base: &Path,
    base_format: &str,
    dest: &Path,
    size_bytes: u64,
) -> Result<(), ImageError> {
    run_tool(
        Command::new(&tools.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-F", base_format, "-b"])
            .arg(base)
            .arg(dest)
            .arg(size_bytes.to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_unshift_only_inside_the_range() {
        assert_eq!(unshift(SANDBOX_ID_BASE), 0);
        assert_eq!(unshift(SANDBOX_ID_BASE + 1000), 1000);
        assert_eq!(
            unshift(SANDBOX_ID_BASE + SANDBOX_ID_COUNT - 1),
            SANDBOX_ID_COUNT - 1
        );
        assert_eq!(
            unshift(SANDBOX_ID_BASE + SANDBOX_ID_COUNT),
            SANDBOX_ID_BASE + SANDBOX_ID_COUNT
        );
        assert_eq!(unshift(0), 0);
        assert_eq!(unshift(65534), 65534);
    }

    #[test]
    fn image_names_are_safe_and_distinct() {
        assert_eq!(
            image_name("base", "af02", "0123abcd"),
            "base-af02-0123abcd.ext4"
        );
        let evil = image_name("../../etc", "x/y", "z");
        assert!(!evil.contains('/'), "{evil}");
        assert_ne!(image_name("a", "1", "h1"), image_name("a", "1", "h2"));
    }

    #[test]
    fn sizes_round_to_mib_and_leave_room() {
        let u = TreeUsage {
            bytes: 300 << 20,
            inodes: 12_000,
        };
        let s = image_size_bytes(u);
        assert_eq!(s % (1 << 20), 0);
        assert!(s >= (300 << 20) + IMAGE_SLACK_BYTES, "{s}");
        assert!(s < 500 << 20, "{s}");
    }

    #[test]
    fn hash_is_of_contents() {
        let tmp = tempfile::tempdir().expect("tmp");
        let a = tmp.path().join("a");
        std::fs::write(&a, b"agent v1").expect("write");
        let h1 = file_hash16(&a).expect("hash");
        assert_eq!(h1.len(), 16);
        std::fs::write(&a, b"agent v2").expect("write");
        assert_ne!(h1, file_hash16(&a).expect("hash"));
    }

    #[test]
    fn unshifting_a_tree() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: chown needs root");
            return;
        }
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("t");
        std::fs::create_dir_all(root.join("bin")).expect("mkdir");
        let suid = root.join("bin/su");
        std::fs::write(&suid, b"x").expect("write");
        std::os::unix::fs::symlink("bin/su", root.join("link")).expect("symlink");
        let base = SANDBOX_ID_BASE;
        for p in [&root, &root.join("bin"), &suid] {
            std::os::unix::fs::lchown(p, Some(base), Some(base + 5)).expect("chown");
        }
        std::os::unix::fs::lchown(root.join("link"), Some(base + 7), Some(base + 7))
            .expect("chown");
        std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).expect("chmod");
        let u = unshift_tree(&root).expect("unshift");
        assert_eq!(u.inodes, 4);
        let m = std::fs::metadata(&suid).expect("stat");
        assert_eq!((m.uid(), m.gid()), (0, 5));
        assert_eq!(m.mode() & 0o7777, 0o4755, "set-uid bit kept");
        let l = std::fs::symlink_metadata(root.join("link")).expect("stat");
        assert_eq!((l.uid(), l.gid()), (7, 7));
    }
}
