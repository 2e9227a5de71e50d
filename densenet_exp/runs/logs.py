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

# The harness's own loggers and those below them. Hydra's launchers (hydra_joblib_launcher,
# hydra_submitit_launcher) are third-party: their list of the jobs, numbered from 0, would
# contradict the harness's "job 1/8" and the sweep's table.
OWN_LOGGERS = ("densenet_exp", "hydra_plugins.densenet_exp_slurm", "hydra_plugins.densenet_exp_search",
               "__main__")


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


def error_line(error: BaseException) -> str:
    """`Type: message` of an error, in one line (its message's first). An error raised while
    handling another (not `raise ... from`) names that first one, the reason: Lightning's clean-up
    after a failed start raises an error of its own that hides it (issue 37: "Please call
    iter(combined_loader) first" hid why the loader processes could not start). A stop signal
    (SystemExit, KeyboardInterrupt) is its own reason."""
    first = error
    while (isinstance(error, Exception) and first.__context__ is not None and first.__cause__ is None
           and not first.__suppress_context__):
        first = first.__context__

    def line(err: BaseException) -> str:
        text = str(err).strip()
        return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__

    return line(error) if first is error else f"{line(first)} (then, while handling it, {line(error)})"
