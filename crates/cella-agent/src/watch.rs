//! Directory watching with inotify: the `WatchDir` stream and the polling watcher trio
//! (`CreateWatcher` / `GetWatcherEvents` / `RemoveWatcher`) the sync Python SDK uses.
//!
//! inotify is not recursive, so a recursive watch adds a watch per directory, including
//! directories created while watching. Event names are relative to the watched directory.
//! Polling watchers keep a bounded queue: a client that never polls loses the oldest events
//! instead of growing the agent's memory.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use cella_proto::envd::connect::{Code, ConnectError};
use cella_proto::envd::filesystem::{
    CreateWatcherResponse, EventType, FilesystemEvent, GetWatcherEventsResponse, WatchDirRequest,
    WatchDirResponse, WatchStart, WatcherIdRequest,
};
use cella_proto::envd::process::{Empty, KeepAlive};
use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::mpsc;

use crate::fs::{blocking, entry_info, io_err};
use crate::rpc::{self, err};
use crate::state::{AgentRef, resolve_path};

/// Most directories one recursive watch covers.
const MAX_WATCHED_DIRS: usize = 8192;
/// Most events queued for a polling watcher.
const MAX_QUEUED_EVENTS: usize = 10_000;
/// Most polling watchers at once.
const MAX_WATCHERS: usize = 256;

fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::MODIFY
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
}

struct Tree {
    root: PathBuf,
    recursive: bool,
    dirs: HashMap<WatchDescriptor, PathBuf>,
}

impl Tree {
    fn add(&mut self, watches: &mut Watches, rel: &Path) {
        if self.dirs.len() >= MAX_WATCHED_DIRS {
            return;
        }
        let full = self.root.join(rel);
        if let Ok(wd) = watches.add(&full, mask()) {
            self.dirs.insert(wd, rel.to_path_buf());
        }
        if !self.recursive {
            return;
        }
        let Ok(rd) = std::fs::read_dir(&full) else {
            return;
        };
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                self.add(watches, &rel.join(e.file_name()));
            }
        }
    }
}

fn event_type(mask: EventMask) -> Option<EventType> {
    if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
        Some(EventType::Create)
    } else if mask.contains(EventMask::MODIFY) {
        Some(EventType::Write)
    } else if mask.intersects(EventMask::DELETE | EventMask::DELETE_SELF) {
        Some(EventType::Remove)
    } else if mask.intersects(EventMask::MOVED_FROM | EventMask::MOVE_SELF) {
        Some(EventType::Rename)
    } else if mask.contains(EventMask::ATTRIB) {
        Some(EventType::Chmod)
    } else {
        None
    }
}

/// Start watching; events go to the returned channel until it is dropped.
async fn start_watch(
    agent: &AgentRef,
    headers: &HeaderMap,
    req: WatchDirRequest,
) -> Result<mpsc::Receiver<FilesystemEvent>, ConnectError> {
    let user = agent.request_user(headers)?;
    let root = resolve_path(&req.path, &user.home, None)
        .map_err(|e| err(Code::InvalidArgument, e.to_string()))?;
    let root2 = root.clone();
    let md = blocking(move || {
        std::fs::metadata(&root2)
            .map_err(|e| io_err(&e, &format!("path not found: {}", root2.display())))
    })
    .await?;
    if !md.is_dir() {
        return Err(err(
            Code::InvalidArgument,
            format!("path {} not a directory", root.display()),
        ));
    }
    let inotify = Inotify::init().map_err(|e| err(Code::Internal, format!("inotify init: {e}")))?;
    let mut stream = inotify
        .into_event_stream(vec![0u8; 16 * 1024])
        .map_err(|e| err(Code::Internal, format!("inotify stream: {e}")))?;
    let mut watches = stream.watches();
    let mut tree = Tree {
        root: root.clone(),
        recursive: req.recursive,
        dirs: HashMap::new(),
    };
    tree.add(&mut watches, Path::new(""));
    if tree.dirs.is_empty() {
        return Err(err(
            Code::Internal,
            format!("cannot watch {}", root.display()),
        ));
    }
    let (tx, rx) = mpsc::channel(256);
    let include_entry = req.include_entry;
    let names_agent = agent.clone();
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                n = stream.next() => n,
                _ = tx.closed() => break,
            };
            let Some(Ok(ev)) = next else { break };
            if ev.mask.contains(EventMask::IGNORED) {
                tree.dirs.remove(&ev.wd);
                if tree.dirs.is_empty() {
                    break;
                }
                continue;
            }
            let Some(dir) = tree.dirs.get(&ev.wd).cloned() else {
                continue;
            };
            let rel = match &ev.name {
                Some(n) => dir.join(n),
                None if ev
                    .mask
                    .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF) =>
                {
                    // The subdirectory itself; its parent's watch reports it already.
                    if dir.as_os_str().is_empty() {
                        dir.clone()
                    } else {
                        continue;
                    }
                }
                None => continue,
            };
            if tree.recursive
                && ev.mask.contains(EventMask::ISDIR)
                && ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO)
            {
                tree.add(&mut watches, &rel);
            }
            let Some(kind) = event_type(ev.mask) else {
                continue;
            };
            let entry = if include_entry && !matches!(kind, EventType::Remove | EventType::Rename) {
                entry_info(&tree.root.join(&rel), &names_agent.users.names()).ok()
            } else {
                None
            };
            let fe = FilesystemEvent {
                name: rel.display().to_string(),
                event_type: kind,
                entry,
            };
            if tx.send(fe).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// `WatchDir` (server stream).
