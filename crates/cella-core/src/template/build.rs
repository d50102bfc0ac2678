//! The build steps of one template, from an empty directory to a shifted root filesystem.
//!
//! Everything here runs as host root and shells out to the distribution's tools (debootstrap,
//! chroot, mount, cp): those are what Debian itself uses to make root filesystems, and they
//! keep unsafe code out of this crate. A chroot is not a security boundary; builds execute
//! the spec's commands with full host privileges, so specs must come from the administrator.
//!
//! Host files the build needs (DNS configuration, the CA bundle pip uses to reach PyPI through
//! this machine's TLS setup) are copied in for the build and removed again, so the template
//! never carries host-specific configuration.

use std::collections::VecDeque;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::TemplateSpec;
use super::fsutil::{self, remove_tree};
use super::mirror;
use super::store::HostPaths;
use super::{BUILDER_VERSION, BuildPhase, BuildProgress, MAX_PROGRESS_MESSAGE, TemplateError};
use crate::driver::SANDBOX_ID_BASE;

/// PATH inside the chroot and for the host tools.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the host's CA bundle is put inside the chroot during the build.
const BUILD_CA_IN_CHROOT: &str = "/tmp/.cella-build/ca-certificates.crt";

/// Turns a line of tool output into (message, done, total) for a progress report.
type LineHandler<'a> = dyn FnMut(&str) -> (String, Option<u64>, Option<u64>) + 'a;

/// Lines of tool output kept for error messages.
const TAIL_LINES: usize = 30;

/// Longest tool output line kept (the rest of the line is dropped).
const MAX_LINE: usize = 4096;

/// Host environment variables passed into the chroot for package downloads (proxies and pip
/// index settings of this machine). `PIP_CERT`/`PIP_FIND_LINKS` are not: they name host paths.
const PASSTHROUGH_ENV: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_DEFAULT_TIMEOUT",
    "PIP_DISABLE_PIP_VERSION_CHECK",
];

/// Inputs of one build.
pub(super) struct BuildCtx<'a> {
    pub spec: &'a TemplateSpec,
    /// Target tree (must not exist yet).
    pub rootfs: &'a Path,
    /// Built (shifted) tree of the parent, for `from` templates.
    pub parent_rootfs: Option<&'a Path>,
    /// `<store root>/.cache`.
    pub cache_dir: &'a Path,
    pub host: &'a HostPaths,
    /// Mirror override; otherwise taken from the host's apt configuration.
    pub mirror: Option<&'a str>,
    /// Run debootstrap even if its result is cached (`--force`: fresh packages).
    pub refresh: bool,
    pub progress: &'a mut dyn FnMut(&BuildProgress),
}

impl BuildCtx<'_> {
    fn report(&mut self, phase: BuildPhase, message: &str, done: Option<u64>, total: Option<u64>) {
        let mut message = message.trim_end().to_owned();
        truncate_at_char(&mut message, MAX_PROGRESS_MESSAGE);
        (self.progress)(&BuildProgress {
            template: self.spec.name.clone(),
            phase,
            message,
            done,
            total,
        });
    }
}

/// Key of the debootstrap cache: suite and the sorted package set.
pub(super) fn debootstrap_key(spec: &TemplateSpec) -> String {
    let mut packages = spec.apt_packages.clone();
    packages.sort();
    packages.dedup();
    let mut hasher = Sha256::new();
    hasher.update(BUILDER_VERSION.as_bytes());
    hasher.update(b"\ndebootstrap minbase\n");
    hasher.update(spec.distribution.as_bytes());
    hasher.update(b"\n");
    hasher.update(packages.join(",").as_bytes());
    format!(
        "{}-{}",
        spec.distribution,
        hex::encode(&hasher.finalize()[..8])
    )
}

