"""Check a site before a campaign runs on it: ``palflow check --site S [--campaign C]``.

Three layers, cheapest first; each problem is one line:

1. **Placeholders** (:func:`placeholders`): a string like ``"YOUR_ACCOUNT"`` left in
   the site file. Reading the file's syntax tree costs nothing, so ``palflow run``
   refuses such a site too, before it creates anything
   (:func:`palflow.pipeline.config.sites.load_site`).
2. **The site loads**: its schema and its executor labels
   (:func:`~palflow.pipeline.config.sites.load_site`).
3. **The scheduler** (:func:`slurm_problems`), for every executor whose provider is
   Slurm's: the partition exists (``sinfo``), the account exists where Slurm keeps
   accounts (``sacctmgr``), and one job shaped like the executor's blocks could
   start (``sbatch --test-only``: enough nodes, GPUs, time) and can be submitted,
   held and cancelled (``sbatch --hold``, ``scancel``): Slurm then has judged the
   partition, account, node count, wall time and the site's own ``#SBATCH`` lines.

With ``--campaign``, the campaign's pre-flight runs too
(:func:`~palflow.pipeline.config.preflight.check_campaign`: its settings, its
systems, one oracle call and one model step, here).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from palflow.apps.errors import InputError
from palflow.pipeline.config.quick import placeholders
from palflow.pipeline.config.sites import load_site, resolve_site_path

SLURM_TIMEOUT_S = 30.0
"""Longest wait for one Slurm command."""


@dataclass
class CheckResult:
    """What :func:`check_site` found: ``problems`` (each one line; any means exit 2)
    and ``passed`` (what was checked and held, one line each)."""

    problems: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)


def _slurm(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S, check=False
    )


def _said(done: subprocess.CompletedProcess) -> str:
    return " ".join((done.stderr or done.stdout or f"exit status {done.returncode}").split())


def slurm_providers(config: Any) -> list[tuple[str, Any]]:
    """The ``(executor label, provider)`` pairs of ``config`` whose provider is Slurm's."""
    from parsl.providers import SlurmProvider

    return [
        (executor.label, executor.provider)
        for executor in config.executors
        if isinstance(getattr(executor, "provider", None), SlurmProvider)
    ]


def test_job_options(provider: Any) -> list[str]:
    """``sbatch`` options for one held job shaped like ``provider``'s blocks."""
    options = [f"--nodes={provider.nodes_per_block}", f"--time={provider.walltime}"]
    if provider.partition:
        options.append(f"--partition={provider.partition}")
    if provider.account:
        options.append(f"--account={provider.account}")
    if getattr(provider, "qos", None):
        options.append(f"--qos={provider.qos}")
    if getattr(provider, "constraint", None):
        options.append(f"--constraint={provider.constraint}")
    if getattr(provider, "exclusive", False):
        options.append("--exclusive")
    # What Parsl adds to each block's script when it submits one (one task per node).
    if getattr(provider, "mem_per_node", None) is not None:
        options.append(f"--mem={provider.mem_per_node}g")
    if getattr(provider, "cores_per_node", None) is not None:
        options.append(f"--cpus-per-task={provider.cores_per_node}")
    for line in (provider.scheduler_options or "").splitlines():
        line = line.strip()
        if line.startswith("#SBATCH"):  # a trailing "# comment" is no option
            options += shlex.split(line[len("#SBATCH") :], comments=True)
    return options


def slurm_problems(config: Any) -> CheckResult:
    """Check every Slurm provider of ``config`` against the Slurm of this machine."""
    result = CheckResult()
    providers = slurm_providers(config)
    if not providers:
        return result
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        labels = ", ".join(label for label, _ in providers)
        result.problems.append(
            f"executors {labels} submit to Slurm, but sbatch/sinfo are not on this machine: "
            "run palflow check on the cluster's login node"
        )
        return result
    listed = _slurm("sinfo", "-h", "-o", "%R")
    if listed.returncode != 0:
        result.problems.append(f"sinfo failed, is Slurm up? sinfo said: {_said(listed)}")
        return result
    partitions = set(listed.stdout.split())
    accounts = _accounts()
    checked_jobs: dict[tuple[str, ...], str | None] = {}
    for label, provider in providers:
        if provider.partition and provider.partition not in partitions:
            known = ", ".join(sorted(partitions)) or "none"
            result.problems.append(
                f"executor {label}: partition {provider.partition!r} does not exist "
                f"(this cluster's partitions: {known})"
            )
            continue
        if provider.account and accounts is not None and provider.account not in accounts:
            result.problems.append(
                f"executor {label}: account {provider.account!r} is not known to Slurm "
                "(sacctmgr show account)"
            )
            continue
        options = tuple(test_job_options(provider))
        if options not in checked_jobs:
            checked_jobs[options] = _submit_and_cancel(options)
        refused = checked_jobs[options]
        if refused:
            result.problems.append(f"executor {label}: a test job was refused: {refused}")
        else:
            where = provider.partition or "the default partition"
            result.passed.append(
                f"executor {label}: a test job on {where} was submitted and cancelled"
            )
    if accounts is None and any(p.account for _, p in providers):
        result.passed.append("accounts not checked: this Slurm keeps no accounts (sacctmgr)")
    return result


def _accounts() -> set[str] | None:
    """The accounts Slurm knows, or None where it keeps none (no accounting)."""
    if shutil.which("sacctmgr") is None:
        return None
    done = _slurm("sacctmgr", "-n", "-P", "show", "account", "format=Account")
    if done.returncode != 0:
        return None
    return {line.strip() for line in done.stdout.splitlines() if line.strip()}


def _submit_and_cancel(options: tuple[str, ...]) -> str | None:
    """Ask Slurm whether a job with ``options`` could ever start (``--test-only``),
    then submit one held and cancel it; None when Slurm took it, else what it said."""
    trial = _slurm("sbatch", "--test-only", *options, "--wrap", "true")
    if trial.returncode != 0:
        return f"Slurm says such a job could never start: {_said(trial)}"
    submitted = _slurm(
        "sbatch", "--parsable", "--hold", "--job-name=palflow-check", *options, "--wrap", "true"
    )
    if submitted.returncode != 0:
        return _said(submitted)
    job = submitted.stdout.strip().split(";")[0]
    cancelled = _slurm("scancel", job)
    if cancelled.returncode != 0:
        return f"job {job} was submitted but scancel failed: {_said(cancelled)}"
    return None


def check_site(site_name: str, campaign_file: str | None = None) -> CheckResult:
    """Every check of the module's description, on site ``site_name`` and, when given,
    the campaign file ``campaign_file``."""
    result = CheckResult()
    try:
        path = resolve_site_path(site_name)
    except InputError as error:
        result.problems.append(str(error))
        return result
    result.problems += placeholders(path)
    try:
        site = load_site(str(path), allow_placeholders=True)
    except InputError as error:
        result.problems.append(str(error))
        return result
    result.passed.append(f"{path.name}: loads, with an executor for every module")
    scheduler = slurm_problems(site.config)
    result.problems += scheduler.problems
    result.passed += scheduler.passed
    if campaign_file is not None:
        from palflow.pipeline.config.preflight import check_campaign  # ASE, torch
        from palflow.pipeline.config.settings import load_campaign

        try:
            campaign = load_campaign(campaign_file)
            check_campaign(campaign, site.mpi_command, source=campaign_file)
        except (InputError, ValidationError) as error:
            result.problems.append(" ".join(str(error).split()))
        else:
            result.passed.append(f"{campaign_file}: its pre-flight passed")
    return result
