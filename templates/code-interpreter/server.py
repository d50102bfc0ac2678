#!/usr/bin/env python3
"""cella's code interpreter server: E2B's port-49999 API over Jupyter kernels.

The `e2b-code-interpreter` SDK talks to a server inside the sandbox on port 49999
(`POST /execute` streaming JSON lines, `/contexts`, `/health`). This is that server. Each
context is one ipykernel process driven with jupyter_client over ZMQ on loopback; the
kernel protocol gives us, for free, what users rely on from Jupyter: IPython semantics
(last expression is the result, `!cmd`, `%magics`), rich display (`display()`, pandas HTML,
matplotlib figures via the inline backend) and SIGINT interrupts.

Why not Jupyter Server (what E2B runs): it adds a second process, websockets and a second
startup of a second or more, while all we need is a kernel client. Why kernels and not exec()
in this process: a cell that eats all memory or segfaults must kill its kernel, not the
server, and an infinite loop must be interruptible without losing the context.

Startup is tuned for the first `run_code` after sandbox creation: the default Python kernel is
spawned before the heavy imports (tornado, jupyter_client, zmq), so both happen at once, and
the HTTP port is open before the kernel is ready (`/execute` waits for it).

Everything a request carries is untrusted: bodies are size-limited, fields type-checked, and
a failure inside an execution becomes an `error` line followed by `end_of_execution`, never a
broken stream.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

# This directory, not the kernel's cwd, holds our modules.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from protocol import DEFAULT_CWD, DEFAULT_PORT, KernelProcess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=os.environ.get("CELLA_CI_HOST", "0.0.0.0"))
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("CELLA_CI_PORT", DEFAULT_PORT))
    )
    parser.add_argument("--cwd", default=os.environ.get("CELLA_CI_CWD", DEFAULT_CWD))
    parser.add_argument(
        "--no-prestart",
        action="store_true",
        help="do not start the default python kernel before the first request",
    )
    args = parser.parse_args()

    runtime_dir = tempfile.mkdtemp(prefix="cella-ci-")
    cwd = args.cwd if os.path.isdir(args.cwd) else os.path.expanduser("~")
    # Spawn the default kernel first: its startup overlaps our own imports below.
    first = None if args.no_prestart else KernelProcess(runtime_dir, cwd, dict(os.environ))

    import asyncio

    from app import serve  # the half that needs tornado and jupyter_client

    try:
        asyncio.run(serve(args, runtime_dir, cwd, first))
    finally:
        try:
            for name in os.listdir(runtime_dir):
                os.unlink(os.path.join(runtime_dir, name))
            os.rmdir(runtime_dir)
        except OSError:
            pass


if __name__ == "__main__":
    main()
