//! A fake [`Driver`] for tests of the manager, the REST API and the proxy without root.
//!
//! Each fake sandbox runs a tiny HTTP/1.1 responder on a loopback port that stands in for the
//! agent: it answers every request with `200` and a JSON body echoing the method, path and
//! headers it received, so tests can see exactly what the proxy forwarded. Only the agent port
//! (49983) "is open"; any other port refuses the connection, like a closed port in a sandbox.
//! A paused fake sandbox behaves like a frozen one: a connection is accepted by the kernel but
//! never answered, so a proxy that forwards to a paused sandbox hangs (and a test sees it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cella_api::{ENVD_PORT, Isolation};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::driver::{
    Driver, DriverError, EventSink, ExitInfo, ReapReport, SandboxHandle, SandboxSpec, SandboxStats,
};

/// The fake driver. Cloning shares the registry of created sandboxes.
#[derive(Clone, Default)]
pub struct FakeDriver {
    inner: Arc<FakeInner>,
}

#[derive(Default)]
struct FakeInner {
    egress: AtomicBool,
    fail_next: AtomicBool,
    fail_next_pause: AtomicBool,
    created: AtomicUsize,
    pauses: AtomicUsize,
    resumes: AtomicUsize,
    sandboxes: Mutex<HashMap<String, Arc<FakeSandbox>>>,
}

impl FakeDriver {
    /// A fresh fake driver.
    pub fn new() -> FakeDriver {
        FakeDriver::default()
    }

    /// A fake driver whose sandboxes support egress (see [`FakeEgress`]).
    pub fn with_egress() -> FakeDriver {
        let d = FakeDriver::default();
        d.inner.egress.store(true, Ordering::SeqCst);
        d
    }

    /// The nameserver the manager configured in a sandbox.
    pub fn nameserver(&self, id: &str) -> Option<std::net::Ipv4Addr> {
        let map = self.inner.sandboxes.lock().ok()?;
        map.get(id)
            .and_then(|s| s.nameserver.lock().ok().and_then(|n| *n))
    }

    /// Make the next `create` fail with a setup error.
    pub fn fail_next_create(&self) {
        self.inner.fail_next.store(true, Ordering::SeqCst);
    }

    /// How many sandboxes were created.
    pub fn created(&self) -> usize {
        self.inner.created.load(Ordering::SeqCst)
    }

    /// Sandboxes alive (created and not destroyed).
    pub fn alive(&self) -> Vec<String> {
        self.inner
            .sandboxes
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The spec a sandbox was created with.
    pub fn spec(&self, id: &str) -> Option<SandboxSpec> {
        let map = self.inner.sandboxes.lock().ok()?;
        map.get(id).map(|s| s.spec.clone())
    }

    /// Make the next `pause` fail (the sandbox keeps running).
    pub fn fail_next_pause(&self) {
        self.inner.fail_next_pause.store(true, Ordering::SeqCst);
    }

    /// Make a sandbox's agent stop answering (connections hang) without pausing it.
    pub fn hang_agent(&self, id: &str) {
        if let Ok(m) = self.inner.sandboxes.lock()
            && let Some(sb) = m.get(id)
        {
            sb.hung.store(true, Ordering::SeqCst);
        }
    }

    /// Whether a sandbox is paused now (`None`: not alive).
    pub fn is_paused(&self, id: &str) -> Option<bool> {
        let map = self.inner.sandboxes.lock().ok()?;
        map.get(id).map(|s| s.paused.load(Ordering::SeqCst))
    }

    /// How many pauses and resumes the driver carried out.
    pub fn pause_counts(&self) -> (usize, usize) {
        (
            self.inner.pauses.load(Ordering::SeqCst),
            self.inner.resumes.load(Ordering::SeqCst),
        )
    }

    /// Simulate the sandbox dying on its own (agent crash).
    pub fn crash(&self, id: &str) {
        let sb = self
            .inner
            .sandboxes
            .lock()
            .ok()
            .and_then(|m| m.get(id).cloned());
        if let Some(sb) = sb {
            sb.stop("agent crashed");
        }
    }
}

#[async_trait]
impl Driver for FakeDriver {
    fn isolation(&self) -> Isolation {
        Isolation::Jail
    }

