"""A run's resume checkpoint, `last.ckpt`: it becomes the resume point only once every metric
of its epoch is logged; it is checked before a resume and set aside when it cannot be read or
belongs to another run.

Lightning's own `save_last` writes the checkpoint at the end of validation, before the epoch's
training metrics (`train/loss`, `train/acc`, `lr`) are logged: a run killed in between resumed
at the next epoch and never logged them, and a run killed between logging and saving logged an
epoch twice. Here each epoch's checkpoint is written at the end of its training epoch as
`pending.ckpt` (a state Lightning resumes exactly, learning-rate schedule included) and renamed
to `last.ckpt` at the start of the next epoch (or the end of training), after the epoch's last
figure went out. A kill before the rename redoes the epoch from the previous `last.ckpt`, and the
logger skips each (metric, step) already in the run's history: a resumed run logs every epoch
exactly once, whatever the moment of the kill.

Every checkpoint names its MLflow run and config hash (key OWNER_KEY), so a run resumes only
from its own: a folder reused by another configuration can never hand it someone else's weights.
`last.ckpt` of the last epoch is the resume point of a run stopped during or before its test.
"""

from __future__ import annotations

import errno
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from . import stopping

LAST = "last.ckpt"
PENDING = "pending.ckpt"
BEST = "best-*.ckpt"  # ModelCheckpoint's, chosen on validation accuracy (job.make_trainer)
OWNER_KEY = "densenet_exp"  # in every checkpoint: {"run_id": ..., "config_hash": ...}
# Tests only: "SECONDS[@EPOCH]", sleep after an epoch's metrics are logged and before its
# checkpoint becomes `last.ckpt` (at the start of EPOCH only, if given), to kill a run there;
# "SECONDS@test": sleep after the first batch of the test instead. A stop signal ends the pause.
PAUSE_ENV = "DENSENET_EXP_TEST_PAUSE_BEFORE_CHECKPOINT"
NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file-size limit


class NoRoom(RuntimeError):
    """A file (a checkpoint) that could not be written for lack of room: the run stops KILLED with
    the reason and resumes, from its last complete checkpoint, once there is room."""


def no_room(err: BaseException | None) -> NoRoom | None:
    """The NoRoom that `err` (or what it was raised from) amounts to, else None."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, NoRoom):
            return err
        if isinstance(err, OSError) and err.errno in NO_ROOM_ERRNOS:
            where = f" writing {err.filename}" if err.filename else ""
            return NoRoom(f"no room left on the device{where} ({err.strerror or os.strerror(err.errno)})")
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


class LastCheckpoint(Checkpoint):
    """Keep `dirpath/last.ckpt` at the last epoch whose metrics are all logged, and stamp every
    checkpoint the trainer writes with the run it belongs to.

    A Checkpoint, so that Lightning runs it after the other callbacks and after the
    ModelCheckpoint listed before it, which saves the epoch's best at the same hook: the epoch's
    checkpoint then holds the selection that includes that epoch, the one whose files are on disk
    (else a resume went back to the previous epoch's selection, and its best file stayed behind)."""

    def __init__(self, dirpath: Path, run_id: str | None, config_hash: str) -> None:
        self.last = Path(dirpath) / LAST
        self.pending = Path(dirpath) / PENDING
        self.owner = {"run_id": run_id, "config_hash": config_hash}
        seconds, _, self.pause_at = (os.environ.get(PAUSE_ENV) or "0").partition("@")
        self.pause_s = float(seconds)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[OWNER_KEY] = dict(self.owner)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        try:
            trainer.save_checkpoint(self.pending, weights_only=False)
        except OSError as err:  # a half-written file must never become the resume point
            self.pending.unlink(missing_ok=True)
            full = no_room(err)
            if full is not None:
                raise NoRoom(f"no room left on the device writing the checkpoint {self.pending} "
                             f"({err.strerror or err})") from err
            raise

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._promote(trainer)  # the previous epoch's metrics are all logged by now

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._promote(trainer)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        if self.pause_at == "test" and batch_idx == 0 and trainer.is_global_zero:
            self._pause("in the test, after its first batch")
            # The pause stands for a test step still running: a stop that came during it takes
            # effect now, as at any step's end (the test's last batch has no next step to stop at).
            stopping.raise_if_stopped()

    def _promote(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or not self.pending.exists():
            return
        if self.pause_at in ("", str(trainer.current_epoch)):
            self._pause(f"at epoch {trainer.current_epoch} before {self.pending.name} becomes {self.last.name}")
        os.replace(self.pending, self.last)  # atomic: a kill leaves the old or the new, never half

    def _pause(self, where: str) -> None:
        if not self.pause_s:
            return
        print(f"pausing {self.pause_s:g} s {where}", flush=True)
        deadline = time.monotonic() + self.pause_s
        while time.monotonic() < deadline and stopping.received() is None:  # a stop ends the pause
            time.sleep(0.05)


def _load(path: Path) -> Any:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def readable(path: Path) -> str | None:
    """None if the checkpoint loads (weights_only), else why not."""
    try:
        _load(path)
    except Exception as err:
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
    return None


def owner(path: Path) -> dict[str, str] | None:
    """The run a checkpoint names ({"run_id", "config_hash"}), None if it names none or cannot be read."""
    try:
        found = _load(path).get(OWNER_KEY)
    except Exception:
        return None
    return found if isinstance(found, dict) else None


def resume_problem(path: Path, run_id: str, config_hash: str) -> tuple[str, str] | None:
    """None if run `run_id` (config `config_hash`) may resume from `path`, else (what the file
    is: "corrupt" or "foreign", why not: to follow "checkpoint <path> ")."""
    if not path.is_file():
        return "corrupt", "is not a file"
    why = readable(path)
    if why is not None:
        return "corrupt", f"cannot be read ({why})"
    theirs = owner(path)
    if theirs is None:
        return "foreign", f"names no MLflow run (written by older code), so it may not be MLflow run {run_id}'s"
    if theirs != {"run_id": run_id, "config_hash": config_hash}:
        return "foreign", (f"belongs to MLflow run {theirs.get('run_id')} (config {theirs.get('config_hash')}), not to "
                           f"MLflow run {run_id} (config {config_hash})")
    return None


def kept_best(path: Path) -> set[Path]:
    """The best checkpoints that the ModelCheckpoint state saved in checkpoint `path` keeps."""
    kept: set[Path] = set()
    for state in (_load(path).get("callbacks") or {}).values():
        if isinstance(state, dict) and "best_k_models" in state:
            kept.update(Path(p) for p in [*state["best_k_models"], state.get("best_model_path")] if p)
    return kept


def prune_best(folder: Path, keep: set[Path]) -> list[Path]:
    """Delete the run's own best checkpoints in `folder` other than `keep`: ones its
    ModelCheckpoint no longer tracks (written after the checkpoint a resume went back to), which
    would otherwise stay beside the newer best. Returns what was deleted."""
    keep = {Path(p).resolve() for p in keep}
    gone = [p for p in sorted(Path(folder).glob(BEST)) if p.resolve() not in keep]
    for path in gone:
        path.unlink()
    return gone


def set_aside(folder: Path, why: str, pattern: str = "*.ckpt") -> list[Path]:
    """Rename the checkpoints in `folder` (files or not) to `<name>.<why>-<time>`, so that
    neither a resume nor Lightning's checkpointing (which would write `last-v1.ckpt` beside them)
    reads them again."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    moved = []
    for path in sorted(Path(folder).glob(pattern)):
        target = path.with_name(f"{path.name}.{why}-{stamp}")
        path.rename(target)
        moved.append(target)
    return moved
