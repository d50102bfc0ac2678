//! Choosing the accelerator: KVM only when it demonstrably works, TCG otherwise.
//!
//! Why probe instead of trusting `/dev/kvm`: hosts that are themselves VMs expose KVM devices
//! that cannot run a stock guest. This very host has a nested `kvm_pvm` ("Pagetable-based
//! Virtual Machine") whose `/dev/kvm` opens fine, but a stock kernel dies in it with an
//! emulation failure after a minute. So KVM is used only when all three hold:
//!
//! 1. the CPU advertises hardware virtualisation (`vmx` or `svm` in `/proc/cpuinfo`),
//! 2. `/dev/kvm` opens read-write,
//! 3. a probe guest (the real kernel and initramfs, `cella.mode=probe`) reports in over its
//!    control channel before a deadline.
//!
//! The decision logic is pure ([`decide`]) and takes the facts and the probe as inputs, so it is
//! tested without KVM; [`HostFacts::gather`] reads them from a root-relative `/proc` and `/dev`.

use std::path::Path;
use std::time::Duration;

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// Probe: KVM if it works, else TCG.
    #[default]
    Auto,
    /// KVM or fail.
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(format!("unknown accelerator {other:?} (auto, kvm, tcg)")),
        }
    }
}

/// The accelerator in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's Tiny Code Generator.
    Tcg,
}

/// Facts about the host that decide whether KVM is worth probing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// `vmx` or `svm` appears in the flags of `/proc/cpuinfo`.
    pub cpu_virt: bool,
    /// Opening `/dev/kvm` read-write: `Ok` or why not.
    pub kvm_device: Result<(), String>,
    /// `cpu MHz` of the first CPU in `/proc/cpuinfo`, in kHz (the guest's TSC rate under TCG).
    pub cpu_khz: Option<u64>,
    /// What a KVM guest's `-cpu host` inherits from the host CPU ([`cpuinfo_identity`]).
    pub cpu_identity: String,
}

impl HostFacts {
    /// Read the facts from `proc_root` (`/proc`) and `dev_root` (`/dev`).
    pub fn gather(proc_root: &Path, dev_root: &Path) -> HostFacts {
        let cpuinfo = std::fs::read_to_string(proc_root.join("cpuinfo")).unwrap_or_default();
        let kvm = dev_root.join("kvm");
        let kvm_device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&kvm)
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", kvm.display()));
        HostFacts {
            cpu_virt: cpuinfo_has_virt(&cpuinfo),
            kvm_device,
            cpu_khz: cpuinfo_khz(&cpuinfo),
            cpu_identity: cpuinfo_identity(&cpuinfo),
        }
    }
}

/// Whether any `flags` line of a cpuinfo text lists `vmx` or `svm`.
pub fn cpuinfo_has_virt(cpuinfo: &str) -> bool {
    cpuinfo.lines().any(|l| {
        let mut kv = l.splitn(2, ':');
        let key = kv.next().unwrap_or_default().trim();
        key == "flags"
            && kv
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .any(|f| f == "vmx" || f == "svm")
    })
}

/// The first CPU's vendor, family, model, stepping, microcode and flags, one `key: value` per
/// line: under KVM (`-cpu host`) the guest sees this CPU, and a guest saved on one CPU may
/// not run on another (a memory snapshot's key includes it). A microcode update that changes
/// the flags changes it too.
pub fn cpuinfo_identity(cpuinfo: &str) -> String {
    const KEYS: [&str; 7] = [
        "vendor_id",
        "cpu family",
        "model",
        "model name",
        "stepping",
        "microcode",
        "flags",
    ];
    let mut out = Vec::new();
    for line in cpuinfo.lines() {
        // The first processor's block ends at the first blank line.
        if line.trim().is_empty() && !out.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && KEYS.contains(&k.trim())
        {
            out.push(format!("{}: {}", k.trim(), v.trim()));
        }
    }
    out.join("\n")
}

/// The first `cpu MHz` value of a cpuinfo text, in kHz.
pub fn cpuinfo_khz(cpuinfo: &str) -> Option<u64> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() != "cpu MHz" {
            return None;
        }
        let mhz: f64 = v.trim().parse().ok()?;
        if mhz.is_finite() && mhz > 1.0 && mhz < 100_000.0 {
            // Bounded above, so the cast cannot overflow.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Some((mhz * 1000.0).round() as u64)
        } else {
            None
        }
    })
}

/// The outcome of [`decide`], with the reason for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDecision {
    /// What to use.
    pub accel: Accel,
    /// Why (e.g. "no vmx/svm in /proc/cpuinfo").
    pub reason: String,
}

