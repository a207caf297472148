"""Fine-tuning MACE from a universal potential (issue 30).

MACE-MP-0 cannot be downloaded here, so ``examples/foundations/make_universal_mace.py``
writes a file of its "small" shape (89 elements, 128x0e, r_max 6 Å, random weights)
into the test's folder. From it, on Cu3Au with ASE's EMT as the oracle, through
palflow's own code paths (spec, pre-flight, training tasks, run layout, export, warm
start): a first fine-tune, a second one from a member file the first wrote (the
pattern of ACEsuit/mace#622), and a warm start from the fine-tuned run. Bad
``model.foundation`` inputs are refused by the ``palflow`` command in one line, exit
status 2, nothing created. Last, which parameters ``training.train_only`` trains.
"""

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write

pytest.importorskip("mace", reason="mace-torch is not installed")

from palflow.apps.data.dataset import write_dataset  # noqa: E402
from palflow.apps.models.calculator import EnsembleCalculator  # noqa: E402
from palflow.apps.models.core import build_batch, load_checkpoint, new_ensemble  # noqa: E402
from palflow.apps.models.registry import backend  # noqa: E402
from palflow.apps.training import _train_member, stack_member_checkpoints  # noqa: E402
from palflow.pipeline.config.models import resolve_model_spec  # noqa: E402
from palflow.pipeline.config.settings import TrainingSettings, load_campaign  # noqa: E402
from tests.test_cli import run_cli  # noqa: E402
from tests.test_mace import labelled  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "foundations" / "make_universal_mace.py"
TRAINING = TrainingSettings(
    min_task_s=0.0, batch_size=4, learning_rate=1e-3, learning_rate_min=1e-4
).model_dump()
SMALL_PARAMETERS = 3_847_440
"""MACE-MP-0 "small"'s parameter count (89 elements, 128x0e, 2 layers)."""


def make_universal():
    spec = importlib.util.spec_from_file_location("make_universal_mace", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cu3au(n: int, seed: int, stdev: float = 0.1) -> list[Atoms]:
    """Rattled 4-atom L1_2 Cu3Au cells (a = 3.75 Å, less than the 6 Å cutoff),
    labelled by EMT (eV, eV/Å)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.75, cubic=True)
        atoms.numbers[0] = 79
        atoms.rattle(stdev, seed=int(rng.integers(2**31)))
        frames.append(atoms)
    return labelled(frames, EMT())


def campaign(folder: Path, **overrides):
    """A campaign on Cu3Au (its structure file written into ``folder``) with EMT and a
    K=2 MACE committee, the ``overrides`` on top."""
    structure = folder / "cu3au.xyz"
    if not structure.exists():
        write(structure, cu3au(1, seed=99, stdev=0.0)[0], format="extxyz")
    settings = {
        "system__structure": str(structure),
        "oracle__calculator": "ase.calculators.emt:EMT",
        "oracle__kwargs": {},
        "model__name": "mace",
        "model__n_members": 2,
        **overrides,
    }
    return load_campaign(None, **settings)


def mean_distance(a: torch.nn.Module, b: torch.nn.Module, skip: str = "readouts") -> float:
    """Relative distance of two MACE models' weights, the readouts left out."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    names = [n for n in pa if not n.startswith(skip)]
    moved = sum(float((pa[n] - pb[n].to(pa[n])).norm() ** 2) for n in names)
    size = sum(float(pb[n].norm() ** 2) for n in names)
    return (moved / size) ** 0.5


@pytest.fixture(scope="module")
def universal(tmp_path_factory):
    """The universal-shaped file the script writes (seed 0), and what it printed."""
    import contextlib
    import io

    path = tmp_path_factory.mktemp("universal") / "mace-mp-0-small-shape.model"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert make_universal().main(["--out", str(path), "--seed", "0"]) == 0
    return SimpleNamespace(path=str(path), printed=printed.getvalue())


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, universal):
    """A run directory laid out as a fine-tuning run writes it: the foundation's copy,
    two members trained for one task each from it (E0s from the oracle), stacked into
    version 1 with its members' MACE files."""
    from palflow.pipeline.state.rundir import RunDirectory

    folder = tmp_path_factory.mktemp("fine-tuned")
    settings = campaign(folder, model__foundation=universal.path, model__e0s="oracle")
    run = RunDirectory.create(folder / "run", settings.model_dump())
    labels = cu3au(8, seed=0)
    run.store_labels(labels, [{"candidate_id": i, "source": "initial"} for i in range(8)])
    write_dataset(folder / "train.npz", labels)
    spec = resolve_model_spec(settings, labels, labels[0])
    shutil.copyfile(spec["foundation"], run.foundation_model)  # as campaign_state does
    spec["foundation"] = run.foundation_model
    results = []
    for k in range(2):
        out, data = run.member_checkpoint(k, 1), str(folder / "train.npz")
        results.append(_train_member(k, data, None, out, spec, TRAINING, k, 3, device="cpu"))
    stack_member_checkpoints([r["checkpoint"] for r in results], run.ensemble(1), {"version": 1})
    run.close()
    return SimpleNamespace(run=run, spec=spec, labels=labels, results=results, folder=folder)


