//! The plain-HTTP file routes: `GET /files` (download), `POST /files` (upload) and
//! `POST /files/compose`.
//!
//! Uploads are streamed to disk through a bounded channel into a blocking writer thread, so an
//! upload of any size uses a few chunks of memory and never blocks the async runtime on disk
//! I/O. Downloads stream the same way in reverse. `/files` accepts either the access token
//! header or a signed URL (see [`cella_proto::envd::signature`]).

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cella_proto::control::AgentEvent;
use cella_proto::envd::filesystem::{ComposeRequest, WriteInfo};
use cella_proto::envd::signature::{self, Operation};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::fs::{XATTR_PREFIX, ensure_dirs};
use crate::state::{Agent, AgentRef, resolve_path};
use crate::users::User;

/// Chunk size for file streaming.
const CHUNK: usize = 64 * 1024;
/// Most metadata headers honoured per upload.
const MAX_METADATA: usize = 64;
/// Largest compose request body.
const MAX_COMPOSE_BODY: usize = 1024 * 1024;

/// An HTTP error on the plain routes: `{"code": <status>, "message": "..."}`.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    message: String,
}

impl HttpError {
    /// Build one.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.status.as_u16(), "message": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

fn io_http(e: &std::io::Error, what: &str) -> HttpError {
    let status = match e.kind() {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::NotADirectory | ErrorKind::IsADirectory | ErrorKind::InvalidInput => {
            StatusCode::BAD_REQUEST
        }
        _ if is_disk_full(e) => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status == StatusCode::INSUFFICIENT_STORAGE {
        return HttpError::new(status, format!("{what}: not enough disk space available"));
    }
    HttpError::new(status, format!("{what}: {e}"))
}

fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
}

/// Query parameters of `/files`.
#[derive(Debug, Default, Deserialize)]
pub struct FilesQuery {
    path: Option<String>,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<i64>,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Authorize a `/files` request by token header or signature, then resolve the user.
fn authorize(
    agent: &Agent,
    headers: &HeaderMap,
    q: &FilesQuery,
    op: Operation,
) -> Result<User, HttpError> {
    let token = agent.token();
    if !token.is_empty() {
        let header = headers
            .get(cella_proto::envd::ACCESS_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok());
        match header {
            Some(h) if !h.is_empty() => {
                if !agent.token_ok(Some(h)) {
                    return Err(HttpError::new(
                        StatusCode::UNAUTHORIZED,
                        "access token present in header but does not match",
                    ));
                }
            }
            _ => {
                signature::verify(
                    q.signature.as_deref(),
                    q.path.as_deref().unwrap_or_default(),
                    op,
                    q.username.as_deref().unwrap_or_default(),
                    &token,
                    q.signature_expiration,
                    now_unix(),
                )
                .map_err(|e| HttpError::new(StatusCode::UNAUTHORIZED, e.to_string()))?;
            }
        }
    }
    agent.resolve_user(q.username.as_deref()).map_err(|e| {
        HttpError::new(
            StatusCode::UNAUTHORIZED,
            format!("error looking up user: {e}"),
        )
    })
}

fn query(q: Result<Query<FilesQuery>, QueryRejection>) -> Result<FilesQuery, HttpError> {
    q.map(|Query(q)| q)
        .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, format!("bad query: {e}")))
}

fn resolve(user: &User, path: &str, agent: &Agent) -> Result<PathBuf, HttpError> {
    resolve_path(path, &user.home, Some(&agent.settings.default_workdir))
        .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|enc| {
            let mut parts = enc.split(';');
            let name = parts.next().unwrap_or_default().trim();
            let q_zero = parts.any(|p| {
                let p = p.trim();
                p == "q=0" || p == "q=0.0" || p == "q=0.00" || p == "q=0.000"
            });
            name.eq_ignore_ascii_case("gzip") && !q_zero
        })
}

