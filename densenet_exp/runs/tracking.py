"""MLflow bookkeeping: where the store is, one run per training job (created, resumed, closed),
the facts every run records, the metrics a store that went away could not take (kept on disk
for `python -m densenet_exp.replay`), and the parent run that nests the jobs of a Hydra multirun."""

from __future__ import annotations

import atexit
import hashlib
import json
import platform
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from mlflow.entities import Run, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from omegaconf import DictConfig, OmegaConf

from .. import record
from . import stopping
from ..identity import flatten  # noqa: F401 (the params a run logs)
from .ownership import Heartbeat, OwnerLock, close_orphans
from .store import (
    tracking_uri,
    StoreConfigError,
    StoreUnreachable,
    bound_http_waits,
    is_down,
    prepare_store,
    retry_locked,
    unreachable,
)

PARENT_ID_FILE = "mlflow_parent_run_id"
FAILURES_DIR = "failed_jobs"
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


def config_hash(cfg: Mapping[str, Any]) -> str:
    """A short, stable hash of everything that shapes a run's result (tracking excluded)."""
    relevant = {k: v for k, v in cfg.items() if k not in ("tracking",)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def runs_of_config(client: MlflowClient, experiment_id: str, chash: str) -> list[Run]:
    """Every run of this exact config (same config hash), newest first."""
    return retry_locked(
        lambda: client.search_runs(
            [experiment_id], f"tags.{record.CONFIG_HASH} = '{chash}'", order_by=["attributes.start_time DESC"]
        )
    )


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
    """End the run: FINISHED; KILLED with the reason (resumable) after a stop signal or when the
    store became unreachable; else FAILED with the error recorded (tag and artifact). What an
    unreachable store cannot take is kept in `unsent`."""
    stopped = stopping.as_stopped(error) if error is not None else None
    if error is None:
        status, tags = "FINISHED", {}
    elif stopped is not None:
        status, tags = "KILLED", {record.STOP_REASON: f"{stopped.reason}{where}; the same command resumes it"}
    elif unreachable(error):
        status, tags = "KILLED", {record.STOP_REASON: f"the tracking store became unreachable{where}"}
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


# --- multirun: one parent run per sweep ---------------------------------------------------


def parent_run_id(sweep_dir: Path) -> str | None:
    path = sweep_dir / PARENT_ID_FILE
    return path.read_text().strip() if path.is_file() else None


def record_failed_job(sweep_dir: Path, job_num: int, overrides: list[str], error: BaseException) -> None:
    folder = sweep_dir / FAILURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    line = f"#{job_num} [{' '.join(overrides)}] {type(error).__name__}: {error}".splitlines()[0]
    (folder / f"{job_num}.txt").write_text(line + "\n")


def fail(message: str, code: int) -> None:
    """Print one line and exit; SystemExit passes through Hydra's callback runner, which turns
    any other exception of a callback into a warning and goes on."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class SweepParentRun(Callback):
    """Hydra callback: before a multirun's jobs start, create the experiment and a parent run
    (so parallel jobs never race to create them), owned by the sweep process like a job's run
    (lock on the sweep folder, heartbeat); afterwards end it, print the failed jobs and exit
    non-zero if there were any. A sweep whose parent cannot be created stops before any job."""

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        self.sweep_dir: Path | None = None
        self.lock: OwnerLock | None = None
        self.heartbeat: Heartbeat | None = None
        self.deleted = False  # no job of the sweep logged to a run of its own: the parent was removed

    # Launchers that run jobs in other processes (joblib, submitit) pickle the callbacks with each
    # job; the sweep's live state (a lock, a thread, a client) stays with the sweep process.
    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ..validate import ConfigError, check_output_folder, validate_tracking

        tracking = OmegaConf.to_container(config.tracking, resolve=True)
        uri = tracking_uri(tracking["uri"], Path(config.hydra.runtime.cwd))
        try:
            validate_tracking(tracking)
            check_output_folder("hydra.sweep.dir", config.hydra.sweep.dir)
            bound_http_waits(tracking.get("http"))
            prepare_store(uri, "tracking.uri" if tracking["uri"] else "MLFLOW_TRACKING_URI")
            self._start(config, tracking, uri)
        except (ConfigError, StoreConfigError) as err:
            fail(str(err), 2)
        except Exception as err:
            if self.lock is not None:
                self.lock.release()
            if unreachable(err):
                fail(StoreUnreachable(uri).advice(), 75)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            fail(f"the sweep's parent run could not be created in {uri} ({type(err).__name__}: {first[:300]}); "
                 "no job was started", 1)

    def _start(self, config: DictConfig, tracking: dict[str, Any], uri: str) -> None:
        from .console import SweepPlan

        root = Path(config.hydra.runtime.cwd)
        self.client = MlflowClient(uri)
        experiment_id = ensure_experiment(self.client, tracking["experiment"])
        close_orphans(self.client, experiment_id, tracking["owner_timeout_s"])  # earlier sweeps that died
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.lock = OwnerLock(self.sweep_dir)
        if not self.lock.acquire():
            fail(f"hydra.sweep.dir={str(self.sweep_dir)!r} is in use by another live sweep: wait for it, or pick "
                 "another folder", 3)
        overrides = list(config.hydra.overrides.task)
        tags = {
            MLFLOW_RUN_NAME: f"sweep-{self.sweep_dir.name}",
            record.SWEEP: "parent",
            record.SWEEP_DIR: str(self.sweep_dir.resolve()),
            record.OVERRIDES: " ".join(overrides),
            **git_state(root),
            **self.lock.tags(),
        }
        run = retry_locked(lambda: self.client.create_run(experiment_id, tags=tags))
        self.run_id = run.info.run_id
        (self.sweep_dir / PARENT_ID_FILE).write_text(self.run_id)
        SweepPlan.of(config).write(self.sweep_dir)  # jobs and varying knobs: "job j/N", run names
        self.heartbeat = Heartbeat(self.client, self.run_id, tracking["heartbeat_s"])
        stopping.install_in_launcher()
        # If the sweep ends before on_multirun_end (Ctrl-C, a job's config fails to compose, the
        # store goes away), the parent must not be left RUNNING.
        atexit.register(self._close, interrupted=True)

    def _failures(self) -> list[str]:
        folder = self.sweep_dir / FAILURES_DIR if self.sweep_dir else None
        if folder is None or not folder.is_dir():
            return []
        return [p.read_text().strip() for p in sorted(folder.glob("*.txt"), key=lambda p: int(p.stem))]

    def _close(self, interrupted: bool = False) -> list[str]:
        if self.run_id is None or self.client is None:
            return []
        run_id, self.run_id = self.run_id, None
        if self.heartbeat is not None:
            self.heartbeat.stop()
        failures = self._failures()
        signum = stopping.received()
        tags = {"failed_jobs": "\n".join(failures)[:5000]} if failures else {}
        if interrupted and signum is not None:
            status = "KILLED"
            tags[record.STOP_REASON] = f"{stopping.Stopped(signum).reason}; the same command resumes the sweep"
        elif interrupted:
            status = "FAILED"
            tags[record.STOP_REASON] = "the sweep process ended before its jobs did"
        else:
            status = "FAILED" if failures else "FINISHED"
        try:
            if is_down(self.client.tracking_uri):
                raise StoreUnreachable(self.client.tracking_uri)
            for key, value in tags.items():
                retry_locked(lambda: self.client.set_tag(run_id, key, value))
            retry_locked(lambda: self.client.set_terminated(run_id, status))
            self.deleted = self._delete_if_empty(run_id)
        except Exception as err:
            # The next launch closes it (its owner is gone); keep the status for the replay too.
            spool(self.sweep_dir / UNSENT_FILE, self.client.tracking_uri, run_id, status=status, tags=tags)
            print(f"could not mark the sweep's parent run {run_id} {status}: {type(err).__name__}", file=sys.stderr)
        finally:
            if self.lock is not None:
                self.lock.release()
        return failures

    def _delete_if_empty(self, run_id: str) -> bool:
        """Delete the parent run when no job logged to a run under it (a rerun of a finished
        sweep skips every job; a sweep whose every job was refused creates none): an empty
        parent says nothing and would clutter the runs table. True if deleted."""
        experiment_id = retry_locked(lambda: self.client.get_run(run_id)).info.experiment_id
        children = retry_locked(lambda: self.client.search_runs(
            [experiment_id], f"tags.{record.SWEEP_ID} = '{run_id}'", max_results=1))
        if children:
            return False
        retry_locked(lambda: self.client.delete_run(run_id))
        return True

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .console import sweep_summary

        parent_id = self.run_id
        failures = self._close()
        if parent_id is not None and self.client is not None and self.sweep_dir is not None:
            print(sweep_summary(self.client, parent_id, self.sweep_dir, config, self.deleted), flush=True)
        if failures:
            print(f"{len(failures)} job(s) of the sweep failed:", file=sys.stderr)
            for line in failures:
                print(f"  {line}", file=sys.stderr)
            sys.stdout.flush()
            raise SystemExit(1)

