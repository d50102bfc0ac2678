//! Filesystem snapshots of sandboxes: what `create_snapshot` and `fork` keep, and what new
//! sandboxes start from.
//!
//! Why filesystem-only: the jail has no way to checkpoint processes (no CRIU), and the microVM
//! driver's memory snapshots are of golden VMs taken before any sandbox code ran. A snapshot
//! here is the sandbox's *changes* to its template, written by its driver
//! ([`crate::driver::SandboxHandle::snapshot_filesystem`]) while the sandbox is frozen; a
//! sandbox started from it gets the template plus every layer of the chain stacked on top
//! (E2B's `mode="filesystem"`: it cold-starts with the files, not the processes).
//!
//! Why on disk and not in SQLite: a snapshot *is* files; its `meta.json` sits next to them and
//! is written last, by a rename, so a snapshot is either complete or absent — also after a
//! crash. Layout:
//!
//! ```text
//! <root>/                      e.g. /var/lib/cella/snapshots
//!   .tmp-<id>/                 being written (removed at the next start if it is still there)
//!   <id>/meta.json             the snapshot (owner, name, base template image, parent chain)
//!   <id>/layer/                what the driver wrote
//!   <id>/deleted.json          instead of meta.json: deleted, kept while something uses it
//! ```
//!
//! Why deleting is deferred: a layer is mounted read-only under every sandbox started from it
//! and from its descendants, and removing a lower layer under a live overlay is undefined.
//! [`SnapshotStore::gc`] removes a layer only when no kept snapshot's chain and no live
//! sandbox's chain includes it. Fork's snapshots are `hidden` (never listed) and go the same way
//! once their forks are gone.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use cella_api::Isolation;
use serde::{Deserialize, Serialize};

use crate::driver::TemplateImage;

/// Largest `meta.json` read back.
const MAX_META: u64 = 1 << 20;

/// Longest chain of layers a snapshot may have (an overlay's mount options must fit a page).
pub const MAX_CHAIN: usize = 16;

/// The tag E2B appends to snapshot template IDs (`abc:default`).
pub const DEFAULT_TAG: &str = "default";

/// Longest snapshot name.
pub const MAX_NAME_LEN: usize = 64;

/// One snapshot, as `meta.json` stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Raw ID (`s` + 20 lower-case alphanumerics).
    pub id: String,
    /// Name given at creation (`my-snapshot`).
    pub name: Option<String>,
    /// API key ID that owns it.
    pub owner: String,
    /// The sandbox it was taken of.
    pub source_sandbox: String,
    /// Isolation of that sandbox: only the same driver can start from the layer.
    pub isolation: Isolation,
    /// The template image the chain sits on (its `layers` are empty).
    pub base: TemplateImage,
    /// Snapshots whose layers lie below this one's, newest first.
    pub parents: Vec<String>,
    /// Limits of the source sandbox: the defaults of sandboxes started from the snapshot.
    pub cpu_count: u32,
    /// Memory limit, MiB.
    pub memory_mb: u64,
    /// Disk size, MiB.
    pub disk_mb: u64,
    /// Creation time, ms since the epoch.
    pub created_at_ms: i64,
    /// Disk usage of the layer, bytes.
    pub size_bytes: u64,
    /// Taken for a fork: never listed, removed once unused.
    #[serde(default)]
    pub hidden: bool,
    /// The layer holds the sandbox's memory too ([`crate::driver::SandboxHandle::snapshot_memory`]):
    /// sandboxes started from it with the same limits resume its processes.
    #[serde(default)]
    pub memory: bool,
}

impl SnapshotMeta {
    /// The ID the SDK gets back and passes to `Sandbox.create`: `name:default` when named,
    /// else `id:default` (E2B's form).
    pub fn snapshot_id(&self) -> String {
        format!("{}:{DEFAULT_TAG}", self.name.as_deref().unwrap_or(&self.id))
    }

    /// Every ID of this snapshot and its parents, newest first.
    pub fn chain(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.id.as_str()).chain(self.parents.iter().map(String::as_str))
    }
}

/// Errors of the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The name is not usable.
    #[error(
        "invalid snapshot name {0:?}: use 1-64 of a-z, 0-9, '-' and '_', starting with a letter or digit"
    )]
    InvalidName(String),
    /// An OS call failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A `meta.json` could not be written.
    #[error("encoding snapshot metadata: {0}")]
    Encode(#[from] serde_json::Error),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let context = context.into();
    move |source| SnapshotError::Io { context, source }
}

