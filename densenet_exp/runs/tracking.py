"""MLflow bookkeeping: where the store is, one run per training job (created, resumed, closed),
the facts every run records, the metrics a store that went away could not take (kept on disk
for `python -m densenet_exp.replay`). The parent run that nests the jobs of a Hydra multirun is
sweep.py's."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.entities import Run, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from .. import record
from . import stopping
from .checkpoints import no_room
from .sweep_folder import parent_run_id
from .store import (
    StoreUnreachable,
    is_down,
    retry_locked,
    unreachable,
)

UNSENT_FILE = "unsent_metrics.jsonl"
PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "mlflow", "densenet_exp")


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """Id of the experiment `name`, created if missing; safe when several jobs race to create it."""
    try:
        exp = retry_locked(lambda: client.get_experiment_by_name(name))
    except Exception as err:
        if unreachable(err):
            raise StoreUnreachable(client.tracking_uri) from err
        raise
    if exp is not None:
        if exp.lifecycle_stage != "active":
            from ..validate import ConfigError

            raise ConfigError(f"tracking.experiment={name!r} was deleted in {client.tracking_uri}: restore it "
                              f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or pick another name")
        return exp.experiment_id
    artifact_location = None
    uri = client.tracking_uri
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the database file, whatever directory the job runs in.
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).resolve().as_uri()
    try:
        return retry_locked(lambda: client.create_experiment(name, artifact_location=artifact_location))
    except Exception:
        exp = client.get_experiment_by_name(name)  # another job created it first
        if exp is None:
            raise
        return exp.experiment_id


def git_state(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {MLFLOW_GIT_COMMIT: commit, record.GIT_COMMIT: commit, record.GIT_DIRTY: str(dirty).lower()} if commit else {}


def system_facts(device: str) -> dict[str, str]:
    import torch

    facts = {record.DEVICE: device, "python": platform.python_version(), "platform": platform.platform()}
    facts[record.CPU_THREADS] = str(torch.get_num_threads())
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    for package in PACKAGES:
        try:
            facts[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return facts


def spool(path: Path | None, uri: str | None, run_id: str | None, **entry: Any) -> None:
    """Append one record the store could not take (metrics, or the status the run should end
    with) to `path`; `python -m densenet_exp.replay` sends them once the store is back."""
    if path is None:
        return
    with path.open("a") as f:
        f.write(json.dumps({"uri": uri, "run_id": run_id, **entry}) + "\n")


def runs_of_config(client: MlflowClient, experiment_id: str, *hashes: str) -> list[Run]:
    """Every run of this exact config (tagged with one of its config hashes), newest first."""
    found = {run.info.run_id: run for chash in dict.fromkeys(hashes) for run in retry_locked(
        lambda chash=chash: client.search_runs([experiment_id], f"tags.{record.CONFIG_HASH} = '{chash}'"))}
    return sorted(found.values(), key=lambda run: run.info.start_time or 0, reverse=True)


def find_finished_run(runs: list[Run]) -> Run | None:
    return next((run for run in runs if run.info.status == "FINISHED"), None)


def adopt_into_sweep(client: MlflowClient, run: Run, sweep_dir: Path, job_num: int, finished: bool) -> None:
    """Attach a run that an earlier sweep left unfinished (or finished, when that sweep did not
    finish) to this sweep's parent, so that `report --sweep <parent>` sees every job of it. The
    earlier parents stay listed in tag `previous_sweep_ids`."""
    parent, old = parent_run_id(sweep_dir), run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    if parent is None or old == parent:
        return
    if finished and old:
        try:
            if retry_locked(lambda: client.get_run(old)).info.status == "FINISHED":
                return  # a complete sweep keeps its jobs
        except Exception:
            pass  # the old parent is gone
    previous = ",".join(p for p in (run.data.tags.get(record.PREVIOUS_SWEEP_IDS), old) if p)
    tags = {MLFLOW_PARENT_RUN_ID: parent, record.SWEEP_ID: parent, record.SWEEP_JOB: str(job_num),
            record.SWEEP_DIR: str(sweep_dir.resolve()), record.PREVIOUS_SWEEP_IDS: previous}
    retry_locked(lambda: client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()]))


def close_run(
    client: MlflowClient, run_id: str, error: BaseException | None, unsent: Path | None = None, where: str = ""
) -> None:
    """End the run: FINISHED; KILLED with the reason (resumable) after a stop signal, when the
    store became unreachable or when a file found no room; else FAILED with the error recorded (tag and artifact). What an
    unreachable store cannot take is kept in `unsent`."""
    stopped = stopping.as_stopped(error) if error is not None else None
    if error is None:
        status, tags = "FINISHED", {}
    elif stopped is not None:
        status, tags = "KILLED", {record.STOP_REASON: f"{stopped.reason}{where}; the same command resumes it"}
    elif unreachable(error):
        status, tags = "KILLED", {record.STOP_REASON: f"the tracking store became unreachable{where}"}
    elif no_room(error) is not None:  # resumable from the last complete checkpoint once there is room
        status, tags = "KILLED", {record.STOP_REASON: f"{no_room(error)}{where}; free space, then the same command "
                                                       "resumes it"}
    else:
        status, tags = "FAILED", {record.ERROR: f"{type(error).__name__}: {error}"[:5000]}
    if is_down(client.tracking_uri) or (error is not None and unreachable(error)):
        spool(unsent, client.tracking_uri, run_id, status=status, tags=tags)  # no call would get through
        return
    try:
        for key, value in tags.items():
            retry_locked(lambda: client.set_tag(run_id, key, value))
        try:
            if status == "FAILED":
                _log_traceback(client, run_id, error)
        finally:
            retry_locked(lambda: client.set_terminated(run_id, status))
    except Exception as err:
        if not unreachable(err):
            raise
        spool(unsent, client.tracking_uri, run_id, status=status, tags=tags)


def _log_traceback(client: MlflowClient, run_id: str, error: BaseException) -> None:
    import tempfile
    import traceback

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / record.ERROR_TRACEBACK
        path.write_text("".join(traceback.format_exception(error)))
        client.log_artifact(run_id, str(path))

