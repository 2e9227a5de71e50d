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
from ..analysis.verdicts import NOT_COMPARABLE, Claim, one_sided, recipe_differences
from ..checks import require
from .family import first_alpha
from .evidence import Arm, gate, inconclusive

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
    elif k["test"] != "equivalence":
        require(f"{where}.claimed", k["claimed"], k["claimed"] not in ("positive", "negative"),
                f"the level of {k['effect']} claimed better or no worse (e.g. 32, 0.5, true)")


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
    for knob in {*factors(k), *varying}:
        found = sorted({str(c[knob]) for c in cells.values()})
        if knob not in varying or len(found) != 2:
            return f"{knob} has levels {', '.join(found)} among the arms (two needed)"
    # A full factorial, every combination of the varying knobs exactly once: anything less leaves the
    # fit rank-deficient, and its coefficients would be arbitrary.
    combos = {tuple(str(c[knob]) for knob in varying) for c in cells.values()}
    if len(combos) != len(cells) or len(combos) != 2 ** len(varying):
        return (f"the arms are not a full factorial of {', '.join(varying)}: {len(combos)} distinct cells among "
                f"{len(cells)} arms, {2 ** len(varying)} needed")
    if len(factors(k)) == 1 and k["test"] != "equivalence":
        knob = factors(k)[0]
        if not any(_same(c[knob], _claimed(k)) for c in cells.values()):
            return f"claimed={k['claimed']} is not a level of {knob} among the arms"
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
        high = _same(value, _claimed(k))
    else:
        high = _same(value, max(values, key=lambda v: (isinstance(v, bool), v)))
    return 0.5 if high else -0.5


def _claimed(k) -> object:
    return {"true": True, "false": False}.get(str(k["claimed"]).lower(), k["claimed"])


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
    # Every arm the same recipe but its knobs: a per-arm override of anything else (say optim.lr) would
    # be mixed into the knob effect, so unlike a pair's, the arms' declared overrides are not exempt.
    differ = sorted({d for a in arms[1:] for d in recipe_differences(arms[0].config(), a.config())})
    if differ:
        claim.verdict, claim.reason = NOT_COMPARABLE, "; ".join(differ)
        return [claim]
    result = fit(data, terms, ctx.plan.paired)
    term = ":".join(KNOBS[f] for f in factors(k))
    effect, se, dof = float(result.params[term]), float(result.bse[term]), float(result.df_resid)
    from scipy.stats import t

    q = float(t.ppf(0.975, result.df_resid)) if result.df_resid > 0 else float("nan")
    low, high = effect - q * se, effect + q * se
    claim.evidence = (f"{term} effect {effect:+.2f} pp (SE {se:.2f}, 95% interval [{low:+.2f}, {high:+.2f}]), "
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


def power(k, sd: float, seeds: int, alpha: float, paired: bool = False) -> float:
    """The contrast's power with `seeds` per arm at residual SD `sd` (points): its SE is 2 sd / sqrt(N)
    for a main effect, twice that for an interaction, on the full fit's residual degrees of freedom
    (N - cells, less seeds - 1 with the seed block): a noncentral t (scipy); TOST by
    stats.tost_power at the same SE; superiority at the declared `expected_pp`."""
    from scipy.stats import nct, t

    cells, n = len(k["arms"]), len(k["arms"]) * seeds
    dof = n - cells - ((seeds - 1) if paired else 0)
    if not (sd > 0 and dof >= 1):
        return float("nan")
    se = (2 if len(factors(k)) > 1 else 1) * 2 * sd / np.sqrt(n)
    if k["test"] == "equivalence":  # tost_power's SE for two sides of n/2 is the same 2 sd / sqrt(n)
        return stats.tost_power(se * np.sqrt(n) / 2, k["margin_pp"], n // 2, n // 2, alpha)
    shift = k["expected_pp"] if k["test"] == "superiority" else k["margin_pp"]
    return float(1 - nct.cdf(t.ppf(1 - alpha, dof), dof, shift / se))


def size(plan, k, sd: float, tests: int) -> dict:
    """Before the runs: the contrast's power with the declared seeds per arm at residual SD `sd` (pp)."""
    alpha = first_alpha(plan, tests)
    seeds = min(len(plan.seeds_of("confirmation", arm)) for arm in k["arms"])
    return {"test": k["test"].replace("_", "-") + (f" at {k['expected_pp']:g} pp" if k["test"] == "superiority" else ""),
            "alpha": alpha, "seeds": f"{seeds} per arm", "power": power(k, sd, seeds, alpha, plan.paired),
            "seeds for 80% power": stats.seeds_for(lambda n: power(k, sd, n, alpha, plan.paired))}
