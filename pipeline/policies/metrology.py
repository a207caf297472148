"""Metrology: what each ensemble version is worth, measured on the held-out set.

Per version the coordinator records, in ``metrics.jsonl``, the standard metrics
(energy and force MAE and RMSE, and how well the ensemble's uncertainty ranks its
true error) plus whatever the campaign's :class:`~palflow.pipeline.policies.protocols.Metrology`
plugins add. ``summary.json`` gains the area under the learning curve, so that
selection strategies compare with one number.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from palflow.apps.common import import_object
from palflow.apps.errors import PluginError
from palflow.pipeline.policies.protocols import Evaluation, Metrology

logger = logging.getLogger(__name__)


def evaluation_from_result(result: dict[str, Any], version: int, labels: int) -> Evaluation:
    """An :class:`Evaluation` from what :func:`palflow.apps.inference._evaluate_test` returned."""
    arrays = ("structure_force_error", "structure_force_spread", "structure_energy_error")
    return Evaluation(
        version=version,
        labels=labels,
        force_error=np.asarray(result.get(arrays[0], []), dtype=float),
        force_spread=np.asarray(result.get(arrays[1], []), dtype=float),
        energy_error=np.asarray(result.get(arrays[2], []), dtype=float),
        extra={k: v for k, v in result.items() if k not in arrays},
    )


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation of ``x`` and ``y``; None when undefined (fewer than
    3 points, or a constant input)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def standard_metrics(evaluation: Evaluation) -> dict[str, float | None]:
    """Energy, force and (with stress labels; else None) stress errors, and the
    uncertainty's ranking of the true error.

    ``uncertainty_spearman`` is Spearman's rho between each held-out structure's
    largest atomic force spread and its mean absolute force error: 1 when the
    ensemble's doubt orders the structures exactly as their errors do.
    """
    extra = evaluation.extra
    return {
        "force_mae": extra.get("force_mae"),
        "force_rmse": extra.get("force_rmse"),
        "energy_mae_per_atom": extra.get("energy_mae_per_atom"),
        "energy_rmse_per_atom": extra.get("energy_rmse_per_atom"),
        "stress_mae": extra.get("stress_mae"),
        "uncertainty_spearman": spearman_rho(evaluation.force_spread, evaluation.force_error),
    }


def load_plugins(paths: Sequence[str]) -> list[Metrology]:
    """Instantiate the campaign's metrology plugins (classes, or plain functions).

    Raises
    ------
    PluginError
        Naming the path when it does not import or is not a Metrology.
    """

    plugins = []
    for path in paths:
        obj = import_object(path)
        plugin = obj() if isinstance(obj, type) else obj
        if not isinstance(plugin, Metrology):
            raise PluginError(f"metrology plugin {path!r} is not callable with an Evaluation")
        plugins.append(plugin)
    return plugins


def measure_version(evaluation: Evaluation, plugins: Sequence[Metrology]) -> dict[str, Any]:
    """Every metric of one version: the standard ones, then each plugin's.

    A plugin that raises costs its own metrics, logged, not the campaign.
    """
    record: dict[str, Any] = {
        "version": evaluation.version,
        "labels": evaluation.labels,
        **standard_metrics(evaluation),
    }
    for plugin in plugins:
        try:
            record.update({str(k): v for k, v in plugin(evaluation).items()})
        except Exception:
            logger.exception("metrology plugin %r failed on v%d", plugin, evaluation.version)
    return record


def learning_curve_area(labels: Sequence[float], errors: Sequence[float]) -> float | None:
    """Area under the error-against-labels curve, divided by the label range: the
    curve's mean error (eV/Å for the force MAE), lower being better. Comparable
    between runs over the same label range (PyRelationAL's area under the curve).

    None with fewer than two points or a zero range.
    """
    x, y = np.asarray(labels, dtype=float), np.asarray(errors, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        return None
    order = np.argsort(x, kind="stable")
    return float(np.trapezoid(y[order], x[order]) / np.ptp(x))