/// Whether `name` may name a snapshot.
pub fn is_snapshot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

fn is_raw_id(s: &str) -> bool {
    s.len() == 21
        && s.starts_with('s')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// A fresh raw snapshot ID.
pub fn new_snapshot_id() -> String {
    crate::random_id('s')
}

/// A snapshot being written: its layer directory, not visible to anyone until
/// [`SnapshotStore::commit`].
#[derive(Debug)]
pub struct PendingSnapshot {
    /// Its raw ID.
    pub id: String,
    tmp: PathBuf,
}

impl PendingSnapshot {
    /// The empty directory the driver writes into.
    pub fn layer_dir(&self) -> PathBuf {
        self.tmp.join("layer")
    }
}

/// The snapshot directory (`/var/lib/cella/snapshots`).
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    root: PathBuf,
}

impl SnapshotStore {
    /// A store in `root`, created when missing. Leftovers of interrupted snapshots are removed.
    pub fn open(root: PathBuf) -> Result<SnapshotStore, SnapshotError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&root)
            .map_err(io(format!("creating {}", root.display())))?;
        let store = SnapshotStore { root };
        let paused = store.paused_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&paused)
            .map_err(io(format!("creating {}", paused.display())))?;
        for entry in store.entries() {
            if entry.starts_with(".tmp-") {
                let _ = std::fs::remove_dir_all(store.root.join(&entry));
            }
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entries(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        rd.filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }

    /// Start a snapshot: an empty directory for the driver to write its layer into.
    pub fn begin(&self) -> Result<PendingSnapshot, SnapshotError> {
        use std::os::unix::fs::DirBuilderExt;
        let id = new_snapshot_id();
        let tmp = self.root.join(format!(".tmp-{id}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io(format!("creating {}", tmp.display())))?;
        // A layer holds whatever a sandbox wrote, set-ID binaries included: only root and the
        // sandboxes' root (which mounts it as a lower layer) may enter its directory.
        if let Err(e) = std::os::unix::fs::chown(
            &tmp,
            Some(crate::driver::SANDBOX_ID_BASE),
            Some(crate::driver::SANDBOX_ID_BASE),
        ) && e.kind() != std::io::ErrorKind::PermissionDenied
        {
            let _ = std::fs::remove_dir(&tmp);
            return Err(SnapshotError::Io {
                context: format!("chown {}", tmp.display()),
                source: e,
            });
        }
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(tmp.join("layer"))
            .map_err(io(format!("creating {}/layer", tmp.display())))?;
        Ok(PendingSnapshot { id, tmp })
    }

    /// Drop a snapshot that failed.
    pub fn abort(&self, pending: PendingSnapshot) {
        if let Err(e) = std::fs::remove_dir_all(&pending.tmp) {
            tracing::warn!(path = %pending.tmp.display(), error = %e, "removing a failed snapshot");
        }
    }

    /// Make a written snapshot visible. `meta.id` must be the pending ID; `size_bytes` is
    /// measured here.
    pub fn commit(
        &self,
        pending: PendingSnapshot,
        mut meta: SnapshotMeta,
    ) -> Result<SnapshotMeta, SnapshotError> {
        meta.id = pending.id.clone();
        meta.size_bytes = disk_usage(&pending.layer_dir());
        let json = serde_json::to_vec_pretty(&meta)?;
        let write = || -> Result<(), SnapshotError> {
            let m = pending.tmp.join("meta.json");
            std::fs::write(&m, &json).map_err(io(format!("writing {}", m.display())))?;
            let dst = self.root.join(&meta.id);
            std::fs::rename(&pending.tmp, &dst).map_err(io(format!(
                "renaming {} to {}",
                pending.tmp.display(),
                dst.display()
            )))
        };
        match write() {
            Ok(()) => Ok(meta),
            Err(e) => {
                self.abort(pending);
                Err(e)
            }
        }
    }

    fn read_meta(path: &Path) -> Option<SnapshotMeta> {
        Self::read_json(path)
    }

    /// A snapshot by raw ID, deleted ones included (live sandboxes may still use them).
    pub fn get_any(&self, id: &str) -> Option<SnapshotMeta> {
        if !is_raw_id(id) {
            return None;
        }
        let dir = self.root.join(id);
        Self::read_meta(&dir.join("meta.json"))
            .or_else(|| Self::read_meta(&dir.join("deleted.json")))
    }

    /// Every snapshot that is not deleted (hidden ones included).
    fn all(&self) -> Vec<SnapshotMeta> {
        self.entries()
            .into_iter()
            .filter(|e| is_raw_id(e))
            .filter_map(|e| Self::read_meta(&self.root.join(e).join("meta.json")))
            .collect()
    }

    /// `owner`'s snapshot that `reference` names: a raw ID or a name, with or without
    /// `:default`; for a name, the newest snapshot with it. Hidden and deleted ones are not
    /// found, nor other owners'.
    pub fn resolve(&self, owner: &str, reference: &str) -> Option<SnapshotMeta> {
        let key = match reference.rsplit_once(':') {
            Some((k, DEFAULT_TAG)) => k,
            Some(_) => return None,
            None => reference,
        };
        if is_raw_id(key) {
            let dir = self.root.join(key);
            return Self::read_meta(&dir.join("meta.json"))
                .filter(|m| m.owner == owner && !m.hidden);
        }
        if !is_snapshot_name(key) {
            return None;
        }
        self.all()
            .into_iter()
            .filter(|m| m.owner == owner && !m.hidden && m.name.as_deref() == Some(key))
            .max_by_key(|m| (m.created_at_ms, m.id.clone()))
    }

    /// `owner`'s listed snapshots, newest first: one per name (its newest), and every unnamed one.
    pub fn list(&self, owner: &str) -> Vec<SnapshotMeta> {
        let mut all: Vec<SnapshotMeta> = self
            .all()
            .into_iter()
            .filter(|m| m.owner == owner && !m.hidden)
            .collect();
        all.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(b.id.cmp(&a.id)));
        let mut seen = HashSet::new();
        all.retain(|m| match &m.name {
            Some(n) => seen.insert(n.clone()),
            None => true,
        });
        all
    }

    /// The layer directories of `meta`'s chain, newest first.
    pub fn layers(&self, meta: &SnapshotMeta) -> Vec<PathBuf> {
        meta.chain()
            .map(|id| self.root.join(id).join("layer"))
            .collect()
    }

    /// Delete what `reference` names for `owner` (for a name: every snapshot with it).
    /// Returns how many were deleted; their files go at the next [`SnapshotStore::gc`] that
    /// finds them unused.
    pub fn delete(&self, owner: &str, reference: &str) -> Result<usize, SnapshotError> {
        let key = match reference.rsplit_once(':') {
            Some((k, DEFAULT_TAG)) => k,
            Some(_) => return Ok(0),
            None => reference,
        };
        let victims: Vec<SnapshotMeta> = if is_raw_id(key) {
            self.resolve(owner, key).into_iter().collect()
        } else if is_snapshot_name(key) {
            self.all()
                .into_iter()
                .filter(|m| m.owner == owner && !m.hidden && m.name.as_deref() == Some(key))
                .collect()
        } else {
            Vec::new()
        };
        for m in &victims {
            self.mark_deleted(&m.id)?;
        }
        Ok(victims.len())
    }

    /// Mark a snapshot deleted (hidden fork snapshots are marked by the manager this way too).
    pub fn mark_deleted(&self, id: &str) -> Result<(), SnapshotError> {
        let dir = self.root.join(id);
        std::fs::rename(dir.join("meta.json"), dir.join("deleted.json"))
            .map_err(io(format!("deleting snapshot {id}")))
    }

    /// Remove the files of every snapshot that is deleted or hidden and that neither a kept
    /// snapshot's chain nor a chain in `in_use` (the snapshots live sandboxes started from)
    /// includes. Returns how many were removed.
    pub fn gc(&self, in_use: &HashSet<String>) -> usize {
        let mut keep: HashSet<String> = HashSet::new();
        for m in self.all() {
            if !m.hidden || in_use.contains(&m.id) {
                keep.extend(m.chain().map(str::to_string));
            }
        }
        for id in in_use {
            if let Some(m) = self.get_any(id) {
                keep.extend(m.chain().map(str::to_string));
            }
        }
        let mut removed = 0;
        for entry in self.entries() {
            if !is_raw_id(&entry) || keep.contains(&entry) {
                continue;
            }
            let dir = self.root.join(&entry);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!(path = %dir.display(), error = %e, "removing a snapshot"),
            }
        }
        removed
    }
}

