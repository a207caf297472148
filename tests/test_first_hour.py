"""A new user's first hour (issue 28), each step as that user takes it: the live view
in a real terminal (tmux), a run started from a folder of their own with the files
``palflow init`` wrote, ``palflow check`` against the local Slurm, and a site whose
provider cannot start workers."""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from palflow.pipeline.config.settings import load_campaign
from palflow.pipeline.config.starter import write_starter
from tests.conftest import need
from tests.test_cli import ROOT, small_campaign
from tests.test_palflow_command import copied_run, finished_run, palflow  # noqa: F401

# A line of palflow.log: time, level, logger [thread]: message.
LOG_LINE = re.compile(r"^\S+ \S+ (INFO|WARNING|ERROR) (palflow[\w.]*) \[[^\]]*\]: (.*)$")


def console_lines(log: Path) -> list[str]:
    """What the console shows of the run's log: ``logger: message`` of palflow's own
    one-line records (Parsl's and the tracebacks stay in files)."""
    lines = []
    for line in log.read_text().splitlines():
        found = LOG_LINE.match(line)
        if found:
            lines.append(f"{found.group(2)}: {found.group(3)}")
    return lines


@pytest.fixture
def tmux(tmp_path):
    """A private tmux server (its own socket and config), killed afterwards."""
    need("tmux", shutil.which("tmux") is not None, "tmux is not installed")
    socket = f"palflow-test-{os.getpid()}"
    config = tmp_path / "tmux.conf"
    config.write_text("set -g history-limit 100000\n")

    def command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["tmux", "-L", socket, "-f", str(config), *args],
            capture_output=True,
            text=True,
            check=True,
        )

    yield command
    subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, check=False)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_live_view_in_a_terminal_keeps_every_log_line_and_draws_one_panel(tmux, tmp_path):
    """In a real terminal (tmux, 120 columns), the log lines scroll above the panel:
    the whole scrollback holds every line the run logged to its console, and the
    panel once, below the line that says the campaign started."""
    campaign = small_campaign(tmp_path)
    run_dir = tmp_path / "run"
    done = tmp_path / "done"
    script = tmp_path / "go.sh"
    script.write_text(
        f"cd {tmp_path}\n"
        f"PATH={Path(os.sys.executable).parent}:$PATH palflow run --site threads.py "
        f"--campaign {campaign} --run-dir {run_dir} --max-labels 16 --final-training 0\n"
        f"echo $? > {done}\n"
        "sleep 600\n"
    )
    tmux("new-session", "-d", "-s", "run", "-x", "120", "-y", "40", f"bash {script}")
    deadline = time.time() + 360
    while not done.exists() and time.time() < deadline:
        time.sleep(1)
    assert done.exists(), "the campaign did not end within 6 minutes"
    assert done.read_text().strip() == "0"
    time.sleep(0.5)  # the last lines drawn
    screen = tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "run").stdout
    capture = tmp_path / "capture.txt"
    capture.write_text(screen)

    expected = console_lines(run_dir / "palflow.log")
    assert len(expected) > 5, expected
    missing = [line for line in expected if line not in screen]
    assert not missing, (
        f"{len(missing)} of {len(expected)} log lines not in the terminal: {missing}"
    )
    titles = [line for line in screen.splitlines() if "palflow: cli-test" in line]
    assert len(titles) == 1, f"{len(titles)} panels in the scrollback:\n{screen}"
    started = screen.index("campaign cli-test starts")
    assert screen.index("palflow: cli-test") > started  # drawn below the first lines
    assert "stopped: label budget of 16 reached" in screen


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_from_a_folder_of_ones_own_with_init_files(tmp_path):
    """``palflow init`` in an empty folder, a campaign started there: its run goes to
    ``runs/`` of that folder, and the report, ``summary.json`` and ``status`` agree that
    it finished, and why; ``-q`` prints no progress; a resume that raises the label
    budget shows the raised budget."""
    home = tmp_path / "study"
    written = write_starter(home, "threads")
    assert load_campaign(written["campaign"]).model_dump() == load_campaign().model_dump()
    small = small_campaign(tmp_path)
    shutil.copy(small, home / "small.toml")
    before = set((ROOT / "runs").glob("*")) if (ROOT / "runs").exists() else set()
    done = palflow(
        "run", "--site", "site.py", "--campaign", "small.toml", "--max-labels", "8",
        "--final-training", "0", "-q", cwd=home, timeout=360,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "palflow.progress" not in done.stderr and "INFO" not in done.stderr
    (run,) = (home / "runs").iterdir()
    assert (set((ROOT / "runs").glob("*")) if (ROOT / "runs").exists() else set()) == before

    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed"] is False
    # --final-training 0: after the stop, each member only takes in the last labels.
    assert summary["final_training"]["limit_s"] == 0.0
    assert summary["final_training"]["train_tasks"] <= load_campaign().model.n_members
    status = palflow("status", str(run), "--json", cwd=home)
    facts = json.loads(status.stdout)
    assert facts["state"] == "finished"
    assert facts["stop_reason"] == summary["stop_reason"] == "label budget of 8 reached"
    html = (run / "report.html").read_text()
    assert re.search(r"status\s*</t[dh]>\s*<td>\s*finished", html), "report status"

    resumed = palflow(
        "run", "--site", "site.py", "--resume", str(run), "--max-labels", "12",
        "--final-training", "0", "-q", cwd=home, timeout=360,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    facts = json.loads(palflow("status", str(run), "--json", cwd=home).stdout)
    assert facts["labels"]["budget"] == 12 and facts["labels"]["active"] == 12


def test_resume_of_a_missing_folder_says_it_does_not_exist(tmp_path):
    done = palflow("run", "--site", "threads.py", "--resume", str(tmp_path / "gone"))
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        f"{tmp_path / 'gone'} does not exist: give the directory a run wrote"
    )


def test_init_writes_the_default_campaign_and_a_copy_to_edit_and_overwrites_nothing(tmp_path):
    done = palflow("init", "mine", "--site", "hpc", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    campaign, site = tmp_path / "mine" / "campaign.toml", tmp_path / "mine" / "site.py"
    assert load_campaign(campaign).model_dump() == load_campaign().model_dump()
    assert "YOUR_CPU_PARTITION" in site.read_text()
    assert campaign.read_text().count("\n# ") > 100  # every setting, with its meaning
    again = palflow("init", "mine", cwd=tmp_path)
    assert again.returncode == 2 and "overwrites nothing" in again.stderr
    # The copy, placeholders unedited, is refused before anything is created.
    refused = palflow("run", "--site", "site.py", cwd=tmp_path / "mine")
    assert refused.returncode == 2 and not (tmp_path / "mine" / "runs").exists()
    assert "3 placeholder(s) left unedited" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.slurm
def test_check_against_the_local_slurm(slurm_cluster, tmp_path):
    """A copy of hpc.py as written, then with the placeholders edited (but blocks that
    this one-node cluster can never start), then the local site: problems one line
    each with exit 2, then exit 0; every test job cancelled."""
    write_starter(tmp_path, "hpc")
    site = tmp_path / "site.py"
    placeholders = palflow("check", "--site", "site.py", cwd=tmp_path, timeout=180)
    assert placeholders.returncode == 2
    problems = [line for line in placeholders.stdout.splitlines() if line.startswith("problem")]
    assert [p.split(": ", 2)[1].split(" line ")[0] for p in problems[:3]] == ["site.py"] * 3
    assert any("partition 'YOUR_CPU_PARTITION' does not exist" in p for p in problems)
    assert not (tmp_path / "runs").exists()

    text = site.read_text()
    for placeholder, value in (("YOUR_ACCOUNT", "chem"), ("YOUR_CPU_PARTITION", "cpu")):
        text = text.replace(placeholder, value)
    site.write_text(text.replace("YOUR_GPU_PARTITION", "gpu"))
    never = palflow("check", "--site", "site.py", cwd=tmp_path, timeout=180)
    assert never.returncode == 2
    assert "executor oracle: a test job was refused: Slurm says such a job could never start" in (
        never.stdout
    )  # two nodes per block on a one-node cluster
    assert "ok: executor generator: a test job on cpu was submitted and cancelled" in never.stdout

    good = palflow(
        "check", "--site", "local_slurm.py", "--campaign", str(small_campaign(tmp_path)),
        cwd=tmp_path, timeout=180,
    )  # fmt: skip
    assert good.returncode == 0, good.stdout + good.stderr
    assert "problem" not in good.stdout and good.stdout.rstrip().endswith("starting")
    assert "pre-flight passed" in good.stdout
    queue = subprocess.run(["squeue", "-h", "-n", "palflow-check"], capture_output=True, text=True)
    assert queue.stdout.strip() == ""


def fail_on_site(site_text: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the small campaign on a site written from ``site_text``, which must fail it:
    exit 1, a short console without a traceback. Returns the run and its summary."""
    site = tmp_path / "site.py"
    site.write_text(site_text)
    done = palflow(
        "run", "--site", str(site), "--campaign", str(small_campaign(tmp_path)),
        "--run-dir", str(tmp_path / "run"), cwd=tmp_path, timeout=240,
    )  # fmt: skip
    console = done.stdout + done.stderr
    assert done.returncode == 1, console[-3000:]
    assert "Traceback" not in console and len(console.splitlines()) < 60, console
    return done, json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_a_provider_that_cannot_start_workers_stops_the_run_at_once(slurm_cluster, tmp_path):
    """sbatch refuses the blocks (a partition that does not exist): the run stops at
    the first refusal, exit 1, a short console with no traceback, the provider's
    message whole in the summary, ``status`` and the report, and no structure counted
    as a lost oracle task."""
    site_text = (ROOT / "site_configs" / "local_slurm.py").read_text()
    done, summary = fail_on_site(site_text.replace('"cpu"', '"nosuchpart"'), tmp_path)
    reason = summary["failure"]
    assert reason.startswith("the oracle executor cannot start workers")
    assert reason.endswith("Batch job submission failed: Invalid partition name specified")
    assert summary["oracle_failures"] == 0 and summary["stop_reason"] == reason
    assert summary["oracle_retries_by_kind"] == {}  # put back, not retried as lost
    facts = json.loads(palflow("status", str(tmp_path / "run"), "--json").stdout)
    assert facts["state"] == "failed" and facts["stop_reason"] == reason
    assert f"campaign cli-test failed: {reason}" in done.stdout
    html = (tmp_path / "run" / "report.html").read_text()
    assert re.search(r"status\s*</t[dh]>\s*<td>\s*failed", html), "report status"
    assert "Invalid partition name specified" in html


def test_site_check_reads_placeholders_off_the_syntax_tree(tmp_path):
    from palflow.pipeline.config.site_check import placeholders

    site = tmp_path / "s.py"
    site.write_text(  # neither a comment nor a docstring is a value
        '"""Was YOUR_ACCOUNT."""  # YOUR_NOTE\nA = "YOUR_ACCOUNT"\nB = f"x {A}"\nC = ["YOUR_X"]\n'
    )
    assert placeholders(site) == [
        "s.py line 2: A is still the placeholder 'YOUR_ACCOUNT': edit it to your cluster's value",
        "s.py line 4: C is still the placeholder 'YOUR_X': edit it to your cluster's value",
    ]


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_pilot_jobs_that_never_start_stop_the_run_after_the_sites_timeout(slurm_cluster, tmp_path):
    """The blocks are submitted but held (``#SBATCH --hold``): after the site's
    ``worker_start_timeout_s`` the run stops as failed, naming the jobs and Slurm's
    reason, without waiting for the oracle tasks that cannot run; the jobs are gone."""
    text = (ROOT / "site_configs" / "local_slurm.py").read_text()
    text = text.replace(
        '"#SBATCH --oversubscribe\\n"', '"#SBATCH --oversubscribe\\n#SBATCH --hold\\n"'
    )
    text = text.replace("worker_start_timeout_s = 300", "worker_start_timeout_s = 20")
    assert "--hold" in text and "worker_start_timeout_s = 20" in text
    _, summary = fail_on_site(text, tmp_path)
    reason = summary["failure"]
    assert reason.startswith("the oracle executor started no worker within 20 s"), reason
    assert "PENDING (JobHeldUser)" in reason and summary["oracle_failures"] == 0
    # Parsl cancels its jobs as the run ends; Slurm forgets them a moment later.
    for _ in range(30):
        queue = subprocess.run(["squeue", "-h", "-o", "%j %T"], capture_output=True, text=True)
        if "parsl" not in queue.stdout:
            break
        time.sleep(1)
    assert "parsl" not in queue.stdout, queue.stdout


def test_the_test_job_is_shaped_like_the_blocks_parsl_submits():
    from parsl.providers import SlurmProvider

    from palflow.pipeline.config.site_check import test_job_options

    provider = SlurmProvider(
        partition="cpu",
        account="chem",
        nodes_per_block=2,
        walltime="02:00:00",
        mem_per_node=100,
        cores_per_node=64,
        scheduler_options="#SBATCH --gpus-per-node=4  # four GPUs\n#SBATCH --comment='a b'",
    )
    options = test_job_options(provider)
    assert options[:4] == ["--nodes=2", "--time=02:00:00", "--partition=cpu", "--account=chem"]
    wanted = {"--mem=100g", "--cpus-per-task=64", "--gpus-per-node=4", "--comment=a b"}
    assert wanted <= set(options)
    assert "#" not in options and "GPUs" not in options


def test_a_resume_that_raises_is_failed_everywhere_not_the_last_sessions_finish(
    copied_run,  # noqa: F811 (the fixture imported above)
    monkeypatch,
    capsys,
):
    """A finished run resumed, whose resume raises: exit 1, and status and the report
    say failed with this session's reason, not the last session's "finished"."""
    from palflow.pipeline.engine.coordinator import Coordinator
    from palflow.pipeline.observe.status import run_status_facts
    from palflow.pipeline.run import main

    assert run_status_facts(copied_run)["state"] == "finished"

    def broken_resume(*args, **kwargs):
        raise RuntimeError("the resume broke")

    monkeypatch.setattr(Coordinator, "resume", broken_resume)
    status = main(["--site", "threads.py", "--resume", str(copied_run), "--max-labels", "12"])
    assert status == 1
    facts = run_status_facts(copied_run)
    assert facts["state"] == "failed"
    assert facts["stop_reason"].startswith("RuntimeError: the resume broke (traceback in")
    html = (copied_run / "report.html").read_text()
    assert "<tr><th>status</th><td>failed</td></tr>" in html and "the resume broke" in html
    assert "campaign cli-test failed: RuntimeError: the resume broke" in capsys.readouterr().out


def test_the_console_shows_parsl_once_per_message_and_without_tracebacks():
    """Parsl's own lines on the console: warnings only, each message once (numbers
    aside), on one line, no traceback, and not the SimpleLauncher note every MPI
    site's run printed; palflow's own lines all pass."""
    import logging

    from palflow.pipeline.observe.console import ConsoleFilter, ConsoleFormatter

    console, formatter = ConsoleFilter(), ConsoleFormatter("%(name)s: %(message)s")

    def record(name, level, message, exc_info=None):
        return logging.LogRecord(name, level, "x.py", 1, message, None, exc_info)

    try:
        raise RuntimeError("inside Parsl")
    except RuntimeError as error:
        failure = (RuntimeError, error, error.__traceback__)
    refused = record("parsl.providers.slurm", logging.ERROR, "Retcode:1\nsbatch: job 17", failure)
    assert console.filter(refused)
    assert formatter.format(refused) == "parsl.providers.slurm: Retcode:1 sbatch: job 17"
    assert not console.filter(
        record("parsl.providers.slurm", logging.ERROR, "Retcode:1\nsbatch: job 18")
    )
    assert not console.filter(record("parsl.dataflow", logging.INFO, "Task 3 launched"))
    launcher = "Simple Launcher only supports single node per block. Requested nodes: 2."
    assert not console.filter(record("parsl.launchers.launchers", logging.WARNING, launcher))
    mine = record("palflow.pipeline.engine.core", logging.WARNING, "label task 1 failed")
    assert console.filter(mine) and console.filter(mine)  # palflow's repeats its own
