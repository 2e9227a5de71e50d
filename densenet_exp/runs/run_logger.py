"""Lightning's MLflow logger as the harness uses it (kept apart from tracking.py so that reading
runs, `--help` and Hydra's sweep callback never import Lightning)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient

from .store import StoreUnreachable, retry_locked, unreachable
from .tracking import spool


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger, except that
    - the harness, not each fit or test, ends the run (Lightning would mark it FINISHED after
      `fit` although `test` still has to log);
    - writes retry while parallel jobs hold the SQLite store's lock;
    - each (metric, step) already in the run's history is skipped (`load_history` on resume), so
      an epoch redone after a kill is logged once;
    - figures the store could not take are kept in `unsent` (JSON lines, for
      `python -m densenet_exp.replay`), and an unreachable store raises StoreUnreachable."""

    def __init__(self, *args: Any, unsent: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unsent = unsent
        self.logged: set[tuple[str, int]] = set()

    def finalize(self, status: str = "success") -> None:
        pass

    def load_history(self, client: MlflowClient) -> None:
        run_id = self._run_id
        keys = retry_locked(lambda: client.get_run(run_id)).data.metrics
        for key in keys:
            history = retry_locked(lambda: client.get_metric_history(run_id, key))
            self.logged.update((key, m.step) for m in history)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        fresh = {k: v for k, v in metrics.items() if (k, step or 0) not in self.logged}
        if not fresh:
            return
        try:
            retry_locked(lambda: super(RunLogger, self).log_metrics(fresh, step))
        except Exception as err:
            # The store is gone past MLflow's own retries: keep the figures on disk, then fail loudly.
            spool(self.unsent, self._tracking_uri, self._run_id, step=step or 0, metrics=dict(fresh),
                  time=int(time.time() * 1000))
            if unreachable(err):
                raise StoreUnreachable(self._tracking_uri or "?", self.unsent) from err
            raise
        self.logged.update((k, step or 0) for k in fresh)

    def log_hyperparams(self, params: Any) -> None:
        retry_locked(lambda: super(RunLogger, self).log_hyperparams(params))
