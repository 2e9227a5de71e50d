"""Hyperparameter search: a Hydra sweeper that asks Optuna for each trial's values, with the study
kept in a file beside the run store, so an interrupted search resumes where it stopped and
several workers (machines, SLURM jobs) share one study.

    python -m densenet_exp.run -m experiment=smoke hparams_search=optuna hydra.sweeper.n_trials=20
    python -m densenet_exp.search --experiment smoke --top 3    # the 3 best trials again, 3 new seeds

The preset (conf/hparams_search/optuna.yaml) sets only the sweeper and its search space, so it
composes with any experiment; `hydra.sweeper.params` is in Hydra's sweep syntax, and a sweep on
the command line joins the search space (a fixed value on the command line takes its key out):

    choice(8, 12, 24)          -> categorical
    interval(0.25, 1.0)        -> float uniform;   tag(log, interval(1e-3, 0.3)) -> log-uniform
    range(8, 33, step=4)       -> int with step

Each trial is one job of the multirun (an MLflow child run, tagged with its study and trial);
its objective is what the task returns, the job's final validation accuracy. Floats are
launched rounded to FLOAT_DIGITS significant digits (run names read `compression 0.734`).
`n_trials` counts the study's finished trials, whoever ran them: the same command resumes a
search to that count, and a trial whose worker died (kill -9, a lost node) is retried with the
same values, which resumes its MLflow run from its last checkpoint.

hydra-optuna-sweeper pins optuna<3, so this sweeper talks to Optuna's ask-and-tell API itself and
keeps that plugin's config shape.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from . import record
from .checks import EXIT_BAD_INPUT, EXIT_STORE_DOWN, ArgumentParser, entry_point, require, require_flag, require_int
from .runs.store import StoreUnreachable, check_store, sqlite_path, tool_uri, tracking_uri

# Hydra imports every sweeper plugin at start-up, `--help` included: Optuna only when it sweeps.
if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)
FLOAT_DIGITS = 3
STORAGE_FILE = "optuna.db"  # beside a SQLite run store (mlflow.db)
OBJECTIVE = record.VAL_ACC
GROUP_OVERRIDES = ("hparams_search=", "+hparams_search=", "hydra/sweeper=")  # not part of a trial's configuration


def distribution(override: Override) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of one sweep override such as `optim.lr=tag(log, interval(0.01, 0.5))`."""
    import optuna

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        return optuna.distributions.CategoricalDistribution([v for v in value.list])
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return optuna.distributions.IntDistribution(value.start, value.end, log=log_scale)
        return optuna.distributions.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if isinstance(value, RangeSweep):
        return optuna.distributions.IntDistribution(int(value.start), int(value.stop) - 1, step=int(value.step))
    raise ValueError(f"hydra.sweeper.params.{key}={override.input_line!r}: expected choice(...), interval(...) "
                     "or range(...)")


def launched(value: Any, dist: Any) -> Any:
    """The value a trial's job is launched with: floats to FLOAT_DIGITS significant digits, kept
    inside their distribution's bounds; other values as Optuna gave them."""
    if not isinstance(value, float) or value == 0 or not math.isfinite(value):
        return value
    rounded = float(f"{value:.{FLOAT_DIGITS}g}")
    low, high = getattr(dist, "low", -math.inf), getattr(dist, "high", math.inf)
    return min(max(rounded, low), high)


def storage_url(configured: str | None, run_store: str) -> str:
    """Where the study lives: the configured Optuna storage URL, else a SQLite file beside a SQLite
    run store. A tracking server's store has no file beside it: the workers need a storage URL
    they all reach."""
    if configured:
        return configured
    path = sqlite_path(run_store) if run_store.startswith("sqlite:") else None
    require("hydra.sweeper.storage", configured, path is not None,
            f"an Optuna storage URL every worker reaches (e.g. sqlite:////shared/{STORAGE_FILE} or "
            f"postgresql://...): the run store {run_store} has no folder to keep {STORAGE_FILE} in")
    return f"sqlite:///{path.parent.resolve() / STORAGE_FILE}"