    async fn create(
        &self,
        spec: SandboxSpec,
        _events: EventSink,
    ) -> Result<Arc<dyn SandboxHandle>, DriverError> {
        if self.inner.fail_next.swap(false, Ordering::SeqCst) {
            return Err(DriverError::Setup("injected failure".into()));
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| DriverError::Io {
                context: "binding fake agent".into(),
                source: e,
            })?;
        let addr = listener.local_addr().map_err(|e| DriverError::Io {
            context: "fake agent address".into(),
            source: e,
        })?;
        let sb = Arc::new(FakeSandbox {
            spec,
            addr,
            stopped: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            hung: AtomicBool::new(false),
            exit: Notify::new(),
            reason: Mutex::new(None),
            inner: Arc::downgrade(&self.inner),
            egress: self.inner.egress.load(Ordering::SeqCst),
            nameserver: Mutex::new(None),
        });
        let server = tokio::spawn(echo_server(listener));
        let sb2 = sb.clone();
        tokio::spawn(async move {
            sb2.exit_notified().await;
            server.abort();
        });
        self.inner.created.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut m) = self.inner.sandboxes.lock() {
            m.insert(sb.spec.id.clone(), sb.clone());
        }
        Ok(sb)
    }

    async fn reap_orphans(&self) -> Result<ReapReport, DriverError> {
        Ok(ReapReport::default())
    }

    fn supports_egress(&self) -> bool {
        self.inner.egress.load(Ordering::SeqCst)
    }
}

struct FakeSandbox {
    spec: SandboxSpec,
    addr: std::net::SocketAddr,
    stopped: AtomicBool,
    paused: AtomicBool,
    hung: AtomicBool,
    exit: Notify,
    reason: Mutex<Option<String>>,
    inner: std::sync::Weak<FakeInner>,
    egress: bool,
    nameserver: Mutex<Option<std::net::Ipv4Addr>>,
}

impl FakeSandbox {
    fn stop(&self, reason: &str) {
        if !self.stopped.swap(true, Ordering::SeqCst) {
            if let Ok(mut r) = self.reason.lock() {
                *r = Some(reason.to_string());
            }
            if let Some(inner) = self.inner.upgrade()
                && let Ok(mut m) = inner.sandboxes.lock()
            {
                m.remove(&self.spec.id);
            }
        }
        self.exit.notify_waiters();
        self.exit.notify_one();
    }

    async fn exit_notified(&self) {
        while !self.stopped.load(Ordering::SeqCst) {
            self.exit.notified().await;
        }
    }
}

#[async_trait]
impl SandboxHandle for FakeSandbox {
    fn id(&self) -> &str {
        &self.spec.id
    }

    fn isolation(&self) -> Isolation {
        Isolation::Jail
    }

    async fn dial(&self, port: u16) -> std::io::Result<TcpStream> {
        if port != ENVD_PORT || self.stopped.load(Ordering::SeqCst) {
            return Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        }
        if self.paused.load(Ordering::SeqCst) || self.hung.load(Ordering::SeqCst) {
            // A frozen agent: the connection would be accepted and never answered.
            std::future::pending::<()>().await;
        }
        TcpStream::connect(self.addr).await
    }

