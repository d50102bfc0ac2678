"""Wire format and kernel processes of the code interpreter server (standard library only).

Kept free of third-party imports so the server can spawn the default kernel before it pays for
importing tornado and jupyter_client, and so the translation from Jupyter messages to E2B's
stream lines is unit-tested without kernels.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_STARTUP = os.path.join(HERE, "kernel_startup.py")

DEFAULT_PORT = 49999
DEFAULT_CWD = "/home/user"
# Seconds between keepalive lines while a cell produces no output. Writing them also detects a
# client that went away (the write fails), which interrupts the cell.
KEEPALIVE_SECONDS = 1.0
# After an interrupt, how long the kernel gets to go idle before it is restarted instead.
INTERRUPT_GRACE_SECONDS = 5.0
# How long a kernel may take to answer its first kernel_info request.
KERNEL_START_TIMEOUT = 60.0
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_CODE_BYTES = 8 * 1024 * 1024
MAX_CONTEXTS = 64
MAX_ENV_VARS = 512
# Output messages buffered per execution before the kernel's messages back up.
QUEUE_SIZE = 1024
# Kernels are the first thing the OOM killer should pick, not this server.
KERNEL_OOM_SCORE_ADJ = 800

LANGUAGE_ALIASES = {"python": "python", "python3": "python", "py": "python"}

# Result fields and the MIME types they come from (E2B's mapping).
MIME_FIELDS = (
    ("text/html", "html"),
    ("text/markdown", "markdown"),
    ("image/svg+xml", "svg"),
    ("image/png", "png"),
    ("image/jpeg", "jpeg"),
    ("application/pdf", "pdf"),
    ("text/latex", "latex"),
    ("application/json", "json"),
    ("application/javascript", "javascript"),
    ("e2b/data", "data"),
    ("e2b/chart", "chart"),
)


def log(*parts: object) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] code-interpreter:", *parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Pure helpers (unit-tested on the host without kernels).
# ---------------------------------------------------------------------------------------------


class BadRequest(Exception):
    """A request the client got wrong: 400 with this message."""


class NotFound(Exception):
    """An unknown context: 404 with this message."""


def normalize_language(language: object) -> str:
    """`None`/`python`/`python3` -> `python`; anything else is not supported (400)."""
    if language is None or language == "":
        return "python"
    if not isinstance(language, str):
        raise BadRequest("language must be a string")
    lang = LANGUAGE_ALIASES.get(language.strip().lower())
    if lang is None:
        raise BadRequest(
            f"language {language!r} is not supported by this code interpreter (only python)"
        )
    return lang


def parse_execute_request(body: bytes) -> dict:
    """Validate a `POST /execute` body: `{code, context_id?, language?, env_vars?, timeout?}`."""
    req = parse_json_object(body)
    code = req.get("code")
    if not isinstance(code, str):
        raise BadRequest("code must be a string")
    if len(code.encode("utf-8", "surrogatepass")) > MAX_CODE_BYTES:
        raise BadRequest(f"code is larger than {MAX_CODE_BYTES} bytes")
    context_id = req.get("context_id")
    language = req.get("language")
    if context_id is not None and language is not None:
        raise BadRequest("context_id and language are mutually exclusive")
    if context_id is not None and not isinstance(context_id, str):
        raise BadRequest("context_id must be a string")
    env_vars = req.get("env_vars") or {}
    if not isinstance(env_vars, dict) or len(env_vars) > MAX_ENV_VARS:
        raise BadRequest(f"env_vars must be an object of at most {MAX_ENV_VARS} strings")
    for k, v in env_vars.items():
        if not k or "=" in k or "\0" in k or not isinstance(v, str) or "\0" in v:
            raise BadRequest(f"invalid environment variable {k!r}")
    timeout = req.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        raise BadRequest("timeout must be a positive number of seconds")
    return {
        "code": code,
        "context_id": context_id,
        "language": None if context_id is not None else normalize_language(language),
        "env_vars": env_vars,
        "timeout": float(timeout) if timeout is not None else None,
    }


def parse_json_object(body: bytes) -> dict:
    if not body or not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"invalid JSON body: {e}") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


def timestamp(header: dict) -> str:
    date = header.get("date")
    if isinstance(date, _dt.datetime):
        return date.isoformat()
    if isinstance(date, str) and date:
        return date
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def result_event(data: dict, is_main_result: bool) -> dict:
    """A Jupyter MIME bundle as E2B's `result` line: known types to fields, rest in `extra`."""
    data = dict(data or {})
    event: dict = {"type": "result"}
    text = data.pop("text/plain", None)
    if isinstance(text, str):
        if len(text) >= 2 and text.startswith("'") and text.endswith("'"):
            text = text[1:-1]
        event["text"] = text
    for mime, field in MIME_FIELDS:
        value = data.pop(mime, None)
        if value is not None:
            event[field] = value
    if data:
        event["extra"] = data
    event["is_main_result"] = is_main_result
    return event


