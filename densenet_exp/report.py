"""The ablation report of an experiment or one sweep, read back from MLflow.

    python -m densenet_exp.report --experiment ablation [--sweep PARENT_RUN_ID]
                                  [--tracking-uri URI] [--out DIR] [--margin PP]

MLflow's UI compares runs one by one; this aggregates over seeds (densenet_exp.results), judges
the paper's claims (densenet_exp.verdicts) and writes `report.md`, a self-contained `report.html`
(images inlined as data URIs, every value from the store escaped and the page sanitized) and the
figures as PNGs to DIR (default reports/<experiment>[-<sweep>]), then logs the folder as the
artifacts of a report run (tag report=true) in the same experiment. Later reports skip report
runs. Its Method section prints every rule exactly as the code applies it.

Imports neither torch nor Lightning, so it starts in seconds.
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

import markdown
import nh3
import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from . import record
from .checks import InvalidValue, require
from .figures import (
    REUSE_NORMALIZATIONS,
    level,
    plot_accuracy_vs_cost,
    plot_feature_reuse,
    plot_knob_effects,
    plot_learning_curves,
    plot_relative_grads,
)
from .results import (
    CONFIG,
    SUMMARY_METRICS,
    ExperimentNotFound,
    InvalidRunId,
    check_run_id,
    feature_reuse_matrices,
    finished,
    learning_curves,
    load_runs,
    mean_matrices,
    pooling_problems,
    published_beside_ours,
    relative_grads,
    summarize,
)
from .store import retry_locked, tracking_uri
from .verdicts import DEFAULT_MARGIN_PP, NOISY_CV, Judgement, claims_table, conclusion, evaluate_claims, method


def feature_reuse_figures(
    runs: pd.DataFrame, matrices: dict[str, list], folder: Path, init: dict[str, list] | None = None,
    normalization: str = "column mean",
) -> list[tuple[Path, str]]:
    """One heatmap per DenseNet configuration, the mean of its runs' trained feature-reuse matrices
    (from results.feature_reuse_matrices) drawn like the paper's Figure 5 above the mean of the same
    runs' matrices at initialization (`init`, from results.feature_reuse_matrices with
    record.FEATURE_REUSE_MATRICES_INIT; "no init matrix recorded" where none of them has one), in
    `normalization` (figures.REUSE_NORMALIZATIONS), saved in `folder`: [(png, caption)]."""
    init = init or {}
    figures = []
    for key, group in runs[runs["run_id"].isin(matrices)].groupby(CONFIG, dropna=False, sort=True):
        variant, data = str(group["variant"].iloc[0]), str(key[0])
        path = folder / _file_name(f"feature_reuse_{data}_{variant}")
        with_init = [i for i in group["run_id"] if i in init]
        title = (f"{data}: feature reuse of {variant} (mean of {len(group)} runs; at initialization: "
                 + (f"mean of {len(with_init)} runs)" if with_init else "no init matrix recorded)"))
        plot_feature_reuse(mean_matrices([matrices[i] for i in group["run_id"]]), title,
                           init=mean_matrices([init[i] for i in with_init]) if with_init else None,
                           normalization=normalization).savefig(path, dpi=100)
        figures.append((path, f"{title}; colour: {REUSE_NORMALIZATIONS[normalization]}."))
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
        text += f" ± {format_number(row[f'{metric} std'])}"
        if pd.notna(row[f"{metric} ci_low"]):
            text += f" [{format_number(row[f'{metric} ci_low'])}, {format_number(row[f'{metric} ci_high'])}]"
        if metric.endswith("images_per_s") and row[f"{metric} cv"] > NOISY_CV:
            text += f" (noisy: CV {row[f'{metric} cv']:.0%})"  # timings are flagged, not judged
    return text + (f" (n={n})" if n < row["runs"] else "")


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """summarize()'s table as the report prints it: one string column per metric."""
    table = pd.DataFrame({
        "data": summary["data"],
        "model": summary["model"],
        "k": summary["growth_rate"].astype("string").fillna(""),
        "θ": summary["compression"].map(lambda v: "" if pd.isna(v) else f"{v:g}"),
        "B": summary["bottleneck"].map(lambda v: "" if pd.isna(v) else level(bool(v))),
        "depth": summary["depth"].astype("string").fillna(""),
        "runs": [f"{n} (single seed: no std)" if n == 1 else str(n) for n in summary["runs"]],
        "seeds": summary["seeds"],
        "epochs": summary["epochs"],
    })
    for metric, label in SUMMARY_METRICS.items():
        table[label] = [format_stat(row, metric) for _, row in summary.iterrows()]
    return table


def format_claims(judged: Judgement, data: str) -> pd.DataFrame:
    """One data set's claims as the report prints them: full text, p-values to 3 digits."""
    table = claims_table([c for c in judged.claims if c.data == data]).drop(columns="data")
    for column in ("p", "p (Holm)"):
        table[column] = table[column].map(lambda p: "" if p is None or pd.isna(p) else f"{p:.3g}")
    return table


# --- the document ----------------------------------------------------------------------------


def _file_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name) + ".png"


def esc(value: object) -> str:
    """A value from the store, safe in markdown and HTML: markdown passes raw HTML through only
    where a `<` opens a tag, so that is escaped (and `|`, which would break a table row)."""
    return str(value).replace("<", "&lt;").replace("|", "\\|")


def _cell(value: object) -> str:
    blank = value is None or (not isinstance(value, str) and pd.isna(value))
    return "" if blank else esc(value)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;display:block}code{background:#f3f3f3;padding:0 3px}
p>em{color:#555;font-size:13px}"""


@dataclass
class Document:
    """The report as markdown, with its PNGs saved beside it; `html` renders it with the
    `markdown` package, sanitizes the result with nh3 (no script, no event handler, images
    only as data URIs) and embeds each image, so the HTML file stands alone."""

    folder: Path
    parts: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append("#" * level + " " + text)

    def text(self, text: str) -> None:
        self.parts.append(text)

    def bullets(self, items: Sequence[str]) -> None:
        self.parts.append("\n".join(f"- {item}" for item in items))

    def table(self, frame: pd.DataFrame, bold: Sequence[str] = ()) -> None:
        cells = frame.astype(object).map(_cell).rename(columns=_cell)
        for column in bold:
            cells[column] = cells[column].map(lambda v: f"**{v}**" if v else v)
        self.parts.append(cells.to_markdown(index=False, tablefmt="github"))

    def figure(self, fig: Figure | None, name: str, caption: str) -> None:
        """Save `fig` as <name>.png in the folder and show it here (nothing when fig is None)."""
        if fig is not None:
            path = self.folder / _file_name(name)
            fig.savefig(path, dpi=100)
            self.image(path, caption)

    def image(self, path: Path, caption: str) -> None:
        self.figures.append(path)
        self.parts.append(f"![{esc(caption)}]({path.name})\n\n*{esc(caption)}*")

    def markdown(self) -> str:
        return "\n\n".join(self.parts) + "\n"

    def html(self, title: str) -> str:
        body = markdown.markdown(self.markdown(), extensions=["tables"])
        for path in self.figures:
            data = base64.b64encode(path.read_bytes()).decode()
            body = body.replace(f'src="{path.name}"', f'src="data:image/png;base64,{data}"')
        body = nh3.clean(body, url_schemes={"data"})
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


# --- the report ------------------------------------------------------------------------------


def _claims_section(doc: Document, judged: Judgement) -> None:
    doc.heading("Claims of the paper, judged on these runs")
    doc.text(f"Each claim is judged per data set by the rules of the Method section, with the margin of \"the same "
             f"accuracy\" declared before reading the runs: ±{judged.margin_pp:g} percentage points. D and R are "
             "selected on validation data, never on test data:")
    notes = [esc(n) for sel in judged.selections.values() for n in sel.notes()]
    doc.bullets(notes or ["no finished runs"])
    if not judged.claims:
        doc.text("No finished runs: nothing to judge.")
    for data in sorted(judged.selections):
        doc.heading(esc(data), 3)
        doc.table(format_claims(judged, data), bold=["verdict"])
        family = judged.families.get(data, [])
        doc.text(f"Holm-Bonferroni family ({len(family)} tests): "
                 + ("; ".join(family) if family else "none (no claim had a test)") + ".")


def write_report(experiment: str, uri: str, out: Path, sweep: str | None = None,
                 margin_pp: float = DEFAULT_MARGIN_PP) -> dict[str, object]:
    """Read the runs, write report.md, report.html and the PNGs to `out`; returns what it found
    (runs, finished, summary, judgement, claims, published, files) for callers and tests."""
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(experiment, uri, sweep)
    done = finished(runs)
    left_out = runs[runs["status"] != "FINISHED"]
    summary = summarize(done)
    matrices = feature_reuse_matrices(done[done["family"] == "densenet"], uri)
    init_matrices = feature_reuse_matrices(done[done["family"] == "densenet"], uri, record.FEATURE_REUSE_MATRICES_INIT)
    judged = evaluate_claims(done, matrices, margin_pp)
    published = published_beside_ours(done)
    curves = learning_curves(done, uri)
    grads = relative_grads(done, uri)

    title = f"DenseNet ablation report: {experiment}" + (f", sweep {sweep}" if sweep else "")
    doc = Document(out)
    doc.heading(esc(title), 1)
    doc.text(f"Store `{esc(uri)}`, experiment `{esc(experiment)}`" + (f", sweep `{esc(sweep)}`" if sweep else "")
             + f"; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. {len(runs)} training runs read: "
             f"{len(done)} finished and used, {len(left_out)} left out. Margin of \"the same accuracy\": "
             f"±{margin_pp:g} percentage points (--margin).")

    notes = [f"`{esc(c)}` on {esc(d)}: single seed, so no std, no interval and no test"
             for c, d, n in zip(summary["variant"], summary["data"], summary["runs"]) if n == 1]
    notes += [esc(p) for p in pooling_problems(done)]
    no_val = done[(done["val_size"] == 0).fillna(False).astype(bool)] if "val_size" in done else done.iloc[:0]
    if len(no_val):
        notes.append(f"{len(no_val)} run(s) trained without a validation split (data.val_size=0): "
                     + esc(", ".join(sorted(no_val["variant"].astype(str).unique()))))
    if notes:
        doc.heading("Notes")
        doc.bullets(notes)

    doc.heading("Runs left out")
    if left_out.empty:
        doc.text("None: every run read finished.")
    else:
        doc.table(left_out[["variant", "data", "seed", "status", "error", "run_id"]].astype("string").fillna(""))

    doc.heading("Results per configuration")
    doc.text("One row per configuration (data set, model, k, θ, B): its runs differ only in the seed. Cells give "
             "mean ± std [95% interval] over seeds (intervals as in the Method section: they stay inside the "
             "metric's range); a blank means no run logged the metric. Data sets are never pooled.")
    if summary.empty:
        doc.text("No finished runs.")
    for data, table in format_summary(summary).groupby("data", sort=True):
        doc.heading(esc(data), 3)
        doc.table(table.drop(columns="data"))

    _claims_section(doc, judged)
    doc.heading("What this shows")
    doc.bullets([esc(line) for line in conclusion(judged)] or ["No finished runs."])

    doc.heading("Published figures beside ours")
    if published.empty:
        doc.text("No configuration here matches a published one (rule in the Method section): e.g. DenseNet-BC "
                 "(L=100, k=12), `densenet_bc100_k12` on `cifar10` with `data.augment=crop_flip`, 4.51% error on "
                 "C10+ (Huang et al. 2017, Table 2).")
    else:
        shown = published.copy()
        for column in ("published accuracy", "our accuracy mean", "our accuracy std"):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
        doc.text("The published recipes train far longer (300 epochs on CIFAR with crop and flip, 90 on ImageNet): "
                 "compare our epochs before reading a gap as a failed reproduction.")
        doc.table(shown)

    datasets = sorted(done["data"].dropna().unique())
    # (heading, figure of one data set, file name, caption): one figure per data set under each heading.
    per_data_set = [
        ("Accuracy against parameters and FLOPs", lambda d: plot_accuracy_vs_cost(summary, d), "accuracy_vs_cost",
         "DenseNet variants and baselines, test accuracy against parameters and FLOPs per image."),
        ("Effects of the DenseNet knobs", lambda d: plot_knob_effects(done, d), "knob_effects",
         "each knob with two or more levels, one line per setting of the others."),
        ("Learning curves", lambda d: plot_learning_curves(curves, d), "learning_curves",
         "validation accuracy per epoch."),
        ("Gradient flow by depth", lambda d: plot_relative_grads(grads, d), "gradient_flow",
         "relative gradient of the body's 3x3 convs by their position (from gradient_flow/relative_grads.csv)."),
    ]
    for heading, plot, name, caption in per_data_set:
        doc.heading(heading)
        for data in datasets:
            doc.figure(plot(data), f"{name}_{data}", f"{data}: {caption}")
    doc.heading("Feature reuse")
    doc.text("Mean over seeds of each DenseNet configuration's `feature_reuse/matrices.json`, drawn like the "
             "paper's Figure 5: pixel (s, l) is the mean |weight| per input map with which layer l reads source "
             "s; the last column is the transition (T) or classifier (C). Below, the same runs' matrices at step 0, "
             "before any update (`feature_reuse/matrices_init.json`): what training changed is the difference.")
    for path, caption in feature_reuse_figures(done, matrices, out, init_matrices):
        doc.image(path, caption)

    doc.heading("Method")
    doc.bullets(method_lines(margin_pp))

    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html(title))
    (out / "headline.md").write_text(headline(summary, judged))
    files = [out / "report.md", out / "report.html", out / "headline.md", *doc.figures]
    return {"runs": runs, "finished": done, "summary": summary, "judgement": judged, "claims": judged.claims,
            "published": published, "files": files}


HEADLINE_METRICS = {  # the README's results table: metric -> column
    record.TEST_ACC: "test accuracy",
    record.PARAMS: "parameters",
    record.FLOPS_PER_IMAGE: "FLOPs / image",
    record.TRAIN_IMAGES_PER_S: "train images/s",
    record.TRAIN_STEP_MB: "train-step memory (MiB)",
}


def headline(summary: pd.DataFrame, judged: Judgement) -> str:
    """The short form of a report for a README: per configuration the mean ± std over seeds of
    HEADLINE_METRICS (n runs), then each claim's verdict. Written as `headline.md` beside the
    report, so the README's figures come from the same code and runs (a test compares them)."""
    lines = []
    for data, rows in summary.groupby("data", sort=True):
        table = pd.DataFrame({"configuration": rows["variant"], "runs": rows["runs"]})
        for metric, label in HEADLINE_METRICS.items():
            table[label] = [
                "" if not row[f"{metric} n"] else format_number(row[f"{metric} mean"])
                + (f" ± {format_number(row[f'{metric} std'])}" if row[f"{metric} n"] > 1 else "")
                for _, row in rows.iterrows()
            ]
        lines += [f"**{esc(data)}** (mean ± std over seeds):", "",
                  table.astype(object).map(_cell).to_markdown(index=False, tablefmt="github"), ""]
        lines += [f"- {esc(c.claim)}: **{esc(c.label)}**" for c in judged.claims if c.data == data]
        lines.append("")
    return "\n".join(lines)


def method_lines(margin_pp: float) -> list[str]:
    """The Method section's bullets: verdicts.method's rules, verbatim."""
    return [f"**{name}**: {text}" for name, text in method(margin_pp)]


def log_report(files: Sequence[Path], experiment: str, uri: str, sweep: str | None = None) -> str:
    """Log the report's files (not whatever else the folder holds) as the artifacts of a new report
    run (tag report=true, which load_runs skips) in `experiment`; returns its run id."""
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    tags = {record.REPORT: "true", **({record.REPORT_SWEEP_ID: sweep} if sweep else {})}
    run = retry_locked(lambda: client.create_run(
        experiment_id, run_name=f"report-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}", tags=tags))
    for path in files:
        client.log_artifact(run.info.run_id, str(path))
    retry_locked(lambda: client.set_terminated(run.info.run_id, "FINISHED"))
    return run.info.run_id


def _margin(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    try:
        require("--margin", text, 0 < value < 100, "percentage points in (0, 100)")
    except InvalidValue as err:  # argparse prints an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densenet_exp.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment)")
    parser.add_argument("--sweep", help="parent run id of one sweep (tag sweep_id of its runs); default: all runs")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    parser.add_argument("--out", type=Path, help="report folder; default: reports/<experiment>[-<sweep>]")
    parser.add_argument("--margin", type=_margin, default=DEFAULT_MARGIN_PP,
                        help="margin of 'the same accuracy' in percentage points, declared before reading the runs "
                             f"(default {DEFAULT_MARGIN_PP:g})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded file
    uri = tracking_uri(args.tracking_uri, Path.cwd())
    try:
        if args.sweep is not None:
            check_run_id(args.sweep)  # before it names a folder or enters a search filter
        out = args.out or Path("reports") / (args.experiment + (f"-{args.sweep[:8]}" if args.sweep else ""))
        found = write_report(args.experiment, uri, out, args.sweep, args.margin)
    except (ExperimentNotFound, InvalidRunId) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_id = log_report(found["files"], args.experiment, uri, args.sweep)
    done, summary = found["finished"], found["summary"]
    print(f"report: {out / 'report.html'} ({len(done)} finished runs in {len(summary)} configurations, "
          f"{len(found['runs']) - len(done)} left out; {time.perf_counter() - started:.1f} s), MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