    async fn pause(&self) -> Result<(), DriverError> {
        let inner = self.inner.upgrade();
        if let Some(i) = &inner
            && i.fail_next_pause.swap(false, Ordering::SeqCst)
        {
            return Err(DriverError::Pause("injected pause failure".into()));
        }
        if self.stopped.load(Ordering::SeqCst) {
            return Err(DriverError::Pause("sandbox is gone".into()));
        }
        self.paused.store(true, Ordering::SeqCst);
        if let Some(i) = inner {
            i.pauses.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn resume(&self) -> Result<(), DriverError> {
        if self.paused.swap(false, Ordering::SeqCst)
            && let Some(i) = self.inner.upgrade()
        {
            i.resumes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn snapshot_filesystem(&self, dest: &std::path::Path) -> Result<(), DriverError> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(DriverError::Setup("sandbox is gone".into()));
        }
        // The "changes" of a fake sandbox: which sandbox, and which layers it started from.
        let layers: Vec<String> = self
            .spec
            .template
            .layers
            .iter()
            .map(|l| l.display().to_string())
            .collect();
        std::fs::write(
            dest.join("fake-snapshot"),
            format!("{}\n{}\n", self.spec.id, layers.join(",")),
        )
        .map_err(|source| DriverError::Io {
            context: "writing a fake snapshot".into(),
            source,
        })
    }

    fn stats(&self) -> Result<SandboxStats, DriverError> {
        Ok(SandboxStats {
            memory_bytes: 1 << 20,
            cpu_usage_ns: 0,
            pids: 1,
        })
    }

    async fn wait_exit(&self) -> ExitInfo {
        self.exit_notified().await;
        let reason = self
            .reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_default();
        ExitInfo { reason }
    }

    async fn destroy(&self) -> Result<(), DriverError> {
        // Like a v1 freezer: a frozen sandbox cannot be killed cleanly.
        if self.paused.load(Ordering::SeqCst) {
            return Err(DriverError::Cleanup(
                "destroy of a frozen fake sandbox (thaw first)".into(),
            ));
        }
        self.stop("destroyed");
        Ok(())
    }

    fn netns_path(&self) -> Option<std::path::PathBuf> {
        self.egress
            .then(|| std::path::PathBuf::from(format!("/fake/netns/{}", self.spec.id)))
    }

    async fn set_nameserver(&self, nameserver: std::net::Ipv4Addr) -> Result<(), DriverError> {
        if !self.egress {
            return Err(DriverError::Unavailable("no egress".into()));
        }
        if let Ok(mut n) = self.nameserver.lock() {
            *n = Some(nameserver);
        }
        Ok(())
    }
}

/// A fake host-side network: records reservations, attachments and rule updates.
#[derive(Clone, Default)]
pub struct FakeEgress {
    state: Arc<Mutex<FakeEgressState>>,
}

#[derive(Default)]
struct FakeEgressState {
    next: u8,
    reserved: HashMap<String, std::net::Ipv4Addr>,
    attached: HashMap<String, crate::egress::EgressPolicy>,
    fail_attach: bool,
}

impl FakeEgress {
    /// A fresh fake.
    pub fn new() -> FakeEgress {
        FakeEgress::default()
    }

    /// The rules attached to a sandbox, if it is attached.
    pub fn attached(&self, id: &str) -> Option<crate::egress::EgressPolicy> {
        self.state.lock().ok()?.attached.get(id).cloned()
    }

    /// Number of reserved slots (attached or not).
    pub fn reserved(&self) -> usize {
        self.state.lock().map(|s| s.reserved.len()).unwrap_or(0)
    }

    /// Make the next `attach` fail.
    pub fn fail_next_attach(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.fail_attach = true;
        }
    }
}

#[async_trait]
impl crate::egress::Egress for FakeEgress {
    fn reserve(&self, sandbox_id: &str) -> Result<std::net::Ipv4Addr, crate::egress::EgressError> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| crate::egress::EgressError::Setup("poisoned".into()))?;
        s.next = s.next.wrapping_add(4);
        let ip = std::net::Ipv4Addr::new(10, 99, 0, s.next.wrapping_add(1));
        s.reserved.insert(sandbox_id.to_string(), ip);
        Ok(ip)
    }

    async fn attach(
        &self,
        sandbox_id: &str,
        _netns: &std::path::Path,
        policy: &crate::egress::EgressPolicy,
    ) -> Result<(), crate::egress::EgressError> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| crate::egress::EgressError::Setup("poisoned".into()))?;
        if std::mem::take(&mut s.fail_attach) {
            return Err(crate::egress::EgressError::Setup("injected failure".into()));
        }
        s.attached.insert(sandbox_id.to_string(), policy.clone());
        Ok(())
    }

    async fn update(
        &self,
        sandbox_id: &str,
        policy: &crate::egress::EgressPolicy,
    ) -> Result<(), crate::egress::EgressError> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| crate::egress::EgressError::Setup("poisoned".into()))?;
        match s.attached.get_mut(sandbox_id) {
            Some(p) => {
                *p = policy.clone();
                Ok(())
            }
            None => Err(crate::egress::EgressError::NotAttached(sandbox_id.into())),
        }
    }

    async fn release(&self, sandbox_id: &str) -> Result<(), crate::egress::EgressError> {
        if let Ok(mut s) = self.state.lock() {
            s.attached.remove(sandbox_id);
            s.reserved.remove(sandbox_id);
        }
        Ok(())
    }
}

/// Answers each HTTP/1.1 request with a JSON echo of its request line and headers.
async fn echo_server(listener: TcpListener) {
    while let Ok((mut conn, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let Some(end) = find_head_end(&buf) else {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    if buf.len() > 64 * 1024 {
                        return;
                    }
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let mut lines = head.split("\r\n");
                let request_line = lines.next().unwrap_or_default().to_string();
                let mut headers = serde_json::Map::new();
                let mut content_length = 0usize;
                for l in lines {
                    if let Some((k, v)) = l.split_once(':') {
                        let k = k.trim().to_ascii_lowercase();
                        if k == "content-length" {
                            content_length = v.trim().parse().unwrap_or(0);
                        }
                        headers.insert(k, serde_json::Value::String(v.trim().to_string()));
                    }
                }
                let mut rest = buf.split_off(end + 4);
                while rest.len() < content_length {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => rest.extend_from_slice(&chunk[..n]),
                    }
                }
                let leftover = rest.split_off(content_length.min(rest.len()));
                let body = serde_json::json!({
                    "requestLine": request_line,
                    "headers": headers,
                    "body": String::from_utf8_lossy(&rest),
                })
                .to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                    body.len(),
                    body
                );
                if conn.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                buf = leftover;
            }
        });
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}
