"""Where log lines go (conf/hydra/default.yaml): a job's console shows the harness's own lines
and third-party errors; third-party INFO and warnings (Hydra's launcher, MLflow's store set-up,
Lightning's device banner, tips and UserWarnings, alembic's migration notices) go only to the
job's run.log. The launching process, which has no run.log, also shows third-party warnings
(a launcher that cannot start its jobs says so there). Light to import: Hydra builds these
filters at start-up.
"""

from __future__ import annotations

import logging
import os
from typing import TextIO

# The harness's loggers; not `hydra_plugins` (joblib's launcher lines number jobs from #0).
OWN_LOGGERS = ("densenet_exp", "__main__")


def is_own(name: str) -> bool:
    return any(name == own or name.startswith(own + ".") for own in OWN_LOGGERS)


class HarnessOnly(logging.Filter):
    """A job's console: the harness's own records, and others' only from ERROR up."""

    least = logging.ERROR

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.least or is_own(record.name)


class LauncherConsole(HarnessOnly):
    """The launching process's console: also others' warnings, which no run.log keeps."""

    least = logging.WARNING


def quiet_mlflow() -> None:
    """MLflow gives its loggers their own stderr handler at import; without it their records reach
    the root logger's handlers like everyone else's (the console filter, run.log)."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")


def warnings_to_logs() -> None:
    """Python warnings (Lightning's UserWarnings and hints, torch's) become records of the
    `py.warnings` logger instead of lines written straight to stderr, so the console filter keeps
    them in run.log."""
    logging.captureWarnings(True)


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is a terminal (not a pipe, a file or a SLURM .out): only there a progress
    bar redraws itself in place; elsewhere its carriage returns and escape codes are clutter."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
