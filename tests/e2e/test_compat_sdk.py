"""E2B compatibility scenarios through the Python SDK that the other e2e files do not cover:
pagination and state filters, connect/timeouts, metrics, the proxy (a web server in a sandbox by
header and by host, streaming, traffic access tokens), signed URLs, gzip and metadata, every
watch event type, and the failure cases the SDK must map to its exceptions. The same scenarios
run through the JS SDK in tests/compat-js."""

import gzip
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from e2b import (
    AuthenticationException,
    CommandExitException,
    FilesystemEventType,
    InvalidArgumentException,
    NotFoundException,
    Sandbox,
    SandboxException,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)

from cella_e2e import new_api_key, wait_until

WEB_PY = (Path(__file__).resolve().parents[1] / "compat-js" / "fixtures" / "web.py").read_text()


def start_web(sbx: Sandbox, port: int = 8080):
    sbx.files.write("/home/user/web.py", WEB_PY)
    sbx.commands.run(f"python3 /home/user/web.py {port}", background=True)
    wait_until(
        lambda: sbx.commands.run(
            f"bash -c '(echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo up || echo down'"
        ).stdout.strip()
        == "up",
        30,
        0.2,
        f"port {port} in the sandbox",
    )


def test_list_pagination_and_state(server):
    tag = f"page-{time.time_ns()}"
    made = [Sandbox.create(template="base", timeout=120, metadata={"tag": tag, "i": str(i)}) for i in range(3)]
    try:
        q = SandboxQuery(metadata={"tag": tag}, state=[SandboxState.RUNNING])
        pager = Sandbox.list(query=q, limit=2)
        first = pager.next_items()
        assert len(first) == 2 and pager.has_next and pager.next_token
        second = pager.next_items()
        assert len(second) == 1 and not pager.has_next
        assert sorted(s.sandbox_id for s in first + second) == sorted(s.sandbox_id for s in made)
        assert all(s.state == SandboxState.RUNNING and s.metadata["tag"] == tag for s in first + second)
        paused = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}, state=[SandboxState.PAUSED]))
        assert paused.next_items() == []
        one = Sandbox.list(query=SandboxQuery(metadata={"tag": tag, "i": "1"})).next_items()
        assert [s.sandbox_id for s in one] == [made[1].sandbox_id]
    finally:
        for s in made:
            s.kill()


def test_info_connect_and_timeouts(server):
    sbx = Sandbox.create(template="base", timeout=60, metadata={"k": "v"})
    try:
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.template_id == "base"
        assert info.metadata == {"k": "v"}
        assert info.state == SandboxState.RUNNING
        assert info.cpu_count >= 1 and info.memory_mb >= 128
        assert 55 <= (info.end_at - info.started_at).total_seconds() <= 61
        other = Sandbox.connect(sbx.sandbox_id, timeout=240)
        assert other.commands.run("echo via-connect").stdout == "via-connect\n"
        assert (sbx.get_info().end_at - info.started_at).total_seconds() > 200
        sbx.set_timeout(600)
        assert (sbx.get_info().end_at - info.started_at).total_seconds() > 590
        with pytest.raises(NotFoundException):
            Sandbox.connect("inosuchsandbox0000000")
    finally:
        sbx.kill()


def test_metrics_report_disk_usage(sandbox):
    sandbox.commands.run("head -c 20000000 /dev/zero > /home/user/blob")
    m = wait_until(lambda: [x for x in sandbox.get_metrics() if x.disk_used >= 20_000_000], 30, 0.5, "disk metrics")
    last = m[-1]
    assert last.cpu_count >= 1
    assert last.mem_total > 0 and last.mem_used > 0
    assert last.disk_total >= last.disk_used >= 20_000_000


