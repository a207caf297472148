"""Stable training (issue 25): every goal of the issue, before and after the change, in one run.

    python benchmarks/stability.py                  # the full protocol: 3 campaigns x 5 seeds
    python benchmarks/stability.py --campaigns cu_emt --seeds 0 --max-wall-s 60
    python benchmarks/stability.py --quick          # the test suite's tiny protocol

Campaigns, by short name (``--campaigns``): ``default`` (what ``palflow run --site
laptop.py`` runs without ``--campaign``: ethanol with GFN2-xTB), ``cu_emt``
(``examples/cu_emt.toml``) and ``water_tblite`` (``examples/water_tblite.toml``).
Each side reads its own copy of the campaign file, so settings added by the change
never reach the old code.

**Before and after, interleaved.** "After" is this checkout, as it is (uncommitted
changes included), or ``--after REV`` checked out like the before side (then this
checkout may change while the benchmark runs). "Before" is ``--before`` (default
``664585e``, the last commit before issue 25), checked out with ``git worktree add
--detach`` into the work folder and removed at the end. For each seed, for each
campaign, the two sides run back to back, one at a time (the before side first for
even seed positions, the after side first for odd ones), each as its own ``python -m
palflow.pipeline.cli run --site SITE --campaign FILE --run-dir DIR`` subprocess. The
campaign file is the side's example with ``seed`` set, and ``--max-wall-s`` /
``--max-labels`` capping ``stop.max_wall_s`` / ``stop.max_labels`` where given, for
every campaign (``150``) or for one (``water_tblite=150``); a cap never raises a
budget.

**How the before side imports the old code.** palflow is installed editable, under
the one name ``palflow`` (``palflow.pipeline`` -> ``pipeline/`` and so on), by a
finder that setuptools appends to ``sys.meta_path``: after Python's own path finder.
The before side's ``PYTHONPATH`` starts with a folder holding ``palflow/`` (no
``__init__.py``: a namespace portion) whose ``pipeline``, ``apps`` and
``site_configs`` are symbolic links into the worktree. ``palflow`` then resolves to
that portion, and its subpackages to the worktree, before the editable finder is
asked; Parsl's interchanges and workers inherit the environment. To check it, both
sides' ``PYTHONPATH`` also holds a ``sitecustomize.py`` that makes every Python
process of a run (the coordinator, Parsl's interchanges and workers, the energy
evaluation) append where ``palflow.pipeline`` resolves to a probe file; each run
records which code its processes imported (``code``: ``before worktree``, ``after
worktree`` or ``this checkout``, and the count of processes), and the benchmark stops
before any run when a side does not import its own code.

**What each run yields** (from ``metrics.jsonl``, one row per ensemble version with
held-out *test* errors, and ``events.jsonl``):

- ``n_versions``; ``regressions``: the versions whose test force MAE exceeds 1.25x
  the best force MAE of the versions before them, their count and their share of
  ``n_versions``;
- ``last_over_best``: the last version's force MAE over the best version's;
- ``final_energy_mae_per_atom`` (test, eV/atom, the last version), and
  ``final_energy_mae_per_atom_offset_removed``: the last ensemble file
  (``models/ensemble.vNNNNN.pt``) evaluated on the run's held-out set
  (``data/test.npz``) by the side's own code in a subprocess, per-atom energy errors
  less their mean; ``max_energy_step_ratio``: the largest test energy MAE of a
  version over the one before it;
- ``publication_rate``: published training tasks over finished ones (``kind ==
  "train"``, ``ok``; a task whose result was then found unusable is not finished).
  Old runs' events carry no ``published``: every finished task published;
- ``final_force_mae``, ``final_wall_s`` (the last version's, s since the campaign's
  start) and ``final_labels``.

Per campaign and seed, the two sides' curves are compared on one window:

- ``force_mae_area``: the test force MAE against wall time, linear between versions,
  integrated by trapezoids from the later of the two runs' first versions to the
  earlier of their last versions, divided by that window (a time-averaged MAE, eV/Å;
  None when a run has fewer than two versions or the window is empty);
- ``time_to_before_final_s``: the wall time of each side's first version at or below
  the before run's final force MAE (None: never);
- ``force_mae_at_before_final_wall``: the force MAE of each side's newest version
  published by the before run's final wall time.

**Goals** (for the after side; ``pass`` is None where a campaign or side is
missing; a campaign with a failed after run fails):

- ``regressions``: no regression in at least ceil(0.8 x seeds) seeds (4 of 5), and
  ``regression_share`` at most 0.01 in every seed;
- ``last_version``: ``last_over_best`` at most 1.05 in every seed;
- ``energy``: the median ``final_energy_mae_per_atom`` at most 0.5x the before
  side's median, and ``max_energy_step_ratio`` at most 2 in every seed (the same
  comparison offset-removed is reported beside it, not judged);
- ``publication``: ``publication_rate`` at least 0.5 in every seed, and the median
  over seeds of after's ``force_mae_area`` over before's at most 1;
- ``accuracy_per_time`` (default campaign only): the median
  ``force_mae_at_before_final_wall`` at most 0.020 eV/Å, and the median
  ``time_to_before_final_s`` not above the before side's (never: infinite).

Every run is kept, a failed or timed-out one with its error. Writes
``benchmarks/results/stability.json`` and ``stability.png`` (``PALFLOW_BENCH_OUT``
elsewhere).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import numpy as np

logger = logging.getLogger(__name__)

common.use_this_interpreter()

ROOT = common.ROOT
NAME = "stability"
CAMPAIGNS: dict[str, str | None] = {
    "default": None,
    "cu_emt": "examples/cu_emt.toml",
    "water_tblite": "examples/water_tblite.toml",
}
SIDES = ("before", "after")
BEFORE = "664585e"
"""The last commit before issue 25."""
PACKAGES = ("pipeline", "apps", "site_configs")
REGRESSION = 1.25
QUICK = {
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
    "stop__final_training_s": 0.0,
}
"""``--quick``'s campaign overrides (``tests/test_coordinator.py``'s small campaign):
settings the old code knows too."""
QUICK_BUDGET = {"campaigns": ["cu_emt"], "seeds": [0], "max_labels": 16, "max_wall_s": 30.0}
"""``--quick``'s protocol, where its options are not given."""
FULL_BUDGET = {"campaigns": list(CAMPAIGNS), "seeds": [0, 1, 2, 3, 4]}
PROBE = "PALFLOW_STABILITY_PROBE"
SITECUSTOMIZE = '''"""Record where palflow.pipeline resolves in every Python process."""
import os

if os.environ.get("PALFLOW_STABILITY_PROBE"):
    try:
        import importlib.util
        import json
        import sys

        _spec = importlib.util.find_spec("palflow.pipeline")
        _line = {
            "pid": os.getpid(),
            "argv": [os.path.basename(a)[:40] for a in getattr(sys, "orig_argv", [])[:3]],
            "pipeline": _spec.origin if _spec is not None else None,
        }
    except Exception as _error:  # the probe must never stop a process
        _line = {"pid": os.getpid(), "error": repr(_error)}
    with open(os.environ["PALFLOW_STABILITY_PROBE"], "a") as _file:
        _file.write(json.dumps(_line) + "\\n")
'''
IMPORTS = """import json, palflow.pipeline, palflow.apps, palflow.site_configs
names = ("pipeline", "apps", "site_configs")
print(json.dumps({n: list(getattr(palflow, n).__path__) for n in names}))
"""
EVALUATE = """import json, sys
import numpy as np
import torch
from palflow.apps.data.dataset import read_dataset
from palflow.apps.models.calculator import predict_structures
from palflow.apps.models.core import load_checkpoint
torch.set_num_threads(1)
model, extra = load_checkpoint(sys.argv[1])
frames = read_dataset(sys.argv[2])
energy = predict_structures(model, frames)["energy"]
errors = np.array([(e - a.get_potential_energy()) / len(a) for e, a in zip(energy, frames)])
print(json.dumps({
    "evaluated_version": int(extra.get("version", -1)),
    "n_test": len(frames),
    "evaluated_energy_mae_per_atom": float(np.abs(errors).mean()),
    "final_energy_offset_per_atom": float(errors.mean()),
    "final_energy_mae_per_atom_offset_removed": float(np.abs(errors - errors.mean()).mean()),
}))
"""
"""Run with a side's environment: the last version's energy errors on the held-out set."""


