"""The pre-flight (pipeline/config/preflight.py): inputs that used to run and achieve nothing,
or fail after the run directory existed, are refused up front with one clear message,
exit status 2, and nothing created.

Every case runs through ``palflow.pipeline.run.main`` in this process (fast); a few of each
class also through the real command line.
"""

import os
import time
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.calculator import Calculator

from tests.test_bad_input import write
from tests.test_cli import ROOT, run_cli

EMT = '[oracle]\ncalculator = "ase.calculators.emt:EMT"\nkwargs = {}\n'


# --------------------------------------------------------------- stand-ins for plug-ins
class RaisingCalculator:
    """A calculator whose constructor raises."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, **kwargs):
        raise RuntimeError("licence server unreachable")


class NaNCalculator(Calculator):
    """A calculator that returns a NaN energy."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=None, system_changes=None):
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": float("nan"), "forces": np.zeros((len(atoms), 3))}


class SlowCalculator(Calculator):
    """A calculator that hangs."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=None, system_changes=None):
        time.sleep(60)


def raising_measure(prediction, context):
    raise ValueError("bug in a user's measure")


def wrong_shape_measure(prediction, context):
    return np.zeros(1)


def nan_measure(prediction, context):
    return np.full(prediction.n_structures, np.nan)


def declared_measure(prediction, context):
    return prediction.spreads()[1] * context.options.get("alpha", 1.0)


declared_measure.options = {"alpha": 1.0}


class RaisingQuery:
    def select(self, candidates, size, context):
        raise RuntimeError("bug in a user's query")


class ForeignQuery:
    def select(self, candidates, size, context):
        return [object()]


def raising_metric(evaluation):
    raise KeyError("force_p95")


def listing_metric(evaluation):
    return [1.0, 2.0]


# --------------------------------------------------------------- inputs
def campaign(d, text: str, oracle: str = EMT, top: str = "") -> list[str]:
    """``--campaign`` of a file: top-level keys ``top``, then the ``[oracle]`` section (EMT,
    cheap to try, unless ``oracle`` says otherwise), then ``text``."""
    return ["--campaign", write(d / "c.toml", top + oracle + text)]


def structure(d, text: str, name: str = "s.xyz", extra: str = "") -> list[str]:
    """A campaign (EMT) whose start structure is the xyz/extxyz ``text``."""
    path = write(d / name, text)
    return campaign(d, f'[system]\nstructure = "{path}"\n{extra}')


def site(d, body: str) -> list[str]:
    return ["--site", write(d / "site.py", body)]


def binary(path) -> str:
    path.write_bytes(b"\xff\xfe\x00[stop]")
    return str(path)


def unwritable(d) -> str:
    """A run directory that cannot be made (root may write anywhere but /sys)."""
    if os.geteuid() == 0:
        return "/sys/palflow-run"
    locked = d / "locked"
    locked.mkdir(mode=0o500)
    return str(locked / "run")


PLUGIN = "tests.test_preflight"

CASES = {
    # ---- floats bounded and finite
    "oracle timeout infinite": (
        lambda d: campaign(d, "timeout_s = inf\n"),
        "'oracle.timeout_s': Input should be a finite number",
    ),
    "learning rate infinite": (
        lambda d: campaign(d, "[training]\nlearning_rate = inf\n"),
        "'training.learning_rate': Input should be a finite number",
    ),
    "learning rate zero": (
        lambda d: campaign(d, "[training]\nlearning_rate = 0.0\n"),
        "'training.learning_rate': Input should be greater than 0",
    ),
    "learning rate above 1": (
        lambda d: campaign(d, "[training]\nlearning_rate = 5.0\n"),
        "'training.learning_rate': Input should be less than or equal to 1",
    ),
    "threshold NaN": (
        lambda d: campaign(d, "[selection]\nthreshold = nan\n"),
        "'selection.threshold': Input should be a finite number",
    ),
    "negative temperature": (
        lambda d: campaign(d, "[generator]\ntemperature_K = -300.0\n"),
        "'generator.temperature_K': Input should be greater than 0",
    ),
    "negative held-out temperature": (
        lambda d: campaign(d, "[test]\ntemperature_K = -100.0\n"),
        "'test.temperature_K': Input should be greater than 0",
    ),
    "infinite system temperature": (
        lambda d: campaign(d, '[[systems]]\nname = "a"\ntemperatures_K = [300.0, inf]\n'),
        "'systems.0.temperatures_K.1': Input should be a finite number",
    ),
    "negative seed": (
        lambda d: campaign(d, "", top="seed = -1\n"),
        "'seed': Input should be greater",
    ),
    "infinite wall time": (lambda d: ["--max-wall", "inf"], "'stop.max_wall_s'"),
    # ---- settings checked against each other
    "sampling interval longer than the MD segment": (
        lambda d: campaign(d, "[generator]\nsteps_per_task = 20\nsample_interval = 50\n"),
        "generator.sample_interval = 50 is longer than the MD segment",
    ),
    "learning rate floor above the rate": (
        lambda d: campaign(d, "[training]\nlearning_rate = 1e-3\nlearning_rate_min = 1e-2\n"),
        "training.learning_rate_min = 0.01 is above training.learning_rate = 0.001",
    ),
    "upper trust level below the threshold": (
        lambda d: campaign(d, "[selection]\nthreshold = 0.5\nupper_threshold = 0.2\n"),
        "no frame could lie between the two trust levels",
    ),
    "blow-up distance beyond the fly-off distance": (
        lambda d: campaign(d, "[generator]\nmin_distance = 3.0\nmax_neighbour_distance = 2.0\n"),
        "every frame would count as blown up or flown off",
    ),
    "calibrated threshold with an energy measure": (
        lambda d: campaign(
            d, '[selection]\nmeasure = "energy_spread"\nthreshold_mode = "calibrated"\n'
        ),
        "'calibrated' needs a measure in force units",
    ),
    "more MPI nodes than ranks": (
        lambda d: campaign(d, "mpi_ranks = 1\nmpi_nodes = 2\n"),
        "every node needs a rank",
    ),
    # ---- convergence: the stop rules and the calibration need their data
    "accurate ratio above 1": (
        lambda d: campaign(d, "[stop]\naccurate_ratio = 1.5\n"),
        "'stop.accurate_ratio': Input should be less than or equal to 1",
    ),
    "accurate-ratio window of 0": (
        lambda d: campaign(d, "[stop]\naccurate_window = 0\n"),
        "'stop.accurate_window': Input should be greater than or equal to 1",
    ),
    "accurate-ratio stop with the random measure": (
        lambda d: campaign(d, '[selection]\nmeasure = "random"\n[stop]\naccurate_ratio = 0.9\n'),
        "the random measure has none",
    ),
    "accurate-ratio stop with a percentile threshold": (
        lambda d: campaign(
            d, '[selection]\nthreshold_mode = "percentile"\n[stop]\naccurate_ratio = 0.9\n'
        ),
        "a percentile threshold moves with the scores",
    ),
    "accurate-ratio stop with a zero threshold": (
        lambda d: campaign(d, "[selection]\nthreshold = 0.0\n[stop]\naccurate_ratio = 0.9\n"),
        "no frame is ever accurate",
    ),
    "target test error without a test set": (
        lambda d: campaign(d, "[test]\nn_structures = 0\n[stop]\ntarget_force_mae = 0.05\n"),
        "stop.target_force_mae needs a held-out set",
    ),
    "calibrated threshold without validation labels": (
        lambda d: campaign(
            d, '[selection]\nthreshold_mode = "calibrated"\n[training]\nvalidation_fraction = 0.0\n'
        ),
        "training.validation_fraction = 0 keeps none",
    ),
    # ---- plug-in options
    "misspelt measure option": (
        lambda d: campaign(d, '[selection]\nmeasure = "ucb"\nmeasure_options = { kapa = 1.0 }\n'),
        "'kapa' is not an option of measure 'ucb' (its options: kappa)",
    ),
    "option of a measure that reads none": (
        lambda d: campaign(d, "[selection]\nmeasure_options = { kappa = 1.0 }\n"),
        "'kappa' is not an option of measure 'max_force_spread' (its options: none)",
    ),
    "measure option of the wrong type": (
        lambda d: campaign(d, '[selection]\nmeasure = "ucb"\nmeasure_options = { kappa = "2" }\n'),
        "selection.measure_options.kappa = '2' should be a number",
    ),
    "option a plug-in measure does not declare": (
        lambda d: campaign(
            d,
            f'[selection]\nmeasure = "{PLUGIN}:declared_measure"\n'
            "measure_options = { beta = 1.0 }\n",
        ),
        "'beta' is not an option of measure 'tests.test_preflight:declared_measure'",
    ),
    # ---- the campaign's name
    "name holding a path": (
        lambda d: campaign(d, "", top='name = "../escape"\n'),
        "'name': String",
    ),
    "name that is a root path": (lambda d: campaign(d, "", top='name = "/etc/x"\n'), "(no path)"),
    "name with a space": (lambda d: campaign(d, "", top='name = "my run"\n'), "(no path)"),
    # ---- the structure
    "structure without atoms": (lambda d: structure(d, "0\n\n"), "has no atoms"),
    "overlapping atoms": (
        lambda d: structure(d, "3\n\nO 0 0 0\nH 0.96 0 0\nH 0.9 0.1 0\n"),
        "atoms 1 and 2 are 0.12 Å apart, closer than 0.6 Å (overlapping atoms",
    ),
    "atoms closer than the blow-up distance": (
        lambda d: structure(d, "2\n\nH 0 0 0\nH 0.55 0 0\n"),
        "or lower generator.min_distance",
    ),
    "atoms closer than their covalent radii allow": (
        lambda d: structure(d, "2\n\nCu 0 0 0\nCu 1.4 0 0\n"),
        "under generator.min_distance_factor = 0.6 of their covalent radii's sum (1.58 Å",
    ),
    "periodic without a cell": (
        lambda d: structure(
            d,
            '3\nProperties=species:S:1:pos:R:3 pbc="T T T"\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n',
            "s.extxyz",
        ),
        "is periodic along xyz but has no cell there",
    ),
    "a single atom in vacuum": (
        lambda d: campaign(d, '[system]\nstructure = "H"\n'),
        "is a single atom in vacuum",
    ),
    "a single atom in a periodic cell": (
        lambda d: structure(
            d,
            '1\nLattice="2.5 0 0 0 2.5 0 0 0 2.5" Properties=species:S:1:pos:R:3 pbc="T T T"\n'
            "Cu 0 0 0\n",
            "s.extxyz",
        ),
        "forces are zero by symmetry",
    ),
    "an atom flown off": (
        lambda d: structure(d, "4\n\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\nH 20 0 0\n"),
        "atom 3 is farther than generator.max_neighbour_distance",
    ),
    # ---- the oracle's trial on the start structure
    "elements the oracle cannot do": (
        lambda d: campaign(d, '[system]\nstructure = "Li2"\n'),
        "No EMT-potential for Li",
    ),
    "an element of a later frame the oracle cannot do": (
        lambda d: structure(d, "2\n\nCu 0 0 0\nCu 2.5 0 0\n2\n\nU 0 0 0\nU 2.8 0 0\n"),
        "No EMT-potential for U",
    ),
    "final training negative": (
        lambda d: campaign(d, "[stop]\nfinal_training_s = -1.0\n"),
        "'stop.final_training_s'",
    ),
    "final training infinite": (
        lambda d: campaign(d, "[stop]\nfinal_training_s = inf\n"),
        "'stop.final_training_s'",
    ),
    "calculator name misspelt": (
        lambda d: campaign(d, "", '[oracle]\ncalculator = "ase.calculators.emt:ETM"\n'),
        "oracle.calculator = 'ase.calculators.emt:ETM': module 'ase.calculators.emt' has no "
        "attribute 'ETM'; did you mean 'ase.calculators.emt:EMT'?",
    ),
    "calculator module without its package": (
        lambda d: campaign(d, "", '[oracle]\ncalculator = "emt:EMT"\n'),
        "did you mean 'ase.calculators.emt:EMT'?",
    ),
    "calculator that is not a calculator": (
        lambda d: campaign(
            d, "", '[oracle]\ncalculator = "collections:OrderedDict"\nkwargs = {}\n'
        ),
        "OrderedDict, which is not an ASE calculator",
    ),
    "calculator whose constructor raises": (
        lambda d: campaign(d, "", f'[oracle]\ncalculator = "{PLUGIN}:RaisingCalculator"\n'),
        "RuntimeError: licence server unreachable",
    ),
    "calculator giving NaN": (
        lambda d: campaign(
            d, "", f'[oracle]\ncalculator = "{PLUGIN}:NaNCalculator"\nkwargs = {{}}\n'
        ),
        "non-finite: energy or forces are not finite",
    ),
    "calculator that hangs past the timeout": (
        lambda d: campaign(
            d,
            "",
            f'[oracle]\ncalculator = "{PLUGIN}:SlowCalculator"\nkwargs = {{}}\ntimeout_s = 1.0\n',
        ),
        "timeout: no result after 1 s",
    ),
    "start forces above max_force": (
        lambda d: campaign(d, "max_force = 0.001\n"),
        "absurd-force: force component",
    ),
    # ---- plug-ins tried once on a made-up prediction
    "measure that is not callable": (
        lambda d: campaign(d, '[selection]\nmeasure = "math:pi"\n'),
        "selection.measure 'math:pi' is a float, not a function",
    ),
    "measure that raises": (
        lambda d: campaign(d, f'[selection]\nmeasure = "{PLUGIN}:raising_measure"\n'),
        "ValueError: bug in a user's measure",
    ),
    "measure of the wrong shape": (
        lambda d: campaign(d, f'[selection]\nmeasure = "{PLUGIN}:wrong_shape_measure"\n'),
        "returned shape (1,), expected (4,)",
    ),
    "measure scoring NaN": (
        lambda d: campaign(d, f'[selection]\nmeasure = "{PLUGIN}:nan_measure"\n'),
        "scored a trial prediction NaN",
    ),
    "query that raises": (
        lambda d: campaign(d, f'[selection]\nquery = "{PLUGIN}:RaisingQuery"\n'),
        "selection.query 'tests.test_preflight:RaisingQuery' failed on a trial call",
    ),
    "query returning strangers": (
        lambda d: campaign(d, f'[selection]\nquery = "{PLUGIN}:ForeignQuery"\n'),
        "returned something other than the candidates it was given",
    ),
    "metrology plug-in that raises": (
        lambda d: campaign(d, f'[metrology]\nplugins = ["{PLUGIN}:raising_metric"]\n'),
        "KeyError: 'force_p95'",
    ),
    "metrology plug-in returning a list": (
        lambda d: campaign(d, f'[metrology]\nplugins = ["{PLUGIN}:listing_metric"]\n'),
        "returned a list, not a dict of metrics",
    ),
    # ---- the run directory and the operating system
    "run directory on a file": (
        lambda d: ["--run-dir", write(d / "a-file", "x")],
        "a-file is a file: give the path of a new folder",
    ),
    "run directory under a file": (
        lambda d: ["--run-dir", str(Path(write(d / "a-file", "x")) / "run")],
        "a-file, which is a file: give a path of folders",
    ),
    "run directory unwritable": (
        lambda d: ["--run-dir", unwritable(d)],
        "is not writable",
    ),
    "run folder of several campaigns on a file": (
        lambda d: [
            "--campaign",
            write(d / "a.toml", EMT),
            "--campaign",
            write(d / "b.toml", EMT + 'name = "b"\n'),
            "--run-dir",
            write(d / "a-file", "x"),
        ],  # fmt: skip
        "a-file is a file",
    ),
    "campaign on a folder": (
        lambda d: ["--campaign", str(d)],
        "not a readable campaign file",
    ),
    "campaign file not text": (
        lambda d: ["--campaign", binary(d / "c.toml")],
        "not a readable campaign file",
    ),
    "site whose fresh_config() raises": (
        lambda d: site(d, "def fresh_config():\n    raise RuntimeError('no such queue')\n"),
        "fresh_config() raised: RuntimeError: no such queue",
    ),
    "site whose fresh_config() exits": (
        lambda d: site(d, "import sys\ndef fresh_config():\n    sys.exit(3)\n"),
        "fresh_config() raised: SystemExit: 3",
    ),
    "run directory with a space on a site of worker processes": (
        lambda d: ["--site", "laptop.py", "--run-dir", str(d / "my runs" / "r")],
        "holds ' ', which the site's workers cannot carry",
    ),
}

CLI_CASES = [
    "calculator name misspelt",
    "oracle timeout infinite",
    "sampling interval longer than the MD segment",
    "misspelt measure option",
    "name holding a path",
    "overlapping atoms",
    "elements the oracle cannot do",
    "calculator whose constructor raises",
    "measure that is not callable",
    "run directory under a file",
    "campaign on a folder",
    "run directory with a space on a site of worker processes",
]
"""Cases also tried through the real command line (a process each)."""


def _arguments(tmp_path, case):
    make_args, message = CASES[case]
    (tmp_path / "stuff").write_text("so that the directory is not empty")
    args = make_args(tmp_path)
    if "--site" not in args:
        args = ["--site", "threads.py", *args]
    if "--run-dir" not in args:
        args += ["--run-dir", str(tmp_path / "new-run")]
    return args, message


def _check(tmp_path, status, stderr, message, before):
    assert status == 2, stderr[-2000:]
    assert message in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) <= 4, "one message, not a log"
    assert not (tmp_path / "new-run").exists(), "nothing is created for a refused run"
    assert set(tmp_path.iterdir()) == before, "nothing else is created either"


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_before_anything_is_created(tmp_path, capsys, case):
    from palflow.pipeline.run import main

    args, message = _arguments(tmp_path, case)
    before = set(tmp_path.iterdir())
    status = main(args)
    _check(tmp_path, status, capsys.readouterr().err, message, before)


@pytest.mark.parametrize("case", CLI_CASES)
def test_refused_by_the_command_line(tmp_path, case):
    args, message = _arguments(tmp_path, case)
    before = set(tmp_path.iterdir())
    result = run_cli(*args, timeout=120)
    _check(tmp_path, result.returncode, result.stderr, message, before)


def test_a_name_holding_a_path_puts_nothing_outside_runs(tmp_path):
    """Without --run-dir the name makes the path: runs/NAME-TIME."""
    result = run_cli("--site", "threads.py", *campaign(tmp_path, "", top='name = "../../escape"\n'))
    assert result.returncode == 2 and "(no path)" in result.stderr
    assert not list(ROOT.parent.glob("escape-*")) and not list(ROOT.glob("escape-*"))


def test_messages_name_the_campaign_file_the_setting_and_where_palflow_looked(
    tmp_path, monkeypatch, capsys
):
    """A misspelt calculator and a missing foundation model: the message names the
    campaign file and the setting, suggests the close name, says where the foundation
    was looked for (beside the campaign file, then in the current folder) and what to
    give instead."""
    from palflow.apps.errors import CalculatorError
    from palflow.apps.models.backend import ModelError
    from palflow.pipeline.config.preflight import check_calculator, check_campaign
    from palflow.pipeline.config.settings import load_campaign
    from palflow.pipeline.run import main

    folder, elsewhere = tmp_path / "campaigns", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    misspelt = write(folder / "typo.toml", '[oracle]\ncalculator = "ase.calculators.emt:ETM"\n')
    with pytest.raises(CalculatorError) as refused:
        check_campaign(load_campaign(misspelt), source=misspelt)
    assert str(refused.value) == (
        f"{misspelt}: oracle.calculator = 'ase.calculators.emt:ETM': module "
        "'ase.calculators.emt' has no attribute 'ETM'; did you mean 'ase.calculators.emt:EMT'?"
    )
    plugin = f"{ROOT / 'tests' / 'test_preflight.py'}:NaNCalculatr"  # a file's class
    with pytest.raises(CalculatorError, match=r"did you mean '.*test_preflight.py:NaNCalculator'"):
        check_calculator(plugin, misspelt)
    with pytest.raises(CalculatorError) as refused:  # nothing close: no guess
        check_calculator("ase.calculators.emt:Zzz", misspelt)
    assert "did you mean" not in str(refused.value)

    mace = write(
        folder / "finetune.toml", EMT + '[model]\nname = "mace"\nfoundation = "foundation.model"\n'
    )
    campaign_settings = load_campaign(mace)
    with pytest.raises(ModelError) as refused:
        check_campaign(campaign_settings, source=mace)
    message = str(refused.value)
    assert message.startswith(
        f"{mace}: model.foundation 'foundation.model' does not exist: looked for "
        f"{folder / 'foundation.model'} (beside the campaign file) and "
        f"{elsewhere / 'foundation.model'} (in the current folder). "
    ), message
    assert "ensemble.memberK.model from palflow export" in message
    assert "downloaded beforehand on a machine with internet access" in message
    assert "\n" not in message

    # Through the command line: exit 2, one line, nothing created.
    before = set(tmp_path.iterdir())
    status = main(["--site", "threads.py", "--campaign", mace, "--run-dir", "new-run"])
    _check(tmp_path, status, capsys.readouterr().err, "(in the current folder", before)
    assert not (elsewhere / "new-run").exists()


# --------------------------------------------------------------- what still passes
def test_good_inputs_pass_the_preflight():
    """The shipped examples' settings and structures, the built-in plug-ins, and
    declared options pass; the trial is skipped when asked, and for MPI oracles."""
    from palflow.pipeline.config import preflight
    from palflow.pipeline.config.settings import load_campaign
    from palflow.pipeline.state.structures import load_start_structures

    for name in ("cu_emt.toml", "cu_systems.toml", "ethanol_plugins.toml", "water_tblite.toml"):
        c = load_campaign(ROOT / "examples" / name)
        starts = {s.name: load_start_structures(s.structure, s.vacuum) for s in c.all_systems()}
        preflight.check_settings(c)
        preflight.check_structures(c, starts)
    c = load_campaign(
        None,
        oracle__calculator="ase.calculators.emt:EMT",
        oracle__kwargs={},
        selection__measure="relative_force_spread",
        selection__measure_options={"epsilon": 0.5},
        selection__query="cluster",
    )
    starts = {"main": load_start_structures("CH3CH2OH")}
    preflight.check_settings(c)
    preflight.trial_plugins(c, starts)
    preflight.trial_oracle(c, starts)
    for skip in ({"oracle__trial": False}, {"oracle__mpi_ranks": 2}):
        slow = load_campaign(None, oracle__calculator=f"{PLUGIN}:SlowCalculator", **skip)
        preflight.trial_oracle(slow, starts)  # returns at once: not tried


def test_a_space_in_the_run_directory_is_fine_on_a_thread_site(tmp_path):
    from palflow.pipeline.config.preflight import check_run_path

    check_run_path(tmp_path / "my runs" / "r", "threads.py")
    assert not (tmp_path / "my runs").exists()
