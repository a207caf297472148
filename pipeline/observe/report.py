"""The run report: ``report.html`` and its PNGs, from the run directory's files alone.

    python pipeline/report.py RUN_DIR

Works on a finished run, a running one (the coordinator refreshes the report every
few minutes and once at the end) and a crashed one: it reads only what the
campaign writes as it goes (``events.jsonl``, ``metrics.jsonl``, ``state.json``,
``labels.db``, the generator's frame files and the ensemble checkpoints), never the
coordinator's memory, and it finds them through :class:`palflow.pipeline.state.rundir.RunDirectory`.
The HTML embeds its figures (:mod:`palflow.pipeline.observe.figures`), so it opens offline, with no
server; the same figures are written beside it in ``report/``.
"""

from __future__ import annotations

import base64
import html
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from palflow.apps.contracts import failure_counts
from palflow.pipeline.observe.figures import FIGURES, draw
from palflow.pipeline.state.rundir import (
    CAMPAIGN_FILE,
    METRICS_FILE,
    REPORT_FIGURES,
    REPORT_FILE,
    SUMMARY_FILE,
    RunDirectory,
    is_run_directory,
)

logger = logging.getLogger(__name__)


def run_status(root: str | Path) -> str:
    """``running`` (a coordinator holds the lock), ``finished`` or ``stopped early``.

    The lock comes first: a finished run that was resumed keeps its old summary.
    """
    run = RunDirectory(root)
    if run.is_locked():
        return "running"
    if run.file(SUMMARY_FILE).exists():
        return "finished"
    return "stopped early (no summary: killed or crashed; resume with --resume)"


class RunData:
    """What the report needs, read once from a run directory."""

    def __init__(self, root: str | Path) -> None:
        if not is_run_directory(root):
            raise FileNotFoundError(f"{root} is not a palflow run directory")
        self.run = RunDirectory(root)  # reading only: no lock
        self.root = self.run.root
        self.campaign = self.run.read_json(CAMPAIGN_FILE) or {}
        self.summary = self.run.read_json(SUMMARY_FILE)
        self.state = self.run.read_state()
        self.events = self.run.read_events()
        self.metrics = self.run.read_jsonl(METRICS_FILE) or self.state.get("test_errors", [])
        self.status = run_status(self.root)
        timed = [e for e in self.events if e.get("submitted")]
        if self.summary:
            self.t0 = self.summary["started_at"]
        elif timed:
            self.t0 = min(e["submitted"] for e in timed)
        else:
            self.t0 = time.time()
        self.t1 = max([e.get("returned", self.t0) for e in self.events] or [self.t0])

    @property
    def name(self) -> str:
        return self.campaign.get("name", self.root.name)

    @property
    def threshold(self) -> float | None:
        """The fixed selection threshold (eV/Å for the force measures), or None when
        the threshold moves with the run."""
        selection = self.campaign.get("selection", {})
        if selection.get("threshold_mode") != "fixed":
            return None
        return selection.get("threshold")

    def failures_by_kind(self) -> dict[str, int]:
        """Structures the oracle failed for good, by failure kind."""
        return failure_counts(self.state.get("task_failures", {}).values())

    def generator_frames(self) -> dict[int, list[float]]:
        """Force spread of every recorded MD frame, by the ensemble version that ran it."""
        by_version: dict[int, list[float]] = defaultdict(list)
        for _, path in self.run.walker_segments():
            try:
                with np.load(path) as data:
                    spread = data["force_disagreement"]
                    version = data["ensemble_version"] if "ensemble_version" in data else None
            except (OSError, ValueError, KeyError):
                continue  # a file being written, or torn by a crash
            if version is None or not len(spread):
                continue
            for v, s in zip(version.tolist(), spread.tolist(), strict=True):
                by_version[int(v)].append(float(s))
        return by_version

    def labelled_errors(self, limit: int = 400) -> tuple[np.ndarray, np.ndarray]:
        """For up to ``limit`` active labels: the force spread predicted when they were
        picked, and the true mean absolute force error of the ensemble that picked
        them (its checkpoint, against the oracle's forces)."""
        if not self.run.labels_db.exists():
            return np.zeros(0), np.zeros(0)
        with self.run.labels() as db:
            rows = [r for r in db.select(source="active") if "scored_version" in r.key_value_pairs]
        if not rows:
            return np.zeros(0), np.zeros(0)
        if len(rows) > limit:
            keep = np.random.default_rng(0).choice(len(rows), size=limit, replace=False)
            rows = [rows[i] for i in sorted(keep)]
        by_version: dict[int, list] = defaultdict(list)
        for row in rows:
            by_version[int(row.scored_version)].append(row)
        import torch
        from palflow.apps.models.calculator import predict_structures
        from palflow.apps.models.core import load_checkpoint

        torch.set_num_threads(1)
        predicted, errors = [], []
        for version, version_rows in by_version.items():
            checkpoint = self.run.ensemble(version)
            if not Path(checkpoint).exists():
                continue
            model, _ = load_checkpoint(checkpoint, device="cpu")
            structures = [row.toatoms() for row in version_rows]
            out = predict_structures(model, structures, device="cpu")
            for row, atoms, forces in zip(version_rows, structures, out["forces"], strict=True):
                predicted.append(row.predicted_force_disagreement)
                errors.append(float(np.abs(forces - atoms.get_forces()).mean()))
        return np.asarray(predicted), np.asarray(errors)


