"""Feature reuse in a trained DenseNet: the paper's Figure 5 (Huang et al. 2017, Section 5).

For each dense block of L layers, pixel (s, l) is the average L1 norm, per input feature map, of
the weights with which layer l's first conv (the 1x1 bottleneck conv with bottleneck, else the
3x3 conv) reads source s: the L1 norm of that input slice of the weight divided by the number of
maps in the slice. Source s = 0 is the block input (its width is the block's input width), s = 1..L
are the outputs of layers 1..L (k maps each). Targets are layers 1..L and, as the last column, the
transition conv after the block or, after the last block, the classifier (its input is the final
BN-ReLU and global pooling of the block output, so its weight columns map 1:1 to the block's maps).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import MLFlowLogger
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from densenet_exp.models.densenet import DenseBlock, DenseNet

ARTIFACT_PATH = "feature_reuse"


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
    """Scalars of the paper's three findings. Shares are of a target column's sum over sources
    (of per-map averages, so a wide block input is not favoured by its width); means over blocks.

    - ``reuse_early_share``: share the last layer of each block puts on the block input
      (early features are used throughout a block).
    - ``reuse_transition_on_block_input``: share each transition puts on its block's input.
    - ``reuse_on_transition_output``: share layers 2..L of blocks 2.. put on the block input, i.e.
      on the previous transition's output (the paper finds it small: why compression helps).
      Layer 1 is left out: it has no other source.
    - ``reuse_classifier_late_share``: share the classifier puts on the later half of the last
      block's sources (the last floor((L+1)/2) of them; the paper finds it high).

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
    return summary


def plot_feature_reuse(matrices: Sequence[np.ndarray], path: str | Path) -> None:
    """Heatmaps side by side, one per block, like the paper's Figure 5. Each block is scaled to its
    own maximum (the conv, transition and classifier weights differ in scale between blocks); the
    outlined last column is the transition (T) or classifier (C); blank cells cannot connect."""
    fig = Figure(figsize=(3.6 * len(matrices) + 1, 3.8), layout="constrained")
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    cmap = colormaps["jet"].with_extremes(bad="white")
    for b, (ax, matrix) in enumerate(zip(axes, matrices), 1):
        n = matrix.shape[0]
        image = ax.imshow(matrix / np.nanmax(matrix), cmap=cmap, vmin=0, vmax=1, origin="upper")
        ax.add_patch(Rectangle((n - 1.5, -0.5), 1, n, fill=False, edgecolor="black", linewidth=1.5))
        every = max(1, math.ceil(n / 10))
        ticks = list(range(0, n, every))
        ax.set_xticks(ticks, [str(t + 1) if t < n - 1 else "" for t in ticks])
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.secondary_xaxis("top").set_xticks([n - 1], ["T" if b < len(matrices) else "C"])
        ax.set_title(f"Dense block {b}", pad=14)
        ax.set_xlabel("target layer (l)")
        ax.set_ylabel("source layer (s)")
    fig.colorbar(image, ax=list(axes), label="mean |w| per input map (block max = 1)")
    fig.savefig(path, dpi=120)


class FeatureReuseProbe(pl.Callback):
    """At the end of training, if the module's ``.model`` is a DenseNet, logs
    ``feature_reuse/heatmap.png``, ``feature_reuse/matrices.json`` (one matrix per block, as lists
    of rows, NaN as null) and the scalars of :func:`feature_reuse_summary`; else logs nothing."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, DenseNet) or not trainer.is_global_zero:
            return
        matrices = feature_reuse(model)
        for logger in trainer.loggers:
            logger.log_metrics(feature_reuse_summary(matrices), step=trainer.global_step)
        mlflow_loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        if not mlflow_loggers:
            return
        with tempfile.TemporaryDirectory() as tmp:
            paths = [Path(tmp, "heatmap.png"), Path(tmp, "matrices.json")]
            plot_feature_reuse(matrices, paths[0])
            as_lists = [[[None if math.isnan(v) else v for v in row] for row in m.tolist()] for m in matrices]
            paths[1].write_text(json.dumps(as_lists))
            for logger in mlflow_loggers:
                for path in paths:
                    logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=ARTIFACT_PATH)
