"""The run report: ``report.html`` and its PNGs, from the run directory's files alone.

    python pipeline/report.py RUN_DIR

Works on a finished run, a running one (the coordinator refreshes the report every
few minutes and once at the end) and a crashed one: it reads only what the
campaign writes as it goes (``events.jsonl``, ``metrics.jsonl``, ``state.json``,
``labels.db``, the generator's frame files and the ensemble checkpoints), never the
coordinator's memory. The HTML embeds its figures, so it opens offline, with no
server; the same figures are written beside it in ``report/``.

The figures:

============================  ===========================================================
``learning_curve.png``        test force and energy MAE against labels and wall time
``timeline.png``              one Gantt lane per task slot, per module: the overlap
``busy.png``                  busy fraction per module, and its longest idle gap
``uncertainty.png``           the frames' force spread per ensemble version, threshold
``uncertainty_vs_error.png``  predicted force spread against true force error, labels
``oracle.png``                oracle task durations, and failures by kind
============================  ===========================================================
"""

from __future__ import annotations

import base64
import html
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

if __name__ == "__main__":  # run as a script: the project root, not pipeline/, on the path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from pipeline.metrics import busy_fractions, module_intervals  # noqa: E402

logger = logging.getLogger(__name__)

FIGURES = {
    "learning_curve": "Learning curve",
    "timeline": "Task timeline",
    "busy": "Busy fraction and idle gaps",
    "uncertainty": "Uncertainty per ensemble version",
    "uncertainty_vs_error": "Predicted uncertainty against true error",
    "oracle": "Oracle time and failures",
}
"""Every figure of the report, by file stem, with its heading."""

MODULE_COLOURS = {
    "oracle": "tab:red",
    "generator": "tab:green",
    "train": "tab:blue",
    "infer": "tab:purple",
}


# ------------------------------------------------------------------ reading the run
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete line; a torn last line (a crash mid-write) is skipped."""
    records = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return records
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def run_status(root: Path) -> str:
    """``finished``, ``running`` (a coordinator holds the lock) or ``stopped early``."""
    import fcntl

    if (root / "summary.json").exists():
        return "finished"
    lock = root / ".lock"
    if lock.exists():
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return "running"
    return "stopped early (no summary: killed or crashed; resume with --resume)"


class RunData:
    """What the report needs, read once from a run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not (self.root / "campaign.json").exists():
            raise FileNotFoundError(f"{self.root} is not a palflow run directory")
        self.campaign = _read_json(self.root / "campaign.json") or {}
        self.summary = _read_json(self.root / "summary.json")
        self.state = _read_json(self.root / "state.json") or {}
        self.events = _read_jsonl(self.root / "events.jsonl")
        self.metrics = _read_jsonl(self.root / "metrics.jsonl") or self.state.get("test_errors", [])
        self.status = run_status(self.root)
        timed = [e for e in self.events if e.get("submitted")]
        if self.summary:
            self.t0 = self.summary["started_at"]
        elif timed:
            self.t0 = min(e["submitted"] for e in timed)
        else:
            self.t0 = time.time()
        self.t1 = max([e.get("returned", self.t0) for e in self.events] or [self.t0])

    @property
    def name(self) -> str:
        return self.campaign.get("name", self.root.name)

    @property
    def threshold(self) -> float | None:
        selection = self.campaign.get("selection", {})
        if selection.get("threshold_mode", "fixed") != "fixed":
            return None
        return selection.get("threshold", 0.05)

    def failures_by_kind(self) -> Counter:
        failures = self.state.get("task_failures", {})
        return Counter(reason.split(":", 1)[0] for reason in failures.values())

    def generator_frames(self) -> dict[int, list[float]]:
        """Force spread of every recorded MD frame, by the ensemble version that ran it."""
        by_version: dict[int, list[float]] = defaultdict(list)
        for path in sorted((self.root / "generator").glob("walker*.npz")):
            try:
                with np.load(path) as data:
                    spread = data["force_disagreement"]
                    version = data["ensemble_version"] if "ensemble_version" in data else None
            except (OSError, ValueError, KeyError):
                continue  # a file being written, or torn by a crash
            if version is None or not len(spread):
                continue
            for v, s in zip(version.tolist(), spread.tolist(), strict=True):
                by_version[int(v)].append(float(s))
        return by_version

    def labelled_errors(self, limit: int = 400) -> tuple[np.ndarray, np.ndarray]:
        """For up to ``limit`` active labels: the force spread predicted when they were
        picked, and the true mean absolute force error of the ensemble that picked
        them (its checkpoint, against the oracle's forces)."""
        from pipeline.rundir import open_labels

        db_path = self.root / "labels.db"
        if not db_path.exists():
            return np.zeros(0), np.zeros(0)
        with open_labels(db_path) as db:
            rows = [r for r in db.select(source="active") if "scored_version" in r.key_value_pairs]
        if not rows:
            return np.zeros(0), np.zeros(0)
        if len(rows) > limit:
            keep = np.random.default_rng(0).choice(len(rows), size=limit, replace=False)
            rows = [rows[i] for i in sorted(keep)]
        by_version: dict[int, list] = defaultdict(list)
        for row in rows:
            by_version[int(row.scored_version)].append(row)
        import torch

        from apps.calculator import predict_structures
        from apps.model import load_checkpoint

        torch.set_num_threads(1)
        predicted, errors = [], []
        for version, version_rows in by_version.items():
            checkpoint = self.root / "models" / f"ensemble.v{version:05d}.pt"
            if not checkpoint.exists():
                continue
            model, _ = load_checkpoint(checkpoint, device="cpu")
            structures = [row.toatoms() for row in version_rows]
            out = predict_structures(model, structures, device="cpu")
            for row, atoms, forces in zip(version_rows, structures, out["forces"], strict=True):
                predicted.append(row.predicted_force_disagreement)
                errors.append(float(np.abs(forces - atoms.get_forces()).mean()))
        return np.asarray(predicted), np.asarray(errors)


