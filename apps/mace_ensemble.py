"""A committee of MACE potentials (mace-torch) behind palflow's ensemble protocol.

:class:`MACEEnsemble` holds K ``mace.modules.ScaleShiftMACE`` members and
evaluates all of them on one graph: the batch of walkers or structures is built
once (one neighbour list, :func:`apps.model.build_batch`), turned into MACE's input
once, and each member runs on it in turn. MACE computes its forces with
``torch.autograd.grad`` inside its ``forward``, which ``torch.func.vmap`` cannot
batch over members, so the members' passes stay a loop over one shared input
(``benchmarks/batched_ensemble.py`` measures what that costs).

Importing ``mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` for the process (e3nn's
constants are a pickle); palflow's own checkpoints are still read with an explicit
``weights_only=True``, which that variable does not override.

A member is a plain MACE model: :func:`export_members` writes each as a standard
MACE model file that ``mace.calculators.MACECalculator`` loads.

The architecture is :class:`MACESpec`; the element table, the isolated-atom
energies (E0s) and the mean neighbour count are fixed once per campaign
(:func:`resolve_spec`), so that every member has the same architecture and members
can be stacked. With ``foundation``, every member starts from that MACE model file
(``torch.load`` of a file the user gave: a pickle, so only trusted files), its
readout perturbed with the member's seed so that members disagree.

Units: Å, eV, eV/Å.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
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
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase import Atoms  # noqa: E402

from apps.model import AtomsBatch, common_spec  # noqa: E402

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
def fit_e0s(structures: Sequence[Atoms], atomic_numbers: Sequence[int]) -> list[float]:
    """Isolated-atom energies by least squares on labelled structures (``"average"``).

    Minimum-norm least squares of ``E_s ≈ sum_Z count_sZ * E0_Z``: a campaign of one
    composition gets the energy per atom spread evenly over its elements.
    """
    energies, counts = [], []
    for atoms in structures:
        results = getattr(atoms.calc, "results", None) or {}
        if "energy" in results:
            energies.append(float(results["energy"]))
            counts.append([int((atoms.numbers == z).sum()) for z in atomic_numbers])
    if not energies:
        raise ValueError("model.e0s = 'average' needs labelled structures")
    coefficients, *_ = np.linalg.lstsq(np.asarray(counts, float), np.asarray(energies), rcond=None)
    return [float(c) for c in coefficients]


def oracle_e0s(atomic_numbers: Sequence[int], calculator: Any) -> list[float]:
    """Isolated-atom energies by one oracle call per element (``"oracle"``)."""
    energies = []
    for z in atomic_numbers:
        atom = Atoms(numbers=[z], positions=[[0.0, 0.0, 0.0]])
        atom.calc = calculator
        energies.append(float(atom.get_potential_energy()))
    return energies


def mean_neighbours(structures: Sequence[Atoms], r_max: float) -> float:
    """Mean number of neighbours within ``r_max`` over the atoms of ``structures``."""
    from apps.model import build_batch

    if not structures:
        return 1.0
    batch = build_batch(list(structures), r_max, "cpu", with_targets=False)
    return max(float(batch.edge_src.numel()) / max(int(batch.n_atoms.sum()), 1), 1.0)


def foundation_elements(path: str) -> tuple[list[int], list[float], float, dict[str, Any]]:
    """The element table, E0s, cutoff and architecture of a foundation model file.

    Raises
    ------
    ValueError
        When the file is missing or is not a MACE model.
    """
    if not os.path.isfile(path):
        raise ValueError(f"model.foundation {path!r} does not exist: download it first")
    try:
        with _BUILD_LOCK:
            model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"model.foundation {path!r} is not a MACE model file: {error}") from None
    if not all(hasattr(model, a) for a in ("atomic_numbers", "r_max", "interactions")):
        raise ValueError(
            f"model.foundation {path!r} is not a MACE model file "
            f"(it holds a {type(model).__name__})"
        )
    from e3nn import o3

    numbers = [int(z) for z in model.atomic_numbers]
    e0s = model.atomic_energies_fn.atomic_energies.detach().reshape(-1, len(numbers))[0]
    # A one-layer MACE keeps its hidden irreps as a string.
    hidden = o3.Irreps(str(model.interactions[0].hidden_irreps))
    architecture = {
        "num_interactions": int(model.num_interactions),
        "num_channels": int(hidden.count("0e")),
        "max_L": int(hidden.lmax),
        "avg_num_neighbors": float(model.interactions[0].avg_num_neighbors),
    }
    return numbers, [float(e) for e in e0s], float(model.r_max), architecture


# ------------------------------------------------------------------ the ensemble
def _new_member(spec: MACESpec, seed: int) -> torch.nn.Module:
    """One MACE model with ``spec``'s architecture, or a perturbed foundation copy."""
    with _BUILD_LOCK:
        key = (spec, seed)
        if key not in _BUILT:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                _BUILT[key] = _build_member(spec, seed)
        return copy.deepcopy(_BUILT[key])


