"""The audit log records what happened to a sandbox, from the API and from inside it."""

import json

from e2b import Sandbox

from cella_e2e import wait_until


def test_audit_log_has_the_sandbox_story(server):
    sbx = Sandbox.create(template="base", timeout=120)
    sid = sbx.sandbox_id
    sbx.commands.run("echo audit-marker-$((6*7))")
    sbx.files.write("/home/user/audited.txt", "x")
    sbx.kill()

    wanted = {"sandbox.create", "process.start", "file.write", "sandbox.kill"}
    seen = []

    def entries():
        with server.api() as api:
            r = api.get("/audit", params={"sandboxID": sid})
        assert r.status_code == 200, r.text
        rows = r.json()
        seen[:] = sorted({e["kind"] for e in rows})
        return rows if wanted <= set(seen) else None

    try:
        rows = wait_until(entries, timeout=15, interval=0.3, what="audit entries")
    except AssertionError:
        raise AssertionError(f"audit of {sid} has kinds {seen}, missing {sorted(wanted - set(seen))}") from None
    for e in rows:
        assert e["sandboxId"] == sid
        assert {"id", "time", "actor", "kind", "detail"} <= set(e)
    by_kind = {}
    for e in rows:
        by_kind.setdefault(e["kind"], []).append(e)

    # Ordered as it happened.
    ids = [e["id"] for e in rows]
    assert ids == sorted(ids)
    first = {k: min(e["id"] for e in v) for k, v in by_kind.items()}
    assert first["sandbox.create"] < first["process.start"] < first["sandbox.kill"]
    assert first["file.write"] < first["sandbox.kill"]

    # The details say what: the command line and the file path.
    starts = json.dumps([e["detail"] for e in by_kind["process.start"]])
    assert "audit-marker-$((6*7))" in starts
    writes = json.dumps([e["detail"] for e in by_kind["file.write"]])
    assert "/home/user/audited.txt" in writes
    # The API actions are attributed to the key (its id, never the key itself).
    for e in by_kind["sandbox.create"] + by_kind["sandbox.kill"]:
        assert e["actor"] and e["actor"] != "anonymous"
        assert server.key not in json.dumps(e)

    # `since` filters (RFC 3339 of the last entry: nothing older comes back).
    last = rows[-1]
    with server.api() as api:
        r = api.get("/audit", params={"sandboxID": sid, "since": last["time"]})
    assert r.status_code == 200, r.text
    assert all(e["time"] >= last["time"] for e in r.json())
    assert last["id"] in {e["id"] for e in r.json()}


def test_audit_is_per_key(server, sandbox):
    # A key only sees the audit trail of its own sandboxes.
    from cella_e2e import KEY_RE

    r = server.cli("keys", "create", "--name", "e2e-audit", "--data-dir", str(server.data_dir))
    assert r.returncode == 0, r.stderr.decode()
    other = KEY_RE.search(r.stdout.decode()).group(0)
    with server.api(other) as api:
        r = api.get("/audit", params={"sandboxID": sandbox.sandbox_id})
    assert r.status_code in (200, 404), r.text
    if r.status_code == 200:
        assert r.json() == []


def test_programs_the_sandbox_runs_itself_are_audited(server, sandbox):
    from cella_e2e import DRIVER

    # A grandchild of the command, started by sandbox code, not through the API.
    sandbox.commands.run("sh -c 'sleep 1; true' exec-audit-marker-$((6*7)) &\nwait")

    def found():
        with server.api() as api:
            r = api.get("/audit", params={"sandboxID": sandbox.sandbox_id})
        assert r.status_code == 200, r.text
        return [e for e in r.json() if e["kind"] == "process.exec" and "exec-audit-marker-42" in json.dumps(e["detail"])] or None

    rows = wait_until(found, timeout=30, interval=0.3, what="a process.exec entry for the marker")
    e = rows[0]
    # A jail's host sees the exec itself; a microVM's guest kernel is the sandbox's own, so its
    # agent reports it (a claim of the sandbox).
    assert e["actor"] == ("host" if DRIVER == "jail" else "agent")
    assert e["detail"]["uid"] == 1000  # the default user `user`, as the sandbox sees it
    assert e["detail"]["argv"][-1] == "exec-audit-marker-42"


def test_files_the_sandbox_writes_itself_are_audited_by_the_host(server, sandbox):
    from cella_e2e import DRIVER
    import pytest

    if DRIVER != "jail":
        pytest.skip("host-side file audit watches the jail's disk; a VM's disk is behind its own kernel")
    sandbox.commands.run("echo hi > /home/user/fs-audit.txt && mv /home/user/fs-audit.txt /home/user/fs-audit2.txt && rm /home/user/fs-audit2.txt")

    def found():
        with server.api() as api:
            r = api.get("/audit", params={"sandboxID": sandbox.sandbox_id})
        assert r.status_code == 200, r.text
        got = {(e["kind"], json.dumps(e["detail"], sort_keys=True)) for e in r.json() if e["actor"] == "host" and e["kind"].startswith("fs.")}
        kinds = {k for k, d in got if "fs-audit" in d}
        return got if {"fs.write", "fs.rename", "fs.remove"} <= kinds else None

    got = wait_until(found, timeout=15, interval=0.3, what="fs.write, fs.rename and fs.remove entries")
    details = [json.loads(d) for k, d in got]
    assert any(d.get("path") == "/home/user/fs-audit.txt" for d in details), details
    assert any(d.get("from") == "/home/user/fs-audit.txt" and d.get("to") == "/home/user/fs-audit2.txt" for d in details), details
