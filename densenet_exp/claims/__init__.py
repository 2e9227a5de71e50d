"""The claim engine: a declared plan's claims judged on its confirmation runs alone.

    plan = load_plan("docs/results/fmnist_pair/plan.yaml")    # plan.py's loader + each kind's checks
    judged = judge_plan(plan, runs, curves, matrices, init, grads)
    judged.claims, judged.arms, judged.family, judged.notes

Each claim kind is one module here, and owns everything about it: KIND (its name in a plan), KEYS
(its plan keys, a default or None when required), ARM_KEYS (the keys that name arms), POSITIVE
(keys that must be numbers > 0), `check` (any other check), `tests` (how many tests it puts in the
plan's fixed family), `name`, `rule` (the Method text, built from its keys) and `judge` (its
claims). A new kind is a new module added to KINDS. The family is fixed by the plan and decided
in family.py; the shared evidence (arms, gates, the accuracy comparison) is evidence.py.
Torch-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis import stats
from ..analysis.verdicts import INCONCLUSIVE, Claim, convergence_rule
from ..checks import is_number, require
from ..plan import DeclaredClaim, Plan
from ..plan import load_plan as load_declared
from . import degradation, family, feature_reuse, fewer_params, frontier, gradient_flow, knob_effect, matched_cost
from .evidence import (BUDGET_RULE, SETTLED_RULE, STAGE_RULE, VARIANCE_RULE, Arm, arms_of, budget_check,
                       confirmation_runs, notes, paired_problems)

KINDS = {kind.KIND: kind for kind in (fewer_params, matched_cost, degradation, feature_reuse, gradient_flow,
                                      knob_effect, frontier)}


def named_arms(kind, keys: Mapping[str, object]) -> list[tuple[str, str]]:
    """(key, arm) for each arm a claim of `kind` names: its ARM_KEYS' values, each an arm or a list."""
    return [(key, arm) for key in kind.ARM_KEYS for arm in (keys[key] if isinstance(keys[key], list) else [keys[key]])]


def _checked(i: int, c: DeclaredClaim, arms: Mapping[str, object]) -> DeclaredClaim:
    where = f"claims[{i}]"
    require(f"{where}.kind", c.kind, c.kind in KINDS, f"one of {', '.join(KINDS)}")
    kind = KINDS[c.kind]
    for key in c.keys:
        require(f"{where}.{key}", c.keys[key], key in kind.KEYS, f"one of the keys {', '.join(kind.KEYS)}")
    keys = {k: c.keys.get(k, default) for k, default in kind.KEYS.items()}
    for key, value in keys.items():
        require(f"{where}.{key}", value, value is not None, "a value (required)")
    for key, arm in named_arms(kind, keys):
        require(f"{where}.{key}", arm, arm in arms, f"an arm of the confirmation stage ({', '.join(arms)})")
    for key in kind.POSITIVE:
        require(f"{where}.{key}", keys[key], is_number(keys[key]) and keys[key] > 0, "a number > 0")
    if hasattr(kind, "check"):
        kind.check(where, keys)
    return DeclaredClaim(c.kind, keys)


def load_plan(path: str | Path) -> Plan:
    """plan.load_plan, then every claim checked by its kind (defaults filled in): InvalidValue otherwise."""
    plan = load_declared(path)
    claims = tuple(_checked(i, c, plan.arms["confirmation"]) for i, c in enumerate(plan.claims))
    return dataclasses.replace(plan, claims=claims)


def name(c: DeclaredClaim) -> str:
    return KINDS[c.kind].name(c.keys)


def tests(plan: Plan) -> int:
    """The size of the plan's fixed family: every test its claims declare (stats.FAMILY_RULE)."""
    return sum(KINDS[c.kind].tests(c.keys) for c in plan.claims)


def describe(plan: Plan) -> list[str]:
    """The plan as `study show` and the report print it, its claims named by their kinds."""
    return [*plan.describe(), f"family: {tests(plan)} declared tests",
            *(f"claim {i}: {name(c)}" for i, c in enumerate(plan.claims, 1))]


