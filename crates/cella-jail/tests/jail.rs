//! Integration tests of the jail driver against the real kernel.
//!
//! They need root, user namespaces, cgroups and `/bin/busybox` (Debian `busybox-static`); each
//! test prints why it skips otherwise. The sandbox root is a busybox tree built per test and
//! owned by the sandbox's root (host uid 100000). The "agent" is a shell script: it answers
//! the control channel (ready, plus a few events and hostile lines), then serves busybox
//! httpd on 49983 with a CGI at `/cgi-bin/run` that runs the POSTed shell script — that is
//! how the tests run commands inside a sandbox through `dial`, the same path the real proxy
//! uses.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cella_core::driver::{
    Driver, EventOrigin, EventSink, Limits, SandboxEvent, SandboxHandle, SandboxSpec, TemplateImage,
};
use cella_jail::{JailConfig, JailDriver};
use cella_proto::control::AgentEvent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const AGENT: &str = r#"#!/bin/sh
read -r cfg <&3
echo "$cfg" > /tmp/agent-config.json
echo 'this is not json' >&3
head -c 20000 /dev/zero | tr '\0' 'a' >&3
echo >&3
echo '{"event":"make_dir","path":"/from-agent"}' >&3
# httpd dies when it cannot fork (pids.max): restart it until /tmp/stop exists.
# Like the real agent, rank children above itself for the OOM killer.
(echo 1000 > /proc/self/oom_score_adj; while [ ! -e /tmp/stop ]; do httpd -f -p 49983 -h /www; usleep 20000; done) 3>&- &
# ready once httpd listens (49983 = 0xC33F)
while ! grep -qs ':C33F [0-9A-F]*:0000 0A' /proc/net/tcp /proc/net/tcp6; do usleep 1000; done
echo '{"event":"ready","version":"test"}' >&3
wait
"#;

const CGI: &str = r#"#!/bin/sh
echo "Content-Type: text/plain"
echo ""
head -c "$CONTENT_LENGTH" > /tmp/.cmd.$$
sh /tmp/.cmd.$$ 2>&1
echo "exit=$?"
rm -f /tmp/.cmd.$$
"#;

struct Env {
    tmp: tempfile::TempDir,
    driver: JailDriver,
    rootfs: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        // Remove this driver instance's (now empty) parent cgroups.
        let inst = cella_jail::instance_name(&self.tmp.path().join("data"));
        for h in self.driver.cgroups().hierarchies() {
            let _ = std::fs::remove_dir(h.join("cella").join(&inst));
        }
    }
}

fn skip(reason: &str) -> Option<Env> {
    eprintln!("skipping: {reason}");
    None
}

fn lchown_tree(p: &Path) {
    std::os::unix::fs::lchown(p, Some(100_000), Some(100_000)).expect("lchown");
    let meta = std::fs::symlink_metadata(p).expect("meta");
    if meta.is_dir() {
        for e in std::fs::read_dir(p).expect("readdir") {
            lchown_tree(&e.expect("entry").path());
        }
    }
}

fn write_exec(p: &Path, content: &str) {
    std::fs::write(p, content).expect("write");
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn build_rootfs(root: &Path) {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("copy busybox");
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    assert!(list.status.success());
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("symlink");
        }
    }
    for d in ["etc", "www/cgi-bin", "mnt", "opt/old"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::write(root.join("etc/motd"), "template file\n").expect("write");
    std::fs::write(root.join("opt/old/keep"), "template file\n").expect("write");
    write_exec(&root.join("www/cgi-bin/run"), CGI);
    lchown_tree(root);
}

/// A driver with its own data dir and rootfs, or `None` (with the reason printed).
fn env_with_agent(agent: &str) -> Option<Env> {
    env_with(agent, 0)
}

/// Like [`env_with_agent`], with `disk_pool` spare disks per size.
fn env_with(agent: &str, disk_pool: usize) -> Option<Env> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root (user namespaces with a 100000+ id map, cgroups)");
    }
    if !Path::new("/bin/busybox").is_file() {
        return skip("needs /bin/busybox (apt-get install busybox-static)");
    }
    if let Err(e) = cella_jail::probe_user_namespaces(Path::new("/proc")) {
        return skip(&format!("{e}"));
    }
    if let Err(e) = cella_jail::cgroup::Cgroups::detect(Path::new("/sys/fs/cgroup"), "probe") {
        return skip(&format!("{e}"));
    }
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let rootfs = tmp.path().join("rootfs");
    build_rootfs(&rootfs);
    let agent_path = tmp.path().join("agent");
    write_exec(&agent_path, agent);
    let driver = JailDriver::new(JailConfig {
        data_dir: tmp.path().join("data"),
        agent_path,
        cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        disk_pool,
    })
    .expect("driver");
    Some(Env {
        tmp,
        driver,
        rootfs,
    })
}

fn env() -> Option<Env> {
    env_with_agent(AGENT)
}

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn unique_id(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("{prefix}{}x{n}", std::process::id())
}

fn spec(env: &Env, id: &str, limits: Limits) -> SandboxSpec {
    SandboxSpec {
        id: id.to_string(),
        template: TemplateImage {
            name: "base".into(),
            build_id: "test".into(),
            rootfs: env.rootfs.clone(),
            default_user: "root".into(),
            env: Default::default(),
            start_cmd: None,
            layers: Vec::new(),
        },
        limits,
        env_vars: [("HELLO".to_string(), "world".to_string())].into(),
        access_token: "tok".into(),
    }
}

fn small_limits() -> Limits {
    Limits {
        cpu_count: 1,
        memory_mb: 128,
        disk_mb: 16,
        max_pids: 64,
    }
}

