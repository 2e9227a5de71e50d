"""The statistical tests behind every verdict, one source of truth: statsmodels' t-tests, TOST,
Holm correction and power, with the rule each applies stated once beside it.

All tests are Welch t-tests (unequal variances) over seeds, one-sided at the declared alpha; a
side without spread (every seed the same value) cannot be tested and gives None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower
from statsmodels.stats.weightstats import DescrStatsW, ttest_ind, ttost_ind

MIN_SEEDS = 3  # per side, for every test

HOLM_RULE = (
    "The tested claims form one family; Holm's step-down correction (statsmodels `multipletests(method=\"holm\")`) "
    "keeps its family-wise error rate at alpha: with m tests and raw p-values sorted p(1) <= ... <= p(m), the "
    "adjusted p(i) is the running maximum of min(1, (m - i + 1) p(i)). Raw and adjusted p-values are printed."
)
ONE_SIDED_RULE = (
    "Every test is one-sided at the plan's alpha, by Welch's t-test over seeds (statsmodels `ttest_ind`, "
    "`usevar=\"unequal\"`; a one-sample t-test against a fixed reference): a claim is supported when the test in the "
    "claimed direction rejects after Holm, contradicted when the test in the opposite direction does (the two "
    "cannot both reject, so a claim's chance of a false verdict stays below alpha), inconclusive otherwise. "
    f"Each side needs at least {MIN_SEEDS} seeds and some spread over them."
)
NON_INFERIORITY_RULE = (
    "Non-inferiority of a against b within a margin m: H0 mean(a) - mean(b) <= -m against H1 > -m (one-sided "
    "Welch, statsmodels `ttest_ind(..., alternative=\"larger\", value=-m)`); its mirror, a worse than b by more "
    "than m, contradicts. Equivalence (TOST, statsmodels `ttost_ind`) rejects both |difference| >= m; its p-value "
    "is the larger of the two one-sided ones."
)
POWER_RULE = (
    "Power of a non-inferiority test with n seeds per side, for a true difference of zero, is statsmodels "
    "`TTestIndPower().power(effect_size=m / sd, nobs1=n, alpha=alpha / k, alternative=\"larger\")` with sd the "
    "pooled seed SD seen and k the number of tests in the Holm family: alpha / k is the level Holm's first step "
    "holds a test to, so a plan sized at alpha alone is underpowered for its own family. The seeds that 80% power "
    "would have needed at that level come from `solve_power`; `python -m densenet_exp.study estimate` sizes a plan "
    "the same way before its confirmation runs."
)


def seeds_short(*sides: np.ndarray) -> str:
    """'' when every side has MIN_SEEDS values, else the inconclusive reason."""
    return "" if all(len(s) >= MIN_SEEDS for s in sides) else f"needs >= {MIN_SEEDS} seeds per side"


def _spread(*sides: np.ndarray) -> bool:
    return any(np.ptp(s) > 0 for s in sides)


def holm(p_values: Sequence[float]) -> list[float]:
    """HOLM_RULE's adjusted p-values, in the order given."""
    if not len(p_values):
        return []
    return multipletests(np.asarray(p_values, dtype=float), method="holm")[1].tolist()


def welch_one_sided(a: np.ndarray, b: np.ndarray, alternative: str, value: float = 0.0) -> float | None:
    """p of H1: mean(a) - mean(b) `alternative` ('larger' or 'smaller') than `value`; None without spread."""
    if not _spread(a, b):
        return None
    return float(ttest_ind(a, b, alternative=alternative, usevar="unequal", value=value)[1])


def one_sample_one_sided(x: np.ndarray, reference: float, alternative: str) -> float | None:
    """p of H1: mean(x) `alternative` than `reference`; None without spread."""
    if not _spread(x):
        return None
    return float(DescrStatsW(x).ttest_mean(reference, alternative=alternative)[1])


def tost(a: np.ndarray, b: np.ndarray, margin: float) -> float | None:
    """NON_INFERIORITY_RULE's TOST p-value of |mean(a) - mean(b)| < margin; None without spread."""
    if not _spread(a, b):
        return None
    return float(ttost_ind(a, b, -margin, margin, usevar="unequal")[0])


def pooled_sd(a: np.ndarray, b: np.ndarray) -> float:
    """The pooled standard deviation over seeds of two sides (n - 1 degrees of freedom each)."""
    dof = len(a) + len(b) - 2
    if dof < 1:
        return float("nan")
    return float(math.sqrt(((len(a) - 1) * np.var(a, ddof=1) + (len(b) - 1) * np.var(b, ddof=1)) / dof))


def holm_first_alpha(alpha: float, tests: int) -> float:
    """The level Holm's first step holds each test of a family of `tests` to (POWER_RULE)."""
    return alpha / max(1, tests)


def power(sd: float, margin: float, n1: int, n2: int, alpha: float) -> float:
    """POWER_RULE's power of a non-inferiority test with n1 and n2 seeds (true difference zero)."""
    if not (sd > 0 and n1 >= 2 and n2 >= 2):
        return float("nan")
    return float(TTestIndPower().power(effect_size=margin / sd, nobs1=n1, alpha=alpha, ratio=n2 / n1,
                                       alternative="larger"))


def seeds_for_power(sd: float, margin: float, alpha: float, target: float = 0.8) -> int | None:
    """POWER_RULE's seeds per side for `target` power (equal sides); None when sd is unknown."""
    if not sd > 0:
        return None
    n = TTestIndPower().solve_power(effect_size=margin / sd, nobs1=None, alpha=alpha, power=target,
                                    alternative="larger")
    return max(2, math.ceil(float(np.asarray(n).item())))
