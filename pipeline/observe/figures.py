"""The figures of the run report, each drawn from a
:class:`~palflow.pipeline.observe.run_data.RunData`.

============================  ===========================================================
``learning_curve.png``        test and validation force and energy MAE, against labels
                              and wall time; versions where the gate held members back
``timeline.png``              one Gantt lane per task slot, per module: the overlap
``busy.png``                  busy fraction per module, and its longest idle gap
``uncertainty.png``           the MD frames' force spread under every ensemble version
                              (versions that ran no MD shaded), and histograms of an
                              even sample of the versions, the last included; threshold
``uncertainty_vs_error.png``  predicted force spread against true force error, labels
``oracle.png``                durations of every oracle task (``palflow status``'s
                              count), and failures by kind when there are any
``convergence.png``           accurate, candidate and failed shares of the explored
                              frames per version; error against spread (reliability)
                              on the validation labels and on the held-out set
============================  ===========================================================

A figure is a function of the run's data alone; :func:`draw` turns one that fails
into a figure that says so, so that one broken figure never costs the report. Every
figure has constrained layout: no text of one panel runs into another panel's
(tests/test_report.py measures it).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from palflow.apps.contracts import MODULES
from palflow.pipeline.observe.run_data import RunData
from palflow.pipeline.state.metrics import busy_fractions, module_intervals
from palflow.pipeline.state.run_files import one_per_task

logger = logging.getLogger(__name__)

FIGURES = {
    "learning_curve": "Learning curve",
    "timeline": "Task timeline",
    "busy": "Busy fraction and idle gaps",
    "uncertainty": "Uncertainty per ensemble version",
    "uncertainty_vs_error": "Predicted uncertainty against true error",
    "oracle": "Oracle time and failures",
    "convergence": "Convergence: exploration ratios and calibration",
}
"""Every figure of the report, by file stem, with its heading."""

MODULE_COLOURS = {
    "oracle": "tab:red",
    "generator": "tab:green",
    "train": "tab:blue",
    "infer": "tab:purple",
}


def _figure(width: float = 10, height: float = 4, columns: int = 1, rows: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Constrained layout sizes the gaps between panels to their labels, tick labels,
    # titles and legends, so that no text of one panel runs into its neighbour's.
    return plt.subplots(rows, columns, figsize=(width, height), squeeze=False, layout="constrained")


def _empty(axis, message: str) -> None:
    axis.text(0.5, 0.5, message, ha="center", va="center", transform=axis.transAxes)
    axis.set_xticks([])
    axis.set_yticks([])


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


def _y_scale(axis, values: list[float]) -> None:
    """Log scale when the positive ``values`` span more than a decade."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) > 10 * min(positive):
        axis.set_yscale("log")


def plot_learning_curve(data: RunData):
    """Force (left) and energy (right) MAE per ensemble version, against active
    labels (top) and wall time (bottom): test errors solid, validation errors dashed,
    each quantity on its own axis and scale; versions where the gate held members
    back are marked."""
    figure, axes = _figure(width=11, height=7.5, rows=2, columns=2)
    points = data.learning_curve()
    if not points:
        for axis in axes.flat:
            _empty(axis, "no ensemble evaluated yet")
        return figure
    held = [p for p in points if (p["held_back"] or 0) > 0]
    rows = (("labels", "active labels"), ("wall_s", "wall time, s"))
    for row, (x_key, xlabel) in zip(axes, rows, strict=True):
        for axis, (quantity, key, unit, colour) in zip(row, ERROR_PANELS, strict=True):
            test = _series(points, x_key, key)
            validation = _series(points, x_key, f"val_{key}")
            if not test[1] and not validation[1]:
                _empty(axis, f"no {quantity} errors against {xlabel} recorded")
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
            _y_scale(axis, test[1] + validation[1])
            axis.set_xlabel(xlabel)
            axis.set_ylabel(f"{quantity} MAE, {unit}", color=colour)
            axis.grid(alpha=0.3, which="both")
            axis.legend(fontsize=8)
    frames = [p["n_validation"] for p in points if p["n_validation"]]
    note = f"; validation: members' mean, each on its own frames, ≥ {min(frames)}" if frames else ""
    figure.suptitle(f"{data.name}: error per ensemble version (test: held-out set{note})")
    return figure


