"""The ablation report of an experiment or one sweep, read back from MLflow.

    python -m densenet_exp.report --experiment ablation [--sweep PARENT_RUN_ID]
                                  [--tracking-uri URI] [--out DIR] [--margin PP]

MLflow's UI compares runs one by one; this aggregates over seeds (densenet_exp.results), judges
the paper's claims (densenet_exp.verdicts) and writes `report.md`, a self-contained `report.html`
(images inlined as data URIs, every value from the store escaped and the page sanitized) and the
figures as PNGs to DIR (default reports/<experiment>[-<sweep>]), then logs the folder as the
artifacts of a report run (tag report=true) in the same experiment. Later reports skip report
runs. Its Method section prints every rule exactly as the code applies it.

Imports neither torch nor Lightning, and MLflow only once it reads a store, so `--help` answers
at once (tools/startup-time measures it).
"""

from __future__ import annotations

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
from urllib.parse import urlsplit

import markdown
import nh3
import pandas as pd
from matplotlib.figure import Figure

from . import record
from .checks import EXIT_STORE_DOWN, ArgumentParser, entry_point, require, require_flag, require_name
from .analysis.figures import (
    level,
    plot_accuracy_vs_cost,
    plot_knob_effects,
    plot_learning_curves,
    plot_param_importances,
    plot_relative_grads,
    plot_search_history,
)
from .measures.run_figures import REUSE_NORMALIZATIONS, plot_feature_reuse
from .analysis.results import (
    CONFIG,
    SUMMARY_METRICS,
    accuracy_label,
    accuracy_of,
    check_run_id,
    feature_reuse_matrices,
    finished,
    learning_curves,
    load_runs,
    mean_matrices,
    param_importances,
    pooling_problems,
    test_predictions,
    published_beside_ours,
    relative_grads,
    search_trials,
    summarize,
)
from .runs.store import StoreUnreachable, bound_tool_waits, check_store, retry_locked, tool_uri
from .analysis.declared import ONCE_RULE, one_per_declared
from .claims import Confirmation, describe, judge_plan, load_plan
from .claims import rules as plan_rules
from .claims.evidence import confirmation_runs, planned_seeds
from .plan import Plan
from .analysis.tables import (FORMATS, PAPER_METRICS, accuracy_columns, headline_table, stat_text, summary_cell,
                              write_tables)
from .analysis.verdicts import DEFAULT_MARGIN_PP, NOISY_CV, Claim, Judgement, claims_table, conclusion, evaluate_claims, method


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


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """summarize()'s table as the report prints it: one string column per metric of SUMMARY_METRICS,
    named, scaled and written as the paper tables do (tables.summary_cell; accuracy by
    ACCURACY_RULE, so pass one data set's rows), timings flagged where noisy."""
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
    if "differs" in summary and summary["differs"].fillna("").astype(bool).any():  # names that collide
        table.insert(2, "differs", summary["differs"].fillna(""))
    for metric, (label, scale) in accuracy_columns(summary, {m: PAPER_METRICS[m] for m in SUMMARY_METRICS}).items():
        noisy = metric.endswith("images_per_s")  # timings are flagged, not judged
        table[label] = [summary_cell(row, metric, scale)
                        + (f" (noisy: CV {row[f'{metric} cv']:.0%})" if noisy and row[f"{metric} cv"] > NOISY_CV else "")
                        for _, row in summary.iterrows()]
    return table


def format_claim_list(claims: Sequence[Claim]) -> pd.DataFrame:
    """Claims as the report prints them: full text, p-values to 3 digits, no data column."""
    table = claims_table(claims).drop(columns="data")
    for column in ("p", "p (Holm)"):
        table[column] = table[column].map(lambda p: "" if p is None or pd.isna(p) else f"{p:.3g}")
    return table


