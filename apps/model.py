"""A compact SchNet-class message-passing potential with an explicit ensemble dimension.

Every parameter of :class:`SchNetEnsemble` carries a leading dimension ``K`` (the
number of members), so one forward pass evaluates all members with batched matrix
products instead of a Python loop. Members are cut out with
:meth:`SchNetEnsemble.member` (trained independently, one task per member) and put
back together with :meth:`SchNetEnsemble.stack`.

Units: positions and cutoff in Å, energies in eV, forces in eV/Å.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import vesin
from ase import Atoms

from apps.dataset import atomic_write_bytes

logger = logging.getLogger(__name__)


def default_device() -> str:
    """Return ``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyper-parameters shared by all members of an ensemble.

    The campaign's ``[model]`` section gives them (``pipeline.settings.ModelSettings``
    holds the defaults), so this class has none of its own but ``max_z``.

    Attributes
    ----------
    cutoff
        Neighbour cutoff radius, Å.
    n_features
        Width of the atom-wise feature vectors.
    n_interactions
        Number of continuous-filter interaction blocks.
    n_rbf
        Number of Gaussian radial basis functions between 0 and ``cutoff``.
    max_z
        Largest supported atomic number.
    """

    cutoff: float
    n_features: int
    n_interactions: int
    n_rbf: int
    max_z: int = 100

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as a plain dictionary (JSON and ``weights_only`` safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Build a spec from :meth:`to_dict` output (or the campaign's ``[model]``
        section: its ``name`` is dropped); unknown keys raise ``TypeError``."""
        return cls(**{k: v for k, v in data.items() if k != "name"})


# --------------------------------------------------------------------------- batches


