"""Bad input: one clear message naming the problem and the fix, exit status 2, and
nothing submitted (no run directory is even created)."""

import fcntl
import json

import pytest

from tests.test_cli import run_cli

SITE_HEADER = (
    "from parsl.config import Config\nfrom parsl.executors.threads import ThreadPoolExecutor\n"
)


class EnergyOnly:
    """Importable stand-in for a calculator that cannot give forces."""

    implemented_properties = ["energy"]


def write(path, text):
    path.write_text(text)
    return str(path)


def three_label_site(d):
    return write(
        d / "site3.py",
        SITE_HEADER
        + "config = Config(executors=["
        + ", ".join(f"ThreadPoolExecutor(label={x!r})" for x in ("oracle", "generator", "train"))
        + "])\n",
    )


def mace_campaign(d, model_lines: str) -> str:
    """A MACE campaign on ethanol with EMT, its ``[model]`` section ending in ``model_lines``."""
    return write(
        d / "c.toml",
        '[oracle]\ncalculator = "ase.calculators.emt:EMT"\nkwargs = {}\n'
        f'[model]\nname = "mace"\n{model_lines}\n',
    )


def h_o_foundation(d) -> str:
    """A tiny MACE model file that knows H and O only (ethanol also has C)."""
    from palflow.apps.models.mace.ensemble import MACEEnsemble, MACESpec

    spec = MACESpec(
        r_max=4.0, num_channels=8, max_L=0, correlation=2, num_interactions=1,
        num_radial_basis=4, num_cutoff_basis=5, dtype="float64",
        atomic_numbers=(1, 8), e0s=(-13.6, -2040.0), avg_num_neighbors=3.0,
    )  # fmt: skip
    (path,) = MACEEnsemble(spec, 1).export(str(d / "h-o"))
    return path


def a_torch_dict(d) -> str:
    import torch

    torch.save({"weights": torch.zeros(3)}, d / "dict.model")
    return str(d / "dict.model")


def labelled_file(d, name="warm.extxyz", structure="CH3CH2OH", forces=True, scale=1.0):
    """An extxyz file of two labelled frames of ``structure`` (EMT), forces times
    ``scale``, or without forces."""
    from ase.build import molecule
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write as write_frames

    frames = []
    for seed in range(2):
        atoms = molecule(structure)
        atoms.rattle(0.05, seed=seed)
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy()}
        if forces:
            results["forces"] = atoms.get_forces() * scale
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    write_frames(d / name, frames, format="extxyz")
    return str(d / name)


def warm_campaign(d, line: str) -> str:
    return write(
        d / "c.toml",
        f'[oracle]\ncalculator = "ase.calculators.emt:EMT"\nkwargs = {{}}\n[initial]\n{line}\n',
    )


def a_run_directory(d):
    run = d / "old-run"
    run.mkdir()
    (run / "campaign.json").write_text(json.dumps({"name": "old"}))
    return str(run)


