"""`feature_reuse`: Figure 5's observations (a)-(d) on one DenseNet arm, each as the paired change
of its trained matrix from the net's own initialization (verdicts.FIGURE5_RULE). Four tests."""

from __future__ import annotations

from ..analysis import stats
from ..analysis.verdicts import REUSE_DIRECTIONS, Claim, figure5_rule, reuse_change_claims
from .evidence import gate, inconclusive

KIND = "feature_reuse"
KEYS = {"arm": None, "min_layers": 6, "keep_fraction": 0.5}
ARM_KEYS = ("arm",)
POSITIVE = ("min_layers", "keep_fraction")


def tests(k) -> int:
    return len(REUSE_DIRECTIONS)


def name(k) -> str:
    return f"feature reuse of {k['arm']} (Figure 5, change from initialization)"


def rule(k) -> tuple[str, str]:
    return ("feature reuse", figure5_rule(k["min_layers"], k["keep_fraction"]))


def judge(ctx, k) -> list[Claim]:
    arm = ctx.arms[k["arm"]]
    if len(arm.trained) < stats.MIN_SEEDS:  # each observation stays in the family, untested
        claims = [inconclusive(ctx.plan, f"{words} [{arm.name}]") for words in observation_names()]
        for claim in claims:
            gate(claim, [arm])
        return claims
    # A settled plan's arms are gated by the settled rule (the arm's own record); else by the
    # convergence rule, which reuse_change_claims applies on the curves itself.
    curves = None if ctx.plan.settled else ctx.curves
    claims = reuse_change_claims(ctx.plan.name, arm.name, arm.trained, ctx.matrices, ctx.init, curves,
                                 k["min_layers"], k["keep_fraction"], ctx.plan.convergence)
    for claim in claims:
        claim.claim = f"{claim.claim} [{arm.name}]"
        if ctx.plan.settled and claim.p_value is not None and gate(claim, [arm]):
            claim.p_value, claim.direction = None, 0  # not settled: the test stays in the family with p = 1
    return claims


def observation_names() -> list[str]:
    from ..measures.figure5 import FIGURE5

    return [FIGURE5[key][0] for key in REUSE_DIRECTIONS]
