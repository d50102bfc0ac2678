//! The `filesystem.Filesystem` unary calls: stat, list, mkdir, move, remove.
//!
//! Paths are resolved against the requesting user's home ([`resolve_path`]). The agent runs as
//! root inside the sandbox, so like envd it acts with full privileges on behalf of whichever
//! user the request names; directories it creates are chowned to that user.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use cella_proto::control::AgentEvent;
use cella_proto::envd::connect::{Code, ConnectError};
use cella_proto::envd::filesystem::{
    EntryInfo, EntryResponse, FileType, ListDirRequest, ListDirResponse, MoveRequest, PathRequest,
    permission_string,
};
use cella_proto::envd::json::Timestamp;
use cella_proto::envd::process::Empty;

use crate::rpc::{self, err};
use crate::state::{AgentRef, resolve_path};
use crate::users::{NameCache, User};

/// Most entries one `ListDir` returns.
const MAX_LIST_ENTRIES: usize = 200_000;
/// xattr namespace for file metadata.
pub const XATTR_PREFIX: &str = "user.e2b.";

/// Map an I/O error to a Connect error.
pub fn io_err(e: &std::io::Error, what: &str) -> ConnectError {
    let code = match e.kind() {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::InvalidInput | ErrorKind::NotADirectory | ErrorKind::IsADirectory => {
            Code::InvalidArgument
        }
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => Code::ResourceExhausted,
        _ => Code::Internal,
    };
    err(code, format!("{what}: {e}"))
}

fn file_type(ft: std::fs::FileType) -> FileType {
    if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_dir() {
        FileType::Directory
    } else if ft.is_file() {
        FileType::File
    } else {
        FileType::Unspecified
    }
}

