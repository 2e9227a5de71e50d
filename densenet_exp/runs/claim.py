"""The MLflow run a job logs to, chosen by the ownership rule (densenet_exp/ownership.py):
refused while a run of its config has a live owner, resumed if one was KILLED (from its last
checkpoint if that reads and is its own, else from the start), else new. DDP ranks other than
0 take rank 0's choice, handed to them in the environment.

A run's checkpoints live in its own checkpoint folder (tag `checkpoint_dir`) and name the run
(checkpoints.OWNER_KEY): a resume looks the folder up by the run and checks the checkpoint's
name. A new run may not take a folder that holds the resume point of another unfinished run
(that would destroy it); other checkpoints there are set aside and the new run starts clean."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.types import RunMode
from mlflow.entities import Run, RunTag
from mlflow.tracking import MlflowClient

from .checkpoints import LAST, PENDING, kept_best, owner, prune_best, resume_problem, set_aside
from .. import record
from ..checks import InvalidValue
from .ownership import Busy, OwnerLock, RunBusy, claim, earlier_live_rival, lock_path
from .tracking import adopt_into_sweep, runs_of_config
from .store import retry_locked, unreachable

log = logging.getLogger("densenet_exp")
CLAIM_ENV = "DENSENET_EXP_RUN_CLAIM"  # rank 0's choice of run, for the DDP ranks Lightning starts


@dataclass
class RunClaim:
    """The run a job logs to, its checkpoint folder, the checkpoint it resumes from (None: from
    the start), whether the run existed before (and had its params logged), and the owner lock
    that rank 0 holds while it trains."""

    run_id: str | None
    ckpt_dir: Path
    ckpt_path: str | None = None
    resumed: bool = False
    recorded: bool = False
    lock: OwnerLock | None = field(default=None, repr=False)

    def to_env(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items() if k != "lock"})

    @classmethod
    def from_env(cls, text: str) -> RunClaim:
        fields = json.loads(text)
        return cls(**{**fields, "ckpt_dir": Path(fields["ckpt_dir"])})


def choose_run(client: MlflowClient, experiment_id: str, previous: list[Run], plain: dict[str, Any], chash: str,
               hc: Any, chief: bool, create: Callable[[OwnerLock], str]) -> RunClaim:
    """The ownership rule, applied by rank 0 once the runs whose owner is gone were closed:
    refuse (RunBusy) while a run of this config (`previous`, newest first) has a live owner, else
    resume the newest KILLED one, else create one with `create(lock)`. Other DDP ranks take rank
    0's choice. `chash` is the config's hash, computed once per job."""
    if not chief:
        if CLAIM_ENV in os.environ:
            return RunClaim.from_env(os.environ[CLAIM_ENV])
        # Ranks that SLURM starts beside rank 0 find the checkpoint rank 0 resumes from.
        unfinished = [r for r in previous if r.info.status in ("RUNNING", "KILLED")]
        ckpt = Path(unfinished[0].data.tags.get(record.CHECKPOINT_DIR, "")) / LAST if unfinished else None
        if ckpt is not None and ckpt.is_file():
            return RunClaim(unfinished[0].info.run_id, ckpt.parent, str(ckpt), resumed=True)
        return RunClaim(None, Path(hc.runtime.output_dir) / "checkpoints")
    tracking = plain["tracking"]
    if tracking["resume"]:
        live = [r for r in previous if r.info.status == "RUNNING"]
        if live:
            raise RunBusy(live[0])
        # A run loaded from an export has no checkpoint folder here: it is a record, not resumed.
        killed = next((r for r in previous if r.info.status == "KILLED" and lock_path(r) is not None), None)
        if killed is not None:
            return resume_run(client, killed, hc)
    claimed = new_run(client, experiment_id, chash, hc, create)
    if tracking["resume"]:
        # Two launches of one config at once each created a run: the first-created one goes on.
        rival = earlier_live_rival(
            runs_of_config(client, experiment_id, chash), claimed.run_id, tracking["owner_timeout_s"])
        if rival is not None:
            retry_locked(lambda: client.delete_run(claimed.run_id))
            claimed.lock.release()
            raise RunBusy(rival)
    return claimed


def new_run(client: MlflowClient, experiment_id: str, chash: str, hc: Any,
            create: Callable[[OwnerLock], str]) -> RunClaim:
    """A new run owned by this process, checkpointing into the job's output folder: refused
    there while the folder holds another unfinished run's resume point, else started clean."""
    lock = OwnerLock(Path(hc.runtime.output_dir).resolve() / "checkpoints")
    if not lock.acquire():
        raise Busy(f"the output folder {hc.runtime.output_dir} holds a run that a live process trains: "
                   "pick another hydra.run.dir")
    folder = lock.path.parent
    try:
        waiting = run_waiting_in(client, folder)
    except BaseException:
        lock.release()
        raise
    if waiting is not None:
        lock.release()
        tags = waiting.data.tags
        raise InvalidValue(
            f"hydra.run.dir={str(hc.runtime.output_dir)!r} holds {folder / LAST}, the resume point of MLflow run "
            f"{waiting.info.run_id} ({tags.get(record.VARIANT, '?')}, config {tags.get(record.CONFIG_HASH, '?')}, "
            f"{waiting.info.status}), which this configuration (config {chash}) may not reuse: pick "
            "another hydra.run.dir, or finish that run first (its own command resumes it)")
    moved = set_aside(folder, "stale")  # an earlier run's checkpoints in a reused folder
    if moved:
        print(f"note: {folder} held checkpoints that no unfinished run resumes from ({', '.join(p.name for p in moved)}): "
              "set aside; this run starts clean", file=sys.stderr, flush=True)
    run_id = create(lock)
    return RunClaim(run_id, folder, lock=lock)


