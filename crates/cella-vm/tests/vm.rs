//! End-to-end: boot a real microVM from the base template, talk envd to its agent, destroy it
//! and prove nothing is left. Needs root, QEMU, `scripts/vm-assets` output, a built base
//! template and the static agent; otherwise it prints why it skips.
//!
//! Environment: `CELLA_VM_ASSETS` (default /var/lib/cella/vm), `CELLA_TEMPLATES` (default
//! /var/lib/cella/templates), `CELLA_AGENT` (default target/release/cella-agent-static).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use cella_core::driver::{Driver, Limits, SandboxHandle, SandboxSpec, TemplateImage};
use cella_vm::{BootPath, VmConfig, VmDriver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

fn find_base_rootfs(templates: &Path) -> Option<(String, PathBuf)> {
    let base = templates.join("base");
    let mut builds: Vec<PathBuf> = std::fs::read_dir(&base)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("rootfs/etc").is_dir() && p.join("build.json").is_file())
        .collect();
    builds.sort();
    let b = builds.pop()?;
    let id = b.file_name()?.to_string_lossy().into_owned();
    Some((id, b.join("rootfs")))
}

struct Env {
    assets: PathBuf,
    agent: PathBuf,
    build_id: String,
    rootfs: PathBuf,
}

fn environment() -> Option<Env> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root (netns, tap, cgroups, uid switch)");
        return None;
    }
    if std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        eprintln!("skipping: qemu-system-x86_64 is not installed (scripts/install-deps)");
        return None;
    }
    let assets = env_path("CELLA_VM_ASSETS", "/var/lib/cella/vm");
    if !assets.join("vmlinux").is_file() || !assets.join("initramfs.cpio").is_file() {
        eprintln!(
            "skipping: no guest assets in {} (run scripts/vm-assets)",
            assets.display()
        );
        return None;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let agent = std::env::var_os("CELLA_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target/release/cella-agent-static"));
    if !agent.is_file() {
        eprintln!(
            "skipping: no static agent at {} (run scripts/build)",
            agent.display()
        );
        return None;
    }
    let templates = env_path("CELLA_TEMPLATES", "/var/lib/cella/templates");
    let Some((build_id, rootfs)) = find_base_rootfs(&templates) else {
        eprintln!(
            "skipping: no built base template under {} (cella template build base)",
            templates.display()
        );
        return None;
    };
    Some(Env {
        assets,
        agent: std::fs::canonicalize(&agent).expect("agent path"),
        build_id,
        rootfs,
    })
}

fn spec(env: &Env, id: &str) -> SandboxSpec {
    SandboxSpec {
        id: id.to_string(),
        template: TemplateImage {
            name: "base".into(),
            build_id: env.build_id.clone(),
            rootfs: env.rootfs.clone(),
            default_user: "user".into(),
            env: BTreeMap::new(),
            start_cmd: None,
            layers: Vec::new(),
        },
        limits: Limits {
            cpu_count: 1,
            memory_mb: 256,
            disk_mb: 512,
            max_pids: 1024,
        },
        env_vars: BTreeMap::new(),
        access_token: "vm-test-token".into(),
    }
}

/// One HTTP/1.1 exchange with `Connection: close`; returns (status, body), de-chunked.
async fn http(
    h: &dyn SandboxHandle,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = h.dial(49983).await.expect("dial the agent");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let mut rest = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        loop {
            let nl = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("chunk size");
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16)
                .expect("hex size");
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            rest = rest[nl + 2 + size + 2..].to_vec();
        }
        rest = out;
    }
    (status, rest)
}

/// Run a command through envd's Process/Start (Connect server streaming, JSON); returns stdout.
async fn run(h: &dyn SandboxHandle, cmd: &str, args: &[&str]) -> String {
    let msg = serde_json::json!({"process": {"cmd": cmd, "args": args}});
    let payload = serde_json::to_vec(&msg).expect("json");
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(payload.len()).expect("len").to_be_bytes());
    body.extend_from_slice(&payload);
    let (status, resp) = http(
        h,
        "POST",
        "/process.Process/Start",
        &[
            ("Content-Type", "application/connect+json"),
            ("X-Access-Token", "vm-test-token"),
        ],
        &body,
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    let mut stdout = Vec::new();
    let mut rest = resp.as_slice();
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let frame = &rest[5..5 + len];
        let v: serde_json::Value = serde_json::from_slice(frame).expect("frame json");
        if let Some(data) = v.pointer("/event/data/stdout").and_then(|d| d.as_str()) {
            stdout.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .expect("base64"),
            );
        }
        rest = &rest[5 + len..];
    }
    String::from_utf8_lossy(&stdout).into_owned()
}

