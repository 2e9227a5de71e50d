"""MLflow bookkeeping: where the store is, one run per training job (created, resumed, closed),
the facts every run records, and the parent run that nests the jobs of a Hydra multirun."""

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
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .store import retry_locked, tracking_uri  # noqa: F401 (re-exported for run.py and tests)

# MLflow is imported where it is used, so that importing this module (Hydra's sweep callback,
# `--help`, the report) costs no second; Lightning's MLflow logger lives in run_logger.py.
if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

PARENT_ID_FILE = "mlflow_parent_run_id"
FAILURES_DIR = "failed_jobs"
PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "mlflow", "densenet_exp")


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """Id of the experiment `name`, created if missing; safe when several jobs race to create it."""
    exp = retry_locked(lambda: client.get_experiment_by_name(name))
    if exp is not None:
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


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"growth_rate": 12}} -> {"model.growth_rate": 12}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_hash(cfg: Mapping[str, Any]) -> str:
    """A short, stable hash of everything that shapes a run's result (tracking excluded)."""
    relevant = {k: v for k, v in cfg.items() if k not in ("tracking",)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_state(root: Path) -> dict[str, str]:
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {MLFLOW_GIT_COMMIT: commit, "git_commit": commit, "git_dirty": str(dirty).lower()} if commit else {}


def system_facts(device: str) -> dict[str, str]:
    import torch

    facts = {"device": device, "python": platform.python_version(), "platform": platform.platform()}
    facts["cpu_threads"] = str(torch.get_num_threads())
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    for package in PACKAGES:
        try:
            facts[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return facts


def runs_of_config(client: MlflowClient, experiment_id: str, chash: str) -> list[Run]:
    """Every run of this exact config (same config hash), newest first."""
    return retry_locked(
        lambda: client.search_runs(
            [experiment_id], f"tags.config_hash = '{chash}'", order_by=["attributes.start_time DESC"]
        )
    )


def find_resumable_run(runs: list[Run]) -> Run | None:
    """The newest run that never ended (killed) and left a last checkpoint."""
    for run in runs:
        ckpt = Path(run.data.tags.get("checkpoint_dir", "")) / "last.ckpt"
        if run.info.status in ("RUNNING", "KILLED") and ckpt.is_file():
            return run
    return None


def find_finished_run(runs: list[Run]) -> Run | None:
    return next((run for run in runs if run.info.status == "FINISHED"), None)


def end_run(client: MlflowClient, run_id: str, error: BaseException | None) -> None:
    """Mark the run FINISHED, or FAILED with the error recorded on it (tag and artifact)."""
    if error is None:
        retry_locked(lambda: client.set_terminated(run_id, "FINISHED"))
        return
    message = f"{type(error).__name__}: {error}"
    retry_locked(lambda: client.set_tag(run_id, "error", message[:5000]))
    try:
        import tempfile
        import traceback

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "error.txt"
            path.write_text("".join(traceback.format_exception(error)))
            client.log_artifact(run_id, str(path))
    finally:
        retry_locked(lambda: client.set_terminated(run_id, "FAILED"))


# --- multirun: one parent run per sweep ---------------------------------------------------


def parent_run_id(sweep_dir: Path) -> str | None:
    path = sweep_dir / PARENT_ID_FILE
    return path.read_text().strip() if path.is_file() else None


def record_failed_job(sweep_dir: Path, job_num: int, overrides: list[str], error: BaseException) -> None:
    folder = sweep_dir / FAILURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    line = f"#{job_num} [{' '.join(overrides)}] {type(error).__name__}: {error}".splitlines()[0]
    (folder / f"{job_num}.txt").write_text(line + "\n")


class SweepParentRun(Callback):
    """Hydra callback: before a multirun's jobs start, create the experiment and a parent run
    (so parallel jobs never race to create them); afterwards end it, print the failed jobs and
    exit non-zero if there were any."""

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        from .console import SweepPlan

        root = Path(config.hydra.runtime.cwd)
        self.client = MlflowClient(tracking_uri(config.tracking.uri, root))
        experiment_id = ensure_experiment(self.client, config.tracking.experiment)
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = list(config.hydra.overrides.task)
        tags = {
            MLFLOW_RUN_NAME: f"sweep-{self.sweep_dir.name}",
            "sweep": "parent",
            "sweep_dir": str(self.sweep_dir.resolve()),
            "overrides": " ".join(overrides),
            **git_state(root),
        }
        run = retry_locked(lambda: self.client.create_run(experiment_id, tags=tags))
        self.run_id = run.info.run_id
        (self.sweep_dir / PARENT_ID_FILE).write_text(self.run_id)
        SweepPlan.of(config).write(self.sweep_dir)  # jobs and varying knobs: "job j/N", run names
        # If the sweep dies before on_multirun_end (a job's config fails to compose, Ctrl-C),
        # the parent must not be left RUNNING.
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
        failures = self._failures()
        status = "FAILED" if failures or interrupted else "FINISHED"
        if failures:
            retry_locked(lambda: self.client.set_tag(run_id, "failed_jobs", "\n".join(failures)[:5000]))
        retry_locked(lambda: self.client.set_terminated(run_id, status))
        return failures

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .console import sweep_summary

        parent_id = self.run_id
        failures = self._close()
        if parent_id is not None and self.client is not None and self.sweep_dir is not None:
            print(sweep_summary(self.client, parent_id, self.sweep_dir, config), flush=True)
        if failures:
            print(f"{len(failures)} job(s) of the sweep failed:", file=sys.stderr)
            for line in failures:
                print(f"  {line}", file=sys.stderr)
            sys.stdout.flush()
            raise SystemExit(1)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The job's config as plain data, without Hydra's own section."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return container
