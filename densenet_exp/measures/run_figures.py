"""The figures of one run that its probes save beside their files and the report shows again:
relative gradient against depth, and the Figure 5 feature-reuse heatmaps. Torch-free (matplotlib
only): probes/ and analysis/figures.py both import it."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .. import record
from .gradients import assign_roles

HEATMAP_CMAP = "viridis"  # perceptually uniform; the paper's jet invents edges
RATIO_CMAP = "RdBu_r"  # diverging around 1 (uniform weighting): blue below, red above
NO_LINK = "0.85"  # cells where the source cannot feed the target, on the ratio scale (white is 1 there)
RATIO_MIN_SPAN = 0.05  # the ratio scale spans at least 1 +- this, so that noise is not drawn as contrast
# How a feature-reuse heatmap scales its cells -> what its colour bar says.
REUSE_NORMALIZATIONS = {
    "block max": "mean |w| per input map, each block divided by its own maximum (block max = 1)",
    "column mean": "mean |w| per input map over its column's mean (1 = uniform weighting of the sources)",
}


def figure_legend(fig: Figure, handles: list, labels: list[str], title: str | None = None) -> None:
    """One legend for the figure, right of its axes (constrained layout makes room for it)."""
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, title=title, title_fontsize=7,
               ncols=1 + len(labels) // 30)


# Markers of the layer roles in a single run's gradient plot.
ROLE_MARKERS = {"stem": "s", "body": "o", "bottleneck": "v", "transition": "D", "shortcut": "x", "classifier": "*"}


def plot_gradient_flow_run(table: pd.DataFrame, title: str) -> Figure:
    """One run's `gradient_flow/relative_grads.csv`: relative gradient against relative depth (0 =
    first conv, 1 = classifier), one colour per recorded phase; the body's 3x3 convs (the layers
    the summaries compare) joined by a line, every other layer a marker of its role."""
    table = assign_roles(table)
    fig = Figure(figsize=(8.5, 4.5), layout="constrained")
    ax = fig.subplots()
    handles, labels = [], []
    for (phase, rows), colour in zip(table.groupby("phase", sort=False), ("tab:green", "tab:red", "tab:brown")):
        rows = rows.sort_values("relative_depth")
        body = rows[rows["role"] == record.BODY_ROLE]
        handles += ax.plot(body["relative_depth"], body["relative_grad"], marker="o", markersize=3, color=colour)
        labels.append(f"{phase}: body 3x3 convs")
        for role, marker in ROLE_MARKERS.items():
            if role != record.BODY_ROLE:
                other = rows[rows["role"] == role]
                ax.plot(other["relative_depth"], other["relative_grad"], linestyle="none", marker=marker, color=colour)
    for role, marker in ROLE_MARKERS.items():
        if role != record.BODY_ROLE and (table["role"] == role).any():
            handles.append(Line2D([], [], color="0.3", marker=marker, linestyle="none"))
            labels.append(role)
    ax.set_yscale("log")
    ax.set(xlabel="relative depth (0 = first conv, 1 = classifier)", ylabel="||grad|| / ||weight||", title=title)
    ax.grid(True, which="both", alpha=0.3)
    if handles:
        figure_legend(fig, handles, labels, title="phase (colour), role (marker)")
    return fig


def normalize_reuse(matrix: np.ndarray, normalization: str) -> np.ndarray:
    """One block's Figure 5 matrix scaled as REUSE_NORMALIZATIONS[normalization] says."""
    if normalization == "block max":
        peak = np.nanmax(matrix) if np.isfinite(matrix).any() and np.nanmax(matrix) > 0 else 1.0
        return matrix / peak
    if normalization == "column mean":
        means = np.nanmean(np.where(np.isfinite(matrix), matrix, np.nan), axis=0, keepdims=True)
        return matrix / np.where(means > 0, means, np.nan)
    raise ValueError(f"normalization={normalization!r}: expected one of {', '.join(REUSE_NORMALIZATIONS)}")


def plot_feature_reuse(matrices: Sequence[np.ndarray], title: str = "", init: Sequence[np.ndarray] | None = None,
                       normalization: str = "block max") -> Figure:
    """Heatmaps, one per dense block, in the layout of the paper's Figure 5: source layer s down (0 =
    block input), target layer l across, the last column the transition (T) or classifier (C).
    The trained matrices (`matrices`) in the top row, the same net's at initialization (`init`,
    step 0, before any update) in the row below, or a note that no init matrix was recorded.
    `normalization` (REUSE_NORMALIZATIONS) is named on the colour bar: "block max" scales each
    block to its own maximum (conv, transition and classifier weights differ in scale between
    blocks); "column mean" divides each target's column by its mean over the sources it reads,
    so 1 is uniform weighting (what He initialization gives in expectation), on a diverging scale
    around 1 shared by every panel and as wide as the largest deviation. Blank cells (grey on the
    ratio scale) cannot connect; nothing is clipped."""
    if normalization not in REUSE_NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}: expected one of {', '.join(REUSE_NORMALIZATIONS)}")
    states = [("trained", matrices)] + ([("at initialization (step 0)", init)] if init is not None else [])
    scaled = [[normalize_reuse(np.asarray(m, dtype=float), normalization) for m in ms] for _, ms in states]
    if normalization == "block max":
        cmap, norm = colormaps[HEATMAP_CMAP].with_extremes(bad="white"), Normalize(0, 1)
    else:  # symmetric around 1, as wide as the largest deviation (at least RATIO_MIN_SPAN)
        values = np.concatenate([m[np.isfinite(m)] for ms in scaled for m in ms] + [np.ones(1)])
        span = max(float(np.abs(values - 1).max()), RATIO_MIN_SPAN)
        cmap, norm = colormaps[RATIO_CMAP].with_extremes(bad=NO_LINK), Normalize(1 - span, 1 + span)
    fig = Figure(figsize=(3.7 * len(matrices) + 1.6, 0.6 + 3.9 * len(states)), layout="constrained")
    axes = fig.subplots(len(states), len(matrices), squeeze=False)
    image = None
    for row, (state, _), blocks in zip(axes, states, scaled):
        for b, (ax, matrix) in enumerate(zip(row, blocks), 1):
            n = matrix.shape[0]
            image = ax.imshow(matrix, cmap=cmap, norm=norm, origin="upper")
            every = max(1, math.ceil(n / 8))
            ticks = sorted({*range(0, n - 1, every), n - 1})
            head = "T" if b < len(blocks) else "C"
            ax.set_xticks(ticks, [str(t + 1) if t < n - 1 else head for t in ticks])
            ax.set_yticks(ticks, [str(t) for t in ticks])
            ax.axvline(n - 1.5, color="black", linewidth=1)  # sets the transition/classifier column apart
            ax.set_title(f"Dense block {b}, {state}", fontsize=9)
            ax.set_xlabel("target layer (l)")
            ax.set_ylabel("source layer (s)")
    fig.colorbar(image, ax=axes.ravel().tolist(), label=textwrap.fill(REUSE_NORMALIZATIONS[normalization], 40),
                 shrink=0.85)
    if init is None:
        fig.supxlabel("no init matrix recorded (a run from before the probe recorded step 0): nothing to set the "
                      "trained weights against", fontsize=8, color="0.35")
    if title:
        fig.suptitle(title)
    return fig
