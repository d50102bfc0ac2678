"""Chart extraction from real matplotlib figures (Agg backend, no kernel)."""

import math

import pytest

mpl = pytest.importorskip("matplotlib")
mpl.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from charts import MAX_POINTS, figure_chart  # noqa: E402


def teardown_function():
    plt.close("all")


def test_line_chart():
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [0, 1, 4], label="sq")
    ax.set_title("t")
    ax.set_xlabel("x")
    chart = figure_chart(fig)
    assert chart["type"] == "line" and chart["title"] == "t" and chart["x_label"] == "x"
    assert chart["elements"] == [{"label": "sq", "points": [[0, 0], [1, 1], [2, 4]]}]
    assert chart["x_scale"] == "linear" and chart["x_ticks"]


def test_scatter_bar_pie_and_superchart():
    fig, ax = plt.subplots()
    ax.scatter([1, 2], [3, 4])
    assert figure_chart(fig)["elements"][0]["points"] == [[1, 3], [2, 4]]

    fig, ax = plt.subplots()
    ax.bar(["a", "b"], [1.5, 2], label="g")
    chart = figure_chart(fig)
    assert chart["type"] == "bar"
    assert chart["elements"] == [
        {"label": "a", "group": "g", "value": 1.5},
        {"label": "b", "group": "g", "value": 2},
    ]

    fig, ax = plt.subplots()
    ax.pie([1, 3], labels=["x", "y"])
    chart = figure_chart(fig)
    assert chart["type"] == "pie"
    assert [e["label"] for e in chart["elements"]] == ["x", "y"]
    assert math.isclose(chart["elements"][1]["angle"], 270, rel_tol=1e-6)

    fig, (a1, a2) = plt.subplots(1, 2)
    a1.plot([1, 2], [1, 2])
    a2.bar(["q"], [1])
    fig.suptitle("both")
    chart = figure_chart(fig)
    assert chart["type"] == "superchart" and chart["title"] == "both"
    assert [c["type"] for c in chart["elements"]] == ["line", "bar"]


def test_unknown_empty_nan_and_huge():
    fig, ax = plt.subplots()
    ax.imshow([[1, 2], [3, 4]])
    assert figure_chart(fig) is None
    assert figure_chart(plt.figure()) is None

    fig, ax = plt.subplots()
    ax.plot([0, 1], [float("nan"), 1])
    assert figure_chart(fig)["elements"][0]["points"] == [[0, None], [1, 1]]

    fig, ax = plt.subplots()
    ax.plot(range(MAX_POINTS * 2), range(MAX_POINTS * 2))
    assert len(figure_chart(fig)["elements"][0]["points"]) == MAX_POINTS
