"""The coordinator on standard-library executors, with real apps and an EMT oracle."""

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
from ase.db import connect

from palflow.apps.contracts import MODULES
from palflow.pipeline.config.settings import load_campaign
from palflow.pipeline.engine.coordinator import Apps, Coordinator
from palflow.pipeline.state.rundir import RunDirectory
from palflow.pipeline.state.structures import load_start_structure

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SLOTS = {"oracle": 2, "generator": 2, "train": 2, "infer": 1}


def small_campaign(**overrides):
    """The small copper campaign of the coordinator tests; its seed is
    ``PALFLOW_TEST_SEED`` (0 by default), which ``benchmarks/repeat_tests.py`` varies."""
    settings = {
        "seed": int(os.environ.get("PALFLOW_TEST_SEED", "0")),
        "stop__max_labels": 24,
        "stop__max_wall_s": 240.0,
        "model__n_features": 16,
        "model__n_interactions": 2,
        "model__n_rbf": 8,
        "training__min_task_s": 0.0,
        "training__epochs_per_task": 4,
        "generator__steps_per_task": 40,
        "generator__n_walkers": 3,
        "initial__n_structures": 8,
        "test__n_structures": 8,
        "oracle__batch_size": 4,
        # As in every campaign (60 s by default), the members train on the final labels
        # before the last version: without it, the last version holds members that took
        # in the last labels for one 4-epoch task.
        "stop__final_training_s": 5.0,
    }
    settings.update(overrides)
    return load_campaign(EXAMPLES / "cu_emt.toml", **settings)


def run_campaign(tmp_path, campaign, generator=None, **replace):
    """Run ``campaign`` on thread pools; ``generator`` replaces the generator if given,
    and ``replace`` maps other app names (``train_member``, ``generate``) to plain
    functions submitted to that app's pool in place of the real one."""
    run = RunDirectory.create(tmp_path / "run", campaign.model_dump())
    executors = {m: ThreadPoolExecutor(SLOTS[m]) for m in MODULES}
    apps = Apps.from_executors(executors)
    if generator is not None:
        custom = generator

        def generate(generator: str, **request):  # whatever generator.kind says
            return executors["generator"].submit(custom, **request)

        apps.generate = generate
    for name, function in replace.items():
        pool = {"train_member": "train", "generate": "generator"}[name]
        setattr(apps, name, partial(executors[pool].submit, function))
    try:
        first = campaign.all_systems()[0]
        start = load_start_structure(first.structure, first.vacuum)
        summary = Coordinator(campaign, run, apps, SLOTS, start, poll_s=0.2).run()
    finally:
        for executor in executors.values():
            executor.shutdown(wait=True, cancel_futures=True)
    return run, summary


@pytest.mark.timeout(400)
def test_short_campaign_labels_exactly_the_budget_and_learns(tmp_path):
    campaign = small_campaign()
    run, summary = run_campaign(tmp_path, campaign)

    assert summary["stop_reason"] == "label budget of 24 reached"
    assert summary["labels"] == 24
    assert summary["initial_labels"] == 8
    rows = list(connect(run.labels_db).select())
    assert len(rows) == 32
    ids = [row.candidate_id for row in rows]
    assert len(set(ids)) == len(ids), "no candidate is labelled twice"
    active = [row for row in rows if row.source == "active"]
    # Only frames the ensemble disagreed on were sent to the oracle.
    threshold = campaign.selection.threshold
    assert all(row.predicted_force_disagreement > threshold for row in active)

    events = [json.loads(line) for line in (run.root / "events.jsonl").read_text().splitlines()]
    assert {e["module"] for e in events} == set(MODULES)
    for event in events:
        if event["ok"]:
            assert event["submitted"] <= event["started"] <= event["ended"] <= event["returned"]

    assert summary["versions"] >= 2
    mae = [entry[2] for entry in summary["test_force_mae"]]
    # It learns: the last version has at most half the first one's error.
    assert len(mae) >= 2 and mae[-1] <= 0.5 * mae[0], mae
    assert set(summary["busy_fraction"]) == set(MODULES)
    assert json.loads((run.root / "summary.json").read_text())["labels"] == 24
    assert (run.root / "labels.extxyz").exists()
    assert (
        sorted(p.name for p in (run.root / "models").glob("ensemble.v*.pt"))[0]
        == "ensemble.v00001.pt"
    )


@pytest.mark.timeout(300)
def test_target_error_stops_the_campaign(tmp_path):
    campaign = small_campaign(stop__target_force_mae=50.0, stop__max_labels=1000)
    _, summary = run_campaign(tmp_path, campaign)
    assert summary["stop_reason"].startswith("test force MAE")
    assert summary["labels"] < 1000


