"""Held-out sets for alanine dipeptide in vacuum: a φ/ψ grid, relaxed and at 300 K, by GFN2-xTB.

    python benchmarks/alanine_grid.py                  # the grid from the committed start
    python benchmarks/alanine_grid.py --thermal        # the 300 K set from the grid file
    python benchmarks/alanine_grid.py --relax-start START.xyz   # relax a new start first

The molecule is Ace-Ala-NMe (CH3-CO-NH-CαH(CH3)-CO-NH-CH3, 22 atoms, L-alanine), in
vacuum, no cell. Its start, ``examples/structures/alanine_dipeptide.xyz``, is the C7eq
conformer relaxed by GFN2-xTB (BFGS to fmax 0.01 eV/Å, no constraint; φ -81.5°,
ψ +74.9°). Its first geometry was embedded once by RDKit (ETKDG and MMFF94 with φ, ψ
held at -80°, +70°), used in a throwaway environment: RDKit is no dependency of palflow.
``--relax-start`` redoes that relaxation from any file of the same atoms in the same order
and writes the start again.

The set, ``benchmarks/data/alanine_phi_psi.extxyz``, is a 12 × 12 grid of φ and ψ, both
-180°, -150°, ..., +150° (30° apart). Each point is made from the relaxed start: φ set,
then ψ set (``Atoms.set_dihedral``, turning the side of the bond beyond its third atom:
Cα and all beyond it for φ, the C(=O)-NH-CH3 end for ψ), then a short
relaxation with φ and ψ held (``ase.constraints.FixInternals``, BFGS, fmax 0.2 eV/Å,
at most 40 steps; a point stopped there unconverged would be kept and marked), then one
GFN2-xTB single point on the unconstrained structure gives its energy and forces.
A point is dropped, counted and printed, never silently, when the calculator fails
(raises, or gives a non-finite energy or force, or a force above 50 eV/Å), when its
bonds change (its bond graph, pairs within 1.2 times the sum of their covalent radii,
differs from the start's: only φ = ψ = 0°, where the rigid turn puts the acetyl O 0.3 Å
from the amide H, does), or when φ or ψ end more than 1° from the grid value.

The oracle is GFN2-xTB through xtb-python's ASE calculator,
``xtb.ase.calculator:XTB(method="GFN2-xTB")``, as in ``examples/ethanol_xtb.toml``
(``--calculator tblite`` uses tblite's ``TBLite(method="GFN2-xTB")`` instead; both
agree within 1 meV on a test geometry); every frame names it in ``info["calculator"]``.
One label costs 0.012 s of one core for 22 atoms, so the whole grid took 31 s.

The committed set: 143 of the 144 points, all relaxed to fmax 0.2 eV/Å (2 to 40 steps,
11 on average); basins C7eq 12, C7ax 12, alphaR 20, alphaL 9, beta 15, other 75;
energies from -897.276 eV (φ -90°, ψ +90°; the relaxed start is -897.318 eV) to
-896.329 eV (φ 0°, ψ -180°), a span of 0.947 eV; the largest force of a frame 0.09 to
1.2 eV/Å (the held torsions' forces included).

Every frame's ``info`` holds ``phi``, ``psi`` (degrees in [-180, 180), measured after
the relaxation, to 0.01°), ``grid_phi``, ``grid_psi`` (the grid values), ``basin``
(:func:`basin` of the measured angles), ``relax_steps``, ``relax_converged`` and
``calculator``. Energies (eV, GFN2-xTB's total energy) and forces (eV/Å) come back from
``ase.io.read(path, ":")``.

The thermal set, ``benchmarks/data/alanine_phi_psi_300K.extxyz`` (``--thermal``), exists
because the grid's frames are nearly relaxed (mean |F| per component 0.058 eV/Å), so a
zero-force predictor beats every model there. From each grid frame, ASE's ``Langevin`` by
GFN2-xTB at 300 K (0.5 fs steps, friction 0.02/fs, no centre-of-mass fix; velocities drawn
at 300 K with seed 12 i + j, i and j the grid indices of φ and ψ) with φ and ψ held by
``FixInternals`` (held to 0.01°; no restraint needed); the frames at steps 40 and 60 are
kept (10 fs apart, so correlated), each labelled unconstrained and checked as the grid's;
``info`` has ``temperature_K`` (300), ``md_step`` and ``kinetic_temperature_K`` in place
of the ``relax_`` keys. The committed set: 286 frames (2 of each of the 143 points, none
dropped); mean |F| per component 0.609 eV/Å at step 40, 0.616 at 60 (largest 4.4 eV/Å);
basins C7eq 24, C7ax 24, alphaR 40, alphaL 18, beta 30, other 150; φ > 0: 120; 138 to 159 s
of one core. Short of equilibrium: the kinetic temperature averages 212 K at step 40, 243 K
at 60; the energy lies 0.62 eV (0.33 to 1.42) above the grid point's.

The basins, by the measured φ, ψ in degrees (half-open intervals, first match wins):

- ``C7eq``: -150 ≤ φ < -30 and 30 ≤ ψ < 120 (minimum at φ -81.5, ψ +74.9);
- ``alphaR``: -150 ≤ φ < -30 and -120 ≤ ψ < 30 (right-handed helix, near -70, -40);
- ``beta``: -180 ≤ φ < -30 and (ψ ≥ 120 or ψ < -150) (extended: C5 near -160, +165,
  and PPII near -75, +145);
- ``C7ax``: 30 ≤ φ < 120 and -120 ≤ ψ < 0 (near +75, -60);
- ``alphaL``: 30 ≤ φ < 120 and 0 ≤ ψ < 90 (left-handed helix, near +60, +40);
- ``other``: everything else (φ near 0 or near ±180 with ψ off the β strip, the
  high-energy barriers between the basins).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
from common import ROOT, parser

START = ROOT / "examples" / "structures" / "alanine_dipeptide.xyz"
OUTPUT = ROOT / "benchmarks" / "data" / "alanine_phi_psi.extxyz"
THERMAL = ROOT / "benchmarks" / "data" / "alanine_phi_psi_300K.extxyz"

PHI = [1, 3, 4, 6]
"""φ of ``alanine_dipeptide.xyz``, 0-based: C(=O) of the acetyl, N, Cα, C(=O)."""
PSI = [3, 4, 6, 8]
"""ψ of ``alanine_dipeptide.xyz``, 0-based: N, Cα, C(=O), N of the methylamide."""
FORMULA = "C6H12N2O2"
GRID = [-180.0 + 30.0 * k for k in range(12)]
"""The grid values of φ and of ψ, degrees."""
FMAX = 0.2
"""Force threshold of the constrained relaxation, eV/Å."""
STEPS = 40
"""Most BFGS steps of the constrained relaxation."""
MAX_FORCE = 50.0
"""A label with a force above this (eV/Å) is a failed label (palflow's oracle default)."""
MAX_DRIFT = 1.0
"""Most degrees φ or ψ may end from the grid value after the held relaxation or MD."""
CALCULATORS = {
    "xtb": 'xtb-python xtb.ase.calculator:XTB(method="GFN2-xTB")',
    "tblite": 'tblite tblite.ase:TBLite(method="GFN2-xTB")',
}
TEMPERATURE, TIMESTEP, FRICTION, KEEP_STEPS = 300.0, 0.5, 0.02, (40, 60)
"""The thermal set's Langevin run: K, fs, 1/fs and the steps kept (it stops at the last)."""
NEIGHBOURS = {"H": 1, "C": 4, "N": 3, "O": 1}
"""Bonded neighbours of each element in the molecule (the two carbonyl C: three)."""


def basin(phi: float, psi: float) -> str:
    """The basin of (``phi``, ``psi``), degrees, by the regions of the module docstring."""
    phi, psi = wrap(phi), wrap(psi)
    if -150.0 <= phi < -30.0 and 30.0 <= psi < 120.0:
        return "C7eq"
    if -150.0 <= phi < -30.0 and -120.0 <= psi < 30.0:
        return "alphaR"
    if -180.0 <= phi < -30.0 and (psi >= 120.0 or psi < -150.0):
        return "beta"
    if 30.0 <= phi < 120.0 and -120.0 <= psi < 0.0:
        return "C7ax"
    if 30.0 <= phi < 120.0 and 0.0 <= psi < 90.0:
        return "alphaL"
    return "other"


def wrap(angle: float) -> float:
    """``angle`` (degrees) in [-180, 180)."""
    return (float(angle) + 180.0) % 360.0 - 180.0


def phi_psi(atoms) -> tuple[float, float]:
    """φ and ψ of ``atoms``, degrees rounded to 0.01 in [-180, 180) (rounded first, so
    that :func:`basin` of the values written gives the basin written)."""
    return tuple(wrap(round(atoms.get_dihedral(*i), 2)) for i in (PHI, PSI))


def calculator(kind: str):
    """A fresh GFN2-xTB ASE calculator: ``kind`` is ``"xtb"`` or ``"tblite"``."""
    if kind == "xtb":
        from xtb.ase.calculator import XTB

        return XTB(method="GFN2-xTB")
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def bonds(atoms) -> frozenset[tuple[int, int]]:
    """The bonds of ``atoms``: pairs closer than 1.2 times the sum of their covalent
    radii (ASE's natural cutoffs)."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    first, second = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=1.2))
    return frozenset((int(i), int(j)) for i, j in zip(first, second, strict=True) if i < j)


def _bond(atoms, pair: tuple[int, int]) -> str:
    """``pair`` as ``C1-H18``: elements and 0-based indices."""
    i, j = pair
    return f"{atoms[i].symbol}{i}-{atoms[j].symbol}{j}"


def moving_side(atoms, axis: tuple[int, int]) -> list[bool]:
    """The mask of the atoms on ``axis[1]``'s side of the bond ``axis`` (``axis[1]``
    itself included), by the bond graph: what ``set_dihedral`` turns."""
    near, far = axis
    neighbours: dict[int, set[int]] = {i: set() for i in range(len(atoms))}
    for i, j in bonds(atoms):
        neighbours[i].add(j)
        neighbours[j].add(i)
    side, todo = {far}, [far]
    while todo:
        for j in neighbours[todo.pop()] - side - {near}:
            side.add(j)
            todo.append(j)
    if near in side:
        raise ValueError(f"the bond {axis} is in a ring: no side to turn")
    return [i in side for i in range(len(atoms))]


def check_start(atoms) -> None:
    """Refuse a start that is not Ace-Ala-NMe in this file's atom order: the formula,
    every atom's number of bonded neighbours, and the elements along φ and ψ."""
    symbols = atoms.get_chemical_symbols()
    if atoms.get_chemical_formula(mode="hill") != FORMULA:
        raise ValueError(f"formula {atoms.get_chemical_formula(mode='hill')}, not {FORMULA}")
    count = [0] * len(atoms)
    for i, j in bonds(atoms):
        count[i] += 1
        count[j] += 1
    for i, (symbol, n) in enumerate(zip(symbols, count, strict=True)):
        expected = NEIGHBOURS[symbol]
        if symbol == "C" and i in (PHI[0], PSI[2]):
            expected = 3
        if n != expected:
            raise ValueError(f"atom {i} ({symbol}) has {n} neighbours, not {expected}")
    for indices, want in ((PHI, "CNCC"), (PSI, "NCCN")):
        if "".join(symbols[i] for i in indices) != want:
            raise ValueError(f"atoms {indices} are not {want}")
    if any(atoms.pbc):
        raise ValueError("the start must have no periodic cell")