# ----------------------------------------------------------------- the universal file
def test_script_writes_mace_mp_small_shape(universal):
    """The file has MACE-MP-0 small's hyper-parameters as MACE itself reads them back,
    and the script prints its sha256 and the seed's weights digest."""
    from mace.tools.scripts_utils import extract_config_mace_model

    script = make_universal()
    model = torch.load(universal.path, weights_only=False)
    config = extract_config_mace_model(model)
    assert type(model).__name__ == "ScaleShiftMACE"
    assert [int(z) for z in model.atomic_numbers] == list(range(1, 90))
    assert config["r_max"] == 6.0 and config["num_interactions"] == 2
    assert str(config["hidden_irreps"]) == "128x0e" and str(config["MLP_irreps"]) == "16x0e"
    assert config["correlation"] == 3 and config["max_ell"] == 3
    assert config["num_bessel"] == 8 and config["num_polynomial_cutoff"] == 5
    assert config["radial_MLP"] == [64, 64, 64]
    assert config["interaction_cls"].__name__ == "RealAgnosticResidualInteractionBlock"
    assert config["interaction_cls_first"].__name__ == "RealAgnosticResidualInteractionBlock"
    assert sum(p.numel() for p in model.parameters()) == SMALL_PARAMETERS
    e0s = model.atomic_energies_fn.atomic_energies.reshape(-1).tolist()
    assert e0s == script.placeholder_e0s(0) and all(-10 <= e <= -1 for e in e0s)
    assert f"sha256 {script.sha256(universal.path)}," in universal.printed
    assert f"weights sha256 {script.weights_sha256(model)}" in universal.printed
    # Forces of about 1 eV/Å on fcc copper (the scale the script sets).
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    forces = script._mace_forces(model, atoms)
    assert float(torch.sqrt((forces**2).mean())) == pytest.approx(1.0, rel=1e-6)


# ----------------------------------------------------------------- fine-tuning
def test_fine_tune_keeps_the_foundations_table_and_refits_its_own_e0s(
    universal, fine_tuned, tmp_path
):
    """The spec keeps the foundation's 89 elements, its E0s for all but Cu and Au, and
    its architecture whatever the campaign says of it; Cu and Au get the oracle's
    isolated-atom energies. The members train from the foundation's weights, and their
    MACE files give MACE's own calculator the committee's energies."""
    from mace.calculators import MACECalculator

    foundation = torch.load(universal.path, weights_only=False)
    table_e0s = foundation.atomic_energies_fn.atomic_energies.reshape(-1).tolist()
    # The campaign's own architecture settings are not the foundation's: ignored.
    settings = campaign(
        tmp_path, model__foundation=universal.path, model__e0s="oracle", model__r_max=4.0,
        model__correlation=2, model__num_channels=8, model__num_radial_basis=4,
        model__num_cutoff_basis=3,
    )  # fmt: skip
    spec = resolve_model_spec(settings, fine_tuned.labels, fine_tuned.labels[0])
    assert spec["atomic_numbers"] == list(range(1, 90))
    isolated = {}
    for z in (29, 79):
        atom = Atoms(numbers=[z])
        atom.calc = EMT()
        isolated[z] = atom.get_potential_energy()
    for z, e0 in zip(spec["atomic_numbers"], spec["e0s"], strict=True):
        assert e0 == (isolated[z] if z in isolated else table_e0s[z - 1]), z
    assert {k: spec[k] for k in ("r_max", "num_channels", "max_L", "num_interactions")} == {
        "r_max": 6.0, "num_channels": 128, "max_L": 0, "num_interactions": 2,
    }  # fmt: skip
    assert (spec["correlation"], spec["num_radial_basis"], spec["num_cutoff_basis"]) == (3, 8, 5)
    assert spec["avg_num_neighbors"] == 60.0

    ensemble, _ = load_checkpoint(fine_tuned.run.ensemble(1))
    for result, member in zip(fine_tuned.results, ensemble.members, strict=True):
        assert result["epochs"] == 3 and np.isfinite(result["train_loss"])
        energies = member.atomic_energies_fn.atomic_energies.reshape(-1)
        np.testing.assert_allclose(energies.numpy(), fine_tuned.spec["e0s"])
        distance = mean_distance(member, foundation)
        print(f"member moved {distance:.2e} of the foundation's weights")
        assert 0 < distance < 0.05
    files = sorted(str(p) for p in Path(fine_tuned.run.root, "models").glob("*.member*.model"))
    atoms = cu3au(1, seed=5)[0]
    atoms.calc = EnsembleCalculator(ensemble)
    atoms.get_potential_energy()
    ours = atoms.calc.results["member_energies"]
    theirs = atoms.copy()
    theirs.calc = MACECalculator(model_paths=files, device="cpu", default_dtype="float64")
    theirs.get_potential_energy()
    np.testing.assert_allclose(theirs.calc.results["energy_comm"], ours, atol=1e-6)


