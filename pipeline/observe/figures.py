"""The report's figures of the run's progress and of where its time went, each drawn
from a :class:`~palflow.pipeline.observe.run_data.RunData`, and the helpers that every
figure of the report is drawn with (:func:`new_figure`, :func:`empty_panel`,
:func:`y_scale`).

============================  ===========================================================
``learning_curve.png``        test and validation force and energy MAE, against labels
                              and wall time; versions where the gate held members back
``timeline.png``              one Gantt lane per task slot, per module: the overlap
``busy.png``                  busy fraction per module, and its longest idle gap
============================  ===========================================================

The figures of the ensemble's uncertainty, the oracle and convergence are in
:mod:`palflow.pipeline.observe.quality_figures`. A figure is a function of the run's
data alone; :func:`palflow.pipeline.observe.report.draw` draws each figure of the
report's :data:`~palflow.pipeline.observe.report.FIGURES` and turns one that fails into
a figure that says so, so that one broken figure never costs the report. Every figure
has constrained layout (:func:`new_figure`): no text of one panel runs into another
panel's (tests/test_report.py measures it).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from palflow.apps.contracts import MODULES
from palflow.pipeline.observe.run_data import RunData
from palflow.pipeline.state.metrics import busy_fractions, module_intervals

MODULE_COLOURS = {
    "oracle": "tab:red",
    "generator": "tab:green",
    "train": "tab:blue",
    "infer": "tab:purple",
}
"""Each module's colour, the same in every figure."""


def new_figure(width: float = 10, height: float = 4, columns: int = 1, rows: int = 1):
    """A Matplotlib figure of ``rows`` by ``columns`` panels, ``width`` by ``height``
    inches, and its axes as a 2-D array (``axes[row][column]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Constrained layout sizes the gaps between panels to their labels, tick labels,
    # titles and legends, so that no text of one panel runs into its neighbour's.
    return plt.subplots(rows, columns, figsize=(width, height), squeeze=False, layout="constrained")


def empty_panel(axis, message: str) -> None:
    """Write ``message`` in the middle of ``axis``, without ticks: a panel with
    nothing to draw."""
    axis.text(0.5, 0.5, message, ha="center", va="center", transform=axis.transAxes)
    axis.set_xticks([])
    axis.set_yticks([])


def y_scale(axis, values: list[float]) -> None:
    """Log scale when the positive ``values`` span more than a decade."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) > 10 * min(positive):
        axis.set_yscale("log")


HELD_BACK_LABEL = "gate held members back (count beside)"
"""Legend entry of the marks on versions where the validation gate held members back."""

ERROR_PANELS = (
    ("force", "force_mae", "eV/Å", "tab:blue"),
    ("energy", "energy_mae", "meV/atom", "tab:orange"),
)
"""The learning curve's panels, left to right: quantity, key in
:meth:`RunData.learning_curve`, unit, colour."""


def _series(points: list[dict], x_key: str, y_key: str) -> tuple[list, list]:
    """The points that have both ``x_key`` (finite) and ``y_key`` (not None)."""
    pairs = [
        (p[x_key], p[y_key])
        for p in points
        if p[y_key] is not None and np.isfinite(p[x_key]) and np.isfinite(p[y_key])
    ]
    return [x for x, _ in pairs], [y for _, y in pairs]


