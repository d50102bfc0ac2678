"""`sudo` as E2B templates grant it (`user ALL=(ALL:ALL) NOPASSWD: ALL`), through the official
SDK. In a jail the agent's broker runs it (no_new_privs stops setuid); in a microVM the
template's real sudo does. Only what an E2B user can see is asserted, so both drivers pass."""

import json

import pytest
from e2b import CommandExitException, PtySize

from cella_e2e import wait_until
from test_pty import PtyReader

SLEEPERS = "ps -eo args= | grep -c '^sleep 1000$' || true"


def test_sudo_runs_as_root_and_as_other_users(sandbox):
    assert sandbox.commands.run("sudo id -u").stdout == "0\n"
    assert sandbox.commands.run("sudo whoami").stdout == "root\n"
    assert sandbox.commands.run("sudo -u nobody id -un").stdout == "nobody\n"
    sandbox.commands.run("sudo sh -c 'echo hi > /root/x'")
    assert sandbox.commands.run("cat /root/x", user="root").stdout == "hi\n"
    assert sandbox.commands.run("stat -c %U /root/x", user="root").stdout == "root\n"
    # The command's output streams are the caller's own.
    r = sandbox.commands.run("sudo sh -c 'echo out; echo err >&2'")
    assert (r.stdout, r.stderr) == ("out\n", "err\n")
    # What agents run: a root-only write into the system.
    sandbox.commands.run("sudo mkdir -p /opt/e2e && sudo touch /opt/e2e/ok")
    assert sandbox.commands.run("ls /opt/e2e").stdout == "ok\n"


def test_sudo_exit_codes_and_signals(sandbox):
    with pytest.raises(CommandExitException) as exc:
        sandbox.commands.run("sudo sh -c 'exit 7'")
    assert exc.value.exit_code == 7
    # Killed by a signal: the caller sees 128+N, as with a plain command.
    r = sandbox.commands.run("sudo sh -c 'kill -TERM $$'; echo status=$?")
    assert r.stdout == "status=143\n"
    with pytest.raises(CommandExitException) as exc:
        sandbox.commands.run("sudo /no/such/program")
    assert exc.value.exit_code != 0


def test_sudo_stdin(sandbox):
    handle = sandbox.commands.run("sudo cat", background=True, stdin=True)
    handle.send_stdin("to root's cat\n")
    handle.close_stdin()
    result = handle.wait()
    assert result.exit_code == 0
    assert result.stdout == "to root's cat\n"


def test_sudo_environment(sandbox):
    envs = {"E2E_SUDO_VAR": "kept"}
    plain = sandbox.commands.run("sudo env", envs=envs).stdout.splitlines()
    assert "E2E_SUDO_VAR=kept" not in plain
    assert "SUDO_USER=user" in plain
    assert "USER=root" in plain
    assert "HOME=/root" in plain
    kept = sandbox.commands.run("sudo -E env", envs=envs).stdout.splitlines()
    assert "E2E_SUDO_VAR=kept" in kept
    assert "SUDO_USER=user" in kept
    # Leading assignments set variables for the command.
    r = sandbox.commands.run("sudo E2E_SET=yes sh -c 'echo $E2E_SET'")
    assert r.stdout == "yes\n"
    # The caller's working directory carries over.
    assert sandbox.commands.run("sudo pwd", cwd="/tmp").stdout == "/tmp\n"


def test_sudo_login_shell_listing_and_pipelines(sandbox):
    assert sandbox.commands.run("sudo -i pwd").stdout == "/root\n"
    assert sandbox.commands.run("sudo -i sh -c 'echo $HOME'").stdout == "/root\n"
    assert sandbox.commands.run("sudo -s whoami").stdout == "root\n"
    r = sandbox.commands.run("echo piped | sudo tee /etc/e2e-tee >/dev/null && cat /etc/e2e-tee")
    assert r.stdout == "piped\n"
    assert sandbox.commands.run("sudo -V").stdout.startswith("Sudo version")
    listed = sandbox.commands.run("sudo -l").stdout
    assert "User user may run the following commands" in listed, listed
    assert "NOPASSWD: ALL" in listed, listed
    # No credentials are cached, so these succeed without doing anything.
    sandbox.commands.run("sudo -k && sudo -v -n")
    # A working directory the target cannot enter is only a warning, as with sudo.
    sandbox.commands.run("mkdir -p /tmp/private && chmod 700 /tmp/private")
    r = sandbox.commands.run("sudo -u nobody id -un", cwd="/tmp/private")
    assert r.stdout == "nobody\n"