/// Run every step: base tree, configuration, packages, commands, cleanup, ID shift.
pub(super) fn run(ctx: &mut BuildCtx<'_>) -> Result<(), TemplateError> {
    match ctx.parent_rootfs {
        Some(parent) => {
            ctx.report(
                BuildPhase::Copy,
                &format!("copying {}", parent.display()),
                None,
                None,
            );
            fsutil::copy_tree(parent, ctx.rootfs)?;
            fsutil::shift_ids(ctx.rootfs, SANDBOX_ID_BASE, 0)?;
        }
        None => {
            copy_debootstrap_tree(ctx)?;
        }
    }
    {
        let mut chroot = Chroot::enter(ctx.rootfs, ctx.host)?;
        configure(ctx, &mut chroot)?;
        cleanup(ctx, &mut chroot)?;
        chroot.leave()?;
    }
    ctx.report(
        BuildPhase::Shift,
        "shifting ownership to the sandbox ID range",
        None,
        None,
    );
    fsutil::shift_ids(ctx.rootfs, 0, SANDBOX_ID_BASE)?;
    Ok(())
}

/// Copy the debootstrap result for this spec's suite and packages to the build's root,
/// running debootstrap first if it is not cached (or `ctx.refresh` asks for fresh packages).
///
/// The whole step holds the cache lock, so a refresh never replaces a tree another build is
/// copying.
fn copy_debootstrap_tree(ctx: &mut BuildCtx<'_>) -> Result<(), TemplateError> {
    let dir = ctx.cache_dir.join("debootstrap");
    let debs = ctx.cache_dir.join("debs");
    for d in [&dir, &debs] {
        std::fs::create_dir_all(d)
            .map_err(|e| TemplateError::io(format!("create {}", d.display()), e))?;
    }
    let key = debootstrap_key(ctx.spec);
    let cached = dir.join(&key);
    let _lock = super::store::lock_file(&dir.join(".lock"), &mut |msg| {
        ctx.report(BuildPhase::Wait, msg, None, None)
    })?;
    if cached.is_dir() && !ctx.refresh {
        ctx.report(
            BuildPhase::Debootstrap,
            "reusing cached debootstrap tree",
            None,
            None,
        );
    } else {
        // Holding the lock: any temporary directory left here is from a build that died.
        clean_stale(&dir, ctx.host)?;
        let tmp = dir.join(format!(".tmp-{key}-{}", std::process::id()));
        if let Err(e) = debootstrap(ctx, &tmp, &debs) {
            if let Err(cleanup) = remove_tree(&ctx.host.mountinfo, &tmp) {
                tracing::warn!(error = %cleanup, dir = %tmp.display(), "removing failed debootstrap");
            }
            return Err(e);
        }
        if cached.exists() {
            let old = dir.join(format!(".old-{key}-{}", std::process::id()));
            std::fs::rename(&cached, &old)
                .map_err(|e| TemplateError::io(format!("move {} aside", cached.display()), e))?;
            remove_tree(&ctx.host.mountinfo, &old)?;
        }
        std::fs::rename(&tmp, &cached)
            .map_err(|e| TemplateError::io(format!("rename {} into place", tmp.display()), e))?;
    }
    ctx.report(BuildPhase::Copy, "copying the debootstrap tree", None, None);
    fsutil::copy_tree(&cached, ctx.rootfs)
}

