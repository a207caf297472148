"""What every MACE member shares: the spec, the neighbour count, foundation files.

:class:`MACESpec` is the architecture of every member of a committee, with the
element table, the isolated-atom energies (E0s) and the mean neighbour count, fixed
once per campaign (:meth:`palflow.apps.models.mace.MACEBackend.resolve_spec`) with the
helpers here. Importing this module imports ``mace`` first, which sets
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` for the process so that e3nn loads its
constants; palflow's own checkpoints are still read with an explicit
``weights_only=True``, which that variable does not override. The build lock that
keeps MACE's code generation away from other threads' forward passes lives here too.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# TorchScript warns at every MACE build about e3nn's annotations (thousands of lines
# a run); it says nothing a user can act on.
warnings.filterwarnings("ignore", message="The TorchScript type system doesn't support")
warnings.filterwarnings("ignore", message="Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY")

import mace  # noqa: E402, F401  (first: it lets e3nn load its constants under torch >= 2.6)
import torch  # noqa: E402
from ase import Atoms  # noqa: E402

from palflow.apps.models.mace.foundation import missing_foundation  # noqa: E402
from palflow.apps.models.protocol import common_spec  # noqa: E402

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _BuildLock:
    """Building or copying a MACE model traces code with ``torch.fx``, which patches
    ``torch.nn.Module.__call__`` for the whole process while it runs, and so breaks a
    forward pass in another thread. On a thread-pool site, builds therefore take this
    lock alone (re-entrantly), and forward passes share it."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> None:  # exclusive: a build or a copy
        me = threading.get_ident()
        with self._condition:
            if self._owner != me:
                self._condition.wait_for(lambda: self._owner is None and not self._readers)
                self._owner = me
            self._depth += 1

    def __exit__(self, *exc) -> None:
        with self._condition:
            self._depth -= 1
            if not self._depth:
                self._owner = None
                self._condition.notify_all()

    @contextlib.contextmanager
    def shared(self):
        """Held by forward passes: many at once, never beside a build."""
        me = threading.get_ident()
        if self._owner == me:  # a build that evaluates
            yield
            return
        with self._condition:
            self._condition.wait_for(lambda: self._owner is None)
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()


_BUILD_LOCK = _BuildLock()


class LockedCommittee:
    """What a committee of e3nn members (``self.members``, a ``ModuleList``) shares,
    MACE's and SevenNet's: forward passes under the shared build lock, members copied
    under the exclusive one. A subclass of ``torch.nn.Module`` lists it first and
    gives ``stack_modules(spec, modules)``."""

    def __call__(self, *args, **kwargs):
        # Taken before torch.nn.Module.__call__ runs: while another thread builds a
        # member, torch.fx has that method patched.
        with _BUILD_LOCK.shared():
            return super().__call__(*args, **kwargs)

    def member(self, index: int):
        """A K=1 copy of member ``index``."""
        if not -self.n_members <= index < self.n_members:
            raise IndexError(f"member {index} out of range for K={self.n_members}")
        with _BUILD_LOCK:
            module = copy.deepcopy(self.members[index])
        return self.stack_modules(self.spec, [module])

    @classmethod
    def stack(cls, members: Sequence):
        """Concatenate ensembles (usually K=1 members)."""
        spec = common_spec(members)
        with _BUILD_LOCK:
            modules = [copy.deepcopy(module) for m in members for module in m.members]
        return cls.stack_modules(spec, modules).train(members[0].training)


@dataclass(frozen=True)
class MACESpec:
    """Architecture of every member; the campaign's ``[model]`` section gives it.

    Attributes
    ----------
    r_max
        Cutoff radius, Å.
    num_channels, max_L, correlation, num_interactions
        MACE's hidden channels, largest ``L`` of the equivariant features, body
        order of the product basis and number of message-passing layers.
    num_radial_basis, num_cutoff_basis
        Bessel functions and polynomial cutoff order of the radial embedding.
    dtype
        ``"float64"`` (MACE's advice for MD) or ``"float32"``.
    atomic_numbers
        The element table, ascending.
    e0s
        Isolated-atom energy of each element of the table, eV.
    avg_num_neighbors
        Mean neighbour count within ``r_max`` (MACE normalises messages by it).
    foundation
        A MACE model file every member starts from, or None.
    foundation_architecture
        With ``foundation``, its architecture as JSON
        (:func:`palflow.apps.models.mace.rebuild.describe`), so that a checkpoint loads
        once the file is gone; None for an architecture JSON cannot name.
    """

    r_max: float
    num_channels: int
    max_L: int
    correlation: int
    num_interactions: int
    num_radial_basis: int
    num_cutoff_basis: int
    dtype: str
    atomic_numbers: tuple[int, ...]
    e0s: tuple[float, ...]
    avg_num_neighbors: float
    foundation: str | None = None
    foundation_architecture: str | None = None

    @property
    def cutoff(self) -> float:
        return self.r_max

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["atomic_numbers"] = list(self.atomic_numbers)
        data["e0s"] = list(self.e0s)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MACESpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["atomic_numbers"] = tuple(int(z) for z in values["atomic_numbers"])
        values["e0s"] = tuple(float(e) for e in values["e0s"])
        return cls(**values)