/// Run a shell script inside the sandbox through the CGI; returns (output, exit status).
async fn run(sb: &Arc<dyn SandboxHandle>, script: &str) -> (String, i32) {
    let mut s = sb
        .dial(49983)
        .await
        .unwrap_or_else(|e| panic!("dial for {script:?}: {e}"));
    let req = format!(
        "POST /cgi-bin/run HTTP/1.0\r\nContent-Length: {}\r\n\r\n{script}",
        script.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut resp))
        .await
        .expect("response in time")
        .expect("read");
    let resp = String::from_utf8_lossy(&resp).to_string();
    // HTTP header, then the CGI's own header block (LF line ends), then the output
    let body = resp
        .split_once("\r\n")
        .and_then(|(_, rest)| rest.split_once("\n\n"))
        .map(|(_, b)| b.to_string())
        .unwrap_or_else(|| panic!("no HTTP body in {resp:?}"));
    let (out, status) = body
        .trim_end()
        .rsplit_once("exit=")
        .unwrap_or_else(|| panic!("no exit status in {body:?}"));
    (out.to_string(), status.trim().parse().expect("status"))
}

async fn create(
    env: &Env,
    id: &str,
    limits: Limits,
) -> (
    Arc<dyn SandboxHandle>,
    mpsc::UnboundedReceiver<SandboxEvent>,
) {
    let (tx, rx): (EventSink, _) = mpsc::unbounded_channel();
    let t = Instant::now();
    let sb = env
        .driver
        .create(spec(env, id, limits), tx)
        .await
        .expect("create");
    eprintln!("sandbox {id} ready in {:?}", t.elapsed());
    (sb, rx)
}

fn mountinfo() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo")
}

fn netns_of(pid: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|p| p.to_string_lossy().to_string())
}

fn all_netns() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok())
            && let Some(ns) = netns_of(pid)
        {
            out.insert(ns);
        }
    }
    out
}

/// What of sandbox `id` is visible on the host.
struct Traces {
    cgroup_dirs: Vec<PathBuf>,
    pids: BTreeSet<i32>,
    netns: BTreeSet<String>,
}

fn traces(env: &Env, id: &str) -> Traces {
    let cg = env.driver.cgroups();
    let pids = cg.procs(id).expect("procs");
    let netns = pids.iter().filter_map(|p| netns_of(*p)).collect();
    Traces {
        cgroup_dirs: cg.dirs(id).into_iter().filter(|d| d.exists()).collect(),
        pids,
        netns,
    }
}

async fn assert_gone(env: &Env, id: &str, alive: &Traces) {
    let cg = env.driver.cgroups();
    for d in cg.dirs(id) {
        assert!(!d.exists(), "cgroup {} left behind", d.display());
    }
    let data: Vec<_> = std::fs::read_dir(env.tmp.path().join("data"))
        .expect("data dir")
        .collect();
    assert!(data.is_empty(), "data dir not empty: {data:?}");
    let tmp = env.tmp.path().to_string_lossy().to_string();
    assert!(
        !mountinfo().contains(&tmp),
        "host mount table mentions {tmp}"
    );
    let loops = cella_jail::disk::loops_under(Path::new("/sys"), env.tmp.path()).expect("loops");
    assert!(loops.is_empty(), "loop devices still bound: {loops:?}");
    let now = all_netns();
    for ns in &alive.netns {
        assert!(!now.contains(ns), "netns {ns} still held by a process");
    }
    for pid in &alive.pids {
        let ns = netns_of(*pid);
        assert!(
            ns.is_none() || !alive.netns.contains(&ns.unwrap_or_default()),
            "process {pid} of the sandbox still runs"
        );
    }
}

/// OOM kills in the sandbox's memory cgroup (v1 `memory.oom_control`, v2 `memory.events`).
fn oom_kills(env: &Env, id: &str) -> u64 {
    for d in env.driver.cgroups().dirs(id) {
        for f in ["memory.oom_control", "memory.events"] {
            if let Ok(text) = std::fs::read_to_string(d.join(f))
                && let Some(n) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse().ok())
            {
                return n;
            }
        }
    }
    panic!("no OOM kill counter for {id}");
}