@pytest.mark.parametrize("source", ["run", "export"])
def test_second_fine_tune_from_a_fine_tuned_member_file(fine_tuned, tmp_path, source):
    """ACEsuit/mace#622's pattern: fine-tune from a file that was itself fine-tuned (a
    member file of the run, or of ``palflow export``). It passes the pre-flight, keeps
    the 89 elements and the universal E0s of the others, starts from the fine-tuned
    weights (not the universal ones), and trains."""
    from palflow.pipeline.config.preflight import check_campaign
    from palflow.pipeline.state.export import export_run

    if source == "run":
        path = fine_tuned.run.ensemble(1).removesuffix(".pt") + ".member1.model"
    else:
        path = export_run(fine_tuned.run.root, tmp_path / "exported")["model_files"][1]
    settings = campaign(tmp_path, model__foundation=path)
    check_campaign(settings)
    labels = cu3au(8, seed=1)
    spec = resolve_model_spec(settings, labels, labels[0])
    assert spec["atomic_numbers"] == list(range(1, 90)) and spec["foundation"] == path
    first = dict(zip(fine_tuned.spec["atomic_numbers"], fine_tuned.spec["e0s"], strict=True))
    own = {z: e0 for z, e0 in zip(spec["atomic_numbers"], spec["e0s"], strict=True)}
    assert all(own[z] == first[z] for z in own if z not in (29, 79))
    assert own[29] != first[29], "the campaign's own E0s are fitted again (by least squares)"

    member = backend("mace").new_member(spec, labels, seed=3)
    fine, _ = load_checkpoint(fine_tuned.results[1]["checkpoint"])
    universal = torch.load(fine_tuned.run.foundation_model, weights_only=False)
    assert mean_distance(member.members[0], fine.members[0]) == 0.0
    assert mean_distance(member.members[0], universal) > 0.0
    write_dataset(tmp_path / "train.npz", labels)
    result = _train_member(
        0, str(tmp_path / "train.npz"), None, str(tmp_path / "m0.pt"), spec, TRAINING,
        seed=3, n_epochs=2, device="cpu",
    )  # fmt: skip
    assert result["epochs"] == 2 and np.isfinite(result["train_loss"])


