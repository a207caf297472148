"""A committee of SevenNet potentials (sevenn) behind palflow's ensemble protocol.

:class:`SevenNetEnsemble` holds K ``sevenn`` models (``AtomGraphSequential``), each a
copy of a foundation checkpoint: SevenNet-0 from the ``sevenn`` wheel by default, or a
SevenNet checkpoint file. The batch of structures is built once (palflow's vesin
neighbour list, :func:`palflow.apps.models.graph.build_batch`), turned into SevenNet's
input once, and each member runs on it in turn; SevenNet computes forces and the
virial from the gradient of the energy with respect to the edge vectors.

Members disagree from their first version: each starts from the foundation with its
readout (the two linear layers that turn node features into atomic energies)
multiplied by ``1 + readout_noise * N(0, 1)`` drawn with the member's seed, trains on
its own bootstrap resample in its own order, and gets its own energy reference
(:meth:`SevenNetEnsemble.fit_energy_reference`). SevenNet-0 is trained on PBE energies;
the reference is refitted to the campaign's oracle, per element, before the first
gradient step.

A member is a plain SevenNet model: :meth:`SevenNetEnsemble.export` writes each as a
checkpoint that ``sevenn.calculator.SevenNetCalculator`` loads.

Units: Å, eV, eV/Å.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ase import Atoms

from palflow.apps.data.dataset import atomic_write_bytes
from palflow.apps.models.graph import AtomsBatch, build_batch

# mace.spec imports mace before anything imports e3nn, so that e3nn's constants load
# under torch >= 2.6; its build lock serialises e3nn's code generation, as for MACE.
from palflow.apps.models.mace.spec import _BUILD_LOCK, LockedCommittee

logger = logging.getLogger(__name__)

READOUT = ("reduce_input_to_hidden", "reduce_hidden_to_energy")
"""SevenNet's readout: node features -> hidden scalars -> scaled atomic energy."""
VOIGT = [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (2, 0)]
"""SevenNet's order of the six stress components (xx, yy, zz, xy, yz, zx)."""


