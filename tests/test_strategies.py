"""Selection strategies: every measure on hand-made ensembles with known answers, the
registry, queries, thresholds, metrology, and user plug-ins in a real campaign."""

import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import molecule

from palflow.apps.errors import PluginError
from palflow.pipeline.config.settings import load_campaign
from palflow.pipeline.policies import measures
from palflow.pipeline.policies.measures import (
    MEASURES,
    EnsemblePrediction,
    MeasureContext,
    descriptor,
    get_measure,
    register_measure,
)
from palflow.pipeline.policies.metrology import (
    learning_curve_area,
    load_plugins,
    measure_version,
    spearman_rho,
)
from palflow.pipeline.policies.protocols import (
    Evaluation,
    Generator,
    Label,
    Metrology,
    Query,
    QueryContext,
)
from palflow.pipeline.policies.selection import Candidate, OracleQueue
from palflow.pipeline.policies.strategies import (
    ClusterQuery,
    CoresetQuery,
    Selector,
    TopQuery,
    make_query,
)
from tests.test_coordinator import EXAMPLES, run_campaign, small_campaign

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def two_structures():
    """K = 2 members on two structures: S0 has atoms 0 and 1, S1 has atom 2.

    Atom 0: members say (1,0,0) and (-1,0,0): mean 0, spread 1.
    Atom 1: both say 0: spread 0.
    Atom 2: members say (2,0,0) and (2,0,4): mean (2,0,2), spread 2.
    Energies: S0 1 and 3 eV (std 1, 0.5 eV/atom); S1 5 and 5 eV.
    """
    forces = np.zeros((2, 3, 3))
    forces[0, 0] = [1, 0, 0]
    forces[1, 0] = [-1, 0, 0]
    forces[0, 2] = [2, 0, 0]
    forces[1, 2] = [2, 0, 4]
    return EnsemblePrediction(
        member_energies=np.array([[1.0, 5.0], [3.0, 5.0]]),
        member_forces=forces,
        structure_index=np.array([0, 0, 1]),
        n_atoms=np.array([2, 1]),
    )


def score(name, prediction, **options):
    return get_measure(name)(prediction, MeasureContext(np.random.default_rng(0), options=options))


def test_spread_measures_give_the_known_answers(two_structures):
    np.testing.assert_allclose(score("max_force_spread", two_structures), [1.0, 2.0])
    np.testing.assert_allclose(score("mean_force_spread", two_structures), [0.5, 2.0])
    np.testing.assert_allclose(score("energy_spread", two_structures), [0.5, 0.0])
    # |mean F| is 0 on atom 0 and 2√2 on atom 2; epsilon 1 eV/Å.
    np.testing.assert_allclose(
        score("relative_force_spread", two_structures), [1.0, 2 / (2 * np.sqrt(2) + 1)]
    )
    np.testing.assert_allclose(
        score("ucb", two_structures, kappa=2.0), [0 + 2 * 1.0, 2 * np.sqrt(2) + 2 * 2.0]
    )
    np.testing.assert_allclose(score("ucb", two_structures, kappa=0.0), [0.0, 2 * np.sqrt(2)])


def test_thompson_scores_with_one_random_member():
    """One atom, K = 3: members say 0, 0 and (3,0,0); mean (1,0,0). Deviations 1, 1, 2:
    a draw gives 2 when it picks the third member, about a third of the time."""
    forces = np.zeros((3, 1, 3))
    forces[2, 0] = [3, 0, 0]
    prediction = EnsemblePrediction(np.zeros((3, 1)), forces, np.array([0]), np.array([1]))
    context = MeasureContext(np.random.default_rng(1))
    draws = np.array([get_measure("thompson")(prediction, context)[0] for _ in range(300)])
    assert set(np.round(draws, 6)) == {1.0, 2.0}
    assert 0.2 < (draws == 2.0).mean() < 0.47


