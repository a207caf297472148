"""The progress watchdog: a campaign that cannot progress stops, says why, and exits 1.

Unit cases drive :class:`palflow.pipeline.engine.watchdog.Watchdog` with fake tasks; the campaign
cases run the fast EMT copper example on thread pools (as tests/test_coordinator.py
does) and through the command line (tests/test_cli.py's ``run_cli``).
"""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from ase import Atoms
from ase.io import write

from palflow.pipeline.engine.core import Engine, TaskRecord
from palflow.pipeline.engine.watchdog import (
    MAX_FAILURES_IN_A_ROW,
    MAX_FRUITLESS_ORACLE_TASKS,
    MAX_FRUITLESS_VERSIONS,
    RepeatLog,
    Watchdog,
    verdict,
)
from tests.test_cli import run_cli
from tests.test_cli import small_campaign as cli_campaign
from tests.test_coordinator import run_campaign, small_campaign


# ------------------------------------------------------------------------ helpers
class FakeState:
    """The little of :class:`~palflow.pipeline.state.campaign_state.CampaignState` that the
    watchdog reads."""

    def __init__(self) -> None:
        self.stop_reason = None
        self.versions: list[int] = []
        self.n_labels_total = 0
        self.n_labels_active = 0
        self.last_candidate_id = 0

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason


def task(kind: str, member: int | None = None, walkers: tuple[int, ...] = ()) -> SimpleNamespace:
    return SimpleNamespace(
        kind=kind,
        member=None if member is None else SimpleNamespace(index=member),
        walkers=[SimpleNamespace(walker_id=w) for w in walkers],
    )


@pytest.fixture
def watchdog():
    return Watchdog(small_campaign(), FakeState())


def one_atom_campaign(tmp_path: Path, **overrides):
    atoms = Atoms("Cu", positions=[[0.0, 0.0, 0.0]], cell=[10.0, 10.0, 10.0], pbc=False)
    write(tmp_path / "cu1.xyz", atoms)
    return small_campaign(system__structure=str(tmp_path / "cu1.xyz"), **overrides)


def run_with(tmp_path: Path, campaign, **replace):
    """Run ``campaign`` on thread pools, ``replace`` as in :func:`run_campaign`."""
    return run_campaign(tmp_path, campaign, **replace)


def raising_measure(prediction, context):
    """A selection measure with a bug."""
    raise RuntimeError("bug in a user's measure")


# ------------------------------------------------------------ failures in a row
class TestFailuresInARow:
    def test_another_members_success_does_not_reset_a_members_count(self, watchdog):
        for attempt in range(MAX_FAILURES_IN_A_ROW):
            assert watchdog.state.stop_reason is None
            watchdog.failed(task("train", member=1), OSError(f"cannot read member1.{attempt}"))
            for other in (0, 2, 3):
                watchdog.succeeded(task("train", member=other), {})
        reason = watchdog.state.stop_reason
        assert reason == watchdog.failure
        assert reason.startswith(f"training of member 1 failed {MAX_FAILURES_IN_A_ROW} times")
        assert reason.endswith(f"OSError: cannot read member1.{MAX_FAILURES_IN_A_ROW - 1}")

    def test_a_success_of_the_same_member_resets_its_count(self, watchdog):
        for _ in range(3):
            for _ in range(MAX_FAILURES_IN_A_ROW - 1):
                watchdog.failed(task("train", member=0), RuntimeError("transient"))
            watchdog.succeeded(task("train", member=0), {})
        assert watchdog.state.stop_reason is None and watchdog.failure is None

    def test_generator_failures_count_per_walker(self, watchdog):
        for _ in range(MAX_FAILURES_IN_A_ROW - 1):
            watchdog.failed(task("generate", walkers=(0, 1)), ValueError("blew up"))
            watchdog.succeeded(task("generate", walkers=(2,)), {"walkers": [{"n_frames": 3}]})
        assert watchdog.failure is None
        watchdog.succeeded(task("generate", walkers=(1,)), {"walkers": [{"n_frames": 3}]})
        watchdog.failed(task("generate", walkers=(0, 1)), ValueError("blew up"))
        assert watchdog.failure.startswith(f"walker 0 failed {MAX_FAILURES_IN_A_ROW} times")

    @pytest.mark.parametrize("kind", ["label", "reference", "score", "evaluate"])
    def test_oracle_and_inference_count_per_kind(self, watchdog, kind):
        for _ in range(MAX_FAILURES_IN_A_ROW - 1):
            watchdog.failed(task(kind), RuntimeError("worker lost"))
            other = "evaluate" if kind != "evaluate" else "score"
            watchdog.succeeded(task(other), {})
        assert watchdog.failure is None
        watchdog.failed(task(kind), RuntimeError("worker lost"))
        assert watchdog.failure.startswith(f"{kind} tasks failed {MAX_FAILURES_IN_A_ROW} times")

    def test_a_failure_after_a_stop_keeps_the_stop(self, watchdog):
        watchdog.state.request_stop("label budget of 24 reached")
        for _ in range(MAX_FAILURES_IN_A_ROW):
            watchdog.failed(task("train", member=2), RuntimeError("late"))
        assert watchdog.failure is None
        assert watchdog.state.stop_reason == "label budget of 24 reached"


