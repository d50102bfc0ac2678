"""The asynchronous half of the code interpreter server: HTTP routes and kernel clients.

One `Context` per E2B code context owns a kernel process and a jupyter_client
`AsyncKernelClient`. Executions in a context are serialized by a lock (a kernel runs one cell
at a time anyway, and interleaved output would be unattributable); different contexts run in
parallel. A reader task per kernel routes IOPub messages to the execution whose request they
answer, by parent message ID, through a bounded queue.

Interrupts: a client that disconnects (or a request `timeout`) sends SIGINT to the kernel's
process group; if the kernel is not idle within a grace period it is restarted, so the
context always stays usable. A kernel that dies (OOM kill, segfault, `os._exit`) is reported
as an `error` line and restarted right away; its variables are gone, which the error says.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import uuid
from queue import Empty

import tornado.httpserver
import tornado.netutil
import tornado.iostream
import tornado.web
from jupyter_client.asynchronous import AsyncKernelClient

from protocol import (
    INTERRUPT_GRACE_SECONDS,
    KEEPALIVE_SECONDS,
    KERNEL_START_TIMEOUT,
    MAX_BODY_BYTES,
    MAX_CONTEXTS,
    QUEUE_SIZE,
    BadRequest,
    KernelProcess,
    NotFound,
    error_event,
    log,
    message_event,
    normalize_language,
    parse_execute_request,
    parse_json_object,
)


class KernelDied(Exception):
    """The kernel process exited while we waited for it."""


class Kernel:
    """A started kernel process plus its client and message routing."""

    def __init__(self, proc: KernelProcess):
        self.proc = proc
        self.client: AsyncKernelClient | None = None
        self.listeners: dict[str, asyncio.Queue] = {}
        self.tasks: list[asyncio.Task] = []
        self.ready = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        kc = AsyncKernelClient()
        kc.load_connection_info(self.proc.connection)
        kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        self.client = kc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + KERNEL_START_TIMEOUT
        # Ready means: the kernel answers kernel_info on the shell channel *and* its IOPub
        # messages reach us (ZMQ subscriptions take a moment; output published before that
        # would be lost). Ask again until both happened.
        while True:
            if not self.proc.alive():
                raise KernelDied(f"the kernel {self.proc.exit_description()} during start")
            if loop.time() > deadline:
                raise KernelDied(f"the kernel did not start within {KERNEL_START_TIMEOUT:g} s")
            msg_id = kc.kernel_info()
            got_reply = got_iopub = False
            until = loop.time() + 0.2
            while loop.time() < until and not (got_reply and got_iopub):
                try:
                    msg = await kc.get_shell_msg(timeout=0.01)
                    got_reply |= (msg.get("parent_header") or {}).get("msg_id") == msg_id
                except Empty:
                    pass
                try:
                    await kc.get_iopub_msg(timeout=0.01)
                    got_iopub = True
                except Empty:
                    pass
            if got_reply and got_iopub:
                break
        self.tasks.append(loop.create_task(self._route_iopub()))
        self.tasks.append(loop.create_task(self._drain_shell()))
        log(f"kernel {self.proc.proc.pid} ready in {loop.time() - self.proc.started:.3f}s")

    async def _route_iopub(self) -> None:
        kc = self.client
        assert kc is not None
        while True:
            try:
                msg = await kc.get_iopub_msg()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a malformed message; keep routing the rest
                log(f"iopub: {e!r}")
                continue
            parent = (msg.get("parent_header") or {}).get("msg_id")
            queue = self.listeners.get(parent)
            if queue is not None:
                await queue.put(msg)

    async def _drain_shell(self) -> None:
        # Replies are not needed (IOPub carries everything), but unread they would pile up.
        kc = self.client
        assert kc is not None
        while True:
            try:
                msg = await kc.get_shell_msg()
            except asyncio.CancelledError:
                raise
            except Exception:
                continue
            parent = (msg.get("parent_header") or {}).get("msg_id")
            queue = self.listeners.get(parent)
            if queue is not None:
                await queue.put(msg)

    def execute(self, code: str, silent: bool = False) -> tuple[str, asyncio.Queue]:
        assert self.client is not None
        queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_SIZE)
        msg_id = self.client.execute(
            code,
            silent=silent,
            store_history=not silent,
            allow_stdin=False,
            stop_on_error=not silent,
        )
        self.listeners[msg_id] = queue
        return msg_id, queue

    def done(self, msg_id: str) -> None:
        self.listeners.pop(msg_id, None)

    async def run_silent(self, code: str, timeout: float = 10.0) -> None:
        """Run bookkeeping code (env vars, chdir) and wait until the kernel is idle again."""
        msg_id, queue = self.execute(code, silent=True)
        try:
            await wait_idle(self, queue, timeout)
        finally:
            self.done(msg_id)

    def shutdown(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.ready.cancel()
        if self.client is not None:
            try:
                self.client.stop_channels()
            except Exception:
                pass
        self.proc.kill()


async def wait_idle(kernel: Kernel, queue: asyncio.Queue, timeout: float) -> bool:
    """Discard messages until the request's `status: idle`; False on timeout or death."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        left = deadline - loop.time()
        if left <= 0 or not kernel.proc.alive():
            return False
        try:
            msg = await asyncio.wait_for(queue.get(), min(left, 0.25))
        except asyncio.TimeoutError:
            continue
        if is_idle(msg):
            return True


