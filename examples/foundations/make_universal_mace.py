"""Write a MACE model file of the shape of MACE-MP-0 "small", with random weights.

MACE-MP-0 and MACE-OFF cannot be downloaded where palflow's tests run; on a cluster
users bring the file. This script writes a stand-in of the same shape, so that
fine-tuning from a universal potential (``model.foundation``) can be exercised
without the real file: 89 elements (Z = 1..89), hidden irreps ``128x0e``, r_max 6 Å,
2 interactions (``RealAgnosticResidualInteractionBlock``), correlation 3, max_ell 3,
8 Bessel functions, polynomial cutoff of order 5, radial MLP [64, 64, 64], readout
MLP ``16x0e``, SiLU gates, a ``ScaleShiftMACE``: the settings of MACE-MP-0 "small"
(``2023-12-10-mace-128-L0_energy_epoch-249.model``; the defaults of mace-torch
0.3.16's ``mace/tools/arg_parser.py`` except the channels, max_L and cutoff).

What is not MACE-MP-0's
    The weights (MACE's own random initialisation, seeded by ``--seed``), the E0s (a
    placeholder table drawn with the same seed: -1 to -10 eV per element, the range of
    PBE isolated-atom energies on VASP's references), the mean neighbour count (60,
    about a dense crystal's within 6 Å) and the scale (forces of about 1 eV/Å on an
    fcc metal). Its predictions mean nothing; its shape is the point.

The file is a pickled ``torch.nn.Module`` in float64, about 30 MB, written in a few
seconds. The script prints its path, seed, parameter count and sha256: the same seed
gives the same weights, and the same "weights sha256" (the file's own sha256 also
depends on torch's pickling, and changes from one run to the next).

Usage::

    python examples/foundations/make_universal_mace.py --out universal.model --seed 0

and then, in a campaign, ``model.foundation = "universal.model"``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import warnings

ELEMENTS = list(range(1, 90))
"""Z = 1 (H) .. 89 (Ac), MACE-MP-0's element table."""

SMALL = {
    "r_max": 6.0,
    "num_bessel": 8,
    "num_polynomial_cutoff": 5,
    "max_ell": 3,
    "num_interactions": 2,
    "hidden_irreps": "128x0e",
    "MLP_irreps": "16x0e",
    "correlation": 3,
    "radial_MLP": [64, 64, 64],
}
"""MACE-MP-0 "small"'s hyper-parameters (cutoff in Å)."""

AVG_NUM_NEIGHBORS = 60.0
"""Neighbours within 6 Å in a dense crystal, about (MACE divides messages by it)."""


def placeholder_e0s(seed: int) -> list[float]:
    """One isolated-atom energy per element of :data:`ELEMENTS`, eV: uniform in
    [-10, -1], drawn with ``seed`` (a placeholder, not MACE-MP-0's table)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [float(e) for e in np.round(rng.uniform(-10.0, -1.0, len(ELEMENTS)), 4)]


def build(seed: int = 0):
    """A ``ScaleShiftMACE`` of MACE-MP-0 "small"'s shape, random weights from ``seed``."""
    warnings.filterwarnings("ignore", message="The TorchScript type system doesn't support")
    warnings.filterwarnings("ignore", message="Environment variable TORCH_FORCE_NO_WEIGHTS")
    import mace  # noqa: F401  (before e3nn: it lets e3nn load its constants)
    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    interaction = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    with _default_dtype(torch.float64):
        model = modules.ScaleShiftMACE(
            r_max=SMALL["r_max"],
            num_bessel=SMALL["num_bessel"],
            num_polynomial_cutoff=SMALL["num_polynomial_cutoff"],
            max_ell=SMALL["max_ell"],
            interaction_cls=interaction,
            interaction_cls_first=interaction,
            num_interactions=SMALL["num_interactions"],
            num_elements=len(ELEMENTS),
            hidden_irreps=o3.Irreps(SMALL["hidden_irreps"]),
            MLP_irreps=o3.Irreps(SMALL["MLP_irreps"]),
            atomic_energies=np.asarray(placeholder_e0s(seed)),
            avg_num_neighbors=AVG_NUM_NEIGHBORS,
            atomic_numbers=ELEMENTS,
            correlation=SMALL["correlation"],
            gate=torch.nn.functional.silu,
            radial_MLP=SMALL["radial_MLP"],
            radial_type="bessel",
            use_reduced_cg=False,  # mace_run_train's default, as MACE-MP-0 was trained
            atomic_inter_scale=1.0,
            atomic_inter_shift=0.0,
        )
        _scale_forces(model)
    return model.eval()


@contextlib.contextmanager
def _default_dtype(dtype):
    """torch's default dtype set to ``dtype`` inside the block (MACE builds its buffers
    and its input in that dtype)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _scale_forces(model) -> None:
    """Set the interaction scale so that forces on a rattled fcc copper cell are about
    1 eV/Å (RMS): a random MACE's are orders of magnitude off."""
    import torch
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    forces = _mace_forces(model, atoms)
    rms = float(torch.sqrt((forces**2).mean()))
    with torch.no_grad():
        model.scale_shift.scale.fill_(1.0 / rms if rms > 0 else 1.0)


def _mace_forces(model, atoms):
    """MACE's forces (eV/Å) on ``atoms`` through MACE's own data pipeline."""
    from mace import data
    from mace.tools import torch_geometric, utils

    table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
    with _default_dtype(next(model.parameters()).dtype):  # MACE's input in the model's
        config = data.config_from_atoms(atoms)
        graph = data.AtomicData.from_config(config, z_table=table, cutoff=float(model.r_max))
        batch = next(iter(torch_geometric.dataloader.DataLoader([graph], batch_size=1)))
        return model(batch.to_dict(), compute_force=True)["forces"].detach()


def weights_sha256(model) -> str:
    """sha256 of the model's parameters and buffers (names and bytes, in order): the
    same for the same seed, unlike the file's, which torch's pickling varies."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write(path: str, seed: int = 0) -> str:
    """Build the model with ``seed``, write it to ``path``; return the file's sha256."""
    import torch

    model = build(seed)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    torch.save(model, path)
    return sha256(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="universal.model", help="the model file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and E0s")
    args = parser.parse_args(argv)
    digest = write(args.out, args.seed)
    import torch

    model = torch.load(args.out, map_location="cpu", weights_only=False)
    n_parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{args.out}: MACE-MP-0-small-shaped ScaleShiftMACE, random weights (seed "
        f"{args.seed}), {len(ELEMENTS)} elements, r_max {SMALL['r_max']:g} Å, "
        f"{n_parameters} parameters, sha256 {digest}, weights sha256 {weights_sha256(model)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
