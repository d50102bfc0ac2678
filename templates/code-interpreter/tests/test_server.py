"""The server end to end on the host: real ipykernel processes, real HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

from conftest import of_type, wait_until


def test_health_and_default_context(server, tmp_path):
    assert server.request("GET", "/health") == (200, '"OK"')
    status, body = server.request("GET", "/contexts")
    contexts = json.loads(body)
    assert status == 200 and len(contexts) == 1
    assert contexts[0]["language"] == "python"


def test_state_results_and_stdout(server):
    events = server.execute("x = 40\nprint('hello')\nx + 2")
    assert of_type(events, "stdout")[0]["text"] == "hello\n"
    assert of_type(events, "stdout")[0]["timestamp"]
    results = of_type(events, "result")
    assert results == [{"type": "result", "text": "42", "is_main_result": True}]
    assert of_type(events, "number_of_executions")[0]["execution_count"] >= 1
    # Variables persist within the context.
    assert of_type(server.execute("x * 2"), "result")[0]["text"] == "80"


def test_errors_are_events_and_the_stream_ends(server):
    events = server.execute("def f(:\n  pass")
    (err,) = of_type(events, "error")
    assert err["name"] == "SyntaxError"
    events = server.execute("raise ValueError('bad')")
    (err,) = of_type(events, "error")
    assert (err["name"], err["value"]) == ("ValueError", "bad")
    assert "ValueError" in err["traceback"]
    # The context still works after errors.
    assert of_type(server.execute("1 + 1"), "result")[0]["text"] == "2"


def test_stderr_and_rich_display(server):
    events = server.execute(
        "import sys\nfrom IPython.display import display, HTML, Markdown\n"
        "print('oops', file=sys.stderr)\ndisplay(HTML('<b>x</b>'))\ndisplay(Markdown('# t'))"
    )
    assert "oops" in "".join(e["text"] for e in of_type(events, "stderr"))
    results = of_type(events, "result")
    assert [r.get("html") for r in results] == ["<b>x</b>", None]
    assert results[1]["markdown"] == "# t"
    assert all(r["is_main_result"] is False for r in results)


def test_env_vars_apply_to_one_execution(server):
    os_code = "import os\nos.environ.get('CELLA_TEST_VAR', 'unset')"
    events = server.execute(os_code, env_vars={"CELLA_TEST_VAR": "set"})
    assert of_type(events, "result")[0]["text"] == "set"
    assert of_type(server.execute(os_code), "result")[0]["text"] == "unset"


def test_contexts_are_independent(server, tmp_path):
    status, body = server.request("POST", "/contexts", {"cwd": str(tmp_path)})
    assert status == 200, body
    ctx = json.loads(body)
    assert ctx["cwd"] == str(tmp_path) and ctx["language"] == "python"
    server.execute("shared = 'default'")
    events = server.execute("import os\nos.getcwd()", context_id=ctx["id"])
    assert of_type(events, "result")[0]["text"] == str(tmp_path)
    events = server.execute("shared", context_id=ctx["id"])
    assert of_type(events, "error")[0]["name"] == "NameError"
    ids = [c["id"] for c in json.loads(server.request("GET", "/contexts")[1])]
    assert ctx["id"] in ids

    server.execute("kept = 1", context_id=ctx["id"])
    assert server.request("POST", f"/contexts/{ctx['id']}/restart")[0] == 200
    events = server.execute("kept", context_id=ctx["id"])
    assert of_type(events, "error")[0]["name"] == "NameError"

    assert server.request("DELETE", f"/contexts/{ctx['id']}")[0] == 204
    assert server.request("DELETE", f"/contexts/{ctx['id']}")[0] == 404
    assert server.request("POST", "/execute", {"code": "1", "context_id": ctx["id"]})[0] == 404
    assert server.request("POST", "/contexts/nope/restart")[0] == 404


def test_bad_requests(server):
    assert server.request("POST", "/execute", {"code": 1})[0] == 400
    status, text = server.request("POST", "/execute", {"code": "1", "language": "java"})
    assert status == 400 and "not supported" in text
    assert server.request("POST", "/contexts", {"cwd": "relative"})[0] == 400


def test_timeout_interrupts_and_the_context_survives(server):
    server.execute("counter = 0")
    start = time.monotonic()
    events = server.execute(
        "import time\nwhile True:\n    counter += 1\n    time.sleep(0.01)",
        timeout=1,
    )
    assert time.monotonic() - start < 10
    names = [e["name"] for e in of_type(events, "error")]
    assert "KeyboardInterrupt" in names and "TimeoutError" in names
    events = server.execute("counter > 0")
    assert of_type(events, "result")[0]["text"] == "True"


def test_disconnect_interrupts_the_cell(server):
    server.execute("progress = 0")
    host, port = server.url.rsplit(":", 1)
    body = json.dumps(
        {"code": "import time\nfor progress in range(1000):\n    time.sleep(0.05)"}
    ).encode()
    sock = socket.create_connection(("127.0.0.1", int(port)))
    sock.sendall(
        b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    sock.recv(1024)  # headers and the first line: the cell is running
    time.sleep(0.3)
    sock.close()
    # The next cell runs once the interrupted one stopped, long before the loop's 50 s.
    start = time.monotonic()
    events = server.execute("progress")
    assert time.monotonic() - start < 8
    assert int(of_type(events, "result")[0]["text"]) < 200


def test_kernel_death_is_an_error_and_the_context_restarts(server):
    server.execute("doomed = 1")
    events = server.execute("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    (err,) = of_type(events, "error")
    assert err["name"] == "KernelDied" and "SIGKILL" in err["value"]
    events = server.execute("doomed")
    assert of_type(events, "error")[0]["name"] == "NameError"
    assert of_type(server.execute("2 + 3"), "result")[0]["text"] == "5"


def test_matplotlib_figures_are_png_results_with_chart_data(server):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        import pytest

        pytest.skip("matplotlib is not installed")
    events = server.execute(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9], label='squares')\n"
        "plt.title('Squares')\n"
        "None"
    )
    (figure,) = [r for r in of_type(events, "result") if "png" in r]
    assert figure["is_main_result"] is False
    import base64

    assert base64.b64decode(figure["png"]).startswith(b"\x89PNG")
    chart = figure["chart"]
    assert chart["type"] == "line" and chart["title"] == "Squares"
    assert chart["elements"] == [{"label": "squares", "points": [[1, 1], [2, 4], [3, 9]]}]


def test_server_stops_its_kernels_on_sigterm(tmp_path):
    from conftest import Server, kernel_available

    if not kernel_available():
        import pytest

        pytest.skip("ipykernel is not installed")
    srv = Server(tmp_path)
    srv.execute("1")
    pids = [int(p) for p in os.popen(f"pgrep -P {srv.proc.pid}").read().split()]
    assert pids, "the kernel is a child of the server"
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=10) == 0

    def gone():
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            # A zombie waiting for its reaper counts as gone.
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] != "Z":
                    return False
        return True

    assert wait_until(gone), "kernels outlive the server"


def test_figure_shown_in_the_cell_that_imports_pyplot_has_a_chart(tmp_path):
    from conftest import Server, kernel_available

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        matplotlib = None
    if not kernel_available() or matplotlib is None:
        import pytest

        pytest.skip("ipykernel or matplotlib is not installed")
    srv = Server(tmp_path)
    try:
        events = srv.execute(
            "import matplotlib.pyplot as plt\n"
            "plt.bar(['a', 'b'], [1, 2])\n"
            "plt.title('first')\n"
            "plt.show()"
        )
        (figure,) = [r for r in of_type(events, "result") if "png" in r]
        assert figure["chart"]["type"] == "bar" and figure["chart"]["title"] == "first"
    finally:
        srv.stop()
