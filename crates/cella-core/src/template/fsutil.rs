//! Filesystem work on root filesystem trees: the UID/GID shift, sizes, copies, and removing
//! trees safely.
//!
//! The shift is why templates are safe to use as an overlay lower layer: sandboxes run in a
//! user namespace that maps inside 0..65536 to host [`SANDBOX_ID_BASE`](crate::driver::SANDBOX_ID_BASE).., so the stored tree
//! is owned by the shifted IDs and nothing in it is owned by host root. `chown` clears the
//! setuid/setgid bits (that is how `sudo` would lose its setuid bit), so modes are restored
//! after each change.
//!
//! Removal checks `/proc/self/mountinfo` first: a build that crashed with `proc` mounted in its
//! chroot must not make a later cleanup recurse into a live mount.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::TemplateError;
use crate::driver::SANDBOX_ID_COUNT;

/// What a walk over a tree saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeStats {
    /// Directory entries visited (hard links counted once).
    pub entries: u64,
    /// Disk usage in bytes (allocated blocks, hard links counted once).
    pub bytes: u64,
}

/// Re-own every entry under `root` (included; symlinks themselves, never their targets) from
/// the ID range starting at `from_base` to the same offset in the range starting at
/// `to_base`: `shift_ids(tree, 0, 100_000)` stores a tree for sandboxes,
/// `shift_ids(tree, 100_000, 0)` takes it back. Entries on other filesystems (mount points)
/// are not entered. setuid/setgid bits are restored after the chown.
///
/// Fails, leaving the tree partly shifted, if an entry is owned by an ID outside
/// `from_base..from_base + 65536`.
pub fn shift_ids(root: &Path, from_base: u32, to_base: u32) -> Result<TreeStats, TemplateError> {
    let shift = |id: u32, what: &str, path: &Path| -> Result<u32, TemplateError> {
        id.checked_sub(from_base)
            .filter(|offset| *offset < SANDBOX_ID_COUNT)
            .map(|offset| to_base + offset)
            .ok_or_else(|| {
                TemplateError::Build(format!(
                    "{} is owned by {what} {id}, outside the range {from_base}..{} being shifted",
                    path.display(),
                    u64::from(from_base) + u64::from(SANDBOX_ID_COUNT)
                ))
            })
    };
    walk(root, |path, meta| {
        let uid = shift(meta.uid(), "uid", path)?;
        let gid = shift(meta.gid(), "gid", path)?;
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(|e| TemplateError::io(format!("chown {}", path.display()), e))?;
        let mode = meta.mode();
        if !meta.file_type().is_symlink() && mode & 0o6000 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| TemplateError::io(format!("chmod {}", path.display()), e))?;
        }
        Ok(())
    })
}

/// Disk usage of the tree under `root` (same rules as [`shift_ids`]).
pub fn tree_stats(root: &Path) -> Result<TreeStats, TemplateError> {
    walk(root, |_, _| Ok(()))
}

/// Depth-first walk without following symlinks or crossing filesystems; `visit` sees every
/// inode once (hard links after the first are skipped).
fn walk(
    root: &Path,
    mut visit: impl FnMut(&Path, &std::fs::Metadata) -> Result<(), TemplateError>,
) -> Result<TreeStats, TemplateError> {
    let root_meta = std::fs::symlink_metadata(root)
        .map_err(|e| TemplateError::io(format!("stat {}", root.display()), e))?;
    let dev = root_meta.dev();
    let mut stats = TreeStats::default();
    let mut seen_links: HashSet<(u64, u64)> = HashSet::new();
    let mut stack: Vec<(PathBuf, std::fs::Metadata)> = vec![(root.to_path_buf(), root_meta)];
    while let Some((path, meta)) = stack.pop() {
        if meta.dev() != dev {
            continue;
        }
        if !meta.is_dir() && meta.nlink() > 1 && !seen_links.insert((meta.dev(), meta.ino())) {
            continue;
        }
        stats.entries += 1;
        stats.bytes += meta.blocks() * 512;
        visit(&path, &meta)?;
        if meta.is_dir() {
            let entries = std::fs::read_dir(&path)
                .map_err(|e| TemplateError::io(format!("read {}", path.display()), e))?;
            for entry in entries {
                let entry =
                    entry.map_err(|e| TemplateError::io(format!("read {}", path.display()), e))?;
                let child = entry.path();
                let child_meta = std::fs::symlink_metadata(&child)
                    .map_err(|e| TemplateError::io(format!("stat {}", child.display()), e))?;
                stack.push((child, child_meta));
            }
        }
    }
    Ok(stats)
}

