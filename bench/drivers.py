"""Jail vs microVM, side by side in one run against one server (issue: "microVM driver" benchmark).

For each driver (`"driver": "jail"` / `"driver": "vm"` in the create request), and for the
VM both restored from a snapshot (the default) and cold-booted (a second server with
CELLA_VM_SNAPSHOT=0):
  * create→ready: sequential POST /v2/sandboxes round trips (kill after each, not timed); the
    untimed first create builds the template image and, for the restored VM, the snapshot;
  * exec round trip: a raw Connect `process.Process/Start` of /bin/true in a live sandbox;
  * host memory of one idle sandbox after it settled, with a second one alive (so PSS shows
    what sharing saves): for the jail, PSS of the processes in its cgroup; for the VM, the
    QEMU process's RSS split (/proc/<pid>/status) into anonymous (guest pages written since
    restore or boot, translation cache, QEMU heap), shmem (the golden RAM, shared by every
    clone of a snapshot) and file-backed (kernel image on a cold boot, QEMU, its libraries).

    bench/run-drivers [--jail-creates 50] [--vm-creates 10] [--execs 30] [--vm-memory 256] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # noqa: E402
    ROOT,
    Server,
    log,
    pct,
    raw_exec,
    read_kib,
    sandbox_pids,
    summary,
)

DOC = ROOT / "docs" / "benchmarks.md"
START = "<!-- bench:drivers:start -->"
END = "<!-- bench:drivers:end -->"


VM_MEMORY_MB = 256


def create(api, driver: str) -> tuple[float, dict]:
    body = {"templateID": "base", "timeout": 900, "driver": driver}
    if driver == "vm":
        body["memoryMB"] = VM_MEMORY_MB
    t0 = time.perf_counter()
    r = api.post("/v2/sandboxes", json=body)
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 201:
        raise RuntimeError(f"create ({driver}) failed: {r.status_code} {r.text[:300]}")
    return ms, r.json()


def bench_create(srv: Server, driver: str, n: int) -> dict:
    lat = []
    with srv.api() as api:
        _, warm = create(api, driver)
        api.delete(f"/sandboxes/{warm['sandboxID']}")
        for i in range(n):
            ms, sbx = create(api, driver)
            lat.append(ms)
            api.delete(f"/sandboxes/{sbx['sandboxID']}")
            log(f"  {driver} create {i + 1}/{n}: {ms:.1f} ms")
    return summary(lat)


def qemu_pid(sandbox_id: str) -> int | None:
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd and f"/{sandbox_id}/" in cmd:
            return int(p.name)
    return None


def smaps(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        m = re.match(r"(\w+):\s+(\d+) kB", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def status_kib(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        m = re.match(r"(\w+):\s+(\d+) kB", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def bench_live(srv: Server, driver: str, execs: int, settle_s: float) -> dict:
    with srv.api() as api:
        _, sbx = create(api, driver)
        _, peer = create(api, driver)
        sid = sbx["sandboxID"]
        try:
            headers = {
                "E2b-Sandbox-Id": sid,
                "X-Access-Token": sbx["envdAccessToken"],
                "Content-Type": "application/connect+json",
                "Connect-Protocol-Version": "1",
            }
            lat = []
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                for _ in range(3):
                    raw_exec(c, headers, "/bin/true", [])
                for _ in range(execs):
                    t0 = time.perf_counter()
                    raw_exec(c, headers, "/bin/true", [])
                    lat.append((time.perf_counter() - t0) * 1000)
            time.sleep(settle_s)
            mem = {}
            if driver == "vm":
                pid = qemu_pid(sid)
                if pid is None:
                    raise RuntimeError(f"no QEMU process found for {sid}")
                s = smaps(pid)
                st = status_kib(pid)
                mem = {
                    "rss_mib": s.get("Rss", 0) / 1024,
                    "anon_mib": st.get("RssAnon", 0) / 1024,
                    "shmem_mib": st.get("RssShmem", 0) / 1024,
                    "file_mib": st.get("RssFile", 0) / 1024,
                    "pss_mib": s.get("Pss", 0) / 1024,
                }
            else:
                pids = sandbox_pids([sid])
                pss = sum(read_kib(f"/proc/{p}/smaps_rollup", "Pss") for p in pids)
                rss = sum(read_kib(f"/proc/{p}/smaps_rollup", "Rss") for p in pids)
                anon = sum(read_kib(f"/proc/{p}/smaps_rollup", "Anonymous") for p in pids)
                mem = {
                    "rss_mib": rss / 1024,
                    "anon_mib": anon / 1024,
                    "shmem_mib": 0.0,
                    "file_mib": (rss - anon) / 1024,
                    "pss_mib": pss / 1024,
                    "processes": len(pids),
                }
            return {"exec": summary(lat), "memory": mem, "isolation": sbx.get("isolation")}
        finally:
            api.delete(f"/sandboxes/{sid}")
            api.delete(f"/sandboxes/{peer['sandboxID']}")


def render(results: dict, when: str) -> str:
    cols = [("jail", "jail"), ("vm", "microVM restored"), ("vm-cold", "microVM cold boot")]
    cols = [(k, t) for k, t in cols if k in results]

    def row(label, f):
        return f"| {label} | " + " | ".join(f(results[k]) for k, _ in cols) + " |"

    out = [
        f"### Jail vs microVM (run {when})",
        "",
        "| | " + " | ".join(t for _, t in cols) + " |",
        "|---|" + "---|" * len(cols),
        row("isolation reported", lambda r: r["isolation"]),
        row("create→ready p50", lambda r: f"{r['create']['p50']:.1f} ms"),
        row("create→ready p99", lambda r: f"{r['create']['p99']:.1f} ms"),
        row("creates measured", lambda r: str(r["create"]["n"])),
        row("exec `/bin/true` p50 (raw Connect)", lambda r: f"{r['exec']['p50']:.2f} ms"),
        row("exec p99", lambda r: f"{r['exec']['p99']:.2f} ms"),
        row("idle host memory: RSS", lambda r: f"{r['memory']['rss_mib']:.1f} MiB"),
        row("… anonymous (private: pages written, TCG cache, heap)", lambda r: f"{r['memory']['anon_mib']:.1f} MiB"),
        row("… shmem (golden RAM, shared by all clones)", lambda r: f"{r['memory']['shmem_mib']:.1f} MiB"),
        row("… file-backed (kernel image, binaries, libraries)", lambda r: f"{r['memory']['file_mib']:.1f} MiB"),
        row("idle host memory: PSS (2 alive)", lambda r: f"{r['memory']['pss_mib']:.1f} MiB"),
        "",
        f"The microVMs have a {VM_MEMORY_MB} MiB guest, 1 vCPU, TCG. Targets under TCG: "
        "create→ready p50 ≤ 1.5 s; idle RSS ≤ 128 MiB. See docs/vm.md for the breakdown.",
    ]
    return "\n".join(out)


def write_docs(section: str):
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{START}\n{section}\n{END}"
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Isolation drivers side by side\n\n`bench/run-drivers` "
        text += "creates sandboxes of both drivers on one server in one run.\n\n" + block + "\n"
    DOC.write_text(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jail-creates", type=int, default=50)
    ap.add_argument("--vm-creates", type=int, default=10)
    ap.add_argument("--vm-memory", type=int, default=256)
    ap.add_argument("--execs", type=int, default=30)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    global VM_MEMORY_MB
    VM_MEMORY_MB = args.vm_memory
    tmp = Path(tempfile.mkdtemp(prefix="cella-bench-drivers-"))
    tmp.chmod(0o711)
    results = {}
    # One server for the jail and the restored VM, a second with snapshots off for cold boots.
    for name, snapshots, runs in (
        ("main", "1", (("jail", "jail", args.jail_creates), ("vm", "vm", args.vm_creates))),
        ("cold", "0", (("vm-cold", "vm", args.vm_creates),)),
    ):
        os.environ["CELLA_VM_SNAPSHOT"] = snapshots
        srv = Server(data_dir=tmp / f"data-{name}", log_path=tmp / f"server-{name}.log")
        srv.start(echo=lambda line: log(f"[cella serve] {line}"))
        try:
            for key, driver, n in runs:
                log(f"drivers: {key}: {n} creates")
                results[key] = {"create": bench_create(srv, driver, n)}
                results[key].update(bench_live(srv, driver, args.execs, args.settle))
        finally:
            srv.stop()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = render(results, when)
    print(section)
    if args.write_docs:
        write_docs(section)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
