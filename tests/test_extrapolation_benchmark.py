"""benchmarks/extrapolation.py: a tiny run end to end, and its analysis on made-up runs
with known answers."""

import importlib.util
import json
import math
import tempfile
from pathlib import Path

import pytest

from tests.test_benchmarks import run_benchmark as run_benchmarks_script

ROOT = Path(__file__).resolve().parent.parent
SETS = ("same", "hot", "strain", "other_phase")


def run_benchmark(tmp_path, *args):
    # The runs' work folder (tempfile.mkdtemp) lands in tmp_path too.
    return run_benchmarks_script(
        tmp_path, "extrapolation.py", *args, timeout=240, env={"TMPDIR": str(tmp_path)}
    )


@pytest.fixture
def extrapolation(monkeypatch):
    """The benchmark script as a module (its siblings import from its folder)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "extrapolation_under_test", ROOT / "benchmarks" / "extrapolation.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_quick_run(tmp_path):
    out = run_benchmark(tmp_path, "--quick")
    text = (tmp_path / "extrapolation.json").read_text()
    assert str(ROOT) not in text and str(tmp_path) not in text
    assert tempfile.gettempdir() + "/" not in text
    result = json.loads(text)
    strategies = {"max force spread", "random"}
    assert {r["strategy"] for r in result["runs"]} == strategies
    assert set(result["targets"]) == set(SETS)
    assert all(math.isfinite(t) and t > 0 for t in result["targets"].values())
    assert set(result["labels_ratio_vs_random"]) == strategies
    for name in strategies:
        for name_set in SETS:
            ratio = result["labels_ratio_vs_random"][name][name_set]
            assert set(ratio) >= {"median_ratio", "ci95"} and len(ratio["ci95"]) == 2
    # Random against itself, seed by seed: exactly 1 where its median run reaches the
    # target; undefined (null) where it never does (a tiny run's 2 seeds may not).
    for name_set, ratio in result["labels_ratio_vs_random"]["random"].items():
        if result["rows"]["random"][name_set]["median_labels_to_target"] is None:
            assert ratio["median_ratio"] is None, name_set
        else:
            assert ratio["median_ratio"] == 1.0 and ratio["ci95"] == [1.0, 1.0], name_set
    for name_set, info in result["sets"].items():
        assert info["n_structures"] == 4 and info["labels_finite"], name_set
        assert 0 < info["mean_abs_force"] <= info["max_abs_force"] < 50
    assert result["sets"]["other_phase"]["periodic_frames"] == 4
    assert result["sets"]["same"]["periodic_frames"] == 0
    assert result["sets"]["strain"]["max_abs_force"] > result["sets"]["same"]["max_abs_force"]
    for run in result["runs"]:
        assert run["labels"] == 8 and run["run_dir"].startswith("WORK/")
        for name_set in SETS:
            curve = run["curves"][name_set]
            assert len(curve) >= 2
            assert all(math.isfinite(p["force_mae"]) and p["force_mae"] > 0 for p in curve)
            assert curve[0]["labels"] == 0 and curve[-1]["labels"] == 8
        selection = run["selection"]
        assert selection["frames_scored"] > 0 and selection["frames_picked"] > 0
        assert 0 <= selection["fraction_below_threshold"] <= 1
    spread = [r for r in result["runs"] if r["strategy"] == "max force spread"]
    assert all(r["selection"]["threshold_median"] == 0.03 for r in spread)  # cu_emt.toml's
    assert "ratio vs random" in out and "at or below the threshold" in out
    assert (tmp_path / "extrapolation.png").stat().st_size > 0

    again = run_benchmark(
        tmp_path, "--reanalyse", str(tmp_path / "extrapolation.json"), "--target", "same=1.5"
    )
    assert "same: target test force MAE 1.5000 eV/Å" in again


@pytest.mark.timeout(300)
def test_quick_run_on_a_molecule_scores_torsions(tmp_path):
    """With the default campaign (GFN2-xTB ethanol), a torsion set labelled by xTB takes
    the place of copper's other phase, and every run is scored on it."""
    run_benchmark(
        tmp_path, "--quick", "--campaign", "examples/ethanol_xtb.toml", "--hot", "1000",
        "--seeds", "0", "--name", "ethanol",
    )  # fmt: skip
    result = json.loads((tmp_path / "ethanol.json").read_text())
    assert set(result["sets"]) == {"same", "hot", "strain", "torsion"}
    torsion = result["sets"]["torsion"]
    assert torsion["n_structures"] == 4 and torsion["labels_finite"]
    assert torsion["periodic_frames"] == 0 and torsion["mean_abs_force"] > 0
    for run in result["runs"]:
        assert [p["labels"] for p in run["curves"]["torsion"]][-1] == 8
    assert set(result["labels_ratio_vs_random"]["max force spread"]) == set(result["sets"])
    assert (tmp_path / "ethanol.png").stat().st_size > 0