def test_warm_start_from_a_fine_tuned_run(fine_tuned, tmp_path):
    """``initial.ensemble`` = the fine-tuned run: the pre-flight passes, each member
    continues from its own checkpoint of that run (optimiser and steps included), and
    trains on."""
    from palflow.pipeline.config.preflight import check_campaign
    from palflow.pipeline.resume.warm_start import warm_member_checkpoints

    settings = campaign(tmp_path, initial__ensemble=str(fine_tuned.run.root))
    check_campaign(settings)
    paths = warm_member_checkpoints(settings, tmp_path / "models")
    write_dataset(tmp_path / "train.npz", fine_tuned.labels + cu3au(4, seed=2))
    for k, path in enumerate(paths):
        _, extra = load_checkpoint(path)
        assert extra["steps"] == fine_tuned.results[k]["steps"] > 0 and "optimizer" in extra
        result = _train_member(
            k, str(tmp_path / "train.npz"), path, str(tmp_path / f"m{k}.pt"), {}, TRAINING,
            seed=k, n_epochs=1, device="cpu",
        )  # fmt: skip
        assert result["steps"] > extra["steps"] and np.isfinite(result["train_loss"])


def test_a_fine_tuned_checkpoint_loads_without_its_foundation_file(fine_tuned, tmp_path):
    """Once the run's copy of the foundation is gone (the run moved, its exported
    ``ensemble.pt`` taken elsewhere), its checkpoints still load, from the architecture
    the spec keeps, and predict exactly as before; a warm start from the run works. A
    fresh member, which needs the foundation's weights, is refused in one line, as is
    a checkpoint whose spec lacks the architecture."""
    from palflow.pipeline.config.preflight import check_campaign
    from palflow.pipeline.resume.warm_start import warm_member_checkpoints
    from palflow.pipeline.state.export import export_run

    exported = export_run(fine_tuned.run.root, tmp_path / "exported")["ensemble_file"]
    atoms = cu3au(1, seed=7)[0]
    atoms.calc = EnsembleCalculator.from_checkpoint(exported, device="cpu")
    atoms.get_potential_energy()
    before = atoms.calc.results["member_energies"].copy()
    gone = Path(fine_tuned.run.foundation_model)
    gone.rename(tmp_path / "away.model")
    try:
        atoms.calc = EnsembleCalculator.from_checkpoint(exported, device="cpu")
        atoms.get_potential_energy()
        np.testing.assert_array_equal(atoms.calc.results["member_energies"], before)

        settings = campaign(tmp_path, initial__ensemble=str(fine_tuned.run.root))
        check_campaign(settings)
        (path, *_) = warm_member_checkpoints(settings, tmp_path / "models")
        write_dataset(tmp_path / "train.npz", fine_tuned.labels)
        result = _train_member(
            0, str(tmp_path / "train.npz"), path, str(tmp_path / "m0.pt"), {}, TRAINING,
            seed=0, n_epochs=1, device="cpu",
        )  # fmt: skip
        assert result["steps"] > fine_tuned.results[0]["steps"]

        with pytest.raises(FileNotFoundError, match=r"foundation\.model, which no longer exists"):
            backend("mace").new_member(fine_tuned.spec, fine_tuned.labels, seed=9)
        undescribed = dict(fine_tuned.spec, foundation_architecture=None)
        with pytest.raises(FileNotFoundError, match="put the file back there") as refused:
            backend("mace").load(undescribed, 1, {})
        assert "\n" not in str(refused.value)
    finally:
        (tmp_path / "away.model").rename(gone)


# ----------------------------------------------------------------- the cutoff and the cell
def test_a_cutoff_beyond_the_cell_counts_the_periodic_images(fine_tuned):
    """A 4-atom cell of 3.75 Å with the universal 6 Å cutoff (more than half the cell,
    the minimum-image limit, in every direction) is no problem: the full neighbour list
    counts each atom's 78 neighbours over the images, and a 2x2x2 supercell has 8 times
    the cell's energy. The density estimate that the pre-flight uses is within 15% of
    that count in a bulk cell, within 25% in a slab and a wire one cell thick (the
    shells of a lattice make the count jump); nothing periodic gives no estimate."""
    from palflow.apps.models.mace.neighbours import cutoff_problem, estimated_neighbours

    model, _ = load_checkpoint(fine_tuned.run.ensemble(1))
    cell = cu3au(1, seed=3, stdev=0.0)[0]
    batch = build_batch([cell], 6.0, "cpu", with_targets=False)
    assert batch.edge_src.numel() == 4 * 78  # shells of 12, 6, 24, 12 and 24 atoms
    assert estimated_neighbours(cell, 6.0) == pytest.approx(78, rel=0.15)
    cell = cu3au(1, seed=3)[0]
    supercell = cell.repeat(2)
    energies = [
        model(build_batch([a], 6.0, "cpu", with_targets=False))["energy"].detach()
        for a in (cell, supercell)
    ]
    # palflow's graphs hold positions in float32: equal to about 1e-6 eV per atom.
    assert energies[0].abs().min() > 0.01
    torch.testing.assert_close(energies[1], 8 * energies[0], rtol=0, atol=32e-6)

    assert cutoff_problem(cell, 6.0) is None and cutoff_problem(cell, 14.0) is None
    assert "about 68629 neighbours" in cutoff_problem(cell, 60.0)
    for pbc in ((True, True, False), (True, False, False)):  # a slab, a wire
        thin = cell.copy()
        thin.pbc = pbc
        counted = build_batch([thin], 6.0, "cpu", with_targets=False).edge_src.numel() / 4
        assert estimated_neighbours(thin, 6.0) == pytest.approx(counted, rel=0.25)
    molecule = cell.copy()
    molecule.pbc = False
    assert estimated_neighbours(molecule, 100.0) is None


