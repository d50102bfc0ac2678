"""Helpers for the end-to-end tests: run a real `cella serve`, talk to its REST API, and take
snapshots of the host state a sandbox may leave behind (for the cleanup proofs).

Why a real server and the official SDK: cella's promise is that the unmodified `e2b` SDK works
against it, and that a sandbox leaves nothing behind on the host. Neither can be shown with
mocks, so these tests start the release binary as root and drive it like a user would.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
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

# Which isolation driver the session server runs with (`cella serve --driver`): the suite runs
# once per driver (tests/e2e/run). `ISOLATIONS` is what `GET /sandboxes/{id}` may report.
DRIVER = os.environ.get("CELLA_E2E_DRIVER", "jail")
if DRIVER not in ("jail", "vm"):
    raise RuntimeError(f"CELLA_E2E_DRIVER={DRIVER!r}: expected jail or vm")
ISOLATIONS = {"jail": {"jail"}, "vm": {"microvm-kvm", "microvm-tcg"}}[DRIVER]
VM_ASSETS = Path(os.environ.get("CELLA_VM_ASSETS", "/var/lib/cella/vm"))
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
    # Extra `cella serve` flags (e.g. `--egress allowed`); the session server uses none.
    extra_args: list = field(default_factory=list)
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
            "--driver", DRIVER,
            # Sample metrics every second so the time-series test need not wait long.
            "--metrics-interval", "1",
            *self.extra_args,
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
#
# The proofs compare the whole host, but on a shared development machine other cella servers
# (and the jail driver's own tests) may run sandboxes at the same time. Processes are therefore
# attributed: a process outside the host namespaces belongs to *this* server when the first
# ancestor in the host namespaces is the server (or init, for the orphans of a killed server);
# a sandbox cgroup belongs to it unless it holds a process of someone else. What belongs to
# someone else is left out of the comparison; everything else counts.

NS_KINDS = ("pid", "net", "mnt")


def _ns_of(pid) -> Optional[dict]:
    try:
        return {k: os.readlink(f"/proc/{pid}/ns/{k}") for k in NS_KINDS}
    except OSError:
        return None


def _ppid(pid) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        # the command may contain spaces and parentheses: split after the last ')'
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


class _Procs:
    """One pass over /proc: namespaces, parents and ownership of every process."""

    def __init__(self, server_pid: Optional[int]):
        self.own = _ns_of("self")
        self.server_pid = server_pid
        self.ns = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                ns = _ns_of(name)
                if ns is not None:
                    self.ns[int(name)] = ns

    def sandboxed(self, pid: int) -> bool:
        ns = self.ns.get(pid)
        return ns is not None and ns != self.own

    def ours(self, pid: int) -> bool:
        """A sandbox process of this server (see the module comment)."""
        seen = 0
        cur = pid
        while cur and seen < 4096:
            seen += 1
            if not self.sandboxed(cur) and cur in self.ns:
                return cur == self.server_pid or cur == 1
            nxt = _ppid(cur)
            if nxt is None:
                return True  # gone meanwhile: count it (conservative)
            cur = nxt
        return True


def _is_vmm(cmd: str) -> bool:
    return cmd.split(" ", 1)[0].rsplit("/", 1)[-1].startswith("qemu-system")


def _fd_netns(pid) -> set:
    """Network namespaces a process holds open as descriptors (the VM driver keeps each VM's
    netns only that way: no process lives in it)."""
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("net:["):
            out.add(target)
    return out


def _host_mounts() -> set:
    # Mount IDs are stable for existing mounts, so the lines compare as-is.
    with open("/proc/self/mountinfo") as f:
        return set(f.read().splitlines())


def _cella_cgroup_dirs() -> list:
    """Sandbox-level cgroups (`cella/<instance>/<id>`, `cella-vm/<instance>/<id>` and below).
    The `<parent>/<instance>` levels are a server's, made at its start and kept: another
    server starting on this host meanwhile adds its own, which is not a leak."""
    out = []
    root = "/sys/fs/cgroup"
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            parts = os.path.relpath(p, root).split(os.sep)
            top = next((i for i, part in enumerate(parts) if "cella" in part), None)
            if top is not None and len(parts) - top >= 3:
                out.append(p)
    return out


def _cgroup_pids(path: str) -> set:
    for name in ("cgroup.procs", "tasks"):
        try:
            with open(os.path.join(path, name)) as f:
                return {int(x) for x in f.read().split()}
        except (OSError, ValueError):
            continue
    return set()


def _data_files(data_dir: Path) -> set:
    out = set()
    for dirpath, dirnames, filenames in os.walk(data_dir):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), data_dir)
            # The database's files are the server's, not a sandbox's.
            if rel.startswith("cella.db"):
                continue
            # The VM driver's per-template disk images are a cache, built by the first
            # sandbox of a template and kept by design (half-built `.tmp-*` ones count).
            if rel.startswith("vm/images/") and not rel.startswith("vm/images/.tmp-"):
                continue
            # So are its golden VMs (memory snapshots its clones start from), made once per
            # image by the first sandbox on a data dir.
            if rel.startswith("vm/snapshots/") and not rel.startswith("vm/snapshots/.tmp-"):
                continue
            out.add(rel)
    return out


_EGRESS_LINK_RE = re.compile(r"^cn[0-9a-f]{6}[0-9]+$")


def _egress_links() -> set:
    """Host ends of sandbox veths (`cella serve --egress allowed`): `cn<instance><slot>`."""
    try:
        return {n for n in os.listdir("/sys/class/net") if _EGRESS_LINK_RE.match(n)}
    except OSError:
        return set()


@dataclass(frozen=True)
class HostSnapshot:
    mounts: frozenset
    cgroups: frozenset
    netns: frozenset
    processes: frozenset
    data_files: frozenset
    links: frozenset = frozenset()

    @staticmethod
    def take(data_dir: Path, server_pid: Optional[int] = None) -> "HostSnapshot":
        procs = _Procs(server_pid)
        foreign = {p for p in procs.ns if procs.sandboxed(p) and not procs.ours(p)}
        # A microVM's QEMU runs in the host namespaces; its disk under our data dir (on its
        # command line) says whose it is, which also holds for the orphans of a killed server.
        disk_prefix = f"{data_dir}/vm/sandboxes/"
        vmms = {}
        for p in procs.ns:
            if not procs.sandboxed(p):
                cmd = _cmdline(p)
                if _is_vmm(cmd):
                    vmms[p] = cmd
        foreign |= {p for p, cmd in vmms.items() if disk_prefix not in cmd}
        cgroups = set()
        for d in _cella_cgroup_dirs():
            if not (_cgroup_pids(d) & foreign):
                cgroups.add(d)
        # A cgroup's children hold the processes: drop parents of foreign-only leaves too.
        foreign_ids = {os.path.basename(d) for d in _cella_cgroup_dirs() if _cgroup_pids(d) & foreign}
        cgroups = {d for d in cgroups if os.path.basename(d) not in foreign_ids}
        processes = {
            (p, _cmdline(p)) for p in procs.ns if procs.sandboxed(p) and p not in foreign
        }
        processes |= {(p, cmd) for p, cmd in vmms.items() if p not in foreign}
        netns = {ns["net"] for p, ns in procs.ns.items() if p not in foreign}
        if server_pid is not None:
            netns |= _fd_netns(server_pid)
        return HostSnapshot(
            mounts=frozenset(_host_mounts()),
            cgroups=frozenset(cgroups),
            netns=frozenset(netns),
            processes=frozenset(processes),
            data_files=frozenset(_data_files(data_dir)),
            links=frozenset(_egress_links()),
        )

    def diff(self, other: "HostSnapshot") -> dict:
        """What `other` has that `self` has not (+) and the reverse (-), per category."""
        out = {}
        for name in ("mounts", "cgroups", "netns", "processes", "data_files", "links"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out[name] = {"+": sorted(map(str, b - a)), "-": sorted(map(str, a - b))}
        return out


# --- a fake internet (network tests) ---
#
# This host has no internet, and tests must not send traffic anywhere but to addresses they
# made themselves. `FakeInternet` is a network namespace reachable from the host by a veth
# with addresses in TEST-NET-2 and TEST-NET-3, holding a tiny HTTP server (it answers with the
# address it was reached on) and a tiny DNS responder with static names.

FAKE_NAMES = {
    "allowed.test": "198.51.100.10",
    "www.allowed.test": "198.51.100.10",
    "other.test": "203.0.113.10",
    "api.test": "198.51.100.10",
}

_FAKE_HTTP = r"""
import http.server, socketserver
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from " + self.connection.getsockname()[0]).encode()
        self.send_response(200); self.send_header("content-length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", 80), H).serve_forever()
