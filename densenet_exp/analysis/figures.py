"""The figures of the report, the notebooks and the probes' per-run artifacts, as matplotlib
Figures (no pyplot state). One colour and marker per model family (FAMILY_STYLE), except the
learning curves, where each configuration has its own colour (the family keeps its marker); every
point over seeds carries its interval (results.INTERVAL_RULE) where enough seeds give one, a
hollow marker or a bare line where they do not; labels never overlap (numbered points with a
legend table); legends with many entries sit outside the axes; layouts are constrained so titles
and labels stay on the canvas. Accuracy is results.ACCURACY_RULE's (validation accuracy, labelled,
where the data has no test split), and a figure with nothing to draw is None, never empty axes.
Imports neither torch nor Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import cycle

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from matplotlib.transforms import Bbox

from .. import record
from ..config import DENSENET_KNOBS
from ..measures.gradients import GRADIENT_EARLY, GRADIENT_LATE, body_layers
from ..measures.run_figures import figure_legend
from .results import FAMILY_NAMES, MIN_INTERVAL_N, accuracy_label, accuracy_of, interval

# family -> (colour, marker); configurations within a family differ by line style and marker fill.
FAMILY_STYLE = {
    "densenet": ("tab:blue", "o"),
    "resnet": ("tab:orange", "s"),
    "plain": ("tab:gray", "^"),
}
LINE_STYLES = ["-", "--", ":", "-."]
KNOB_LABELS = dict(zip(DENSENET_KNOBS, ("growth rate k", "compression θ", "bottleneck B")))
SET_SHADE = "#f6efd2"  # the early and late layer sets of the gradient figure (not grey: the plain nets' colour)


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


def _finish(fig: Figure, ax_list: Sequence, hollow_note: bool = True, legend_outside: bool = False) -> None:
    """Grids, legends (one per axes, or one for the figure right of the axes) and the note on
    hollow markers."""
    for ax in ax_list:
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0] and not legend_outside:
            ax.legend(fontsize=7)
    if legend_outside:
        entries = {label: handle for ax in ax_list for handle, label in zip(*ax.get_legend_handles_labels())}
        if entries:
            figure_legend(fig, list(entries.values()), list(entries))
    if hollow_note:  # supxlabel: constrained layout makes room for it
        fig.supxlabel(f"bars: 95% interval over seeds; hollow marker: no interval (fewer than {MIN_INTERVAL_N} seeds, "
                      "or no spread)",
                      fontsize=7, color="0.35")


# --- accuracy and cost -----------------------------------------------------------------------


def plot_accuracy_vs_cost(summary: pd.DataFrame, data: str) -> Figure | None:
    """Accuracy (ACCURACY_RULE; mean and 95% interval over seeds) against parameters and against
    FLOPs per image, one colour and marker per family: the layout of the paper's Figure 3. Each
    configuration is a number beside its point, placed where it overlaps no other number and no
    point (a thin line leads to it when it had to move away), and the legend right of the axes
    lists the numbers with the configurations' names. None without a row that has an accuracy and
    a cost."""
    rows = summary[summary["data"] == data]
    acc = accuracy_of(rows)
    has = rows.reindex(columns=[f"{m} mean" for m in (acc, record.PARAMS, record.FLOPS_PER_IMAGE)]).notna()
    if not (has.iloc[:, 0] & has.iloc[:, 1:].any(axis=1)).any():  # not one point to draw
        return None
    rows = rows.assign(_family=rows["family"].astype(str)).sort_values(["_family", record.PARAMS + " mean", "variant"])
    numbers = {variant: i for i, variant in enumerate(dict.fromkeys(rows["variant"]), 1)}
    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)  # a renderer, to measure the labels
    axes = fig.subplots(1, 2)
    labels: list[list[tuple[float, float, str]]] = []
    bars: list[list[tuple[float, float]]] = []
    for ax, cost, label in zip(axes, (record.PARAMS, record.FLOPS_PER_IMAGE), ("parameters", "FLOPs per image")):
        labels.append([])
        bars.append([])
        for family, group in rows.groupby("family", sort=True):
            colour, marker = family_style(family)
            group = group.dropna(subset=[f"{cost} mean", f"{acc} mean"])
            if group.empty:
                continue
            _errorbar(ax, group[f"{cost} mean"], group[f"{acc} mean"], group[f"{acc} ci_low"], group[f"{acc} ci_high"],
                      colour, marker, "none", None)
            labels[-1] += [(row[f"{cost} mean"], row[f"{acc} mean"], str(numbers[row["variant"]]))
                           for _, row in group.iterrows()]
            bars[-1] += list(zip(group[f"{acc} ci_low"], group[f"{acc} ci_high"]))
        if ax.has_data():
            ax.set_xscale("log")
            _log_labels(ax.xaxis)
        ax.set(xlabel=f"{label} (log scale)", ylabel=accuracy_label(acc))
    configurations = rows.drop_duplicates("variant")[["variant", "family"]].to_numpy()
    handles = [Line2D([], [], color=family_style(f)[0], marker=family_style(f)[1], linestyle="none")
               for _, f in configurations]
    names = [f"{numbers[v]}  {v} ({family_label(f)})" for v, f in configurations]
    figure_legend(fig, handles, names, title="number on the plot: configuration")
    _finish(fig, axes)
    fig.suptitle(f"{data}: {accuracy_label(acc)} against parameters and FLOPs (cf. the paper's Fig. 3)")
    fig.draw_without_rendering()  # the final layout, so the labels are placed where they will be drawn
    for ax, points, intervals in zip(axes, labels, bars):
        place_labels(ax, points, intervals)
    return fig


def compact_number(x: float, _position: object = None) -> str:
    """40k, 2.5M, 300: a tick label short enough that neighbouring ones never run into each other."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= threshold:
            return f"{x / threshold:g}{suffix}"
    return f"{x:g}"