def study_name(experiment: str, space: Mapping[str, Any], fixed: Sequence[str]) -> str:
    """`<experiment>-<hash of the search space and the fixed overrides>`: the same command finds
    the same study again."""
    text = json.dumps({"space": {k: repr(v) for k, v in sorted(space.items())}, "fixed": sorted(fixed)})
    return f"{experiment}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


class TrialHeartbeat:
    """While a trial's job runs, its worker stamps the trial every `every_s` seconds (user attr
    `heartbeat`), so that workers on other machines can tell a live trial from a dead one's."""

    def __init__(self, trial: Any, every_s: float) -> None:
        self.trial, self.every_s = trial, every_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.done.wait(self.every_s):
            try:
                self.trial.set_user_attr("heartbeat", time.time())
            except Exception:  # the trial ended meanwhile, or the storage is busy: the next beat tries again
                pass

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def trial_gone(trial: Any, timeout_s: float) -> bool:
    """Whether the worker of a RUNNING trial is gone: on this machine, the lock its sweep held is
    free; elsewhere, its heartbeat is older than `timeout_s` (tracking.owner_timeout_s)."""
    from .runs.ownership import lock_is_held

    attrs = trial.user_attrs
    host = str(attrs.get(record.OWNER, "")).rpartition(":")[0]
    if host == socket.gethostname() and attrs.get(record.OWNER_LOCK):
        return not lock_is_held(Path(attrs[record.OWNER_LOCK]))
    return time.time() - float(attrs.get("heartbeat") or 0) > timeout_s


