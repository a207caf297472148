"""The exploring generators: collective variables and their gradients, the
uncertainty bias, well-tempered hills, replica exchange and temperature schedules,
each generator end to end on a small ensemble, and their bad input."""

import json

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.lj import LennardJones
from ase.io import read, write

from palflow.apps.data.dataset import read_arrays, structures_from_arrays
from palflow.apps.generator import _generate
from palflow.apps.md import colvars
from palflow.apps.md.bias import UncertaintyBias, variance_and_gradient
from palflow.apps.md.dynamics import Evaluation
from palflow.apps.md.metadynamics import Hills, Metadynamics
from palflow.apps.md.tempering import REPLICA_KEY, STEPS_KEY, ReplicaExchange, schedule_factor
from palflow.apps.models.calculator import predict_structures
from palflow.apps.models.core import load_checkpoint
from palflow.pipeline.config.sections import GeneratorSettings
from tests.test_cli import ROOT, run_cli

ETHANOL_DIHEDRALS = [[3, 2, 1, 0], [2, 1, 0, 6]]


def dihedrals(width: float) -> list[dict]:
    return [{"kind": "dihedral", "atoms": a, "width": width} for a in ETHANOL_DIHEDRALS]


def explore(tmp_path, kind, ensemble_path, start_paths, hills_paths=None, **given):
    """One task of the generator ``kind``, 20 steps, a frame every 5."""
    given = {"steps_per_task": 20, "sample_interval": 5, "max_force_disagreement": 1e9, **given}
    settings = GeneratorSettings(kind=kind, **given).model_dump()
    if hills_paths:
        settings["hills_paths"] = hills_paths
    n = len(start_paths)
    return _generate(
        kind, start_paths, ensemble_path, [str(tmp_path / f"frames{i}.npz") for i in range(n)],
        [str(tmp_path / f"last{i}.extxyz") for i in range(n)], settings, seed=7,
    )  # fmt: skip


def numerical_gradient(function, atoms: Atoms, h: float = 1e-5) -> np.ndarray:
    """Central differences of ``function(atoms)`` (a float) in every coordinate."""
    gradient = np.zeros((len(atoms), 3))
    for i in range(len(atoms)):
        for a in range(3):
            shifted = []
            for sign in (1, -1):
                work = atoms.copy()
                work.positions[i, a] += sign * h
                shifted.append(function(work))
            gradient[i, a] = (shifted[0] - shifted[1]) / (2 * h)
    return gradient


def rattled_ethanol(seed=0):
    atoms = molecule("CH3CH2OH")
    atoms.positions += np.random.default_rng(seed).normal(0, 0.1, atoms.positions.shape)
    return atoms


def periodic_copper():
    atoms = bulk("Cu", cubic=True).repeat(2)
    atoms.positions += np.random.default_rng(1).normal(0, 0.1, atoms.positions.shape)
    atoms.positions[0] += atoms.cell[0] * 0.98  # across the boundary: the minimum image
    return atoms


@pytest.mark.parametrize(
    "cv, make",
    [
        ({"kind": "distance", "atoms": [0, 2]}, rattled_ethanol),
        ({"kind": "distance", "atoms": [0, 5]}, periodic_copper),
        ({"kind": "angle", "atoms": [0, 1, 2]}, rattled_ethanol),
        ({"kind": "dihedral", "atoms": [3, 2, 1, 0]}, rattled_ethanol),
        ({"kind": "dihedral", "atoms": [0, 1, 2, 3]}, periodic_copper),
        (
            {"kind": "coordination", "atoms": [2], "to_atoms": [1, 3, 4, 5], "r0": 1.3},
            rattled_ethanol,
        ),
        (
            {"kind": "coordination", "atoms": [0, 1], "to_atoms": [0, 1, 2, 3], "r0": 2.6},
            periodic_copper,
        ),  # fmt: skip
    ],
    ids=[
        "distance",
        "distance-pbc",
        "angle",
        "dihedral",
        "dihedral-pbc",
        "coordination",
        "coordination-pbc",
    ],  # fmt: skip
)
def test_collective_variables_have_the_gradient_of_their_value(cv, make):
    atoms = make()
    values, gradients = colvars.evaluate(atoms, [cv])
    numeric = numerical_gradient(lambda a: colvars.evaluate(a, [cv])[0][0], atoms)
    assert np.abs(gradients[0] - numeric).max() < 1e-6 * max(1.0, np.abs(numeric).max()) + 1e-7
    assert np.abs(numeric).max() > 1e-3, "the variable moves with the atoms"


