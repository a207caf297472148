"""benchmarks/exploration.py's analysis on made-up runs with known answers: the primary
comparison on ethanol's strain set, the goals' verdicts, Holm over the secondaries, a
crashed run kept and counted, alanine's C7ax set and the basins visited; and one tiny
run end to end (slow)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest

from tests.test_benchmark_analyses import load
from tests.test_benchmarks import run_benchmark

ROOT = Path(__file__).resolve().parent.parent
exploration = load("exploration")
SETS = {"ethanol": ("same", "hot", "strain", "torsion"), "alanine": ("grid", "c7ax")}
MD = [(0, 1.0), (24, 0.2), (48, 0.1)]


def made_up(system, generator, seed, wall_s=30.0, error=None, **factors):
    """A run whose force MAE on each set is md's times ``factors[set]`` (default 1) at
    every version: its area ratio to md's is that factor exactly."""
    run = {"system": system, "generator": generator, "seed": seed, "budget": 48}
    if error:
        return run | {"error": error, "wall_s": 1.0}
    curves = {
        s: [{"labels": n, "force_mae": e * factors.get(s, 1.0)} for n, e in MD]
        for s in SETS[system]
    }
    return run | {"labels": 48, "wall_s": wall_s, "curves": curves}


def campaign(seeds, strain=1.0, same=1.0, c7ax=1.0):
    """Every generator of both systems with ``seeds``: biased_md's strain, replica
    exchange's same and alanine metadynamics' c7ax at the given factors."""
    runs = []
    for seed in seeds:
        runs += [made_up("ethanol", "md", seed), made_up("alanine", "md", seed)]
        runs.append(made_up("ethanol", "biased_md", seed, strain=strain))
        runs.append(made_up("ethanol", "metadynamics", seed))
        runs.append(made_up("ethanol", "replica_exchange", seed, same=same, wall_s=60.0))
        runs.append(made_up("alanine", "metadynamics", seed, c7ax=c7ax, grid=0.8))
    return runs


def verdicts(table):
    return {g["name"]: g["verdict"] for g in table["goals"]}


def test_the_primary_comparison_is_biased_md_over_md_on_strain():
    runs = [made_up("ethanol", "md", s) for s in range(5)]
    runs += [made_up("ethanol", "biased_md", s, strain=0.5, hot=0.25) for s in range(5)]
    table = exploration.analyse(runs)
    primary = table["primary"]
    assert "biased_md / md" in primary["comparison"] and "'strain'" in primary["comparison"]
    assert primary["median"] == pytest.approx(0.5) and primary["seeds"] == 5
    assert primary["interval_95"] == pytest.approx([0.5, 0.5])
    assert primary["wilcoxon_p"] == pytest.approx(2 / 2**5), "exact: all 5 seeds one way"
    found = table["secondary"]["ethanol"]["biased_md"]
    assert found["hot"]["median"] == pytest.approx(0.25) and found["same"]["median"] == 1.0
    assert found["wall_time"]["median"] == 1.0
    assert "holm_p" not in found["strain"], "the primary is outside the Holm family"


def test_goals_met_with_ten_seeds_and_missed_with_the_numbers():
    met = exploration.analyse(campaign(range(10), strain=0.5, c7ax=0.4))
    assert verdicts(met) == dict.fromkeys(("primary", "in_distribution", "c7ax"), "met")
    assert "median 0.50 [0.50, 0.50] over 10 seeds" in met["goals"][0]["numbers"]
    assert met["secondary"]["ethanol"]["replica_exchange"]["wall_time"]["median"] == 2.0

    missed = exploration.analyse(campaign(range(10), strain=0.8, same=1.2, c7ax=0.6))
    assert verdicts(missed) == dict.fromkeys(("primary", "in_distribution", "c7ax"), "not met")
    assert "replica_exchange: median 1.20" in missed["goals"][1]["numbers"]
    assert "median 0.60" in missed["goals"][2]["numbers"]

    few = exploration.analyse(campaign(range(5), strain=0.5, c7ax=0.4))
    assert verdicts(few)["primary"] == "not met", "fewer than 10 paired seeds"
    alone = exploration.analyse([made_up("ethanol", "md", s) for s in range(3)])
    assert set(verdicts(alone).values()) == {"not tested"} and alone["primary"] is None


def test_holm_corrects_the_secondaries_together():
    """biased_md on 4 sets + wall time, one the primary: a family of 4 with alanine
    absent; 'same' at p = 1/16 is multiplied by 4, the tied ones count but stay None."""
    runs = [made_up("ethanol", "md", s) for s in range(5)]
    runs += [made_up("ethanol", "biased_md", s, same=0.5, strain=0.5) for s in range(5)]
    table = exploration.analyse(runs)
    found = table["secondary"]["ethanol"]["biased_md"]
    assert found["same"]["wilcoxon_p"] == pytest.approx(1 / 16)
    assert found["same"]["holm_p"] == pytest.approx(4 / 16)
    assert found["hot"]["holm_p"] is None and found["wall_time"]["holm_p"] is None
    # with alanine's three (grid, c7ax, wall time) the family has 7
    runs += [made_up("alanine", "md", s) for s in range(5)]
    runs += [made_up("alanine", "metadynamics", s, c7ax=0.5) for s in range(5)]
    table = exploration.analyse(runs)
    assert table["secondary"]["ethanol"]["biased_md"]["same"]["holm_p"] == pytest.approx(7 / 16)
    assert table["secondary"]["alanine"]["metadynamics"]["c7ax"]["holm_p"] == pytest.approx(7 / 16)


