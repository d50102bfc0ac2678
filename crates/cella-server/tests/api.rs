//! REST API and proxy tests through `app(state)` with the fake driver: no socket for the API,
//! no root, real SQLite (in memory) and a real template store layout in a temp dir.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use cella_core::fake::FakeDriver;
use cella_core::manager::{Manager, ManagerConfig};
use cella_core::store::Store;
use cella_core::template::{TemplateSpec, TemplateStore};
use cella_server::{AppState, app};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Harness {
    app: axum::Router,
    state: AppState,
    driver: FakeDriver,
    store: Store,
    key: String,
    _dir: tempfile::TempDir,
}

/// Lay out a "built" base template the way the template store expects it.
fn fake_template_dir(root: &std::path::Path) {
    let spec = TemplateSpec::base();
    let dir = root.join(&spec.name).join(spec.build_id());
    std::fs::create_dir_all(dir.join("rootfs")).expect("mkdir");
    std::fs::write(
        dir.join("spec.json"),
        serde_json::to_vec(&spec).expect("spec json"),
    )
    .expect("write spec");
}

async fn harness() -> Harness {
    harness_with(FakeDriver::new(), None)
}

/// A harness over `driver`, with a (fake) host-side network when `egress` is given (as
/// `--egress allowed`).
fn harness_with(driver: FakeDriver, egress: Option<cella_core::fake::FakeEgress>) -> Harness {
    harness_full(driver, egress, false)
}

/// [`harness_with`], keeping snapshots in the harness's temp dir when `snapshots`.
fn harness_full(
    driver: FakeDriver,
    egress: Option<cella_core::fake::FakeEgress>,
    snapshots: bool,
) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_template_dir(dir.path());
    let store = Store::open_in_memory().expect("store");
    let key = store.create_key("test").expect("key").key;
    let manager = Manager::start_with_egress(
        vec![Arc::new(driver.clone())],
        0,
        Arc::new(TemplateStore::new(dir.path().to_path_buf())),
        store.clone(),
        ManagerConfig {
            snapshot_dir: snapshots.then(|| dir.path().join(".snapshots")),
            ..ManagerConfig::default()
        },
        egress.map(|e| Arc::new(e) as Arc<dyn cella_core::egress::Egress>),
    );
    let state = AppState::with_port_grace(manager, std::time::Duration::from_millis(200));
    Harness {
        app: app(state.clone()),
        state,
        driver,
        store,
        key,
        _dir: dir,
    }
}

impl Harness {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_with(method, uri, key, body, &[]).await
    }

    async fn call_with(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some(b) => Body::from(b.to_string()),
            None => Body::empty(),
        };
        let resp = self
            .app
            .clone()
            .oneshot(req.body(body).expect("request"))
            .await
            .expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, v)
    }

    async fn create(&self, body: Value) -> Value {
        let (s, v) = self
            .call("POST", "/v2/sandboxes", Some(&self.key), Some(body))
            .await;
        assert_eq!(s, StatusCode::CREATED, "create failed: {v}");
        v
    }
}

#[tokio::test]
async fn health_needs_no_key() {
    let h = harness().await;
    let (s, v) = h.call("GET", "/health", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "ok");
    assert_eq!(v["defaultIsolation"], "jail");
}

