"""Tables for a paper: the per-configuration table and the claims table as CSV, LaTeX or markdown.

    python -m densenet_exp.report --experiment ablation --format latex   # configurations.tex, claims.tex

Every number of every table (these, the report's and its headline) is written by `numbers`: the
std over seeds to one significant digit, two when it starts with 1, and the mean and the 95%
interval to the same decimal place (`83.4 ± 0.8 [81.6, 85.0]`, `81.4 ± 1.7`); a figure that is
the same in every run (parameters, FLOPs) is written without `± 0`, and a single run's figure
alone, to four significant digits. Accuracies are in percent. Markdown and LaTeX hold the same
cells; the CSV splits each into mean, std, ci_low, ci_high and n columns holding the same
numbers. Where the data has no test split, validation accuracy takes the test column's place,
labelled as such (results.ACCURACY_RULE). Light to import: no MLflow, no SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from .. import record
from .results import NO_TEST_SPLIT, accuracy_of

FORMATS = {"csv": "csv", "latex": "tex", "md": "md"}  # --format -> file extension
# metric -> (column, scale): the configuration table's figures, as the paper prints them.
PAPER_METRICS = {
    record.VAL_ACC: ("validation accuracy (%)", 100.0),
    record.TEST_ACC: ("test accuracy (%)", 100.0),
    record.PARAMS: ("parameters", 1.0),
    record.FLOPS_PER_IMAGE: ("FLOPs / image", 1.0),
    record.TRAIN_STEP_MB: ("train-step memory (MiB)", 1.0),
    record.TRAIN_IMAGES_PER_S: ("train images/s", 1.0),
    record.INFER_IMAGES_PER_S: ("inference images/s", 1.0),
    record.TRAIN_LOSS: ("final train loss", 1.0),
}
# A CSV cell a spreadsheet would run as a formula starts with one of these (OWASP, CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
SUFFIXES = ((1e9, "G"), (1e6, "M"), (1e4, "k"))  # 12.5k parameters, 61.6M FLOPs
# Characters a LaTeX tabular cannot take as text (pdflatex), as math.
LATEX_SYMBOLS = {"±": r"$\pm$", "θ": r"$\theta$", "≥": r"$\geq$", "≤": r"$\leq$", "×": r"$\times$",
                 "−": "-", "→": r"$\rightarrow$", "≈": r"$\approx$", "·": r"$\cdot$"}


def _scaled(value: float) -> tuple[float, str]:
    for threshold, suffix in SUFFIXES:
        if abs(value) >= threshold:
            return threshold if suffix != "k" else 1e3, suffix
    return 1.0, ""


def figure(value: float) -> str:
    """One figure to four significant digits, large ones with a suffix: 0.925, 40.43k, 61.64M."""
    if value is None or pd.isna(value):
        return ""
    unit, suffix = _scaled(value)
    return f"{value / unit:.4g}{suffix}"


def numbers(mean: float, std: float = math.nan, low: float = math.nan,
            high: float = math.nan) -> tuple[str, str, str, str]:
    """mean, std, interval low and high as every table writes them (module docstring): rounded to
    the std's precision, in the mean's unit (k, M, G); `figure(mean)` alone when std is NaN (one
    run) or 0 (the same in every run); blanks for what is NaN."""
    if mean is None or pd.isna(mean):
        return "", "", "", ""
    if std is None or pd.isna(std) or std == 0:
        return figure(mean), "", "", ""
    unit, suffix = _scaled(mean)
    s = abs(std) / unit
    exponent = math.floor(math.log10(s))
    decimals = (2 if s / 10**exponent < 2 else 1) - 1 - exponent
    places = max(0, decimals)

    def text(value: float) -> str:  # + 0.0: no "-0.0"
        return "" if pd.isna(value) else f"{round(value / unit, decimals) + 0.0:.{places}f}{suffix}"

    return text(mean), text(abs(std)), text(low), text(high)


def stat_text(mean: float, std: float = math.nan, low: float = math.nan, high: float = math.nan) -> str:
    """`mean ± std [low, high]` from `numbers`, each part only where it has one."""
    m, s, lo, hi = numbers(mean, std, low, high)
    return m + (f" ± {s}" if s else "") + (f" [{lo}, {hi}]" if lo and hi else "")


STATS = ("mean", "std", "ci_low", "ci_high")  # a summarize() row's columns of one metric, as `numbers` takes them


def summary_cell(row: Mapping, metric: str, scale: float = 1.0, interval: bool = True) -> str:
    """A summarize() row's `metric` over seeds (`stat_text`; without the interval unless
    `interval`), with `(n=…)` when fewer runs than the configuration's logged it."""
    n = row[f"{metric} n"]
    if not n:
        return ""
    values = [row[f"{metric} {part}"] * scale for part in STATS[:4 if interval else 2]]
    return stat_text(*values) + (f" (n={n})" if n < row["runs"] else "")


