"""The ablation report of an experiment or one sweep, read back from MLflow.

    python -m densenet_exp.report --experiment ablation [--sweep PARENT_RUN_ID]
                                  [--tracking-uri URI] [--out DIR]

MLflow's UI compares runs one by one; this aggregates over seeds (densenet_exp.results) and writes
`report.md`, a self-contained `report.html` (images inlined as data URIs) and the figures as PNGs
to DIR (default reports/<experiment>[-<sweep>]), then logs the folder as the artifacts of a
report run (tag report=true) in the same experiment. Later reports skip report runs.

The plot functions return matplotlib Figures for the notebooks in notebooks/.
"""

from __future__ import annotations

import argparse
import base64
import html
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import markdown
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow.tracking import MlflowClient

from .probes.feature_reuse import plot_feature_reuse
from .results import (
    CONFIG,
    DIRECTIONAL_RULE,
    FAMILY_NAMES,
    RULES,
    SUMMARY_METRICS,
    Claim,
    ExperimentNotFound,
    claims_table,
    evaluate_claims,
    feature_reuse_matrices,
    finished,
    gradient_norms,
    learning_curves,
    load_runs,
    mean_matrices,
    pooling_problems,
    published_beside_ours,
    summarize,
    t_half_width,
)
from .tracking import retry_locked, tracking_uri

KNOB_LABELS = {"growth_rate": "growth rate k", "compression": "compression θ", "bottleneck": "bottleneck B"}
# family -> (colour, marker, line style); other architectures get purple dots.
FAMILY_STYLE = {
    "densenet": ("tab:blue", "o", "-"),
    "resnet": ("tab:orange", "s", "--"),
    "plain": ("tab:gray", "^", ":"),
}


def _style(family: str) -> tuple[str, str, str]:
    return FAMILY_STYLE.get(family, ("tab:purple", ".", "-."))


def _level(value: object) -> str:
    """A knob level as a label: yes/no for the bottleneck, 0.5 for theta, 12 for k."""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


# --- figures ---------------------------------------------------------------------------------