def _log_labels(axis) -> None:
    """A log axis labelled at 1, 2 and 5 times each power of ten, in compact numbers (matplotlib's own
    minor labels crowd into each other over one or two decades)."""
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(compact_number))
    axis.set_minor_locator(LogLocator(subs="auto"))
    axis.set_minor_formatter(NullFormatter())


# Where a label may go, in points from its point: the eight directions at growing distances; from
# LEADER_FROM points on, a thin line leads back to the point.
_LABEL_OFFSETS = [(r * dx, r * dy) for r in (5, 9, 14, 20, 28, 38, 50, 65)
                  for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))]
LEADER_FROM = 12


def place_labels(ax, points: Sequence[tuple[float, float, str]], bars: Sequence[tuple[float, float]] = (),
                 fontsize: float = 7) -> list:
    """Annotate each (x, y, text) of `points` on `ax` at the first offset (_LABEL_OFFSETS) where its
    text box overlaps no label placed before it, no point's marker, no error bar (`bars`: the
    (low, high) of each point's bar, NaN for none) and nothing outside the axes; a
    thin line leads back to points whose label had to move LEADER_FROM points or more. The figure's
    layout must be final (drawn once) before this is called: the labels take no part in it. Returns
    the annotations (a label that fits nowhere goes to its last offset, its line still leading
    back)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_display = ax.transData.transform
    frame = ax.get_window_extent(renderer)
    radius = 4 * fig.dpi / 72  # a marker's half size, in pixels
    taken = [Bbox.from_extents(px - radius, py - radius, px + radius, py + radius)
             for px, py in (to_display((x, y)) for x, y, _ in points)]
    for (x, _, _), (low, high) in zip(points, bars):
        if np.isfinite(low) and np.isfinite(high):
            (x0, y0), (x1, y1) = to_display((x, low)), to_display((x, high))
            taken.append(Bbox.from_extents(x0 - radius, y0, x1 + radius, y1))  # the bar and its caps
    scale = fig.dpi / 72  # pixels per point
    placed = []
    for x, y, text in points:
        note = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=fontsize)
        note.set_in_layout(False)
        width, height = note.get_window_extent(renderer).size  # measured once; the offsets are arithmetic
        px, py = to_display((x, y))
        for dx, dy in _LABEL_OFFSETS:
            # The box of the text aligned away from its point: left/right/centre, bottom/top/centre.
            x0 = px + dx * scale - (0 if dx > 0 else width if dx < 0 else width / 2)
            y0 = py + dy * scale - (0 if dy > 0 else height if dy < 0 else height / 2)
            box = Bbox.from_bounds(x0, y0, width, height).expanded(1.15, 1.1)  # a little air between labels
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in taken):
                break
        note.xyann = (dx, dy)
        note.set_horizontalalignment("left" if dx > 0 else "right" if dx < 0 else "center")
        note.set_verticalalignment("bottom" if dy > 0 else "top" if dy < 0 else "center")
        if max(abs(dx), abs(dy)) >= LEADER_FROM:
            ax.annotate("", (x, y), xytext=(dx, dy), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "color": "0.55", "linewidth": 0.6,
                                    "shrinkA": 0, "shrinkB": 3}).set_in_layout(False)
        taken.append(box)
        placed.append(note)
    return placed


def plot_knob_effects(runs: pd.DataFrame, data: str, metrics: Sequence[str] | None = None) -> Figure | None:
    """The effect of each DenseNet knob that has two or more levels on `data`: one panel per knob
    and metric (default: ACCURACY_RULE's accuracy and parameters), one line per combination of the
    model and the other knobs (never pooled), each point the mean over seeds with its 95%
    interval. None when no knob varies or no metric was logged."""
    dense = runs[(runs["data"] == data) & (runs["family"] == "densenet")]
    metrics = metrics or (accuracy_of(dense), record.PARAMS)
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
            ax.set(xlabel=KNOB_LABELS[knob],
                   ylabel=accuracy_label(metric) if metric in (record.TEST_ACC, record.VAL_ACC) else metric)
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


def configuration_colours(count: int) -> list:
    """`count` distinct colours for configurations: tab10's, then tab20's lighter shades (cycled
    beyond twenty), so that neighbours in the legend never share a hue."""
    tab20 = colormaps["tab20"]
    order = [2 * i for i in range(10)] + [2 * i + 1 for i in range(10)]
    return [tab20(order[i % 20]) for i in range(count)]


DODGE_UP_TO = 12  # checks: up to this many, intervals are bars set side by side; beyond, bands


def curve_points(curves: pd.DataFrame, metric: str = record.VAL_ACC) -> pd.DataFrame:
    """The learning-curve figure's data: one row per configuration (config_key; its variant name,
    with the key's first characters where one name covers several configurations) and validation
    check (the `check` of results.learning_curves), with its position `epoch` (the median over its
    runs), the mean over runs, the 95% interval over runs (seeds) and `runs`, how many runs have
    that check. Each run gives each point one value: ValueError where a run has two rows at one check."""
    twice = curves.duplicated(["run_id", "check"])
    if twice.any():
        raise ValueError(f"{int(twice.sum())} run(s) with two values at one check: one value per run per point")
    shared = curves.groupby("variant")["config_key"].transform("nunique") > 1
    names = curves["variant"].where(~shared, curves["variant"] + " [" + curves["config_key"].str[:6] + "]")
    rows = []
    by_point = curves.groupby(["family", names, "config_key", "check"], sort=True, dropna=False)
    for (family, variant, _, check), group in by_point:
        mean, low, high, n = _stats(group["value"], metric)
        rows.append({"family": family, "variant": variant, "check": check, "epoch": group["epoch"].median(),
                     "mean": mean, "ci_low": low, "ci_high": high, "runs": n})
    return pd.DataFrame(rows, columns=["family", "variant", "check", "epoch", "mean", "ci_low", "ci_high", "runs"])


def _mark_lr_drops(ax, curves: pd.DataFrame) -> None:
    """A dotted line at each epoch after which a plotted run's recipe drops the learning rate."""
    drops = sorted({e for run in curves["lr_drops"] for e in run}) if "lr_drops" in curves else []
    for i, epoch in enumerate(drops):
        ax.axvline(epoch, color="0.4", linestyle=":", linewidth=1, zorder=0,
                   label="learning-rate drop (recipe's milestones)" if i == 0 else None)
        ax.text(epoch, 0.01, " lr drop", transform=ax.get_xaxis_transform(), rotation=90, fontsize=7,
                color="0.4", ha="right", va="bottom")


def plot_learning_curves(curves: pd.DataFrame, data: str, metric: str = record.VAL_ACC,
                         planned: Mapping[str, int] | None = None) -> Figure | None:
    """`metric` at each validation check (curve_points of results.learning_curves), placed at its
    position in epochs, the mean over runs, one colour per configuration (the family's marker and
    line style), the legend right of the axes with each configuration's runs (n). The 95% interval
    over runs (seeds) is drawn at each check where MIN_INTERVAL_N or more runs have a value: as error bars set
    slightly apart per configuration when there are at most DODGE_UP_TO checks, else as a band; a
    configuration of one run is a bare line. A point with fewer runs than `planned` (variant -> the
    plan's seeds; else the configuration's runs) is labelled with its n. The learning-rate drops of
    the runs' recipe are dotted lines, named on the x axis. None without curves on `data`."""
    rows = curves[curves["data"] == data]
    if rows.empty:
        return None
    points = curve_points(rows, metric)
    fig = Figure(figsize=(10.5, 5.5), layout="constrained")
    FigureCanvasAgg(fig)  # a renderer, to place the n labels
    ax = fig.subplots()
    lines = list(_config_lines(points))
    family_styles = {f: LINE_STYLES[i % len(LINE_STYLES)] for i, f in enumerate(dict.fromkeys(f for f, *_ in lines))}
    dodge = points["check"].nunique() <= DODGE_UP_TO
    spacing = np.diff(np.unique(points["epoch"])).min() if points["epoch"].nunique() > 1 else 1.0
    width = 0.3 * spacing if dodge and len(lines) > 1 else 0.0  # the spread of a check's bars around its position
    short = []
    for i, ((family, variant, group, _, _, marker), colour) in enumerate(zip(lines, configuration_colours(len(lines)))):
        n = int(group["runs"].max())  # the configuration's runs: those with its most-covered check
        expected = (planned or {}).get(variant, n)
        label = f"{variant} ({family_label(family)}, n={n})"
        x = group["epoch"].to_numpy(float) + (width * (i / (len(lines) - 1) - 0.5) if width else 0.0)
        mean, low, high = (group[c].to_numpy(float) for c in ("mean", "ci_low", "ci_high"))
        if dodge:
            has = np.isfinite(low) & np.isfinite(high)  # interval() gives none below MIN_INTERVAL_N runs
            yerr = np.vstack([np.where(has, mean - low, 0), np.where(has, high - mean, 0)])
            ax.errorbar(x, mean, yerr=yerr, color=colour, linestyle=family_styles[family], marker=marker,
                        markersize=4, capsize=2, elinewidth=0.9, label=label)
        else:
            ax.plot(x, mean, color=colour, linestyle=family_styles[family], marker=marker, markersize=3, label=label)
            if np.isfinite(low).any():
                ax.fill_between(x, low, high, color=colour, alpha=0.1, linewidth=0)
        for xi, yi, runs in zip(x, mean, group["runs"]):
            if runs < expected:
                short.append((xi, yi, f"n={runs}"))
    shape = "bars" if dodge else "bands"
    note = (f"{shape}: 95% interval over runs (seeds), n >= {MIN_INTERVAL_N}"
            if points["runs"].max() >= MIN_INTERVAL_N else f"fewer than {MIN_INTERVAL_N} runs each: no interval")
    if short:
        note += "; n=k: fewer runs than planned at that point"
    _mark_lr_drops(ax, rows)
    ax.set(xlabel="epoch (one point per validation check)" + ("; configurations set slightly apart" if width else ""),
           ylabel=metric, title=f"{data}: {metric} at each validation check, mean over runs\n{note}")
    _finish(fig, [ax], hollow_note=False, legend_outside=True)
    if short:
        fig.draw_without_rendering()  # the final layout, so the labels are placed where they will be drawn
        place_labels(ax, short)
    return fig


def plot_relative_grads(grads: pd.DataFrame, data: str) -> Figure | None:
    """Relative gradient ||grad|| / ||weight|| of the body's 3x3 convolutions only (the like-for-like
    layer set of measures.gradients.GRADIENT_LAYER_RULE) against their position among the body layers (0 =
    first, 1 = last), at initialization and after epoch 1 (from results.relative_grads): one line
    per configuration coloured by family (DenseNet, ResNet, plain net), the geometric mean over
    seeds with its 95% interval as a band where MIN_INTERVAL_N or more seeds give one; the early and late
    sets the ratios compare are shaded; legend right of the axes. None without body records on
    `data`."""
    rows = body_layers(grads[grads["data"] == data])
    if rows.empty:
        return None
    phases = [p for p in record.GRADIENT_PHASES if (rows["phase"] == p).any()]
    fig = Figure(figsize=(5.5 * len(phases) + 3, 5), layout="constrained")
    axes = fig.subplots(1, len(phases), squeeze=False, sharey=True)[0]
    for ax, phase in zip(axes, phases):
        for span in ((-0.02, GRADIENT_EARLY), (GRADIENT_LATE, 1.02)):
            ax.axvspan(*span, color=SET_SHADE, zorder=0)
        for family, variant, group, colour, style, marker in _config_lines(rows[rows["phase"] == phase]):
            by_depth = group.groupby("body_depth")["relative_grad"]
            depth = np.array(list(by_depth.groups), dtype=float)
            low, high = np.array([interval(g.to_numpy(float), "relative_grad") for _, g in by_depth], dtype=float).T
            centre = by_depth.apply(
                lambda s: float(np.exp(np.log(s[s > 0]).mean())) if (s > 0).any() else np.nan).to_numpy()
            ax.plot(depth, centre, color=colour, linestyle=style, marker=marker, markersize=3,
                    label=f"{variant} ({family_label(family)})")
            ax.fill_between(depth, low, high, color=colour, alpha=0.15, linewidth=0)
        ax.set_yscale("log")
        ax.set(xlabel="position among the body's 3x3 convs (0 = first, 1 = last)", ylabel="||grad|| / ||weight||",
               title="at initialization" if phase == "init" else "after epoch 1")
    _finish(fig, axes, hollow_note=False, legend_outside=True)
    fig.suptitle(f"{data}: relative gradient of the body's 3x3 convs (no stem, bottleneck, transition or "
                 "classifier)\ngeometric mean over seeds, band: 95% interval; shaded: the early "
                 f"(<= {GRADIENT_EARLY:g}) and late (>= {GRADIENT_LATE:g}) layers the ratio compares", fontsize=10)
    return fig


def plot_search_history(trials: pd.DataFrame, title: str) -> Figure:
    """An Optuna search's history (results.search_trials): each trial's objective in trial order and
    the best so far."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    done = trials.dropna(subset=["objective"])
    best = done["objective"].cummin() if trials.attrs.get("direction") == "minimize" else done["objective"].cummax()
    ax.plot(done["trial"], done["objective"], "o", color="tab:blue", label="trial")
    ax.step(done["trial"], best, where="post", color="tab:orange", label="best so far")
    ax.set(xlabel="trial", ylabel=trials.attrs.get("objective", "objective"), title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best")
    return fig


def plot_param_importances(importances: dict[str, float], title: str) -> Figure | None:
    """Horizontal bars, one per searched parameter, most important on top; None without any."""
    if not importances:
        return None
    names = list(importances)[::-1]
    fig = Figure(figsize=(7, 1 + 0.5 * len(names)), layout="constrained")
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set(xlabel="importance (share of the objective's variation)", title=title)
    return fig


def plot_run_curves(curves: dict[str, pd.DataFrame], title: str = "") -> Figure | None:
    """Chosen runs' histories side by side: one panel per metric (results.learning_curves of each),
    one line per run, labelled with its variant, seed and run id. None without any history."""
    panels = {m: c for m, c in curves.items() if not c.empty}
    if not panels:
        return None
    fig = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, rows) in zip(axes, panels.items()):
        for run_id, group in rows.groupby("run_id", sort=False):
            first = group.iloc[0]
            colour, marker = family_style(first["family"])
            ax.plot(group["epoch"], group["value"], marker=marker,
                    label=f"{first['variant']}-s{first['seed']} ({run_id[:8]})")
        ax.set(xlabel="epoch (at each logged step)", ylabel=metric, title=metric)
        ax.legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig
