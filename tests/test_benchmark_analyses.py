"""The analyses of the benchmarks that compare variants over seeds, on made-up runs
with known answers: which side a claim is about, censored runs, held curves."""

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    """A benchmark script as a module (its siblings import from its folder)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        f"{name}_under_test", ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(seed, points, wall_s=None, labels=None, **fields):
    """A run whose curve has ``(wall_s, labels, force_mae)`` points."""
    curve = [{"wall_s": w, "labels": n, "force_mae": e} for w, n, e in points]
    return {
        "seed": seed,
        "curve": curve,
        "wall_s": wall_s if wall_s is not None else curve[-1]["wall_s"],
        "labels": labels if labels is not None else curve[-1]["labels"],
        "final_force_mae": curve[-1]["force_mae"],
        **fields,
    }


FAST = [(0, 0, 0.4), (10, 8, 0.2), (20, 16, 0.1)]
SLOW = [(0, 0, 0.4), (20, 8, 0.2), (40, 16, 0.1)]


def test_time_to_accuracy_is_about_streaming():
    tta = load("time_to_accuracy")
    runs = [run(s, FAST, variant="streaming") for s in range(3)]
    runs += [run(s, SLOW, variant="serial") for s in range(3)]
    result = tta.analyse(runs, target=0.2)
    versus = result["table"]["serial"]["streaming_over_this"]
    assert versus["wall_to_target"]["median"] == pytest.approx(0.5)  # 10 s against 20 s
    assert versus["labels_to_target"]["median"] == pytest.approx(1.0)  # both at 8 labels
    # over [0, 20] s: log error falls twice as fast for streaming
    expected = math.exp(
        (math.log(0.4) + 2 * math.log(0.2) + math.log(0.1)) / 4
        - (math.log(0.4) + math.log(0.2)) / 2
    )
    assert versus["area_wall_s"]["median"] == pytest.approx(expected)
    assert result["primary"] is versus["area_wall_s"]
    # serial never reaching the target is censored at its end, against streaming
    runs[3:] = [run(s, [(0, 0, 0.4), (40, 16, 0.3)], variant="serial") for s in range(3)]
    never = tta.analyse(runs, target=0.2)["table"]["serial"]["streaming_over_this"]
    assert never["wall_to_target"]["median"] == pytest.approx(10 / 40)  # a bound, not 0
    assert never["wall_to_target"]["reached"] == {"mine": 1.0, "theirs": 0.0}


def test_a_run_that_stops_improving_keeps_its_last_error_to_its_end():
    tta = load("time_to_accuracy")
    stalled = [
        run(s, [(0, 0, 0.4), (50, 8, 0.1)], wall_s=600, variant="streaming") for s in range(3)
    ]
    steady = [
        run(s, [(0, 0, 0.4), (50, 8, 0.2), (600, 64, 0.01)], variant="serial") for s in range(3)
    ]
    result = tta.analyse(stalled + steady, target=None)
    area = result["table"]["serial"]["streaming_over_this"]["area_wall_s"]
    assert area["median"] > 1, "streaming stalled at 0.1 for 550 s while serial reached 0.01"


def test_remote_oracle_compares_with_the_stronger_serial_loop_and_its_ideal():
    remote = load("remote_oracle")
    phases = {"label": 1.0, "train": 1.0, "generate": 0.0}  # PAL's S = 2
    runs = []
    for s in range(3):
        runs.append(run(s, FAST, loop="streaming", ratio=1.0, oracle_concurrency=2.0, phase_s=None))
        runs.append(run(s, SLOW, loop="serial", ratio=1.0, oracle_concurrency=2.0, phase_s=phases))
        worse = [(0, 0, 0.4), (40, 16, 0.3)]
        runs.append(
            run(s, worse, loop="serial_one_task", ratio=1.0, oracle_concurrency=2.0, phase_s=phases)
        )
    result = remote.analyse(runs, target=0.2)
    point = result["points"]["1"]
    assert point["stronger_serial"] == "serial"
    assert point["streaming_over_stronger"] is point["streaming_over_serial"]
    assert "streaming_over_serial_one_task" in point  # both serial loops are reported
    assert point["pal_ideal_speedup"] == pytest.approx(2.0)
    assert point["measured_speedup"] == pytest.approx(2.0)  # 20 s against 10 s
    assert point["measured_over_ideal"] == pytest.approx(1.0)
    assert point["oracle_concurrency"] == 2.0
    assert result["primary"]["ratio"] == "1"
    assert result["primary"]["median"] == point["streaming_over_serial"]["area"]["median"]
    assert all(p is None or 0 < p <= 1 for p in result["secondary_holm_p"].values())


def test_finetuning_counts_every_label_and_keeps_censored_runs():
    models = load("models")
    scratch = [
        run(s, [(0, 0, 0.3), (1, 40, 0.07)], variant="mace", initial_labels=16) for s in range(3)
    ]
    tuned = [
        run(
            s,
            [(0, 0, 0.2), (1, 8, 0.05)],
            variant="finetune",
            initial_labels=16,
            foundation_labels=100,
        )
        for s in range(3)
    ]
    result = models.finetune_labels(scratch + tuned, target=0.08)
    assert result["without_foundation_labels"]["median"] == pytest.approx(24 / 56)
    # no other target to report: 0.08 is the one asked for. The area: the tuned runs
    # end at 24 labels (8 and 16 initial), so the window is 16-24, where scratch falls
    # linearly in log from 0.3 at 16 towards 0.07 at 56
    assert result["at_other_targets"] == {}
    log_tuned = (math.log(0.2) + math.log(0.05)) / 2
    log_scratch = math.log(0.3) + (math.log(0.07) - math.log(0.3)) * (4 / 40)  # mean on 16-24
    assert result["area"]["median"] == pytest.approx(math.exp(log_tuned - log_scratch))
    assert result["with_foundation_labels"]["median"] == pytest.approx(124 / 56)
    assert result["foundation_labels"] == 100
    tuned[0] = run(
        0, [(0, 0, 0.2), (1, 30, 0.1)], variant="finetune", initial_labels=16, foundation_labels=100
    )
    censored = models.finetune_labels(scratch + tuned, target=0.08)["without_foundation_labels"]
    assert math.isinf(censored["ratios"][0]) and censored["reached"]["mine"] == pytest.approx(2 / 3)


def test_strategies_compare_paired_areas_with_random():
    strategies = load("strategies")
    runs = [run(s, SLOW, strategy="random", final_uncertainty_spearman=None) for s in range(5)]
    better = [(0, 0, 0.4), (10, 8, 0.1), (20, 16, 0.05)]  # half random's error from 8 labels
    runs += [run(s, better, strategy="spread", final_uncertainty_spearman=0.5) for s in range(5)]
    runs += [
        run(s, SLOW, strategy="same as random", final_uncertainty_spearman=0.1) for s in range(5)
    ]
    result = strategies.analyse(runs, target=None)
    rows = result["rows"]
    assert "area_over_random" not in rows["random"]
    assert rows["same as random"]["area_over_random"]["median"] == pytest.approx(1.0)
    assert rows["same as random"]["area_over_random"]["wilcoxon_p"] is None  # all ties
    spread = rows["spread"]["area_over_random"]
    expected = math.exp((math.log(0.1) - math.log(0.2)) * 3 / 4)  # log ratio 0, then -log 2
    assert spread["median"] == pytest.approx(expected)
    assert spread["wilcoxon_p"] == pytest.approx(2 / 2**5)
    assert spread["holm_p"] == pytest.approx(2 * 2 / 2**5)  # a family of two
    assert rows["spread"]["median_labels_to_target"] is None and rows["spread"]["reached"] is None


def test_a_benchmark_cut_short_keeps_its_protocol_and_every_finished_run(tmp_path, monkeypatch):
    """The protocol (with the rule that fixed it, the commit and the load) is on disk
    before the first run, and each finished run right after it: a crash in the third
    run leaves the first two in the results file."""
    common = load("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))

    class Toy(common.CampaignBenchmark):
        name = "toy"
        defaults = {"labels": 4, "max_wall": 10.0, "site": "threads.py"}

        def prepare(self, args, work, site):
            assert not (tmp_path / "toy.json").exists()  # the protocol comes after this

        def variants(self, args, seed, runs):
            return ["a", "b"]

        def run(self, args, site, work, variant, seed):
            if seed == 1 and variant == "a":
                raise RuntimeError("the third run fails")
            return {"variant": variant, "seed": seed, "run_dir": str(work / variant)}

    with pytest.raises(RuntimeError, match="third run"):
        Toy("toy").main(["--seeds", "0", "1", "--rule", "targets from pilot seeds 0-4"])
    text = (tmp_path / "toy.json").read_text()
    result = __import__("json").loads(text)
    assert result["status"] == "running"
    assert [(r["variant"], r["seed"]) for r in result["done"]] == [("a", 0), ("b", 0)]
    assert result["done"][0]["run_dir"].startswith("WORK")
    protocol = result["protocol"]
    assert protocol["rule"] == "targets from pilot seeds 0-4"
    assert protocol["seeds"] == [0, 1] and protocol["labels"] == 4
    assert len(protocol["commit"].split("+")[0]) == 40
    assert len(protocol["load_average_before"]) == 3


def _clock_over(clock, goal, label_times, version_times, step=0.01, end=60.0):
    """Feed ``clock`` the counts a loop would show at every turn (every ``step`` s)."""
    for i in range(int(end / step)):
        now = i * step
        labels = sum(t <= now for t in label_times)
        versions = 1 + sum(t <= now for t in version_times)  # the first version
        if clock.observe(goal, now, labels, versions):
            return clock.wall_s
    raise AssertionError("the clock never stopped")


@pytest.mark.parametrize("offset", [0.05, 0.5, 0.95])
def test_overlap_clocks_a_period_from_an_event_to_its_like(monkeypatch, offset):
    """Streaming: a label every 0.5 s (N = 2 an iteration, so 1 s an iteration of
    labels), a version every 2 s whatever the labels. Whatever part of a training
    period is left when the first label comes, 8 iterations take 8 training periods.
    Clocked from that label to the 8th version after it, they took 7 + offset."""
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    overlap = load("overlap")
    first_label = 3.0
    labels = [first_label + 0.5 * k for k in range(60)]
    versions = [first_label + offset * 2.0 + 2.0 * k for k in range(30)]
    wall = _clock_over(overlap._SteadyClock(), 8, labels, versions)
    assert wall == pytest.approx(16.0, abs=0.03)
    spans = overlap._SteadyClock()
    _clock_over(spans, 8, labels, versions)
    assert spans.spans_s["labels"] == pytest.approx(8.0, abs=0.03)


def test_overlap_clocks_the_serial_loop_over_whole_iterations(monkeypatch):
    """Serial: label (1 s, both labels at its end), train (2 s, a version at its end),
    generate (0.5 s), 3.5 s an iteration: 8 iterations are 28 s on either span."""
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    overlap = load("overlap")
    labels = [t for k in range(12) for t in (1.0 + 3.5 * k,) * 2]
    versions = [3.0 + 3.5 * k for k in range(12)]
    clock = overlap._SteadyClock()
    assert _clock_over(clock, 8, labels, versions) == pytest.approx(28.0, abs=0.03)
    assert clock.spans_s == pytest.approx({"labels": 28.0, "versions": 28.0}, abs=0.03)


def test_overlap_counts_the_serial_loops_labels_by_iteration(monkeypatch):
    """A serial iteration that finds fewer than N candidates to label still counts as
    one iteration (N labels), and a phase's labels seen over two turns count once."""
    from types import SimpleNamespace

    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    overlap = load("overlap")
    loop = SimpleNamespace(state=SimpleNamespace(n_labels_active=0), iterations=0)
    loop._labelled_iterations, loop._labels_seen = set(), 0  # as MeasuredSerial starts
    counted = []
    # iteration 0: none yet; 1: both labels in one turn; 2: one label (a short
    # phase); 3: its two labels in two turns
    for iteration, labels in [(0, 0), (1, 2), (1, 2), (2, 3), (3, 4), (3, 5)]:
        loop.iterations, loop.state.n_labels_active = iteration, labels
        counted.append(overlap.MeasuredSerial.labels_clocked(loop))
    assert counted == [0, 2, 2, 4, 6, 6]
    assert overlap.N_LABELS == 2