def test_cv_values_match_ase():
    atoms = rattled_ethanol()
    cvs = [
        {"kind": "distance", "atoms": [0, 2]},
        {"kind": "angle", "atoms": [0, 1, 2]},
        {"kind": "dihedral", "atoms": [3, 2, 1, 0]},
    ]
    values, _ = colvars.evaluate(atoms, cvs)
    assert values[0] == pytest.approx(atoms.get_distance(0, 2))
    assert np.degrees(values[1]) == pytest.approx(atoms.get_angle(0, 1, 2))
    assert np.degrees(values[2]) % 360 == pytest.approx(atoms.get_dihedral(3, 2, 1, 0) % 360)
    # a periodic difference is the shortest way round
    assert colvars.difference(np.array([3.1]), np.array([-3.1]), ["dihedral"])[0] == (
        pytest.approx(6.2 - 2 * np.pi)
    )


# ---------------------------------------------------------------- the uncertainty bias
def committee_evaluation(atoms: Atoms) -> Evaluation:
    """Three Lennard-Jones members that disagree on sigma: a real committee."""
    energies, forces = [], []
    for sigma in (1.0, 1.05, 1.1):
        work = atoms.copy()
        work.calc = LennardJones(sigma=sigma, epsilon=0.1, rc=4.0)
        energies.append(work.get_potential_energy())
        forces.append(work.get_forces())
    forces = np.array(forces)
    spread = float(np.linalg.norm(forces - forces.mean(0), axis=2).max())
    return Evaluation(forces.mean(0), spread, 0.0, np.array(energies), forces)


def lj_cluster():
    atoms = Atoms("H5", positions=[[0, 0, 0], [1.2, 0, 0], [0, 1.1, 0], [0, 0, 1.25], [1, 1, 1]])
    atoms.positions += np.random.default_rng(2).normal(0, 0.05, (5, 3))
    return atoms


@pytest.mark.parametrize("shape", ["udd", "hal"])
def test_the_bias_force_is_minus_the_gradient_of_the_bias_energy(shape):
    settings = GeneratorSettings(
        kind="biased_md", bias_shape=shape, bias_force_fraction=0.0, bias_strength=0.3,
        bias_width_eV=0.05, max_bias_force=1e9,
    ).model_dump()  # fmt: skip
    bias = UncertaintyBias(settings, 1)
    atoms = lj_cluster()
    forces, energy = bias.forces(0, atoms, committee_evaluation(atoms), units.kB * 300)
    numeric = numerical_gradient(
        lambda a: bias.forces(0, a, committee_evaluation(a), units.kB * 300)[1], atoms
    )
    assert energy < 0, "the bias lowers the energy where the committee disagrees"
    assert np.abs(forces + numeric).max() < 1e-5 * max(1, np.abs(numeric).max())
    variance, gradient = variance_and_gradient(
        committee_evaluation(atoms).member_energies, committee_evaluation(atoms).member_forces
    )
    assert variance > 0 and np.abs(gradient).max() > 0


