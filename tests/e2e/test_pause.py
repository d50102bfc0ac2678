"""Pause and resume through the official SDK, on both drivers.

cella pauses by freezing the sandbox's cgroup (a jail's processes, or a microVM's QEMU): the
processes stop in place and their memory stays resident on the host. These tests check what a
user can observe: the state the API reports, that nothing runs while paused (a background
counter does not advance), that memory survives (the same counter continues from its value
instead of restarting), that connect / traffic resumes, that auto-pause replaces the kill on
timeout, and that a kill while paused leaves nothing behind on the host."""

import glob
import signal
import time
import uuid

from e2b import Sandbox, SandboxQuery, SandboxState

from cella_e2e import DRIVER, HostSnapshot, wait_until

# A shell variable is the counter's only state: if it continues from where it stopped after a
# resume, the process and its memory survived. A tick every 0.2 s.
COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done"


def _count(sbx) -> int:
    out = sbx.commands.run("cat /tmp/count 2>/dev/null || echo 0").stdout.strip()
    return int(out or 0)


def _freezer_states(sandbox_id: str) -> set:
    """The host's view: freezer state of the sandbox's cgroup (v1 freezer.state, v2
    cgroup.freeze), wherever a cella driver put it."""
    states = set()
    for f in glob.glob(f"/sys/fs/cgroup/freezer/cella*/*/{sandbox_id}/freezer.state"):
        with open(f) as fh:
            states.add(fh.read().strip())
    for f in glob.glob(f"/sys/fs/cgroup/cella*/*/{sandbox_id}/cgroup.freeze") + glob.glob(
        f"/sys/fs/cgroup/unified/cella*/*/{sandbox_id}/cgroup.freeze"
    ):
        with open(f) as fh:
            states.add("FROZEN" if fh.read().strip() == "1" else "THAWED")
    return states


def _ids(paginator) -> set:
    out = set()
    while paginator.has_next:
        out |= {s.sandbox_id for s in paginator.next_items()}
    return out


def _snap(server) -> HostSnapshot:
    return HostSnapshot.take(server.data_dir, server.proc.pid if server.proc else None)


def _added(server, before: HostSnapshot, after: HostSnapshot) -> dict:
    """What `after` has that `before` had not. Host mounts count when they are this server's
    (under its data dir): cella's sandboxes mount nothing in the host's table, and other
    users of this shared host (other servers' tests) mount and unmount meanwhile."""
    out = {}
    for k, v in before.diff(after).items():
        added = v["+"]
        if k == "mounts":
            added = [m for m in added if str(server.data_dir) in m]
        if added:
            out[k] = added
    return out


def _settled(server, before: HostSnapshot, timeout: float = 15):
    last = {}

    def same():
        nonlocal last
        last = _added(server, before, _snap(server))
        return not last

    try:
        wait_until(same, timeout=timeout, interval=0.2, what="host state to return to the snapshot")
    except AssertionError:
        raise AssertionError(f"left behind on the host: {last}") from None


def test_pause_stops_progress_keeps_memory_and_connect_resumes(server):
    tag = uuid.uuid4().hex[:12]
    sbx = Sandbox.create(template="base", timeout=120, metadata={"run": tag})
    try:
        sbx.commands.run(COUNTER, background=True)
        wait_until(lambda: _count(sbx) >= 5, timeout=60, what="counter to run")
        c1 = _count(sbx)

        assert sbx.pause() is True
        # pausing a paused sandbox: the SDK maps E2B's 409 to False
        assert Sandbox.pause(sbx.sandbox_id) is False
        info = sbx.get_info()
        assert info.state == SandboxState.PAUSED
        assert info.lifecycle == {"on_timeout": "kill", "auto_resume": False}
        # a paused sandbox is not running for the SDK (the proxy answers it is not there)
        assert sbx.is_running() is False
        assert _freezer_states(sbx.sandbox_id) == {"FROZEN"}, "the sandbox's cgroup is not frozen"
        assert sbx.sandbox_id in _ids(Sandbox.list(query=SandboxQuery(metadata={"run": tag}, state=[SandboxState.PAUSED])))
        assert sbx.sandbox_id not in _ids(
            Sandbox.list(query=SandboxQuery(metadata={"run": tag}, state=[SandboxState.RUNNING]))
        )
        assert sbx.sandbox_id in _ids(Sandbox.list(query=SandboxQuery(metadata={"run": tag})))
        # metrics of a paused sandbox still answer
        sbx.get_metrics()

        time.sleep(4)  # 20 ticks if it were running

        again = Sandbox.connect(sbx.sandbox_id, timeout=120)
        assert again.sandbox_id == sbx.sandbox_id
        assert sbx.get_info().state == SandboxState.RUNNING
        assert _freezer_states(sbx.sandbox_id) == {"THAWED"}
        c2 = _count(again)
        assert c2 >= c1, f"the counter restarted: its memory did not survive ({c1} -> {c2})"
        assert c2 - c1 <= 10, f"the counter advanced while paused ({c1} -> {c2})"
        wait_until(lambda: _count(sbx) > c2, timeout=30, what="the counter to continue after resume")
        # both handles work again; new commands run
        assert sbx.commands.run("echo back").stdout == "back\n"
        assert again.is_running()
        # end time was set from the resume
        assert (sbx.get_info().end_at.timestamp() - time.time()) > 60
    finally:
        sbx.kill()


