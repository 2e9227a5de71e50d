"""The parent run of a Hydra multirun (conf/hydra/default.yaml creates it through
hydra_callbacks.py): created before the first job, closed after the last with the sweep's table."""

from __future__ import annotations

import atexit
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from omegaconf import DictConfig, OmegaConf

from .. import record
from . import stopping
from .console import sweep_summary
from .ownership import Heartbeat, OwnerLock, close_orphans
from .store import (
    StoreConfigError,
    StoreUnreachable,
    bound_http_waits,
    is_down,
    prepare_store,
    retry_locked,
    tracking_uri,
    unreachable,
)
from .sweep_folder import FAILURES_DIR, PARENT_ID_FILE, SweepPlan
from .tracking import UNSENT_FILE, ensure_experiment, git_state, spool


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
        from ..validate import ConfigError, check_output_folder, fill_experiment, validate_tracking

        try:
            # Named here as each job names it; the sweeper and the closing table read it from config.
            fill_experiment(config, OmegaConf.select(config, "hydra.runtime.choices.experiment"),
                            SweepPlan.of(config).varying)
        except ConfigError as err:
            fail(str(err), 2)
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