def test_the_adaptive_strength_holds_the_fraction_and_the_cap_holds_the_force():
    settings = GeneratorSettings(
        kind="biased_md", bias_force_fraction=0.2, bias_strength=1e6, max_bias_force=1e9,
        bias_width_eV=1.0,
    ).model_dump()  # fmt: skip
    bias = UncertaintyBias(settings, 1)
    atoms = lj_cluster()
    evaluation = committee_evaluation(atoms)
    for _ in range(5):
        forces, _ = bias.forces(0, atoms, evaluation, units.kB * 300)
    physical = np.linalg.norm(evaluation.forces, axis=1).mean()
    assert np.linalg.norm(forces, axis=1).mean() == pytest.approx(0.2 * physical, rel=1e-6)
    capped = UncertaintyBias({**settings, "max_bias_force": 1e-3}, 1)
    forces, _ = capped.forces(0, atoms, evaluation, units.kB * 300)
    assert np.linalg.norm(forces, axis=1).max() <= 1e-3 + 1e-12
    ceiling = UncertaintyBias({**settings, "bias_strength": 1e-4}, 1)
    ceiling.forces(0, atoms, evaluation, units.kB * 300)
    assert ceiling.strength[0] == pytest.approx(1e-4), "never past bias_strength"


# ---------------------------------------------------------------- metadynamics
def metadynamics_settings(tmp_path, n=1, **given):
    settings = GeneratorSettings(
        kind="metadynamics",
        collective_variables=dihedrals(0.3), hill_height_eV=0.1, bias_factor=5.0, **given,
    ).model_dump()  # fmt: skip
    settings["hills_paths"] = [str(tmp_path / f"hills/walker{i:03d}.npz") for i in range(n)]
    return settings


def test_hills_are_well_tempered_and_their_force_is_minus_their_gradient(tmp_path):
    settings = metadynamics_settings(tmp_path)
    bias = Metadynamics(settings)
    atoms = rattled_ethanol()
    kT = units.kB * 300
    bias.forces(0, atoms, None, kT)
    bias.deposit(0, kT, step=1)
    assert bias.own[0].heights[0] == pytest.approx(0.1), "the first hill is full height"
    bias.forces(0, atoms, None, kT)
    bias.deposit(0, kT, step=2)  # the same place: tempered by the bias already there
    expected = 0.1 * np.exp(-0.1 / ((5.0 - 1) * kT))
    assert bias.own[0].heights[1] == pytest.approx(expected)
    moved = rattled_ethanol(seed=5)
    forces, energy = bias.forces(0, moved, None, kT)
    numeric = numerical_gradient(lambda a: bias.forces(0, a, None, kT)[1], moved)
    assert energy > 0
    assert np.abs(forces + numeric).max() < 1e-5 * max(1, np.abs(numeric).max())


def test_hills_are_saved_restored_and_shared(tmp_path):
    settings = metadynamics_settings(tmp_path, n=2, shared_hills=True)
    bias = Metadynamics(settings)
    atoms = rattled_ethanol()
    kT = units.kB * 300
    bias.forces(0, atoms, None, kT)
    bias.deposit(0, kT, step=25)
    _, alone = bias.forces(1, atoms, None, kT)
    assert alone == pytest.approx(0.1), "walker 1 feels walker 0's hill at once"
    bias.save()
    again = Metadynamics(settings)
    assert again.own[0].heights.tolist() == bias.own[0].heights.tolist()
    assert again.own[0].steps.tolist() == [25]
    # another task of the system reads both walkers' files
    other = {**settings, "hills_paths": [str(tmp_path / "hills/walker002.npz")],
             "shared_hills_paths": settings["hills_paths"]}  # fmt: skip
    assert Metadynamics(other).forces(0, atoms, None, kT)[1] == pytest.approx(0.1)
    alone = Metadynamics({**other, "shared_hills": False})
    assert alone.forces(0, atoms, None, kT)[1] == 0.0, "not shared: its own hills only"
    with pytest.raises(ValueError, match="collective variables"):
        Hills.load(settings["hills_paths"][0], 3)


# ---------------------------------------------------------------- temperatures
def test_schedules_ramp_hold_and_repeat():
    schedule = [[0, 1.0], [100, 2.0], [200, 1.0]]
    assert schedule_factor(schedule, 50) == pytest.approx(1.5)
    assert schedule_factor(schedule, 150) == pytest.approx(1.5)
    assert schedule_factor(schedule, 500) == pytest.approx(1.0), "held after the last point"
    assert schedule_factor(schedule, 250, repeats=True) == pytest.approx(1.5)
    assert schedule_factor([], 10) == 1.0