def test_random_ignores_the_ensemble(two_structures):
    a = score("random", two_structures)
    assert a.shape == (2,) and ((0 <= a) & (a < 1)).all()
    other = get_measure("random")(two_structures, MeasureContext(np.random.default_rng(5)))
    assert not np.allclose(a, other)


def test_labelled_distance_is_relative_to_the_labelled_spacing(two_structures):
    """Labelled at 0, 1 and 3 (1-D descriptors): nearest-neighbour distances 1, 1, 2,
    median 1. Candidates at 0.5 and 5 are 0.5 and 2 from the labelled set."""
    two_structures.descriptors = np.array([[0.5], [5.0]])
    context = MeasureContext(labelled_descriptors=np.array([[0.0], [1.0], [3.0]]))
    np.testing.assert_allclose(get_measure("labelled_distance")(two_structures, context), [0.5, 2])
    alone = get_measure("labelled_distance")(two_structures, MeasureContext())
    assert np.isinf(alone).all(), "with nothing labelled, everything is new"


def test_descriptor_is_invariant_and_sensitive():
    ethanol = molecule("CH3CH2OH")
    turned = ethanol.copy()
    turned.rotate(70, "z")
    turned.translate([3, -1, 2])
    shuffled = turned[np.random.default_rng(0).permutation(len(turned))]
    stretched = ethanol.copy()
    stretched.positions *= 1.15
    d = descriptor([ethanol, shuffled, stretched])
    np.testing.assert_allclose(d[0], d[1], atol=1e-9)
    assert np.linalg.norm(d[0] - d[2]) > 0.1 * np.linalg.norm(d[0])


def test_registry_takes_a_decorated_measure_and_refuses_a_clash(two_structures):
    @register_measure("test_double_spread")
    def double(prediction, context):
        return 2 * measures.max_force_spread(prediction, context)

    try:
        np.testing.assert_allclose(score("test_double_spread", two_structures), [2.0, 4.0])
        with pytest.raises(ValueError, match="already registered"):
            register_measure("test_double_spread")(lambda p, c: p.n_atoms)
        with pytest.raises(PluginError, match="unknown measure 'nope'"):
            get_measure("nope")
        by_path = get_measure("palflow.pipeline.policies.measures:energy_spread")
        np.testing.assert_allclose(by_path(two_structures, MeasureContext()), [0.5, 0.0])
    finally:
        MEASURES.pop("test_double_spread", None)
        MEASURES.pop("palflow.pipeline.policies.measures:energy_spread", None)


def test_every_built_in_measure_scores_a_real_ensemble_prediction():
    """The registry's measures run on what the model predicts, one score per structure."""
    import torch

    from palflow.apps.models.calculator import predict_structures
    from palflow.apps.models.schnet.network import ModelSpec, SchNetEnsemble

    torch.manual_seed(0)
    model = SchNetEnsemble(ModelSpec(cutoff=4.0, n_features=8, n_interactions=1, n_rbf=4), 3)
    frames = [molecule("CH3CH2OH"), molecule("H2O"), molecule("CH4")]
    out = predict_structures(model, frames)
    prediction = EnsemblePrediction(
        out["member_energies"],
        np.concatenate(out["member_forces"], axis=1),
        np.repeat(np.arange(3), [len(f) for f in frames]),
        np.array([len(f) for f in frames]),
        descriptors=descriptor(frames),
    )
    np.testing.assert_allclose(
        score("max_force_spread", prediction), out["force_disagreement"], rtol=1e-6
    )
    context = MeasureContext(np.random.default_rng(0), labelled_descriptors=descriptor(frames[:1]))
    for name in ("energy_spread", "mean_force_spread", "relative_force_spread", "ucb",
                 "thompson", "random", "labelled_distance"):  # fmt: skip
        values = MEASURES[name](prediction, context)
        assert values.shape == (3,) and np.isfinite(values).all(), name


