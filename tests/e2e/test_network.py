"""Sandbox egress through the official SDK, against a fake internet (this host has none).

A server started with `--egress allowed --dns-upstream <fake resolver> --egress-interface
<fake uplink>` must honour `allow_internet_access`, `network.allow_out/deny_out` and
`update_network` with E2B's semantics, keep sandboxes away from each other, the host and
169.254.169.254, audit DNS verdicts, and leave no interface or nftables object behind. The
session server (default `--egress none`) must give sandboxes no network at all.

`--egress-interface` also keeps any leak local: sandbox traffic may only leave by the fake
internet's veth, so a broken rule cannot send packets to a real network."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socketserver
import tempfile
import threading
from pathlib import Path

import pytest
from e2b import Sandbox

from cella_e2e import (
    BIG_ADDRS,
    BIG_NAME,
    DRIVER,
    FakeInternet,
    HostSnapshot,
    Server,
    host_links,
    nft_table,
    sdk_env,
    wait_until,
)


@pytest.fixture(scope="module")
def fake():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (scripts/install-deps)")
    f = FakeInternet().start()
    try:
        yield f
    finally:
        f.stop()


def make_test_ca(d: Path) -> Path:
    """Into `d`: a private CA (`ca.pem`) and certificates it signed, `api` for
    api.test/allowed.test and `other` for other.test."""
    import subprocess

    run = lambda cmd: subprocess.run(cmd.split(), check=True, capture_output=True)  # noqa: E731
    run(f"openssl req -x509 -newkey rsa:2048 -nodes -keyout {d}/ca.key -out {d}/ca.pem -days 2 -subj /CN=cella-e2e-upstream-ca")
    for name, sans in (("api", "DNS:api.test,DNS:allowed.test"), ("other", "DNS:other.test")):
        (d / f"{name}.cnf").write_text(f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\n")
        run(f"openssl req -newkey rsa:2048 -nodes -keyout {d}/{name}.key -out {d}/{name}.csr -subj /CN={name}")
        run(f"openssl x509 -req -in {d}/{name}.csr -CA {d}/ca.pem -CAkey {d}/ca.key -CAcreateserial "
            f"-days 2 -out {d}/{name}.pem -extfile {d}/{name}.cnf")
    return d


@pytest.fixture(scope="module")
def test_ca():
    """The egress server trusts this CA for upstream servers (`--egress-upstream-ca`), as a
    server behind a corporate CA would."""
    d = Path(tempfile.mkdtemp(prefix="cella-e2e-ca-"))
    try:
        yield make_test_ca(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# Echo servers on the fake internet: HTTPS on :443 (198.51.100.10 with the `api` certificate,
# 203.0.113.10 with `other`) and plain HTTP on :8080 of both. They answer every request with
# the headers they received, as JSON.
_ECHO = r"""
import http.server, socketserver, ssl, sys, json, threading
certs = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _do(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        out = json.dumps({"headers": {k.lower(): v for k, v in self.headers.items()},
                          "auth": self.headers.get_all("authorization") or [],
                          "bodyLen": len(body), "server": self.connection.getsockname()[0]}).encode()
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out))); self.end_headers(); self.wfile.write(out)
    do_GET = do_POST = do_PUT = _do
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
def serve(addr, port, cert=None):
    s = S((addr, port), H)
    if cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(f"{certs}/{cert}.pem", f"{certs}/{cert}.key")
        s.socket = ctx.wrap_socket(s.socket, server_side=True)
    threading.Thread(target=s.serve_forever, daemon=True).start()