/// Decide the accelerator. `probe` boots a probe guest under KVM and returns how long it took
/// to report in, or why it did not; it is only called when the facts allow KVM.
pub fn decide(
    choice: AccelChoice,
    facts: &HostFacts,
    probe: impl FnOnce() -> Result<Duration, String>,
) -> Result<AccelDecision, String> {
    if choice == AccelChoice::Tcg {
        return Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: "TCG requested".into(),
        });
    }
    let blocker = if !facts.cpu_virt {
        Some("no vmx/svm in /proc/cpuinfo".to_string())
    } else if let Err(e) = &facts.kvm_device {
        Some(format!("cannot open the KVM device ({e})"))
    } else {
        match probe() {
            Ok(took) => {
                return Ok(AccelDecision {
                    accel: Accel::Kvm,
                    reason: format!("probe guest booted under KVM in {} ms", took.as_millis()),
                });
            }
            Err(e) => Some(format!("probe guest failed under KVM: {e}")),
        }
    };
    let reason = blocker.unwrap_or_default();
    match choice {
        AccelChoice::Kvm => Err(format!("KVM requested but unusable: {reason}")),
        _ => Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: format!("TCG: {reason}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const PVM_HOST: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu MHz\t\t: 2100.000\n\
        flags\t\t: fpu vme de pse tsc msr pae hypervisor lahf_lm\n\nprocessor\t: 1\n";
    const VMX_HOST: &str = "processor\t: 0\ncpu MHz\t\t: 3400.123\nflags\t\t: fpu vmx sse\n";

    fn facts(cpuinfo: &str, dev_kvm: bool) -> HostFacts {
        let tmp = tempfile::tempdir().expect("tmp");
        let proc_root = tmp.path().join("proc");
        let dev_root = tmp.path().join("dev");
        std::fs::create_dir_all(&proc_root).expect("mkdir");
        std::fs::create_dir_all(&dev_root).expect("mkdir");
        std::fs::write(proc_root.join("cpuinfo"), cpuinfo).expect("write");
        if dev_kvm {
            std::fs::write(dev_root.join("kvm"), "").expect("write");
        }
        HostFacts::gather(&proc_root, &dev_root)
    }

    #[test]
    fn reads_virt_flags_and_clock() {
        let f = facts(PVM_HOST, true);
        assert!(!f.cpu_virt);
        assert_eq!(f.cpu_khz, Some(2_100_000));
        assert!(f.kvm_device.is_ok());
        let f = facts(VMX_HOST, false);
        assert!(f.cpu_virt);
        assert_eq!(f.cpu_khz, Some(3_400_123));
        assert!(f.kvm_device.is_err());
        // "vmx" inside another flag name does not count
        assert!(!cpuinfo_has_virt("flags : vmxnet svmish\n"));
        assert_eq!(
            facts(PVM_HOST, false).cpu_identity,
            "vendor_id: GenuineIntel\nflags: fpu vme de pse tsc msr pae hypervisor lahf_lm"
        );
        // Only the first CPU counts; the clock (which varies) does not.
        let two = "processor : 0\nvendor_id : AuthenticAMD\ncpu family : 25\nmodel : 1\n\
            model name : EPYC\nstepping : 1\nmicrocode : 0xa0011d1\ncpu MHz : 1.5\n\
            flags : fpu svm\n\nprocessor : 1\nvendor_id : Other\n";
        assert_eq!(
            cpuinfo_identity(two),
            "vendor_id: AuthenticAMD\ncpu family: 25\nmodel: 1\nmodel name: EPYC\n\
             stepping: 1\nmicrocode: 0xa0011d1\nflags: fpu svm"
        );
        assert_eq!(cpuinfo_khz("cpu MHz : nan\n"), None);
        assert_eq!(cpuinfo_khz(""), None);
    }

    #[test]
    fn pvm_like_host_uses_tcg_without_probing() {
        let probed = Cell::new(false);
        let d = decide(AccelChoice::Auto, &facts(PVM_HOST, true), || {
            probed.set(true);
            Ok(Duration::from_millis(1))
        })
        .expect("decision");
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("vmx/svm"), "{}", d.reason);
        assert!(!probed.get());
    }

    #[test]
    fn kvm_only_when_the_probe_boots() {
        let ok = decide(AccelChoice::Auto, &facts(VMX_HOST, true), || {
            Ok(Duration::from_millis(420))
        })
        .expect("decision");
        assert_eq!(ok.accel, Accel::Kvm);
        let failed = decide(AccelChoice::Auto, &facts(VMX_HOST, true), || {
            Err("KVM internal error: emulation failure".into())
        })
        .expect("decision");
        assert_eq!(failed.accel, Accel::Tcg);
        assert!(failed.reason.contains("emulation failure"));
        let no_dev = decide(AccelChoice::Auto, &facts(VMX_HOST, false), || {
            panic!("must not probe without a device")
        })
        .expect("decision");
        assert_eq!(no_dev.accel, Accel::Tcg);
    }

    #[test]
    fn explicit_choices() {
        let tcg = decide(AccelChoice::Tcg, &facts(VMX_HOST, true), || {
            panic!("must not probe when TCG is requested")
        })
        .expect("decision");
        assert_eq!(tcg.accel, Accel::Tcg);
        let err = decide(AccelChoice::Kvm, &facts(PVM_HOST, true), || {
            Ok(Duration::ZERO)
        })
        .expect_err("kvm unusable");
        assert!(err.contains("KVM requested"), "{err}");
        assert_eq!("tcg".parse::<AccelChoice>(), Ok(AccelChoice::Tcg));
        assert!("xen".parse::<AccelChoice>().is_err());
    }
}
