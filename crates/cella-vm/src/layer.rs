//! Filesystem snapshot layers: what `snapshot_filesystem` writes and what a create with
//! `TemplateImage::layers` boots from.
//!
//! A layer is a directory holding one qcow2 file whose backing file is the template build's
//! raw ext4 image (`images/<tpl>-<build>-<agent>.ext4`), and nothing else: never the golden
//! snapshot disk (`snapshots/<key>/disk.qcow2`, rebuilt whenever its key changes) and never
//! another layer. A sandbox's overlay can sit on a chain (overlay -> golden disk -> image, or
//! overlay -> layer -> image); the snapshot flattens that chain down to depth 1 on the image
//! with `qemu-img rebase` (safe mode: it writes every cluster where the old chain and the
//! image differ). So a layer survives server restarts, snapshot rebuilds and deletion of the
//! layers it was made from, and a snapshot of a sandbox created from a layer is again one
//! qcow2 on the image.
//!
//! The images are never garbage collected by this driver (a new agent makes a new image and
//! leaves the old one), so the image a layer names stays as long as the VM data directory.
//!
//! ```text
//! <layer>/disk.qcow2   0640 root:<vm gid>; backing file = the image (absolute path), raw
//! <layer>/layer.json   {"format", "base", "virtual_size", "template", "build_id"}
//! ```
//!
//! A sandbox created from a layer gets a hard link of `disk.qcow2` in its own directory as
//! its overlay's backing file (a copy when the layer is on another filesystem), so QEMU never
//! needs access to the directory the manager keeps layers in.

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::image::ImageError;

/// The layer's disk.
pub const LAYER_DISK: &str = "disk.qcow2";
/// The layer's description.
pub const LAYER_META: &str = "layer.json";
/// Value of `format` in [`LAYER_META`]; bump when the layout changes.
pub const LAYER_FORMAT: &str = "cella-vm-layer-1";

/// A memory snapshot's migration stream (guest RAM and device state), next to the disk.
pub const LAYER_MEMORY: &str = "memory";
/// What the stream was saved from ([`MachineMeta`]).
pub const LAYER_MACHINE: &str = "machine.json";
/// Value of `format` in [`LAYER_MACHINE`].
pub const MACHINE_FORMAT: &str = "cella-vm-machine-1";

/// What [`LAYER_MACHINE`] says: the machine a memory snapshot loads into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineMeta {
    /// The driver's machine key (QEMU, kernel, initramfs, vCPUs, RAM, device set).
    pub key: String,
    /// Whether the RAM was the named backend (a clone's) rather than QEMU's default.
    pub named_memory: bool,
}

/// Write [`LAYER_MACHINE`] into `dest` (synced).
pub fn write_machine(dest: &Path, meta: &MachineMeta) -> io::Result<()> {
    let v = serde_json::json!({
        "format": MACHINE_FORMAT,
        "key": meta.key,
        "named_memory": meta.named_memory,
    });
    let mut text = serde_json::to_vec_pretty(&v).unwrap_or_default();
    text.push(b'\n');
    write_synced(&dest.join(LAYER_MACHINE), &text)?;
    std::fs::File::open(dest).and_then(|d| d.sync_all())
}

/// The memory snapshot in layer `dir`: `Ok(None)` for a filesystem-only layer.
pub fn read_machine(dir: &Path) -> Result<Option<MachineMeta>, String> {
    let path = dir.join(LAYER_MACHINE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if v.get("format").and_then(|f| f.as_str()) != Some(MACHINE_FORMAT) {
        return Err(format!("{} is not {MACHINE_FORMAT}", path.display()));
    }
    if !dir.join(LAYER_MEMORY).is_file() {
        return Err(format!("{} has no {LAYER_MEMORY}", dir.display()));
    }
    Ok(Some(MachineMeta {
        key: v
            .get("key")
            .and_then(|k| k.as_str())
            .ok_or_else(|| format!("{} has no key", path.display()))?
            .to_string(),
        named_memory: v
            .get("named_memory")
            .and_then(|k| k.as_bool())
            .ok_or_else(|| format!("{} has no named_memory", path.display()))?,
    }))
}

/// What [`LAYER_META`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMeta {
    /// The raw template image the disk is backed by.
    pub base: PathBuf,
    /// Virtual size of the disk (the guest's filesystem fills it).
    pub virtual_size: u64,
    /// Template name.
    pub template: String,
    /// Template build ID.
    pub build_id: String,
}