def run_waiting_in(client: MlflowClient, folder: Path) -> Run | None:
    """The unfinished (KILLED or orphaned RUNNING) run of this store whose resume point is
    `folder/last.ckpt`, by the run the checkpoint names; None if there is none."""
    last = folder / LAST
    named = owner(last) if last.is_file() else None
    if named is None:
        return None
    try:
        run = retry_locked(lambda: client.get_run(str(named.get("run_id"))))
    except Exception as err:  # no such run in this store: a checkpoint of another store or a deleted run
        if unreachable(err):
            raise
        return None
    mine = lock_path(run)
    if (run.info.lifecycle_stage != "active" or run.info.status not in ("KILLED", "RUNNING") or mine is None
            or mine.parent.resolve() != folder.resolve()):
        return None
    return run


def resume_run(client: MlflowClient, run: Run, hc: Any) -> RunClaim:
    """Own a KILLED run again and continue it: from its last checkpoint if that reads and is
    its own (named by run id and config hash), else from the start (a checkpoint it may not
    use is set aside and reported)."""
    lock = claim(client, run)
    run_id = run.info.run_id
    ckpt_dir = lock.path.parent
    last = ckpt_dir / LAST
    ckpt_path = None
    if last.exists() or last.is_symlink():
        problem = resume_problem(last, run_id, run.data.tags.get(record.CONFIG_HASH, ""))
        if problem is None:
            ckpt_path = str(last)
        else:
            kind, why = problem
            (moved,) = set_aside(ckpt_dir, kind, LAST)
            print(f"warning: checkpoint {last} {why}: set aside as {moved}, and MLflow run {run_id} starts over from "
                  "epoch 0", file=sys.stderr, flush=True)
    # A checkpoint of an epoch whose metrics may not all be logged, or of an attempt started over.
    set_aside(ckpt_dir, "stale", "*.ckpt" if ckpt_path is None else PENDING)
    if ckpt_path is not None:  # best checkpoints written after the one it goes back to
        prune_best(ckpt_dir, kept_best(last))
    tags = {**lock.tags(), record.RESUMED_AFTER: run.data.tags.get(record.STOP_REASON, "")}
    retry_locked(lambda: client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()]))
    if record.STOP_REASON in run.data.tags:
        retry_locked(lambda: client.delete_tag(run_id, record.STOP_REASON))
    retry_locked(lambda: client.update_run(run_id, status="RUNNING"))
    if hc.mode == RunMode.MULTIRUN:
        adopt_into_sweep(client, run, Path(hc.sweep.dir), hc.job.num, finished=False)
    log.info("resuming MLflow run %s from %s", run_id, ckpt_path or "the start")
    return RunClaim(run_id, ckpt_dir, ckpt_path, resumed=True, recorded=bool(run.data.params), lock=lock)
