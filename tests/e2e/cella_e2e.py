"""Helpers for the end-to-end tests: run a real `cella serve`, talk to its REST API, and take
snapshots of the host state a sandbox may leave behind (for the cleanup proofs).

Why a real server and the official SDK: cella's promise is that the unmodified `e2b` SDK works
against it, and that a sandbox leaves nothing behind on the host. Neither can be shown with
mocks, so these tests start the release binary as root and drive it like a user would.
"""

from __future__ import annotations

import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import httpx

ROOT = Path(__file__).resolve().parents[2]
CELLA = ROOT / "target" / "release" / "cella"
TEMPLATE_DIR = Path(os.environ.get("CELLA_E2E_TEMPLATE_DIR", "/var/lib/cella/templates"))
READY_RE = re.compile(r"cella listening on (http://\S+)")
KEY_RE = re.compile(r"e2b_[0-9a-f]{40}")

# The first start builds the `base` template with debootstrap: minutes on this machine.
FIRST_START_DEADLINE_S = float(os.environ.get("CELLA_E2E_START_DEADLINE", 20 * 60))
STOP_DEADLINE_S = 60.0


def new_api_key() -> str:
    return "e2b_" + secrets.token_hex(20)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], object], timeout: float, interval: float = 0.1, what: str = ""):
    """Poll `pred` until it returns a truthy value; return it, or raise AssertionError."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}: {last!r}")
        time.sleep(interval)


@dataclass
class Server:
    """A `cella serve` process on a free port with its own data dir and API key."""

    data_dir: Path
    log_path: Path
    key: str = field(default_factory=new_api_key)
    port: int = field(default_factory=free_port)
    proc: Optional[subprocess.Popen] = None
    lines: list = field(default_factory=list)
    _reader: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        env = dict(os.environ)
        env["CELLA_API_KEY"] = self.key
        env.setdefault("RUST_LOG", "info")
        return env

    def start(self, echo: Optional[Callable[[str], None]] = None, deadline_s: float = FIRST_START_DEADLINE_S):
        """Start the server and block until it prints its listening line.

        Every output line goes to the log file; while waiting, lines are also passed to
        `echo` (the terminal) so that a first-run template build shows its progress."""
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        cmd = [
            str(CELLA), "serve",
            "--listen", f"127.0.0.1:{self.port}",
            "--data-dir", str(self.data_dir),
            "--template-dir", str(TEMPLATE_DIR),
        ]
        log = open(self.log_path, "a", buffering=1)
        log.write(f"\n=== {time.strftime('%H:%M:%S')} starting: {' '.join(cmd)}\n")
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            # Own session: a Ctrl-C in the terminal reaches pytest, whose teardown then stops
            # the server with SIGTERM, instead of killing both at once.
            start_new_session=True,
        )
        ready: "queue.Queue[Optional[str]]" = queue.Queue()
        proc = self.proc

        def pump():
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.lines.append(line)
                log.write(line + "\n")
                ready.put(line)
            ready.put(None)
            log.close()

        self._reader = threading.Thread(target=pump, name="cella-serve-output", daemon=True)
        self._reader.start()

        end = time.monotonic() + deadline_s
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                self.kill9()
                raise RuntimeError(f"cella serve did not become ready within {deadline_s}s; see {self.log_path}")
            try:
                line = ready.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                code = proc.wait()
                tail = "\n".join(self.lines[-30:])
                raise RuntimeError(f"cella serve exited with {code} before it was ready:\n{tail}")
            if echo is not None:
                echo(line)
            m = READY_RE.search(line)
            if m:
                assert m.group(1) == self.url, f"server listens on {m.group(1)}, expected {self.url}"
                return

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_DEADLINE_S) -> int:
        """Send `sig` and wait for the process to exit; return its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"cella serve did not exit within {timeout}s of signal {sig}")
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def kill9(self) -> None:
        """SIGKILL the server, as a crash would (its sandboxes are left behind)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)

    # --- REST ---

    def api(self, key: Optional[str] = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"X-API-Key": key if key is not None else self.key},
            timeout=60,
        )

    def cli(self, *args: str, key: Optional[str] = None, timeout: float = 120, input: Optional[bytes] = None):
        """Run the `cella` CLI against this server."""
        env = dict(os.environ)
        env["CELLA_URL"] = self.url
        env["CELLA_API_KEY"] = key if key is not None else self.key
        return subprocess.run(
            [str(CELLA), *args], env=env, capture_output=True, timeout=timeout, input=input
        )


# --- host state snapshots (cleanup proofs) ---

def _own_ns() -> dict:
    return {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("pid", "net", "mnt")}


def _host_mounts() -> set:
    # Mount IDs are stable for existing mounts, so the lines compare as-is.
    with open("/proc/self/mountinfo") as f:
        return set(f.read().splitlines())


def _cella_cgroups() -> set:
    out = set()
    root = "/sys/fs/cgroup"
    for ctrl in sorted(os.listdir(root)):
        base = os.path.join(root, ctrl)
        if not os.path.isdir(base):
            continue
        for dirpath, dirnames, _ in os.walk(base):
            # cgroupfs trees are small; prune anything that cannot contain "cella"
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if "cella" in p:
                    out.add(p)
    return out


def _net_namespaces() -> set:
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                out.add(os.readlink(f"/proc/{pid}/ns/net"))
            except OSError:
                pass
    return out


def _foreign_processes() -> set:
    """Processes in a pid, net or mount namespace other than the host's (ours): sandbox
    processes. (Processes in the host namespaces come and go for unrelated reasons.)"""
    own = _own_ns()
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            ns = {k: os.readlink(f"/proc/{pid}/ns/{k}") for k in own}
            if ns == own:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            out.add((int(pid), cmd))
        except OSError:
            pass
    return out


def _data_files(data_dir: Path) -> set:
    out = set()
    for dirpath, dirnames, filenames in os.walk(data_dir):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), data_dir)
            # The database's journal files are the server's, not a sandbox's.
            if rel.startswith("cella.db"):
                continue
            out.add(rel)
    return out


@dataclass(frozen=True)
class HostSnapshot:
    mounts: frozenset
    cgroups: frozenset
    netns: frozenset
    processes: frozenset
    data_files: frozenset

    @staticmethod
    def take(data_dir: Path) -> "HostSnapshot":
        return HostSnapshot(
            mounts=frozenset(_host_mounts()),
            cgroups=frozenset(_cella_cgroups()),
            netns=frozenset(_net_namespaces()),
            processes=frozenset(_foreign_processes()),
            data_files=frozenset(_data_files(data_dir)),
        )

    def diff(self, other: "HostSnapshot") -> dict:
        """What `other` has that `self` has not (+) and the reverse (-), per category."""
        out = {}
        for name in ("mounts", "cgroups", "netns", "processes", "data_files"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out[name] = {"+": sorted(map(str, b - a)), "-": sorted(map(str, a - b))}
        return out


def dump_server_log(server: Server, n: int = 40) -> str:
    return "\n".join(server.lines[-n:])


def which(name: str) -> Optional[str]:
    return shutil.which(name)


def eprint(*a):
    print(*a, file=sys.stderr)
