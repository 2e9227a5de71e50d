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


# --- paired designs, TOST power, the fixed family ------------------------------------------------

PAIRED_RULE = (
    "A paired plan's arms share each seed's split and batch order, so an arm difference is read within seed: the "
    "per-seed differences are tested by a one-sample t-test against the margin (statsmodels `DescrStatsW.ttest_mean`; "
    "TOST `DescrStatsW.ttost_mean` for equivalence), on the seeds both arms finished. Its power is statsmodels "
    "`TTestPower` at the SD of those differences."
)
TOST_POWER_RULE = (
    "The Welch TOST has no closed-form power, so its power within ±m at a true difference d is simulated: 20,000 "
    "draws (a fixed seed, so a plan always sizes the same) of its sufficient statistics for n1 and n2 seeds at the "
    "seed SD (the difference of means, normal; each side's variance, a scaled chi-square), each put through the two "
    "one-sided Welch tests at the test's alpha; the tests check it against a simulation on raw samples."
)
FAMILY_RULE = (
    "The family is fixed by the plan before the runs: every test its claims declare is in it, whether or not a gate "
    "(too few seeds, not converged, not comparable) stops the test, and a stopped test enters with p = 1, so a "
    "failing gate never lowers the bar for the others. `procedure: holm` (default) corrects the family by Holm; "
    "`procedure: fixed_sequence` tests the claims in their declared order, each at alpha, and stops at the first "
    "that does not reject (its adjusted p is the running maximum of the raw p-values): valid without correction "
    "because no later test is reached unless all earlier ones rejected."
)


def fixed_sequence(p_values: Sequence[float]) -> list[float]:
    """FAMILY_RULE's adjusted p-values of a fixed sequence: the running maximum, in the order given."""
    return np.maximum.accumulate(np.asarray(p_values, dtype=float)).tolist() if len(p_values) else []


def paired_one_sided(diff: np.ndarray, alternative: str, value: float = 0.0) -> float | None:
    """p of H1: mean(diff) `alternative` than `value` (per-seed differences); None without spread."""
    return one_sample_one_sided(diff, value, alternative)


def paired_tost(diff: np.ndarray, margin: float) -> float | None:
    """TOST p of |mean(diff)| < margin over per-seed differences; None without spread."""
    if not _spread(diff):
        return None
    return float(DescrStatsW(diff).ttost_mean(-margin, margin)[0])


def paired_power(sd_diff: float, margin: float, n: int, alpha: float) -> float:
    """PAIRED_RULE's power of a paired non-inferiority test (true difference zero)."""
    from statsmodels.stats.power import TTestPower

    if not (sd_diff > 0 and n >= 2):
        return float("nan")
    return float(TTestPower().power(effect_size=margin / sd_diff, nobs=n, alpha=alpha, alternative="larger"))


def tost_power(sd: float, margin: float, n1: int, n2: int, alpha: float, difference: float = 0.0,
               draws: int = 20_000) -> float:
    """TOST_POWER_RULE's power with n1 and n2 seeds at seed SD `sd`, true difference `difference`."""
    from scipy.stats import t

    if not (sd > 0 and n1 >= 2 and n2 >= 2):
        return float("nan")
    rng = np.random.default_rng(0)  # fixed: the same plan sizes the same every time
    d = rng.normal(difference, sd * math.sqrt(1 / n1 + 1 / n2), draws)
    v1 = sd ** 2 * rng.chisquare(n1 - 1, draws) / (n1 - 1) / n1  # each side's squared standard error
    v2 = sd ** 2 * rng.chisquare(n2 - 1, draws) / (n2 - 1) / n2
    se, dof = np.sqrt(v1 + v2), (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))  # Welch
    p = np.maximum(t.sf((d + margin) / se, dof), t.cdf((d - margin) / se, dof))
    return float(np.mean(p < alpha))


def seeds_for(power_of, target: float = 0.8, most: int = 200) -> int | None:
    """The fewest seeds per side (2..most) whose `power_of(n)` reaches `target`; None if none does."""
    for n in range(2, most + 1):
        p = power_of(n)
        if not np.isfinite(p):
            return None
        if p >= target:
            return n
    return None
