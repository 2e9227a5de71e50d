"""Probes: Lightning callbacks that measure what the DenseNet paper claims (size and cost,
gradient flow, feature reuse, convergence speed) and log it to the run's loggers.

`build_probes` turns the ``probes`` config group (``conf/probes/*.yaml``) into callbacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from ..checks import require

from .convergence import ConvergenceProbe
from .feature_reuse import FeatureReuseProbe, feature_reuse, feature_reuse_summary, plot_feature_reuse
from .gradient_flow import GradientFlowProbe
from .size_cost import SizeCostProbe, count_flops, count_parameters

PROBES: dict[str, type[pl.Callback]] = {
    "size_cost": SizeCostProbe,
    "gradient_flow": GradientFlowProbe,
    "feature_reuse": FeatureReuseProbe,
    "convergence": ConvergenceProbe,
}
# Config key -> (probe, constructor argument).
OPTIONS: dict[str, tuple[str, str]] = {
    "size_cost_warmup_steps": ("size_cost", "warmup_steps"),
    "size_cost_infer_repeats": ("size_cost", "infer_repeats"),
    "convergence_fractions": ("convergence", "fractions"),
    "convergence_monitor": ("convergence", "monitor"),
}


def build_probes(cfg: Mapping[str, Any] | None) -> list[pl.Callback]:
    """The callbacks of the probes switched on in ``cfg``, e.g. ``{"size_cost": True,
    "gradient_flow": True, "size_cost_warmup_steps": 3}``. A probe that is false or missing
    is not built and its options are not read. Unknown keys raise ``ValueError``."""
    cfg = cfg or {}
    allowed = [*PROBES, *OPTIONS]
    for key in cfg:
        if key not in allowed:
            raise ValueError(f"probes.{key}={cfg[key]!r} is not a probe option: expected one of {', '.join(allowed)}")
    for name in (name for name in PROBES if cfg.get(name) is not None):
        require(f"probes.{name}", cfg[name], isinstance(cfg[name], bool), "true or false")
    kwargs: dict[str, dict[str, Any]] = {name: {} for name in PROBES if cfg.get(name)}
    for key, (name, argument) in OPTIONS.items():
        if name in kwargs and cfg.get(key) is not None:  # the options of a probe that is off are not read
            kwargs[name][argument] = cfg[key]
    return [probe(**kwargs[name]) for name, probe in PROBES.items() if name in kwargs]


__all__ = [
    "OPTIONS",
    "PROBES",
    "ConvergenceProbe",
    "FeatureReuseProbe",
    "GradientFlowProbe",
    "SizeCostProbe",
    "build_probes",
    "count_flops",
    "count_parameters",
    "feature_reuse",
    "feature_reuse_summary",
    "plot_feature_reuse",
]