# --------------------------------------------------------------------------- HTML
def _facts(data: RunData) -> list[tuple[str, str]]:
    summary, state = data.summary or {}, data.state
    versions = state.get("versions", [])
    last = data.metrics[-1] if data.metrics else {}
    facts = [
        ("status", data.status),
        ("stop reason", summary.get("stop_reason", "-")),
        ("wall time", f"{data.t1 - data.t0:.0f} s"),
        ("ensemble versions", str(len(versions))),
        ("active labels", str(versions[-1]["n_labels"] if versions else 0)),
        ("oracle failures", str(len(state.get("task_failures", {})))),
    ]
    if last.get("force_mae") is not None:
        facts.append(("latest test force MAE", f"{last['force_mae']:.4f} eV/Å"))
    if last.get("uncertainty_spearman") is not None:
        facts.append(("latest uncertainty Spearman rho", f"{last['uncertainty_spearman']:.2f}"))
    if summary.get("learning_curve_area") is not None:
        facts.append(("learning-curve area", f"{summary['learning_curve_area']:.4f} eV/Å"))
    first = data.metrics[0] if data.metrics else {}
    for name, numbers in last.get("systems", {}).items():
        start = first.get("systems", {}).get(name, {}).get("force_mae")
        text = f"{numbers['force_mae']:.4f} eV/Å"
        if start is not None:
            text = f"{start:.4f} → {text} ({numbers['n_structures']} held-out frames)"
        facts.append((f"system {name}: test force MAE", text))
    return facts


def build_report(root: str | Path) -> Path:
    """Write ``report.html`` and the PNGs of :data:`FIGURES` in the run directory ``root``.

    Returns
    -------
    Path
        The HTML file.
    """
    import matplotlib.pyplot as plt

    data = RunData(root)
    out = data.run.file(REPORT_FIGURES)
    out.mkdir(exist_ok=True)
    sections = []
    for stem, title in FIGURES.items():
        figure = draw(stem, data)
        png = out / f"{stem}.png"
        partial = out / f".{stem}.png.tmp"
        figure.savefig(partial, dpi=90, bbox_inches="tight", format="png")
        plt.close(figure)
        partial.replace(png)
        encoded = base64.b64encode(png.read_bytes()).decode("ascii")
        sections.append(
            f'<h2>{html.escape(title)}</h2>\n<img id="{stem}" alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{encoded}">'
        )
    rows = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _facts(data)
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>palflow: {html.escape(data.name)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 0.2em 1em; text-align: left; }}
th {{ color: #555; font-weight: normal; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>palflow run: {html.escape(data.name)}</h1>
<p>Built {time.strftime("%Y-%m-%d %H:%M:%S")} from <code>{html.escape(str(data.root))}</code>.</p>
<table>
{rows}
</table>
{chr(10).join(sections)}
</body></html>
"""
    target = data.run.file(REPORT_FILE)
    partial = data.run.file(f".{REPORT_FILE}.tmp")
    partial.write_text(page)
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="pipeline/report.py", description="Build report.html of a palflow run directory."
    )
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.run_dir)
    except FileNotFoundError as error:
        print(f"palflow: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