def test_metrics_are_a_time_series_with_a_window(sandbox):
    import datetime

    # The server samples every second (the harness passes --metrics-interval 1).
    series = wait_until(lambda: (lambda m: m if len(m) >= 3 else None)(sandbox.get_metrics()), 30, 0.5, "3 samples")
    stamps = [m.timestamp for m in series]
    assert stamps == sorted(stamps), stamps
    assert len(set(stamps)) >= 2, f"samples are not from different times: {stamps}"
    # A window that ends before the sandbox existed is empty; one around now is not.
    long_ago = datetime.datetime(2001, 1, 1, tzinfo=datetime.timezone.utc)
    assert sandbox.get_metrics(start=long_ago, end=long_ago + datetime.timedelta(seconds=10)) == []
    recent = sandbox.get_metrics(start=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5))
    assert 1 <= len(recent) <= len(series) + 10


def test_web_server_by_header_and_host_and_streaming(server, sandbox):
    start_web(sandbox)
    r = httpx.get(f"{server.url}/hello", headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "8080"})
    assert r.status_code == 200 and r.text.startswith("hello on 8080")
    host = sandbox.get_host(8080)
    assert host == f"8080-{sandbox.sandbox_id}.e2b.app"
    r = httpx.get(f"{server.url}/hello", headers={"Host": host})
    assert r.status_code == 200 and f"host={host}" in r.text
    times = []
    with httpx.stream("GET", f"{server.url}/stream", headers={"Host": host}) as resp:
        for chunk in resp.iter_text():
            times.append((time.monotonic(), chunk))
    assert "".join(c for _, c in times) == "tick0\ntick1\ntick2\n"
    assert times[-1][0] - times[0][0] > 1.5, "streamed response was buffered"
    # A young sandbox's closed port is retried for a while (as E2B's proxy does) before the 502.
    r = httpx.get(
        f"{server.url}/", headers={"Host": sandbox.get_host(9999), "Accept": "application/json"}, timeout=60
    )
    assert r.status_code == 502
    assert r.json() == {
        "sandboxId": sandbox.sandbox_id,
        "message": "The sandbox is running but port is not open",
        "port": 9999,
        "code": 502,
    }


def test_traffic_access_token(server):
    sbx = Sandbox.create(template="base", timeout=120, network={"allow_public_traffic": False})
    try:
        token = sbx.traffic_access_token
        assert token
        start_web(sbx)
        host = sbx.get_host(8080)
        r = httpx.get(f"{server.url}/hello", headers={"Host": host})
        assert r.status_code == 403
        assert "e2b-traffic-access-token" in r.json()["message"]
        r = httpx.get(f"{server.url}/hello", headers={"Host": host, "e2b-traffic-access-token": "wrong"})
        assert r.status_code == 403
        r = httpx.get(f"{server.url}/hello", headers={"Host": host, "e2b-traffic-access-token": token})
        assert r.status_code == 200 and r.text.startswith("hello on 8080")
        # The agent's own port stays usable without it (the SDK never sends it there).
        assert sbx.files.read("/home/user/web.py") == WEB_PY
    finally:
        sbx.kill()


def test_mask_request_host_and_validated_rules(server):
    # network.mask_request_host: the sandbox's servers see that Host (with ${PORT} filled in)
    sbx = Sandbox.create(template="base", timeout=120, network={"mask_request_host": "${PORT}-myapp.example.com"})
    try:
        start_web(sbx)
        r = httpx.get(f"{server.url}/hello", headers={"Host": sbx.get_host(8080)})
        assert r.status_code == 200 and "host=8080-myapp.example.com" in r.text, r.text
    finally:
        sbx.kill()
    # network.rules are validated even where no sandbox gets a network (they are applied in
    # test_network.py): a header that frames the request is refused
    with pytest.raises(Exception) as e:
        Sandbox.create(
            template="base", timeout=60,
            network={"rules": {"api.example.com": [{"transform": {"headers": {"Host": "evil"}}}]}},
        )
    assert "network.rules" in str(e.value) and "Host" in str(e.value), e.value
    # features cella does not have are refused at create, not silently dropped
    # MCP: no gateway; a clear 400 (the SDK would otherwise ask for the mcp-gateway template)
    with pytest.raises(Exception) as e:
        Sandbox.create(timeout=60, mcp={"github/owner/repo": {"runCmd": "npx server"}})
    assert "mcp" in str(e.value) and "not supported" in str(e.value), e.value
    # egress_proxy is validated even where no sandbox gets a network (its tunnel is tested in
    # test_network.py)
    with pytest.raises(Exception) as e:
        Sandbox.create(template="base", timeout=60, network={"egress_proxy": {"address": "proxy.example.com"}})
    assert "network.egressProxy" in str(e.value)


