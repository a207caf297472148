"""One point of ``benchmarks/scale.py``: the real coordinator on a simulated site.

Run by ``scale.py`` in a fresh process per point (``--point JSON WORK``) and per
resume (``--resume RUN JSON``), each printing one JSON line; it imports nothing of
this folder, so that it drives the checkout's code or an older tree put first on
``PYTHONPATH`` alike. :class:`VirtualSite` is the site (apps on a virtual clock, and
the engine's observer that completes the earliest task each turn); its methods named
after the apps are the stand-ins (``scale.py``'s docstring says what each writes).
"""

from __future__ import annotations

import heapq
import json
import os
import resource
import shutil
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

DURATIONS = dict(label_batch=(30.0, 0.5), oracle_md=(300.0, 0.0), generate=(20.0, 0.2))
DURATIONS.update(train_member=(60.0, 0.2), score_candidates=(5.0, 0.2), evaluate_test=(5.0, 0.2))
"""Virtual seconds of each app: (median, sigma) of a lognormal; an oracle batch's is
per structure."""
ATOMS = 64
SIGMA_FORCE = 0.1  # the members' force spread, eV/A


_CU64 = []


def cu64(rng: np.random.Generator | None = None, sigma: float = 0.05):
    """64 atoms of fcc copper (2x2x4 conventional cells), rattled by ``sigma`` A."""
    from ase.build import bulk

    if not _CU64:
        _CU64.append(bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 4)))
    atoms = _CU64[0].copy()
    if rng is not None:
        atoms.positions += rng.normal(0, sigma, atoms.positions.shape)
    return atoms


def campaign_for(point: dict, structure: str):
    """The simulated campaign: 64-atom copper, ``point``'s labels and walkers."""
    from palflow.pipeline.config.settings import load_campaign

    settings = dict(name="scale", seed=point.get("seed", 0), system__structure=structure)
    settings.update(oracle__calculator="ase.calculators.emt:EMT", oracle__isolate=False)
    settings.update(oracle__batch_size=point["batch"], model__name="schnet", model__cutoff=4.0)
    settings.update(training__epochs_per_task=1, training__min_task_s=0.0)
    settings.update(generator__steps_per_task=50, generator__sample_interval=5)
    settings.update(generator__n_walkers=point["walkers"], selection__threshold=0.03)
    settings.update(selection__max_labels_per_version=0, initial__n_structures=16)
    settings.update(selection__max_queue=max(256, 2 * point["slots"] * point["batch"]))
    settings.update(test__n_structures=16, stop__max_labels=point["labels"])
    return load_campaign(**settings, stop__max_wall_s=1e9, stop__final_training_s=0.0)


def slots_for(point: dict) -> dict:
    return {"oracle": point["slots"], "generator": min(point["walkers"], 8), "train": 4, "infer": 2}


class DataReader:
    """Reads what a training or evaluation task is handed: a dataset file's path
    (the whole file, as the real apps read it), or a selection of the label store
    (``{"store", "start", "stop", ...}``; only the rows that ``key``'s reader has not
    read yet: a member keeps what it read before). Returns how many structures of
    the side asked the reader now holds."""

    def __init__(self) -> None:
        self.rows: dict[object, int] = {}  # key -> rows of the store read so far
        self.held: dict[object, int] = {}  # key -> structures of its side held

    def read(self, source, key) -> int:
        from palflow.apps.data.dataset import read_arrays

        if source is None or source == "":
            return 0
        if not isinstance(source, dict):
            arrays = read_arrays(source)
            return len(arrays["n_atoms"])
        from palflow.apps.data.label_log import on_side, read_rows  # the store's reader

        start = max(int(source["start"]), self.rows.get(key, 0))
        if start < int(source["stop"]):
            arrays = read_rows(source["store"], start, int(source["stop"]))
            side = on_side(arrays["split_key"], source["side"], source["validation_fraction"])
            self.held[key] = self.held.get(key, 0) + int(np.count_nonzero(side))
            self.rows[key] = int(source["stop"])
        return self.held.get(key, 0)