/// A sandbox paused to disk (a filesystem pause, or a paused sandbox at server shutdown): its
/// files are the hidden snapshot `snapshot`, everything else needed to start it again under
/// the same ID and tokens is here. Stored as `<root>/.paused/<sandbox id>.json` (mode 0600: it
/// holds the sandbox's access tokens).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PausedRecord {
    /// Sandbox ID.
    pub id: String,
    /// Owning API key ID.
    pub owner: String,
    /// The hidden snapshot holding its files.
    pub snapshot: String,
    /// Template ID it reports (template name or snapshot ID it was created from).
    pub template_id: String,
    /// Alias it was requested by.
    pub alias: Option<String>,
    /// Agent access token (kept, so that SDK handles keep working after the resume).
    pub access_token: String,
    /// Traffic access token.
    pub traffic_access_token: Option<String>,
    /// First start, ms since the epoch.
    pub started_at_ms: i64,
    /// When it is killed for having been paused too long, ms since the epoch.
    pub end_at_ms: i64,
    /// Lifetime it was created with, seconds.
    pub timeout_secs: u64,
    /// Isolation it had.
    pub isolation: Isolation,
    /// The create request (with the egress rules in force at the pause).
    pub request: cella_api::NewSandbox,
    /// Limits.
    pub cpu_count: u32,
    /// Memory limit, MiB.
    pub memory_mb: u64,
    /// Disk size, MiB.
    pub disk_mb: u64,
}

