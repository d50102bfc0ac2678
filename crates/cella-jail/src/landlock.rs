//! Landlock, as a second wall around the sandbox's root.
//!
//! Why, when the mount namespace already hides the host: the mount namespace is one kernel
//! mechanism, and a bug or a leaked file descriptor can expose a host path to the sandbox.
//! Landlock is enforced independently, on every path access. The sandbox gets one rule: full
//! access beneath its own root (`/` after `pivot_root`, which includes its `/proc`, `/dev`,
//! `/tmp`). Everything that is not beneath that root — host directories reached through a
//! leaked descriptor or a mount made visible by a kernel bug — is denied, for every access
//! right the running kernel knows. Landlock also makes the kernel refuse mount-topology
//! changes by the sandbox. On ABI ≥ 6 the domain is additionally scoped: processes inside
//! cannot signal, or connect to abstract Unix sockets of, processes outside the domain.
//! Network rights (ABI ≥ 4) are *not* handled: sandboxes bind and connect freely inside
//! their own network namespace.
//!
//! Landlock is best effort: a kernel without it (ABI probe fails) runs sandboxes without it,
//! and the driver logs that once at start.
//!
//! The child applies the ruleset with raw syscalls (no allocation after `clone`), so this
//! module only computes the constants; [`LandlockPlan`] is plain data.

/// `LANDLOCK_CREATE_RULESET_VERSION`.
const CREATE_RULESET_VERSION: u32 = 1;

/// `LANDLOCK_RULE_PATH_BENEATH`.
pub const RULE_PATH_BENEATH: libc::c_int = 1;

/// `struct landlock_ruleset_attr` (all three fields; the size passed tells the kernel which
/// ones it may read).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RulesetAttr {
    /// Filesystem rights the ruleset handles (denies unless a rule allows).
    pub handled_access_fs: u64,
    /// Network rights handled (none).
    pub handled_access_net: u64,
    /// Scopes (ABI ≥ 6).
    pub scoped: u64,
}

/// `struct landlock_path_beneath_attr` (packed in the UAPI).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy)]
pub struct PathBeneathAttr {
    /// Rights allowed beneath `parent_fd`.
    pub allowed_access: u64,
    /// An `O_PATH` descriptor of the directory.
    pub parent_fd: i32,
}

/// What the child applies.
#[derive(Debug, Clone, Copy)]
pub struct LandlockPlan {
    /// The ruleset attributes.
    pub attr: RulesetAttr,
    /// How many bytes of `attr` to pass.
    pub attr_size: usize,
}

/// Ask the kernel for its Landlock ABI version; `None` when Landlock is unavailable.
pub fn probe_abi() -> Option<u32> {
    // SAFETY: landlock_create_ruleset with a NULL attribute, size 0 and the VERSION flag only
    // returns the ABI version; no memory is accessed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(r).ok().filter(|v| *v >= 1)
}

/// The plan for ABI `abi`: every filesystem right of that ABI handled, all allowed beneath
/// the sandbox root; scopes from ABI 6.
pub fn plan_for(abi: u32) -> LandlockPlan {
    // ABI 1: EXECUTE..MAKE_SYM (13 rights); 2: +REFER; 3: +TRUNCATE; 5: +IOCTL_DEV.
    let fs_bits = match abi {
        0 | 1 => 13,
        2 => 14,
        3 | 4 => 15,
        _ => 16,
    };
    let handled_access_fs = (1u64 << fs_bits) - 1;
    let (scoped, attr_size) = if abi >= 6 {
        // LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL
        (0b11, std::mem::size_of::<RulesetAttr>())
    } else {
        (0, std::mem::size_of::<u64>())
    };
    LandlockPlan {
        attr: RulesetAttr {
            handled_access_fs,
            handled_access_net: 0,
            scoped,
        },
        attr_size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_grow_with_the_abi() {
        assert_eq!(plan_for(1).attr.handled_access_fs, 0x1fff);
        assert_eq!(plan_for(2).attr.handled_access_fs, 0x3fff);
        assert_eq!(plan_for(3).attr.handled_access_fs, 0x7fff);
        assert_eq!(plan_for(5).attr.handled_access_fs, 0xffff);
        assert_eq!(plan_for(5).attr.scoped, 0);
        assert_eq!(plan_for(5).attr_size, 8);
        assert_eq!(plan_for(6).attr.scoped, 3);
        assert_eq!(plan_for(6).attr_size, 24);
        assert_eq!(std::mem::size_of::<PathBeneathAttr>(), 12);
    }

    #[test]
    fn probe_does_not_fail_hard() {
        // Whatever the kernel says, the probe must answer without panicking.
        if let Some(abi) = probe_abi() {
            assert!(abi >= 1);
        }
    }
}