class VirtualSite:
    """The apps of a campaign on a virtual clock; also the engine's observer that
    completes the earliest task each turn."""

    def __init__(self, campaign, template: str, seed: int = 0) -> None:
        self.campaign = campaign
        self.template = template
        self.rng = np.random.default_rng(seed)
        self.now = 0.0
        self.pending: list = []  # (time, sequence, future, work, kwargs)
        self.sequence = 0
        self.standin_cpu = 0.0
        self.submitted: list[float] = []
        self.completed: list[float] = []
        self.turns: list[float] = []  # from each completion to the next turn's end
        self.kinds: list[str] = []  # the app of each completion
        self.reader = DataReader()
        self.kill_at: int | None = None  # labels at which to copy the run (a kill)
        self.killed_copy: str | None = None

    def apps(self):
        from palflow.pipeline.engine.coordinator import CAMPAIGN_APPS, Apps

        return Apps(**{name: self._submitter(name) for name in CAMPAIGN_APPS})

    def _submitter(self, name: str):
        work = getattr(self, name)

        def submit(**kwargs) -> Future:
            self.submitted.append(time.perf_counter())
            median, sigma = DURATIONS[name]
            scale = self.campaign.oracle.batch_size if name == "label_batch" else 1
            duration = scale * median * float(np.exp(self.rng.normal(0, sigma) if sigma else 0))
            future: Future = Future()
            future.set_running_or_notify_cancel()
            self.sequence += 1
            heapq.heappush(self.pending, (self.now + duration, self.sequence, future, work, kwargs))
            return future

        return submit

    def __call__(self, coordinator) -> None:
        """The observer: complete the earliest task. Called once per turn, after the
        turn's submissions: the time since the last completion is the coordinator's
        whole handling of it (its result used, its turn done)."""
        if self.completed and len(self.turns) < len(self.completed):
            self.turns.append(time.perf_counter() - self.completed[-1])
        if self.kill_at is not None and coordinator.state.n_labels_active >= self.kill_at:
            self._copy_run(coordinator.run_dir.root)
        if not self.pending:
            return
        self.now, _, future, work, kwargs = heapq.heappop(self.pending)
        began = time.thread_time()
        try:
            result = work(**kwargs)
        except Exception as error:  # a stand-in's bug shows as a failed task
            self.standin_cpu += time.thread_time() - began
            future.set_exception(error)
            return
        self.standin_cpu += time.thread_time() - began
        future.set_result(result)
        self.completed.append(time.perf_counter())
        self.kinds.append(work.__name__)

    def _copy_run(self, root: Path) -> None:
        """Copy the run directory as a kill would leave it (stand-in CPU: not the
        coordinator's)."""
        began = time.thread_time()
        self.killed_copy = str(root) + ".killed"
        shutil.copytree(root, self.killed_copy, ignore=shutil.ignore_patterns(".lock"))
        self.kill_at = None
        self.standin_cpu += time.thread_time() - began

    # ------------------------------------------------------------------ stand-ins
    def _when(self) -> dict:
        return {"t_start": time.time(), "t_end": time.time(), "host": "virtual"}

    def label_batch(self, input_path, output_path, **_) -> dict:
        from palflow.apps.data.dataset import atomic_write_bytes, read_arrays

        arrays = read_arrays(input_path)
        n, atoms = len(arrays["n_atoms"]), len(arrays["numbers"])
        out = {key: arrays[key] for key in ("numbers", "positions", "n_atoms", "cells", "pbc")}
        out.update(
            energy=self.rng.normal(-100.0, 1.0, n),
            forces=self.rng.normal(0.0, 0.5, (atoms, 3)),
            stress=np.full((n, 3, 3), np.nan),
            candidate_id=arrays["candidate_id"],
            status=np.array(["ok"] * n, dtype=str),
        )
        atomic_write_bytes(output_path, lambda handle: np.savez(handle, **out))
        done = dict(output_path=output_path, n_ok=n, failures=[], oracle_seconds=[0.0] * n)
        return {**done, **self._when()}

    def oracle_md(self, start_path, output_path, n_frames, **_) -> dict:
        from ase.calculators.singlepoint import SinglePointCalculator
        from ase.io import read

        from palflow.apps.data.dataset import write_dataset

        frames = []
        for _ in range(n_frames):
            atoms = read(start_path)
            atoms.positions += self.rng.normal(0, 0.05, atoms.positions.shape)
            forces = self.rng.normal(0, 0.5, atoms.positions.shape)
            atoms.calc = SinglePointCalculator(atoms, energy=-100.0, forces=forces)
            frames.append(atoms)
        write_dataset(output_path, frames)
        return {"output_path": output_path, "n_frames": n_frames, **self._when()}

    def generate(
        self, start_paths, ensemble_path, output_paths, last_frame_paths, settings, seed, **_
    ) -> dict:
        from ase.io import write

        from palflow.apps.data.dataset import write_dataset

        k = self.campaign.model.n_members
        n_frames = settings["steps_per_task"] // settings["sample_interval"]
        walkers = []
        for output, last in zip(output_paths, last_frame_paths, strict=True):
            frames = [cu64(self.rng) for _ in range(n_frames)]
            forces = self.rng.normal(0, SIGMA_FORCE, (n_frames, k, ATOMS, 3)).astype(np.float32)
            spread = np.linalg.norm(forces - forces.mean(1, keepdims=True), axis=-1).max((1, 2))
            energy = np.abs(self.rng.normal(0, 0.01, n_frames))
            extra = dict(member_stress=self.rng.normal(0, 1e-3, (n_frames, k, 3, 3)))
            extra.update(force_disagreement=spread.astype(float), energy_disagreement=energy)
            extra.update(step=np.arange(1, n_frames + 1) * settings["sample_interval"])
            extra.update(ensemble_version=np.zeros(n_frames, dtype=np.int64))
            extra.update(member_energies=self.rng.normal(-100, 0.1, (n_frames, k)))
            write_dataset(output, frames, extra={**extra, "member_forces": forces})
            partial = f"{last}.{os.getpid()}.tmp"
            write(partial, frames[-1], format="extxyz")
            os.replace(partial, last)
            walker = dict(output_path=output, last_frame_path=last, n_frames=n_frames)
            walker.update(force_disagreement=spread.tolist(), energy_disagreement=energy.tolist())
            walkers.append({**walker, "blew_up": False, "reason": None})
        done = dict(walkers=walkers, n_frames=n_frames * len(walkers), version=0)
        return {**done, **self._when()}

    def train_member(self, member, dataset_path, checkpoint_out, validation_path=None, **_) -> dict:
        n_train = self.reader.read(dataset_path, (member, "train"))
        n_valid = self.reader.read(validation_path, (member, "valid"))
        shutil.copyfile(self.template, checkpoint_out)
        event = dict(published=True, gate="stand-in", n_validation=n_valid, learning_rate=1e-3)
        event.update(ema_lag_tasks=0.0, epochs_this_task=1)
        done = dict(member=member, checkpoint=str(checkpoint_out), epochs=1, steps=1)
        done.update(n_train=n_train, train_loss=0.01, val_force_mae=0.1, val_energy_mae=0.01)
        return {**done, **event, **self._when(), "device": "virtual", "event": event}

    def score_candidates(self, ensemble_path, input_path, output_path=None, **_) -> dict:
        from palflow.apps.data.dataset import read_arrays

        arrays = read_arrays(input_path)
        k, n = self.campaign.model.n_members, len(arrays["n_atoms"])
        forces = self.rng.normal(0, SIGMA_FORCE, (k, len(arrays["numbers"]), 3))
        if output_path:
            out = dict(member_energies=self.rng.normal(0, 0.1, (k, n)), n_atoms=arrays["n_atoms"])
            np.savez(f"{output_path}.tmp.npz", **out, member_forces=forces.astype(np.float32))
            os.replace(f"{output_path}.tmp.npz", output_path)
        spread = self.rng.uniform(0.05, 0.3, n)
        done = dict(candidate_id=[int(i) for i in arrays["candidate_id"]], version=-1)
        done.update(force_disagreement=spread.tolist(), energy_disagreement=(spread / 10).tolist())
        return {**done, "output_path": output_path, **self._when()}

    def evaluate_test(self, ensemble_path, test_path="", validation_path=None, **_) -> dict:
        def errors(n: int) -> dict:
            out = dict(force_mae=0.1, force_rmse=0.12, energy_mae_per_atom=0.01, stress_mae=None)
            out.update(energy_rmse_per_atom=0.012)
            out.update(structure_force_error=self.rng.uniform(0.05, 0.15, n).tolist())
            out.update(structure_force_spread=self.rng.uniform(0.05, 0.15, n).tolist())
            return {**out, "structure_energy_error": self.rng.normal(0, 0.01, n).tolist()}

        n_test = self.reader.read(test_path, ("evaluate", "test")) if test_path else 0
        n_valid = self.reader.read(validation_path, ("evaluate", "valid"))
        done = {**(errors(n_test) if test_path else {}), "version": -1, **self._when()}
        return {**done, "validation": errors(n_valid) if validation_path else None}


