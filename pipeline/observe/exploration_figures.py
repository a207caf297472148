"""The report's figure of where the walkers went (``exploration.png``), from the
frame files of the exploring generators (:mod:`palflow.apps.md.explorer`):

- the visited collective-variable space: a 2-D histogram of the first two
  variables (a 1-D one for a single variable), in degrees for angles and dihedrals;
- the bias over time: each walker's bias energy at its recorded frames, in the order
  the walker made them (hills of metadynamics, or the uncertainty bias);
- the exchange rates: per neighbour pair of the ladder, the share of accepted
  attempts, over every replica-exchange task of the run.

A run of plain MD says so in each panel.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np

from palflow.pipeline.observe.figures import empty_panel, new_figure
from palflow.pipeline.observe.run_data import RunData

ANGULAR = ("angle", "dihedral")
"""Collective variables shown in degrees."""


def explored_frames(data: RunData) -> dict[int, dict[str, np.ndarray]]:
    """Per walker, what its recorded frames carry besides the predictions
    (``collective_variables`` [F, d], ``bias_energy`` [F], ``temperature_K`` [F]), the
    segments in order."""
    found: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for walker, path in data.run.walker_segments():
        try:
            with np.load(path) as frames:
                for key in ("collective_variables", "bias_energy", "temperature_K"):
                    if key in frames.files and len(frames[key]):
                        found[walker][key].append(frames[key])
        except (OSError, ValueError):
            continue  # a file being written, or torn by a crash
    return {w: {k: np.concatenate(v) for k, v in keys.items()} for w, keys in found.items()}


def exchange_rates(data: RunData) -> dict[str, Any] | None:
    """The ladder, and per neighbour pair the attempts and acceptances summed over
    every replica-exchange task; None without any."""
    total: dict[str, Any] | None = None
    for path in data.run.exchange_records():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if total is None or total["ladder_K"] != record["ladder_K"]:
            total = {"ladder_K": record["ladder_K"], "attempted": None, "accepted": None}
        for key in ("attempted", "accepted"):
            counts = np.asarray(record[key])
            total[key] = counts if total[key] is None else total[key] + counts
    return total


def plot_exploration(data: RunData):
    """Three panels: the visited collective-variable space, the bias over time, and
    the exchange rates."""
    figure, axes = new_figure(width=14, height=4.2, columns=3)
    generator = data.campaign.get("generator", {})
    frames = explored_frames(data)
    _plot_variables(axes[0][0], frames, generator.get("collective_variables") or [])
    _plot_bias(axes[0][1], frames)
    _plot_exchanges(axes[0][2], exchange_rates(data))
    return figure


def _plot_variables(axis, frames: dict, variables: list[dict]) -> None:
    values = [f["collective_variables"] for f in frames.values() if "collective_variables" in f]
    if not values or not variables:
        empty_panel(axis, "no collective variables\n(generator.kind is not metadynamics)")
        return
    values = np.concatenate(values)
    names = []
    for k, cv in enumerate(variables[: values.shape[1]]):
        if cv["kind"] in ANGULAR:
            values[:, k] = np.degrees(values[:, k])
        unit = "degrees" if cv["kind"] in ANGULAR else ("Å" if cv["kind"] == "distance" else "")
        label = cv.get("name") or f"{cv['kind']} {'-'.join(map(str, cv['atoms']))}"
        names.append(f"{label} ({unit})" if unit else label)
    if values.shape[1] == 1:
        axis.hist(values[:, 0], bins=36, color="tab:green")
        axis.set_xlabel(names[0])
        axis.set_ylabel("recorded frames")
    else:
        periodic = [variables[k]["kind"] == "dihedral" for k in (0, 1)]
        ranges = [(-180, 180) if p else (values[:, k].min(), values[:, k].max() + 1e-9)
                  for k, p in enumerate(periodic)]  # fmt: skip
        *_, image = axis.hist2d(values[:, 0], values[:, 1], bins=36, range=ranges, cmin=1)
        axis.figure.colorbar(image, ax=axis, label="recorded frames")
        axis.set_xlabel(names[0])
        axis.set_ylabel(names[1])
    axis.set_title(f"visited space, {len(values)} frames")


def _plot_bias(axis, frames: dict) -> None:
    biased = {w: f["bias_energy"] for w, f in frames.items() if "bias_energy" in f}
    if not biased:
        empty_panel(axis, "no bias\n(generator.kind is not biased_md or metadynamics)")
        return
    for walker, energies in sorted(biased.items()):
        axis.plot(np.arange(len(energies)), energies, lw=0.9, label=f"walker {walker}")
    axis.set_xlabel("the walker's recorded frames, in order")
    axis.set_ylabel("bias energy, eV")
    axis.set_title("bias over time")
    if len(biased) <= 8:
        axis.legend(fontsize=7)


def _plot_exchanges(axis, rates: dict | None) -> None:
    if rates is None or rates["attempted"] is None:
        empty_panel(axis, "no exchanges\n(generator.kind is not replica_exchange)")
        return
    ladder = rates["ladder_K"]
    attempted, accepted = rates["attempted"], rates["accepted"]
    share = np.where(attempted > 0, accepted / np.maximum(attempted, 1), np.nan)
    labels = [f"{a:.0f}-{b:.0f} K" for a, b in zip(ladder, ladder[1:], strict=False)]
    axis.bar(labels, share, color="tab:purple")
    for x, (rate, n) in enumerate(zip(share, attempted, strict=True)):
        axis.text(x, (0 if np.isnan(rate) else rate) + 0.02, f"{n} tried", ha="center", fontsize=8)
    axis.set_ylim(0, 1.1)
    axis.set_ylabel("accepted share")
    axis.set_title("exchange rates between neighbours")
