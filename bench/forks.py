"""What keeping memory costs and buys in microVM snapshots and forks, side by side in one run
(not part of the tests).

One server, the microVM driver. A source sandbox runs a background counter (so there is a
process and some dirty memory to keep). Rounds alternate between:
  * create: a sandbox from the template (restored from the golden VM), create→ready;
  * fork: `fork(count=1)` of the source (memory saved, the fork resumes it), request→ready;
  * snapshot full / filesystem: `create_snapshot()` (memory kept) vs `mode="filesystem"`;
  * start from a full / a filesystem snapshot: resumed vs cold boot from the files.
Prints a markdown table of medians and ratios, and the memory stream sizes the server logged.

    bench/run-forks [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    os.environ["CELLA_E2E_DRIVER"] = "vm"

    from cella_e2e import Server, sdk_env  # noqa: E402
    from e2b import Sandbox  # noqa: E402

    tmp = Path(tempfile.mkdtemp(prefix="cella-bench-forks-"))
    tmp.chmod(0o711)
    srv = Server(data_dir=tmp / "data", log_path=tmp / "server.log", extra_args=["--build", ""])
    srv.start()
    samples: dict[str, list[float]] = {k: [] for k in (
        "create from the template", "fork (memory)", "snapshot (memory)", "snapshot (files)",
        "start from a memory snapshot", "start from a files snapshot")}
    try:
        with sdk_env(srv):
            src = Sandbox.create(template="base", timeout=3600)
            src.commands.run("i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done",
                             background=True)
            Sandbox.create(template="base", timeout=60).kill()  # warm the golden VM
            for _ in range(args.rounds):
                dt, sbx = timed(lambda: Sandbox.create(template="base", timeout=120))
                samples["create from the template"].append(dt)
                sbx.kill()
                dt, forks = timed(lambda: src.fork(count=1, timeout=120))
                assert isinstance(forks[0], Sandbox), forks
                # /tmp is a tmpfs in the guest: only a resumed fork has the counter's file
                r = forks[0].commands.run("cat /tmp/count 2>/dev/null || echo cold")
                assert r.stdout.strip().isdigit(), f"the fork did not resume: {r.stdout!r}"
                samples["fork (memory)"].append(dt)
                forks[0].kill()
                for mode, key in ((None, "memory"), ("filesystem", "files")):
                    kw = {"mode": mode} if mode else {}
                    dt, snap = timed(lambda: src.create_snapshot(**kw))
                    samples[f"snapshot ({key})"].append(dt)
                    dt, sbx = timed(lambda: Sandbox.create(snap.snapshot_id, timeout=120))
                    samples[f"start from a {key} snapshot"].append(dt)
                    sbx.kill()
                    Sandbox.delete_snapshot(snap.snapshot_id)
            src.kill()
        sizes = [int(m) for m in re.findall(r"memory_bytes=(\d+)", srv.log_path.read_text())]
        base = statistics.median(samples["create from the template"])
        print(f"\n### microVM snapshots and forks ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{args.rounds} rounds)\n")
        print("| | n | median | min | max | vs create |\n|---|---|---|---|---|---|")
        for name, xs in samples.items():
            m = statistics.median(xs)
            print(f"| {name} | {len(xs)} | {m * 1000:.0f} ms | {min(xs) * 1000:.0f} ms | "
                  f"{max(xs) * 1000:.0f} ms | {m / base:.2f}× |")
        if sizes:
            print(f"\nmemory streams: {len(sizes)}, median {statistics.median(sizes) / 2**20:.1f} MiB, "
                  f"max {max(sizes) / 2**20:.1f} MiB")
    finally:
        srv.stop()
        if os.environ.get("CELLA_BENCH_KEEP"):
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