/// Remove `.tmp-*` entries of `dir` (caller holds the lock that guards them).
pub(super) fn clean_stale(dir: &Path, host: &HostPaths) -> Result<usize, TemplateError> {
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".tmp-") || name.starts_with(".old-") {
            remove_tree(&host.mountinfo, &entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn debootstrap(ctx: &mut BuildCtx<'_>, target: &Path, debs: &Path) -> Result<(), TemplateError> {
    let mirror = match ctx.mirror {
        Some(m) => m.to_owned(),
        None => mirror::find_mirror(
            &mirror::apt_source_files(&ctx.host.etc_apt),
            &ctx.spec.distribution,
        )?,
    };
    let mut packages = ctx.spec.apt_packages.clone();
    packages.sort();
    packages.dedup();
    let debs = debs
        .canonicalize()
        .map_err(|e| TemplateError::io(format!("resolve {}", debs.display()), e))?;
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase")
        .arg("--components=main")
        .arg(format!("--cache-dir={}", debs.display()));
    if !packages.is_empty() {
        cmd.arg(format!("--include={}", packages.join(",")));
    }
    cmd.arg(&ctx.spec.distribution)
        .arg(target)
        .arg(&mirror)
        .env("PATH", PATH)
        .env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive");
    ctx.report(
        BuildPhase::Debootstrap,
        &format!("debootstrap {} from {mirror}", ctx.spec.distribution),
        None,
        None,
    );
    let mut counter = DebootstrapCounter::default();
    let result = stream(
        ctx,
        BuildPhase::Debootstrap,
        cmd,
        "debootstrap",
        &mut |line| counter.line(line),
    );
    match result {
        Err(TemplateError::Command {
            command,
            status,
            mut output,
        }) => {
            // debootstrap's own log has the real reason (often a failed dpkg run).
            let log = tail_of_file(&target.join("debootstrap/debootstrap.log"), 20);
            if !log.is_empty() {
                output.push_str("\n--- debootstrap.log ---\n");
                output.push_str(&log);
            }
            Err(TemplateError::Command {
                command,
                status,
                output,
            })
        }
        other => other,
    }
}

/// Turns debootstrap's `I: Retrieving x` ... lines into step counts. The number of packages is
/// known once retrieval is over; unpacking and configuring then go over every package (in two
/// passes, required then base, so the counts are kept per step across passes).
#[derive(Default)]
struct DebootstrapCounter {
    retrieved: u64,
    extracted: u64,
    unpacked: u64,
    configured: u64,
}

impl DebootstrapCounter {
    fn line(&mut self, line: &str) -> (String, Option<u64>, Option<u64>) {
        let Some(rest) = line.strip_prefix("I: ") else {
            return (line.to_owned(), None, None);
        };
        let retrieved = self.retrieved;
        let steps: [(&str, &str, &mut u64); 4] = [
            ("Retrieving ", "retrieving", &mut self.retrieved),
            ("Extracting ", "extracting", &mut self.extracted),
            ("Unpacking ", "unpacking", &mut self.unpacked),
            ("Configuring ", "configuring", &mut self.configured),
        ];
        for (prefix, step, count) in steps {
            if let Some(pkg) = rest.strip_prefix(prefix) {
                *count += 1;
                let pkg = pkg.trim_end_matches("...").trim();
                let total = (step != "retrieving" && retrieved >= *count).then_some(retrieved);
                return (format!("{step} {pkg}"), Some(*count), total);
            }
        }
        (rest.to_owned(), None, None)
    }
}

/// A chroot prepared for build commands: `proc` mounted, the host's DNS configuration and CA
/// bundle copied in, services prevented from starting. Undone by [`Chroot::leave`], or on drop
/// (errors included).
struct Chroot {
    rootfs: PathBuf,
    proc_mounted: bool,
    ca_copied: bool,
    env: Vec<(String, String)>,
}

impl Chroot {
    fn enter(rootfs: &Path, host: &HostPaths) -> Result<Chroot, TemplateError> {
        let mut chroot = Chroot {
            rootfs: rootfs.to_path_buf(),
            proc_mounted: false,
            ca_copied: false,
            env: Vec::new(),
        };
        put_file(
            rootfs,
            "usr/sbin/policy-rc.d",
            b"#!/bin/sh\nexit 101\n",
            0o755,
        )?;
        if let Ok(resolv) = std::fs::read(&host.resolv_conf) {
            put_file(rootfs, "etc/resolv.conf", &resolv, 0o644)?;
        }
        if let Ok(ca) = std::fs::read(&host.ca_bundle) {
            put_file(
                rootfs,
                BUILD_CA_IN_CHROOT.trim_start_matches('/'),
                &ca,
                0o644,
            )?;
            chroot.ca_copied = true;
        }
        let proc_dir = rootfs.join("proc");
        std::fs::create_dir_all(&proc_dir)
            .map_err(|e| TemplateError::io(format!("create {}", proc_dir.display()), e))?;
        let output = Command::new("mount")
            .args(["-t", "proc", "-o", "nosuid,nodev,noexec", "proc"])
            .arg(&proc_dir)
            .output()
            .map_err(|e| TemplateError::io("run mount", e))?;
        if !output.status.success() {
            return Err(TemplateError::Command {
                command: format!("mount -t proc proc {}", proc_dir.display()),
                status: output.status.to_string(),
                output: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        chroot.proc_mounted = true;

        let mut env = vec![
            ("PATH".to_owned(), PATH.to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
            ("LANG".to_owned(), "C.UTF-8".to_owned()),
            ("DEBIAN_FRONTEND".to_owned(), "noninteractive".to_owned()),
            ("TERM".to_owned(), "dumb".to_owned()),
        ];
        if chroot.ca_copied {
            for var in [
                "PIP_CERT",
                "SSL_CERT_FILE",
                "REQUESTS_CA_BUNDLE",
                "CURL_CA_BUNDLE",
            ] {
                env.push((var.to_owned(), BUILD_CA_IN_CHROOT.to_owned()));
            }
        }
        for var in PASSTHROUGH_ENV {
            if let Ok(value) = std::env::var(var) {
                env.push(((*var).to_owned(), value));
            }
        }
        chroot.env = env;
        Ok(chroot)
    }

    /// `chroot <rootfs> <args>` with the build environment (plus `extra_env`), cwd `/`.
    fn command(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new("chroot");
        cmd.arg(&self.rootfs)
            .args(args)
            .current_dir("/")
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra_env.iter().copied());
        cmd
    }

    /// Undo what [`Chroot::enter`] did; reports the first failure.
    fn leave(mut self) -> Result<(), TemplateError> {
        self.undo()
    }

    fn undo(&mut self) -> Result<(), TemplateError> {
        let mut first_error = None;
        if self.proc_mounted {
            match fsutil::unmount(&self.rootfs.join("proc")) {
                Ok(()) => self.proc_mounted = false,
                Err(e) => first_error = Some(e),
            }
        }
        if self.ca_copied {
            let dir = self.rootfs.join("tmp/.cella-build");
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => self.ca_copied = false,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.ca_copied = false,
                Err(e) => {
                    first_error
                        .get_or_insert(TemplateError::io(format!("remove {}", dir.display()), e));
                }
            }
        }
        let _ = std::fs::remove_file(self.rootfs.join("usr/sbin/policy-rc.d"));
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        if let Err(e) = self.undo() {
            tracing::warn!(error = %e, rootfs = %self.rootfs.display(), "template build cleanup");
        }
    }
}

/// Hostname-independent files, the default user, packages and commands.
fn configure(ctx: &mut BuildCtx<'_>, chroot: &mut Chroot) -> Result<(), TemplateError> {
    let spec = ctx.spec;
    let rootfs = ctx.rootfs;
    ctx.report(
        BuildPhase::Configure,
        "hosts, hostname, pip and sudo configuration",
        None,
        None,
    );
    put_file(
        rootfs,
        "etc/hosts",
        b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
          ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
        0o644,
    )?;
    // The real hostname is set per sandbox (the sandbox ID); libnss-myhostname resolves it.
    put_file(rootfs, "etc/hostname", b"sandbox\n", 0o644)?;
    // Debian marks the system Python as externally managed; agents expect `pip install x`
    // to work (as it does in E2B's images), for root system-wide and for the user in ~/.local.
    put_file(
        rootfs,
        "etc/pip.conf",
        b"[global]\nbreak-system-packages = true\n",
        0o644,
    )?;

    write_spec_files(ctx)?;

    let user = spec.default_user.as_str();
    if user != "root" {
        ctx.report(
            BuildPhase::Configure,
            &format!("creating user {user}"),
            None,
            None,
        );
        let script = "set -e\n\
            if ! id -u \"$1\" >/dev/null 2>&1; then\n\
              if getent passwd 1000 >/dev/null; then useradd -m -s /bin/bash \"$1\";\n\
              else useradd -m -s /bin/bash -u 1000 \"$1\"; fi\n\
            fi\n";
        let cmd = chroot.command(&["/bin/sh", "-c", script, "sh", user], &[]);
        stream(ctx, BuildPhase::Configure, cmd, "useradd", &mut plain)?;
        put_file(
            rootfs,
            &format!("etc/sudoers.d/{user}"),
            format!("{user} ALL=(ALL:ALL) NOPASSWD: ALL\n").as_bytes(),
            0o440,
        )?;
    }

    if spec.from.is_some() && !spec.apt_packages.is_empty() {
        ctx.report(BuildPhase::Apt, "apt-get update", None, None);
        let cmd = chroot.command(&["apt-get", "update", "-q"], &[]);
        stream(ctx, BuildPhase::Apt, cmd, "apt-get update", &mut plain)?;
        let mut args = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
        args.extend(spec.apt_packages.iter().map(String::as_str));
        let cmd = chroot.command(&args, &[]);
        let mut unpacked = 0u64;
        stream(ctx, BuildPhase::Apt, cmd, "apt-get install", &mut |line| {
            if line.starts_with("Unpacking ") {
                unpacked += 1;
                return (line.to_owned(), Some(unpacked), None);
            }
            (line.to_owned(), None, None)
        })?;
    }

    if !spec.pip_packages.is_empty() {
        ctx.report(
            BuildPhase::Pip,
            &format!("pip install {}", spec.pip_packages.join(" ")),
            None,
            None,
        );
        let mut args = vec![
            "python3",
            "-m",
            "pip",
            "install",
            "--no-cache-dir",
            "--break-system-packages",
            "--root-user-action=ignore",
            "--progress-bar=off",
        ];
        args.extend(spec.pip_packages.iter().map(String::as_str));
        let cmd = chroot.command(&args, &[]);
        let mut collected = 0u64;
        stream(ctx, BuildPhase::Pip, cmd, "pip install", &mut |line| {
            if line.starts_with("Collecting ") {
                collected += 1;
                return (line.to_owned(), Some(collected), None);
            }
            (line.to_owned(), None, None)
        })?;
    }

    let total = spec.run.len() as u64;
    for (i, command) in spec.run.iter().enumerate() {
        let done = Some(i as u64 + 1);
        ctx.report(BuildPhase::Run, command, done, Some(total));
        let env: Vec<(&str, &str)> = spec
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let cmd = chroot.command(&["/bin/sh", "-c", command], &env);
        let label = format!("run step {}", i + 1);
        stream(ctx, BuildPhase::Run, cmd, &label, &mut |line| {
            (line.to_owned(), done, Some(total))
        })?;
    }
    Ok(())
}

/// Write the spec's `files` into the tree (before packages and commands, which may use them).
fn write_spec_files(ctx: &mut BuildCtx<'_>) -> Result<(), TemplateError> {
    let total = ctx.spec.files.len() as u64;
    for (i, file) in ctx.spec.files.iter().enumerate() {
        // validate() checked the path; refuse again rather than write outside the tree.
        if !super::is_template_path(&file.path) {
            return Err(TemplateError::InvalidSpec(format!(
                "files: invalid path {:?}",
                file.path
            )));
        }
        ctx.report(
            BuildPhase::Configure,
            &format!("writing {}", file.path),
            Some(i as u64 + 1),
            Some(total),
        );
        let mode = if file.executable { 0o755 } else { 0o644 };
        put_file(
            ctx.rootfs,
            file.path.trim_start_matches('/'),
            file.contents.as_bytes(),
            mode,
        )?;
    }
    Ok(())
}

/// Remove caches and build-only files; leave a placeholder `resolv.conf`.
fn cleanup(ctx: &mut BuildCtx<'_>, chroot: &mut Chroot) -> Result<(), TemplateError> {
    ctx.report(BuildPhase::Cleanup, "removing caches", None, None);
    if ctx.rootfs.join("usr/bin/apt-get").exists() {
        let cmd = chroot.command(&["apt-get", "clean"], &[]);
        stream(ctx, BuildPhase::Cleanup, cmd, "apt-get clean", &mut plain)?;
    }
    // Keep the directory skeletons apt and dpkg expect (`partial`, `lock`, `archives`, the
    // log directories) and debconf's databases (only their `-old` backups go).
    empty_dir(ctx.rootfs, "var/lib/apt/lists", |name, _| {
        matches!(name, "partial" | "lock")
    })?;
    empty_dir(ctx.rootfs, "var/cache/apt", |name, _| name == "archives")?;
    empty_dir(ctx.rootfs, "var/cache/debconf", |name, _| {
        !name.ends_with("-old")
    })?;
    empty_dir(ctx.rootfs, "var/log", |_, is_dir| is_dir)?;
    empty_dir(ctx.rootfs, "var/log/apt", |_, _| false)?;
    for dir in ["root/.cache", "tmp", "var/tmp"] {
        empty_dir(ctx.rootfs, dir, |_, _| false)?;
    }
    put_file(
        ctx.rootfs,
        "etc/resolv.conf",
        b"# Written by cella at sandbox start when the sandbox has network access.\n",
        0o644,
    )?;
    // debootstrap's leftovers.
    remove_path(&ctx.rootfs.join("debootstrap"))?;
    Ok(())
}

/// The default line handler: pass the line on, no counts.
fn plain(line: &str) -> (String, Option<u64>, Option<u64>) {
    (line.to_owned(), None, None)
}

/// Run `cmd` with stdout and stderr merged, reporting each output line through `on_line`
/// (which turns it into message, done, total). A failure carries the last lines of output.
fn stream(
    ctx: &mut BuildCtx<'_>,
    phase: BuildPhase,
    mut cmd: Command,
    label: &str,
    on_line: &mut LineHandler<'_>,
) -> Result<(), TemplateError> {
    let (mut reader, writer) =
        std::io::pipe().map_err(|e| TemplateError::io("create an output pipe", e))?;
    let writer_err = writer
        .try_clone()
        .map_err(|e| TemplateError::io("duplicate an output pipe", e))?;
    cmd.stdin(Stdio::null()).stdout(writer).stderr(writer_err);
    let mut child = cmd
        .spawn()
        .map_err(|e| TemplateError::io(format!("start {label}"), e))?;
    // The Command holds copies of the pipe's write end; drop them so EOF arrives when the
    // child (and its children) exit.
    drop(cmd);

    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
    let mut line: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    let mut emit = |ctx: &mut BuildCtx<'_>, raw: &[u8]| {
        let text = String::from_utf8_lossy(raw);
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text.to_owned());
        let (message, done, total) = on_line(text);
        ctx.report(phase, &message, done, total);
    };
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TemplateError::io(format!("read output of {label}"), e));
            }
        };
        for &byte in &buf[..n] {
            if byte == b'\n' || byte == b'\r' {
                emit(ctx, &line);
                line.clear();
            } else if line.len() < MAX_LINE {
                line.push(byte);
            }
        }
    }
    emit(ctx, &line);
    let status = child
        .wait()
        .map_err(|e| TemplateError::io(format!("wait for {label}"), e))?;
    if status.success() {
        Ok(())
    } else {
        Err(TemplateError::Command {
            command: label.to_owned(),
            status: status.to_string(),
            output: tail.into_iter().collect::<Vec<_>>().join("\n"),
        })
    }
}

