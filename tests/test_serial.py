"""The serial baseline: the same apps and handlers, one phase at a time."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from palflow.apps.contracts import MODULES
from palflow.pipeline.engine.coordinator import Apps
from palflow.pipeline.engine.serial import SerialLoop
from palflow.pipeline.state.metrics import concurrency_fraction
from palflow.pipeline.state.records import Member
from palflow.pipeline.state.rundir import RunDirectory
from palflow.pipeline.state.structures import load_start_structure
from tests.test_coordinator import SLOTS, small_campaign


@pytest.mark.timeout(400)
@pytest.mark.parametrize("train", ["plateau", "one task"])
def test_serial_loop_runs_its_phases_one_at_a_time(tmp_path, train):
    """Each phase waits for the last; members train until validation stops improving
    (at least 1 + patience tasks, at most max_train_tasks) or for one task."""
    campaign = small_campaign(stop__max_labels=16)
    run = RunDirectory.create(tmp_path / "run")
    executors = {m: ThreadPoolExecutor(SLOTS[m]) for m in MODULES}
    try:
        start = load_start_structure(campaign.system.structure)
        loop = SerialLoop(
            campaign,
            run,
            Apps.from_executors(executors),
            SLOTS,
            start,
            poll_s=0.2,
            labels_per_iteration=4,
            train=train,
            patience=2,
            max_train_tasks=5,
        )
        unpublished = []  # members trained but left out of the newest version
        leave_phase = loop._next_phase

        def next_phase():
            if loop.phase == "train" and not loop.policy.stopping:
                unpublished.append([m.index for m in loop.state.members if m.fresh])
            leave_phase()

        loop._next_phase = next_phase
        summary = loop.run()
    finally:
        for executor in executors.values():
            executor.shutdown(wait=True, cancel_futures=True)
    assert summary["labels"] == 16
    # Every training phase ends with a version of every member's newest state, also
    # where members plateau at different task counts
    assert unpublished and unpublished == [[]] * len(unpublished), unpublished
    assert loop.iterations >= 4, "4 labels per iteration make at least 4 iterations"
    members = campaign.model.n_members
    assert len(loop.train_history) >= 4
    serial = summary["serial"]
    assert serial["iterations"] == loop.iterations and serial["train"] == train
    assert serial["phase_s"]["label"] > 0 and serial["phase_s"]["train"] > 0
    assert serial["train_tasks"] == [list(t.values()) for t in loop.train_history]
    for tasks in loop.train_history:
        assert sorted(tasks) == list(range(members)), tasks
        if train == "one task":
            assert set(tasks.values()) == {1}
        else:
            # the first task sets the error to beat (its training loss when there
            # are too few frames for validation); `patience` more without a gain
            assert all(3 <= n <= 5 for n in tasks.values()), tasks
    events = run.read_events()
    stopped = summary["started_at"] + summary["stopped_at_s"]
    before_stop = [e for e in events if e.get("ended") and e["ended"] <= stopped]
    t0, t1 = summary["started_at"], stopped
    for pair in [("oracle", "train"), ("oracle", "generator"), ("train", "generator")]:
        assert concurrency_fraction(before_stop, t0, t1, pair) == 0.0, pair


def test_serial_loop_rejects_bad_training_settings(tmp_path):
    campaign = small_campaign()
    run = RunDirectory.create(tmp_path / "run")
    start = load_start_structure(campaign.system.structure)
    executors = {m: ThreadPoolExecutor(1) for m in MODULES}
    try:
        apps = Apps.from_executors(executors)
        for bad in ({"train": "forever"}, {"patience": 0}, {"improvement": 1.0}):
            with pytest.raises(ValueError):
                SerialLoop(campaign, run, apps, SLOTS, start, **bad)
    finally:
        for executor in executors.values():
            executor.shutdown()


def _plateau_tasks(tmp_path, results, **settings):
    """Feed one member the training results in turn, as the loop does after each
    task; the tasks it asks for, and the loop."""
    campaign = small_campaign()
    run = RunDirectory.create(tmp_path / "run")
    executors = {m: ThreadPoolExecutor(1) for m in MODULES}
    try:
        start = load_start_structure(campaign.system.structure)
        loop = SerialLoop(campaign, run, Apps.from_executors(executors), SLOTS, start, **settings)
    finally:
        for executor in executors.values():
            executor.shutdown()
    member = Member(0)
    tasks = 0
    while loop._trains_on(member):
        result = results[tasks]
        tasks += 1
        loop.train_tasks[0] = tasks
        member.advance(f"m{tasks}", 8, tasks, result)
    return tasks, loop


@pytest.mark.parametrize(
    "results, expected",
    [
        # judged on validation: the best is 1.0 at task 3, then two tasks without 1%
        ([{"val_force_mae": e} for e in (2.0, 1.5, 1.0, 0.995, 1.2, 0.5)], 5),
        # no validation frames: judged on the training loss the same way
        ([{"train_loss": e, "n_validation": 0} for e in (4.0, 3.0, 3.0, 3.0, 1.0)], 4),
        # validation appears: the comparison starts afresh on it
        (
            [
                {"train_loss": 4.0},
                {"train_loss": 3.0},
                {"val_force_mae": 9.0},
                {"val_force_mae": 9.5},
                {"val_force_mae": 9.9},
                {"val_force_mae": 1.0},
            ],
            5,
        ),
        # nothing measured (a non-finite loss): every task is one without a gain
        ([{"train_loss": float("nan")}] * 6, 2),
    ],
)
def test_plateau_rule_stops_after_patience_tasks_without_gain(tmp_path, results, expected):
    tasks, loop = _plateau_tasks(tmp_path, results, patience=2, improvement=0.01)
    assert tasks == expected
    assert loop.capped == 0


def test_plateau_rule_counts_members_stopped_by_the_cap(tmp_path):
    falling = [{"train_loss": 0.5**k} for k in range(10)]
    tasks, loop = _plateau_tasks(tmp_path, falling, patience=2, max_train_tasks=4)
    assert (tasks, loop.capped) == (4, 1)
