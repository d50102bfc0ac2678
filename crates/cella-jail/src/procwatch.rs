//! Host-side audit of every program executed inside a jail sandbox.
//!
//! The agent reports the processes *it* starts, but sandbox code forks and execs on its own,
//! and the agent's word is a claim of the sandbox anyway. The host sees every process through
//! the kernel's process-events connector ([`cella_procevents`]). One listener thread per
//! driver follows the process tree from each sandbox's init (fork events), so an exec is
//! attributed to its sandbox even when the process is gone by the time we look; unknown PIDs
//! fall back to their cgroup (`/proc/<pid>/cgroup`). Each sandbox has a rate limit; what
//! exceeds it is recorded as one `process.exec.suppressed` count per second.
//!
//! Without `CAP_NET_ADMIN` in the initial user namespace the driver runs without this audit
//! and says so.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use cella_core::driver::{EventSink, SANDBOX_ID_BASE, SANDBOX_ID_COUNT, SandboxEvent};
use cella_procevents::{ProcEvent, RateLimit, Received, Subscription, read_exec_info};
use cella_proto::control::AgentEvent;

struct Watched {
    sink: EventSink,
    bucket: RateLimit,
    suppressed: u64,
}

/// Which sandbox every known process belongs to.
#[derive(Default)]
struct State {
    sandboxes: HashMap<String, Watched>,
    /// Host TGID → sandbox ID.
    pids: HashMap<i32, String>,
}

/// A host uid of the sandbox range, as the sandbox sees it (others as they are).
fn sandbox_uid(host: u32) -> u32 {
    if (SANDBOX_ID_BASE..SANDBOX_ID_BASE + SANDBOX_ID_COUNT).contains(&host) {
        host - SANDBOX_ID_BASE
    } else {
        host
    }
}

/// The sandbox ID in a `/proc/<pid>/cgroup` whose path contains `/<parent>/<instance>/<id>`.
pub fn sandbox_of_cgroup<'a>(cgroup: &'a str, parent: &str, instance: &str) -> Option<&'a str> {
    let needle = format!("/{parent}/{instance}/");
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        let at = path.find(&needle)? + needle.len();
        path[at..].split('/').next().filter(|id| !id.is_empty())
    })
}

/// The running audit: register sandboxes with [`ProcWatch::watch`].
pub struct ProcWatch {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for ProcWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcWatch").finish_non_exhaustive()
    }
}

impl ProcWatch {
    /// Subscribe to the kernel's process events and start the listener thread. `proc_root` is
    /// `/proc`; `cgroup_parent`/`instance` name this server's sandbox cgroups (the fallback for
    /// processes whose fork was missed).
    pub fn start(
        proc_root: PathBuf,
        cgroup_parent: String,
        instance: String,
    ) -> io::Result<ProcWatch> {
        let sub = Subscription::open(Duration::from_secs(1))?;
        let state = Arc::new(Mutex::new(State::default()));
        let weak = Arc::downgrade(&state);
        std::thread::Builder::new()
            .name("cella-procwatch".into())
            .spawn(move || listen(sub, weak, &proc_root, &cgroup_parent, &instance))?;
        Ok(ProcWatch { state })
    }

    /// Audit every process that descends from `init_pid` (host PID) as sandbox `id`.
    pub fn watch(&self, id: &str, init_pid: i32, sink: EventSink) {
        if let Ok(mut s) = self.state.lock() {
            s.sandboxes.insert(
                id.to_string(),
                Watched {
                    sink,
                    bucket: RateLimit::new(Instant::now()),
                    suppressed: 0,
                },
            );
            s.pids.insert(init_pid, id.to_string());
        }
    }

    /// Stop auditing sandbox `id` (it was destroyed); its suppressed count is flushed.
    pub fn unwatch(&self, id: &str) {
        if let Ok(mut s) = self.state.lock() {
            if let Some(w) = s.sandboxes.remove(id)
                && w.suppressed > 0
            {
                let _ = w.sink.send(SandboxEvent::from_host(
                    id,
                    AgentEvent::ProcessExecSuppressed {
                        count: w.suppressed,
                    },
                ));
            }
            s.pids.retain(|_, sid| sid != id);
        }
    }
}

fn listen(
    mut sub: Subscription,
    state: Weak<Mutex<State>>,
    proc_root: &Path,
    parent: &str,
    instance: &str,
) {
    let mut last_flush = Instant::now();
    let mut overflows = 0u64;
    loop {
        let got = sub.recv();
        let Some(state) = state.upgrade() else {
            return; // the driver is gone
        };
        match got {
            Ok(Received::Event(ev)) => handle(&state, ev, proc_root, parent, instance),
            Ok(Received::Other | Received::Timeout) => {}
            Ok(Received::Overflow) => {
                overflows += 1;
                tracing::warn!(
                    overflows,
                    "process audit: kernel events were lost (ENOBUFS)"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "process audit stopped");
                return;
            }
        }
        if last_flush.elapsed() >= Duration::from_secs(1) {
            last_flush = Instant::now();
            flush_suppressed(&state);
        }
    }
}