impl SnapshotStore {
    fn paused_dir(&self) -> PathBuf {
        self.root.join(".paused")
    }

    /// Persist `rec` (replacing an older record of the same sandbox), atomically.
    pub fn save_paused(&self, rec: &PausedRecord) -> Result<(), SnapshotError> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let dir = self.paused_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(format!("creating {}", dir.display())))?;
        let json = serde_json::to_vec_pretty(rec)?;
        let tmp = dir.join(format!(".tmp-{}", rec.id));
        let dst = dir.join(format!("{}.json", rec.id));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(format!("writing {}", tmp.display())))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &dst).map_err(io(format!("renaming to {}", dst.display())))
    }

    /// Every persisted paused sandbox (unreadable records are skipped and logged).
    pub fn load_paused(&self) -> Vec<PausedRecord> {
        let Ok(rd) = std::fs::read_dir(self.paused_dir()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.filter_map(Result::ok) {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let rec = Self::read_json::<PausedRecord>(&path);
            match rec {
                Some(r) if path.file_stem().is_some_and(|s| s == r.id.as_str()) => out.push(r),
                _ => {
                    tracing::warn!(path = %path.display(), "skipping an unreadable paused sandbox")
                }
            }
        }
        out
    }

    /// Forget a paused sandbox (resumed or killed).
    pub fn remove_paused(&self, id: &str) {
        let path = self.paused_dir().join(format!("{id}.json"));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "removing a paused sandbox record")
            }
        }
    }

    fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
        use std::io::Read;
        let f = std::fs::File::open(path).ok()?;
        let mut buf = Vec::new();
        f.take(MAX_META).read_to_end(&mut buf).ok()?;
        serde_json::from_slice(&buf).ok()
    }
}