/// `GET /files`.
pub async fn download(
    State(agent): State<AgentRef>,
    q: Result<Query<FilesQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    match download_inner(&agent, q, &headers).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn download_inner(
    agent: &AgentRef,
    q: Result<Query<FilesQuery>, QueryRejection>,
    headers: &HeaderMap,
) -> Result<Response, HttpError> {
    let q = query(q)?;
    let user = authorize(agent, headers, &q, Operation::Read)?;
    let path = resolve(&user, q.path.as_deref().unwrap_or_default(), agent)?;
    let p2 = path.clone();
    let file = tokio::task::spawn_blocking(move || -> Result<(std::fs::File, u64), HttpError> {
        let md = std::fs::metadata(&p2).map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                HttpError::new(
                    StatusCode::NOT_FOUND,
                    format!("path '{}' does not exist", p2.display()),
                )
            } else {
                io_http(&e, "error checking path")
            }
        })?;
        if md.is_dir() {
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                format!("path '{}' is a directory", p2.display()),
            ));
        }
        let f = std::fs::File::open(&p2).map_err(|e| io_http(&e, "error opening file"))?;
        Ok((f, md.len()))
    })
    .await
    .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let (file, len) = file;
    let gzip = accepts_gzip(headers);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || stream_file(file, gzip, tx));
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::VARY,
        header::HeaderValue::from_static("Accept-Encoding"),
    );
    if gzip {
        h.insert(
            header::CONTENT_ENCODING,
            header::HeaderValue::from_static("gzip"),
        );
    } else if let Ok(v) = header::HeaderValue::from_str(&len.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    Ok(resp)
}