def plot_accuracy_vs_cost(summary: pd.DataFrame, data: str) -> Figure:
    """Test accuracy (mean ± std over seeds) against parameters and against FLOPs per image, one
    colour and marker per family: the layout of the paper's Figure 3."""
    rows = summary[summary["data"] == data]
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    for ax, cost, label in zip(fig.subplots(1, 2), ("params", "flops_per_image"), ("parameters", "FLOPs per image")):
        for family, group in rows.groupby("family"):
            colour, marker, _ = _style(str(family))  # points, no lines: families are not series
            group = group.dropna(subset=[f"{cost} mean", "test/acc mean"])
            ax.errorbar(group[f"{cost} mean"], group["test/acc mean"], yerr=group["test/acc std"], color=colour,
                        marker=marker, linestyle="none", capsize=3, label=FAMILY_NAMES.get(str(family), family))
            for _, row in group.iterrows():
                ax.annotate(row["variant"], (row[f"{cost} mean"], row["test/acc mean"]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.tick_params(axis="x", which="minor", labelbottom=False)  # they overlap within a decade
        ax.set_xlabel(f"{label} (log scale)")
        ax.set_ylabel("test accuracy")
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.suptitle(f"{data}: test accuracy against parameters and FLOPs (mean ± std over seeds; cf. the paper's Fig. 3)")
    return fig


def plot_main_effects(runs: pd.DataFrame, data: str, metrics: Sequence[str] = ("test/acc", "params")) -> Figure | None:
    """Each knob's main effect on each metric over the DenseNet runs on `data`: the mean over all
    runs at each level (other knobs and seeds pooled) with its 95% t-interval. None without
    DenseNet runs."""
    dense = runs[(runs["data"] == data) & (runs["family"] == "densenet")]
    if dense.empty:
        return None
    fig = Figure(figsize=(12, 3.4 * len(metrics)), layout="constrained")
    for row, metric in zip(fig.subplots(len(metrics), len(KNOB_LABELS), squeeze=False), metrics):
        for ax, (knob, label) in zip(row, KNOB_LABELS.items()):
            effect = dense.groupby(knob)[metric].agg(["mean", "std", "count"]) if metric in dense else pd.DataFrame()
            x = np.arange(len(effect))
            ax.errorbar(x, effect.get("mean", []), yerr=t_half_width(effect.get("std", []), effect.get("count", [])),
                        marker="o", capsize=4)
            ax.set_xticks(x, [_level(v) for v in effect.index])
            ax.set_xlim(-0.5, max(len(effect), 2) - 0.5)
            ax.set(xlabel=label, ylabel=metric)
            ax.grid(True, alpha=0.3)
    fig.suptitle(f"{data}: main effects over DenseNet runs (mean, 95% t-interval; other knobs and seeds pooled)")
    return fig


def plot_interactions(runs: pd.DataFrame, data: str, metric: str = "test/acc") -> Figure | None:
    """Interaction plots k x theta and k x bottleneck: the mean of `metric` at each k, one line
    per level of the other knob (parallel lines: no interaction). None without DenseNet runs."""
    dense = runs[(runs["data"] == data) & (runs["family"] == "densenet")]
    if dense.empty or metric not in dense:
        return None
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    for ax, other in zip(fig.subplots(1, 2), ("compression", "bottleneck")):
        means = dense.pivot_table(index="growth_rate", columns=other, values=metric, aggfunc="mean")
        for level in means.columns:
            label = f"{KNOB_LABELS[other]} = {_level(level)}"
            ax.plot(means.index.astype(float), means[level], marker="o", label=label)
        ax.set(xlabel=KNOB_LABELS["growth_rate"], ylabel=f"mean {metric}", title=f"k x {KNOB_LABELS[other]}")
        ax.set_xticks(means.index.astype(float))
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.suptitle(f"{data}: interactions over DenseNet runs (means over seeds and the third knob)")
    return fig


def plot_learning_curves(curves: pd.DataFrame, data: str, metric: str = "val/acc") -> Figure | None:
    """`metric` per epoch (from learning_curves), mean over seeds with a ± std band, one line per
    configuration. None without curves on `data`."""
    rows = curves[curves["data"] == data]
    if rows.empty:
        return None
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    stats = rows.groupby(["variant", "epoch"])["value"].agg(["mean", "std"]).reset_index()
    for variant, line in stats.groupby("variant"):
        ax.plot(line["epoch"], line["mean"], marker=".", label=variant)
        spread = line["std"].fillna(0)
        ax.fill_between(line["epoch"], line["mean"] - spread, line["mean"] + spread, alpha=0.2)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{data}: {metric} per epoch (mean ± std over seeds)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_gradient_flow(norms: pd.DataFrame, data: str) -> Figure | None:
    """Weight-gradient norm against relative depth (0 = first conv, 1 = classifier), mean over
    recorded steps and seeds, one line per configuration, line style by family. None without
    gradient-flow records on `data`."""
    rows = norms[norms["data"] == data]
    if rows.empty:
        return None
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    profile = rows.groupby(["family", "variant", "relative_depth"])["grad_norm"].mean().reset_index()
    for (family, variant), line in profile.groupby(["family", "variant"]):
        ax.plot(line["relative_depth"], line["grad_norm"], linestyle=_style(str(family))[2], marker=".",
                label=f"{variant} ({FAMILY_NAMES.get(str(family), family)})")
    ax.set_yscale("log")
    ax.set(xlabel="relative depth (0 = first conv, 1 = classifier)", ylabel="weight gradient L2 norm",
           title=f"{data}: gradient flow by depth (mean over recorded steps and seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def feature_reuse_figures(
    runs: pd.DataFrame, matrices: dict[str, list[np.ndarray]], folder: Path
) -> list[tuple[Path, str]]:
    """One heatmap per DenseNet configuration, the mean of its runs' feature-reuse matrices
    (from feature_reuse_matrices) drawn like the paper's Figure 5, saved in `folder`: [(png, caption)]."""
    figures = []
    for key, group in runs[runs["run_id"].isin(matrices)].groupby(CONFIG, dropna=False, sort=True):
        variant, data = group["variant"].iloc[0], key[0]
        path = folder / _file_name(f"feature_reuse_{data}_{variant}")
        plot_feature_reuse(mean_matrices([matrices[i] for i in group["run_id"]]), path)
        figures.append((path, f"{data}: feature reuse of {variant} (mean of {len(group)} runs)."))
    return figures


# --- tables ----------------------------------------------------------------------------------


def format_number(x: float) -> str:
    if pd.isna(x):
        return ""
    for threshold, scale, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(x) >= threshold:
            return f"{x / scale:.4g}{suffix}"
    return f"{x:.4g}"


def format_stat(row: pd.Series, metric: str) -> str:
    """'mean ± std [ci_low, ci_high]' of a summarize() row; the mean alone for one value, blank for
    none, '(n=…)' when fewer runs than the configuration's logged it."""
    n = row[f"{metric} n"]
    if not n:
        return ""
    text = format_number(row[f"{metric} mean"])
    if n > 1:
        std = row[f"{metric} std"]
        text += f" ± {format_number(std)}"
        if std > 0:
            text += f" [{format_number(row[f'{metric} ci_low'])}, {format_number(row[f'{metric} ci_high'])}]"
    return text + (f" (n={n})" if n < row["runs"] else "")


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """summarize()'s table as the report prints it: one string column per metric."""
    table = pd.DataFrame({
        "data": summary["data"],
        "model": summary["model"],
        "k": summary["growth_rate"].astype("string").fillna(""),
        "θ": summary["compression"].map(lambda v: "" if pd.isna(v) else f"{v:g}"),
        "B": summary["bottleneck"].map(lambda v: "" if pd.isna(v) else _level(bool(v))),
        "runs": [f"{n} (single seed: no std)" if n == 1 else str(n) for n in summary["runs"]],
        "seeds": summary["seeds"],
    })
    for metric, label in SUMMARY_METRICS.items():
        table[label] = [format_stat(row, metric) for _, row in summary.iterrows()]
    return table


# --- the document ----------------------------------------------------------------------------


def _file_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name) + ".png"


def _cell(value: object) -> str:
    blank = value is None or (not isinstance(value, str) and pd.isna(value))
    return "" if blank else str(value).replace("|", "\\|")


_CSS = """body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;display:block}code{background:#f3f3f3;padding:0 3px}
p>em{color:#555;font-size:13px}"""


@dataclass
class Document:
    """The report as markdown, with its PNGs saved beside it; `html` renders it with the
    `markdown` package and embeds each image as a data URI, so the HTML file stands alone."""

    folder: Path
    parts: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append("#" * level + " " + text)

    def text(self, text: str) -> None:
        self.parts.append(text)

    def bullets(self, items: Sequence[str]) -> None:
        self.parts.append("\n".join(f"- {item}" for item in items))

    def table(self, frame: pd.DataFrame) -> None:
        cells = frame.astype(object).map(_cell).rename(columns=_cell)
        self.parts.append(cells.to_markdown(index=False, tablefmt="github"))

    def figure(self, fig: Figure | None, name: str, caption: str) -> None:
        """Save `fig` as <name>.png in the folder and show it here (nothing when fig is None)."""
        if fig is not None:
            path = self.folder / _file_name(name)
            fig.savefig(path, dpi=100)
            self.image(path, caption)

    def image(self, path: Path, caption: str) -> None:
        self.figures.append(path)
        self.parts.append(f"![{caption}]({path.name})\n\n*{caption}*")

    def images(self) -> list[Path]:
        return list(self.figures)

    def markdown(self) -> str:
        return "\n\n".join(self.parts) + "\n"

    def html(self, title: str) -> str:
        body = markdown.markdown(self.markdown(), extensions=["tables"])
        for path in self.figures:
            data = base64.b64encode(path.read_bytes()).decode()
            body = body.replace(f'src="{path.name}"', f'src="data:image/png;base64,{data}"')
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


# --- the report ------------------------------------------------------------------------------


def _claims_section(doc: Document, claims: list[Claim]) -> None:
    doc.heading("Claims of the paper, judged on these runs")
    doc.text("D is the most accurate DenseNet configuration and R the most accurate ResNet configuration on "
             "each data set (highest mean test accuracy); each claim is judged per data set by the rule below.")
    if claims:
        table = claims_table(claims).drop(columns="p_value")
        table["verdict"] = table["verdict"].map(lambda v: f"**{v}**")
        doc.table(table)
    else:
        doc.text("No finished runs: nothing to judge.")
    doc.heading("Verdict rules", 3)
    doc.bullets([f"**{name}**: {rule}" for name, rule in RULES.items()] + [f"**directional rule**: {DIRECTIONAL_RULE}"])


def write_report(experiment: str, uri: str, out: Path, sweep: str | None = None) -> dict[str, object]:
    """Read the runs, write report.md, report.html and the PNGs to `out`; returns what it found
    (runs, finished, summary, claims, published) for callers and tests."""
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(experiment, uri, sweep)
    done = finished(runs)
    left_out = runs[runs["status"] != "FINISHED"]
    summary = summarize(done)
    matrices = feature_reuse_matrices(done[done["family"] == "densenet"], uri)
    claims = evaluate_claims(done, matrices)
    published = published_beside_ours(done)
    curves = learning_curves(done, uri)
    norms = gradient_norms(done, uri)

    title = f"DenseNet ablation report: {experiment}" + (f", sweep {sweep}" if sweep else "")
    doc = Document(out)
    doc.heading(title, 1)
    doc.text(f"Store `{uri}`, experiment `{experiment}`" + (f", sweep `{sweep}`" if sweep else "")
             + f"; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. {len(runs)} training runs read: "
             f"{len(done)} finished and used, {len(left_out)} left out.")
    doc.text("One row per configuration (data set, model, k, θ, B): its runs differ only in the seed. Cells "
             "give mean ± std [95% interval] over seeds, the interval from the t-distribution with n − 1 degrees "
             "of freedom; a metric that does not vary gets no interval, a single seed gives no std or interval, "
             "and a blank means no run logged the metric. Data sets are never pooled.")

    notes = [f"`{c}` on {d}: single seed, so no std, no interval and no significance test"
             for c, d, n in zip(summary["variant"], summary["data"], summary["runs"]) if n == 1]
    notes += pooling_problems(done)
    if ((done["device"] == "cpu") & (done.get("peak_memory_mb") == 0)).any():
        notes.append("On a CPU, `peak_memory_mb` is the growth of the process's peak resident memory during fit; "
                     "jobs of a sweep that share one process after the first can show 0.")
    if notes:
        doc.heading("Notes")
        doc.bullets(notes)

    doc.heading("Runs left out")
    if left_out.empty:
        doc.text("None: every run read finished.")
    else:
        doc.table(left_out[["variant", "data", "seed", "status", "error", "run_id"]]
                  .astype("string").fillna("").map(lambda s: s[:200]))

    doc.heading("Results per configuration")
    if summary.empty:
        doc.text("No finished runs.")
    for data, table in format_summary(summary).groupby("data", sort=True):
        doc.heading(str(data), 3)
        doc.table(table.drop(columns="data"))

    _claims_section(doc, claims)

    doc.heading("Published figures beside ours")
    if published.empty:
        doc.text("No configuration here matches a published one (matched on model preset, data set, class count, "
                 "k, θ and B): e.g. `densenet_bc100_k12` on `cifar10` is DenseNet-BC (L=100, k=12), 4.51% error "
                 "on C10+ (Huang et al. 2017, Table 2); `densenet121` on ImageNet 25.02% top-1 error (Table 3).")
    else:
        shown = published.copy()
        for column in ("published accuracy", "our accuracy mean", "our accuracy std"):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
        doc.text("The published recipes train far longer (300 epochs on CIFAR with crop and flip, 90 on ImageNet): "
                 "compare our epochs before reading a gap as a failed reproduction.")
        doc.table(shown)

    datasets = sorted(done["data"].dropna().unique())
    doc.heading("Accuracy against parameters and FLOPs")
    for data in datasets:
        doc.figure(plot_accuracy_vs_cost(summary, data), f"accuracy_vs_cost_{data}",
                   f"{data}: DenseNet variants and baselines, test accuracy against parameters and FLOPs per image.")
    doc.heading("Main effects and interactions of the DenseNet knobs")
    for data in datasets:
        doc.figure(plot_main_effects(done, data), f"main_effects_{data}",
                   f"{data}: main effect of each knob on test accuracy and parameters.")
        doc.figure(plot_interactions(done, data), f"interactions_{data}",
                   f"{data}: interactions k x θ and k x B on test accuracy.")
    doc.heading("Learning curves")
    for data in datasets:
        doc.figure(plot_learning_curves(curves, data), f"learning_curves_{data}",
                   f"{data}: validation accuracy per epoch.")
    doc.heading("Gradient flow by depth")
    for data in datasets:
        doc.figure(plot_gradient_flow(norms, data), f"gradient_flow_{data}",
                   f"{data}: weight-gradient norm by relative depth (from gradient_flow/grad_norms.csv).")
    doc.heading("Feature reuse")
    doc.text("Mean over seeds of each DenseNet configuration's `feature_reuse/matrices.json`, drawn like the "
             "paper's Figure 5: pixel (s, l) is the mean |weight| per input map with which layer l reads source "
             "s; the last column is the transition (T) or classifier (C).")
    for path, caption in feature_reuse_figures(done, matrices, out):
        doc.image(path, caption)

    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html(title))
    files = [out / "report.md", out / "report.html", *doc.images()]
    return {"runs": runs, "finished": done, "summary": summary, "claims": claims, "published": published,
            "files": files}


