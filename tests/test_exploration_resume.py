"""Each exploring generator resumes after ``kill -9`` with its state: the phase of a
temperature schedule and the replica a walker holds (kept in its last frame), and
the hills of metadynamics (kept in their files)."""

import json
import os
import signal
import time

import numpy as np
import pytest
from ase.io import read

from palflow.apps.md.tempering import REPLICA_KEY, STEPS_KEY, schedule_factor
from tests.test_cli import small_campaign
from tests.test_resume import start_cli

SCHEDULE = [[0, 1.0], [400, 1.5]]
GENERATORS = {
    "biased_md": f'kind = "biased_md"\nbias_trust_level = 0.0\ntemperature_schedule = {SCHEDULE}\n',
    "metadynamics": (
        'kind = "metadynamics"\nhill_interval = 10\n'
        'collective_variables = [{kind = "distance", atoms = [0, 12], width = 0.2}]\n'
    ),
    "replica_exchange": 'kind = "replica_exchange"\ntemperature_ladder_K = [400.0, 500.0]\n',
}
STEPS_PER_TASK = 40  # tests.test_cli's small campaign


def campaign(tmp_path, kind):
    """The small copper campaign, cooler (400 K) and with no disagreement cap, so that
    walkers seldom reset and build up a state to lose."""
    path = small_campaign(tmp_path)
    text = path.read_text().replace("temperature_K = 800.0", "temperature_K = 400.0")
    text = text.replace("[generator]\n", "[generator]\nmax_force_disagreement = 1000.0\n"
                        + GENERATORS[kind])  # fmt: skip
    path.write_text(text.replace("max_labels = 12", "max_labels = 48"))
    return path


def walker_states(run_dir) -> dict[int, dict]:
    """Each walker's saved start frame (its MD steps and replica) and segments."""
    state = json.loads((run_dir / "state.json").read_text())
    found = {}
    for walker in state["walkers"]:
        info = read(walker["start_path"]).info
        found[walker["walker_id"]] = {
            "steps": int(info.get(STEPS_KEY, 0)),
            "replica": info.get(REPLICA_KEY),
            "segments": walker["segments"],
        }
    return found


def first_frames_after(run_dir, walker: int, moment: float):
    """The frames of the walker's first segment written after ``moment`` (or None)."""
    for path in sorted((run_dir / "generator").glob(f"walker{walker:03d}.seg*.npz")):
        if path.stat().st_mtime > moment:
            with np.load(path) as frames:
                return {key: frames[key] for key in frames.files} if len(frames["step"]) else None
    return None


def holds_a_state(run_dir, kind: str) -> bool:
    """Whether the run's saved state differs from a fresh start's."""
    walkers = walker_states(run_dir)
    if kind == "metadynamics":
        return any((run_dir / "generator" / "hills").glob("*.npz")) and any(
            w["steps"] > 0 for w in walkers.values()
        )
    if kind == "replica_exchange":  # walker 0 (the cold rung) holds replica 1
        return walkers[0]["replica"] == 1 and walkers[1]["replica"] == 0
    return any(w["steps"] > 0 for w in walkers.values())


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_an_exploring_generator_resumes_after_kill_9_with_its_state(tmp_path, kind):
    run_dir = tmp_path / "run"
    args = ("--site", "threads.py", "--quiet")
    process = start_cli(*args, "--campaign", str(campaign(tmp_path, kind)),
                        "--run-dir", str(run_dir))  # fmt: skip
    deadline = time.time() + 300
    # Kill once the saved state would be told apart from a fresh start: a walker
    # with a schedule's phase, hills in a file, or a ladder whose replicas have swapped.
    while time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
        try:
            if holds_a_state(run_dir, kind):
                break
        except (OSError, ValueError, KeyError):
            continue
    assert process.poll() is None, "the campaign ended before the kill: raise its budget"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = time.time()
    before = walker_states(run_dir)
    hills_dir = run_dir / "generator" / "hills"
    hills_before = {p.name: np.load(p)["centres"] for p in hills_dir.glob("*.npz")}
    time.sleep(1.1)  # file times of the resumed run's segments come after killed_at

    process = start_cli(*args, "--resume", str(run_dir))
    output = process.communicate(timeout=400)[0].decode()
    assert process.returncode == 0, output[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumes"]
    first = {w: first_frames_after(run_dir, w, killed_at) for w in before}
    # The walkers that held a state at the kill and recorded a frame after the resume.
    checked = [w for w, f in first.items() if f is not None and before[w]["steps"] > 0]
    assert checked, (before, first)
    for walker in checked:
        frames = first[walker]
        step = int(frames["step"][0])  # the first recorded frame's step in its segment
        if kind == "biased_md":  # the schedule goes on from the saved phase, not from 0
            assert before[walker]["steps"] > 0
            factor = schedule_factor(SCHEDULE, before[walker]["steps"] + step - 1)
            assert frames["temperature_K"][0] == pytest.approx(400.0 * factor), walker
        if kind == "replica_exchange":  # before any exchange: the replica it held
            assert int(frames["replica"][0]) == before[walker]["replica"], walker
        if kind == "metadynamics":  # the saved hills push from the first frame on
            assert frames["bias_energy"][0] > 0, walker
    if kind == "metadynamics":
        assert hills_before, "hills were saved before the kill"
        for name, centres in hills_before.items():
            after = np.load(hills_dir / name)["centres"]
            assert np.array_equal(after[: len(centres)], centres), f"{name} lost hills"
            assert len(after) > len(centres), f"{name}: the resumed run added hills"
    if kind == "replica_exchange":
        assert sorted(s["replica"] for s in before.values()) == [0, 1]
        assert sorted(s["replica"] for s in walker_states(run_dir).values()) == [0, 1]
