"""Sandbox lifecycle, listing, timeouts, isolation between sandboxes and between API keys, and
the REST API's error answers."""

import time
import uuid

import httpx
import pytest
from e2b import AuthenticationException, NotFoundException, Sandbox, SandboxException, SandboxQuery

from cella_e2e import KEY_RE, new_api_key, wait_until


def _ids(paginator) -> set:
    out = set()
    while paginator.has_next:
        out |= {s.sandbox_id for s in paginator.next_items()}
    return out


def test_list_and_metadata_filter(server):
    tag = uuid.uuid4().hex[:12]
    a = Sandbox.create(template="base", timeout=120, metadata={"suite": "e2e", "run": tag, "role": "a"})
    b = Sandbox.create(template="base", timeout=120, metadata={"suite": "e2e", "run": tag, "role": "b"})
    try:
        assert {a.sandbox_id, b.sandbox_id} <= _ids(Sandbox.list())
        assert _ids(Sandbox.list(query=SandboxQuery(metadata={"run": tag}))) == {a.sandbox_id, b.sandbox_id}
        assert _ids(Sandbox.list(query=SandboxQuery(metadata={"run": tag, "role": "b"}))) == {b.sandbox_id}
        assert _ids(Sandbox.list(query=SandboxQuery(metadata={"run": "no-such-" + tag}))) == set()

        info = a.get_info()
        assert info.sandbox_id == a.sandbox_id
        assert info.metadata == {"suite": "e2e", "run": tag, "role": "a"}
        assert info.cpu_count >= 1
        assert info.memory_mb == 512
        assert info.end_at > info.started_at
    finally:
        a.kill()
        b.kill()
    assert not ({a.sandbox_id, b.sandbox_id} & _ids(Sandbox.list()))


def test_kill(server):
    sbx = Sandbox.create(template="base", timeout=120)
    assert sbx.is_running()
    assert sbx.kill() is True
    assert not sbx.is_running()
    assert Sandbox.kill(sbx.sandbox_id) is False  # already gone
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id)
    with server.api() as api:
        assert api.get(f"/sandboxes/{sbx.sandbox_id}").status_code == 404


def test_connect_returns_a_working_handle(server, sandbox):
    again = Sandbox.connect(sandbox.sandbox_id)
    assert again.sandbox_id == sandbox.sandbox_id
    sandbox.files.write("/tmp/shared", "via-first")
    assert again.files.read("/tmp/shared") == "via-first"
    assert again.commands.run("echo ok").stdout == "ok\n"


def test_timeout_expiry_and_set_timeout(server):
    # The short one is created last: a create may take longer than 3 s (a microVM under
    # emulation), and its timeout runs from when it is ready.
    shortened = Sandbox.create(template="base", timeout=300)
    short = Sandbox.create(template="base", timeout=3)
    shortened.set_timeout(3)
    assert short.is_running() and shortened.is_running()
    time.sleep(6)
    for sbx in (short, shortened):
        assert not sbx.is_running(), f"{sbx.sandbox_id} still running after its timeout"
        with pytest.raises(NotFoundException):
            Sandbox.connect(sbx.sandbox_id)
        assert sbx.sandbox_id not in _ids(Sandbox.list())


def test_set_timeout_extends(server):
    sbx = Sandbox.create(template="base", timeout=3)
    try:
        sbx.set_timeout(120)
        time.sleep(5)
        assert sbx.is_running()
        assert sbx.commands.run("echo still-here").stdout == "still-here\n"
    finally:
        sbx.kill()


def test_two_sandboxes_are_isolated(server):
    a = Sandbox.create(template="base", timeout=120)
    b = Sandbox.create(template="base", timeout=120)
    try:
        a.files.write("/home/user/only-in-a", "a")
        a.commands.run("echo a > /tmp/only-in-a")
        assert not b.files.exists("/home/user/only-in-a")
        assert b.commands.run("test -e /tmp/only-in-a || echo absent").stdout == "absent\n"

        b.commands.run("sleep 4242", background=True)
        assert "sleep 4242" in b.commands.run("ps -eo args").stdout
        ps_a = a.commands.run("ps -eo pid,args").stdout
        assert "sleep 4242" not in ps_a
        # A sees its own init as PID 1, and few processes in total (a microVM's guest kernel
        # threads, shown as [name], are not sandbox processes).
        procs = [line.split(None, 1) for line in ps_a.splitlines()[1:]]
        pids = [int(p[0]) for p in procs]
        assert 1 in pids
        user_procs = [p for p in procs if not p[1].startswith("[")]
        assert len(user_procs) < 10, ps_a

        # No network path between them: each sandbox has its own loopback.
        b.commands.run("python3 -m http.server 8765 --bind 127.0.0.1 >/dev/null 2>&1", background=True)
        probe = "python3 -c \"import socket; socket.create_connection(('127.0.0.1', 8765), 2); print('open')\""
        # Python needs a moment to start (seconds under emulation): wait until b serves.
        wait_until(
            lambda: b.commands.run(probe + " || true").stdout == "open\n",
            timeout=60,
            interval=0.5,
            what="the server in b",
        )
        with pytest.raises(Exception):
            a.commands.run(probe)

        hostnames = {a.commands.run("hostname").stdout, b.commands.run("hostname").stdout}
        assert len(hostnames) == 2
    finally:
        a.kill()
        b.kill()