# ----------------------------------------------------------------- bad input
def tiny_mace(path: Path, numbers=(29,), r_max=4.0, heads=None, plain=False) -> str:
    """A small MACE model file: ``numbers`` its table, ``r_max`` its cutoff (Å); with
    ``heads``, a multi-head ScaleShiftMACE; ``plain``, a MACE without scale and shift."""
    from e3nn import o3
    from mace import modules

    interaction = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    n_heads = len(heads or [None])
    options = dict(
        r_max=r_max, num_bessel=4, num_polynomial_cutoff=5, max_ell=1,
        interaction_cls=interaction, interaction_cls_first=interaction, num_interactions=1,
        num_elements=len(numbers), hidden_irreps=o3.Irreps("8x0e"), MLP_irreps=o3.Irreps("4x0e"),
        avg_num_neighbors=10.0, atomic_numbers=list(numbers), correlation=2,
        gate=torch.nn.functional.silu, radial_MLP=[8],
    )  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        if plain:
            model = modules.MACE(atomic_energies=np.zeros(len(numbers)), **options)
        else:
            model = modules.ScaleShiftMACE(
                atomic_energies=np.zeros((n_heads, len(numbers)) if heads else len(numbers)),
                heads=heads, atomic_inter_scale=[1.0] * n_heads,
                atomic_inter_shift=[0.0] * n_heads, **options,
            )  # fmt: skip
    finally:
        torch.set_default_dtype(previous)
    torch.save(model, path)
    return str(path)


def structure_file(folder: Path, symbols: str = "AuCu3") -> str:
    atoms = bulk("Cu", "fcc", a=3.75, cubic=True)
    atoms.set_chemical_symbols(list(Atoms(symbols).get_chemical_symbols()))
    write(folder / "start.xyz", atoms, format="extxyz")
    return str(folder / "start.xyz")


def state_dict_file(folder: Path, universal) -> str:
    model = torch.load(universal.path, weights_only=False)
    return torch_file(folder / "weights.pt", model.state_dict())


def text_file(path: Path) -> str:
    path.write_text("weights")
    return str(path)


def torch_file(path: Path, data) -> str:
    torch.save(data, path)
    return str(path)


BAD_FOUNDATIONS = {
    "a MACE-MP name": (lambda d, u, r: ("medium", None), "'medium' is a name, not a file"),
    "a MACE model name": (lambda d, u, r: ("mace-mp-0", None), "palflow downloads nothing"),
    "a text file": (
        lambda d, u, r: (text_file(d / "notes.model"), None),
        "notes.model' is not a MACE model file: invalid load key",
    ),
    "a torch dict": (
        lambda d, u, r: (torch_file(d / "d.pt", {"weights": torch.zeros(3)}), None),
        "d.pt' is not a MACE model file (it holds a dict)",
    ),
    "a state_dict": (
        lambda d, u, r: (state_dict_file(d, u), None),
        "weights.pt' holds only weights (",
    ),
    "a palflow checkpoint": (
        lambda d, u, r: (r.run.ensemble(1), None),
        "ensemble.v00001.pt' is a palflow ensemble checkpoint, not a MACE model file",
    ),
    "a multi-head model": (
        lambda d, u, r: (tiny_mace(d / "two.model", (29, 79), heads=["ft", "pt_head"]), None),
        "two.model' has 2 heads (ft, pt_head): palflow fine-tunes a single-head model",
    ),
    "a MACE without scale and shift": (
        lambda d, u, r: (tiny_mace(d / "plain.model", (29, 79), plain=True), None),
        "plain.model' is a MACE without an energy scale and shift",
    ),
    "a foundation without Au": (
        lambda d, u, r: (tiny_mace(d / "cu.model"), None),
        "element(s) Au are not in the foundation model",
    ),
    "a universal one without Pu": (
        lambda d, u, r: (u.path, structure_file(d, "PuCu3")),
        "element(s) Pu are not in the foundation model",
    ),
    "a foundation's absurd cutoff": (
        lambda d, u, r: (tiny_mace(d / "far.model", (29, 79), r_max=40.0), None),
        "the cutoff 40 Å of the foundation model",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FOUNDATIONS))