def plot_learning_curve(data: RunData):
    """Force (left) and energy (right) MAE per ensemble version, against active
    labels (top) and wall time (bottom): test errors solid, validation errors dashed,
    each quantity on its own axis and scale; versions where the gate held members
    back are marked."""
    figure, axes = new_figure(width=11, height=7.5, rows=2, columns=2)
    points = data.learning_curve()
    if not points:
        for axis in axes.flat:
            empty_panel(axis, "no ensemble evaluated yet")
        return figure
    held = [p for p in points if (p["held_back"] or 0) > 0]
    rows = (("labels", "active labels"), ("wall_s", "wall time, s"))
    for row, (x_key, xlabel) in zip(axes, rows, strict=True):
        for axis, (quantity, key, unit, colour) in zip(row, ERROR_PANELS, strict=True):
            test = _series(points, x_key, key)
            validation = _series(points, x_key, f"val_{key}")
            if not test[1] and not validation[1]:
                empty_panel(axis, f"no {quantity} errors against {xlabel} recorded")
                continue
            if test[1]:
                axis.plot(*test, "o-", color=colour, label=f"test {quantity} MAE")
            if validation[1]:
                label = f"validation {quantity} MAE"
                axis.plot(*validation, "s--", color=colour, mfc="none", label=label)
            on = key if test[1] else f"val_{key}"  # mark the curve that is drawn
            marks = [p for p in held if p[on] is not None and np.isfinite(p[x_key])]
            if marks:
                xs, ys = [p[x_key] for p in marks], [p[on] for p in marks]
                axis.plot(xs, ys, "v", color="tab:red", ms=9, ls="none", label=HELD_BACK_LABEL)
                for x, y, point in zip(xs, ys, marks, strict=True):
                    axis.annotate(
                        str(point["held_back"]), (x, y), xytext=(5, -12),
                        textcoords="offset points", color="tab:red", fontsize=8,
                    )  # fmt: skip
            y_scale(axis, test[1] + validation[1])
            axis.set_xlabel(xlabel)
            axis.set_ylabel(f"{quantity} MAE, {unit}", color=colour)
            axis.grid(alpha=0.3, which="both")
            axis.legend(fontsize=8)
    frames = [p["n_validation"] for p in points if p["n_validation"]]
    note = f"; validation: members' mean, each on its own frames, ≥ {min(frames)}" if frames else ""
    figure.suptitle(f"{data.name}: error per ensemble version (test: held-out set{note})")
    return figure


def plot_timeline(data: RunData):
    figure, axes = new_figure(height=4.5)
    axis = axes[0][0]
    lanes_used = 0
    ticks, tick_labels = [], []
    for module in MODULES:
        tasks = sorted(
            (e["started"] - data.t0, e["ended"] - data.t0, e.get("ok", True))
            for e in data.events
            if e["module"] == module and e.get("started") and e.get("ended")
        )
        lane_free: list[float] = []
        bars: dict[int, list] = defaultdict(list)
        for start, end, ok in tasks:
            lane = next((i for i, free in enumerate(lane_free) if free <= start), None)
            if lane is None:
                lane_free.append(end)
                lane = len(lane_free) - 1
            lane_free[lane] = end
            bars[lane].append((start, end - start, ok))
        for lane, spans in bars.items():
            y = lanes_used + lane
            axis.broken_barh(
                [(s, d) for s, d, _ in spans],
                (y + 0.1, 0.8),
                facecolors=[MODULE_COLOURS[module] if ok else "black" for _, _, ok in spans],
            )
        if lane_free:
            ticks.append(lanes_used + len(lane_free) / 2)
            tick_labels.append(f"{module} ({len(tasks)})")
            lanes_used += len(lane_free) + 1
    if not ticks:
        empty_panel(axis, "no task has finished yet")
        return figure
    axis.set_yticks(ticks, tick_labels)
    axis.set_xlabel("wall time, s (black: failed task)")
    axis.set_title("every task, one lane per concurrent task")
    return figure


def idle_gaps(data: RunData, module: str) -> tuple[float, float]:
    """Longest and total time (s) with no task of ``module`` running, between its
    first start and the end of the run."""
    intervals = module_intervals(data.events, module)
    if not intervals:
        return 0.0, 0.0
    gaps = [b[0] - a[1] for a, b in zip(intervals, intervals[1:], strict=False)]
    gaps.append(max(0.0, data.t1 - intervals[-1][1]))
    return max(gaps), sum(gaps)


def plot_busy(data: RunData):
    figure, axes = new_figure(columns=2)
    busy_axis, gap_axis = axes[0]
    fractions = busy_fractions(data.events, data.t0, data.t1) if data.events else {}
    if not fractions:
        empty_panel(busy_axis, "no task has finished yet")
        empty_panel(gap_axis, "")
        return figure
    modules = list(fractions)
    colours = [MODULE_COLOURS.get(m, "grey") for m in modules]
    busy_axis.bar(modules, [100 * fractions[m] for m in modules], color=colours)
    busy_axis.set_ylabel("busy, % of the run")
    busy_axis.set_ylim(0, 100)
    gaps = {m: idle_gaps(data, m) for m in modules}
    bars = gap_axis.bar(modules, [gaps[m][0] for m in modules], color=colours)
    gap_axis.set_ylabel("longest idle gap, s")
    # Above each bar, clear of it and of the frame: the module's idle time in all.
    gap_axis.bar_label(bars, [f"idle {gaps[m][1]:.0f} s in all" for m in modules], padding=3)
    gap_axis.set_ylim(0, 1.15 * max(max(g[0] for g in gaps.values()), 1e-9))
    return figure
