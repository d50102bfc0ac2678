"""cella benchmark harness: start a fresh `cella serve`, measure, print a markdown table and
(with --write-docs) record the results in docs/benchmarks.md.

Measurements (see docs/benchmarks.md for the method and the targets):
  a. create->ready latency: sequential POST /v2/sandboxes round trips (kill after each)
  b. exec round trip of `true` in a live sandbox: official SDK vs a raw Connect request
  c. creates per second with 8 concurrent clients for ~20 s
  d. host memory per idle sandbox with 100 sandboxes alive
  e. peers on the same rootfs: `crun run` (OCI bundle generated here) and `bwrap`

HTTP client: Python `httpx` (sync, keep-alive connections, HTTP/1.1): lean enough that its
overhead (~0.2 ms per request on this machine, measured as the `/health` round trip and
reported) is small against what is measured.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from cella_e2e import TEMPLATE_DIR, Server  # noqa: E402

TARGETS = {
    "create_p50": 15.0,  # ms
    "create_p99": 40.0,  # ms
    "exec_p50": 2.0,  # ms
    "creates_per_s": 100.0,
    "mem_per_sandbox": 5.0,  # MiB
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def pct(samples, p):
    """Percentile with linear interpolation (p in 0..100)."""
    s = sorted(samples)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(samples_ms):
    return {
        "n": len(samples_ms),
        "p50": pct(samples_ms, 50),
        "p99": pct(samples_ms, 99),
        "mean": statistics.fmean(samples_ms) if samples_ms else float("nan"),
        "min": min(samples_ms) if samples_ms else float("nan"),
        "max": max(samples_ms) if samples_ms else float("nan"),
    }


def fmt(x, unit="ms"):
    if x != x:  # nan
        return "n/a"
    return f"{x:.2f} {unit}" if x < 100 else f"{x:.0f} {unit}"


# --- (a) create -> ready ---------------------------------------------------------------

def create_body(timeout=600):
    return {"templateID": "base", "timeout": timeout}


def bench_create_latency(srv: Server, n: int):
    """Sequential creates. A failed create is counted and reported, not timed; more than 10%
    failures abort the run."""
    lat = []
    errors = []
    with srv.api() as api:
        # warm-up (page cache, first-use costs): not counted
        for _ in range(3):
            r = api.post("/v2/sandboxes", json=create_body())
            if r.status_code == 201:
                api.delete(f"/sandboxes/{r.json()['sandboxID']}")
        while len(lat) < n:
            t0 = time.perf_counter()
            r = api.post("/v2/sandboxes", json=create_body())
            t1 = time.perf_counter()
            if r.status_code != 201:
                errors.append(f"{r.status_code} {r.text[:200]}")
                log(f"  create failed: {errors[-1]}")
                if len(errors) > max(2, n // 10):
                    raise RuntimeError(f"too many failed creates: {errors}")
                continue
            lat.append((t1 - t0) * 1000)
            d = api.delete(f"/sandboxes/{r.json()['sandboxID']}")
            if d.status_code not in (200, 204):
                raise RuntimeError(f"kill failed: {d.status_code} {d.text}")
            if len(lat) % 50 == 0:
                log(f"  create {len(lat)}/{n}: p50 so far {pct(lat, 50):.2f} ms")
    out = summary(lat)
    out["errors"] = len(errors)
    out["first_error"] = errors[0] if errors else None
    return out


def bench_http_floor(srv: Server, n: int = 500):
    """Round trip of GET /health: the client + HTTP floor under every REST number."""
    lat = []
    with httpx.Client(base_url=srv.url) as c:
        for _ in range(20):
            c.get("/health")
        for _ in range(n):
            t0 = time.perf_counter()
            c.get("/health")
            lat.append((time.perf_counter() - t0) * 1000)
    return summary(lat)


# --- (b) exec round trip ------------------------------------------------------------------

def envelope(msg: dict) -> bytes:
    payload = json.dumps(msg).encode()
    return struct.pack(">BI", 0, len(payload)) + payload


def parse_envelopes(body: bytes):
    out = []
    i = 0
    while i + 5 <= len(body):
        flags, n = struct.unpack(">BI", body[i : i + 5])
        out.append((flags, json.loads(body[i + 5 : i + 5 + n] or b"{}")))
        i += 5 + n
    return out


def raw_exec(client: httpx.Client, headers: dict, cmd: str, args: list) -> int:
    r = client.post(
        "/process.Process/Start",
        content=envelope({"process": {"cmd": cmd, "args": args}}),
        headers=headers,
    )
    if r.status_code != 200:
        raise RuntimeError(f"raw exec failed: {r.status_code} {r.text[:300]}")
    exit_code = None
    for flags, msg in parse_envelopes(r.content):
        if flags & 2:
            if msg.get("error"):
                raise RuntimeError(f"stream error: {msg}")
            continue
        end = msg.get("event", {}).get("end")
        if end is not None:
            exit_code = end.get("exitCode", 0)
    if exit_code != 0:
        raise RuntimeError(f"raw exec ended with {exit_code!r}: {r.content[:300]!r}")
    return exit_code


def bench_exec(srv: Server, n: int):
    from e2b import Sandbox

    os.environ.update(E2B_API_KEY=srv.key, E2B_API_URL=srv.url, E2B_SANDBOX_URL=srv.url)
    sbx = Sandbox.create(template="base", timeout=600)
    try:
        def sdk():
            return sbx.commands.run("true")

        with srv.api() as api:
            token = api.get(f"/sandboxes/{sbx.sandbox_id}").json().get("envdAccessToken")
        headers = {
            "Content-Type": "application/connect+json",
            "Connect-Protocol-Version": "1",
            "E2b-Sandbox-Id": sbx.sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "Authorization": "Basic " + base64.b64encode(b"user:").decode(),
        }
        if token:
            headers["X-Access-Token"] = token
        results = {}
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            variants = {
                "sdk: commands.run('true') (bash -l -c)": sdk,
                "raw Connect: bash -l -c true": lambda: raw_exec(client, headers, "/bin/bash", ["-l", "-c", "true"]),
                "raw Connect: /bin/true": lambda: raw_exec(client, headers, "/bin/true", []),
            }
            for name, fn in variants.items():
                for _ in range(10):
                    fn()
                lat = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    fn()
                    lat.append((time.perf_counter() - t0) * 1000)
                results[name] = summary(lat)
                log(f"  exec {name}: p50 {results[name]['p50']:.2f} ms")
        return results
    finally:
        sbx.kill()


# --- (c) throughput ------------------------------------------------------------------------

def bench_throughput(srv: Server, clients: int, seconds: float):
    stop = time.monotonic() + seconds
    created = [0] * clients
    lat = [[] for _ in range(clients)]
    errors = []

    def worker(i):
        with srv.api() as api:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = api.post("/v2/sandboxes", json=create_body())
                t1 = time.perf_counter()
                if r.status_code != 201:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    continue
                created[i] += 1
                lat[i].append((t1 - t0) * 1000)
                api.delete(f"/sandboxes/{r.json()['sandboxID']}")

    t_start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t_start
    all_lat = [x for l in lat for x in l]
    return {
        "clients": clients,
        "seconds": elapsed,
        "creates": sum(created),
        "per_s": sum(created) / elapsed,
        "latency": summary(all_lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


# --- (d) memory per idle sandbox -------------------------------------------------------------

def bench_snapshot(srv: Server, n: int):
    """Snapshots side by side in one run: the time to snapshot a sandbox with a small change
    and with a 64 MiB file, create→ready from the template vs from a snapshot (interleaved, so
    noise hits both), and fork of 1 and of 4."""
    from e2b import Sandbox

    os.environ.update(E2B_API_KEY=srv.key, E2B_API_URL=srv.url, E2B_SANDBOX_URL=srv.url)
    out = {}
    with srv.api() as api:
        def snap_times(sbx, label):
            times, sizes = [], []
            for _ in range(n):
                t0 = time.perf_counter()
                r = api.post(f"/sandboxes/{sbx.sandbox_id}/snapshots", json={})
                times.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 201:
                    raise RuntimeError(f"snapshot failed: {r.status_code} {r.text[:200]}")
                sid = r.json()["snapshotID"]
                layer = srv.data_dir / "snapshots" / sid.split(":")[0]
                sizes.append(sum(f.stat().st_blocks * 512 for f in layer.rglob("*") if f.is_file() and not f.is_symlink()))
                api.delete(f"/templates/{sid}")
            out[label] = summary(times)
            out[label]["layer_kib"] = statistics.median(sizes) / 1024
        small = Sandbox.create(template="base", timeout=600)
        small.files.write("/home/user/small.txt", "x" * 4096)
        snap_times(small, "snapshot: 4 KiB changed")
        big = Sandbox.create(template="base", timeout=600)
        big.commands.run("head -c 67108864 /dev/urandom > /home/user/big.bin")
        snap_times(big, "snapshot: 64 MiB changed")
        big.kill()

        r = api.post(f"/sandboxes/{small.sandbox_id}/snapshots", json={})
        sid = r.json()["snapshotID"]
        plain, layered = [], []
        for _ in range(n):
            for body, acc in ((create_body(), plain), ({"templateID": sid, "timeout": 600}, layered)):
                t0 = time.perf_counter()
                r = api.post("/v2/sandboxes", json=body)
                acc.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 201:
                    raise RuntimeError(f"create failed: {r.status_code} {r.text[:200]}")
                api.delete(f"/sandboxes/{r.json()['sandboxID']}")
        out["create from template"] = summary(plain)
        out["create from a snapshot (1 layer)"] = summary(layered)
        api.delete(f"/templates/{sid}")
        for count in (1, 4):
            times = []
            for _ in range(max(3, n // 4)):
                t0 = time.perf_counter()
                r = api.post(f"/sandboxes/{small.sandbox_id}/fork", json={"count": count, "timeout": 600})
                times.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 201:
                    raise RuntimeError(f"fork failed: {r.status_code} {r.text[:200]}")
                for f in r.json():
                    if "sandbox" not in f:
                        raise RuntimeError(f"a fork failed: {f}")
                    api.delete(f"/sandboxes/{f['sandbox']['sandboxID']}")
            out[f"fork count={count}"] = summary(times)
        small.kill()
    out["ratio_create_snapshot_vs_template_p50"] = (
        out["create from a snapshot (1 layer)"]["p50"] / out["create from template"]["p50"]
    )
    return out


def read_kib(path, key):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cella_cgroup_dirs(controller, ids):
    """The cgroups of the given sandboxes (other cella servers may run on the host too)."""
    out = []
    for i in ids:
        for pattern in (f"{controller}/cella/*/{i}", f"{controller}/cella/{i}", f"cella/*/{i}", f"cella/{i}"):
            found = [p for p in Path("/sys/fs/cgroup").glob(pattern) if p.is_dir()]
            if found:
                out.append(found[0])
                break
    return out


def sandbox_pids(ids):
    pids = set()
    for d in cella_cgroup_dirs("pids", ids) or cella_cgroup_dirs("memory", ids):
        for name in ("cgroup.procs", "tasks"):
            try:
                pids |= {int(x) for x in (d / name).read_text().split()}
                break
            except OSError:
                continue
    return pids


def bench_memory(srv: Server, n: int, settle_s: float = 5.0):
    server_pid = srv.proc.pid
    rss0 = read_kib(f"/proc/{server_pid}/status", "VmRSS")
    # Host-wide view (noisy on a busy machine, but it includes kernel memory that no cgroup
    # or process accounts for: namespaces, mounts, page tables, slab).
    avail0 = read_kib("/proc/meminfo", "MemAvailable")
    slab0 = read_kib("/proc/meminfo", "Slab")
    ids = []
    with srv.api() as api:
        failures = 0
        while len(ids) < n:
            r = api.post("/v2/sandboxes", json=create_body())
            if r.status_code != 201:
                failures += 1
                log(f"  create failed: {r.status_code} {r.text[:200]}")
                if failures > max(2, n // 10):
                    raise RuntimeError("too many failed creates")
                continue
            ids.append(r.json()["sandboxID"])
        time.sleep(settle_s)
        rss1 = read_kib(f"/proc/{server_pid}/status", "VmRSS")
        avail1 = read_kib("/proc/meminfo", "MemAvailable")
        slab1 = read_kib("/proc/meminfo", "Slab")
        pids = sandbox_pids(ids)
        rss = sum(read_kib(f"/proc/{p}/smaps_rollup", "Rss") for p in pids)
        pss = sum(read_kib(f"/proc/{p}/smaps_rollup", "Pss") for p in pids)
        usage = 0
        cg_rss = 0
        cg_cache = 0
        for d in cella_cgroup_dirs("memory", ids):
            for name in ("memory.usage_in_bytes", "memory.current"):
                f = d / name
                if f.exists():
                    usage += int(f.read_text())
                    break
            stat = d / "memory.stat"
            if stat.exists():
                for line in stat.read_text().splitlines():
                    k, _, v = line.partition(" ")
                    if k in ("rss", "anon"):
                        cg_rss += int(v)
                    elif k in ("cache", "file"):
                        cg_cache += int(v)
        n_cg = len(cella_cgroup_dirs("memory", ids))
        for sid in ids:
            api.delete(f"/sandboxes/{sid}")
    mib = 1024.0
    return {
        "sandboxes": n,
        "cgroups_seen": n_cg,
        "processes": len(pids),
        "rss_per_sandbox_mib": rss / mib / n,
        "pss_per_sandbox_mib": pss / mib / n,
        "cgroup_usage_per_sandbox_mib": usage / (1024 * 1024) / n,
        "cgroup_rss_per_sandbox_mib": cg_rss / (1024 * 1024) / n,
        "cgroup_cache_per_sandbox_mib": cg_cache / (1024 * 1024) / n,
        "server_rss_delta_per_sandbox_mib": (rss1 - rss0) / mib / n,
        "server_rss_before_mib": rss0 / mib,
        "server_rss_after_mib": rss1 / mib,
        "host_memavailable_drop_per_sandbox_mib": (avail0 - avail1) / mib / n,
        "host_slab_growth_per_sandbox_mib": (slab1 - slab0) / mib / n,
        "headline_mib": (pss + max(rss1 - rss0, 0)) / mib / n,
    }


# --- (e) peers -----------------------------------------------------------------------------

def base_rootfs() -> Path:
    builds = sorted(
        (p for p in (TEMPLATE_DIR / "base").glob("*/rootfs") if p.is_dir()),
        key=lambda p: p.stat().st_mtime,
    )
    if not builds:
        raise RuntimeError(f"no built base template under {TEMPLATE_DIR}/base")
    return builds[-1]


def time_cmd(argv, n, warmup=5):
    for _ in range(warmup):
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lat.append((time.perf_counter() - t0) * 1000)
    return summary(lat)


def make_bundle(rootfs: Path, userns: bool) -> Path:
    bundle = Path(tempfile.mkdtemp(prefix="cella-bench-oci-"))
    subprocess.run(["crun", "spec"], cwd=bundle, check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["/bin/true"]
    cfg["root"] = {"path": str(rootfs), "readonly": True}
    if userns:
        # The template rootfs is shifted to host uid 100000 (= root inside), like cella's.
        cfg["linux"]["namespaces"].append({"type": "user"})
        cfg["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        cfg["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    (bundle / "config.json").write_text(json.dumps(cfg, indent=1))
    return bundle


CRUN_LOOP = r"""
import json, subprocess, sys, time
bundle, n, warm = sys.argv[1], int(sys.argv[2]), 5
lat = []
for i in range(warm + n):
    cid = f"cella-bench-{i}"
    t0 = time.perf_counter()
    r = subprocess.run(["crun", "run", "--bundle", bundle, cid],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = (time.perf_counter() - t0) * 1000
    if r.returncode != 0:
        print(json.dumps({"error": r.stderr.decode()[:300]}))
        sys.exit(0)
    if i >= warm:
        lat.append(dt)
print(json.dumps({"lat": lat}))
"""


def run_crun(bundle: Path, n: int):
    """Time `crun run` n times. crun refuses this host's cgroup v1/v2 hybrid layout (v2 holds
    the hugetlb controller), so the loop runs in a private mount namespace in which the v2
    mount at /sys/fs/cgroup/unified is detached: crun then sees (and uses) plain cgroup v1,
    like cella's jail driver. The host's mounts are not touched."""
    script = "umount -l /sys/fs/cgroup/unified 2>/dev/null; exec \"$0\" -c \"$1\" \"$2\" \"$3\""
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script,
         sys.executable, CRUN_LOOP, str(bundle), str(n)],
        capture_output=True, text=True, timeout=600,
    )
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[:300]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if "error" in out:
        return out
    return summary(out["lat"])


def bench_peers(n: int):
    out = {}
    rootfs = base_rootfs()
    out["host: posix_spawn /bin/true (harness floor)"] = time_cmd(["/bin/true"], n)
    if shutil.which("crun"):
        for userns in (False, True):
            bundle = make_bundle(rootfs, userns)
            name = "crun run /bin/true" + (" (+ user ns)" if userns else "")
            try:
                out[name] = run_crun(bundle, n)
            finally:
                shutil.rmtree(bundle, ignore_errors=True)
    if shutil.which("bwrap"):
        argv = [
            "bwrap", "--unshare-all", "--ro-bind", str(rootfs), "/", "--proc", "/proc",
            "--dev", "/dev", "--tmpfs", "/tmp", "/bin/true",
        ]
        try:
            out["bwrap --unshare-all /bin/true"] = time_cmd(argv, n)
        except subprocess.CalledProcessError as e:
            out["bwrap --unshare-all /bin/true"] = {"error": str(e)}
    return out, rootfs


# --- report --------------------------------------------------------------------------------

def machine_info():
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""

    model = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    mem_kib = read_kib("/proc/meminfo", "MemTotal")
    cg = "v2 (unified)" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1 (hybrid)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{model}, {os.cpu_count()} vCPU",
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "os": sh(". /etc/os-release && echo $PRETTY_NAME"),
        "cgroups": cg,
        "virtualisation": sh("systemd-detect-virt 2>/dev/null") or "unknown",
        "commit": sh(f"git -C {ROOT} rev-parse --short HEAD") + (" (+ uncommitted changes)" if sh(f"git -C {ROOT} status --porcelain") else ""),
        "crun": sh("crun --version | head -1"),
        "bwrap": sh("bwrap --version"),
        "python": platform.python_version(),
        "httpx": httpx.__version__,
    }


def verdict(measured, target, lower_is_better=True):
    if measured != measured:
        return "not measured"
    if lower_is_better:
        if measured <= target:
            return "**met**"
        return f"missed: {measured / target:.1f}x the target"
    if measured >= target:
        return "**met**"
    return f"missed: {measured / target:.2f}x of the target"


def render(results) -> str:
    r = results
    lines = []
    lines.append("| Metric | Target | Measured | Verdict |")
    lines.append("|---|---|---|---|")
    c = r.get("create")
    if c:
        lines.append(f"| create→ready p50 ({c['n']} sequential creates) | ≤ 15 ms | {fmt(c['p50'])} | {verdict(c['p50'], TARGETS['create_p50'])} |")
        lines.append(f"| create→ready p99 | ≤ 40 ms | {fmt(c['p99'])} | {verdict(c['p99'], TARGETS['create_p99'])} |")
    e = r.get("exec")
    if e:
        sdk = e["sdk: commands.run('true') (bash -l -c)"]
        raw = e["raw Connect: /bin/true"]
        lines.append(f"| exec round trip p50 (SDK, `commands.run('true')`) | ≤ 2 ms | {fmt(sdk['p50'])} | {verdict(sdk['p50'], TARGETS['exec_p50'])} |")
        lines.append(f"| exec round trip p50 (raw Connect, `/bin/true`) | ≤ 2 ms | {fmt(raw['p50'])} | {verdict(raw['p50'], TARGETS['exec_p50'])} |")
    t = r.get("throughput")
    if t:
        lines.append(f"| creates/s ({t['clients']} concurrent clients, {t['seconds']:.0f} s) | ≥ 100/s | {t['per_s']:.1f}/s | {verdict(t['per_s'], TARGETS['creates_per_s'], lower_is_better=False)} |")
    m = r.get("memory")
    if m:
        lines.append(f"| host memory per idle sandbox ({m['sandboxes']} alive; PSS + server RSS delta) | ≤ 5 MiB | {m['headline_mib']:.2f} MiB | {verdict(m['headline_mib'], TARGETS['mem_per_sandbox'])} |")
        lines.append(f"| … cgroup memory.usage per sandbox (incl. page cache) | (≤ 5 MiB) | {m['cgroup_usage_per_sandbox_mib']:.2f} MiB | {verdict(m['cgroup_usage_per_sandbox_mib'], TARGETS['mem_per_sandbox'])} |")
        lines.append(f"| … host MemAvailable drop per sandbox (incl. kernel memory; noisy) | (≤ 5 MiB) | {m['host_memavailable_drop_per_sandbox_mib']:.2f} MiB | {verdict(m['host_memavailable_drop_per_sandbox_mib'], TARGETS['mem_per_sandbox'])} |")
    lines.append("")

    def dist_table(title, rows):
        out = [f"**{title}**", "", "| | n | p50 | p99 | mean | min | max |", "|---|---|---|---|---|---|---|"]
        for name, s in rows.items():
            if "error" in s:
                msg = " ".join(s["error"].split())[:100]
                out.append(f"| {name} | – | failed: {msg} | | | | |")
                continue
            out.append(
                f"| {name} | {s['n']} | {fmt(s['p50'])} | {fmt(s['p99'])} | {fmt(s['mean'])} | {fmt(s['min'])} | {fmt(s['max'])} |"
            )
        out.append("")
        return out

    dists = {}
    if r.get("http_floor"):
        dists["GET /health (HTTP + client floor)"] = r["http_floor"]
    if c:
        dists["POST /v2/sandboxes (create→ready)"] = c
    if t:
        dists[f"create under load ({t['clients']} clients)"] = t["latency"]
    if e:
        dists.update({f"exec: {k}": v for k, v in e.items()})
    if dists:
        lines += dist_table("Latency distributions", dists)
    if r.get("peers"):
        lines += dist_table(f"Peers on the same rootfs (`{r['rootfs']}`), spawn→exit", r["peers"])
    if m:
        lines.append(f"**Memory detail** ({m['sandboxes']} idle sandboxes; per-sandbox values in MiB)")
        lines.append("")
        lines.append("| | value |")
        lines.append("|---|---|")
        for k in (
            "processes", "rss_per_sandbox_mib", "pss_per_sandbox_mib", "cgroup_usage_per_sandbox_mib",
            "cgroup_rss_per_sandbox_mib", "cgroup_cache_per_sandbox_mib", "server_rss_delta_per_sandbox_mib",
            "server_rss_before_mib", "server_rss_after_mib",
            "host_memavailable_drop_per_sandbox_mib", "host_slab_growth_per_sandbox_mib",
        ):
            v = m[k]
            lines.append(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines.append("")
    if r.get("snapshot"):
        sn = {k: v for k, v in r["snapshot"].items() if isinstance(v, dict)}
        lines += dist_table("Snapshots (jail; one run, side by side)", sn)
        for k, v in sn.items():
            if "layer_kib" in v:
                lines.append(f"- {k}: layer {v['layer_kib']:.0f} KiB on disk")
        lines.append(
            f"- create from a snapshot / create from the template, p50: "
            f"{r['snapshot']['ratio_create_snapshot_vs_template_p50']:.2f}×"
        )
        lines.append("")
    if c and c.get("errors"):
        lines.append(f"Sequential creates: {c['errors']} failed and were not timed (first: `{c['first_error']}`).")
        lines.append("")
    if t and t["errors"]:
        lines.append(f"Throughput run: {t['errors']} failed creates (first: `{t['first_error']}`).")
        lines.append("")
    return "\n".join(lines)


def write_docs(results, info, table):
    path = ROOT / "docs" / "benchmarks.md"
    marker_start = "<!-- bench:results:start -->"
    marker_end = "<!-- bench:results:end -->"
    machine = "\n".join(f"| {k} | {v} |" for k, v in info.items())
    block = (
        f"{marker_start}\n"
        f"### Latest run ({info['date']})\n\n"
        f"| Machine | |\n|---|---|\n{machine}\n\n{table}\n"
        f"Raw numbers: `docs/benchmarks.json`.\n"
        f"{marker_end}"
    )
    text = path.read_text() if path.exists() else ""
    if marker_start in text and marker_end in text:
        pre = text.split(marker_start)[0]
        post = text.split(marker_end, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    (ROOT / "docs" / "benchmarks.json").write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    log(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--creates", type=int, default=200)
    ap.add_argument("--execs", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--idle", type=int, default=100)
    ap.add_argument("--peer-runs", type=int, default=200)
    ap.add_argument("--snapshots", type=int, default=20)
    ap.add_argument("--only", default="floor,create,exec,throughput,memory,snapshot,peers")
    ap.add_argument("--write-docs", action="store_true", help="record the results in docs/benchmarks.md")
    args = ap.parse_args()
    only = set(args.only.split(","))

    if os.geteuid() != 0:
        sys.exit("bench: must run as root")
    tmp = Path(tempfile.mkdtemp(prefix="cella-bench-"))
    tmp.chmod(0o711)  # sandbox users (mapped uids) must be able to traverse it
    results = {}
    if only & {"floor", "create", "exec", "throughput", "memory", "snapshot"}:
        srv = Server(data_dir=tmp / "data", log_path=tmp / "server.log")
        log(f"bench: starting cella serve (log {srv.log_path})")
        srv.start(echo=lambda line: log(f"[cella serve] {line}"))
        run_server_benchmarks(srv, args, only, results)
    if "peers" in only:
        log(f"bench: (e) peers x{args.peer_runs}")
        results["peers"], rootfs = bench_peers(args.peer_runs)
        results["rootfs"] = str(rootfs)
    info = machine_info()
    table = render(results)
    print(table)
    if args.write_docs:
        write_docs(results, info, table)
    shutil.rmtree(tmp, ignore_errors=True)


def run_server_benchmarks(srv: Server, args, only: set, results: dict):
    try:
        if "floor" in only:
            log("bench: HTTP floor")
            results["http_floor"] = bench_http_floor(srv)
        if "create" in only:
            log(f"bench: (a) create→ready x{args.creates}")
            results["create"] = bench_create_latency(srv, args.creates)
        if "exec" in only:
            log(f"bench: (b) exec round trip x{args.execs}")
            results["exec"] = bench_exec(srv, args.execs)
        if "throughput" in only:
            log(f"bench: (c) {args.clients} clients for {args.seconds:.0f} s")
            results["throughput"] = bench_throughput(srv, args.clients, args.seconds)
        if "memory" in only:
            log(f"bench: (d) memory with {args.idle} idle sandboxes")
            results["memory"] = bench_memory(srv, args.idle)
        if "snapshot" in only:
            log(f"bench: (f) snapshots x{args.snapshots}")
            results["snapshot"] = bench_snapshot(srv, args.snapshots)
    finally:
        code = srv.stop()
        log(f"bench: server stopped ({code})")


if __name__ == "__main__":
    main()