# ------------------------------------------------------------------ the two sides
@dataclass
class Side:
    """One side of the comparison: the checkout whose code it runs, and how."""

    name: str
    root: Path
    commit: str
    pythonpath: list[str]

    def env(self, probe: Path | None = None) -> dict[str, str]:
        """The environment of this side's subprocesses (``probe``: the probe file)."""
        env = {k: v for k, v in os.environ.items() if k != PROBE}
        inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, *inherited])
        if probe is not None:
            env[PROBE] = str(probe)
        return env


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def code_sha1(root: Path) -> str:
    """A hash of every ``.py`` file of the installed folders of ``root``."""
    digest = hashlib.sha1()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def make_sides(before: str, after: str | None, work: Path) -> dict[str, Side]:
    """Check ``before`` (and ``after``, where given) out as worktrees and build both
    sides' import paths; without ``after`` the after side is this checkout, as it is."""
    probe = work / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(SITECUSTOMIZE)
    sides = {}
    for name, rev in (("before", before), ("after", after)):
        if rev is None:
            sides[name] = Side(name, ROOT, git("rev-parse", "HEAD"), [str(probe)])
            continue
        commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
        tree = work / name
        git("worktree", "add", "--detach", str(tree), commit)
        shim = work / f"shim-{name}" / "palflow"
        shim.mkdir(parents=True)
        for package in PACKAGES:
            (shim / package).symlink_to(tree / package, target_is_directory=True)
        sides[name] = Side(name, tree, commit, [str(shim.parent), str(probe)])
    return sides