_BUILT: dict[tuple[MACESpec, int], torch.nn.Module] = {}
"""Members as first built, per spec and seed: building one compiles e3nn's code for
seconds, a copy takes a fraction of that, and a worker loads the same architecture
for every task (checkpoints overwrite the weights)."""


def _build_member(spec: MACESpec, seed: int) -> torch.nn.Module:
    if spec.foundation:
        model = torch.load(spec.foundation, map_location="cpu", weights_only=False)
        _perturb_readout(model, seed)
        with torch.no_grad():  # the campaign's E0s (see pipeline.models.resolve_model_spec)
            e0s = model.atomic_energies_fn.atomic_energies
            e0s.copy_(torch.as_tensor(spec.e0s, dtype=e0s.dtype).expand_as(e0s))
        return model.to(DTYPES[spec.dtype])
    from e3nn import o3
    from mace import modules

    hidden = " + ".join(
        f"{spec.num_channels}x{ell}{'e' if ell % 2 == 0 else 'o'}" for ell in range(spec.max_L + 1)
    )
    interaction = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=spec.r_max,
        num_bessel=spec.num_radial_basis,
        num_polynomial_cutoff=spec.num_cutoff_basis,
        max_ell=3,
        interaction_cls=interaction,
        interaction_cls_first=interaction,
        num_interactions=spec.num_interactions,
        num_elements=len(spec.atomic_numbers),
        hidden_irreps=o3.Irreps(hidden),
        MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.asarray(spec.e0s, dtype=float),
        avg_num_neighbors=spec.avg_num_neighbors,
        atomic_numbers=list(spec.atomic_numbers),
        correlation=spec.correlation,
        gate=torch.nn.functional.silu,
        radial_MLP=[32, 32, 32],
        radial_type="bessel",
        atomic_inter_scale=1.0,
        atomic_inter_shift=0.0,
    )
    return model.to(DTYPES[spec.dtype])


