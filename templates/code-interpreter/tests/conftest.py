"""Make the server's modules importable and start real servers for the integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))


class Server:
    def __init__(self, tmp: Path):
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "server.py"), "--host", "127.0.0.1", "--port", "0",
             "--cwd", str(tmp)],
            stdout=subprocess.PIPE,
            stderr=open(tmp / "server.log", "wb"),
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), f"server did not start: {line!r}"
        self.url = f"http://127.0.0.1:{int(line.split()[-1])}"
        self.log = tmp / "server.log"

    def request(self, method: str, path: str, body=None, timeout=60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def execute(self, code: str, http_timeout=60, **extra):
        status, text = self.request("POST", "/execute", {"code": code, **extra}, http_timeout)
        assert status == 200, text
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert lines and lines[-1] == {"type": "end_of_execution"}, lines
        return [e for e in lines if e["type"] != "keepalive"]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def kernel_available() -> bool:
    try:
        import ipykernel  # noqa: F401
        import jupyter_client  # noqa: F401
        import tornado  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not kernel_available():
        pytest.skip("ipykernel/jupyter_client/tornado are not installed in this Python")
    srv = Server(tmp_path_factory.mktemp("ci"))
    try:
        yield srv
    finally:
        srv.stop()


def of_type(events, kind):
    return [e for e in events if e["type"] == kind]


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


__all__ = ["of_type", "wait_until", "os"]
