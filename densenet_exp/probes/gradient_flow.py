"""Gradient flow: the gradient norm of every conv and linear weight, by depth.

Tests the vanishing-gradient claim: in a plain deep net the first layers' gradients are orders of
magnitude below the last layers'; shortcuts (ResNet) and dense connections (DenseNet) keep them
close.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.loggers import MLFlowLogger
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import nn

ARTIFACT_PATH = "gradient_flow"


class GradientFlowProbe(pl.Callback):
    """Records the L2 norm of the weight gradient of every ``nn.Conv2d`` and ``nn.Linear`` at
    optimizer step 0 and every ``every_n_steps`` steps after.

    Depth is the layer's index in module-registration order (0 = first layer), which is the order
    of the forward pass for the models here (a parallel shortcut conv comes after its block's
    convs). Norms are taken in ``on_before_optimizer_step``: after gradient accumulation and AMP
    unscaling, before clipping. Other steps cost one integer test.

    At the end of training logs ``gradient_flow/grad_norms.csv`` (step, depth, layer, kind,
    grad_norm), ``gradient_flow/grad_flow.png`` and the scalars ``grad_norm_first``,
    ``grad_norm_last``, ``grad_first_last_ratio`` (first layer's norm over the last layer's, mean
    over recorded steps) and ``grad_norm_min_over_max`` (smallest over largest norm across
    layers, mean over recorded steps).
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if not (isinstance(every_n_steps, int) and not isinstance(every_n_steps, bool) and every_n_steps >= 1):
            raise ValueError(f"every_n_steps={every_n_steps!r} is invalid: expected an integer >= 1")
        self.every_n_steps = every_n_steps
        self.layers: list[tuple[str, nn.Module]] = []
        self.steps: list[int] = []
        self.norms: list[list[float]] = []  # one row per recorded step, one column per layer

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", pl_module)
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.steps, self.norms = [], []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.is_global_zero or (self.steps and self.steps[-1] == step):
            return
        nan = torch.tensor(float("nan"), device=pl_module.device)
        norms = [
            torch.linalg.vector_norm(m.weight.grad.detach()).float() if m.weight.grad is not None else nan
            for _, m in self.layers
        ]
        self.steps.append(step)
        self.norms.append(torch.stack(norms).tolist())  # a single device-to-host copy

    def table(self) -> pd.DataFrame:
        """The records: one row per recorded step and layer."""
        names = [n for n, _ in self.layers]
        kinds = [type(m).__name__ for _, m in self.layers]
        return pd.DataFrame(
            [
                {"step": step, "depth": depth, "layer": names[depth], "kind": kinds[depth], "grad_norm": norm}
                for step, row in zip(self.steps, self.norms)
                for depth, norm in enumerate(row)
            ],
            columns=["step", "depth", "layer", "kind", "grad_norm"],
        )

    def summary(self) -> dict[str, float]:
        norms = np.array(self.norms)  # (steps, layers)
        with np.errstate(divide="ignore", invalid="ignore"):
            return {
                "grad_norm_first": float(norms[:, 0].mean()),
                "grad_norm_last": float(norms[:, -1].mean()),
                "grad_first_last_ratio": float((norms[:, 0] / norms[:, -1]).mean()),
                "grad_norm_min_over_max": float((np.nanmin(norms, 1) / np.nanmax(norms, 1)).mean()),
            }

    def plot(self, path: str | Path) -> None:
        """Norm against depth on a log scale, one line per recorded step, coloured by step."""
        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        colour = ScalarMappable(Normalize(min(self.steps), max(max(self.steps), 1)), colormaps["viridis"])
        for step, row in zip(self.steps, self.norms):
            ax.plot(range(len(row)), row, marker=".", linewidth=1, color=colour.to_rgba(step))
        ax.set_yscale("log")
        ax.set_xlabel("depth (conv/linear layer index, 0 = first)")
        ax.set_ylabel("weight gradient L2 norm")
        ax.set_title("Gradient flow")
        ax.grid(True, which="both", alpha=0.3)
        fig.colorbar(colour, ax=ax, label="optimizer step")
        fig.savefig(path, dpi=120, bbox_inches="tight")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.steps or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(self.summary(), step=trainer.global_step)
        mlflow_loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        if not mlflow_loggers:
            return
        with tempfile.TemporaryDirectory() as tmp:
            paths = [Path(tmp, "grad_norms.csv"), Path(tmp, "grad_flow.png")]
            self.table().to_csv(paths[0], index=False)
            self.plot(paths[1])
            for logger in mlflow_loggers:
                for path in paths:
                    logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=ARTIFACT_PATH)
