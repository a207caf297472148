"""What every ensemble potential is, whatever its backend: the protocol a model
class follows, and the helpers its own code shares.

Model code (a backend's network) imports from here, never from
:mod:`palflow.apps.models.core`, which finds backends through the registry: so no
import chain leads from a model back to the registry that loads it.

Units: positions and cutoff in Å, energies in eV, forces in eV/Å.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from palflow.apps.models.backend import from_state_dict  # noqa: F401 (model code uses it)

if TYPE_CHECKING:
    from palflow.apps.models.graph import AtomsBatch


def default_device() -> str:
    """Return ``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@runtime_checkable
class PotentialEnsemble(Protocol):
    """What the rest of palflow expects of an ensemble potential.

    ``forward`` returns ``{"energy": [K, S] eV, "forces": [K, N, 3] eV/Å}``, and with
    ``compute_stress`` also ``"stress": [K, S, 3, 3]`` eV/Å³ (ASE's sign, NaN for a
    structure without a cell).

    Optional: ``shift_energy(per_atom)``, adding ``per_atom[k]`` (a tensor [K]) eV per
    atom to every energy member k predicts, forces unchanged; where a model has it,
    each published state's energy offset is removed
    (:func:`palflow.apps.publication.recentre`).
    """

    spec: Any

    @property
    def n_members(self) -> int: ...

    def forward(
        self, batch: AtomsBatch, compute_forces: bool = True, compute_stress: bool = False
    ) -> dict: ...

    def member(self, index: int) -> PotentialEnsemble: ...

    @classmethod
    def stack(cls, members: Sequence[PotentialEnsemble]) -> PotentialEnsemble: ...


def common_spec(members: Sequence[PotentialEnsemble]) -> Any:
    """The spec that all ``members`` share, which stacking them requires."""
    if not members:
        raise ValueError("stack needs at least one member")
    spec = members[0].spec
    if any(m.spec != spec for m in members):
        raise ValueError("cannot stack members with different specs")
    return spec
