"""Who trains a run, so that no launch takes over a live one and none is left RUNNING for good.

A run's owner is the process that holds an exclusive lock (flock) on `owner.lock` in the run's
checkpoint folder (a sweep's parent run: in the sweep folder) while it trains. The kernel drops
the lock however the process ends, `kill -9` included, so on the owner's machine the lock alone
says whether the owner lives. The run's tags name the owner (`owner` = host:pid, `owner_lock`)
and carry `owner_heartbeat`, refreshed every `tracking.heartbeat_s`, for launches on other
machines, which cannot see that lock: there an owner is gone once its heartbeat is older than
`tracking.owner_timeout_s`. A SLURM job that was requeued is gone for its own next start.

The rule every launch follows (README, "Scale out"):
  1. unfinished runs of the experiment whose owner is gone are closed: KILLED, tag `stop_reason`;
  2. while a run of the same config has a live owner, the launch refuses (exit 3) -- unless
     `tracking.resume=false`, which always trains a separate new run;
  3. else it resumes the newest KILLED run of its config into the same MLflow run (from its last
     checkpoint, or from the start if it left none), else it starts a new run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from .. import record
from .store import retry_locked

LOCK_FILE = "owner.lock"


def this_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def slurm_job() -> tuple[str, int] | None:
    """(job id, restart count) under SLURM, else None. A requeued job keeps its id."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    return (job, int(os.environ.get("SLURM_RESTART_COUNT") or 0)) if job else None


class OwnerLock:
    """The exclusive lock on `folder/owner.lock`, held by the process that owns the folder's run."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, create: bool = True) -> bool:
        """Take the lock without waiting; False while another process holds it."""
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.parent.is_dir():
            return True  # nothing to hold: the folder is gone, so is any owner of it
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"owner": this_owner(), "since": time.time()}).encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def tags(self) -> dict[str, str]:
        """The run tags that name this process as the owner."""
        tags = {record.OWNER: this_owner(), record.OWNER_LOCK: str(self.path.resolve()), record.OWNER_HEARTBEAT: str(int(time.time()))}
        job = slurm_job()
        if job:
            tags[record.OWNER_SLURM_JOB] = f"{job[0]}:{job[1]}"
        return tags


def lock_is_held(path: Path) -> bool:
    """Whether some process holds the lock file `path` (a missing file is held by nobody)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def lock_path(run: Run) -> Path | None:
    """The lock file of a run (runs from before ownership: the one in its checkpoint folder)."""
    tags = run.data.tags
    if record.OWNER_LOCK in tags:
        return Path(tags[record.OWNER_LOCK])
    folder = tags.get(record.CHECKPOINT_DIR) or (tags.get(record.SWEEP_DIR) if tags.get(record.SWEEP) == "parent" else None)
    return Path(folder) / LOCK_FILE if folder else None


def owner_gone(run: Run, timeout_s: float) -> str | None:
    """Why the owner of an unfinished run is gone, or None while it lives."""
    tags = run.data.tags
    owner = tags.get(record.OWNER, "unrecorded")
    job, theirs = slurm_job(), tags.get(record.OWNER_SLURM_JOB)
    if job and theirs:
        their_job, _, restart = theirs.rpartition(":")
        if their_job == job[0] and int(restart) < job[1]:
            return f"its owner {owner} was SLURM job {their_job} before it was requeued"
    if record.OWNER not in tags:
        # A run from before ownership (older code may still train it): gone once it has been
        # silent, no metric logged, for owner_timeout_s.
        latest = max([run.info.start_time or 0, *(m.timestamp for m in getattr(run.data, "_metric_objs", []))])
        age = time.time() - latest / 1000
        return None if age < timeout_s else f"it has no recorded owner and logged nothing for {age:.0f} s"
    host = owner.rpartition(":")[0]
    if host == socket.gethostname():
        path = lock_path(run)
        if path is not None and lock_is_held(path):
            return None
        return f"its owner {owner} ended without closing it"
    age = time.time() - float(tags.get(record.OWNER_HEARTBEAT) or 0)
    if age < timeout_s:
        return None
    return f"its owner {owner} sent no heartbeat for {age:.0f} s (tracking.owner_timeout_s={timeout_s:g})"


def close_orphans(client: MlflowClient, experiment_id: str, timeout_s: float) -> list[str]:
    """Mark KILLED, with the reason, every RUNNING run of the experiment whose owner is gone
    (crashed jobs and sweep parents alike). Returns their run ids."""
    closed = []
    running = retry_locked(lambda: client.search_runs([experiment_id], "attributes.status = 'RUNNING'"))
    for run in running:
        reason = owner_gone(run, timeout_s)
        if reason is None:
            continue
        # Hold the dead owner's lock while closing, so that no launch claims the run meanwhile.
        path = lock_path(run)
        lock = OwnerLock(path.parent) if path is not None else None
        if lock is not None and not lock.acquire(create=False):
            continue  # claimed a moment ago by another launch
        try:
            stamp = datetime.now().isoformat(timespec="seconds")
            run_id = run.info.run_id
            retry_locked(lambda: client.set_tag(run_id, record.STOP_REASON, f"{reason}; closed by {this_owner()} at {stamp}"))
            retry_locked(lambda: client.set_terminated(run_id, "KILLED"))
            closed.append(run_id)
        finally:
            if lock is not None:
                lock.release()
    return closed


class Busy(RuntimeError):
    """What this launch would train is being trained by a live process: it refuses."""


class RunBusy(Busy):
    """A run of this config is being trained by a live owner."""

    def __init__(self, run: Run) -> None:
        self.run = run
        tags = run.data.tags
        super().__init__(
            f"MLflow run {run.info.run_id} ({tags.get(record.VARIANT, '?')}, config {tags.get(record.CONFIG_HASH, '?')}) is "
            f"being trained by {tags.get(record.OWNER, 'a live process')} (checkpoints in {tags.get(record.CHECKPOINT_DIR)}): "
            "wait for it to end or stop it, or add tracking.resume=false to train a separate run")


def claim(client: MlflowClient, run: Run) -> OwnerLock:
    """Become the owner of an unfinished run whose owner is gone; RunBusy if another process is
    (or just became) its owner."""
    path = lock_path(run)
    folder = path.parent if path is not None else Path(run.data.tags[record.CHECKPOINT_DIR])
    lock = OwnerLock(folder)
    if not lock.acquire():
        raise RunBusy(run)
    fresh = retry_locked(lambda: client.get_run(run.info.run_id))
    if fresh.info.status == "RUNNING" and fresh.data.tags.get(record.OWNER) != run.data.tags.get(record.OWNER):
        lock.release()  # another machine resumed it a moment ago
        raise RunBusy(fresh)
    return lock


def earlier_live_rival(runs: list[Run], mine: str, timeout_s: float) -> Run | None:
    """Among runs of one config, the first-created RUNNING run with a live owner, if it was
    created before run `mine`. Two launches that created runs of one config at once both see
    both runs; this order lets exactly one of them go on."""
    for run in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        if run.info.run_id == mine:
            return None
        if run.info.status == "RUNNING" and owner_gone(run, timeout_s) is None:
            return run
    return None


class Heartbeat:
    """Refresh the run's heartbeat tag every `every_s` seconds from a daemon thread."""

    def __init__(self, client: MlflowClient, run_id: str, every_s: float) -> None:
        self.client, self.run_id, self.every_s = client, run_id, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="owner-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.client.set_tag(self.run_id, record.OWNER_HEARTBEAT, str(int(time.time())))
            except Exception:  # a store that is down or locked: the next beat tries again
                pass

    def stop(self) -> None:
        self._stop.set()