fn stream_file(
    mut file: std::fs::File,
    gzip: bool,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut buf = vec![0u8; CHUNK];
    let mut enc =
        gzip.then(|| flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    loop {
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        if n == 0 {
            break;
        }
        let chunk = match enc.as_mut() {
            Some(enc) => {
                if let Err(e) = enc.write_all(&buf[..n]) {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
                std::mem::take(enc.get_mut())
            }
            None => buf[..n].to_vec(),
        };
        if !chunk.is_empty() && tx.blocking_send(Ok(Bytes::from(chunk))).is_err() {
            return;
        }
    }
    if let Some(enc) = enc {
        match enc.finish() {
            Ok(rest) => {
                let _ = tx.blocking_send(Ok(Bytes::from(rest)));
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
            }
        }
    }
}

fn metadata_from_headers(headers: &HeaderMap) -> BTreeMap<String, String> {
    headers
        .iter()
        .filter_map(|(k, v)| {
            let key = k.as_str().strip_prefix("x-metadata-")?;
            let v = v.to_str().ok()?;
            (!key.is_empty()).then(|| (key.to_string(), v.to_string()))
        })
        .take(MAX_METADATA)
        .collect()
}

fn set_metadata(path: &Path, meta: &BTreeMap<String, String>) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    for (k, v) in meta {
        let Ok(name) = std::ffi::CString::new(format!("{XATTR_PREFIX}{k}")) else {
            continue;
        };
        // SAFETY: all pointers reference live buffers of the given lengths.
        let rc =
            unsafe { libc::setxattr(cpath.as_ptr(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        if rc != 0 {
            tracing::debug!(
                "cannot store metadata on {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Open `path` for writing (creating parents), owned by `owner`.
fn open_for_write(path: &Path, owner: Option<(u32, u32)>) -> Result<std::fs::File, HttpError> {
    if let Some(parent) = path.parent() {
        ensure_dirs(parent, owner).map_err(|e| io_http(&e, "error ensuring directories"))?;
    }
    if std::fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false) {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            format!("path is a directory: {}", path.display()),
        ));
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o666)
        .open(path)
        .map_err(|e| io_http(&e, "error opening file"))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
            .map_err(|e| io_http(&e, "error changing file ownership"))?;
    }
    Ok(f)
}

/// Stream a body into `path`. Returns the bytes written to disk.
async fn write_stream<S, E>(
    path: PathBuf,
    owner: Option<(u32, u32)>,
    gzip: bool,
    mut body: S,
) -> Result<u64, HttpError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let writer = tokio::task::spawn_blocking(move || -> Result<u64, HttpError> {
        let f = open_for_write(&path, owner)?;
        let mut out: Box<dyn Write> = if gzip {
            Box::new(flate2::write::GzDecoder::new(f))
        } else {
            Box::new(f)
        };
        while let Some(chunk) = rx.blocking_recv() {
            out.write_all(&chunk)
                .map_err(|e| io_http(&e, "error writing file"))?;
        }
        out.flush().map_err(|e| io_http(&e, "error writing file"))?;
        drop(out);
        Ok(std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0))
    });
    let mut body_err = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => {
                if tx.send(c).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                body_err = Some(HttpError::new(
                    StatusCode::BAD_REQUEST,
                    format!("error reading request body: {e}"),
                ));
                break;
            }
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Some(e) = body_err {
        return Err(e);
    }
    written
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

fn is_gzip_body(headers: &HeaderMap) -> Result<bool, HttpError> {
    match headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
    {
        None => Ok(false),
        Some(v) if v.is_empty() || v == "identity" => Ok(false),
        Some(v) if v == "gzip" => Ok(true),
        Some(v) => Err(HttpError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported Content-Encoding {v:?}"),
        )),
    }
}

/// `POST /files`.
pub async fn upload(
    State(agent): State<AgentRef>,
    q: Result<Query<FilesQuery>, QueryRejection>,
    req: Request,
) -> Response {
    match upload_inner(&agent, q, req).await {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn upload_inner(
    agent: &AgentRef,
    q: Result<Query<FilesQuery>, QueryRejection>,
    req: Request,
) -> Result<Vec<WriteInfo>, HttpError> {
    let q = query(q)?;
    let headers = req.headers().clone();
    let user = authorize(agent, &headers, &q, Operation::Write)?;
    let owner = agent.owner_ids(&user);
    let gzip = is_gzip_body(&headers)?;
    let meta = metadata_from_headers(&headers);
    let ct = content_type(&headers);
    let mut written: Vec<(PathBuf, u64)> = Vec::new();
    if ct == "application/octet-stream" {
        let Some(p) = q.path.as_deref() else {
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                "path query parameter is required for raw body upload",
            ));
        };
        let path = resolve(&user, p, agent)?;
        let body = req.into_body().into_data_stream();
        let n = write_stream(path.clone(), owner, gzip, body).await?;
        written.push((path, n));
    } else if ct.starts_with("multipart/") {
        if gzip {
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                "gzip Content-Encoding is only supported for application/octet-stream uploads",
            ));
        }
        let mut mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, format!("bad multipart: {e}")))?;
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    return Err(HttpError::new(
                        StatusCode::BAD_REQUEST,
                        format!("error reading form: {e}"),
                    ));
                }
            };
            if field.name() != Some("file") {
                continue;
            }
            let target = match (q.path.as_deref(), field.file_name()) {
                (Some(p), _) => p.to_string(),
                (None, Some(f)) => f.to_string(),
                (None, None) => {
                    return Err(HttpError::new(
                        StatusCode::BAD_REQUEST,
                        "no path given and the part has no filename",
                    ));
                }
            };
            let path = resolve(&user, &target, agent)?;
            if written.iter().any(|(p, _)| *p == path) {
                return Err(HttpError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "you cannot upload multiple files to the same path '{}' in one upload request",
                        path.display()
                    ),
                ));
            }
            let n = write_stream(path.clone(), owner, false, field).await?;
            written.push((path, n));
        }
    } else {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "unsupported content type: {ct}, expected multipart/form-data or application/octet-stream"
            ),
        ));
    }
    let mut out = Vec::with_capacity(written.len());
    for (path, size) in written {
        if !meta.is_empty() {
            let (p, m) = (path.clone(), meta.clone());
            let _ = tokio::task::spawn_blocking(move || set_metadata(&p, &m)).await;
        }
        agent
            .events
            .emit_flushed(AgentEvent::FileWrite {
                path: path.display().to_string(),
                size,
                user: user.name.clone(),
            })
            .await;
        out.push(WriteInfo {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.display().to_string(),
            kind: "file".to_string(),
            metadata: (!meta.is_empty()).then(|| meta.clone()),
        });
    }
    Ok(out)
}

