"""The data of ``foundation.py``: each system's labelled pool and held-out set, and the
MACE foundation that its ``mace_finetune`` variant starts from.

Everything is made once in a work folder (``--work``) and reused; the results record
each file's sha256, so that a rerun on other data shows.

- Pools and held-out sets: oracle-driven Langevin MD from the system's start, each
  trajectory with its own seed (the pool's and the held-out set's seeds differ), the
  cell strained by a random symmetric strain up to 2% per trajectory (copper).
- The MACE foundations come from another system *and* another oracle, so that they
  have never seen the target: Cu13 clusters labelled by Lennard-Jones (for copper)
  and ethanol labelled by GFN2-xTB (tblite; for water, labelled by GFN1-xTB), each a
  default palflow MACE trained by ``palflow.apps.training._train_member``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.io import read, write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "structures"

SYSTEMS = {
    # start, oracle, temperature (K), timestep (fs), equilibration steps, stride,
    # pool trajectories x frames, held-out trajectories x frames, strain
    "copper": ("cu8", "emt", 1200.0, 2.0, 100, 10, (4, 50), (2, 24), 0.02),
    "water": ("water4", "gfn1", 400.0, 0.5, 100, 8, (4, 40), (1, 40), 0.0),
}


def oracle(name: str):
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if name == "lj":  # copper-like: sigma from the Cu-Cu distance, epsilon 0.4 eV
        from ase.calculators.lj import LennardJones

        return LennardJones(sigma=2.27, epsilon=0.4, rc=5.0, smooth=True)
    from tblite.ase import TBLite

    method = {"gfn1": "GFN1-xTB", "gfn2": "GFN2-xTB"}[name]
    return TBLite(method=method, verbosity=0)


def start_of(name: str) -> Atoms:
    from ase.build import bulk, molecule

    if name == "cu8":
        return bulk("Cu", "fcc", a=3.61, cubic=True).repeat((1, 1, 2))
    if name == "cu13":
        return read(EXAMPLES / "cu13.xyz")
    if name == "ethanol":
        atoms = molecule("CH3CH2OH")
        atoms.center(vacuum=6.0)
        return atoms
    # 4 H2O on the sites of an fcc cell of 4.93 Å (1.0 g/cm³), random orientations
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    length = 4.93
    atoms = Atoms(cell=[length] * 3, pbc=True)
    for site in [(0, 0, 0), (0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0)]:
        water = molecule("H2O")
        rotation = Rotation.random(random_state=int(rng.integers(1 << 30)))
        water.positions = rotation.apply(water.positions) + np.array(site) * length
        atoms += water
    return atoms


def trajectory(start: Atoms, name: str, seed: int, settings: tuple, n_frames: int) -> list:
    """``n_frames`` labelled frames of one oracle-driven Langevin run."""
    _, _, temperature, timestep, equilibrate, stride, *_, strain = settings
    rng = np.random.default_rng(seed)
    atoms = start.copy()
    if strain > 0:
        e = rng.uniform(-strain, strain, (3, 3))
        atoms.set_cell(atoms.cell @ (np.eye(3) + (e + e.T) / 2), scale_atoms=True)
    atoms.positions += rng.normal(0, 0.02, atoms.positions.shape)
    atoms.calc = oracle(name)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    md = Langevin(atoms, timestep * units.fs, temperature_K=temperature, friction=0.02, rng=rng)
    md.run(equilibrate)
    frames = []
    for _ in range(n_frames):
        md.run(stride)
        frame = atoms.copy()
        frame.calc = None
        from ase.calculators.singlepoint import SinglePointCalculator

        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        if atoms.pbc.all():
            results["stress"] = atoms.get_stress()
        frame.calc = SinglePointCalculator(frame, **results)
        frames.append(frame)
    return frames


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def labelled(path: Path, make) -> list:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path.with_suffix(".part.extxyz"), make(), format="extxyz")
        path.with_suffix(".part.extxyz").rename(path)
    return read(path, ":")


def data_of(system: str, work: Path) -> dict:
    """The system's pool and held-out set (made once in ``work``)."""
    settings = SYSTEMS[system]
    start_name, name = settings[0], settings[1]
    (n_pool, per_pool), (n_test, per_test) = settings[6], settings[7]
    start = start_of(start_name)

    def pool():
        return [f for s in range(n_pool) for f in trajectory(start, name, s, settings, per_pool)]

    def test():
        seeds = range(1000, 1000 + n_test)
        return [f for s in seeds for f in trajectory(start, name, s, settings, per_test)]

    pool_path, test_path = work / system / "pool.extxyz", work / system / "test.extxyz"
    frames, held_out = labelled(pool_path, pool), labelled(test_path, test)
    return {
        "system": system,
        "pool": frames,
        "test": held_out,
        "provenance": {
            "oracle": name,
            "settings": list(settings),
            "pool_frames": len(frames),
            "test_frames": len(held_out),
            "pool_sha256": sha256(pool_path),
            "test_sha256": sha256(test_path),
        },
    }


FOUNDATIONS = {"copper": ("cu13", "lj", 800.0), "water": ("ethanol", "gfn2", 500.0)}


def foundation_file(system: str, work: Path) -> tuple[str, dict]:
    """A MACE model file trained on another system and oracle (see the module)."""
    from palflow.apps.data.dataset import write_dataset
    from palflow.apps.models import registry
    from palflow.apps.models.backend import SpecInputs
    from palflow.apps.models.core import load_checkpoint
    from palflow.apps.sections import TrainingSettings
    from palflow.apps.training import _train_member

    start_name, name, temperature = FOUNDATIONS[system]
    folder = work / system / "foundation"
    settings = (start_name, name, temperature, 1.0, 100, 10, (4, 50), (0, 0), 0.0)
    frames = labelled(
        folder / "data.extxyz",
        lambda: [
            f
            for s in range(4)
            for f in trajectory(start_of(start_name), name, 500 + s, settings, 50)
        ],
    )
    path = folder / "foundation.member0.model"
    if not path.is_file():
        write_dataset(folder / "data.npz", frames)
        backend = registry.backend("mace")
        spec = backend.resolve_spec(backend.settings(), SpecInputs(frames, frames[0], None))
        result = _train_member(
            0, str(folder / "data.npz"), None, str(folder / "foundation.pt"),
            {**spec, "name": "mace"},
            TrainingSettings(min_task_s=0.0, batch_size=8).model_dump(),
            seed=0, n_epochs=60, device="cpu",
        )  # fmt: skip
        model, _ = load_checkpoint(result["checkpoint"])
        model.export(str(folder / "foundation"))
    return str(path), {
        "system": start_name,
        "oracle": name,
        "temperature_K": temperature,
        "frames": len(frames),
        "data_sha256": sha256(folder / "data.extxyz"),
        "sha256": sha256(path),
        "made_by": "benchmarks/foundation_source.py (default palflow MACE, 60 epochs)",
    }
