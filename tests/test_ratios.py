"""``benchmarks/ratios.py``: the statistics behind every headline claim, on cases
whose answers are known by hand (ties, censored runs, runs that all fail)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from ratios import (  # noqa: E402
    Cost,
    area_ratio,
    area_ratio_to_later_end,
    compare,
    holm,
    jsonable_ratios,
    seed_ratio,
    wilcoxon_exact,
    words,
)

NEVER = Cost.never


@pytest.mark.parametrize(
    ("mine", "theirs", "expected"),
    [
        (Cost(20), Cost(40), 0.5),  # both reached
        (NEVER(100), NEVER(100), 1.0),  # neither: a tie
        (Cost(20), NEVER(80), 0.25),  # only mine: bounded by what theirs spent, never 0
        (NEVER(100), Cost(40), math.inf),  # only theirs: never reached
        (Cost(0), Cost(0), 1.0),  # both at the target from the start
        (Cost(10), Cost(0), math.inf),
        (0.2, 0.4, 0.5),  # areas
        (None, 0.4, math.inf),  # mine failed: lost
        (0.2, None, 1.0),  # the baseline failed: no evidence for the claim
    ],
)
def test_seed_ratio_resolves_censoring_against_the_claim(mine, theirs, expected):
    assert seed_ratio(mine, theirs) == expected


def test_five_agreeing_seeds_give_the_smallest_exact_p():
    result = compare({s: Cost(10) for s in range(5)}, {s: Cost(20) for s in range(5)})
    assert result["median"] == 0.5 and result["interval_95"] == [0.5, 0.5]
    assert result["wilcoxon_p"] == pytest.approx(2 / 2**5)  # all signs alike, either way
    assert result["reached"] == {"mine": 1.0, "theirs": 1.0}


def test_wilcoxon_matches_scipy_exact_without_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    logs = [0.3, -0.1, 0.5, 0.7, -0.9, 1.1, 1.3, 0.2]
    expected = scipy_stats.wilcoxon(logs, method="exact").pvalue
    assert wilcoxon_exact([math.exp(x) for x in logs]) == pytest.approx(expected)


def test_ties_carry_no_sign_and_all_ties_give_no_test():
    assert wilcoxon_exact([1.0, 1.0, 1.0]) is None
    # one untied seed among ties: p = 1 (two sign sets, both as extreme)
    assert wilcoxon_exact([1.0, 1.0, 0.5]) == pytest.approx(1.0)


def test_a_campaign_where_every_run_fails_is_a_tie():
    result = compare({s: NEVER(100) for s in range(4)}, {s: NEVER(100) for s in range(4)})
    assert result["median"] == 1.0 and result["ties"] == 4 and result["wilcoxon_p"] is None
    assert result["reached"] == {"mine": 0.0, "theirs": 0.0}


def test_a_claim_whose_runs_never_reach_the_target_loses():
    result = compare({s: NEVER(100) for s in range(5)}, {s: Cost(30) for s in range(5)})
    assert math.isinf(result["median"]) and result["interval_95"] == [math.inf, math.inf]
    assert words(result["median"]) == "never reached"
    assert jsonable_ratios(result)["median"] == "never reached"


def test_one_failed_seed_of_five_keeps_every_resample():
    """A resample with three or more of the failed seed (5.8% of them) has an infinite
    median: the interval's upper end is infinite, not dropped."""
    mine = {0: NEVER(100), 1: Cost(10), 2: Cost(10), 3: Cost(10), 4: Cost(10)}
    result = compare(mine, {s: Cost(20) for s in range(5)})
    assert result["median"] == 0.5
    assert result["interval_95"][0] == 0.5 and math.isinf(result["interval_95"][1])


def test_a_seed_missing_on_one_side_is_not_dropped():
    result = compare({0: 0.1, 1: 0.1, 2: 0.1}, {0: 0.2, 1: 0.2})
    assert result["seeds"] == 3 and result["ratios"][2] == 1.0


def test_holm_adjusts_in_steps():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    # a comparison without a p (every seed tied) counts in the family
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    assert adjusted == pytest.approx({"a": 0.04, "b": 0.09, "c": 0.09, "d": None})