serve("198.51.100.10", 443, "api"); serve("203.0.113.10", 443, "other")
serve("198.51.100.10", 8080); serve("203.0.113.10", 8080)
print("ready", flush=True)
threading.Event().wait()
"""


@pytest.fixture(scope="module")
def echo(fake, test_ca):
    import subprocess

    p = subprocess.Popen(
        ["ip", "netns", "exec", fake.ns, "python3", "-c", _ECHO, str(test_ca)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert p.stdout.readline().strip() == "ready", "echo servers did not start"
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def egress(server, fake, test_ca):
    """A second server with egress allowed; the SDK points at it for this module's tests.
    It depends on the session server, which builds the `base` template on a fresh host."""
    tmp = Path(tempfile.mkdtemp(prefix="cella-e2e-net-"))
    tmp.chmod(0o711)
    srv = Server(
        data_dir=tmp / "data",
        log_path=tmp / "server.log",
        extra_args=[
            "--egress", "allowed",
            "--dns-upstream", fake.dns,
            "--egress-interface", fake.host_if,
            "--egress-upstream-ca", str(test_ca / "ca.pem"),
            "--build", "",
        ],
    )
    links_before = host_links()
    srv.start()
    table = next(
        (l.split("table inet ")[1].split(",")[0] for l in srv.lines if "table inet " in l), None
    )
    assert table, f"the server names its nftables table: {srv.lines[-10:]}"
    srv.table = table
    srv.prefix = next(l.split("interfaces ")[1].rstrip("*)") for l in srv.lines if "interfaces " in l)
    try:
        with sdk_env(srv):
            yield srv
    finally:
        try:
            code = srv.stop()
            assert code == 0, f"egress server exited with {code}; see {srv.log_path}"
            # Shutdown removes the table and every interface it made.
            assert nft_table(table) is None, "nftables table left behind"
            leftover = {l for l in host_links() - links_before if l.startswith(srv.prefix)}
            assert not leftover, f"interfaces left behind: {leftover}"
        finally:
            force_cleanup(table, srv.prefix)
            shutil.rmtree(tmp, ignore_errors=True)


def force_cleanup(table: str, prefix: str) -> None:
    """After the assertions: remove what a failed run left, so one failure does not leak into
    the host (the assertions above still report it)."""
    import subprocess

    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
    for link in host_links():
        if link.startswith(prefix):
            subprocess.run(["ip", "link", "del", link], capture_output=True)


def curl(sbx: Sandbox, url: str, timeout: int = 3) -> tuple[bool, str]:
    r = sbx.commands.run(
        f"curl -sS --max-time {timeout} {url}; echo \" rc=$?\"", timeout=timeout + 30
    )
    out = (r.stdout + r.stderr).strip()
    return out.endswith(" rc=0"), out


def nameserver(sbx: Sandbox) -> str:
    lines = [l.split()[1] for l in sbx.files.read("/etc/resolv.conf").splitlines() if l.startswith("nameserver ")]
    assert len(lines) == 1 and lines[0].startswith("10."), lines
    return lines[0]


def own_links(srv) -> set:
    return {l for l in host_links() if l.startswith(srv.prefix)}


def audit(srv, sandbox_id: str, kind: str) -> list:
    with srv.api() as c:
        r = c.get("/audit", params={"sandboxID": sandbox_id, "kind": kind, "limit": 1000})
        r.raise_for_status()
        return r.json()


def test_default_server_gives_no_network(server, fake):
    # The fake internet answers the host, so a failure below is the sandbox's, not the fake's.
    assert fake._http_up()
    with Sandbox.create(template="base", timeout=120) as sbx:
        ok, out = curl(sbx, "http://198.51.100.10/")
        assert not ok, out
        links = sbx.commands.run("ls /sys/class/net").stdout.split()
        # A jail has only loopback; a microVM also has its link to the host side, which
        # leads nowhere but the server (its namespace has no other interface).
        assert links == (["lo"] if DRIVER == "jail" else ["eth0", "lo"]), links
        assert sbx.get_info().allow_internet_access is False


def test_allowed_sandbox_reaches_the_internet_by_ip_and_name(egress):
    with Sandbox.create(template="base", timeout=120) as sbx:
        ok, out = curl(sbx, "http://198.51.100.10/")
        assert ok and "hello from 198.51.100.10" in out, out
        ok, out = curl(sbx, "http://other.test/")
        assert ok and "hello from 203.0.113.10" in out, out
        assert sbx.get_info().allow_internet_access is True
        resolv = sbx.files.read("/etc/resolv.conf")
        assert "nameserver 10." in resolv, resolv


def test_internet_access_false_blocks_and_adds_no_interface(egress):
    before = own_links(egress)
    with Sandbox.create(template="base", timeout=120, allow_internet_access=False) as sbx:
        assert own_links(egress) == before
        ok, out = curl(sbx, "http://198.51.100.10/")
        assert not ok, out
        assert sbx.get_info().allow_internet_access is False


def test_deny_out_blocks_only_that_network(egress):
    with Sandbox.create(template="base", timeout=120, network={"deny_out": ["203.0.113.0/24"]}) as sbx:
        ok, out = curl(sbx, "http://203.0.113.10/")
        assert not ok, out
        ok, out = curl(sbx, "http://198.51.100.10/")
        assert ok, out


def test_allow_out_domain_with_deny_all(egress):
    with Sandbox.create(
        template="base",
        timeout=120,
        network={"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"]},
    ) as sbx:
        ok, out = curl(sbx, "http://allowed.test/")
        assert ok and "hello from 198.51.100.10" in out, out
        ok, out = curl(sbx, "http://other.test/")
        assert not ok and "resolve" in out.lower(), out
        ok, out = curl(sbx, "http://203.0.113.10/")
        assert not ok, out
        info = sbx.get_info()
        assert info.allow_internet_access is False
        dns = audit(egress, sbx.sandbox_id, "net.dns")
        verdicts = {(e["detail"]["name"], e["detail"]["verdict"]) for e in dns}
        assert ("allowed.test", "allowed") in verdicts, dns
        assert ("other.test", "refused") in verdicts, dns
        # Connection-level audit: the allowed and the denied flow, with their verdicts.
        def conns():
            got = {(e["detail"]["verdict"], e["detail"]["dst"], e["detail"]["dport"])
                   for e in audit(egress, sbx.sandbox_id, "net.connection")}
            return got if {("allow", "198.51.100.10", 80), ("deny", "203.0.113.10", 80)} <= got else None

        wait_until(conns, timeout=10, what="net.connection audit records")
        policy = audit(egress, sbx.sandbox_id, "net.policy")
        assert policy and policy[0]["detail"]["allowOut"] == ["allowed.test"], policy


def test_update_network_changes_running_rules(egress):
    with Sandbox.create(template="base", timeout=120) as sbx:
        assert curl(sbx, "http://198.51.100.10/")[0]
        sbx.update_network({"deny_out": ["198.51.100.0/24"]})
        ok, out = curl(sbx, "http://198.51.100.10/")
        assert not ok, out
        assert curl(sbx, "http://203.0.113.10/")[0]
        sbx.update_network({"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"]})
        assert not curl(sbx, "http://203.0.113.10/")[0]
        assert curl(sbx, "http://allowed.test/")[0]
        sbx.update_network({})
        assert curl(sbx, "http://203.0.113.10/")[0]
        with pytest.raises(Exception) as e:
            sbx.update_network({"deny_out": ["example.com"]})
        assert "denyOut" in str(e.value), e.value


_DNS_ASK = r"""
import socket, struct, sys
server, name, tcp = sys.argv[1], sys.argv[2], sys.argv[3] == "tcp"
q = struct.pack(">HHHHHH", 4242, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
try:
    if tcp:
        s = socket.create_connection((server, 53), 3)
        s.sendall(struct.pack(">H", len(q)) + q)
        def rx(n):
            b = b""
            while len(b) < n:
                c = s.recv(n - len(b))
                if not c: raise OSError("closed")
                b += c
            return b
        d = rx(struct.unpack(">H", rx(2))[0])
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.sendto(q, (server, 53))
        d = s.recv(4096)
except OSError as e:
    print("failed", type(e).__name__); sys.exit()
ips = [socket.inet_ntoa(d[i:i + 4]) for i in range(len(d) - 4, 11, -16)][: struct.unpack(">H", d[6:8])[0]]
print("rcode=%d tc=%d" % (d[3] & 15, d[2] >> 1 & 1), " ".join(sorted(ips)))
"""


def dns_ask(sbx: Sandbox, server: str, name: str, transport: str = "udp") -> str:
    """A raw DNS A query from inside the sandbox: `rcode=N tc=N <addresses>` or `failed ...`."""
    sbx.files.write("/tmp/dns_ask.py", _DNS_ASK)
    r = sbx.commands.run(f"python3 /tmp/dns_ask.py {server} {name} {transport}", timeout=30)
    return r.stdout.strip()


def nameserver(sbx: Sandbox) -> str:
    resolv = sbx.files.read("/etc/resolv.conf")
    return next(l.split()[1] for l in resolv.splitlines() if l.startswith("nameserver"))


def test_dns_servers_open_the_firewall_only_with_a_domain(egress, fake):
    """E2B's `dns_servers`: with a domain in `allow_out`, all traffic to those addresses is
    allowed (not only port 53); omitted means 8.8.8.8 (unreachable here), `[]` none; no
    effect without a domain; `update_network` replaces it. /etc/resolv.conf stays cella's.
    The fake resolver (UDP 53) and the fake web server (TCP 80) are otherwise denied."""
    deny_all = {"deny_out": ["0.0.0.0/0"]}
    with Sandbox.create(
        template="base",
        timeout=120,
        network={"allow_out": ["allowed.test"], **deny_all, "dns_servers": [fake.dns, "203.0.113.10"]},
    ) as sbx:
        assert "nameserver 10." in sbx.files.read("/etc/resolv.conf")
        # Direct DNS to the listed server (UDP), and any port of the other one (TCP 80).
        assert dns_ask(sbx, fake.dns, "other.test").startswith("rcode=0"), "listed resolver reachable"
        ok, out = curl(sbx, "http://203.0.113.10/")
        assert ok and "hello from 203.0.113.10" in out, out
        # Names still go through cella's forwarder, with its verdicts.
        assert curl(sbx, "http://allowed.test/")[0]
        assert not curl(sbx, "http://other.test/")[0]
        assert sbx.get_info().network["dns_servers"] == [fake.dns, "203.0.113.10"]

        # Omitted in an update: back to 8.8.8.8, so both are closed again.
        sbx.update_network({"allow_out": ["allowed.test"], **deny_all})
        assert dns_ask(sbx, fake.dns, "other.test").startswith("failed"), "resolver closed again"
        assert not curl(sbx, "http://203.0.113.10/")[0]
        assert sbx.get_info().network["dns_servers"] == ["8.8.8.8"]
        assert curl(sbx, "http://allowed.test/")[0], "the domain still works"

        # No domain in allow_out: the list has no effect.
        sbx.update_network({"allow_out": ["198.51.100.10"], **deny_all, "dns_servers": ["203.0.113.10"]})
        assert not curl(sbx, "http://203.0.113.10/")[0]
        assert curl(sbx, "http://198.51.100.10/")[0]
        # With a domain again: open; [] closes.
        sbx.update_network({"allow_out": ["allowed.test"], **deny_all, "dns_servers": ["203.0.113.10"]})
        assert curl(sbx, "http://203.0.113.10/")[0]
        sbx.update_network({"allow_out": ["allowed.test"], **deny_all, "dns_servers": []})
        assert not curl(sbx, "http://203.0.113.10/")[0]
        assert sbx.get_info().network["dns_servers"] == []

        with pytest.raises(Exception) as e:
            sbx.update_network({"allow_out": ["allowed.test"], "dns_servers": ["203.0.113.0/24"]})
        assert "dnsServers" in str(e.value), e.value
        policy = audit(egress, sbx.sandbox_id, "net.policy")
        assert [p["detail"]["dnsServers"] for p in policy][:2] == [
            [fake.dns, "203.0.113.10"], ["8.8.8.8"]
        ], policy
    with pytest.raises(Exception) as e:
        Sandbox.create(template="base", timeout=30, network={"allow_out": ["allowed.test"], "dns_servers": ["dns.google"]})
    assert "network.dnsServers" in str(e.value), e.value


def test_dns_over_tcp_is_answered_with_the_same_verdicts(egress):
    """Cella's forwarder answers TCP on the sandbox's nameserver: allowed names are asked
    upstream and learned, others refused, both audited with `transport: tcp`. A name whose
    answer does not fit a datagram works through the system resolver: the forwarder asks
    upstream again over TCP, returns the truncated answer to the 512-byte UDP client, and
    the client's TCP retry gets it whole."""
    with Sandbox.create(
        template="base",
        timeout=120,
        network={"allow_out": ["allowed.test", BIG_NAME], "deny_out": ["0.0.0.0/0"]},
    ) as sbx:
        ns = nameserver(sbx)
        assert dns_ask(sbx, ns, "allowed.test", "tcp") == "rcode=0 tc=0 198.51.100.10"
        assert dns_ask(sbx, ns, "other.test", "tcp") == "rcode=5 tc=0"
        assert curl(sbx, "http://198.51.100.10/")[0], "the TCP answer's address was learned"
        assert dns_ask(sbx, ns, BIG_NAME, "udp") == "rcode=0 tc=1", "too big for 512 bytes: truncated"
        assert dns_ask(sbx, ns, BIG_NAME, "tcp") == "rcode=0 tc=0 " + " ".join(sorted(BIG_ADDRS))
        r = sbx.commands.run(
            f"python3 -c \"import socket; print(len({{a[4][0] for a in socket.getaddrinfo('{BIG_NAME}', 80, socket.AF_INET)}}))\"",
            timeout=30,
        )
        assert r.stdout.strip() == str(len(BIG_ADDRS)), (r.stdout, r.stderr)
        dns = audit(egress, sbx.sandbox_id, "net.dns")
        seen = {(e["detail"]["name"], e["detail"]["verdict"], e["detail"].get("transport")) for e in dns}
        for want in (
            ("allowed.test", "allowed", "tcp"),
            ("other.test", "refused", "tcp"),
            (BIG_NAME, "allowed", "udp"),
            (BIG_NAME, "allowed", "tcp"),
        ):
            assert want in seen, (want, dns)
        # The host end takes TCP on port 53 only.
        assert not curl(sbx, f"http://{ns}:80/")[0]


def test_cli_network_and_create_flags(egress):
    """`cella create --no-internet` / `--deny-out` and `cella network` act like the SDK's
    create arguments and `update_network` (the CLI lives in test_cli.py; this needs egress)."""
    r = egress.cli("create", "--timeout", "120", "--no-internet", "--allow-out", "allowed.test", "--json")
    assert r.returncode == 0, r.stderr.decode()
    sid = json.loads(r.stdout)["sandboxID"]
    try:
        sbx = Sandbox.connect(sid)
        assert sbx.get_info().allow_internet_access is False
        assert not curl(sbx, "http://203.0.113.10/")[0]
        assert curl(sbx, "http://allowed.test/")[0]

        r = egress.cli("network", sid, "--clear")
        assert r.returncode == 0, r.stderr.decode()
        assert curl(sbx, "http://203.0.113.10/")[0]

        r = egress.cli("network", sid, "--deny-out", "203.0.113.0/24")
        assert r.returncode == 0, r.stderr.decode()
        assert not curl(sbx, "http://203.0.113.10/")[0]
        assert curl(sbx, "http://198.51.100.10/")[0]
        r = egress.cli("network", sid)
        assert r.returncode == 0, r.stderr.decode()
        assert "Deny out:  203.0.113.0/24" in r.stdout.decode(), r.stdout.decode()
    finally:
        egress.cli("kill", sid)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def test_sandboxes_cannot_reach_each_other_the_host_or_metadata(egress, fake):
    # A web server on the host, on every address: sandboxes must not reach it.
    httpd = socketserver.ThreadingTCPServer(("0.0.0.0", 0), _Quiet)
    port = httpd.server_address[1]
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        with Sandbox.create(template="base", timeout=120) as a, Sandbox.create(template="base", timeout=120) as b:
            b.commands.run("python3 -m http.server 8000 --bind 0.0.0.0", background=True)
            # Each sandbox's resolver is the host end of its /30; the sandbox's address (what
            # other sandboxes would have to reach) is the next one.
            gw_ip = nameserver(a)
            b_ns = nameserver(b)
            b_ip = ".".join(b_ns.split(".")[:3] + [str(int(b_ns.split(".")[3]) + 1)])
            src = b.commands.run(
                "python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                " s.connect(('198.51.100.10', 80)); print(s.getsockname()[0])\""
            ).stdout.strip()
            # A jail's processes own that address; a microVM's guest keeps its link address
            # and its namespace masquerades to the sandbox's.
            assert src == (b_ip if DRIVER == "jail" else "169.254.0.21"), (src, b_ip)
            wait_until(lambda: curl(b, "http://127.0.0.1:8000/")[0], timeout=15, what="web server in b")
            for url in (
                f"http://{b_ip}:8000/",
                f"http://{gw_ip}:{port}/",
                f"http://198.51.100.1:{port}/",
                "http://169.254.169.254/",
            ):
                ok, out = curl(a, url)
                assert not ok, f"{url}: {out}"
            blocked = lambda: {
                e["detail"]["dst"] for e in audit(egress, a.sandbox_id, "net.connection")
                if e["detail"]["verdict"] == "blocked"
            }
            wait_until(lambda: {"169.254.169.254", b_ip} <= blocked(), timeout=10, what="blocked flows audited")
            # The host end answers DNS only.
            assert curl(a, f"http://{gw_ip}:53/")[0] is False
            # ...and the host itself does reach the server (so the refusals above are real).
            import httpx

            assert httpx.get(f"http://198.51.100.1:{port}/", timeout=3).status_code == 200
    finally:
        httpd.shutdown()


def test_kill_removes_interface_and_rules(egress):
    snap_before = HostSnapshot.take(egress.data_dir, egress.proc.pid)
    before = own_links(egress)
    sbx = Sandbox.create(template="base", timeout=120)
    assert HostSnapshot.take(egress.data_dir, egress.proc.pid).diff(snap_before).get("links"), "egress adds a link"
    during = own_links(egress)
    assert len(during - before) == 1, (before, during)
    table = nft_table(egress.table) or ""
    # One sandbox = chains sbN (forward), sbN_pre (tunnel) and sbN_dst (verdicts), 4 sets.
    sandbox_chains = lambda t: len(re.findall(r"chain sb\d+ \{", t))
    chains_during = sandbox_chains(table)
    assert chains_during >= 1, table
    assert table.count("chain sb") == 3 * chains_during, table
    sbx.kill()
    wait_until(lambda: own_links(egress) == before, timeout=10, what="interface removal")
    table = nft_table(egress.table) or ""
    assert sandbox_chains(table) == chains_during - 1, table
    assert table.count("chain sb") == 3 * (chains_during - 1), table
    assert table.count("set sb") == 4 * (chains_during - 1), table
    # The whole host (processes, cgroups, netns, mounts, files, links) is as before.
    last = {}

    def same():
        nonlocal last
        last = snap_before.diff(HostSnapshot.take(egress.data_dir, egress.proc.pid))
        return not last

    try:
        wait_until(same, timeout=15, interval=0.2, what="host state")
    except AssertionError:
        raise AssertionError(f"left behind: {last}") from None


def test_timeout_removes_interface_and_rules(egress):
    before = own_links(egress)
    sbx = Sandbox.create(template="base", timeout=2)
    assert len(own_links(egress) - before) == 1
    wait_until(lambda: own_links(egress) == before, timeout=20, what="interface removal after timeout")
    assert "jump sb" not in (nft_table(egress.table) or "").split("map sandboxes")[1].split("}")[0], (
        "the expired sandbox is still hooked"
    )
    assert not sbx.is_running()


def test_crashed_server_leaves_nothing_after_restart(server, fake):
    """SIGKILL a server with an egress sandbox, start it again on the same data dir: the
    interface and the sandbox's rules are gone, and shutdown removes the table."""
    tmp = Path(tempfile.mkdtemp(prefix="cella-e2e-netcrash-"))
    tmp.chmod(0o711)
    args = [
        "--egress", "allowed",
        "--dns-upstream", fake.dns,
        "--egress-interface", fake.host_if,
        "--egress-pool", "10.246.0.0/24",
        "--build", "",
    ]
    srv = Server(data_dir=tmp / "data", log_path=tmp / "server.log", extra_args=args)
    links_before = host_links()
    srv.start()
    table = next(l.split("table inet ")[1].split(",")[0] for l in srv.lines if "table inet " in l)
    prefix = next(l.split("interfaces ")[1].rstrip("*)") for l in srv.lines if "interfaces " in l)
    try:
        with srv.api() as c:
            r = c.post("/v2/sandboxes", json={"templateID": "base", "timeout": 300})
            assert r.status_code == 201, r.text
        new = host_links() - links_before
        assert len(new) == 1, new
        srv.kill9()
        assert nft_table(table) is not None, "a crash cannot remove the table"
        srv.start()
        wait_until(lambda: not (host_links() - links_before), timeout=20, what="leftover interface removal")
        listed = nft_table(table) or ""
        assert "chain sb" not in listed, listed
        assert any("removed leftovers of a previous run (network)" in l for l in srv.lines), srv.lines[-20:]
        code = srv.stop()
        assert code == 0
        assert nft_table(table) is None
        assert not (host_links() - links_before)
    finally:
        srv.kill9()
        force_cleanup(table, prefix)
        shutil.rmtree(tmp, ignore_errors=True)


class Socks5:
    """A SOCKS5 proxy on the host's end of the fake internet (198.51.100.1), as a user's own
    proxy would be: no-auth or RFC 1929 credentials, CONNECT by IPv4 address or by name
    (resolved with the fake internet's names). Records every CONNECT as (kind, host, port)."""

    def __init__(self, creds: tuple | None = None, tls: tuple | None = None):
        import socket
        import ssl

        self.creds = creds
        self.tls = None
        if tls:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(*tls)
        self.seen: list = []
        self.sock = socket.socket()
        self.sock.bind(("198.51.100.1", 0))
        self.sock.listen(64)
        self.address = f"198.51.100.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _rx(c, n: int) -> bytes:
        b = b""
        while len(b) < n:
            chunk = c.recv(n - len(b))
            if not chunk:
                raise EOFError
            b += chunk
        return b

    def _serve(self, c):
        import socket
        import struct

        from cella_e2e import FAKE_NAMES

        try:
            if self.tls:
                c = self.tls.wrap_socket(c, server_side=True)
            ver, n = self._rx(c, 2)
            methods = self._rx(c, n)
            want = 2 if self.creds else 0
            if ver != 5 or want not in methods:
                c.sendall(b"\x05\xff")
                return
            c.sendall(bytes([5, want]))
            if self.creds:
                _, ul = self._rx(c, 2)
                user = self._rx(c, ul).decode()
                (pl,) = self._rx(c, 1)
                pw = self._rx(c, pl).decode()
                ok = (user, pw) == self.creds
                c.sendall(b"\x01\x00" if ok else b"\x01\x01")
                if not ok:
                    return
            _, cmd, _, atyp = self._rx(c, 4)
            if atyp == 1:
                host, kind = socket.inet_ntoa(self._rx(c, 4)), "ip"
            elif atyp == 3:
                (ln,) = self._rx(c, 1)
                host, kind = self._rx(c, ln).decode(), "name"
            else:
                return
            (port,) = struct.unpack(">H", self._rx(c, 2))
            self.seen.append((kind, host, port))
            try:
                up = socket.create_connection((FAKE_NAMES.get(host, host), port), timeout=5)
            except OSError:
                c.sendall(b"\x05\x05\x00\x01" + bytes(6))
                return
            c.sendall(b"\x05\x00\x00\x01" + bytes(6))

            def pipe(a, b):
                try:
                    while data := a.recv(65536):
                        b.sendall(data)
                    b.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

            threading.Thread(target=pipe, args=(up, c), daemon=True).start()
            pipe(c, up)
        except (EOFError, OSError, ValueError):
            pass
        finally:
            c.close()

    def close(self):
        self.sock.close()


def test_egress_proxy_tunnels_tcp_after_the_rules_and_fails_closed(egress, fake):
    proxy = Socks5()
    via = {"address": proxy.address}
    try:
        with Sandbox.create(template="base", timeout=120, network={"egress_proxy": via}) as sbx:
            ok, out = curl(sbx, "http://198.51.100.10/")
            assert ok and "hello from 198.51.100.10" in out, out
            assert ("ip", "198.51.100.10", 80) in proxy.seen, proxy.seen
            # DNS (UDP) is not tunneled; names resolve as usual, the connection is tunneled.
            ok, out = curl(sbx, "http://other.test/")
            assert ok and "hello from 203.0.113.10" in out, out
            assert ("ip", "203.0.113.10", 80) in proxy.seen, proxy.seen
            with egress.api() as c:
                info = c.get(f"/sandboxes/{sbx.sandbox_id}").json()
            assert info["network"]["egressProxy"] == {"address": proxy.address}, info

            # The rules apply first: a denied destination never reaches the proxy.
            sbx.update_network({"deny_out": ["203.0.113.0/24"], "egress_proxy": via})
            before = len(proxy.seen)
            assert not curl(sbx, "http://203.0.113.10/")[0]
            assert all(s[1] != "203.0.113.10" for s in proxy.seen[before:]), proxy.seen

            # A flow allowed by a domain goes to the proxy by name (remote DNS).
            sbx.update_network({"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"], "egress_proxy": via})
            ok, out = curl(sbx, "http://allowed.test/")
            assert ok and "hello from 198.51.100.10" in out, out
            assert ("name", "allowed.test", 80) in proxy.seen, proxy.seen

            # Fails closed: a proxy that does not answer means no connection, never a direct one.
            sbx.update_network({"egress_proxy": {"address": "198.51.100.1:9"}})
            ok, out = curl(sbx, "http://198.51.100.10/")
            assert not ok, out
            failed = audit(egress, sbx.sandbox_id, "net.proxy")
            assert failed and failed[0]["detail"]["dst"] == "198.51.100.10", failed

            # An update without it stops tunneling: direct again, the proxy sees nothing.
            sbx.update_network({})
            before = len(proxy.seen)
            ok, out = curl(sbx, "http://198.51.100.10/")
            assert ok, out
            assert len(proxy.seen) == before, proxy.seen
    finally:
        proxy.close()