# --------------------------------------------------------------- cannot progress
class TestCannotProgress:
    @staticmethod
    def publish(watchdog, segments: int = 1, frames: int = 5) -> None:
        for _ in range(segments):
            watchdog.succeeded(task("generate", walkers=(0,)), {"walkers": [{"n_frames": frames}]})
        watchdog.state.versions.append(len(watchdog.state.versions) + 1)
        watchdog.succeeded(task("train", member=0), {})

    def test_versions_without_candidates_stop_the_campaign(self, watchdog):
        for _ in range(MAX_FRUITLESS_VERSIONS - 1):
            self.publish(watchdog)
        assert watchdog.failure is None
        self.publish(watchdog)
        assert watchdog.failure.startswith(
            f"cannot progress: {MAX_FRUITLESS_VERSIONS} ensemble versions in a row"
        )
        assert "no frame scored above the threshold" in watchdog.failure

    def test_no_frame_above_a_threshold_that_selected_before_is_convergence(self, watchdog):
        """Once the threshold has selected frames (active labels stored), versions that
        find none above it mean the committee agrees on all its MD visits: a stop, not a
        failure."""
        watchdog.state.n_labels_active = 40
        watchdog.state.n_labels_total = 48
        self.publish(watchdog)  # the labels so far are the mark to compare with
        for _ in range(MAX_FRUITLESS_VERSIONS):
            self.publish(watchdog)
        assert watchdog.failure is None
        assert watchdog.state.stop_reason.startswith(
            f"converged: {MAX_FRUITLESS_VERSIONS} ensemble versions in a row found no frame"
        )

    def test_segments_without_frames_are_named(self, watchdog):
        for _ in range(MAX_FRUITLESS_VERSIONS):
            self.publish(watchdog, frames=0)
        assert "segments returned no frames" in watchdog.failure

    def test_a_new_candidate_or_label_resets_the_count(self, watchdog):
        for round_ in range(3 * MAX_FRUITLESS_VERSIONS):
            if round_ % (MAX_FRUITLESS_VERSIONS - 1) == 0:
                watchdog.state.last_candidate_id += 1
            if round_ % (MAX_FRUITLESS_VERSIONS - 1) == 4:
                watchdog.state.n_labels_total += 1
            self.publish(watchdog)
        assert watchdog.failure is None

    def test_versions_while_the_generators_rest_do_not_count(self, watchdog):
        for _ in range(3 * MAX_FRUITLESS_VERSIONS):
            self.publish(watchdog, segments=0)
        assert watchdog.failure is None

    def test_oracle_tasks_that_store_nothing_stop_the_campaign(self, watchdog):
        watchdog.succeeded(task("label"), {"failures": []})  # stores nothing either
        watchdog.state.n_labels_total = 4
        watchdog.succeeded(task("label"), {"failures": []})  # stored 4: resets
        watchdog.failed(task("label"), RuntimeError("worker lost"))  # a lost task counts
        for n in range(MAX_FRUITLESS_ORACLE_TASKS - 1):
            assert watchdog.failure is None
            result = {"failures": [[7, f"error: Cu is not in the oracle's table ({n})"]]}
            watchdog.succeeded(task("label"), result)
        assert watchdog.failure.startswith(
            f"cannot progress: the oracle stored no label in {MAX_FRUITLESS_ORACLE_TASKS} tasks"
        )
        last = MAX_FRUITLESS_ORACLE_TASKS - 2
        assert watchdog.failure.endswith(f"not in the oracle's table ({last})")

    def test_a_one_atom_system_stops_as_cannot_progress(self, tmp_path):
        campaign = one_atom_campaign(tmp_path, stop__max_wall_s=600.0)
        _, summary = run_with(tmp_path, campaign)
        assert summary["stop_reason"].startswith("cannot progress:"), summary["stop_reason"]
        assert "no frame scored above the threshold" in summary["stop_reason"]
        assert summary["failed"] is True and summary["exit_status"] == 1
        assert summary["failure"] == summary["stop_reason"]
        assert summary["labels"] == 0 and summary["initial_labels"] == 8
        assert summary["versions"] >= MAX_FRUITLESS_VERSIONS

    def test_a_sampling_interval_longer_than_the_segment(self, tmp_path):
        campaign = small_campaign(generator__sample_interval=1000, stop__max_wall_s=600.0)
        run, summary = run_with(tmp_path, campaign)
        assert "segments returned no frames" in summary["stop_reason"]
        assert json.loads((run.root / "summary.json").read_text())["exit_status"] == 1


