//! The on-disk template cache: lookups for sandbox starts, builds, listing and garbage
//! collection. Layout and guarantees are described in the [module docs](super).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::build::{self, BuildCtx};
use super::fsutil;
use super::spec::is_template_name;
use super::{BUILDER_VERSION, BuildPhase, BuildProgress, TemplateError, TemplateSpec};
use crate::driver::TemplateImage;

/// Largest spec.json/build.json read back.
const MAX_META_FILE: u64 = 1 << 20;

/// Deepest chain of `from` parents followed.
const MAX_PARENT_DEPTH: usize = 8;

/// Host files and directories a build reads; replaceable so tests (and unusual hosts) can point
/// elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    /// apt configuration, for the mirror (`/etc/apt`).
    pub etc_apt: PathBuf,
    /// DNS configuration copied into the build chroot (`/etc/resolv.conf`).
    pub resolv_conf: PathBuf,
    /// CA bundle for TLS downloads inside the chroot (`/etc/ssl/certs/ca-certificates.crt`).
    pub ca_bundle: PathBuf,
    /// Mount table, checked before removing trees (`/proc/self/mountinfo`).
    pub mountinfo: PathBuf,
    /// Process status, for the root check (`/proc/self/status`).
    pub proc_status: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            etc_apt: PathBuf::from("/etc/apt"),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            ca_bundle: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            proc_status: PathBuf::from("/proc/self/status"),
        }
    }
}

/// A template as `cella template ls` and `GET /templates` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateStatus {
    /// The current spec.
    pub spec: TemplateSpec,
    /// Its build ID.
    pub build_id: String,
    /// Whether that build exists (sandboxes can start from it).
    pub ready: bool,
    /// Built in (versus found on disk only).
    pub builtin: bool,
    /// Disk usage of the root filesystem, bytes (when built).
    pub size_bytes: Option<u64>,
    /// When it was built, Unix milliseconds (when built).
    pub built_at_ms: Option<i64>,
    /// The root filesystem (when built).
    pub rootfs: Option<PathBuf>,
}

/// `build.json`: facts about one finished build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct BuildInfo {
    pub build_id: String,
    pub builder_version: String,
    pub built_at_ms: i64,
    pub duration_ms: u64,
    pub size_bytes: u64,
}

/// One finished build found on disk.
#[derive(Debug, Clone)]
struct BuildRecord {
    build_id: String,
    spec: TemplateSpec,
    info: Option<BuildInfo>,
    dir: PathBuf,
}

/// The template cache rooted at a directory (`/var/lib/cella/templates`).
#[derive(Debug, Clone)]
pub struct TemplateStore {
    root: PathBuf,
    host: HostPaths,
    mirror: Option<String>,
}

impl TemplateStore {
    /// A store in `root` (created on the first build), using this machine's files.
    pub fn new(root: PathBuf) -> TemplateStore {
        TemplateStore {
            root,
            host: HostPaths::default(),
            mirror: None,
        }
    }

    /// Use other host files (tests, unusual hosts).
    pub fn with_host_paths(mut self, host: HostPaths) -> TemplateStore {
        self.host = host;
        self
    }