@dataclass
class Context:
    """What every kind's judge reads: the plan, its arms, the run measures and the family's size."""

    plan: Plan
    arms: dict[str, Arm]
    curves: pd.DataFrame
    matrices: Mapping[str, list[np.ndarray]]
    init: Mapping[str, list[np.ndarray]]
    grads: pd.DataFrame
    tests: int
    predictions: Mapping[str, pd.DataFrame] = field(default_factory=dict)  # run_id -> its test predictions
    controls: list[Claim] = field(default_factory=list)  # degradation's control claims


@dataclass
class Confirmation:
    plan: Plan
    claims: list[Claim]
    arms: dict[str, Arm]
    family: list[str]
    notes: list[str]
    procedure: str = ""


def judge_plan(plan: Plan, runs: pd.DataFrame, curves: pd.DataFrame, matrices: Mapping[str, list[np.ndarray]],
               init: Mapping[str, list[np.ndarray]], grads: pd.DataFrame,
               predictions: Mapping[str, pd.DataFrame] | None = None) -> Confirmation:
    """Every declared claim of `plan` on its confirmation runs among `runs` (results.load_runs of
    the plan's experiment); curves of the convergence metric, matrices trained and at init, and
    relative gradients with layer roles, and test predictions (run_id -> results.test_predictions) from
    results."""
    mine = confirmation_runs(plan, runs)
    curves = curves[curves["run_id"].isin(mine["run_id"])]
    ctx = Context(plan, arms_of(plan, mine, curves), curves, matrices, init, grads, tests(plan), predictions or {})
    claims = [claim for c in plan.claims for claim in KINDS[c.kind].judge(ctx, c.keys)]
    unpaired = paired_problems(plan, mine)
    for claim in claims if unpaired else []:  # a within-seed test on seeds that did not share their split
        claim.p_value, claim.verdict, claim.reason = None, INCONCLUSIVE, f"declared paired, but {unpaired[0]}"
    decided = family.decide(plan, claims)
    budget_check(plan, runs, ctx.arms, claims)
    data = ", ".join(sorted(mine["data"].dropna().astype(str).unique()))
    for claim in claims if data else []:  # named by their runs' data set, as the configuration tables name it
        claim.data = data
    return Confirmation(plan, claims, ctx.arms, [c.claim for c in decided], notes(plan, mine, ctx.arms),
                        family.procedure_line(plan, decided))


def rules(plan: Plan) -> list[tuple[str, str]]:
    """Every rule judge_plan applies to this plan, as (name, text), in the order the report prints them:
    the shared ones, then each declared kind's (once, from its first claim's keys)."""
    shared = [
        ("stage and plan", STAGE_RULE),
        ("convergence", (SETTLED_RULE if plan.settled else convergence_rule(plan.convergence)) + " A run whose last "
                        "validation check is within "
                        f"{plan.convergence['near_chance_pp']:g} points of chance (1 / classes) is left out of the "
                        "claims on trained nets and named: decided on validation accuracy, never on the test accuracy "
                        "the claims compare."),
        ("one-sided tests", stats.ONE_SIDED_RULE + f" Here alpha = {plan.alpha:g}."),
        ("non-inferiority and equivalence", stats.NON_INFERIORITY_RULE),
        ("the family", stats.FAMILY_RULE),
        ("multiple comparisons", stats.HOLM_RULE),
        ("power", stats.POWER_RULE + " " + stats.TOST_POWER_RULE),
        ("variance over seeds and test images", VARIANCE_RULE),
        *([("paired design", stats.PAIRED_RULE)] if plan.paired else []),
        *([("budget", BUDGET_RULE)] if plan.arms["budget"] else []),
    ]
    first = {}
    for c in plan.claims:
        first.setdefault(c.kind, c.keys)
    return shared + [KINDS[kind].rule(keys) for kind, keys in first.items()]