@dataclass(frozen=True)
class SevenNetSpec:
    """What every member shares.

    Attributes
    ----------
    cutoff
        The foundation's neighbour cutoff, Å.
    package_model
        A model shipped in the ``sevenn`` wheel, by name (``"7net-0"``), or None.
    foundation
        A SevenNet checkpoint file (the run's copy), when no ``package_model``.
    from_scratch
        Keep only the foundation's architecture and energy shift and scale, with
        fresh weights drawn with the member's seed.
    readout_noise
        Relative noise on each member's readout weights at its start.

    SevenNet 0.10 computes in float32 only (its element embedding is float32).
    """

    cutoff: float
    package_model: str | None = None
    foundation: str | None = None
    from_scratch: bool = False
    readout_noise: float = 0.1

    @property
    def checkpoint(self) -> str:
        """The checkpoint file members start from."""
        if self.foundation:
            return self.foundation
        from sevenn.util import pretrained_name_to_path

        return pretrained_name_to_path(self.package_model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SevenNetSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


@functools.lru_cache(maxsize=4)
def read_checkpoint(path: str) -> dict[str, Any]:
    """A SevenNet checkpoint's ``config`` and ``model_state_dict`` (a pickle: only
    trusted files; the wheel's own or the user's)."""
    with _BUILD_LOCK:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    if not (isinstance(payload, dict) and {"config", "model_state_dict"} <= set(payload)):
        raise ValueError(f"{path} is not a SevenNet checkpoint (no config and model_state_dict)")
    return {"config": payload["config"], "model_state_dict": payload["model_state_dict"]}


def _build(spec: SevenNetSpec, seed: int) -> torch.nn.Module:
    from sevenn.model_build import build_E3_equivariant_model
    from sevenn.util import model_from_checkpoint

    model, config = model_from_checkpoint(copy.deepcopy(read_checkpoint(spec.checkpoint)))
    if spec.from_scratch:
        # The same architecture, fresh weights; the foundation's per-element energy
        # shift and scale stay, refitted to the oracle as for a fine-tuned member.
        rescale = model._modules["rescale_atomic_energy"].state_dict()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_E3_equivariant_model(config)
        model._modules["rescale_atomic_energy"].load_state_dict(rescale)
    model.set_is_batch_data(True)
    _perturb_readout(model, seed, spec.readout_noise)
    return model


_BUILT: dict[tuple[SevenNetSpec, int], torch.nn.Module] = {}
"""Members as first built, per spec and seed (a build compiles e3nn's code for
seconds; a copy takes a fraction of that)."""


def new_member(spec: SevenNetSpec, seed: int) -> torch.nn.Module:
    """One SevenNet model of ``spec``, its readout perturbed with ``seed``."""
    with _BUILD_LOCK:
        if (spec, seed) not in _BUILT:
            _BUILT[(spec, seed)] = _build(spec, seed)
        return copy.deepcopy(_BUILT[(spec, seed)])


@torch.no_grad()
def _perturb_readout(model: torch.nn.Module, seed: int, scale: float) -> None:
    if scale <= 0:
        return
    generator = torch.Generator().manual_seed(seed)
    for name in READOUT:
        for parameter in model._modules[name].parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.mul_(1.0 + scale * noise)


class SevenNetEnsemble(LockedCommittee, torch.nn.Module):
    """K SevenNet members evaluated on one shared graph (see the module).

    Parameters
    ----------
    spec
        The checkpoint members start from, and how.
    n_members
        Ensemble size K.
    device
        Ignored for ``"meta"``: SevenNet's modules are built on the CPU, then moved.
    seed
        Seed of the first member; member k uses ``seed + k``.
    """

    def __init__(self, spec: SevenNetSpec, n_members: int, device=None, seed: int = 0):
        super().__init__()
        if n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {n_members}")
        self.spec = spec
        self.members = torch.nn.ModuleList(new_member(spec, seed + k) for k in range(n_members))
        if device is not None and str(device) != "meta":
            self.to(device)

    @property
    def n_members(self) -> int:
        return len(self.members)

    def forward(
        self, batch: AtomsBatch, compute_forces: bool = True, compute_stress: bool = False
    ) -> dict[str, torch.Tensor]:
        """Every member on ``batch``: ``energy`` [K, S] eV, ``forces`` [K, N, 3] eV/Å
        and, with ``compute_stress``, ``stress`` [K, S, 3, 3] eV/Å³ (ASE's sign, NaN
        for a structure without a cell). SevenNet always computes forces (its last
        module), so an energy-only pass costs as much as one with forces."""
        data = self.sevennet_input(batch)
        energies, forces, stresses = [], [], []
        with torch.enable_grad():
            for member in self.members:
                out = member(dict(data, edge_vec=data["edge_vec"].detach().clone()))
                energies.append(out["inferred_total_energy"])
                forces.append(out["inferred_force"])
                stresses.append(out["inferred_stress"])
        result = {"energy": torch.stack(energies)}
        if compute_forces:
            result["forces"] = torch.stack(forces)
        if not self.training:
            result = {key: value.detach() for key, value in result.items()}
        if compute_stress:
            # SevenNet's stress is minus ASE's, in its own Voigt order.
            voigt = -torch.stack(stresses)  # [K, S, 6]
            stress = torch.zeros(*voigt.shape[:2], 3, 3, dtype=voigt.dtype, device=voigt.device)
            for column, (i, j) in enumerate(VOIGT):
                stress[..., i, j] = voigt[..., column]
                stress[..., j, i] = voigt[..., column]
            has_volume = (batch.volume > 1e-6).to(stress.device)[None, :, None, None]
            stress = torch.where(has_volume, stress, torch.full_like(stress, np.nan))
            result["stress"] = stress if self.training else stress.detach()
        return result

    def sevennet_input(self, batch: AtomsBatch) -> dict[str, torch.Tensor]:
        """SevenNet's input for ``batch``, built once for all members."""
        positions = batch.positions.float()
        vectors = positions[batch.edge_dst] - positions[batch.edge_src]
        vectors = vectors + batch.edge_shift.float()
        volume = batch.volume.float()
        return {
            "x": batch.numbers,
            "atomic_numbers": batch.numbers,
            "pos": positions,
            "edge_index": torch.stack([batch.edge_src, batch.edge_dst]),
            "edge_vec": vectors,
            "cell_volume": torch.where(volume > 1e-6, volume, torch.ones_like(volume)),
            "num_atoms": batch.n_atoms,
            "batch": batch.structure_index,
        }

    # ------------------------------------------------------------ energy reference
    def fit_energy_reference(self, structures: Sequence[Atoms], limit: int = 64) -> None:
        """Refit each member's per-element energy shift to the labels of
        ``structures`` (eV), forces unchanged.

        The shift of each element of the labels moves by the least-squares solution of
        ``E_label - E_member = sum_Z n_Z * delta_Z`` (minimum norm: one composition
        gets its offset per atom spread evenly over its elements). SevenNet-0 is
        trained on PBE energies, eV per atom away from EMT's or xTB's.
        """
        labelled = [a for a in structures if "energy" in (getattr(a.calc, "results", None) or {})]
        labelled = labelled[:limit]
        if not labelled:
            return
        offsets = self.energy_offsets(labelled)
        with torch.no_grad():
            for member, delta in zip(self.members, offsets, strict=True):
                shift = member._modules["rescale_atomic_energy"].shift
                for z, value in delta.items():
                    shift[member.type_map[z]] += value

    def energy_offsets(self, structures: Sequence[Atoms]) -> list[dict[int, float]]:
        """Per member, per element: the least-squares energy offset (eV per atom)
        between the labels of ``structures`` and the member's predictions."""
        unknown = self.unknown_elements(structures)
        if unknown:
            raise ValueError(f"elements {unknown} are not in the foundation's element table")
        elements = sorted({int(z) for atoms in structures for z in atoms.numbers})
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        predicted = torch.cat(
            [
                self(build_batch(structures[i : i + 16], self.spec.cutoff, device, False))["energy"]
                for i in range(0, len(structures), 16)
            ],
            dim=1,
        )
        self.train(was_training)
        reference = np.array([a.calc.results["energy"] for a in structures])
        counts = np.array([[int((a.numbers == z).sum()) for z in elements] for a in structures])
        offsets = []
        for row in predicted.detach().cpu().double().numpy():
            delta, *_ = np.linalg.lstsq(counts.astype(float), reference - row, rcond=None)
            offsets.append(dict(zip(elements, (float(d) for d in delta), strict=True)))
        return offsets

    def unknown_elements(self, structures: Sequence[Atoms]) -> list[int]:
        table = self.members[0].type_map
        return sorted({int(z) for atoms in structures for z in atoms.numbers} - set(table))

    @torch.no_grad()
    def shift_energy(self, per_atom: torch.Tensor) -> None:
        """Add ``per_atom[k]`` eV per atom to member k's energies (every element's
        shift)."""
        for member, value in zip(self.members, per_atom, strict=True):
            shift = member._modules["rescale_atomic_energy"].shift
            shift.add_(value.to(shift))

    # ------------------------------------------------------------------ freezing
    def trainable_parameters(self, part: str) -> list[torch.nn.Parameter]:
        """The parameters to train for ``training.train_only``: ``"all"``,
        ``"readout"`` (the two readout layers) or ``"last_interaction"`` (the last
        convolution block's modules and the readout)."""
        if part == "all":
            return [p for p in self.parameters() if p.requires_grad]
        if part not in ("readout", "last_interaction"):
            raise ValueError(f"unknown training.train_only {part!r} for SevenNet")
        chosen = []
        for member in self.members:
            names = list(READOUT)
            if part == "last_interaction":
                last = max(int(n.split("_")[0]) for n in member._modules if n[0].isdigit())
                names += [n for n in member._modules if n.startswith(f"{last}_")]
            chosen += [p for n in names for p in member._modules[n].parameters()]
        return chosen

    # ------------------------------------------------------------------ members
    @classmethod
    def stack_modules(cls, spec: SevenNetSpec, modules: list[torch.nn.Module]) -> SevenNetEnsemble:
        ensemble = cls.__new__(cls)
        torch.nn.Module.__init__(ensemble)
        ensemble.spec = spec
        ensemble.members = torch.nn.ModuleList(modules)
        return ensemble

    def export(self, stem: str) -> list[str]:
        """Write each member as a SevenNet checkpoint ``{stem}.member{k}.pth``, which
        ``sevenn.calculator.SevenNetCalculator(path)`` loads."""
        config = read_checkpoint(self.spec.checkpoint)["config"]
        paths = []
        for k, member in enumerate(self.members):
            path = f"{stem}.member{k}.pth"
            state = {n: t.detach().to("cpu", torch.float32) for n, t in member.state_dict().items()}
            payload = {"config": config, "model_state_dict": state}
            atomic_write_bytes(path, lambda handle, p=payload: torch.save(p, handle))
            paths.append(path)
        return paths


SevenNetEnsemble.spec_class = SevenNetSpec