/// Read `user.e2b.*` xattrs of a path (best effort, bounded).
pub fn read_metadata(path: &Path) -> BTreeMap<String, String> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = BTreeMap::new();
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return out;
    };
    let mut names = vec![0u8; 4096];
    // SAFETY: llistxattr writes at most names.len() bytes into our buffer.
    let n = unsafe { libc::llistxattr(cpath.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return out;
    }
    names.truncate(n as usize);
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(name_str) = std::str::from_utf8(name) else {
            continue;
        };
        let Some(key) = name_str.strip_prefix(XATTR_PREFIX) else {
            continue;
        };
        let Ok(cname) = std::ffi::CString::new(name) else {
            continue;
        };
        let mut value = vec![0u8; 4096];
        // SAFETY: lgetxattr writes at most value.len() bytes into our buffer.
        let vn = unsafe {
            libc::lgetxattr(
                cpath.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if vn >= 0 {
            value.truncate(vn as usize);
            out.insert(
                key.to_string(),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
    }
    out
}

/// Build the entry info for a path (not following a final symlink).
pub fn entry_info(path: &Path, names: &NameCache) -> std::io::Result<EntryInfo> {
    let md = std::fs::symlink_metadata(path)?;
    Ok(entry_from_metadata(path, &md, names))
}

fn entry_from_metadata(path: &Path, md: &std::fs::Metadata, names: &NameCache) -> EntryInfo {
    let ft = file_type(md.file_type());
    let symlink_target = if md.file_type().is_symlink() {
        std::fs::read_link(path).ok().map(|t| {
            if t.is_absolute() {
                t.display().to_string()
            } else {
                path.parent()
                    .map(|p| crate::state::clean(&p.join(&t)))
                    .unwrap_or(t)
                    .display()
                    .to_string()
            }
        })
    } else {
        None
    };
    let nanos = u32::try_from(md.mtime_nsec()).unwrap_or(0);
    EntryInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".to_string()),
        file_type: ft,
        path: path.display().to_string(),
        size: i64::try_from(md.size()).unwrap_or(i64::MAX),
        mode: md.permissions().mode() & 0o777,
        permissions: permission_string(md.mode()),
        owner: names.user(md.uid()),
        group: names.group(md.gid()),
        modified_time: Some(Timestamp::new(md.mtime(), nanos)),
        symlink_target,
        metadata: read_metadata(path),
    }
}

/// Create `path` and missing parents, chowning the created ones to `owner`.
pub fn ensure_dirs(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(path);
    while let Some(p) = cur {
        match std::fs::metadata(p) {
            Ok(md) if md.is_dir() => break,
            Ok(_) => {
                return Err(std::io::Error::new(
                    ErrorKind::NotADirectory,
                    format!("path is a file: {}", p.display()),
                ));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                missing.push(p.to_path_buf());
                cur = p.parent();
            }
            Err(e) => return Err(e),
        }
    }
    for dir in missing.iter().rev() {
        match std::fs::create_dir(dir) {
            Ok(()) => {
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
                }
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn resolve(user: &User, path: &str) -> Result<PathBuf, ConnectError> {
    resolve_path(path, &user.home, None).map_err(|e| err(Code::InvalidArgument, e.to_string()))
}

fn stat_inner(agent: &AgentRef, user: &User, path: &str) -> Result<EntryResponse, ConnectError> {
    let p = resolve(user, path)?;
    let entry = entry_info(&p, &agent.users.names())
        .map_err(|e| io_err(&e, &format!("file not found: {}", p.display())))?;
    Ok(EntryResponse { entry: Some(entry) })
}

/// `Stat`.
pub async fn stat(State(agent): State<AgentRef>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let user = agent.request_user(&headers)?;
        let req: PathRequest = rpc::unary_request(&headers, body).await?;
        let a = agent.clone();
        blocking(move || stat_inner(&a, &user, &req.path)).await
    }
    .await;
    rpc::unary_response(result)
}

/// Run filesystem work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ConnectError> + Send + 'static,
) -> Result<T, ConnectError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| err(Code::Internal, format!("worker: {e}")))?
}

fn walk(
    dir: &Path,
    shown: &Path,
    depth: u32,
    max_depth: u32,
    names: &NameCache,
    out: &mut Vec<EntryInfo>,
) -> Result<(), ConnectError> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| io_err(&e, &format!("error reading directory {}", dir.display())))?;
    let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if out.len() >= MAX_LIST_ENTRIES {
            return Err(err(
                Code::ResourceExhausted,
                format!("directory listing exceeds {MAX_LIST_ENTRIES} entries; lower the depth"),
            ));
        }
        let real = e.path();
        let shown_path = shown.join(e.file_name());
        let Ok(md) = std::fs::symlink_metadata(&real) else {
            continue;
        };
        let mut info = entry_from_metadata(&real, &md, names);
        info.path = shown_path.display().to_string();
        out.push(info);
        if md.is_dir() && depth < max_depth {
            // Unreadable subdirectories are skipped rather than failing the whole listing.
            if let Err(e) = walk(&real, &shown_path, depth + 1, max_depth, names, out)
                && e.code == Code::ResourceExhausted
            {
                return Err(e);
            }
            if out.len() >= MAX_LIST_ENTRIES {
                return Err(err(
                    Code::ResourceExhausted,
                    format!(
                        "directory listing exceeds {MAX_LIST_ENTRIES} entries; lower the depth"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn list_inner(
    agent: &AgentRef,
    user: &User,
    req: &ListDirRequest,
) -> Result<ListDirResponse, ConnectError> {
    let depth = req.depth.max(1);
    let requested = resolve(user, &req.path)?;
    let real = std::fs::canonicalize(&requested)
        .map_err(|e| io_err(&e, &format!("path not found: {}", requested.display())))?;
    let md = std::fs::metadata(&real)
        .map_err(|e| io_err(&e, &format!("directory not found: {}", real.display())))?;
    if !md.is_dir() {
        return Err(err(
            Code::InvalidArgument,
            format!("path is not a directory: {}", requested.display()),
        ));
    }
    let mut entries = Vec::new();
    walk(
        &real,
        &requested,
        1,
        depth,
        &agent.users.names(),
        &mut entries,
    )?;
    Ok(ListDirResponse { entries })
}

/// `ListDir`.
pub async fn list_dir(State(agent): State<AgentRef>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let user = agent.request_user(&headers)?;
        let req: ListDirRequest = rpc::unary_request(&headers, body).await?;
        let a = agent.clone();
        blocking(move || list_inner(&a, &user, &req)).await
    }
    .await;
    rpc::unary_response(result)
}

fn make_dir_inner(
    agent: &AgentRef,
    user: &User,
    path: &str,
) -> Result<EntryResponse, ConnectError> {
    let p = resolve(user, path)?;
    match std::fs::metadata(&p) {
        Ok(md) if md.is_dir() => {
            return Err(err(
                Code::AlreadyExists,
                format!("directory already exists: {}", p.display()),
            ));
        }
        Ok(_) => {
            return Err(err(
                Code::InvalidArgument,
                format!(
                    "path already exists but it is not a directory: {}",
                    p.display()
                ),
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&e, "error getting file info")),
    }
    ensure_dirs(&p, agent.owner_ids(user))
        .map_err(|e| io_err(&e, &format!("cannot create {}", p.display())))?;
    agent.events.emit(AgentEvent::MakeDir {
        path: p.display().to_string(),
    });
    let entry =
        entry_info(&p, &agent.users.names()).map_err(|e| io_err(&e, "error getting file info"))?;
    Ok(EntryResponse { entry: Some(entry) })
}

/// `MakeDir`.
pub async fn make_dir(State(agent): State<AgentRef>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let user = agent.request_user(&headers)?;
        let req: PathRequest = rpc::unary_request(&headers, body).await?;
        let a = agent.clone();
        blocking(move || make_dir_inner(&a, &user, &req.path)).await
    }
    .await;
    rpc::unary_response(result)
}

fn move_inner(
    agent: &AgentRef,
    user: &User,
    req: &MoveRequest,
) -> Result<EntryResponse, ConnectError> {
    let src = resolve(user, &req.source)?;
    let dst = resolve(user, &req.destination)?;
    std::fs::symlink_metadata(&src)
        .map_err(|e| io_err(&e, &format!("source not found: {}", src.display())))?;
    if let Some(parent) = dst.parent() {
        ensure_dirs(parent, agent.owner_ids(user))
            .map_err(|e| io_err(&e, "error creating destination directory"))?;
    }
    std::fs::rename(&src, &dst).map_err(|e| io_err(&e, "error renaming"))?;
    agent.events.emit(AgentEvent::FileMove {
        source: src.display().to_string(),
        destination: dst.display().to_string(),
    });
    let entry = entry_info(&dst, &agent.users.names())
        .map_err(|e| io_err(&e, "error getting file info"))?;
    Ok(EntryResponse { entry: Some(entry) })
}

/// `Move`.
pub async fn move_entry(State(agent): State<AgentRef>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let user = agent.request_user(&headers)?;
        let req: MoveRequest = rpc::unary_request(&headers, body).await?;
        let a = agent.clone();
        blocking(move || move_inner(&a, &user, &req)).await
    }
    .await;
    rpc::unary_response(result)
}

fn remove_inner(agent: &AgentRef, user: &User, path: &str) -> Result<Empty, ConnectError> {
    let p = resolve(user, path)?;
    let md = std::fs::symlink_metadata(&p)
        .map_err(|e| io_err(&e, &format!("file not found: {}", p.display())))?;
    let r = if md.is_dir() {
        std::fs::remove_dir_all(&p)
    } else {
        std::fs::remove_file(&p)
    };
    r.map_err(|e| io_err(&e, &format!("error removing {}", p.display())))?;
    agent.events.emit(AgentEvent::FileRemove {
        path: p.display().to_string(),
    });
    Ok(Empty {})
}

/// `Remove`.
pub async fn remove(State(agent): State<AgentRef>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let user = agent.request_user(&headers)?;
        let req: PathRequest = rpc::unary_request(&headers, body).await?;
        let a = agent.clone();
        blocking(move || remove_inner(&a, &user, &req.path)).await
    }
    .await;
    rpc::unary_response(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_dirs_creates_parents_and_rejects_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let deep = d.path().join("a/b/c");
        ensure_dirs(&deep, None).expect("create");
        assert!(deep.is_dir());
        ensure_dirs(&deep, None).expect("idempotent");
        std::fs::write(d.path().join("f"), b"x").expect("file");
        let e = ensure_dirs(&d.path().join("f/g"), None).expect_err("file in the way");
        assert_eq!(e.kind(), ErrorKind::NotADirectory);
    }

    #[test]
    fn entry_info_fields() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("hello.txt");
        std::fs::write(&f, b"hello").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        std::os::unix::fs::symlink("hello.txt", d.path().join("link")).expect("symlink");
        let names = NameCache::default();
        let e = entry_info(&f, &names).expect("info");
        assert_eq!(e.name, "hello.txt");
        assert_eq!(e.file_type, FileType::File);
        assert_eq!(e.size, 5);
        assert_eq!(e.mode, 0o640);
        assert_eq!(e.permissions, "-rw-r-----");
        assert!(e.modified_time.is_some_and(|t| t.seconds > 1_600_000_000));
        let l = entry_info(&d.path().join("link"), &names).expect("link");
        assert_eq!(l.file_type, FileType::Symlink);
        assert_eq!(l.symlink_target.as_deref(), f.to_str());
        let missing = entry_info(&d.path().join("nope"), &names).expect_err("missing");
        assert_eq!(io_err(&missing, "x").code, Code::NotFound);
    }
}
