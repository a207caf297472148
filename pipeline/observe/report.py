"""The run report: ``report.html`` and its PNGs, from the run directory's files alone.

    palflow report RUN_DIR      (or python -m palflow.pipeline.observe.report RUN_DIR)

Works on a finished run, a running one (the coordinator refreshes the report every
few minutes and once at the end) and a crashed one: it reads only what the
campaign writes as it goes (``events.jsonl``, ``metrics.jsonl``, ``state.json``,
``labels.db``, the generator's frame files and the ensemble checkpoints), never the
coordinator's memory, and it finds them through :class:`palflow.pipeline.state.rundir.RunDirectory`.
The HTML embeds its figures (:data:`FIGURES`, drawn by :mod:`palflow.pipeline.observe.figures`
and :mod:`palflow.pipeline.observe.quality_figures`), so it opens offline, with no server;
the same figures are written beside it in ``report/``.
"""

from __future__ import annotations

import base64
import html
import logging
import sys
import time
from pathlib import Path

from palflow.pipeline.engine.validation import summary_lines
from palflow.pipeline.observe.exploration_figures import exchange_rates, plot_exploration
from palflow.pipeline.observe.figures import (
    empty_panel,
    new_figure,
    plot_busy,
    plot_learning_curve,
    plot_timeline,
)
from palflow.pipeline.observe.quality_figures import (
    plot_convergence,
    plot_oracle,
    plot_uncertainty,
    plot_uncertainty_vs_error,
)
from palflow.pipeline.observe.run_data import RunData
from palflow.pipeline.state.rundir import (
    REPORT_FIGURES,
    REPORT_FILE,
)

logger = logging.getLogger(__name__)

HELD_OUT_RHO = "Spearman rho, largest atomic force spread vs mean absolute force error"
"""The facts table's rank correlation (``uncertainty_spearman`` of ``metrics.jsonl``)."""


# ------------------------------------------------------------------------ figures
FIGURES = {
    "learning_curve": "Learning curve",
    "timeline": "Task timeline",
    "busy": "Busy fraction and idle gaps",
    "uncertainty": "Uncertainty per ensemble version",
    "uncertainty_vs_error": "Predicted uncertainty against true error",
    "oracle": "Oracle time and failures",
    "convergence": "Convergence: exploration ratios and calibration",
    "exploration": "Exploration: visited collective variables, bias, exchanges",
}
"""Every figure of the report, by file stem, with its heading."""

PLOTS = {
    "learning_curve": plot_learning_curve,
    "timeline": plot_timeline,
    "busy": plot_busy,
    "uncertainty": plot_uncertainty,
    "uncertainty_vs_error": plot_uncertainty_vs_error,
    "oracle": plot_oracle,
    "convergence": plot_convergence,
    "exploration": plot_exploration,
}
"""The function that draws each figure of :data:`FIGURES`."""


def draw(stem: str, data: RunData):
    """The Matplotlib figure ``stem`` of :data:`FIGURES`, or one that says why it
    could not be drawn."""
    try:
        return PLOTS[stem](data)
    except Exception as error:  # one broken figure must not cost the report
        logger.exception("report: figure %s failed", stem)
        figure, axes = new_figure()
        empty_panel(axes[0][0], f"could not draw: {error}")
        return figure