def format_claims(judged: Judgement, data: str) -> pd.DataFrame:
    """One data set's claims as the report prints them: full text, p-values to 3 digits."""
    return format_claim_list([c for c in judged.claims if c.data == data])


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
# What report.html may point at: its own figures, inlined, and links to the web (never a
# scheme-less `//host/...` address nor a `data:` page, which markdown in a run name could make).
IMAGE_PREFIX = "data:image/png;base64,"
LINK_SCHEMES = ("http", "https")


def _allowed_url(element: str, attribute: str, value: str) -> str | None:
    """nh3's last word on each attribute: an image only from a PNG data URI, a link only to an
    absolute http(s) address (None drops the attribute)."""
    if attribute == "src":
        return value if element == "img" and value.startswith(IMAGE_PREFIX) else None
    if attribute == "href":
        parts = urlsplit(value)
        return value if parts.scheme in LINK_SCHEMES and parts.netloc else None
    return value


@dataclass
class Document:
    """The report as markdown, with its PNGs saved beside it; `html` renders it with the
    `markdown` package, embeds each image and sanitizes the result with nh3 (no script, no event
    handler, images only as PNG data URIs, links only to http(s) addresses: `_allowed_url`), so
    the HTML file stands alone and loads nothing from elsewhere."""

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
            body = body.replace(f'src="{path.name}"', f'src="{IMAGE_PREFIX}{data}"')
        body = nh3.clean(body, url_schemes={"data", *LINK_SCHEMES}, url_relative="deny", attribute_filter=_allowed_url)
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


@dataclass
class Evidence:
    """What a report reads from the store: every training run, the finished ones (a search's
    trials apart, in `studies`), their validation curves, relative gradients and feature-reuse
    matrices (trained and at init)."""

    runs: pd.DataFrame
    done: pd.DataFrame
    curves: pd.DataFrame
    grads: pd.DataFrame
    matrices: dict[str, list]
    init: dict[str, list]
    studies: dict[str, pd.DataFrame] = field(default_factory=dict)  # Optuna study name -> its trials
    predictions: dict[str, pd.DataFrame] | None = None  # run_id -> its test predictions; None: not read yet
    uri: str = ""  # where judge reads a plan's test predictions from, only when a plan is judged


def load_evidence(experiment: str, uri: str, sweep: str | None = None) -> Evidence:
    runs = load_runs(experiment, uri, sweep)
    studies = search_trials(finished(runs))
    # A search's trials are one seed each, chosen on validation accuracy: shown as a search, never
    # judged as configurations (search.py --top trains the best again with confirmation seeds).
    trial_ids = {i for trials in studies.values() for i in trials["run_id"]}
    done = finished(runs)[lambda r: ~r["run_id"].isin(trial_ids)]
    dense = done[done["family"] == "densenet"]
    return Evidence(runs, done, learning_curves(done, uri), relative_grads(done, uri),
                    feature_reuse_matrices(dense, uri), feature_reuse_matrices(dense, uri, record.FEATURE_REUSE_MATRICES_INIT),
                    studies, uri=uri)


def _search_section(doc: Document, studies: dict[str, pd.DataFrame], experiment: str) -> None:
    """Each Optuna search as a search: its best trial, its trials (best first), the history and the
    parameters' importances."""
    doc.heading("Search")
    doc.text("Trials of a hyperparameter search train one seed each and are chosen on validation accuracy, so they "
             "are shown here and not judged as configurations. Train the best again with new seeds: "
             f"`python -m densenet_exp.search --experiment {esc(experiment)} --top 3`; the report then judges those "
             "runs.")
    for name, trials in studies.items():
        doc.heading(f"Study `{esc(name)}`", 3)
        objective, direction = trials.attrs["objective"], trials.attrs["direction"]
        done = trials.dropna(subset=["objective"])
        params = [c for c in trials.columns if c not in ("trial", "objective", "run_id", "variant")]
        if done.empty:
            doc.text("No finished trial logged the objective.")
            continue
        best = done.loc[done["objective"].idxmin() if direction == "minimize" else done["objective"].idxmax()]
        values = ", ".join(f"{p} = {best[p]}" for p in params)
        doc.text(f"{len(done)} finished trials; objective {esc(objective)} ({direction}d). Best: trial "
                 f"{best['trial']}, {esc(objective)} {best['objective']:.4f} with {esc(values)} (run "
                 f"`{esc(best['run_id'])}`).")
        ranked = done.sort_values("objective", ascending=direction == "minimize").head(10)
        doc.table(ranked.assign(objective=ranked["objective"].map(lambda v: f"{v:.4f}"))[
            ["trial", "objective", *params, "run_id"]].rename(columns={"objective": objective}))
        doc.figure(plot_search_history(trials, f"{name}: {objective} per trial"), f"search_history_{name}",
                   f"{name}: each trial's {objective} and the best so far.")
        importances = param_importances(trials)
        if importances:
            doc.figure(plot_param_importances(importances, f"{name}: parameter importances"),
                       f"search_importances_{name}",
                       f"{name}: how much each parameter explains the objective over the trials (Optuna's "
                       "default importance evaluator).")
        else:
            doc.text("Parameter importances need at least two finished trials with different results.")