def plot_timeline(data: RunData):
    figure, axes = _figure(height=4.5)
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
        _empty(axis, "no task has finished yet")
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
    figure, axes = _figure(columns=2)
    busy_axis, gap_axis = axes[0]
    fractions = busy_fractions(data.events, data.t0, data.t1) if data.events else {}
    if not fractions:
        _empty(busy_axis, "no task has finished yet")
        _empty(gap_axis, "")
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


def _spans(numbers: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive integers in the sorted ``numbers``, as (first, last)."""
    spans: list[tuple[int, int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], n)
        else:
            spans.append((n, n))
    return spans


def _versions_text(spans: list[tuple[int, int]]) -> str:
    return ", ".join(f"v{a}" if a == b else f"v{a}-v{b}" for a, b in spans)


def even_sample(items: list, most: int) -> list:
    """At most ``most`` of ``items``, evenly spaced, the first and the last included."""
    if len(items) <= most:
        return list(items)
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, most).round().astype(int)))]


def last_version(data: RunData) -> int:
    """The newest ensemble version the run recorded (0 before the first)."""
    numbers = [v.get("number", i + 1) for i, v in enumerate(data.state.get("versions", []))]
    numbers += [row.get("version", 0) for row in data.metrics]
    return max(numbers, default=0)


HISTOGRAMS_AT_MOST = 8
"""Versions whose frames the uncertainty figure draws as histograms (an even sample)."""


def plot_uncertainty(data: RunData):
    """Left: every ensemble version of the run, the spread of the MD frames it ran
    (median, and 10 to 90 % of the frames), versions that ran no MD shaded. Right:
    histograms of an even sample of the versions with frames, first and last
    included."""
    import matplotlib

    figure, axes = _figure(width=11, height=4.5, columns=2)
    every_axis, histogram_axis = axes[0]
    frames = data.generator_frames()
    if not frames:
        _empty(every_axis, "no MD frames recorded yet")
        figure.delaxes(histogram_axis)
        return figure
    versions = sorted(frames)
    newest = max(last_version(data), versions[-1])
    without = _spans([v for v in range(1, newest + 1) if v not in frames])
    low, median, high = (
        np.array([np.percentile(frames[v], q) for v in versions]) for q in (10, 50, 90)
    )
    every_axis.errorbar(
        versions, median, yerr=[median - low, high - median], fmt="o", ms=4, capsize=2,
        color="tab:purple", label="median frame, bar: 10-90 % of frames",
    )  # fmt: skip
    for index, (first, last) in enumerate(without):
        every_axis.axvspan(
            first - 0.5, last + 0.5, color="0.85", zorder=0,
            label=f"no MD under {_versions_text(without)}" if index == 0 else None,
        )  # fmt: skip
    every_axis.set_xlim(0.5, newest + 0.5)
    every_axis.set_xlabel(f"ensemble version (all {newest} of the run)")
    every_axis.set_ylabel("largest atomic force spread\nof an MD frame, eV/Å")
    every_axis.set_title(f"MD frames under {len(versions)} of {newest} versions", fontsize="medium")

    shown = even_sample(versions, HISTOGRAMS_AT_MOST)
    every = np.concatenate([frames[v] for v in shown])
    positive = every[every > 0]
    bins = (
        np.geomspace(max(positive.min(), 1e-4), positive.max() * 1.01, 40) if len(positive) else 20
    )
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 1, len(shown)))
    for version, colour in zip(shown, colours, strict=True):
        histogram_axis.hist(
            frames[version], bins=bins, histtype="step", color=colour, label=f"v{version}"
        )
    if len(positive):
        histogram_axis.set_xscale("log")
    _y_scale(every_axis, list(low) + list(high))
    if data.threshold is not None:
        histogram_axis.axvline(data.threshold, color="red", linestyle="--", label="threshold")
        every_axis.axhline(data.threshold, color="red", linestyle="--", label="threshold")
    histogram_axis.set_xlabel("largest atomic force spread of an MD frame, eV/Å")
    histogram_axis.set_ylabel("frames")
    histogram_axis.yaxis.get_major_locator().set_params(integer=True)
    sample = (
        f"all {len(versions)} versions with MD frames"
        if len(shown) == len(versions)
        else f"{len(shown)} of {len(versions)} versions with MD frames, evenly spaced, "
        "first and last included"
    )
    histogram_axis.set_title(sample, fontsize="medium")
    histogram_axis.legend(fontsize=8, ncol=2)
    every_axis.legend(fontsize=8)
    return figure


PICKED_RHO = "Spearman rho over {n} active labels: spread when picked vs the picker's error"
"""The uncertainty-against-error figure's rank correlation: over the active labels of
every version, the largest atomic force spread each had when its ensemble picked it
against that ensemble's mean absolute force error on it."""


def plot_uncertainty_vs_error(data: RunData):
    figure, axes = _figure(width=6, height=5)
    axis = axes[0][0]
    predicted, errors = data.labelled_errors()
    if not len(predicted):
        _empty(axis, "no active labels yet")
        return figure
    axis.scatter(predicted, errors, s=10, alpha=0.6)
    axis.set_xlabel("predicted: largest atomic force spread when picked, eV/Å")
    axis.set_ylabel("true: mean absolute force error\nof the ensemble that picked it, eV/Å")
    if len(predicted) >= 3 and np.ptp(predicted) > 0 and np.ptp(errors) > 0:
        from scipy.stats import spearmanr

        rho = spearmanr(predicted, errors).statistic
        axis.set_title(
            f"{PICKED_RHO.format(n=len(predicted))} = {rho:.2f}\n"
            "(not the table's rho above, which ranks the held-out frames)",
            fontsize="medium",
        )
    return figure


ORACLE_KINDS = {"label": "label batches", "reference": "held-out set MD"}
"""The oracle module's task kinds, as the oracle figure names them."""


def oracle_tasks(events: list[dict]) -> dict[str, list[dict]]:
    """The oracle module's task records of ``events.jsonl`` by kind, one per task
    (:func:`~palflow.pipeline.state.run_files.one_per_task`), as ``palflow status``
    counts its finished tasks (failed ones included), so that the two totals agree."""
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for event in one_per_task(events):
        if event.get("module") == "oracle":
            by_kind[event.get("kind", "?")].append(event)
    return dict(by_kind)


def plot_oracle(data: RunData):
    """Left: the durations of the oracle's tasks, label batches and the held-out set's
    oracle MD apart, with the count of ``palflow status``. Right, only when the oracle
    failed: failures by kind."""
    tasks = oracle_tasks(data.events)
    kinds = data.failures_by_kind()
    failed = sum(1 for group in tasks.values() for e in group if not e.get("ok"))
    if failed:
        kinds["task failed"] = failed
    figure, axes = _figure(columns=2 if kinds else 1, width=10 if kinds else 7)
    times_axis = axes[0][0]
    timed = {
        kind: [e["ended"] - e["started"] for e in group if e.get("started") and e.get("ended")]
        for kind, group in tasks.items()
    }
    timed = {kind: durations for kind, durations in timed.items() if durations}
    total = sum(len(group) for group in tasks.values())
    counts = ", ".join(
        f"{len(group)} {ORACLE_KINDS.get(kind, kind)}" for kind, group in sorted(tasks.items())
    )
    if timed:
        every = np.concatenate([np.asarray(d, dtype=float) for d in timed.values()])
        positive = every[every > 0]
        bins = 30
        if len(positive) and positive.max() > 10 * positive.min():
            bins = np.geomspace(positive.min(), positive.max() * 1.01, 30)
            times_axis.set_xscale("log")
        names = sorted(timed)
        times_axis.hist(
            [timed[k] for k in names], bins=bins, stacked=True,
            color=[MODULE_COLOURS["oracle"] if k == "label" else "tab:gray" for k in names],
            label=[f"{ORACLE_KINDS.get(k, k)} ({len(timed[k])})" for k in names],
        )  # fmt: skip
        times_axis.set_xlabel("oracle task duration, s")
        times_axis.set_ylabel("tasks")
        times_axis.legend(fontsize=8)
        untimed = total - len(every)
        labels = timed.get("label")
        second = [f"label batch median {np.median(labels):.2f} s"] if labels else []
        second += [f"{untimed} failed without a duration, not drawn"] if untimed else []
        second += [] if kinds else ["no oracle failures"]
        times_axis.set_title(
            f"{total} oracle tasks (palflow status's count): {counts}\n" + "; ".join(second),
            fontsize="medium",
        )
        times_axis.yaxis.get_major_locator().set_params(integer=True)
    elif total:
        _empty(times_axis, f"{total} oracle tasks ({counts}), none with a duration")
    else:
        _empty(times_axis, "no oracle task has finished yet")
    if kinds:
        failure_axis = axes[0][1]
        failure_axis.bar(list(kinds), list(kinds.values()), color="black")
        failure_axis.set_ylabel("structures (tasks for 'task failed')")
        for tick in failure_axis.get_xticklabels():
            tick.set(rotation=30, ha="right", rotation_mode="anchor")
        failure_axis.yaxis.get_major_locator().set_params(integer=True)
        failure_axis.set_title("oracle failures by kind", fontsize="medium")
    return figure


RATIO_COLOURS = {"accurate": "tab:green", "candidate": "tab:orange", "failed": "tab:red"}


def plot_convergence(data: RunData):
    """Left: per version, the shares of the explored frames that were accurate,
    candidates and failed (one line style per system), and the accurate-ratio stop's
    target. Right: the newest version's mean force error against mean spread in five
    groups of equal size, on the validation labels and on the held-out set, with the
    fitted calibration error = c · spread."""
    figure, axes = _figure(width=11, height=4.5, columns=2)
    ratio_axis, reliability_axis = axes[0]
    rows = [r for r in data.metrics if r.get("exploration")]
    styles = ["-", "--", ":", "-."]
    if rows:
        systems = list(rows[-1]["exploration"])
        for index, system in enumerate(systems):
            for share, colour in RATIO_COLOURS.items():
                points = [
                    (r["version"], r["exploration"][system][share])
                    for r in rows
                    if r["exploration"].get(system, {}).get(share) is not None
                ]
                if points:
                    label = share if len(systems) == 1 else f"{system}: {share}"
                    ratio_axis.plot(
                        *zip(*points, strict=True),
                        styles[index % len(styles)],
                        color=colour,
                        label=label,
                    )
        target = data.campaign.get("stop", {}).get("accurate_ratio")
        if target:
            ratio_axis.axhline(target, color="black", lw=0.8, ls=":", label="stop target")
        ratio_axis.set_xlabel("ensemble version")
        ratio_axis.set_ylabel("share of explored frames")
        ratio_axis.set_ylim(-0.02, 1.02)
        ratio_axis.legend(fontsize=8)
    else:
        _empty(ratio_axis, "no exploration ratios recorded yet")
    newest = data.metrics[-1] if data.metrics else {}
    drawn = False
    for key, label, marker in (
        ("reliability_validation", "validation labels", "o"),
        ("reliability_test", "held-out set", "s"),
    ):
        groups = newest.get(key)
        if groups:
            spread, error, _ = zip(*groups, strict=True)
            reliability_axis.plot(spread, error, marker=marker, label=label)
            drawn = True
    if drawn:
        c = newest.get("calibration")
        if c:
            top = max(
                g[0]
                for k in ("reliability_validation", "reliability_test")
                for g in newest.get(k) or []
            )
            reliability_axis.plot([0, top], [0, c * top], "k:", label=f"error = {c:.2f} · spread")
        reliability_axis.set_xlabel("ensemble force spread, eV/Å")
        reliability_axis.set_ylabel("mean absolute force error, eV/Å")
        reliability_axis.set_title(f"version {newest.get('version')}")
        reliability_axis.legend(fontsize=8)
    else:
        _empty(reliability_axis, "no evaluation with spread and error yet")
    return figure


PLOTS = {
    "learning_curve": plot_learning_curve,
    "timeline": plot_timeline,
    "busy": plot_busy,
    "uncertainty": plot_uncertainty,
    "uncertainty_vs_error": plot_uncertainty_vs_error,
    "oracle": plot_oracle,
    "convergence": plot_convergence,
}
"""The function that draws each figure of :data:`FIGURES`."""


def draw(stem: str, data: RunData):
    """The Matplotlib figure ``stem`` of :data:`FIGURES`, or one that says why it
    could not be drawn."""
    try:
        return PLOTS[stem](data)
    except Exception as error:  # one broken figure must not cost the report
        logger.exception("report: figure %s failed", stem)
        figure, axes = _figure()
        _empty(axes[0][0], f"could not draw: {error}")
        return figure
