"""Mending the coordinator's own files on resume: ``state.json``, the walkers' last
frames, the held-out set, member checkpoints and ensemble versions (see
:mod:`palflow.pipeline.resume.mend`, which calls these in order)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from palflow.pipeline.resume.mend_base import (
    dataset_problem,
    highest_task_id,
    record_mend,
    structure_problem,
    why,
)
from palflow.pipeline.state.records import Member, Version, Walker
from palflow.pipeline.state.rundir import METRICS_FILE, STATE_FILE, RunDirectory


def _check_state(saved: Any) -> None:
    """Raise when ``saved`` is not a ``state.json`` that a resume can read."""
    if not isinstance(saved, dict):
        raise ValueError(f"it holds a {type(saved).__name__}, not an object")
    for key, kind in (("walkers", Walker), ("members", Member), ("versions", Version)):
        for record in saved.get(key, []):
            kind(**record)
    float(saved.get("elapsed_s", 0.0))
    int(saved.get("next_task_id", 0))
    int(saved.get("last_candidate_id", 0))
    for record in saved.get("test_errors", []):
        int(record["version"])
    {int(k): str(v) for k, v in dict(saved.get("task_failures", {})).items()}
    dict(saved.get("retried", {}))
    list(saved.get("resumes", []))


def mend_state(campaign: Any, run: RunDirectory, mends: list[str]) -> None:
    path = run.file(STATE_FILE)
    if not path.exists():
        if not run.oracle_batches():
            return  # killed before its first save: nothing to rebuild from yet
        problem = "is missing"
    else:
        try:
            _check_state(json.loads(path.read_text()))
            return
        except Exception as error:
            problem = f"does not read ({why(error)})"
    record_mend(
        run,
        mends,
        path,
        f"{STATE_FILE} {problem}: rebuilt from the journal (walkers "
        "from their newest MD frame, versions and held-out errors from metrics.jsonl, "
        "members from their checkpoints)",
    )
    run.write_state(rebuilt_state(campaign, run))


def rebuilt_state(campaign: Any, run: RunDirectory) -> dict[str, Any]:
    """What ``state.json`` held, as far as the other files tell it."""
    events = run.read_events()
    elapsed = max((e["returned"] for e in events), default=0.0) - min(
        (e["submitted"] for e in events), default=0.0
    )
    published = {number for number, _ in run.ensembles()}
    errors: dict[int, dict] = {}
    for record in run.read_jsonl(METRICS_FILE):
        if isinstance(record.get("version"), int) and record["version"] in published:
            errors[record["version"]] = record
    versions = [
        asdict(Version(n, run.ensemble(n), int(e.get("labels", 0)), float(e.get("wall_s", 0.0))))
        for n, e in sorted(errors.items())
    ]
    # Versions past the last one with a record are added, as on any resume, from models/.
    # (Numbered from 0 where the foundation was published as version 0.)
    first = 0 if versions and versions[0]["number"] == 0 else 1
    contiguous = [v for i, v in enumerate(versions, start=first) if v["number"] == i]
    return {
        "elapsed_s": elapsed,
        "next_task_id": max([highest_task_id(run), *(e["task"] for e in events)]) + 1,
        "walkers": [asdict(w) for w in rebuilt_walkers(campaign, run)],
        "versions": contiguous,
        "test_errors": [errors[v["number"]] for v in contiguous],
    }


def rebuilt_walkers(campaign: Any, run: RunDirectory) -> list:
    """The walkers as a new campaign lays them out, each moved on to its newest
    readable MD frame."""
    walkers = []
    for system in campaign.all_systems():
        homes = sorted(run.root.glob(f"system/{system.name}.start[0-9][0-9][0-9].extxyz"))
        homes = [str(p) for p in homes] or [run.start_structure]
        temperatures = system.temperatures_K or [None]
        for i in range(system.n_walkers or campaign.generator.n_walkers):
            home = homes[i % len(homes)]
            walker = Walker(
                len(walkers),
                home,
                system=system.name,
                home=home,
                temperature_K=temperatures[i % len(temperatures)],
            )
            frames = sorted(
                run.root.glob(f"generator/walker{walker.walker_id:03d}.seg*.last.extxyz")
            )
            for frame in reversed(frames):
                if not structure_problem(frame):
                    walker.start_path = str(frame)
                    walker.segments = int(frame.name.split(".seg")[1].split(".")[0])
                    break
            walkers.append(walker)
    return walkers


def mend_walker_frames(run: RunDirectory, mends: list[str]) -> None:
    """A walker whose last frame does not read goes home (the resume resets it)."""
    saved = run.read_state()
    for walker in saved.get("walkers", []):
        path = Path(run.own(walker["start_path"]))
        if path.exists() and path.is_relative_to(run.root / "generator"):
            problem = structure_problem(path)
            if problem:
                record_mend(
                    run,
                    mends,
                    path,
                    f"walker {walker['walker_id']}'s last frame "
                    f"{path.name} {problem}: the walker starts again from its home",
                )


def mend_test_sets(run: RunDirectory, mends: list[str]) -> None:
    for path in sorted(run.root.glob("data/test*.npz")):
        problem = dataset_problem(path)
        if problem:
            record_mend(
                run, mends, path, f"data/{path.name} {problem}: the held-out set is made again"
            )


# ---------------------------------------------------------------- checkpoints
def _loads(path: Path, members: int | None = None) -> tuple[Any, dict] | None:
    from palflow.apps.models.core import load_checkpoint

    try:
        model, extra = load_checkpoint(path, device="cpu")
    except Exception:
        return None
    if members is not None and model.n_members != members:
        return None
    return model, extra


def mend_checkpoints(campaign: Any, run: RunDirectory, mends: list[str]) -> None:
    """The newest ensemble version, and each member's newest checkpoint, must load."""
    from palflow.apps.models.core import save_checkpoint

    newest = None
    for number, path in reversed(run.ensembles()):
        newest = _loads(path)
        if newest is not None:
            break
        record_mend(
            run,
            mends,
            path,
            f"ensemble version {number} ({path.name}) does not load: "
            "dropped; the members publish it again",
        )
    saved = run.read_state()
    for record in saved.get("members", []) if isinstance(saved, dict) else []:
        path = Path(run.own(record.get("checkpoint") or "")) if isinstance(record, dict) else None
        if path and path.name and not path.exists():
            found = run.member_checkpoints(record.get("index", -1))
            back = f"goes back to {found[-1][1].name}" if found else "trains again from the start"
            record_mend(run, mends, None, f"member {record.get('index')}'s checkpoint "
                        f"{path.name} is missing: the member {back}")  # fmt: skip
    for index in range(campaign.model.n_members):
        found = run.member_checkpoints(index)
        if not found or _loads(found[-1][1], 1) is not None:
            continue
        task, damaged = found[-1]
        for _, older in reversed(found[:-1]):
            if _loads(older, 1) is not None:
                record_mend(
                    run,
                    mends,
                    damaged,
                    f"member {index}'s checkpoint {damaged.name} "
                    f"does not load: the member goes back to {older.name}",
                )
                break
        else:
            if newest is not None and newest[0].n_members == campaign.model.n_members:
                model, extra = newest
                epochs = list(extra.get("epochs", []))
                record_mend(
                    run,
                    mends,
                    damaged,
                    f"member {index}'s checkpoint {damaged.name} does "
                    "not load: the member goes back to its copy in the newest ensemble "
                    "version (its optimiser starts afresh)",
                )
                save_checkpoint(
                    damaged,
                    model.member(index),
                    {"epochs": int(epochs[index]) if index < len(epochs) else 0, "member": index},
                )
            else:
                record_mend(
                    run,
                    mends,
                    damaged,
                    f"member {index}'s checkpoint {damaged.name} does "
                    "not load and no earlier copy does: the member trains again from the "
                    "start",
                )
