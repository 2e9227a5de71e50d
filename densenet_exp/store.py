"""Where the MLflow store is and how to write to it while parallel jobs hold SQLite's lock.

Kept free of Lightning and Hydra so that the report and the notebooks, which only read the
store, start in seconds (`densenet_exp.tracking` builds on these for training runs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def tracking_uri(configured: str | None, root: Path) -> str:
    """The store a run logs to: the config's `tracking.uri`, else `$MLFLOW_TRACKING_URI`, else
    the SQLite file `mlflow.db` in the project root."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def retry_locked(fn: Callable[[], T], attempts: int = 8) -> T:
    """Call `fn`, retrying while SQLite says the database is locked (parallel jobs, one file)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:  # MlflowException wraps sqlalchemy's OperationalError
            if "locked" not in str(err) or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)
    raise AssertionError("unreachable")
