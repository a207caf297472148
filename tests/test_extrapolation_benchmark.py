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
    out = run_benchmark(tmp_path, "--quick", "--target", "same=2.0")
    text = (tmp_path / "extrapolation.json").read_text()
    assert str(ROOT) not in text and str(tmp_path) not in text
    assert tempfile.gettempdir() + "/" not in text
    result = json.loads(text)
    strategies = {"max force spread", "random"}
    assert {r["strategy"] for r in result["runs"]} == strategies
    assert result["status"] == "finished" and result["targets"] == {"same": 2.0}
    assert result["protocol"]["primary"]["mine"] == "max force spread"
    assert result["protocol"]["seeds"] == [0, 1] and result["protocol"]["targets"] == {"same": 2.0}
    assert set(result["secondary"]) == {"max force spread"}
    for name_set in SETS:
        area = result["secondary"]["max force spread"][name_set]["area_ratio"]
        assert area["seeds"] == 2 and len(area["interval_95"]) == 2
    labels = result["secondary"]["max force spread"]["same"]["labels_ratio"]
    assert set(labels["reached"]) == {"mine", "theirs"}
    assert result["primary"]["seeds"] == 2
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
    assert "primary: max force spread / random" in out and "at or below the threshold" in out
    assert (tmp_path / "extrapolation.png").stat().st_size > 0

    again = run_benchmark(
        tmp_path, "--reanalyse", str(tmp_path / "extrapolation.json"), "--target", "same=1.5"
    )
    assert "same: target 1.5000 eV/Å" in again


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
    assert set(result["secondary"]["max force spread"]) == set(result["sets"])
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
    runs += [made_up_run("max force spread", s, 8 + 4 * s) for s in range(5)]
    table = extrapolation.analyse(runs, {name: 0.2 for name in SETS})
    for name_set in SETS:
        ratio = table["secondary"]["max force spread"][name_set]["labels_ratio"]
        assert ratio["median"] == 0.5 and ratio["interval_95"] == [0.5, 0.5]
        assert ratio["wilcoxon_p"] == pytest.approx(2 / 2**5)
        assert ratio["reached"] == {"mine": 1.0, "theirs": 1.0}
        assert table["rows"]["max force spread"][name_set]["median_labels_to_target"] == 16
        assert table["rows"]["random"][name_set]["median_labels_to_target"] == 32
    # eight comparisons (4 sets x area, labels), each p = 1/16: Holm multiplies the
    # smallest by 8
    holm = [
        m["holm_p"] for per in table["secondary"]["max force spread"].values() for m in per.values()
    ]
    assert min(holm) == pytest.approx(8 * 2 / 2**5)
    assert table["primary"]["seeds"] == 5 and table["primary"]["median"] < 1
    assert table["selection"]["random"]["fraction_below_threshold"] == 0.25


def test_runs_that_never_reach_the_target_are_censored_not_dropped(extrapolation):
    """A run that never gets there is censored at its last version's labels: the
    median can stay finite while the interval's upper end is "never reached"."""
    runs = [made_up_run("random", s, 20) for s in range(5)]
    hits = [10, 10, 10, None, None]
    runs += [made_up_run("patchy", s, h) for s, h in enumerate(hits)]
    runs += [made_up_run("never", s, None) for s in range(5)]
    table = extrapolation.analyse(runs, {name: 0.2 for name in SETS})
    patchy = table["secondary"]["patchy"]["same"]["labels_ratio"]
    assert patchy["median"] == 0.5 and patchy["reached"]["mine"] == 0.6
    assert patchy["interval_95"][0] == 0.5 and math.isinf(patchy["interval_95"][1])
    never = table["secondary"]["never"]["same"]["labels_ratio"]
    assert math.isinf(never["median"]) and table["rows"]["never"]["same"]["reached"] == 0
    from ratios import for_json  # the benchmarks' folder: on the path (the fixture)

    saved = for_json(table)
    assert saved["secondary"]["patchy"]["same"]["labels_ratio"]["interval_95"] == [
        0.5,
        "never reached",
    ]
    assert saved["secondary"]["never"]["same"]["labels_ratio"]["median"] == "never reached"


def test_without_a_target_only_areas_are_compared(extrapolation):
    """No target is taken from the runs; the primary figure is the paired ratio of
    geometric-mean errors over the labels both runs cover."""
    runs = [made_up_run("random", s, 32, final=0.04) for s in range(3)]
    runs += [made_up_run("max force spread", s, 32, final=0.01) for s in range(3)]
    table = extrapolation.analyse(runs)
    assert (
        table["targets"] == {} and "median_labels_to_target" not in table["rows"]["random"]["same"]
    )
    assert set(table["secondary"]["max force spread"]["same"]) == {"area_ratio"}
    # the curves differ only from 32 to 64 labels, log-linearly down to 0.01 against 0.04
    expected = math.exp(0.5 * 0.5 * (math.log(0.01) - math.log(0.04)))
    area = table["secondary"]["max force spread"]["hot"]["area_ratio"]
    assert area["median"] == pytest.approx(expected)
    assert table["primary"]["median"] == pytest.approx(expected)
    assert table["primary"]["ratios"] == pytest.approx(dict.fromkeys(range(3), expected))


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