pub async fn watch_dir(State(agent): State<AgentRef>, headers: HeaderMap, body: Body) -> Response {
    let req: WatchDirRequest = match rpc::stream_request(&headers, body).await {
        Ok(r) => r,
        Err(e) => return rpc::stream_error(e),
    };
    let rx = match start_watch(&agent, &headers, req).await {
        Ok(rx) => rx,
        Err(e) => return rpc::stream_error(e),
    };
    let first = futures::stream::iter([Ok(WatchDirResponse {
        start: Some(WatchStart {}),
        ..Default::default()
    })]);
    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|ev| {
            (
                Ok(WatchDirResponse {
                    filesystem: Some(ev),
                    ..Default::default()
                }),
                rx,
            )
        })
    });
    let keepalive = rpc::keepalive_interval(&headers).map(|d| {
        (
            d,
            WatchDirResponse {
                keepalive: Some(KeepAlive {}),
                ..Default::default()
            },
        )
    });
    rpc::stream_response(first.chain(events), keepalive)
}

#[derive(Debug)]
struct PollWatcher {
    events: Arc<Mutex<VecDeque<FilesystemEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

/// Polling watchers by ID.
#[derive(Debug, Default)]
pub struct WatcherTable {
    inner: Mutex<HashMap<String, PollWatcher>>,
    next: AtomicU64,
}

impl WatcherTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PollWatcher>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `CreateWatcher`.
pub async fn create_watcher(
    State(agent): State<AgentRef>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let req: WatchDirRequest = rpc::unary_request(&headers, body).await?;
        if agent.watchers.lock().len() >= MAX_WATCHERS {
            return Err(err(Code::ResourceExhausted, "too many watchers"));
        }
        let mut rx = start_watch(&agent, &headers, req).await?;
        let events = Arc::new(Mutex::new(VecDeque::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let mut q = sink.lock().unwrap_or_else(|e| e.into_inner());
                if q.len() >= MAX_QUEUED_EVENTS {
                    q.pop_front();
                }
                q.push_back(ev);
            }
        });
        let n = agent.watchers.next.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .subsec_nanos();
        let id = format!("w{n}-{nanos:08x}");
        agent
            .watchers
            .lock()
            .insert(id.clone(), PollWatcher { events, task });
        Ok(CreateWatcherResponse { watcher_id: id })
    }
    .await;
    rpc::unary_response(result)
}

/// `GetWatcherEvents`.
pub async fn get_watcher_events(
    State(agent): State<AgentRef>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let req: WatcherIdRequest = rpc::unary_request(&headers, body).await?;
        let table = agent.watchers.lock();
        let w = table.get(&req.watcher_id).ok_or_else(|| {
            err(
                Code::NotFound,
                format!("watcher {} not found", req.watcher_id),
            )
        })?;
        let events: Vec<FilesystemEvent> = w
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        Ok(GetWatcherEventsResponse { events })
    }
    .await;
    rpc::unary_response(result)
}

/// `RemoveWatcher`.
pub async fn remove_watcher(
    State(agent): State<AgentRef>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let req: WatcherIdRequest = rpc::unary_request(&headers, body).await?;
        let w = agent
            .watchers
            .lock()
            .remove(&req.watcher_id)
            .ok_or_else(|| {
                err(
                    Code::NotFound,
                    format!("watcher {} not found", req.watcher_id),
                )
            })?;
        w.task.abort();
        Ok(Empty {})
    }
    .await;
    rpc::unary_response(result)
}