fn rss_breakdown(pid: i32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .filter(|l| {
            [
                "Rss:",
                "Pss_Anon:",
                "Pss_File:",
                "Anonymous:",
                "AnonHugePages:",
            ]
            .iter()
            .any(|k| l.starts_with(k))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The tests count the network namespaces this process holds, so they must not overlap.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn net_namespaces_we_hold() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|t| t.to_string_lossy().starts_with("net:["))
                .count()
        })
        .unwrap_or(0)
}

/// The QEMU process of sandbox `id`: the one process in its cgroups.
fn qemu_pid(driver: &VmDriver, id: &str) -> i32 {
    let procs = driver.cgroups().procs(id).expect("cgroup procs");
    assert_eq!(procs.len(), 1, "one VMM process per VM cgroup: {procs:?}");
    procs.into_iter().next().expect("qemu pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_sandbox_end_to_end() {
    let _serial = SERIAL.lock().await;
    let Some(env) = environment() else { return };
    let tmp = tempfile::Builder::new()
        .prefix("cella-vm-test")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .expect("chmod");
    let mut config = VmConfig::new(
        tmp.path().join("data"),
        env.assets.clone(),
        env.agent.clone(),
    );
    // This test covers the cold boot; `snapshot_clones` the restore path.
    config.snapshots = false;
    let driver = VmDriver::new(config).await.expect("driver");
    eprintln!(
        "accelerator: {:?} ({})",
        driver.accel().accel,
        driver.accel().reason
    );
    driver.reap_orphans().await.expect("reap");

    let id = format!("vmit{}", std::process::id());
    let t = Instant::now();
    let (image, size) = driver.image_for(&spec(&env, &id)).await.expect("image");
    eprintln!(
        "image {} ({} MiB) ready in {:?} (cold build)",
        image.display(),
        size >> 20,
        t.elapsed()
    );

    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    let sb = driver
        .create_vm(spec(&env, &id), events)
        .await
        .expect("create");
    let ready = t.elapsed();
    assert_eq!(sb.boot_path(), BootPath::Cold, "snapshots are off");
    eprintln!("create -> ready: {ready:?}");
    let first = rx.recv().await.expect("event");
    assert!(matches!(
        first.event,
        cella_proto::control::AgentEvent::Ready { .. }
    ));

    let (status, _) = http(sb.as_ref(), "GET", "/health", &[], b"").await;
    assert_eq!(status, 204);

    let guest = run(sb.as_ref(), "/bin/uname", &["-r"]).await;
    let expected = std::fs::read_to_string(env.assets.join("kernel.release")).unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("host release");
    eprintln!("guest kernel: {}", guest.trim());
    assert_ne!(
        guest.trim(),
        host.trim(),
        "uname must show the guest's kernel"
    );
    if !expected.trim().is_empty() {
        assert_eq!(guest.trim(), expected.trim());
    }
    let hostname = run(sb.as_ref(), "/bin/hostname", &[]).await;
    assert_eq!(hostname.trim(), id);
    // the disk got the sandbox's size (image + disk_mb), grown online by the init
    let df = run(sb.as_ref(), "/bin/df", &["-m", "/"]).await;
    eprintln!("guest df: {}", df.lines().last().unwrap_or_default());
    let disk_mb: u64 = df
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        disk_mb > (size >> 20) + 256,
        "the root fs was not grown to the disk: {df}"
    );
    let meminfo = run(sb.as_ref(), "/bin/cat", &["/proc/meminfo"]).await;
    let keep = ["MemTotal", "MemFree", "Cached", "AnonPages", "Slab"];
    let summary: Vec<&str> = meminfo
        .lines()
        .filter(|l| keep.iter().any(|k| l.starts_with(&format!("{k}:"))))
        .collect();
    eprintln!("guest meminfo: {}", summary.join(", "));

    // Memory of the idle VM (the whole QEMU process), after the guest settles.
    let cg_dirs = driver.cgroups().dirs(&id);
    assert!(
        cg_dirs
            .iter()
            .all(|d| d.is_dir()
                && d.ends_with(format!("cella-vm/{}/{id}", driver.cgroups().instance()))),
        "{cg_dirs:?}"
    );
    let pid = qemu_pid(&driver, &id);

    // Another server (another data dir) starting up on this host reaps only its own leftovers.
    let other = VmDriver::new(VmConfig::new(
        tmp.path().join("other"),
        env.assets.clone(),
        env.agent.clone(),
    ))
    .await
    .expect("second driver");
    assert_ne!(other.cgroups().instance(), driver.cgroups().instance());
    let report = other
        .reap_orphans()
        .await
        .expect("reap of the other instance");
    assert_eq!(report.processes, 0, "{report:?}");
    // SAFETY: kill with signal 0 only checks for existence.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    assert!(alive, "another server's reaper killed our VM");
    let (status, _) = http(sb.as_ref(), "GET", "/health", &[], b"").await;
    assert_eq!(status, 204);

    eprintln!("RSS right after ready: {}", rss_breakdown(pid));
    tokio::time::sleep(Duration::from_secs(10)).await;
    eprintln!("RSS idle 10 s later:  {}", rss_breakdown(pid));
    let stats = sb.stats().expect("stats");
    eprintln!("cgroup stats: {stats:?}");
    assert!(stats.memory_bytes > 0);

    let dir = tmp.path().join("data/sandboxes").join(&id);
    assert!(dir.join("disk.qcow2").is_file());
    sb.destroy().await.expect("destroy");
    sb.destroy().await.expect("destroy is idempotent");
    tokio::time::timeout(Duration::from_secs(5), sb.wait_exit())
        .await
        .expect("wait_exit resolves after destroy");
    // SAFETY: kill with signal 0 only checks for existence.
    assert_eq!(unsafe { libc::kill(pid, 0) }, -1, "QEMU must be gone");
    assert!(!dir.exists(), "sandbox directory must be gone");
    for d in &cg_dirs {
        assert!(!d.exists(), "{} must be gone", d.display());
    }
    assert!(sb.dial(49983).await.is_err(), "no dialing after destroy");
    assert_eq!(net_namespaces_we_hold(), 0, "the netns must be released");
    assert!(image.is_file(), "the template image stays cached");

    // A second (warm) start, then a crash of the VMM mid-life: wait_exit resolves.
    let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    let sb = driver
        .create(spec(&env, &format!("{id}b")), events)
        .await
        .expect("warm create");
    eprintln!("create -> ready (image cached): {:?}", t.elapsed());
    let pid = qemu_pid(&driver, &format!("{id}b"));
    // SAFETY: signalling the QEMU process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let exit = tokio::time::timeout(Duration::from_secs(10), sb.wait_exit())
        .await
        .expect("wait_exit resolves after a VMM crash");
    eprintln!("exit after crash: {}", exit.reason);
    assert!(exit.reason.contains("signal 9"), "{}", exit.reason);
    sb.destroy().await.expect("destroy after crash");
    let report = driver.reap_orphans().await.expect("reap");
    assert_eq!(report.processes, 0, "{report:?}");
    assert_eq!(report.dirs, 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_becomes_ready_fails_cleanly() {
    let _serial = SERIAL.lock().await;
    let Some(env) = environment() else { return };
    let tmp = tempfile::Builder::new()
        .prefix("cella-vm-test")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .expect("chmod");
    // An "agent" that exits at once: init (PID 1) dies, the guest kernel panics, QEMU exits.
    let bad_agent = tmp.path().join("agent");
    let mut f = std::fs::File::create(&bad_agent).expect("create");
    f.write_all(b"#!/bin/sh\nexit 3\n").expect("write");
    drop(f);
    let mut config = VmConfig::new(tmp.path().join("data"), env.assets.clone(), bad_agent);
    config.ready_timeout = Some(Duration::from_secs(60));
    config.snapshots = true;
    let driver = VmDriver::new(config).await.expect("driver");
    let id = format!("vmbad{}", std::process::id());
    let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    let err = match driver.create(spec(&env, &id), events).await {
        Ok(_) => panic!("a guest without a working agent must not become ready"),
        Err(e) => e.to_string(),
    };
    eprintln!("failed after {:?}: {err}", t.elapsed());
    assert!(
        err.contains("control channel") || err.contains("powered off"),
        "{err}"
    );
    assert!(!tmp.path().join("data/sandboxes").join(&id).exists());
    for d in driver.cgroups().dirs(&id) {
        assert!(!d.exists(), "{} must be gone", d.display());
    }
    assert_eq!(net_namespaces_we_hold(), 0);
    let mut leftovers = String::new();
    for e in std::fs::read_dir(tmp.path().join("data/sandboxes")).expect("ls") {
        leftovers.push_str(&e.expect("entry").file_name().to_string_lossy());
    }
    assert!(leftovers.is_empty(), "{leftovers}");
    // The golden VM failed the same way (snapshots are on by default): nothing half-made stays.
    let snaps: Vec<_> = std::fs::read_dir(tmp.path().join("data/snapshots"))
        .expect("ls snapshots")
        .collect();
    assert!(snaps.is_empty(), "{snaps:?}");
}

/// Seconds since the epoch on the host, as f64.
fn host_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_clones() {
    let _serial = SERIAL.lock().await;
    // The driver logs why it restored or booted cold (RUST_LOG=cella_vm=debug for more).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("cella_vm=info")),
        )
        .with_test_writer()
        .try_init();
    let Some(env) = environment() else { return };
    let tmp = tempfile::Builder::new()
        .prefix("cella-vm-test")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .expect("chmod");
    let mut config = VmConfig::new(
        tmp.path().join("data"),
        env.assets.clone(),
        env.agent.clone(),
    );
    config.snapshots = true;
    let driver = VmDriver::new(config).await.expect("driver");
    driver.reap_orphans().await.expect("reap");
    let snapshots = tmp.path().join("data/snapshots");
    let kernel = std::fs::read_to_string(env.assets.join("kernel.release")).unwrap_or_default();

    let base = format!("vmsn{}", std::process::id());
    let mut sandboxes = Vec::new();
    let mut first_key = String::new();
    for n in 0..2 {
        let id = format!("{base}x{n}");
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let t = Instant::now();
        let sb = driver
            .create_vm(spec(&env, &id), events)
            .await
            .expect("create");
        eprintln!(
            "create {n} -> ready: {:?} ({:?})",
            t.elapsed(),
            sb.boot_path()
        );
        // The first create builds the snapshot, then restores from it like every later one.
        assert_eq!(sb.boot_path(), BootPath::Restored, "create {n}");
        assert!(matches!(
            rx.recv().await.expect("event").event,
            cella_proto::control::AgentEvent::Ready { .. }
        ));
        let keys: Vec<String> = std::fs::read_dir(&snapshots)
            .expect("ls snapshots")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            keys.len(),
            1,
            "one complete snapshot, no temp dirs: {keys:?}"
        );
        first_key = keys[0].clone();
        sandboxes.push((id, sb));
    }

    assert_eq!(driver.snapshots_built(), 1);

    // Other limits, another key: built lazily by the first create, once, even when two creates
    // race for it.
    let mut other = spec(&env, &format!("{base}c0"));
    other.limits.memory_mb = 320;
    let mut other2 = other.clone();
    other2.id = format!("{base}c1");
    let (ev1, _rx1) = tokio::sync::mpsc::unbounded_channel();
    let (ev2, _rx2) = tokio::sync::mpsc::unbounded_channel();
    let (a, b) = tokio::join!(driver.create_vm(other, ev1), driver.create_vm(other2, ev2));
    let (a, b) = (a.expect("concurrent create"), b.expect("concurrent create"));
    assert_eq!(
        (a.boot_path(), b.boot_path()),
        (BootPath::Restored, BootPath::Restored)
    );
    assert_eq!(driver.snapshots_built(), 2, "one more snapshot, built once");
    assert_eq!(std::fs::read_dir(&snapshots).expect("ls").count(), 2);
    a.destroy().await.expect("destroy");
    b.destroy().await.expect("destroy");

    let mut random = Vec::new();
    for (id, sb) in &sandboxes {
        let h: &dyn SandboxHandle = sb.as_ref();
        let (status, _) = http(h, "GET", "/health", &[], b"").await;
        assert_eq!(status, 204);
        let release = run(h, "/bin/uname", &["-r"]).await;
        if !kernel.trim().is_empty() {
            assert_eq!(release.trim(), kernel.trim(), "the guest's kernel");
        }
        let hostname = run(h, "/bin/hostname", &[]).await;
        assert_eq!(
            hostname.trim(),
            id,
            "a clone takes its hostname from the config"
        );
        let before = host_now();
        let guest: f64 = run(h, "/bin/date", &["+%s.%N"])
            .await
            .trim()
            .parse()
            .expect("guest date");
        let after = host_now();
        eprintln!("{id}: guest clock {guest:.3}, host {before:.3}..{after:.3}");
        assert!(
            guest > before - 2.0 && guest < after + 2.0,
            "the clone's wall clock is the host's, not the snapshot's: guest {guest}, host {before}..{after}"
        );
        let bytes = run(
            h,
            "/bin/sh",
            &["-c", "head -c 32 /dev/urandom | od -An -tx1"],
        )
        .await;
        assert!(bytes.split_whitespace().count() == 32, "{bytes:?}");
        random.push(bytes);
    }
    assert_ne!(
        random[0], random[1],
        "clones must not share their CRNG state"
    );

    // Disks are private: a file written in one clone is not in the other.
    let (a, b) = (&sandboxes[0].1, &sandboxes[1].1);
    run(
        a.as_ref(),
        "/bin/sh",
        &["-c", "echo one > /var/tmp/marker && sync"],
    )
    .await;
    let here = run(
        a.as_ref(),
        "/bin/sh",
        &["-c", "cat /var/tmp/marker || echo absent"],
    )
    .await;
    assert_eq!(here.trim(), "one");
    let there = run(
        b.as_ref(),
        "/bin/sh",
        &["-c", "cat /var/tmp/marker 2>/dev/null || echo absent"],
    )
    .await;
    assert_eq!(
        there.trim(),
        "absent",
        "the other clone's disk must not see it"
    );

    // Host memory with two clones alive (PSS splits the shared golden pages between them).
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (id, _) in &sandboxes {
        let pid = qemu_pid(&driver, id);
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        let keep = [
            "Rss:",
            "Pss:",
            "Pss_Anon:",
            "Pss_File:",
            "Pss_Shmem:",
            "Shared_Clean:",
            "Private_Dirty:",
            "Anonymous:",
        ];
        let summary: Vec<String> = text
            .lines()
            .filter(|l| keep.iter().any(|k| l.starts_with(k)))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        eprintln!("{id} idle, 2 clones alive: {}", summary.join(", "));
    }

    // Destroy leaves nothing but the cached snapshot.
    for (id, sb) in &sandboxes {
        let pid = qemu_pid(&driver, id);
        let cg_dirs = driver.cgroups().dirs(id);
        sb.destroy().await.expect("destroy");
        // SAFETY: kill with signal 0 only checks for existence.
        assert_eq!(unsafe { libc::kill(pid, 0) }, -1, "QEMU must be gone");
        assert!(!tmp.path().join("data/sandboxes").join(id).exists());
        for d in &cg_dirs {
            assert!(!d.exists(), "{} must be gone", d.display());
        }
        assert!(sb.dial(49983).await.is_err(), "no dialing after destroy");
    }
    assert_eq!(net_namespaces_we_hold(), 0, "the netns must be released");
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("data/sandboxes"))
        .expect("ls")
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let report = driver.reap_orphans().await.expect("reap");
    assert_eq!(
        (report.processes, report.dirs, report.other),
        (0, 0, 0),
        "{report:?}"
    );
    assert_eq!(
        std::fs::read_dir(&snapshots).expect("ls").count(),
        2,
        "the snapshots stay cached"
    );

    // A leftover half-made snapshot (a server that died while building one) is reaped.
    std::fs::create_dir(snapshots.join(".tmp-dead-1-1")).expect("mkdir");
    std::fs::write(snapshots.join(".tmp-dead-1-1/ram"), b"partial").expect("write");
    let report = driver.reap_orphans().await.expect("reap");
    assert_eq!(report.other, 1, "{report:?}");
    assert!(!snapshots.join(".tmp-dead-1-1").exists());

    // The cached snapshot survives a restart: a new driver on the same data dir restores.
    let mut config = VmConfig::new(
        tmp.path().join("data"),
        env.assets.clone(),
        env.agent.clone(),
    );
    config.snapshots = true;
    let again = VmDriver::new(config).await.expect("driver after restart");
    let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    let sb = again
        .create_vm(spec(&env, &format!("{base}r")), events)
        .await
        .expect("create after restart");
    eprintln!(
        "create after restart -> ready: {:?} ({:?})",
        t.elapsed(),
        sb.boot_path()
    );
    assert_eq!(sb.boot_path(), BootPath::Restored);
    // A VMM crash of a clone is still detected.
    let pid = qemu_pid(&again, &format!("{base}r"));
    // SAFETY: signalling the QEMU process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let exit = tokio::time::timeout(Duration::from_secs(10), sb.wait_exit())
        .await
        .expect("wait_exit resolves after a VMM crash");
    assert!(exit.reason.contains("signal 9"), "{}", exit.reason);
    sb.destroy().await.expect("destroy after crash");
    assert_eq!(net_namespaces_we_hold(), 0);

    // A broken snapshot (garbage device state) is never half-used: the create falls back to a
    // cold boot, the snapshot is dropped, and the next create rebuilds and restores it.
    let key_dir = snapshots.join(&first_key);
    std::fs::write(key_dir.join("state"), b"QEVM garbage").expect("corrupt the state");
    for (n, want) in [("f", BootPath::Cold), ("g", BootPath::Restored)] {
        let id = format!("{base}{n}");
        let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
        let sb = again
            .create_vm(spec(&env, &id), events)
            .await
            .expect("create with a broken snapshot still works");
        assert_eq!(sb.boot_path(), want, "{id}");
        let hostname = run(sb.as_ref(), "/bin/hostname", &[]).await;
        assert_eq!(hostname.trim(), id);
        sb.destroy().await.expect("destroy");
    }
    assert_eq!(std::fs::read_dir(&snapshots).expect("ls").count(), 2);
    assert_eq!(net_namespaces_we_hold(), 0);
}

