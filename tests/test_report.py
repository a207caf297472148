"""Seeing a run: the report from a recorded run directory, the live view, monitoring."""

import itertools
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from palflow.pipeline.observe.live import LabelRate, LiveView, plain_line, render, snapshot
from palflow.pipeline.observe.report import FIGURES, build_report
from palflow.pipeline.observe.run_data import run_status
from tests.test_cli import ROOT, run_cli, small_campaign
from tests.test_coordinator import small_campaign as small_settings


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """A finished short campaign (EMT, thread pools), and its coordinator."""
    from concurrent.futures import ThreadPoolExecutor

    from palflow.apps.contracts import MODULES
    from palflow.pipeline.engine.coordinator import Apps, Coordinator
    from palflow.pipeline.state.rundir import RunDirectory
    from palflow.pipeline.state.structures import load_start_structure

    tmp_path = tmp_path_factory.mktemp("recorded")
    campaign = small_settings(selection__max_labels_per_version=8)
    run = RunDirectory.create(tmp_path / "run", campaign.model_dump())
    slots = {"oracle": 2, "generator": 2, "train": 2, "infer": 1}
    executors = {m: ThreadPoolExecutor(slots[m]) for m in MODULES}
    coordinator = Coordinator(
        campaign,
        run,
        Apps.from_executors(executors),
        slots,
        load_start_structure(campaign.system.structure),
        poll_s=0.2,
    )
    try:
        coordinator.run()
    finally:
        for executor in executors.values():
            executor.shutdown(wait=True, cancel_futures=True)
    return run.root, coordinator


def figures_in(html: str) -> dict[str, int]:
    """Figure id -> size of its embedded PNG (base64 characters)."""
    return {
        m.group(1): len(m.group(2))
        for m in re.finditer(r'<img id="(\w+)"[^>]*src="data:image/png;base64,([^"]+)"', html)
    }


@pytest.mark.timeout(400)
def test_report_of_a_finished_run_has_every_figure(recorded_run):
    root, _ = recorded_run
    path = build_report(root)
    html = path.read_text()
    embedded = figures_in(html)
    assert set(embedded) == set(FIGURES), "every figure is embedded in the HTML"
    assert all(size > 5000 for size in embedded.values()), embedded
    for stem in FIGURES:
        assert (root / "report" / f"{stem}.png").stat().st_size > 5000
    assert "could not draw" not in html and "no task has finished" not in html
    assert "finished" in html and "label budget of 24 reached" in html
    assert "http" not in html.replace("http-equiv", ""), "self-contained: nothing to fetch"


@pytest.mark.timeout(400)
def test_report_rebuilds_from_a_crashed_run_directory(recorded_run, tmp_path):
    """No summary, a torn last line in events.jsonl: the report still comes out."""
    root, _ = recorded_run
    crashed = tmp_path / "crashed"
    shutil.copytree(root, crashed, ignore=shutil.ignore_patterns("report*"))
    (crashed / "summary.json").unlink()
    with open(crashed / "events.jsonl", "a") as events:
        events.write('{"task": 999, "kind": "lab')
    assert run_status(crashed).startswith("stopped early")
    done = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "observe" / "report.py"), str(crashed)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    html = (crashed / "report.html").read_text()
    assert set(figures_in(html)) == set(FIGURES)
    assert "stopped early" in html
    refused = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "observe" / "report.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 2 and "not a palflow run directory" in refused.stderr


def test_live_view_shows_what_the_run_knows(recorded_run, caplog):
    root, coordinator = recorded_run
    s = snapshot(coordinator, LabelRate())
    assert (s.labels, s.budget) == (24, 24)
    assert s.version == len(coordinator.state.versions) and s.test_mae > 0
    line = plain_line(s)
    assert "labels 24/24" in line and "test force MAE" in line and "in flight" in line
    assert "stopping: label budget of 24 reached" in line

    from rich.console import Console

    console = Console(record=True, width=100)
    console.print(render(s))
    text = console.export_text()
    for words in ("labels", "24/24", "oracle queue", "in flight", "ensemble", "failures"):
        assert words in text
    # Not a terminal: plain log lines, throttled.
    view = LiveView(interactive=False, interval_s=3600)
    with caplog.at_level(logging.INFO, logger="palflow.progress"):
        view(coordinator)
        view(coordinator)
    assert len([r for r in caplog.records if r.name == "palflow.progress"]) == 1