def relax_start(source: Path, kind: str, fmax: float = 0.01) -> None:
    """Relax ``source`` with GFN2-xTB, no constraint, check it and write it as
    :data:`START` (positions only)."""
    from ase.io import read, write
    from ase.optimize import BFGS

    atoms = read(source)
    atoms.pbc = False
    check_start(atoms)
    atoms.calc = calculator(kind)
    BFGS(atoms, logfile=None).run(fmax=fmax, steps=500)
    energy = atoms.get_potential_energy()
    check_start(atoms)
    phi, psi = phi_psi(atoms)
    print(f"start relaxed: E = {energy:.4f} eV, φ = {phi:.1f}°, ψ = {psi:.1f}° ({basin(phi, psi)})")
    if basin(phi, psi) != "C7eq":
        raise RuntimeError("the relaxed start is not C7eq")
    relaxed = atoms.copy()
    relaxed.calc = None
    relaxed.info = {"name": "alanine dipeptide C7eq", "relaxed": f"GFN2-xTB fmax {fmax}"}
    write(START, relaxed, format="extxyz")


def grid_point(start, phi: float, psi: float, kind: str) -> tuple[object, int, bool]:
    """``start`` with φ and ψ set to ``phi``, ``psi`` and relaxed with both held:
    the structure (unconstrained, no calculator), the BFGS steps and whether it
    converged. Raises where the calculator does."""
    from ase.constraints import FixInternals
    from ase.optimize import BFGS

    atoms = start.copy()
    atoms.set_dihedral(*PHI, phi, mask=moving_side(atoms, (PHI[1], PHI[2])))
    atoms.set_dihedral(*PSI, psi, mask=moving_side(atoms, (PSI[1], PSI[2])))
    atoms.set_constraint(
        FixInternals(
            dihedrals_deg=[[atoms.get_dihedral(*PHI), PHI], [atoms.get_dihedral(*PSI), PSI]]
        )
    )
    atoms.calc = calculator(kind)
    optimizer = BFGS(atoms, logfile=None)
    converged = bool(optimizer.run(fmax=FMAX, steps=STEPS))
    steps = optimizer.nsteps
    atoms.set_constraint()
    atoms.calc = None
    return atoms, steps, converged