# --------------------------------------------------------------- handler errors
class Work(TaskRecord):
    kind = "score"


class Handler:
    """An agent whose result handler raises, and whose failure handler may too."""

    kinds = ("score",)

    def __init__(self, raise_on_failure: bool) -> None:
        self.raise_on_failure = raise_on_failure
        self.failures: list[str] = []

    def submit_ready(self, stopping: bool) -> None: ...

    def on_result(self, task, result) -> None:
        raise KeyError("force_disagreement")

    def on_failure(self, task, error) -> None:
        self.failures.append(str(error))
        if self.raise_on_failure:
            raise RuntimeError("the failure handler fails too")


class Events(list):
    append_event = list.append


class TestHandlerErrors:
    @pytest.mark.parametrize("raise_on_failure", [False, True])
    def test_a_handler_error_counts_as_a_failure_of_its_kind(self, watchdog, raise_on_failure):
        events = Events()
        outcomes = SimpleNamespace(task_succeeded=watchdog.succeeded, task_failed=watchdog.failed)
        engine = Engine({"infer": 1}, events, outcomes)
        handler = Handler(raise_on_failure)
        engine.register(handler)
        pool = ThreadPoolExecutor(1)
        submitted = []

        def turn() -> bool:
            if len(submitted) < MAX_FAILURES_IN_A_ROW and engine.free("infer"):
                engine.submit(Work(), partial(pool.submit, dict), number=len(submitted))
                submitted.append(1)
            return True

        engine.run(turn)
        pool.shutdown()
        assert len(handler.failures) == MAX_FAILURES_IN_A_ROW
        assert watchdog.failure.startswith(f"score tasks failed {MAX_FAILURES_IN_A_ROW} times")
        assert "KeyError" in watchdog.failure
        assert [e["ok"] for e in events].count(False) == MAX_FAILURES_IN_A_ROW

    def test_a_measure_that_raises_stops_the_campaign(self, tmp_path):
        campaign = small_campaign(selection__measure="tests.test_watchdog:raising_measure")
        run, summary = run_with(tmp_path, campaign)
        assert summary["failed"] is True
        assert f"failed {MAX_FAILURES_IN_A_ROW} times in a row" in summary["stop_reason"]
        assert "bug in a user's measure" in summary["stop_reason"]
        unusable = [e for e in run.read_events() if "result unusable" in (e.get("error") or "")]
        assert unusable and {e["kind"] for e in unusable} == {"generate"}