def test_egress_proxy_credentials_and_validation(egress, fake):
    proxy = Socks5(creds=("agent", "s3cret"))
    try:
        good = {"address": proxy.address, "username": "agent", "password": "s3cret"}
        with Sandbox.create(template="base", timeout=120, network={"egress_proxy": good}) as sbx:
            ok, out = curl(sbx, "http://198.51.100.10/")
            assert ok, out
            with egress.api() as c:
                info = c.get(f"/sandboxes/{sbx.sandbox_id}").json()
            # The password is never returned.
            assert info["network"]["egressProxy"] == {"address": proxy.address, "username": "agent"}, info
            sbx.update_network({"egress_proxy": {**good, "password": "wrong"}})
            assert not curl(sbx, "http://198.51.100.10/")[0]
    finally:
        proxy.close()
    for bad in (
        {"address": "10.1.2.3:1080"},  # a private range: sandbox traffic may never go there
        {"address": "127.0.0.1:1080"},
        {"address": "no-port.example"},
        {"address": "[2001:db8::1]:1080"},
        {"address": "198.51.100.1:1080", "password": "without-user"},
    ):
        with pytest.raises(Exception) as e:
            Sandbox.create(template="base", timeout=60, network={"egress_proxy": bad})
        assert "network.egressProxy" in str(e.value), (bad, e.value)


