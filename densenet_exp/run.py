"""Train one configuration, or sweep many with `-m`, tracked in MLflow.

    python -m densenet_exp.run                                    # one run, embedded defaults
    python -m densenet_exp.run experiment=quickstart              # what `make run` runs
    python -m densenet_exp.run -m experiment=smoke growth_rate=12,32

This module is the Hydra entry point: it runs one job (densenet_exp/job.py, which reads top to
bottom: compose, build, open the run, fit and test, close) and turns the job's errors into exit
codes. torch, Lightning and MLflow are imported only once a job starts, so that `--help`
answers at once (tools/startup-time measures it).

Exit codes: 0 done; 1 a failure (a sweep: some job failed); 2 bad input; 3 refused, a run of
this config has a live owner; 74 no room to write a checkpoint (the run is KILLED and the same
command resumes it once there is room); 75 the tracking server stayed unreachable; 130 / 143 / 138
stopped by Ctrl-C / SIGTERM / SIGUSR1 (the run is KILLED and the same command resumes it; a sweep's
job stopped by SIGUSR1, SLURM's time-limit warning, is listed as a failed job instead).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .checks import EXIT_BAD_INPUT, EXIT_BUSY, EXIT_NO_ROOM, EXIT_STORE_DOWN
from .config import CONF_DIR
from .runs.console import COMMAND_ENV, resume_command
from .runs.logs import quiet_mlflow, warnings_to_logs

log = logging.getLogger("densenet_exp")
quiet_mlflow()  # before anything imports MLflow
warnings_to_logs()  # third-party warnings: run.log, not the console

# Third-party notices that say nothing about the run: an advert, a deprecation inside Lightning,
# and a hint about per-step logging, which the harness does not do.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
# The checkpoint folder holds the owner's lock file (ownership.py); stale checkpoints are set aside.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

# Lightning starts DDP ranks > 0 by re-running this process's command line. Under `-m` that would
# start the whole sweep again in every rank (a known Hydra and Lightning pitfall), so each job
# leaves its own arguments in the environment, and a rank > 0 runs only that job, in that job's
# output folder.
JOB_ARGS_ENV = "DENSENET_EXP_JOB_ARGS"


def remember_job_for_ddp_ranks(hc: Any) -> None:
    os.environ[JOB_ARGS_ENV] = json.dumps([*hc.overrides.task, f"hydra.run.dir={hc.runtime.output_dir}"])


def ddp_rank_argv(argv: list[str], env: dict[str, str]) -> list[str]:
    """The command line a DDP rank > 0 runs: its job alone (see JOB_ARGS_ENV)."""
    job_args = env.get(JOB_ARGS_ENV)
    if job_args is None or env.get("LOCAL_RANK", "0") == "0":
        return argv
    return [argv[0], *json.loads(job_args), "hydra.output_subdir=null", f"hydra.job.name=rank{env['LOCAL_RANK']}"]


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the final validation accuracy: the objective of a hyperparameter search."""
    from .runs.store import StoreConfigError, StoreUnreachable, check_uri, tracking_uri
    from .training.trainer_keys import trainer_arguments
    from .validate import ConfigError, checked_config, output_folder_was_new

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        # Bad input ends here, before torch, Lightning and MLflow load.
        checked_config(cfg, hc.overrides.task, trainer_arguments, hc.runtime.choices.get("experiment"))
        check_uri(tracking_uri(cfg.tracking.uri, Path(hc.runtime.cwd)),
                  "tracking.uri" if cfg.tracking.uri else "MLFLOW_TRACKING_URI")
        from .runs import stopping
        from .job import train

        stopping.install()
        remember_job_for_ddp_ranks(hc)
        return train(cfg, hc)["val_acc"]
    except StoreUnreachable as err:
        # The rest of a sweep would wait on the same server: stop here, with one line.
        if multirun:
            _record_failed_job(hc, err)
        print(f"error: {err.advice()}", file=sys.stderr, flush=True)
        sys.exit(EXIT_STORE_DOWN)
    except SystemExit as err:
        if multirun and getattr(err, "signum", None) == signal.SIGUSR1:
            # The warning before a time limit: this job will not come back. It ends as a job of
            # the sweep that did not finish (listed when the sweep ends; the same command resumes
            # it) and returns, so its launcher gets a result: a SLURM sweep waits for one.
            _record_failed_job(hc, err)
            return None
        raise
    except Exception as err:
        if multirun:
            # One failed job must not stop the sweep; SweepParentRun reports it at the end.
            log.error(_record_failed_job(hc, err))
            return None
        bad_input = isinstance(err, ConfigError | StoreConfigError)
        if not bad_input:
            from .job import resume_command
            from .runs.checkpoints import no_room
            from .runs.ownership import Busy  # MLflow: loaded already once a job has started

            full = no_room(err)
            if full is not None:  # the run is KILLED (tracking.close_run) and resumes once there is room
                print(f"error: {full}: the run is KILLED; free space, then resume it with: {resume_command(sys.argv)}",
                      file=sys.stderr, flush=True)
                sys.exit(EXIT_NO_ROOM)
        if bad_input or isinstance(err, Busy):
            # Nothing was created but Hydra's output folder: remove it (if this launch made it).
            if output_folder_was_new(hc.runtime.output_dir):
                shutil.rmtree(hc.runtime.output_dir, ignore_errors=True)
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT if bad_input else EXIT_BUSY)
        raise


# Hydra's flags that print and exit (no job runs).
PRINT_ONLY_FLAGS = {"-h", "--help", "--hydra-help", "-i", "--info", "-c", "--cfg", "--version", "-sc",
                    "--shell-completion"}


def quiet_on_closed_pipe(argv: list[str]) -> None:
    """`run --help | head`: when the reader goes away, end quietly as Unix tools do (SIGPIPE's
    default) instead of printing BrokenPipeError. Only for the flags that print and exit: a run
    that trains must close its MLflow run whatever happens to its terminal."""
    if PRINT_ONLY_FLAGS.intersection(argv[1:]):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def _record_failed_job(hc: Any, err: BaseException) -> str:
    """Note the failed sweep job for the list that ends the sweep; returns its line, numbered as
    the sweep's table numbers it ("job 2/8 [seed=1] failed: reason")."""
    from .runs.console import job_title
    from .runs.sweep_folder import record_failed_job

    return record_failed_job(Path(hc.sweep.dir), hc.job.num, job_title(hc), err)


if __name__ == "__main__":
    from densenet_exp import run  # this file again, as the module it is when imported

    sys.argv = ddp_rank_argv(sys.argv, dict(os.environ))
    quiet_on_closed_pipe(sys.argv)
    os.environ.setdefault(COMMAND_ENV, resume_command(sys.argv))
    # The importable module's `main`, not __main__'s: a launcher that pickles the task function
    # (submitit) then pickles a reference, and its job imports densenet_exp.run with the warning
    # and log filters above, instead of unpickling a bare copy of the function.
    run.main()
