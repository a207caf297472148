"""CP2K as a periodic DFT oracle: ASE's CP2K calculator with palflow's defaults.

Name it in a campaign (``examples/water_cp2k.toml``)::

    [oracle]
    calculator = "palflow.apps.oracles.cp2k:CP2KOracle"
    kwargs = { launcher = "{mpi_prefix}", xc = "PBE", cutoff_Ry = 400 }
    mpi_ranks = 2

What it adds to ``ase.calculators.cp2k.CP2K``:

- **A sane command.** ``{launcher} env OMP_NUM_THREADS={omp_threads} cp2k.psmp -s``:
  CP2K's shell mode under the task's MPI prefix, with OpenMP pinned (unset, CP2K
  takes every core of the node). ``executable`` names a cluster's own build.
- **PBE, not LDA,** with DZVP-MOLOPT-SR-GTH, GTH-PBE pseudopotentials and 400 Ry
  unless told otherwise (ASE's own default functional is LDA).
- **One shell per batch task.** The CP2K process starts at the first structure and
  serves every structure of the task; the oracle task closes it at its end
  (:meth:`close`). Each structure gets its own folder under the task's scratch
  and its own CP2K input and output, so no wave function is carried over from an
  unrelated structure and each output says whether its own SCF converged.
- **SCF failures.** CP2K carries on after an SCF that did not converge and ASE reports
  the unconverged energy; here the structure's output is read, and "SCF run NOT
  converged" raises :class:`ase.calculators.calculator.SCFError`, which the oracle
  records as a failure of kind ``scf`` and never stores as a label.
- **Periodic only.** The structure must be periodic in all three directions with a
  cell; stress (analytic) comes with energy and forces.
- **Checks before anything runs** (:func:`preflight`, called by palflow's pre-flight
  with the campaign's kwargs and start structures): the binary is on ``PATH``, the
  basis set and pseudopotential of every element are in CP2K's data files, and the
  structures are periodic.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from ase import Atoms
from ase.calculators.calculator import SCFError
from ase.calculators.cp2k import CP2K
from ase.units import Rydberg

NOT_CONVERGED = "SCF run NOT converged"
"""What CP2K's output says after an SCF that stopped at ``MAX_SCF``."""

DATA_DIRS = ("/usr/share/cp2k", "/usr/share/cp2k/data")
"""Where Debian's cp2k puts its data files; ``$CP2K_DATA_DIR`` or ``data_dir`` first."""


def cp2k_command(launcher: str = "", omp_threads: int = 1, executable: str = "cp2k.psmp") -> str:
    """The shell-mode command: ``{launcher} env OMP_NUM_THREADS=N {executable} -s``."""
    parts = [launcher.strip(), f"env OMP_NUM_THREADS={int(omp_threads)}", executable, "-s"]
    return " ".join(part for part in parts if part)


class CP2KOracle(CP2K):
    """ASE's CP2K calculator in shell mode, one folder and one output per structure,
    SCF non-convergence raised.

    Parameters
    ----------
    directory
        The task's scratch; each structure works in ``structureNNNN/`` below it.
    launcher
        MPI prefix (``"{mpi_prefix}"`` in a campaign takes the task's own); empty for
        one rank.
    omp_threads
        ``OMP_NUM_THREADS`` of each rank.
    executable
        The CP2K binary (a cluster's own build: its name or full path).
    xc, basis_set, pseudo_potential, cutoff_Ry, max_scf
        The level of theory (see ``ase.calculators.cp2k.CP2K``; ``cutoff_Ry`` in Ry).
    data_dir
        Folder of CP2K's ``BASIS_MOLOPT`` and ``GTH_POTENTIALS``, for :func:`preflight`
        only (CP2K finds its own).
    **kwargs
        Passed to ``ase.calculators.cp2k.CP2K`` (e.g. ``inp`` for extra input sections).
    """

    def __init__(
        self,
        directory: str = ".",
        launcher: str = "",
        omp_threads: int = 1,
        executable: str = "cp2k.psmp",
        xc: str = "PBE",
        basis_set: str = "DZVP-MOLOPT-SR-GTH",
        pseudo_potential: str = "GTH-PBE",
        cutoff_Ry: float = 400.0,
        max_scf: int = 50,
        data_dir: str | None = None,
        **kwargs,
    ) -> None:
        self._root = Path(directory).resolve()
        self._root.mkdir(parents=True, exist_ok=True)
        self._count = 0
        kwargs.setdefault("print_level", "LOW")
        super().__init__(
            label=str(self._root / "cp2k"),
            command=cp2k_command(launcher, omp_threads, executable),
            xc=xc,
            basis_set=basis_set,
            pseudo_potential=pseudo_potential,
            cutoff=cutoff_Ry * Rydberg,
            max_scf=max_scf,
            stress_tensor=True,
            **kwargs,
        )

    @staticmethod
    def preflight(kwargs: dict, structures: Sequence[Atoms]) -> list[str]:
        """palflow's pre-flight hook: see :func:`preflight`."""
        return preflight(kwargs, structures)

    def calculate(self, atoms=None, properties=None, system_changes=None):
        from ase.calculators.calculator import all_changes

        atoms = atoms if atoms is not None else self.atoms
        _require_periodic(atoms)
        # A new structure: a new folder and a new force environment in the same shell.
        self._release_force_env()
        self._count += 1
        folder = self._root / f"structure{self._count:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        self.label = str(folder / "cp2k")
        super().calculate(atoms, properties, system_changes or all_changes)
        output = Path(self.label + ".out")
        if output.exists() and NOT_CONVERGED in output.read_text(errors="replace"):
            self.results = {}
            raise SCFError(f"CP2K: {NOT_CONVERGED} within max_scf = {self.parameters.max_scf}")


