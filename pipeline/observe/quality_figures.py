"""The report's figures of the ensemble's uncertainty, the oracle and convergence,
each drawn from a :class:`~palflow.pipeline.observe.run_data.RunData` with the helpers
of :mod:`palflow.pipeline.observe.figures`.

============================  ===========================================================
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
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from palflow.pipeline.observe.figures import MODULE_COLOURS, empty_panel, new_figure, y_scale
from palflow.pipeline.observe.run_data import RunData
from palflow.pipeline.state.run_files import one_per_task


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

    figure, axes = new_figure(width=11, height=4.5, columns=2)
    every_axis, histogram_axis = axes[0]
    frames = data.generator_frames()
    if not frames:
        empty_panel(every_axis, "no MD frames recorded yet")
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
    y_scale(every_axis, list(low) + list(high))
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
    figure, axes = new_figure(width=6, height=5)
    axis = axes[0][0]
    predicted, errors = data.labelled_errors()
    if not len(predicted):
        empty_panel(axis, "no active labels yet")
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
    figure, axes = new_figure(columns=2 if kinds else 1, width=10 if kinds else 7)
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
        empty_panel(times_axis, f"{total} oracle tasks ({counts}), none with a duration")
    else:
        empty_panel(times_axis, "no oracle task has finished yet")
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
    figure, axes = new_figure(width=11, height=4.5, columns=2)
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
        empty_panel(ratio_axis, "no exploration ratios recorded yet")
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
        empty_panel(reliability_axis, "no evaluation with spread and error yet")
    return figure