@pytest.mark.timeout(300)
def test_wall_time_stop_finishes_in_flight_labels(tmp_path):
    campaign = small_campaign(stop__max_wall_s=8.0, stop__max_labels=10_000)
    run, summary = run_campaign(tmp_path, campaign)
    assert summary["stop_reason"].startswith("wall-time limit")
    # Every oracle batch that was submitted was harvested into the database.
    labelled = sum(1 for _ in connect(run.labels_db).select())
    submitted = sum(1 for _ in (run.root / "oracle").glob("batch*.in.npz"))
    harvested = sum(1 for _ in (run.root / "oracle").glob("batch*.out.npz"))
    assert submitted == harvested
    assert labelled == summary["labels"] + summary["initial_labels"]


@pytest.mark.timeout(300)
def test_training_goes_on_after_the_label_budget(tmp_path):
    campaign = small_campaign(stop__final_training_s=4.0)
    run, summary = run_campaign(tmp_path, campaign)
    assert summary["labels"] == 24
    stopped = summary["started_at"] + summary["stopped_at_s"]
    events = run.read_events()
    late_training = [e for e in events if e["kind"] == "train" and e["started"] > stopped]
    assert len(late_training) >= campaign.model.n_members
    assert not [
        e for e in events if e["kind"] in ("label", "generate") and e["submitted"] > stopped
    ]
    # The last version, published after the stop, holds the final training and is evaluated.
    assert summary["test_errors"][-1]["wall_s"] > summary["stopped_at_s"]
    assert summary["test_errors"][-1]["version"] == summary["versions"]
    # The summary says what the final training did: 4 s of it at least.
    final = summary["final_training"]
    assert final["limit_s"] == 4.0 and final["applied"] is True
    assert final["train_tasks"] == len([e for e in late_training if e["submitted"] > stopped])
    assert final["s"] >= 4.0, final


def test_final_training_s_says_whether_training_goes_on_after_a_stop(tmp_path):
    """``stop.final_training_s``: training goes on after a stop while less than that many
    seconds have passed since it, never after a wall-time stop."""
    from palflow.pipeline.engine.stopping import StopPolicy
    from palflow.pipeline.state.campaign_state import CampaignState

    start = load_start_structure(small_campaign().system.structure)
    for limit, stop, goes_on in (
        (0.0, "label budget of 24 reached", False),
        (30.0, "label budget of 24 reached", True),
        (30.0, "wall-time limit of 240 s reached", False),
    ):
        campaign = small_campaign(stop__final_training_s=limit)
        run = RunDirectory.create(tmp_path / f"run-{limit}-{stop[:4]}")
        state = CampaignState.new(campaign, run, start)
        state.t0 = time.time()
        policy = StopPolicy(campaign, state)
        state.request_stop(stop)
        assert policy.final_training() is goes_on, (limit, stop)


@pytest.mark.timeout(300)
def test_no_final_training_only_takes_in_the_last_labels(tmp_path):
    """``stop.final_training_s = 0``: after the stop each member trains at most once,
    on the last labels, and the last version, evaluated, holds every label."""
    campaign = small_campaign(stop__final_training_s=0.0)
    run, summary = run_campaign(tmp_path, campaign)
    assert summary["labels"] == 24
    final = summary["final_training"]
    assert final["limit_s"] == 0.0 and final["applied"] is True
    assert final["train_tasks"] <= campaign.model.n_members, final
    state = json.loads((run.root / "state.json").read_text())
    total = summary["labels"] + summary["initial_labels"]
    assert [m["trained_on"] for m in state["members"]] == [total] * campaign.model.n_members
    assert not any(m["fresh"] for m in state["members"]), "every member is in the last version"
    assert summary["test_errors"][-1]["version"] == summary["versions"]