def test_overlap_summary_gives_the_median_and_the_range_over_repeats(monkeypatch):
    """Case 1 (t_oracle = t_train = 1 s, t_gen = 0.1 s; N = P = 2): PAL's ideal from
    the serial run's task times is (1 + 1 + 0.1) / 1 = 2.1. Three repeats whose serial
    ÷ streaming walls are 2.1, 1.89 and 2.31: measured ÷ ideal 1.0, 0.9 and 1.1, the
    median of the walls 1.0 (21 ÷ 10), the range 0.9 to 1.1."""
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    overlap = load("overlap")
    tasks = {"oracle": 1.0, "train": 1.0, "generator": 0.1}
    phases = {"label": 1.0, "train": 1.0, "generate": 0.1}

    def run(wall: float) -> dict:
        return {"wall_s": wall, "cold_wall_s": wall, "task_s": tasks, "phase_s": phases}

    runs = {
        "serial": [run(21.0), run(18.9), run(23.1)],
        "streaming": [run(10.0), run(10.0), run(10.0)],
    }
    row = overlap.summarise("threads", next(iter(overlap.CASES)), runs, 8, 3)
    assert row["ideal_speedup"] == pytest.approx(2.1)
    assert row["measured_over_ideal"] == pytest.approx(1.0)
    assert row["measured_over_ideal_runs"] == pytest.approx([1.0, 0.9, 1.1])
    assert row["measured_over_ideal_range"] == pytest.approx([0.9, 1.1])