class TestBoundedLogs:
    def test_an_error_is_logged_in_full_once_then_counted(self, caplog):
        log = RepeatLog(logging.getLogger("test.repeats"))
        with caplog.at_level(logging.WARNING, logger="test.repeats"):
            for n in range(1000):
                try:
                    raise OSError(f"cannot read models/member1.{n:05d}.pt")
                except OSError as error:
                    log.error("train", f"train task {n} failed", error, traceback=True)
        records = caplog.records
        assert records[0].exc_info is not None
        assert "cannot read models/member1.00000.pt" in records[0].getMessage()
        assert all(r.exc_info is None for r in records[1:])
        assert records[-1].getMessage() == "train task 511 failed: same error again (x512)"
        assert len(records) <= 15

    def test_different_errors_and_topics_are_each_logged_in_full(self, caplog):
        log = RepeatLog(logging.getLogger("test.repeats"))
        with caplog.at_level(logging.WARNING, logger="test.repeats"):
            log.error("train", "a", OSError("x"), traceback=False)
            log.error("train", "b", ValueError("x"), traceback=False)
            log.error("generate", "c", OSError("x"), traceback=False)
            log.error("train", "d", OSError("x"), traceback=False)
        messages = [r.getMessage() for r in caplog.records]
        assert messages == ["a: OSError: x", "b: ValueError: x", "c: OSError: x",
                            "d: same error again (x2)"]  # fmt: skip

    def test_an_unreadable_member_checkpoint_stops_the_campaign(self, tmp_path, caplog):
        from palflow.apps.training import _train_member

        garbage = tmp_path / "garbage.pt"
        garbage.write_bytes(b"not a checkpoint")
        attempts = []

        def member_1_cannot_read(member, checkpoint_in, **request):
            if member == 1 and checkpoint_in is not None:
                attempts.append(1)
                checkpoint_in = str(garbage)  # as if member 1's own file were damaged
            return _train_member(member=member, checkpoint_in=checkpoint_in, **request)

        campaign = small_campaign(stop__max_labels=10_000, stop__max_wall_s=600.0)
        with caplog.at_level(logging.WARNING):
            run, summary = run_with(tmp_path, campaign, train_member=member_1_cannot_read)
        reason = summary["stop_reason"]
        assert reason.startswith(f"training of member 1 failed {MAX_FAILURES_IN_A_ROW} times")
        assert summary["failed"] is True and summary["exit_status"] == 1
        assert len(attempts) == MAX_FAILURES_IN_A_ROW
        failed = [e for e in run.read_events() if e["kind"] == "train" and not e["ok"]]
        assert len(failed) == MAX_FAILURES_IN_A_ROW
        train_lines = [r for r in caplog.records if r.getMessage().startswith("train task")]
        assert sum("same error again" not in r.getMessage() for r in train_lines) == 1
        assert len(train_lines) == MAX_FAILURES_IN_A_ROW


# ------------------------------------------------------------------ exit status
def summary_of(labels=4, initial=8, mae=(0.1,), stopped=True) -> dict:
    return {
        "stop_reason": "label budget of 4 reached" if stopped else "nothing left to run",
        "stopped_at_s": 3.0 if stopped else None,
        "labels": labels,
        "initial_labels": initial,
        "test_force_mae": [[labels, 1.0, m] for m in mae],
    }