def test_egress_proxy_over_tls_verifies_the_proxy(egress, fake, tmp_path):
    """tls: the SOCKS5 negotiation runs inside TLS; the proxy's certificate is verified
    against `ca_cert` for `server_name`, and a mismatch fails closed."""
    import subprocess

    # A private CA and a proxy certificate it signed for proxy.test.
    t = str(tmp_path)
    for cmd in (
        f"openssl req -x509 -newkey rsa:2048 -nodes -keyout {t}/ca.key -out {t}/ca.pem -days 1 -subj /CN=test-ca",
        f"openssl req -newkey rsa:2048 -nodes -keyout {t}/k.pem -out {t}/p.csr -subj /CN=proxy.test",
        f"openssl x509 -req -in {t}/p.csr -CA {t}/ca.pem -CAkey {t}/ca.key -CAcreateserial -days 1 "
        f"-out {t}/c.pem -extfile {t}/ext.cnf",
    ):
        (tmp_path / "ext.cnf").write_text("subjectAltName=DNS:proxy.test\nbasicConstraints=CA:FALSE\n")
        subprocess.run(cmd.split(), check=True, capture_output=True)
    proxy = Socks5(tls=(f"{t}/c.pem", f"{t}/k.pem"))
    try:
        ca = (tmp_path / "ca.pem").read_text()
        tls = {"address": proxy.address, "tls": {"server_name": "proxy.test", "ca_cert": ca}}
        with Sandbox.create(template="base", timeout=120, network={"egress_proxy": tls}) as sbx:
            ok, out = curl(sbx, "http://198.51.100.10/")
            assert ok and "hello from 198.51.100.10" in out, (out, audit(egress, sbx.sandbox_id, "net.proxy"))
            assert ("ip", "198.51.100.10", 80) in proxy.seen, proxy.seen
            with egress.api() as c:
                info = c.get(f"/sandboxes/{sbx.sandbox_id}").json()
            assert info["network"]["egressProxy"]["tls"] == {"enabled": True, "serverName": "proxy.test"}, info
            # The wrong name: the certificate does not verify, nothing is sent.
            before = len(proxy.seen)
            sbx.update_network({"egress_proxy": {"address": proxy.address, "tls": {"server_name": "other.test", "ca_cert": ca}}})
            assert not curl(sbx, "http://198.51.100.10/")[0]
            # The system trust store does not know this self-signed proxy either.
            sbx.update_network({"egress_proxy": {"address": proxy.address, "tls": True}})
            assert not curl(sbx, "http://198.51.100.10/")[0]
            assert len(proxy.seen) == before, proxy.seen
    finally:
        proxy.close()


def fetch(sbx: Sandbox, url: str, *args: str, timeout: int = 5) -> dict:
    """`curl` in the sandbox; the echo server's JSON answer (AssertionError with curl's
    output when it fails)."""
    extra = " ".join(args)
    r = sbx.commands.run(
        f"curl -sS --max-time {timeout} {extra} {url}; echo \" rc=$?\"", timeout=timeout + 30
    )
    out = (r.stdout + r.stderr).strip()
    assert out.endswith(" rc=0"), out
    return json.loads(out[: -len(" rc=0")])


SECRET = "Bearer sk-cella-e2e-0123456789"
RULES = {"api.test": [{"transform": {"headers": {"Authorization": SECRET, "X-Trace": "on"}}}]}


def test_rules_inject_headers_into_https_and_http_requests(egress, echo):
    """network.rules: requests to api.test get the rule's headers (replacing the sandbox's
    own), over HTTPS (cella's CA, trusted inside the sandbox, signs what the sandbox sees;
    the real server's certificate is verified) and plain HTTP; the secret never enters the
    sandbox and is never returned or audited."""
    net = {"allow_out": ["api.test"], "deny_out": ["0.0.0.0/0"], "rules": RULES}
    with Sandbox.create(template="base", timeout=120, network=net) as sbx:
        got = fetch(sbx, "https://api.test/v1/models", "-H 'Authorization: Bearer fake'")
        assert got["auth"] == [SECRET], got
        assert got["headers"]["x-trace"] == "on", got
        # Keep-alive: every request on one connection is rewritten.
        r = sbx.commands.run(
            "curl -sS --max-time 5 https://api.test/a https://api.test/b", timeout=30
        )
        assert r.stdout.count(f'"auth": ["{SECRET}"]') == 2, r.stdout
        # A request body streams through.
        got = fetch(sbx, "https://api.test/upload", "-X POST --data-binary @/usr/bin/curl")
        size = int(sbx.commands.run("stat -c %s /usr/bin/curl").stdout)
        assert got["bodyLen"] == size and got["auth"] == [SECRET], got
        # Python's default TLS context (the system bundle) trusts it too.
        py = sbx.commands.run(
            "python3 -c \"import json,urllib.request as u;"
            "print(json.load(u.urlopen('https://api.test/'))['auth'])\"",
            timeout=30,
        )
        assert SECRET in py.stdout, (py.stdout, py.stderr)
        # Plain HTTP to an address the sandbox resolved api.test to.
        got = fetch(sbx, "http://api.test:8080/")
        assert got["auth"] == [SECRET], got
        # The secret is nowhere inside; the CA and its environment are.
        env = sbx.commands.run("env; cat /etc/ssl/certs/ca-certificates.crt", timeout=30).stdout
        assert SECRET.split()[1] not in env
        assert "NODE_EXTRA_CA_CERTS=/usr/local/share/ca-certificates/cella-egress-ca.crt" in env
        with egress.api() as c:
            info = c.get(f"/sandboxes/{sbx.sandbox_id}").json()
            records = c.get("/audit", params={"sandboxID": sbx.sandbox_id, "limit": 1000}).json()
        assert info["network"]["rules"] == {
            "api.test": [{"transform": {"headers": {"authorization": "***", "x-trace": "***"}}}]
        }, info
        assert SECRET.split()[1] not in json.dumps(info) + json.dumps(records)
        seen = [r["detail"] for r in records if r["kind"] == "net.transform"]
        assert any(d.get("host") == "api.test" and d.get("injected", 0) >= 1 for d in seen), seen

        # update_network without rules: requests go through untouched.
        sbx.update_network({"allow_out": ["api.test"], "deny_out": ["0.0.0.0/0"]})
        got = fetch(sbx, "http://api.test:8080/", "-H 'Authorization: Bearer own'")
        assert got["auth"] == ["Bearer own"], got