/// Mount points at or below `dir`, deepest first, from a `mountinfo` file
/// (`/proc/self/mountinfo`). `dir` must be absolute and canonical, as mountinfo paths are.
pub fn mounts_under(mountinfo: &Path, dir: &Path) -> Result<Vec<PathBuf>, TemplateError> {
    let text = std::fs::read_to_string(mountinfo)
        .map_err(|e| TemplateError::io(format!("read {}", mountinfo.display()), e))?;
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|mount_point| mount_point.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(value) = u8::try_from(value) {
                    out.push(value);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmount everything mounted at or below `dir` (lazily if a normal unmount fails).
pub fn unmount_all_under(mountinfo: &Path, dir: &Path) -> Result<(), TemplateError> {
    for mount_point in mounts_under(mountinfo, dir)? {
        unmount(&mount_point)?;
    }
    Ok(())
}

/// Unmount `target`; falls back to a lazy unmount when it is busy.
pub fn unmount(target: &Path) -> Result<(), TemplateError> {
    let status = |args: &[&str]| {
        Command::new("umount")
            .args(args)
            .arg(target)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
    };
    match status(&[]) {
        Ok(s) if s.success() => return Ok(()),
        _ => {}
    }
    match status(&["-l"]) {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(TemplateError::Build(format!(
            "umount -l {} failed ({s})",
            target.display()
        ))),
        Err(e) => Err(TemplateError::io("run umount", e)),
    }
}

/// Remove the tree at `dir` (if it exists) after unmounting anything mounted inside it.
/// Refuses when a mount is still there afterwards, rather than deleting through it.
pub fn remove_tree(mountinfo: &Path, dir: &Path) -> Result<(), TemplateError> {
    let dir = match dir.canonicalize() {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TemplateError::io(format!("resolve {}", dir.display()), e)),
    };
    if mountinfo.exists() {
        unmount_all_under(mountinfo, &dir)?;
        if let Some(left) = mounts_under(mountinfo, &dir)?.first() {
            return Err(TemplateError::Build(format!(
                "{} is still mounted; not removing {}",
                left.display(),
                dir.display()
            )));
        }
    }
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TemplateError::io(format!("remove {}", dir.display()), e)),
    }
}