def is_idle(msg: dict) -> bool:
    return msg.get("msg_type") == "status" and (msg.get("content") or {}).get(
        "execution_state"
    ) == "idle"


class Context:
    def __init__(self, server: "Server", language: str, cwd: str, proc: KernelProcess | None):
        self.server = server
        self.id = uuid.uuid4().hex
        self.language = language
        self.cwd = cwd
        self.lock = asyncio.Lock()
        self.kernel: Kernel | None = None
        self.removed = False
        self.start_kernel(proc)

    def start_kernel(self, proc: KernelProcess | None = None) -> None:
        if self.kernel is not None:
            self.kernel.shutdown()
        if proc is None:
            proc = KernelProcess(self.server.runtime_dir, self.cwd, dict(os.environ))
        self.kernel = Kernel(proc)

    async def ready_kernel(self) -> Kernel:
        """The kernel, started (again) if it died; raises KernelDied if it cannot start."""
        assert self.kernel is not None
        if self.kernel.ready.done() and (
            self.kernel.ready.exception() is not None or not self.kernel.proc.alive()
        ):
            log(f"context {self.id}: restarting a dead kernel")
            self.start_kernel()
        kernel = self.kernel
        await asyncio.shield(kernel.ready)
        return kernel

    def info(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def shutdown(self) -> None:
        self.removed = True
        if self.kernel is not None:
            self.kernel.shutdown()


class Server:
    def __init__(self, runtime_dir: str, default_cwd: str):
        self.runtime_dir = runtime_dir
        self.default_cwd = default_cwd
        self.contexts: dict[str, Context] = {}
        self.defaults: dict[str, str] = {}

    def create_context(
        self, language: str, cwd: str, proc: KernelProcess | None = None
    ) -> Context:
        if len(self.contexts) >= MAX_CONTEXTS:
            raise BadRequest(f"too many contexts (at most {MAX_CONTEXTS}); remove some first")
        if not os.path.isdir(cwd):
            try:
                os.makedirs(cwd, exist_ok=True)
            except OSError as e:
                raise BadRequest(f"cwd {cwd!r} does not exist and cannot be created: {e}")
        ctx = Context(self, language, cwd, proc)
        self.contexts[ctx.id] = ctx
        return ctx

    def default_context(self, language: str) -> Context:
        ctx_id = self.defaults.get(language)
        ctx = self.contexts.get(ctx_id) if ctx_id else None
        if ctx is None:
            ctx = self.create_context(language, self.default_cwd)
            self.defaults[language] = ctx.id
        return ctx

    def get(self, ctx_id: str) -> Context:
        ctx = self.contexts.get(ctx_id)
        if ctx is None:
            raise NotFound(f"Context {ctx_id} not found")
        return ctx

    def remove(self, ctx_id: str) -> None:
        ctx = self.get(ctx_id)
        del self.contexts[ctx_id]
        for lang, default_id in list(self.defaults.items()):
            if default_id == ctx_id:
                del self.defaults[lang]
        ctx.shutdown()

    def shutdown(self) -> None:
        for ctx in list(self.contexts.values()):
            ctx.shutdown()
        self.contexts.clear()


class ClientGone(Exception):
    """The HTTP client disconnected."""


class Stream:
    """Writes stream lines to one HTTP response; notices a client that went away."""

    def __init__(self, handler: tornado.web.RequestHandler):
        self.handler = handler
        self.gone = False

    async def send(self, event: dict) -> None:
        if self.gone or self.handler.closed:
            self.gone = True
            raise ClientGone()
        try:
            self.handler.write(json.dumps(event) + "\n")
            await self.handler.flush()
        except (tornado.iostream.StreamClosedError, RuntimeError):
            self.gone = True
            raise ClientGone() from None


async def run_execution(ctx: Context, req: dict, out: Stream) -> None:
    """Run one cell and stream its output; always ends with `end_of_execution` (if the client
    is still there)."""
    try:
        await _run_locked(ctx, req, out)
    except ClientGone:
        return
    try:
        await out.send({"type": "end_of_execution"})
    except ClientGone:
        pass


async def _run_locked(ctx: Context, req: dict, out: Stream) -> None:
    async with ctx.lock:
        if out.handler.closed:
            raise ClientGone()
        if ctx.removed:
            await out.send(error_event("ContextRemoved", "the context was removed"))
            return
        try:
            kernel = await ctx.ready_kernel()
        except KernelDied as e:
            await out.send(error_event("KernelStartError", str(e)))
            return
        env_vars = req["env_vars"]
        if env_vars:
            await kernel.run_silent(f"__import__('_cella').push_env({json.dumps(env_vars)!r})")
        try:
            await _stream_cell(ctx, kernel, req, out)
        finally:
            if env_vars and kernel.proc.alive() and ctx.kernel is kernel:
                await kernel.run_silent("__import__('_cella').pop_env()")


async def _stream_cell(ctx: Context, kernel: Kernel, req: dict, out: Stream) -> None:
    loop = asyncio.get_running_loop()
    msg_id, queue = kernel.execute(req["code"])
    deadline = loop.time() + req["timeout"] if req["timeout"] else None
    interrupted_at: float | None = None
    timed_out = False
    try:
        while True:
            wait = KEEPALIVE_SECONDS
            if deadline is not None and interrupted_at is None:
                wait = max(0.0, min(wait, deadline - loop.time()))
            try:
                msg = await asyncio.wait_for(queue.get(), wait)
            except asyncio.TimeoutError:
                msg = None
            if msg is not None:
                if is_idle(msg):
                    break
                event = message_event(msg)
                if event is not None and not out.gone:
                    try:
                        await out.send(event)
                    except ClientGone:
                        pass
            else:
                # No output for a while: is everyone still there?
                if not kernel.proc.alive():
                    await _report_death(ctx, kernel, out)
                    return
                if not out.gone:
                    try:
                        await out.send({"type": "keepalive"})
                    except ClientGone:
                        pass
            now = loop.time()
            expired = deadline is not None and now >= deadline
            if (out.gone or expired) and interrupted_at is None:
                timed_out = expired and not out.gone
                log(
                    f"context {ctx.id}: interrupting "
                    + ("(timeout)" if timed_out else "(client disconnected)")
                )
                kernel.proc.signal(signal.SIGINT)
                interrupted_at = now
            elif interrupted_at is not None and now - interrupted_at > INTERRUPT_GRACE_SECONDS:
                log(f"context {ctx.id}: kernel ignored the interrupt, restarting it")
                ctx.start_kernel()
                if not out.gone:
                    await out.send(
                        error_event(
                            "ExecutionAborted",
                            "the cell did not stop on interrupt; the context was restarted "
                            "and its variables are lost",
                        )
                    )
                return
    finally:
        kernel.done(msg_id)
    if timed_out and not out.gone:
        await out.send(
            error_event("TimeoutError", f"execution timed out after {req['timeout']:g} s")
        )
    if out.gone:
        raise ClientGone()


async def _report_death(ctx: Context, kernel: Kernel, out: Stream) -> None:
    how = kernel.proc.exit_description()
    log(f"context {ctx.id}: kernel {how}; restarting it")
    ctx.start_kernel()
    if not out.gone:
        await out.send(
            error_event(
                "KernelDied",
                f"the kernel {how}; it was restarted and the context's variables are lost",
            )
        )


# ---------------------------------------------------------------------------------------------
# HTTP.
# ---------------------------------------------------------------------------------------------


class Base(tornado.web.RequestHandler):
    server: Server

    def initialize(self, server: Server) -> None:
        self.server = server
        self.closed = False

    def prepare(self) -> None:
        # Stream lines are small writes; with Nagle on, each waits for the proxy's delayed ACK
        # (40 ms) of the previous one.
        stream = getattr(self.request.connection, "stream", None)
        if stream is not None:
            try:
                stream.set_nodelay(True)
            except Exception:
                pass

    def on_connection_close(self) -> None:
        self.closed = True

    def plain(self, status: int, text: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(text)

    def json_reply(self, value: object, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(value))

    def write_error(self, status_code: int, **kwargs) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(self._reason)

    async def guarded(self, fn) -> None:
        try:
            await fn()
        except BadRequest as e:
            self.plain(400, str(e))
        except NotFound as e:
            self.plain(404, str(e))


class Health(Base):
    def get(self) -> None:
        self.json_reply("OK")


class Contexts(Base):
    def get(self) -> None:
        self.json_reply([c.info() for c in self.server.contexts.values()])

    async def post(self) -> None:
        async def create() -> None:
            body = parse_json_object(self.request.body)
            language = normalize_language(body.get("language"))
            cwd = body.get("cwd") or self.server.default_cwd
            if not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd:
                raise BadRequest("cwd must be an absolute path")
            ctx = self.server.create_context(language, cwd)
            try:
                await ctx.ready_kernel()
            except KernelDied as e:
                self.server.remove(ctx.id)
                self.plain(500, str(e))
                return
            self.json_reply(ctx.info())

        await self.guarded(create)


class ContextRestart(Base):
    async def post(self, ctx_id: str) -> None:
        async def restart() -> None:
            ctx = self.server.get(ctx_id)
            ctx.start_kernel()
            try:
                await ctx.ready_kernel()
            except KernelDied as e:
                self.plain(500, str(e))
                return
            self.json_reply(None)

        await self.guarded(restart)


class ContextItem(Base):
    async def delete(self, ctx_id: str) -> None:
        async def remove() -> None:
            self.server.remove(ctx_id)
            self.set_status(204)
            self.finish()

        await self.guarded(remove)


class Execute(Base):
    async def post(self) -> None:
        async def execute() -> None:
            req = parse_execute_request(self.request.body)
            if req["context_id"] is not None:
                ctx = self.server.get(req["context_id"])
            else:
                ctx = self.server.default_context(req["language"])
            self.set_status(200)
            self.set_header("Content-Type", "application/x-ndjson")
            self.set_header("Cache-Control", "no-cache")
            self.set_header("X-Accel-Buffering", "no")
            await run_execution(ctx, req, Stream(self))
            if not self.closed:
                try:
                    self.finish()
                except tornado.iostream.StreamClosedError:
                    pass

        await self.guarded(execute)


def make_app(server: Server) -> tornado.web.Application:
    args = {"server": server}
    return tornado.web.Application(
        [
            (r"/health", Health, args),
            (r"/contexts", Contexts, args),
            (r"/contexts/([^/]+)/restart", ContextRestart, args),
            (r"/contexts/([^/]+)", ContextItem, args),
            (r"/execute", Execute, args),
        ],
        compress_response=False,
    )


async def serve(args, runtime_dir: str, cwd: str, first: KernelProcess | None) -> None:
    server = Server(runtime_dir, cwd)
    if first is not None:
        ctx = server.create_context("python", cwd, first)
        server.defaults["python"] = ctx.id
    http = tornado.httpserver.HTTPServer(
        make_app(server),
        max_body_size=MAX_BODY_BYTES,
        idle_connection_timeout=640,
        xheaders=False,
    )
    sockets = tornado.netutil.bind_sockets(args.port, address=args.host)
    for sock in sockets:
        # Accepted connections inherit this on Linux: set before the first byte is written.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    http.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    log(f"listening on {args.host}:{port}")
    print(f"listening on {port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        http.stop()
        server.shutdown()
