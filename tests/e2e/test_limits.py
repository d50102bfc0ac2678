"""Resource limits: memory, process count and disk are enforced per sandbox, hitting a limit
harms only the process that hit it, and the sandbox (and the host) keep working."""

import glob
import os
import time

import pytest
from e2b import CommandExitException

from cella_e2e import DRIVER, wait_until

CGROUP = "/sys/fs/cgroup"
# The drivers' top cgroups: a jail's processes, or a microVM's QEMU process.
PARENT = {"jail": "cella", "vm": "cella-vm"}[DRIVER]


def _cgroup_file(controller: str, sandbox_id: str, name: str):
    """Read a sandbox's cgroup file on the host: `<parent>/<instance>/<id>` in the
    controller's v1 hierarchy, or the same under the v2 root."""
    patterns = [
        f"{CGROUP}/{controller}/{PARENT}/*/{sandbox_id}/{name}",
        f"{CGROUP}/{PARENT}/*/{sandbox_id}/{name}",
    ]
    for pattern in patterns:
        for path in glob.glob(pattern):
            with open(path) as f:
                return f.read().strip()
    return None


def test_memory_hog_is_killed_and_sandbox_survives(sandbox):
    # 2 GiB, written (not just reserved), in a sandbox with the default 512 MiB.
    with pytest.raises(CommandExitException) as exc:
        sandbox.commands.run("python3 -c \"b = b'x' * (2 << 30); print(len(b))\"", timeout=120)
    assert exc.value.exit_code != 0
    assert "2147483648" not in exc.value.stdout
    # Killed by the OOM killer (SIGKILL: envd reports exit code -1 and "signal: killed", or
    # 137 when a shell reports it), or refused with MemoryError.
    e = exc.value
    killed = (e.exit_code == -1 and "killed" in (e.error or "")) or e.exit_code == 137
    assert killed or "MemoryError" in e.stderr, (e.exit_code, e.error, e.stderr)

    assert sandbox.commands.run("echo still-alive").stdout == "still-alive\n"
    sandbox.files.write("/tmp/after-oom", "ok")
    assert sandbox.files.read("/tmp/after-oom") == "ok"
    limit = _cgroup_file("memory", sandbox.sandbox_id, "memory.limit_in_bytes") or _cgroup_file(
        "memory", sandbox.sandbox_id, "memory.max"
    )
    assert limit is not None, "no memory cgroup for the sandbox"
    if DRIVER == "vm":
        # The guest gets 512 MiB of RAM (its kernel's OOM killer acted above); the host
        # cgroup caps the whole QEMU process at that plus the VMM's own overhead.
        mem_total_kib = int(sandbox.commands.run("awk '/^MemTotal:/ {print $2}' /proc/meminfo").stdout)
        assert mem_total_kib <= 512 * 1024, mem_total_kib
        assert int(limit) <= (512 + 256) * 1024 * 1024, limit
    else:
        assert int(limit) <= 512 * 1024 * 1024


@pytest.mark.driver("jail", "a microVM's processes are counted by its guest kernel; see the vm variant")
def test_fork_bomb_hits_pids_limit_and_sandbox_recovers(sandbox):
    pids_max = _cgroup_file("pids", sandbox.sandbox_id, "pids.max")
    assert pids_max is not None and pids_max != "max", f"no pids limit: {pids_max!r}"
    limit = int(pids_max)

    # The classic bomb; the leading shell then blocks on stdin (a builtin: no fork needed)
    # so that it stays alive as the handle to kill.
    bomb = sandbox.commands.run(":(){ :|:& };: ; read -r _", background=True, stdin=True, timeout=0)

    def saturated():
        current = int(_cgroup_file("pids", sandbox.sandbox_id, "pids.current") or 0)
        events = _cgroup_file("pids", sandbox.sandbox_id, "pids.events") or ""
        hit = any(line.startswith("max ") and int(line.split()[1]) > 0 for line in events.splitlines())
        return hit or current >= limit

    wait_until(saturated, timeout=60, what="the pids limit to be hit")
    # The host is unaffected: we can still fork.
    assert os.system("true") == 0

    bomb.kill()

    def recovered():
        try:
            return sandbox.commands.run("echo recovered", timeout=20).stdout == "recovered\n"
        except Exception:
            return False

    wait_until(recovered, timeout=90, interval=1, what="the sandbox to recover")
    bomb.disconnect()
    # Everything the bomb forked is gone again (counted inside: processes, not threads).
    wait_until(
        lambda: int(sandbox.commands.run("ps -e --no-headers | wc -l").stdout) < 10,
        timeout=60,
        what="the bomb's processes to be gone",
    )
    assert int(_cgroup_file("pids", sandbox.sandbox_id, "pids.current")) < limit // 2


def test_filling_the_disk_fails_cleanly(sandbox):
    with pytest.raises(CommandExitException) as exc:
        sandbox.commands.run("dd if=/dev/zero of=/home/user/big bs=1M count=5000", timeout=170)
    assert "No space left on device" in exc.value.stderr, exc.value.stderr
    # The sandbox still works and gets its space back.
    sandbox.commands.run("rm -f /home/user/big")
    sandbox.files.write("/home/user/after-full", "fine")
    assert sandbox.files.read("/home/user/after-full") == "fine"
    assert sandbox.commands.run("echo ok").stdout == "ok\n"


def test_cpu_limit_is_set(sandbox):
    quota = _cgroup_file("cpu", sandbox.sandbox_id, "cpu.cfs_quota_us")
    if quota is None:
        v2 = _cgroup_file("cpu", sandbox.sandbox_id, "cpu.max")
        assert v2 is not None and not v2.startswith("max"), v2
    else:
        assert int(quota) > 0, quota


@pytest.mark.driver("vm", "a jail's processes are host processes; see the jail variant")
def test_fork_bomb_stays_inside_the_guest_and_sandbox_recovers(sandbox):
    # On the host a microVM is one QEMU process whose cgroup caps its threads; the bomb's
    # processes exist only in the guest kernel.
    pids_max = _cgroup_file("pids", sandbox.sandbox_id, "pids.max")
    assert pids_max is not None and pids_max != "max", f"no pids limit on the VMM: {pids_max!r}"
    bomb = sandbox.commands.run(":(){ :|:& };: ; read -r _", background=True, stdin=True, timeout=0)
    time.sleep(10)
    # The host is unaffected: we can still fork, and the VMM stays within its thread cap.
    assert os.system("true") == 0
    assert int(_cgroup_file("pids", sandbox.sandbox_id, "pids.current")) <= int(pids_max)

    bomb.kill()

    def recovered():
        try:
            return sandbox.commands.run("echo recovered", timeout=20).stdout == "recovered\n"
        except Exception:
            return False

    wait_until(recovered, timeout=120, interval=1, what="the sandbox to recover")
    bomb.disconnect()
    wait_until(
        lambda: int(sandbox.commands.run("ps -e --no-headers | wc -l").stdout) < 100,
        timeout=60,
        what="the bomb's processes to be gone",
    )