/// Copy the tree `src` to `dst` (which must not exist) with `cp -a --reflink=auto`: owners,
/// modes, timestamps, hard links, xattrs; copy-on-write where the filesystem supports it.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<(), TemplateError> {
    let output = Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg("--")
        .arg(src)
        .arg(dst)
        .output()
        .map_err(|e| TemplateError::io("run cp", e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(TemplateError::Command {
            command: format!("cp -a {} {}", src.display(), dst.display()),
            status: output.status.to_string(),
            output: String::from_utf8_lossy(&output.stderr)
                .chars()
                .take(2000)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::SANDBOX_ID_BASE;

    fn is_root() -> bool {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::metadata(dir.path())
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
    }

    #[test]
    fn mountinfo_parsing_finds_nested_mounts_deepest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let info = dir.path().join("mountinfo");
        std::fs::write(
            &info,
            "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
             30 22 0:5 / /var/lib/cella/templates/base/.tmp-x/rootfs/proc rw - proc proc rw\n\
             31 22 0:6 / /var/lib/cella/templates/base/.tmp-x/rootfs/dev/pts rw - devpts devpts rw\n\
             32 22 0:7 / /var/lib/cella/templates/base/.tmp-xy rw - tmpfs tmpfs rw\n\
             33 22 0:8 / /var/lib/cella/templates/base/.tmp-x/with\\040space rw - tmpfs tmpfs rw\n",
        )
        .expect("write");
        let found =
            mounts_under(&info, Path::new("/var/lib/cella/templates/base/.tmp-x")).expect("parse");
        assert_eq!(
            found,
            [
                PathBuf::from("/var/lib/cella/templates/base/.tmp-x/rootfs/dev/pts"),
                PathBuf::from("/var/lib/cella/templates/base/.tmp-x/rootfs/proc"),
                PathBuf::from("/var/lib/cella/templates/base/.tmp-x/with space"),
            ]
        );
    }

    #[test]
    fn tree_stats_counts_hard_links_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("t");
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::write(root.join("a"), vec![7u8; 64 * 1024]).expect("write");
        std::fs::hard_link(root.join("a"), root.join("b")).expect("link");
        std::os::unix::fs::symlink("a", root.join("c")).expect("symlink");
        let stats = tree_stats(&root).expect("stats");
        assert_eq!(stats.entries, 3); // dir, a (b is the same inode), c
        assert!(stats.bytes >= 64 * 1024);
        assert!(
            stats.bytes < 2 * 64 * 1024 + 8192,
            "hard link counted twice: {stats:?}"
        );
    }

    #[test]
    fn remove_tree_removes_and_tolerates_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let info = dir.path().join("mountinfo");
        std::fs::write(&info, "22 1 254:0 / / rw - ext4 /dev/vda rw\n").expect("write");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).expect("mkdir");
        std::fs::write(tree.join("a/b/f"), "x").expect("write");
        remove_tree(&info, &tree).expect("remove");
        assert!(!tree.exists());
        remove_tree(&info, &tree).expect("missing is fine");
    }

    #[test]
    fn remove_tree_refuses_when_a_mount_remains() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("proc")).expect("mkdir");
        let canonical = tree.canonicalize().expect("canonical");
        // A fake mountinfo claims something is mounted there; umount fails on it (not a
        // mount, or not root), so the removal must be refused and the tree kept.
        let info = dir.path().join("mountinfo");
        std::fs::write(
            &info,
            format!(
                "30 22 0:5 / {}/proc rw - proc proc rw\n",
                canonical.display()
            ),
        )
        .expect("write");
        assert!(remove_tree(&info, &tree).is_err());
        assert!(tree.join("proc").exists());
    }

    #[test]
    fn shift_ids_round_trip_keeps_setuid_and_hard_links() {
        if !is_root() {
            eprintln!("skipping: shifting ownership needs root (chown)");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("rootfs");
        std::fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
        std::fs::create_dir_all(root.join("home/user")).expect("mkdir");
        let sudo = root.join("usr/bin/sudo");
        std::fs::write(&sudo, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&sudo, std::fs::Permissions::from_mode(0o4755)).expect("chmod");
        let sgid = root.join("usr/bin/wall");
        std::fs::write(&sgid, "x").expect("write");
        std::os::unix::fs::chown(&sgid, Some(0), Some(5)).expect("chown");
        std::fs::set_permissions(&sgid, std::fs::Permissions::from_mode(0o2755)).expect("chmod");
        std::fs::write(root.join("home/user/f"), "x").expect("write");
        std::os::unix::fs::chown(root.join("home/user"), Some(1000), Some(1000)).expect("chown");
        std::os::unix::fs::chown(root.join("home/user/f"), Some(1000), Some(1000)).expect("chown");
        std::fs::hard_link(root.join("home/user/f"), root.join("home/user/g")).expect("link");
        // A dangling symlink: lchown must act on the link, not follow it.
        std::os::unix::fs::symlink("/nonexistent", root.join("dangling")).expect("symlink");

        let base = SANDBOX_ID_BASE;
        shift_ids(&root, 0, base).expect("shift");
        let meta = |p: &Path| std::fs::symlink_metadata(p).expect("stat");
        assert_eq!(meta(&root).uid(), base);
        assert_eq!(meta(&sudo).uid(), base);
        assert_eq!(meta(&sudo).mode() & 0o7777, 0o4755, "setuid bit restored");
        assert_eq!(meta(&sgid).gid(), base + 5);
        assert_eq!(meta(&sgid).mode() & 0o7777, 0o2755, "setgid bit restored");
        let f = meta(&root.join("home/user/f"));
        assert_eq!(
            (f.uid(), f.gid()),
            (base + 1000, base + 1000),
            "hard link shifted once"
        );
        assert_eq!(meta(&root.join("dangling")).uid(), base);

        // Already shifted: shifting from 0 again must fail, not double-shift.
        assert!(shift_ids(&root, 0, base).is_err());
        // Reset the partial damage of the failed call is not needed: it fails on the root
        // entry before changing anything.
        assert_eq!(meta(&root).uid(), base);

        shift_ids(&root, base, 0).expect("unshift");
        assert_eq!(meta(&sudo).uid(), 0);
        assert_eq!(meta(&sudo).mode() & 0o7777, 0o4755);
        assert_eq!(meta(&root.join("home/user/g")).uid(), 1000);
    }
}