# ------------------------------------------------------------------ the spec
def mean_neighbours(structures: Sequence[Atoms], r_max: float) -> float:
    """Mean number of neighbours within ``r_max`` over the atoms of ``structures``."""
    from palflow.apps.models.graph import build_batch

    if not structures:
        return 1.0
    batch = build_batch(list(structures), r_max, "cpu", with_targets=False)
    return max(float(batch.edge_src.numel()) / max(int(batch.n_atoms.sum()), 1), 1.0)


def foundation_elements(path: str) -> tuple[list[int], list[float], float, dict[str, Any]]:
    """The element table, E0s, cutoff and architecture of a foundation model file.

    Raises
    ------
    ValueError
        When the file is missing or is not a MACE model palflow can fine-tune
        (:func:`load_foundation`).
    """
    model = load_foundation(path)
    numbers, e0s = _table(model)
    return numbers, e0s, float(model.r_max), _architecture(model)


def foundation_spec(path: str) -> dict[str, Any]:
    """Every field of :class:`MACESpec` that a foundation model file fixes: its table,
    E0s (eV), cutoff (Å), layers, channels, max_L, mean neighbour count, correlation and
    radial basis, and the architecture as JSON. The campaign's own values of these are
    not used with a foundation."""
    from palflow.apps.models.mace.rebuild import describe

    model = load_foundation(path)
    numbers, e0s = _table(model)
    products = model.products[0].symmetric_contractions
    try:  # mace-torch 0.3.x's contraction keeps one weight per order above the first
        correlation = len(products.contractions[0].weights) + 1
    except AttributeError:
        correlation = int(products.contraction_degree)
    return {
        **_architecture(model),
        "atomic_numbers": numbers,
        "e0s": e0s,
        "r_max": float(model.r_max),
        "correlation": int(correlation),
        "num_radial_basis": int(model.radial_embedding.bessel_fn.bessel_weights.numel()),
        "num_cutoff_basis": int(model.radial_embedding.cutoff_fn.p),
        "foundation_architecture": describe(model),
    }


def _table(model: torch.nn.Module) -> tuple[list[int], list[float]]:
    """The element table and its E0s (eV) of a single-head MACE model."""
    numbers = [int(z) for z in model.atomic_numbers]
    e0s = model.atomic_energies_fn.atomic_energies.detach().reshape(-1, len(numbers))[0]
    return numbers, [float(e) for e in e0s]


def _architecture(model: torch.nn.Module) -> dict[str, Any]:
    from e3nn import o3

    # A one-layer MACE keeps its hidden irreps as a string.
    hidden = o3.Irreps(str(model.interactions[0].hidden_irreps))
    return {
        "num_interactions": int(model.num_interactions),
        "num_channels": int(hidden.count("0e")),
        "max_L": int(hidden.lmax),
        "avg_num_neighbors": float(model.interactions[0].avg_num_neighbors),
    }


def load_foundation(path: str) -> torch.nn.Module:
    """The MACE model of a ``model.foundation`` file, on the CPU, checked.

    palflow fine-tunes single-head ``ScaleShiftMACE`` models (MACE-MP, MACE-OFF, the
    files palflow writes). Every refusal is one line naming the file and the fix.

    Raises
    ------
    ValueError
        When the file is missing, does not load, holds something else than a model (a
        dictionary of weights, a palflow checkpoint), a MACE model without an energy
        scale and shift, or a model with several heads.
    """
    if not os.path.isfile(path):
        raise ValueError(missing_foundation(path))
    where = f"model.foundation {path!r}"
    try:
        with _BUILD_LOCK:
            model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{where} is not a MACE model file: {first}") from None
    if isinstance(model, dict) and {"model", "spec", "state_dict"} <= set(model):
        raise ValueError(
            f"{where} is a palflow ensemble checkpoint, not a MACE model file: give one of "
            "its members' MACE files (models/ensemble.vNNNNN.memberK.model beside it, or "
            "ensemble.memberK.model from palflow export); to continue a run's members "
            "instead, give it as initial.ensemble"
        )
    if isinstance(model, dict) and _is_state_dict(model):
        raise ValueError(
            f"{where} holds only weights ({len(model)} tensors, a state_dict), not a model: "
            "give the whole model file, as torch.save(model) and MACE's training write it"
        )
    if not all(hasattr(model, a) for a in ("atomic_numbers", "r_max", "interactions")):
        raise ValueError(f"{where} is not a MACE model file (it holds a {type(model).__name__})")
    if not hasattr(model, "scale_shift") or not hasattr(model, "atomic_energies_fn"):
        raise ValueError(
            f"{where} is a {type(model).__name__} without an energy scale and shift: palflow "
            "fine-tunes ScaleShiftMACE models (MACE-MP, MACE-OFF, the files palflow writes)"
        )
    heads = list(getattr(model, "heads", None) or ["Default"])
    if len(heads) > 1:
        raise ValueError(
            f"{where} has {len(heads)} heads ({', '.join(map(str, heads))}): palflow "
            "fine-tunes a single-head model; extract the head to start from with MACE's "
            f"mace_select_head --head_name NAME --output_file one_head.model {path}"
        )
    return model


def _is_state_dict(data: dict) -> bool:
    """Tensors under module paths (``"interactions.0.linear.weight"``)."""
    tensors = bool(data) and all(torch.is_tensor(v) for v in data.values())
    return tensors and any("." in str(key) for key in data)