# ---------------------------------------------------------------------- set-up
def member_template(campaign, work: Path) -> str:
    """One real member checkpoint (the real training app on a few frames), to copy.
    Made in ``work``'s parent, which ``scale.py`` keeps for the points of one code."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from palflow.apps.contracts import CalculatorSpec
    from palflow.apps.data.dataset import write_dataset
    from palflow.apps.training import _train_member
    from palflow.pipeline.config.models import resolve_model_spec

    rng = np.random.default_rng(1)
    frames = []
    for _ in range(4):
        atoms = cu64(rng)
        atoms.calc = SinglePointCalculator(atoms, energy=-100.0, forces=rng.normal(0, 0.5, (64, 3)))
        frames.append(atoms)
    write_dataset(work.parent / "template.npz", frames)
    spec = resolve_model_spec(campaign, frames, frames[0], CalculatorSpec.of(campaign.oracle))
    out = str(work.parent / "template.pt")
    _train_member(
        0, str(work.parent / "template.npz"), None, out, spec, campaign.training.model_dump(), 0, 1
    )
    return out


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in Path(root).rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


PARTS = {
    "labels": ("labels.db", "labels.extxyz", "data", "oracle"),
    "generator": ("generator",),
    "models": ("models",),
}
"""The run directory's parts that grow with labels, walker segments and versions."""