def test_a_crashed_run_is_kept_counted_and_loses_its_seed():
    runs = [made_up("ethanol", "md", s) for s in range(4)]
    runs += [made_up("ethanol", "biased_md", s, strain=0.5) for s in range(3)]
    runs.append(made_up("ethanol", "biased_md", 3, error="RuntimeError: walker blew up"))
    runs[0] = made_up("ethanol", "md", 0, error="OSError: oracle gone")
    table = exploration.analyse(runs)
    assert table["n_failed"] == 2
    assert {(r["generator"], r["seed"], r["error"]) for r in table["failed"]} == {
        ("md", 0, "OSError: oracle gone"),
        ("biased_md", 3, "RuntimeError: walker blew up"),
    }
    ratios = table["primary"]["ratios"]
    assert ratios[0] == 1.0, "md crashed: a tie, no evidence for biased_md"
    assert ratios[1] == ratios[2] == pytest.approx(0.5)
    assert math.isinf(ratios[3]), "biased_md crashed: it loses the seed"
    assert table["rows"]["ethanol"]["biased_md"]["failed"] == 1
    assert table["rows"]["ethanol"]["biased_md"]["runs"] == 4
    assert math.isinf(table["secondary"]["ethanol"]["biased_md"]["wall_time"]["ratios"][3])
    from ratios import for_json

    assert for_json(table)["primary"]["ratios"]["3"] == "never reached"


def test_the_c7ax_set_holds_only_the_phi_above_zero_frames(tmp_path):
    import numpy as np
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for phi, psi in [(-80, 75), (75, -60), (60, 40), (-0.5, 10), (150, 150)]:
        atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
        atoms.info.update(phi=phi, psi=psi, basin="x")
        forces = np.full((2, 3), abs(phi) / 100)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=forces)
        frames.append(atoms)
    grid = tmp_path / "grid.extxyz"
    write(grid, frames, format="extxyz")
    sets = load("exploration_sets").alanine_sets(tmp_path / "work", grid)
    assert sets["grid"]["n_structures"] == 5 and sets["c7ax"]["n_structures"] == 3
    from palflow.apps.data.dataset import read_dataset

    kept = read_dataset(sets["c7ax"]["path"])
    assert sorted(round(float(np.abs(a.get_forces()).max()), 2) for a in kept) == [0.6, 0.75, 1.5]


def test_basins_visited_counts_the_grids_basins_only():
    from alanine_grid import basin

    sets = load("exploration_sets")
    grid_basins = ["C7eq", "C7ax", "alphaR", "alphaL", "beta", "other"]
    angles = [(-80, 75), (-81, 70), (75, -60), (0, 0), (170, -170)]  # C7eq x2, C7ax, other x2
    found = sets.basins_visited(angles, grid_basins, basin)
    assert found["basins_visited"] == ["C7ax", "C7eq"] and found["basins_in_grid"] == 5
    assert found["share"] == pytest.approx(2 / 5) and found["frames"] == 5
    assert found["frames_per_region"] == {"C7ax": 1, "C7eq": 2, "other": 2}
    # a basin the grid lacks does not count
    assert sets.basins_visited(angles, ["C7eq", "beta"], basin)["share"] == 0.5
    assert sets.basins_visited([], grid_basins, basin)["share"] == 0


@pytest.mark.slow
@pytest.mark.xtb
@pytest.mark.timeout(300)
def test_quick_run_of_plain_md_on_ethanol(tmp_path, require_xtb):
    out = run_benchmark(
        tmp_path, "exploration.py", "--quick", "--systems", "ethanol", "--generators", "md",
        timeout=280, env={"TMPDIR": str(tmp_path)},
    )  # fmt: skip
    text = (tmp_path / "exploration.json").read_text()
    assert str(ROOT) not in text and tempfile.gettempdir() + "/" not in text
    result = json.loads(text)
    assert result["status"] == "finished" and result["n_failed"] == 0
    protocol = result["protocol"]
    assert protocol["primary"]["mine"] == "biased_md" and protocol["primary"]["set"] == "strain"
    assert protocol["seeds"] == [0, 1] and list(protocol["generators"]["ethanol"]) == ["md"]
    assert set(protocol["sets"]["ethanol"]) == set(SETS["ethanol"])
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    for run in result["runs"]:
        assert run["labels"] == 8 and run["run_dir"].startswith("WORK/")
        assert set(run["curves"]) == set(SETS["ethanol"])
        assert all(c[-1]["labels"] == 8 for c in run["curves"].values())
    assert {g["verdict"] for g in result["goals"]} == {"not tested"}
    assert "[not tested]" in out and "failed runs: 0" in out
    assert (tmp_path / "exploration.png").stat().st_size > 0