# ------------------------------------------------------------------------ figures
def _figure(width: float = 10, height: float = 4, columns: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width, height), squeeze=False)


def _empty(axis, message: str) -> None:
    axis.text(0.5, 0.5, message, ha="center", va="center", transform=axis.transAxes)
    axis.set_xticks([])
    axis.set_yticks([])


def plot_learning_curve(data: RunData):
    figure, axes = _figure(columns=2)
    by_labels, by_time = axes[0]
    points = [m for m in data.metrics if m.get("force_mae") is not None]
    if not points:
        _empty(by_labels, "no ensemble evaluated yet")
        _empty(by_time, "no ensemble evaluated yet")
        return figure
    labels = [m["labels"] for m in points]
    wall = [m.get("wall_s", np.nan) for m in points]
    force = [m["force_mae"] for m in points]
    energy = [1e3 * (m.get("energy_mae_per_atom") or np.nan) for m in points]
    for axis, x, xlabel in ((by_labels, labels, "active labels"), (by_time, wall, "wall time, s")):
        axis.plot(x, force, "o-", color="tab:blue", label="force MAE (eV/Å)")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("test force MAE, eV/Å", color="tab:blue")
        axis.set_yscale("log")
        twin = axis.twinx()
        twin.plot(x, energy, "s--", color="tab:orange", label="energy MAE (meV/atom)")
        twin.set_ylabel("test energy MAE, meV/atom", color="tab:orange")
    figure.suptitle(f"{data.name}: held-out error per ensemble version")
    return figure


def plot_timeline(data: RunData):
    figure, axes = _figure(height=4.5)
    axis = axes[0][0]
    lanes_used = 0
    ticks, tick_labels = [], []
    for module in ("oracle", "generator", "train", "infer"):
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
    gap_axis.bar(modules, [gaps[m][0] for m in modules], color=colours)
    gap_axis.set_ylabel("longest idle gap, s")
    for i, module in enumerate(modules):
        gap_axis.annotate(f"total {gaps[module][1]:.0f} s", (i, gaps[module][0]), ha="center")
    return figure


def plot_uncertainty(data: RunData):
    figure, axes = _figure()
    axis = axes[0][0]
    frames = data.generator_frames()
    if not frames:
        _empty(axis, "no MD frames recorded yet")
        return figure
    versions = sorted(frames)
    shown = (
        versions
        if len(versions) <= 8
        else list(np.linspace(versions[0], versions[-1], 8, dtype=int))
    )
    shown = [v for v in shown if v in frames]
    every = np.concatenate([frames[v] for v in shown])
    positive = every[every > 0]
    bins = (
        np.geomspace(max(positive.min(), 1e-4), positive.max() * 1.01, 40) if len(positive) else 20
    )
    colours = __import__("matplotlib").colormaps["viridis"](np.linspace(0, 1, len(shown)))
    for version, colour in zip(shown, colours, strict=True):
        axis.hist(frames[version], bins=bins, histtype="step", color=colour, label=f"v{version}")
    if len(positive):
        axis.set_xscale("log")
    if data.threshold is not None:
        axis.axvline(data.threshold, color="red", linestyle="--", label="threshold")
    axis.set_xlabel("largest atomic force spread of an MD frame, eV/Å")
    axis.set_ylabel("frames")
    axis.legend(fontsize=8, ncol=2)
    return figure


