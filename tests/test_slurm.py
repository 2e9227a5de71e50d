"""The SLURM path against a real one-node Slurm (tools/slurm-local): a sweep through
`hydra/launcher=slurm_local`, a job requeued mid-run, a job whose time limit falls mid-run, and
bad input. Each test asserts what the scheduler did (`scontrol show job`: state, exit code,
restarts; the jobs' .out files) as well as what MLflow holds. The cluster has no accounting, so
no sacct. Slow: about 6 minutes in all on 2 cores (83 s, 133 s with the requeued job's 30-s wait
before it starts again, 87 s, 24 s); skipped, with the reason, only where slurmctld cannot start."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, assert_clean, run_until

pytestmark = pytest.mark.slow
LAUNCHER = ("experiment=smoke", "hydra/launcher=slurm_local")
# Epochs of a few seconds on one core, so that a job is mid-run when the scheduler acts (not
# compiled: torch.compile would spend a minute of it on one core).
LONGER = ("probes=none", "data.train_size=2048", "speed.compile=false")


def scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30, check=True).stdout


def known_jobs() -> set[str]:
    """Every job slurmctld knows of (finished ones stay for MinJobAge, an hour here)."""
    return set(re.findall(r"JobId=(\d+)", scontrol("-o", "show", "job")))


def ended_job(job: str, timeout: float = 120) -> dict[str, str]:
    """`scontrol show job`'s Key=Value fields of one job (an array task: `12_0`) once it has
    ended: the sweep process sees a job's result file before the scheduler sees the job end."""
    deadline = time.time() + timeout
    while True:
        facts = dict(re.findall(r"(\w+)=(\S*)", scontrol("-o", "show", "job", job)))
        if facts["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING") or time.time() > deadline:
            return facts
        time.sleep(1)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """The running cluster, else one that tools/slurm-local starts (and stops) here."""
    def up() -> bool:
        return shutil.which("scontrol") is not None and \
            subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout.count("UP") > 0
    if up():
        yield
        return
    started = subprocess.run([str(ROOT / "tools" / "slurm-local"), "start"], capture_output=True, text=True,
                             timeout=900)
    if started.returncode != 0 or not up():
        reason = (started.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"slurmctld cannot start here (tools/slurm-local start: {reason})")
    try:
        yield
    finally:
        subprocess.run([str(ROOT / "tools" / "slurm-local"), "stop"], capture_output=True, timeout=120)


def children(store):
    return [r for r in store.runs("smoke") if r.data.tags.get("sweep") != "parent"]


def slurm_job_of(run) -> tuple[str, int]:
    """(job id, restart count) of the SLURM job that owns or last owned the run."""
    job, _, restarts = run.data.tags["owner_slurm_job"].rpartition(":")
    return job, int(restarts)


def out_file(store, job: str) -> str:
    """The job's .out (stdout and stderr; a requeued job appends to it)."""
    (path,) = (store.path / "out" / ".submitit").glob(f"{job}/*_log.out")
    return path.read_text()


