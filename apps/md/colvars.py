"""Collective variables and their gradients, for metadynamics.

A collective variable (CV) is declared in the campaign
(:class:`palflow.apps.sections.CollectiveVariable`); :func:`evaluate` gives its value
and its gradient with respect to every atom's position. Distances follow the minimum
image convention in periodic cells. Units are Å and radians; a dihedral lies in
(-π, π] and is periodic (:func:`difference` wraps it), a distance, an angle and a
coordination number are not.

The gradients are analytic; ``tests/test_exploration.py`` checks each against
central differences.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms
from ase.geometry import get_distances

PERIODIC = {"dihedral": 2 * np.pi}
"""The period of each periodic kind of collective variable."""


def _vector(atoms: Atoms, i: int, j: int) -> np.ndarray:
    """The vector from atom ``i`` to atom ``j`` (minimum image when periodic)."""
    return atoms.get_distance(i, j, mic=bool(atoms.pbc.any()), vector=True)


def distance(atoms: Atoms, indices: list[int]) -> tuple[float, dict[int, np.ndarray]]:
    a, b = indices
    r = _vector(atoms, a, b)
    d = float(np.linalg.norm(r))
    return d, {a: -r / d, b: r / d}


def angle(atoms: Atoms, indices: list[int]) -> tuple[float, dict[int, np.ndarray]]:
    """The angle a-b-c at b, radians."""
    a, b, c = indices
    u, v = _vector(atoms, b, a), _vector(atoms, b, c)
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    cos = float(np.clip(u @ v / (nu * nv), -1.0, 1.0))
    theta = float(np.arctan2(np.linalg.norm(np.cross(u, v)), u @ v))
    sin = max(np.sin(theta), 1e-8)
    grad_a = (cos * u / nu - v / nv) / (nu * sin)
    grad_c = (cos * v / nv - u / nu) / (nv * sin)
    return theta, {a: grad_a, c: grad_c, b: -(grad_a + grad_c)}


def dihedral(atoms: Atoms, indices: list[int]) -> tuple[float, dict[int, np.ndarray]]:
    """The dihedral a-b-c-d, radians in (-π, π] (Blondel and Karplus's gradient)."""
    a, b, c, d = indices
    f, g, h = _vector(atoms, b, a), _vector(atoms, c, b), _vector(atoms, c, d)
    normal_a, normal_b = np.cross(f, g), np.cross(h, g)
    # Three atoms in a line leave the dihedral undefined: its gradient stays finite.
    aa, bb = max(normal_a @ normal_a, 1e-12), max(normal_b @ normal_b, 1e-12)
    gn = np.linalg.norm(g)
    phi = float(np.arctan2(np.cross(normal_b, normal_a) @ g / gn, normal_a @ normal_b))
    fg, hg = f @ g, h @ g
    grad_a = -gn / aa * normal_a
    grad_d = gn / bb * normal_b
    grad_b = gn / aa * normal_a + fg / (aa * gn) * normal_a - hg / (bb * gn) * normal_b
    grad_c = -gn / bb * normal_b - fg / (aa * gn) * normal_a + hg / (bb * gn) * normal_b
    return phi, {a: grad_a, b: grad_b, c: grad_c, d: grad_d}


def coordination(
    atoms: Atoms, first: list[int], second: list[int], r0: float, n: int = 6, m: int = 12
) -> tuple[float, dict[int, np.ndarray]]:
    """``Σ (1 - (r/r0)^n) / (1 - (r/r0)^m)`` over the pairs of two groups: an atom is
    never paired with itself, and a pair both groups hold counts once."""
    positions = atoms.get_positions()
    vectors, lengths = get_distances(
        positions[first], positions[second], cell=atoms.cell, pbc=atoms.pbc
    )
    x = lengths / r0
    a, b = np.asarray(first)[:, None], np.asarray(second)[None, :]
    # i-j and j-i are one pair: where both orders occur, keep the one with i < j.
    twice = np.isin(a, second) & np.isin(b, first) & (a > b)
    same = (a == b) | twice
    near = np.abs(x - 1.0) < 1e-6  # the removable singularity at r = r0
    x = np.where(near, 1.0 + 1e-6, x)
    top, bottom = 1 - x**n, 1 - x**m
    s = np.where(same, 0.0, top / bottom)
    ds_dx = (-n * x ** (n - 1) * bottom + m * x ** (m - 1) * top) / bottom**2
    ds_dr = np.where(same, 0.0, ds_dx / r0)
    unit = vectors / np.where(lengths > 0, lengths, 1.0)[..., None]
    pair = ds_dr[..., None] * unit  # d s / d (position of the second atom)
    gradient: dict[int, np.ndarray] = {}
    for row, i in enumerate(first):
        gradient[i] = gradient.get(i, 0) - pair[row].sum(axis=0)
    for column, j in enumerate(second):
        gradient[j] = gradient.get(j, 0) + pair[:, column].sum(axis=0)
    return float(s.sum()), gradient


def evaluate(atoms: Atoms, variables: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """The values [d] of the collective variables ``variables`` (dumped
    :class:`~palflow.apps.sections.CollectiveVariable`) on ``atoms``, and their
    gradients [d, n, 3]."""
    values = np.zeros(len(variables))
    gradients = np.zeros((len(variables), len(atoms), 3))
    for k, cv in enumerate(variables):
        if cv["kind"] == "coordination":
            value, parts = coordination(atoms, cv["atoms"], cv["to_atoms"], cv["r0"])
        else:
            value, parts = KINDS[cv["kind"]](atoms, cv["atoms"])
        values[k] = value
        for index, gradient in parts.items():
            gradients[k, index] += gradient
    return values, gradients


KINDS = {"distance": distance, "angle": angle, "dihedral": dihedral}


def difference(values: np.ndarray, centres: np.ndarray, kinds: list[str]) -> np.ndarray:
    """``values - centres`` (broadcast), with a periodic variable's difference wrapped
    into its shortest form."""
    delta = np.asarray(values, dtype=float) - np.asarray(centres, dtype=float)
    for k, kind in enumerate(kinds):
        period = PERIODIC.get(kind)
        if period is not None:
            delta[..., k] -= period * np.round(delta[..., k] / period)
    return delta


def largest_index(variables: list[dict[str, Any]]) -> int:
    """The largest atom index any of ``variables`` names."""
    return max(max(cv["atoms"] + cv.get("to_atoms", [])) for cv in variables)
