"""`degradation` (He et al. 2016, Fig. 1): the deeper arm of a family against the shallower, final
training loss on the log scale, same recipe and budget. `control: true` marks the family that must
degrade (plain nets) for the others' "trains as well when deeper" to be judged. One test each."""

from __future__ import annotations

import numpy as np

from .. import record
from ..analysis import stats
from ..analysis.verdicts import SUPPORTED, Claim, one_sided
from .evidence import gate, inconclusive

KIND = "degradation"
KEYS = {"family": None, "shallow": None, "deep": None, "margin": 0.1, "control": False}
ARM_KEYS = ("shallow", "deep")
POSITIVE = ("margin",)


def tests(k) -> int:
    return 1


def name(k) -> str:
    return (f"{k['family']}: {k['deep']} " + ("trains worse than " if k["control"] else "trains as well as ")
            + f"{k['shallow']} (final training loss)")


def rule(k) -> tuple[str, str]:
    return ("degradation", "He et al. 2016, Fig. 1: the final training loss of the deeper arm of a family against the "
            "shallower, same recipe and budget, on the log scale. The control family (plain nets) must degrade "
            "(deeper higher, supported) for the other families' \"trains as well when deeper\" (deeper below "
            "(1 + margin) x the shallower) to be judged; else those are inconclusive.")


def judge(ctx, k) -> list[Claim]:
    shallow, deep = ctx.arms[k["shallow"]], ctx.arms[k["deep"]]
    x, y = deep.values(record.TRAIN_LOSS), shallow.values(record.TRAIN_LOSS)
    evidence = (f"final training loss {deep.describe(record.TRAIN_LOSS, fmt='.4f')} vs "
                f"{shallow.describe(record.TRAIN_LOSS, fmt='.4f')}")
    if len(x) and len(y) and (x > 0).all() and (y > 0).all():
        evidence += f"; ratio {np.exp(np.log(x).mean() - np.log(y).mean()):.3g} (geometric means)"
    claim = inconclusive(ctx.plan, name(k), evidence)
    if k["control"]:
        ctx.controls.append(claim)
    else:
        claim.gates = [lambda: control_failed(ctx.controls)]
    if gate(claim, [shallow, deep], converged=False):
        return [claim]
    if not ((x > 0).all() and (y > 0).all()):
        claim.reason = "a training loss <= 0 has no log"
        return [claim]
    lx, ly = np.log(x), np.log(y)
    if k["control"]:
        return [one_sided(claim, stats.welch_one_sided(lx, ly, "larger"), stats.welch_one_sided(lx, ly, "smaller"),
                          f"one-sided Welch on log loss, deeper higher (n = {len(x)}, {len(y)})")]
    bound = np.log(1 + k["margin"])
    return [one_sided(claim, stats.welch_one_sided(lx, ly, "smaller", bound),
                      stats.welch_one_sided(lx, ly, "larger", bound),
                      f"one-sided Welch on log loss, deeper below {1 + k['margin']:g}x the shallower "
                      f"(n = {len(x)}, {len(y)})")]


def control_failed(controls: list[Claim]) -> str | None:
    """Why "trains as well when deeper" cannot be judged: no control, or one that did not degrade."""
    failed = [c for c in controls if c.verdict != SUPPORTED]
    if failed:
        return f"the control failed: {failed[0].claim} is {failed[0].label}"
    return None if controls else "no control family declared"
