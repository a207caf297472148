"""The site schema: every attribute a site sets is read, typed and checked, and a
site's ``mpi_command`` reaches the oracle's launch prefix."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from palflow.apps.contracts import MODULES
from palflow.pipeline.config.sites import (
    SCHEMA_NAMES,
    SiteError,
    load_site,
    shipped_sites,
    site_attributes,
)

ROOT = Path(__file__).resolve().parent.parent
SITES = shipped_sites()
CONFIG = (
    "from parsl.config import Config\n"
    "from parsl.executors.threads import ThreadPoolExecutor\n"
    f"config = Config(executors=[ThreadPoolExecutor(label=m) for m in {MODULES!r}])\n"
)


def write_site(folder: Path, extra: str, config: str = CONFIG, name: str = "site.py") -> Path:
    path = folder / name
    path.write_text(config + extra)
    return path


@pytest.mark.parametrize("name", SITES)
def test_shipped_sites_set_only_schema_attributes(name, monkeypatch):
    monkeypatch.delenv("PALFLOW_MONITORING", raising=False)
    site = load_site(name, allow_placeholders=True)  # hpc.py is a template
    module_names = set(site_attributes(_import(site.path), site.path))
    assert module_names <= set(SCHEMA_NAMES)
    assert {"config", "slots", "MONITORING"} <= module_names
    assert site.mpi_command == "parsl" and site.monitoring is False


def _import(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("site_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_site_without_extras_gets_the_defaults(tmp_path):
    site = load_site(str(write_site(tmp_path, "slots = {'oracle': 5}\n")))
    assert site.slots == {"oracle": 5, "generator": 2, "train": 2, "infer": 1}
    assert site.mpi_command == "parsl" and site.monitoring is False


@pytest.mark.parametrize(
    ("line", "name", "suggestion"),
    [
        ("slot = {'oracle': 1}", "slot", "slots"),
        ("Slots = {'oracle': 1}", "Slots", "slots"),
        ("SLOTS = {'oracle': 1}", "SLOTS", "slots"),
        ("mpi_comand = 'mpirun -np {ranks}'", "mpi_comand", "mpi_command"),
        ("MONITORNIG = True", "MONITORNIG", "MONITORING"),
        ("monitoring = True", "monitoring", "MONITORING"),
        ("def fresh_confg():\n    return None", "fresh_confg", "fresh_config"),
    ],
)
def test_a_misspelt_attribute_is_named_with_the_known_ones(tmp_path, line, name, suggestion):
    path = write_site(tmp_path, line + "\n")
    with pytest.raises(SiteError) as caught:
        load_site(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: unknown site attribute {name!r}")
    assert f"(did you mean {suggestion!r}?)" in message
    assert "config or fresh_config(), slots, mpi_command, MONITORING" in message
    assert "\n" not in message


def test_other_public_values_are_refused(tmp_path):
    path = write_site(tmp_path, "provider = 'slurm'\n")
    with pytest.raises(SiteError, match=r"unknown site attribute 'provider';"):
        load_site(str(path))


def test_the_files_own_names_are_left_alone(tmp_path):
    own = (
        "import os\n"
        "from math import pi\n"
        "from os import environ\n"
        "from parsl.providers import LocalProvider\n"
        "ACCOUNT = 'chem'\n"
        "MONITORING_DB = 'monitoring.db'\n"
        "WORKERS = {'oracle': 1}\n"
        "_cores = 4\n"
        "def executor_for(label):\n    return label\n"
        "class Knobs:\n    pass\n"
    )
    assert load_site(str(write_site(tmp_path, own))).slots["oracle"] == 2


def test_an_imported_ready_made_config_is_the_sites(tmp_path):
    path = write_site(tmp_path, "", config="from parsl.configs.local_threads import config\n")
    # Read as the site's config (not "defines neither"), then held to the label contract.
    with pytest.raises(SiteError, match="no executor labelled 'oracle'"):
        load_site(str(path))


@pytest.mark.parametrize("name", ["threads.py", "laptop.py"])
def test_palflow_monitoring_turns_the_shipped_switch_on(name, monkeypatch):
    monkeypatch.setenv("PALFLOW_MONITORING", "1")
    site = load_site(name)
    assert site.monitoring is True and site.config.monitoring is not None


def test_palflow_monitoring_on_a_site_without_the_switch_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PALFLOW_MONITORING", "1")
    site = load_site(str(write_site(tmp_path, "")))
    assert site.monitoring is False
    assert "sets no monitoring hub" in caplog.text


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("slots = {'oracle': 0}", r"'slots\.oracle' should be greater than 0 \(got 0\)"),
        ("slots = {'oracle': 1.5}", r"'slots\.oracle' should be a valid integer"),
        ("slots = {'oracle': True}", r"'slots\.oracle' should be a valid integer"),
        ("slots = [1, 2]", r"'slots' should be a valid dictionary"),
        ("slots = {'oracel': 1}", r"'slots\.oracel' should be 'oracle', 'generator'"),
        ("mpi_command = 3", r"'mpi_command' should be a valid string"),
        ("mpi_command = '  '", r"'mpi_command' is empty"),
        (
            "mpi_command = 'mpirun -np {rank}'",
            r"'mpi_command' has unknown placeholder \{rank\}; allowed: \{ranks",
        ),
        ("mpi_command = 'mpirun -np {ranks'", r"'mpi_command' is not a launcher template"),
        ("mpi_command = 'mpirun -np {}'", r"'mpi_command' is not a launcher template"),
        ("MONITORING = '1'", r"'MONITORING' should be a valid boolean \(got '1'\)"),
        ("config = 3", r"'config' should be a parsl Config, not int \(got 3\)"),
        ("fresh_config = 3", r"'fresh_config' should be callable"),
    ],
)
def test_a_wrong_value_is_a_clear_error(tmp_path, line, expected):
    path = write_site(tmp_path, line + "\n")
    with pytest.raises(SiteError, match=rf"^{re.escape(str(path))}: .*{expected}") as caught:
        load_site(str(path))
    assert "\n" not in str(caught.value)


def test_every_problem_is_named_at_once(tmp_path):
    path = write_site(tmp_path, "slot = {}\nmpi_command = '{x}'\nMONITORING = 1\n")
    message = str(pytest.raises(SiteError, load_site, str(path)).value)
    for name in ("'slot'", "'mpi_command'", "'MONITORING'"):
        assert name in message


FRESH = (
    "from parsl.config import Config\n"
    "from parsl.executors.threads import ThreadPoolExecutor\n"
    "def fresh_config():\n"
)


def test_fresh_config_gives_a_new_config_per_load(tmp_path):
    body = f"    return Config(executors=[ThreadPoolExecutor(label=m) for m in {MODULES!r}])\n"
    path = write_site(tmp_path, body, config=FRESH)
    assert load_site(str(path)).config is not load_site(str(path)).config


def test_fresh_config_that_raises_is_a_site_error(tmp_path):
    path = write_site(tmp_path, "    raise RuntimeError('no allocation')\n", config=FRESH)
    with pytest.raises(SiteError, match=r"fresh_config\(\) raised: RuntimeError: no allocation"):
        load_site(str(path))


def test_fresh_config_returning_something_else(tmp_path):
    path = write_site(tmp_path, "    return {}\n", config=FRESH)
    with pytest.raises(SiteError, match=r"fresh_config\(\) should return a parsl Config, not dict"):
        load_site(str(path))


def test_monitoring_on_needs_the_hub_in_the_config(tmp_path):
    path = write_site(tmp_path, "MONITORING = True\n")
    with pytest.raises(SiteError, match="MONITORING is True but the Config has no monitoring hub"):
        load_site(str(path))


@pytest.mark.parametrize(
    ("command", "prefix"),
    [
        ("mpirun --oversubscribe -np {ranks}", "mpirun --oversubscribe -np 2"),
        ("srun -N {nodes} -n {ranks}", "srun -N 1 -n 2"),
        ("parsl", "mpiexec -n 2"),  # no MPIExecutor here: Parsl composes no prefix
    ],
)
def test_site_mpi_command_reaches_the_oracle_launch_prefix(tmp_path, monkeypatch, command, prefix):
    from palflow.apps.oracles.calculators import make_calculator, mpi_prefix
    from palflow.pipeline.config.settings import load_campaign

    for variable in ("PARSL_MPI_PREFIX", "PARSL_NUM_RANKS", "PARSL_NUM_NODES"):
        monkeypatch.delenv(variable, raising=False)
    site = load_site(str(write_site(tmp_path, f"mpi_command = {command!r}\n")))
    campaign = load_campaign(ROOT / "examples" / "water_nwchem.toml")  # 2 ranks, NWChem
    assert campaign.oracle.mpi_ranks == 2
    # The oracle spec as the coordinator builds it from the site's options.
    spec = {
        "calculator": campaign.oracle.calculator,
        "kwargs": dict(campaign.oracle.kwargs),
        "mpi_ranks": campaign.oracle.mpi_ranks,
        "mpi_nodes": campaign.oracle.mpi_nodes,
        "mpi_command": site.coordinator_options(campaign)["mpi_command"],
    }
    assert mpi_prefix(spec) == prefix
    calculator = make_calculator(spec)  # NWChem is built, not run
    assert calculator.command == f"{prefix} nwchem PREFIX.nwi > PREFIX.nwo"


@pytest.mark.timeout(120)
def test_cli_refuses_a_bad_site_in_one_line_and_creates_nothing(tmp_path):
    sites, work = tmp_path / "sites", tmp_path / "work"
    sites.mkdir()
    work.mkdir()
    bad = write_site(sites, "slot = {'oracle': 1}\n", name="bad_site.py")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "run.py"), "--site", str(bad), "--run-dir", "run"],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=work,
        env=env,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"palflow: error: {bad}: unknown site attribute 'slot'")
    assert result.stdout == ""
    assert list(work.iterdir()) == [] and sorted(sites.iterdir()) == [bad]