def message_event(msg: dict) -> dict | None:
    """Translate one IOPub message into a stream line (None: nothing to send)."""
    kind = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
    content = msg.get("content") or {}
    if kind == "stream":
        name = content.get("name")
        if name in ("stdout", "stderr"):
            return {
                "type": name,
                "text": str(content.get("text", "")),
                "timestamp": timestamp(msg.get("header") or {}),
            }
        return None
    if kind == "execute_result":
        return result_event(content.get("data") or {}, True)
    if kind == "display_data":
        return result_event(content.get("data") or {}, False)
    if kind == "error":
        tb = content.get("traceback") or []
        return error_event(
            str(content.get("ename", "")),
            str(content.get("evalue", "")),
            "\n".join(str(line) for line in tb),
        )
    if kind == "execute_input":
        count = content.get("execution_count")
        if isinstance(count, int):
            return {"type": "number_of_executions", "execution_count": count}
    return None


def error_event(name: str, value: str, traceback: str = "") -> dict:
    return {"type": "error", "name": name, "value": value, "traceback": traceback}


def kernel_env(base: dict) -> dict:
    env = dict(base)
    # Figures are shown inline (as PNG results) without savefig; the template's env sets Agg
    # for scripts, which must not apply inside kernels.
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    env.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# ---------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------


class KernelProcess:
    """One ipykernel process. Spawning needs nothing but the standard library, so the default
    kernel can start before jupyter_client is even imported."""

    def __init__(self, runtime_dir: str, cwd: str, env: dict):
        # IPC sockets in the server's private (0700) runtime directory: no port races, and
        # nothing else in the sandbox can reach the kernel.
        base = os.path.join(runtime_dir, f"k-{uuid.uuid4().hex[:12]}")
        self.connection = {
            "shell_port": 1,
            "iopub_port": 2,
            "stdin_port": 3,
            "control_port": 4,
            "hb_port": 5,
            "ip": base,
            "key": uuid.uuid4().hex,
            "transport": "ipc",
            "signature_scheme": "hmac-sha256",
            "kernel_name": "python3",
        }
        self.conn_file = os.path.join(runtime_dir, f"kernel-{uuid.uuid4().hex}.json")
        fd = os.open(self.conn_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.connection, f)
        argv = [
            sys.executable,
            "-m",
            "ipykernel_launcher",
            "-f",
            self.conn_file,
            "--HistoryManager.enabled=False",
            f"--IPKernelApp.parent_handle={os.getpid()}",
        ]
        if os.path.exists(KERNEL_STARTUP):
            argv.append(f"--IPKernelApp.exec_files={KERNEL_STARTUP}")
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=kernel_env(env),
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,
            stderr=sys.stderr,
            start_new_session=True,
        )
        self.started = time.monotonic()
        try:
            with open(f"/proc/{self.proc.pid}/oom_score_adj", "w") as f:
                f.write(str(KERNEL_OOM_SCORE_ADJ))
        except OSError:
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exit_description(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "running"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"killed by {name}{hint}"
        return f"exited with status {code}"

    def signal(self, sig: int) -> None:
        # The kernel leads its own process group: `!sleep 100` children get the signal too.
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        paths = [self.conn_file]
        paths += [f"{self.connection['ip']}-{n}" for n in range(1, 6)]
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass


