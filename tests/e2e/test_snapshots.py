"""Snapshots and fork through the official SDK.

Every snapshot keeps a sandbox's *files* (E2B's `mode="filesystem"`): its driver copies what
the sandbox changed on top of its template while the sandbox is frozen, and sandboxes started
from the snapshot get the template plus that layer. The microVM driver also keeps its *memory*
(E2B's default, `mode="full"`): a fork, and a sandbox started from such a snapshot with the
same limits, resume the source's processes. The jail cannot: its snapshots and forks cold-start.
These tests check what a user can observe: files, deletions and ownership come along, later
writes of the source do not, the source keeps running, processes come along exactly where the
driver keeps memory, list/delete behave as the SDK expects, other API keys see nothing, and
nothing of a fork's or a deleted snapshot's layer stays on the host once unused."""

import os
import subprocess
import uuid

import pytest
from e2b import Sandbox
from e2b.exceptions import InvalidArgumentException, NotFoundException, SandboxException

from cella_e2e import CELLA, DRIVER, private_server, sdk_env, wait_until

# Whether this driver's snapshots and forks keep memory (processes run on).
MEMORY = DRIVER == "vm"


def _snapshot_dirs(server) -> set:
    root = server.data_dir / "snapshots"
    return {e for e in os.listdir(root) if not e.startswith(".")} if root.is_dir() else set()


def _all(paginator) -> list:
    out = []
    while paginator.has_next:
        out += paginator.next_items()
    return out


def test_a_snapshot_starts_new_sandboxes_with_the_files(server):
    tag = uuid.uuid4().hex[:10]
    before = _snapshot_dirs(server)
    src = Sandbox.create(template="base", timeout=300, metadata={"run": tag})
    started = []
    snap = None
    try:
        src.files.write("/home/user/data.txt", "hello from the source\n")
        r = src.commands.run(
            "rm /etc/motd && mkdir -p /home/user/proj/sub && echo deep > /home/user/proj/sub/f && "
            "ln -s /home/user/proj/sub/f /home/user/link && echo root-file > /root/r",
            user="root",
        )
        assert r.exit_code == 0, r.stderr
        # a background process: kept only by a memory snapshot
        src.commands.run("sleep 600", background=True)

        snap = src.create_snapshot(name=f"snap-{tag}")
        assert snap.snapshot_id == f"snap-{tag}:default"
        assert snap.names == [f"snap-{tag}:default"]
        # the source runs on
        assert src.is_running()
        assert src.commands.run("echo still").stdout == "still\n"
        # a later write of the source is not in the snapshot
        src.files.write("/home/user/data.txt", "changed after the snapshot\n")

        new = Sandbox.create(snap.snapshot_id, timeout=120)
        started.append(new)
        assert new.sandbox_id != src.sandbox_id
        assert new.files.read("/home/user/data.txt") == "hello from the source\n"
        assert not new.files.exists("/etc/motd")
        assert new.files.read("/home/user/proj/sub/f") == "deep\n"
        r = new.commands.run("readlink /home/user/link; stat -c %U /home/user/data.txt; cat /root/r", user="root")
        assert r.stdout.split() == ["/home/user/proj/sub/f", "user", "root-file"]
        # processes come along only with memory (the jail cold-starts)
        assert ("sleep 600" in new.commands.run("ps -eo args").stdout) == MEMORY
        # it is an ordinary sandbox: writable, and its writes are its own
        new.files.write("/home/user/mine.txt", "x")
        assert not src.files.exists("/home/user/mine.txt")
        assert src.files.read("/home/user/data.txt") == "changed after the snapshot\n"
        # the name without tag, and the snapshot's own listing
        by_name = Sandbox.create(f"snap-{tag}", timeout=120)
        started.append(by_name)
        assert by_name.files.read("/home/user/data.txt") == "hello from the source\n"

        listed = _all(src.list_snapshots())
        assert [s.snapshot_id for s in listed] == [snap.snapshot_id]
        assert snap.snapshot_id in [s.snapshot_id for s in _all(Sandbox.list_snapshots())]
        assert _all(Sandbox.list_snapshots(sandbox_id=new.sandbox_id)) == []
        assert [s.snapshot_id for s in _all(Sandbox.list_snapshots(name=f"snap-{tag}"))] == [snap.snapshot_id]

        # a snapshot of a sandbox started from a snapshot stacks on it
        new.commands.run("rm /home/user/proj/sub/f && echo second > /home/user/second", user="root")
        snap2 = new.create_snapshot()
        assert snap2.snapshot_id.endswith(":default") and snap2.names == []
        third = Sandbox.create(snap2.snapshot_id, timeout=120)
        started.append(third)
        assert third.files.read("/home/user/second") == "second\n"
        assert third.files.read("/home/user/data.txt") == "hello from the source\n"
        assert third.files.read("/home/user/mine.txt") == "x"
        assert not third.files.exists("/home/user/proj/sub/f")

        # delete: True, then False; new creates fail, running sandboxes keep their files
        assert Sandbox.delete_snapshot(snap.snapshot_id) is True
        assert Sandbox.delete_snapshot(snap.snapshot_id) is False
        with pytest.raises(Exception) as e:
            Sandbox.create(snap.snapshot_id, timeout=60)
        assert "not found" in str(e.value).lower()
        assert new.files.read("/home/user/data.txt") == "hello from the source\n"
        assert Sandbox.delete_snapshot(snap2.snapshot_id) is True
        assert third.files.read("/home/user/data.txt") == "hello from the source\n"
        assert snap.snapshot_id not in [s.snapshot_id for s in _all(Sandbox.list_snapshots())]
    finally:
        for s in started + [src]:
            s.kill()
        if snap is not None:
            Sandbox.delete_snapshot(snap.snapshot_id)
    # deleted and unused: their layers are gone from the host
    wait_until(lambda: _snapshot_dirs(server) == before, timeout=20, what="snapshot layers to go")