/// Write `rel` under `rootfs`, replacing whatever is there (a symlink is replaced, never
/// followed), creating parent directories.
fn put_file(rootfs: &Path, rel: &str, contents: &[u8], mode: u32) -> Result<(), TemplateError> {
    let path = rootfs.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| TemplateError::io(format!("create {}", parent.display()), e))?;
    }
    remove_path(&path)?;
    std::fs::write(&path, contents)
        .map_err(|e| TemplateError::io(format!("write {}", path.display()), e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| TemplateError::io(format!("chmod {}", path.display()), e))
}

/// Remove a file, symlink or directory tree if it exists.
fn remove_path(path: &Path) -> Result<(), TemplateError> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| TemplateError::io(format!("remove {}", path.display()), e))
}

/// Remove the entries of `rootfs/rel` except those `keep(name, is_dir)` says to (top level
/// only).
fn empty_dir(
    rootfs: &Path,
    rel: &str,
    keep: impl Fn(&str, bool) -> bool,
) -> Result<(), TemplateError> {
    let dir = rootfs.join(rel);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        // file_type() does not follow symlinks: a symlink to a directory is not kept as one.
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !keep(&name.to_string_lossy(), is_dir) {
            remove_path(&entry.path())?;
        }
    }
    Ok(())
}

/// The last `n` lines of a (log) file, empty when unreadable. Reads at most 64 KiB.
fn tail_of_file(path: &Path, n: usize) -> String {
    use std::io::{Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.take(64 * 1024).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debootstrap_counter_counts_per_step() {
        let mut c = DebootstrapCounter::default();
        assert_eq!(
            c.line("I: Retrieving InRelease "),
            ("retrieving InRelease".into(), Some(1), None)
        );
        assert_eq!(
            c.line("I: Retrieving libc6 2.36-9"),
            ("retrieving libc6 2.36-9".into(), Some(2), None)
        );
        assert_eq!(c.line("I: Validating libc6 2.36-9").1, None);
        assert_eq!(
            c.line("I: Extracting libc6..."),
            ("extracting libc6".into(), Some(1), Some(2))
        );
        assert_eq!(c.line("I: Unpacking libc6:amd64...").1, Some(1));
        assert_eq!(c.line("I: Configuring libc6:amd64...").1, Some(1));
        // Second pass (base packages): unpacking continues counting where it stopped.
        assert_eq!(
            c.line("I: Unpacking bash:amd64..."),
            ("unpacking bash:amd64".into(), Some(2), Some(2))
        );
        // More steps than retrieved packages: no total rather than N/M with N > M.
        assert_eq!(c.line("I: Unpacking x...").2, None);
        assert_eq!(c.line("W: something").0, "W: something");
    }

    #[test]
    fn debootstrap_key_ignores_package_order_and_duplicates() {
        let a = TemplateSpec::base();
        let mut b = a.clone();
        b.apt_packages.reverse();
        b.apt_packages.push("git".into());
        b.pip_packages.push("requests".into());
        b.run.push("true".into());
        assert_eq!(debootstrap_key(&a), debootstrap_key(&b));
        b.apt_packages.push("vim".into());
        assert_ne!(debootstrap_key(&a), debootstrap_key(&b));
        assert!(debootstrap_key(&a).starts_with("bookworm-"));
    }

    #[test]
    fn put_file_replaces_symlinks_instead_of_following_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "keep").expect("write");
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("etc")).expect("mkdir");
        std::os::unix::fs::symlink(&outside, rootfs.join("etc/resolv.conf")).expect("symlink");
        put_file(&rootfs, "etc/resolv.conf", b"nameserver 1.1.1.1\n", 0o644).expect("put");
        assert_eq!(std::fs::read_to_string(&outside).expect("read"), "keep");
        let meta = std::fs::symlink_metadata(rootfs.join("etc/resolv.conf")).expect("stat");
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        put_file(&rootfs, "etc/sudoers.d/user", b"x\n", 0o440).expect("put");
        let meta = std::fs::metadata(rootfs.join("etc/sudoers.d/user")).expect("stat");
        assert_eq!(meta.permissions().mode() & 0o777, 0o440);
    }

    #[test]
    fn spec_files_are_written_into_the_tree() {
        let mut spec = TemplateSpec::base();
        spec.files = vec![
            super::super::TemplateFile {
                path: "/opt/app/server.py".into(),
                contents: "print(1)\n".into(),
                executable: false,
            },
            super::super::TemplateFile {
                path: "/usr/local/bin/tool".into(),
                contents: "#!/bin/sh\n".into(),
                executable: true,
            },
        ];
        let host = HostPaths::default();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seen = 0;
        let mut progress = |_: &BuildProgress| seen += 1;
        let mut ctx = BuildCtx {
            spec: &spec,
            rootfs: dir.path(),
            parent_rootfs: None,
            cache_dir: dir.path(),
            host: &host,
            mirror: None,
            refresh: false,
            progress: &mut progress,
        };
        write_spec_files(&mut ctx).expect("write");
        let server = dir.path().join("opt/app/server.py");
        assert_eq!(
            std::fs::read_to_string(&server).expect("read"),
            "print(1)\n"
        );
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&server), 0o644);
        assert_eq!(mode(&dir.path().join("usr/local/bin/tool")), 0o755);
        assert_eq!(seen, 2);

        spec.files[0].path = "/opt/../../escape".into();
        let mut progress = |_: &BuildProgress| {};
        let mut ctx = BuildCtx {
            spec: &spec,
            rootfs: dir.path(),
            parent_rootfs: None,
            cache_dir: dir.path(),
            host: &host,
            mirror: None,
            refresh: false,
            progress: &mut progress,
        };
        assert!(write_spec_files(&mut ctx).is_err());
    }

    #[test]
    fn empty_dir_keeps_selected_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lists = dir.path().join("var/lib/apt/lists");
        std::fs::create_dir_all(lists.join("partial")).expect("mkdir");
        std::fs::write(lists.join("deb.debian.org_Packages"), "x").expect("write");
        std::fs::write(lists.join("lock"), "").expect("write");
        empty_dir(dir.path(), "var/lib/apt/lists", |n, _| {
            matches!(n, "partial" | "lock")
        })
        .expect("empty");
        let mut left: Vec<_> = std::fs::read_dir(&lists)
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["lock", "partial"]);
        empty_dir(dir.path(), "does/not/exist", |_, _| false).expect("missing is fine");
    }

    #[test]
    fn stream_reports_lines_and_failure_tail() {
        let spec = TemplateSpec::base();
        let host = HostPaths::default();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seen: Vec<BuildProgress> = Vec::new();
        let mut progress = |p: &BuildProgress| seen.push(p.clone());
        let mut ctx = BuildCtx {
            spec: &spec,
            rootfs: dir.path(),
            parent_rootfs: None,
            cache_dir: dir.path(),
            host: &host,
            mirror: None,
            refresh: false,
            progress: &mut progress,
        };
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            "echo one; echo two >&2; printf 'three\\rfour'; exit 3",
        ]);
        let err = stream(&mut ctx, BuildPhase::Run, cmd, "test step", &mut plain)
            .expect_err("exit 3 fails");
        match err {
            TemplateError::Command {
                command,
                status,
                output,
            } => {
                assert_eq!(command, "test step");
                assert!(status.contains('3'), "{status}");
                assert!(output.ends_with("four"), "{output}");
            }
            other => panic!("unexpected error {other:?}"),
        }
        let messages: Vec<_> = seen.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(messages.len(), 4);
        for expected in ["one", "two", "three", "four"] {
            assert!(messages.contains(&expected), "{messages:?}");
        }
        assert!(
            seen.iter()
                .all(|p| p.phase == BuildPhase::Run && p.template == "base")
        );
    }
}