@dataclass
class AtomsBatch:
    """Many structures concatenated into one graph.

    Attributes
    ----------
    numbers
        Atomic numbers, [N] long.
    positions
        Cartesian positions, [N, 3] float32, Å.
    edge_src, edge_dst
        Global atom indices of each directed pair, [E] long; both directions of
        every pair are present (full neighbour list).
    edge_shift
        Cartesian periodic shift, [E, 3], Å, so that the pair vector is
        ``positions[edge_dst] - positions[edge_src] + edge_shift``.
    structure_index
        Structure of each atom, [N] long.
    n_structures
        Number of structures S.
    n_atoms
        Atoms per structure, [S] long.
    energy
        Reference energies, [S] float64, eV; ``None`` unless every structure is
        labelled.
    forces
        Reference forces, [N, 3] float32, eV/Å; ``None`` unless every structure is
        labelled.
    """

    numbers: torch.Tensor
    positions: torch.Tensor
    edge_src: torch.Tensor
    edge_dst: torch.Tensor
    edge_shift: torch.Tensor
    structure_index: torch.Tensor
    n_structures: int
    n_atoms: torch.Tensor
    energy: torch.Tensor | None = None
    forces: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> AtomsBatch:
        """Return a copy with every tensor moved to ``device``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return AtomsBatch(
            **{
                name: value.to(device) if isinstance(value, torch.Tensor) else value
                for name, value in values.items()
            }
        )


@dataclass
class StructureGraph:
    """Neighbour list and labels of one structure, as numpy arrays (local indices)."""

    numbers: np.ndarray
    positions: np.ndarray
    edge_src: np.ndarray
    edge_dst: np.ndarray
    edge_shift: np.ndarray
    energy: float | None
    forces: np.ndarray | None


def structure_graph(
    atoms: Atoms,
    cutoff: float,
    with_targets: bool = True,
    neighbor_list: vesin.NeighborList | None = None,
) -> StructureGraph:
    """Compute the full neighbour list (within ``cutoff``, Å) of one structure.

    Parameters
    ----------
    atoms
        The structure; directions with ``pbc`` False are treated as open.
    cutoff
        Neighbour cutoff, Å.
    with_targets
        Read ``energy`` (eV) and ``forces`` (eV/Å) from ``atoms.calc.results`` when
        both are present. The results are read directly so that no calculation is
        ever triggered.
    neighbor_list
        Reusable :class:`vesin.NeighborList` with the same cutoff.
    """
    nl = neighbor_list or vesin.NeighborList(cutoff=cutoff, full_list=True)
    positions = np.ascontiguousarray(atoms.positions, dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any():
        cell = np.ascontiguousarray(atoms.cell[:], dtype=np.float64)
        periodic: bool | list[bool] = pbc.tolist()
    else:
        # vesin ignores the box when nothing is periodic; zeros avoid relying on
        # whatever (possibly degenerate) cell an isolated molecule carries.
        cell = np.zeros((3, 3))
        periodic = False
    if len(atoms) > 0:
        src, dst, shift = nl.compute(positions, cell, periodic, quantities="ijS")
    else:
        src = dst = np.zeros(0, dtype=np.int64)
        shift = np.zeros((0, 3), dtype=np.int64)
    energy = forces = None
    results = getattr(atoms.calc, "results", None) if with_targets else None
    if results and "energy" in results and "forces" in results:
        energy = float(results["energy"])
        forces = np.asarray(results["forces"], dtype=np.float64).reshape(len(atoms), 3)
    return StructureGraph(
        numbers=np.asarray(atoms.numbers, dtype=np.int64),
        positions=positions,
        edge_src=src.astype(np.int64),
        edge_dst=dst.astype(np.int64),
        edge_shift=shift.astype(np.float64) @ cell,
        energy=energy,
        forces=forces,
    )


def collate(graphs: Sequence[StructureGraph], device: str | torch.device = "cpu") -> AtomsBatch:
    """Concatenate per-structure graphs into one :class:`AtomsBatch` on ``device``."""
    n_atoms = np.array([len(g.numbers) for g in graphs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_atoms)[:-1]]).astype(np.int64)

    def cat(arrays: list[np.ndarray], width: int, dtype) -> torch.Tensor:
        shape = (0, width) if width else (0,)
        joined = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(shape, dtype)
        return torch.as_tensor(joined, device=device)

    labelled = len(graphs) > 0 and all(g.energy is not None for g in graphs)
    return AtomsBatch(
        numbers=cat([g.numbers for g in graphs], 0, np.int64),
        positions=cat([g.positions for g in graphs], 3, np.float32),
        edge_src=cat([g.edge_src + o for g, o in zip(graphs, offsets, strict=True)], 0, np.int64),
        edge_dst=cat([g.edge_dst + o for g, o in zip(graphs, offsets, strict=True)], 0, np.int64),
        edge_shift=cat([g.edge_shift for g in graphs], 3, np.float32),
        structure_index=torch.as_tensor(np.repeat(np.arange(len(graphs)), n_atoms), device=device),
        n_structures=len(graphs),
        n_atoms=torch.as_tensor(n_atoms, device=device),
        energy=cat([np.array([g.energy for g in graphs])], 0, np.float64) if labelled else None,
        forces=cat([g.forces for g in graphs], 3, np.float32) if labelled else None,
    )


def build_batch(
    structures: Sequence[Atoms],
    cutoff: float,
    device: str | torch.device = "cpu",
    with_targets: bool = True,
) -> AtomsBatch:
    """Build one graph holding all ``structures`` with neighbours within ``cutoff`` (Å).

    Parameters
    ----------
    structures
        Periodic, partly periodic or isolated structures.
    cutoff
        Neighbour cutoff, Å.
    device
        Device of the returned tensors.
    with_targets
        Attach reference energies/forces when every structure carries them.

    Returns
    -------
    AtomsBatch
    """
    nl = vesin.NeighborList(cutoff=cutoff, full_list=True)
    graphs = [structure_graph(atoms, cutoff, with_targets, nl) for atoms in structures]
    return collate(graphs, device)


# --------------------------------------------------------------------------- model


def shifted_softplus(x: torch.Tensor) -> torch.Tensor:
    """``softplus(x) - log 2``, zero at the origin."""
    return torch.nn.functional.softplus(x) - math.log(2.0)


class _EnsembleLinear(torch.nn.Module):
    """K independent dense layers applied with one ``baddbmm``: [K, M, in] -> [K, M, out]."""

    def __init__(self, n_members: int, n_in: int, n_out: int, bias: bool = True, device=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(n_members, n_in, n_out, device=device))
        self.bias = (
            torch.nn.Parameter(torch.zeros(n_members, 1, n_out, device=device)) if bias else None
        )
        bound = math.sqrt(6.0 / (n_in + n_out))  # Glorot, drawn independently per member
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias, x, self.weight)


class _Interaction(torch.nn.Module):
    """SchNet interaction block: continuous-filter convolution plus atom-wise update."""

    def __init__(self, spec: ModelSpec, n_members: int, device=None):
        super().__init__()
        k, f = n_members, spec.n_features
        self.filter1 = _EnsembleLinear(k, spec.n_rbf, f, device=device)
        self.filter2 = _EnsembleLinear(k, f, f, device=device)
        self.in2f = _EnsembleLinear(k, f, f, bias=False, device=device)
        self.f2out = _EnsembleLinear(k, f, f, device=device)
        self.dense = _EnsembleLinear(k, f, f, device=device)

    def forward(self, h, rbf, envelope, edge_src, edge_dst):
        # Filters depend only on distance, so the block is rotation invariant.
        w = self.filter2(shifted_softplus(self.filter1(rbf))) * envelope.unsqueeze(-1)
        x = self.in2f(h)
        messages = x[:, edge_src] * w
        v = torch.zeros_like(x).index_add_(1, edge_dst, messages)
        v = self.dense(shifted_softplus(self.f2out(v)))
        return h + v


@runtime_checkable
class PotentialEnsemble(Protocol):
    """What the rest of palflow expects of an ensemble potential.

    ``forward`` returns ``{"energy": [K, S] eV, "forces": [K, N, 3] eV/Å}``.
    """

    spec: Any

    @property
    def n_members(self) -> int: ...

    def forward(self, batch: AtomsBatch, compute_forces: bool = True) -> dict: ...

    def member(self, index: int) -> PotentialEnsemble: ...

    @classmethod
    def stack(cls, members: Sequence[PotentialEnsemble]) -> PotentialEnsemble: ...


class SchNetEnsemble(torch.nn.Module):
    """K SchNet potentials whose parameters share a leading ensemble dimension.

    The energy of structure s predicted by member k is
    ``E_ks = sum_{i in s} (energy_scale[k] * nn_ki + energy_shift[k, Z_i])``.

    Parameters
    ----------
    spec
        Architecture.
    n_members
        Ensemble size K.
    device
        Device of the parameters (``"meta"`` builds an empty shell).
    """

    def __init__(
        self,
        spec: ModelSpec,
        n_members: int,
        device: str | torch.device | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        if n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {n_members}")
        self.spec = spec
        k, f = n_members, spec.n_features
        self.embedding = torch.nn.Parameter(torch.empty(k, spec.max_z + 1, f, device=device))
        with torch.no_grad():
            self.embedding.normal_()
        self.interactions = torch.nn.ModuleList(
            _Interaction(spec, k, device=device) for _ in range(spec.n_interactions)
        )
        self.readout1 = _EnsembleLinear(k, f, max(f // 2, 1), device=device)
        self.readout2 = _EnsembleLinear(k, max(f // 2, 1), 1, device=device)
        self.register_buffer("energy_shift", torch.zeros(k, spec.max_z + 1, device=device))
        self.register_buffer("energy_scale", torch.ones(k, device=device))

    @property
    def n_members(self) -> int:
        """Ensemble size K."""
        return self.embedding.shape[0]

    def forward(self, batch: AtomsBatch, compute_forces: bool = True) -> dict[str, torch.Tensor]:
        """Evaluate all members on ``batch`` in one pass.

        Parameters
        ----------
        batch
            Structures on the model's device.
        compute_forces
            Also return forces as ``-dE/dr``; the graph of the force is kept when the
            module is in training mode so that a force loss can be back-propagated.

        Returns
        -------
        dict
            ``"energy"``: [K, S] eV; ``"forces"``: [K, N, 3] eV/Å (only when
            ``compute_forces``).
        """
        k = self.n_members
        dtype = self.embedding.dtype
        positions = batch.positions.detach().to(dtype).unsqueeze(0).repeat(k, 1, 1)
        with torch.set_grad_enabled(torch.is_grad_enabled() or compute_forces):
            if compute_forces:
                positions.requires_grad_(True)
            shift = batch.edge_shift.to(dtype)
            vectors = positions[:, batch.edge_dst] - positions[:, batch.edge_src] + shift
            distances = torch.linalg.vector_norm(vectors, dim=-1)  # [K, E]
            rbf, envelope = self._radial(distances)

            h = self.embedding[:, batch.numbers]  # [K, N, F]
            for block in self.interactions:
                h = block(h, rbf, envelope, batch.edge_src, batch.edge_dst)
            atomic = self.readout2(shifted_softplus(self.readout1(h))).squeeze(-1)  # [K, N]
            atomic = atomic * self.energy_scale.unsqueeze(-1) + self.energy_shift[
                :, batch.numbers
            ].to(dtype)
            energy = atomic.new_zeros(k, batch.n_structures).index_add_(
                1, batch.structure_index, atomic
            )
            out = {"energy": energy}
            if compute_forces:
                (grad,) = torch.autograd.grad(
                    energy.sum(), positions, create_graph=self.training, allow_unused=True
                )
                out["forces"] = -grad if grad is not None else torch.zeros_like(positions)
        return out

    def _radial(self, distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian expansion [K, E, n_rbf] and cosine cutoff envelope [K, E]."""
        cutoff = self.spec.cutoff
        centers = torch.linspace(
            0.0, cutoff, self.spec.n_rbf, device=distances.device, dtype=distances.dtype
        )
        width = cutoff / max(self.spec.n_rbf - 1, 1)
        rbf = torch.exp(-0.5 * ((distances.unsqueeze(-1) - centers) / width) ** 2)
        envelope = 0.5 * (torch.cos(distances * (math.pi / cutoff)) + 1.0)
        envelope = envelope * (distances < cutoff).to(distances.dtype)
        return rbf, envelope

    @torch.no_grad()
    def fit_energy_reference(self, structures: Sequence[Atoms]) -> None:
        """Set per-element reference energies (eV) and the energy scale (eV) of all members.

        Reference energies are the least-squares (minimum-norm, so one repeated
        composition is fine) solution of ``E_s ≈ sum_Z count_sZ * shift_Z``; the
        scale is the standard deviation of all force components (eV/Å, used as an
        energy per atom scale), or 1 eV without forces.
        """
        energies, compositions, forces = [], [], []
        for atoms in structures:
            results = getattr(atoms.calc, "results", None) or {}
            if "energy" not in results:
                continue
            energies.append(float(results["energy"]))
            compositions.append(np.bincount(atoms.numbers, minlength=self.spec.max_z + 1))
            if "forces" in results:
                forces.append(np.asarray(results["forces"], dtype=float).ravel())
        if not energies:
            logger.warning("fit_energy_reference: no labelled structures, keeping defaults")
            return
        counts = np.asarray(compositions, dtype=float)
        present = np.flatnonzero(counts.sum(axis=0))
        coef, *_ = np.linalg.lstsq(counts[:, present], np.asarray(energies), rcond=None)
        shift = np.zeros(self.spec.max_z + 1)
        shift[present] = coef
        components = np.concatenate(forces) if forces else np.zeros(0)
        scale = float(np.std(components)) if components.size > 1 else 0.0
        if not np.isfinite(scale) or scale < 1e-6:
            scale = 1.0
        self.energy_shift.copy_(torch.as_tensor(shift).expand_as(self.energy_shift))
        self.energy_scale.fill_(scale)
        logger.debug("energy reference fitted: elements %s, scale %.4g eV", present, scale)

    def member(self, index: int) -> SchNetEnsemble:
        """Return a K=1 copy of member ``index`` (parameters and buffers)."""
        if not -self.n_members <= index < self.n_members:
            raise IndexError(f"member {index} out of range for K={self.n_members}")
        index = index % self.n_members
        state = {
            name: value[index : index + 1].detach().clone()
            for name, value in self.state_dict().items()
        }
        return _from_state_dict(type(self), self.spec, 1, state, training=self.training)

    @classmethod
    def stack(cls, members: Sequence[SchNetEnsemble]) -> SchNetEnsemble:
        """Concatenate ensembles (usually K=1 members) along the ensemble dimension."""
        spec = common_spec(members)
        states = [m.state_dict() for m in members]
        state = {name: torch.cat([s[name].detach() for s in states]) for name in states[0]}
        n_members = sum(m.n_members for m in members)
        return _from_state_dict(cls, spec, n_members, state, training=members[0].training)