class Ladder:
    """Just what ReplicaExchange.attempt reads of the dynamics."""

    def __init__(self, energies, temperatures):
        self.results = [Evaluation(None, 0, 0, np.array([e]), None) for e in energies]
        self.kT = units.kB * np.asarray(temperatures, dtype=float)
        self.constant_pressure = False
        self.swaps = []

    def swap(self, i, j):
        self.swaps.append((i, j))
        self.results[i], self.results[j] = self.results[j], self.results[i]


def test_exchanges_follow_the_metropolis_probability():
    rng = np.random.default_rng(0)
    exchange = ReplicaExchange([300.0, 400.0], 1, rng)
    assert exchange.attempt(Ladder([1.0, 0.0], [300, 400]), [0, 1]) is None
    assert exchange.accepted.tolist() == [1], "the cold rung higher in energy: always swapped"
    delta = 0.02  # eV; the cold rung lower: accepted with exp((1/kT1 - 1/kT2)(U1 - U2))
    expected = np.exp((1 / (units.kB * 300) - 1 / (units.kB * 400)) * (-delta))
    exchange = ReplicaExchange([300.0, 400.0], 1, rng)
    for _ in range(4000):
        exchange.attempt(Ladder([-delta, 0.0], [300, 400]), [0, 1])
        exchange.rounds = 0  # the even pair every time
    rate = exchange.accepted[0] / exchange.attempted[0]
    assert rate == pytest.approx(expected, abs=4 * np.sqrt(expected * (1 - expected) / 4000))
    ladder = Ladder([0.0, 0.0, 0.0], [300, 350, 400])
    ReplicaExchange([300.0, 350.0, 400.0], 1, rng).attempt(ladder, [0, 2])
    assert ladder.swaps == [], "a stopped walker exchanges with no one"


# ---------------------------------------------------------------- the generators
def ethanol_starts(tmp_path, n):
    paths = []
    for i in range(n):
        paths.append(str(tmp_path / f"start{i}.extxyz"))
        write(paths[-1], rattled_ethanol(seed=i))
    return paths


def test_biased_md_records_the_unbiased_committee_and_its_bias(tmp_path, ensemble_path):
    result = explore(tmp_path, "biased_md", ensemble_path, ethanol_starts(tmp_path, 2),
                      temperature_schedule=[[0, 1.0], [20, 2.0]])  # fmt: skip
    arrays = read_arrays(result["walkers"][0]["output_path"])
    assert arrays["bias_energy"].shape == (4,) and (arrays["bias_energy"] < 0).all()
    # the temperature each recorded step ran at: 500 K times 1 + (steps before it) / 20
    assert arrays["temperature_K"].tolist() == pytest.approx([600, 725, 850, 975])
    model, _ = load_checkpoint(ensemble_path)
    frames = structures_from_arrays(arrays)
    unbiased = predict_structures(model.eval(), frames, None, batch_size=len(frames))
    assert arrays["force_disagreement"] == pytest.approx(unbiased["force_disagreement"], rel=1e-4)
    assert arrays["member_energies"] == pytest.approx(unbiased["member_energies"].T, rel=1e-5), (
        "the frames carry the unbiased committee's predictions, not the bias's"
    )
    assert read(result["walkers"][0]["last_frame_path"]).info[STEPS_KEY] == 20
    assert len(result["bias_strength"]) == 2


def test_a_biased_walker_past_the_trust_level_stops_and_is_reset(tmp_path, ensemble_path):
    result = explore(tmp_path, "biased_md", ensemble_path, ethanol_starts(tmp_path, 1),
                      bias_trust_level=1e-9)  # fmt: skip
    walker = result["walkers"][0]
    assert walker["reset"] and "trust level" in walker["reason"]
    assert walker["n_frames"] == 1 and not walker["blew_up"], "its frame is kept"