def code_label(path: str | None, sides: dict[str, Side]) -> str:
    """Which side's code a ``palflow.pipeline`` location belongs to."""
    if path is None:
        return "not found"
    where = Path(path).resolve()
    for side in sides.values():
        if where.is_relative_to(side.root.resolve() / "pipeline"):
            return expected(side)
    return "elsewhere"


def expected(side: Side) -> str:
    """The code label a side's processes must show."""
    return "this checkout" if side.root == ROOT else f"{side.name} worktree"


def check_imports(sides: dict[str, Side]) -> dict[str, dict]:
    """Import palflow with each side's environment; stop unless each imports its own code."""
    facts = {}
    for name, side in sides.items():
        done = subprocess.run(
            [sys.executable, "-c", IMPORTS],
            env=side.env(),
            cwd=side.root.parent,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"{name}: palflow does not import: {done.stderr[-2000:]}")
        paths = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: palflow.pipeline.__path__ = {paths['pipeline']}", flush=True)
        resolved = {
            package: [str(Path(p).resolve()) for p in found] for package, found in paths.items()
        }
        for package, found in resolved.items():
            if found != [str((side.root / package).resolve())]:
                raise SystemExit(f"{name}: palflow.{package} resolves to {found}, not {side.root}")
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=side.root, capture_output=True, text=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", *PACKAGES],
                cwd=side.root,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
        facts[name] = {
            "commit": side.commit,
            "head_of_code_root": head,
            "uncommitted_changes": dirty,
            "code_sha1": code_sha1(side.root),
            "imports": expected(side),
        }
    if facts["before"]["code_sha1"] == facts["after"]["code_sha1"]:
        logger.warning("before and after import identical code")
    return facts


def probed(probe: Path, sides: dict[str, Side]) -> dict:
    """Which code the processes of one run imported, from its probe file."""
    lines = []
    if probe.exists():
        lines = [json.loads(line) for line in probe.read_text().splitlines() if line.strip()]
    labels = sorted({code_label(line.get("pipeline"), sides) for line in lines})
    programs = sorted({program(line.get("argv", [])) for line in lines})
    return {"processes": len(lines), "imported": labels, "programs": programs}


def program(argv: list[str]) -> str:
    """What a probed process ran: ``-m MODULE``, ``SCRIPT.py`` or ``-c``."""
    if len(argv) > 2 and argv[1] == "-m":
        return f"-m {argv[2]}"
    return next((a for a in argv[1:] if a.endswith(".py") or a == "-c"), " ".join(argv[1:2]))