def made_up_run(strategy, seed, hit, final=0.05, sets=SETS):
    """A learning curve that crosses 0.2 eV/Å at ``hit`` labels (None: never)."""
    points = [(0, 1.0)] + ([(hit, 0.1), (64, final)] if hit is not None else [(64, 0.5)])
    curve = [{"labels": labels, "force_mae": mae} for labels, mae in points]
    selection = {
        "frames_scored": 100,
        "fraction_below_threshold": 0.25,
        "frames_picked": 20,
        "threshold_median": 0.03,
    }
    return {
        "strategy": strategy,
        "seed": seed,
        "curves": dict.fromkeys(sets, curve),
        "selection": selection,
    }


def test_half_of_random_labels_gives_ratio_one_half(extrapolation):
    runs = [made_up_run("random", s, 16 + 8 * s) for s in range(5)]
    runs += [made_up_run("fast", s, 8 + 4 * s) for s in range(5)]
    table = extrapolation.analyse(runs, {name: 0.2 for name in SETS})
    for name_set in SETS:
        ratio = table["labels_ratio_vs_random"]["fast"][name_set]
        assert ratio["median_ratio"] == 0.5 and ratio["ci95"] == [0.5, 0.5]
        assert table["rows"]["fast"][name_set]["median_labels_to_target"] == 16
        assert table["rows"]["random"][name_set]["median_labels_to_target"] == 32
        assert table["rows"]["fast"][name_set]["reached"] == 5
    assert table["selection"]["fast"]["fraction_below_threshold"] == 0.25


def test_runs_that_never_reach_the_target(extrapolation):
    """A run that never gets there needs infinitely many labels: the median can stay
    finite while the interval's upper bound is infinite (null in the JSON)."""
    runs = [made_up_run("random", s, 20) for s in range(5)]
    hits = [10, 10, 10, None, None]
    runs += [made_up_run("patchy", s, h) for s, h in enumerate(hits)]
    runs += [made_up_run("never", s, None) for s in range(5)]
    table = extrapolation.analyse(runs, {name: 0.2 for name in SETS})
    patchy = table["labels_ratio_vs_random"]["patchy"]["same"]
    assert patchy["median_ratio"] == 0.5
    assert patchy["ci95"][0] == 0.5 and math.isinf(patchy["ci95"][1])
    never = table["labels_ratio_vs_random"]["never"]["same"]
    assert math.isinf(never["median_ratio"]) and table["rows"]["never"]["same"]["reached"] == 0
    saved = json.loads(json.dumps(extrapolation.jsonable(table), allow_nan=False))
    assert saved["labels_ratio_vs_random"]["patchy"]["same"]["ci95"] == [0.5, None]
    assert saved["labels_ratio_vs_random"]["never"]["same"]["median_ratio"] is None


def test_default_target_and_area(extrapolation):
    """The default target of a set is the largest of the strategies' median final MAEs;
    the area is the mean MAE over the label range."""
    runs = [made_up_run("random", s, 32, final=0.04) for s in range(3)]
    runs += [made_up_run("other", s, 32, final=f) for s, f in enumerate((0.06, 0.08, 0.07))]
    table = extrapolation.analyse(runs)
    assert table["targets"]["same"] == pytest.approx(0.07)
    area = (0.5 * (1.0 + 0.1) * 32 + 0.5 * (0.1 + 0.04) * 32) / 64
    assert table["rows"]["random"]["same"]["median_learning_curve_area"] == pytest.approx(area)
    assert table["labels_ratio_vs_random"]["other"]["same"]["median_ratio"] == 1.0


def test_rotatable_bonds_and_torsion_frames(extrapolation):
    """Ethanol turns about C-C and C-O, ethane about C-C, a ring not at all; torsion
    frames differ from the start and from each other and keep every bond length."""
    import numpy as np
    from ase.build import molecule
    from ase.data import covalent_radii
    from extrapolation_sets import rotatable_bonds, torsion_frames

    ethanol = molecule("CH3CH2OH")
    symbols = ethanol.get_chemical_symbols()
    bonds = rotatable_bonds(ethanol)
    assert sorted("".join(sorted(symbols[i] + symbols[j])) for i, j, _ in bonds) == ["CC", "CO"]
    assert len(rotatable_bonds(molecule("C2H6"))) == 1
    assert rotatable_bonds(molecule("C6H6")) == [] and rotatable_bonds(molecule("CH4")) == []
    with pytest.raises(ValueError, match="no rotatable bond"):
        torsion_frames(molecule("CH4"), 4)

    frames = torsion_frames(ethanol, 5)
    radii = covalent_radii[ethanol.numbers]
    before = ethanol.get_all_distances()
    bonded = before < 1.2 * np.add.outer(radii, radii)
    seen = [ethanol.positions]
    for frame in frames:
        np.testing.assert_allclose(frame.get_all_distances()[bonded], before[bonded], atol=1e-9)
        assert not any(np.allclose(frame.positions, other, atol=1e-3) for other in seen)
        seen.append(frame.positions)
