"""Session fixtures: one `cella serve` (root, release build) for the whole run, configured for
the official `e2b` SDK through E2B_API_KEY / E2B_API_URL / E2B_SANDBOX_URL."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from cella_e2e import CELLA, DRIVER, Server, sdk_env

# The SDK reads these lazily (at each call), so setting them once here is enough.


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "driver(name, reason): the test checks something only the `name` driver has "
        "(jail or vm); on the other driver it is skipped with `reason`",
    )


def pytest_report_header(config):
    return f"cella driver: {DRIVER} (CELLA_E2E_DRIVER)"


def pytest_runtest_setup(item):
    for mark in item.iter_markers(name="driver"):
        name, reason = mark.args
        if name != DRIVER:
            pytest.skip(f"{name} driver only: {reason}")


@pytest.fixture(scope="session")
def server(pytestconfig, request):
    if os.geteuid() != 0:
        pytest.skip("the e2e tests need root (cella serve creates namespaces and cgroups)")
    if not CELLA.exists():
        pytest.fail(f"{CELLA} is missing: run scripts/build first")
    tmp = Path(tempfile.mkdtemp(prefix="cella-e2e-"))
    # mkdtemp makes it 0700; sandbox users (mapped uids) must be able to traverse it.
    tmp.chmod(0o711)
    data_dir = tmp / "data"
    log_path = Path(os.environ.get("CELLA_E2E_LOG", tmp / "server.log"))
    srv = Server(data_dir=data_dir, log_path=log_path)

    capman = pytestconfig.pluginmanager.getplugin("capturemanager")

    def echo(line: str):
        # Shown live (outside pytest's capture) so a first-run template build is visible.
        with capman.global_and_fixture_disabled():
            sys.stderr.write(f"[cella serve] {line}\n")
            sys.stderr.flush()

    echo(f"driver: {DRIVER}; log: {log_path}; data dir: {data_dir}")
    srv.start(echo=echo)
    try:
        with sdk_env(srv):
            yield srv
    finally:
        code = srv.stop()
        echo(f"server stopped with exit code {code}")
        assert code == 0, f"cella serve exited with {code} after SIGTERM; see {log_path}"
        if not os.environ.get("CELLA_E2E_KEEP"):
            # Keep the server log of a failed run; a clean run leaves nothing behind.
            if request.session.testsfailed and log_path.parent == tmp:
                shutil.rmtree(data_dir, ignore_errors=True)
            else:
                shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def sandbox(server):
    from e2b import Sandbox

    sbx = Sandbox.create(template="base", timeout=300)
    try:
        yield sbx
    finally:
        try:
            sbx.kill()
        except Exception:
            pass
