"""The paper's Figure 5 read as numbers: per dense block, how a layer's weight is spread over the
sources it reads, as ratios to what uniform weighting gives (Huang et al. 2017, Section 5).

A matrix per block: rows are sources s = 0..L (0 the block input), columns the layers 1..L then
the transition (or the classifier after the last block); a cell is the mean |weight| per input
map with which that target reads that source (densenet_exp.probes.feature_reuse measures it).
Torch-free: the probe and the verdicts both use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import record

# Observation -> (claim name, metric name of its ratio).
FIGURE5 = {
    "a": ("feature reuse (a): layers use early features", record.REUSE_EARLY_OVER_UNIFORM),
    "b": ("feature reuse (b): transitions use the whole block", record.REUSE_TRANSITION_EARLY_OVER_UNIFORM),
    "c": ("feature reuse (c): transition outputs get less weight", record.REUSE_TRANSITION_OUTPUT_OVER_UNIFORM),
    "d": ("feature reuse (d): classifier concentrates on late features", record.REUSE_CLASSIFIER_LATE_OVER_UNIFORM),
}
RATIOS_RULE = (
    "Each column of a block's matrix is turned into shares of its sum over the sources that can feed it; uniform "
    "weighting gives each of a target's n sources 1/n. Each observation is a ratio to what uniform weighting gives, "
    "averaged over the cells named: (a) the share of layer l (l >= 3) on sources 1..floor(l/2), plus the block input "
    "in block 1 only, over its uniform share; (b) the share of each transition on layers 1..floor(L/2) of its block "
    "over its uniform share; (c) in blocks 2 and later, the block input's (the transition output's) share in layers "
    "2..L over 1/l; (d) the classifier's share on the later floor(L/2) layers of the last block over their uniform "
    "share."
)


def num_layers(matrix: np.ndarray) -> int:
    return matrix.shape[0] - 1


def figure5_ratios(matrices: Sequence[np.ndarray], min_layers: int = 1) -> dict[str, float]:
    """RATIOS_RULE's ratios of one run's matrices, keyed by FIGURE5's metric names, from the blocks
    with at least `min_layers` layers; a ratio no such block (or too few) supports is absent."""
    shares = [m / np.nansum(m, axis=0) for m in matrices]
    early, transition, on_input = [], [], []
    for b, share in enumerate(shares):
        layers = num_layers(share)
        if layers < min_layers:
            continue
        for layer in range(3, layers + 1):  # layer l reads sources 0..l-1, in column l-1
            sources = [*range(1, layer // 2 + 1), *([0] if b == 0 else [])]
            early.append(share[sources, layer - 1].sum() / (len(sources) / layer))
        if b < len(shares) - 1 and layers >= 2:
            sources = list(range(1, layers // 2 + 1))
            transition.append(share[sources, -1].sum() / (len(sources) / (layers + 1)))
        if b > 0:
            on_input += [share[0, layer - 1] * layer for layer in range(2, layers + 1)]
    ratios = {"a": early, "b": transition, "c": on_input}
    last, layers = shares[-1], num_layers(shares[-1])
    if layers >= max(2, min_layers):
        late = list(range(layers - layers // 2 + 1, layers + 1))
        ratios["d"] = [last[late, -1].sum() / (len(late) / (layers + 1))]
    return {FIGURE5[k][1]: float(np.mean(v)) for k, v in ratios.items() if v}


def short_blocks(matrices: Sequence[np.ndarray], min_layers: int) -> list[int]:
    """The blocks (counted from 1) with fewer than `min_layers` layers, which figure5_ratios skips."""
    return [b for b, m in enumerate(matrices, 1) if num_layers(m) < min_layers]


def share_change(init: Sequence[np.ndarray], trained: Sequence[np.ndarray], min_layers: int = 1) -> float:
    """How far training moved a run's matrices: the mean |log(trained share / init share)| over the
    cells of the blocks with at least `min_layers` layers (0: nothing moved)."""
    changes = []
    for before, after in zip(init, trained):
        if num_layers(before) < min_layers:
            continue
        ratio = (after / np.nansum(after, axis=0)) / (before / np.nansum(before, axis=0))
        changes.append(np.abs(np.log(ratio[np.isfinite(ratio) & (ratio > 0)])))
    return float(np.mean(np.concatenate(changes))) if changes else float("nan")