def log_report(files: Sequence[Path], experiment: str, uri: str, sweep: str | None = None) -> str:
    """Log the report's files (not whatever else the folder holds) as the artifacts of a new report
    run (tag report=true, which load_runs skips) in `experiment`; returns its run id."""
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    tags = {"report": "true", **({"report_sweep_id": sweep} if sweep else {})}
    run = retry_locked(lambda: client.create_run(
        experiment_id, run_name=f"report-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}", tags=tags))
    for path in files:
        client.log_artifact(run.info.run_id, str(path))
    retry_locked(lambda: client.set_terminated(run.info.run_id, "FINISHED"))
    return run.info.run_id


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densenet_exp.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment)")
    parser.add_argument("--sweep", help="parent run id of one sweep (tag sweep_id of its runs); default: all runs")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    parser.add_argument("--out", type=Path, help="report folder; default: reports/<experiment>[-<sweep>]")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded file
    uri = tracking_uri(args.tracking_uri, Path.cwd())
    out = args.out or Path("reports") / (args.experiment + (f"-{args.sweep[:8]}" if args.sweep else ""))
    try:
        found = write_report(args.experiment, uri, out, args.sweep)
    except ExperimentNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_id = log_report(found["files"], args.experiment, uri, args.sweep)
    done, summary = found["finished"], found["summary"]
    print(f"report: {out / 'report.html'} ({len(done)} finished runs in {len(summary)} configurations, "
          f"{len(found['runs']) - len(done)} left out; {time.perf_counter() - started:.1f} s), MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