def label(atoms, kind: str) -> tuple[object, float]:
    """``atoms`` with GFN2-xTB's energy and forces of a fresh calculator kept in a
    ``SinglePointCalculator``, and the seconds the label took. Raises on a non-finite
    result or a force above :data:`MAX_FORCE`."""
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = atoms.copy()
    atoms.calc = calculator(kind)
    began = time.perf_counter()
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    seconds = time.perf_counter() - began
    if not math.isfinite(energy) or not np.isfinite(forces).all():
        raise RuntimeError("non-finite energy or forces")
    if np.abs(forces).max() > MAX_FORCE:
        raise RuntimeError(f"a force of {np.abs(forces).max():.1f} eV/Å")
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms, seconds


def thermal_point(relaxed, kind: str) -> list[tuple[object, dict]]:
    """The structures (unconstrained, no calculator) and ``info`` at :data:`KEEP_STEPS` of
    a Langevin run from the grid frame ``relaxed``, φ and ψ held. Raises as the MD does."""
    from ase import Atoms, units
    from ase.constraints import FixInternals
    from ase.md import velocitydistribution as vd
    from ase.md.langevin import Langevin

    atoms = relaxed.copy()
    atoms.set_constraint(
        FixInternals(dihedrals_deg=[[atoms.get_dihedral(*i), i] for i in (PHI, PSI)])
    )
    atoms.calc = calculator(kind)
    cell = [GRID.index(relaxed.info[k]) for k in ("grid_phi", "grid_psi")]
    rng = np.random.default_rng(cell[0] * len(GRID) + cell[1])
    thermalize = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution
    thermalize(atoms, temperature_K=TEMPERATURE, rng=rng)
    vd.Stationary(atoms)
    md = Langevin(atoms, TIMESTEP * units.fs, temperature_K=TEMPERATURE, rng=rng,
                  friction=FRICTION / units.fs, fixcm=False)  # fmt: skip
    made, done = [], 0
    for step in KEEP_STEPS:
        md.run(step - done)
        done, kinetic = step, round(float(atoms.get_temperature()), 1)
        frame = Atoms(atoms.numbers, atoms.positions)
        info = {"temperature_K": TEMPERATURE, "md_step": step, "kinetic_temperature_K": kinetic}
        made.append((frame, info))
    return made


