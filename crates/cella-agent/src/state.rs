//! Shared agent state, request authentication, user selection and path resolution.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::http::{HeaderMap, header};
use base64::Engine as _;
use cella_proto::control::AgentEvent;
use cella_proto::envd::connect::{Code, ConnectError};
use cella_proto::envd::signature::constant_time_eq;

use crate::process::ProcessTable;
use crate::reaper::Reaper;
use crate::users::{User, UserDb, UserError};
use crate::watch::WatcherTable;

/// Static configuration of a running agent.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Access token (empty: no authentication, like an envd that was never given one).
    pub token: String,
    /// Sandbox-wide environment.
    pub env_vars: BTreeMap<String, String>,
    /// Default user for requests that name none.
    pub default_user: String,
    /// Default working directory for commands (empty: the user's home).
    pub default_workdir: String,
    /// Root of `/etc/passwd`, `/etc/group` (`/` in production).
    pub users_root: PathBuf,
    /// Root of `/proc` for metrics (`/` in production).
    pub proc_root: PathBuf,
    /// Root of the system this agent manages (`/` in a sandbox): the filesystem `/fsfreeze`
    /// freezes and where `/egress` writes `etc/resolv.conf`. `None` (a standalone agent on a
    /// host): those host-only routes are off, so they never touch the host.
    pub system_root: Option<PathBuf>,
}

/// Sends audit events to the host without ever blocking.
#[derive(Debug, Clone, Default)]
pub struct EventSink {
    tx: Option<tokio::sync::mpsc::Sender<AgentEvent>>,
    /// Events queued so far (under the lock, so the count matches the channel's order).
    queued: Arc<std::sync::Mutex<u64>>,
    /// Events the writer has put on the control channel (absent: not tracked).
    written: Option<tokio::sync::watch::Receiver<u64>>,
}

/// Longest [`EventSink::emit_flushed`] waits for the writer.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl EventSink {
    /// A sink feeding a channel (untracked: [`EventSink::emit_flushed`] does not wait).
    #[cfg(test)]
    pub fn new(tx: tokio::sync::mpsc::Sender<AgentEvent>) -> Self {
        EventSink {
            tx: Some(tx),
            ..EventSink::default()
        }
    }

    /// A sink whose writer reports each event it wrote in `written`, so that
    /// [`EventSink::emit_flushed`] can wait for it.
    pub fn tracked(
        tx: tokio::sync::mpsc::Sender<AgentEvent>,
        written: tokio::sync::watch::Receiver<u64>,
    ) -> Self {
        EventSink {
            tx: Some(tx),
            queued: Arc::default(),
            written: Some(written),
        }
    }

    /// Queue an event; `Some(n)`: it is the n-th queued. Dropped if the host is not keeping up.
    fn queue(&self, event: AgentEvent) -> Option<u64> {
        let Some(tx) = &self.tx else {
            tracing::debug!(?event, "audit event");
            return None;
        };
        let mut queued = self.queued.lock().ok()?;
        if tx.try_send(event).is_err() {
            tracing::debug!("control channel full, audit event dropped");
            return None;
        }
        *queued += 1;
        Some(*queued)
    }

    /// Queue an event; dropped if the host is not keeping up.
    pub fn emit(&self, event: AgentEvent) {
        let _ = self.queue(event);
    }

    /// Queue an event and wait (at most [`FLUSH_WAIT`]) until it is on the control channel:
    /// for records of what the API itself did (a file written), which must not be lost when
    /// the sandbox is killed right after the answer.
    pub async fn emit_flushed(&self, event: AgentEvent) {
        let (Some(n), Some(written)) = (self.queue(event), self.written.clone()) else {
            return;
        };
        let mut written = written;
        let _ = tokio::time::timeout(FLUSH_WAIT, written.wait_for(|w| *w >= n)).await;
    }
}

/// What a host may replace while the agent runs: a microVM restored from a sandbox's memory
/// snapshot wakes with the source's token and environment and is handed its own
/// ([`Agent::reconfigure`]).
#[derive(Debug, Clone)]
struct Session {
    token: String,
    env_vars: BTreeMap<String, String>,
}