def test_bad_foundation_exits_2_with_one_line(tmp_path, universal, fine_tuned, case):
    """Through the ``palflow`` command: exit status 2, one line on stderr naming the
    problem, no traceback, no run directory."""
    make, message = BAD_FOUNDATIONS[case]
    foundation, structure = make(tmp_path, universal, fine_tuned)
    assert_refused(tmp_path, f'foundation = "{foundation}"', structure, message)


def test_an_absurd_cutoff_for_the_cell_exits_2_with_one_line(tmp_path):
    """``model.r_max`` = 60 Å (a cutoff in Bohr or nm rather than Å, say) gives each
    atom of the 4-atom Cu3Au cell about 69 000 neighbours: refused, since the graph's
    memory grows with the count (MACE-MP-0-small's shape takes about 0.1 MB per pair,
    so some 27 GB for this one cell). A cutoff beyond the cell is not refused as such
    (see the test above): palflow's neighbour lists count the periodic images."""
    assert_refused(
        tmp_path, "r_max = 60.0", None,
        "model.r_max = 60 Å gives each atom of the periodic start structure about 68629 "
        "neighbours, more than 1000",
    )  # fmt: skip


def assert_refused(folder: Path, model_line: str, structure: str | None, message: str) -> None:
    structure = structure or structure_file(folder)
    (folder / "c.toml").write_text(
        f'[system]\nstructure = "{structure}"\n'
        '[oracle]\ncalculator = "ase.calculators.emt:EMT"\nkwargs = {}\n'
        f'[model]\nname = "mace"\n{model_line}\n'
    )
    result = run_cli(
        "--site", "threads.py", "--campaign", str(folder / "c.toml"),
        "--run-dir", str(folder / "new-run"), timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0] and "Traceback" not in result.stderr, lines[0]
    assert not (folder / "new-run").exists(), "nothing is created for a refused run"


# ----------------------------------------------------------------- training.train_only
def test_trainable_parameters_of_each_part(universal):
    """``all``: every parameter of both members; ``readout``: the two readouts of each
    member only (not the embedding, the interactions or the products);
    ``last_interaction``: the last interaction and product blocks and the readouts."""
    spec = resolve_model_spec(
        campaign(Path(universal.path).parent, model__foundation=universal.path),
        cu3au(2, seed=4), cu3au(1, seed=4)[0],
    )  # fmt: skip
    model = new_ensemble("mace", spec, 2, seed=0)

    def count(parameters):
        return sum(p.numel() for p in parameters)

    everything = model.trainable_parameters("all")
    assert count(everything) == 2 * SMALL_PARAMETERS
    readout = model.trainable_parameters("readout")
    assert count(readout) == 2 * (128 + 2064)  # linear after layer 1, MLP after layer 2
    last = model.trainable_parameters("last_interaction")
    assert count(last) == 2 * (1_581_568 + 335_360 + 128 + 2064)

    ids = {id(p) for p in readout}
    for member in model.members:
        assert {id(p) for p in member.readouts.parameters()} <= ids
        frozen = [member.node_embedding, member.interactions, member.products]
        assert not ids & {id(p) for block in frozen for p in block.parameters()}
        ids_last = {id(p) for p in last}
        assert {id(p) for p in member.interactions[-1].parameters()} <= ids_last
        assert not ids_last & {id(p) for p in member.interactions[0].parameters()}
        assert not ids_last & {id(p) for p in member.products[0].parameters()}
        assert not ids_last & {id(p) for p in member.node_embedding.parameters()}
    with pytest.raises(ValueError, match="unknown training.train_only 'embedding' for MACE"):
        model.trainable_parameters("embedding")

    # Each returned parameter moves the energy (none is a dead weight).
    batch = build_batch(cu3au(1, seed=6), spec["r_max"], "cpu", with_targets=False)
    model(batch, compute_forces=False)["energy"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in readout)