def build(kind: str, output: Path, source: Path | None = None) -> tuple[list, list, list]:
    """Make, label and write the grid, or with ``source`` (the relaxed grid) the thermal set
    (see the module docstring): the frames, the dropped (φ, ψ, why), each label's seconds."""
    from ase.io import read, write

    start = read(START)
    check_start(start)
    graph = bonds(start)
    frames, dropped, label_seconds = [], [], []
    points = [(phi, psi, None) for phi in GRID for psi in GRID]
    if source is not None:
        points = [(a.info["grid_phi"], a.info["grid_psi"], a) for a in read(source, ":")]
    for n, (grid_phi, grid_psi, relaxed) in enumerate(points, 1):
        tick = time.perf_counter()
        where = f"{n}/{len(points)} φ {grid_phi:+.0f} ψ {grid_psi:+.0f}"
        kept, reason = [], None
        try:
            if relaxed is None:
                atoms, steps, converged = grid_point(start, grid_phi, grid_psi, kind)
                made = [(atoms, {"relax_steps": steps, "relax_converged": converged})]
            else:
                made = thermal_point(relaxed, kind)
        except Exception as error:  # the calculator failed during the relaxation or MD
            made, reason = [], f"{'relaxation' if relaxed is None else 'MD'} failed: {error}"
        for atoms, extra in made:
            phi, psi = phi_psi(atoms)
            drift = max(abs(wrap(phi - grid_phi)), abs(wrap(psi - grid_psi)))
            if (now := bonds(atoms)) != graph:
                change = [f"+{_bond(atoms, b)}" for b in sorted(now - graph)]
                change += [f"-{_bond(atoms, b)}" for b in sorted(graph - now)]
                reason = f"bonds changed ({', '.join(change)})"
            elif drift > MAX_DRIFT:
                reason = f"φ/ψ drifted {drift:.1f}° from the grid"
            else:
                try:
                    atoms, seconds = label(atoms, kind)
                    label_seconds.append(seconds)
                except Exception as error:
                    reason = f"oracle failed: {error}"
            if reason is not None:
                break
            atoms.info = {"phi": phi, "psi": psi, "grid_phi": grid_phi, "grid_psi": grid_psi}
            atoms.info.update(basin=basin(phi, psi), **extra, calculator=CALCULATORS[kind])
            kept.append(atoms)
        if reason is not None:
            dropped.append((grid_phi, grid_psi, reason))
            print(f"{where}: DROPPED, {reason}")
            continue
        frames += kept
        info, energy = kept[-1].info, kept[-1].get_potential_energy()
        forces = "/".join(f"{np.abs(a.get_forces()).mean():.2f}" for a in kept)
        note = f", {steps} steps{'' if converged else ' (unconverged)'}" if relaxed is None else ""
        print(
            f"{where}: {info['basin']:6s} E {energy:.3f} eV, mean |F| {forces} eV/Å{note},"
            f" {time.perf_counter() - tick:.2f} s"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    write(output, frames, format="extxyz")
    return frames, dropped, label_seconds


def main() -> None:
    """Parse the command line, relax the start if asked, build and summarise the set."""
    cli = parser(__doc__)
    described = f"relax FILE (Ace-Ala-NMe in {START.name}'s atom order) and write it as the start"
    cli.add_argument("--relax-start", type=Path, metavar="FILE", help=described)
    cli.add_argument("--calculator", choices=sorted(CALCULATORS), default="xtb")
    cli.add_argument("--no-grid", action="store_true", help="only relax the start")
    cli.add_argument("--thermal", action="store_true", help=f"make {THERMAL.name} from --grid")
    cli.add_argument("--grid", type=Path, default=OUTPUT, help="the relaxed grid (--thermal)")
    cli.add_argument("--out", type=Path, help="where the set is written (default: data/)")
    args = cli.parse_args()
    if args.relax_start is not None:
        relax_start(args.relax_start, args.calculator)
    if args.no_grid:
        return
    began = time.perf_counter()
    out = args.out or (THERMAL if args.thermal else OUTPUT)
    frames, dropped, labels = build(args.calculator, out, args.grid if args.thermal else None)
    seconds = time.perf_counter() - began
    unconverged = sum(not a.info.get("relax_converged", True) for a in frames)
    print(f"\nkept {len(frames)} frames, dropped {len(dropped)} points ({unconverged} unconverged)")
    for grid_phi, grid_psi, reason in dropped:
        print(f"  dropped φ {grid_phi:+.0f} ψ {grid_psi:+.0f}: {reason}")
    basins = Counter(a.info["basin"] for a in frames)
    print("basins: " + ", ".join(f"{k} {v}" for k, v in sorted(basins.items())), end="; ")
    print(f"φ > 0: {sum(a.info['phi'] > 0 for a in frames)} frames")
    for step in sorted({a.info.get("md_step", 0) for a in frames}):
        forces = np.array([a.get_forces() for a in frames if a.info.get("md_step", 0) == step])
        print(f"mean |F| per component {np.abs(forces).mean():.3f} eV/Å", end="")
        print(f", largest {np.abs(forces).max():.2f} eV/Å" + (f" (MD step {step})" if step else ""))
    low, high = np.quantile([a.get_potential_energy() for a in frames], [0, 1])
    print(f"energy {low:.3f} to {high:.3f} eV (a span of {high - low:.3f} eV)")
    print(f"{np.mean(labels):.4f} s per label, {seconds:.0f} s in all", end="")
    print(f" ({CALCULATORS[args.calculator]})")


if __name__ == "__main__":
    main()