def test_time_left_follows_the_label_rate():
    rate = LabelRate(window_s=100)
    rate.add(0.0, 0)
    rate.add(10.0, 20)
    assert rate.per_second() == pytest.approx(2.0)
    rate.add(200.0, 30)  # the window forgets the start
    assert rate.per_second() is None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cli_run_writes_its_report_and_parsl_monitoring(tmp_path):
    run_dir = tmp_path / "run"
    env_before = os.environ.get("PALFLOW_MONITORING")
    os.environ["PALFLOW_MONITORING"] = "1"
    try:
        result = run_cli(
            "--site", "threads.py", "--campaign", str(small_campaign(tmp_path)),
            "--run-dir", str(run_dir), "--quiet",
        )  # fmt: skip
    finally:
        if env_before is None:
            del os.environ["PALFLOW_MONITORING"]
        else:
            os.environ["PALFLOW_MONITORING"] = env_before
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(figures_in((run_dir / "report.html").read_text())) == set(FIGURES)
    # --quiet: warnings only, the progress lines included (palflow run --help).
    assert "palflow.progress" not in result.stderr and "labels 12/12" not in result.stderr
    database = run_dir / "parsl" / "monitoring.db"
    assert database.exists()
    with sqlite3.connect(database) as db:
        tasks = db.execute("select count(*) from task").fetchone()[0]
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert tasks >= len(events) > 0


