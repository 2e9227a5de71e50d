"""Gradient flow: the relative gradient ||grad|| / ||weight|| of every conv and linear layer, by depth.

Tests the vanishing-gradient claim (Huang et al. 2017, Section 1; He et al. 2016): in a deep net
without shortcuts the first layers' gradients are orders of magnitude below the last layers';
shortcuts (ResNet) and dense connections (DenseNet) keep them close. Raw gradient norms scale with a
layer's size and weight decay shrinks weights during training, so each gradient is divided by its
own weight's norm: the relative change one SGD step makes to that layer.

Every layer carries its role in its architecture (record.LAYER_ROLES), read from the module
structure: the summaries compare like with like, the body's 3x3 convolutions only
(densenet_exp.measures.gradients.GRADIENT_LAYER_RULE), so a stem, a 1x1 bottleneck or a classifier whose
relative gradient differs by construction does not decide an early/late ratio.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn
from torchvision.models import resnet as torchvision_resnet

from .. import record
from ..models import DenseLayer, Transition
from ..models.resnet import BasicBlock
from ..measures.gradients import assign_roles, body_gradient_summary
from ..measures.run_figures import plot_gradient_flow_run
from .output import log_results

ARTIFACT_PATH, TABLE = record.RELATIVE_GRADS.split("/")
# The two moments of a run: the first optimizer step (at initialization) and the first step after
# one epoch of training.
PHASES = record.GRADIENT_PHASES
# The blocks whose main-path convs make up a body (by kernel size); a `downsample` of theirs is a shortcut.
BLOCKS = (DenseLayer, BasicBlock, torchvision_resnet.BasicBlock, torchvision_resnet.Bottleneck)
BLOCK_KERNEL_ROLES = {(3, 3): record.BODY_ROLE, (1, 1): "bottleneck"}


class UnknownLayerRole(ValueError):
    pass


def layer_roles(model: nn.Module) -> dict[nn.Module, str]:
    """The role (record.LAYER_ROLES) of every conv and linear layer of `model`, from its structure:

    - a conv on the main path of a block (DenseNet's DenseLayer, a CIFAR ResNet or plain net's
      BasicBlock, torchvision's BasicBlock or Bottleneck) by its kernel: 3x3 body, 1x1 bottleneck;
    - a conv in a block's `downsample` (torchvision's projection shortcut): shortcut;
    - the conv of a DenseNet Transition: transition;
    - the first conv outside every block and transition: stem;
    - a Linear: classifier.

    Raises UnknownLayerRole naming any other layer (a second conv outside the blocks, a 5x5 conv in
    a block): a new architecture must say what its layers are before its gradients are compared."""
    roles: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, Transition):
            roles[module.conv] = "transition"
        elif isinstance(module, BLOCKS):
            shortcut = getattr(module, "downsample", None)
            shortcut_convs = {m for m in shortcut.modules()} if isinstance(shortcut, nn.Module) else set()
            for part_name, part in module.named_modules():
                if not isinstance(part, nn.Conv2d):
                    continue
                role = "shortcut" if part in shortcut_convs else BLOCK_KERNEL_ROLES.get(tuple(part.kernel_size))
                if role is None:
                    raise UnknownLayerRole(f"{name}.{part_name}: a {tuple(part.kernel_size)} conv in a "
                                           f"{type(module).__name__} has no role (3x3 body, 1x1 bottleneck)")
                roles[part] = role
    stem = None
    for name, module in model.named_modules():
        if module in roles:
            continue
        if isinstance(module, nn.Linear):
            roles[module] = "classifier"
        elif isinstance(module, nn.Conv2d) and stem is None:
            roles[module] = stem = "stem"
        elif isinstance(module, nn.Conv2d):
            raise UnknownLayerRole(f"{name}: a conv outside every block, transition and shortcut after the "
                                   "stem has no role")
    return roles


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every conv and linear layer with its role (layer_roles) in registration order, which is the
    forward order for the models here (a parallel shortcut conv comes after its block's convs)."""
    roles = layer_roles(model)
    return [(n, m, roles[m]) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def relative_gradients(layers: list[tuple[str, nn.Module, str]], phase: str, step: int) -> pd.DataFrame:
    """One row per layer (record.RELATIVE_GRADS_COLUMNS) from the gradients the layers hold now;
    depth 0 is the first conv, relative depth 1 the classifier."""
    with torch.no_grad():
        norms = torch.stack([
            torch.stack([
                torch.linalg.vector_norm(m.weight.grad).float() if m.weight.grad is not None
                else torch.tensor(float("nan"), device=m.weight.device),
                torch.linalg.vector_norm(m.weight).float(),
            ])
            for _, m, _ in layers
        ]).tolist()  # a single device-to-host copy
    last = max(len(layers) - 1, 1)
    return pd.DataFrame(
        [
            (phase, step, depth, depth / last, name, type(module).__name__, role, g, w, g / w if w else float("nan"))
            for depth, ((name, module, role), (g, w)) in enumerate(zip(layers, norms))
        ],
        columns=list(record.RELATIVE_GRADS_COLUMNS),
    )


def summarize(table: pd.DataFrame) -> dict[str, float]:
    """Per phase, on the body layers only (densenet_exp.measures.gradients.body_gradient_summary):
    `grad/early_rel_<phase>`, the mean relative gradient of the body convs at position <= 0.25
    among them, and `grad/early_over_late_<phase>`, that mean over the mean at position >= 0.75."""
    return body_gradient_summary(table)


class GradientFlowProbe(pl.Callback):
    """Records the relative gradient of every ``nn.Conv2d`` and ``nn.Linear`` weight, with the
    layer's role (layer_roles), at the first optimizer step (phase ``init``) and at the first
    optimizer step of the second epoch (phase ``epoch1``; absent in a one-epoch run). Taken in ``on_before_optimizer_step``: after gradient
    accumulation and AMP unscaling, before clipping and before the step changes the weights. Other
    steps cost one comparison.

    At the end of training logs ``gradient_flow/relative_grads.csv`` (record.RELATIVE_GRADS_COLUMNS),
    a plot ``gradient_flow/relative_grads.png`` and the scalars of ``summarize``.
    """

    def __init__(self) -> None:
        self.layers: list[tuple[str, nn.Module, str]] = []
        self.records: list[pd.DataFrame] = []  # restored from a checkpoint on resume

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layers = weighted_layers(getattr(pl_module, "model", pl_module))

    def _phase(self, trainer: pl.Trainer) -> str | None:
        if trainer.global_step == 0:
            return PHASES[0]
        return PHASES[1] if trainer.current_epoch == 1 else None  # recorded at its first step only

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        phase = self._phase(trainer)
        if phase is None or not trainer.is_global_zero or any((t["phase"] == phase).any() for t in self.records):
            return  # a resumed run may pass the same step again
        self.records.append(relative_gradients(self.layers, phase, trainer.global_step))

    # Kept in checkpoints, so a resumed run still logs the phases recorded before the kill.
    def state_dict(self) -> dict:
        return {"records": [t.to_dict("list") for t in self.records]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = [pd.DataFrame(t, columns=list(record.RELATIVE_GRADS_COLUMNS))
                        for t in state_dict.get("records", [])]

    def table(self) -> pd.DataFrame:
        """Every phase recorded; rows restored from a checkpoint written before roles were recorded
        get theirs from the layer names (densenet_exp.measures.gradients.assign_roles)."""
        columns = list(record.RELATIVE_GRADS_COLUMNS)
        table = pd.concat(self.records, ignore_index=True) if self.records else pd.DataFrame(columns=columns)
        return assign_roles(table)[columns]

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