def test_rules_match_only_their_host_and_fail_closed(egress, echo):
    """Other hosts pass untouched; a Host header aimed at another address gets nothing; a
    server without a valid certificate for the rule's host gets no request."""
    with Sandbox.create(template="base", timeout=120, network={"rules": RULES}) as sbx:
        # Another host over HTTPS: the sandbox talks to the real server (its own
        # certificate, which only -k accepts here), nothing is added.
        got = fetch(sbx, "https://other.test/", "-k")
        assert got["auth"] == [] and "x-trace" not in got["headers"], got
        assert fetch(sbx, "http://other.test:8080/")["auth"] == []
        # `Host: api.test` sent to an address api.test does not resolve to: no secret.
        fetch(sbx, "http://api.test:8080/")  # resolves (and learns) api.test
        got = fetch(sbx, "http://203.0.113.10:8080/", "-H 'Host: api.test'")
        assert got["auth"] == [], got
        # SNI api.test to a server that cannot prove it is api.test: the connection fails.
        r = sbx.commands.run(
            "curl -sS --max-time 5 --resolve api.test:443:203.0.113.10 https://api.test/; "
            "echo \" rc=$?\"", timeout=30
        )
        assert not r.stdout.strip().endswith(" rc=0"), r.stdout
        assert SECRET not in r.stdout
        failed = [a["detail"] for a in audit(egress, sbx.sandbox_id, "net.transform")
                  if a["detail"].get("verdict") == "failed"]
        assert failed and failed[0]["dst"] == "203.0.113.10", failed