def test_second_api_key_cannot_see_or_kill(server, sandbox):
    r = server.cli("keys", "create", "--name", "e2e-second", "--data-dir", str(server.data_dir))
    assert r.returncode == 0, r.stderr.decode()
    m = KEY_RE.search(r.stdout.decode())
    assert m, f"no key in output: {r.stdout!r}"
    other = m.group(0)
    assert other != server.key

    # The other key works ...
    with server.api(other) as api:
        listed = api.get("/v2/sandboxes")
        assert listed.status_code == 200, listed.text
        assert sandbox.sandbox_id not in {s["sandboxID"] for s in listed.json()}
        # ... but cannot see, extend or kill the first key's sandbox.
        assert api.get(f"/sandboxes/{sandbox.sandbox_id}").status_code == 404
        assert api.post(f"/sandboxes/{sandbox.sandbox_id}/timeout", json={"timeout": 5}).status_code == 404
        assert api.post(f"/v2/sandboxes/{sandbox.sandbox_id}/connect", json={"timeout": 60}).status_code == 404
        assert api.delete(f"/sandboxes/{sandbox.sandbox_id}").status_code == 404
    assert sandbox.sandbox_id not in _ids(Sandbox.list(api_key=other))
    assert Sandbox.kill(sandbox.sandbox_id, api_key=other) is False
    with pytest.raises(NotFoundException):
        Sandbox.connect(sandbox.sandbox_id, api_key=other)
    assert sandbox.is_running()
    assert sandbox.commands.run("echo survived").stdout == "survived\n"

    # Its own sandboxes are invisible to the first key.
    mine = Sandbox.create(template="base", timeout=60, api_key=other)
    try:
        assert mine.sandbox_id not in _ids(Sandbox.list())
        assert mine.sandbox_id in _ids(Sandbox.list(api_key=other))
    finally:
        mine.kill()


def test_wrong_key_is_401(server):
    with server.api(new_api_key()) as api:
        r = api.get("/v2/sandboxes")
        assert r.status_code == 401
        assert r.json()["code"] == 401
        assert r.json()["message"]
        assert api.post("/v2/sandboxes", json={"templateID": "base"}).status_code == 401
    with httpx.Client(base_url=server.url) as anon:
        assert anon.get("/v2/sandboxes").status_code == 401
    with pytest.raises(AuthenticationException):
        Sandbox.create(template="base", api_key=new_api_key())


def test_unknown_template_is_404(server):
    with server.api() as api:
        r = api.post("/v2/sandboxes", json={"templateID": "no-such-template", "timeout": 30})
    assert r.status_code == 404, r.text
    body = r.json()
    assert body["code"] == 404
    assert "no-such-template" in body["message"]
    # The SDK maps a 404 from create to a SandboxException carrying the status.
    with pytest.raises(SandboxException) as exc:
        Sandbox.create(template="no-such-template")
    assert exc.value.status_code == 404
    assert "no-such-template" in str(exc.value)


@pytest.mark.parametrize("timeout", ["abc", -5, 1.5e12])
def test_bad_timeout_is_400_naming_the_field(server, timeout):
    with server.api() as api:
        r = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": timeout})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == 400
    assert "timeout" in body["message"]


def test_unknown_sandbox_is_404(server):
    with server.api() as api:
        assert api.get("/sandboxes/inosuchsandbox0000000").status_code == 404
        assert api.delete("/sandboxes/inosuchsandbox0000000").status_code == 404
        assert api.get("/sandboxes/..%2F..%2Fetc").status_code == 404


def test_proxy_answers_unknown_sandbox_with_sdk_message(server, sandbox):
    # The SDK recognises a gone sandbox by this 502 body text.
    r = httpx.get(
        server.url + "/health",
        headers={"E2b-Sandbox-Id": "inosuchsandbox0000000", "E2b-Sandbox-Port": "49983"},
    )
    assert r.status_code == 502
    assert "was not found" in r.text
