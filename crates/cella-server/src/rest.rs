//! E2B's REST API (and cella's `/audit` extension).
//!
//! Every route but `/health` needs a valid `X-API-Key`; the key's ID becomes the owner of what
//! it creates, and sandboxes of one key are invisible to every other key. Every call is
//! recorded in the audit log with its result.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use cella_api::{
    AuditEntry, ConnectRequest, ForkRequest, ForkResult, Health, ListedSandbox, NewSandbox,
    PauseRequest, RefreshRequest, ResumeRequest, SandboxState, SnapshotInfo, SnapshotRequest,
    TimeoutRequest,
};
use cella_core::store::{AuditQuery, NewAudit, now_ms};
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::error::HttpError;

/// The API key ID a request authenticated as.
#[derive(Debug, Clone)]
pub struct Owner(pub String);

/// The REST router, with authentication and auditing applied.
pub fn router(state: AppState) -> Router {
    let authed = Router::new()
        .route("/sandboxes", post(create).get(list_v1))
        .route("/v2/sandboxes", post(create).get(list_v2))
        .route("/sandboxes/{id}", get(info).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/sandboxes/metrics", get(metrics_many))
        .route("/sandboxes/{id}/logs", get(logs_v1))
        .route("/v2/sandboxes/{id}/logs", get(logs_v2))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/sandboxes/{id}/snapshots", post(create_snapshot))
        .route("/snapshots", get(list_snapshots))
        .route(
            "/sandboxes/{id}/network",
            axum::routing::put(update_network),
        )
        // E2B features cella does not offer yet: a clear 501, never a hang or a bare 404.
        .route("/volumes", get(not_implemented).post(not_implemented))
        .route(
            "/volumes/{id}",
            get(not_implemented).delete(not_implemented),
        )
        .route("/secrets", get(not_implemented).post(not_implemented))
        .route(
            "/secrets/{id}",
            get(not_implemented).delete(not_implemented),
        )
        .route("/v3/templates", post(not_implemented))
        .route("/v2/templates/{id}/builds/{build}", post(not_implemented))
        .route(
            "/templates/{id}/builds/{build}/status",
            get(not_implemented),
        )
        .route("/templates/{id}/files/{hash}", get(not_implemented))
        .route(
            "/templates/tags",
            post(not_implemented).delete(not_implemented),
        )
        .route("/templates/{id}/tags", get(not_implemented))
        .route(
            "/templates/{id}",
            get(template_get)
                .delete(template_delete)
                .patch(not_implemented),
        )
        .route("/v2/templates/{id}", axum::routing::patch(not_implemented))
        .route("/audit", get(audit))
        .route("/templates", get(templates))
        .route("/v2/templates", get(templates))
        .route("/templates/aliases/{alias}", get(template_alias))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth_and_audit,
        ));
    Router::new()
        .route("/health", get(health))
        .route(
            "/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/.well-known/jwks.json", get(jwks))
        .merge(authed)
        .with_state(state)
}