def test_user_without_a_rule_is_refused(sandbox):
    # -M: no home directory, so bob's commands name a cwd.
    sandbox.commands.run("sudo useradd -M bob")
    with pytest.raises(CommandExitException) as exc:
        sandbox.commands.run("sudo -n true", user="bob", cwd="/")
    assert exc.value.exit_code != 0
    # bob stays bob: refusal did not run anything as root.
    assert sandbox.commands.run("id -un", user="bob", cwd="/").stdout == "bob\n"
    with pytest.raises(CommandExitException):
        sandbox.commands.run("sudo -n -u root touch /root/bob-was-here", user="bob", cwd="/")
    r = sandbox.commands.run("ls /root/bob-was-here || echo absent", user="root")
    assert r.stdout.endswith("absent\n")


def test_killing_a_sudo_command_ends_what_it_ran(sandbox):
    handle = sandbox.commands.run("sudo sleep 1000", background=True)

    def count():
        return int(sandbox.commands.run(SLEEPERS, user="root").stdout.strip() or 0)

    wait_until(lambda: count() == 1, timeout=20, interval=0.2, what="sudo's sleep running")
    assert sandbox.commands.run("ps -o user= -C sleep", user="root").stdout.split() == ["root"]
    assert sandbox.commands.kill(handle.pid) is True
    wait_until(lambda: count() == 0, timeout=20, interval=0.2, what="sleep gone after kill")


def test_sudo_in_a_pty(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    reader = PtyReader(handle)
    try:
        sandbox.pty.send_stdin(handle.pid, b"sudo whoami; echo done-$((1+1))\n")
        text = reader.wait_for("done-2")
        assert "root\r\ndone-2" in text, text
        # ^C reaches what sudo runs, and the shell survives.
        sandbox.pty.send_stdin(handle.pid, b"sudo sleep 1000\n")
        wait_until(
            lambda: sandbox.commands.run(SLEEPERS, user="root").stdout.strip() == "1",
            timeout=20,
            interval=0.2,
            what="sleep under sudo in the PTY",
        )
        sandbox.pty.send_stdin(handle.pid, b"\x03")
        wait_until(
            lambda: sandbox.commands.run(SLEEPERS, user="root").stdout.strip() == "0",
            timeout=20,
            interval=0.2,
            what="sleep ended by ^C",
        )
        # Typed only now: a real sudo relays input typed while its command runs to that command.
        sandbox.pty.send_stdin(handle.pid, b"echo alive-$((2+3))\n")
        reader.wait_for("alive-5")
    finally:
        sandbox.pty.kill(handle.pid)


@pytest.mark.driver("jail", "the broker's audit record; a microVM runs the template's real sudo")
def test_sudo_is_audited_and_explains_refusals(server, sandbox):
    sandbox.commands.run("sudo true sudo-audit-marker")
    sandbox.commands.run("sudo useradd -M carol")
    with pytest.raises(CommandExitException) as exc:
        sandbox.commands.run("sudo true", user="carol", cwd="/")
    assert "carol is not allowed to run sudo" in exc.value.stderr
    assert "NOPASSWD: ALL" in exc.value.stderr
    with pytest.raises(CommandExitException) as exc:
        sandbox.commands.run("sudo -g root true")
    assert exc.value.stderr == "sudo: unsupported option -g (cella's jail sudo)\n"
    assert "user ALL=(ALL:ALL) NOPASSWD: ALL" in sandbox.commands.run("sudo -l").stdout
    with pytest.raises(CommandExitException) as exc:
        sandbox.commands.run("sudoedit /etc/motd")
    assert "sudoedit is not supported" in exc.value.stderr

    def records():
        with server.api() as api:
            r = api.get("/audit", params={"sandboxID": sandbox.sandbox_id})
        assert r.status_code == 200, r.text
        rows = [e["detail"] for e in r.json() if e["kind"] == "sudo"]
        granted = [d for d in rows if "sudo-audit-marker" in json.dumps(d)]
        denied = [d for d in rows if d.get("user") == "carol"]
        return (granted, denied) if granted and denied else None

    granted, denied = wait_until(records, timeout=15, interval=0.3, what="sudo audit records")
    assert granted[0]["allowed"] is True
    assert granted[0]["uid"] == 1000 and granted[0]["target"] == "root"
    assert granted[0]["argv"] == ["true", "sudo-audit-marker"]
    assert denied[0]["allowed"] is False


@pytest.mark.driver("jail", "checks the jail's bind of the shim; a microVM has the real sudo")
def test_template_file_is_untouched(sandbox):
    # The shim is a read-only bind in the sandbox's own mount namespace (the template and the
    # writable layer keep the real sudo): even root cannot write through it.
    mounts = sandbox.commands.run("cat /proc/self/mountinfo").stdout
    line = next(m for m in mounts.splitlines() if m.split()[4] == "/usr/bin/sudo")
    assert " ro," in line or " ro " in line, line
    with pytest.raises(CommandExitException):
        sandbox.commands.run("cp /bin/true /usr/bin/sudo", user="root")