fn handle(state: &Mutex<State>, ev: ProcEvent, proc_root: &Path, parent: &str, instance: &str) {
    let Ok(mut s) = state.lock() else { return };
    match ev {
        ProcEvent::Fork { parent_tgid, child } => {
            if let Some(id) = s.pids.get(&parent_tgid).cloned() {
                s.pids.insert(child, id);
            }
        }
        ProcEvent::Exit { tgid } => {
            s.pids.remove(&tgid);
        }
        ProcEvent::Exec { tgid } => {
            let id = match s.pids.get(&tgid) {
                Some(id) => id.clone(),
                None => {
                    if s.sandboxes.is_empty() {
                        return;
                    }
                    // A fork we missed (or raced): ask its cgroup.
                    let cg =
                        std::fs::read_to_string(proc_root.join(tgid.to_string()).join("cgroup"))
                            .unwrap_or_default();
                    match sandbox_of_cgroup(&cg, parent, instance) {
                        Some(id) if s.sandboxes.contains_key(id) => {
                            let id = id.to_string();
                            s.pids.insert(tgid, id.clone());
                            id
                        }
                        _ => return,
                    }
                }
            };
            let Some(w) = s.sandboxes.get_mut(&id) else {
                return;
            };
            if !w.bucket.take(Instant::now()) {
                w.suppressed += 1;
                return;
            }
            let sink = w.sink.clone();
            drop(s);
            let info = read_exec_info(proc_root, tgid);
            let _ = sink.send(SandboxEvent::from_host(
                id,
                AgentEvent::ProcessExec {
                    pid: info.ns_pid.unwrap_or(0),
                    uid: info.uid.map(sandbox_uid),
                    argv: info.argv,
                    truncated: info.truncated,
                },
            ));
        }
    }
}

fn flush_suppressed(state: &Mutex<State>) {
    let Ok(mut s) = state.lock() else { return };
    for (id, w) in s.sandboxes.iter_mut() {
        if w.suppressed > 0 {
            let _ = w.sink.send(SandboxEvent::from_host(
                id.as_str(),
                AgentEvent::ProcessExecSuppressed {
                    count: w.suppressed,
                },
            ));
            w.suppressed = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_uids_are_unshifted() {
        assert_eq!(sandbox_uid(101_000), 1000);
        assert_eq!(sandbox_uid(100_000), 0);
        // A uid outside the sandbox range is reported as is.
        assert_eq!(sandbox_uid(0), 0);
        assert_eq!(sandbox_uid(165_536), 165_536);
    }

    #[test]
    fn cgroup_paths_name_the_sandbox_of_this_instance_only() {
        let v1 = "12:pids:/cella/inst1/abc\n3:memory:/cella/inst1/abc\n";
        assert_eq!(sandbox_of_cgroup(v1, "cella", "inst1"), Some("abc"));
        assert_eq!(sandbox_of_cgroup(v1, "cella", "other"), None);
        let v2 = "0::/system.slice/x/cella/inst1/def\n";
        assert_eq!(sandbox_of_cgroup(v2, "cella", "inst1"), Some("def"));
        assert_eq!(
            sandbox_of_cgroup("0::/user.slice\n", "cella", "inst1"),
            None
        );
        assert_eq!(
            sandbox_of_cgroup("0::/cella/inst1/\n", "cella", "inst1"),
            None
        );
    }

    #[test]
    fn events_follow_the_process_tree_and_are_rate_limited() {
        let proc_root = tempfile::tempdir().expect("tempdir");
        let state = Mutex::new(State::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        {
            let mut s = state.lock().expect("lock");
            s.sandboxes.insert(
                "sb".into(),
                Watched {
                    sink: tx,
                    bucket: RateLimit::new(Instant::now()),
                    suppressed: 0,
                },
            );
            s.pids.insert(100, "sb".into());
        }
        let dir = proc_root.path().join("101");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("cmdline"), b"/bin/ls\0-l\0").expect("write");
        std::fs::write(
            dir.join("status"),
            "Uid:\t101000\t0\t0\t0\nNSpid:\t101\t5\n",
        )
        .expect("write");
        let h = |ev| handle(&state, ev, proc_root.path(), "cella", "i");
        h(ProcEvent::Fork {
            parent_tgid: 100,
            child: 101,
        });
        h(ProcEvent::Exec { tgid: 101 });
        // A process of no sandbox is ignored.
        h(ProcEvent::Fork {
            parent_tgid: 1,
            child: 300,
        });
        h(ProcEvent::Exec { tgid: 300 });
        let ev = rx.try_recv().expect("an exec event");
        assert_eq!(ev.sandbox_id, "sb");
        assert_eq!(ev.origin, cella_core::driver::EventOrigin::Host);
        assert_eq!(
            ev.event,
            AgentEvent::ProcessExec {
                pid: 5,
                uid: Some(1000),
                argv: vec!["/bin/ls".into(), "-l".into()],
                truncated: false
            }
        );
        assert!(rx.try_recv().is_err(), "only one event");
        // An exec by a process that is gone is still attributed, with nothing read.
        h(ProcEvent::Fork {
            parent_tgid: 101,
            child: 102,
        });
        h(ProcEvent::Exec { tgid: 102 });
        let ev = rx.try_recv().expect("an exec event");
        assert!(
            matches!(ev.event, AgentEvent::ProcessExec { pid: 0, ref argv, .. } if argv.is_empty())
        );
        // Past the burst, executions are counted, then flushed as one record.
        for _ in 0..(cella_procevents::EXEC_BURST as usize + 10) {
            h(ProcEvent::Exec { tgid: 102 });
        }
        let logged = std::iter::from_fn(|| rx.try_recv().ok()).count();
        assert!(
            logged < cella_procevents::EXEC_BURST as usize + 10,
            "logged {logged}"
        );
        flush_suppressed(&state);
        let ev = rx.try_recv().expect("a suppressed count");
        assert!(matches!(ev.event, AgentEvent::ProcessExecSuppressed { count } if count >= 10));
        // Exit forgets the pid.
        h(ProcEvent::Exit { tgid: 102 });
        assert!(!state.lock().expect("lock").pids.contains_key(&102));
    }
}