# ------------------------------------------------------------------ campaign files
def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if math.isfinite(value) else ("nan" if value != value else "inf")
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(data: dict) -> str:
    """A campaign's settings as TOML: top-level keys, ``[section]`` tables and
    ``[[systems]]``; deeper tables inline."""
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict | list)]
    lines += [
        f"{k} = {toml_value(v)}"
        for k, v in data.items()
        if isinstance(v, list) and not (v and all(isinstance(i, dict) for i in v))
    ]
    for key, value in data.items():
        tables = [value] if isinstance(value, dict) else None
        if isinstance(value, list) and value and all(isinstance(i, dict) for i in value):
            tables = value
        for table in tables or []:
            lines.append(f"\n[{key}]" if isinstance(value, dict) else f"\n[[{key}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def stop_default(key: str) -> float:
    from palflow.pipeline.config.sections import StopSettings

    return StopSettings.model_fields[key].default


def write_campaign(side: Side, campaign: str, seed: int, args, folder: Path) -> tuple[Path, dict]:
    """The side's campaign file with the seed and caps, in ``folder`` beside links to
    what the original's folder holds (its relative paths keep working)."""
    folder.mkdir(parents=True)
    data: dict[str, Any] = {}
    source = CAMPAIGNS[campaign]
    if source is not None:
        original = side.root / source
        data = tomllib.loads(original.read_text())
        for entry in original.parent.iterdir():
            if entry.name != original.name:
                (folder / entry.name).symlink_to(entry)
    data["seed"] = seed
    overrides = dict(QUICK) if args.quick else {}
    stop = data.get("stop", {})
    for key, caps in (("max_wall_s", args.max_wall_s), ("max_labels", args.max_labels)):
        cap = caps.get(campaign, caps.get("*")) if caps else None
        if cap is not None:
            overrides[f"stop__{key}"] = min(stop.get(key, stop_default(key)), cap)
    for dotted, value in overrides.items():
        *sections, key = dotted.split("__")
        target = data
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value
    path = folder / "campaign.toml"
    path.write_text(to_toml(data))
    return path, data


# ------------------------------------------------------------------ one run
def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a torn line is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


CURVE_KEYS = (
    "version",
    "labels",
    "wall_s",
    "force_mae",
    "energy_mae_per_atom",
    "val_force_mae",
    "val_energy_mae_per_atom",
    "held_back",
    "n_validation",
)


def read_run(run_dir: Path) -> dict:
    """The learning curve and the training tasks of a run directory."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    # Rows of versions the inference slot skipped (``evaluated`` false) hold no errors.
    metrics = sorted(
        (row for row in rows if row.get("evaluated", True)), key=lambda row: row["version"]
    )
    curve = [{key: row.get(key) for key in CURVE_KEYS} for row in metrics]
    train = [e for e in read_jsonl(run_dir / "events.jsonl") if e.get("kind") == "train"]
    unusable = {e.get("task") for e in train if not e.get("ok")}
    finished = [e for e in train if e.get("ok") and e.get("task") not in unusable]
    gates: dict[str, int] = {}
    for event in finished:
        gate = str(event.get("gate", "none recorded"))
        gates[gate] = gates.get(gate, 0) + 1
    summary = {}
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "curve": curve,
        "n_ensembles": len(list(run_dir.glob("models/ensemble.v*.pt"))),
        "train_finished": len(finished),
        "train_published": sum(bool(e.get("published", True)) for e in finished),
        "events_record_published": any("published" in e for e in finished),
        "gates": gates,
        "stop_reason": summary.get("stop_reason"),
        "summary_wall_s": summary.get("wall_s"),
        "labels": summary.get("labels"),
    }


def evaluate_energy(side: Side, run_dir: Path, version: int, probe: Path) -> dict:
    """The last version's energy errors on the run's held-out set, by the side's code."""
    ensemble = run_dir / "models" / f"ensemble.v{version:05d}.pt"
    test = run_dir / "data" / "test.npz"
    done = subprocess.run(
        [sys.executable, "-c", EVALUATE, str(ensemble), str(test)],
        env=side.env(probe),
        cwd=run_dir.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return {"energy_evaluation_error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def run_one(side: Side, campaign: str, seed: int, args, work: Path, sides) -> dict:
    """Run one campaign with one seed on one side, as a CLI subprocess; never raises."""
    folder = work / "runs" / f"{campaign}-seed{seed}-{side.name}"
    record: dict[str, Any] = {"campaign": campaign, "seed": seed, "side": side.name}
    try:
        toml, data = write_campaign(side, campaign, seed, args, folder / "campaign")
        stop = data.get("stop", {})
        wall = stop.get("max_wall_s", stop_default("max_wall_s"))
        record["max_wall_s"] = wall
        record["max_labels"] = stop.get("max_labels", stop_default("max_labels"))
        timeout = args.timeout or 1.5 * wall + 300
        run_dir, probe, log = folder / "run", folder / "probe.jsonl", folder / "palflow.out"
        command = [
            *(sys.executable, "-m", "palflow.pipeline.cli", "run", "--site", args.site),
            *("--campaign", str(toml), "--run-dir", str(run_dir), "--quiet"),
        ]
        started = time.perf_counter()
        with log.open("w") as out:
            process = subprocess.Popen(
                command,
                cwd=folder,
                env=side.env(probe),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for a timeout
            )
            try:
                exit_code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_group(process)
                exit_code = None
        record.update(
            exit_code=exit_code,
            process_wall_s=time.perf_counter() - started,
            log=str(log),
            run_dir=str(run_dir),
        )
        record["ok"] = exit_code == 0
        if exit_code is None:
            record["error"] = f"timed out after {timeout:.0f} s: {last_line(log)}"
        elif exit_code != 0:
            record["error"] = f"exit {exit_code}: {last_line(log)}"
        record.update(read_run(run_dir))
        if record["curve"]:
            version = record["curve"][-1]["version"]
            record.update(evaluate_energy(side, run_dir, version, probe))
        record["code"] = probed(probe, sides)
    except Exception as error:  # a broken run is recorded, never dropped
        logger.exception("%s seed %d %s failed", campaign, seed, side.name)
        record.update(ok=False, error=f"{type(error).__name__}: {error}")
    record.setdefault("curve", [])
    record.update(run_stats(record))
    return record


def stop_group(process: subprocess.Popen) -> None:
    """Stop a timed-out run and everything it started (its process group)."""
    for sent, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sent)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------ analysis
def run_stats(run: dict) -> dict:
    """What one run's curve and training tasks say on their own."""
    curve = [p for p in run.get("curve", []) if p.get("force_mae") is not None]
    forces = [p["force_mae"] for p in curve]
    energies = [p.get("energy_mae_per_atom") for p in curve]
    regressions = [
        p["version"]
        for i, p in enumerate(curve)
        if i and p["force_mae"] > REGRESSION * min(forces[:i])
    ]
    steps = [
        (b / a, curve[i + 1]["version"])
        for i, (a, b) in enumerate(zip(energies, energies[1:], strict=False))
        if a and b is not None
    ]
    finished = run.get("train_finished", 0)
    return {
        "n_versions": len(curve),
        "regressions": regressions,
        "n_regressions": len(regressions),
        "regression_share": len(regressions) / len(curve) if curve else None,
        "last_over_best": forces[-1] / min(forces) if forces and min(forces) > 0 else None,
        "final_force_mae": forces[-1] if forces else None,
        "final_wall_s": curve[-1]["wall_s"] if curve else None,
        "final_labels": curve[-1]["labels"] if curve else None,
        "final_energy_mae_per_atom": energies[-1] if energies else None,
        "max_energy_step_ratio": max(steps)[0] if steps else None,
        "max_energy_step_at_version": max(steps)[1] if steps else None,
        "publication_rate": run.get("train_published", 0) / finished if finished else None,
    }


def time_to(curve: list[dict], target: float | None) -> float | None:
    """Wall time of the first version at or below ``target`` (None: never)."""
    if target is None:
        return None
    return next((p["wall_s"] for p in curve if p["force_mae"] <= target), None)


def mae_at(curve: list[dict], wall_s: float | None) -> float | None:
    """Force MAE of the newest version published by ``wall_s``."""
    if wall_s is None:
        return None
    done = [p for p in curve if p["wall_s"] <= wall_s]
    return done[-1]["force_mae"] if done else None


def area(curve: list[dict], start: float, end: float) -> float | None:
    """Force MAE averaged over [start, end] s, linear between versions (trapezoids)."""
    if end <= start or len(curve) < 2:
        return None
    times = [p["wall_s"] for p in curve]
    values = [p["force_mae"] for p in curve]
    points = [start, *(t for t in times if start < t < end), end]
    heights = np.interp(points, times, values)
    total = sum(
        (b - a) * (ya + yb) / 2
        for a, b, ya, yb in zip(points, points[1:], heights, heights[1:], strict=False)
    )
    return float(total / (end - start))


def pair_stats(before: dict, after: dict) -> None:
    """Compare one seed's two runs of a campaign on one window; fields go to each run."""
    curves = {"before": before["curve"], "after": after["curve"]}
    start = end = None
    if all(len(c) >= 2 for c in curves.values()):
        start = max(c[0]["wall_s"] for c in curves.values())
        end = min(c[-1]["wall_s"] for c in curves.values())
    target, wall = before["final_force_mae"], before["final_wall_s"]
    for run, curve in ((before, curves["before"]), (after, curves["after"])):
        run["area_window_s"] = [start, end] if start is not None else None
        run["force_mae_area"] = area(curve, start, end) if start is not None else None
        run["time_to_before_final_s"] = time_to(curve, target)
        run["force_mae_at_before_final_wall"] = mae_at(curve, wall)


SUMMARISED = (
    "n_versions",
    "n_regressions",
    "regression_share",
    "last_over_best",
    "final_force_mae",
    "final_wall_s",
    "final_energy_mae_per_atom",
    "final_energy_mae_per_atom_offset_removed",
    "max_energy_step_ratio",
    "publication_rate",
    "force_mae_area",
    "time_to_before_final_s",
    "force_mae_at_before_final_wall",
)


def spread(values: list) -> dict:
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": statistics.median(known),
        "min": min(known),
        "max": max(known),
        "n": len(known),
    }


def median_or_inf(values: list) -> float:
    """The median, None counting as infinite (a target never reached)."""
    return statistics.median(math.inf if v is None else v for v in values) if values else math.nan


def analyse(runs: list[dict]) -> dict:
    """Per-run, paired, per campaign and side, and the goals."""
    for run in runs:
        run.update(run_stats(run))
    by = {(r["campaign"], r["seed"], r["side"]): r for r in runs}
    for (campaign, seed, side), run in by.items():
        if side == "before" and (campaign, seed, "after") in by:
            pair_stats(run, by[(campaign, seed, "after")])
    campaigns = {}
    for campaign in dict.fromkeys(r["campaign"] for r in runs):
        campaigns[campaign] = {}
        for side in SIDES:
            mine = [r for r in runs if r["campaign"] == campaign and r["side"] == side]
            good = [r for r in mine if r.get("ok")]
            campaigns[campaign][side] = {
                "runs": len(mine),
                "failed": [
                    {"seed": r["seed"], "error": r.get("error")} for r in mine if not r.get("ok")
                ],
                "per_seed": {k: {str(r["seed"]): r.get(k) for r in good} for k in SUMMARISED},
                "spread": {k: spread([r.get(k) for r in good]) for k in SUMMARISED},
            }
    return {"campaigns": campaigns, "goals": goals(runs, campaigns), "primary": primary(runs)}


def primary(runs: list[dict]) -> dict:
    """The primary comparison (:data:`TARGETS`): per campaign, the paired ratios
    after/before of the force-MAE area, their median, a bootstrap 95% interval of the
    median over seeds (10,000 resamples of the seeds) and the exact Wilcoxon
    signed-rank test of after - before (two-sided). A seed whose pair lacks an area
    (a failed run, fewer than two versions) counts as a loss of the after side, with
    ratio infinity: it is never dropped."""
    from scipy.stats import wilcoxon

    out = {}
    for campaign in dict.fromkeys(r["campaign"] for r in runs):
        pairs = {}
        for run in runs:
            if run["campaign"] == campaign:
                pairs.setdefault(run["seed"], {})[run["side"]] = run.get("force_mae_area")
        ratios, differences = [], []
        for seed in sorted(pairs):
            before, after = pairs[seed].get("before"), pairs[seed].get("after")
            if before and after:
                ratios.append(after / before)
                differences.append(after - before)
            else:
                ratios.append(math.inf)
        rng = np.random.default_rng(0)
        medians = np.median(rng.choice(np.asarray(ratios), (10_000, len(ratios))), axis=1)
        test = wilcoxon(differences) if len(differences) >= 2 and any(differences) else None
        out[campaign] = {
            "ratios": ratios,
            "median": float(np.median(ratios)),
            "interval_95": [float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975))],
            "seeds": len(ratios),
            "wilcoxon_p": None if test is None else float(test.pvalue),
            "goal": "median <= 1",
            "pass": bool(np.median(ratios) <= 1.0),
        }
    return out