    /// Debootstrap from this mirror instead of the one in the machine's apt configuration.
    pub fn with_mirror(mut self, mirror: Option<String>) -> TemplateStore {
        self.mirror = mirror;
        self
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The current spec for `name_or_alias`: a builtin, else the newest build on disk that
    /// answers to it.
    pub fn spec(&self, name_or_alias: &str) -> Option<TemplateSpec> {
        if let Some(spec) = TemplateSpec::builtin(name_or_alias) {
            return Some(spec);
        }
        self.newest_on_disk(name_or_alias).map(|r| r.spec)
    }

    /// The built root filesystem sandboxes of `name_or_alias` start from.
    ///
    /// [`TemplateError::NotFound`] when no template has that name or alias;
    /// [`TemplateError::NotBuilt`] when it is known but its current spec is not built.
    /// Cheap (a few `stat`s) for builtins: called on every sandbox start.
    pub fn resolve(&self, name_or_alias: &str) -> Result<TemplateImage, TemplateError> {
        if let Some(spec) = TemplateSpec::builtin(name_or_alias) {
            let build_id = spec.build_id();
            let dir = self.build_dir(&spec.name, &build_id);
            if !is_ready(&dir) {
                return Err(TemplateError::NotBuilt {
                    name: spec.name,
                    build_id,
                });
            }
            return Ok(image(&spec, build_id, &dir));
        }
        match self.newest_on_disk(name_or_alias) {
            Some(record) => Ok(image(&record.spec, record.build_id, &record.dir)),
            None => Err(TemplateError::NotFound(name_or_alias.to_owned())),
        }
    }

    /// Every builtin template and every other template built in this store, with its state.
    pub fn list(&self) -> Vec<TemplateStatus> {
        let mut out: Vec<TemplateStatus> = TemplateSpec::builtins()
            .into_iter()
            .map(|spec| {
                let build_id = spec.build_id();
                let dir = self.build_dir(&spec.name, &build_id);
                let ready = is_ready(&dir);
                let info = if ready { read_info(&dir) } else { None };
                TemplateStatus {
                    build_id,
                    ready,
                    builtin: true,
                    size_bytes: info.as_ref().map(|i| i.size_bytes),
                    built_at_ms: info.as_ref().map(|i| i.built_at_ms),
                    rootfs: ready.then(|| dir.join("rootfs")),
                    spec,
                }
            })
            .collect();
        for name in self.names_on_disk() {
            if TemplateSpec::builtin(&name).is_some() {
                continue;
            }
            if let Some(record) = self.newest_build(&name) {
                out.push(TemplateStatus {
                    build_id: record.build_id,
                    ready: true,
                    builtin: false,
                    size_bytes: record.info.as_ref().map(|i| i.size_bytes),
                    built_at_ms: record.info.as_ref().map(|i| i.built_at_ms),
                    rootfs: Some(record.dir.join("rootfs")),
                    spec: record.spec,
                });
            }
        }
        out
    }

    /// Build `spec` (and its parent first, if not built) unless its current build exists or
    /// `force` (which also re-runs debootstrap for fresh packages; the parent is not rebuilt). Blocking (minutes); needs root. Waits while another process builds the same
    /// template. On error nothing of the attempt remains.
    pub fn build(
        &self,
        spec: &TemplateSpec,
        progress: &mut dyn FnMut(&BuildProgress),
        force: bool,
    ) -> Result<TemplateImage, TemplateError> {
        self.build_depth(spec, progress, force, 0)
    }

    fn build_depth(
        &self,
        spec: &TemplateSpec,
        progress: &mut dyn FnMut(&BuildProgress),
        force: bool,
        depth: usize,
    ) -> Result<TemplateImage, TemplateError> {
        spec.validate()?;
        let build_id = spec.build_id();
        let final_dir = self.build_dir(&spec.name, &build_id);
        let mut report = |phase: BuildPhase, message: String| {
            progress(&BuildProgress {
                template: spec.name.clone(),
                phase,
                message,
                done: None,
                total: None,
            })
        };
        if !force && is_ready(&final_dir) {
            report(BuildPhase::Done, format!("build {build_id} is up to date"));
            return Ok(image(spec, build_id, &final_dir));
        }
        if !is_root(&self.host.proc_status) {
            return Err(TemplateError::RootRequired);
        }
        let parent = match &spec.from {
            None => None,
            Some(from) => {
                let parent_spec = self
                    .spec(from)
                    .ok_or_else(|| TemplateError::ParentNotFound(from.clone()))?;
                if depth >= MAX_PARENT_DEPTH || parent_spec.name == spec.name {
                    return Err(TemplateError::InvalidSpec(format!(
                        "template {:?}: parent chain too deep or cyclic",
                        spec.name
                    )));
                }
                Some(self.build_depth(&parent_spec, progress, false, depth + 1)?)
            }
        };
        let mut report = |phase: BuildPhase, message: String| {
            progress(&BuildProgress {
                template: spec.name.clone(),
                phase,
                message,
                done: None,
                total: None,
            })
        };

        let name_dir = self.root.join(&spec.name);
        std::fs::create_dir_all(&name_dir)
            .map_err(|e| TemplateError::io(format!("create {}", name_dir.display()), e))?;
        let _lock = lock_file(&name_dir.join(".lock"), &mut |msg| {
            report(BuildPhase::Wait, msg.to_owned())
        })?;
        // Another process may have finished the same build while we waited.
        if !force && is_ready(&final_dir) {
            report(BuildPhase::Done, format!("build {build_id} is up to date"));
            return Ok(image(spec, build_id, &final_dir));
        }
        // Holding the lock: temporary directories here are from builds that died.
        build::clean_stale(&name_dir, &self.host)?;

        let tmp = name_dir.join(format!(".tmp-{build_id}-{}", std::process::id()));
        std::fs::create_dir(&tmp)
            .map_err(|e| TemplateError::io(format!("create {}", tmp.display()), e))?;
        let result = self.build_into(spec, &build_id, &tmp, parent.as_ref(), force, progress);
        let info = match result {
            Ok(info) => info,
            Err(e) => {
                if let Err(cleanup) = fsutil::remove_tree(&self.host.mountinfo, &tmp) {
                    tracing::warn!(error = %cleanup, dir = %tmp.display(), "removing failed build");
                }
                return Err(e);
            }
        };
        if final_dir.exists() {
            // --force over an existing build: move it aside, then swap.
            let old = name_dir.join(format!(".old-{build_id}-{}", std::process::id()));
            std::fs::rename(&final_dir, &old)
                .map_err(|e| TemplateError::io(format!("move {} aside", final_dir.display()), e))?;
            fsutil::remove_tree(&self.host.mountinfo, &old)?;
        }
        std::fs::rename(&tmp, &final_dir)
            .map_err(|e| TemplateError::io(format!("rename {} into place", tmp.display()), e))?;
        progress(&BuildProgress {
            template: spec.name.clone(),
            phase: BuildPhase::Done,
            message: format!(
                "build {build_id} ready: {} MiB in {:.1}s at {}",
                info.size_bytes / (1024 * 1024),
                info.duration_ms as f64 / 1000.0,
                final_dir.join("rootfs").display()
            ),
            done: None,
            total: None,
        });
        Ok(image(spec, build_id, &final_dir))
    }

    fn build_into(
        &self,
        spec: &TemplateSpec,
        build_id: &str,
        tmp: &Path,
        parent: Option<&TemplateImage>,
        refresh: bool,
        progress: &mut dyn FnMut(&BuildProgress),
    ) -> Result<BuildInfo, TemplateError> {
        let started = Instant::now();
        let rootfs = tmp.join("rootfs");
        let cache_dir = self.root.join(".cache");
        let mut ctx = BuildCtx {
            spec,
            rootfs: &rootfs,
            parent_rootfs: parent.map(|p| p.rootfs.as_path()),
            cache_dir: &cache_dir,
            host: &self.host,
            mirror: self.mirror.as_deref(),
            refresh,
            progress,
        };
        build::run(&mut ctx)?;
        let size_bytes = fsutil::tree_stats(&rootfs)?.bytes;
        let info = BuildInfo {
            build_id: build_id.to_owned(),
            builder_version: BUILDER_VERSION.to_owned(),
            built_at_ms: now_ms(),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            size_bytes,
        };
        write_json(&tmp.join("spec.json"), spec)?;
        write_json(&tmp.join("build.json"), &info)?;
        Ok(info)
    }

    /// Remove builds that are not the current one of their template (for templates found
    /// only on disk, all but the newest), leftovers of dead builds, and debootstrap caches no
    /// builtin uses. Templates being built are skipped. Returns how many builds were removed.
    ///
    /// Run it when no sandbox uses an old build (e.g. at server start): a removed build may be
    /// the lower layer of a running sandbox.
    pub fn gc(&self) -> Result<usize, TemplateError> {
        let mut removed = 0;
        for name in self.names_on_disk() {
            let name_dir = self.root.join(&name);
            let Some(_lock) = try_lock_file(&name_dir.join(".lock"))? else {
                continue;
            };
            build::clean_stale(&name_dir, &self.host)?;
            let keep = match TemplateSpec::builtin(&name) {
                Some(spec) => Some(spec.build_id()),
                None => self.newest_build(&name).map(|r| r.build_id),
            };
            for build_id in list_dirs(&name_dir) {
                if Some(&build_id) != keep.as_ref() {
                    fsutil::remove_tree(&self.host.mountinfo, &name_dir.join(&build_id))?;
                    removed += 1;
                }
            }
        }
        let debootstrap_dir = self.root.join(".cache/debootstrap");
        if debootstrap_dir.is_dir()
            && let Some(_lock) = try_lock_file(&debootstrap_dir.join(".lock"))?
        {
            build::clean_stale(&debootstrap_dir, &self.host)?;
            let wanted: Vec<String> = TemplateSpec::builtins()
                .iter()
                .filter(|s| s.from.is_none())
                .map(build::debootstrap_key)
                .collect();
            for key in list_dirs(&debootstrap_dir) {
                if !wanted.contains(&key) {
                    fsutil::remove_tree(&self.host.mountinfo, &debootstrap_dir.join(&key))?;
                }
            }
        }
        Ok(removed)
    }

    fn build_dir(&self, name: &str, build_id: &str) -> PathBuf {
        self.root.join(name).join(build_id)
    }

    /// Template directories in the store (valid names only: `.cache` and junk are skipped).
    fn names_on_disk(&self) -> Vec<String> {
        let mut names: Vec<String> = list_dirs(&self.root)
            .into_iter()
            .filter(|n| is_template_name(n))
            .collect();
        names.sort();
        names
    }

    /// Finished builds of the template directory `name`.
    fn builds(&self, name: &str) -> Vec<BuildRecord> {
        let name_dir = self.root.join(name);
        list_dirs(&name_dir)
            .into_iter()
            .filter_map(|build_id| {
                let dir = name_dir.join(&build_id);
                if !is_ready(&dir) {
                    return None;
                }
                let spec: TemplateSpec = read_json(&dir.join("spec.json"))?;
                (spec.name == name).then(|| BuildRecord {
                    info: read_info(&dir),
                    build_id,
                    spec,
                    dir,
                })
            })
            .collect()
    }

    fn newest_build(&self, name: &str) -> Option<BuildRecord> {
        self.builds(name)
            .into_iter()
            .max_by_key(|r| r.info.as_ref().map_or(i64::MIN, |i| i.built_at_ms))
    }

    /// The newest build on disk of a non-builtin template answering to `name_or_alias`.
    fn newest_on_disk(&self, name_or_alias: &str) -> Option<BuildRecord> {
        if is_template_name(name_or_alias)
            && TemplateSpec::builtin(name_or_alias).is_none()
            && let Some(record) = self.newest_build(name_or_alias)
        {
            return Some(record);
        }
        self.names_on_disk()
            .into_iter()
            .filter(|n| TemplateSpec::builtin(n).is_none())
            .filter_map(|n| self.newest_build(&n))
            .find(|r| r.spec.answers_to(name_or_alias))
    }
}

/// Open (creating) and exclusively `flock` `path`, telling `on_wait` if that has to wait.
/// The lock is held until the returned file is dropped.
pub(super) fn lock_file(path: &Path, on_wait: &mut dyn FnMut(&str)) -> Result<File, TemplateError> {
    let file = open_lock(path)?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(TryLockError::WouldBlock) => on_wait(&format!(
            "waiting for another build ({} is locked)",
            path.display()
        )),
        Err(TryLockError::Error(e)) => {
            return Err(TemplateError::io(format!("lock {}", path.display()), e));
        }
    }
    file.lock()
        .map_err(|e| TemplateError::io(format!("lock {}", path.display()), e))?;
    Ok(file)
}

