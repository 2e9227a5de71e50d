"""The Hydra callbacks of conf/hydra/default.yaml that need MLflow. Hydra creates every callback
each time it starts, a single run and a rejected override included, so this module stays light
and imports MLflow and Lightning only once a sweep starts: bad input is rejected in about a
second (tools/startup-time measures it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

if TYPE_CHECKING:
    from .sweep import SweepParentRun


class SweepParent(Callback):
    """sweep.SweepParentRun (one MLflow parent run per sweep), created when a sweep starts."""

    def __init__(self) -> None:
        self.sweep: SweepParentRun | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from .sweep import SweepParentRun

        self.sweep = SweepParentRun()
        self.sweep.on_multirun_start(config, **kwargs)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep is not None:
            self.sweep.on_multirun_end(config, **kwargs)