def goals(runs: list[dict], campaigns: dict) -> dict:
    """Each goal of the issue, per campaign, with its numbers and a verdict."""

    def side_runs(campaign: str, side: str) -> list[dict]:
        """Every run of a side with a curve: a run that failed after publishing versions
        counts with its numbers (its campaign still fails its goals), as in the primary
        comparison, so that every figure is over the same seeds."""
        return [
            r
            for r in runs
            if r["campaign"] == campaign and r["side"] == side and (r.get("ok") or r["curve"])
        ]

    def failed(campaign: str) -> bool:
        return any(
            not r.get("ok") for r in runs if r["campaign"] == campaign and r["side"] == "after"
        )

    def values(group: list[dict], key: str) -> list:
        return [r.get(key) for r in group]

    def regressions(before, after) -> dict:
        zero = sum(r["n_regressions"] == 0 for r in after)
        shares = [s for s in values(after, "regression_share") if s is not None]
        need = math.ceil(0.8 * len(after))
        return {
            "seeds": len(after),
            "seeds_without_regression": zero,
            "seeds_needed": need,
            "max_regression_share": max(shares, default=None),
            "before_seeds_without_regression": sum(r["n_regressions"] == 0 for r in before),
            "before_max_regression_share": max(values(before, "regression_share"), default=None),
            "pass": zero >= need and bool(shares) and max(shares) <= 0.01,
        }

    def last_version(before, after) -> dict:
        ratios = [v for v in values(after, "last_over_best") if v is not None]
        return {
            "after": spread(ratios),
            "before": spread(values(before, "last_over_best")),
            "pass": bool(ratios) and len(ratios) == len(after) and max(ratios) <= 1.05,
        }

    def energy(before, after) -> dict:
        result = {}
        for key in ("final_energy_mae_per_atom", "final_energy_mae_per_atom_offset_removed"):
            mine, theirs = spread(values(after, key)), spread(values(before, key))
            ratio = None
            if mine["median"] is not None and theirs["median"]:
                ratio = mine["median"] / theirs["median"]
            result[key] = {"after": mine, "before": theirs, "median_ratio": ratio}
        steps = values(after, "max_energy_step_ratio")
        result["max_energy_step_ratio"] = {
            "after": spread(steps),
            "before": spread(values(before, "max_energy_step_ratio")),
        }
        ratio = result["final_energy_mae_per_atom"]["median_ratio"]
        known = [s for s in steps if s is not None]
        result["offset_removed_within_half"] = (
            result["final_energy_mae_per_atom_offset_removed"]["median_ratio"] or math.inf
        ) <= 0.5
        result["pass"] = ratio is not None and ratio <= 0.5 and bool(known) and max(known) <= 2.0
        return result

    def publication(before, after) -> dict:
        rates = [v for v in values(after, "publication_rate") if v is not None]
        pairs = {r["seed"]: r.get("force_mae_area") for r in before}
        ratios = [
            r["force_mae_area"] / pairs[r["seed"]]
            for r in after
            if r.get("force_mae_area") is not None and pairs.get(r["seed"])
        ]
        median_ratio = statistics.median(ratios) if ratios else None
        return {
            "publication_rate": spread(rates),
            "before_publication_rate": spread(values(before, "publication_rate")),
            "force_mae_area": spread(values(after, "force_mae_area")),
            "before_force_mae_area": spread(values(before, "force_mae_area")),
            "area_ratio_per_seed": ratios,
            "median_area_ratio": median_ratio,
            "pass": bool(rates)
            and min(rates) >= 0.5
            and median_ratio is not None
            and median_ratio <= 1.0,
        }

    def accuracy_per_time(before, after) -> dict:
        at_wall = spread(values(after, "force_mae_at_before_final_wall"))
        mine = median_or_inf(values(after, "time_to_before_final_s"))
        theirs = median_or_inf(values(before, "time_to_before_final_s"))
        return {
            "force_mae_at_before_final_wall": at_wall,
            "final_force_mae": spread(values(after, "final_force_mae")),
            "before_final_force_mae": spread(values(before, "final_force_mae")),
            "before_final_wall_s": spread(values(before, "final_wall_s")),
            "median_time_to_before_final_s": mine,
            "before_median_time_to_before_final_s": theirs,
            "pass": at_wall["median"] is not None and at_wall["median"] <= 0.020 and mine <= theirs,
        }

    judges = {
        "regressions": (regressions, None),
        "last_version": (last_version, None),
        "energy": (energy, None),
        "publication": (publication, None),
        "accuracy_per_time": (accuracy_per_time, ("default",)),
    }
    result = {}
    for goal, (judge, only) in judges.items():
        verdicts = {}
        for campaign in only or tuple(CAMPAIGNS):
            before, after = side_runs(campaign, "before"), side_runs(campaign, "after")
            if not before or not after:
                verdicts[campaign] = {"pass": None, "why": "not run on both sides"}
                continue
            verdicts[campaign] = judge(before, after)
            if failed(campaign):
                verdicts[campaign].update({"pass": False, "why": "an after run failed"})
        passes = [v["pass"] for v in verdicts.values()]
        overall = None if None in passes else all(passes)
        result[goal] = {"pass": overall, "campaigns": verdicts}
    return result