CASES = {
    "unknown site": (lambda d: ["--site", "no-such-site"], "site 'no-such-site' not found"),
    "site syntax error": (
        lambda d: ["--site", write(d / "bad.py", "config = (\n")],
        "the site file does not import",
    ),
    "site lacks a label": (
        lambda d: ["--site", three_label_site(d)],
        "no executor labelled 'infer'",
    ),
    "site without config": (
        lambda d: ["--site", write(d / "empty.py", "x = 1\n")],
        "defines neither 'config'",
    ),
    "zero budget": (lambda d: ["--max-labels", "0"], "stop.max_labels"),
    "negative budget": (lambda d: ["--max-labels", "-3"], "stop.max_labels"),
    "negative wall time": (lambda d: ["--max-wall", "-5"], "stop.max_wall_s"),
    "unknown key": (
        lambda d: ["--campaign", write(d / "c.toml", "[stop]\nmax_lables = 3\n")],
        "unknown key 'stop.max_lables'",
    ),
    "unknown section": (
        lambda d: ["--campaign", write(d / "c.toml", "[oracel]\nx = 1\n")],
        "unknown key 'oracel'",
    ),
    "wrong type": (
        lambda d: ["--campaign", write(d / "c.toml", '[oracle]\nbatch_size = "4"\n')],
        "'oracle.batch_size'",
    ),
    "unknown model": (
        lambda d: ["--campaign", write(d / "c.toml", '[model]\nname = "nequip"\n')],
        "'model.name'",
    ),
    "MACE foundation file missing": (
        lambda d: ["--campaign", mace_campaign(d, f'foundation = "{d / "mp0.model"}"')],
        "mp0.model' does not exist",
    ),
    "MACE foundation is a text file": (
        lambda d: [
            "--campaign",
            mace_campaign(d, f'foundation = "{write(d / "notes.model", "weights")}"'),
        ],
        "notes.model' is not a MACE model file",
    ),
    "MACE foundation is a torch dict": (
        lambda d: ["--campaign", mace_campaign(d, f'foundation = "{a_torch_dict(d)}"')],
        "dict.model' is not a MACE model file (it holds a dict)",
    ),
    "MACE foundation lacks an element": (
        lambda d: ["--campaign", mace_campaign(d, f'foundation = "{h_o_foundation(d)}"')],
        "element(s) C are not in the foundation model",
    ),
    "MACE setting of the wrong type": (
        lambda d: ["--campaign", mace_campaign(d, 'num_channels = "16"')],
        "'model.num_channels'",
    ),
    "MACE dtype unknown": (
        lambda d: ["--campaign", mace_campaign(d, 'dtype = "float16"')],
        "'model.dtype'",
    ),
    "MACE e0s table lacks an element": (
        lambda d: ["--campaign", mace_campaign(d, "e0s = { H = -13.6, O = -2040.0 }")],
        "element(s) C are not in model.e0s",
    ),
    "MACE e0s table names no element": (
        lambda d: ["--campaign", mace_campaign(d, "e0s = { H = -13.6, C = -1030.0, Oo = 0.0 }")],
        "model.e0s names unknown elements ['Oo']",
    ),
    "MACE setting with SchNet": (
        lambda d: ["--campaign", write(d / "c.toml", "[model]\nnum_channels = 8\n")],
        "num_channels is not a setting of model.name = 'schnet'",
    ),
    "malformed TOML": (lambda d: ["--campaign", write(d / "c.toml", "[stop\n")], "not valid TOML"),
    "missing campaign file": (
        lambda d: ["--campaign", str(d / "nope.toml")],
        "campaign file not found",
    ),
    "calculator does not import": (
        lambda d: ["--campaign", write(d / "c.toml", '[oracle]\ncalculator = "no_such:Calc"\n')],
        "cannot import module 'no_such'",
    ),
    "calculator without forces": (
        lambda d: [
            "--campaign",
            write(d / "c.toml", '[oracle]\ncalculator = "tests.test_bad_input:EnergyOnly"\n'),
        ],
        "does not compute forces",
    ),
    "structure does not parse": (
        lambda d: [
            "--campaign",
            write(
                d / "c.toml",
                '[system]\nstructure = "{}"\n'.format(write(d / "junk.xyz", "not\na structure\n")),
            ),
        ],
        "does not parse",
    ),
    "structure not found": (
        lambda d: ["--campaign", write(d / "c.toml", '[system]\nstructure = "Unobtainium"\n')],
        "neither an ASE molecule name nor an existing file",
    ),
    "test file without labels": (
        lambda d: [
            "--campaign",
            write(
                d / "c.toml",
                '[test]\nfile = "{}"\n'.format(write(d / "bare.xyz", "1\n\nH 0 0 0\n")),
            ),
        ],
        "must hold energies and forces",
    ),
    "unknown selection measure": (
        lambda d: ["--campaign", write(d / "c.toml", '[selection]\nmeasure = "entropy"\n')],
        "unknown measure 'entropy'",
    ),
    "unknown query": (
        lambda d: ["--campaign", write(d / "c.toml", '[selection]\nquery = "best"\n')],
        "unknown query 'best'",
    ),
    "metrology plug-in file missing": (
        lambda d: [
            "--campaign",
            write(d / "c.toml", '[metrology]\nplugins = ["nowhere.py:Metric"]\n'),
        ],
        "no file 'nowhere.py'",
    ),
    "several campaigns, the second broken": (
        lambda d: [
            "--campaign",
            write(d / "a.toml", 'name = "a"\n'),
            "--campaign",
            write(d / "b.toml", '[selection]\nquery = "best"\n'),
        ],
        "unknown query 'best'",
    ),
    "pressure on a molecule": (
        lambda d: ["--campaign", write(d / "c.toml", "[generator]\npressure_bar = 1.0\n")],
        "has no cell periodic in all three directions",
    ),
    "pressure with the rattle generator": (
        lambda d: [
            "--campaign",
            write(d / "c.toml", '[generator]\nkind = "rattle"\npressure_bar = 1.0\n'),
        ],
        "a pressure is for MD, not for the generator 'rattle'",
    ),
    "unknown generator": (
        lambda d: ["--campaign", write(d / "c.toml", '[generator]\nkind = "umbrella"\n')],
        "unknown generator 'umbrella'",
    ),
    "generator plug-in missing": (
        lambda d: [
            "--campaign",
            write(d / "c.toml", '[generator]\nkind = "nowhere.py:generate"\n'),
        ],
        "no file 'nowhere.py'",
    ),
    "warm-start file without forces": (
        lambda d: ["--campaign", warm_campaign(d, f'file = "{labelled_file(d, forces=False)}"')],
        "has no forces: a warm start needs energies and forces",
    ),
    "warm-start file with a foreign element": (
        lambda d: ["--campaign", warm_campaign(d, f'file = "{labelled_file(d, structure="NH3")}"')],
        "has element(s) N that the start structure 'CH3CH2OH' lacks",
    ),
    "warm-start forces in other units": (
        lambda d: ["--campaign", warm_campaign(d, f'file = "{labelled_file(d, scale=1e4)}"')],
        "are the units eV and Å?",
    ),
    "warm-start file missing": (
        lambda d: ["--campaign", warm_campaign(d, f'file = "{d / "gone.extxyz"}"')],
        "gone.extxyz' does not exist",
    ),
    "warm-start ensemble is not a checkpoint": (
        lambda d: [
            "--campaign",
            warm_campaign(d, f'ensemble = "{write(d / "v1.pt", "not a checkpoint")}"'),
        ],
        "is not a palflow ensemble checkpoint",
    ),
    "two systems with one name": (
        lambda d: [
            "--campaign",
            write(d / "c.toml", '[[systems]]\nname = "a"\n[[systems]]\nname = "a"\n'),
        ],
        "two systems are named 'a'",
    ),
    "[system] and [[systems]] together": (
        lambda d: [
            "--campaign",
            write(d / "c.toml", '[system]\nstructure = "H2O"\n[[systems]]\nname = "a"\n'),
        ],
        "give either [system] or [[systems]], not both",
    ),
    "pressure on a system without a cell": (
        lambda d: [
            "--campaign",
            write(
                d / "c.toml",
                '[[systems]]\nname = "gas"\nstructure = "H2O"\npressure_bar = 1.0\n'
                '[[systems]]\nname = "ethanol"\n',
            ),
        ],
        "system 'gas': pressure_bar = 1 asks for constant pressure",
    ),
    "unknown generator of a system": (
        lambda d: [
            "--campaign",
            write(d / "c.toml", '[[systems]]\nname = "a"\ngenerator = "umbrella"\n'),
        ],
        "unknown generator 'umbrella'",
    ),
    "held-out file of a system without labels": (
        lambda d: [
            "--campaign",
            write(
                d / "c.toml",
                '[[systems]]\nname = "a"\ntest_file = "{}"\n'.format(
                    write(d / "bare.xyz", "1\n\nH 0 0 0\n")
                ),
            ),
        ],
        "must hold energies and forces",
    ),
    "resume with several campaigns": (
        lambda d: ["--resume", a_run_directory(d), "--campaign", "a.toml", "--campaign", "b.toml"],
        "drop the --campaign options",
    ),
    "run directory exists": (lambda d: ["--run-dir", str(d)], "continue it with --resume"),
    "resume a non-run": (lambda d: ["--resume", str(d)], "is not a palflow run directory"),
    "resume with a campaign": (
        lambda d: ["--resume", a_run_directory(d), "--campaign", "x.toml"],
        "drop --campaign",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_clear_message(tmp_path, case):
    make_args, message = CASES[case]
    (tmp_path / "stuff").write_text("so that the directory is not empty")
    args = make_args(tmp_path)
    if "--site" not in args:
        args = ["--site", "threads.py", *args]
    if "--run-dir" not in args and "--resume" not in args:
        args += ["--run-dir", str(tmp_path / "new-run")]
    result = run_cli(*args, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 4, "one message, not a log"
    assert not (tmp_path / "new-run").exists(), "nothing is created for a refused run"


def test_a_locked_run_directory_is_refused(tmp_path):
    run = a_run_directory(tmp_path)
    with open(f"{run}/.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_cli("--site", "threads.py", "--resume", run, timeout=120)
    assert result.returncode == 2
    assert "another coordinator is running" in result.stderr