/// Like [`lock_file`] but gives up (`None`) instead of waiting.
fn try_lock_file(path: &Path) -> Result<Option<File>, TemplateError> {
    let file = open_lock(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => {
            Err(TemplateError::io(format!("lock {}", path.display()), e))
        }
    }
}

fn open_lock(path: &Path) -> Result<File, TemplateError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| TemplateError::io(format!("open {}", path.display()), e))
}

/// A build directory counts as ready when the rename put it in place with its spec and tree.
fn is_ready(dir: &Path) -> bool {
    dir.join("spec.json").is_file() && dir.join("rootfs").is_dir()
}

fn image(spec: &TemplateSpec, build_id: String, dir: &Path) -> TemplateImage {
    TemplateImage {
        name: spec.name.clone(),
        build_id,
        rootfs: dir.join("rootfs"),
        default_user: spec.default_user.clone(),
        env: spec.env.clone(),
        start_cmd: spec.start_cmd.clone(),
        layers: Vec::new(),
    }
}

/// Names of the subdirectories of `dir` that do not start with `.`.
fn list_dirs(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

fn read_info(dir: &Path) -> Option<BuildInfo> {
    read_json(&dir.join("build.json"))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let file = File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_META_FILE).read_to_end(&mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TemplateError> {
    let mut json = serde_json::to_vec_pretty(value)
        .map_err(|e| TemplateError::Build(format!("serialize {}: {e}", path.display())))?;
    json.push(b'\n');
    std::fs::write(path, json)
        .map_err(|e| TemplateError::io(format!("write {}", path.display()), e))
}

/// Effective UID 0, from the `Uid:` line of a `/proc/<pid>/status` file.
fn is_root(proc_status: &Path) -> bool {
    std::fs::read_to_string(proc_status)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Put a fake finished build of `spec` into the store, the way a build leaves it.
    fn fake_build(store: &TemplateStore, spec: &TemplateSpec, built_at_ms: i64) -> PathBuf {
        let build_id = spec.build_id();
        let dir = store.root().join(&spec.name).join(&build_id);
        std::fs::create_dir_all(dir.join("rootfs/etc")).expect("mkdir");
        write_json(&dir.join("spec.json"), spec).expect("spec");
        let info = BuildInfo {
            build_id,
            builder_version: BUILDER_VERSION.into(),
            built_at_ms,
            duration_ms: 1,
            size_bytes: 4096,
        };
        write_json(&dir.join("build.json"), &info).expect("info");
        dir
    }

    fn store() -> (tempfile::TempDir, TemplateStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TemplateStore::new(dir.path().join("templates"));
        (dir, store)
    }

    #[test]
    fn resolve_distinguishes_not_found_and_not_built() {
        let (_dir, store) = store();
        assert!(matches!(store.resolve("nope"), Err(TemplateError::NotFound(n)) if n == "nope"));
        match store.resolve("code-interpreter-v1") {
            Err(TemplateError::NotBuilt { name, build_id }) => {
                assert_eq!(name, "code-interpreter");
                assert_eq!(build_id, TemplateSpec::code_interpreter().build_id());
            }
            other => panic!("expected NotBuilt, got {other:?}"),
        }
        assert!(matches!(
            store.resolve("base"),
            Err(TemplateError::NotBuilt { .. })
        ));
    }

    #[test]
    fn resolve_finds_the_current_build_only() {
        let (_dir, store) = store();
        // An old build of base (different spec) does not count.
        let mut old = TemplateSpec::base();
        old.apt_packages.push("vim".into());
        fake_build(&store, &old, 1);
        assert!(matches!(
            store.resolve("base"),
            Err(TemplateError::NotBuilt { .. })
        ));
        // A half-finished build (no spec.json) does not count either.
        let base = TemplateSpec::base();
        let dir = store.root().join("base").join(base.build_id());
        std::fs::create_dir_all(dir.join("rootfs")).expect("mkdir");
        assert!(matches!(
            store.resolve("base"),
            Err(TemplateError::NotBuilt { .. })
        ));

        let dir = fake_build(&store, &base, 2);
        let image = store.resolve("base").expect("built");
        assert_eq!(image.name, "base");
        assert_eq!(image.build_id, base.build_id());
        assert_eq!(image.rootfs, dir.join("rootfs"));
        assert_eq!(image.default_user, "user");
        assert_eq!(image.env.get("LANG").map(String::as_str), Some("C.UTF-8"));
    }

    #[test]
    fn custom_templates_on_disk_resolve_by_name_and_alias() {
        let (_dir, store) = store();
        let mut custom = TemplateSpec::base();
        custom.name = "mine".into();
        custom.aliases = vec!["my-alias".into()];
        custom.from = Some("base".into());
        fake_build(&store, &custom, 5);
        let mut newer = custom.clone();
        newer.pip_packages.push("requests".into());
        fake_build(&store, &newer, 10);
        assert_eq!(
            store.resolve("mine").expect("mine").build_id,
            newer.build_id()
        );
        assert_eq!(
            store.resolve("my-alias").expect("alias").build_id,
            newer.build_id()
        );
        assert_eq!(store.spec("mine"), Some(newer.clone()));

        let list = store.list();
        let names: Vec<_> = list.iter().map(|s| s.spec.name.as_str()).collect();
        assert_eq!(names, ["base", "code-interpreter", "mine"]);
        assert!(!list[0].ready && list[0].builtin && list[0].size_bytes.is_none());
        assert!(list[2].ready && !list[2].builtin);
        assert_eq!(list[2].size_bytes, Some(4096));
        assert_eq!(list[2].built_at_ms, Some(10));
    }

    #[test]
    fn list_shows_builtin_ready_state() {
        let (_dir, store) = store();
        fake_build(&store, &TemplateSpec::base(), 7);
        let list = store.list();
        let base = list.iter().find(|s| s.spec.name == "base").expect("base");
        assert!(base.ready);
        assert_eq!(base.build_id, TemplateSpec::base().build_id());
        assert_eq!(base.built_at_ms, Some(7));
        let ci = list
            .iter()
            .find(|s| s.spec.name == "code-interpreter")
            .expect("ci");
        assert!(!ci.ready && ci.rootfs.is_none());
    }

    #[test]
    fn gc_keeps_current_builds_and_removes_the_rest() {
        let (_dir, store) = store();
        let base = TemplateSpec::base();
        let current = fake_build(&store, &base, 3);
        let mut old = base.clone();
        old.run.push("true".into());
        let old_dir = fake_build(&store, &old, 1);
        let stale_tmp = store.root().join("base/.tmp-abc-1");
        std::fs::create_dir_all(stale_tmp.join("rootfs")).expect("mkdir");
        let mut custom = base.clone();
        custom.name = "mine".into();
        let custom_old = fake_build(&store, &custom, 1);
        custom.run.push("true".into());
        let custom_new = fake_build(&store, &custom, 2);
        let cache = store.root().join(".cache/debootstrap");
        std::fs::create_dir_all(cache.join("bookworm-unused")).expect("mkdir");
        let wanted_cache = cache.join(build::debootstrap_key(&base));
        std::fs::create_dir_all(&wanted_cache).expect("mkdir");

        assert_eq!(store.gc().expect("gc"), 2);
        assert!(current.exists() && custom_new.exists() && wanted_cache.exists());
        assert!(!old_dir.exists() && !custom_old.exists() && !stale_tmp.exists());
        assert!(!cache.join("bookworm-unused").exists());
        assert_eq!(store.gc().expect("gc again"), 0);
    }

    #[test]
    fn build_when_current_is_a_no_op_without_root() {
        let (_dir, store) = store();
        let base = TemplateSpec::base();
        fake_build(&store, &base, 1);
        let mut seen = Vec::new();
        let image = store
            .build(&base, &mut |p| seen.push(p.clone()), false)
            .expect("no-op build");
        assert_eq!(image.build_id, base.build_id());
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].phase, BuildPhase::Done);
    }

    #[test]
    fn build_rejects_invalid_specs_and_requires_root() {
        let (dir, store) = store();
        let mut bad = TemplateSpec::base();
        bad.name = "../x".into();
        assert!(matches!(
            store.build(&bad, &mut |_| {}, false),
            Err(TemplateError::InvalidSpec(_))
        ));
        // A status file saying uid 1000: the build must refuse before touching anything.
        let status = dir.path().join("status");
        std::fs::write(&status, "Name:\tx\nUid:\t1000\t1000\t1000\t1000\n").expect("write");
        let store = store.with_host_paths(HostPaths {
            proc_status: status,
            ..HostPaths::default()
        });
        assert!(matches!(
            store.build(&TemplateSpec::base(), &mut |_| {}, false),
            Err(TemplateError::RootRequired)
        ));
        assert!(!store.root().exists());
    }

    #[test]
    fn root_check_reads_the_effective_uid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = dir.path().join("status");
        std::fs::write(&status, "Uid:\t1000\t0\t1000\t0\n").expect("write");
        assert!(is_root(&status));
        std::fs::write(&status, "Uid:\t0\t1000\t0\t0\n").expect("write");
        assert!(!is_root(&status));
        assert!(!is_root(&dir.path().join("missing")));
    }

    #[test]
    fn lock_is_exclusive_across_open_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(".lock");
        let held = lock_file(&path, &mut |_| {}).expect("lock");
        assert!(try_lock_file(&path).expect("try").is_none());
        drop(held);
        assert!(try_lock_file(&path).expect("try").is_some());
    }
}