def accuracy_columns(summary: pd.DataFrame, metrics: Mapping[str, tuple[str, float]]) -> dict[str, tuple[str, float]]:
    """`metrics` under results.ACCURACY_RULE: where no row of `summary` has a test accuracy, its
    column gives way to validation accuracy (once), labelled "validation (no test split)"."""
    if record.TEST_ACC not in metrics or accuracy_of(summary) == record.TEST_ACC:
        return dict(metrics)
    ruled = {}
    for metric, (label, scale) in metrics.items():
        if metric in (record.TEST_ACC, record.VAL_ACC):
            ruled.setdefault(record.VAL_ACC, (f"accuracy (%), {NO_TEST_SPLIT}", scale))
        else:
            ruled[metric] = (label, scale)
    return ruled


def _leading_columns(summary: pd.DataFrame) -> pd.DataFrame:
    names = summary["variant"].astype(str)
    if "differs" in summary:
        names = [f"{v} ({d})" if d else v for v, d in zip(names, summary["differs"].fillna(""))]
    return pd.DataFrame({"data": summary["data"].astype(str), "configuration": names,
                         "runs": summary["runs"].astype(int)})


def configuration_table(summary: pd.DataFrame, metrics: Mapping[str, tuple[str, float]] = PAPER_METRICS,
                        interval: bool = True) -> pd.DataFrame:
    """summarize()'s table as a paper prints it: data set, configuration (with what sets it apart
    where names collide), runs, then one `summary_cell` per metric of `metrics` (accuracy_columns)."""
    table = _leading_columns(summary)
    for metric, (label, scale) in accuracy_columns(summary, metrics).items():
        if f"{metric} n" in summary:  # a metric the summary has (final train loss: a plan's arms only)
            table[label] = [summary_cell(row, metric, scale, interval) for _, row in summary.iterrows()]
    return table


def configuration_columns(summary: pd.DataFrame,
                          metrics: Mapping[str, tuple[str, float]] = PAPER_METRICS) -> pd.DataFrame:
    """configuration_table's numbers for a CSV: per metric, `<column> mean`, `std`, `ci_low`,
    `ci_high` (as `numbers` writes them) and `n` (the runs that logged it)."""
    table = _leading_columns(summary)
    for metric, (label, scale) in accuracy_columns(summary, metrics).items():
        if f"{metric} n" not in summary:
            continue
        cells = [numbers(*(row[f"{metric} {part}"] * scale for part in STATS)) for _, row in summary.iterrows()]
        for i, part in enumerate(STATS):
            table[f"{label} {part}"] = [c[i] for c in cells]
        table[f"{label} n"] = summary[f"{metric} n"].fillna(0).astype(int).to_numpy()
    return table


def claims_for_paper(claims: pd.DataFrame) -> pd.DataFrame:
    """verdicts.claims_table's table with p-values to three significant digits."""
    table = claims.copy()
    for column in ("p", "p (Holm)"):
        table[column] = table[column].map(lambda p: "" if p is None or pd.isna(p) else f"{p:.3g}")
    return table


# The LaTeX file's first line: what a document needs to set it.
LATEX_PACKAGES = (r"% Needs \usepackage{booktabs} (\toprule, \midrule, \bottomrule); symbols are in math mode, "
                  "other text is UTF-8 (LaTeX's default input encoding). From python -m densenet_exp.report.")


def render(table: pd.DataFrame, fmt: str) -> str:
    """`table` as CSV, a LaTeX tabular (LATEX_PACKAGES first, booktabs rules, text escaped, symbols
    in math mode) or a markdown table."""
    from tabulate import tabulate

    cells = table.astype(object).where(table.notna(), "").astype(str)
    if fmt == "csv":
        return cells.map(neutralized).to_csv(index=False)
    if fmt == "md":
        cells = cells.map(lambda v: v.replace("|", "\\|"))  # a bar would end the cell
        return tabulate(cells.values.tolist(), headers=list(cells.columns), tablefmt="github",
                        disable_numparse=True) + "\n"
    text = tabulate(cells.values.tolist(), headers=list(cells.columns), tablefmt="latex_booktabs",
                    disable_numparse=True)
    for symbol, latex in LATEX_SYMBOLS.items():
        text = text.replace(symbol, latex)
    return LATEX_PACKAGES + "\n" + text + "\n"


def neutralized(cell: str) -> str:
    """A CSV cell as OWASP advises: one a spreadsheet would run as a formula gets a leading `'`
    (shown as text); a plain number, -0.5 say, stays a number (it runs nothing)."""
    if not cell.startswith(FORMULA_STARTS):
        return cell
    try:
        float(cell)
        return cell
    except ValueError:
        return "'" + cell


def write_tables(summary: pd.DataFrame, claims: pd.DataFrame, folder: Path, fmt: str) -> list[Path]:
    """configurations.<ext> and claims.<ext> in `folder` (FORMATS gives the extension); the CSV's
    configurations in separate number columns (configuration_columns)."""
    paths = []
    configurations = configuration_columns(summary) if fmt == "csv" else configuration_table(summary)
    for name, table in (("configurations", configurations), ("claims", claims_for_paper(claims))):
        path = folder / f"{name}.{FORMATS[fmt]}"
        path.write_text(render(table, fmt))
        paths.append(path)
    return paths


def headline_table(rows: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """The README's results table of one data set: configuration, runs, then `metrics` (keys of
    PAPER_METRICS) as mean ± std, rounded like the paper tables."""
    table = configuration_table(rows, {m: PAPER_METRICS[m] for m in metrics}, interval=False)
    return table.drop(columns="data")