# ------------------------------------------------------------------ output
def describe(run: dict) -> str:
    head = f"{run['campaign']:<13} seed {run['seed']} {run['side']:<6}:"
    if not run.get("ok"):
        head += f" FAILED ({run.get('error')});"
    wall = run.get("process_wall_s")
    mae = run.get("final_force_mae")
    return (
        f"{head} {run.get('n_versions', 0)} versions, wall {common.show(wall, '.0f')} s, "
        f"final force MAE {common.show(mae, '.4f')} eV/Å, "
        f"publication {common.show(run.get('publication_rate'), '.2f')}"
    )


def report(result: dict) -> None:
    rows = []
    for campaign, sides in result["campaigns"].items():
        for side, table in sides.items():
            row = {k: v["median"] for k, v in table["spread"].items()}
            rows.append({**row, "name": f"{campaign} {side}", "failed": len(table["failed"])})
    columns = [
        ("campaign side", "<22", common.cell("name")),
        ("failed", ">7", common.cell("failed")),
        ("versions", ">9", common.cell("n_versions", ".0f")),
        ("regr.", ">6", common.cell("n_regressions", ".0f")),
        ("last/best", ">10", common.cell("last_over_best", ".2f")),
        ("final F MAE", ">12", common.cell("final_force_mae", ".4f")),
        ("E meV/at", ">9", lambda r: common.show(scale(r.get("final_energy_mae_per_atom")), ".2f")),
        (
            "E-offset",
            ">9",
            lambda r: common.show(scale(r.get("final_energy_mae_per_atom_offset_removed")), ".2f"),
        ),
        ("E step", ">7", common.cell("max_energy_step_ratio", ".2f")),
        ("publ.", ">6", common.cell("publication_rate", ".2f")),
        ("area", ">8", common.cell("force_mae_area", ".4f")),
    ]
    print("medians over seeds")
    common.print_table(columns, rows)
    for campaign, figure in result.get("primary", {}).items():
        low, high = figure["interval_95"]
        print(
            f"primary, {campaign}: area after/before median {figure['median']:.3f} "
            f"[{low:.3f}, {high:.3f}] over {figure['seeds']} seeds, "
            f"Wilcoxon p {figure['wilcoxon_p']}"
        )
    for goal, verdict in result["goals"].items():
        by_campaign = ", ".join(f"{c} {v['pass']}" for c, v in verdict["campaigns"].items())
        print(f"goal {goal}: {verdict['pass']} ({by_campaign})")