impl LayerMeta {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "format": LAYER_FORMAT,
            "base": self.base.to_string_lossy(),
            "virtual_size": self.virtual_size,
            "template": self.template,
            "build_id": self.build_id,
        })
    }

    fn from_json(v: &serde_json::Value) -> Result<LayerMeta, String> {
        let field = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .ok_or_else(|| format!("{LAYER_META} has no {k}"))
        };
        let format = field("format")?;
        if format != LAYER_FORMAT {
            return Err(format!(
                "layer format {format:?} is not {LAYER_FORMAT:?} (made by another driver or version)"
            ));
        }
        Ok(LayerMeta {
            base: PathBuf::from(field("base")?),
            virtual_size: v
                .get("virtual_size")
                .and_then(|x| x.as_u64())
                .ok_or_else(|| format!("{LAYER_META} has no virtual_size"))?,
            template: field("template")?.to_string(),
            build_id: field("build_id")?.to_string(),
        })
    }
}

/// Read and check a layer directory: its description parses and its disk and the image it
/// names exist. Every failure says which file.
pub fn read_layer(dir: &Path) -> Result<LayerMeta, String> {
    if !dir.is_absolute() {
        return Err(format!(
            "snapshot layer {} is not an absolute path",
            dir.display()
        ));
    }
    let meta_path = dir.join(LAYER_META);
    let text = std::fs::read(&meta_path)
        .map_err(|e| format!("snapshot layer {}: {e}", meta_path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| format!("snapshot layer {}: {e}", meta_path.display()))?;
    let meta =
        LayerMeta::from_json(&v).map_err(|e| format!("snapshot layer {}: {e}", dir.display()))?;
    let disk = dir.join(LAYER_DISK);
    let size = qcow2_virtual_size(&disk)
        .map_err(|e| format!("snapshot layer disk {}: {e}", disk.display()))?;
    if size != meta.virtual_size {
        return Err(format!(
            "snapshot layer disk {} is {size} bytes, {LAYER_META} says {}",
            disk.display(),
            meta.virtual_size
        ));
    }
    if !meta.base.is_file() {
        return Err(format!(
            "the template image {} that snapshot layer {} is based on is gone",
            meta.base.display(),
            dir.display()
        ));
    }
    Ok(meta)
}

/// The virtual size in a qcow2 header (and a check that it is one).
pub fn qcow2_virtual_size(path: &Path) -> io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    let mut header = [0u8; 32];
    f.read_exact(&mut header)?;
    if header.get(..4) != Some(b"QFI\xfb".as_slice()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a qcow2 image",
        ));
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(header.get(24..32).unwrap_or(&[0; 8]));
    Ok(u64::from_be_bytes(size))
}

/// Arguments of `qemu-img` that flatten `top` onto `base` in place. Safe mode (no `-u`): it
/// reads the old chain and the image and writes every cluster where they differ. `top` is a
/// copy of a sandbox's overlay, so its header is the VMM's to write: the driver runs this as
/// the sandbox's own unprivileged uid, which can open no backing file the VMM could not.
pub fn rebase_args(base: &Path, top: &Path) -> Result<Vec<String>, ImageError> {
    Ok(["rebase", "-q", "-f", "qcow2", "-F", "raw", "-b"]
        .into_iter()
        .map(str::to_string)
        .chain([utf8(base)?, utf8(top)?])
        .collect())
}