/// `POST /files/compose`: concatenate files into a destination.
pub async fn compose(State(agent): State<AgentRef>, body: Body) -> Response {
    match compose_inner(&agent, body).await {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn compose_inner(agent: &AgentRef, body: Body) -> Result<WriteInfo, HttpError> {
    let bytes = axum::body::to_bytes(body, MAX_COMPOSE_BODY)
        .await
        .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let req: ComposeRequest = serde_json::from_slice(&bytes)
        .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, format!("bad request: {e}")))?;
    if req.source_paths.is_empty() {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "source_paths must not be empty",
        ));
    }
    if req.destination.is_empty() {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "destination is required",
        ));
    }
    let user = agent
        .resolve_user(req.username.as_deref())
        .map_err(|e| HttpError::new(StatusCode::UNAUTHORIZED, e.to_string()))?;
    let dest = resolve(&user, &req.destination, agent)?;
    let sources = req
        .source_paths
        .iter()
        .map(|p| resolve(&user, p, agent))
        .collect::<Result<Vec<_>, _>>()?;
    let owner = agent.owner_ids(&user);
    let d2 = dest.clone();
    let size = tokio::task::spawn_blocking(move || compose_files(&sources, &d2, owner))
        .await
        .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    agent
        .events
        .emit_flushed(AgentEvent::FileWrite {
            path: dest.display().to_string(),
            size,
            user: user.name.clone(),
        })
        .await;
    Ok(WriteInfo {
        name: dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        path: dest.display().to_string(),
        kind: "file".to_string(),
        metadata: None,
    })
}

/// envd's compose: every source must be a regular file other than the destination; the
/// concatenation goes to a temporary file next to the destination that is renamed over it
/// (readers never see a half-written result), and the sources are removed afterwards.
fn compose_files(
    sources: &[PathBuf],
    dest: &Path,
    owner: Option<(u32, u32)>,
) -> Result<u64, HttpError> {
    let mut inputs = Vec::with_capacity(sources.len());
    for s in sources {
        if s == dest {
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                "destination cannot be one of the sources",
            ));
        }
        let f = std::fs::File::open(s).map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                HttpError::new(
                    StatusCode::NOT_FOUND,
                    format!("source '{}' does not exist", s.display()),
                )
            } else {
                io_http(&e, "error opening source")
            }
        })?;
        let is_file = f
            .metadata()
            .map_err(|e| io_http(&e, "error reading source"))?
            .is_file();
        if !is_file {
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                format!("source '{}' is not a regular file", s.display()),
            ));
        }
        inputs.push(f);
    }
    if std::fs::metadata(dest).is_ok_and(|m| m.is_dir()) {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            format!("path is a directory: {}", dest.display()),
        ));
    }
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dest.with_file_name(format!(".{name}.cella-compose.{n}.tmp"));
    let result = (|| {
        let mut out = open_for_write(&tmp, owner)?;
        let mut total = 0u64;
        for mut f in inputs {
            total += std::io::copy(&mut f, &mut out).map_err(|e| io_http(&e, "error composing"))?;
        }
        std::fs::rename(&tmp, dest).map_err(|e| io_http(&e, "error moving the result"))?;
        Ok(total)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    for s in sources {
        let _ = std::fs::remove_file(s);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn gzip_negotiation() {
        let mut h = HeaderMap::new();
        assert!(!accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("br, gzip;q=0.8"),
        );
        assert!(accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip;q=0"),
        );
        assert!(!accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        assert!(!accepts_gzip(&h));
    }

    #[test]
    fn metadata_headers() {
        let mut h = HeaderMap::new();
        h.insert("X-Metadata-Owner", HeaderValue::from_static("alice"));
        h.insert("X-Other", HeaderValue::from_static("x"));
        let m = metadata_from_headers(&h);
        assert_eq!(m.len(), 1);
        assert_eq!(m.get("owner").map(String::as_str), Some("alice"));
    }

    #[test]
    fn disk_full_maps_to_507() {
        let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let h = io_http(&e, "writing");
        assert_eq!(h.status, StatusCode::INSUFFICIENT_STORAGE);
        assert!(h.message.contains("not enough disk space"));
    }
}
