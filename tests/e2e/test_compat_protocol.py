"""The in-sandbox protocol on the wire, as E2B's envd speaks it, for the parts the SDKs use
but do not expose: Connect streams (JSON envelopes), keepalive events on
`Keepalive-Ping-Interval`, process tags (start with a tag, list it, connect by tag from a second
client), user selection with `Authorization: Basic`, access-token checks, raw gzip both ways,
`X-Metadata-*` headers and `POST /files/compose`."""

import base64
import gzip
import json
import struct

import httpx


def _headers(sbx, **extra):
    h = {"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": sbx._envd_access_token or ""}
    h.update(extra)
    return h


def _envelope(msg: dict) -> bytes:
    data = json.dumps(msg).encode()
    return struct.pack(">BI", 0, len(data)) + data


def _frames(resp: httpx.Response):
    """Yield (flags, json) for each Connect envelope of a streaming response."""
    buf = b""
    for chunk in resp.iter_bytes():
        buf += chunk
        while len(buf) >= 5:
            flags, n = struct.unpack(">BI", buf[:5])
            if len(buf) < 5 + n:
                break
            body, buf = buf[5 : 5 + n], buf[5 + n :]
            yield flags, json.loads(body or b"{}")


def _stream(server, sbx, method: str, msg: dict, **headers):
    return httpx.stream(
        "POST",
        f"{server.url}/process.Process/{method}",
        content=_envelope(msg),
        headers=_headers(sbx, **{"Content-Type": "application/connect+json", **headers}),
        timeout=60,
    )


def _events(resp):
    """The process events of a stream until its end frame; raises on a Connect error."""
    out = []
    for flags, msg in _frames(resp):
        if flags & 0x02:
            assert "error" not in msg, msg
            return out
        out.append(msg["event"])
    raise AssertionError("stream ended without an end-stream frame")


def _stdout(events):
    return "".join(base64.b64decode(e["data"]["stdout"]).decode() for e in events if "data" in e and "stdout" in e["data"])


def test_keepalive_events_follow_the_requested_interval(server, sandbox):
    msg = {"process": {"cmd": "/bin/bash", "args": ["-c", "sleep 3.5; echo done"]}}
    with _stream(server, sandbox, "Start", msg, **{"Keepalive-Ping-Interval": "1"}) as resp:
        assert resp.status_code == 200
        events = _events(resp)
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("keepalive") >= 2, kinds
    assert _stdout(events) == "done\n"


def test_tags_list_and_connect_by_tag(server, sandbox):
    msg = {
        "process": {"cmd": "/bin/bash", "args": ["-c", "sleep 2; echo tagged-output"]},
        "tag": "compat-tag",
    }
    with _stream(server, sandbox, "Start", msg) as first:
        it = _frames(first)
        flags, start = next(it)
        pid = start["event"]["start"]["pid"]
        listed = httpx.post(
            f"{server.url}/process.Process/List", json={}, headers=_headers(sandbox)
        ).json()["processes"]
        mine = [p for p in listed if p["pid"] == pid]
        assert mine and mine[0]["tag"] == "compat-tag", listed
        # A second client attaches by tag and sees the output and the exit.
        with _stream(server, sandbox, "Connect", {"process": {"tag": "compat-tag"}}) as second:
            events = _events(second)
        assert "tagged-output\n" in _stdout(events)
        assert any("end" in e for e in events)
    r = httpx.post(
        f"{server.url}/process.Process/Connect",
        content=_envelope({"process": {"tag": "no-such-tag"}}),
        headers=_headers(sandbox, **{"Content-Type": "application/connect+json"}),
    )
    frames = list(_frames(r))
    assert frames[-1][1]["error"]["code"] == "not_found"


def test_user_selection_and_access_token(server, sandbox):
    def whoami(auth=None, token=None):
        h = _headers(sandbox)
        if token is not None:
            h["X-Access-Token"] = token
        if auth is not None:
            h["Authorization"] = "Basic " + base64.b64encode(f"{auth}:".encode()).decode()
        msg = {"process": {"cmd": "/bin/bash", "args": ["-c", "whoami"]}}
        with httpx.stream(
            "POST",
            f"{server.url}/process.Process/Start",
            content=_envelope(msg),
            headers={**h, "Content-Type": "application/connect+json"},
        ) as resp:
            if resp.status_code != 200:
                return resp.status_code
            return _stdout(_events(resp)).strip()

    assert whoami() == "user"
    assert whoami("root") == "root"
    assert whoami("user") == "user"
    assert whoami(token="wrong") == 401
    assert httpx.get(f"{server.url}/health", headers={"E2b-Sandbox-Id": sandbox.sandbox_id}).status_code == 204


def test_raw_gzip_metadata_and_compose(server, sandbox):
    h = _headers(sandbox)
    data = b"line\n" * 50_000
    r = httpx.post(
        f"{server.url}/files",
        params={"path": "/home/user/part1"},
        content=gzip.compress(data),
        headers={**h, "Content-Type": "application/octet-stream", "Content-Encoding": "gzip", "X-Metadata-Kind": "part"},
    )
    assert r.status_code == 200, r.text
    assert r.json()[0]["path"] == "/home/user/part1"
    r = httpx.post(
        f"{server.url}/files",
        params={"path": "/home/user/part2"},
        content=b"tail",
        headers={**h, "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200
    st = httpx.post(
        f"{server.url}/filesystem.Filesystem/Stat", json={"path": "/home/user/part1"}, headers=h
    ).json()
    assert st["entry"]["metadata"] == {"kind": "part"}
    assert int(st["entry"]["size"]) == len(data)

    with httpx.stream(
        "GET", f"{server.url}/files", params={"path": "/home/user/part1"}, headers={**h, "Accept-Encoding": "gzip"}
    ) as resp:
        assert resp.headers["content-encoding"] == "gzip"
        raw = b"".join(resp.iter_raw())
    assert len(raw) < len(data) and gzip.decompress(raw) == data

    r = httpx.post(
        f"{server.url}/files/compose",
        json={"source_paths": ["/home/user/part1", "part2"], "destination": "/home/user/joined"},
        headers=h,
    )
    assert r.status_code == 200, r.text
    entry = r.json()
    assert entry["path"] == "/home/user/joined" and entry["name"] == "joined"
    joined = httpx.get(f"{server.url}/files", params={"path": "/home/user/joined"}, headers=h).content
    assert joined == data + b"tail"
    # Sources are consumed, as envd does.
    for p in ("/home/user/part1", "/home/user/part2"):
        assert httpx.get(f"{server.url}/files", params={"path": p}, headers=h).status_code == 404
    r = httpx.post(
        f"{server.url}/files/compose",
        json={"source_paths": ["/home/user"], "destination": "/home/user/x"},
        headers=h,
    )
    assert r.status_code == 400
