"""A non-editable install: ``pip install .`` into a fresh virtual environment, then a
short campaign run by the ``palflow`` command from another folder.

Offline and quick: the new environment sees this environment's packages (Parsl,
torch, ASE...) through a ``.pth`` file naming its site-packages, so only palflow
itself is installed (``--no-deps --no-build-isolation``). The ``.pth`` files inside
that folder are not processed, so this checkout's editable install does not leak in;
the test asserts that palflow, its site configs and the run come from the installed
copy, and that nothing is written to the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("setup.py", "pyproject.toml", "README.md", "pipeline", "apps", "site_configs")
"""What ``pip install .`` reads: the build files and the folders setup.py maps."""
PARSL_SCRIPTS = ("process_worker_pool.py", "interchange.py")
"""Parsl's HTEX starts these from PATH."""


def _run(args: list, cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _fresh_venv(path: Path) -> Path:
    """A virtual environment at ``path`` that sees this one's packages (not its
    palflow); returns its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site_packages = Path(
        sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)})
    )
    assert site_packages.is_dir(), site_packages
    (site_packages / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # Parsl's scripts, run by the new interpreter (their shebang names this one's).
    here = Path(sys.executable).parent
    for name in PARSL_SCRIPTS:
        body = (here / name).read_text().split("\n", 1)[1]
        script = path / "bin" / name
        script.write_text(f"#!{path / 'bin' / 'python'}\n{body}")
        script.chmod(0o755)
    return site_packages


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_plain_install_runs_a_campaign_from_another_folder(tmp_path):
    source, venv, work = tmp_path / "source", tmp_path / "venv", tmp_path / "work"
    source.mkdir()
    work.mkdir()
    for name in SOURCES:  # a copy: the build writes build/ and *.egg-info beside it
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        kwargs = (
            {"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}
        )
        copy(ROOT / name, source / name, **kwargs)
    site_packages = _fresh_venv(venv)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    env = {
        **os.environ,
        "PATH": os.pathsep.join((str(bin_dir), os.environ.get("PATH", ""))),
        "PYTHONPATH": "",
        "VIRTUAL_ENV": str(venv),
    }
    checkout_before = sorted(p.name for p in ROOT.iterdir())

    installed = _run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--ignore-installed", "--no-cache-dir", str(source)],
        cwd=work, env=env, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]
    print(installed.stdout.strip().splitlines()[-1])

    # Every subpackage and the site configs come from the installed copy.
    where = _run(
        [python, "-c",
         "import palflow.pipeline.engine.agents.oracle as a, palflow.apps.oracles.calculators as c,"
         " palflow.site_configs as s; from palflow.pipeline.config.sites import SITE_DIR;"
         " print(a.__file__, c.__file__, s.__file__, SITE_DIR, sep='\\n')"],
        cwd=work, env=env,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr[-3000:]
    paths = [Path(line) for line in where.stdout.split()]
    assert len(paths) == 4
    for path in paths:
        assert path.is_relative_to(site_packages / "palflow"), path
    assert (paths[3] / "laptop.py").is_file()

    helped = _run([bin_dir / "palflow", "--help"], cwd=work, env=env)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: palflow"), helped.stderr
    assert "run" in helped.stdout

    done = _run(
        [bin_dir / "palflow", "run", "--site", "laptop.py",
         "--campaign", ROOT / "examples" / "cu_emt.toml", "--max-labels", "8"],
        cwd=work, env=env, timeout=780,
    )  # fmt: skip
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (run,) = (work / "runs").iterdir()  # ./runs under the folder the command ran in
    summary = json.loads((run / "summary.json").read_text())
    assert summary["labels"] == 8 and summary["failed"] is False
    assert f"run directory: {work / 'runs' / run.name}" in done.stdout
    log = (run / "palflow.log").read_text()
    assert str(ROOT / "pipeline") not in log and str(ROOT / "apps") not in log
    assert sorted(p.name for p in ROOT.iterdir()) == checkout_before, "the checkout is untouched"