"""

# The fake resolver answers over UDP and TCP (RFC 7766 framing). BIG_NAME has 40 A records,
# more than a 512-byte datagram holds: over UDP it is truncated (TC, no answers), over TCP
# whole.
BIG_NAME = "big.test"
BIG_ADDRS = [f"198.51.100.{100 + k}" for k in range(40)]

_FAKE_DNS = r"""
import socket, struct, sys, json, threading
names = json.loads(sys.argv[2])
big_name, big_addrs = sys.argv[3], json.loads(sys.argv[4])

def reply(data, tcp):
    if len(data) < 12: return None
    qid, flags, qd = struct.unpack(">HHH", data[:6])
    i, labels = 12, []
    while i < len(data) and data[i]:
        n = data[i]; labels.append(data[i+1:i+1+n].decode("ascii", "replace")); i += 1 + n
    i += 1
    question = data[12:i+4]
    qtype = struct.unpack(">H", data[i:i+2])[0] if i + 2 <= len(data) else 0
    name = ".".join(labels).lower()
    ips = big_addrs if name == big_name else [names[name]] if name in names else []
    rcode = 0 if ips else 3
    tc = 0x0200 if len(ips) > 1 and not tcp else 0
    answers = []
    if qtype == 1 and not tc:
        answers = [b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(ip) for ip in ips]
    head = struct.pack(">HHHHHH", qid, 0x8180 | tc | rcode, 1, len(answers), 0, 0)
    return head + question + b"".join(answers)