TLS_WEB_PY = r"""
import http.server, ssl, sys, threading

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"tls={self.server.tls} path={self.path} host={self.headers.get('Host')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

def serve(port, tls):
    srv = http.server.ThreadingHTTPServer(("0.0.0.0", port), H)
    srv.tls = tls
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain("/home/user/c.pem", "/home/user/k.pem")
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.serve_forever()

for port, tls in ((8443, True), (8444, True), (8445, False)):
    threading.Thread(target=serve, args=(port, tls), daemon=True).start()
threading.Event().wait()
"""


def test_https_ports_reach_tls_servers_with_self_signed_certificates(server, tmp_path):
    """network.https_ports: the proxy speaks TLS to those ports (a self-signed certificate is
    fine, as on E2B); other ports stay plain HTTP; a listed port without TLS is a clear 502."""
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=self-signed.test"],
        check=True, capture_output=True,
    )
    sbx = Sandbox.create(template="base", timeout=120, network={"https_ports": [8443, 8445]})
    try:
        sbx.files.write("/home/user/k.pem", key.read_text())
        sbx.files.write("/home/user/c.pem", cert.read_text())
        sbx.files.write("/home/user/tls_web.py", TLS_WEB_PY)
        sbx.commands.run("python3 /home/user/tls_web.py", background=True)
        wait_until(
            lambda: sbx.commands.run(
                "bash -c '(echo > /dev/tcp/127.0.0.1/8445) 2>/dev/null && echo up || echo down'"
            ).stdout.strip() == "up",
            30, 0.2, "servers in the sandbox",
        )
        r = httpx.get(f"{server.url}/x?y=1", headers={"Host": sbx.get_host(8443)})
        assert r.status_code == 200 and r.text.startswith("tls=True path=/x?y=1"), r.text
        # A TLS port that is not listed gets plain HTTP, which its server cannot answer.
        r = httpx.get(f"{server.url}/", headers={"Host": sbx.get_host(8444)})
        assert r.status_code == 502, r.text
        # A listed port whose server speaks plain HTTP: 502 naming httpsPorts.
        r = httpx.get(f"{server.url}/", headers={"Host": sbx.get_host(8445)})
        assert r.status_code == 502 and "httpsPorts" in r.json()["message"], r.text
        with httpx.Client(base_url=server.url, headers={"X-API-Key": server.key}) as c:
            info = c.get(f"/sandboxes/{sbx.sandbox_id}").json()
        assert info["network"]["httpsPorts"] == [8443, 8445], info
    finally:
        sbx.kill()
    with pytest.raises(Exception) as e:
        Sandbox.create(template="base", timeout=60, network={"https_ports": [49983]})
    assert "network.httpsPorts" in str(e.value)


