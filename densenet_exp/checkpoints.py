"""A run's resume checkpoint, `last.ckpt`: it becomes the resume point only once every metric
of its epoch is logged; it is checked before a resume and set aside when it cannot be read.

Lightning's own `save_last` writes the checkpoint at the end of validation, before the epoch's
training metrics (`train/loss`, `train/acc`, `lr`) are logged: a run killed in between resumed
at the next epoch and never logged them, and a run killed between logging and saving logged an
epoch twice. Here each epoch's checkpoint is written at the end of its training epoch as
`pending.ckpt` (a state Lightning resumes exactly, learning-rate schedule included) and renamed
to `last.ckpt` at the start of the next epoch (or the end of training), after the epoch's last
figure went out. A kill before the rename redoes the epoch from the previous `last.ckpt`, and the
logger skips each (metric, step) already in the run's history: a resumed run logs every epoch
exactly once, whatever the moment of the kill.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L

from . import stopping

LAST = "last.ckpt"
PENDING = "pending.ckpt"
# Tests only: "SECONDS[@EPOCH]", sleep after an epoch's metrics are logged and before its
# checkpoint becomes `last.ckpt` (at the start of EPOCH only, if given), to kill a run there.
PAUSE_ENV = "DENSENET_EXP_TEST_PAUSE_BEFORE_CHECKPOINT"


class LastCheckpoint(L.Callback):
    """Keep `dirpath/last.ckpt` at the last epoch whose metrics are all logged."""

    def __init__(self, dirpath: Path) -> None:
        self.last = Path(dirpath) / LAST
        self.pending = Path(dirpath) / PENDING
        seconds, _, epoch = (os.environ.get(PAUSE_ENV) or "0").partition("@")
        self.pause_s, self.pause_epoch = float(seconds), int(epoch) if epoch else None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        trainer.save_checkpoint(self.pending, weights_only=False)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._promote(trainer)  # the previous epoch's metrics are all logged by now

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._promote(trainer)

    def _promote(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or not self.pending.exists():
            return
        if self.pause_s and self.pause_epoch in (None, trainer.current_epoch):
            print(f"pausing {self.pause_s:g} s at epoch {trainer.current_epoch} before {self.pending.name} becomes "
                  f"{self.last.name}", flush=True)
            deadline = time.monotonic() + self.pause_s
            while time.monotonic() < deadline and stopping.received() is None:  # a stop ends the pause
                time.sleep(0.05)
        os.replace(self.pending, self.last)  # atomic: a kill leaves the old or the new, never half


def readable(path: Path) -> str | None:
    """None if the checkpoint loads (weights_only), else why not."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
    return None


def set_aside(folder: Path, why: str, pattern: str = "*.ckpt") -> list[Path]:
    """Rename the checkpoints in `folder` to `<name>.<why>-<time>`, so that neither a resume nor
    Lightning's checkpointing (which would write `last-v1.ckpt` beside them) reads them again."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    moved = []
    for path in sorted(Path(folder).glob(pattern)):
        target = path.with_name(f"{path.name}.{why}-{stamp}")
        path.rename(target)
        moved.append(target)
    return moved
