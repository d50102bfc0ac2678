"""Interactive terminals (PTY) through the official SDK."""

import threading
import time

from e2b import PtySize

from cella_e2e import wait_until


class PtyReader:
    """Collects a PTY's output in a thread (the SDK's handle iterates blocking)."""

    def __init__(self, handle):
        self.handle = handle
        self.buf = bytearray()
        self.lock = threading.Lock()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.handle.wait(on_pty=self._add)
        except Exception as e:  # the end of a killed PTY surfaces as an exception
            self.error = e

    def _add(self, chunk: bytes):
        with self.lock:
            self.buf += chunk

    def text(self) -> str:
        with self.lock:
            return self.buf.decode("utf-8", "replace")

    def wait_for(self, needle: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.text()
            if needle in t:
                return t
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in PTY output: {self.text()!r}")


def test_pty_input_output_resize_kill(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    reader = PtyReader(handle)

    sandbox.pty.send_stdin(handle.pid, b"echo hi-$((40+2))\n")
    # The computed value proves a shell ran the input (the echoed input line holds "$((40+2))").
    reader.wait_for("hi-42")

    sandbox.pty.send_stdin(handle.pid, b"tty; stty size; echo TERM=$TERM\n")
    # (the echoed input line holds "TERM=$TERM"; the output has the value)
    out = reader.wait_for("TERM=xterm-256color")
    assert "/dev/pts/" in out
    assert "24 80" in out

    sandbox.pty.resize(handle.pid, PtySize(rows=50, cols=132))
    sandbox.pty.send_stdin(handle.pid, b"stty size\n")
    reader.wait_for("50 132")

    # A PTY is a process like any other.
    assert any(p.pid == handle.pid for p in sandbox.commands.list())

    assert sandbox.pty.kill(handle.pid) is True
    reader.thread.join(20)
    assert not reader.thread.is_alive(), "PTY stream did not end after kill"
    assert all(p.pid != handle.pid for p in sandbox.commands.list())


def test_pty_ctrl_c_interrupts_foreground_command(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    reader = PtyReader(handle)
    sandbox.pty.send_stdin(handle.pid, b"sleep 1000; echo after-$((1+1))\n")
    # ^C must reach the running sleep, not a shell that is still starting (slow under
    # emulation) and would take it as an edit of the typed-ahead line.
    wait_until(
        lambda: sandbox.commands.run("pgrep -x sleep || true").stdout.strip(),
        timeout=60,
        interval=0.5,
        what="the sleep to run in the PTY",
    )
    sandbox.pty.send_stdin(handle.pid, b"\x03")  # ^C: SIGINT to the foreground process group
    sandbox.pty.send_stdin(handle.pid, b"echo alive-$((2+3))\n")
    reader.wait_for("alive-5")
    assert "after-2" not in reader.text()
    sandbox.pty.kill(handle.pid)
    reader.thread.join(20)