/// Bytes allocated under `dir` (not following symlinks).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            let Ok(md) = e.metadata() else { continue };
            total = total.saturating_add(md.blocks().saturating_mul(512));
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> TemplateImage {
        TemplateImage {
            name: "base".into(),
            build_id: "b1".into(),
            rootfs: "/nonexistent/rootfs".into(),
            default_user: "user".into(),
            env: Default::default(),
            start_cmd: None,
            layers: Vec::new(),
        }
    }

    fn meta(owner: &str, name: Option<&str>, parents: Vec<String>, at: i64) -> SnapshotMeta {
        SnapshotMeta {
            id: String::new(),
            name: name.map(str::to_string),
            owner: owner.into(),
            source_sandbox: "isrc".into(),
            isolation: Isolation::Jail,
            base: image(),
            parents,
            cpu_count: 1,
            memory_mb: 256,
            disk_mb: 512,
            created_at_ms: at,
            size_bytes: 0,
            hidden: false,
            memory: false,
        }
    }

    fn take(store: &SnapshotStore, m: SnapshotMeta, file: &str) -> SnapshotMeta {
        let p = store.begin().expect("begin");
        std::fs::write(p.layer_dir().join(file), b"x").expect("write layer");
        store.commit(p, m).expect("commit")
    }

    #[test]
    fn names_are_checked() {
        assert!(is_snapshot_name("my-snap_1"));
        assert!(!is_snapshot_name(""));
        assert!(!is_snapshot_name("-x"));
        assert!(!is_snapshot_name("Upper"));
        assert!(!is_snapshot_name("a/b"));
        assert!(!is_snapshot_name("../x"));
        assert!(!is_snapshot_name(&"a".repeat(65)));
        assert!(is_raw_id(&new_snapshot_id()));
    }

    #[test]
    fn committed_snapshots_resolve_by_id_and_name_for_their_owner_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::open(dir.path().join("snaps")).expect("open");
        let a = take(&store, meta("k1", Some("snap"), vec![], 1), "a");
        assert_eq!(a.snapshot_id(), "snap:default");
        assert!(a.size_bytes > 0);
        assert_eq!(
            store.resolve("k1", "snap").map(|m| m.id),
            Some(a.id.clone())
        );
        assert_eq!(
            store.resolve("k1", "snap:default").map(|m| m.id),
            Some(a.id.clone())
        );
        assert_eq!(store.resolve("k1", &a.id).map(|m| m.id), Some(a.id.clone()));
        assert!(store.resolve("k1", "snap:v2").is_none());
        assert!(store.resolve("k2", "snap").is_none());
        assert!(store.resolve("k2", &a.id).is_none());
        // A newer snapshot with the same name takes the name over; the list shows it once.
        let b = take(&store, meta("k1", Some("snap"), vec![], 2), "b");
        let c = take(&store, meta("k1", None, vec![], 3), "c");
        assert_eq!(c.snapshot_id(), format!("{}:default", c.id));
        assert_eq!(
            store.resolve("k1", "snap").map(|m| m.id),
            Some(b.id.clone())
        );
        let listed: Vec<String> = store.list("k1").into_iter().map(|m| m.id).collect();
        assert_eq!(listed, vec![c.id.clone(), b.id.clone()]);
        assert!(store.list("k2").is_empty());
        assert_eq!(
            store.layers(&b),
            vec![store.root().join(&b.id).join("layer")]
        );
    }

    #[test]
    fn a_deleted_layer_stays_while_a_chain_or_sandbox_uses_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::open(dir.path().join("snaps")).expect("open");
        let parent = take(&store, meta("k1", Some("p"), vec![], 1), "p");
        let child = take(&store, meta("k1", None, vec![parent.id.clone()], 2), "c");
        assert_eq!(store.layers(&child).len(), 2);
        assert_eq!(store.delete("k1", "p:default").expect("delete"), 1);
        assert!(store.resolve("k1", "p").is_none());
        assert!(store.get_any(&parent.id).is_some());
        // The child's chain keeps the parent's layer.
        assert_eq!(store.gc(&HashSet::new()), 0);
        assert!(store.root().join(&parent.id).join("layer/p").exists());
        assert_eq!(store.delete("k1", &child.id).expect("delete"), 1);
        // A live sandbox started from the child keeps both.
        let in_use: HashSet<String> = [child.id.clone()].into();
        assert_eq!(store.gc(&in_use), 0);
        assert_eq!(store.gc(&HashSet::new()), 2);
        assert!(!store.root().join(&parent.id).exists());
        assert!(!store.root().join(&child.id).exists());
        assert_eq!(store.delete("k1", "nothing").expect("delete"), 0);
        assert_eq!(store.delete("k1", "../etc").expect("delete"), 0);
    }

    #[test]
    fn hidden_snapshots_are_never_listed_and_go_when_unused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::open(dir.path().join("snaps")).expect("open");
        let mut m = meta("k1", None, vec![], 1);
        m.hidden = true;
        let h = take(&store, m, "h");
        assert!(store.list("k1").is_empty());
        assert!(store.resolve("k1", &h.id).is_none());
        assert!(store.get_any(&h.id).is_some());
        assert_eq!(store.gc(&[h.id.clone()].into()), 0);
        assert_eq!(store.gc(&HashSet::new()), 1);
    }

    #[test]
    fn an_interrupted_snapshot_is_removed_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("snaps");
        let store = SnapshotStore::open(root.clone()).expect("open");
        let p = store.begin().expect("begin");
        std::fs::write(p.layer_dir().join("x"), b"x").expect("write");
        let tmp = p.tmp.clone();
        drop(p);
        assert!(tmp.exists());
        let _ = SnapshotStore::open(root).expect("reopen");
        assert!(!tmp.exists());
    }
}
