//! The seccomp policy of a sandbox.
//!
//! Why a deny list and not an allow list: sandboxes run arbitrary Linux programs (compilers,
//! language runtimes, package managers) that use a wide and changing set of syscalls. The
//! namespaces, the dropped capabilities and the missing `CAP_SYS_ADMIN` already make most
//! dangerous calls fail; this filter removes the kernel attack surface that stays reachable
//! from inside a user namespace anyway, and forbids the calls that would let a sandbox rebuild
//! privileges it was stripped of (a fresh user namespace, mounts, `setns`).
//!
//! Three programs are installed, all compiled in the parent before `clone` (the child may not
//! allocate):
//!
//! 1. `EPERM` for a fixed list (mounts, module loading, kexec, bpf, perf, keyrings,
//!    userfaultfd, io_uring, clock setting, swap, reboot, quotas, `iopl`/`ioperm`, handle
//!    syscalls, `vhangup`, `syslog`, `setns`), for `unshare`/`clone` with `CLONE_NEWUSER`,
//!    for `ioctl(TIOCSTI|TIOCLINUX)` (terminal input injection) and for `personality` with
//!    anything but the values programs use (query, `PER_LINUX`, `UNAME26`-style and
//!    `ADDR_NO_RANDOMIZE`, which debuggers set).
//! 2. `ENOSYS` for `clone3`: its flags live in a struct that BPF cannot inspect, so it is
//!    refused as "not implemented" and glibc falls back to `clone`, whose flags are checked.
//! 3. (x86_64) `ENOSYS` for x32-ABI syscall numbers (bit 30), which would otherwise bypass
//!    a filter keyed on x86_64 numbers on kernels built with x32 support.
//!
//! `ptrace` stays allowed on purpose: debuggers and `strace` are useful to coding agents, the
//! pid namespace hides every process outside the sandbox, and ptrace of a process in another
//! user namespace needs capabilities there, which the sandbox never has.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors while compiling the seccomp policy.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The CPU architecture has no policy.
    #[error("no seccomp policy for architecture {0}")]
    UnsupportedArch(&'static str),
    /// seccompiler rejected the policy.
    #[error("compiling the seccomp filter failed")]
    Compile(#[from] seccompiler::BackendError),
    /// A program is longer than the kernel accepts.
    #[error("seccomp program has {0} instructions, more than the kernel's limit")]
    TooLong(usize),
}

/// Compiled filters, ready to hand to `seccomp(SECCOMP_SET_MODE_FILTER)` in the child.
#[derive(Debug, Clone)]
pub struct SeccompPrograms {
    programs: Vec<Vec<libc::sock_filter>>,
}

// `libc::sock_filter` has no Debug on every libc version; the wrapper prints lengths only.
impl SeccompPrograms {
    /// The programs, in installation order.
    pub fn programs(&self) -> &[Vec<libc::sock_filter>] {
        &self.programs
    }
}

/// Syscalls refused with `EPERM` unconditionally.
fn denied_syscalls() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_fsopen,
        libc::SYS_fsmount,
        libc::SYS_fsconfig,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_userfaultfd,
        libc::SYS_setns,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_quotactl_fd,
        libc::SYS_lookup_dcookie,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_vhangup,
        libc::SYS_syslog,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([libc::SYS_iopl, libc::SYS_ioperm, libc::SYS_uselib]);
    v
}

/// `personality` values that stay allowed: query, `PER_LINUX`, `PER_LINUX32`-less variants
/// used by `setarch`/`uname26`, and `ADDR_NO_RANDOMIZE` (gdb).
const PERSONALITY_ALLOWED: [u64; 5] = [0x0, 0x8, 0x20008, 0x0040000, 0xffff_ffff];

fn cond(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        op,
        value,
    )?)
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::UnsupportedArch(std::env::consts::ARCH))
}

fn to_libc(p: BpfProgram) -> Result<Vec<libc::sock_filter>, SeccompError> {
    // BPF_MAXINSNS
    if p.len() > 4096 {
        return Err(SeccompError::TooLong(p.len()));
    }
    Ok(p.into_iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect())
}

