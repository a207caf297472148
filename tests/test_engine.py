"""The engine on its own: slots, dispatch to agents, failures, observers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from palflow.pipeline.engine.core import Engine, TaskRecord


class Events:
    def __init__(self) -> None:
        self.lines: list[dict] = []

    def append_event(self, event: dict) -> None:
        self.lines.append(event)


class Outcomes:
    def __init__(self) -> None:
        self.succeeded: list[int] = []
        self.failed: list[int] = []

    def task_succeeded(self, task, result) -> None:
        self.succeeded.append(task.task_id)

    def task_failed(self, task, error) -> None:
        self.failed.append(task.task_id)


class Work(TaskRecord):
    kind = "train"


class Trainer:
    """Submits ``n`` tasks, one of which raises and one whose result is unusable."""

    kinds = ("train",)

    def __init__(self, engine: Engine, pool: ThreadPoolExecutor, n: int) -> None:
        self.engine, self.pool, self.n = engine, pool, n
        self.submitted = 0
        self.results: list[int] = []
        self.failures: list[str] = []
        self.most_in_flight = 0
        self.gate = threading.Event()

    def submit_ready(self, stopping: bool) -> None:
        while self.submitted < self.n and self.engine.free("train"):
            call = partial(self.pool.submit, self.work)
            self.engine.submit(Work(), call, number=self.submitted)
            self.submitted += 1
        self.most_in_flight = max(self.most_in_flight, self.engine.busy("train"))

    def work(self, number: int) -> dict:
        self.gate.wait(5)
        if number == 3:
            raise RuntimeError("task three fails")
        return {"number": number}

    def on_result(self, task, result) -> None:
        if result["number"] == 5:
            raise KeyError("no such field")
        self.results.append(result["number"])

    def on_failure(self, task, error) -> None:
        self.failures.append(str(error))


def test_the_engine_keeps_slots_and_routes_every_outcome():
    events, outcomes = Events(), Outcomes()
    engine = Engine({"train": 2}, events, outcomes, poll_s=0.05)
    seen = []
    engine.observers.append(seen.append)
    engine.observers.append(lambda _: 1 / 0)  # dropped after its first failure
    with ThreadPoolExecutor(4) as pool:
        agent = Trainer(engine, pool, n=8)
        engine.register(agent)

        def turn() -> bool:
            agent.submit_ready(stopping=False)
            agent.gate.set()
            return True

        engine.run(turn, subject="campaign")
    assert agent.most_in_flight == 2, "never more tasks in flight than the module's slots"
    assert sorted(agent.results) == [0, 1, 2, 4, 6, 7]
    assert len(agent.failures) == 2 and "task three fails" in agent.failures[0]
    assert sorted(outcomes.succeeded) == [0, 1, 2, 4, 6, 7]
    assert sorted(outcomes.failed) == [3, 5]
    ok = {e["task"]: e["ok"] for e in events.lines if e["ok"]}
    assert set(ok) == {0, 1, 2, 4, 5, 6, 7}  # 5 ran, then its result was unusable
    unusable = [e for e in events.lines if not e["ok"]]
    assert {e["task"] for e in unusable} == {3, 5}
    assert all(e["module"] == "train" for e in events.lines)
    assert engine.tasks() == [] and engine.busy_counts()["train"] == 0
    assert seen and set(seen) == {"campaign"} and len(engine.observers) == 1