class OptunaSweeper(Sweeper):
    """Run trials one after another, each with the values Optuna suggests, until the study holds
    `n_trials` finished ones."""

    def __init__(self, params: dict[str, str] | None = None, n_trials: int = 20, direction: str = "maximize",
                 seed: int = 0, storage: str | None = None, study_name: str | None = None) -> None:
        super().__init__()
        require_int("hydra.sweeper.n_trials", n_trials, 1)
        require("hydra.sweeper.direction", direction, direction in ("maximize", "minimize"), "maximize or minimize")
        self.params = dict(params or {})
        self.n_trials, self.direction, self.seed = n_trials, direction, seed
        self.storage, self.study_name = storage, study_name

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def search_space(self, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
        """(searched key -> distribution, fixed overrides): the preset's params, then the command
        line, where a sweep joins the search and a fixed value takes its key out of it."""
        parser = OverridesParser.create()
        searched = {o.get_key_element(): distribution(o) for o in parser.parse_overrides(
            [f"{k}={v}" for k, v in self.params.items()])}
        fixed = []
        for override in parser.parse_overrides(arguments):
            key = override.get_key_element()
            if override.is_sweep_override():
                searched[key] = distribution(override)
            else:
                if searched.pop(key, None) is not None:
                    log.info(f"{key} is fixed on the command line ({override.input_line}): not searched")
                fixed.append(override.input_line)
        return searched, fixed

    def sweep(self, arguments: list[str]) -> dict[str, Any]:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the line below says what it would
        searched, fixed = self.search_space(arguments)
        tracking = OmegaConf.to_container(self.config.tracking, resolve=True)
        run_store = tracking_uri(tracking["uri"], Path(self.config.hydra.runtime.cwd))
        url = storage_url(self.storage, run_store)
        name = self.study_name or study_name(tracking["experiment"], searched, fixed)
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}) \
                if url.startswith("sqlite:") else url
            study = optuna.create_study(storage=storage, study_name=name, direction=self.direction,
                                        load_if_exists=True)
        except Exception as err:  # garbage, another program's database, a server that does not answer
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            print(f"error: hydra.sweeper.storage={url!r} is not a usable Optuna storage ({first}): point "
                  "hydra.sweeper.storage at another one", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_BAD_INPUT) from None  # passes through Hydra's error report (a traceback)
        retried = self._retry_gone(study, tracking["owner_timeout_s"])
        done = self._finished(study)
        # A fixed seed for a new study (reproducible); a resumed or shared one must not repeat the
        # values its first trials drew, so its sampler's seed moves on with the study.
        seed = self.seed + len(study.trials) + (os.getpid() if self._running(study) else 0)
        study.sampler = optuna.samplers.TPESampler(seed=seed)
        space = ", ".join(f"{k} {_describe(d)}" for k, d in searched.items())
        print(f"Optuna study {name!r} in {url}: {done} of {self.n_trials} trials finished"
              + (f", {retried} retried (their worker is gone)" if retried else "")
              + f"; searching {space}; fixed: {' '.join(fixed) or 'nothing'}", flush=True)
        attempts = 0
        while self._finished(study) + self._running(study) < self.n_trials and attempts < self.n_trials:
            attempts += 1
            self._run_trial(study, searched, fixed, name, tracking)
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = {"best_value": study.best_value, "best_params": study.best_params} if completed else {}
        summary = {"name": "optuna", "study": name, "storage": url, "n_trials": self.n_trials,
                   "completed": len(completed), **best}
        OmegaConf.save(OmegaConf.create(summary), Path(self.config.hydra.sweep.dir) / "optimization_results.yaml")
        if completed:
            shown = {k: launched(v, study.best_trial.distributions[k]) for k, v in study.best_params.items()}
            print(f"best value {study.best_value:.4f} with {shown} (trial {study.best_trial.number} of study "
                  f"{name!r}); confirm with: python -m densenet_exp.search --experiment {tracking['experiment']} "
                  f"--top 3", flush=True)
        return summary

    @staticmethod
    def _finished(study: Any) -> int:
        import optuna

        return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))

    @staticmethod
    def _running(study: Any) -> int:
        import optuna

        return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))

    def _retry_gone(self, study: Any, timeout_s: float) -> int:
        """Fail the RUNNING trials whose worker is gone and queue their values again (the retried
        job resumes the same MLflow run). Returns how many."""
        import optuna

        gone = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)) if trial_gone(t, timeout_s)]
        for trial in gone:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        return len(gone)

    def _run_trial(self, study: Any, searched: dict[str, Any], fixed: list[str], name: str,
                   tracking: dict[str, Any]) -> None:
        import optuna

        from .runs.sweep_folder import JOBS_DIR
        from .runs.ownership import LOCK_FILE, this_owner

        trial = study.ask(searched)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        for key, value in ((record.OWNER, this_owner()), (record.OWNER_LOCK, str((sweep_dir / LOCK_FILE).resolve())),
                           ("heartbeat", time.time())):
            trial.set_user_attr(key, value)
        values = {k: launched(v, trial.distributions[k]) for k, v in trial.params.items()}
        overrides = [*fixed, *(f"{k}={v}" for k, v in values.items())]
        job = self._finished(study)  # its place in the n_trials: "job 3/4"
        beat = TrialHeartbeat(trial, float(tracking["heartbeat_s"]))
        try:
            (result,) = self.launcher.launch([overrides], initial_job_idx=job)
        finally:
            beat.stop()
        value = result.return_value if result.status.name == "COMPLETED" else None
        entry = sweep_dir / JOBS_DIR / f"{job}.json"
        if entry.is_file():
            run_id = json.loads(entry.read_text())["run_id"]
            trial.set_user_attr("mlflow_run_id", run_id)
            self._tag_run(run_id, name, trial, values, overrides, tracking)
        if value is None:  # a failed job: the harness recorded it; Optuna skips it
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, float(value))

    def _tag_run(self, run_id: str, name: str, trial: Any, values: dict[str, Any], overrides: list[str],
                 tracking: dict[str, Any]) -> None:
        """Mark the trial's MLflow run as a trial of the study: the report shows it as a search, and
        `--top` launches its values again."""
        from mlflow.tracking import MlflowClient
        from optuna.distributions import distribution_to_json

        from .runs.store import retry_locked

        space = {"direction": self.direction, "objective": OBJECTIVE,
                 "params": {k: distribution_to_json(d) for k, d in trial.distributions.items()}}
        tags = {record.SEARCH_STUDY: name, record.SEARCH_TRIAL: str(trial.number),
                record.SEARCH_SPACE: json.dumps(space), record.SEARCH_PARAMS: json.dumps(values),
                record.SEARCH_OVERRIDES: json.dumps(overrides)}
        client = MlflowClient(tracking_uri(tracking["uri"], Path(self.config.hydra.runtime.cwd)))
        for key, value in tags.items():
            retry_locked(lambda: client.set_tag(run_id, key, value))


