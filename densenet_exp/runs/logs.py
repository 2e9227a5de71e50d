"""Where log lines go (conf/hydra/default.yaml): the console shows the harness's own lines and
every warning; third-party INFO (Hydra's launcher, MLflow's store set-up, Lightning's device
banner) goes only to the job's run.log. Light to import: Hydra builds this filter at start-up.
"""

from __future__ import annotations

import logging
import os
from typing import TextIO

OWN_LOGGERS = ("densenet_exp", "hydra_plugins", "__main__")


class HarnessOnly(logging.Filter):
    """Lets through the harness's own records and any record of WARNING or above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in OWN_LOGGERS


def quiet_mlflow() -> None:
    """MLflow gives its loggers their own stderr handler at import; without it their records reach
    the root logger's handlers like everyone else's (the console filter, run.log)."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is a terminal (not a pipe, a file or a SLURM .out): only there a progress
    bar redraws itself in place; elsewhere its carriage returns and escape codes are clutter."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