class TestExitStatus:
    def test_a_real_stop_with_labels_and_a_finite_error_is_a_success(self):
        assert verdict(summary_of()) == {"failed": False, "failure": None, "exit_status": 0}
        # Initial labels alone count: a short run may stop before its first active label.
        assert verdict(summary_of(labels=0))["exit_status"] == 0

    @pytest.mark.parametrize(
        "summary, words",
        [
            (summary_of(labels=0, initial=0, mae=()), "no label was stored"),
            (summary_of(mae=()), "no ensemble version was evaluated"),
            (summary_of(mae=(0.2, math.nan)), "is nan, not a finite number"),
            (summary_of(mae=(math.inf,)), "is inf"),
            (summary_of(stopped=False), "without reaching a stop"),
        ],
    )
    def test_a_campaign_that_achieved_nothing_fails(self, summary, words):
        outcome = verdict(summary)
        assert outcome["failed"] is True and outcome["exit_status"] == 1
        assert words in outcome["failure"]

    def test_the_watchdogs_reason_wins(self):
        outcome = verdict(summary_of(), "training of member 1 failed 5 times in a row")
        assert outcome["failure"] == "training of member 1 failed 5 times in a row"
        assert outcome["exit_status"] == 1

    @pytest.mark.timeout(120)
    def test_cli_exits_0_after_a_real_stop(self, tmp_path):
        run_dir = tmp_path / "run"
        result = run_cli(
            "--site", "threads.py", "--campaign", str(cli_campaign(tmp_path)),
            "--run-dir", str(run_dir), "--max-labels", "4", "-q",
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["failed"] is False and summary["exit_status"] == 0
        assert summary["failure"] is None and summary["labels"] == 4
        assert np.isfinite(summary["test_force_mae"][-1][2])
        assert "failed" not in result.stdout

    @pytest.mark.timeout(120)
    def test_cli_exits_1_when_the_campaign_cannot_progress(self, tmp_path):
        """A threshold no frame reaches passes every input check, yet nothing is ever
        selected: the campaign stops as "cannot progress", not at its wall time."""
        campaign = cli_campaign(tmp_path)
        campaign.write_text(campaign.read_text().replace("threshold = 0.02", "threshold = 1e6"))
        run_dir = tmp_path / "run"
        result = run_cli(
            "--site", "threads.py", "--campaign", str(campaign), "--run-dir", str(run_dir),
            "--max-wall", "600", "-q",
        )  # fmt: skip
        assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
        last = result.stdout.strip().splitlines()[-1]
        assert last.startswith("campaign cli-test failed: cannot progress:"), last
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["failed"] is True and summary["exit_status"] == 1
        assert last.endswith(summary["failure"])
        assert "no frame scored above the threshold" in summary["failure"]
        assert summary["stop_reason"] == summary["failure"]

    def test_an_oracle_that_stores_no_label_fails_the_campaign(self, tmp_path):
        campaign = small_campaign(
            oracle__calculator="palflow.apps.oracles.fault_injection:FaultyCalculator",
            oracle__kwargs={"rate": 1.0, "kinds": ["exception"]},
            oracle__max_attempts=1,
            stop__max_wall_s=600.0,
        )
        run, summary = run_with(tmp_path, campaign)
        assert summary["failed"] is True and summary["exit_status"] == 1
        assert summary["labels"] + summary["initial_labels"] == 0
        assert summary["stop_reason"] == summary["failure"]
        assert "held-out set could not be labelled" in summary["failure"] or (
            "the oracle stored no label" in summary["failure"]
        )
        assert "injected fault" in summary["failure"]
        assert json.loads((run.root / "summary.json").read_text())["failed"] is True

    @pytest.mark.timeout(120)
    def test_cli_exits_1_with_a_last_line_when_the_coordinator_itself_fails(self, tmp_path):
        """A query that passes its trial, then raises while the campaign runs."""
        campaign = cli_campaign(tmp_path)
        campaign.write_text(
            campaign.read_text().replace(
                "[selection]", '[selection]\nquery = "tests.test_cli:BrokenQuery"'
            )
        )
        result = run_cli(
            "--site", "threads.py", "--campaign", str(campaign),
            "--run-dir", str(tmp_path / "run"), "-q",
        )  # fmt: skip
        assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
        log = (tmp_path / "run" / "palflow.log").read_text()
        assert "Traceback" in log and "RuntimeError: bug in a user's query" in log
        last = result.stdout.strip().splitlines()[-1]
        assert last.startswith("campaign cli-test failed: RuntimeError: bug in a user's query")