/// Arguments of `qemu-img` that write the depth-1 `top` compactly to `out` (same backing):
/// only referenced clusters, none of the holes that discards or leaks left in the copy of a
/// live overlay. Zero clusters stay zero clusters (they hide the image's data). Run confined,
/// like [`rebase_args`].
pub fn compact_args(base: &Path, top: &Path, out: &Path) -> Result<Vec<String>, ImageError> {
    Ok([
        "convert", "-q", "-f", "qcow2", "-O", "qcow2", "-F", "raw", "-B",
    ]
    .into_iter()
    .map(str::to_string)
    .chain([utf8(base)?, utf8(top)?, utf8(out)?])
    .collect())
}

fn utf8(p: &Path) -> Result<String, ImageError> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| ImageError::Io {
            context: format!("{} is not UTF-8", p.display()),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })
}

/// Write the layer `dest` from `top` (already flattened onto `meta.base`): a fresh root-owned
/// copy, read-only for QEMU's group (no descriptor the sandbox's uid may hold on `top` reaches
/// it), then the description. Returns the disk's size in bytes.
pub fn finish_layer(
    top: &Path,
    dest: &Path,
    meta: &LayerMeta,
    gid: Option<u32>,
) -> Result<u64, ImageError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io_ctx = |what: String| {
        move |source| ImageError::Io {
            context: what,
            source,
        }
    };
    let disk = dest.join(LAYER_DISK);
    let mut src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(top)
        .map_err(io_ctx(format!("opening {}", top.display())))?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&disk)
        .map_err(io_ctx(format!("creating {}", disk.display())))?;
    let bytes =
        io::copy(&mut src, &mut out).map_err(io_ctx(format!("writing {}", disk.display())))?;
    std::os::unix::fs::fchown(&out, Some(0), gid)
        .map_err(io_ctx(format!("chown {}", disk.display())))?;
    out.set_permissions(std::fs::Permissions::from_mode(0o640))
        .map_err(io_ctx(format!("chmod {}", disk.display())))?;
    out.sync_all()
        .map_err(io_ctx(format!("syncing {}", disk.display())))?;
    let meta_path = dest.join(LAYER_META);
    let mut text = serde_json::to_vec_pretty(&meta.to_json()).unwrap_or_default();
    text.push(b'\n');
    write_synced(&meta_path, &text).map_err(io_ctx(format!("writing {}", meta_path.display())))?;
    std::fs::File::open(dest)
        .and_then(|d| d.sync_all())
        .map_err(io_ctx(format!("syncing {}", dest.display())))?;
    Ok(bytes)
}

fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Make `dst` the same file as `src`: a hard link, or a copy when they are on different
/// filesystems (owner and mode copied too).
pub fn link_or_copy(src: &Path, dst: &Path) -> io::Result<()> {
    match std::fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(src, dst)?;
            let m = std::fs::metadata(src)?;
            use std::os::unix::fs::MetadataExt;
            std::os::unix::fs::chown(dst, Some(m.uid()), Some(m.gid()))?;
            std::fs::set_permissions(dst, m.permissions())
        }
        Err(e) => Err(e),
    }
}