fn cap_bit(status: &str, field: &str, bit: u32) -> bool {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("{field} missing in {status}"));
    let v = u64::from_str_radix(&hex, 16).expect("hex");
    v & (1 << bit) != 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_isolation_and_teardown() {
    let Some(env) = env() else { return };
    let id = unique_id("life");
    let (sb, mut events) = create(&env, &id, small_limits()).await;

    // Events: the malformed and oversized lines were dropped, the rest arrived in order. (The
    // host's process audit reports the fake agent's own execs in between: skip those here.)
    let mut from_agent = Vec::new();
    while from_agent.len() < 2 {
        let ev = events.recv().await.expect("event");
        if ev.origin == EventOrigin::Agent {
            from_agent.push(ev);
        }
    }
    let mut from_agent = from_agent.into_iter();
    let first = from_agent.next().expect("event");
    assert_eq!(first.sandbox_id, id);
    assert_eq!(
        first.event,
        AgentEvent::MakeDir {
            path: "/from-agent".into()
        }
    );
    let second = from_agent.next().expect("event");
    assert_eq!(
        second.event,
        AgentEvent::Ready {
            version: "test".into()
        }
    );

    // The agent got its config line.
    let (cfg, code) = run(&sb, "cat /tmp/agent-config.json").await;
    assert_eq!(code, 0);
    let cfg: serde_json::Value = serde_json::from_str(cfg.trim()).expect("config json");
    assert_eq!(cfg["sandbox_id"], id.as_str());
    assert_eq!(cfg["access_token"], "tok");
    assert_eq!(cfg["env_vars"]["HELLO"], "world");
    assert_eq!(cfg["port"], 49983);

    // Identity inside.
    let (out, _) = run(
        &sb,
        "hostname; id -u; echo $$; cat /proc/1/cmdline | tr '\\0' ' '",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], id, "hostname");
    assert_eq!(lines[1], "0", "uid inside");
    assert_ne!(lines[2], "1");
    assert!(
        lines[3].contains("/.cella/agent"),
        "pid 1 is {:?}",
        lines[3]
    );

    // Only lo, and it is up.
    let (out, _) = run(&sb, "cat /proc/net/dev").await;
    let ifaces: Vec<&str> = out
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, vec!["lo"]);

    // Host uid of root inside is 100000.
    let (out, _) = run(&sb, "cat /proc/self/uid_map").await;
    let map: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(map, vec!["0", "100000", "65536"]);

    // Hardening: no_new_privs, seccomp, bounding set.
    let (status, _) = run(&sb, "cat /proc/self/status").await;
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(
        !cap_bit(&status, "CapBnd:", 21),
        "CAP_SYS_ADMIN in bounding set"
    );
    assert!(
        !cap_bit(&status, "CapBnd:", 12),
        "CAP_NET_ADMIN in bounding set"
    );
    assert!(cap_bit(&status, "CapBnd:", 19), "CAP_SYS_PTRACE kept");
    assert!(cap_bit(&status, "CapEff:", 0), "CAP_CHOWN as root inside");

    // mount and a new user namespace are refused.
    let (out, code) = run(&sb, "mount -t tmpfs none /mnt").await;
    assert_ne!(code, 0, "mount succeeded: {out}");
    let (out, code) = run(&sb, "unshare -U true").await;
    assert_ne!(code, 0, "unshare -U succeeded: {out}");
    assert!(out.contains("Operation not permitted"), "{out}");

    // The root is writable (overlay), the template is not modified.
    let (out, code) = run(
        &sb,
        "echo changed > /etc/motd && cat /etc/motd && touch /newfile && rm -rf /www/cgi-bin/../x && mkdir /etc/sub && ls -ld /tmp",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("changed"), "{out}");
    assert!(out.contains("drwxrwxrwt"), "{out}");
    assert_eq!(
        std::fs::read_to_string(env.rootfs.join("etc/motd")).expect("motd"),
        "template file\n"
    );
    assert!(!env.rootfs.join("newfile").exists());

    // Devices and proc.
    let (out, code) = run(
        &sb,
        "echo x > /dev/null && head -c 4 /dev/urandom | wc -c && ls /dev/pts && readlink /dev/ptmx && ls /proc/1/ >/dev/null && echo ok",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("pts/ptmx") && out.contains("ok"), "{out}");

    // The agent binary is read-only.
    let (out, code) = run(&sb, "echo x >> /.cella/agent").await;
    assert_ne!(code, 0, "agent writable: {out}");

    // Nothing of the sandbox is mounted on the host.
    let tmp = env.tmp.path().to_string_lossy().to_string();
    assert!(
        !mountinfo().contains(&tmp),
        "sandbox mounts visible on host"
    );

    // The writable layer is a loop-mounted disk while the sandbox lives, but only in the
    // sandbox's mount namespace.
    let loops = cella_jail::disk::loops_under(Path::new("/sys"), env.tmp.path()).expect("loops");
    assert_eq!(loops.len(), 1, "{loops:?}");
    let backing = &loops[0].backing;
    assert!(
        backing.starts_with(env.tmp.path().join("data")),
        "{backing:?}"
    );
    // all sandboxes can read backing paths in sysfs: they must not name sandboxes
    assert!(!backing.to_string_lossy().contains(&id), "{backing:?}");
    assert!(!backing.exists(), "image {backing:?} still named");
    let (out, code) = run(&sb, "grep ' / ' /proc/self/mountinfo; cat /proc/mounts").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("overlay"), "{out}");

    // Stats come from the cgroup.
    let st = sb.stats().expect("stats");
    assert!(st.pids >= 2, "{st:?}");
    assert!(st.memory_bytes > 0, "{st:?}");

    // wait_exit does not resolve while it runs.
    if let Ok(info) = tokio::time::timeout(Duration::from_millis(100), sb.wait_exit()).await {
        panic!("sandbox stopped on its own: {}", info.reason);
    }

    let alive = traces(&env, &id);
    assert!(!alive.cgroup_dirs.is_empty());
    assert!(!alive.pids.is_empty());
    assert_eq!(alive.netns.len(), 1, "one netns for the whole sandbox");
    let host_ns = netns_of(std::process::id() as i32).expect("own netns");
    assert!(!alive.netns.contains(&host_ns));

    sb.destroy().await.expect("destroy");
    assert_gone(&env, &id, &alive).await;
    // idempotent, and concurrent calls are fine
    let (a, b) = tokio::join!(sb.destroy(), sb.destroy());
    a.expect("destroy again");
    b.expect("destroy again");
    assert!(sb.dial(49983).await.is_err(), "dial after destroy");
    // After destroy, wait_exit resolves (watchers are released).
    assert!(
        tokio::time::timeout(Duration::from_secs(5), sb.wait_exit())
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_exec_inside_is_audited_by_the_host() {
    let Some(env) = env() else { return };
    if procwatch_unavailable() {
        eprintln!("SKIP: the kernel's process events connector is not available here");
        return;
    }
    let id = unique_id("exec");
    let (sb, mut events) = create(&env, &id, small_limits()).await;
    // A program the sandbox runs by itself (a grandchild of the agent's shell), not through
    // the API, with a marker argument; it lives a moment so its command line can be read.
    let (_, code) = run(&sb, "sh -c 'sleep 1; true' exec-audit-marker-1; echo done").await;
    assert_eq!(code, 0);
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ev) = events.recv().await {
            seen.push(format!("{:?} {:?}", ev.origin, ev.event));
            if let AgentEvent::ProcessExec { argv, pid, .. } = &ev.event
                && argv.iter().any(|a| a.contains("exec-audit-marker-1"))
            {
                return Some((ev.origin, ev.sandbox_id.clone(), *pid));
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    let (origin, sid, pid) = found.unwrap_or_else(|| {
        panic!("the exec of the marker command was not audited; events: {seen:#?}")
    });
    assert_eq!(origin, EventOrigin::Host);
    assert_eq!(sid, id);
    // The PID is the sandbox's view (its own pid namespace), not the host's.
    assert!(pid > 1 && pid < 10_000, "pid {pid}");
    sb.destroy().await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread")]
async fn files_written_inside_are_audited_by_the_host() {
    let Some(env) = env() else { return };
    let id = unique_id("fsaud");
    let (sb, mut events) = create(&env, &id, small_limits()).await;
    // Written, renamed and removed by sandbox code itself; one template file modified
    // (copy-up) and one template file removed (a whiteout).
    let (_, code) = run(
        &sb,
        "echo a > /mnt/fs-audit-1; mv /mnt/fs-audit-1 /mnt/fs-audit-2; rm /mnt/fs-audit-2; \
         echo more >> /etc/motd; rm /www/cgi-bin/../../etc/motd; echo done",
    )
    .await;
    assert_eq!(code, 0);
    let mut seen = Vec::new();
    let want = |seen: &[AgentEvent]| {
        let has = |e: &AgentEvent| seen.contains(e);
        has(&AgentEvent::FsWrite {
            path: "/mnt/fs-audit-1".into(),
            pid: None,
        }) && has(&AgentEvent::FsRename {
            from: "/mnt/fs-audit-1".into(),
            to: "/mnt/fs-audit-2".into(),
            pid: None,
        }) && has(&AgentEvent::FsRemove {
            path: "/mnt/fs-audit-2".into(),
            pid: None,
        }) && has(&AgentEvent::FsWrite {
            path: "/etc/motd".into(),
            pid: None,
        }) && has(&AgentEvent::FsRemove {
            path: "/etc/motd".into(),
            pid: None,
        })
    };
    let ok = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ev) = events.recv().await {
            if ev.origin != EventOrigin::Host {
                continue;
            }
            // Compare without the writer's PID (asserted below to be the sandbox's view).
            let (plain, pid) = match ev.event {
                AgentEvent::FsWrite { path, pid } => (AgentEvent::FsWrite { path, pid: None }, pid),
                AgentEvent::FsRemove { path, pid } => {
                    (AgentEvent::FsRemove { path, pid: None }, pid)
                }
                AgentEvent::FsRename { from, to, pid } => (
                    AgentEvent::FsRename {
                        from,
                        to,
                        pid: None,
                    },
                    pid,
                ),
                _ => continue,
            };
            if let Some(pid) = pid {
                assert!(
                    (1..10_000).contains(&pid),
                    "pid {pid} is not the sandbox's view"
                );
            }
            seen.push(plain);
            if want(&seen) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(ok, "missing file audit records; got {seen:#?}");
    // Nothing of the overlay's internals (work dir, whiteout devices) leaks into the records.
    assert!(
        seen.iter().all(|e| !format!("{e:?}").contains("work")),
        "{seen:#?}"
    );
    sb.destroy().await.expect("destroy");
}

fn procwatch_unavailable() -> bool {
    // SAFETY: a plain socket(2) probe, closed at once.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM, 11) };
    if fd < 0 {
        return true;
    }
    // SAFETY: fd was just opened.
    unsafe { libc::close(fd) };
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_quota_gives_enospc() {
    let Some(env) = env() else { return };
    let id = unique_id("disk");
    let limits = Limits {
        disk_mb: 8,
        memory_mb: 256,
        ..small_limits()
    };
    let (sb, _ev) = create(&env, &id, limits).await;
    let (out, code) = run(&sb, "dd if=/dev/zero of=/big bs=1M count=32").await;
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("No space left on device"), "{out}");
    // the sandbox still works
    let (out, code) = run(&sb, "rm /big && echo fine").await;
    assert_eq!((out.trim(), code), ("fine", 0));
    sb.destroy().await.expect("destroy");
}

/// The reported failure: with the writable layer on tmpfs, filling a disk larger than the
/// memory limit woke the memory cgroup's OOM killer, which killed the agent. On the ext4
/// disk the page cache is reclaimable: the write ends in ENOSPC at the quota and everything
/// keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_larger_than_memory_fills_with_enospc() {
    let Some(env) = env() else { return };
    let id = unique_id("full");
    let limits = Limits {
        memory_mb: 128,
        disk_mb: 256,
        ..small_limits()
    };
    let (sb, _ev) = create(&env, &id, limits).await;
    // The root reports the disk's size (overlay passes on the upper layer's statfs).
    let (out, code) = run(&sb, "df -k / | tail -n 1").await;
    assert_eq!(code, 0, "{out}");
    let total_kb: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no size in {out}"));
    assert!(
        total_kb > 230 << 10 && total_kb <= 256 << 10,
        "root is {total_kb} KiB"
    );
    let (out, code) = run(
        &sb,
        "mkdir -p /home/user && dd if=/dev/zero of=/home/user/big bs=1M count=5000; echo dd=$?; ls -l /home/user/big",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("No space left on device"), "{out}");
    assert!(!out.contains("dd=0"), "{out}");
    // ls -l: "-rw-r--r-- 1 root root <size> ..."
    let size: u64 = out
        .lines()
        .find(|l| l.starts_with("-rw") && l.ends_with("/home/user/big"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no size in {out}"));
    assert!(
        size > 200 << 20 && size <= 256 << 20,
        "{size} bytes written before ENOSPC"
    );
    assert_eq!(
        oom_kills(&env, &id),
        0,
        "the memory cgroup OOM-killed something"
    );
    // pid 1 and the server inside it are alive, and the disk is usable again after a delete
    assert!(
        tokio::time::timeout(Duration::from_millis(100), sb.wait_exit())
            .await
            .is_err(),
        "sandbox died"
    );
    let (out, code) = run(
        &sb,
        "rm /home/user/big && echo again > /home/user/small && cat /home/user/small && cat /proc/1/cmdline",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("again"), "{out}");
    assert!(out.contains("/.cella/agent"), "{out}");
    let alive = traces(&env, &id);
    sb.destroy().await.expect("destroy");
    assert_gone(&env, &id, &alive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hog_is_oom_killed_inside_only() {
    let Some(env) = env() else { return };
    let id = unique_id("oom");
    let limits = Limits {
        memory_mb: 48,
        ..small_limits()
    };
    let (sb, _ev) = create(&env, &id, limits).await;
    // What the agent starts ranks above it for the OOM killer.
    let (out, code) = run(
        &sb,
        "cat /proc/1/oom_score_adj; cat /proc/self/oom_score_adj",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["0", "1000"]);
    let (out, code) = run(&sb, "dd if=/dev/zero of=/dev/null bs=200M count=1").await;
    assert_eq!(code, 137, "hog not killed by SIGKILL: {out}");
    assert!(oom_kills(&env, &id) >= 1);
    // the sandbox (agent, httpd) survived
    let (out, code) = run(&sb, "echo alive").await;
    assert_eq!((out.trim(), code), ("alive", 0));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), sb.wait_exit())
            .await
            .is_err(),
        "sandbox died"
    );
    sb.destroy().await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_hits_pids_max() {
    let Some(env) = env() else { return };
    let id = unique_id("pids");
    let limits = Limits {
        max_pids: 16,
        ..small_limits()
    };
    let (sb, _ev) = create(&env, &id, limits).await;
    let (out, _) = run(
        &sb,
        "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do sleep 2 >/dev/null 2>&1 & done",
    )
    .await;
    assert!(out.contains("can't fork"), "{out}");
    let pids = sb.stats().expect("stats").pids;
    assert!(pids <= 16, "{pids} tasks");
    // once the sleepers are gone the sandbox works again
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut tries = 0;
    while sb.dial(49983).await.is_err() && tries < 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        tries += 1;
    }
    let (out, code) = run(&sb, "echo alive").await;
    assert_eq!((out.trim(), code), ("alive", 0));
    sb.destroy().await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_cannot_see_each_other() {
    let Some(env) = env() else { return };
    let a_id = unique_id("isoa");
    let b_id = unique_id("isob");
    let (a, _ea) = create(&env, &a_id, small_limits()).await;
    let (b, _eb) = create(&env, &b_id, small_limits()).await;
    let (_, code) = run(
        &a,
        "echo secret > /tmp/secret-a; (sleep 12345 >/dev/null 2>&1 &) ; echo started",
    )
    .await;
    assert_eq!(code, 0);
    let (out, _) = run(
        &b,
        "ls /tmp; cat /proc/[0-9]*/cmdline | tr '\\0' ' '; hostname",
    )
    .await;
    assert!(!out.contains("secret-a"), "{out}");
    assert!(!out.contains("12345"), "{out}");
    assert!(out.contains(&b_id));
    let (out, _) = run(&a, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").await;
    assert!(out.contains("12345"), "{out}");
    // A's files are not on the host either
    let (out, _) = run(&a, "ls /").await;
    assert!(!out.contains("rootfs") && !out.contains("data"), "{out}");
    let (ta, tb) = (traces(&env, &a_id), traces(&env, &b_id));
    assert!(ta.netns.is_disjoint(&tb.netns));
    a.destroy().await.expect("destroy a");
    // B is unaffected by A's teardown
    let (out, _) = run(&b, "echo still").await;
    assert_eq!(out.trim(), "still");
    b.destroy().await.expect("destroy b");
    assert_gone(&env, &a_id, &ta).await;
    assert_gone(&env, &b_id, &tb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sudo_shim_replaces_only_an_existing_sudo() {
    let Some(env) = env() else { return };
    // A template without sudo stays without it.
    let id = unique_id("nosudo");
    let (sb, _ev) = create(&env, &id, small_limits()).await;
    let (out, code) = run(&sb, "test -e /usr/bin/sudo && echo present || echo absent").await;
    assert_eq!((out.trim(), code), ("absent", 0));
    sb.destroy().await.expect("destroy");
    // With one, the sandbox sees the agent there, read-only; the template keeps its file.
    std::fs::create_dir_all(env.rootfs.join("usr/bin")).expect("mkdir");
    write_exec(
        &env.rootfs.join("usr/bin/sudo"),
        "#!/bin/sh\necho real sudo\n",
    );
    lchown_tree(&env.rootfs);
    let id = unique_id("sudo");
    let (sb, _ev) = create(&env, &id, small_limits()).await;
    let (out, code) = run(
        &sb,
        "cmp /usr/bin/sudo /.cella/agent && echo same; (echo x > /usr/bin/sudo) 2>/dev/null || echo refused; \
         rm -f /usr/bin/sudo 2>/dev/null || echo busy; grep -c ' /usr/bin/sudo ro,' /proc/self/mountinfo",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["same", "refused", "busy", "1"], "{out}");
    assert_eq!(
        std::fs::read_to_string(env.rootfs.join("usr/bin/sudo")).expect("template sudo"),
        "#!/bin/sh\necho real sudo\n"
    );
    sb.destroy().await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_agent_fails_cleanly() {
    let Some(env) = env_with_agent("#!/bin/sh\necho dying >&2\nexit 3\n") else {
        return;
    };
    let id = unique_id("dead");
    let (tx, _rx) = mpsc::unbounded_channel();
    let err = match env.driver.create(spec(&env, &id, small_limits()), tx).await {
        Ok(_) => panic!("create succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("status 3"), "{err}");
    for d in env.driver.cgroups().dirs(&id) {
        assert!(!d.exists(), "cgroup {} left behind", d.display());
    }
    assert!(!env.tmp.path().join("data").join(&id).exists());

    // The instance parent cgroup is recreated when someone removed it.
    for h in env.driver.cgroups().hierarchies() {
        let inst = cella_jail::instance_name(&env.tmp.path().join("data"));
        std::fs::remove_dir(h.join("cella").join(inst)).expect("rmdir empty parent");
    }

    // A rootfs without /bin/sh: the agent's interpreter is missing, exec fails in setup.
    std::fs::remove_file(env.rootfs.join("bin/sh")).expect("rm sh");
    let (tx, _rx) = mpsc::unbounded_channel();
    let id = unique_id("nosh");
    let err = match env.driver.create(spec(&env, &id, small_limits()), tx).await {
        Ok(_) => panic!("create succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("execve of the agent"), "{err}");
    for d in env.driver.cgroups().dirs(&id) {
        assert!(!d.exists(), "cgroup {} left behind", d.display());
    }
    assert!(!env.tmp.path().join("data").join(&id).exists());

    // Invalid ids never reach the kernel.
    let (tx, _rx) = mpsc::unbounded_channel();
    assert!(
        env.driver
            .create(spec(&env, "../etc", small_limits()), tx)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_exit_resolves_wait_exit() {
    let Some(env) = env() else { return };
    let id = unique_id("exit");
    let (sb, _ev) = create(&env, &id, small_limits()).await;
    // Stop httpd for good from inside: the fake agent's `wait` returns and pid 1 exits on
    // its own.
    // (Signals to pid 1 from inside its pid namespace are ignored without a handler.)
    let (out, _) = run(&sb, "kill -9 1; echo still-here").await;
    assert!(out.contains("still-here"), "{out}");
    let mut s = sb.dial(49983).await.expect("dial");
    let script = "touch /tmp/stop; killall httpd";
    let req = format!(
        "POST /cgi-bin/run HTTP/1.0\r\nContent-Length: {}\r\n\r\n{script}",
        script.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let info = tokio::time::timeout(Duration::from_secs(10), sb.wait_exit())
        .await
        .expect("wait_exit resolves");
    assert_eq!(info.reason, "agent exited with status 0");
    let alive = Traces {
        cgroup_dirs: vec![],
        pids: BTreeSet::new(),
        netns: BTreeSet::new(),
    };
    sb.destroy().await.expect("destroy after exit");
    assert_gone(&env, &id, &alive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reap_orphans_after_a_crash() {
    let Some(env) = env() else { return };
    // Another driver instance (other data dir) with a live sandbox: the reaper must spare it.
    let Some(other) = env_with_agent(AGENT) else {
        return;
    };
    let other_id = unique_id("keep");
    let (keep, _ek) = create(&other, &other_id, small_limits()).await;
    let id = unique_id("orph");
    let (sb, _ev) = create(&env, &id, small_limits()).await;
    let (_, code) = run(&sb, "(sleep 1000 >/dev/null 2>&1 &); echo ok").await;
    assert_eq!(code, 0);
    let alive = traces(&env, &id);
    assert!(alive.pids.len() >= 3, "{:?}", alive.pids);
    // Simulate a server crash: the handle and the driver are forgotten, nothing is torn down.
    std::mem::forget(sb);
    let config = env.driver.config().clone();
    let driver2 = JailDriver::new(config).expect("driver after restart");
    let report = driver2.reap_orphans().await.expect("reap");
    assert!(report.processes >= 3, "{report:?}");
    assert_eq!(
        report.cgroups,
        env.driver.cgroups().hierarchies().len(),
        "{report:?}"
    );
    assert_eq!(report.dirs, 1, "{report:?}");
    // the killed init is reaped by the (leaked) waiter of the first driver
    let deadline = Instant::now() + Duration::from_secs(5);
    while all_netns().intersection(&alive.netns).next().is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_gone(&env, &id, &alive).await;
    // a second run finds nothing
    let again = driver2.reap_orphans().await.expect("reap again");
    assert_eq!(again, Default::default());
    // the other instance's sandbox was not touched
    let (out, code) = run(&keep, "echo spared").await;
    assert_eq!((out.trim(), code), ("spared", 0));
    keep.destroy().await.expect("destroy");
}

/// Prints create→ready timings (median and worst of a few sequential starts); asserts only
/// that every sandbox starts and is torn down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_to_ready_timings() {
    let Some(env) = env() else { return };
    let limits = Limits {
        disk_mb: 1024,
        memory_mb: 512,
        ..small_limits()
    };
    let mut times = Vec::new();
    for _ in 0..10 {
        let id = unique_id("time");
        let (tx, _rx): (EventSink, _) = mpsc::unbounded_channel();
        let t = Instant::now();
        let sb = env
            .driver
            .create(spec(&env, &id, limits), tx)
            .await
            .expect("create");
        times.push(t.elapsed());
        sb.destroy().await.expect("destroy");
    }
    times.sort();
    eprintln!(
        "create→ready over {} starts (disk 1024 MiB): median {:?}, max {:?}",
        times.len(),
        times[times.len() / 2],
        times[times.len() - 1]
    );
}

/// The disk on its own: the image is unlinked as soon as the loop device holds it, and
/// dropping the detached mount releases the loop device.
#[test]
fn disk_leaves_nothing_behind() {
    let Some(env) = env() else { return };
    let dir = env.tmp.path().join("data");
    let mkfs = cella_jail::disk::find_mkfs(std::env::var_os("PATH").as_deref()).expect("mkfs");
    let image = dir.join("solo.img");
    let disk =
        cella_jail::disk::prepare(&mkfs, Path::new("/dev"), &image, 64, 100_000).expect("prepare");
    assert!(!image.exists(), "image still named");
    let bound = cella_jail::disk::loops_under(Path::new("/sys"), &dir).expect("loops");
    assert_eq!(bound, vec![disk.loop_ref.clone()]);
    // detached: in no mount table
    let source = format!(" /dev/loop{} ", disk.loop_ref.index);
    assert!(!mountinfo().contains(&source), "{source} is mounted");
    drop(disk.mount);
    assert!(cella_jail::disk::wait_released(
        Path::new("/sys"),
        &disk.loop_ref,
        Duration::from_secs(5)
    ));
    // A failure leaves nothing either: an existing image name is refused before mkfs.
    std::fs::write(&image, b"x").expect("write");
    let err = cella_jail::disk::prepare(&mkfs, Path::new("/dev"), &image, 64, 100_000)
        .expect_err("exists");
    assert!(err.to_string().contains("creating"), "{err}");
    assert!(image.exists(), "someone else's file was removed");
    std::fs::remove_file(&image).expect("rm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_pool_serves_fresh_disks_and_releases_them_with_the_driver() {
    let Some(env) = env_with(AGENT, 2) else {
        return;
    };
    let limits = Limits {
        disk_mb: 64,
        ..Limits::default()
    };
    let bound = || {
        cella_jail::disk::loops_under(Path::new("/sys"), env.tmp.path())
            .expect("loops")
            .len()
    };
    // The first create formats its own disk and fills the pool in the background.
    let id = unique_id("pool");
    let (sb, _rx) = create(&env, &id, limits).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while bound() < 3 {
        assert!(
            Instant::now() < deadline,
            "pool not filled: {} bound",
            bound()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A pooled disk is empty and private to the sandbox that gets it.
    let (out, code) = run(&sb, "echo secret > /mnt/../secret.txt; echo ok").await;
    assert_eq!((out.trim(), code), ("ok", 0));
    let id2 = unique_id("pool");
    let (sb2, _rx2) = create(&env, &id2, limits).await;
    let (out, code) = run(&sb2, "ls /secret.txt 2>&1; echo done").await;
    assert_eq!(code, 0);
    assert!(
        out.contains("No such file"),
        "a pooled disk carried data: {out}"
    );
    sb.destroy().await.expect("destroy");
    sb2.destroy().await.expect("destroy");
    // Dropping the driver releases the spare disks: nothing stays bound to the data dir.
    let dir = env.tmp.path().to_path_buf();
    drop(env);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = cella_jail::disk::loops_under(Path::new("/sys"), &dir).expect("loops");
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spare disks not released: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Egress hooks: the netns path names the sandbox's netns, and the resolver file is written
/// inside the sandbox as its root, replacing a symlink instead of following it, and refusing
/// to write through a symlinked `/etc`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nameserver_and_netns_for_egress() {
    let Some(env) = env() else { return };
    assert!(env.driver.supports_egress());
    let id = unique_id("dns");
    let (sb, _ev) = create(&env, &id, small_limits()).await;
    let t = traces(&env, &id);
    let path = sb.netns_path().expect("netns path");
    let ns = std::fs::read_link(&path).expect("readlink netns path");
    assert!(
        t.netns.contains(&ns.to_string_lossy().to_string()),
        "{ns:?} vs {:?}",
        t.netns
    );

    // A host file the sandbox points a symlink at: it must stay untouched.
    let host_dir = tempfile::tempdir().expect("tmp");
    let host_file = host_dir.path().join("victim");
    std::fs::write(&host_file, "host data\n").expect("write");
    let (_, code) = run(
        &sb,
        &format!("ln -sf {} /etc/resolv.conf; echo ok", host_file.display()),
    )
    .await;
    assert_eq!(code, 0);
    sb.set_nameserver(std::net::Ipv4Addr::new(10, 245, 0, 1))
        .await
        .expect("set nameserver");
    assert_eq!(
        std::fs::read_to_string(&host_file).expect("read"),
        "host data\n"
    );
    let (out, _) = run(&sb, "cat /etc/resolv.conf; stat -c 'uid=%u mode=%a' /etc/resolv.conf; [ -L /etc/resolv.conf ] && echo LINK").await;
    assert!(out.contains("nameserver 10.245.0.1"), "{out}");
    assert!(out.contains("uid=0 mode=644"), "{out}");
    assert!(!out.contains("LINK"), "{out}");

    // /etc itself replaced by a symlink to the host path's directory: refused.
    let (_, code) = run(
        &sb,
        &format!(
            "rm -rf /etc && ln -s {} /etc; echo ok",
            host_dir.path().display()
        ),
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        sb.set_nameserver(std::net::Ipv4Addr::new(10, 245, 0, 1))
            .await
            .is_err()
    );
    assert!(!host_dir.path().join("resolv.conf").exists());
    sb.destroy().await.expect("destroy");
    assert_gone(&env, &id, &t).await;
}

/// Read a file inside the sandbox from the host, through `/proc/<pid>/root` of one of its
/// processes (works while the sandbox is frozen, unlike a command inside it).
fn read_inside(env: &Env, id: &str, path: &str) -> Option<String> {
    let pids = env.driver.cgroups().procs(id).ok()?;
    pids.iter().find_map(|p| {
        std::fs::read_to_string(format!("/proc/{p}/root{path}"))
            .ok()
            .filter(|s| !s.trim().is_empty())
    })
}

fn counter(env: &Env, id: &str) -> u64 {
    read_inside(env, id, "/tmp/count")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_progress_keeps_memory_and_kill_while_paused_leaves_nothing() {
    let Some(env) = env() else { return };
    if !env.driver.cgroups().can_freeze() {
        eprintln!("skipping: no cgroup freezer on this host");
        return;
    }
    let id = unique_id("pause");
    let (sb, _ev) = create(&env, &id, small_limits()).await;
    // A background counter whose only state is a shell variable: if it continues from where
    // it stopped, its memory survived the pause.
    let (out, code) = run(
        &sb,
        "(i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; usleep 5000; done) </dev/null >/dev/null 2>&1 &\necho started",
    )
    .await;
    assert_eq!((out.trim(), code), ("started", 0));
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(&env, &id) < 20 {
        assert!(Instant::now() < deadline, "counter does not run");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let t = Instant::now();
    sb.pause().await.expect("pause");
    let pause_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert!(env.driver.cgroups().is_frozen(&id).expect("state"));
    let c1 = counter(&env, &id);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let c2 = counter(&env, &id);
    assert_eq!(c1, c2, "a paused sandbox made progress");
    // its agent accepts nothing it could answer: a request gets no response while frozen
    let mut s = sb.dial(49983).await.expect("the kernel still accepts");
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("send");
    let mut buf = [0u8; 16];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf))
            .await
            .is_err(),
        "a frozen agent answered"
    );
    drop(s);
    // stats (metrics) still read while paused
    let st = sb.stats().expect("stats while paused");
    assert!(st.pids >= 2, "{st:?}");

    let t = Instant::now();
    sb.resume().await.expect("resume");
    let resume_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert!(!env.driver.cgroups().is_frozen(&id).expect("state"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(&env, &id) <= c1 {
        assert!(
            Instant::now() < deadline,
            "counter did not continue after resume"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let c3 = counter(&env, &id);
    assert!(
        c3 > c1 && c3 < c1 + 2000,
        "the counter restarted instead of continuing: {c1} -> {c3}"
    );
    // commands run again
    let (out, code) = run(&sb, "echo back").await;
    assert_eq!((out.trim(), code), ("back", 0));
    eprintln!("pause {pause_ms:.2} ms, resume {resume_ms:.2} ms (counter {c1} -> {c3})");

    // Kill while paused: everything goes (the teardown thaws first).
    sb.pause().await.expect("pause again");
    let alive = traces(&env, &id);
    assert!(!alive.pids.is_empty());
    let t = Instant::now();
    sb.destroy().await.expect("destroy while paused");
    eprintln!("destroy while paused {:?}", t.elapsed());
    assert_gone(&env, &id, &alive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_reaper_kills_a_frozen_sandbox() {
    let Some(env) = env() else { return };
    if !env.driver.cgroups().can_freeze() {
        eprintln!("skipping: no cgroup freezer on this host");
        return;
    }
    let id = unique_id("frz");
    let (sb, _ev) = create(&env, &id, small_limits()).await;
    sb.pause().await.expect("pause");
    let alive = traces(&env, &id);
    // A server that crashed with a paused sandbox leaves a frozen cgroup: the next start's
    // reaper must still remove every process.
    let cg = env.driver.cgroups().clone();
    let id2 = id.clone();
    let (killed, removed) = tokio::task::spawn_blocking(move || cg.remove(&id2))
        .await
        .expect("join")
        .expect("remove frozen cgroup");
    assert!(killed >= 1, "{killed}");
    assert_eq!(removed, env.driver.cgroups().hierarchies().len());
    sb.destroy().await.expect("destroy");
    assert_gone(&env, &id, &alive).await;
}

fn layer_dir(env: &Env, name: &str) -> PathBuf {
    let d = env.tmp.path().join(name);
    std::fs::create_dir(&d).expect("mkdir layer");
    d
}

async fn create_layered(env: &Env, id: &str, layers: Vec<PathBuf>) -> Arc<dyn SandboxHandle> {
    let (tx, _rx): (EventSink, _) = mpsc::unbounded_channel();
    let mut s = spec(env, id, small_limits());
    s.template.layers = layers;
    env.driver.create(s, tx).await.expect("create from layers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_snapshots_stack_as_lower_layers() {
    let Some(env) = env() else { return };
    if !env.driver.cgroups().can_freeze() {
        eprintln!("skipping: no cgroup freezer on this host");
        return;
    }
    let id1 = unique_id("snapa");
    let (sb1, _ev) = create(&env, &id1, small_limits()).await;
    let (out, code) = run(
        &sb1,
        "echo new > /etc/new && ln /etc/new /etc/hard && rm /etc/motd && \
         mkdir -p /d/e && echo deep > /d/e/f && ln -s /d/e/f /link && \
         rm -rf /opt/old && mkdir /opt/old && echo only > /opt/old/only && echo done",
    )
    .await;
    assert_eq!((out.trim(), code), ("done", 0), "{out}");

    let l1 = layer_dir(&env, "l1");
    let t = Instant::now();
    sb1.snapshot_filesystem(&l1).await.expect("snapshot");
    eprintln!("snapshot of a small change: {:?}", t.elapsed());
    // The source runs on and is not frozen.
    assert!(!env.driver.cgroups().is_frozen(&id1).expect("state"));
    let (out, code) = run(&sb1, "echo alive").await;
    assert_eq!((out.trim(), code), ("alive", 0));
    // Only the change is in the layer, not the template.
    assert!(l1.join("etc/new").is_file());
    assert!(!l1.join("bin").exists(), "the template was copied");

    let id2 = unique_id("snapb");
    let sb2 = create_layered(&env, &id2, vec![l1.clone()]).await;
    let (out, code) = run(
        &sb2,
        "cat /etc/new; stat -c %h /etc/hard; test -e /etc/motd && echo motd; cat /d/e/f; \
         readlink /link; ls /opt/old; echo w > /etc/w && cat /etc/w",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        vec!["new", "2", "deep", "/d/e/f", "only", "w"],
        "the snapshot's files, deletions and opaque directory are not what the source had"
    );
    // The source's later writes do not reach a sandbox started from its snapshot.
    let (_, code) = run(&sb1, "echo changed > /etc/new").await;
    assert_eq!(code, 0);
    let (out, _) = run(&sb2, "cat /etc/new").await;
    assert_eq!(out.trim(), "new");

    // A snapshot of a sandbox started from a snapshot stacks on it.
    let (_, code) = run(&sb2, "rm /etc/new && echo two > /etc/two").await;
    assert_eq!(code, 0);
    let l2 = layer_dir(&env, "l2");
    sb2.snapshot_filesystem(&l2).await.expect("nested snapshot");
    let id3 = unique_id("snapc");
    let sb3 = create_layered(&env, &id3, vec![l2.clone(), l1.clone()]).await;
    let (out, code) = run(
        &sb3,
        "test -e /etc/new && echo new; cat /etc/two /opt/old/only /d/e/f",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        vec!["two", "only", "deep"]
    );

    // A paused sandbox stays paused across a snapshot.
    sb1.pause().await.expect("pause");
    let l3 = layer_dir(&env, "l3");
    sb1.snapshot_filesystem(&l3)
        .await
        .expect("snapshot while paused");
    assert!(env.driver.cgroups().is_frozen(&id1).expect("state"));
    assert_eq!(
        std::fs::read_to_string(l3.join("etc/new")).expect("layer file"),
        "changed\n"
    );
    sb1.resume().await.expect("resume");

    let all = [(sb1, id1), (sb2, id2), (sb3, id3)];
    let alive: Vec<Traces> = all.iter().map(|(_, id)| traces(&env, id)).collect();
    for (sb, id) in &all {
        sb.destroy().await.expect("destroy");
        // After teardown nothing is left to snapshot from.
        let l = layer_dir(&env, &format!("after-{id}"));
        assert!(sb.snapshot_filesystem(&l).await.is_err());
    }
    for ((_, id), alive) in all.iter().zip(&alive) {
        assert_gone(&env, id, alive).await;
    }
}
