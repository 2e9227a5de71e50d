"""Tables for a paper: the per-configuration table and the claims table as CSV, LaTeX or markdown.

    python -m densenet_exp.report --experiment ablation --format latex   # configurations.tex, claims.tex

Every number is rounded to its uncertainty (`with_uncertainty`: the std over seeds to one
significant digit, two when it starts with 1, and the mean to the same decimal place:
`83.4 ± 0.8`, `81.4 ± 1.7`); a figure that is the same in every run (parameters, FLOPs) is
written without `± 0`, and a single run's figure alone, to four significant digits. Accuracies
are in percent. The three formats hold the same cells; the report's headline uses the same
rounding. Light to import: no MLflow, no SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from .. import record

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


def with_uncertainty(mean: float, std: float) -> str:
    """`mean ± std` rounded to the uncertainty (module docstring); `figure(mean)` alone when std is
    NaN (one run) or 0 (the same in every run); blank when mean is NaN."""
    if mean is None or pd.isna(mean):
        return ""
    if std is None or pd.isna(std) or std == 0:
        return figure(mean)
    unit, suffix = _scaled(mean)
    m, s = mean / unit, abs(std) / unit
    exponent = math.floor(math.log10(s))
    digits = 2 if s / 10**exponent < 2 else 1
    decimals = digits - 1 - exponent
    m, s = round(m, decimals), round(s, decimals)
    places = max(0, decimals)
    return f"{m:.{places}f}{suffix} ± {s:.{places}f}{suffix}"


def summary_cell(row: Mapping, metric: str, scale: float = 1.0) -> str:
    """A summarize() row's `metric` over seeds, rounded to its uncertainty, with `(n=…)` when fewer
    runs than the configuration's logged it."""
    n = row[f"{metric} n"]
    if not n:
        return ""
    text = with_uncertainty(row[f"{metric} mean"] * scale, row[f"{metric} std"] * scale)
    return text + (f" (n={n})" if n < row["runs"] else "")


def configuration_table(summary: pd.DataFrame,
                        metrics: Mapping[str, tuple[str, float]] = PAPER_METRICS) -> pd.DataFrame:
    """summarize()'s table as a paper prints it: data set, configuration (with what sets it apart
    where names collide), runs, then mean ± std per metric of `metrics`."""
    names = summary["variant"].astype(str)
    if "differs" in summary:
        names = [f"{v} ({d})" if d else v for v, d in zip(names, summary["differs"].fillna(""))]
    table = pd.DataFrame({"data": summary["data"].astype(str), "configuration": names,
                          "runs": summary["runs"].astype(int)})
    for metric, (label, scale) in metrics.items():
        if f"{metric} n" in summary:  # a metric the summary has (final train loss: a plan's arms only)
            table[label] = [summary_cell(row, metric, scale) for _, row in summary.iterrows()]
    return table


def claims_for_paper(claims: pd.DataFrame) -> pd.DataFrame:
    """verdicts.claims_table's table with p-values to three significant digits."""
    table = claims.copy()
    for column in ("p", "p (Holm)"):
        table[column] = table[column].map(lambda p: "" if p is None or pd.isna(p) else f"{p:.3g}")
    return table


def render(table: pd.DataFrame, fmt: str) -> str:
    """`table` as CSV, a LaTeX tabular (booktabs rules, text escaped, symbols in math mode) or a
    markdown table."""
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
    return text + "\n"


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
    """configurations.<ext> and claims.<ext> in `folder` (FORMATS gives the extension)."""
    paths = []
    for name, table in (("configurations", configuration_table(summary)), ("claims", claims_for_paper(claims))):
        path = folder / f"{name}.{FORMATS[fmt]}"
        path.write_text(render(table, fmt))
        paths.append(path)
    return paths


def headline_table(rows: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """The README's results table of one data set: configuration, runs, then `metrics` (keys of
    PAPER_METRICS) rounded like the paper tables."""
    table = configuration_table(rows, {m: PAPER_METRICS[m] for m in metrics})
    return table.drop(columns="data")