def test_a_command_running_across_a_pause_completes(server, sandbox):
    # Started before the pause, its output stream stalls while paused and continues after.
    h = sandbox.commands.run("sleep 1; echo before-done; sleep 1; echo after", background=True)
    assert sandbox.pause() is True
    time.sleep(3)
    Sandbox.connect(sandbox.sandbox_id, timeout=120)
    result = h.wait()
    assert result.exit_code == 0
    assert result.stdout == "before-done\nafter\n"


def test_auto_pause_on_timeout_then_connect(server):
    sbx = Sandbox.create(template="base", timeout=3, lifecycle={"on_timeout": "pause"})
    try:
        assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
        sbx.files.write("/home/user/kept.txt", "still here")
        h = sbx.commands.run("sleep 3600", background=True)
        wait_until(
            lambda: sbx.get_info().state == SandboxState.PAUSED,
            timeout=30,
            interval=0.5,
            what="auto-pause on timeout",
        )
        # paused, not killed; traffic does not wake it (no auto_resume)
        assert not sbx.is_running()
        assert sbx.get_info().state == SandboxState.PAUSED
        Sandbox.connect(sbx.sandbox_id, timeout=60)
        assert sbx.files.read("/home/user/kept.txt") == "still here"
        assert sbx.commands.run(f"kill -0 {h.pid} && echo alive").stdout == "alive\n"
    finally:
        sbx.kill()