/// Remove what a failed snapshot left in `dest` (but not `dest`: the caller made it).
pub fn clear_dir(dest: &Path) {
    if let Ok(entries) = std::fs::read_dir(dest) {
        for e in entries.flatten() {
            let p = e.path();
            let r = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            if let Err(err) = r {
                tracing::warn!("removing {}: {err}", p.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{ImageTools, run_tool};
    use std::process::Command;

    fn meta(base: &Path) -> LayerMeta {
        LayerMeta {
            base: base.to_path_buf(),
            virtual_size: 4 << 20,
            template: "base".into(),
            build_id: "b1".into(),
        }
    }

    #[test]
    fn machine_meta_roundtrip_and_checks() {
        let tmp = tempfile::tempdir().expect("tmp");
        assert_eq!(read_machine(tmp.path()).expect("none"), None);
        let m = MachineMeta {
            key: "abc".into(),
            named_memory: true,
        };
        write_machine(tmp.path(), &m).expect("write");
        let err = read_machine(tmp.path()).expect_err("no stream");
        assert!(err.contains("has no memory"), "{err}");
        std::fs::write(tmp.path().join(LAYER_MEMORY), b"x").expect("stream");
        assert_eq!(read_machine(tmp.path()).expect("read"), Some(m));
        std::fs::write(tmp.path().join(LAYER_MACHINE), br#"{"format":"other"}"#).expect("w");
        assert!(read_machine(tmp.path()).is_err());
    }

    #[test]
    fn meta_roundtrip_and_format_check() {
        let m = meta(Path::new("/data/images/base-b1-a.ext4"));
        assert_eq!(LayerMeta::from_json(&m.to_json()), Ok(m.clone()));
        let mut v = m.to_json();
        v["format"] = "cella-jail-upper".into();
        let err = LayerMeta::from_json(&v).expect_err("other format");
        assert!(err.contains("another driver"), "{err}");
        let err = LayerMeta::from_json(&serde_json::json!({"format": LAYER_FORMAT}))
            .expect_err("no base");
        assert!(err.contains("base"), "{err}");
    }

    #[test]
    fn reading_a_layer_checks_every_file() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("layer");
        std::fs::create_dir(&dir).expect("mkdir");
        let base = tmp.path().join("base.ext4");
        let err = read_layer(&dir).expect_err("empty dir");
        assert!(err.contains(LAYER_META), "{err}");
        assert!(read_layer(Path::new("rel")).is_err());
        std::fs::write(dir.join(LAYER_META), b"{not json").expect("write");
        assert!(read_layer(&dir).is_err());
        std::fs::write(
            dir.join(LAYER_META),
            serde_json::to_vec(&meta(&base).to_json()).expect("json"),
        )
        .expect("write");
        let err = read_layer(&dir).expect_err("no disk");
        assert!(err.contains(LAYER_DISK), "{err}");
        // A qcow2 header: magic, version, ..., size at byte 24.
        let mut header = vec![0u8; 512];
        header[..4].copy_from_slice(b"QFI\xfb");
        header[24..32].copy_from_slice(&(4u64 << 20).to_be_bytes());
        std::fs::write(dir.join(LAYER_DISK), &header).expect("write");
        let err = read_layer(&dir).expect_err("no base image");
        assert!(err.contains("is gone"), "{err}");
        std::fs::write(&base, b"").expect("write");
        assert_eq!(read_layer(&dir), Ok(meta(&base)));
        header[24..32].copy_from_slice(&(8u64 << 20).to_be_bytes());
        std::fs::write(dir.join(LAYER_DISK), &header).expect("write");
        assert!(read_layer(&dir).expect_err("size").contains("says"));
        std::fs::write(dir.join(LAYER_DISK), b"raw data, not qcow2").expect("write");
        assert!(read_layer(&dir).is_err());
    }

    #[test]
    fn link_or_copy_makes_the_same_content() {
        let tmp = tempfile::tempdir().expect("tmp");
        let a = tmp.path().join("a");
        std::fs::write(&a, b"layer").expect("write");
        link_or_copy(&a, &tmp.path().join("b")).expect("link");
        assert_eq!(std::fs::read(tmp.path().join("b")).expect("read"), b"layer");
        assert!(link_or_copy(&a, &tmp.path().join("b")).is_err(), "exists");
        std::fs::create_dir(tmp.path().join("d")).expect("mkdir");
        std::fs::write(tmp.path().join("d/x"), b"").expect("write");
        clear_dir(tmp.path());
        assert_eq!(std::fs::read_dir(tmp.path()).expect("ls").count(), 0);
    }

    fn qemu_io(image: &Path, cmd: &str) {
        run_tool(
            Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", cmd])
                .arg(image),
        )
        .expect("qemu-io");
    }

    /// A three-deep chain (top -> mid -> raw base) becomes one qcow2 on the base with the
    /// same contents: what a snapshot of a golden clone or of a layered sandbox needs.
    #[test]
    fn finishing_flattens_the_chain_onto_the_base() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: chown to root needs root");
            return;
        }
        let tools = ImageTools {
            mkfs_ext4: PathBuf::from("mkfs.ext4"),
            qemu_img: PathBuf::from("qemu-img"),
        };
        if Command::new("qemu-io").arg("--version").output().is_err()
            || Command::new("qemu-img").arg("--version").output().is_err()
        {
            eprintln!("skipping: qemu-img/qemu-io are not installed");
            return;
        }
        let tmp = tempfile::tempdir().expect("tmp");
        let base = tmp.path().join("base.raw");
        let mut raw = vec![0u8; 4 << 20];
        raw[..4].copy_from_slice(b"BASE");
        raw[(3 << 20)..(3 << 20) + 4].copy_from_slice(b"KEEP");
        std::fs::write(&base, &raw).expect("write");
        let mid = tmp.path().join("mid.qcow2");
        let top = tmp.path().join("top.qcow2");
        crate::image::create_overlay(&tools, &base, "raw", &mid, 4 << 20).expect("mid");
        qemu_io(&mid, "write -P 0x41 1M 64k");
        qemu_io(&mid, "write -P 0x43 2M 64k");
        crate::image::create_overlay(&tools, &mid, "qcow2", &top, 4 << 20).expect("top");
        qemu_io(&top, "write -P 0x42 2M 4k");
        let dest = tmp.path().join("layer");
        std::fs::create_dir(&dest).expect("mkdir");
        let copy = tmp.path().join("copy.qcow2");
        std::fs::copy(&top, &copy).expect("copy");
        run_tool(Command::new("qemu-img").args(rebase_args(&base, &copy).expect("args")))
            .expect("rebase");
        // A hole in the middle: what a discard leaves in a live overlay.
        qemu_io(&copy, "write -P 0x44 0 64k");
        qemu_io(&copy, "discard 0 64k");
        let flat = tmp.path().join("flat.qcow2");
        run_tool(Command::new("qemu-img").args(compact_args(&base, &copy, &flat).expect("args")))
            .expect("compact");
        let bytes = finish_layer(&flat, &dest, &meta(&base), None).expect("finish");
        assert_eq!(bytes, std::fs::metadata(&flat).expect("stat").len());
        assert!(
            bytes < std::fs::metadata(&copy).expect("stat").len(),
            "compacted: {bytes}"
        );
        assert_eq!(read_layer(&dest), Ok(meta(&base)));
        let disk = dest.join(LAYER_DISK);
        let out = Command::new("qemu-img")
            .args(["info", "--backing-chain", "--output=json"])
            .arg(&disk)
            .output()
            .expect("info");
        let chain: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let chain = chain.as_array().expect("array");
        assert_eq!(chain.len(), 2, "layer + base: {chain:?}");
        assert_eq!(
            chain[0]["full-backing-filename"].as_str(),
            Some(base.to_str().expect("utf8"))
        );
        // The middle image is not needed any more.
        std::fs::remove_file(&mid).expect("rm mid");
        // Rendered without `mid`: the layer must read like the whole chain did.
        let rendered = tmp.path().join("rendered.raw");
        run_tool(
            Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(&disk)
                .arg(&rendered),
        )
        .expect("render");
        let got = std::fs::read(&rendered).expect("read");
        let mut want = raw.clone();
        want[..64 << 10].fill(0); // discarded: zeros, not the image's "BASE"
        want[(1 << 20)..(1 << 20) + (64 << 10)].fill(0x41);
        want[(2 << 20)..(2 << 20) + (64 << 10)].fill(0x43);
        want[(2 << 20)..(2 << 20) + (4 << 10)].fill(0x42);
        assert!(
            got == want,
            "the flattened layer must read like the whole chain"
        );
        let mode = std::fs::metadata(&disk).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
    }
}