@dataclass
class Findings:
    """What the report concludes: the declared plan's verdicts on its confirmation runs (if a plan
    was given), the exploratory claims on every other finished run, and their summaries."""

    evidence: Evidence
    explored: pd.DataFrame  # the finished runs outside the plan's confirmation stage
    summary: pd.DataFrame  # of `explored`
    judgement: Judgement  # exploratory
    margin_pp: float
    confirmation: Confirmation | None = None
    confirmed: pd.DataFrame | None = None  # summary of the confirmation runs, one row per arm
    published: pd.DataFrame = field(default_factory=pd.DataFrame)
    files: list[Path] = field(default_factory=list)
    experiment: str = ""

    @property
    def search_only(self) -> bool:
        """Whether every finished run is a search trial: the report is the search's alone."""
        return bool(self.evidence.studies) and self.evidence.done.empty

    def counts(self) -> str:
        """What the report rests on, for the line the CLI prints."""
        runs, trials = self.evidence.runs, sum(len(t) for t in self.evidence.studies.values())
        left_out = f"{(runs['status'] != 'FINISHED').sum()} left out"
        if self.search_only:
            return (f"search report: {trials} finished trials in {len(self.evidence.studies)} search(es), no run "
                    f"outside them, {left_out}")
        configurations = len(self.summary) + (0 if self.confirmed is None else len(self.confirmed))
        return (f"{len(self.evidence.done)} finished runs in {configurations} configurations, "
                + (f"{trials} search trials, " if trials else "") + left_out)


def judge(evidence: Evidence, margin_pp: float, plan: Plan | None = None) -> Findings:
    done = evidence.done
    confirmation, confirmed, explored = None, None, done
    if plan is not None:
        # ONCE_RULE first: a duplicate or a run of another config never reaches a verdict or a table.
        runs, left_out = one_per_declared(plan, evidence.runs)
        done = done[done["run_id"].isin(runs["run_id"])]
        mine = confirmation_runs(plan, done)
        if evidence.predictions is None:  # a plan's runs only: one download per run, so not for every report
            evidence.predictions = test_predictions(mine, evidence.uri) if evidence.uri else {}
        confirmation = judge_plan(plan, runs, evidence.curves, evidence.matrices, evidence.init, evidence.grads,
                                  evidence.predictions)
        confirmation.notes += left_out
        explored = done[~done["run_id"].isin(mine["run_id"])]
        arm = mine[f"tags.{record.STUDY_ARM}"]  # a plan's rows are named by its arms
        confirmed = summarize(mine.assign(model=arm, variant=arm), [*SUMMARY_METRICS, record.TRAIN_LOSS])
    judged = evaluate_claims(explored, evidence.matrices, margin_pp, evidence.init, evidence.grads, evidence.curves)
    return Findings(evidence, explored, summarize(explored), judged, margin_pp, confirmation, confirmed,
                    published_beside_ours(done))


def arms_table(found: Findings) -> pd.DataFrame:
    """A declared plan's confirmation runs, one row per arm, as the report prints them (format_summary's
    columns less the knobs, with `converged`: how many runs met the convergence rule)."""
    conf = found.confirmation
    table = format_summary(found.confirmed).rename(columns={"model": "arm"}).drop(columns=["data", "k", "θ", "B"])
    table["converged"] = [f"{len(a.runs) - len(a.not_converged)} of {len(a.runs)}" for a in
                          (conf.arms[name] for name in found.confirmed["model"])]
    return table


def _plan_section(doc: Document, found: Findings) -> None:
    conf = found.confirmation
    doc.heading(f"Declared plan: {esc(conf.plan.name)}")
    doc.text("The claims below were declared in the plan file before its confirmation runs started, and are judged "
             "on those runs alone (fresh seeds no selection looked at). The plan as read now:")
    doc.bullets([esc(line) for line in describe(conf.plan)])
    doc.bullets([esc(line) for line in conf.notes])
    doc.heading("Confirmation runs per arm", 3)
    doc.text("Mean ± std [95% interval] over the arm's seeds; `converged` counts runs that met the convergence rule "
             "(Method).")
    doc.table(arms_table(found))
    late = [f"{esc(a.name)} {esc(s)}" for a in conf.arms.values() for s in a.not_converged]
    if late:
        doc.text("Not converged: " + "; ".join(late) + ".")
    doc.heading("Declared claims, judged on the confirmation runs", 3)
    doc.table(format_claim_list(conf.claims), bold=["verdict"])
    doc.text(esc(conf.procedure) + (" The family: " + "; ".join(esc(c) for c in conf.family) + "." if conf.family
                                     else ""))


