"""Gradient flow: the relative gradient ||grad|| / ||weight|| of every conv and linear layer, by depth.

Tests the vanishing-gradient claim (Huang et al. 2017, Section 1; He et al. 2016): in a deep net
without shortcuts the first layers' gradients are orders of magnitude below the last layers';
shortcuts (ResNet) and dense connections (DenseNet) keep them close. Raw gradient norms scale with a
layer's size and weight decay shrinks weights during training, so each gradient is divided by its
own weight's norm: the relative change one SGD step makes to that layer.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn

from .. import record
from ..figures import plot_gradient_flow_run
from .output import log_results

ARTIFACT_PATH, TABLE = record.RELATIVE_GRADS.split("/")
COLUMNS = list(record.RELATIVE_GRADS_COLUMNS)
# The two moments of a run: the first optimizer step (at initialization) and the first step after
# one epoch of training.
PHASES = record.GRADIENT_PHASES
EARLY, LATE = 0.25, 0.75  # positions among the body convolutions that bound the "early" and "late" ones


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every conv and linear layer in registration order, which is the forward order for the models
    here (a parallel shortcut conv comes after its block's convs)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def layer_roles(model: nn.Module) -> dict[str, str]:
    """record.LAYER_ROLES of each weighted layer, from the model's structure: the classifier (a
    Linear), the stem (the first conv), DenseNet transitions, shortcut (downsample) convs, 1x1
    bottleneck convs, and the body's 3x3 convolutions, the like-for-like set of every gradient
    measure."""
    from ..models import Transition

    inside = {n for name, m in model.named_modules() if isinstance(m, Transition) or name.endswith("downsample")
              for n, _ in m.named_modules(prefix=name)}
    roles = {}
    for i, (name, module) in enumerate(weighted_layers(model)):
        if isinstance(module, nn.Linear):
            roles[name] = "classifier"
        elif i == 0:
            roles[name] = "stem"
        elif name in inside:
            roles[name] = "shortcut" if ".downsample" in f".{name}" else "transition"
        elif module.kernel_size == (1, 1):
            roles[name] = "bottleneck"
        elif module.kernel_size == (3, 3):
            roles[name] = record.BODY_ROLE
        else:
            roles[name] = "stem"
    return roles


def relative_gradients(layers: list[tuple[str, nn.Module]], phase: str, step: int,
                       roles: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per layer (COLUMNS) from the gradients the layers hold now; depth 0 is the first
    conv, relative depth 1 the classifier."""
    with torch.no_grad():
        norms = torch.stack([
            torch.stack([
                torch.linalg.vector_norm(m.weight.grad).float() if m.weight.grad is not None
                else torch.tensor(float("nan"), device=m.weight.device),
                torch.linalg.vector_norm(m.weight).float(),
            ])
            for _, m in layers
        ]).tolist()  # a single device-to-host copy
    last = max(len(layers) - 1, 1)
    return pd.DataFrame(
        [
            {"phase": phase, "step": step, "depth": depth, "relative_depth": depth / last, "layer": name,
             "kind": type(module).__name__, "role": (roles or {}).get(name), "grad_norm": g, "weight_norm": w, "relative_grad": g / w if w else float("nan")}
            for depth, ((name, module), (g, w)) in enumerate(zip(layers, norms))
        ],
        columns=COLUMNS,
    )


def summarize(table: pd.DataFrame) -> dict[str, float]:
    """Per phase, on the body's 3x3 convolutions only (layer_roles): `grad/early_rel_<phase>`, the
    mean relative gradient of the first quarter of them, and `grad/early_over_late_<phase>`, that
    mean over the mean of the last quarter."""
    metrics = {}
    for phase, rows in table[table["role"] == record.BODY_ROLE].groupby("phase"):
        values = rows.sort_values("depth")["relative_grad"].to_numpy(float)
        position = np.arange(len(values)) / max(len(values) - 1, 1)
        early, late = values[position <= EARLY].mean(), values[position >= LATE].mean()
        metrics[record.early_relative_gradient(phase)] = float(early)
        metrics[record.early_over_late_gradient(phase)] = float(early / late) if late else float("nan")
    return metrics


class GradientFlowProbe(pl.Callback):
    """Records the relative gradient of every ``nn.Conv2d`` and ``nn.Linear`` weight at the first
    optimizer step (phase ``init``) and at the first optimizer step of the second epoch (phase
    ``epoch1``; absent in a one-epoch run). Taken in ``on_before_optimizer_step``: after gradient
    accumulation and AMP unscaling, before clipping and before the step changes the weights. Other
    steps cost one comparison.

    At the end of training logs ``gradient_flow/relative_grads.csv`` (COLUMNS), a plot
    ``gradient_flow/relative_grads.png`` and the scalars of ``summarize``.
    """

    def __init__(self) -> None:
        self.layers: list[tuple[str, nn.Module]] = []
        self.roles: dict[str, str] = {}
        self.records: list[pd.DataFrame] = []  # restored from a checkpoint on resume

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", pl_module)
        self.layers, self.roles = weighted_layers(model), layer_roles(model)

    def _phase(self, trainer: pl.Trainer) -> str | None:
        if trainer.global_step == 0:
            return "init"
        return "epoch1" if trainer.current_epoch == 1 else None  # recorded at its first step only

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        phase = self._phase(trainer)
        if phase is None or not trainer.is_global_zero or any((t["phase"] == phase).any() for t in self.records):
            return  # a resumed run may pass the same step again
        self.records.append(relative_gradients(self.layers, phase, trainer.global_step, self.roles))

    # Kept in checkpoints, so a resumed run still logs the phases recorded before the kill.
    def state_dict(self) -> dict:
        return {"records": [t.to_dict("list") for t in self.records]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = [pd.DataFrame(t, columns=COLUMNS) for t in state_dict.get("records", [])]

    def table(self) -> pd.DataFrame:
        return pd.concat(self.records, ignore_index=True) if self.records else pd.DataFrame(columns=COLUMNS)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.records or not trainer.is_global_zero:
            return
        table = self.table()

        def write(folder: Path, logger: MLFlowLogger) -> list[Path]:
            paths = [folder / TABLE, folder / "relative_grads.png"]
            table.to_csv(paths[0], index=False)
            name = logger.experiment.get_run(logger.run_id).info.run_name
            plot_gradient_flow_run(table, f"Gradient flow: {name}").savefig(paths[1], dpi=120)
            return paths

        log_results(trainer, summarize(table), ARTIFACT_PATH, write)