def run_parts(root: Path, labels: int, segments: int, versions: int) -> dict:
    """Bytes of each part of :data:`PARTS` per what it grows with (labels, walker
    segments, versions), and of the rest (fixed: settings, start structures, the
    saved queue). ``data/`` holds the labels (the log, or the old code's training
    snapshots) and the small held-out set."""
    root = Path(root)
    sizes = {}
    for part, names in PARTS.items():
        paths = [root / name for name in names]
        files = [p for path in paths for p in ([path] if path.is_file() else path.rglob("*"))]
        sizes[part] = sum(p.stat().st_size for p in files if p.is_file())
    total, _ = run_bytes(root)
    return {
        "label_bytes_per_label": sizes["labels"] / max(labels, 1),
        "generator_bytes_per_segment": sizes["generator"] / max(segments, 1),
        "model_bytes_per_version": sizes["models"] / max(versions, 1),
        "other_bytes": total - sum(sizes.values()),
    }


def percentile_ms(latencies: list[float], q: float) -> float | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    return 1e3 * ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def latencies(completed: list[float], submitted: list[float], turns: list[float]) -> list[float]:
    """From each completion to the first submission of the turn that handled it, for
    the completions whose turn submitted something (a completion whose turn submits
    nothing, waiting for work, is no latency of the coordinator's)."""
    import bisect

    submitted = sorted(submitted)
    out = []
    for done, turn in zip(completed, turns, strict=False):
        index = bisect.bisect_left(submitted, done)
        if index < len(submitted) and submitted[index] <= done + turn:
            out.append(submitted[index] - done)
    return out


