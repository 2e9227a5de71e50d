"""The plan's fixed family of tests, decided once every claim kind has judged (stats.FAMILY_RULE),
then the gates: a claim that needs another supported (costs at matched accuracy need the
equivalence; "trains as well when deeper" needs the control family to degrade) stays
inconclusive, with the gate named, when that claim is not supported. Torch-free.
"""

from __future__ import annotations

from ..analysis import stats
from ..analysis.verdicts import CONTRADICTED, INCONCLUSIVE, SUPPORTED, Claim
from ..plan import Plan


def first_alpha(plan: Plan, tests: int) -> float:
    """The level the plan's procedure holds a single test to: alpha / k under Holm's first step,
    alpha itself in a fixed sequence (the first test is tested at alpha)."""
    return stats.holm_first_alpha(plan.alpha, tests) if plan.procedure == "holm" else plan.alpha


def decide(plan: Plan, claims: list[Claim]) -> list[Claim]:
    """FAMILY_RULE over the claims in the family (in place), then their gates; returns the family."""
    family = [c for c in claims if c.in_family]
    raw = [c.p_value if c.p_value is not None else 1.0 for c in family]  # stopped by a gate: p = 1
    adjusted = stats.holm(raw) if plan.procedure == "holm" else stats.fixed_sequence(raw)
    words = "after Holm" if plan.procedure == "holm" else "in the fixed sequence"
    stopped = None  # fixed sequence: the first claim that did not reject ends it
    for claim, p in zip(family, adjusted):
        if claim.p_value is None:
            claim.reason = claim.reason or "no test"
        else:
            claim.p_holm = p
            if p < plan.alpha and claim.direction:
                claim.verdict, claim.reason = (SUPPORTED if claim.direction > 0 else CONTRADICTED), ""
            elif plan.procedure == "fixed_sequence" and stopped is not None:
                claim.verdict, claim.reason = INCONCLUSIVE, f"not reached: the sequence stopped at {stopped.claim}"
            else:
                claim.verdict, claim.reason = INCONCLUSIVE, f"not significant {words}, p = {p:.3g}"
        if plan.procedure == "fixed_sequence" and stopped is None and claim.verdict not in (SUPPORTED, CONTRADICTED):
            stopped = claim
    for claim in claims:  # after the family: a gate reads the verdicts it needs
        reasons = [why for why in (g() for g in claim.gates) if why]
        if reasons:
            claim.verdict, claim.reason = INCONCLUSIVE, reasons[0]
    return family


def procedure_line(plan: Plan, family: list[Claim]) -> str:
    """What the report prints under the claims: the procedure, the family's size and its untested members."""
    untested = sum(c.p_value is None for c in family)
    how = ("Holm over the plan's fixed family" if plan.procedure == "holm"
           else "a fixed sequence in the declared order, each test at alpha")
    return (f"{how}: {len(family)} declared test{'s' if len(family) != 1 else ''}, alpha {plan.alpha:g} one-sided"
            + (f"; {untested} stopped by a gate, counted with p = 1" if untested else "") + ".")
