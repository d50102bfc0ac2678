"""Cleanup proofs: a sandbox leaves nothing on the host once it is killed, once the server
shuts down, and once a crashed server (SIGKILL) starts again on the same data dir.

"Nothing" is measured, not assumed: host mounts (/proc/self/mountinfo), cgroups with "cella"
in their path (`cella/` for jails, `cella-vm/` for microVMs), network namespaces in use by a
process or held open by the server, processes outside the host's namespaces and QEMU
processes running a disk of this data dir, and the files under the data dir (a microVM's
qcow2 overlay among them) are compared before and after."""

import signal
import time

from e2b import Sandbox

from cella_e2e import DRIVER, HostSnapshot, wait_until


def snap(server) -> HostSnapshot:
    return HostSnapshot.take(server.data_dir, server.proc.pid if server.proc else None)


def _settled_equal(server, before: HostSnapshot, timeout: float = 15) -> HostSnapshot:
    """Wait (bounded) until the host state equals `before`; fail with the difference."""
    last = {}

    def same():
        nonlocal last
        now = snap(server)
        last = before.diff(now)
        return not last

    try:
        wait_until(same, timeout=timeout, interval=0.2, what="host state to return to the snapshot")
    except AssertionError:
        raise AssertionError(f"left behind on the host: {last}") from None
    return before


def _assert_new_state(before: HostSnapshot, after: HostSnapshot):
    diff = before.diff(after)
    # A live sandbox shows up everywhere but in the host's mount table: its mounts live in
    # its own mount namespace.
    for what in ("cgroups", "netns", "processes", "data_files"):
        assert diff.get(what, {}).get("+"), f"a live sandbox should add {what}: {diff}"
    assert "mounts" not in diff, f"sandbox mounts leaked into the host mount table: {diff['mounts']}"


def test_kill_leaves_nothing_behind(server):
    before = snap(server)
    sbx = Sandbox.create(template="base", timeout=120)
    sbx.commands.run("sleep 777", background=True)
    sbx.files.write("/home/user/data.bin", b"x" * 100_000)
    after_create = snap(server)
    _assert_new_state(before, after_create)
    new_procs = after_create.processes - before.processes
    if DRIVER == "vm":
        # The guest's processes are inside the VM; on the host the sandbox is its QEMU.
        assert any(f"/{sbx.sandbox_id}/disk.qcow2" in cmd for _, cmd in new_procs), new_procs
        assert any(f.endswith(f"/{sbx.sandbox_id}/disk.qcow2") for f in after_create.data_files)
    else:
        assert any("sleep 777" in cmd for _, cmd in new_procs), new_procs

    assert sbx.kill() is True
    _settled_equal(server, before)


def test_expiry_leaves_nothing_behind(server):
    before = snap(server)
    sbx = Sandbox.create(template="base", timeout=2)
    sbx.commands.run("sleep 778", background=True)
    _assert_new_state(before, snap(server))
    wait_until(lambda: not sbx.is_running(), timeout=20, interval=0.5, what="expiry")
    _settled_equal(server, before)


def test_sigterm_destroys_all_sandboxes(server):
    before = snap(server)
    sandboxes = [Sandbox.create(template="base", timeout=300) for _ in range(2)]
    for s in sandboxes:
        s.commands.run("sleep 779", background=True)
    _assert_new_state(before, snap(server))

    code = server.stop(signal.SIGTERM)
    assert code == 0, f"cella serve exited with {code} on SIGTERM"
    _settled_equal(server, before, timeout=5)

    server.start()
    for s in sandboxes:
        with server.api() as api:
            assert api.get(f"/sandboxes/{s.sandbox_id}").status_code == 404


def test_restart_after_crash_removes_leftovers(server):
    before = snap(server)
    sbx = Sandbox.create(template="base", timeout=300)
    sbx.commands.run("sleep 31337", background=True)
    sbx.files.write("/home/user/left.txt", "left behind")
    _assert_new_state(before, snap(server))

    server.kill9()
    time.sleep(0.5)
    crashed = snap(server)
    leftovers = before.diff(crashed)
    # Whatever the crash left (at least the sandbox's files and cgroups) ...
    assert leftovers, "a SIGKILLed server should leave its sandbox behind"

    server.start()
    # ... is gone before the restarted server accepts requests.
    diff = before.diff(snap(server))
    assert not diff, f"left behind after restart: {diff}"
    assert any("leftovers" in line for line in server.lines[-20:]), server.lines[-20:]

    with server.api() as api:
        assert api.get(f"/sandboxes/{sbx.sandbox_id}").status_code == 404
    ids = set()
    pages = Sandbox.list()
    while pages.has_next:
        ids |= {s.sandbox_id for s in pages.next_items()}
    assert sbx.sandbox_id not in ids
    assert not sbx.is_running()

    # And the restarted server works.
    fresh = Sandbox.create(template="base", timeout=60)
    try:
        assert fresh.commands.run("echo fresh").stdout == "fresh\n"
    finally:
        fresh.kill()
    _settled_equal(server, before)
