//! The agent's HTTP surface: routes, the access-token gate and the small plain routes
//! (`/health`, `/envs`, `/metrics`).

use std::path::Path;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cella_proto::envd::connect::Code;
use serde::Serialize;

use crate::files::HttpError;
use crate::state::AgentRef;
use crate::{files, fs, netcfg, process, quiesce, rpc, watch};

/// Build the router.
pub fn app(agent: AgentRef) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/envs", get(envs))
        .route("/metrics", get(metrics))
        .route("/fsfreeze", post(quiesce::fsfreeze))
        .route("/fsthaw", post(quiesce::fsthaw))
        .route("/egress", post(netcfg::egress))
        .route("/trust", post(netcfg::trust))
        .route("/files", get(files::download).post(files::upload))
        .route("/files/compose", post(files::compose))
        .route("/process.Process/Start", post(process::start))
        .route("/process.Process/Connect", post(process::connect))
        .route("/process.Process/List", post(process::list))
        .route("/process.Process/SendInput", post(process::send_input_rpc))
        .route("/process.Process/StreamInput", post(process::stream_input))
        .route("/process.Process/SendSignal", post(process::send_signal))
        .route("/process.Process/CloseStdin", post(process::close_stdin))
        .route("/process.Process/Update", post(process::update))
        .route("/filesystem.Filesystem/Stat", post(fs::stat))
        .route("/filesystem.Filesystem/MakeDir", post(fs::make_dir))
        .route("/filesystem.Filesystem/Move", post(fs::move_entry))
        .route("/filesystem.Filesystem/ListDir", post(fs::list_dir))
        .route("/filesystem.Filesystem/Remove", post(fs::remove))
        .route("/filesystem.Filesystem/WatchDir", post(watch::watch_dir))
        .route(
            "/filesystem.Filesystem/CreateWatcher",
            post(watch::create_watcher),
        )
        .route(
            "/filesystem.Filesystem/GetWatcherEvents",
            post(watch::get_watcher_events),
        )
        .route(
            "/filesystem.Filesystem/RemoveWatcher",
            post(watch::remove_watcher),
        )
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(agent.clone(), auth))
        .layer(DefaultBodyLimit::disable())
        .with_state(agent)
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path().to_string();
    if is_rpc(&path) {
        return rpc::error_response(&rpc::err(
            Code::Unimplemented,
            format!("{path} is not implemented"),
        ));
    }
    HttpError::new(StatusCode::NOT_FOUND, format!("{path} not found")).into_response()
}

fn is_rpc(path: &str) -> bool {
    path.starts_with("/process.") || path.starts_with("/filesystem.")
}

/// Every route except `/health` and `/files` (which also accepts signatures) needs the token.
async fn auth(State(agent): State<AgentRef>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let exempt = (req.method() == Method::GET && path == "/health")
        || ((req.method() == Method::GET || req.method() == Method::POST) && path == "/files");
    if exempt || agent.header_token_ok(req.headers()) {
        return next.run(req).await;
    }
    let msg =
        "unauthorized access, please provide a valid access token or method signing if supported";
    if is_rpc(path) {
        return rpc::error_response(&rpc::err(Code::Unauthenticated, msg));
    }
    HttpError::new(StatusCode::UNAUTHORIZED, msg).into_response()
}

async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn envs(State(agent): State<AgentRef>) -> Response {
    axum::Json(agent.env_vars()).into_response()
}

/// `GET /metrics` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Unix time of the sample.
    pub ts: i64,
    /// CPUs visible.
    pub cpu_count: u32,
    /// CPU use over the sampling window, percent of all CPUs.
    pub cpu_used_pct: f64,
    /// Total memory, bytes.
    pub mem_total: u64,
    /// Used memory (total minus available), bytes.
    pub mem_used: u64,
    /// Page cache, bytes.
    pub mem_cache: u64,
    /// Used disk space on `/`, bytes.
    pub disk_used: u64,
    /// Total disk space on `/`, bytes.
    pub disk_total: u64,
}

/// Parse the aggregate `cpu` line of `/proc/stat`: (busy, total) jiffies.
pub fn parse_cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Count `cpuN` lines of `/proc/stat`.
pub fn parse_cpu_count(stat: &str) -> u32 {
    let n = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    u32::try_from(n.max(1)).unwrap_or(1)
}

/// Parse `/proc/meminfo`: (total, available, cached) in bytes.
pub fn parse_meminfo(text: &str) -> (u64, u64, u64) {
    let get = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .map(|kb| kb.saturating_mul(1024))
            .unwrap_or(0)
    };
    (get("MemTotal"), get("MemAvailable"), get("Cached"))
}

fn read_small(path: &Path) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(1024 * 1024).read_to_string(&mut s);
    }
    s
}

fn disk_usage(path: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs writes into the zeroed struct we pass.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and pointer to a live struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return (0, 0);
    }
    let frsize = st.f_frsize as u64;
    let total = (st.f_blocks as u64).saturating_mul(frsize);
    let free = (st.f_bfree as u64).saturating_mul(frsize);
    (total.saturating_sub(free), total)
}

async fn metrics(State(agent): State<AgentRef>) -> Response {
    let root = agent.settings.proc_root.clone();
    let stat_path = root.join("proc/stat");
    let before = read_small(&stat_path);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let r2 = root.clone();
    let m = tokio::task::spawn_blocking(move || {
        let after = read_small(&r2.join("proc/stat"));
        let cpu_used_pct = match (parse_cpu_times(&before), parse_cpu_times(&after)) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                let pct = (b1.saturating_sub(b0)) as f64 / (t1 - t0) as f64 * 100.0;
                (pct * 100.0).round() / 100.0
            }
            _ => 0.0,
        };
        let (total, avail, cached) = parse_meminfo(&read_small(&r2.join("proc/meminfo")));
        let (disk_used, disk_total) = disk_usage(Path::new("/"));
        Metrics {
            ts: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            cpu_count: parse_cpu_count(&after),
            cpu_used_pct,
            mem_total: total,
            mem_used: total.saturating_sub(avail),
            mem_cache: cached,
            disk_used,
            disk_total,
        }
    })
    .await
    .unwrap_or_default();
    axum::Json(m).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 50 0 50 350 50 0 0 0 0 0\ncpu1 50 0 50 350 50 0 0 0 0 0\nintr 1\n";

    #[test]
    fn cpu_parsing() {
        assert_eq!(parse_cpu_times(STAT), Some((200, 1000)));
        assert_eq!(parse_cpu_count(STAT), 2);
        assert_eq!(parse_cpu_times("garbage"), None);
        assert_eq!(parse_cpu_count(""), 1);
    }

    #[test]
    fn meminfo_parsing() {
        let m = "MemTotal:        2048 kB\nMemFree: 10 kB\nMemAvailable:    1024 kB\nCached:  512 kB\nSwapCached: 1 kB\n";
        assert_eq!(parse_meminfo(m), (2048 * 1024, 1024 * 1024, 512 * 1024));
        assert_eq!(parse_meminfo(""), (0, 0, 0));
    }

    #[test]
    fn metrics_from_fixture_root() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(d.path().join("proc")).expect("proc");
        std::fs::write(d.path().join("proc/stat"), STAT).expect("stat");
        let text = read_small(&d.path().join("proc/stat"));
        assert_eq!(parse_cpu_count(&text), 2);
        let (used, total) = disk_usage(Path::new("/"));
        assert!(total > 0 && used <= total);
    }
}