# ----------------------------------------------------------------- whole campaigns
SIZES = {
    "training__min_task_s": 0.0,
    "training__epochs_per_task": 2,
    "training__batch_size": 4,
    "training__learning_rate": 1e-3,
    "training__learning_rate_min": 1e-4,
    "generator__steps_per_task": 10,
    "generator__n_walkers": 2,
    "initial__n_structures": 4,
    "test__n_structures": 4,
    "oracle__batch_size": 2,
    "stop__max_labels": 2,
    "stop__max_wall_s": 300.0,
    "stop__final_training_s": 0.0,
}
"""A campaign of about a minute on two cores with the universal-shaped MACE."""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_campaigns_fine_tune_again_and_warm_start_end_to_end(tmp_path, universal):
    """Campaign A fine-tunes from the universal file on thread pools. Campaign B then
    starts from A's exported member file (``model.foundation``, mace#622's pattern)
    and continues A's members (``initial.ensemble`` = A's run): it passes the
    pre-flight, runs to its budget, keeps its own copy of the foundation, and its
    members' steps go on from A's."""
    from palflow.pipeline.config.preflight import check_campaign
    from palflow.pipeline.state.export import export_run
    from tests.test_coordinator import run_campaign

    (tmp_path / "a").mkdir()
    first = campaign(tmp_path / "a", name="a", model__foundation=universal.path, **SIZES)
    check_campaign(first)
    run_a, summary_a = run_campaign(tmp_path / "a", first)
    assert summary_a["stop_reason"] == "label budget of 2 reached" and not summary_a["failed"]
    exported = export_run(run_a.root, tmp_path / "exported")["model_files"][0]

    (tmp_path / "b").mkdir()
    second = campaign(
        tmp_path / "b", name="b", seed=1, model__foundation=exported,
        initial__ensemble=str(run_a.root), **SIZES,
    )  # fmt: skip
    check_campaign(second)
    run_b, summary_b = run_campaign(tmp_path / "b", second)
    assert summary_b["stop_reason"] == "label budget of 2 reached" and not summary_b["failed"]
    assert summary_b["versions"] >= 1
    spec = json.loads((run_b.root / "state.json").read_text())["model_spec"]
    assert spec["foundation"] == run_b.foundation_model and len(spec["atomic_numbers"]) == 89
    for k in range(2):
        _, earlier = load_checkpoint(run_a.member_checkpoints(k)[-1][1])
        steps = [load_checkpoint(p)[1]["steps"] for _, p in run_b.member_checkpoints(k)]
        assert min(steps) >= earlier["steps"] and max(steps) > earlier["steps"]


@pytest.mark.parametrize(
    ("part", "trained"),
    [("readout", {"readouts"}), ("last_interaction", {"interactions.1", "products.1", "readouts"})],
)
def test_a_training_task_moves_only_the_part_it_trains(fine_tuned, tmp_path, part, trained):
    """A task with ``training.train_only`` from the universal file: the weights outside
    the part stay the foundation's exactly (the E0s, scale and shift are buffers), and
    the last layer moves when it is trained (the readouts move anyway: each member's
    starts perturbed)."""
    settings = TrainingSettings(**{**TRAINING, "train_only": part}).model_dump()
    write_dataset(tmp_path / "train.npz", fine_tuned.labels)
    data, out = str(tmp_path / "train.npz"), str(tmp_path / "m.pt")
    _train_member(0, data, None, out, dict(fine_tuned.spec), settings, 0, 2, device="cpu")
    _, extra = load_checkpoint(out)
    start = torch.load(fine_tuned.run.foundation_model, weights_only=False)
    blocks = ("readouts", "interactions.1", "products.1")
    moved = {
        next((b for b in blocks if name.startswith(b)), name)
        for name, value in start.named_parameters()
        if not torch.equal(extra["raw"][f"members.0.{name}"], value.detach())
    }
    assert moved == trained