def stop_run(rule, seed, calls, error, reached=True, md=None, labels=None):
    """A run of benchmarks/convergence.py: its rule, oracle calls and final error."""
    fields = {"md_passed": md} if md is not None else {}
    return {
        "rule": rule,
        "seed": seed,
        "oracle_calls": calls,
        "labels": labels if labels is not None else calls,
        "final_force_mae": error,
        "wall_s": 10.0,
        "reached_stop": reached,
        **fields,
    }


def test_convergence_compares_every_rule_with_the_test_mae_stop_seed_by_seed():
    convergence = load("convergence")
    runs = []
    for seed in range(4):
        runs += [
            stop_run("budget", seed, 400, 0.030, md=seed != 3),
            stop_run("test_mae", seed, 350, 0.040),
            stop_run("accurate", seed, 140, 0.044),
        ]
    table = convergence.analyse(runs, 0.041)
    accurate = table["rows"]["accurate"]
    assert accurate["calls_over_test_mae"]["median"] == pytest.approx(0.4)
    assert accurate["error_over_test_mae"]["median"] == pytest.approx(1.1)
    assert table["rows"]["budget"]["md_passed"] == 3 and table["rows"]["budget"]["md_checked"] == 4
    assert "calls_over_test_mae" not in table["rows"]["test_mae"]
    assert table["goal"]["met"] is True