def scale(value: float | None) -> float | None:
    return None if value is None else 1e3 * value


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    names = list(result["campaigns"]) or ["none"]
    figure, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 7), squeeze=False)
    colours = {"before": "tab:blue", "after": "tab:orange"}
    for column, campaign in enumerate(names):
        forces, energies = axes[0][column], axes[1][column]
        seen = set()
        for run in result["runs"]:
            if run["campaign"] != campaign or not run["curve"]:
                continue
            curve = run["curve"]
            label = None if run["side"] in seen else run["side"]
            seen.add(run["side"])
            style = {"color": colours[run["side"]], "alpha": 0.7, "label": label}
            times = [p["wall_s"] for p in curve]
            forces.plot(times, [p["force_mae"] for p in curve], **style)
            energy = [scale(p["energy_mae_per_atom"]) for p in curve]
            energies.plot(times, [math.nan if e is None else e for e in energy], **style)
        forces.set_title(campaign)
        forces.set_ylabel("test force MAE, eV/Å")
        energies.set_ylabel("test energy MAE, meV/atom")
        for axis in (forces, energies):
            axis.set_yscale("log")
            axis.set_xlabel("wall time, s")
        forces.legend()
    common.save_figure(figure, path)


# ------------------------------------------------------------------ main
def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = common.parser(__doc__)
    option = parser.add_argument
    option("--campaigns", nargs="+", choices=list(CAMPAIGNS), help="default: all three")
    option("--seeds", nargs="+", type=int, help="default: 0 1 2 3 4")
    option("--before", default=BEFORE, help="the commit before the change (%(default)s)")
    option("--after", help="the commit after it (default: this checkout, as it is)")
    option("--site", default="laptop.py")
    option(
        "--max-wall-s",
        nargs="+",
        type=caps(float),
        metavar="[CAMPAIGN=]S",
        help="cap stop.max_wall_s: S for every campaign, CAMPAIGN=S for one",
    )
    option(
        "--max-labels",
        nargs="+",
        type=caps(int),
        metavar="[CAMPAIGN=]N",
        help="cap stop.max_labels: N for every campaign, CAMPAIGN=N for one",
    )
    option("--timeout", type=float, help="kill a run after this many s (1.5 x wall + 300)")
    option("--work", help="work folder (default: a new temporary one, kept)")
    option("--quick", action="store_true", help="tiny protocol for the test suite")
    option("--reanalyse", metavar="JSON", help="no runs: analyse the runs saved in JSON")
    args = parser.parse_args(argv)
    defaults = QUICK_BUDGET if args.quick else FULL_BUDGET
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("max_wall_s", "max_labels"):  # [(campaign, cap), ...] -> {campaign: cap}
        value = getattr(args, key)
        if value is not None:
            setattr(args, key, dict(value) if isinstance(value, list) else {"*": value})
    return args


