"""The `cella` CLI against the running server (CELLA_URL / CELLA_API_KEY)."""

import json
import os
import tempfile

from e2b import Sandbox


def _ids_of(server) -> set:
    with server.api() as api:
        return {s["sandboxID"] for s in api.get("/v2/sandboxes").json()}


def test_run_prints_output_and_cleans_up(server):
    before = _ids_of(server)
    r = server.cli("run", "--", "echo", "hi")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"hi\n"
    # The sandbox `run` made is destroyed again.
    assert _ids_of(server) == before


def test_run_passes_the_exit_code_and_stderr(server):
    r = server.cli("run", "--", "sh", "-c", "echo to-err >&2; exit 3")
    assert r.returncode == 3
    assert b"to-err" in r.stderr
    r = server.cli("run", "--", "false")
    assert r.returncode == 1


def test_run_shell_line_env_and_user(server):
    r = server.cli("run", "--env", "GREETING=hello there", "--", 'echo "$GREETING from $(whoami)"')
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"hello there from user\n"
    r = server.cli("run", "--user", "root", "--", "id", "-u")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"0\n"


def test_bad_key_is_one_readable_line(server):
    r = server.cli("ls", key="e2b_" + "0" * 40)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.startswith("cella: ")
    assert err.count("\n") == 1, err
    assert "panicked" not in err


def test_ls_json_and_info(server, sandbox):
    r = server.cli("ls", "--json")
    assert r.returncode == 0, r.stderr.decode()
    listed = json.loads(r.stdout)
    assert isinstance(listed, list)
    assert sandbox.sandbox_id in {s["sandboxID"] for s in listed}

    r = server.cli("ls")
    assert r.returncode == 0
    assert sandbox.sandbox_id in r.stdout.decode()

    r = server.cli("info", sandbox.sandbox_id, "--json")
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["sandboxID"] == sandbox.sandbox_id


def test_cp_both_directions(server, sandbox):
    payload = os.urandom(200_000) + b"\nend\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "up.bin")
        with open(src, "wb") as f:
            f.write(payload)
        r = server.cli("cp", src, f"{sandbox.sandbox_id}:/home/user/up.bin")
        assert r.returncode == 0, r.stderr.decode()
        assert sandbox.files.read("/home/user/up.bin", format="bytes") == payload

        sandbox.files.write("/home/user/down.txt", "from the sandbox\n")
        dst = os.path.join(tmp, "down.txt")
        r = server.cli("cp", f"{sandbox.sandbox_id}:/home/user/down.txt", dst)
        assert r.returncode == 0, r.stderr.decode()
        with open(dst, "rb") as f:
            assert f.read() == b"from the sandbox\n"

        r = server.cli("cp", f"{sandbox.sandbox_id}:/home/user/missing", dst + ".x")
        assert r.returncode == 1
        assert r.stderr.decode().startswith("cella: ")
        assert not os.path.exists(dst + ".x")


def test_exec_kill_and_audit(server):
    sbx = Sandbox.create(template="base", timeout=120)
    sid = sbx.sandbox_id
    try:
        r = server.cli("exec", sid, "--", "sh", "-c", "echo exec-ok; exit 4")
        assert r.returncode == 4
        assert r.stdout == b"exec-ok\n"

        r = server.cli("audit", "--sandbox", sid)
        assert r.returncode == 0, r.stderr.decode()
        out = r.stdout.decode()
        assert "sandbox.create" in out
        assert "process.start" in out

        r = server.cli("audit", "--sandbox", sid, "--json")
        assert r.returncode == 0, r.stderr.decode()
        rows = json.loads(r.stdout)
        assert rows and all(e["sandboxId"] == sid for e in rows)

        r = server.cli("kill", sid)
        assert r.returncode == 0, r.stderr.decode()
        assert not sbx.is_running()
    finally:
        sbx.kill()


def _one_error_line(r) -> str:
    """A failed CLI call: exit 1 and exactly one `cella: ...` line on stderr."""
    err = r.stderr.decode()
    assert r.returncode == 1, (r.returncode, err)
    assert err.startswith("cella: ") and err.count("\n") == 1, err
    assert "panicked" not in err
    return err