def simulate(point: dict, work: Path) -> dict:
    """Run one campaign to ``point["labels"]`` active labels on a virtual site."""
    import logging

    from ase.io import write

    import palflow.apps
    from palflow.pipeline.engine.coordinator import Coordinator
    from palflow.pipeline.state.rundir import RunDirectory

    logging.disable(logging.INFO)
    structure = work / "cu64.extxyz"
    write(structure, cu64(), format="extxyz")
    campaign = campaign_for(point, str(structure))
    template = point.get("template")  # made by an earlier point of the same code
    if not template or not Path(template).exists():
        template = member_template(campaign, work)
    rss_before = peak_mb()
    run = RunDirectory.create(work / "run", campaign.model_dump())
    site = VirtualSite(campaign, template, point.get("seed", 0))
    if point.get("kill"):
        site.kill_at = point["labels"] // 2
    cpu, wall = process_cpu(), time.perf_counter()
    coordinator = Coordinator(campaign, run, site.apps(), slots_for(point), cu64(), poll_s=60.0)
    coordinator.observers = [site]
    summary = coordinator.run()
    cpu, wall = process_cpu() - cpu, time.perf_counter() - wall
    data_bytes, files = run_bytes(run.root)
    lat = latencies(site.completed, site.submitted, site.turns)
    state, labels = coordinator.state, coordinator.state.n_labels_active
    row = dict(point, palflow=str(Path(palflow.apps.__file__).parent.parent))
    row.update(labels_reached=labels, labels_total=state.n_labels_total)
    row.update(stop_reason=summary["stop_reason"], versions=len(state.versions))
    row.update(tasks=len(site.completed), virtual_s=site.now, wall_s=wall)
    row.update(process_cpu_s=cpu, standin_cpu_s=site.standin_cpu)
    row.update(cpu_s_per_label=(cpu - site.standin_cpu) / max(labels, 1))
    row.update(run_bytes=data_bytes, run_files=files, bytes_per_label=data_bytes / max(labels, 1))
    segments = len(list(run.root.glob("generator/walker*.seg*.npz")))
    row.update(walker_segments=segments)
    row.update(run_parts(run.root, state.n_labels_total, segments, len(state.versions)))
    row.update(peak_rss_mb=peak_mb(), rss_before_mb=rss_before)
    row.update(latency_p50_ms=percentile_ms(lat, 0.5), latency_p99_ms=percentile_ms(lat, 0.99))
    row.update(turn_p50_ms=percentile_ms(site.turns, 0.5))
    row.update(turn_p99_ms=percentile_ms(site.turns, 0.99))
    by_kind: dict[str, list[float]] = {}
    for kind, turn in zip(site.kinds, site.turns, strict=False):
        by_kind.setdefault(kind, []).append(turn)
    row["turn_ms_by_app"] = {
        kind: {"n": len(t), "p50": percentile_ms(t, 0.5), "p99": percentile_ms(t, 0.99)}
        for kind, t in sorted(by_kind.items())
    }
    row.update(latencies=len(lat), run_dir=str(run.root), template=template)
    return {**row, "killed_copy": site.killed_copy}


def resume(root: str, point: dict) -> dict:
    """Reopen a run directory and time its coordinator's resume, until it could submit."""
    import logging

    from palflow.apps.models import registry
    from palflow.pipeline.config.settings import campaign_from_dict
    from palflow.pipeline.engine.coordinator import Coordinator
    from palflow.pipeline.state.rundir import CAMPAIGN_FILE, RunDirectory

    logging.disable(logging.WARNING)
    registry.backend("schnet").preload()  # the model's imports, before the clock starts
    began = time.perf_counter()
    run = RunDirectory.open(root)
    campaign = campaign_from_dict(json.loads(run.file(CAMPAIGN_FILE).read_text()))
    site = VirtualSite(campaign, "")
    coordinator = Coordinator.resume(campaign, run, site.apps(), slots_for(point))
    seconds, labels = time.perf_counter() - began, coordinator.state.n_labels_total
    return {"resume_s": seconds, "resumed_labels": labels, "resume_peak_rss_mb": peak_mb()}


def main(argv: list[str]) -> int:
    """``--point JSON WORK`` or ``--resume RUN JSON``: one JSON line on stdout."""
    if argv[0] == "--point":
        result = simulate(json.loads(argv[1]), Path(argv[2]))
    else:
        result = resume(argv[1], json.loads(argv[2]))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