#[tokio::test]
async fn every_route_needs_a_valid_key() {
    let h = harness().await;
    for (m, uri) in [
        ("GET", "/sandboxes"),
        ("GET", "/v2/sandboxes"),
        ("POST", "/v2/sandboxes"),
        ("GET", "/sandboxes/iabc"),
        ("DELETE", "/sandboxes/iabc"),
        ("GET", "/audit"),
        ("GET", "/no/such/route"),
    ] {
        let (s, v) = h.call(m, uri, None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{m} {uri}");
        assert_eq!(v["code"], 401);
        assert!(v["message"].as_str().is_some_and(|m| m.contains("API key")));
        let (s, _) = h
            .call(
                m,
                uri,
                Some("e2b_0000000000000000000000000000000000000000"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{m} {uri} with a wrong key");
    }
    assert_eq!(h.driver.created(), 0);
}

#[tokio::test]
async fn create_info_list_kill() {
    let h = harness().await;
    let v = h
        .create(
            json!({"templateID": "base", "timeout": 60, "metadata": {"team": "a"},
                       "envVars": {"FOO": "bar"}}),
        )
        .await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    assert!(id.starts_with('i') && cella_api::is_valid_sandbox_id(&id));
    assert_eq!(v["templateID"], "base");
    assert_eq!(v["clientID"], cella_api::CLIENT_ID);
    assert!(v["envdAccessToken"].as_str().is_some_and(|t| t.len() >= 32));
    assert_eq!(v["envdVersion"], cella_api::ENVD_VERSION);
    let spec = h.driver.spec(&id).expect("spec");
    assert_eq!(spec.env_vars.get("FOO").map(String::as_str), Some("bar"));
    assert_eq!(
        spec.access_token,
        v["envdAccessToken"].as_str().expect("token")
    );

    let (s, info) = h
        .call("GET", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(info["isolation"], "jail");
    assert_eq!(info["state"], "running");
    assert_eq!(info["metadata"]["team"], "a");
    for f in [
        "startedAt",
        "endAt",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "envdVersion",
    ] {
        assert!(!info[f].is_null(), "{f} missing");
    }

    let (s, list) = h.call("GET", "/v2/sandboxes", Some(&h.key), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    // Metadata filter as the SDK encodes it: urlencode(quote(k)=quote(v)).
    let (_, list) = h
        .call("GET", "/v2/sandboxes?metadata=team%3Da", Some(&h.key), None)
        .await;
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    let (_, list) = h
        .call("GET", "/v2/sandboxes?metadata=team%3Db", Some(&h.key), None)
        .await;
    assert_eq!(list.as_array().map(Vec::len), Some(0));

    let (s, _) = h
        .call("DELETE", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(h.driver.alive().is_empty());
    let (s, v) = h
        .call("GET", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["code"], 404);
    let (s, _) = h
        .call("DELETE", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_input_is_a_4xx_naming_the_problem() {
    let h = harness().await;
    let cases = [
        (json!({"templateID": "nope"}), StatusCode::NOT_FOUND, "nope"),
        (
            json!({"templateID": "base", "timeout": "x"}),
            StatusCode::BAD_REQUEST,
            "timeout",
        ),
        (
            json!({"templateID": "base", "timeout": 0}),
            StatusCode::BAD_REQUEST,
            "timeout",
        ),
        (
            json!({"templateID": "base", "timeout": 999999}),
            StatusCode::BAD_REQUEST,
            "timeout",
        ),
        (
            json!({"timeout": 10}),
            StatusCode::BAD_REQUEST,
            "templateID",
        ),
        (
            json!({"templateID": "base", "memoryMB": 1}),
            StatusCode::BAD_REQUEST,
            "memoryMB",
        ),
        (
            json!({"templateID": "base", "driver": "bogus"}),
            StatusCode::BAD_REQUEST,
            "driver",
        ),
        (
            json!({"templateID": "base", "driver": "vm"}),
            StatusCode::BAD_REQUEST,
            "vm",
        ),
        (
            json!({"templateID": "base", "envVars": {"A=B": "x"}}),
            StatusCode::BAD_REQUEST,
            "envVars",
        ),
        (
            json!({"templateID": "base", "metadata": {"a": 1}}),
            StatusCode::BAD_REQUEST,
            "metadata",
        ),
    ];
    for (body, status, needle) in cases {
        let (s, v) = h
            .call("POST", "/v2/sandboxes", Some(&h.key), Some(body.clone()))
            .await;
        assert_eq!(s, status, "{body} → {v}");
        let msg = v["message"].as_str().expect("message");
        assert!(
            msg.contains(needle),
            "{body}: message {msg:?} lacks {needle:?}"
        );
        assert_eq!(v["code"], status.as_u16());
    }
    // Not JSON at all.
    let resp = h
        .app
        .clone()
        .oneshot(
            Request::post("/v2/sandboxes")
                .header("x-api-key", &h.key)
                .body(Body::from("{not json"))
                .expect("req"),
        )
        .await
        .expect("resp");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(h.driver.created(), 0);
}

#[tokio::test]
async fn keys_do_not_see_each_others_sandboxes() {
    let h = harness().await;
    let other = h.store.create_key("other").expect("key").key;
    let v = h.create(json!({"templateID": "base"})).await;
    let id = v["sandboxID"].as_str().expect("id");
    let (s, _) = h
        .call("GET", &format!("/sandboxes/{id}"), Some(&other), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = h
        .call("DELETE", &format!("/sandboxes/{id}"), Some(&other), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = h
        .call(
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            Some(&other),
            Some(json!({"timeout": 5})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, list) = h.call("GET", "/v2/sandboxes", Some(&other), None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(0));
    assert_eq!(h.driver.alive().len(), 1);
}

#[tokio::test]
async fn timeout_expiry_kills_and_connect_extends() {
    let h = harness().await;
    let v = h.create(json!({"templateID": "base", "timeout": 60})).await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    let (s, _) = h
        .call(
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            Some(&h.key),
            Some(json!({"timeout": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // connect with a shorter timeout must not shorten it, a longer one extends.
    let (s, c) = h
        .call(
            "POST",
            &format!("/v2/sandboxes/{id}/connect"),
            Some(&h.key),
            Some(json!({"timeout": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(c["sandboxID"], id.as_str());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !h.driver.alive().is_empty() {
        assert!(std::time::Instant::now() < deadline, "sandbox not reaped");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (s, _) = h
        .call("GET", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    h.store.flush_audit();
    let entries = h
        .store
        .query_audit(&cella_core::store::AuditQuery {
            sandbox_id: Some(id.clone()),
            ..Default::default()
        })
        .expect("audit");
    assert!(
        entries
            .iter()
            .any(|e| e.kind == "sandbox.kill" && e.detail["reason"] == "timeout"),
        "{entries:?}"
    );
}

#[tokio::test]
async fn crashed_sandbox_is_forgotten_and_audited() {
    let h = harness().await;
    let v = h.create(json!({"templateID": "base", "timeout": 60})).await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    h.driver.crash(&id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (s, _) = h
            .call("GET", &format!("/sandboxes/{id}"), Some(&h.key), None)
            .await;
        if s == StatusCode::NOT_FOUND {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "crash not noticed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    h.store.flush_audit();
    let entries = h
        .store
        .query_audit(&cella_core::store::AuditQuery {
            sandbox_id: Some(id),
            ..Default::default()
        })
        .expect("audit");
    assert!(
        entries.iter().any(|e| e.kind == "sandbox.crash"),
        "{entries:?}"
    );
}

#[tokio::test]
async fn proxy_routes_by_header_and_host_and_strips_the_api_key() {
    let h = harness().await;
    let v = h.create(json!({"templateID": "base"})).await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    let (s, echo) = h
        .call_with(
            "GET",
            "/files?path=/x",
            Some(&h.key),
            None,
            &[("e2b-sandbox-id", &id), ("x-access-token", "tok")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{echo}");
    assert_eq!(echo["requestLine"], "GET /files?path=/x HTTP/1.1");
    assert!(
        echo["headers"].get("x-api-key").is_none(),
        "API key leaked: {echo}"
    );
    assert_eq!(echo["headers"]["x-access-token"], "tok");

    let host = format!("49983-{id}.cella.test");
    let (s, echo) = h
        .call_with(
            "POST",
            "/process.Process/List",
            None,
            Some(json!({})),
            &[("host", &host)],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(echo["requestLine"], "POST /process.Process/List HTTP/1.1");
    assert_eq!(echo["body"], "{}");

    // Port not open, unknown sandbox, internal route: E2B's answers.
    let (s, v) = h
        .call_with(
            "GET",
            "/",
            None,
            None,
            &[("e2b-sandbox-id", &id), ("e2b-sandbox-port", "8080")],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert_eq!(v["message"], "The sandbox is running but port is not open");
    assert_eq!(v["port"], 8080);
    let (s, v) = h
        .call_with(
            "GET",
            "/health",
            None,
            None,
            &[("e2b-sandbox-id", "inosuchsandbox")],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert_eq!(v["message"], "The sandbox was not found");
    let (s, _) = h
        .call_with("POST", "/init", None, None, &[("e2b-sandbox-id", &id)])
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn failed_create_leaves_nothing_and_is_audited() {
    let h = harness().await;
    h.driver.fail_next_create();
    let (s, v) = h
        .call(
            "POST",
            "/v2/sandboxes",
            Some(&h.key),
            Some(json!({"templateID": "base"})),
        )
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("injected failure"))
    );
    let (_, list) = h.call("GET", "/v2/sandboxes", Some(&h.key), None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(0));
}

#[tokio::test]
async fn audit_records_api_calls_and_lifecycle() {
    let h = harness().await;
    let v = h.create(json!({"templateID": "base"})).await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    h.call("DELETE", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    let (s, entries) = h
        .call("GET", &format!("/audit?sandboxID={id}"), Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let kinds: Vec<&str> = entries
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"sandbox.create"), "{kinds:?}");
    assert!(kinds.contains(&"sandbox.kill"), "{kinds:?}");
    assert!(kinds.contains(&"api"), "{kinds:?}");
    // Another key sees none of it.
    let other = h.store.create_key("other").expect("key").key;
    let (_, entries) = h
        .call("GET", &format!("/audit?sandboxID={id}"), Some(&other), None)
        .await;
    assert_eq!(entries.as_array().map(Vec::len), Some(0));
    let (s, v) = h
        .call("GET", "/audit?since=yesterday", Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["message"].as_str().is_some_and(|m| m.contains("since")));
}

#[tokio::test]
async fn idempotency_key_creates_once() {
    let h = harness().await;
    let body = json!({"templateID": "base"});
    let (s1, a) = h
        .call_with(
            "POST",
            "/v2/sandboxes",
            Some(&h.key),
            Some(body.clone()),
            &[("idempotency-key", "retry-1")],
        )
        .await;
    let (s2, b) = h
        .call_with(
            "POST",
            "/v2/sandboxes",
            Some(&h.key),
            Some(body.clone()),
            &[("idempotency-key", "retry-1")],
        )
        .await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(a["sandboxID"], b["sandboxID"]);
    assert_eq!(h.driver.created(), 1);
    // Another key value, or another API key, creates anew.
    let (_, c) = h
        .call_with(
            "POST",
            "/v2/sandboxes",
            Some(&h.key),
            Some(body.clone()),
            &[("idempotency-key", "retry-2")],
        )
        .await;
    assert_ne!(a["sandboxID"], c["sandboxID"]);
    let other = h.store.create_key("other").expect("key").key;
    let (_, d) = h
        .call_with(
            "POST",
            "/v2/sandboxes",
            Some(&other),
            Some(body.clone()),
            &[("idempotency-key", "retry-1")],
        )
        .await;
    assert_ne!(a["sandboxID"], d["sandboxID"]);
    assert_eq!(h.driver.created(), 3);
    let (s, v) = h
        .call_with(
            "POST",
            "/v2/sandboxes",
            Some(&h.key),
            Some(body),
            &[("idempotency-key", "Bad Key")],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("Idempotency-Key"))
    );
}

#[tokio::test]
async fn unsupported_features_answer_501_with_a_reason() {
    let h = harness().await;
    let v = h.create(json!({"templateID": "base"})).await;
    let id = v["sandboxID"].as_str().expect("id");
    // (this harness keeps no snapshots)
    for (m, uri, needle) in [
        ("POST", format!("/sandboxes/{id}/fork"), "snapshots"),
        ("POST", format!("/sandboxes/{id}/snapshots"), "snapshots"),
        ("DELETE", "/templates/base".to_string(), "templates"),
        ("GET", "/volumes".to_string(), "volumes"),
        ("POST", "/v3/templates".to_string(), "templates"),
    ] {
        let (s, v) = h.call(m, &uri, Some(&h.key), Some(json!({}))).await;
        assert_eq!(s, StatusCode::NOT_IMPLEMENTED, "{m} {uri}");
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|msg| msg.contains(needle)),
            "{v}"
        );
    }
}

#[tokio::test]
async fn metrics_and_logs() {
    let h = harness().await;
    let v = h.create(json!({"templateID": "base"})).await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    let (s, m) = h
        .call(
            "GET",
            &format!("/sandboxes/{id}/metrics"),
            Some(&h.key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(m[0]["memUsed"], 1 << 20);
    assert_eq!(m[0]["memTotal"], 512u64 * 1024 * 1024);
    let (s, m) = h
        .call(
            "GET",
            &format!("/sandboxes/metrics?sandbox_ids={id},inope"),
            Some(&h.key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(m["sandboxes"].as_object().map(|o| o.len()), Some(1));
    assert!(m["sandboxes"][&id]["cpuCount"].is_number());
    let (s, l) = h
        .call(
            "GET",
            &format!("/v2/sandboxes/{id}/logs"),
            Some(&h.key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        l["logs"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("sandbox.create")))),
        "{l}"
    );
    let (s, _) = h
        .call("GET", "/v2/sandboxes/inope/logs", Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn metrics_are_a_sampled_time_series_within_the_window() {
    let h = harness().await;
    let v = h.create(json!({"templateID": "base"})).await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    let sampler =
        cella_server::spawn_metrics_sampler(h.state.clone(), std::time::Duration::from_millis(20));
    let uri = format!("/sandboxes/{id}/metrics");
    // Recorded samples plus the fresh one: the series grows while the sandbox lives.
    let mut len = 0;
    for _ in 0..200 {
        let (s, m) = h.call("GET", &uri, Some(&h.key), None).await;
        assert_eq!(s, StatusCode::OK, "{m}");
        len = m.as_array().map_or(0, |a| a.len());
        if len >= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    sampler.abort();
    assert!(len >= 4, "only {len} samples after the sampler ran");
    let (_, m) = h.call("GET", &uri, Some(&h.key), None).await;
    let ts: Vec<i64> = m
        .as_array()
        .expect("array")
        .iter()
        .map(|x| x["timestampUnix"].as_i64().expect("timestampUnix"))
        .collect();
    assert!(
        ts.windows(2).all(|w| w[0] <= w[1]),
        "not in time order: {ts:?}"
    );
    assert!(
        m[0]["memUsed"] == 1 << 20 && m[0]["cpuCount"].is_number(),
        "{m}"
    );
    // A window in the past before the sandbox existed, or in the future, is empty.
    let (s, m) = h
        .call("GET", &format!("{uri}?start=0&end=1"), Some(&h.key), None)
        .await;
    assert_eq!((s, m), (StatusCode::OK, json!([])));
    let later = ts[ts.len() - 1] + 3600;
    let (s, m) = h
        .call("GET", &format!("{uri}?start={later}"), Some(&h.key), None)
        .await;
    assert_eq!((s, m), (StatusCode::OK, json!([])));
    // Bad windows are 400s that name the field.
    for (q, field) in [
        ("start=abc", "start"),
        ("end=1.5", "end"),
        ("start=10&end=5", "start"),
    ] {
        let (s, v) = h
            .call("GET", &format!("{uri}?{q}"), Some(&h.key), None)
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert!(
            v["message"].as_str().is_some_and(|m| m.contains(field)),
            "{q}: {v}"
        );
    }
}

#[tokio::test]
async fn traffic_access_token_guards_non_agent_ports() {
    let h = harness().await;
    let public = h.create(json!({"templateID": "base"})).await;
    assert!(public["trafficAccessToken"].is_null(), "{public}");
    let v = h
        .create(json!({"templateID": "base", "network": {"allowPublicTraffic": false}}))
        .await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    let token = v["trafficAccessToken"]
        .as_str()
        .expect("trafficAccessToken")
        .to_string();
    assert!(token.len() >= 32);
    let (s, info) = h
        .call("GET", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(info["network"]["allowPublicTraffic"], false);

    let port = [
        ("e2b-sandbox-id", id.as_str()),
        ("e2b-sandbox-port", "8080"),
    ];
    let (s, v) = h.call_with("GET", "/", None, None, &port).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        v["message"],
        "Sandbox is secured with traffic access token. Token header 'e2b-traffic-access-token' is missing"
    );
    let wrong = [port[0], port[1], ("e2b-traffic-access-token", "nope")];
    let (s, v) = h.call_with("GET", "/", None, None, &wrong).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        v["message"],
        "Sandbox is secured with traffic access token. Provided token is invalid."
    );
    // With the token the request gets through the gate (nothing listens on 8080 here).
    let right = [
        port[0],
        port[1],
        ("e2b-traffic-access-token", token.as_str()),
    ];
    let (s, v) = h.call_with("GET", "/", None, None, &right).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    assert_eq!(v["message"], "The sandbox is running but port is not open");
    // The agent's port checks its own token and needs no traffic token.
    let (s, echo) = h
        .call_with(
            "GET",
            "/health",
            None,
            None,
            &[("host", &format!("49983-{id}.cella.test"))],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{echo}");
}

#[tokio::test]
async fn template_routes_the_sdks_call() {
    let h = harness().await;
    let (s, t) = h.call("GET", "/templates/base", Some(&h.key), None).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    assert_eq!(t["templateID"], "base");
    let (s, _) = h.call("GET", "/templates/nope", Some(&h.key), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    for (m, uri, needle) in [
        ("POST", "/templates/tags", "tags"),
        ("DELETE", "/templates/tags", "tags"),
        ("GET", "/templates/base/tags", "tags"),
        ("DELETE", "/templates/base", "deleting templates"),
    ] {
        let (s, v) = h.call(m, uri, Some(&h.key), Some(json!({}))).await;
        assert_eq!(s, StatusCode::NOT_IMPLEMENTED, "{m} {uri}: {v}");
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|msg| msg.contains(needle)),
            "{v}"
        );
    }
}

#[tokio::test]
async fn rules_need_an_interception_ca_and_leave_nothing_when_refused() {
    // The fake host network has no interception CA: a create with rules fails cleanly (409),
    // without a reserved slot or a running sandbox, rather than starting without them.
    let (h, egress) = egress_harness().await;
    let (s, v) = h
        .call(
            "POST",
            "/v2/sandboxes",
            Some(&h.key),
            Some(json!({"templateID": "base",
                "network": {"rules": {"api.example.com": [{"transform": {"headers": {"X-Key": "v"}}}]}}})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("network rules")),
        "{v}"
    );
    assert_eq!(egress.reserved(), 0);
    assert_eq!(h.driver.created(), 0, "refused before anything started");
}

/// A harness whose manager has a (fake) host-side network, as `--egress allowed`.
async fn egress_harness() -> (Harness, cella_core::fake::FakeEgress) {
    let egress = cella_core::fake::FakeEgress::new();
    (
        harness_with(FakeDriver::with_egress(), Some(egress.clone())),
        egress,
    )
}

#[tokio::test]
async fn egress_none_server_gives_no_network_and_says_so() {
    let h = harness().await;
    let v = h
        .create(json!({"templateID": "base", "allow_internet_access": true}))
        .await;
    let id = v["sandboxID"].as_str().expect("id");
    let (s, info) = h
        .call("GET", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(info["allowInternetAccess"], false, "{info}");
    let (s, v) = h
        .call(
            "PUT",
            &format!("/sandboxes/{id}/network"),
            Some(&h.key),
            Some(json!({"allowOut": ["1.1.1.1"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("--egress none")),
        "{v}"
    );
}

#[tokio::test]
async fn egress_policy_is_attached_reported_and_replaced() {
    let (h, egress) = egress_harness().await;
    for servers in [json!(["1.1.1.1/32"]), json!(["::1"]), json!([1])] {
        let (s, v) = h
            .call(
                "POST",
                "/v2/sandboxes",
                Some(&h.key),
                Some(json!({"templateID": "base",
                    "network": {"allowOut": ["allowed.test"], "dnsServers": servers}})),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{servers}: {v}");
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("network.dnsServers")),
            "{servers}: {v}"
        );
    }
    assert_eq!(egress.reserved(), 0, "nothing attached for a bad request");
    let v = h
        .create(json!({"templateID": "base",
            "network": {"allowOut": ["allowed.test", "198.51.100.0/24"], "denyOut": ["0.0.0.0/0"]}}))
        .await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    let p = egress.attached(&id).expect("attached");
    assert!(p.restricts_domains() && p.allows_name("allowed.test") && !p.allows_name("x.test"));
    assert!(h.driver.nameserver(&id).is_some(), "resolver configured");
    let (_, info) = h
        .call("GET", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(info["allowInternetAccess"], false, "{info}");
    assert_eq!(
        info["network"]["allowOut"],
        json!(["198.51.100.0/24", "allowed.test"])
    );
    assert_eq!(info["network"]["denyOut"], json!(["0.0.0.0/0"]));
    assert_eq!(
        info["network"]["dnsServers"],
        json!(["8.8.8.8"]),
        "omitted: E2B's default"
    );

    // dnsServers: replaced by the update, reset to the default when omitted.
    let (s, v) = h
        .call(
            "PUT",
            &format!("/sandboxes/{id}/network"),
            Some(&h.key),
            Some(
                json!({"allowOut": ["allowed.test"], "denyOut": ["0.0.0.0/0"],
                "dnsServers": ["1.1.1.1", "192.168.1.53"]}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let p = egress.attached(&id).expect("attached");
    assert_eq!(p.open_dns_servers().len(), 2);
    let (_, info) = h
        .call("GET", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(
        info["network"]["dnsServers"],
        json!(["1.1.1.1", "192.168.1.53"])
    );

    // Replace: omitted fields are cleared.
    let (s, v) = h
        .call(
            "PUT",
            &format!("/sandboxes/{id}/network"),
            Some(&h.key),
            Some(json!({"denyOut": ["203.0.113.0/24"]})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let p = egress.attached(&id).expect("attached");
    assert!(p.allow_domains.is_empty() && !p.denies_all());
    assert_eq!(p.dns_servers_out(), vec!["8.8.8.8".to_string()]);
    let (_, info) = h
        .call("GET", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(info["allowInternetAccess"], true, "{info}");
    assert_eq!(info["network"]["dnsServers"], json!(["8.8.8.8"]));

    // Bad input: 400 naming the field; the rules stay.
    for (body, field) in [
        (json!({"denyOut": ["example.com"]}), "denyOut"),
        (json!({"allowOut": ["10.0.0.1/8"]}), "allowOut"),
        (json!({"allowOut": "x"}), "allowOut"),
        (json!({"dnsServers": ["1.1.1.0/24"]}), "dnsServers"),
        (json!({"dnsServers": ["dns.google"]}), "dnsServers"),
        (
            json!({"dnsServers": ["2001:4860:4860::8888"]}),
            "dnsServers",
        ),
        (
            json!({"dnsServers": (1..=11).map(|i| format!("9.9.9.{i}")).collect::<Vec<_>>()}),
            "dnsServers",
        ),
        (json!({"dnsServers": "1.1.1.1"}), "dnsServers"),
    ] {
        let (s, v) = h
            .call(
                "PUT",
                &format!("/sandboxes/{id}/network"),
                Some(&h.key),
                Some(body),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["message"].as_str().is_some_and(|m| m.contains(field)),
            "{v}"
        );
    }
    assert_eq!(egress.attached(&id), Some(p));

    // Unknown sandbox and other keys: 404.
    let (s, _) = h
        .call(
            "PUT",
            "/sandboxes/nosuch/network",
            Some(&h.key),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let other = h.store.create_key("other").expect("key").key;
    let (s, _) = h
        .call(
            "PUT",
            &format!("/sandboxes/{id}/network"),
            Some(&other),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Audit: the create and the update.
    h.store.flush_audit();
    let kinds: Vec<String> = h
        .store
        .query_audit(&cella_core::store::AuditQuery {
            sandbox_id: Some(id.clone()),
            ..Default::default()
        })
        .expect("audit")
        .into_iter()
        .filter(|e| e.kind == "net.policy")
        .map(|e| {
            format!(
                "{} {}",
                e.detail["change"].as_str().unwrap_or_default(),
                e.detail["dnsServers"]
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            r#"create ["8.8.8.8"]"#,
            r#"update ["1.1.1.1","192.168.1.53"]"#,
            r#"update ["8.8.8.8"]"#
        ]
    );

    // Kill releases the attachment.
    let (s, _) = h
        .call("DELETE", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(egress.attached(&id), None);
    assert_eq!(egress.reserved(), 0);
}

#[tokio::test]
async fn no_egress_requested_means_no_interface_and_failed_attach_leaves_nothing() {
    let (h, egress) = egress_harness().await;
    let v = h
        .create(json!({"templateID": "base", "allow_internet_access": false}))
        .await;
    let id = v["sandboxID"].as_str().expect("id");
    assert_eq!(egress.attached(id), None);
    assert_eq!(egress.reserved(), 0);
    let (s, v) = h
        .call(
            "PUT",
            &format!("/sandboxes/{id}/network"),
            Some(&h.key),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");

    egress.fail_next_attach();
    let (s, v) = h
        .call(
            "POST",
            "/v2/sandboxes",
            Some(&h.key),
            Some(json!({"templateID": "base"})),
        )
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(egress.reserved(), 0);
    assert_eq!(h.driver.alive().len(), 1, "only the first sandbox is alive");
}

#[tokio::test]
async fn driver_without_egress_refuses_a_create_that_wants_egress() {
    // A driver that cannot do egress on a server with egress.
    let egress = cella_core::fake::FakeEgress::new();
    let h = harness_with(FakeDriver::new(), Some(egress.clone()));
    let (s, v) = h
        .call(
            "POST",
            "/v2/sandboxes",
            Some(&h.key),
            Some(json!({"templateID": "base"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("no outbound network yet")),
        "{v}"
    );
    assert_eq!(h.driver.created(), 0);
    // Without egress it works.
    h.create(json!({"templateID": "base", "allow_internet_access": false}))
        .await;
    assert_eq!(egress.reserved(), 0);
}

/// Proxy a GET /health to `id` with a deadline: a paused sandbox must be answered, never hang.
async fn proxied_health(h: &Harness, id: &str) -> (StatusCode, Value) {
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        h.call_with("GET", "/health", None, None, &[("e2b-sandbox-id", id)]),
    )
    .await
    .expect("the proxy hung on a paused sandbox")
}

#[tokio::test]
async fn pause_connect_list_and_kill_through_the_api() {
    let h = harness().await;
    let v = h
        .create(json!({"templateID": "base", "timeout": 120, "metadata": {"t": "p"}}))
        .await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    let pause = format!("/sandboxes/{id}/pause");
    // the SDKs' body: memory + requireHealthyGuest (the fake agent answers /health)
    let (s, v) = h
        .call(
            "POST",
            &pause,
            Some(&h.key),
            Some(json!({"memory": true, "requireHealthyGuest": true})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(h.driver.is_paused(&id), Some(true));
    let (s, v) = h.call("POST", &pause, Some(&h.key), None).await;
    assert_eq!(s, StatusCode::CONFLICT, "pausing a paused sandbox: {v}");
    assert_eq!(v["code"], 409);
    let (s, _) = h
        .call("POST", "/sandboxes/inope/pause", Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = h
        .call("POST", &pause, Some(&h.key), Some(json!({"memory": "yes"})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["message"].as_str().is_some_and(|m| m.contains("memory")),
        "{v}"
    );

    let (s, info) = h
        .call("GET", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(info["state"], "paused");
    assert_eq!(
        info["lifecycle"],
        json!({"autoResume": false, "onTimeout": "kill"})
    );

    // list: v2 filters by state; the deprecated v1 list shows running ones only
    let list = |q: &str| format!("/v2/sandboxes?metadata=t%3Dp&{q}");
    let (_, l) = h
        .call("GET", &list("state=paused"), Some(&h.key), None)
        .await;
    assert_eq!(l.as_array().map(Vec::len), Some(1), "{l}");
    assert_eq!(l[0]["state"], "paused");
    let (_, l) = h
        .call("GET", &list("state=running"), Some(&h.key), None)
        .await;
    assert_eq!(l, json!([]));
    let (_, l) = h
        .call("GET", &list("state=running,paused"), Some(&h.key), None)
        .await;
    assert_eq!(l.as_array().map(Vec::len), Some(1));
    let (_, l) = h.call("GET", &list(""), Some(&h.key), None).await;
    assert_eq!(
        l.as_array().map(Vec::len),
        Some(1),
        "default lists paused too"
    );
    let (_, l) = h.call("GET", "/sandboxes", Some(&h.key), None).await;
    assert_eq!(l, json!([]));

    // proxy: a paused sandbox without autoResume is answered at once, as not there
    let (s, v) = proxied_health(&h, &id).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert_eq!(v["message"], "The sandbox was not found");
    assert_eq!(v["paused"], true);
    assert_eq!(
        h.driver.is_paused(&id),
        Some(true),
        "traffic must not resume it"
    );
    // metrics of a paused sandbox answer
    let (s, m) = h
        .call(
            "GET",
            &format!("/sandboxes/{id}/metrics"),
            Some(&h.key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{m}");
    // refresh and timeout do not resume
    let (s, _) = h
        .call(
            "POST",
            &format!("/sandboxes/{id}/refreshes"),
            Some(&h.key),
            Some(json!({"duration": 30})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);

    // connect resumes: 201; then 200
    let connect = format!("/v2/sandboxes/{id}/connect");
    let (s, c) = h
        .call("POST", &connect, Some(&h.key), Some(json!({"timeout": 60})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    assert_eq!(c["sandboxID"], id.as_str());
    assert!(c["envdAccessToken"].is_string());
    assert_eq!(h.driver.is_paused(&id), Some(false));
    let (s, _) = proxied_health(&h, &id).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = h
        .call("POST", &connect, Some(&h.key), Some(json!({"timeout": 60})))
        .await;
    assert_eq!(s, StatusCode::OK);

    // deprecated /resume: 409 while running, 201 when paused
    let resume = format!("/sandboxes/{id}/resume");
    let (s, _) = h.call("POST", &resume, Some(&h.key), Some(json!({}))).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = h.call("POST", &pause, Some(&h.key), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, r) = h
        .call("POST", &resume, Some(&h.key), Some(json!({"timeout": 30})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert_eq!(r["sandboxID"], id.as_str());

    // kill while paused: 204 and nothing left
    let (s, _) = h.call("POST", &pause, Some(&h.key), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = h
        .call("DELETE", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(h.driver.alive().is_empty());
    let (s, _) = h
        .call("GET", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    h.store.flush_audit();
    let kinds: Vec<String> = h
        .store
        .query_audit(&cella_core::store::AuditQuery {
            sandbox_id: Some(id.clone()),
            kind_prefix: Some("sandbox.".into()),
            ..Default::default()
        })
        .expect("audit")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "sandbox.create",
            "sandbox.pause",
            "sandbox.resume",
            "sandbox.pause",
            "sandbox.resume",
            "sandbox.pause",
            "sandbox.kill"
        ]
    );
}

#[tokio::test]
async fn auto_resume_on_traffic_and_auto_pause_on_timeout() {
    let h = harness().await;
    // The SDKs' lifecycle={"on_timeout": "pause", "auto_resume": True} body.
    let v = h
        .create(
            json!({"templateID": "base", "timeout": 1, "autoPause": true,
            "autoPauseMemory": true, "autoResume": {"enabled": true}}),
        )
        .await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.driver.is_paused(&id) != Some(true) {
        assert!(std::time::Instant::now() < deadline, "not auto-paused");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (_, info) = h
        .call("GET", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(info["state"], "paused");
    assert_eq!(
        info["lifecycle"],
        json!({"autoResume": true, "onTimeout": "pause"})
    );
    // traffic resumes it and is forwarded
    let (s, echo) = proxied_health(&h, &id).await;
    assert_eq!(s, StatusCode::OK, "{echo}");
    assert_eq!(echo["requestLine"], "GET /health HTTP/1.1");
    assert_eq!(h.driver.is_paused(&id), Some(false));
    let (_, info) = h
        .call("GET", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(info["state"], "running");
}

#[tokio::test]
async fn strict_pause_refuses_when_the_agent_does_not_answer() {
    let h = harness().await;
    let v = h
        .create(json!({"templateID": "base", "timeout": 120}))
        .await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    h.driver.hang_agent(&id);
    let pause = format!("/sandboxes/{id}/pause");
    let (s, v) = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        h.call(
            "POST",
            &pause,
            Some(&h.key),
            Some(json!({"requireHealthyGuest": true})),
        ),
    )
    .await
    .expect("a strict pause must not hang on a hung agent");
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not respond")),
        "{v}"
    );
    assert_eq!(
        h.driver.is_paused(&id),
        Some(false),
        "a refused pause keeps it running"
    );
    // without the flag it pauses anyway
    let (s, _) = h.call("POST", &pause, Some(&h.key), Some(json!({}))).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(h.driver.is_paused(&id), Some(true));
}

#[tokio::test]
async fn snapshot_routes_have_e2bs_shapes() {
    let h = harness_full(FakeDriver::new(), None, true);
    let v = h.create(json!({"templateID": "base"})).await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    let snaps = format!("/sandboxes/{id}/snapshots");

    let (s, v) = h
        .call("POST", &snaps, Some(&h.key), Some(json!({"name": "s1"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(
        v,
        json!({"snapshotID": "s1:default", "names": ["s1:default"]})
    );
    // an empty body is allowed (the JS SDK sends `{}`, curl may send nothing); a later
    // millisecond, so that "newest first" is defined
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let (s, v) = h.call("POST", &snaps, Some(&h.key), None).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let unnamed = v["snapshotID"].as_str().expect("id").to_string();
    assert!(
        unnamed.starts_with('s') && unnamed.ends_with(":default"),
        "{unnamed}"
    );
    assert_eq!(v["names"], json!([]));
    for (body, field) in [
        (json!({"memory": true}), "memory"),
        (json!({"name": "Bad/Name"}), "name"),
        (json!({"name": 7}), ""),
    ] {
        let (s, v) = h.call("POST", &snaps, Some(&h.key), Some(body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["message"].as_str().is_some_and(|m| m.contains(field)),
            "{v}"
        );
    }
    let (s, _) = h
        .call("POST", "/sandboxes/inope/snapshots", Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = h.call("POST", &snaps, None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // list: newest first, filters, limit + X-Next-Token
    let (s, v) = h.call("GET", "/snapshots", Some(&h.key), None).await;
    assert_eq!(s, StatusCode::OK);
    let all: Vec<&str> = v
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|x| x["snapshotID"].as_str())
        .collect();
    assert_eq!(all, vec![unnamed.as_str(), "s1:default"]);
    let req = Request::builder()
        .uri("/snapshots?limit=1")
        .header("x-api-key", &h.key)
        .body(Body::empty())
        .expect("request");
    let resp = h.app.clone().oneshot(req).await.expect("response");
    let token = resp
        .headers()
        .get("x-next-token")
        .and_then(|t| t.to_str().ok())
        .expect("X-Next-Token")
        .to_string();
    let (s, v) = h
        .call(
            "GET",
            &format!("/snapshots?limit=1&nextToken={token}"),
            Some(&h.key),
            None,
        )
        .await;
    assert_eq!(
        (s, v[0]["snapshotID"].as_str()),
        (StatusCode::OK, Some("s1:default"))
    );
    let (_, v) = h
        .call("GET", "/snapshots?name=s1", Some(&h.key), None)
        .await;
    assert_eq!(v.as_array().map(Vec::len), Some(1));
    let (_, v) = h
        .call("GET", "/snapshots?sandboxID=iother", Some(&h.key), None)
        .await;
    assert_eq!(v, json!([]));
    let (s, _) = h
        .call("GET", "/snapshots?limit=0", Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // start from it
    let v = h.create(json!({"templateID": "s1:default"})).await;
    assert!(
        v["templateID"].as_str().is_some_and(|t| t.starts_with('s')),
        "{v}"
    );

    // fork: one result per fork
    let (s, v) = h
        .call(
            "POST",
            &format!("/sandboxes/{id}/fork"),
            Some(&h.key),
            Some(json!({"count": 2, "timeout": 60})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let forks = v.as_array().expect("forks");
    assert_eq!(forks.len(), 2);
    for f in forks {
        assert!(f["sandbox"]["sandboxID"].is_string(), "{f}");
        assert!(f["sandbox"]["envdAccessToken"].is_string(), "{f}");
        assert!(f.get("error").is_none(), "{f}");
    }
    let (s, v) = h
        .call(
            "POST",
            &format!("/sandboxes/{id}/fork"),
            Some(&h.key),
            Some(json!({"count": 0})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, _) = h
        .call("POST", "/sandboxes/inope/fork", Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // delete: 204, then 404; a template is 501, garbage 404
    let (s, _) = h
        .call("DELETE", "/templates/s1:default", Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = h
        .call("DELETE", "/templates/s1:default", Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = h
        .call("DELETE", "/templates/base", Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_IMPLEMENTED);
    let (s, _) = h
        .call("DELETE", "/templates/..%2F..%2Fetc", Some(&h.key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = h.call("GET", "/snapshots", Some(&h.key), None).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn features_cella_lacks_are_refused_not_ignored() {
    let h = harness().await;
    for (body, field) in [
        (
            json!({"templateID": "base", "iam": {"tokens": {"aws": {"audience": "sts", "tokenType": "OIDC"}}}}),
            "iam",
        ),
        (
            json!({"templateID": "base", "volumeMounts": [{"name": "v", "path": "/data"}]}),
            "volumeMounts",
        ),
        (
            json!({"templateID": "base", "mcp": {"github/o/r": {"runCmd": "x"}}}),
            "mcp",
        ),
        (
            json!({"templateID": "base", "network": {"rules": {"api.example.com": [{"transform": {"headers": {"Host": "y"}}}]}}}),
            "network.rules",
        ),
        (
            json!({"templateID": "base", "network": {"rules": {"api.example.com": [{"transform": {"headers": {"x": "${e2b.identity.tokens.aws}"}}}]}}}),
            "not register",
        ),
        (
            json!({"templateID": "base", "network": {"rules": {"api.example.com": [{"inject": {}}]}}}),
            "inject",
        ),
        (
            json!({"templateID": "base", "network": {"egressProxy": {"address": "proxy"}}}),
            "network.egressProxy",
        ),
        (
            json!({"templateID": "base", "network": {"httpsPorts": [49983]}}),
            "network.httpsPorts",
        ),
        (
            json!({"templateID": "base", "network": {"httpsPorts": [0]}}),
            "network.httpsPorts",
        ),
        (
            json!({"templateID": "base", "network": {"httpsPorts": [70000]}}),
            "network.httpsPorts",
        ),
        (
            json!({"templateID": "base", "network": {"httpsPorts": ["443"]}}),
            "httpsPorts",
        ),
        (
            json!({"templateID": "base", "network": {"maskRequestHost": "bad host\r\nx: y"}}),
            "network.maskRequestHost",
        ),
    ] {
        let (s, v) = h
            .call("POST", "/v2/sandboxes", Some(&h.key), Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(
            v["message"].as_str().is_some_and(|m| m.contains(field)),
            "{body}: {v}"
        );
    }
    assert_eq!(h.driver.created(), 0, "nothing was started");
    // empty values ask for nothing
    let v = h
        .create(json!({"templateID": "base", "volumeMounts": [], "network": {"rules": {}, "httpsPorts": [], "maskRequestHost": "${PORT}-app.example.com"}}))
        .await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    let (_, info) = h
        .call("GET", &format!("/sandboxes/{id}"), Some(&h.key), None)
        .await;
    assert_eq!(
        info["network"]["maskRequestHost"],
        "${PORT}-app.example.com"
    );
    assert!(info["network"].get("httpsPorts").is_none(), "{info}");
    // httpsPorts is kept (sorted, once each) and reported
    let v = h
        .create(json!({"templateID": "base", "network": {"httpsPorts": [8443, 3000, 8443]}}))
        .await;
    let (_, https) = h
        .call(
            "GET",
            &format!("/sandboxes/{}", v["sandboxID"].as_str().expect("id")),
            Some(&h.key),
            None,
        )
        .await;
    assert_eq!(
        https["network"]["httpsPorts"],
        json!([3000, 8443]),
        "{https}"
    );
    let (s, v) = h
        .call(
            "PUT",
            &format!("/sandboxes/{id}/network"),
            Some(&h.key),
            Some(json!({"rules": {"x.example": [{"transform": {"headers": {"Content-Length": "1"}}}]}})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"].as_str().is_some_and(|m| m.contains("rules")),
        "{v}"
    );
}

#[tokio::test]
async fn a_fork_gets_the_network_rules_in_force_not_the_create_request() {
    let egress = cella_core::fake::FakeEgress::new();
    let h = harness_full(FakeDriver::with_egress(), Some(egress.clone()), true);
    let v = h
        .create(json!({"templateID": "base", "allow_internet_access": false,
            "network": {"allowOut": ["created.test"]}}))
        .await;
    let id = v["sandboxID"].as_str().expect("id").to_string();
    let fork_policy = |body: Value| {
        let (h, egress, id) = (&h, &egress, &id);
        async move {
            let (s, v) = h
                .call(
                    "PUT",
                    &format!("/sandboxes/{id}/network"),
                    Some(&h.key),
                    Some(body),
                )
                .await;
            assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
            let (s, v) = h
                .call(
                    "POST",
                    &format!("/sandboxes/{id}/fork"),
                    Some(&h.key),
                    Some(json!({"count": 1})),
                )
                .await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            let fork = v[0]["sandbox"]["sandboxID"].as_str().expect("fork id");
            egress.attached(fork).expect("the fork has a network")
        }
    };
    // Updated to another allow-listed domain: the fork has the new rule, not the created one.
    let p = fork_policy(json!({"allowOut": ["updated.test"], "denyOut": ["0.0.0.0/0"]})).await;
    assert!(p.allows_name("updated.test"), "{p:?}");
    assert!(!p.allows_name("created.test"), "{p:?}");
    assert!(p.denies_all(), "{p:?}");
    // Opened to the internet: the create's allow_internet_access=false does not close it again.
    let p = fork_policy(json!({"allowOut": [], "denyOut": []})).await;
    assert!(!p.denies_all(), "{p:?}");
    assert!(p.deny_out().is_empty(), "{p:?}");
}
