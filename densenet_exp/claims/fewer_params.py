"""`fewer_params`: the smaller arm is as accurate as the larger (non-inferior within `margin_pp`)
with at least `min_param_factor` x fewer parameters. One test."""

from __future__ import annotations

from .. import record
from ..analysis import stats
from ..analysis.verdicts import NOT_COMPARABLE, Claim, one_sided
from .family import first_alpha
from .evidence import accuracy, gate, inconclusive, undeclared_differences, variance_split

KIND = "fewer_params"
KEYS = {"smaller": None, "larger": None, "margin_pp": None, "min_param_factor": 2.0}
ARM_KEYS = ("smaller", "larger")
POSITIVE = ("margin_pp", "min_param_factor")


def tests(k) -> int:
    return 1


def name(k) -> str:
    return (f"{k['smaller']} as accurate as {k['larger']} with >= {k['min_param_factor']:g}x fewer parameters "
            f"(margin {k['margin_pp']:g} pp)")


def rule(k) -> tuple[str, str]:
    return ("fewer parameters", "The smaller arm must have at least the declared factor fewer parameters than the "
            "larger (else not comparable), the same recipe (the comparability rule, except the keys the plan sets per "
            "arm, such as the learning rate chosen per family in the pilot), converged runs, and be non-inferior in "
            "test accuracy within the declared margin.")


def judge(ctx, k) -> list[Claim]:
    small, large = ctx.arms[k["smaller"]], ctx.arms[k["larger"]]
    margin = k["margin_pp"] / 100
    acc = accuracy(ctx.plan, small, large)
    factor = large.cost(record.PARAMS) / small.cost(record.PARAMS)
    claim = inconclusive(ctx.plan, name(k), (
        f"{small.describe(record.TEST_ACC, 100, unit=' %')} with {small.cost(record.PARAMS):,.0f} parameters; "
        f"{large.describe(record.TEST_ACC, 100, unit=' %')} with {large.cost(record.PARAMS):,.0f}; "
        f"{factor:.2f}x fewer"))
    claim.budget = (k["smaller"], k["larger"], k["margin_pp"])
    if len(acc.a) and len(acc.b):
        claim.evidence += f"; difference {100 * (acc.a.mean() - acc.b.mean()):+.2f} pp (margin {k['margin_pp']:g})"
    claim.evidence += power_line(ctx, k, acc) + variance_split(ctx, small, large, acc)
    if gate(claim, [small, large], converged=False):
        return [claim]
    if not factor >= k["min_param_factor"]:
        claim.verdict = NOT_COMPARABLE
        claim.reason = f"{factor:.2f}x fewer parameters, below the declared {k['min_param_factor']:g}x"
        return [claim]
    differ = undeclared_differences(ctx.plan, small, large)
    if differ:
        claim.verdict, claim.reason = NOT_COMPARABLE, "; ".join(differ)
        return [claim]
    if gate(claim, [small, large]):
        return [claim]
    if acc.too_few:
        claim.reason = acc.too_few
        return [claim]
    return [one_sided(claim, acc.one_sided("larger", -margin), acc.one_sided("smaller", -margin),
                      f"one-sided {acc.words} non-inferiority within {k['margin_pp']:g} pp ({acc.n})")]


def power_line(ctx, k, acc) -> str:
    """stats.POWER_RULE's line: the power the seeds had (`acc`, evidence.accuracy of the pair) at the
    SD seen and the family's first level."""
    row = power(ctx.plan, k, ctx.tests, acc.a, acc.b, acc.diff)
    if not row or row["power"] != row["power"]:
        return ""
    return (f"; power {row['power']:.2f} at the seed SD seen ({row['sd_pp']:.2f} pp, {acc.n}) and alpha "
            f"{row['alpha']:.3g} ({row['level']}), 80% power needs {row['needed']} seeds per side")


def power(plan, k, tests: int, a, b, diff=None) -> dict:
    """The power of this claim's test at alpha for the family's first step, from seed values (a, b)
    or per-seed differences of a paired plan."""
    alpha, margin = first_alpha(plan, tests), k["margin_pp"] / 100
    level = (f"Holm's first step over {tests} test{'s' if tests != 1 else ''}" if plan.procedure == "holm"
             else "first of a fixed sequence")
    if diff is not None:
        sd = float(diff.std(ddof=1)) if len(diff) > 1 else float("nan")
        p = stats.paired_power(sd, margin, len(diff), alpha)
        needed = stats.seeds_for(lambda n: stats.paired_power(sd, margin, n, alpha))
    else:
        sd = stats.pooled_sd(a, b)
        p = stats.power(sd, margin, len(a), len(b), alpha)
        needed = stats.seeds_for_power(sd, margin, alpha) if sd > 0 else None
    return {"power": p, "sd_pp": 100 * sd, "alpha": alpha, "level": level, "needed": needed}


def size(plan, k, sd: float, tests: int) -> dict:
    """Before the runs: the non-inferiority test's power with the declared seeds at seed SD `sd` (pp)."""
    alpha, m = first_alpha(plan, tests), k["margin_pp"]
    n1, n2 = (len(plan.seeds_of("confirmation", arm)) for arm in (k["smaller"], k["larger"]))
    return {"test": "non-inferiority", "alpha": alpha, "seeds": f"{n1}, {n2}", "power": stats.power(sd, m, n1, n2, alpha),
            "seeds for 80% power": stats.seeds_for_power(sd, m, alpha) if sd > 0 else None}
