//! Audit of every program executed in a microVM guest, reported as `process_exec` events.
//!
//! Inside a VM the guest kernel is the sandbox's own, so the host cannot see its processes; the
//! agent, as the guest's root, subscribes to that kernel's process events instead
//! ([`cella_procevents`]). Everything in the guest belongs to the sandbox. These records are
//! claims of the sandbox (a compromised guest can stop them); for jail sandboxes the host
//! observes execs itself and this subscription fails (no `CAP_NET_ADMIN` in the initial user
//! namespace), which is expected.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cella_procevents::{ProcEvent, RateLimit, Received, Subscription, read_exec_info};
use cella_proto::control::AgentEvent;

use crate::state::EventSink;

/// Start the audit thread if this kernel lets the agent subscribe; `false` when it does not.
pub fn spawn(events: EventSink, proc_root: PathBuf) -> bool {
    let sub = match Subscription::open(Duration::from_secs(1)) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "no process events here (expected inside a jail)");
            return false;
        }
    };
    std::thread::Builder::new()
        .name("exec-audit".into())
        .spawn(move || run(sub, &events, &proc_root))
        .is_ok()
}

fn run(mut sub: Subscription, events: &EventSink, proc_root: &std::path::Path) {
    let me = std::process::id() as i32;
    let mut limit = RateLimit::new(Instant::now());
    let mut suppressed = 0u64;
    let mut last_flush = Instant::now();
    loop {
        match sub.recv() {
            Ok(Received::Event(ProcEvent::Exec { tgid })) if tgid != me => {
                if limit.take(Instant::now()) {
                    let info = read_exec_info(proc_root, tgid);
                    events.emit(AgentEvent::ProcessExec {
                        pid: info.ns_pid.unwrap_or(0),
                        uid: info.uid,
                        argv: info.argv,
                        truncated: info.truncated,
                    });
                } else {
                    suppressed += 1;
                }
            }
            Ok(Received::Overflow) => tracing::warn!("process events were lost (ENOBUFS)"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "process audit stopped");
                return;
            }
        }
        if last_flush.elapsed() >= Duration::from_secs(1) {
            last_flush = Instant::now();
            if suppressed > 0 {
                events.emit(AgentEvent::ProcessExecSuppressed { count: suppressed });
                suppressed = 0;
            }
        }
    }
}
