"""The figures of the report, the notebooks and the probes' per-run artifacts, as matplotlib
Figures (no pyplot state). One colour per model family everywhere (FAMILY_STYLE); every point
over seeds carries its interval (results.INTERVAL_RULE), a hollow marker where a single seed
gives none; layouts are constrained so titles and labels stay on the canvas. Imports neither
torch nor Lightning.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from itertools import cycle

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import record
from .results import FAMILY_NAMES, interval

# family -> (colour, marker); configurations within a family differ by line style and marker fill.
FAMILY_STYLE = {
    "densenet": ("tab:blue", "o"),
    "resnet": ("tab:orange", "s"),
    "plain": ("tab:gray", "^"),
}
LINE_STYLES = ["-", "--", ":", "-."]
KNOB_LABELS = {"growth_rate": "growth rate k", "compression": "compression θ", "bottleneck": "bottleneck B"}
HEATMAP_CMAP = "viridis"  # perceptually uniform; the paper's jet invents edges
RATIO_CMAP = "RdBu_r"  # diverging around 1 (uniform weighting): blue below, red above
NO_LINK = "0.85"  # cells where the source cannot feed the target, on the ratio scale (white is 1 there)
RATIO_MIN_SPAN = 0.05  # the ratio scale spans at least 1 +- this, so that noise is not drawn as contrast
# How a feature-reuse heatmap scales its cells -> what its colour bar says.
REUSE_NORMALIZATIONS = {
    "block max": "mean |w| per input map, each block divided by its own maximum (block max = 1)",
    "column mean": "mean |w| per input map over its column's mean (1 = uniform weighting of the sources)",
}


def family_style(family: object) -> tuple[str, str]:
    return FAMILY_STYLE.get(str(family), ("tab:purple", "D"))


def family_label(family: object) -> str:
    return FAMILY_NAMES.get(str(family), str(family))


def level(value: object) -> str:
    """A knob level as a label: yes/no for the bottleneck, 0.5 for theta, 12 for k."""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _stats(values: pd.Series, metric: str) -> tuple[float, float, float, int]:
    """mean, interval low and high (NaN for one value), n."""
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy(float)
    low, high = interval(v, metric)
    return (float(v.mean()) if len(v) else np.nan), low, high, len(v)


def _errorbar(ax, x, mean, low, high, colour: str, marker: str, linestyle: str, label: str | None) -> None:
    """Points with their intervals; hollow markers where there is none (a single seed)."""
    x, mean, low, high = (np.asarray(v, dtype=float) for v in (x, mean, low, high))
    has = np.isfinite(low) & np.isfinite(high)
    yerr = np.vstack([np.where(has, mean - low, 0), np.where(has, high - mean, 0)])
    ax.errorbar(x, mean, yerr=yerr, color=colour, marker=marker, linestyle=linestyle, capsize=3, label=label,
                markerfacecolor="none" if not has.any() else colour)
    if (~has).any() and has.any():
        ax.plot(x[~has], mean[~has], linestyle="none", marker=marker, color=colour, markerfacecolor="white")


def _finish(fig: Figure, ax_list: Sequence, hollow_note: bool = True) -> None:
    for ax in ax_list:
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if hollow_note:  # supxlabel: constrained layout makes room for it
        fig.supxlabel("bars: 95% interval over seeds; hollow marker: no interval (a single seed, or no spread)",
                      fontsize=7, color="0.35")


# --- accuracy and cost -----------------------------------------------------------------------


def plot_accuracy_vs_cost(summary: pd.DataFrame, data: str) -> Figure | None:
    """Test accuracy (mean and 95% interval over seeds) against parameters and against FLOPs per
    image, one colour and marker per family: the layout of the paper's Figure 3. None without rows."""
    rows = summary[summary["data"] == data]
    if rows.empty:
        return None
    fig = Figure(figsize=(12, 5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, cost, label in zip(axes, (record.PARAMS, record.FLOPS_PER_IMAGE), ("parameters", "FLOPs per image")):
        for family, group in rows.groupby("family"):
            colour, marker = family_style(family)
            acc = record.TEST_ACC
            group = group.dropna(subset=[f"{cost} mean", f"{acc} mean"])
            if group.empty:
                continue
            _errorbar(ax, group[f"{cost} mean"], group[f"{acc} mean"], group[f"{acc} ci_low"], group[f"{acc} ci_high"],
                      colour, marker, "none", family_label(family))
            for _, row in group.iterrows():
                ax.annotate(row["variant"], (row[f"{cost} mean"], row[f"{acc} mean"]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
        if ax.has_data():
            ax.set_xscale("log")  # matplotlib labels minor ticks where the data span less than a decade
        ax.set(xlabel=f"{label} (log scale)", ylabel="test accuracy")
    _finish(fig, axes)
    fig.suptitle(f"{data}: test accuracy against parameters and FLOPs (cf. the paper's Fig. 3)")
    return fig


def plot_knob_effects(runs: pd.DataFrame, data: str, metrics: Sequence[str] = (record.TEST_ACC, record.PARAMS)) -> Figure | None:
    """The effect of each DenseNet knob that has two or more levels on `data`: one panel per knob
    and metric, one line per combination of the model and the other knobs (never pooled), each
    point the mean over seeds with its 95% interval. None when no knob varies."""
    dense = runs[(runs["data"] == data) & (runs["family"] == "densenet")]
    knobs = [k for k in KNOB_LABELS if dense[k].dropna().nunique() > 1]
    metrics = [m for m in metrics if m in dense and dense[m].notna().any()]
    if dense.empty or not knobs or not metrics:
        return None
    fig = Figure(figsize=(4.6 * len(knobs) + 1.5, 3.8 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), len(knobs), squeeze=False)
    shades = colormaps["Blues"]
    for row, metric in zip(axes, metrics):
        for ax, knob in zip(row, knobs):
            levels = sorted(dense[knob].dropna().unique())
            others = ["model", *(k for k in KNOB_LABELS if k != knob)]
            lines = list(dense.groupby(others, dropna=False, sort=True))
            styles = cycle(LINE_STYLES)
            for i, (key, line) in enumerate(lines):
                points = [(levels.index(v), *_stats(g[metric], metric)) for v, g in line.groupby(knob)]
                if not points:
                    continue
                x, mean, low, high, _ = zip(*points)
                label = ", ".join([str(key[0]), *(f"{KNOB_LABELS[k].split()[-1]}={level(v)}"
                                                  for k, v in zip(others[1:], key[1:]) if pd.notna(v))])
                colour = shades(0.45 + 0.5 * i / max(len(lines) - 1, 1))
                _errorbar(ax, x, mean, low, high, colour, "o", next(styles), label)
            ax.set_xticks(range(len(levels)), [level(v) for v in levels])
            ax.set_xlim(-0.5, len(levels) - 0.5)
            ax.set(xlabel=KNOB_LABELS[knob], ylabel=metric)
    _finish(fig, axes.ravel())
    fig.suptitle(f"{data}: DenseNet knobs, one line per fixed setting of the others (knobs with one level skipped)")
    return fig


# --- training curves and gradient flow -------------------------------------------------------


def _config_lines(rows: pd.DataFrame):
    """(family, variant, rows, colour, line style, marker) per configuration, styled by family."""
    styles: dict[str, cycle] = {}
    for (family, variant), group in rows.groupby(["family", "variant"], sort=True):
        colour, marker = family_style(family)
        style = next(styles.setdefault(str(family), cycle(LINE_STYLES)))
        yield family, variant, group, colour, style, marker


def plot_learning_curves(curves: pd.DataFrame, data: str, metric: str = record.VAL_ACC) -> Figure | None:
    """`metric` per epoch (from results.learning_curves), mean over seeds with its 95% interval
    as a band, one line per configuration coloured by family. None without curves on `data`."""
    rows = curves[curves["data"] == data]
    if rows.empty:
        return None
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for family, variant, group, colour, style, marker in _config_lines(rows):
        points = [(e, *_stats(g["value"], metric)) for e, g in group.groupby("epoch")]
        epoch, mean, low, high, _ = (np.array(v, dtype=float) for v in zip(*points))
        ax.plot(epoch, mean, color=colour, linestyle=style, marker=marker, label=f"{variant} ({family_label(family)})")
        ax.fill_between(epoch, low, high, color=colour, alpha=0.15)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{data}: {metric} per epoch (band: 95% interval over seeds)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(fig, [ax], hollow_note=False)
    return fig


def plot_relative_grads(grads: pd.DataFrame, data: str) -> Figure | None:
    """Relative gradient ||grad|| / ||weight|| against relative depth (0 = first conv, 1 =
    classifier) at initialization and after epoch 1 (from results.relative_grads): one line per
    configuration coloured by family (DenseNet, ResNet, plain net), the geometric mean over seeds
    with its 95% interval as a band. None without records on `data`."""
    rows = grads[grads["data"] == data]
    if rows.empty:
        return None
    phases = [p for p in ("init", "epoch1") if (rows["phase"] == p).any()]
    fig = Figure(figsize=(6 * len(phases) + 1, 5), layout="constrained")
    axes = fig.subplots(1, len(phases), squeeze=False)[0]
    for ax, phase in zip(axes, phases):
        for family, variant, group, colour, style, marker in _config_lines(rows[rows["phase"] == phase]):
            points = [(d, *_stats(g["relative_grad"], "relative_grad"))
                      for d, g in group.groupby("relative_depth")]
            depth, _, low, high, _ = (np.array(v, dtype=float) for v in zip(*points))
            centre = group.groupby("relative_depth")["relative_grad"].apply(
                lambda s: float(np.exp(np.log(s[s > 0]).mean())) if (s > 0).any() else np.nan).to_numpy()
            ax.plot(depth, centre, color=colour, linestyle=style, marker=marker, markersize=3,
                    label=f"{variant} ({family_label(family)})")
            ax.fill_between(depth, low, high, color=colour, alpha=0.15)
        ax.set_yscale("log")
        ax.set(xlabel="relative depth (0 = first conv, 1 = classifier)", ylabel="||grad|| / ||weight||",
               title="at initialization" if phase == "init" else "after epoch 1")
    _finish(fig, axes, hollow_note=False)
    fig.suptitle(f"{data}: relative gradient by depth (geometric mean over seeds, band: 95% interval)")
    return fig


def plot_gradient_flow_run(table: pd.DataFrame, title: str) -> Figure:
    """One run's `gradient_flow/relative_grads.csv`: relative gradient against relative depth,
    one line per recorded phase (a legend, not a colour bar), titled with the run's name."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for (phase, rows), colour in zip(table.groupby("phase", sort=False), ("tab:green", "tab:red", "tab:brown")):
        rows = rows.sort_values("relative_depth")
        ax.plot(rows["relative_depth"], rows["relative_grad"], marker=".", color=colour, label=str(phase))
    ax.set_yscale("log")
    ax.set(xlabel="relative depth (0 = first conv, 1 = classifier)", ylabel="||grad|| / ||weight||", title=title)
    _finish(fig, [ax], hollow_note=False)
    return fig


# --- feature reuse ---------------------------------------------------------------------------


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