def test_metadynamics_drops_hills_and_resumes_from_them(tmp_path, ensemble_path):
    cvs = [{"kind": "dihedral", "atoms": a, "width": 0.3} for a in ETHANOL_DIHEDRALS]
    starts = ethanol_starts(tmp_path, 2)
    hills = [str(tmp_path / "hills" / f"walker{i:03d}.npz") for i in range(2)]

    def segment(folder):
        folder.mkdir()
        result = explore(folder, "metadynamics", ensemble_path, starts, hills_paths=hills,
                         collective_variables=cvs, hill_interval=5)  # fmt: skip
        return result, read_arrays(result["walkers"][0]["output_path"])

    first, arrays = segment(tmp_path / "one")
    assert first["hills"] == 8 and np.load(hills[0])["heights"].shape == (4,)
    assert arrays["collective_variables"].shape == (4, 2)
    assert arrays["bias_energy"][0] == 0 and arrays["bias_energy"][1] > 0, (
        "the first hill, dropped at step 5, is felt from the next evaluation on"
    )
    second, arrays = segment(tmp_path / "two")
    assert np.load(hills[0])["heights"].shape == (8,), "the next task adds to the saved hills"
    assert arrays["bias_energy"][0] > 0


def test_replica_exchange_keeps_a_ladder_and_records_its_exchanges(tmp_path, ensemble_path):
    ladder = [300.0, 360.0, 430.0]
    result = explore(tmp_path, "replica_exchange", ensemble_path, ethanol_starts(tmp_path, 3),
                      temperature_ladder_K=ladder, exchange_interval=2,
                      steps_per_task=40)  # fmt: skip
    record = json.loads((tmp_path / "frames0.exchanges.json").read_text())
    assert record == result["exchanges"] and record["ladder_K"] == ladder
    assert sum(record["attempted"]) == 20 and sum(record["accepted"]) > 0
    replicas = [read(w["last_frame_path"]).info[REPLICA_KEY] for w in result["walkers"]]
    assert sorted(replicas) == [0, 1, 2], "the replicas are a permutation of the rungs"
    for rung, walker in zip(ladder, result["walkers"], strict=True):
        assert read_arrays(walker["output_path"])["temperature_K"] == pytest.approx(rung)
    with pytest.raises(ValueError, match="one walker per rung"):
        explore(tmp_path, "replica_exchange", ensemble_path, ethanol_starts(tmp_path, 2),
                 temperature_ladder_K=ladder)  # fmt: skip


# ---------------------------------------------------------------- bad input
CAMPAIGN = """
name = "bad"
[system]
structure = "CH3CH2OH"
[oracle]
calculator = "ase.calculators.emt:EMT"
kwargs = {{}}
[generator]
{generator}
"""