@pytest.mark.timeout(300)
def test_a_module_can_stop_the_campaign(tmp_path):
    """A task that returns ``{"stop": reason}`` stops the run, like PAL's stop signal."""
    from palflow.apps.generator import _run_md

    calls = []

    def generator_that_gives_up(*args, **kwargs):
        result = _run_md(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            result["stop"] = "the walkers have explored enough"
        return result

    campaign = small_campaign(stop__max_labels=10_000)
    _, summary = run_campaign(tmp_path, campaign, generator=generator_that_gives_up)
    assert summary["stop_reason"] == "generator asked to stop: the walkers have explored enough"


def test_rolling_window_trains_on_the_newest_labels(tmp_path):
    from ase.calculators.singlepoint import SinglePointCalculator

    from palflow.apps.data.label_log import read_labelled
    from palflow.pipeline.state.campaign_state import CampaignState

    campaign = small_campaign(training__rolling_window=5, training__validation_fraction=0.0)
    start = load_start_structure(campaign.system.structure)
    state = CampaignState.new(campaign, RunDirectory.create(tmp_path / "run"), start)
    labelled = []
    for index in range(12):
        atoms = start.copy()
        atoms.calc = SinglePointCalculator(atoms, energy=float(index), forces=start.positions * 0)
        labelled.append(atoms)
    state.add_labels(labelled[:7], [{"candidate_id": i, "source": "initial"} for i in range(7)])
    state.add_labels(labelled[7:], [{"candidate_id": i, "source": "active"} for i in range(7, 12)])
    snapshot = read_labelled(state.train_snapshot.train)
    assert [a.get_potential_energy() for a in snapshot] == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert state.train_snapshot.n_labels == 12


@pytest.mark.timeout(300)
def test_an_unreadable_result_costs_its_task_not_the_run(tmp_path):
    """A generator result whose frames file is garbage: the walker resets, the run goes on."""
    from palflow.apps.generator import _run_md

    spoiled, lock = [], threading.Lock()

    def generator_with_a_torn_file(*args, **kwargs):
        result = _run_md(*args, **kwargs)
        walker = result["walkers"][0]
        with lock:  # two generator tasks may end together, in two threads: one spoils
            if not spoiled and walker["n_frames"]:
                Path(walker["output_path"]).write_bytes(b"PK\x03\x04 torn")
                spoiled.append(walker["output_path"])
        return result

    run, summary = run_campaign(tmp_path, small_campaign(), generator=generator_with_a_torn_file)
    assert spoiled
    assert summary["labels"] == 24
    unusable = [e for e in run.read_events() if "result unusable" in (e.get("error") or "")]
    assert len(unusable) == 1 and unusable[0]["kind"] == "generate"


@pytest.mark.timeout(300)
def test_random_selection_ignores_the_ensemble(tmp_path):
    """The baseline of the time-to-accuracy benchmark: with ``measure = "random"`` a
    threshold no frame reaches still lets frames through, and the queue is never
    re-scored by a newer ensemble."""
    campaign = small_campaign(
        selection__measure="random", selection__threshold=1e6, stop__max_labels=12
    )
    run, summary = run_campaign(tmp_path, campaign)
    assert summary["labels"] == 12
    assert not [e for e in run.read_events() if e["kind"] == "score"]
    with connect(run.path("labels.db")) as db:
        predicted = [
            row.key_value_pairs["predicted_force_disagreement"]
            for row in db.select(source="active")
        ]
    assert len(predicted) == 12 and max(predicted) < 1e6


def test_pacing_does_not_bank_the_allowance_of_versions_without_candidates():
    """Ten versions published while the queue was empty allow 2 labels, not 20: each
    version's allowance is for batches requested while it is the newest."""
    from types import SimpleNamespace

    from palflow.pipeline.engine.agents.oracle import OracleAgent

    versions = [SimpleNamespace(number=n) for n in range(1, 11)]
    state = SimpleNamespace(
        versions=versions, version=versions[-1], n_labels_active=0, pending_initial=[],
        active_by_system={}, label_room=lambda campaign, in_flight: 100,
    )  # fmt: skip
    in_flight, queue = [], [SimpleNamespace(system="s", candidate_id=i) for i in range(50)]
    context = SimpleNamespace(
        state=state,
        campaign=small_campaign(selection__max_labels_per_version=2, oracle__batch_size=1),
        engine=SimpleNamespace(free=lambda module: True, tasks=lambda kind=None: in_flight),
        queue=queue,
        selector=SimpleNamespace(pick_batch=lambda q, n: [q.pop(0) for _ in range(n)]),
    )
    agent = OracleAgent(context)
    agent.submit_batch = lambda batch, source: in_flight.append(
        SimpleNamespace(source=source, candidates=batch)
    )
    assert agent.submit_labels() == 2
    in_flight.clear()  # both labels stored, still under version 10
    state.n_labels_active = 2
    assert agent.submit_labels() == 0
    versions.append(SimpleNamespace(number=11))
    state.version = versions[-1]
    assert agent.submit_labels() == 2
    assert agent.submit_labels(paced=False) == 46  # unpaced (the serial loop): the rest


@pytest.mark.timeout(300)
def test_pacing_caps_labels_per_ensemble_version(tmp_path):
    """``max_labels_per_version``: labels never run ahead of the ensembles learning
    from them. A version publishes at most 2 labels more than the one before saw."""
    campaign = small_campaign(selection__max_labels_per_version=2, stop__max_labels=10)
    run, summary = run_campaign(tmp_path, campaign)
    assert summary["labels"] == 10
    versions = json.loads(Path(run.path("state.json")).read_text())["versions"]
    for version in versions:
        # Labels requested while k versions existed number at most 2·k.
        assert version["n_labels"] <= 2 * (version["number"] - 1), version
    assert len(versions) >= 6