def caps(number: type):
    """Parse ``S`` (every campaign: ``"*"``) or ``CAMPAIGN=S`` into ``(campaign, S)``."""

    def parse(text: str) -> tuple[str, float | int]:
        campaign, _, value = text.rpartition("=")
        if campaign and campaign not in CAMPAIGNS:
            raise argparse.ArgumentTypeError(f"unknown campaign {campaign!r} in {text!r}")
        try:
            return campaign or "*", number(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected [CAMPAIGN=]NUMBER") from None

    return parse


TARGETS = {
    "primary": "per campaign, the paired ratio after/before of the force-MAE area "
    "(time-averaged test force MAE on the pair's common window): median over seeds <= 1, "
    "with a bootstrap 95% interval and the exact Wilcoxon signed-rank p",
    "regressions": "versions > 1.25x the best before them: 0 in >= 80% of seeds, and "
    "<= 1% of versions in every seed",
    "last_version": "last version's force MAE / best version's <= 1.05 in every seed",
    "energy": "median last-version energy MAE per atom <= 0.5x the before side's median; "
    "no version > 2x the energy MAE of the one before it, in every seed",
    "publication": "share of finished training tasks published >= 0.5 in every seed; "
    "force-MAE area no worse than before (the primary comparison)",
    "accuracy_per_time": "default campaign: median force MAE at the before run's final "
    "wall time <= 0.020 eV/A; time to the before run's final MAE not slower",
}
"""The goals of issue 25, fixed before any run and written with the protocol."""


LOAD_AT_START = os.getloadavg()


def protocol(args, wall_s: float | None) -> dict:
    return {
        "campaigns": args.campaigns,
        "seeds": args.seeds,
        "site": args.site,
        "max_wall_s_cap": args.max_wall_s,
        "max_labels_cap": args.max_labels,
        "quick": args.quick,
        "quick_overrides": QUICK if args.quick else None,
        "regression_factor": REGRESSION,
        "order": "per seed, per campaign: before then after on even seed positions, "
        "after then before on odd ones; one run at a time",
        "benchmark_wall_s": wall_s,
        "load_average_at_start": LOAD_AT_START,
    }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = arguments(argv)
    if args.reanalyse:
        saved = json.loads(Path(args.reanalyse).read_text())
        work = saved.pop("work", None)  # runs.json's; the results never name it
        saved.update(analyse(saved["runs"]))
        report(saved)
        common.write_results(NAME, saved, plot, finite=True, work=Path(work) if work else None)
        return
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="palflow-stability-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"runs in {work}", flush=True)
    started = time.perf_counter()
    runs: list[dict] = []
    try:
        sides = make_sides(args.before, args.after, work)
        facts = check_imports(sides)
        facts["before"]["rev"] = args.before
        facts["after"]["rev"] = args.after or "this checkout"
        if not args.quick:  # the protocol and the targets, before the first run
            common.write_results(
                NAME,
                {"status": "running", "protocol": protocol(args, None), "targets": TARGETS},
            )
        for position, seed in enumerate(args.seeds):
            order = SIDES if position % 2 == 0 else SIDES[::-1]
            for campaign in args.campaigns:
                for side in order:
                    runs.append(run_one(sides[side], campaign, seed, args, work, sides))
                    runs[-1]["first_of_pair"] = side == order[0]
                    print(describe(runs[-1]), flush=True)
    finally:
        for name in SIDES:
            if (work / name).exists():
                git("worktree", "remove", "--force", str(work / name))
            shutil.rmtree(work / f"shim-{name}", ignore_errors=True)
    result = {
        "status": "finished",
        "protocol": protocol(args, time.perf_counter() - started),
        "targets": TARGETS,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_end": os.getloadavg(),
        },
        "sides": facts,
    }
    # The runs first, as they are: an analysis that fails loses no run (--reanalyse).
    (work / "runs.json").write_text(
        json.dumps({**result, "work": str(work), "runs": runs}, indent=2, default=str)
    )
    result.update(analyse(runs))
    result["runs"] = runs
    report(result)
    common.write_results(NAME, result, plot, finite=True, work=work)


if __name__ == "__main__":
    main()
