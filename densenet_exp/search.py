"""Hyperparameter search: a Hydra sweeper that asks Optuna for each trial's values.

hydra-optuna-sweeper pins optuna<3, so this sweeper talks to Optuna's ask-and-tell API itself
and keeps that plugin's config shape (`hydra.sweeper.params` in Hydra's sweep syntax):

    python -m densenet_exp.run -m hparams_search=optuna hydra.sweeper.n_trials=20

    choice(8, 12, 24)          -> categorical
    interval(0.25, 1.0)        -> float uniform;   tag(log, interval(1e-3, 0.3)) -> log-uniform
    range(8, 33, step=4)       -> int with step

Each trial is one job of the multirun (an MLflow child run); its objective is what the task
returns: the job's final validation accuracy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from .checks import require, require_int

# Hydra imports every sweeper plugin at start-up, `--help` included: Optuna only when it sweeps.
if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


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
    raise ValueError(f"hydra.sweeper.params.{key}={override.input_line!r}: expected choice(...), interval(...) or range(...)")


class OptunaSweeper(Sweeper):
    """Run `n_trials` jobs one after another, each with the values Optuna suggests."""

    def __init__(
        self, params: dict[str, str] | None = None, n_trials: int = 20, direction: str = "maximize", seed: int = 0
    ) -> None:
        super().__init__()
        require_int("hydra.sweeper.n_trials", n_trials, 1)
        require("hydra.sweeper.direction", direction, direction in ("maximize", "minimize"), "maximize or minimize")
        self.params = dict(params or {})
        self.n_trials, self.direction, self.seed = n_trials, direction, seed

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> dict[str, Any]:
        import optuna

        parser = OverridesParser.create()
        searched = {o.get_key_element(): distribution(o) for o in parser.parse_overrides(
            [f"{k}={v}" for k, v in self.params.items()])}
        fixed = []
        for override in parser.parse_overrides(arguments):
            if override.is_sweep_override():  # a sweep on the command line joins the search space
                searched[override.get_key_element()] = distribution(override)
            else:
                fixed.append(override.input_line)
        study = optuna.create_study(direction=self.direction, sampler=optuna.samplers.TPESampler(seed=self.seed))
        for number in range(self.n_trials):
            trial = study.ask(searched)
            overrides = [*fixed, *(f"{k}={v}" for k, v in trial.params.items())]
            (result,) = self.launcher.launch([overrides], initial_job_idx=number)
            value = result.return_value if result.status.name == "COMPLETED" else None
            if value is None:  # a failed job: the harness recorded it; Optuna skips it
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, float(value))
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = {"best_value": study.best_value, "best_params": study.best_params} if completed else {}
        summary = {"name": "optuna", "n_trials": self.n_trials, "completed": len(completed), **best}
        OmegaConf.save(OmegaConf.create(summary), Path(self.config.hydra.sweep.dir) / "optimization_results.yaml")
        if completed:
            print(f"best value {study.best_value:.4f} with {study.best_params}", flush=True)
        return summary
