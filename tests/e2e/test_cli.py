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
