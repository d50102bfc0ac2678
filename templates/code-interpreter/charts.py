"""Chart data from matplotlib figures, in the shape the e2b-code-interpreter SDK parses.

A figure shown in a cell comes back as a PNG; agents that want the numbers behind it (to
re-plot, check or describe them) get `Result.chart` as well. This reads what matplotlib
already holds, never re-computes anything, and only for the common kinds whose data is
unambiguous: line, scatter, bar and pie axes. Anything else has no chart (the PNG is still
there), and a figure with several such axes becomes a `superchart`.

Sizes are bounded (points per series, series per chart, axes per figure) because a figure
can hold millions of points and the result travels as one JSON line.
"""

from __future__ import annotations

import math

MAX_POINTS = 10_000
MAX_ELEMENTS = 100
MAX_AXES = 16


def _num(value):
    """A JSON-safe number (NaN/inf become None); strings pass through."""
    if isinstance(value, str):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(f):
        return None
    if f.is_integer() and abs(f) < 2**53:
        return int(f)
    return f


def _scale(axis) -> str:
    try:
        converter = axis.get_converter() if hasattr(axis, "get_converter") else axis.converter
    except Exception:
        converter = None
    if converter is not None and "date" in type(converter).__name__.lower():
        return "datetime"
    if converter is not None and "categor" in type(converter).__name__.lower():
        return "categorical"
    try:
        return str(axis.get_scale())
    except Exception:
        return "unknown"


def _convert(values, scale: str):
    if scale == "datetime":
        from matplotlib.dates import num2date

        out = []
        for v in values:
            try:
                out.append(num2date(float(v)).isoformat())
            except Exception:
                out.append(_num(v))
        return out
    return [_num(v) for v in values]


def _ticks(axis, scale):
    try:
        locs = list(axis.get_ticklocs())
        labels = [t.get_text() for t in axis.get_ticklabels()]
    except Exception:
        return [], []
    return _convert(locs, scale), labels


def _is_grid_line(line) -> bool:
    try:
        xs, ys = line.get_xdata(), line.get_ydata()
        return len(xs) == 2 and (xs[0] == xs[1] or ys[0] == ys[1]) and not line.get_label()
    except Exception:
        return False


def _label(artist, default: str) -> str:
    label = artist.get_label() if hasattr(artist, "get_label") else ""
    if not label or str(label).startswith("_"):
        return default
    return str(label)


def _base(ax, kind: str) -> dict:
    return {
        "type": kind,
        "title": ax.get_title() or None,
        "x_label": ax.get_xlabel() or None,
        "y_label": ax.get_ylabel() or None,
        "x_unit": None,
        "y_unit": None,
    }


def _point_chart(ax, kind: str, series) -> dict:
    x_scale, y_scale = _scale(ax.xaxis), _scale(ax.yaxis)
    chart = _base(ax, kind)
    x_ticks, x_tick_labels = _ticks(ax.xaxis, x_scale)
    y_ticks, y_tick_labels = _ticks(ax.yaxis, y_scale)
    chart.update(
        x_scale=x_scale,
        y_scale=y_scale,
        x_ticks=x_ticks,
        x_tick_labels=x_tick_labels,
        y_ticks=y_ticks,
        y_tick_labels=y_tick_labels,
    )
    elements = []
    for label, xs, ys in series[:MAX_ELEMENTS]:
        xs = _convert(list(xs)[:MAX_POINTS], x_scale)
        ys = _convert(list(ys)[:MAX_POINTS], y_scale)
        elements.append({"label": label, "points": [[x, y] for x, y in zip(xs, ys)]})
    chart["elements"] = elements
    return chart


def _bar_chart(ax) -> dict | None:
    from matplotlib.container import BarContainer

    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    if not containers:
        return None
    horizontal = any(getattr(c, "orientation", None) == "horizontal" for c in containers)
    axis = ax.yaxis if horizontal else ax.xaxis
    positions = {}
    try:
        for loc, tick in zip(axis.get_ticklocs(), axis.get_ticklabels()):
            positions[round(float(loc), 6)] = tick.get_text()
    except Exception:
        pass
    elements = []
    for i, container in enumerate(containers):
        group = _label(container, str(i))
        for rect in list(container.patches)[:MAX_POINTS]:
            if horizontal:
                center = rect.get_y() + rect.get_height() / 2
                value = rect.get_width()
            else:
                center = rect.get_x() + rect.get_width() / 2
                value = rect.get_height()
            label = positions.get(round(float(center), 6)) or str(_num(center))
            elements.append({"label": label, "group": group, "value": _num(value)})
            if len(elements) >= MAX_POINTS:
                break
    chart = _base(ax, "bar")
    if horizontal:
        chart["x_label"], chart["y_label"] = chart["y_label"], chart["x_label"]
    chart["elements"] = elements
    return chart


def _pie_chart(ax) -> dict | None:
    from matplotlib.patches import Wedge

    wedges = [p for p in ax.patches if isinstance(p, Wedge)]
    if not wedges:
        return None
    chart = {"type": "pie", "title": ax.get_title() or None}
    chart["elements"] = [
        {
            "label": _label(w, str(i)),
            "angle": _num(abs(w.theta2 - w.theta1)),
            "radius": _num(w.r),
        }
        for i, w in enumerate(wedges[:MAX_ELEMENTS])
    ]
    return chart


def axes_chart(ax) -> dict | None:
    """The chart of one Axes, or None when its kind is not recognised."""
    pie = _pie_chart(ax)
    if pie is not None:
        return pie
    bar = _bar_chart(ax)
    if bar is not None:
        return bar
    from matplotlib.collections import PathCollection

    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    lines = [ln for ln in ax.get_lines() if not _is_grid_line(ln)]
    if scatters and not lines:
        series = []
        for i, c in enumerate(scatters):
            offsets = c.get_offsets()
            series.append(
                (_label(c, str(i)), [p[0] for p in offsets], [p[1] for p in offsets])
            )
        return _point_chart(ax, "scatter", series)
    if lines and not scatters:
        series = [
            (_label(ln, str(i)), ln.get_xdata(), ln.get_ydata()) for i, ln in enumerate(lines)
        ]
        return _point_chart(ax, "line", series)
    return None


def figure_chart(fig) -> dict | None:
    """The chart of a figure: one chart, a `superchart` of several, or None."""
    axes = [ax for ax in fig.get_axes() if ax.get_visible()][:MAX_AXES]
    charts = [c for c in (axes_chart(ax) for ax in axes) if c is not None]
    if not charts:
        return None
    if len(axes) == 1:
        return charts[0]
    title = None
    if getattr(fig, "_suptitle", None) is not None:
        title = fig._suptitle.get_text() or None
    return {"type": "superchart", "title": title, "elements": charts}