def test_a_sweep_runs_its_jobs_on_slurm_and_its_rerun_queues_nothing(store):
    before = known_jobs()
    result = store.run(*LAUNCHER, "growth_rate=4,8", multirun=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = children(store)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    (parent,) = [r for r in store.runs("smoke") if r.data.tags.get("sweep") == "parent"]
    assert parent.info.status == "FINISHED" and {r.data.tags["sweep_id"] for r in runs} == {parent.info.run_id}
    jobs = {slurm_job_of(r)[0] for r in runs}
    assert len(jobs) == 2 and {j.split("_")[0] for j in jobs} <= known_jobs() - before
    for run in runs:
        job, restarts = slurm_job_of(run)
        facts = ended_job(job)
        assert (facts["JobState"], facts["ExitCode"], restarts) == ("COMPLETED", "0:0", 0)
        assert (facts["NumCPUs"], facts["Partition"]) == ("1", "local")
        out = out_file(store, job)
        assert f"MLflow run {run.info.run_id}" in out and "epoch 2/2:" in out
        # Lightning's banner and the warnings run.py filters go to run.log or nowhere, as outside SLURM.
        assert "GPU available" not in out and "exists and is not empty" not in out
        assert "device     cpu, 1 CPU threads" in out  # the one core the job was given
    assert "Sweep " in result.stdout and result.stdout.count("FINISHED") == 2  # the closing table

    queued = known_jobs()
    again = store.run(*LAUNCHER, "growth_rate=4,8", multirun=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert known_jobs() == queued  # nothing was submitted
    assert again.stdout.count("skipped, already FINISHED") == 2
    assert {r.info.run_id for r in children(store)} == {r.info.run_id for r in runs}


def test_a_job_requeued_mid_run_resumes_into_the_same_run(store):
    client = store.client()
    proc = subprocess.Popen(store.command(*LAUNCHER, *LONGER, "trainer.max_epochs=6", multirun=True), cwd=ROOT,
                            env=store.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        checkpoint = store.path / "out" / "0" / "checkpoints" / "last.ckpt"
        run_until(proc, lambda: checkpoint.exists(), timeout=300)
        (run,) = children(store)
        job, restarts = slurm_job_of(run)
        assert restarts == 0
        scontrol("requeue", job)  # as a preempting partition does: SIGTERM, then back in the queue
        stdout, stderr = proc.communicate(timeout=420)  # SLURM holds a requeued job ~2 minutes
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    (run,) = children(store)
    assert run.info.status == "FINISHED"
    assert slurm_job_of(run) == (job, 1)  # the same job, restarted once: it took its run over
    assert "stopped by SIGTERM" in run.data.tags["resumed_after"]
    facts = ended_job(job)
    assert (facts["JobState"], facts["ExitCode"], facts["Restarts"]) == ("COMPLETED", "0:0", "1")
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert sorted(m.step for m in history) == sorted({m.step for m in history}) and len(history) == 6
    out = out_file(store, job)
    assert "stopped by SIGTERM" in out and f"MLflow run {run.info.run_id} is KILLED" in out
    assert f"resuming MLflow run {run.info.run_id} from {checkpoint}" in out
    assert "FINISHED" in stdout
    assert_clean(store)  # each (metric, step) once


def test_a_job_warned_before_its_time_limit_stops_cleanly_and_says_how_to_resume(store):
    overrides = (*LAUNCHER, *LONGER, "trainer.max_epochs=60", "trainer.enable_progress_bar=true",
                 "hydra.launcher.timeout_min=2", "hydra.launcher.additional_parameters.signal=USR1@30")
    result = store.run(*overrides, multirun=True, timeout=400)
    assert result.returncode == 1  # a job of the sweep did not finish
    assert "stopped by SIGUSR1" in result.stderr.split("job(s) of the sweep failed")[1]
    (run,) = children(store)
    assert run.info.status == "KILLED" and "stopped by SIGUSR1" in run.data.tags["stop_reason"]
    checkpoint = Path(run.data.tags["checkpoint_dir"]) / "last.ckpt"
    assert checkpoint.is_file()
    job, _ = slurm_job_of(run)
    facts = ended_job(job)
    # It ended by itself, before the limit: not TIMEOUT, not killed by the scheduler.
    assert (facts["JobState"], facts["ExitCode"], facts["TimeLimit"]) == ("COMPLETED", "0:0", "00:02:00")
    out = out_file(store, job)
    command = shlex.join(["python", "-m", "densenet_exp.run", *store.command(*overrides, multirun=True)[3:]])
    assert f"MLflow run {run.info.run_id} is KILLED; resume it with: {command}" in out
    epochs = re.findall(r"epoch (\d+)/60:", out)
    assert epochs and epochs == [str(e) for e in range(1, len(epochs) + 1)]  # one line per epoch
    assert "\r" not in out and "it/s" not in out  # no progress bar in a file
    assert len(store.client().get_metric_history(run.info.run_id, "val/acc")) == len(epochs)


def test_bad_input_on_the_cluster_fails_before_anything_is_queued(store):
    before = known_jobs()
    result = store.run(*LAUNCHER, "growth_rate=4,0", multirun=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: growth_rate=0"), result.stderr[-3000:]
    assert known_jobs() == before  # nothing queued
    assert not (store.path / "out" / ".submitit").exists()
    assert store.all_runs() == []  # the sweep's parent run is removed too