# ------------------------------------------------------------------------ queries
def candidates_at(xs, scores=None):
    """Candidates whose first atom sits at x; descriptors are that x (1-D)."""
    out = []
    for i, x in enumerate(xs):
        atoms = molecule("H2O")
        atoms.positions[0] = [x, 0, 0]
        out.append(Candidate(i, atoms, 0.0, 0.0, 1, priority=(scores or [0.0] * len(xs))[i]))
    return sorted(out, key=lambda c: c.rank, reverse=True)


def x_of(structures):
    return np.array([[a.positions[0, 0]] for a in structures])


def test_coreset_picks_what_is_farthest_from_the_labelled_and_the_picked():
    candidates = candidates_at([0.0, 0.1, 5.0, 10.0])
    context = QueryContext(np.random.default_rng(0), np.array([[0.0]]), x_of)
    picked = CoresetQuery().select(candidates, 2, context)
    assert [c.atoms.positions[0, 0] for c in picked] == [10.0, 5.0]


def test_cluster_takes_the_best_of_each_cluster():
    # Two tight clusters; scores make index 1 best in the first, index 4 in the second.
    candidates = candidates_at([0.0, 0.1, 0.2, 10.0, 10.1], scores=[0.1, 0.9, 0.3, 0.2, 0.5])
    context = QueryContext(np.random.default_rng(0), None, x_of)
    picked = ClusterQuery().select(candidates, 2, context)
    assert sorted(c.priority for c in picked) == [0.5, 0.9]


def test_hybrid_batch_mixes_top_and_random():
    campaign = load_campaign(selection__random_fraction=0.5)
    draws = set()
    for seed in range(10):
        queue = OracleQueue(20)
        queue.extend(candidates_at(list(range(10)), scores=[i / 10 for i in range(10)]))
        batch = Selector(campaign, seed=seed).pick_batch(queue, 4)
        ids = [c.candidate_id for c in batch]
        assert ids[:2] == [9, 8], "half the batch is the top of the queue"
        assert len(set(ids)) == 4 and len(queue) == 6
        draws.add(tuple(ids[2:]))
    assert len(draws) > 3, "the other half is drawn at random"


def test_a_user_query_plugs_in_without_a_base_class():
    query = make_query(str(EXAMPLES / "plugins" / "fresh_first.py") + ":FreshFirst")
    assert isinstance(query, Query)
    old = Candidate(1, molecule("H2O"), 0.9, 0.0, version=1)
    fresh = Candidate(2, molecule("H2O"), 0.2, 0.0, version=3)
    assert query.select([old, fresh], 1, QueryContext(np.random.default_rng(0))) == [fresh]
    with pytest.raises(PluginError, match="unknown query"):
        make_query("best")
    with pytest.raises(PluginError, match="no select"):
        make_query("palflow.pipeline.policies.measures:MeasureContext")


def test_the_built_ins_implement_the_protocols():
    from palflow.apps.generator import _run_md
    from palflow.apps.oracle import _label_batch

    assert all(isinstance(q(), Query) for q in (TopQuery, CoresetQuery, ClusterQuery))
    assert isinstance(_label_batch, Label) and isinstance(_run_md, Generator)
    worst_case = load_plugins([str(EXAMPLES / "plugins" / "worst_case.py") + ":WorstCase"])[0]
    assert isinstance(worst_case, Metrology)


# ----------------------------------------------------------------------- thresholds
def test_percentile_threshold_follows_recent_scores(two_structures):
    selector = Selector(load_campaign(selection__threshold_mode="percentile",
                                      selection__threshold_percentile=50.0))  # fmt: skip
    assert selector.threshold() == 0.05, "too few scores yet: the fixed threshold"
    for _ in range(10):
        selector.score(two_structures, [])  # scores 1 and 2, alternately
    assert selector.threshold() == pytest.approx(1.5)