@torch.no_grad()
def _perturb_readout(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Multiply the readouts' weights by ``1 + scale * N(0, 1)``: members that start
    from one foundation model then disagree where the data do not pin them down."""
    generator = torch.Generator().manual_seed(seed)
    for readout in model.readouts:
        for parameter in readout.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.mul_(1.0 + scale * noise)


class MACEEnsemble(torch.nn.Module):
    """K MACE members evaluated on one shared graph (see the module's description).

    Parameters
    ----------
    spec
        Architecture, element table and E0s.
    n_members
        Ensemble size K.
    device
        Ignored for ``"meta"``: MACE's modules are built on the CPU, then moved.
    seed
        Seed of the first member's initial weights; member k uses ``seed + k``.
    """

    def __init__(
        self, spec: MACESpec, n_members: int, device: str | torch.device | None = None, seed=0
    ):
        super().__init__()
        if n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {n_members}")
        self.spec = spec
        self.members = torch.nn.ModuleList(_new_member(spec, seed + k) for k in range(n_members))
        if device is not None and str(device) != "meta":
            self.to(device)
        self.register_buffer(
            "z_index", _z_index(spec.atomic_numbers), persistent=False
        )  # atomic number -> row of the element table, -1 when absent

    @property
    def n_members(self) -> int:
        return len(self.members)

    def __call__(self, *args, **kwargs):
        # The shared lock is taken before torch.nn.Module.__call__ runs: while another
        # thread builds a member, torch.fx has that method patched.
        with _BUILD_LOCK.shared():
            return super().__call__(*args, **kwargs)

    def forward(self, batch: AtomsBatch, compute_forces: bool = True) -> dict[str, torch.Tensor]:
        """Every member on ``batch``: ``energy`` [K, S] eV, ``forces`` [K, N, 3] eV/Å."""
        data = self.mace_input(batch)
        energies, forces = [], []
        grad = torch.is_grad_enabled() or compute_forces
        with _BUILD_LOCK.shared(), torch.set_grad_enabled(grad):
            for member in self.members:
                out = member(
                    dict(data, positions=data["positions"].detach().clone()),
                    training=self.training,
                    compute_force=compute_forces,
                )
                energies.append(out["energy"])
                if compute_forces:
                    forces.append(out["forces"])
        result = {"energy": torch.stack(energies)}
        if compute_forces:
            result["forces"] = torch.stack(forces)
        return result

    def mace_input(self, batch: AtomsBatch) -> dict[str, torch.Tensor]:
        """MACE's input dictionary for ``batch``, built once for all members."""
        dtype = DTYPES[self.spec.dtype]
        index = self.z_index.to(batch.numbers.device)[batch.numbers]
        if (index < 0).any():
            missing = sorted({int(z) for z in batch.numbers[index < 0]})
            raise ValueError(
                f"elements {missing} are not in the model's element table "
                f"{list(self.spec.atomic_numbers)}: give them an E0 in model.e0s"
            )
        n_elements = len(self.spec.atomic_numbers)
        node_attrs = torch.nn.functional.one_hot(index, n_elements).to(dtype)
        ptr = torch.zeros(batch.n_structures + 1, dtype=torch.long, device=index.device)
        ptr[1:] = torch.cumsum(batch.n_atoms.to(index.device), 0)
        n_edges = batch.edge_src.numel()
        return {
            "positions": batch.positions.to(dtype),
            "node_attrs": node_attrs,
            "edge_index": torch.stack([batch.edge_src, batch.edge_dst]),
            "shifts": batch.edge_shift.to(dtype),
            "unit_shifts": torch.zeros(n_edges, 3, dtype=dtype, device=index.device),
            "cell": torch.zeros(3 * batch.n_structures, 3, dtype=dtype, device=index.device),
            "batch": batch.structure_index,
            "ptr": ptr,
        }

    def fit_energy_reference(self, structures: Sequence[Atoms]) -> None:
        """Set each member's interaction scale to the force RMS of ``structures`` (eV/Å),
        then its shift so that its mean energy error per atom on them is zero.

        The E0s stay. Without the second step a fresh member starts eV per molecule
        off, and the energy term of the loss, small beside the forces', takes many
        epochs to remove a constant that one number fixes.
        """
        if not self.spec.foundation:
            self._scale_to(structures)
        self._zero_mean_error(structures)

    @torch.no_grad()
    def _scale_to(self, structures: Sequence[Atoms]) -> None:
        e0 = dict(zip(self.spec.atomic_numbers, self.spec.e0s, strict=True))
        per_atom, forces = [], []
        for atoms in structures:
            results = getattr(atoms.calc, "results", None) or {}
            if "energy" in results:
                reference = sum(e0.get(int(z), 0.0) for z in atoms.numbers)
                per_atom.append((float(results["energy"]) - reference) / len(atoms))
            if "forces" in results:
                forces.append(np.asarray(results["forces"]).ravel())
        components = np.concatenate(forces) if forces else np.zeros(0)
        scale = float(np.sqrt(np.mean(components**2))) if components.size else 1.0
        shift = float(np.mean(per_atom)) if per_atom else 0.0
        for member in self.members:
            member.scale_shift.scale.fill_(scale if scale > 1e-6 else 1.0)
            member.scale_shift.shift.fill_(shift)

    def _zero_mean_error(self, structures: Sequence[Atoms], limit: int = 64) -> None:
        from apps.model import build_batch

        labelled = [a for a in structures if "energy" in (getattr(a.calc, "results", None) or {})][
            :limit
        ]
        if not labelled:
            return
        batch = build_batch(labelled, self.spec.r_max, next(self.parameters()).device, False)
        reference = torch.tensor([a.calc.results["energy"] for a in labelled], dtype=torch.float64)
        n_atoms = torch.tensor([len(a) for a in labelled], dtype=torch.float64)
        was_training = self.training
        self.eval()
        predicted = self(batch, compute_forces=False)["energy"].detach().cpu().double()
        self.train(was_training)
        offsets = ((predicted - reference) / n_atoms).mean(dim=1)  # eV/atom, per member
        with torch.no_grad():
            for member, offset in zip(self.members, offsets, strict=True):
                shift = member.scale_shift.shift
                shift.sub_(offset.to(shift.dtype))

    def member(self, index: int) -> MACEEnsemble:
        """A K=1 copy of member ``index``."""
        if not -self.n_members <= index < self.n_members:
            raise IndexError(f"member {index} out of range for K={self.n_members}")
        with _BUILD_LOCK:
            module = copy.deepcopy(self.members[index])
        return self.stack_modules(self.spec, [module])

    @classmethod
    def stack(cls, members: Sequence[MACEEnsemble]) -> MACEEnsemble:
        """Concatenate ensembles (usually K=1 members)."""
        spec = common_spec(members)
        with _BUILD_LOCK:
            modules = [copy.deepcopy(module) for m in members for module in m.members]
        return cls.stack_modules(spec, modules).train(members[0].training)

    def export(self, stem: str) -> list[str]:
        """Write each member as a standard MACE model file ``{stem}.member{k}.model``,
        which ``mace.calculators.MACECalculator(model_paths=[...])`` loads."""
        from apps.dataset import atomic_write_bytes

        paths = []
        for k, member in enumerate(self.members):
            path = f"{stem}.member{k}.model"
            with _BUILD_LOCK:
                module = copy.deepcopy(member).to("cpu").eval()
            atomic_write_bytes(path, lambda handle, m=module: torch.save(m, handle))
            paths.append(path)
        return paths

    @classmethod
    def stack_modules(cls, spec: MACESpec, modules: list[torch.nn.Module]) -> MACEEnsemble:
        ensemble = cls.__new__(cls)
        torch.nn.Module.__init__(ensemble)
        ensemble.spec = spec
        ensemble.members = torch.nn.ModuleList(modules)
        ensemble.register_buffer("z_index", _z_index(spec.atomic_numbers), persistent=False)
        return ensemble


def _z_index(atomic_numbers: Sequence[int]) -> torch.Tensor:
    index = torch.full((119,), -1, dtype=torch.long)
    index[list(atomic_numbers)] = torch.arange(len(atomic_numbers))
    return index


MACEEnsemble.spec_class = MACESpec