def _require_periodic(atoms: Atoms) -> None:
    if not atoms.pbc.all() or atoms.cell.rank < 3:
        raise ValueError(
            f"CP2KOracle is periodic only, and this structure ({atoms.get_chemical_formula()}) "
            f"has pbc = {atoms.pbc.tolist()} and a cell of rank {atoms.cell.rank}: give it a "
            "cell and pbc = true in all three directions"
        )


def _names_in(path: Path) -> set[tuple[str, str]]:
    """``(element, name)`` of every entry of a CP2K basis or potential file, each
    alias of an entry included."""
    found = set()
    for line in path.read_text(errors="replace").splitlines():
        words = line.split()
        if not words or not words[0].isalpha() or len(words[0]) > 2:
            continue
        if len(words) >= 2 and not re.fullmatch(r"[-+\d.Ee]+", words[1]):
            found.update((words[0], name) for name in words[1:])
    return found


def _data_file(name: str, data_dir: str | None) -> Path | None:
    for folder in (data_dir, os.environ.get("CP2K_DATA_DIR"), *DATA_DIRS):
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def preflight(kwargs: dict, structures: Sequence[Atoms]) -> list[str]:
    """Problems with running :class:`CP2KOracle` with ``kwargs`` on ``structures``,
    each a message naming its fix; empty when none is found. Nothing is run.

    A basis or potential name is checked only where CP2K's data files are found
    (``data_dir``, ``$CP2K_DATA_DIR``, Debian's folder).
    """
    problems = []
    executable = kwargs.get("executable", "cp2k.psmp")
    if shutil.which(executable) is None:
        problems.append(
            f"the CP2K binary {executable!r} is not on PATH: install CP2K (Debian: apt-get "
            "install cp2k) or give oracle.kwargs.executable the path of your build"
        )
    for atoms in structures:
        try:
            _require_periodic(atoms)
        except ValueError as error:
            problems.append(str(error))
            break
    elements = sorted({symbol for atoms in structures for symbol in atoms.get_chemical_symbols()})
    wanted = (
        ("basis_set", "DZVP-MOLOPT-SR-GTH", kwargs.get("basis_set_file", "BASIS_MOLOPT")),
        ("pseudo_potential", "GTH-PBE", kwargs.get("potential_file", "GTH_POTENTIALS")),
    )
    for key, default, file_name in wanted:
        name = kwargs.get(key, default)
        path = _data_file(file_name, kwargs.get("data_dir"))
        if path is None or name in (None, "auto"):
            continue
        known = _names_in(path)
        for element in elements:
            # CP2K also accepts a potential name with the valence appended (GTH-PBE-q6).
            if not any(e == element and (n == name or n.startswith(name + "-q")) for e, n in known):
                problems.append(
                    f"{key} {name!r} has no entry for {element} in {path.name}: pick a name "
                    f"that {path.name} lists for {element}"
                )
    return problems


__all__ = ["CP2KOracle", "cp2k_command", "preflight"]
