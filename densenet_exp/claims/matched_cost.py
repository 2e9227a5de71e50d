"""`matched_cost`: the pair's test accuracy is equivalent within `margin_pp` (TOST, one test of the
family), and, only where it is, FLOPs and train-step memory per image as exact figures (outside
the family: they do not vary over seeds), each against the declared `tolerance` (a ratio within
1 ± tolerance is no difference). One pair, chosen by parameters, can support "fewer FLOPs" or
fail to: it cannot contradict the paper's claim, which is about the frontier (some DenseNet at
each accuracy), so a ratio on the wrong side reads "not supported for this pair". Memory is judged
for each implementation of a DenseNet (plain concatenation and memory-efficient mode: exact figures
that every run measures on copies of its model at the first step); runs logged before those figures
existed are judged on the implementation they trained, named."""

from __future__ import annotations

import numpy as np

from .. import record
from ..analysis import stats
from ..analysis.verdicts import INCONCLUSIVE, NOT_COMPARABLE, SUPPORTED, Claim
from .family import first_alpha
from .evidence import accuracy, gate, inconclusive, undeclared_differences

KIND = "matched_cost"
KEYS = {"smaller": None, "larger": None, "margin_pp": None, "tolerance": 0.05}
ARM_KEYS = ("smaller", "larger")
POSITIVE = ("margin_pp", "tolerance")
FLOPS = (record.FLOPS_PER_IMAGE, "fewer FLOPs per image", True)
MEMORY = "more train-step memory per image"
IMPLEMENTATIONS = {"plain": "plain concatenation", "memory_efficient": "memory-efficient mode"}


def tests(k) -> int:
    return 1


def name(k) -> str:
    return f"cost of {k['smaller']} against {k['larger']} at matched accuracy"


def rule(k) -> tuple[str, str]:
    return ("cost at matched accuracy", "Only when TOST shows the pair's test accuracies equivalent within the margin "
            "(after the family's correction): FLOPs per image and train-step memory per image (`memory/train_step_mb` "
            f"over `data.batch_size`) compared as exact figures, a ratio within 1 ± {k['tolerance']:g} counting as no "
            "difference. A single pair chosen by parameters can support a cost claim or leave it \"not supported for "
            "this pair\", never contradict the paper's frontier claim. Memory is judged once for each DenseNet "
            "implementation (plain concatenation, memory-efficient mode; a model with one implementation counts it "
            "for both), each measured on copies of the run's model at its first step; runs from before those "
            "figures are judged on the implementation they trained, named. Throughput is measured by the bench "
            "on an idle machine as same-run ratios, not here.")


def judge(ctx, k) -> list[Claim]:
    small, large = ctx.arms[k["smaller"]], ctx.arms[k["larger"]]
    acc = accuracy(ctx.plan, small, large)
    same = inconclusive(ctx.plan, f"{small.name} and {large.name} reach the same test accuracy "
                                  f"(within ±{k['margin_pp']:g} pp)",
                        f"{small.describe(record.TEST_ACC, 100, unit=' %')}; "
                        f"{large.describe(record.TEST_ACC, 100, unit=' %')}")
    same.budget = (k["smaller"], k["larger"], k["margin_pp"])
    differ = undeclared_differences(ctx.plan, small, large)
    if differ:
        same.verdict, same.reason = NOT_COMPARABLE, "; ".join(differ)
    elif acc.too_few:
        same.reason = acc.too_few
    elif not gate(same, [small, large]):
        p = acc.tost(k["margin_pp"] / 100)
        if p is None:
            same.reason = "no spread over seeds"
        else:
            same.p_value, same.direction = p, 1
            same.test = f"TOST, two one-sided tests ({acc.words}, {acc.n}): p = {p:.3g}"
    costs = [(FLOPS, "")]
    by_impl = {impl: [by_implementation(a, impl) for a in (small, large)] for impl in IMPLEMENTATIONS}
    if all(len(a.values(m)) for pair in by_impl.values() for a, m in zip((small, large), pair)):
        costs += [((m, MEMORY, False), f" [{words}]") for words, m in
                  ((IMPLEMENTATIONS[impl], by_impl[impl]) for impl in IMPLEMENTATIONS)]
    else:  # runs from before the figures for each implementation
        costs.append(((record.TRAIN_STEP_MB, MEMORY, False), f" [{implementation(small, large)}; the other "
                                                            "implementation was not measured by these runs]"))
    return [same, *(cost_claim(ctx, small, large, same, k["tolerance"], *cost, where) for cost, where in costs)]


def by_implementation(arm, impl: str) -> str:
    """The metric of `arm`'s train-step memory under implementation `impl`: its own figure, or its
    one implementation's where the model has no other (a ResNet)."""
    metric = record.TRAIN_STEP_MB_BY_IMPL[impl]
    return metric if len(arm.values(metric)) else record.TRAIN_STEP_MB_BY_IMPL["plain"]


def implementation(*arms) -> str:
    """The DenseNet implementation the arms' memory was measured on, from `model.memory_efficient`."""
    values = {str(v) for a in arms for v in a.runs.get("params.model.memory_efficient", []) if str(v) != "nan"}
    if values == {"True"}:
        return "memory-efficient (model.memory_efficient=true)"
    return "plain concatenation (model.memory_efficient=false)" if "True" not in values else "mixed implementations"


def cost_claim(ctx, small, large, same: Claim, tolerance: float, metric, words: str, fewer: bool,
               where: str) -> Claim:
    """`metric`: one record name, or one per arm (small, large)."""
    metrics = (metric, metric) if isinstance(metric, str) else metric
    memory = metrics[0] != record.FLOPS_PER_IMAGE
    per_image = [s.values(m) / (s.values("batch_size") if memory else 1) for s, m in zip((small, large), metrics)]
    x, y = per_image
    claim = inconclusive(ctx.plan, f"{small.name} needs {words} than {large.name} at matched accuracy{where}",
                         "; ".join(f"{s.name}: {v.mean():.4g}" + (" MiB" if memory else "")
                                   for s, v in zip((small, large), per_image) if len(v)))
    claim.in_family = False
    claim.gates = [lambda: None if same.verdict == SUPPORTED else f"accuracy not matched ({same.reason or same.verdict})"]
    if len(x) and len(y) and np.ptp(x) == 0 and np.ptp(y) == 0:
        ratio = x[0] / y[0]
        claim.evidence += f"; ratio {ratio:.3g} (tolerance ±{tolerance:g})"
        claim.test = "exact figures (the same for every seed), compared directly once the accuracy matches"
        if ratio < 1 - tolerance if fewer else ratio > 1 + tolerance:
            claim.verdict = SUPPORTED
        else:
            claim.verdict, claim.reason = INCONCLUSIVE, f"not supported for this pair (ratio {ratio:.3g})"
    return claim


def size(plan, k, sd: float, tests: int) -> dict:
    """Before the runs: TOST's power with the declared seeds at seed SD `sd` (pp), true difference 0
    (stats.TOST_POWER_RULE)."""
    from ..analysis import stats
    alpha, m = first_alpha(plan, tests), k["margin_pp"]
    n1, n2 = (len(plan.seeds_of("confirmation", arm)) for arm in (k["smaller"], k["larger"]))
    return {"test": "equivalence (TOST)", "alpha": alpha, "seeds": f"{n1}, {n2}",
            "power": stats.tost_power(sd, m, n1, n2, alpha),
            "seeds for 80% power": stats.seeds_for(lambda n: stats.tost_power(sd, m, n, n, alpha))}
