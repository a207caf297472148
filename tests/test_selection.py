"""Selection rules and the oracle queue: ordering, caps, diversity, re-ranking."""

from ase.build import molecule

from palflow.pipeline.policies.selection import Candidate, OracleQueue, select_frames


def make(candidate_id: int, force: float, version: int = 1) -> Candidate:
    return Candidate(candidate_id, molecule("H2O"), force, 0.01 * force, version)


def test_select_frames_takes_most_uncertain_above_threshold():
    spread = [0.01, 0.5, 0.02, 0.3, 0.9, 0.04]
    assert select_frames(spread, threshold=0.05, max_picks=10, min_gap=0) == [4, 1, 3]


def test_select_frames_caps_picks_per_trajectory():
    spread = [0.6, 0.7, 0.8, 0.9]
    assert select_frames(spread, threshold=0.1, max_picks=2, min_gap=0) == [3, 2]


def test_select_frames_skips_neighbouring_frames():
    # Frames 4, 5 and 6 are one uncertain region of the trajectory: take one of them.
    spread = [0.0, 0.0, 0.2, 0.0, 0.8, 0.9, 0.7, 0.0, 0.0, 0.5]
    assert select_frames(spread, threshold=0.1, max_picks=5, min_gap=3) == [5, 9, 2]


def test_select_frames_nothing_above_threshold():
    assert select_frames([0.01, 0.02], threshold=0.05, max_picks=3, min_gap=1) == []


def test_queue_pops_most_uncertain_first():
    queue = OracleQueue(max_size=10)
    queue.extend([make(1, 0.2), make(2, 0.9), make(3, 0.5), make(4, 0.1)])
    assert [c.candidate_id for c in queue.pop_batch(2)] == [2, 3]
    assert [c.candidate_id for c in queue.pop_batch(5)] == [1, 4]
    assert len(queue) == 0


def test_queue_evicts_least_uncertain_when_full():
    queue = OracleQueue(max_size=2)
    evicted = queue.extend([make(1, 0.3), make(2, 0.1), make(3, 0.6)])
    assert [c.candidate_id for c in evicted] == [2]
    assert [c.candidate_id for c in queue.candidates()] == [3, 1]


def test_rescore_drops_confident_and_reorders_rest():
    queue = OracleQueue(max_size=10)
    queue.extend([make(1, 0.9), make(2, 0.5), make(3, 0.3)])
    dropped = queue.rescore(
        {1: (0.01, 0.0), 2: (0.2, 0.0), 3: (0.8, 0.0)}, version=2, threshold=0.05
    )
    assert [c.candidate_id for c in dropped] == [1]
    assert [c.candidate_id for c in queue.candidates()] == [3, 2]
    assert all(c.version == 2 for c in queue.candidates())


def test_rescore_ignores_older_versions_and_unknown_ids():
    queue = OracleQueue(max_size=10)
    queue.extend([make(1, 0.9, version=5), make(2, 0.5, version=1)])
    dropped = queue.rescore(
        {1: (0.0, 0.0), 2: (0.7, 0.0), 99: (1.0, 0.0)}, version=3, threshold=0.05
    )
    assert dropped == []
    scores = {c.candidate_id: c.force_disagreement for c in queue.candidates()}
    assert scores == {1: 0.9, 2: 0.7}


def test_a_priority_orders_the_queue_instead_of_the_spread():
    """Random selection ranks by its draw: the force spread no longer decides."""
    queue = OracleQueue(max_size=3)
    low, high = make(1, 0.9), make(2, 0.1)
    low.priority, high.priority = 0.2, 0.8
    evicted = queue.extend([low, high, make(3, 0.5), make(4, 0.7)])
    # Without a priority a candidate ranks by its spread; 0.2 is the lowest rank.
    assert [c.candidate_id for c in evicted] == [1]
    assert [c.candidate_id for c in queue.pop_batch(3)] == [2, 4, 3]


def test_candidates_keep_their_priority_through_the_journal(tmp_path):
    from palflow.apps.data.dataset import write_dataset
    from palflow.pipeline.resume.journal import candidate_arrays, read_candidates

    ranked, plain = make(1, 0.3), make(2, 0.6)
    ranked.priority = 0.25
    path = tmp_path / "queue.npz"
    write_dataset(path, [ranked.atoms, plain.atoms], extra=candidate_arrays([ranked, plain]))
    restored, _ = read_candidates(path)
    assert [c.priority for c in restored] == [0.25, None]
    assert [c.rank for c in restored] == [0.25, 0.6]