# --------------------------------------------------------------------------- HTML
def _facts(data: RunData) -> list[tuple[str, str]]:
    summary, state = data.summary or {}, data.state
    versions = state.get("versions", [])
    last = data.metrics[-1] if data.metrics else {}
    facts = [
        ("status", data.status),
        ("stop reason", data.reason or summary.get("stop_reason") or "-"),
        ("wall time", f"{data.t1 - data.t0:.0f} s"),
        ("ensemble versions", str(len(versions))),
        ("active labels", str(versions[-1]["n_labels"] if versions else 0)),
        ("oracle failures", str(len(state.get("task_failures", {})))),
    ]
    tested = [row for row in data.metrics if row.get("force_mae") is not None]
    if tested:
        facts.append(("latest test force MAE", f"{tested[-1]['force_mae']:.4f} eV/Å"))
    elif not data.has_test_set:
        facts.append(
            (
                "test force MAE",
                "none: no held-out set (test.n_structures = 0), so no "
                "independent test error; judge by the validation error and the ratios",
            )
        )
    if last.get("validation_force_mae") is not None:
        facts.append(
            (
                "latest ensemble error on validation labels",
                f"{last['validation_force_mae']:.4f} eV/Å",
            )
        )
    for name, ratios in (last.get("exploration") or {}).items():
        if ratios.get("accurate") is not None:
            facts.append(
                (
                    f"system {name}: explored frames (last {ratios['segments']} segments)",
                    f"{ratios['accurate']:.2f} accurate, {ratios['candidate']:.2f} candidate, "
                    f"{ratios['failed']:.2f} failed",
                )
            )
    generator = data.campaign.get("generator", {})
    if generator.get("kind", "md") != "md":
        facts.append(("generator", generator["kind"]))
    rates = exchange_rates(data)
    if rates is not None and rates["attempted"] is not None:
        shares = rates["accepted"] / rates["attempted"].clip(min=1)
        facts.append(("exchange rates, coldest pair first", ", ".join(f"{s:.2f}" for s in shares)))
    if last.get("calibration"):
        facts.append(
            ("calibration (validation labels)", f"force error ≈ {last['calibration']:.2f} · spread")
        )
    if last.get("val_force_mae") is not None:
        facts.append(("latest validation force MAE", f"{last['val_force_mae']:.4f} eV/Å"))
    if last.get("held_back") is not None:
        facts.append(("members held back by the gate (latest)", str(last["held_back"])))
    ranked = [row for row in data.metrics if row.get("uncertainty_spearman") is not None]
    if ranked:
        row = ranked[-1]
        frames = sum(group[2] for group in row.get("reliability_test") or [])
        on = f"{frames} held-out frames" if frames else "the held-out frames"
        facts.append(
            (
                f"{HELD_OUT_RHO} per frame, latest ensemble (v{row.get('version', '?')}) on "
                f"{on} (not the rho of the uncertainty figure, over active labels)",
                f"{row['uncertainty_spearman']:.2f}",
            )
        )
    if summary.get("learning_curve_area") is not None:
        facts.append(("learning-curve area", f"{summary['learning_curve_area']:.4f} eV/Å"))
    if data.validation:
        for line in summary_lines(data.validation):
            facts.append((f"MD check of v{data.validation['version']}", line))
    first = data.metrics[0] if data.metrics else {}
    for name, numbers in last.get("systems", {}).items():
        start = first.get("systems", {}).get(name, {}).get("force_mae")
        text = f"{numbers['force_mae']:.4f} eV/Å"
        if start is not None:
            text = f"{start:.4f} → {text} ({numbers['n_structures']} held-out frames)"
        facts.append((f"system {name}: test force MAE", text))
    return facts


LEARNING_COLUMNS = (
    ("version", "version", "d"),
    ("labels", "labels", "d"),
    ("wall_s", "wall time, s", ".0f"),
    ("force_mae", "test force MAE, eV/Å", ".4f"),
    ("energy_mae", "test energy MAE, meV/atom", ".2f"),
    ("val_force_mae", "validation force MAE, eV/Å", ".4f"),
    ("val_energy_mae", "validation energy MAE, meV/atom", ".2f"),
    ("held_back", "members held back", "d"),
    ("n_validation", "validation frames", "d"),
)
"""The learning-curve table's columns: key in :meth:`RunData.learning_curve`, heading,
format. A column whose ``metrics.jsonl`` field no row carries (an older run) is left out."""

RECORDED_AS = {"val_energy_mae": "val_energy_mae_per_atom", "energy_mae": "energy_mae_per_atom"}


def _cell(value: object, spec: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(int(value) if spec == "d" else value, spec)


def _learning_curve_table(data: RunData, most: int = 40) -> str:
    """The errors per ensemble version as an HTML table: every version, or one in n
    and the last where there are more than ``most``."""
    points = data.learning_curve()
    if not points:
        return ""
    always = {"version", "labels", "wall_s", "force_mae", "energy_mae"}
    columns = [
        c for c in LEARNING_COLUMNS if c[0] in always or data.recorded(RECORDED_AS.get(c[0], c[0]))
    ]
    step = -(-len(points) // most)
    shown = points[::step] if (len(points) - 1) % step == 0 else [*points[::step], points[-1]]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in columns)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{_cell(p[key], spec)}</td>" for key, _, spec in columns) + "</tr>"
        for p in shown
    )
    note = f"<p>One version in {step} of {len(points)} shown, and the last.</p>\n"
    note = note if step > 1 else ""
    return f'{note}<table id="learning_curve_table">\n<tr>{head}</tr>\n{body}\n</table>'


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
        if stem == "learning_curve":
            sections.append(_learning_curve_table(data))
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
        prog="python -m palflow.pipeline.observe.report",
        description="Build report.html of a palflow run directory.",
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