async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        default_isolation: state.manager.default_isolation(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// OpenID Connect discovery of the workload identity issuer (`iam` tokens), public like the
/// keys it points to, so a relying party (e.g. a cloud's token exchange) can verify tokens.
async fn openid_configuration(State(state): State<AppState>) -> Response {
    match state.manager.identity_discovery() {
        Some((issuer, _)) => Json(serde_json::json!({
            "issuer": issuer,
            "jwks_uri": format!("{}/.well-known/jwks.json", issuer.trim_end_matches('/')),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        }))
        .into_response(),
        None => no_identity().into_response(),
    }
}

/// The workload identity issuer's public keys (JWKS).
async fn jwks(State(state): State<AppState>) -> Response {
    match state.manager.identity_discovery() {
        Some((_, keys)) => Json(keys).into_response(),
        None => no_identity().into_response(),
    }
}

fn no_identity() -> HttpError {
    HttpError::new(
        StatusCode::NOT_FOUND,
        "no workload identity issuer: this server gives sandboxes no network (--egress none)",
    )
}

async fn not_implemented(req: Request) -> HttpError {
    let what = match req.uri().path() {
        p if p.starts_with("/volumes") => "volumes",
        p if p.starts_with("/secrets") => "secrets",
        p if p.contains("/tags") => "template tags",
        p if p.starts_with("/templates/") || p.starts_with("/v2/templates/") => {
            "changing or deleting templates through the API (use `cella template build`)"
        }
        _ => "building templates through the API (use `cella template build`)",
    };
    HttpError::new(
        StatusCode::NOT_IMPLEMENTED,
        format!("{what} is not supported by this cella server"),
    )
}

async fn not_found() -> HttpError {
    HttpError::not_found("no such route")
}

/// Authenticate with `X-API-Key`, then record the call and its status in the audit log.
async fn auth_and_audit(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let key = req
        .headers()
        .get(cella_api::HEADER_API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let store = state.manager.store().clone();
    let owner = match key {
        None => None,
        Some(k) => match store.authenticate(&k) {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(error = %e, "key lookup failed");
                return HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, "key lookup failed")
                    .into_response();
            }
        },
    };
    let (actor, response) = match owner {
        None => (
            "anonymous".to_string(),
            HttpError::unauthorized("missing or invalid API key (X-API-Key)").into_response(),
        ),
        Some(id) => {
            req.extensions_mut().insert(Owner(id.clone()));
            (id, next.run(req).await)
        }
    };
    store.audit(NewAudit {
        actor,
        sandbox_id: sandbox_of_path(&path),
        kind: "api".into(),
        detail: serde_json::json!({
            "method": method,
            "path": path,
            "status": response.status().as_u16(),
        }),
    });
    response
}

fn sandbox_of_path(path: &str) -> Option<String> {
    let rest = path
        .strip_prefix("/v2/sandboxes/")
        .or_else(|| path.strip_prefix("/sandboxes/"))?;
    let id = rest.split('/').next()?;
    cella_api::is_valid_sandbox_id(id).then(|| id.to_string())
}

/// Parse a JSON body; errors are 400s that name the offending field.
fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, HttpError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            HttpError::bad_request(format!("invalid JSON body: {inner}"))
        } else {
            HttpError::bad_request(format!("invalid field '{path}': {inner}"))
        }
    })
}

/// Parse an optional JSON body (empty body = defaults).
fn parse_json_or_default<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, HttpError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_json(body)
}

fn check_id(id: &str) -> Result<(), HttpError> {
    if cella_api::is_valid_sandbox_id(id) {
        Ok(())
    } else {
        Err(HttpError::not_found(format!("sandbox '{id}' not found")))
    }
}

async fn create(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    let req: NewSandbox = parse_json(&body)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            HttpError::bad_request("invalid field 'Idempotency-Key': not valid text")
        })?),
    };
    let sandbox = match key {
        Some(k) => state.manager.create_idempotent(&owner, k, req).await?,
        None => state.manager.create(&owner, req).await?,
    };
    Ok((StatusCode::CREATED, Json(sandbox)).into_response())
}

/// Query of the list routes. Unknown parameters are ignored.
#[derive(Debug, Default, serde::Deserialize)]
struct ListQuery {
    metadata: Option<String>,
    state: Option<String>,
    limit: Option<String>,
    #[serde(rename = "nextToken")]
    next_token: Option<String>,
}

fn parse_list_query(raw: Option<String>) -> Result<ListQuery, HttpError> {
    let raw = raw.unwrap_or_default();
    serde_urlencoded_like(&raw)
}

fn serde_urlencoded_like(raw: &str) -> Result<ListQuery, HttpError> {
    let mut q = ListQuery::default();
    for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
        match k.as_ref() {
            "metadata" => q.metadata = Some(v.into_owned()),
            "state" => q.state = Some(v.into_owned()),
            "limit" => q.limit = Some(v.into_owned()),
            "nextToken" => q.next_token = Some(v.into_owned()),
            _ => {}
        }
    }
    Ok(q)
}