/// Everything request handlers share.
#[derive(Debug)]
pub struct Agent {
    /// Configuration (`token` and `env_vars` as at start; the live ones are
    /// [`Agent::token`] and [`Agent::env_vars`]).
    pub settings: Settings,
    session: std::sync::RwLock<Session>,
    /// User database.
    pub users: UserDb,
    /// Whether we can switch users (running as root).
    pub is_root: bool,
    /// Our own UID/GID, used when not root.
    pub self_ids: (u32, u32),
    /// Processes started through the agent.
    pub processes: ProcessTable,
    /// Polling watchers.
    pub watchers: WatcherTable,
    /// Exit status dispatcher.
    pub reaper: Arc<Reaper>,
    /// Audit events.
    pub events: EventSink,
}

/// Shared handle.
pub type AgentRef = Arc<Agent>;

impl Agent {
    /// Build the state.
    pub fn new(settings: Settings, reaper: Arc<Reaper>, events: EventSink) -> Self {
        // SAFETY: getuid/getgid cannot fail and have no memory effects.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Agent {
            users: UserDb::new(settings.users_root.clone()),
            session: std::sync::RwLock::new(Session {
                token: settings.token.clone(),
                env_vars: settings.env_vars.clone(),
            }),
            settings,
            is_root: uid == 0,
            self_ids: (uid, gid),
            processes: ProcessTable::default(),
            watchers: WatcherTable::default(),
            reaper,
            events,
        }
    }

    fn session(&self) -> Session {
        match self.session.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The access token in force (empty: no authentication).
    pub fn token(&self) -> String {
        self.session().token
    }

    /// The sandbox-wide environment in force.
    pub fn env_vars(&self) -> BTreeMap<String, String> {
        self.session().env_vars
    }

    /// Take a new token and environment (the host's config line after a memory restore).
    /// Requests authorised from now on need the new token; running processes keep theirs.
    pub fn reconfigure(&self, token: String, env_vars: BTreeMap<String, String>) {
        let mut s = match self.session.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        *s = Session { token, env_vars };
    }

    /// Whether a presented token matches (always true when no token is configured).
    pub fn token_ok(&self, presented: Option<&str>) -> bool {
        let token = self.token();
        if token.is_empty() {
            return true;
        }
        presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes()))
    }

    /// Whether the request carries a valid `X-Access-Token`.
    pub fn header_token_ok(&self, headers: &HeaderMap) -> bool {
        self.token_ok(
            headers
                .get(cella_proto::envd::ACCESS_TOKEN_HEADER)
                .and_then(|v| v.to_str().ok()),
        )
    }

    /// Resolve a user by name, or the default user when `name` is empty/absent. When the agent
    /// is not root it cannot switch users, so the account's home is used but the IDs are ours.
    pub fn resolve_user(&self, name: Option<&str>) -> Result<User, UserError> {
        let name = match name {
            Some(n) if !n.is_empty() => n,
            _ => self.settings.default_user.as_str(),
        };
        let mut user = self.users.lookup(name)?;
        if !self.is_root {
            user.uid = self.self_ids.0;
            user.gid = self.self_ids.1;
            user.groups.clear();
        }
        Ok(user)
    }

    /// The user a Connect request acts as (`Authorization: Basic base64("<user>:")`).
    pub fn request_user(&self, headers: &HeaderMap) -> Result<User, ConnectError> {
        let name = basic_auth_user(headers);
        self.resolve_user(name.as_deref())
            .map_err(|e| ConnectError::new(Code::Unauthenticated, format!("invalid username: {e}")))
    }

    /// Credentials to chown created files to (`None` when not root: files are ours anyway).
    pub fn owner_ids(&self, user: &User) -> Option<(u32, u32)> {
        self.is_root.then_some((user.uid, user.gid))
    }
}