def common_spec(members: Sequence[PotentialEnsemble]) -> Any:
    """The spec that all ``members`` share, which stacking them requires."""
    if not members:
        raise ValueError("stack needs at least one member")
    spec = members[0].spec
    if any(m.spec != spec for m in members):
        raise ValueError("cannot stack members with different specs")
    return spec


def _from_state_dict(cls, spec, n_members: int, state: dict, training: bool = False):
    """Build a model from ``state`` without drawing random numbers for a throw-away init."""
    model = cls(spec, n_members, device="meta")
    # assign=True adopts the tensors' device and dtype instead of copying into meta.
    model.load_state_dict(state, assign=True)
    return model.train(training)


SchNetEnsemble.spec_class = ModelSpec

MODELS: dict[str, type | str] = {
    "schnet": SchNetEnsemble,
    "mace": "apps.mace_ensemble:MACEEnsemble",  # imported on first use: mace is heavy
}
"""Registry of ensemble potentials by ``model.name`` (and checkpoint name). Each
class follows :class:`PotentialEnsemble` and names its spec class as ``spec_class``."""


def model_class(name: str) -> type:
    """The ensemble class registered as ``name``."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}: choose one of {sorted(MODELS)}")
    entry = MODELS[name]
    if isinstance(entry, str):
        from apps.common import import_object

        entry = MODELS[name] = import_object(entry)
    return entry


def new_ensemble(
    name: str, spec: dict[str, Any], n_members: int = 1, seed: int = 0, device=None
) -> PotentialEnsemble:
    """A freshly initialised ensemble of the registered model ``name``."""
    cls = model_class(name)
    torch.manual_seed(seed)
    model = cls(cls.spec_class.from_dict(spec), n_members, seed=seed)
    return model.to(device) if device is not None else model


def _model_name(model: torch.nn.Module) -> str:
    for name in MODELS:
        if type(model) is model_class(name):
            return name
    raise KeyError(f"{type(model).__name__} is not registered in MODELS")


def save_checkpoint(
    path: str | os.PathLike, model: SchNetEnsemble, extra: dict | None = None
) -> None:
    """Write ``model`` and ``extra`` to ``path`` atomically.

    Parameters
    ----------
    path
        Destination file.
    model
        A registered ensemble.
    extra
        Plain Python values and tensors (e.g. an optimiser ``state_dict``); must be
        loadable with ``torch.load(..., weights_only=True)``.
    """
    payload = {
        "model": _model_name(model),
        "spec": model.spec.to_dict(),
        "n_members": model.n_members,
        "state_dict": {k: v.detach() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, lambda handle: handle.write(buffer.getvalue()))


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[SchNetEnsemble, dict]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Returns
    -------
    model, extra
        The model on ``device`` in eval mode and the ``extra`` dictionary (tensors in it
        are also mapped to ``device``).
    """
    payload = torch.load(path, map_location=device, weights_only=True)
    cls = model_class(payload["model"])
    spec = cls.spec_class.from_dict(payload["spec"])
    model = _from_state_dict(cls, spec, int(payload["n_members"]), payload["state_dict"])
    return model.eval(), payload.get("extra", {})