def test_rules_added_later_and_validation(egress, echo):
    with Sandbox.create(template="base", timeout=120) as sbx:
        sbx.update_network({"rules": RULES})
        # The CA is trusted from then on (curl reads the bundle per process).
        got = fetch(sbx, "https://api.test/")
        assert got["auth"] == [SECRET], got
        # An address key matches the destination, with or without a name.
        sbx.update_network({"rules": {"203.0.113.0/24": [{"transform": {"headers": {"X-Net": "yes"}}}]}})
        got = fetch(sbx, "http://203.0.113.10:8080/")
        assert got["headers"].get("x-net") == "yes", got
        # Another protocol to that address is relayed byte for byte, never parsed as HTTP
        # (the echo server's own error page comes back).
        raw = sbx.commands.run(
            "python3 -c \"import socket;s=socket.create_connection(('203.0.113.10',8080),5);"
            "s.sendall(b'HELLO\\r\\n\\r\\n');print(s.recv(4096))\"",
            timeout=30,
        )
        assert "Bad request syntax" in raw.stdout, (raw.stdout, raw.stderr)
        with pytest.raises(Exception) as e:
            sbx.update_network({"rules": {"api.test": [{"transform": {"headers": {"Host": "x"}}}]}})
        assert "rules" in str(e.value), e.value
    for bad, field in (
        ({f"h{i}.test": [] for i in range(11)}, "network.rules"),
        ({"api.test": [{"transform": {"headers": {"Content-Length": "1"}}}]}, "network.rules"),
        ({"api.test": [{"transform": {"headers": {"bad name": "1"}}}]}, "network.rules"),
        ({"api.test": [{"transform": {"headers": {"X": "a\r\nInjected: 1"}}}]}, "network.rules"),
        ({"2001:db8::/32": []}, "network.rules"),
        ({"api.test": [{"transform": {"headers": {"X": "${e2b.identity.tokens.aws}"}}}]}, "network.rules"),
    ):
        with pytest.raises(Exception) as e:
            Sandbox.create(template="base", timeout=60, network={"rules": bad})
        assert field in str(e.value), (bad, e.value)