/// A spec whose commands run as root (they delete template files).
fn root_spec(env: &Env, id: &str) -> SandboxSpec {
    let mut s = spec(env, id);
    s.template.default_user = "root".into();
    s
}

/// Size of a file in bytes (0 if missing).
fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// The backing chain of a qcow2 file, top first (`qemu-img info --backing-chain`).
fn backing_chain(p: &Path) -> Vec<String> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(p)
        .output()
        .expect("qemu-img info");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|i| i["filename"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_snapshots() {
    let _serial = SERIAL.lock().await;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("cella_vm=info")),
        )
        .with_test_writer()
        .try_init();
    let Some(env) = environment() else { return };
    let tmp = tempfile::Builder::new()
        .prefix("cella-vm-test")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .expect("chmod");
    let data = tmp.path().join("data");
    let mut config = VmConfig::new(data.clone(), env.assets.clone(), env.agent.clone());
    config.snapshots = true;
    let driver = VmDriver::new(config).await.expect("driver");
    driver.reap_orphans().await.expect("reap");
    let layers = tmp.path().join("layers");
    std::fs::create_dir(&layers).expect("mkdir");
    let new_layer = |name: &str| {
        let d = layers.join(name);
        std::fs::create_dir(&d).expect("mkdir layer");
        d
    };
    let base = format!("vmfs{}", std::process::id());

    // Source: a golden clone (its disk chain is overlay -> golden disk -> image).
    let (events, _rx_a) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    let a = driver
        .create_vm(root_spec(&env, &format!("{base}a")), events)
        .await
        .expect("create the source");
    let first_create = t.elapsed();
    assert_eq!(a.boot_path(), BootPath::Restored);
    // A normal create once the image and the golden snapshot exist.
    let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    let a2 = driver
        .create_vm(root_spec(&env, &format!("{base}n")), events)
        .await
        .expect("create");
    let restored_create = t.elapsed();
    assert_eq!(a2.boot_path(), BootPath::Restored);
    // What a sandbox that changed nothing snapshots to (the boot's own writes).
    let l0 = new_layer("l0");
    a2.snapshot_filesystem(&l0).await.expect("snapshot");
    eprintln!(
        "snapshot of an unchanged clone: layer {} bytes",
        file_len(&l0.join("disk.qcow2"))
    );
    a2.destroy().await.expect("destroy");
    // 8 MiB on the disk, then deleted: the snapshot trims it away instead of carrying it.
    run(
        a.as_ref(),
        "/bin/sh",
        &[
            "-c",
            "head -c 8388608 /dev/urandom > /var/tmp/garbage && sync && rm /var/tmp/garbage && sync",
        ],
    )
    .await;
    // No sync: the snapshot itself must get the guest's dirty pages onto the disk.
    let out = run(
        a.as_ref(),
        "/bin/sh",
        &[
            "-c",
            "echo snapshot-me > /home/user/kept.txt && mkdir -p /opt/made && \
             head -c 65536 /dev/urandom > /opt/made/blob && md5sum /opt/made/blob && \
             rm /etc/issue.net && echo done",
        ],
    )
    .await;
    assert!(out.trim().ends_with("done"), "{out}");
    let blob_md5 = out.split_whitespace().next().expect("md5").to_string();

    let l1 = new_layer("l1");
    let t = Instant::now();
    a.snapshot_filesystem(&l1).await.expect("snapshot");
    let snap_time = t.elapsed();
    let l1_disk = l1.join("disk.qcow2");
    let l1_size = file_len(&l1_disk);
    eprintln!("snapshot of a small change: {snap_time:?}, layer {l1_size} bytes");
    let l0_size = file_len(&l0.join("disk.qcow2"));
    assert!(
        l1_size < l0_size + (4 << 20),
        "the deleted 8 MiB must not be in the layer: {l1_size} vs {l0_size} unchanged"
    );
    let names: Vec<String> = std::fs::read_dir(&l1)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["disk.qcow2", "layer.json"],
        "nothing half-made left"
    );
    let chain = backing_chain(&l1_disk);
    assert_eq!(
        chain.len(),
        2,
        "layer -> image only, never the golden disk: {chain:?}"
    );
    assert!(chain[1].contains("/images/"), "{chain:?}");

    // The source keeps running and answering; what it writes now is not in the layer.
    let out = run(
        a.as_ref(),
        "/bin/sh",
        &[
            "-c",
            "cat /home/user/kept.txt && echo later > /home/user/later.txt",
        ],
    )
    .await;
    assert_eq!(out.trim(), "snapshot-me");
    assert!(
        !driver
            .cgroups()
            .is_frozen(&format!("{base}a"))
            .expect("state")
    );

    // Into a directory that is not empty: refused, and the directory is left alone.
    let err = a
        .snapshot_filesystem(&l1)
        .await
        .expect_err("non-empty destination");
    assert!(err.to_string().contains("not empty"), "{err}");
    assert_eq!(std::fs::read_dir(&l1).expect("ls").count(), 2);

    // A sandbox on the layer sees exactly the snapshotted files, and boots cold.
    let mut on_l1 = root_spec(&env, &format!("{base}b"));
    on_l1.template.layers = vec![l1.clone()];
    let (events, _rx_b) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    let b = driver
        .create_vm(on_l1.clone(), events)
        .await
        .expect("create from the layer");
    let layered_create = t.elapsed();
    assert_eq!(b.boot_path(), BootPath::Cold);
    let check = "cat /home/user/kept.txt; md5sum /opt/made/blob; \
                 test -e /etc/issue.net && echo issue-present || echo issue-gone; \
                 test -e /home/user/later.txt && echo later-present || echo later-gone; \
                 test -e /etc/issue && echo template-kept; hostname";
    let out = run(b.as_ref(), "/bin/sh", &["-c", check]).await;
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines.len(), 6, "{out}");
    assert_eq!(lines[0], "snapshot-me", "{out}");
    assert!(lines[1].starts_with(&blob_md5), "{out}");
    assert_eq!(
        lines[2], "issue-gone",
        "a deleted template file stays deleted: {out}"
    );
    assert_eq!(lines[3], "later-gone", "written after the snapshot: {out}");
    assert_eq!(lines[4], "template-kept", "{out}");
    assert_eq!(lines[5], format!("{base}b"), "{out}");

    // A nested snapshot of a paused sandbox: it stays paused, and the new layer is again one
    // qcow2 on the image (it does not need l1).
    run(
        b.as_ref(),
        "/bin/sh",
        &[
            "-c",
            "echo second > /home/user/second.txt && rm /home/user/kept.txt",
        ],
    )
    .await;
    b.pause().await.expect("pause");
    let l2 = new_layer("l2");
    let t = Instant::now();
    b.snapshot_filesystem(&l2)
        .await
        .expect("snapshot a paused sandbox");
    let paused_snap_time = t.elapsed();
    assert!(
        driver
            .cgroups()
            .is_frozen(&format!("{base}b"))
            .expect("state"),
        "a paused sandbox stays paused"
    );
    b.resume().await.expect("resume");
    let out = run(b.as_ref(), "/bin/cat", &["/home/user/second.txt"]).await;
    assert_eq!(
        out.trim(),
        "second",
        "the paused sandbox answers after resume"
    );
    let chain = backing_chain(&l2.join("disk.qcow2"));
    assert_eq!(chain.len(), 2, "{chain:?}");
    eprintln!(
        "nested snapshot of a paused sandbox: {paused_snap_time:?}, layer {} bytes",
        file_len(&l2.join("disk.qcow2"))
    );

    // The newest layer is all a create needs: not l1, not the golden snapshot.
    a.destroy().await.expect("destroy");
    b.destroy().await.expect("destroy");
    std::fs::remove_dir_all(&l1).expect("rm l1");
    for e in std::fs::read_dir(data.join("snapshots")).expect("ls") {
        std::fs::remove_dir_all(e.expect("entry").path()).expect("rm golden snapshot");
    }
    let mut on_l2 = root_spec(&env, &format!("{base}c"));
    on_l2.template.layers = vec![l2.clone(), l1.clone()];
    on_l2.limits.disk_mb = 256; // smaller than the snapshotted disk: its size wins
    let (events, _rx_c) = tokio::sync::mpsc::unbounded_channel();
    let c = driver
        .create_vm(on_l2, events)
        .await
        .expect("create from the nested layer");
    let out = run(
        c.as_ref(),
        "/bin/sh",
        &[
            "-c",
            "cat /home/user/second.txt; test -e /home/user/kept.txt && echo kept || echo no-kept; \
             md5sum /opt/made/blob; test -e /etc/issue.net && echo issue || echo no-issue",
        ],
    )
    .await;
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(lines[0], "second");
    assert_eq!(lines[1], "no-kept");
    assert!(lines[2].starts_with(&blob_md5), "{out}");
    assert_eq!(lines[3], "no-issue");
    c.destroy().await.expect("destroy");

    // Bad layers fail with a setup error that names the problem, and leave nothing behind.
    let mut missing = root_spec(&env, &format!("{base}m"));
    missing.template.layers = vec![layers.join("nope")];
    let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
    let err = driver
        .create_vm(missing, events)
        .await
        .expect_err("missing layer");
    assert!(
        matches!(err, cella_core::driver::DriverError::Setup(_)),
        "{err:?}"
    );
    assert!(err.to_string().contains("layer.json"), "{err}");
    let mut other = root_spec(&env, &format!("{base}o"));
    other.template.build_id = "0000000000000000".into();
    other.template.layers = vec![l2.clone()];
    let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
    let err = driver
        .create_vm(other, events)
        .await
        .expect_err("layer of another build");
    assert!(err.to_string().contains("not base build"), "{err}");
    let left: Vec<_> = std::fs::read_dir(data.join("sandboxes"))
        .expect("ls")
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(net_namespaces_we_hold(), 0);

    // For comparison: a normal cold boot of the template (no layer, no golden snapshot).
    let mut config = VmConfig::new(data.clone(), env.assets.clone(), env.agent.clone());
    config.snapshots = false;
    let cold = VmDriver::new(config).await.expect("cold driver");
    let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    let d = cold
        .create_vm(root_spec(&env, &format!("{base}d")), events)
        .await
        .expect("cold create");
    let cold_create = t.elapsed();
    assert_eq!(d.boot_path(), BootPath::Cold);
    // The third chain shape: a cold-booted sandbox's overlay sits right on the image.
    run(
        d.as_ref(),
        "/bin/sh",
        &["-c", "echo from-cold > /root/cold.txt"],
    )
    .await;
    let l3 = new_layer("l3");
    d.snapshot_filesystem(&l3)
        .await
        .expect("snapshot a cold-booted sandbox");
    d.destroy().await.expect("destroy");
    assert_eq!(backing_chain(&l3.join("disk.qcow2")).len(), 2);
    let mut on_l3 = root_spec(&env, &format!("{base}e"));
    on_l3.template.layers = vec![l3.clone()];
    let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
    let e = cold
        .create_vm(on_l3, events)
        .await
        .expect("create from the cold sandbox's layer");
    let out = run(e.as_ref(), "/bin/cat", &["/root/cold.txt"]).await;
    assert_eq!(out.trim(), "from-cold");
    e.destroy().await.expect("destroy");
    eprintln!(
        "accel {:?}: first create (image + golden VM built) {first_create:?}, create restored \
         {restored_create:?}, cold from the template {cold_create:?}, cold from a layer \
         {layered_create:?}",
        driver.accel().accel
    );
    assert_eq!(net_namespaces_we_hold(), 0);
}
