"""Seeing a run: the report from a recorded run directory, the live view, monitoring."""

import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys

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
    # --quiet keeps the progress lines: a batch job's log stays readable.
    assert "palflow.progress" in result.stderr and "labels 12/12" in result.stderr
    database = run_dir / "parsl" / "monitoring.db"
    assert database.exists()
    with sqlite3.connect(database) as db:
        tasks = db.execute("select count(*) from task").fetchone()[0]
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert tasks >= len(events) > 0