/// The username from an `Authorization: Basic` header, if any.
pub fn basic_auth_user(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split(':').next().unwrap_or_default();
    (!user.is_empty()).then(|| user.to_string())
}

/// Why a path could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `~otheruser/...` is not supported.
    #[error("cannot expand user-specific home dir in {0:?}")]
    OtherHome(String),
    /// NUL bytes are not allowed.
    #[error("path contains a NUL byte")]
    Nul,
}

/// Lexically clean an absolute path (`.`/`..`/duplicate slashes), never escaping `/`.
pub fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

/// Resolve a request path the way envd does: `~` and `~/x` expand to `home`, relative paths
/// are relative to `home`, an empty path is `default` (or `home`), and the result is cleaned.
pub fn resolve_path(path: &str, home: &str, default: Option<&str>) -> Result<PathBuf, PathError> {
    if path.contains('\0') {
        return Err(PathError::Nul);
    }
    let home = if home.is_empty() { "/" } else { home };
    let path = if path.is_empty() {
        default.filter(|d| !d.is_empty()).unwrap_or(home)
    } else {
        path
    };
    let expanded: PathBuf = if let Some(rest) = path.strip_prefix('~') {
        if !rest.is_empty() && !rest.starts_with('/') {
            return Err(PathError::OtherHome(path.to_string()));
        }
        Path::new(home).join(rest.trim_start_matches('/'))
    } else if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        Path::new(home).join(path)
    };
    Ok(clean(&expanded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn emit_flushed_waits_until_the_writer_wrote_the_event() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let (written_tx, written_rx) = tokio::sync::watch::channel(0u64);
        let sink = EventSink::tracked(tx, written_rx);
        sink.emit(AgentEvent::Ready {
            version: "x".into(),
        });
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = done.clone();
        let writer = tokio::spawn(async move {
            let mut n = 0;
            while let Some(_ev) = rx.recv().await {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                n += 1;
                if n == 2 {
                    d2.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                written_tx.send_modify(|w| *w += 1);
            }
        });
        sink.emit_flushed(AgentEvent::FileWrite {
            path: "/x".into(),
            size: 1,
            user: "user".into(),
        })
        .await;
        assert!(
            done.load(std::sync::atomic::Ordering::SeqCst),
            "returned before the second event was written"
        );
        drop(sink);
        let _ = writer.await;
    }
    use axum::http::HeaderValue;

    #[test]
    fn path_resolution() {
        let r = |p: &str| resolve_path(p, "/home/user", None).map(|p| p.display().to_string());
        assert_eq!(r("/etc/passwd").as_deref(), Ok("/etc/passwd"));
        assert_eq!(r("a/b.txt").as_deref(), Ok("/home/user/a/b.txt"));
        assert_eq!(r("~").as_deref(), Ok("/home/user"));
        assert_eq!(r("~/x").as_deref(), Ok("/home/user/x"));
        assert_eq!(r("").as_deref(), Ok("/home/user"));
        assert_eq!(r("../../../../etc").as_deref(), Ok("/etc"));
        assert_eq!(r("/a/./b//c/../d").as_deref(), Ok("/a/b/d"));
        assert_eq!(r("/../..").as_deref(), Ok("/"));
        assert!(matches!(r("~root/x"), Err(PathError::OtherHome(_))));
        assert_eq!(r("a\0b"), Err(PathError::Nul));
        assert_eq!(
            resolve_path("", "/home/user", Some("/work")).map(|p| p.display().to_string()),
            Ok("/work".to_string())
        );
    }

    #[test]
    fn basic_auth_username() {
        let mut h = HeaderMap::new();
        assert_eq!(basic_auth_user(&h), None);
        // base64("root:")
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic cm9vdDo="),
        );
        assert_eq!(basic_auth_user(&h).as_deref(), Some("root"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer cm9vdDo="),
        );
        assert_eq!(basic_auth_user(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(basic_auth_user(&h), None);
        // base64(":")
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("basic Og=="),
        );
        assert_eq!(basic_auth_user(&h), None);
    }
}