def test_signed_urls_gzip_and_metadata(server):
    sbx = Sandbox.create(template="base", timeout=120, secure=True)
    try:
        routed = {"E2b-Sandbox-Id": sbx.sandbox_id}
        sbx.files.write("/home/user/s.txt", "signed", metadata={"Origin": "compat"})
        assert sbx.files.get_info("/home/user/s.txt").metadata == {"origin": "compat"}
        url = sbx.download_url("/home/user/s.txt")
        assert "signature=v1_" in url
        assert httpx.get(url, headers=routed).text == "signed"
        assert httpx.get(url.replace("s.txt", "t.txt"), headers=routed).status_code == 401
        expiring = sbx.download_url("/home/user/s.txt", use_signature_expiration=1)
        time.sleep(2.5)
        assert httpx.get(expiring, headers=routed).status_code == 401
        up = sbx.upload_url("/home/user/up.txt", use_signature_expiration=60)
        r = httpx.post(up, headers=routed, files={"file": ("up.txt", b"uploaded")})
        assert r.status_code == 200, r.text
        assert sbx.files.read("/home/user/up.txt") == "uploaded"

        big = b"abc" * 100_000
        sbx.files.write("/home/user/big.bin", big, gzip=True)
        assert sbx.files.read("/home/user/big.bin", format="bytes", gzip=True) == big
        raw = httpx.get(
            f"{server.url}/files",
            params={"path": "/home/user/big.bin"},
            headers={**routed, "X-Access-Token": sbx._envd_access_token, "Accept-Encoding": "gzip"},
        )
        assert raw.headers.get("content-encoding") == "gzip"
        assert raw.content == big  # httpx decodes; the header proves it came compressed
        assert len(gzip.compress(big)) < len(big)
    finally:
        sbx.kill()


def test_watch_every_event_type_recursively(sandbox):
    sandbox.files.make_dir("/home/user/w/sub")
    handle = sandbox.files.watch_dir("/home/user/w", recursive=True)
    try:
        sandbox.files.write("/home/user/w/a.txt", "one")
        sandbox.commands.run("echo more >> /home/user/w/a.txt; chmod 600 /home/user/w/a.txt")
        sandbox.commands.run("mv /home/user/w/a.txt /home/user/w/b.txt; rm /home/user/w/b.txt")
        sandbox.files.write("/home/user/w/sub/deep.txt", "deep")
        seen = set()

        def all_seen():
            for e in handle.get_new_events():
                seen.add((e.type, e.name))
            want = {
                (FilesystemEventType.CREATE, "a.txt"),
                (FilesystemEventType.WRITE, "a.txt"),
                (FilesystemEventType.CHMOD, "a.txt"),
                (FilesystemEventType.RENAME, "a.txt"),
                (FilesystemEventType.REMOVE, "b.txt"),
                (FilesystemEventType.CREATE, "sub/deep.txt"),
            }
            return want <= seen

        wait_until(all_seen, 15, 0.2, "all event types")
    finally:
        handle.stop()
    with pytest.raises(NotFoundException):
        sandbox.files.watch_dir("/home/user/nope")


def test_failure_cases_map_to_sdk_exceptions(server, sandbox):
    # file not found
    with pytest.raises(NotFoundException):
        sandbox.files.read("/home/user/nope.txt")
    # directory listing of a file
    sandbox.files.write("/home/user/plain.txt", "p")
    with pytest.raises(InvalidArgumentException, match="not a directory"):
        sandbox.files.list("/home/user/plain.txt")
    # command timeout
    t0 = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30", timeout=2)
    assert time.monotonic() - t0 < 20
    assert sandbox.commands.run("echo alive").stdout == "alive\n"
    # non-zero exit
    with pytest.raises(CommandExitException):
        sandbox.commands.run("exit 3")
    # wrong API key
    with pytest.raises(AuthenticationException):
        Sandbox.create(template="base", api_key=new_api_key())
    # wrong envd access token
    r = httpx.post(
        f"{server.url}/process.Process/List",
        json={},
        headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "X-Access-Token": "wrong"},
    )
    assert r.status_code == 401


def test_sandbox_killed_mid_command(server):
    sbx = Sandbox.create(template="base", timeout=120)
    handle = sbx.commands.run("echo started; sleep 120", background=True)
    outcome = {}

    def waiter():
        try:
            handle.wait()
            outcome["result"] = "returned"
        except Exception as e:  # noqa: BLE001 - any SDK error is the expected outcome
            outcome["result"] = e

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    time.sleep(0.5)
    Sandbox.kill(sbx.sandbox_id)
    t.join(30)
    assert not t.is_alive(), "wait() hung after the sandbox was killed"
    assert isinstance(outcome["result"], Exception), outcome
    with pytest.raises(SandboxException):
        sbx.commands.run("echo hi")
    assert not sbx.is_running()