def test_snapshot_modes_names_and_unknown_sandboxes(server, sandbox):
    # an explicit full snapshot where the driver cannot keep memory is refused, not degraded
    if MEMORY:
        full = sandbox.create_snapshot(mode="full")
        assert Sandbox.delete_snapshot(full.snapshot_id) is True
    else:
        with pytest.raises(SandboxException) as e:
            sandbox.create_snapshot(mode="full")
        assert "memory" in str(e.value)
    info = sandbox.create_snapshot(mode="filesystem")
    try:
        assert info.snapshot_id.endswith(":default")
    finally:
        assert Sandbox.delete_snapshot(info.snapshot_id) is True
    with pytest.raises(SandboxException) as e:
        sandbox.create_snapshot(name="Not A Name")
    assert "name" in str(e.value)
    with pytest.raises(SandboxException) as e:
        sandbox.create_snapshot(name="base")
    assert "template" in str(e.value)
    with pytest.raises(NotFoundException):
        Sandbox.create_snapshot("inosuchsandbox0000000")
    assert Sandbox.delete_snapshot("snosuchsnapshot000000:default") is False
    with pytest.raises(InvalidArgumentException):
        sandbox.fork(count=21)


def test_snapshots_are_per_api_key(server, sandbox):
    out = subprocess.run(
        [str(CELLA), "keys", "create", "--data-dir", str(server.data_dir), "--name", "snap-other"],
        capture_output=True, text=True, check=True,
    )
    other = out.stdout.strip().splitlines()[-1].strip()
    info = sandbox.create_snapshot(name=f"mine-{uuid.uuid4().hex[:8]}")
    try:
        # another key neither lists, starts, deletes nor snapshots what is not its own
        assert info.snapshot_id not in [s.snapshot_id for s in _all(Sandbox.list_snapshots(api_key=other))]
        with pytest.raises(Exception) as e:
            Sandbox.create(info.snapshot_id, api_key=other, timeout=60)
        assert "not found" in str(e.value).lower()
        assert Sandbox.delete_snapshot(info.snapshot_id, api_key=other) is False
        with pytest.raises(NotFoundException):
            Sandbox.create_snapshot(sandbox.sandbox_id, api_key=other)
        with pytest.raises(NotFoundException):
            Sandbox.fork(sandbox.sandbox_id, api_key=other)
    finally:
        assert Sandbox.delete_snapshot(info.snapshot_id) is True


def test_fork_starts_copies_that_diverge(server):
    tag = uuid.uuid4().hex[:10]
    before = _snapshot_dirs(server)
    src = Sandbox.create(template="base", timeout=300, metadata={"run": tag}, envs={"FROM_CREATE": "yes"})
    forks = []
    try:
        src.files.write("/home/user/state.txt", "before fork\n")
        forks = src.fork(count=2, timeout=120)
        assert len(forks) == 2
        for f in forks:
            assert isinstance(f, Sandbox), f
        ids = {f.sandbox_id for f in forks}
        assert len(ids) == 2 and src.sandbox_id not in ids
        a, b = forks
        for f in forks:
            assert f.files.read("/home/user/state.txt") == "before fork\n"
            assert f.get_info().metadata == {"run": tag}
            assert f.commands.run("echo $FROM_CREATE").stdout == "yes\n"
        a.files.write("/home/user/state.txt", "a\n")
        b.files.write("/home/user/state.txt", "b\n")
        src.files.write("/home/user/state.txt", "src\n")
        assert a.files.read("/home/user/state.txt") == "a\n"
        assert b.files.read("/home/user/state.txt") == "b\n"
        assert src.files.read("/home/user/state.txt") == "src\n"
        # a fork's snapshot is not the user's: never listed
        assert _all(src.list_snapshots()) == []
        # the class form, default count
        one = Sandbox.fork(src.sandbox_id, timeout=60)
        assert len(one) == 1 and isinstance(one[0], Sandbox)
        forks.append(one[0])
        assert one[0].files.read("/home/user/state.txt") == "src\n"
        with pytest.raises(NotFoundException):
            Sandbox.fork("inosuchsandbox0000000")
    finally:
        for f in forks:
            if isinstance(f, Sandbox):
                f.kill()
        src.kill()
    wait_until(lambda: _snapshot_dirs(server) == before, timeout=20, what="fork snapshot layers to go")


