"""A committee of MACE potentials (mace-torch) behind palflow's ensemble protocol.

:class:`MACEEnsemble` holds K ``mace.modules.ScaleShiftMACE`` members and
evaluates all of them on one graph: the batch of walkers or structures is built
once (one neighbour list, :func:`palflow.apps.models.core.build_batch`), turned into MACE's input
once, and each member runs on it in turn. MACE computes its forces with
``torch.autograd.grad`` inside its ``forward``, which ``torch.func.vmap`` cannot
batch over members, so the members' passes stay a loop over one shared input
(``benchmarks/batched_ensemble.py`` measures what that costs).

A member is a plain MACE model: :meth:`MACEEnsemble.export` writes each as a
standard MACE model file that ``mace.calculators.MACECalculator`` loads.

The architecture is :class:`~palflow.apps.models.mace.spec.MACESpec`; the element table,
the isolated-atom energies (E0s) and the mean neighbour count are fixed once per
campaign (:meth:`palflow.apps.models.mace.MACEBackend.resolve_spec`), so that every
member has the same architecture and members can be stacked. With ``foundation``,
every member starts from that MACE model file (``torch.load`` of a file the user
gave: a pickle, so only trusted files), its readout perturbed with the member's seed
so that members disagree; a checkpoint of such members loads without the file too,
from the architecture its spec keeps (:mod:`palflow.apps.models.mace.rebuild`).

Units: Å, eV, eV/Å.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms

from palflow.apps.data.dataset import atomic_write_bytes
from palflow.apps.models.graph import AtomsBatch
from palflow.apps.models.mace.spec import (  # it imports mace before anything imports e3nn
    _BUILD_LOCK,
    DTYPES,
    LockedCommittee,
    MACESpec,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ the ensemble
def _new_member(spec: MACESpec, seed: int, shape_only: bool = False) -> torch.nn.Module:
    """One MACE model with ``spec``'s architecture, or a perturbed foundation copy;
    with ``shape_only`` (its weights about to be loaded), rebuilt from the spec when the
    foundation file is gone."""
    rebuilt = shape_only and bool(spec.foundation) and not os.path.isfile(spec.foundation)
    with _BUILD_LOCK:
        key = (spec, 0 if rebuilt else seed, rebuilt)  # a rebuilt one's weights are not kept
        if key not in _BUILT:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                _BUILT[key] = _rebuild(spec) if rebuilt else _build_member(spec, seed)
        return copy.deepcopy(_BUILT[key])


_BUILT: dict[tuple[MACESpec, int, bool], torch.nn.Module] = {}
"""Members as first built, per spec, seed and whether rebuilt without the foundation
file: building one compiles e3nn's code for seconds, a copy takes a fraction of that,
and a worker loads the same architecture for every task (checkpoints overwrite the
weights)."""


def _rebuild(spec: MACESpec) -> torch.nn.Module:
    """The architecture of a member fine-tuned from a foundation file that is gone."""
    if not spec.foundation_architecture:
        raise FileNotFoundError(
            f"the MACE members were fine-tuned from {spec.foundation}, which no longer "
            "exists (a run directory moved, or its checkpoint copied elsewhere), and their "
            "spec does not describe that architecture: put the file back there"
        )
    from palflow.apps.models.mace.rebuild import rebuild

    return rebuild(spec.foundation_architecture, DTYPES[spec.dtype])


def _build_member(spec: MACESpec, seed: int) -> torch.nn.Module:
    if spec.foundation:
        if not os.path.isfile(spec.foundation):
            raise FileNotFoundError(
                f"a new MACE member starts from the foundation model file {spec.foundation}, "
                "which no longer exists: put it back there"
            )
        model = torch.load(spec.foundation, map_location="cpu", weights_only=False)
        _perturb_readout(model, seed)
        with torch.no_grad():  # the campaign's E0s (MACEBackend.resolve_spec)
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


class MACEEnsemble(LockedCommittee, torch.nn.Module):
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
        shape_only = str(device) == "meta"  # from_state_dict: the weights come next
        self.members = torch.nn.ModuleList(
            _new_member(spec, seed + k, shape_only) for k in range(n_members)
        )
        if device is not None and str(device) != "meta":
            self.to(device)
        self.register_buffer(
            "z_index", _z_index(spec.atomic_numbers), persistent=False
        )  # atomic number -> row of the element table, -1 when absent

    @property
    def n_members(self) -> int:
        return len(self.members)

    def forward(
        self, batch: AtomsBatch, compute_forces: bool = True, compute_stress: bool = False
    ) -> dict[str, torch.Tensor]:
        """Every member on ``batch``: ``energy`` [K, S] eV, ``forces`` [K, N, 3] eV/Å and,
        with ``compute_stress``, ``stress`` [K, S, 3, 3] eV/Å³ (MACE's own strain
        derivative, ASE's sign; NaN for a structure without a cell)."""
        data = self.mace_input(batch)
        energies, forces, stresses = [], [], []
        grad = torch.is_grad_enabled() or compute_forces or compute_stress
        with _BUILD_LOCK.shared(), torch.set_grad_enabled(grad):
            for member in self.members:
                out = member(
                    dict(data, positions=data["positions"].detach().clone()),
                    training=self.training,
                    compute_force=compute_forces,
                    compute_stress=compute_stress,
                )
                energies.append(out["energy"])
                if compute_forces:
                    forces.append(out["forces"])
                if compute_stress:
                    stresses.append(out["stress"])
        result = {"energy": torch.stack(energies)}
        if compute_forces:
            result["forces"] = torch.stack(forces)
        if compute_stress:
            stress = torch.stack(stresses)
            has_volume = (batch.volume > 1e-6).to(stress.device)[None, :, None, None]
            result["stress"] = torch.where(has_volume, stress, torch.full_like(stress, np.nan))
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
            "unit_shifts": (
                batch.edge_unit_shift.to(dtype)
                if batch.edge_unit_shift is not None
                else torch.zeros(n_edges, 3, dtype=dtype, device=index.device)
            ),
            "cell": (
                batch.cell.to(dtype).reshape(-1, 3)
                if batch.cell is not None
                else torch.zeros(3 * batch.n_structures, 3, dtype=dtype, device=index.device)
            ),
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
        from palflow.apps.models.graph import build_batch

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

    @torch.no_grad()
    def shift_energy(self, per_atom: torch.Tensor) -> None:
        """Add ``per_atom[k]`` eV per atom to member k's energies (its readout shift)."""
        for member, value in zip(self.members, per_atom, strict=True):
            member.scale_shift.shift.add_(value.to(member.scale_shift.shift))

    def trainable_parameters(self, part: str) -> list[torch.nn.Parameter]:
        """The parameters of every member that ``training.train_only = part`` trains.

        ``"all"``: all of them. ``"readout"``: the readout blocks alone (one per
        message-passing layer: MACE sums an energy read out after each); the element
        embedding, the radial MLPs, the interactions and the products stay as they are.
        ``"last_interaction"``: the last interaction block, its product (the symmetric
        contraction) and the readouts. MACE's E0s, scale and shift are buffers, never
        trained.
        """
        if part == "all":
            return list(self.parameters())
        blocks: list[torch.nn.Module] = []
        for member in self.members:
            if part == "last_interaction":
                blocks += [member.interactions[-1], member.products[-1]]
            elif part != "readout":
                raise ValueError(
                    f"unknown training.train_only {part!r} for MACE: 'all', 'readout' or "
                    "'last_interaction'"
                )
            blocks += list(member.readouts)
        return [p for block in blocks for p in block.parameters()]

    def export(self, stem: str) -> list[str]:
        """Write each member as a standard MACE model file ``{stem}.member{k}.model``,
        which ``mace.calculators.MACECalculator(model_paths=[...])`` loads."""

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
