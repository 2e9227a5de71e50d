"""Convergence speed: epochs and wall time to reach a fraction of the final value of a metric."""

from __future__ import annotations

import time
from collections.abc import Sequence

import lightning.pytorch as pl

from .. import record
from ..checks import require
from .output import log_results


class ConvergenceProbe(pl.Callback):
    """Records ``monitor`` (higher is better) and the wall time since fit start at the end of every
    training epoch (after that epoch's validation), and at the end of training logs, for each
    fraction f, ``epochs_to_{f%}pct`` and ``seconds_to_{f%}pct``: the first epoch (counted from 1)
    and the time at which the metric reached f x its last-epoch value. Epochs whose
    ``callback_metrics`` lack the monitor are skipped."""

    def __init__(self, fractions: Sequence[float] = (0.5, 0.9, 0.95, 0.99), monitor: str = record.VAL_ACC) -> None:
        fractions = tuple(float(f) for f in fractions)
        require("fractions", fractions, bool(fractions) and all(0 < f <= 1 for f in fractions), "numbers in (0, 1]")
        self.fractions = fractions
        self.monitor = monitor
        self.history: list[tuple[int, float, float]] = []  # (epoch, value, seconds since fit start)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self.history = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self.history.append((trainer.current_epoch + 1, float(value), time.perf_counter() - self._fit_start))

    def summary(self) -> dict[str, float]:
        final = self.history[-1][1]
        metrics = {}
        for f in self.fractions:
            # The last epoch always qualifies, so `next` finds one.
            epoch, _, seconds = next(h for h in self.history if h[1] >= f * final)
            pct = round(f * 100)  # round, not int: int(0.29 * 100) is 28
            metrics[f"epochs_to_{pct}pct"] = epoch
            metrics[f"seconds_to_{pct}pct"] = seconds
        return metrics

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.history or not trainer.is_global_zero:
            return
        log_results(trainer, self.summary())
