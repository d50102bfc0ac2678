"""Commands through the official SDK: output, exit codes, streaming, env, cwd, users, stdin."""

import socket
import threading
import time

import pytest
from e2b import CommandExitException, Sandbox

from cella_e2e import DRIVER, ISOLATIONS


def test_create_reports_isolation_and_runs_echo(server, sandbox):
    with server.api() as api:
        r = api.get(f"/sandboxes/{sandbox.sandbox_id}")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["sandboxID"] == sandbox.sandbox_id
    assert info["templateID"]
    assert info["isolation"] in ISOLATIONS
    assert sandbox.is_running()

    result = sandbox.commands.run("echo hi")
    assert result.stdout == "hi\n"
    assert result.stderr == ""
    assert result.exit_code == 0


def test_nonzero_exit_raises_with_code_and_output(sandbox):
    with pytest.raises(CommandExitException) as exc:
        sandbox.commands.run("echo partial; echo broken >&2; exit 3")
    assert exc.value.exit_code == 3
    assert exc.value.stdout == "partial\n"
    assert exc.value.stderr == "broken\n"


def test_streaming_callbacks_receive_chunks_live_and_in_order(sandbox):
    events = []  # (monotonic time, stream, text)

    def on_out(s):
        events.append((time.monotonic(), "out", s))

    def on_err(s):
        events.append((time.monotonic(), "err", s))

    cmd = "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 1; done"
    result = sandbox.commands.run(cmd, on_stdout=on_out, on_stderr=on_err)
    done = time.monotonic()

    out = "".join(t for _, s, t in events if s == "out")
    err = "".join(t for _, s, t in events if s == "err")
    assert out == "out1\nout2\nout3\n" == result.stdout
    assert err == "err1\nerr2\nerr3\n" == result.stderr
    # Streaming, not buffered until exit: the first line arrives while the command still has
    # seconds of sleeping to do.
    first_out = next(t for t, s, _ in events if s == "out")
    assert done - first_out > 1.0, events


def test_sandbox_and_command_env_vars(server):
    sbx = Sandbox.create(template="base", timeout=120, envs={"SBX_VAR": "from-create", "SHARED": "sandbox"})
    try:
        assert sbx.commands.run("echo $SBX_VAR").stdout == "from-create\n"
        r = sbx.commands.run('echo "$SBX_VAR $CMD_VAR $SHARED"', envs={"CMD_VAR": "per-cmd", "SHARED": "command"})
        # Per-command values override the sandbox's.
        assert r.stdout == "from-create per-cmd command\n"
        # ... without changing them for later commands.
        assert sbx.commands.run('echo "$SHARED ${CMD_VAR:-unset}"').stdout == "sandbox unset\n"
    finally:
        sbx.kill()


def test_cwd(sandbox):
    assert sandbox.commands.run("pwd").stdout == "/home/user\n"
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    with pytest.raises(Exception):
        sandbox.commands.run("pwd", cwd="/no/such/dir")


def test_users(sandbox):
    assert sandbox.commands.run("whoami").stdout == "user\n"
    assert sandbox.commands.run("id -u").stdout == "1000\n"
    assert sandbox.commands.run("echo $HOME").stdout == "/home/user\n"
    assert sandbox.commands.run("whoami", user="root").stdout == "root\n"
    assert sandbox.commands.run("id -u", user="root").stdout == "0\n"
    # root inside is not root outside: host-owned kernel knobs stay out of reach, and a
    # hostname change stays inside the sandbox's UTS namespace. (In a microVM root owns the
    # guest kernel's knobs, which are not the host's: a sysrq there reaches only the guest.)
    if DRIVER == "jail":
        with pytest.raises(CommandExitException):
            sandbox.commands.run("echo h > /proc/sysrq-trigger", user="root")
    host_name = socket.gethostname()
    sandbox.commands.run("hostname e2e-renamed || true", user="root")
    assert socket.gethostname() == host_name
    # the default user cannot write root's files
    with pytest.raises(CommandExitException):
        sandbox.commands.run("echo x > /etc/e2e-not-allowed")


def test_background_command_stdin_list_and_kill(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    pid = handle.pid
    assert pid > 0

    chunks = []
    got_both = threading.Event()
    failure = []

    def consume():
        try:
            handle.wait(on_stdout=lambda s: (chunks.append(s), "".join(chunks).count("\n") >= 2 and got_both.set()))
        except CommandExitException as e:
            failure.append(e)
        except Exception as e:  # reported below
            failure.append(e)

    t = threading.Thread(target=consume, daemon=True)
    t.start()

    handle.send_stdin("first line\n")
    sandbox.commands.send_stdin(pid, "second line\n")
    assert got_both.wait(30), f"stdin was not echoed back: {chunks!r}"
    assert "".join(chunks) == "first line\nsecond line\n"

    listed = sandbox.commands.list()
    mine = [p for p in listed if p.pid == pid]
    assert mine, f"pid {pid} not in {listed}"
    assert mine[0].cmd == "/bin/bash"
    assert mine[0].args == ["-l", "-c", "cat"]

    assert sandbox.commands.kill(pid) is True
    t.join(30)
    assert not t.is_alive(), "the command stream did not end after kill"
    assert failure and isinstance(failure[0], CommandExitException), failure
    assert failure[0].exit_code != 0
    assert all(p.pid != pid for p in sandbox.commands.list())
    # Killing it again finds nothing.
    assert sandbox.commands.kill(pid) is False


def test_connect_to_running_command(sandbox):
    handle = sandbox.commands.run("sleep 2; echo late", background=True)
    again = sandbox.commands.connect(handle.pid)
    result = again.wait()
    assert result.stdout == "late\n"
    assert result.exit_code == 0
