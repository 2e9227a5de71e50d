"""`frontier` (the paper's Figures 3 and 4): for every declared baseline arm, a DenseNet arm with no
more parameters (or FLOPs, `by`), at least `min_factor` x fewer, is non-inferior in test accuracy
within `margin_pp`. One test.

Which DenseNet answers for a baseline is fixed by exact costs before any accuracy is read: the
largest DenseNet arm within the baseline's budget (cost x min_factor <= the baseline's). The claim
holds only if every baseline's test rejects (an intersection-union test: its p is the largest of
theirs, no correction needed); it is contradicted when some DenseNet is worse than its baseline by
more than the margin (the smallest opposite p, Bonferroni over the baselines).
"""

from __future__ import annotations

import math

from .. import record
from ..analysis import stats
from ..analysis.verdicts import NOT_COMPARABLE, Claim, one_sided
from ..checks import require
from .family import first_alpha
from .evidence import accuracy, gate, inconclusive, undeclared_differences

KIND = "frontier"
KEYS = {"dense": None, "baselines": None, "by": "params", "min_factor": 1.0, "margin_pp": None}
ARM_KEYS = ("dense", "baselines")
POSITIVE = ("min_factor", "margin_pp")
COSTS = {"params": record.PARAMS, "flops": record.FLOPS_PER_IMAGE}


def tests(k) -> int:
    return 1


def name(k) -> str:
    fewer = "no more" if k["min_factor"] == 1 else f">= {k['min_factor']:g}x fewer"
    return (f"frontier by {k['by']}: for each of {', '.join(k['baselines'])}, a DenseNet with {fewer} {k['by']} "
            f"is as accurate (margin {k['margin_pp']:g} pp)")


def check(where: str, k) -> None:
    require(f"{where}.by", k["by"], k["by"] in COSTS, " or ".join(COSTS))
    for key in ("dense", "baselines"):
        require(f"{where}.{key}", k[key], isinstance(k[key], list) and len(k[key]) >= 1, "a list of arms")


def rule(k) -> tuple[str, str]:
    return ("frontier", __doc__.split("\n\n", 1)[1].replace("\n", " ").strip())


def judge(ctx, k) -> list[Claim]:
    metric = COSTS[k["by"]]
    dense = [ctx.arms[a] for a in k["dense"]]
    claim = inconclusive(ctx.plan, name(k))
    lines, claimed, opposite, missing = [], [], [], []
    for base in (ctx.arms[b] for b in k["baselines"]):
        budget = base.cost(metric) / k["min_factor"]
        within = [d for d in dense if d.cost(metric) <= budget]
        if not within:
            missing.append(f"{base.name} ({base.cost(metric):,.4g}): no DenseNet arm within {budget:,.4g} {k['by']}")
            lines.append(missing[-1])
            continue
        d = max(within, key=lambda a: a.cost(metric))
        acc = accuracy(ctx.plan, d, base)
        lines.append(f"{base.name} ({base.cost(metric):,.4g}): {d.name} ({d.cost(metric):,.4g}, "
                     f"{base.cost(metric) / d.cost(metric):.2f}x fewer)"
                     + (f" {100 * (acc.a.mean() - acc.b.mean()):+.2f} pp" if len(acc.a) and len(acc.b) else ""))
        if gate(claim, [d, base]):
            return [_with(claim, lines)]
        differ = undeclared_differences(ctx.plan, d, base)
        if differ:
            claim.verdict, claim.reason = NOT_COMPARABLE, f"{d.name} vs {base.name}: " + "; ".join(differ)
            return [_with(claim, lines)]
        if acc.too_few:
            claim.reason = f"{d.name} vs {base.name}: {acc.too_few}"
            return [_with(claim, lines)]
        margin = k["margin_pp"] / 100
        claimed.append(acc.one_sided("larger", -margin))
        opposite.append(acc.one_sided("smaller", -margin))
    _with(claim, lines)
    if missing:
        claim.reason = "not supported: " + "; ".join(missing)
        return [claim]
    if any(p is None for p in claimed + opposite):
        claim.reason = "no spread over seeds"
        return [claim]
    n = len(claimed)
    return [one_sided(claim, max(claimed), min(1.0, n * min(opposite)),
                      f"intersection-union of {n} one-sided non-inferiority tests (largest p; opposite: smallest, "
                      f"x {n})")]


def _with(claim: Claim, lines: list[str]) -> Claim:
    claim.evidence = "; ".join(lines)
    return claim


def size(plan, k, sd: float, tests: int) -> dict:
    """Before the runs: the intersection-union test's power, the product of each baseline's
    non-inferiority power (true differences 0), with the declared seeds at seed SD `sd` (pp)."""
    import math

    from ..analysis import stats
    alpha, m, n = first_alpha(plan, tests), k["margin_pp"], len(plan.seeds_of("confirmation", k["baselines"][0]))
    both = lambda seeds: math.prod(stats.power(sd, m, seeds, seeds, alpha) for _ in k["baselines"])  # noqa: E731
    return {"test": f"non-inferiority at each of {len(k['baselines'])} baselines", "alpha": alpha,
            "seeds": f"{n} per arm", "power": both(n), "seeds for 80% power": stats.seeds_for(both)}