def plot_uncertainty_vs_error(data: RunData):
    figure, axes = _figure(width=6, height=5)
    axis = axes[0][0]
    predicted, errors = data.labelled_errors()
    if not len(predicted):
        _empty(axis, "no active labels yet")
        return figure
    axis.scatter(predicted, errors, s=10, alpha=0.6)
    axis.set_xlabel("predicted: force spread when picked, eV/Å")
    axis.set_ylabel("true: mean absolute force error, eV/Å")
    if len(predicted) >= 3 and np.ptp(predicted) > 0 and np.ptp(errors) > 0:
        from scipy.stats import spearmanr

        rho = spearmanr(predicted, errors).statistic
        axis.set_title(f"{len(predicted)} labelled candidates, Spearman rho {rho:.2f}")
    return figure


def plot_oracle(data: RunData):
    figure, axes = _figure(columns=2)
    times_axis, failure_axis = axes[0]
    durations = [
        e["ended"] - e["started"]
        for e in data.events
        if e.get("kind") == "label" and e.get("started") and e.get("ended")
    ]
    if durations:
        times_axis.hist(durations, bins=30, color=MODULE_COLOURS["oracle"])
        times_axis.set_xlabel("oracle task duration, s")
        times_axis.set_ylabel("tasks")
        times_axis.set_title(f"median {np.median(durations):.2f} s over {len(durations)} tasks")
    else:
        _empty(times_axis, "no oracle task has finished yet")
    kinds = data.failures_by_kind()
    lost = sum(1 for e in data.events if e.get("module") == "oracle" and not e.get("ok", True))
    if lost:
        kinds["task failed"] += lost
    if kinds:
        failure_axis.bar(list(kinds), list(kinds.values()), color="black")
        failure_axis.set_ylabel("structures (tasks for 'task failed')")
        failure_axis.tick_params(axis="x", rotation=30)
    else:
        _empty(failure_axis, "no oracle failures")
    return figure


PLOTS = {
    "learning_curve": plot_learning_curve,
    "timeline": plot_timeline,
    "busy": plot_busy,
    "uncertainty": plot_uncertainty,
    "uncertainty_vs_error": plot_uncertainty_vs_error,
    "oracle": plot_oracle,
}


# --------------------------------------------------------------------------- HTML
def _facts(data: RunData) -> list[tuple[str, str]]:
    summary, state = data.summary or {}, data.state
    versions = state.get("versions", [])
    last = data.metrics[-1] if data.metrics else {}
    facts = [
        ("status", data.status),
        ("stop reason", summary.get("stop_reason", "-")),
        ("wall time", f"{data.t1 - data.t0:.0f} s"),
        ("ensemble versions", str(len(versions))),
        ("active labels", str(versions[-1]["n_labels"] if versions else 0)),
        ("oracle failures", str(len(state.get("task_failures", {})))),
    ]
    if last.get("force_mae") is not None:
        facts.append(("latest test force MAE", f"{last['force_mae']:.4f} eV/Å"))
    if last.get("uncertainty_spearman") is not None:
        facts.append(("latest uncertainty Spearman rho", f"{last['uncertainty_spearman']:.2f}"))
    if summary.get("learning_curve_area") is not None:
        facts.append(("learning-curve area", f"{summary['learning_curve_area']:.4f} eV/Å"))
    return facts


def build_report(root: str | Path) -> Path:
    """Write ``report.html`` and ``report/*.png`` in the run directory ``root``.

    Returns
    -------
    Path
        The HTML file.
    """
    import matplotlib.pyplot as plt

    data = RunData(root)
    out = data.root / "report"
    out.mkdir(exist_ok=True)
    sections = []
    for stem, title in FIGURES.items():
        try:
            figure = PLOTS[stem](data)
        except Exception as error:  # one broken figure must not cost the report
            logger.exception("report: figure %s failed", stem)
            figure, axes = _figure()
            _empty(axes[0][0], f"could not draw: {error}")
        png = out / f"{stem}.png"
        partial = out / f".{stem}.png.tmp"
        figure.savefig(partial, dpi=90, bbox_inches="tight", format="png")
        plt.close(figure)
        partial.replace(png)
        encoded = base64.b64encode(png.read_bytes()).decode("ascii")
        sections.append(
            f'<h2>{html.escape(title)}</h2>\n<img id="{stem}" alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{encoded}">'
        )
    rows = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _facts(data)
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>palflow: {html.escape(data.name)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 0.2em 1em; text-align: left; }}
th {{ color: #555; font-weight: normal; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>palflow run: {html.escape(data.name)}</h1>
<p>Built {time.strftime("%Y-%m-%d %H:%M:%S")} from <code>{html.escape(str(data.root))}</code>.</p>
<table>
{rows}
</table>
{chr(10).join(sections)}
</body></html>
"""
    target = data.root / "report.html"
    partial = data.root / ".report.html.tmp"
    partial.write_text(page)
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="pipeline/report.py", description="Build report.html of a palflow run directory."
    )
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.run_dir)
    except FileNotFoundError as error:
        print(f"palflow: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