def _describe(dist: Any) -> str:
    kind = type(dist).__name__.removesuffix("Distribution").lower()
    if kind == "categorical":
        return f"choice{tuple(dist.choices)}"
    return f"{'log ' if getattr(dist, 'log', False) else ''}{kind} [{dist.low:g}, {dist.high:g}]"


# --- the best trials again, with confirmation seeds --------------------------------------------------


def best_trials(runs: Any, top: int, study: str | None = None) -> Any:
    """The `top` FINISHED trial runs of `runs` (results.load_runs) by their study's objective and
    direction, best first; of the newest study unless `study` names one."""
    trials = runs[runs["status"].eq("FINISHED") & runs["search_study"].notna()]
    if study is None and len(trials):
        study = trials.sort_values("start_time")["search_study"].iloc[-1]
    trials = trials[trials["search_study"] == study]
    if trials.empty:
        return trials
    space = json.loads(trials[f"tags.{record.SEARCH_SPACE}"].iloc[0])
    values = trials[space["objective"]] if space["objective"] in trials else trials[OBJECTIVE]
    ranked = trials.assign(objective=values).dropna(subset=["objective"])
    return ranked.sort_values("objective", ascending=space["direction"] == "minimize").head(top)


def confirmation_command(trial: Any, seeds: Sequence[int]) -> list[str]:
    """The multirun that trains a trial's configuration again with `seeds` (not the search's own
    seed: its result chose the trial), as an ordinary sweep in the same experiment."""
    overrides = [o for o in json.loads(trial[f"tags.{record.SEARCH_OVERRIDES}"])
                 if not o.startswith(GROUP_OVERRIDES) and o.split("=", 1)[0].lstrip("+") != "seed"]
    return [sys.executable, "-m", "densenet_exp.run", "-m", *overrides, f"seed={','.join(map(str, seeds))}"]


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m densenet_exp.search",
        description="Train the best trials of an Optuna search again with confirmation seeds.")
    parser.add_argument("--experiment", required=True, help="the MLflow experiment the search logged to")
    parser.add_argument("--top", type=int, default=3, help="how many of the best trials (default 3)")
    parser.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default: the three after the trial's own)")
    parser.add_argument("--study", help="the study's name (default: the newest in the experiment)")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = parser.parse_args(argv)
    import pandas as pd

    from .analysis.results import load_runs

    uri, key = tool_uri(args.tracking_uri)
    seeds = args.seeds
    try:
        require_int("--top", args.top, 1)
        check_store(uri, key)  # reads only: never creates a store; one line for one that cannot work
        runs = load_runs(args.experiment, uri)
    except StoreUnreachable as err:
        print(f"error: {err}: start it, or point {key} at another store", file=sys.stderr)
        return EXIT_STORE_DOWN
    best = best_trials(runs, args.top, args.study)
    if best.empty:
        print(f"error: no finished trial of {'study ' + repr(args.study) if args.study else 'a search'} in "
              f"experiment {args.experiment!r} ({uri})", file=sys.stderr)
        return EXIT_BAD_INPUT
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    for _, trial in best.iterrows():
        own = 0 if pd.isna(trial["seed"]) else int(trial["seed"])
        command = confirmation_command(trial, seeds or [own + 1, own + 2, own + 3])
        print(f"trial {trial[f'tags.{record.SEARCH_TRIAL}']} ({trial['objective']:.4f}): {shlex.join(command[1:])}",
              flush=True)
        if not args.dry_run and subprocess.run(command, env=env).returncode != 0:
            return 1
    return 0


def _seeds(text: str) -> list[int]:
    """--seeds: comma-separated integers >= 0 (argparse prints the message naming the flag)."""
    parts = text.split(",")
    require_flag("--seeds", text, all(part.strip().isdigit() for part in parts), "comma-separated integers >= 0")
    return [int(part) for part in parts]


if __name__ == "__main__":
    sys.exit(main())
