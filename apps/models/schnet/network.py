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
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ase import Atoms

from palflow.apps.models.graph import AtomsBatch, strain, stress_from_strain
from palflow.apps.models.protocol import common_spec, from_state_dict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyper-parameters shared by all members of an ensemble.

    The campaign's ``[model]`` section gives them
    (:class:`palflow.apps.models.schnet.SchNetSettings` holds the defaults), so this
    class has none of its own but ``max_z``.

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

    def forward(
        self, batch: AtomsBatch, compute_forces: bool = True, compute_stress: bool = False
    ) -> dict[str, torch.Tensor]:
        """Evaluate all members on ``batch`` in one pass.

        Parameters
        ----------
        batch
            Structures on the model's device.
        compute_forces
            Also return forces as ``-dE/dr``; the graph of the force is kept when the
            module is in training mode so that a force loss can be back-propagated.
        compute_stress
            Also return the stress ``(1/V) dE/dε`` (ASE's sign) from a symmetric strain
            ε of every structure's cell (positions and periodic shifts deformed
            together, :func:`palflow.apps.models.graph.strain`); NaN for a structure without a cell.

        Returns
        -------
        dict
            ``"energy"``: [K, S] eV; ``"forces"``: [K, N, 3] eV/Å (only when
            ``compute_forces``); ``"stress"``: [K, S, 3, 3] eV/Å³ (only when
            ``compute_stress``).
        """
        k = self.n_members
        dtype = self.embedding.dtype
        positions = batch.positions.detach().to(dtype).unsqueeze(0).repeat(k, 1, 1)
        derivatives = compute_forces or compute_stress
        with torch.set_grad_enabled(torch.is_grad_enabled() or derivatives):
            positions.requires_grad_(derivatives)
            shift = batch.edge_shift.to(dtype)
            strained, displacement = positions, None
            if compute_stress:
                strained, shift, displacement = strain(batch, positions, shift)
            vectors = strained[:, batch.edge_dst] - strained[:, batch.edge_src] + shift
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
            if derivatives:
                inputs = [positions] + ([displacement] if compute_stress else [])
                grads = torch.autograd.grad(
                    energy.sum(), inputs, create_graph=self.training, allow_unused=True
                )
                if compute_forces:
                    grad = grads[0]
                    out["forces"] = -grad if grad is not None else torch.zeros_like(positions)
                if compute_stress:
                    out["stress"] = stress_from_strain(batch, grads[1], displacement)
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

    def trainable_parameters(self, part: str) -> list[torch.nn.Parameter]:
        """The parameters that ``training.train_only = part`` trains: ``"readout"``,
        the two readout layers; ``"last_interaction"``, the last interaction block and
        the readout; ``"all"``, every one. The embedding and the other interaction
        blocks are the backbone (the energy reference and scale are buffers)."""
        readout = [*self.readout1.parameters(), *self.readout2.parameters()]
        if part == "readout":
            return readout
        if part == "last_interaction":
            return [*self.interactions[-1].parameters(), *readout]
        if part == "all":
            return list(self.parameters())
        raise ValueError(f"no part {part!r}: 'all', 'readout' or 'last_interaction'")

    @torch.no_grad()
    def shift_energy(self, per_atom: torch.Tensor) -> None:
        """Add ``per_atom[k]`` eV per atom to member k's energies (its every reference
        energy)."""
        self.energy_shift.add_(per_atom.to(self.energy_shift)[:, None])

    def member(self, index: int) -> SchNetEnsemble:
        """Return a K=1 copy of member ``index`` (parameters and buffers)."""
        if not -self.n_members <= index < self.n_members:
            raise IndexError(f"member {index} out of range for K={self.n_members}")
        index = index % self.n_members
        state = {
            name: value[index : index + 1].detach().clone()
            for name, value in self.state_dict().items()
        }
        return from_state_dict(type(self), self.spec, 1, state, training=self.training)

    @classmethod
    def stack(cls, members: Sequence[SchNetEnsemble]) -> SchNetEnsemble:
        """Concatenate ensembles (usually K=1 members) along the ensemble dimension."""
        spec = common_spec(members)
        states = [m.state_dict() for m in members]
        state = {name: torch.cat([s[name].detach() for s in states]) for name in states[0]}
        n_members = sum(m.n_members for m in members)
        return from_state_dict(cls, spec, n_members, state, training=members[0].training)


SchNetEnsemble.spec_class = ModelSpec