def render(found: Findings, out: Path, title: str, intro: str) -> list[Path]:
    """Write report.md, report.html, headline.md and the PNGs to `out`; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    ev, done, summary, judged = found.evidence, found.explored, found.summary, found.judgement
    left_out = ev.runs[ev.runs["status"] != "FINISHED"]
    doc = Document(out)
    doc.heading(esc(title), 1)
    doc.text(intro)

    notes = [f"`{esc(c)}` on {esc(d)}: single seed, so no std, no interval and no test"
             for c, d, n in zip(summary["variant"], summary["data"], summary["runs"]) if n == 1]
    notes += [esc(p) for p in pooling_problems(done)]
    no_val = done[(done["val_size"] == 0).fillna(False).astype(bool)] if "val_size" in done else done.iloc[:0]
    if len(no_val):
        notes.append(f"{len(no_val)} run(s) trained without a validation split (data.val_size=0): "
                     + esc(", ".join(sorted(no_val["variant"].astype(str).unique()))))
    untested = done[done[record.TEST_ACC].isna()] if record.TEST_ACC in done else done
    if len(untested):
        notes.append(f"no held-out test set for {len(untested)} run(s) ("
                     + esc(", ".join(sorted(untested["variant"].astype(str).unique())))
                     + "): their data has no test split (an image folder without test/), so they have no test "
                     "accuracy; their validation images chose the model and are not a test")
    if found.confirmation is not None:
        _plan_section(doc, found)
        doc.heading("Exploration: runs outside the confirmation stage (no verdicts)")
        doc.text("The pilot and any other finished run of the experiment. Read as exploration: what the tests would "
                 "say is labelled exploratory, since these runs chose the arms, learning rates and epochs.")
    if notes:
        doc.heading("Notes")
        doc.bullets(notes)

    doc.heading("Runs left out")
    if left_out.empty:
        doc.text("None: every run read finished.")
    else:
        doc.table(left_out[["variant", "data", "seed", "status", "error", "run_id"]].astype("string").fillna(""))

    if ev.studies:
        _search_section(doc, ev.studies, found.experiment)
    if found.search_only:  # nothing else to summarize, judge or draw
        return _write(doc, found, out, title)

    doc.heading("Results per configuration")
    doc.text("One row per configuration: its runs differ only in the seed (runs that differ in anything else, a "
             "block_config, an image folder, a learning rate, are never pooled; where two rows share a name, column "
             "`differs` says how they differ). Cells give "
             "mean ± std [95% interval] over seeds, rounded to the std's precision, accuracies in percent (intervals "
             "as in the Method section: they stay inside the metric's range and need 3 seeds); a blank means no run "
             "logged the metric. Data sets are never pooled.")
    if summary.empty:
        doc.text("No finished runs.")
    for data, rows in summary.groupby("data", sort=True):
        doc.heading(esc(data), 3)
        doc.table(format_summary(rows).drop(columns="data"))

    _claims_section(doc, judged)
    doc.heading("What this shows")
    doc.bullets([esc(line) for line in conclusion(judged)] or ["No finished runs."])
    _published_section(doc, found.published)

    shown = ev.done if found.confirmation is None else confirmation_runs(found.confirmation.plan, ev.done)
    shown_summary = summary if found.confirmation is None else summarize(shown)
    curves = ev.curves[ev.curves["run_id"].isin(shown["run_id"])]
    planned = None if found.confirmation is None else planned_seeds(found.confirmation.plan, shown)
    grads = ev.grads[ev.grads["run_id"].isin(shown["run_id"])]
    datasets = sorted(shown["data"].dropna().unique())
    which = "" if found.confirmation is None else " (confirmation runs)"
    # (heading, figure of one data set, file name, caption with the data set's {accuracy}, what it
    # needs): one figure per data set under each heading, where it has something to draw.
    per_data_set = [
        ("Accuracy against parameters and FLOPs" + which, lambda d: plot_accuracy_vs_cost(shown_summary, d),
         "accuracy_vs_cost", "DenseNet variants and baselines, {accuracy} against parameters and FLOPs per image.",
         "an accuracy and a parameter or FLOP count"),
        ("Effects of the DenseNet knobs" + which, lambda d: plot_knob_effects(shown, d), "knob_effects",
         "{accuracy} and parameters by each knob with two or more levels, one line per setting of the others.",
         "a DenseNet knob at two or more levels"),
        ("Learning curves" + which, lambda d: plot_learning_curves(curves, d, planned=planned), "learning_curves",
         "validation accuracy at each validation check (one value per run per point), placed in epochs; "
         "n is the runs (seeds) of each configuration, and the dotted lines are the recipe's learning-rate drops.",
         "a validation accuracy history"),
        ("Gradient flow by depth" + which, lambda d: plot_relative_grads(grads, d), "gradient_flow",
         "relative gradient of the body's 3x3 convs by their position (from gradient_flow/relative_grads.csv).",
         "relative gradients of body 3x3 convs (the gradient-flow probe)"),
    ]
    for heading, plot, name, caption, needs in per_data_set:
        doc.heading(heading)
        drawn = {data: plot(data) for data in datasets}
        for data, fig in drawn.items():
            accuracy = accuracy_label(accuracy_of(shown[shown["data"] == data]))
            doc.figure(fig, f"{name}_{data}", f"{data}: {caption.format(accuracy=accuracy)}")
        if not any(fig is not None for fig in drawn.values()):
            doc.text(f"No figure: no data set has {needs}.")
    doc.heading("Feature reuse" + which)
    doc.text("Mean over seeds of each DenseNet configuration's `feature_reuse/matrices.json`, drawn like the "
             "paper's Figure 5: pixel (s, l) is the mean |weight| per input map with which layer l reads source "
             "s; the last column is the transition (T) or classifier (C). Below, the same runs' matrices at step 0, "
             "before any update (`feature_reuse/matrices_init.json`): what training changed is the difference.")
    for path, caption in feature_reuse_figures(shown, ev.matrices, out, ev.init):
        doc.image(path, caption)

    doc.heading("Method")
    if found.confirmation is not None:
        doc.text("Rules of the declared claims:")
        doc.bullets([f"**{name}**: {text}" for name, text in [("once per declared job", ONCE_RULE),
                                                               *plan_rules(found.confirmation.plan)]])
        doc.text("Rules of the exploratory claims:")
    doc.bullets(method_lines(found.margin_pp))
    return _write(doc, found, out, title)


def _write(doc: Document, found: Findings, out: Path, title: str) -> list[Path]:
    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html(title))
    (out / "headline.md").write_text(headline(found))
    return [out / "report.md", out / "report.html", out / "headline.md", *doc.figures]


def _published_section(doc: Document, published: pd.DataFrame) -> None:
    doc.heading("Published figures beside ours")
    if published.empty:
        doc.text("No configuration here matches a published one (rule in the Method section): e.g. DenseNet-BC "
                 "(L=100, k=12), `densenet_bc100_k12` on `cifar10` with `data.augment=crop_flip`, 4.51% error on "
                 "C10+ (Huang et al. 2017, Table 2).")
        return
    shown = published.drop(columns=["published accuracy", "our accuracy mean", "our accuracy std"])
    # In percent and rounded as every table of the report (tables.stat_text).
    shown.insert(3, "published accuracy (%)", [stat_text(100 * v) for v in published["published accuracy"]])
    shown.insert(5, "our accuracy (%)", [stat_text(100 * m, 100 * s) for m, s in
                                         zip(published["our accuracy mean"], published["our accuracy std"])])
    doc.text("The published recipes train far longer (300 epochs on CIFAR with crop and flip, 90 on ImageNet): "
             "compare our epochs before reading a gap as a failed reproduction.")
    doc.table(shown)


def write_report(experiment: str, uri: str, out: Path, sweep: str | None = None,
                 margin_pp: float = DEFAULT_MARGIN_PP, plan: Plan | None = None,
                 table_format: str | None = None) -> Findings:
    """Read the runs, judge them (the plan's declared claims on its confirmation runs, exploratory
    claims on the rest) and write report.md, report.html and the PNGs to `out` (and, with
    `table_format`, the per-configuration and claims tables for a paper: tables.write_tables)."""
    evidence = load_evidence(experiment, uri, sweep)
    found = judge(evidence, margin_pp, plan)
    found.experiment = experiment
    kind = "Search report" if found.search_only else "DenseNet ablation report"
    title = f"{kind}: {experiment}" + (f", sweep {sweep}" if sweep else "")
    runs, done = evidence.runs, evidence.done
    trials = sum(len(t) for t in evidence.studies.values())
    intro = (f"Store `{esc(uri)}`, experiment `{esc(experiment)}`" + (f", sweep `{esc(sweep)}`" if sweep else "")
             + f"; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. {len(runs)} training runs read: "
             f"{len(done)} finished and used, {trials} search trials (section Search), "
             f"{(runs['status'] != 'FINISHED').sum()} left out. Margin of \"the same accuracy\" in the "
             f"exploratory claims: ±{margin_pp:g} percentage points (--margin)."
             + (f" Declared plan: `{esc(plan.path)}`." if plan else " No declared plan (--plan): every claim below is "
                "exploratory."))
    found.files = render(found, out, title, intro)
    if table_format:
        conf = found.confirmation  # a plan's tables are its arms and declared claims
        summary, claims = (found.summary, found.judgement.claims) if conf is None else (found.confirmed, conf.claims)
        found.files += write_tables(summary, claims_table(claims), out, table_format)
    return found


HEADLINE_METRICS = (record.TEST_ACC, record.PARAMS, record.FLOPS_PER_IMAGE, record.TRAIN_IMAGES_PER_S,
                    record.TRAIN_STEP_MB)  # the README's results table, columns as tables.PAPER_METRICS names them


def _headline_table(rows: pd.DataFrame, metrics: Sequence[str]) -> str:
    return headline_table(rows, metrics).astype(object).map(_cell).to_markdown(index=False, tablefmt="github")


def headline(found: Findings) -> str:
    """The short form of a report for a README: per configuration (per arm of a declared plan) the
    mean ± std over seeds of HEADLINE_METRICS, rounded to their uncertainty as in the paper tables
    (tables.py), then each claim's verdict with its evidence, then the warnings. Written as
    `headline.md` beside the report, so the README's figures come from the same code and runs (a
    test compares them)."""
    conf = found.confirmation
    if conf is not None:
        lines = [f"**{esc(conf.plan.name)}**: declared plan, confirmation runs (mean ± std over seeds):", "",
                 _headline_table(found.confirmed, [*HEADLINE_METRICS, record.TRAIN_LOSS]), ""]
        lines += [f"- {esc(c.claim)}: **{esc(c.label)}**. {esc(c.evidence)}" for c in conf.claims]
        lines += ["", "Warnings: " + " ".join(esc(n) for n in conf.notes), ""]
        return "\n".join(lines)
    lines = []
    for data, rows in found.summary.groupby("data", sort=True):
        lines += [f"**{esc(data)}** (mean ± std over seeds; exploratory: no declared plan):", "",
                  _headline_table(rows, HEADLINE_METRICS), ""]
        lines += [f"- {esc(c.claim)}: **{esc(c.label)}**. {esc(c.evidence)}" for c in found.judgement.claims
                  if c.data == data]
        lines += ["", "Warnings: " + " ".join(esc(w) for w in found.judgement.warnings.get(data, [])), ""]
    return "\n".join(lines)


def method_lines(margin_pp: float) -> list[str]:
    """The Method section's bullets: verdicts.method's rules, verbatim."""
    return [f"**{name}**: {text}" for name, text in method(margin_pp)]


def log_report(files: Sequence[Path], experiment: str, uri: str, sweep: str | None = None) -> str:
    """Log the report's files (not whatever else the folder holds) as the artifacts of a new report
    run (tag report=true, which load_runs skips) in `experiment`; returns its run id."""
    from mlflow.tracking import MlflowClient  # seconds of import: not for --help

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
    require_flag("--margin", text, 0 < value < 100, "percentage points in (0, 100)")
    return value


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m densenet_exp.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", help="MLflow experiment name (tracking.experiment); default: the plan's")
    parser.add_argument("--plan", help="a declared study plan (YAML): its claims are judged on its confirmation runs")
    parser.add_argument("--sweep", help="parent run id of one sweep (tag sweep_id of its runs); default: all runs")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    parser.add_argument("--out", type=Path, help="report folder; default: reports/<experiment>[-<sweep>]")
    parser.add_argument("--format", choices=FORMATS, dest="table_format",
                        help="also write the per-configuration and claims tables for a paper as configurations.EXT and "
                             "claims.EXT (csv, tex, md), numbers rounded to their uncertainty")
    parser.add_argument("--margin", type=_margin, default=DEFAULT_MARGIN_PP,
                        help="margin of 'the same accuracy' in percentage points, declared before reading the runs "
                             f"(default {DEFAULT_MARGIN_PP:g})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded file
    uri, key = tool_uri(args.tracking_uri)
    bound_tool_waits()
    try:
        plan = load_plan(args.plan) if args.plan else None
        experiment = args.experiment or (plan.experiment if plan else None)
        require("--experiment", experiment, experiment is not None, "an MLflow experiment name (or --plan)")
        if args.sweep is not None:
            check_run_id(args.sweep)  # before it names a folder or enters a search filter
        if args.out is None:
            require_name("--experiment", experiment)  # it names the folder under reports/
        check_store(uri, key)  # the checks training makes; a report never creates a store
        out = args.out or Path("reports") / (experiment + (f"-{args.sweep[:8]}" if args.sweep else ""))
        found = write_report(experiment, uri, out, args.sweep, args.margin, plan, args.table_format)
    except StoreUnreachable as err:
        print(f"error: {err}: start it, or point {key} at another store", file=sys.stderr)
        return EXIT_STORE_DOWN
    run_id = log_report(found.files, experiment, uri, args.sweep)
    print(f"report: {out / 'report.html'} ({found.counts()}; {time.perf_counter() - started:.1f} s), MLflow run {run_id}")
    if args.table_format:
        print("tables: " + ", ".join(str(p) for p in found.files[-2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