@pytest.mark.parametrize(
    "calls, error, reached, met",
    [
        (140, 0.050, True, False),  # 1.25x the error
        (250, 0.040, True, False),  # 0.71x the calls
        (140, 0.040, False, False),  # the cap stopped it: it tests the cap, not the rule
    ],
)
def test_the_convergence_goal_is_missed_by_error_calls_or_a_run_at_the_cap(
    calls, error, reached, met
):
    convergence = load("convergence")
    runs = []
    for seed in range(4):
        runs += [
            stop_run("test_mae", seed, 350, 0.040),
            stop_run("accurate", seed, calls, error, reached=reached or seed > 0),
        ]
    if not reached:  # one of four at the cap: 75% stopped by the rule, under 90%
        assert convergence.analyse(runs, 0.041)["rows"]["accurate"]["stopped_by_rule"] == 3
    assert convergence.analyse(runs, 0.041)["goal"]["met"] is met


def test_convergence_censors_a_run_at_the_cap_and_compares_with_the_budget_without_its_test_set():
    """A run that the cap stopped has no cost to its own stop: against a test-MAE stop
    that fired, its seed is "never reached". The budget without its held-out set is
    the budget's runs at their calls less that set's, with their errors."""
    convergence = load("convergence")
    runs = []
    for seed in range(5):
        capped = seed < 3
        runs += [
            stop_run("budget", seed, 577, 0.030, labels=240),
            stop_run("test_mae", seed, 450, 0.040, labels=113),
            stop_run(
                "accurate",
                seed,
                256 if capped else 200,
                0.033,
                reached=not capped,
                labels=240 if capped else 184,
            ),  # fmt: skip
        ]
    table = convergence.analyse(runs, 0.041, held_out_calls=321)
    accurate, derived = table["rows"]["accurate"], table["rows"]["budget_no_test"]
    assert math.isinf(accurate["calls_over_test_mae"]["median"])
    assert accurate["error_over_test_mae"]["median"] == pytest.approx(0.825)
    assert derived["median_oracle_calls"] == 256 and "md_checked" not in derived
    assert derived["calls_over_test_mae"]["median"] == pytest.approx(256 / 450)
    assert accurate["error_over_budget_no_test"]["median"] == pytest.approx(1.1)
    assert accurate["labels_over_budget_no_test"]["ratios"][4] == pytest.approx(184 / 240)
    assert table["goal"]["met"] is False