/// The EPERM program (1).
fn eperm_program(arch: TargetArch) -> Result<Vec<libc::sock_filter>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in denied_syscalls() {
        rules.insert(nr, vec![]);
    }
    let newuser = libc::CLONE_NEWUSER as u64;
    let newuser_rule = || -> Result<Vec<SeccompRule>, SeccompError> {
        Ok(vec![SeccompRule::new(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(newuser),
            newuser,
        )?])?])
    };
    rules.insert(libc::SYS_unshare, newuser_rule()?);
    // clone's first argument is the flags word on every architecture we support.
    rules.insert(libc::SYS_clone, newuser_rule()?);
    rules.insert(
        libc::SYS_ioctl,
        vec![
            SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, libc::TIOCSTI)?])?,
            SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, libc::TIOCLINUX)?])?,
        ],
    );
    let mut not_allowed = Vec::new();
    for v in PERSONALITY_ALLOWED {
        not_allowed.push(cond(0, SeccompCmpOp::Ne, v)?);
    }
    rules.insert(libc::SYS_personality, vec![SeccompRule::new(not_allowed)?]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?;
    let prog: BpfProgram = filter.try_into()?;
    to_libc(prog)
}

/// The ENOSYS program (2).
fn enosys_program(arch: TargetArch) -> Result<Vec<libc::sock_filter>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_clone3, vec![]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    let prog: BpfProgram = filter.try_into()?;
    to_libc(prog)
}

/// The x32 program (3), hand-written: seccompiler keys on syscall numbers only.
#[cfg(target_arch = "x86_64")]
fn x32_program() -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    let ins = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    vec![
        // A = seccomp_data.arch
        ins(LD_W_ABS, 0, 0, 4),
        // other architectures: leave them to program 1 (which kills on a foreign arch)
        ins(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        // A = seccomp_data.nr
        ins(LD_W_ABS, 0, 0, 0),
        ins(JGE_K, 0, 1, X32_SYSCALL_BIT),
        ins(RET_K, 0, 0, RET_ERRNO | libc::ENOSYS as u32),
        ins(RET_K, 0, 0, RET_ALLOW),
    ]
}

/// Compile the sandbox policy.
pub fn build() -> Result<SeccompPrograms, SeccompError> {
    let arch = target_arch()?;
    #[allow(unused_mut)]
    let mut programs = vec![eperm_program(arch)?, enosys_program(arch)?];
    #[cfg(target_arch = "x86_64")]
    programs.push(x32_program());
    Ok(SeccompPrograms { programs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_compiles() {
        let p = build().expect("build");
        assert!(p.programs().len() >= 2);
        for prog in p.programs() {
            assert!(!prog.is_empty());
            assert!(prog.len() <= 4096);
            // every program ends in a return
            let last = prog.last().expect("last");
            assert_eq!(last.code, (libc::BPF_RET | libc::BPF_K) as u16);
        }
    }

    /// Install the filters in a forked child (no root needed: no_new_privs allows seccomp)
    /// and check the kernel really answers as documented.
    #[test]
    fn filters_behave_in_a_child() {
        let p = build().expect("build");
        let fprogs: Vec<libc::sock_fprog> = p
            .programs()
            .iter()
            .map(|prog| libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_ptr() as *mut libc::sock_filter,
            })
            .collect();
        // SAFETY: fork in a test; the child only makes raw syscalls on memory prepared
        // before the fork and leaves with _exit, never returning into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: the child makes async-signal-safe raw calls only (see above).
            unsafe {
                let errno = || *libc::__errno_location();
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    libc::_exit(10);
                }
                for f in &fprogs {
                    if libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        0,
                        f as *const libc::sock_fprog,
                    ) != 0
                    {
                        libc::_exit(11);
                    }
                }
                // unprivileged user namespaces would otherwise be allowed
                if libc::unshare(libc::CLONE_NEWUSER) == 0 || errno() != libc::EPERM {
                    libc::_exit(12);
                }
                // clone3 looks unimplemented
                let mut args: libc::clone_args = std::mem::zeroed();
                args.exit_signal = libc::SIGCHLD as u64;
                if libc::syscall(
                    libc::SYS_clone3,
                    &mut args as *mut libc::clone_args,
                    std::mem::size_of::<libc::clone_args>(),
                ) != -1
                    || errno() != libc::ENOSYS
                {
                    libc::_exit(13);
                }
                if libc::umount2(c"/".as_ptr(), libc::MNT_DETACH) == 0 || errno() != libc::EPERM {
                    libc::_exit(14);
                }
                // the personality query stays allowed, exotic personalities do not
                if libc::personality(0xffff_ffff) == -1 {
                    libc::_exit(15);
                }
                if libc::personality(0x0800_0000) != -1 || errno() != libc::EPERM {
                    libc::_exit(16);
                }
                // ordinary syscalls still work
                if libc::getpid() <= 0 {
                    libc::_exit(17);
                }
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for the child forked above.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        assert!(libc::WIFEXITED(status), "child died: {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "check failed in child");
    }
}