def test_traffic_auto_resumes_with_auto_resume(server):
    sbx = Sandbox.create(template="base", timeout=3, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        sbx.commands.run("echo 41 > /tmp/v")
        wait_until(
            lambda: sbx.get_info().state == SandboxState.PAUSED,
            timeout=30,
            interval=0.5,
            what="auto-pause on timeout",
        )
        # the next request through the proxy resumes it
        assert sbx.commands.run("echo $(( $(cat /tmp/v) + 1 ))").stdout == "42\n"
        assert sbx.get_info().state == SandboxState.RUNNING
    finally:
        sbx.kill()


def test_kill_while_paused_leaves_nothing_behind(server):
    before = _snap(server)
    sbx = Sandbox.create(template="base", timeout=120)
    sbx.commands.run("sleep 779", background=True)
    sbx.files.write("/home/user/data.bin", b"x" * 100_000)
    assert sbx.pause() is True
    assert _freezer_states(sbx.sandbox_id) == {"FROZEN"}
    assert sbx.kill() is True
    with server.api() as api:
        assert api.get(f"/sandboxes/{sbx.sandbox_id}").status_code == 404
    _settled(server, before)


def test_paused_sandboxes_outlive_a_clean_stop_and_a_crash(server):
    """What a restart does to paused sandboxes, exactly: at SIGTERM a paused sandbox is written
    to disk and is paused again after the start (a microVM with its memory: its processes are
    back after the connect; a jail with its files only: its processes end like every other).
    A pause writes the same copy to disk at once, so after a SIGKILL the next start thaws and
    removes the frozen cgroup the crash left and the sandbox is paused again from that copy."""
    before = _snap(server)
    a = Sandbox.create(template="base", timeout=300)
    a.commands.run("sleep 781", background=True)
    a.files.write("/home/user/a.txt", "a\n")
    a.files.write("/tmp/in-memory.txt", "tmpfs\n")
    assert a.pause() is True
    assert server.stop(signal.SIGTERM) == 0
    # nothing of it runs or is mounted: only its files are kept
    left = _added(server, before, _snap(server))
    assert set(left) <= {"data_files"}, left
    assert any(f.startswith(f"snapshots/.paused/{a.sandbox_id}") for f in left.get("data_files", [])), left
    server.start()
    with server.api() as api:
        r = api.get(f"/sandboxes/{a.sandbox_id}")
        assert r.status_code == 200 and r.json()["state"] == "paused", r.text
    back = Sandbox.connect(a.sandbox_id, timeout=120)
    assert back.files.read("/home/user/a.txt") == "a\n"
    memory = DRIVER == "vm"
    assert ("sleep 781" in back.commands.run("ps -eo args").stdout) == memory
    if memory:
        # the guest's /tmp is a tmpfs: only its memory kept it
        assert back.files.read("/tmp/in-memory.txt") == "tmpfs\n"
    back.kill()
    _settled(server, before)

    b = Sandbox.create(template="base", timeout=300)
    b.commands.run("sleep 782", background=True)
    b.files.write("/home/user/b.txt", "b\n")
    b.files.write("/tmp/in-memory.txt", "tmpfs b\n")
    assert b.pause() is True
    server.kill9()
    time.sleep(0.5)
    assert _freezer_states(b.sandbox_id) == {"FROZEN"}, "the crash should leave the frozen cgroup"
    server.start()
    # the frozen processes are gone; the pause's copy is all that is left of it
    left = _added(server, before, _snap(server))
    assert set(left) <= {"data_files"}, left
    assert any(f.startswith(f"snapshots/.paused/{b.sandbox_id}") for f in left.get("data_files", [])), left
    with server.api() as api:
        r = api.get(f"/sandboxes/{b.sandbox_id}")
        assert r.status_code == 200 and r.json()["state"] == "paused", r.text
    back = Sandbox.connect(b.sandbox_id, timeout=120)
    assert back.files.read("/home/user/b.txt") == "b\n"
    assert ("sleep 782" in back.commands.run("ps -eo args").stdout) == memory
    if memory:
        assert back.files.read("/tmp/in-memory.txt") == "tmpfs b\n"
    back.kill()
    _settled(server, before)
    fresh = Sandbox.create(template="base", timeout=60)
    try:
        assert fresh.commands.run("echo fresh").stdout == "fresh\n"
    finally:
        fresh.kill()
    _settled(server, before)


def test_pause_errors_and_deprecated_resume(server, sandbox):
    with server.api() as api:
        # unknown sandbox: 404 (the SDK raises SandboxNotFoundException)
        r = api.post("/sandboxes/inosuchsandbox000000000/pause", json={})
        assert r.status_code == 404, r.text
        sid = sandbox.sandbox_id
        # resume of a running sandbox: 409
        r = api.post(f"/sandboxes/{sid}/resume", json={"timeout": 30})
        assert r.status_code == 409, r.text
        assert api.post(f"/sandboxes/{sid}/pause", json={"memory": True}).status_code == 204
        r = api.post(f"/v2/sandboxes/{sid}/connect", json={"timeout": 60})
        assert r.status_code == 201, r.text
        r = api.post(f"/v2/sandboxes/{sid}/connect", json={"timeout": 60})
        assert r.status_code == 200, r.text
        assert api.post(f"/sandboxes/{sid}/pause").status_code == 204
        r = api.post(f"/sandboxes/{sid}/resume", json={"timeout": 60})
        assert r.status_code == 201, r.text
        assert r.json()["sandboxID"] == sid
    assert sandbox.commands.run("echo ok").stdout == "ok\n"


def test_pause_resume_latency(server, sandbox):
    """Numbers, not limits: how long pause and resume take through the API (printed)."""
    sandbox.commands.run("sleep 3600", background=True)
    n = 20
    with server.api() as api:
        sid = sandbox.sandbox_id
        pauses, resumes = [], []
        for _ in range(n):
            t = time.monotonic()
            assert api.post(f"/sandboxes/{sid}/pause").status_code == 204
            pauses.append((time.monotonic() - t) * 1000)
            t = time.monotonic()
            assert api.post(f"/v2/sandboxes/{sid}/connect", json={"timeout": 120}).status_code == 201
            resumes.append((time.monotonic() - t) * 1000)
    pauses.sort()
    resumes.sort()
    print(
        f"\n[{DRIVER}] n={n} pause via API: p50 {pauses[n // 2]:.1f} ms, max {pauses[-1]:.1f} ms; "
        f"resume (connect) p50 {resumes[n // 2]:.1f} ms, max {resumes[-1]:.1f} ms"
    )
    assert sandbox.commands.run("echo ok").stdout == "ok\n"


def test_filesystem_pause_frees_the_sandbox_and_connect_cold_starts_it(server):
    """E2B's mode="filesystem": the files are kept, the processes and their memory are not;
    nothing of the sandbox runs on the host while it is paused; connect starts it again under
    the same ID, and the SDK's existing handle (its token) keeps working."""
    before = _snap(server)
    sbx = Sandbox.create(template="base", timeout=120, metadata={"fs-pause": "1"})
    try:
        sbx.files.write("/home/user/kept.txt", "on disk\n")
        sbx.commands.run("sleep 600", background=True)
        assert sbx.pause(mode="filesystem") is True
        info = sbx.get_info()
        assert info.state == SandboxState.PAUSED
        assert info.metadata == {"fs-pause": "1"}
        assert sbx.is_running() is False
        assert _freezer_states(sbx.sandbox_id) == set(), "its cgroup is still there"
        # Nothing of it runs or is mounted on the host any more: only its files (the snapshot
        # layer and the paused record) are in the data dir.
        wait_until(
            lambda: set(_added(server, before, _snap(server))) <= {"data_files"},
            timeout=15, interval=0.2, what="the paused sandbox's processes to go",
        )
        added = _added(server, before, _snap(server)).get("data_files", [])
        assert any(f.startswith(f"snapshots/.paused/{sbx.sandbox_id}") for f in added), added
        assert Sandbox.pause(sbx.sandbox_id) is False, "already paused: 409"

        again = Sandbox.connect(sbx.sandbox_id, timeout=120)
        assert again.sandbox_id == sbx.sandbox_id
        assert sbx.get_info().state == SandboxState.RUNNING
        # the old handle works (same token), the files are there, the processes are not
        assert sbx.files.read("/home/user/kept.txt") == "on disk\n"
        assert "sleep 600" not in sbx.commands.run("ps -eo args").stdout
        assert again.commands.run("echo back").stdout == "back\n"
    finally:
        sbx.kill()


def test_a_paused_sandbox_outlives_a_server_restart(server):
    """A paused sandbox is written to disk when the server stops and is paused again after it
    starts: connect brings it back with its files (its processes end with the old server)."""
    from cella_e2e import private_server, sdk_env

    with private_server("pause-restart") as srv:
        with sdk_env(srv):
            paused = Sandbox.create(template="base", timeout=120, metadata={"keep": "yes"})
            running = Sandbox.create(template="base", timeout=120)
            paused.files.write("/home/user/kept.txt", "across the restart\n")
            assert paused.pause() is True
        assert srv.stop() == 0
        srv.start()
        with sdk_env(srv):
            listed = {s.sandbox_id: s for s in _ids_list(Sandbox.list())}
            assert set(listed) == {paused.sandbox_id}, "the running one ends, the paused one stays"
            assert listed[paused.sandbox_id].state == SandboxState.PAUSED
            assert listed[paused.sandbox_id].metadata == {"keep": "yes"}
            back = Sandbox.connect(paused.sandbox_id, timeout=120)
            assert back.files.read("/home/user/kept.txt") == "across the restart\n"
            # the SDK handle from before the restart still works
            assert paused.commands.run("echo ok").stdout == "ok\n"
            del running
            back.kill()
        assert srv.stop() == 0


def _ids_list(paginator) -> list:
    out = []
    while paginator.has_next:
        out += paginator.next_items()
    return out
