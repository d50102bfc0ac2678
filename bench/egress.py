"""Cost of `network.rules` interception, side by side in one run (not part of the tests).

One server with `--egress allowed` against the e2e suite's fake internet (a network namespace
with HTTPS/HTTP echo servers and a resolver), the jail driver by default. Measured inside
sandboxes, with `curl -w %{time_total}` (a new connection, TLS handshake and one request each):
  * plain: a sandbox without rules, HTTPS to api.test (kernel forwarding and NAT);
  * relayed: a sandbox with a rule for another host, same request: the tunnel reads the
    ClientHello, finds no match and relays the bytes;
  * rewritten: a sandbox with a rule for api.test: TLS terminated with a minted certificate,
    the real server verified, the header set;
and create→ready (REST round trip) without and with rules (the agent's `/trust`).
Rounds alternate between the cases so that noise hits them alike.

    bench/run-egress [--requests 200] [--creates 20] [--driver jail|vm]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))


def median_ms(xs):
    return statistics.median(xs) * 1000 if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--creates", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--driver", default="jail")
    args = ap.parse_args()
    os.environ["CELLA_E2E_DRIVER"] = args.driver

    from cella_e2e import FakeInternet, Server, sdk_env  # noqa: E402
    import test_network  # noqa: E402  (the echo servers and the test CA recipe)
    from e2b import Sandbox  # noqa: E402

    fake = FakeInternet().start()
    tmp = Path(tempfile.mkdtemp(prefix="cella-bench-egress-"))
    tmp.chmod(0o711)
    ca = test_network.make_test_ca(tmp)
    echo = subprocess.Popen(
        ["ip", "netns", "exec", fake.ns, "python3", "-c", test_network._ECHO, str(ca)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    )
    assert echo.stdout.readline().strip() == "ready"
    srv = Server(
        data_dir=tmp / "data", log_path=tmp / "server.log",
        extra_args=["--egress", "allowed", "--egress-pool", "10.246.0.0/16", "--dns-upstream", fake.dns,
                    "--egress-interface", fake.host_if, "--egress-upstream-ca", str(ca / "ca.pem"), "--build", ""],
    )
    srv.start()
    try:
        with sdk_env(srv):
            rules = {"api.test": [{"transform": {"headers": {"Authorization": "Bearer bench"}}}]}
            other = {"other.test": [{"transform": {"headers": {"Authorization": "Bearer bench"}}}]}
            boxes = {
                "plain": Sandbox.create(template="base", timeout=1800),
                "relayed": Sandbox.create(template="base", timeout=1800, network={"rules": other}),
                "rewritten": Sandbox.create(template="base", timeout=1800, network={"rules": rules}),
            }
            per_round = max(1, args.requests // args.rounds)
            samples = {k: [] for k in boxes}
            loop = (f"for i in $(seq {per_round}); do curl -sk -o /dev/null -w '%{{time_total}}\\n' "
                    f"https://api.test/; done")
            for sbx in boxes.values():  # warm-up (and check it works)
                r = sbx.commands.run(loop.replace(f"seq {per_round}", "seq 3"), timeout=120)
                assert r.stdout.strip(), r.stderr
            for _ in range(args.rounds):
                for name, sbx in boxes.items():
                    out = sbx.commands.run(loop, timeout=600).stdout.split()
                    samples[name] += [float(x) for x in out]
            for sbx in boxes.values():
                sbx.kill()

            creates = {"without rules": [], "with rules": []}
            with srv.api() as c:
                for i in range(args.creates * 2):
                    name = "with rules" if i % 2 else "without rules"
                    body = {"templateID": "base", "timeout": 60}
                    if i % 2:
                        body["network"] = {"rules": rules}
                    t0 = time.perf_counter()
                    r = c.post("/v2/sandboxes", json=body, timeout=120)
                    dt = time.perf_counter() - t0
                    r.raise_for_status()
                    c.delete(f"/sandboxes/{r.json()['sandboxID']}")
                    if i >= 2:
                        creates[name].append(dt)
        base = median_ms(samples["plain"])
        print(f"\n### network.rules ({args.driver}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
        print("| HTTPS request inside the sandbox (new connection) | median | p90 | vs plain |")
        print("|---|---|---|---|")
        for name, xs in samples.items():
            xs = sorted(xs)
            p90 = xs[int(len(xs) * 0.9)] * 1000
            print(f"| {name} ({len(xs)}) | {median_ms(xs):.2f} ms | {p90:.2f} ms | {median_ms(xs) / base:.2f}× |")
        c0 = median_ms(creates["without rules"])
        print("\n| create→ready | median | vs without |\n|---|---|---|")
        for name, xs in creates.items():
            print(f"| {name} ({len(xs)}) | {median_ms(xs):.1f} ms | {median_ms(xs) / c0:.2f}× |")
    finally:
        srv.stop()
        echo.kill()
        fake.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
