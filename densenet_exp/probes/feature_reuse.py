"""Feature reuse in a trained DenseNet: the paper's Figure 5 (Huang et al. 2017, Section 5).

For each dense block of L layers, pixel (s, l) is the average L1 norm, per input feature map, of
the weights with which layer l's first conv (the 1x1 bottleneck conv with bottleneck, else the
3x3 conv) reads source s: the L1 norm of that input slice of the weight divided by the number of
maps in the slice. Source s = 0 is the block input (its width is the block's input width), s = 1..L
are the outputs of layers 1..L (k maps each). Targets are layers 1..L and, as the last column, the
transition conv after the block or, after the last block, the classifier (its input is the final
BN-ReLU and global pooling of the block output, so its weight columns map 1:1 to the block's maps).

The probe records the matrices twice: at step 0, before any update (with He initialization every
source of a layer gets the same expected weight per map, so this is the control every reuse
observation is judged against), and after training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import MLFlowLogger
from torch import Tensor

from .. import record
from ..models.densenet import DenseBlock, DenseNet
from ..measures.figure5 import figure5_ratios
from ..measures.run_figures import plot_feature_reuse as feature_reuse_figure

from .output import log_results

ARTIFACT_PATH, MATRICES_FILE = record.FEATURE_REUSE_MATRICES.split("/")
INIT_MATRICES_FILE = record.FEATURE_REUSE_MATRICES_INIT.split("/")[1]


def _l1_per_input_map(weight: Tensor) -> np.ndarray:
    """L1 norm of the weights reading each input map: sum |w| over outputs (and kernel taps)."""
    return weight.detach().abs().transpose(0, 1).flatten(1).sum(1).double().cpu().numpy()


def feature_reuse(model: DenseNet) -> list[np.ndarray]:
    """One (L+1) x (L+1) matrix per dense block: rows are sources s = 0..L, columns are targets
    layers 1..L then the transition or classifier. NaN where source s cannot feed target l (s >= l)."""
    blocks = [m for m in model.features.children() if isinstance(m, DenseBlock)]
    matrices = []
    for b, block in enumerate(blocks, 1):
        layers = list(block.values())
        num_layers, k = len(layers), model.growth_rate
        block_width = layers[0].conv1.in_channels
        head = getattr(model.features, f"transition{b}").conv.weight if b < len(blocks) else model.classifier.weight
        # Channel bounds of the sources in the concatenation: [0, c0), [c0, c0 + k), ...
        bounds = [0, *(block_width + s * k for s in range(num_layers + 1))]
        matrix = np.full((num_layers + 1, num_layers + 1), np.nan)
        for target, weight in enumerate([layer.conv1.weight for layer in layers] + [head]):
            per_map = _l1_per_input_map(weight)
            num_sources = target + 1  # layer l = target + 1 reads sources 0..l-1; the head reads all
            if len(per_map) != bounds[num_sources]:
                raise ValueError(
                    f"block {b}, target {target + 1}: weight reads {len(per_map)} maps, "
                    f"expected {bounds[num_sources]} (block input {block_width} + k={k} per layer)"
                )
            for s in range(num_sources):
                matrix[s, target] = per_map[bounds[s] : bounds[s + 1]].mean()
        matrices.append(matrix)
    return matrices


def feature_reuse_summary(matrices: Sequence[np.ndarray]) -> dict[str, float]:
    """Scalars of the paper's Figure 5 observations (a)-(d), each the ratio to what uniform
    weighting gives (densenet_exp.analysis.verdicts.FIGURE5_RULE, which the report judges from the
    matrices themselves): ``reuse/early_over_uniform``, ``reuse/transition_early_over_uniform``,
    ``reuse/transition_output_over_uniform``, ``reuse/classifier_late_over_uniform``.

    Also descriptive shares of a target column's sum over sources (of per-map averages, so a wide
    block input is not favoured by its width), means over blocks; no verdict reads them:

    - ``reuse_early_share``: share the last layer of each block puts on the block input (in
      blocks 2.. that is the transition output, which the paper finds little used).
    - ``reuse_transition_on_block_input``: share each transition puts on its block's input.
    - ``reuse_on_transition_output``: share layers 2..L of blocks 2.. put on the block input.
    - ``reuse_classifier_late_share``: share the classifier puts on the later half of the last
      block's sources (the last floor((L+1)/2) of them).

    Transition scalars are left out for a single-block net.
    """
    shares = [m / np.nansum(m, axis=0) for m in matrices]
    last = shares[-1]
    late = last.shape[0] - last.shape[0] // 2
    summary = {
        "reuse_early_share": float(np.mean([sh[0, -2] for sh in shares])),
        "reuse_classifier_late_share": float(last[late:, -1].sum()),
    }
    if len(shares) > 1:
        summary["reuse_transition_on_block_input"] = float(np.mean([sh[0, -1] for sh in shares[:-1]]))
        on_transition = [sh[0, 1:-1] for sh in shares[1:] if sh.shape[1] > 2]
        if on_transition:
            summary["reuse_on_transition_output"] = float(np.mean([s.mean() for s in on_transition]))
    return {**summary, **figure5_ratios(matrices)}


def plot_feature_reuse(matrices: Sequence[np.ndarray], path: str | Path, title: str = "",
                       init: Sequence[np.ndarray] | None = None) -> None:
    """Save densenet_exp.measures.run_figures.plot_feature_reuse (the paper's Figure 5 layout, the init matrices
    below the trained ones, each column over its mean: 1 = uniform weighting) to `path`."""
    feature_reuse_figure(matrices, title, init=init, normalization="column mean").savefig(path, dpi=120)


def matrices_to_json(matrices: Sequence[np.ndarray]) -> str:
    """One matrix per block as lists of rows, NaN as null (what results.feature_reuse_matrices reads)."""
    return json.dumps([[[None if math.isnan(v) else v for v in row] for row in m.tolist()] for m in matrices])


class FeatureReuseProbe(pl.Callback):
    """If the module's ``.model`` is a DenseNet: records the matrices of :func:`feature_reuse` when
    training starts at step 0, before the first optimizer step changes a weight (kept in the
    callback's state, so a run resumed from a checkpoint still logs them), and at the end of
    training logs ``feature_reuse/matrices.json`` (trained), ``feature_reuse/matrices_init.json``
    (step 0; absent for a run resumed from a checkpoint that predates them), both as lists of rows
    with NaN as null, ``feature_reuse/heatmap.png`` (init beside trained) and the scalars of
    :func:`feature_reuse_summary` of the trained matrices. Logs nothing for other models."""

    def __init__(self) -> None:
        self.init: list[np.ndarray] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_start, not on_fit_start: on resume, Lightning restores the weights before
        # on_fit_start but the step count after it, so only here does step 0 mean "no update yet".
        model = getattr(pl_module, "model", None)
        if isinstance(model, DenseNet) and self.init is None and trainer.global_step == 0:
            self.init = feature_reuse(model)

    def state_dict(self) -> dict:
        return {"init": None if self.init is None else [m.tolist() for m in self.init]}

    def load_state_dict(self, state_dict: dict) -> None:
        init = state_dict.get("init")
        self.init = None if init is None else [np.array(m, dtype=float) for m in init]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, DenseNet) or not trainer.is_global_zero:
            return
        matrices, init = feature_reuse(model), self.init

        def write(folder: Path, logger: MLFlowLogger) -> list[Path]:
            paths = [folder / "heatmap.png", folder / MATRICES_FILE]
            plot_feature_reuse(matrices, paths[0], title=f"Feature reuse of run {logger.run_id}", init=init)
            paths[1].write_text(matrices_to_json(matrices))
            if init is not None:
                paths.append(folder / INIT_MATRICES_FILE)
                paths[2].write_text(matrices_to_json(init))
            return paths

        log_results(trainer, feature_reuse_summary(matrices), ARTIFACT_PATH, write)