def _b64(s: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def verify_es256(token: str, jwk: dict, tmp: Path) -> bool:
    """Verify a compact ES256 JWS with `openssl` against a P-256 JWK (no Python crypto
    library needed): the JWK as a SubjectPublicKeyInfo, the r||s signature as DER."""
    import subprocess

    head, payload, sig = token.split(".")
    spki = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200") + b"\x04" + _b64(jwk["x"]) + _b64(jwk["y"])
    (tmp / "pub.der").write_bytes(spki)

    def der_int(b: bytes) -> bytes:
        b = b.lstrip(b"\x00") or b"\x00"
        if b[0] & 0x80:
            b = b"\x00" + b
        return b"\x02" + bytes([len(b)]) + b

    raw = _b64(sig)
    body = der_int(raw[:32]) + der_int(raw[32:])
    (tmp / "sig.der").write_bytes(b"\x30" + bytes([len(body)]) + body)
    (tmp / "data").write_bytes(f"{head}.{payload}".encode())
    r = subprocess.run(
        ["openssl", "dgst", "-sha256", "-keyform", "DER", "-verify", str(tmp / "pub.der"),
         "-signature", str(tmp / "sig.der"), str(tmp / "data")],
        capture_output=True, text=True,
    )
    return r.returncode == 0


def test_iam_tokens_are_minted_per_request_and_verifiable(egress, echo, tmp_path):
    """iam: a rule's `${e2b.identity.tokens.NAME}` (the SDK's transform callable) becomes a
    fresh ES256 JWT-SVID per request, for the token's audience, naming the sandbox; the
    server's OIDC discovery publishes the key that verifies it."""
    import httpx

    iam = {"tokens": {"api": {"audience": "https://api.test", "token_type": "JWT-SVID"}}}
    rules = {"api.test": [{"transform": lambda ctx: {"headers": {"Authorization": f"Bearer {ctx.iam.tokens['api']}"}}}]}
    with Sandbox.create(template="base", timeout=120, iam=iam, network={"rules": rules}) as sbx:
        tokens = []
        for _ in range(2):
            got = fetch(sbx, "https://api.test/")
            (auth,) = got["auth"]
            assert auth.startswith("Bearer ey"), got
            tokens.append(auth.split()[1])
        assert tokens[0] != tokens[1], "a token per request"
        claims = json.loads(_b64(tokens[0].split(".")[1]))
        assert claims["aud"] == "https://api.test", claims
        assert claims["sub"] == f"spiffe://cella.local/sandbox/{sbx.sandbox_id}", claims
        assert claims["iss"] == f"http://127.0.0.1:{egress.port}", claims
        assert claims["exp"] - claims["iat"] == 300, claims
        header = json.loads(_b64(tokens[0].split(".")[0]))
        assert header["alg"] == "ES256", header
        # Public discovery (no API key), as a relying party would fetch it.
        conf = httpx.get(f"{egress.url}/.well-known/openid-configuration").json()
        assert conf["issuer"] == claims["iss"], conf
        keys = httpx.get(conf["jwks_uri"]).json()["keys"]
        (jwk,) = [k for k in keys if k["kid"] == header["kid"]]
        assert verify_es256(tokens[0], jwk, tmp_path)
        forged = tokens[0].split(".")
        forged[1] = forged[1][:-2] + ("AA" if forged[1][-2:] != "AA" else "BB")
        assert not verify_es256(".".join(forged), jwk, tmp_path)
        # The token never enters the sandbox; its placeholder is what the info shows.
        with egress.api() as c:
            info = c.get(f"/sandboxes/{sbx.sandbox_id}").json()
        assert info["network"]["rules"]["api.test"][0]["transform"]["headers"] == {"authorization": "***"}
    # An unknown token type or a placeholder of an unregistered token: 400.
    with pytest.raises(Exception) as e:
        Sandbox.create(template="base", timeout=60, iam={"tokens": {"x": {"audience": "a", "token_type": "OIDC"}}})
    assert "iam" in str(e.value), e.value