def exactly(c, n):
    b = b""
    while len(b) < n:
        part = c.recv(n - len(b))
        if not part: return None
        b += part
    return b

def conn(c):
    with c:
        while True:
            n = exactly(c, 2)
            data = n and exactly(c, struct.unpack(">H", n)[0])
            if not data: return
            r = reply(data, True)
            if r is None: return
            c.sendall(struct.pack(">H", len(r)) + r)

def tcp():
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind((sys.argv[1], 53)); t.listen(64)
    while True:
        c, _ = t.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()

threading.Thread(target=tcp, daemon=True).start()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    data, peer = s.recvfrom(4096)
    r = reply(data, False)
    if r is not None: s.sendto(r, peer)
"""


class FakeInternet:
    """Namespace `ns` with eth0 = 198.51.100.10, .53 and 203.0.113.10; the host end `host_if`
    has 198.51.100.1 and 203.0.113.1."""

    def __init__(self):
        tag = secrets.token_hex(3)
        self.ns = f"cellafake{tag}"
        self.host_if = f"cfk{tag}"
        self.dns = "198.51.100.53"
        self.procs: list = []

    def _ip(self, *args: str, ns: bool = False):
        cmd = ["ip", "-n", self.ns, *args] if ns else ["ip", *args]
        subprocess.run(cmd, check=True, capture_output=True)

    def start(self) -> "FakeInternet":
        subprocess.run(["ip", "netns", "add", self.ns], check=True, capture_output=True)
        try:
            self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
            for a in ("198.51.100.1/24", "203.0.113.1/24"):
                self._ip("addr", "add", a, "dev", self.host_if)
            self._ip("link", "set", self.host_if, "up")
            self._ip("link", "set", "lo", "up", ns=True)
            for a in ("198.51.100.10/24", "198.51.100.53/24", "203.0.113.10/24"):
                self._ip("addr", "add", a, "dev", "eth0", ns=True)
            self._ip("link", "set", "eth0", "up", ns=True)
            self._ip("route", "add", "default", "via", "198.51.100.1", ns=True)
            run = ["ip", "netns", "exec", self.ns, "python3", "-c"]
            import json as _json
            self.procs.append(subprocess.Popen(run + [_FAKE_HTTP], stdin=subprocess.DEVNULL))
            self.procs.append(
                subprocess.Popen(
                    run + [_FAKE_DNS, self.dns, _json.dumps(FAKE_NAMES), BIG_NAME, _json.dumps(BIG_ADDRS)],
                    stdin=subprocess.DEVNULL,
                )
            )
            wait_until(self._http_up, timeout=10, what="fake internet HTTP server")
        except Exception:
            self.stop()
            raise
        return self

    def _http_up(self) -> bool:
        try:
            return httpx.get("http://198.51.100.10/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


def host_links() -> set:
    return set(os.listdir("/sys/class/net"))


def nft_table(table: str) -> Optional[str]:
    r = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


_SDK_ENV = ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL")


@contextlib.contextmanager
def sdk_env(server):
    """Point the e2b SDK (its environment variables) at `server`; restore them afterwards."""
    saved = {k: os.environ.get(k) for k in _SDK_ENV}
    os.environ.update({"E2B_API_KEY": server.key, "E2B_API_URL": server.url, "E2B_SANDBOX_URL": server.url})
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def private_server(prefix: str, extra_args=("--build", "")):
    """A started `cella serve` of its own (temp data dir, its own key) for tests that stop,
    crash or reconfigure a server; killed and removed afterwards. Depend on the session
    `server` fixture too, so that `base` is built on a fresh host."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f"cella-e2e-{prefix}-"))
    tmp.chmod(0o711)  # sandbox users (mapped uids) must be able to traverse it
    srv = Server(data_dir=tmp / "data", log_path=tmp / "server.log", extra_args=list(extra_args))
    srv.start()
    try:
        yield srv
    finally:
        srv.kill9()
        shutil.rmtree(tmp, ignore_errors=True)
