"""benchmarks/scale.py at tiny sizes: the real coordinator on the simulated site."""

from __future__ import annotations

import json
import math

import pytest

from tests.test_benchmarks import run_benchmark

FIGURES = ("cpu_s_per_label", "bytes_per_label", "peak_rss_mb", "resume_s")


def finite_positive(row: dict, *keys: str) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, row)


@pytest.mark.timeout(600)
def test_scale_quick(tmp_path):
    """Every figure of every point, finite; each point reached the labels asked."""
    out = run_benchmark(tmp_path, "scale.py", "--quick", "--no-before", timeout=540)
    assert "goals, after" in out
    result = json.loads((tmp_path / "scale_quick.json").read_text())
    sweeps = result["sweeps"]
    assert [r["labels"] for r in sweeps["labels"]["after"]] == [24, 48]
    assert [r["walkers"] for r in sweeps["walkers"]["after"]] == [1]
    assert [r["slots"] for r in sweeps["slots"]["after"]] == [8]
    for rows in sweeps.values():
        for row in rows["after"]:
            assert row["labels_reached"] == row["labels"]
            assert row["stop_reason"].startswith("label budget")
            finite_positive(row, *FIGURES, "latency_p50_ms", "latency_p99_ms", "versions")
            finite_positive(row, "turn_p99_ms", "label_bytes_per_label", "walker_segments")
            finite_positive(row, "generator_bytes_per_segment", "model_bytes_per_version")
            assert sum(t["n"] for t in row["turn_ms_by_app"].values()) == row["tasks"]
            # the stand-ins' CPU time is measured and taken out, not the whole
            assert 0 < row["standin_cpu_s"] < row["process_cpu_s"]
            assert row["resumed_labels"] == row["labels_total"]
    for row in sweeps["labels"]["after"]:  # resumed from a copy taken half-way
        finite_positive(row, "killed_resume_s")
    goals = result["goals"]["after"]
    assert set(goals) == {
        "cpu_per_label_ratio", "bytes_per_label_flat", "label_bytes_flat", "resume_s",
        "peak_rss_mb", "latency_p99_ms",
    }  # fmt: skip
    assert all(isinstance(g["met"], bool) and g["value"] is not None for g in goals.values())
    assert "/tmp" not in json.dumps(result) and "/work" not in json.dumps(result)
    assert (tmp_path / "scale_quick.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scale_before_and_after(tmp_path):
    """The old commit runs from its own tree, to the size it is allowed; beyond, its
    figures are a fit, and say so."""
    args = ["--quick", "--labels", "24", "48", "96", "--before-max-labels", "48"]
    run_benchmark(tmp_path, "scale.py", *args, timeout=840)
    result = json.loads((tmp_path / "scale_quick.json").read_text())
    before = result["sweeps"]["labels"]["before"]
    assert [(r["labels"], bool(r.get("extrapolated"))) for r in before] == [
        (24, False), (48, False), (96, True)
    ]  # fmt: skip
    assert before[-1]["fitted_to"] == [24, 48]
    finite_positive(before[-1], *FIGURES)
    assert result["goals"]["before"]["resume_s"]["extrapolated"] is True
    assert result["codes"]["before"] == "4c36776"
