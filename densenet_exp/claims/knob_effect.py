"""`knob_effect`: a contrast of DenseNet's knobs in a declared factorial of arms (growth rate k,
compression theta, bottleneck B): a main effect (`effect: growth_rate`) or a two-knob interaction
(`effect: compression:bottleneck`), tested for superiority, non-inferiority or equivalence on
test accuracy. One test.

The arms' knob levels are read from their runs. Accuracy (in points) is fitted by OLS on every
knob that varies, each coded -1/2 and +1/2, with all their interactions, plus the seed as a block
where the plan is paired (statsmodels' formula API): a main effect's coefficient is the difference
of the two levels' means averaged over the other knobs, an interaction's the difference of
differences. `claimed` names the level said to be better (superiority) or no worse
(non-inferiority), or `positive`/`negative` for an interaction's sign.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import record
from ..analysis import stats
from ..analysis.verdicts import NOT_COMPARABLE, Claim, one_sided
from ..checks import require
from .family import first_alpha
from .evidence import Arm, gate, inconclusive, undeclared_differences

KIND = "knob_effect"
KEYS = {"arms": None, "effect": None, "test": None, "claimed": "positive", "margin_pp": 0.0, "expected_pp": 0.5}
ARM_KEYS = ("arms",)
POSITIVE = ("expected_pp",)
KNOBS = {"growth_rate": "k", "compression": "theta", "bottleneck": "B"}  # knob -> term in the model
TESTS = ("superiority", "non_inferiority", "equivalence")


def tests(k) -> int:
    return 1


def factors(k) -> list[str]:
    return str(k["effect"]).split(":")


def name(k) -> str:
    what = " x ".join(KNOBS[f] for f in factors(k))
    kind = "interaction" if len(factors(k)) > 1 else "main effect"
    claim = {"superiority": f"{k['claimed']} is better", "non_inferiority": f"{k['claimed']} is no worse "
             f"(margin {k['margin_pp']:g} pp)", "equivalence": f"within ±{k['margin_pp']:g} pp"}[k["test"]]
    return f"{kind} of {what} on test accuracy: {claim} [{', '.join(k['arms'])}]"


def check(where: str, k) -> None:
    require(f"{where}.effect", k["effect"], all(f in KNOBS for f in factors(k)) and len(factors(k)) in (1, 2)
            and len(set(factors(k))) == len(factors(k)), f"a knob ({', '.join(KNOBS)}) or two joined by ':'")
    require(f"{where}.test", k["test"], k["test"] in TESTS, " or ".join(TESTS))
    require(f"{where}.arms", k["arms"], isinstance(k["arms"], list) and len(k["arms"]) >= 2,
            "a list of two arms or more (the factorial's cells)")
    require(f"{where}.margin_pp", k["margin_pp"], k["test"] == "superiority" or k["margin_pp"] > 0,
            "a margin > 0 for non-inferiority and equivalence")
    if len(factors(k)) > 1:
        require(f"{where}.claimed", k["claimed"], k["claimed"] in ("positive", "negative"),
                "positive or negative for an interaction")


def rule(k) -> tuple[str, str]:
    return ("knob effects", "A knob contrast is read from one OLS fit (statsmodels `ols`) of the factorial arms' test "
            "accuracy in points on every knob that varies among them, each coded -1/2 and +1/2 (the claimed level, or "
            "the larger value, +1/2), with all their interactions, plus `C(seed)` as a block where the plan is "
            "paired. A main effect's coefficient is the difference between its two levels' means averaged over the "
            "other knobs; an interaction's, the difference of differences. Its t statistic on the fit's residual "
            "degrees of freedom gives one-sided p-values (scipy's t): superiority H1 effect > 0, non-inferiority H1 "
            "effect > -margin, equivalence both |effect| bounds (TOST, the larger p); the opposite side contradicts "
            "(for equivalence: the effect outside the margin, the smaller of the two sides, doubled). Each knob must "
            "have exactly two levels among the arms, every arm the same recipe but its knobs.")


def levels(arm: Arm) -> dict[str, object]:
    """The arm's knob values (the top-level knob, else the model's own), one per knob; None if mixed."""
    out = {}
    for knob in KNOBS:
        values = {_knob(run, knob) for _, run in arm.runs.iterrows()}
        out[knob] = values.pop() if len(values) == 1 else None
    return out


def _knob(run: pd.Series, knob: str) -> object:
    value = run.get(knob)
    if value is None or pd.isna(value):
        value = run.get(f"params.model.{knob}")
    if isinstance(value, str):
        value = {"True": True, "False": False}.get(value, value)
        try:
            value = float(value)
        except (TypeError, ValueError):
            pass
    return float(value) if isinstance(value, (int, np.integer, float)) and not isinstance(value, bool) else value


def design(ctx, k) -> tuple[pd.DataFrame, list[str]] | str:
    """The factorial's data (one row per trained run: acc in points, seed, one column per varying knob
    coded +-1/2) and its knob terms, or why it cannot be fitted."""
    arms = [ctx.arms[a] for a in k["arms"]]
    cells = {a.name: levels(a) for a in arms}
    varying = [knob for knob in KNOBS if len({str(c[knob]) for c in cells.values()}) > 1]
    for knob in factors(k):
        found = sorted({str(c[knob]) for c in cells.values()})
        if knob not in varying or len(found) != 2:
            return f"{knob} has levels {', '.join(found)} among the arms (two needed)"
    rows = []
    for arm in arms:
        for seed, acc in arm.by_seed(record.TEST_ACC).items():
            row = {"acc": 100 * acc, "seed": int(seed)}
            for knob in varying:
                row[KNOBS[knob]] = _code(cells[arm.name][knob], [c[knob] for c in cells.values()], knob, k)
            rows.append(row)
    return pd.DataFrame(rows), [KNOBS[knob] for knob in varying]


def _code(value, values, knob: str, k) -> float:
    if knob in factors(k) and len(factors(k)) == 1 and k["test"] != "equivalence":
        claimed = {"true": True, "false": False}.get(str(k["claimed"]).lower(), k["claimed"])
        high = _same(value, claimed)
    else:
        high = _same(value, max(values, key=lambda v: (isinstance(v, bool), v)))
    return 0.5 if high else -0.5


def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def fit(data: pd.DataFrame, terms: list[str], paired: bool):
    """The OLS fit of the module docstring (statsmodels' formula API)."""
    import statsmodels.formula.api as smf

    formula = "acc ~ " + " * ".join(terms) + (" + C(seed)" if paired else "")
    return smf.ols(formula, data).fit()


def judge(ctx, k) -> list[Claim]:
    arms = [ctx.arms[a] for a in k["arms"]]
    claim = inconclusive(ctx.plan, name(k))
    if gate(claim, arms, converged=False):
        return [claim]
    made = design(ctx, k)
    if isinstance(made, str):
        claim.verdict, claim.reason = NOT_COMPARABLE, made
        return [claim]
    data, terms = made
    differ = sorted({d for a in arms[1:] for d in undeclared_differences(ctx.plan, arms[0], a)})
    if differ:
        claim.verdict, claim.reason = NOT_COMPARABLE, "; ".join(differ)
        return [claim]
    result = fit(data, terms, ctx.plan.paired)
    term = ":".join(KNOBS[f] for f in factors(k))
    effect, se, dof = float(result.params[term]), float(result.bse[term]), float(result.df_resid)
    low, high = effect - 1.96 * se, effect + 1.96 * se
    claim.evidence = (f"{term} effect {effect:+.2f} pp (SE {se:.2f}, about [{low:+.2f}, {high:+.2f}]), "
                      f"{len(data)} runs in {len(arms)} arms, residual SD {np.sqrt(result.scale):.2f} pp")
    if gate(claim, arms):
        return [claim]
    if not (se > 0 and dof > 0):
        claim.reason = "no residual spread to test against"
        return [claim]
    p_claim, p_other = p_values(effect, se, dof, k)
    return [one_sided(claim, p_claim, p_other, f"OLS contrast, t on {dof:g} df ({k['test'].replace('_', '-')}"
                                                + ("" if k["test"] == "superiority" else f", margin {k['margin_pp']:g} pp")
                                                + (", seed as block" if ctx.plan.paired else "") + ")")]


def p_values(effect: float, se: float, dof: float, k) -> tuple[float, float]:
    """One-sided p in the claimed direction and in the opposite one (rule)."""
    from scipy.stats import t

    sign = -1.0 if k["claimed"] == "negative" else 1.0
    m = float(k["margin_pp"])
    if k["test"] == "superiority":
        z = sign * effect / se
        return float(t.sf(z, dof)), float(t.cdf(z, dof))
    if k["test"] == "non_inferiority":
        z = (sign * effect + m) / se
        return float(t.sf(z, dof)), float(t.cdf(z, dof))
    above, below = (effect - m) / se, (effect + m) / se
    inside = max(float(t.sf(below, dof)), float(t.cdf(above, dof)))
    outside = min(1.0, 2 * min(float(t.cdf(below, dof)), float(t.sf(above, dof))))
    return inside, outside


def power(k, sd: float, seeds: int, alpha: float) -> float:
    """The contrast's power with `seeds` per arm at residual SD `sd` (points): each level of a two-level
    contrast holds half the runs, so it is a two-sample test of N/2 against N/2 (statsmodels'
    TTestIndPower; TOST by stats.tost_power); superiority at the declared `expected_pp`."""
    half = int(len(k["arms"]) * seeds / 2)
    sd_eff = sd * (2 if len(factors(k)) > 1 else 1)  # an interaction's SE is twice a main effect's here
    if k["test"] == "equivalence":
        return stats.tost_power(sd_eff, k["margin_pp"], half, half, alpha)
    shift = k["expected_pp"] if k["test"] == "superiority" else k["margin_pp"]
    return stats.power(sd_eff, shift, half, half, alpha)


def size(plan, k, sd: float, tests: int) -> dict:
    """Before the runs: the contrast's power with the declared seeds per arm at residual SD `sd` (pp)."""
    alpha = first_alpha(plan, tests)
    seeds = min(len(plan.seeds_of("confirmation", arm)) for arm in k["arms"])
    return {"test": k["test"].replace("_", "-") + (f" at {k['expected_pp']:g} pp" if k["test"] == "superiority" else ""),
            "alpha": alpha, "seeds": f"{seeds} per arm", "power": power(k, sd, seeds, alpha),
            "seeds for 80% power": stats.seeds_for(lambda n: power(k, sd, n, alpha))}
