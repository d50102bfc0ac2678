//! The QEMU command line: one `microvm` machine per sandbox, virtio-mmio devices only.
//!
//! Why these options:
//! * `-M microvm,x-option-roms=off,pit=off,pic=off` with `-nodefaults -no-user-config`: no PCI,
//!   no legacy devices, no option ROMs. The RTC stays on: without it the guest kernel waits
//!   for a clock at boot (measured: ~2x slower boots under TCG).
//! * `tsc_early_khz=` (TCG only): the cloud kernel cannot calibrate the TSC without a PIT or
//!   HPET and hangs; under TCG the guest TSC is the host's, so the host's rate is right.
//!   `tsc=reliable` keeps the clocksource watchdog from demoting it to jiffies, whose wall
//!   clock lags (measured ~45 ms per second; signed URL expiry in the agent noticed).
//! * the kernel is the PVH ELF (`vmlinux`): no firmware decompression step under TCG; the
//!   bzImage would need the linuxboot option ROM.
//! * `-sandbox on,...`: QEMU's own seccomp filter; with the driver's `no_new_privs`, separate
//!   uid and cgroup this confines the VMM itself.
//! * `-accel tcg,tb-size=`: TCG's translation cache defaults to 1 GiB of address space and
//!   fills up with use; a small cache is the biggest single saving of host memory per VM.
//! * all host channels are inherited file descriptors (control socket, serial socket, tap):
//!   QEMU opens no sockets and no tap devices itself.

use std::path::PathBuf;

use crate::accel::Accel;

/// Guest address on the per-sandbox link.
pub const GUEST_IP: [u8; 4] = [169, 254, 0, 21];
/// Host (tap) address on the per-sandbox link.
pub const HOST_IP: [u8; 4] = [169, 254, 0, 22];
/// Prefix length of the link.
pub const LINK_PREFIX: u8 = 30;
/// The guest NIC's MAC (every sandbox has its own link, so one fixed address is fine).
pub const GUEST_MAC: &str = "02:ce:11:a0:00:15";

/// What the guest init does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// Mount the disk and run the agent.
    Run,
    /// Report in and power off (accelerator probe).
    Probe,
}

/// Where guest RAM lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Memory {
    /// Anonymous memory (cold boot): QEMU's default.
    Anonymous,
    /// A golden VM: RAM is this file, mapped shared, so every page the guest touches lands in
    /// it and the migration stream (with `x-ignore-shared`) carries only device state.
    Golden(PathBuf),
    /// A clone: RAM is the golden RAM, mapped private (copy-on-write) from an inherited
    /// descriptor (a sealed memfd, see `snapshot`).
    Clone(i32),
    /// A VM restored from a memory snapshot of a clone: anonymous RAM under the clone's
    /// backend name and device set (the migration stream fills it).
    Restored,
}

impl Memory {
    /// Whether the RAM is a named backend (`memory-backend=mem`): the machine shape of golden
    /// VMs and everything started from them. A migration stream only loads into the shape it
    /// was saved from.
    pub fn named(&self) -> bool {
        !matches!(self, Memory::Anonymous)
    }
}

/// Everything one QEMU invocation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuPlan {
    /// Accelerator.
    pub accel: Accel,
    /// TCG translation cache size, MiB.
    pub tb_size_mb: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM, MiB.
    pub memory_mb: u64,
    /// PVH kernel.
    pub kernel: PathBuf,
    /// initramfs.
    pub initramfs: PathBuf,
    /// qcow2 root disk (absent for probes).
    pub disk: Option<PathBuf>,
    /// Inherited descriptor of the control channel (a connected socket; guest `/dev/hvc0`).
    pub control_fd: i32,
    /// Inherited descriptor of the serial console (a connected socket; guest `ttyS0`).
    pub serial_fd: i32,
    /// Inherited descriptor of the tap device; `None` boots without a NIC (probes).
    pub tap_fd: Option<i32>,
    /// Init mode.
    pub mode: BootMode,
    /// Guest RAM backing.
    pub memory: Memory,
    /// Inherited descriptor of a QMP connection (a connected socket), if any.
    pub qmp_fd: Option<i32>,
    /// Start with `-incoming defer`: the device state arrives over QMP (a clone).
    pub incoming: bool,
    /// Host CPU clock in kHz, passed as `tsc_early_khz` under TCG.
    pub tsc_khz: Option<u64>,
}

fn ip(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

impl QemuPlan {
    /// The guest kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut parts: Vec<String> = [
            "console=ttyS0",
            "quiet",
            "panic=-1",
            "pci=off",
            "i8042.noaux",
            "i8042.nokbd",
            "8250.nr_uarts=1",
            "random.trust_cpu=on",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.accel == Accel::Tcg
            && let Some(khz) = self.tsc_khz
        {
            parts.push(format!("tsc_early_khz={khz}"));
            // Without it the clocksource watchdog marks the emulated TSC unstable and the
            // guest falls back to jiffies, whose wall clock falls behind (~45 ms/s measured).
            parts.push("tsc=reliable".to_string());
        }
        parts.push(format!(
            "cella.mode={}",
            match self.mode {
                BootMode::Run => "run",
                BootMode::Probe => "probe",
            }
        ));
        if self.tap_fd.is_some() {
            parts.push(format!("cella.ip={}/{LINK_PREFIX}", ip(GUEST_IP)));
            parts.push(format!("cella.gw={}", ip(HOST_IP)));
        }
        parts.join(" ")
    }

    /// The full argument vector (without the program name).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        let machine = "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on";
        if self.memory.named() {
            push(&["-M", &format!("{machine},memory-backend=mem")]);
        } else {
            push(&["-M", machine]);
        }
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm".to_string(), "host"),
            Accel::Tcg => {
                let threads = if self.vcpus > 1 { "multi" } else { "single" };
                (
                    format!("tcg,tb-size={},thread={threads}", self.tb_size_mb),
                    "max",
                )
            }
        };
        push(&["-accel", &accel, "-cpu", cpu]);
        push(&["-smp", &self.vcpus.to_string()]);
        push(&["-m", &format!("{}M", self.memory_mb)]);
        // Only the mapping differs between a golden VM and its clones: same id, same size.
        let size = self.memory_mb;
        match &self.memory {
            Memory::Anonymous => {}
            Memory::Golden(path) => push(&[
                "-object",
                &format!(
                    "memory-backend-file,id=mem,size={size}M,mem-path={},share=on",
                    path.to_string_lossy()
                ),
            ]),
            Memory::Clone(fd) => push(&[
                "-object",
                &format!(
                    "memory-backend-file,id=mem,size={size}M,mem-path=/proc/self/fd/{fd},share=off"
                ),
            ]),
            Memory::Restored => push(&[
                "-object",
                &format!("memory-backend-ram,id=mem,size={size}M"),
            ]),
        }
        push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        push(&["-kernel", &self.kernel.to_string_lossy()]);
        push(&["-initrd", &self.initramfs.to_string_lossy()]);
        push(&["-append", &self.kernel_cmdline()]);
        push(&["-chardev", &format!("socket,id=con,fd={}", self.serial_fd)]);
        push(&["-serial", "chardev:con"]);
        push(&["-chardev", &format!("socket,id=ctl,fd={}", self.control_fd)]);
        push(&["-device", "virtio-serial-device,max_ports=2"]);
        push(&["-device", "virtconsole,chardev=ctl"]);
        if let Some(disk) = &self.disk {
            // QEMU's option parser splits on commas; the driver rejects such paths earlier.
            push(&[
                "-drive",
                &format!(
                    "file={},if=none,id=root,format=qcow2,discard=unmap,detect-zeroes=unmap",
                    disk.to_string_lossy()
                ),
            ]);
            push(&["-device", "virtio-blk-device,drive=root"]);
        }
        if let Some(tap) = self.tap_fd {
            push(&["-netdev", &format!("tap,id=n0,fd={tap},vhost=off")]);
            push(&[
                "-device",
                &format!("virtio-net-device,netdev=n0,mac={GUEST_MAC}"),
            ]);
        }
        if self.memory.named() {
            // QEMU 7.2 discards reported pages of a file-backed RAM block by punching holes
            // in the file: in a golden VM's RAM file, under every clone. Off for snapshots
            // (the device set must match between a golden VM and its clones).
            push(&["-device", "virtio-balloon-device"]);
        } else {
            push(&["-device", "virtio-balloon-device,free-page-reporting=on"]);
        }
        push(&["-object", "rng-random,id=rng0,filename=/dev/urandom"]);
        push(&["-device", "virtio-rng-device,rng=rng0"]);
        if let Some(fd) = self.qmp_fd {
            push(&["-chardev", &format!("socket,id=qmp,fd={fd}")]);
            push(&["-mon", "chardev=qmp,mode=control"]);
        }
        if self.incoming {
            push(&["-incoming", "defer"]);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> QemuPlan {
        QemuPlan {
            accel: Accel::Tcg,
            tb_size_mb: 16,
            vcpus: 2,
            memory_mb: 256,
            kernel: PathBuf::from("/a/vmlinux"),
            initramfs: PathBuf::from("/a/initramfs.cpio"),
            disk: Some(PathBuf::from("/d/sb1/disk.qcow2")),
            control_fd: 3,
            serial_fd: 4,
            tap_fd: Some(5),
            mode: BootMode::Run,
            memory: Memory::Anonymous,
            qmp_fd: None,
            incoming: false,
            tsc_khz: Some(2_100_000),
        }
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_run_command_line() {
        let args = plan().args();
        assert_eq!(
            value_after(&args, "-accel"),
            ["tcg,tb-size=16,thread=multi"]
        );
        assert_eq!(value_after(&args, "-cpu"), ["max"]);
        assert_eq!(value_after(&args, "-smp"), ["2"]);
        assert_eq!(value_after(&args, "-m"), ["256M"]);
        assert!(value_after(&args, "-M")[0].starts_with("microvm,"));
        assert!(args.iter().any(|a| a == "-nodefaults"));
        assert!(value_after(&args, "-sandbox")[0].starts_with("on,"));
        let devices = value_after(&args, "-device");
        assert!(devices.iter().all(|d| !d.contains("-pci")), "{devices:?}");
        assert!(devices.contains(&"virtio-blk-device,drive=root"));
        assert!(
            devices
                .iter()
                .any(|d| d.starts_with("virtio-net-device,netdev=n0"))
        );
        assert!(devices.contains(&"virtconsole,chardev=ctl"));
        assert!(devices.contains(&"virtio-balloon-device,free-page-reporting=on"));
        let chardevs = value_after(&args, "-chardev");
        assert!(chardevs.contains(&"socket,id=ctl,fd=3"));
        assert!(chardevs.contains(&"socket,id=con,fd=4"));
        assert_eq!(value_after(&args, "-netdev"), ["tap,id=n0,fd=5,vhost=off"]);
        assert!(value_after(&args, "-drive")[0].starts_with("file=/d/sb1/disk.qcow2,"));
        let append = value_after(&args, "-append")[0];
        for want in [
            "console=ttyS0",
            "tsc_early_khz=2100000",
            "tsc=reliable",
            "cella.mode=run",
            "cella.ip=169.254.0.21/30",
            "cella.gw=169.254.0.22",
        ] {
            assert!(
                append.split(' ').any(|p| p == want),
                "{want} missing in {append}"
            );
        }
    }

    #[test]
    fn golden_and_clone_differ_only_in_the_ram_mapping() {
        let mut golden = plan();
        golden.memory = Memory::Golden(PathBuf::from("/s/ram"));
        golden.qmp_fd = Some(6);
        let mut clone = golden.clone();
        clone.memory = Memory::Clone(7);
        clone.incoming = true;
        let g = golden.args();
        let c = clone.args();
        assert!(value_after(&g, "-M")[0].ends_with(",memory-backend=mem"));
        assert_eq!(
            value_after(&g, "-object")[0],
            "memory-backend-file,id=mem,size=256M,mem-path=/s/ram,share=on"
        );
        assert_eq!(
            value_after(&c, "-object")[0],
            "memory-backend-file,id=mem,size=256M,mem-path=/proc/self/fd/7,share=off"
        );
        assert_eq!(value_after(&c, "-incoming"), ["defer"]);
        assert!(value_after(&g, "-incoming").is_empty());
        assert_eq!(value_after(&g, "-mon"), ["chardev=qmp,mode=control"]);
        assert!(
            value_after(&g, "-device").contains(&"virtio-balloon-device"),
            "no free page reporting on a file-backed RAM block"
        );
        let strip = |a: &[String]| -> Vec<String> {
            a.iter()
                .filter(|x| {
                    !x.starts_with("memory-backend-file") && *x != "-incoming" && *x != "defer"
                })
                .cloned()
                .collect()
        };
        assert_eq!(strip(&g), strip(&c), "machine arguments must match");
        let mut restored = clone.clone();
        restored.memory = Memory::Restored;
        let r = restored.args();
        assert_eq!(
            value_after(&r, "-object")[0],
            "memory-backend-ram,id=mem,size=256M"
        );
        let strip_ram = |a: &[String]| -> Vec<String> {
            strip(a)
                .into_iter()
                .filter(|x| !x.starts_with("memory-backend-ram"))
                .collect()
        };
        assert_eq!(
            strip_ram(&r),
            strip(&c),
            "a restored clone has the clone's shape"
        );
    }

    #[test]
    fn kvm_probe_command_line() {
        let mut p = plan();
        p.accel = Accel::Kvm;
        p.vcpus = 1;
        p.disk = None;
        p.tap_fd = None;
        p.mode = BootMode::Probe;
        let args = p.args();
        assert_eq!(value_after(&args, "-accel"), ["kvm"]);
        assert_eq!(value_after(&args, "-cpu"), ["host"]);
        assert!(value_after(&args, "-drive").is_empty());
        assert!(value_after(&args, "-netdev").is_empty());
        let append = value_after(&args, "-append")[0];
        assert!(append.contains("cella.mode=probe"));
        assert!(!append.contains("tsc_early_khz"), "KVM guests use kvmclock");
        assert!(!append.contains("tsc=reliable"));
        assert!(!append.contains("cella.ip="));
    }
}
