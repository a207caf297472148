"""benchmarks/foundation.py's analysis on made-up curves: labels to a target with
censoring, the pairing of seeds, and the merge of part files."""

from __future__ import annotations

import json
import math

import pytest

from tests.test_benchmark_analyses import load

foundation = load("foundation")


def curve(*points):
    """A learning curve of ``(n, force MAE)`` points."""
    return [
        {"n": n, "force_mae": e, "zero_shot_force_mae": 0.1, "train_s": 1.0 * n}
        | {"zero_shot_energy_mae_per_atom": 0.01, "zero_shot_energy_mae_per_atom_raw": 1.0}
        for n, e in points
    ]


def test_labels_to_target_is_the_first_n_at_or_below_it_else_censored():
    reached = foundation.labels_to(curve((4, 0.3), (16, 0.1), (64, 0.05)), 0.1)
    assert (reached.value, reached.reached) == (16, True)
    never = foundation.labels_to(curve((2, 0.3), (16, 0.2)), 0.1)
    assert (never.value, never.reached) == (16, False), "censored at its largest n"


def test_analysis_pairs_seeds_and_keeps_the_censored():
    runs = {
        "mace_scratch": {
            "0": curve((4, 0.3), (16, 0.2), (64, 0.1)),
            "1": curve((4, 0.3), (16, 0.2), (64, 0.1)),
            "2": curve((4, 0.3), (16, 0.2), (64, 0.1)),
        },
        "sevennet_finetune": {
            "0": curve((2, 0.2), (4, 0.15), (8, 0.1), (16, 0.08)),  # 8 / 64
            "1": curve((2, 0.3), (4, 0.3), (8, 0.3), (16, 0.3)),  # never: loses
        },
    }
    analysis = foundation.analyse({"runs": runs, "target_force_mae": 0.1})
    labels = analysis["comparisons"]["sevennet_finetune"]["labels_to_target"]
    assert labels["seeds_paired"] == [0, 1] and labels["seeds_unfinished"] == [2]
    assert labels["ratios"][0] == pytest.approx(8 / 64)
    assert math.isinf(labels["ratios"][1]), "only the baseline reached it: never reached"
    assert not analysis["goal_met"]


def test_merge_refuses_a_seed_in_two_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(foundation.common, "RESULTS", tmp_path)
    monkeypatch.setattr(foundation, "_sevenn_provenance", lambda: {})
    part = {
        "protocol": {},
        "pilots": {"100": curve((4, 0.3), (64, 0.1))},
        "runs": {"mace_scratch": {"0": curve((4, 0.3), (64, 0.1))}},
    }
    (tmp_path / "foundation_copper_a.json").write_text(json.dumps(part))
    assert foundation.merged("copper")["target_force_mae"] == pytest.approx(0.1)
    (tmp_path / "foundation_copper_b.json").write_text(json.dumps({**part, "pilots": {}}))
    with pytest.raises(ValueError, match="seeds \\['0'\\] are in two parts"):
        foundation.merged("copper")