def test_pause_info_resume_exec(server):
    sbx = Sandbox.create(template="base", timeout=120)
    sid = sbx.sandbox_id
    try:
        sbx.commands.run("echo kept > /tmp/mark")
        r = server.cli("pause", sid)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == f"{sid}\n".encode()

        r = server.cli("info", sid)
        assert r.returncode == 0, r.stderr.decode()
        state = [l for l in r.stdout.decode().splitlines() if l.startswith("State:")]
        assert state and state[0].split()[-1] == "paused", r.stdout.decode()
        r = server.cli("info", sid, "--json")
        assert json.loads(r.stdout)["state"] == "paused"

        # Pausing twice is the server's 409, as one line.
        err = _one_error_line(server.cli("pause", sid))
        assert "409" in err, err

        r = server.cli("resume", sid, "--timeout", "90")
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == f"{sid}\n".encode()
        assert r.stderr == b"", r.stderr.decode()
        r = server.cli("info", sid, "--json")
        assert json.loads(r.stdout)["state"] == "running"

        r = server.cli("exec", sid, "--", "cat", "/tmp/mark")
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == b"kept\n"

        # Resuming a running sandbox is not an error, but says so.
        r = server.cli("resume", sid)
        assert r.returncode == 0, r.stderr.decode()
        assert b"was not paused" in r.stderr
    finally:
        sbx.kill()


def test_pause_and_resume_of_unknown_id_is_one_line(server):
    err = _one_error_line(server.cli("pause", "inotthere0000"))
    assert "not found" in err, err
    err = _one_error_line(server.cli("resume", "inotthere0000"))
    assert "not found" in err, err
    err = _one_error_line(server.cli("pause", "../etc"))
    assert "invalid sandbox ID" in err, err


def test_network_without_egress_is_the_servers_409(server, sandbox):
    # The session server runs `--egress none`.
    err = _one_error_line(server.cli("network", sandbox.sandbox_id, "--allow-out", "1.1.1.1"))
    assert "--egress none" in err and "HTTP 409" in err, err
    # Without rule flags it shows the rules in force.
    r = server.cli("network", sandbox.sandbox_id)
    assert r.returncode == 0, r.stderr.decode()
    assert "Internet:  no" in r.stdout.decode(), r.stdout.decode()
    # Bad rules are the server's 400 naming the field (validated before the egress check).
    err = _one_error_line(server.cli("network", sandbox.sandbox_id, "--deny-out", "example.com"))
    assert "denyOut" in err, err


def test_create_egress_flags_reach_the_server(server):
    # `--egress none` validates the rules and keeps them off; a domain in denyOut or an IPv6
    # allowOut entry is a 400. (Rules in force are tested against an egress server in
    # test_network.py::test_cli_network_and_create_flags.)
    err = _one_error_line(server.cli("create", "--deny-out", "example.com"))
    assert "network.denyOut" in err, err
    err = _one_error_line(server.cli("create", "--allow-out", "2001:db8::1"))
    assert "allowOut" in err, err
    r = server.cli(
        "create", "--timeout", "60", "--allow-out", "1.1.1.1", "--deny-out", "10.0.0.0/8",
        "--no-internet", "--json",
    )
    assert r.returncode == 0, r.stderr.decode()
    sid = json.loads(r.stdout)["sandboxID"]
    try:
        r = server.cli("info", sid, "--json")
        assert r.returncode == 0, r.stderr.decode()
        assert json.loads(r.stdout)["allowInternetAccess"] is False
    finally:
        server.cli("kill", sid)


def test_snapshot_create_ls_start_fork_rm(server):
    sbx = Sandbox.create(template="base", timeout=120)
    sid = sbx.sandbox_id
    started = []
    name = "cli-" + os.urandom(4).hex()
    try:
        sbx.files.write("/home/user/mark", "from cli\n")
        r = server.cli("snapshot", "create", sid, "--name", name)
        assert r.returncode == 0, r.stderr.decode()
        snap = r.stdout.decode().strip()
        assert snap == f"{name}:default"
        r = server.cli("snapshot", "ls", "--sandbox", sid)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout.decode().split() == [snap]

        r = server.cli("create", "--template", snap)
        assert r.returncode == 0, r.stderr.decode()
        new = r.stdout.decode().strip()
        started.append(new)
        r = server.cli("exec", new, "--", "cat", "/home/user/mark")
        assert (r.returncode, r.stdout) == (0, b"from cli\n"), r.stderr.decode()

        r = server.cli("fork", sid, "--count", "2", "--timeout", "60")
        assert r.returncode == 0, r.stderr.decode()
        forks = r.stdout.decode().split()
        assert len(forks) == 2 and sid not in forks
        started += forks
        for f in forks:
            r = server.cli("exec", f, "--", "cat", "/home/user/mark")
            assert (r.returncode, r.stdout) == (0, b"from cli\n"), r.stderr.decode()

        r = server.cli("snapshot", "rm", snap)
        assert (r.returncode, r.stdout.decode().strip()) == (0, snap), r.stderr.decode()
        err = _one_error_line(server.cli("snapshot", "rm", snap))
        assert "not found" in err, err
        err = _one_error_line(server.cli("fork", sid, "--count", "50"))
        assert "count" in err, err
        err = _one_error_line(server.cli("snapshot", "create", "inotthere0000"))
        assert "not found" in err, err
    finally:
        for s in started:
            server.cli("kill", s)
        sbx.kill()