def test_log_area_is_the_geometric_mean_error_on_the_window():
    from ratios import log_area, paired_window

    flat = [(0, 0.1), (10, 0.1)]
    halving = [(0, 0.2), (10, 0.1)]  # log error linear: the mean log is log(sqrt(0.02))
    assert log_area(flat, 0, 10) == pytest.approx(0.1)
    assert log_area(halving, 0, 10) == pytest.approx(math.sqrt(0.02))
    assert log_area(halving, 0, 5) == pytest.approx(
        math.exp((math.log(0.2) * 3 + math.log(0.1)) / 4)
    )
    assert paired_window(flat, [(2, 0.3), (8, 0.3)]) == (2, 8)
    assert log_area(flat, 0, 20) is None  # the curve does not reach the window's end
    assert log_area([(0, 0.0), (10, 0.1)], 0, 10) is None


def test_a_diverged_run_loses_and_nan_is_refused():
    """A NaN error (training blew up) has no area, so its seed loses; a NaN ratio or
    cost is refused rather than read as evidence either way."""
    from ratios import log_area

    assert log_area([(0, 0.1), (10, math.nan)], 0, 10) is None
    assert log_area([(0, 0.1), (10, math.inf)], 0, 10) is None
    assert seed_ratio(None, 0.3) == math.inf
    with pytest.raises(ValueError):
        wilcoxon_exact([0.9, 1.1, math.nan])
    with pytest.raises(ValueError):
        seed_ratio(Cost(math.nan), Cost(3))


def test_wilcoxon_with_tied_magnitudes_matches_the_enumeration():
    """Ranks of tied magnitudes are shared, including |log(a/b)| = |log(b/a)|, which
    floating point may not give as equal."""
    import itertools

    ratios = [1 / 7, 7, 2, 0.5, 3, 0.25]
    logs = [math.log(r) for r in ratios]
    magnitudes = [round(abs(x), 12) for x in logs]
    order = sorted(set(magnitudes))
    ranks = []
    for m in magnitudes:  # mean ranks by hand
        below = sum(x < m for x in magnitudes)
        ranks.append(below + (magnitudes.count(m) + 1) / 2)
    observed = sum(r for r, x in zip(ranks, logs, strict=True) if x > 0)
    centre = sum(ranks) / 2
    sums = [
        sum(r for r, sign in zip(ranks, signs, strict=True) if sign)
        for signs in itertools.product((0, 1), repeat=len(ranks))
    ]
    expected = sum(abs(w - centre) >= abs(observed - centre) - 1e-9 for w in sums) / len(sums)
    assert len(order) == 4 and wilcoxon_exact(ratios) == pytest.approx(expected)


def test_reached_shares_count_every_seed_and_json_keeps_never_in_words():
    from ratios import for_json, held_to

    result = compare({0: Cost(5)}, {0: Cost(10), 1: Cost(10)})
    assert result["reached"] == {"mine": 0.5, "theirs": 1.0}  # mine's missing run lost
    row = {"median_labels_to_target": math.inf, "final": 0.2, "area": math.inf}
    assert for_json(row) == {
        "median_labels_to_target": "never reached",
        "final": 0.2,
        "area": math.inf,
    }
    assert held_to([(0, 0.3), (50, 0.1)], 600) == [(0, 0.3), (50, 0.1), (600, 0.1)]
    assert held_to([(0, 0.3), (50, 0.1)], 50) == [(0, 0.3), (50, 0.1)]


def test_a_run_that_ends_first_keeps_its_last_error_to_the_later_end():
    fast = [(0.0, 0.4), (10.0, 0.1)]  # done at 10 s
    slow = [(5.0, 0.4), (40.0, 0.2)]  # first version at 5 s, done at 40 s
    # on the window both cover (5-10 s) only; fast's last 0.1 would never count again
    assert area_ratio(fast, slow) is not None
    ratio = area_ratio_to_later_end(fast, slow, 10.0, 40.0)
    # 5-40 s: fast falls from 0.2 to 0.1 (log-linear) over 5-10 s, then holds 0.1 for 30 s;
    # slow falls log-linearly from 0.4 to 0.2 over 5-40 s
    log_fast = (5 * (math.log(0.2) + math.log(0.1)) / 2 + 30 * math.log(0.1)) / 35
    log_slow = (math.log(0.4) + math.log(0.2)) / 2
    assert ratio == pytest.approx(math.exp(log_fast - log_slow))
    # a run ending before the other's first version still has an area, held to the end
    early = [(0.0, 0.3), (4.0, 0.1)]
    assert area_ratio(early, slow) is None
    assert area_ratio_to_later_end(early, slow, 4.0, 40.0) == pytest.approx(
        0.1 / math.exp(log_slow)
    )
    assert area_ratio_to_later_end([], slow, 4.0, 40.0) is None
