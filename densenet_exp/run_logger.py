"""Lightning's MLflow logger as the harness uses it (kept apart from tracking.py so that reading
runs, `--help` and Hydra's sweep callback never import Lightning)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger

from .tracking import retry_locked


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger, except that the harness, not each fit or test, ends the run
    (Lightning would mark it FINISHED after `fit` although `test` still has to log), and writes
    retry while parallel jobs hold the SQLite store's lock."""

    def __init__(self, *args: Any, unsent: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unsent = unsent

    def finalize(self, status: str = "success") -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        try:
            retry_locked(lambda: super(RunLogger, self).log_metrics(metrics, step))
        except Exception:
            # The store is gone past MLflow's own retries: keep the figures on disk, then fail loudly.
            if self.unsent is not None:
                with self.unsent.open("a") as f:
                    f.write(json.dumps({"run_id": self._run_id, "step": step, "metrics": dict(metrics)}) + "\n")
            raise

    def log_hyperparams(self, params: Any) -> None:
        retry_locked(lambda: super(RunLogger, self).log_hyperparams(params))
