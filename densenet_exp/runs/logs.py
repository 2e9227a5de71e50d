"""Where log lines go (conf/hydra/default.yaml): the console shows the harness's own lines and
every warning; third-party INFO (Hydra's launcher, MLflow's store set-up, Lightning's device
banner) goes only to the job's run.log. Light to import: Hydra builds this filter at start-up.
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


class HarnessOnly(logging.Filter):
    """Lets through the harness's own records and any record of WARNING or above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or any(
            record.name == name or record.name.startswith(f"{name}.") for name in OWN_LOGGERS)


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