def test_calibrated_threshold_meets_the_target_error():
    selector = Selector(load_campaign(selection__threshold_mode="calibrated",
                                      selection__calibration_target=0.1))  # fmt: skip
    spread = np.array([0.1, 0.2, 0.3, 0.4])
    selector.calibrate(Evaluation(1, 10, 2 * spread, spread, np.zeros(4)))
    # Error is twice the spread: a frame is expected to be 0.1 eV/Å off at spread 0.05.
    assert selector.threshold() == pytest.approx(0.05)


def test_trust_levels():
    selector = Selector(load_campaign(selection__upper_threshold=1.0))
    assert selector.out_of_domain(np.array([0.5, 1.5])).tolist() == [False, True]
    assert not Selector(load_campaign()).out_of_domain(np.array([1e9])).any()
    assert Selector(load_campaign(selection__measure="random")).threshold() == -np.inf


# ------------------------------------------------------------------------ metrology
def test_spearman_and_learning_curve_area():
    x = np.array([0.1, 0.2, 0.3, 0.4])
    assert spearman_rho(x, x**2) == pytest.approx(1.0)
    assert spearman_rho(x, -x) == pytest.approx(-1.0)
    assert spearman_rho(x, np.ones(4)) is None
    assert learning_curve_area([0, 10], [1.0, 0.0]) == pytest.approx(0.5)
    assert learning_curve_area([0, 10, 20], [0.3, 0.1, 0.1]) == pytest.approx(0.15)
    assert learning_curve_area([5], [0.1]) is None


def test_a_failing_plugin_costs_only_its_own_metrics():
    def broken(evaluation):
        raise RuntimeError("bug in a user's metric")

    spread = np.array([0.1, 0.2, 0.3])
    evaluation = Evaluation(2, 40, spread * 3, spread, np.zeros(3), {"force_mae": 0.4})
    record = measure_version(evaluation, [broken, lambda e: {"n": len(e.force_error)}])
    assert record["force_mae"] == 0.4 and record["uncertainty_spearman"] == pytest.approx(1.0)
    assert record["n"] == 3 and record["version"] == 2


# ------------------------------------------------------------- in a real campaign
@pytest.mark.timeout(400)
def test_a_campaign_with_user_plugins_records_their_metrics(tmp_path):
    plugins = EXAMPLES / "plugins"
    campaign = small_campaign(
        selection__measure="ucb",
        selection__threshold_mode="percentile",
        selection__threshold_percentile=60.0,
        selection__query=f"{plugins / 'fresh_first.py'}:FreshFirst",
        selection__random_fraction=0.25,
        metrology__plugins=[f"{plugins / 'worst_case.py'}:WorstCase"],
    )
    run, summary = run_campaign(tmp_path, campaign)
    assert summary["labels"] == 24
    metrics = [
        json.loads(line) for line in Path(run.path("metrics.jsonl")).read_text().split("\n") if line
    ]
    assert len(metrics) >= 2
    for record in metrics:
        assert record["force_error_max"] >= record["force_error_p90"] >= 0
        assert -1 <= record["uncertainty_spearman"] <= 1
        assert record["force_rmse"] >= record["force_mae"] > 0
    assert summary["learning_curve_area"] > 0
    assert summary["test_errors"][-1]["force_error_max"] == metrics[-1]["force_error_max"]


@pytest.mark.timeout(300)
def test_frames_above_the_upper_trust_level_reset_walkers_and_are_not_labelled(tmp_path):
    campaign = small_campaign(selection__upper_threshold=1e-6, stop__max_wall_s=25.0)
    _, summary = run_campaign(tmp_path, campaign)
    assert summary["labels"] == 0
    assert summary["walker_resets"] > 0


@pytest.mark.timeout(300)
def test_a_coreset_campaign_labels_its_budget(tmp_path):
    campaign = small_campaign(selection__query="coreset", stop__max_labels=12)
    run, summary = run_campaign(tmp_path, campaign)
    assert summary["labels"] == 12
