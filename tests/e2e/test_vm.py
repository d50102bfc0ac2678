"""What only the microVM driver promises: a sandbox runs on its own guest kernel, and the
API says which isolation (and accelerator) it got."""

import os

import pytest

from cella_e2e import VM_ASSETS

pytestmark = pytest.mark.driver("vm", "a jail shares the host kernel by design")


def test_uname_shows_the_guest_kernel(server, sandbox):
    guest = sandbox.commands.run("uname -r").stdout.strip()
    assert guest, "uname -r printed nothing"
    assert guest != os.uname().release, f"uname -r inside shows the host's kernel {guest!r}"
    expected = VM_ASSETS / "kernel.release"
    if expected.is_file():
        assert guest == expected.read_text().strip()

    with server.api() as api:
        r = api.get(f"/sandboxes/{sandbox.sandbox_id}")
    assert r.status_code == 200, r.text
    assert r.json()["isolation"] in ("microvm-tcg", "microvm-kvm"), r.json()