/// `metadata=k%3Dv%26k2%3Dv2`: an URL-encoded query string of pairs.
fn parse_metadata_filter(m: Option<&str>) -> BTreeMap<String, String> {
    m.map(|s| {
        form_urlencoded::parse(s.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    })
    .unwrap_or_default()
}

async fn list_v1(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<ListedSandbox>>, HttpError> {
    let q = parse_list_query(raw)?;
    let filter = parse_metadata_filter(q.metadata.as_deref());
    // The deprecated list shows running sandboxes only, as E2B's.
    Ok(Json(state.manager.list(
        &owner,
        &filter,
        &[SandboxState::Running],
    )))
}

/// `state=running,paused` (comma-separated; empty or absent: both).
fn parse_states(raw: Option<&str>) -> Result<Vec<SandboxState>, HttpError> {
    let mut out = Vec::new();
    for s in raw
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let st = match s {
            "running" => SandboxState::Running,
            "paused" => SandboxState::Paused,
            other => {
                return Err(HttpError::bad_request(format!(
                    "invalid field 'state': unknown state {other:?} (expected running or paused)"
                )));
            }
        };
        if !out.contains(&st) {
            out.push(st);
        }
    }
    Ok(out)
}

async fn list_v2(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    RawQuery(raw): RawQuery,
) -> Result<Response, HttpError> {
    let q = parse_list_query(raw)?;
    let filter = parse_metadata_filter(q.metadata.as_deref());
    let states = parse_states(q.state.as_deref())?;
    let all = state.manager.list(&owner, &filter, &states);
    let total = all.len();
    let mut resp = paginate(all, q.limit.as_deref(), q.next_token.as_deref())?;
    if let Ok(v) = HeaderValue::from_str(&total.to_string()) {
        resp.headers_mut().insert("x-total-running", v);
    }
    Ok(resp)
}

/// One page of `all` as JSON: `limit` (1-100, default 100) items from the offset in
/// `nextToken`, with `X-Next-Token` when more follow.
fn paginate<T: serde::Serialize>(
    all: Vec<T>,
    limit: Option<&str>,
    next_token: Option<&str>,
) -> Result<Response, HttpError> {
    let total = all.len();
    let limit = match limit {
        None => 100,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => {
                return Err(HttpError::bad_request(
                    "invalid field 'limit': must be an integer between 1 and 100",
                ));
            }
        },
    };
    let start = match next_token {
        None | Some("") => 0,
        Some(t) => t.parse::<usize>().map_err(|_| {
            HttpError::bad_request("invalid field 'nextToken': not a token this server issued")
        })?,
    };
    let page: Vec<T> = all.into_iter().skip(start).take(limit).collect();
    let next = start + page.len();
    let mut resp = Json(page).into_response();
    if next < total
        && let Ok(v) = HeaderValue::from_str(&next.to_string())
    {
        resp.headers_mut().insert("x-next-token", v);
    }
    Ok(resp)
}

async fn info(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    check_id(&id)?;
    Ok(Json(state.manager.info(&owner, &id)?).into_response())
}

