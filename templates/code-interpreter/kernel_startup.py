"""Runs inside every code interpreter kernel at start (IPKernelApp.exec_files).

It runs in the user's namespace, so it defines one function, calls it and deletes it: the
user sees no extra names. What it sets up:

* a hidden `_cella` module (in `sys.modules` only) with `push_env`/`pop_env`, which the server
  calls around a cell to apply per-request environment variables and restore them after;
* an `e2b/chart` display format for matplotlib figures, filled by `charts.py` (loaded lazily,
  registered only once the user imported matplotlib, which stays lazy), which the SDK turns
  into `Result.chart`.

Nothing here may raise into the user's session: failures are printed to the kernel's log.
"""


def __cella_setup():
    import importlib.util
    import json
    import os
    import sys
    import types

    here = "/opt/cella/code-interpreter"
    candidates = [os.environ.get("CELLA_CI_DIR", ""), here]
    try:
        candidates.insert(0, os.path.dirname(os.path.abspath(__file__)))
    except NameError:
        pass

    helper = types.ModuleType("_cella")
    saved_stack = []

    def push_env(encoded):
        values = json.loads(encoded)
        saved = {k: os.environ.get(k) for k in values}
        saved_stack.append(saved)
        os.environ.update({str(k): str(v) for k, v in values.items()})

    def pop_env():
        if not saved_stack:
            return
        for k, v in saved_stack.pop().items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    helper.push_env = push_env
    helper.pop_env = pop_env
    sys.modules["_cella"] = helper

    def load_charts():
        for d in candidates:
            path = os.path.join(d, "charts.py") if d else ""
            if path and os.path.exists(path):
                spec = importlib.util.spec_from_file_location("_cella_charts", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                return module
        return None

    charts = []

    def figure_chart(fig):
        try:
            if not charts:
                charts.append(load_charts())
            module = charts[0]
            return module.figure_chart(fig) if module is not None else None
        except Exception as e:  # a chart we cannot read is simply not offered
            print(f"cella: chart extraction failed: {e!r}", file=sys.__stderr__)
            return None

    try:
        from IPython import get_ipython
        from IPython.core.formatters import BaseFormatter
        from traitlets import ObjectName, Unicode

        class ChartFormatter(BaseFormatter):
            format_type = Unicode("e2b/chart")
            _return_type = dict
            print_method = ObjectName("_repr_e2b_chart_")

        ip = get_ipython()
        if ip is not None:
            display = ip.display_formatter
            formatter = ChartFormatter(parent=display)
            display.formatters["e2b/chart"] = formatter
            if "e2b/chart" not in display.active_types:
                display.active_types = list(display.active_types) + ["e2b/chart"]

            # IPython drops every formatter's Figure entry whenever a matplotlib backend is
            # activated (select_figure_formats), which happens inside the cell that imports
            # pyplot. So (re-)register after each cell, before the inline backend's own
            # post_execute hook (registered later, so it runs later) flushes the figures.
            def register_figure():
                module = sys.modules.get("matplotlib.figure")
                figure = getattr(module, "Figure", None) if module is not None else None
                if figure is not None and figure not in formatter.type_printers:
                    formatter.for_type(figure, figure_chart)

            ip.events.register("post_execute", register_figure)

            # ... and right after IPython dropped it, so figures shown inside the very cell
            # that imported pyplot (plt.show()) carry a chart too. The inline backend imports
            # this function when it is first loaded, which is after this runs.
            import IPython.core.pylabtools as pylabtools

            original = pylabtools.select_figure_formats

            def select_figure_formats(*args, **kwargs):
                result = original(*args, **kwargs)
                register_figure()
                return result

            pylabtools.select_figure_formats = select_figure_formats
    except Exception as e:
        print(f"cella: chart format not available: {e!r}", file=sys.__stderr__)


__cella_setup()
del __cella_setup