def fake_run(root, rows):
    """A run directory holding only ``campaign.json`` and ``metrics.jsonl``."""
    from palflow.pipeline.state.rundir import METRICS_FILE, RunDirectory

    run = RunDirectory.create(root, {"name": "fake"})
    (run.root / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run.root


OLD_ROWS = [  # metrics.jsonl before the validation gate: test errors only
    {"version": v, "labels": 8 * v, "wall_s": 10.0 * v, "force_mae": f, "force_rmse": 2 * f,
     "energy_mae_per_atom": e}
    for v, f, e in ((1, 0.40, 0.020), (2, 0.20, 0.011), (3, 0.10, 0.008))
]  # fmt: skip
GATED_ROWS = [  # with validation errors, the gate's rejections; version 1 not judged
    {**row, "val_force_mae": vf, "val_energy_mae_per_atom": ve, "held_back": h, "n_validation": n}
    for row, vf, ve, h, n in zip(
        OLD_ROWS,
        (None, 0.25, 0.12),
        (None, 0.0150, 0.0009),
        (0, 2, 0),
        (0, 3, 5),
        strict=True,
    )
]


def lines_by_label(axis) -> dict:
    return {line.get_label(): line for line in axis.get_lines()}


def test_learning_curve_draws_validation_and_held_back_when_recorded(tmp_path):
    import matplotlib.pyplot as plt

    from palflow.pipeline.observe.figures import HELD_BACK_LABEL, plot_learning_curve
    from palflow.pipeline.observe.run_data import RunData

    figure = plot_learning_curve(RunData(fake_run(tmp_path / "run", GATED_ROWS)))
    force, energy, force_t, energy_t = figure.axes  # top: against labels; bottom: wall time
    for axis, quantity in zip(figure.axes, ("force", "energy") * 2, strict=True):
        lines = lines_by_label(axis)
        assert set(lines) == {f"test {quantity} MAE", f"validation {quantity} MAE", HELD_BACK_LABEL}
        assert lines[f"test {quantity} MAE"].get_linestyle() == "-"
        assert lines[f"validation {quantity} MAE"].get_linestyle() == "--"
    lines = lines_by_label(force)
    assert list(lines["test force MAE"].get_xdata()) == [8, 16, 24]
    assert list(lines["validation force MAE"].get_xdata()) == [16, 24], "unjudged v1 left out"
    assert list(lines[HELD_BACK_LABEL].get_xdata()) == [16], "only v2 held members back"
    assert list(lines_by_label(force_t)[HELD_BACK_LABEL].get_xdata()) == [20.0]
    assert list(lines_by_label(energy_t)["test energy MAE"].get_xdata()) == [10.0, 20.0, 30.0]
    energy_lines = lines_by_label(energy)
    assert list(energy_lines["test energy MAE"].get_ydata()) == pytest.approx([20, 11, 8])
    assert list(energy_lines["validation energy MAE"].get_ydata()) == pytest.approx([15, 0.9])
    # Energy on its own axis, log because it spans more than a decade (0.9 to 20 meV/atom);
    # force spans less (0.1 to 0.4 eV/Å) and stays linear.
    assert energy.get_yscale() == "log" and force.get_yscale() == "linear"
    assert "meV/atom" in energy.get_ylabel() and "eV/Å" in force.get_ylabel()
    assert energy.legend_ is not None and force.legend_ is not None
    plt.close(figure)


def test_learning_curve_of_an_older_run_has_test_curves_only(tmp_path):
    import matplotlib.pyplot as plt

    from palflow.pipeline.observe.figures import plot_learning_curve
    from palflow.pipeline.observe.run_data import RunData

    figure = plot_learning_curve(RunData(fake_run(tmp_path / "run", OLD_ROWS)))
    assert [set(lines_by_label(axis)) for axis in figure.axes] == [
        {"test force MAE"},
        {"test energy MAE"},
    ] * 2
    assert all(axis.get_yscale() == "linear" for axis in figure.axes)
    plt.close(figure)


def table_of(html: str) -> tuple[list[str], list[list[str]]]:
    """Headings and rows of the report's learning-curve table."""
    table = re.search(r'<table id="learning_curve_table">(.*?)</table>', html, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
    return re.findall(r"<th>(.*?)</th>", rows[0]), [
        re.findall(r"<td>(.*?)</td>", r) for r in rows[1:]
    ]


def test_report_table_has_validation_columns_where_recorded(tmp_path):
    html = build_report(fake_run(tmp_path / "gated", GATED_ROWS)).read_text()
    headings, rows = table_of(html)
    assert headings == [
        "version", "labels", "wall time, s", "test force MAE, eV/Å", "test energy MAE, meV/atom",
        "validation force MAE, eV/Å", "validation energy MAE, meV/atom", "members held back",
        "validation frames",
    ]  # fmt: skip
    assert rows == [
        ["1", "8", "10", "0.4000", "20.00", "-", "-", "0", "0"],
        ["2", "16", "20", "0.2000", "11.00", "0.2500", "15.00", "2", "3"],
        ["3", "24", "30", "0.1000", "8.00", "0.1200", "0.90", "0", "5"],
    ]
    assert "latest validation force MAE" in html and "members held back by the gate" in html
    assert set(figures_in(html)) == set(FIGURES) and "could not draw" not in html

    html = build_report(fake_run(tmp_path / "old", OLD_ROWS)).read_text()
    headings, rows = table_of(html)
    assert headings == headings[:5] and len(headings) == 5, "older run: test columns only"
    assert rows[-1] == ["3", "24", "30", "0.1000", "8.00"]
    assert "validation" not in html and "held back" not in html
    assert "could not draw" not in html


def test_report_table_thins_a_long_run_and_keeps_the_last_version(tmp_path):
    rows = [{**OLD_ROWS[0], "version": v, "labels": v} for v in range(1, 102)]
    html = build_report(fake_run(tmp_path / "long", rows)).read_text()
    _, shown = table_of(html)
    assert [r[0] for r in shown] == [str(v) for v in range(1, 101, 3)] + ["101"]
    assert "One version in 3 of 101 shown" in html


NO_TEST_ROWS = [  # a campaign without a held-out set: validation, ratios, calibration
    {
        "version": v,
        "labels": 8 * v,
        "wall_s": 10.0 * v,
        "force_mae": None,
        "validation_force_mae": vf,
        "exploration": {"main": {"accurate": a, "candidate": 1 - a - 0.05, "failed": 0.05,
                                 "frames": 100, "segments": 8}},
        "reliability_validation": [[0.02, 0.03, 4], [0.05, 0.07, 4], [0.1, 0.16, 4]],
        "calibration": 1.5,
    }
    for v, vf, a in ((1, 0.3, 0.2), (2, 0.2, 0.6), (3, 0.1, 0.9))
]  # fmt: skip


def test_a_run_without_a_test_set_reports_ratios_and_calibration(tmp_path):
    import matplotlib.pyplot as plt

    from palflow.pipeline.observe.quality_figures import plot_convergence
    from palflow.pipeline.observe.report import build_report
    from palflow.pipeline.observe.run_data import RunData

    root = fake_run(tmp_path / "run", NO_TEST_ROWS)
    (root / "campaign.json").write_text(
        json.dumps({"name": "fake", "test": {"n_structures": 0}, "stop": {"accurate_ratio": 0.85}})
    )
    figure = plot_convergence(RunData(root))
    ratios, reliability = figure.axes
    lines = lines_by_label(ratios)
    assert list(lines["accurate"].get_ydata()) == pytest.approx([0.2, 0.6, 0.9])
    assert list(lines["stop target"].get_ydata()) == pytest.approx([0.85, 0.85])
    lines = lines_by_label(reliability)
    assert list(lines["validation labels"].get_xdata()) == pytest.approx([0.02, 0.05, 0.1])
    assert "error = 1.50 · spread" in lines
    plt.close(figure)

    page = build_report(root).read_text()
    assert "no held-out set" in page and "no independent test error" in page
    assert "0.90 accurate" in page and "force error ≈ 1.50 · spread" in page
    assert 'id="convergence"' in page and "could not draw" not in page


# ------------------------------------------------------------ the figures as seen
def _in_view(axis, tick) -> bool:
    low, high = sorted(axis.get_view_interval())
    slack = 1e-9 * max(abs(high - low), 1e-300)
    return low - slack <= tick.get_loc() <= high + slack


def texts_of(axes) -> list[tuple[str, object]]:
    """The text a reader sees of one axes: axis labels, tick labels (major and minor,
    within the view), offset texts, titles, the legend, and texts and annotations."""
    out: list[tuple[str, object]] = []
    for name, axis in (("x", axes.xaxis), ("y", axes.yaxis)):
        if axis.label.get_visible() and axis.label.get_text():
            out.append((f"{name} label {axis.label.get_text()!r}", axis.label))
        for tick in axis.get_major_ticks() + axis.get_minor_ticks():
            if not (tick.get_visible() and _in_view(axis, tick)):
                continue
            for label in (tick.label1, tick.label2):
                if label.get_visible() and label.get_text():
                    out.append((f"{name} tick {label.get_text()!r}", label))
        if axis.offsetText.get_visible() and axis.offsetText.get_text():
            out.append((f"{name} offset {axis.offsetText.get_text()!r}", axis.offsetText))
    for title in (axes.title, axes._left_title, axes._right_title):
        if title.get_visible() and title.get_text():
            out.append((f"title {title.get_text()!r}", title))
    if axes.legend_ is not None and axes.legend_.get_visible():
        out.append(("legend", axes.legend_))
    out += [(f"text {t.get_text()!r}", t) for t in axes.texts if t.get_visible() and t.get_text()]
    return out


def overlapping_text(figure) -> list[str]:
    """Every pair of boxes from different axes that intersect: the text of one axes
    (:func:`texts_of`) against the text and the plotting area of another, and the
    figure's own texts (the suptitle) against all of them. Boxes are Matplotlib's own
    extents, measured with the figure's renderer once it is drawn. A twin axes shares
    its parent's area, so only their texts are compared with each other."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    boxes = []  # (owner, what, extent, area of the owner or None)
    for index, axes in enumerate(figure.axes):
        area = axes.get_window_extent(renderer)
        boxes.append((index, "plotting area", area, area))
        for what, artist in texts_of(axes):
            boxes.append((index, what, artist.get_window_extent(renderer), area))
    for text in figure.texts:
        if text.get_visible() and text.get_text():
            boxes.append(
                (-1, f"figure text {text.get_text()!r}", text.get_window_extent(renderer), None)
            )
    found = []
    for (i, a, box_a, area_a), (j, b, box_b, area_b) in itertools.combinations(boxes, 2):
        if i == j or (a == b == "plotting area"):
            continue
        twins = (
            area_a is not None and area_b is not None and np.allclose(area_a.bounds, area_b.bounds)
        )
        if twins and "plotting area" in (a, b):
            continue
        if box_a.overlaps(box_b):
            found.append(
                f"axes {i} {a} {np.round(box_a.extents).astype(int).tolist()} x "
                f"axes {j} {b} {np.round(box_b.extents).astype(int).tolist()}"
            )
    return found


def test_the_overlap_check_sees_a_twin_axis_run_into_its_neighbour():
    """The learning curve as it was drawn before energy had its own panel: force and
    energy on twin axes, two panels side by side without a layout engine. The left
    panel's twin ran into the right panel's labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for axis in (left, right):
        axis.plot([0, 10, 20], [0.6, 0.3, 0.2])
        axis.set_yscale("log")
        axis.set_ylabel("test force MAE, eV/Å")
        twin = axis.twinx()
        twin.plot([0, 10, 20], [400, 200, 100])
        twin.set_ylabel("test energy MAE, meV/atom")
    found = overlapping_text(figure)
    plt.close(figure)
    # The left twin's label and tick labels against the right panel's tick labels; the
    # right panel's label inside the left panel's plotting area.
    assert any("y label 'test energy MAE" in f and "y tick" in f for f in found), found
    assert any("y tick" in f.split(" x ")[0] and "y tick" in f.split(" x ")[1] for f in found)
    assert any("y label 'test force MAE" in f and "plotting area" in f for f in found), found


def stretched(data, factor: float):
    """``data`` as if every task and every interval between them had taken ``factor``
    times as long: a run of hours instead of seconds (wider time tick labels, longer
    idle gaps)."""
    import copy

    keys = ("submitted", "returned", "started", "ended")
    long = copy.copy(data)
    long.events = [
        {**e, **{k: data.t0 + factor * (e[k] - data.t0) for k in keys if e.get(k)}}
        for e in data.events
    ]
    long.metrics = [
        {**row, "wall_s": factor * row["wall_s"]} if row.get("wall_s") else row
        for row in data.metrics
    ]
    long.t1 = data.t0 + factor * (data.t1 - data.t0)
    return long


@pytest.fixture(scope="module")
def recorded_data(recorded_run):
    from palflow.pipeline.observe.run_data import RunData

    return RunData(recorded_run[0])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stem", list(FIGURES))
def test_no_text_of_a_report_figure_runs_into_another_panel(recorded_data, stem):
    """Every report figure of a real run, as recorded (seconds) and stretched to eight
    hours: no label, tick label, title, legend or annotation of one panel intersects
    another panel's text or plotting area, or the suptitle."""
    import matplotlib.pyplot as plt

    from palflow.pipeline.observe.report import draw

    for data, seen_as in ((recorded_data, "as recorded"), (stretched(recorded_data, 3000), "8 h")):
        figure = draw(stem, data)
        found = overlapping_text(figure)
        drawn = [t.get_text() for a in figure.axes for t in a.texts]
        plt.close(figure)
        assert not any(t.startswith("could not draw") for t in drawn), drawn
        assert found == [], f"{stem} ({seen_as}): " + "\n".join(found)


def test_uncertainty_shows_every_version_of_the_run(tmp_path):
    """55 versions, MD frames under the first 39 only (the generator stopped at the
    label budget; training went on): the figure spans all 55, shades those without
    MD, and its histograms are an even sample that includes v39."""
    import matplotlib.pyplot as plt

    from palflow.pipeline.observe.quality_figures import even_sample, plot_uncertainty
    from palflow.pipeline.observe.run_data import RunData

    rows = [{**OLD_ROWS[0], "version": v, "labels": min(8 * v, 300)} for v in range(1, 56)]
    root = fake_run(tmp_path / "run", rows)
    (root / "generator").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for segment, versions in enumerate((range(1, 20), range(20, 40)), start=1):
        version = np.repeat(list(versions), 6)
        np.savez(
            root / "generator" / f"walker000.seg{segment:05d}.npz",
            force_disagreement=rng.lognormal(-1.5, 0.5, len(version)),
            ensemble_version=version,
        )
    figure = plot_uncertainty(RunData(root))
    every, histograms = figure.axes
    assert every.get_xlim() == (0.5, 55.5)
    assert "39 of 55 versions" in every.get_title()
    assert every.get_legend_handles_labels()[1][0] == "no MD under v40-v55"
    medians = every.containers[0].lines[0]
    assert list(medians.get_xdata()) == list(range(1, 40)), "one mark per version with frames"
    shown = [label for label in histograms.get_legend_handles_labels()[1] if label[0] == "v"]
    assert shown == [f"v{v}" for v in even_sample(list(range(1, 40)), 8)]
    assert shown[0] == "v1" and shown[-1] == "v39" and len(shown) == 8
    assert "8 of 39 versions with MD frames, evenly spaced, first and last included" in (
        histograms.get_title()
    )
    plt.close(figure)
    assert even_sample([3, 5, 9], 8) == [3, 5, 9]
    assert even_sample(list(range(10)), 4) == [0, 3, 6, 9]


def test_the_report_names_each_spearman_rho(recorded_run, recorded_data):
    """The table's rho ranks the held-out frames by the latest ensemble; the figure's
    pools the active labels of every version: each says which it is."""
    import matplotlib.pyplot as plt

    from palflow.pipeline.observe.quality_figures import plot_uncertainty_vs_error

    figure = plot_uncertainty_vs_error(recorded_data)
    title = figure.axes[0].get_title()
    plt.close(figure)
    assert re.match(r"Spearman rho over \d+ active labels: spread when picked", title), title
    assert "not the table's rho" in title and "held-out frames" in title
    html = build_report(recorded_run[0]).read_text()
    last = [r for r in recorded_data.metrics if r.get("uncertainty_spearman") is not None][-1]
    row = re.search(r"<tr><th>(Spearman rho[^<]*)</th><td>([^<]*)</td></tr>", html)
    assert row.group(2) == f"{last['uncertainty_spearman']:.2f}"
    assert f"latest ensemble (v{last['version']}) on 8 held-out frames" in row.group(1)
    assert "not the rho of the uncertainty figure, over active labels" in row.group(1)
    assert "latest uncertainty Spearman rho" not in html, "the unnamed row is gone"


def test_the_oracle_figure_counts_what_palflow_status_counts(recorded_data):
    """The label batches and the held-out set's oracle MD (12 and 1 with the default
    seed): ``palflow status`` counts 13 oracle tasks, and so does the figure (it used to
    count the label batches alone). With no failure there is no empty failure panel;
    with failures there is."""
    import copy

    import matplotlib.pyplot as plt

    from palflow.pipeline.observe.quality_figures import plot_oracle
    from palflow.pipeline.observe.status import tasks_by_module

    status = tasks_by_module(recorded_data.events)["oracle"]
    figure = plot_oracle(recorded_data)
    assert len(figure.axes) == 1, "no failures: no failure panel"
    (axis,) = figure.axes
    title = axis.get_title()
    assert title.startswith(f"{status['finished']} oracle tasks (palflow status's count)")
    batches = sum(1 for e in recorded_data.events if e["kind"] == "label")
    assert status["finished"] == batches + 1, "the label batches and the held-out set's MD"
    assert f"{batches} label batches, 1 held-out set MD" in title, title
    assert "no oracle failures" in title
    drawn = sum(patch.get_height() for patch in axis.patches)
    assert drawn == status["finished"] - status["failed"] == batches + 1
    plt.close(figure)

    failing = copy.copy(recorded_data)
    failing.state = {**recorded_data.state, "task_failures": {"7": "timeout: 60 s", "8": "scf: x"}}
    lost = {"task": 999, "kind": "label", "module": "oracle", "ok": False, "error": "lost"}
    failing.events = [*recorded_data.events, lost]
    figure = plot_oracle(failing)
    times, failures = figure.axes
    assert times.get_title().startswith(
        f"{tasks_by_module(failing.events)['oracle']['finished']} oracle tasks"
    )
    assert "1 failed without a duration, not drawn" in times.get_title()
    bars = {
        t.get_text(): p.get_height()
        for t, p in zip(failures.get_xticklabels(), failures.patches, strict=True)
    }
    assert bars == {"timeout": 1, "scf": 1, "task failed": 1}
    plt.close(figure)