@pytest.mark.parametrize(
    "generator, message",
    [
        (
            'kind = "metadynamics"\ncollective_variables = [{kind = "dihedral", '
            "atoms = [3, 2, 1, 40], width = 0.3}]",
            "names atom 40, but the start structure has 9",
        ),
        (
            'kind = "metadynamics"\ncollective_variables = [{kind = "distance", atoms = [0, 1], '
            "width = 0.1}]\nhill_height_eV = -0.05",
            "hill_height_eV",
        ),
        (
            'kind = "metadynamics"\ncollective_variables = [{kind = "distance", atoms = [0, 1], '
            "width = 0.1}]\nbias_factor = 1.0",
            "bias_factor",
        ),
        ('kind = "replica_exchange"\ntemperature_ladder_K = []', "at least two temperatures"),
        ('kind = "replica_exchange"\ntemperature_ladder_K = [400.0, 300.0]', "must rise"),
        ('kind = "metadynamics"', "needs generator.collective_variables"),
    ],
    ids=[
        "atom-index",
        "negative-hill",
        "bias-factor",
        "empty-ladder",
        "unsorted-ladder",
        "no-cvs",
    ],  # fmt: skip
)
def test_bad_exploration_settings_exit_2_with_one_line(tmp_path, generator, message):
    campaign = tmp_path / "c.toml"
    campaign.write_text(CAMPAIGN.format(generator=generator))
    result = run_cli("--site", "threads.py", "--campaign", str(campaign),
                     "--run-dir", str(tmp_path / "run"), timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists(), "nothing is created"


def test_a_bias_on_a_backend_without_a_committee_is_refused(tmp_path):
    (tmp_path / "single.py").write_text(
        "from palflow.apps.models.schnet import SchNetBackend, SchNetSettings\n"
        "class SingleSettings(SchNetSettings):\n    name: str = 'single'\n"
        "class Single(SchNetBackend):\n    settings = SingleSettings\n    committee = False\n"
    )
    campaign = tmp_path / "c.toml"
    campaign.write_text(
        CAMPAIGN.format(generator='kind = "biased_md"')
        + f'[model]\nname = "{tmp_path / "single.py"}:Single"\n'
    )
    result = run_cli("--site", "threads.py", "--campaign", str(campaign),
                     "--run-dir", str(tmp_path / "run"), timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "gives no committee" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_every_exploring_example_validates():
    from palflow.pipeline.config.settings import load_campaign

    for name in ("ethanol_biased", "ethanol_replica_exchange", "alanine_metadynamics"):
        campaign = load_campaign(ROOT / "examples" / f"{name}.toml")
        assert campaign.generator.kind in ("biased_md", "replica_exchange", "metadynamics")


# ---------------------------------------------------------------- what a second reader asked
def argon_dynamics(temperatures, settings=None, bias=None, n=2):
    """Batched Langevin MD of ``n`` Ar13 clusters on ASE's Lennard-Jones (one walker at a
    time through the calculator), each at its own temperature."""
    from palflow.apps.common import draw_velocities
    from palflow.apps.md.dynamics import BatchedDynamics

    rng = np.random.default_rng(0)
    walkers = []
    for k in range(n):
        atoms = read(ROOT / "examples" / "structures" / "ar13.xyz")
        draw_velocities(atoms, temperatures[k], rng)
        walkers.append(atoms)
    given = {"timestep_fs": 5.0, "temperature_K": 40.0, "friction": 0.05, **(settings or {})}
    settings = GeneratorSettings(**given).model_dump()
    calculator = LennardJones(sigma=3.405, epsilon=0.0104, rc=10.0)
    dynamics = BatchedDynamics(calculator, walkers, settings, rng, bias=bias)
    dynamics.kT = units.kB * np.asarray(temperatures, dtype=float)
    return dynamics


def test_each_walker_is_thermostatted_at_its_own_temperature():
    dynamics = argon_dynamics([10.0, 40.0])
    kinetic = []
    for step in range(1500):
        dynamics.step([0, 1])
        if step >= 300:
            kinetic.append([a.get_temperature() for a in dynamics.walkers])
    measured = np.mean(kinetic, axis=0)
    assert measured == pytest.approx([10.0, 40.0], rel=0.15)


def test_a_swap_exchanges_configurations_and_rescales_momenta():
    dynamics = argon_dynamics([10.0, 40.0])
    a, b = (w.copy() for w in dynamics.walkers)
    dynamics.walkers[0].info["tag"], dynamics.walkers[1].info["tag"] = "a", "b"
    results = list(dynamics.results.values())
    dynamics.swap(0, 1)
    first, second = dynamics.walkers
    assert np.allclose(first.positions, b.positions) and np.allclose(second.positions, a.positions)
    assert np.allclose(first.get_momenta(), b.get_momenta() * np.sqrt(10 / 40))
    assert np.allclose(second.get_momenta(), a.get_momenta() * np.sqrt(40 / 10))
    assert (first.info["tag"], second.info["tag"]) == ("b", "a")
    assert dynamics.results[0] is results[1] and dynamics.results[1] is results[0]


class Push:
    """A bias of a constant force on atom 0."""

    def forces(self, i, atoms, evaluation, kT):
        forces = np.zeros((len(atoms), 3))
        forces[0, 0] = 0.2
        return forces, 0.0


def test_the_bias_forces_move_the_walkers():
    plain, pushed = argon_dynamics([20.0, 20.0]), argon_dynamics([20.0, 20.0], bias=Push())
    for _ in range(50):
        plain.step([0, 1])
        pushed.step([0, 1])
    shift = pushed.walkers[0].positions[0, 0] - plain.walkers[0].positions[0, 0]
    assert shift > 0.1, "the push (0.2 eV/Å for 250 fs: about 0.2 Å) moved atom 0 along x"
    assert np.allclose(pushed.forces(0)[0, 0] - pushed.results[0].forces[0, 0], 0.2)


def test_a_reset_walker_takes_the_replica_missing_from_its_ladder(tmp_path, ensemble_path):
    starts = ethanol_starts(tmp_path, 3)
    for path, replica in ((starts[0], 2), (starts[2], 0)):  # walker 1 was reset: no replica
        atoms = read(path)
        atoms.info[REPLICA_KEY] = replica
        write(path, atoms)
    result = explore(tmp_path, "replica_exchange", ensemble_path, starts,
                     temperature_ladder_K=[300.0, 360.0, 430.0], exchange_interval=20)  # fmt: skip
    first = [int(read_arrays(w["output_path"])["replica"][0]) for w in result["walkers"]]
    assert first == [2, 1, 0]


def test_hills_follow_each_walkers_own_steps_across_tasks(tmp_path, ensemble_path):
    start = ethanol_starts(tmp_path, 1)
    hills = [str(tmp_path / "hills" / "walker000.npz")]
    counts = []
    for task in range(3):  # 20 steps a task, a hill every 30 of the walker's steps
        folder = tmp_path / f"task{task}"
        folder.mkdir()
        result = explore(folder, "metadynamics", ensemble_path, start, hills_paths=hills,
                         collective_variables=dihedrals(0.3), hill_interval=30)  # fmt: skip
        start = [result["walkers"][0]["last_frame_path"]]
        counts.append(result["hills"])
    assert counts == [0, 1, 2]
    assert np.load(hills[0])["steps"].tolist() == [30, 60]


def test_a_pair_both_groups_hold_counts_once():
    atoms = rattled_ethanol()
    overlapping = {"kind": "coordination", "atoms": [0, 1, 2], "to_atoms": [1, 2], "r0": 1.6}
    value, _ = colvars.evaluate(atoms, [overlapping])
    distances = atoms.get_all_distances()
    pairs = {(0, 1), (0, 2), (1, 2)}
    x = np.array([distances[i, j] for i, j in pairs]) / 1.6
    assert value[0] == pytest.approx(((1 - x**6) / (1 - x**12)).sum())


@pytest.mark.parametrize(
    "given, message",
    [
        ({"kind": "replica_exchange", "temperature_ladder_K": [300.0, 400.0],
          "integrator": "verlet"}, "needs a thermostat"),
        ({"temperature_schedule": [[0, 1.0], [100, 2.0]], "integrator": "verlet"},
         "needs a thermostat"),
        ({"kind": "replica_exchange", "temperature_ladder_K": [300.0, 400.0],
          "temperature_schedule": [[0, 1.0], [100, 2.0]]}, "drop generator.temperature_schedule"),
        ({"kind": "replica_exchange", "temperature_ladder_K": [300.0, 400.0],
          "exchange_interval": 500}, "no exchange would be tried"),
        ({"temperature_schedule": [[10, 1.0]]}, "must start at 0"),
    ],
    ids=["ladder-verlet", "schedule-verlet", "ladder-schedule", "interval", "schedule-start"],
)  # fmt: skip
def test_settings_that_cannot_work_together_are_refused(given, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        GeneratorSettings(**given)