def _count(sbx) -> int:
    r = sbx.commands.run("cat /tmp/count 2>/dev/null || echo -1")
    return int(r.stdout.strip() or -1)


@pytest.mark.skipif(not MEMORY, reason="the jail driver keeps no memory in snapshots")
def test_memory_fork_resumes_processes_as_a_sandbox_of_its_own(server):
    """A microVM fork wakes where its source was: a background loop keeps counting from its
    in-memory value, tmpfs contents are there, the agent knows the process (commands.list,
    connect); and it is its own sandbox: its hostname, a fresh CRNG (two forks read different
    random bytes), the host's clock, its own access token (the source's is refused)."""
    import time

    import httpx

    src = Sandbox.create(template="base", timeout=300, envs={"FROM_CREATE": "yes"})
    forks = []
    try:
        loop = src.commands.run(
            "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done",
            background=True,
        )
        src.files.write("/dev/shm/only-in-memory", "shm\n")
        wait_until(lambda: _count(src) >= 5, timeout=30, what="the loop")
        forks = src.fork(count=2, timeout=120)
        assert all(isinstance(f, Sandbox) for f in forks), forks
        a, b = forks
        for f in forks:
            n0 = _count(f)
            # tmpfs survived (it is memory), and the counter had counted before the fork
            assert n0 >= 5, n0
            assert f.files.read("/dev/shm/only-in-memory") == "shm\n"
            wait_until(lambda: _count(f) > n0, timeout=20, what="the loop to go on")
            procs = f.commands.list()
            assert loop.pid in [p.pid for p in procs], procs
            assert f.commands.run("hostname").stdout.strip() == f.sandbox_id
            assert f.commands.run("echo $FROM_CREATE").stdout == "yes\n"
            guest_now = int(f.commands.run("date +%s").stdout)
            assert abs(guest_now - time.time()) < 10, guest_now
            # its own access token works; the source's opens nothing in the fork
            assert f._envd_access_token != src._envd_access_token
            for token, status in ((f._envd_access_token, 200), (src._envd_access_token, 401)):
                r = httpx.post(
                    f"{server.url}/process.Process/List",
                    json={},
                    headers={"E2b-Sandbox-Id": f.sandbox_id, "X-Access-Token": token},
                )
                assert r.status_code == status, (r.status_code, r.text)
        rand = [f.commands.run("head -c 16 /dev/urandom | od -An -tx1").stdout for f in forks]
        assert rand[0] != rand[1], "two forks share a CRNG state"
        # still independent sandboxes: killing the loop in one leaves the other's and the source's
        a.commands.kill(loop.pid)
        n_b = _count(b)
        wait_until(lambda: _count(b) > n_b, timeout=20, what="b's loop")
        n_src = _count(src)
        wait_until(lambda: _count(src) > n_src, timeout=20, what="the source's loop")
    finally:
        for f in forks:
            if isinstance(f, Sandbox):
                f.kill()
        src.kill()


def test_snapshots_survive_a_server_restart_and_a_crash(server):
    """Unlike a pause, a snapshot is on disk: after a clean restart and after a kill -9 it still
    starts sandboxes; the fork snapshot and the interrupted state of the crashed run are gone."""
    with private_server("snap") as srv:
        with sdk_env(srv):
            src = Sandbox.create(template="base", timeout=120)
            src.files.write("/home/user/kept.txt", "across restarts\n")
            snap = src.create_snapshot(name="restart")
            forks = src.fork(count=1, timeout=120)
            assert isinstance(forks[0], Sandbox)
            assert len(_snapshot_dirs(srv)) == 2  # the named one and the fork's
        assert srv.stop() == 0
        srv.start()
        with sdk_env(srv):
            # the fork's snapshot went with its fork (the restart killed it); the named one stayed
            assert len(_snapshot_dirs(srv)) == 1
            assert [s.snapshot_id for s in _all(Sandbox.list_snapshots())] == [snap.snapshot_id]
            new = Sandbox.create(snap.snapshot_id, timeout=120)
            assert new.files.read("/home/user/kept.txt") == "across restarts\n"
        srv.kill9()
        srv.start()
        with sdk_env(srv):
            new = Sandbox.create(snap.snapshot_id, timeout=120)
            assert new.files.read("/home/user/kept.txt") == "across restarts\n"
            assert Sandbox.delete_snapshot(snap.snapshot_id) is True
            new.kill()
            wait_until(lambda: not _snapshot_dirs(srv), timeout=20, what="the deleted snapshot to go")
        assert srv.stop() == 0