async fn kill(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<StatusCode, HttpError> {
    check_id(&id)?;
    state.manager.kill(&owner, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_timeout(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, HttpError> {
    check_id(&id)?;
    let req: TimeoutRequest = parse_json(&body)?;
    state.manager.set_timeout(&owner, &id, req.timeout)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn refresh(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, HttpError> {
    check_id(&id)?;
    let req: RefreshRequest = parse_json_or_default(&body)?;
    let duration = req.duration.unwrap_or(15);
    if duration > 3600 {
        return Err(HttpError::bad_request(
            "invalid field 'duration': must be at most 3600 seconds",
        ));
    }
    state.manager.extend(&owner, &id, duration.max(1))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn update_network(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, HttpError> {
    check_id(&id)?;
    let req: cella_api::NetworkUpdate = parse_json_or_default(&body)?;
    state.manager.update_network(&owner, &id, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn connect(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    check_id(&id)?;
    let req: ConnectRequest = parse_json_or_default(&body)?;
    let (sandbox, resumed) = state.manager.connect(&owner, &id, req.timeout).await?;
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(sandbox)).into_response())
}

/// `POST /sandboxes/{id}/pause`: 204, 409 when paused already. `memory: false` is treated as
/// a memory pause (cella has no filesystem-only pause); `requireHealthyGuest` refuses with
/// 503 when the agent does not answer.
async fn pause(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, HttpError> {
    check_id(&id)?;
    let req: PauseRequest = parse_json_or_default(&body)?;
    if req.require_healthy_guest == Some(true) {
        // Owner check first: a stranger's sandbox is a 404, not a probe.
        let info = state.manager.info(&owner, &id)?;
        if info.state == SandboxState::Running && !state.proxy.agent_healthy(&id).await {
            return Err(HttpError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the sandbox's agent does not respond; not pausing (requireHealthyGuest)",
            ));
        }
    }
    state
        .manager
        .pause(&owner, &id, req.memory.unwrap_or(true))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/resume` (deprecated by E2B in favour of connect): 201, 409 when
/// the sandbox is running.
async fn resume(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    check_id(&id)?;
    let req: ResumeRequest = parse_json_or_default(&body)?;
    let sandbox = state
        .manager
        .resume(&owner, &id, req.timeout, req.auto_pause)
        .await?;
    Ok((StatusCode::CREATED, Json(sandbox)).into_response())
}

/// `GET /sandboxes/{id}/metrics?start&end`: the sampled time series within the window (unix
/// seconds), ending with a fresh sample when the window reaches the present.
async fn metrics(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, HttpError> {
    check_id(&id)?;
    let raw = raw.unwrap_or_default();
    let mut start = None;
    let mut end = None;
    for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
        let slot = match k.as_ref() {
            "start" => &mut start,
            "end" => &mut end,
            _ => continue,
        };
        let t: i64 = v.parse().map_err(|_| {
            HttpError::bad_request(format!("invalid field '{k}': not a unix time in seconds"))
        })?;
        *slot = Some(t);
    }
    if let (Some(s), Some(e)) = (start, end)
        && s > e
    {
        return Err(HttpError::bad_request("invalid field 'start': after 'end'"));
    }
    let mut series = state.manager.metrics_history(&owner, &id, start, end)?;
    if let Some(last) = series.pop() {
        // Only the fresh sample (the present) asks the agent; recorded ones carry their own.
        let now = cella_core::store::now_ms() / 1000;
        let last = if last.timestamp_unix >= now - 1 && last.disk_used == 0 {
            with_disk_used(&state, &id, last).await
        } else {
            last
        };
        series.push(last);
    }
    Ok(Json(series).into_response())
}

/// Fill in the disk usage, which only the sandbox's agent can see.
async fn with_disk_used(
    state: &AppState,
    id: &str,
    mut m: cella_api::SandboxMetric,
) -> cella_api::SandboxMetric {
    // A paused agent cannot answer; its disk use is reported as unknown (0).
    let paused = state.manager.route(id).is_none_or(|l| l.is_paused());
    if m.disk_used == 0
        && !paused
        && let Some(used) = state.proxy.agent_disk_used(id).await
    {
        m.disk_used = used;
    }
    m
}

/// `GET /sandboxes/metrics?sandbox_ids=a,b`: the latest sample of each (unknown IDs are
/// left out, as E2B does).
async fn metrics_many(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    RawQuery(raw): RawQuery,
) -> Result<Response, HttpError> {
    let raw = raw.unwrap_or_default();
    let ids: Vec<String> = form_urlencoded::parse(raw.as_bytes())
        .filter(|(k, _)| k == "sandbox_ids")
        .flat_map(|(_, v)| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        })
        .collect();
    if ids.len() > 100 {
        return Err(HttpError::bad_request(
            "invalid field 'sandbox_ids': at most 100 IDs",
        ));
    }
    let mut out = serde_json::Map::new();
    for id in ids {
        if let Ok(m) = state.manager.metrics(&owner, &id) {
            let m = with_disk_used(&state, &id, m).await;
            out.insert(id, serde_json::to_value(m).unwrap_or_default());
        }
    }
    Ok(Json(serde_json::json!({ "sandboxes": out })).into_response())
}

/// A sandbox's log: its audit records (process starts and exits, file changes, lifecycle),
/// newest last. E2B serves the guest's system log here; cella's agent has none, and this is what
/// a user looking at "what happened in my sandbox" wants.
fn sandbox_log(
    state: &AppState,
    owner: &str,
    id: &str,
    since_ms: Option<i64>,
    limit: usize,
) -> Result<Vec<AuditEntry>, HttpError> {
    check_id(id)?;
    let store = state.manager.store().clone();
    store.flush_audit();
    let entries = store
        .query_audit(&AuditQuery {
            sandbox_id: Some(id.to_string()),
            visible_to: Some(owner.to_string()),
            since_ms,
            limit: Some(limit),
            ..Default::default()
        })
        .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if entries.is_empty() && state.manager.info(owner, id).is_err() {
        return Err(HttpError::not_found(format!("sandbox '{id}' not found")));
    }
    Ok(entries)
}

fn log_line(e: &AuditEntry) -> String {
    format!("{} {}", e.kind, e.detail)
}

#[derive(Debug, Default, serde::Deserialize)]
struct LogParams {
    start: Option<i64>,
    cursor: Option<i64>,
    limit: Option<usize>,
}

async fn logs_v1(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    Path(id): Path<String>,
    query: Result<Query<LogParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(p) = query.map_err(|e| HttpError::bad_request(format!("invalid query: {e}")))?;
    let entries = sandbox_log(
        &state,
        &owner,
        &id,
        p.start,
        p.limit.unwrap_or(1000).min(1000),
    )?;
    let logs: Vec<_> = entries
        .iter()
        .map(|e| serde_json::json!({ "timestamp": e.time, "line": log_line(e) }))
        .collect();
    let log_entries: Vec<_> = entries
        .iter()
        .map(|e| serde_json::json!({ "timestamp": e.time, "message": log_line(e), "level": "info", "fields": {} }))
        .collect();
    Ok(Json(serde_json::json!({ "logs": logs, "logEntries": log_entries })).into_response())
}

async fn logs_v2(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    Path(id): Path<String>,
    query: Result<Query<LogParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(p) = query.map_err(|e| HttpError::bad_request(format!("invalid query: {e}")))?;
    let entries = sandbox_log(
        &state,
        &owner,
        &id,
        p.cursor,
        p.limit.unwrap_or(1000).min(1000),
    )?;
    let logs: Vec<_> = entries
        .iter()
        .map(|e| serde_json::json!({ "timestamp": e.time, "message": log_line(e), "level": "info", "fields": { "kind": e.kind } }))
        .collect();
    Ok(Json(serde_json::json!({ "logs": logs })).into_response())
}

/// `GET /audit` query (cella extension).
#[derive(Debug, Default, serde::Deserialize)]
struct AuditParams {
    #[serde(rename = "sandboxID", alias = "sandboxId", alias = "sandbox")]
    sandbox_id: Option<String>,
    since: Option<String>,
    kind: Option<String>,
    limit: Option<usize>,
}

async fn audit(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    query: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AuditEntry>>, HttpError> {
    let Query(p) = query.map_err(|e| HttpError::bad_request(format!("invalid query: {e}")))?;
    let since_ms = match p.since.as_deref() {
        None | Some("") => None,
        Some(s) => Some(parse_since(s).ok_or_else(|| {
            HttpError::bad_request(
                "invalid field 'since': expected RFC 3339 time, unix milliseconds, or a duration like 10m",
            )
        })?),
    };
    let store = state.manager.store().clone();
    // Flush so that a caller sees its own previous calls.
    store.flush_audit();
    // A key sees the records it caused and the records of the sandboxes it created.
    let q = AuditQuery {
        sandbox_id: p.sandbox_id.clone(),
        actor: None,
        visible_to: Some(owner),
        since_ms,
        kind_prefix: p.kind,
        limit: p.limit.map(|l| l.min(10_000)),
    };
    let entries = tokio::task::spawn_blocking(move || store.query_audit(&q))
        .await
        .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(entries))
}

/// `since`: RFC 3339, unix milliseconds, or a duration back from now (`30s`, `10m`, `2h`, `1d`).
pub fn parse_since(s: &str) -> Option<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        let ms = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
        return i64::try_from(ms).ok();
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return None,
    };
    Some(now_ms() - secs * 1000)
}

async fn templates(State(state): State<AppState>) -> Json<Vec<cella_api::Template>> {
    Json(state.manager.template_list())
}

async fn template_get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<cella_api::Template>, HttpError> {
    state
        .manager
        .template_list()
        .into_iter()
        .find(|t| t.template_id == id || t.aliases.iter().any(|a| a == &id))
        .map(Json)
        .ok_or_else(|| HttpError::not_found(format!("template '{id}' not found")))
}

/// `DELETE /templates/{id}`: deletes snapshots (`Sandbox.delete_snapshot`); templates
/// themselves are managed with `cella template`.
async fn template_delete(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<StatusCode, HttpError> {
    if state.manager.delete_snapshot(&owner, &id).await? {
        return Ok(StatusCode::NO_CONTENT);
    }
    if state.manager.templates().spec(&id).is_some() {
        return Err(HttpError::new(
            StatusCode::NOT_IMPLEMENTED,
            "deleting templates through the API is not supported by this cella server \
             (use `cella template`)",
        ));
    }
    Err(HttpError::not_found(format!("template '{id}' not found")))
}

fn snapshot_info(m: &cella_core::snapshot::SnapshotMeta) -> SnapshotInfo {
    SnapshotInfo {
        snapshot_id: m.snapshot_id(),
        names: m.name.iter().map(|_| m.snapshot_id()).collect(),
    }
}

/// `POST /sandboxes/{id}/snapshots`: 201 `SnapshotInfo`.
async fn create_snapshot(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    check_id(&id)?;
    let req: SnapshotRequest = parse_json_or_default(&body)?;
    let meta = state
        .manager
        .create_snapshot(&owner, &id, req.name, req.memory)
        .await?;
    Ok((StatusCode::CREATED, Json(snapshot_info(&meta))).into_response())
}

/// `GET /snapshots?sandboxID=&name=&limit=&nextToken=`: newest first.
async fn list_snapshots(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    RawQuery(raw): RawQuery,
) -> Result<Response, HttpError> {
    let raw = raw.unwrap_or_default();
    let (mut sandbox, mut name, mut limit, mut token) = (None, None, None, None);
    for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
        match k.as_ref() {
            "sandboxID" => sandbox = Some(v.into_owned()),
            "name" => name = Some(v.into_owned()),
            "limit" => limit = Some(v.into_owned()),
            "nextToken" => token = Some(v.into_owned()),
            _ => {}
        }
    }
    let all: Vec<SnapshotInfo> = state
        .manager
        .list_snapshots(&owner, sandbox.as_deref(), name.as_deref())
        .iter()
        .map(snapshot_info)
        .collect();
    paginate(all, limit.as_deref(), token.as_deref())
}

/// `POST /sandboxes/{id}/fork`: 201 with one `{sandbox}` or `{error}` per fork.
async fn fork(
    State(state): State<AppState>,
    Extension(Owner(owner)): Extension<Owner>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    check_id(&id)?;
    let req: ForkRequest = parse_json_or_default(&body)?;
    let results = state
        .manager
        .fork(&owner, &id, req.count, req.timeout)
        .await?;
    let out: Vec<ForkResult> = results
        .into_iter()
        .map(|r| match r {
            Ok(sandbox) => ForkResult {
                sandbox: Some(sandbox),
                error: None,
            },
            Err(e) => {
                let e = HttpError::from(e);
                ForkResult {
                    sandbox: None,
                    error: Some(cella_api::ApiError {
                        code: e.status.as_u16(),
                        message: e.message,
                    }),
                }
            }
        })
        .collect();
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn template_alias(
    State(state): State<AppState>,
    Path(alias): Path<String>,
) -> Result<Response, HttpError> {
    let t = state
        .manager
        .template_list()
        .into_iter()
        .find(|t| t.aliases.iter().any(|a| a == &alias) || t.template_id == alias)
        .ok_or_else(|| HttpError::not_found(format!("template '{alias}' not found")))?;
    Ok(
        Json(serde_json::json!({ "templateID": t.template_id, "public": t.public }))
            .into_response(),
    )
}
